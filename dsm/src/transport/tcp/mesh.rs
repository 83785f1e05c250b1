//! Forming the mesh: the accepting side (every connection's handshake read at once, each bounded in time,
//! strangers refused and the mesh going on) and the connecting side (one connection per channel set to
//! every rank), and the first failure of either stopping the other.

use super::handshake::*;
use super::stream::Stream;
use super::unix::{connect_unix, PeerAddr};
use super::{random_bytes, Token};
use crate::error::{DsmError, Result};
use crate::types::Rank;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a connection may take to send its handshake, in all.
pub(super) const HELLO_TIME: Duration = Duration::from_secs(5);

/// One rank's setting up of its mesh: who it is, what it expects, and which side (accepting or connecting)
/// failed first, which stops the other.
#[derive(Clone)]
pub(super) struct Setup {
    pub(super) me: Rank,
    pub(super) size: usize,
    pub(super) channels: usize,
    pub(super) token: Token,
    pub(super) deadline: Instant,
    pub(super) first_failure: Arc<AtomicU8>,
}

pub(super) const NO_FAILURE: u8 = 0;

pub(super) const ACCEPTING: u8 = 1;

pub(super) const CONNECTING: u8 = 2;

impl Setup {
    /// Records that `side` failed; the first side to fail is the one whose error the rank reports.
    pub(super) fn failed(&self, side: u8) {
        let _ = self.first_failure.compare_exchange(
            NO_FAILURE,
            side,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub(super) fn stopping(&self) -> bool {
        self.first_failure.load(Ordering::Acquire) != NO_FAILURE
    }
}

/// A connection accepted from `from`'s set `set`.
type Accepted = (Rank, usize, OwnedFd);

/// A listener of the mesh: a rank's TCP one, or its Unix-domain one (`unix.rs`).
trait Listener {
    /// A connection and where it came from, as said in a refusal's log.
    fn take(&self) -> std::io::Result<(Stream, String)>;
    fn fd(&self) -> BorrowedFd<'_>;
    fn set_nonblocking(&self) -> std::io::Result<()>;
}

impl Listener for TcpListener {
    fn take(&self) -> std::io::Result<(Stream, String)> {
        self.accept().map(|(s, from)| (s.into(), from.to_string()))
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
    fn set_nonblocking(&self) -> std::io::Result<()> {
        TcpListener::set_nonblocking(self, true)
    }
}

impl Listener for UnixListener {
    fn take(&self) -> std::io::Result<(Stream, String)> {
        self.accept()
            .map(|(s, _)| (s.into(), "a process on this host (Unix socket)".to_string()))
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
    fn set_nonblocking(&self) -> std::io::Result<()> {
        UnixListener::set_nonblocking(self, true)
    }
}

pub(super) fn accept_all(
    listener: TcpListener,
    unix: Option<UnixListener>,
    setup: Setup,
) -> Result<Vec<Accepted>> {
    let mut listeners: Vec<&dyn Listener> = vec![&listener];
    listeners.extend(unix.as_ref().map(|l| l as &dyn Listener));
    let result = accept_each(&listeners, &setup);
    if result.is_err() {
        // Before the listener closes: the connections this rank's own connecting side has under way
        // then fail, and they must not pass for the first failure.
        setup.failed(ACCEPTING);
    }
    drop(listener);
    drop(unix);
    result
}

/// A connection whose handshake is being read: the bytes so far, and until when it may take.
struct Greeting {
    stream: Stream,
    from: String,
    hello: [u8; HELLO_LEN],
    got: usize,
    until: Instant,
}

/// The most connections whose handshakes are read at once beyond those the job expects, and the most
/// accepted in one pass of the loop. Past it the oldest are dropped, those that sent nothing first: a rank
/// sends its handshake as it connects, so only a connection that sends nothing (or a byte now and then)
/// grows old.
pub(super) const MAX_GREETING: usize = 64;

impl Greeting {
    /// Reads what has arrived; the handshake's rank and set once all of it has and checks out, `None`
    /// while more is to come, or why it is refused.
    fn progress(
        &mut self,
        token: &Token,
        me: Rank,
        size: usize,
        channels: usize,
    ) -> Option<std::result::Result<(Rank, usize), Refusal>> {
        use std::io::ErrorKind;
        let not_received = |e: std::io::Error| {
            Some(Err(Refusal::Stranger(format!(
                "handshake not received: {e}"
            ))))
        };
        loop {
            // The magic first, then the preamble: a rank of another build may send a handshake of
            // another length, and one of a build before the proof sends a shorter one and waits.
            let token_in_clear = self.got >= 4 && &self.hello[..4] == TOKEN_IN_CLEAR;
            let want = if self.got < 4 {
                4
            } else if token_in_clear {
                TOKEN_IN_CLEAR_LEN
            } else if self.got < PREAMBLE_LEN {
                PREAMBLE_LEN
            } else {
                HELLO_LEN
            };
            match self.stream.read(&mut self.hello[self.got..want]) {
                Ok(0) => return not_received(ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.got += n;
                    if token_in_clear && self.got == TOKEN_IN_CLEAR_LEN {
                        return Some(Err(check_token_in_clear(&self.hello, token)));
                    }
                    if self.got == PREAMBLE_LEN {
                        if let Err(r) = check_preamble(&self.hello, token) {
                            return Some(Err(r));
                        }
                    }
                    if self.got == HELLO_LEN {
                        return Some(check_hello(&self.hello, token, me, size, channels));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return match Instant::now() >= self.until {
                        true => not_received(ErrorKind::TimedOut.into()),
                        false => None,
                    };
                }
                Err(e) => return not_received(e),
            }
        }
    }
}

/// Drops the `n` oldest connections whose handshakes are awaited, those that sent nothing yet first, and
/// says so once.
fn drop_oldest(greetings: &mut Vec<Greeting>, n: usize, me: Rank) {
    let n = n.min(greetings.len());
    if n == 0 {
        return;
    }
    // A stable sort keeps the age order within each kind.
    greetings.sort_by_key(|g| g.got > 0);
    let dropped: Vec<Greeting> = greetings.drain(..n).collect();
    greetings.sort_by_key(|g| g.until);
    let why = format!(
        "{n} connection(s) dropped (from {} first) whose handshakes had not come while others waited",
        dropped[0].from
    );
    tracing::warn!("{me}: {why}");
    eprintln!("dsm: {me}: {why}");
}

/// Accepts the job's connections and reads their handshakes side by side: a connection that sends
/// nothing holds up no other (it is dropped after `HELLO_TIME`, or sooner when `MAX_GREETING` others
/// wait behind it), so strangers on a listener open to the network cannot make the ranks' connections
/// wait out their timeout.
fn accept_each(listeners: &[&dyn Listener], setup: &Setup) -> Result<Vec<Accepted>> {
    let Setup {
        me,
        size,
        channels,
        ref token,
        deadline,
        ..
    } = *setup;
    // From every other rank: a rank's connections to itself are in memory (`TcpTransport::establish`),
    // and one that says it comes from this rank is refused as a second opening of a set.
    let expected = channels * size.saturating_sub(1);
    for l in listeners {
        l.set_nonblocking()
            .map_err(|e| DsmError::io("listener set_nonblocking", e))?;
    }
    let mut accepted = Vec::with_capacity(expected);
    let mut arrived: std::collections::HashSet<(Rank, usize)> =
        (0..channels).map(|set| (me, set)).collect();
    // The nonces of the handshakes taken: one sent again (recorded on its way and replayed) is refused.
    let mut nonces = std::collections::HashSet::with_capacity(expected);
    let mut greetings: Vec<Greeting> = Vec::new();
    while accepted.len() < expected {
        // At most a room's worth of new connections a pass from each listener, so that a flood of them
        // still leaves time to read handshakes and to look at the deadline.
        for listener in listeners {
            for _ in 0..MAX_GREETING {
                match listener.take() {
                Ok((stream, from)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    greetings.push(Greeting {
                        stream,
                        from,
                        hello: [0u8; HELLO_LEN],
                        got: 0,
                        until: (Instant::now() + HELLO_TIME).min(deadline),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted
                    ) => {}
                // Out of descriptors: those held by handshakes still awaited make room, oldest first.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                        && !greetings.is_empty() =>
                {
                    let half = greetings.len() / 2 + 1;
                    drop_oldest(&mut greetings, half, me);
                    break;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    return Err(DsmError::io(
                        format!("{me}: accepting the other ranks' connections (raise the open-file limit, `ulimit -n`, or run fewer ranks, or set a smaller DSM_CHANNELS)"),
                        e,
                    ))
                }
                Err(e) => return Err(DsmError::io("accept", e)),
            }
            }
        }
        // Handshakes are read before any is dropped for room: a rank's comes with its connection.
        let mut i = 0;
        while i < greetings.len() {
            let Some(verdict) = greetings[i].progress(token, me, size, channels) else {
                i += 1;
                continue;
            };
            // (In order: the first is the oldest, which goes first when room is short.)
            let Greeting {
                mut stream,
                from,
                hello,
                ..
            } = greetings.remove(i);
            let verdict = verdict
                .and_then(|ok| match nonces.insert(nonce_of(&hello)) {
                    true => Ok(ok),
                    false => Err(Refusal::Stranger(
                        "a handshake this rank has already taken, sent again".into(),
                    )),
                })
                .and_then(|(rank, set)| match arrived.insert((rank, set)) {
                    true => Ok((rank, set)),
                    false => Err(Refusal::Member(format!(
                        "rank {rank} opened its connection {set} twice: two processes of the job took rank {rank} (give each its own DSM_RANK), or another program has the job's token"
                    ))),
                });
            let _ = stream.set_nonblocking(false);
            match verdict {
                Ok((rank, set)) => {
                    let mut reply = [ACK_OK; 1 + WELCOME_LEN];
                    reply[1..].copy_from_slice(&welcome(&hello, token));
                    stream
                        .write_all(&reply)
                        .map_err(|e| DsmError::io(format!("handshake reply to {rank}"), e))?;
                    let _ = stream.set_read_timeout(None);
                    let _ = stream.set_nodelay();
                    accepted.push((rank, set, OwnedFd::from(stream)));
                }
                Err(Refusal::Stranger(reason)) => {
                    tracing::warn!("{me}: refused a connection from {from}: {reason}");
                    eprintln!("dsm: {me}: refused a connection from {from}: {reason}");
                    refuse(&mut stream, &reason);
                }
                Err(Refusal::Member(reason)) => {
                    // Marked before the refusal goes: what the refused rank does next (it stops, and
                    // this rank's connections to it fail) must not pass for the first failure here.
                    setup.failed(ACCEPTING);
                    refuse(&mut stream, &reason);
                    return Err(DsmError::BadHandshake(format!("{me}: {reason}")));
                }
            }
        }
        if accepted.len() == expected {
            break;
        }
        if greetings.len() > expected + MAX_GREETING {
            let over = greetings.len() - expected - MAX_GREETING;
            drop_oldest(&mut greetings, over, me);
        }
        if setup.stopping() {
            return Err(DsmError::Config(format!(
                "{me}: stopped waiting for connections: this rank could not connect to the others"
            )));
        }
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(DsmError::Config(format!(
                "{me}: only {} of {expected} connections arrived before the timeout: a rank did not start or cannot reach this one",
                accepted.len()
            )));
        }
        // Until a connection or a handshake's bytes arrive, a handshake's time is up, the deadline, or a
        // look at whether this rank's connecting failed: nothing waits out a polling interval.
        let wait = greetings
            .iter()
            .map(|g| g.until.saturating_duration_since(now))
            .fold(left.min(ABORT_CHECK), Duration::min);
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.fd(), PollFlags::POLLIN))
            .collect();
        fds.extend(
            greetings
                .iter()
                .map(|g| PollFd::new(g.stream.as_fd(), PollFlags::POLLIN)),
        );
        let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None);
    }
    Ok(accepted)
}

/// Opens this rank's connection of set `set` to rank `to`: through its Unix socket when `unix` and it
/// has one on this host, else over TCP.
pub(super) fn connect(
    setup: &Setup,
    to: Rank,
    set: usize,
    peer: PeerAddr,
    unix: bool,
) -> Result<OwnedFd> {
    let me = setup.me;
    let local = match peer.unix.filter(|_| unix) {
        Some(name) => connect_unix(name, setup.deadline, &|| setup.stopping())?
            .map(|s| (Stream::from(s), format!("@dsm-{name} (its Unix socket)"))),
        None => None,
    };
    let (mut stream, addr) = match local {
        Some(local) => local,
        None => (
            Stream::from(connect_tcp(setup, to, peer.tcp)?),
            peer.tcp.to_string(),
        ),
    };
    let addr = addr.as_str();
    let nonce = random_bytes("a handshake's nonce")?;
    let hello = hello(me, to, setup.channels, set, &setup.token, nonce);
    stream
        .write_all(&hello)
        .map_err(|e| handshake_failed(me, to, addr, "sending its handshake to", e))?;
    // Until the job's deadline: the other rank's accepting may be held up by a slow stranger's handshake.
    let mut ack = [0u8; 1];
    read_by(&mut stream, &mut ack, setup.deadline, &|| setup.stopping())
        .map_err(|e| handshake_failed(me, to, addr, "waiting for the handshake reply from", e))?;
    if ack[0] != ACK_OK {
        return Err(DsmError::BadHandshake(format!(
            "{me}: {to} at {addr} refused this rank's handshake: {}",
            read_reason(&mut stream)
        )));
    }
    let mut proof = [0u8; WELCOME_LEN];
    read_by(&mut stream, &mut proof, setup.deadline, &|| {
        setup.stopping()
    })
    .map_err(|e| handshake_failed(me, to, addr, "waiting for the handshake reply from", e))?;
    if !welcomed(&hello, &proof, &setup.token) {
        return Err(DsmError::BadHandshake(format!(
            "{me}: what answers at {addr}, where {to} listens, does not know the job's token: it is not {to} (another program took the address, which {to} may have left)"
        )));
    }
    let _ = stream.set_read_timeout(None);
    Ok(OwnedFd::from(stream))
}

/// A TCP connection to rank `to` at `addr`, `TCP_NODELAY`.
fn connect_tcp(setup: &Setup, to: Rank, addr: std::net::SocketAddr) -> Result<TcpStream> {
    let me = setup.me;
    let stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            // Its listener was bound before its address was handed out: refused means that the rank
            // has stopped setting up the job (or a firewall rejects the connection). Retrying would only
            // wait out the timeout.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(DsmError::PeerFailed {
                    rank: to,
                    reason: format!("{me} could not connect to it at {addr}: {e} (it has stopped setting up the job, or cannot be reached: see its error)"),
                })
            }
            Err(e) if Instant::now() < setup.deadline && !setup.stopping() => {
                tracing::debug!("{me}: connect to {to} at {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(DsmError::io(
                    format!("{me}: connecting to {to} at {addr}"),
                    e,
                ))
            }
        }
    };
    stream
        .set_nodelay(true)
        .map_err(|e| DsmError::io("TCP_NODELAY", e))?;
    Ok(stream)
}

/// Why this rank's handshake with rank `to` failed (while `what`, as in "sending its handshake to"): the
/// peer's failure if it closed the connection (it stopped setting up the job: its own error says why),
/// else this rank's error (a timeout, or this rank stopping).
fn handshake_failed(me: Rank, to: Rank, addr: &str, what: &str, e: std::io::Error) -> DsmError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if matches!(
        e.kind(),
        BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof
    ) {
        DsmError::PeerFailed {
            rank: to,
            reason: format!(
                "{me}, {what} it at {addr}: {e} (it has stopped setting up the job: see its error)"
            ),
        }
    } else {
        DsmError::io(format!("{me}: {what} {to} at {addr}"), e)
    }
}
