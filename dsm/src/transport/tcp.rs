//! TCP transport: a full mesh of `TCP_NODELAY` connections. Every connection starts with a handshake that
//! proves knowledge of the job's secret token; a wrong token, protocol version or rank is refused and logged.
//! Listeners bind to 127.0.0.1 unless the launcher is told otherwise (`DSM_BIND`).

use super::{channels_in, Conn, Incoming, Mesh, Transport, PROTOCOL_VERSION};
use crate::error::{DsmError, Result};
use crate::types::Rank;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The secret every connection of a job must present.
pub type Token = [u8; 32];

/// The mesh of one rank over TCP.
#[derive(Debug)]
pub struct TcpTransport {
    listener: TcpListener,
    peers: Vec<SocketAddr>,
    token: Token,
    timeout: Duration,
}

impl TcpTransport {
    /// `listener` is this rank's bound listener; `peers[r]` is rank r's listener address (this rank's
    /// included); `timeout` bounds the whole establishment.
    pub fn new(
        listener: TcpListener,
        peers: Vec<SocketAddr>,
        token: Token,
        timeout: Duration,
    ) -> TcpTransport {
        TcpTransport {
            listener,
            peers,
            token,
            timeout,
        }
    }
}

const MAGIC: &[u8; 4] = b"DSM\x01";
/// A handshake: magic, protocol version, job token, rank, connections per rank (its channels and one
/// more: `transport::connections`), and which of them this one is (its set: the service loop's own is
/// the last). The first 40 bytes (magic, version and token: the preamble) keep this layout in every
/// version, and are read and checked before the rest, so that a rank of another build, whose handshake
/// may be of another length, is still known for one of the job's (its token is right) and told why it is
/// refused, instead of being taken for a stranger.
const HELLO_LEN: usize = PREAMBLE_LEN + 4 + 4 + 4;
const PREAMBLE_LEN: usize = 4 + 4 + 32;

fn hello(me: Rank, channels: usize, set: usize, token: &Token) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[8..40].copy_from_slice(token);
    h[40..44].copy_from_slice(&me.0.to_le_bytes());
    h[44..48].copy_from_slice(&(channels as u32).to_le_bytes());
    h[48..52].copy_from_slice(&(set as u32).to_le_bytes());
    h
}

/// Constant-time comparison, so that the time to refuse does not reveal how much of a token was right.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a handshake is refused.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// Not a rank of this job (bad magic, wrong token): refused, and the mesh goes on forming.
    Stranger(String),
    /// A rank of this job that cannot be part of the mesh (another build, another number of channels, a
    /// rank outside the job): the job cannot start, and every rank says why at once.
    Member(String),
}

fn word(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks a handshake's preamble (its first [`PREAMBLE_LEN`] bytes): a connection of this job (magic and
/// token), of this build (protocol version).
fn check_preamble(h: &[u8], token: &Token) -> std::result::Result<(), Refusal> {
    if &h[..4] != MAGIC {
        return Err(Refusal::Stranger("not a dsm connection (bad magic)".into()));
    }
    if !same_token(&h[8..40], token) {
        return Err(Refusal::Stranger("wrong job token".into()));
    }
    let version = word(h, 4);
    if version != PROTOCOL_VERSION {
        return Err(Refusal::Member(format!(
            "a rank speaks protocol version {version}, this rank {PROTOCOL_VERSION}: every rank must run the same build"
        )));
    }
    Ok(())
}

/// Checks a handshake from a rank that means to join a job of `size` ranks with `channels` connections to
/// each rank (its channels and one more); returns the peer's rank and the connection's set, or why it is
/// refused.
fn check_hello(
    h: &[u8; HELLO_LEN],
    token: &Token,
    size: usize,
    channels: usize,
) -> std::result::Result<(Rank, usize), Refusal> {
    check_preamble(h, token)?;
    let (rank, theirs, set) = (word(h, 40), word(h, 44), word(h, 48));
    if rank as usize >= size {
        return Err(Refusal::Member(format!(
            "rank {rank} is outside a job of {size}"
        )));
    }
    if theirs as usize != channels {
        return Err(Refusal::Member(format!(
            "rank {rank} has {} channels, this rank {}: give every rank the same DSM_CHANNELS",
            channels_in(theirs as usize),
            channels_in(channels)
        )));
    }
    if set >= theirs {
        return Err(Refusal::Member(format!(
            "rank {rank} opened connection {set} of {theirs}: every rank must run the same build"
        )));
    }
    Ok((Rank(rank), set as usize))
}

const ACK_OK: u8 = 0;
/// Followed by the reason: its length (u16, little-endian) and its bytes.
const ACK_REFUSED: u8 = 1;
const MAX_REASON: usize = 1024;

fn refuse(stream: &mut TcpStream, reason: &str) {
    let mut reply = vec![ACK_REFUSED];
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
    reply.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    reply.extend_from_slice(reason);
    let _ = stream.write_all(&reply);
    // Ended before it is dropped: a handshake not read in full (a build of another length) would otherwise
    // make the close a reset, which may come before the refusal is read.
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// The reason that follows a refusal, as far as it can be read within a second.
fn read_reason(stream: &mut TcpStream) -> String {
    let until = Instant::now() + Duration::from_secs(1);
    let mut len = [0u8; 2];
    if read_by(stream, &mut len, until, &|| false).is_err() {
        return "no reason given".into();
    }
    let mut reason = vec![0u8; (u16::from_le_bytes(len) as usize).min(MAX_REASON)];
    match read_by(stream, &mut reason, until, &|| false) {
        Ok(()) => String::from_utf8_lossy(&reason).into_owned(),
        Err(_) => "no reason given".into(),
    }
}

/// Reads `buf` in full by `until` (a bound on the whole, not on each read: a peer that sends a byte at a
/// time holds the reader no longer), or gives up as soon as `give_up` says so.
fn read_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    until: Instant,
    give_up: &dyn Fn() -> bool,
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let mut got = 0;
    while got < buf.len() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        if give_up() {
            return Err(std::io::Error::other(
                "this rank stopped setting up the job",
            ));
        }
        stream.set_read_timeout(Some(left.min(ABORT_CHECK)))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long a connection may take to send its handshake, in all.
const HELLO_TIME: Duration = Duration::from_secs(5);

/// How long the accept loop sleeps, at most, before it looks whether the rank's own connecting gave up.
const ABORT_CHECK: Duration = Duration::from_millis(50);

/// One rank's setting up of its mesh: who it is, what it expects, and which side (accepting or connecting)
/// failed first, which stops the other.
#[derive(Clone)]
struct Setup {
    me: Rank,
    size: usize,
    channels: usize,
    token: Token,
    deadline: Instant,
    first_failure: Arc<AtomicU8>,
}

const NO_FAILURE: u8 = 0;
const ACCEPTING: u8 = 1;
const CONNECTING: u8 = 2;

impl Setup {
    /// Records that `side` failed; the first side to fail is the one whose error the rank reports.
    fn failed(&self, side: u8) {
        let _ = self.first_failure.compare_exchange(
            NO_FAILURE,
            side,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn stopping(&self) -> bool {
        self.first_failure.load(Ordering::Acquire) != NO_FAILURE
    }
}

/// A connection accepted from `from`'s set `set`.
type Accepted = (Rank, usize, OwnedFd);

fn accept_all(listener: TcpListener, setup: Setup) -> Result<Vec<Accepted>> {
    let result = accept_each(&listener, &setup);
    if result.is_err() {
        // Before the listener closes: the connections this rank's own connecting side has under way
        // then fail, and they must not pass for the first failure.
        setup.failed(ACCEPTING);
    }
    drop(listener);
    result
}

/// A connection whose handshake is being read: the bytes so far, and until when it may take.
struct Greeting {
    stream: TcpStream,
    from: SocketAddr,
    hello: [u8; HELLO_LEN],
    got: usize,
    until: Instant,
}

/// The most connections whose handshakes are read at once beyond those the job expects, and the most
/// accepted in one pass of the loop. Past it the oldest are dropped, those that sent nothing first: a rank
/// sends its handshake as it connects, so only a connection that sends nothing (or a byte now and then)
/// grows old.
const MAX_GREETING: usize = 64;

impl Greeting {
    /// Reads what has arrived; the handshake's rank and set once all of it has and checks out, `None`
    /// while more is to come, or why it is refused.
    fn progress(
        &mut self,
        token: &Token,
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
            // The preamble first: a rank of another build may send a handshake of another length.
            let want = if self.got < PREAMBLE_LEN {
                PREAMBLE_LEN
            } else {
                HELLO_LEN
            };
            match self.stream.read(&mut self.hello[self.got..want]) {
                Ok(0) => return not_received(ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.got += n;
                    if self.got == PREAMBLE_LEN {
                        if let Err(r) = check_preamble(&self.hello, token) {
                            return Some(Err(r));
                        }
                    }
                    if self.got == HELLO_LEN {
                        return Some(check_hello(&self.hello, token, size, channels));
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
fn accept_each(listener: &TcpListener, setup: &Setup) -> Result<Vec<Accepted>> {
    let Setup {
        me,
        size,
        channels,
        ref token,
        deadline,
        ..
    } = *setup;
    let expected = channels * size;
    listener
        .set_nonblocking(true)
        .map_err(|e| DsmError::io("listener set_nonblocking", e))?;
    let mut accepted = Vec::with_capacity(expected);
    let mut arrived = std::collections::HashSet::with_capacity(expected);
    let mut greetings: Vec<Greeting> = Vec::new();
    while accepted.len() < expected {
        // At most a room's worth of new connections a pass, so that a flood of them still leaves time
        // to read handshakes and to look at the deadline.
        for _ in 0..MAX_GREETING {
            match listener.accept() {
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
        // Handshakes are read before any is dropped for room: a rank's comes with its connection.
        let mut i = 0;
        while i < greetings.len() {
            let Some(verdict) = greetings[i].progress(token, size, channels) else {
                i += 1;
                continue;
            };
            // (In order: the first is the oldest, which goes first when room is short.)
            let Greeting {
                mut stream, from, ..
            } = greetings.remove(i);
            let verdict = verdict.and_then(|(rank, set)| match arrived.insert((rank, set)) {
                true => Ok((rank, set)),
                false => Err(Refusal::Member(format!(
                    "rank {rank} opened its connection {set} twice: two processes of the job took rank {rank} (give each its own DSM_RANK), or another program has the job's token"
                ))),
            });
            let _ = stream.set_nonblocking(false);
            match verdict {
                Ok((rank, set)) => {
                    stream
                        .write_all(&[ACK_OK])
                        .map_err(|e| DsmError::io(format!("handshake reply to {rank}"), e))?;
                    let _ = stream.set_read_timeout(None);
                    let _ = stream.set_nodelay(true);
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
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            greetings
                .iter()
                .map(|g| PollFd::new(g.stream.as_fd(), PollFlags::POLLIN)),
        );
        let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(wait)), None);
    }
    Ok(accepted)
}

/// Opens this rank's connection of set `set` to rank `to`.
fn connect(setup: &Setup, to: Rank, set: usize, addr: SocketAddr) -> Result<OwnedFd> {
    let me = setup.me;
    let mut stream = loop {
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
    stream
        .write_all(&hello(me, setup.channels, set, &setup.token))
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
    let _ = stream.set_read_timeout(None);
    Ok(OwnedFd::from(stream))
}

/// Why this rank's handshake with rank `to` failed (while `what`, as in "sending its handshake to"): the
/// peer's failure if it closed the connection (it stopped setting up the job: its own error says why),
/// else this rank's error (a timeout, or this rank stopping).
fn handshake_failed(
    me: Rank,
    to: Rank,
    addr: SocketAddr,
    what: &str,
    e: std::io::Error,
) -> DsmError {
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

/// Descriptors a rank keeps open besides its connections: the standard streams, userfaultfd, epoll and
/// event descriptors, the listener, and some for the program's own files.
const FILES_BESIDES_CONNECTIONS: u64 = 64;

/// Why this process cannot hold the connections of a job of `size` ranks with `sets` connections each way
/// between two ranks (one per channel and the service loop's), if it cannot: its open-file limit (already
/// raised as far as it goes, `DsmBuilder::build`) is below what they take. Said before connecting: a rank
/// out of descriptors midway would drop other ranks' connections, and they would fail with resets that
/// do not say why.
fn too_few_open_files(me: Rank, size: usize, sets: usize) -> Option<String> {
    use nix::sys::resource::{getrlimit, Resource};
    let (limit, _) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let needed = 2 * sets as u64 * size as u64 + FILES_BESIDES_CONNECTIONS;
    (limit < needed).then(|| {
        format!(
            "{me}: a job of {size} ranks needs about {needed} open files at each rank ({sets} connections each way with every rank: one per channel and the service loop's), and this process may have at most {limit}: raise the limit (`ulimit -n`; the hard limit, `ulimit -Hn`, as root), or run fewer ranks, or set a smaller DSM_CHANNELS"
        )
    })
}

impl Transport for TcpTransport {
    fn establish(self: Box<Self>, me: Rank, size: usize, channels: usize) -> Result<Mesh> {
        if self.peers.len() != size {
            return Err(DsmError::Config(format!(
                "{} peer addresses for a job of {size} ranks",
                self.peers.len()
            )));
        }
        if let Some(why) = too_few_open_files(me, size, channels) {
            return Err(DsmError::Config(why));
        }
        let now = Instant::now();
        let deadline = now
            .checked_add(self.timeout)
            .unwrap_or(now + Duration::from_secs(86_400));
        let TcpTransport {
            listener,
            peers,
            token,
            ..
        } = *self;
        let setup = Setup {
            me,
            size,
            channels,
            token,
            deadline,
            first_failure: Arc::new(AtomicU8::new(NO_FAILURE)),
        };
        let accepting = setup.clone();
        let acceptor = std::thread::Builder::new()
            .name("dsm-accept".into())
            .spawn(move || accept_all(listener, accepting))
            .map_err(|e| DsmError::io("spawning the accept thread", e))?;
        let mut outgoing = Vec::with_capacity(channels);
        let mut failure = None;
        'outer: for set in 0..channels {
            let mut row = Vec::with_capacity(size);
            for (r, addr) in peers.iter().enumerate() {
                match connect(&setup, Rank(r as u32), set, *addr) {
                    Ok(fd) => row.push(Conn::from(fd)),
                    Err(e) => {
                        setup.failed(CONNECTING);
                        failure = Some(e);
                        break 'outer;
                    }
                }
            }
            outgoing.push(row);
        }
        let incoming = acceptor
            .join()
            .map_err(|_| DsmError::Config("the accept thread panicked".into()))?;
        // The side that failed first says why; the other only stopped because of it.
        match (incoming, failure) {
            (Ok(incoming), None) => Ok(Mesh {
                outgoing,
                incoming: incoming
                    .into_iter()
                    .map(|(r, set, fd)| Incoming::new(r, set, channels, Conn::from(fd)))
                    .collect(),
                host: None,
            }),
            (Err(e), Some(_)) if setup.first_failure.load(Ordering::Acquire) == ACCEPTING => Err(e),
            (_, Some(e)) | (Err(e), None) => Err(e),
        }
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_checks_magic_token_version_rank_channels_and_set() {
        let token = [7u8; 32];
        let good = hello(Rank(1), 4, 3, &token);
        assert_eq!(check_hello(&good, &token, 2, 4), Ok((Rank(1), 3)));
        let stranger = |r| matches!(r, Err(Refusal::Stranger(why)) if why.contains("token") || why.contains("magic"));
        let member = |r: std::result::Result<(Rank, usize), Refusal>, what: &str| matches!(&r, Err(Refusal::Member(why)) if why.contains(what));
        assert!(stranger(check_hello(&good, &[8u8; 32], 2, 4)));
        let mut bad = good;
        bad[0] = b'X';
        assert!(stranger(check_hello(&bad, &token, 2, 4)));
        assert!(member(
            check_hello(&good, &token, 1, 4),
            "outside a job of 1"
        ));
        assert!(member(
            check_hello(&good, &token, 2, 3),
            "rank 1 has 3 channels, this rank 2: give every rank the same DSM_CHANNELS"
        ));
        assert!(member(
            check_hello(&hello(Rank(1), 4, 4, &token), &token, 2, 4),
            "rank 1 opened connection 4 of 4"
        ));
        let mut old = good;
        old[4] = 99;
        assert!(member(
            check_hello(&old, &token, 2, 4),
            "protocol version 99"
        ));
        // Another build with the wrong token is a stranger: only a rank of this job is told why.
        assert!(stranger(check_hello(&old, &[8u8; 32], 2, 4)));
    }

    /// Sets up a job of one rank per entry of `channels` (each with that many channels), each on a thread
    /// of its own; returns how each rank's setting up ended, and how long they all took.
    fn establish_all(channels: &[usize]) -> (Vec<Result<Mesh>>, Duration) {
        let listeners: Vec<TcpListener> = channels
            .iter()
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let started = Instant::now();
        let size = channels.len();
        let ranks: Vec<_> = listeners
            .into_iter()
            .zip(channels.iter().copied())
            .enumerate()
            .map(|(me, (listener, channels))| {
                let t = Box::new(TcpTransport::new(
                    listener,
                    peers.clone(),
                    [3u8; 32],
                    Duration::from_secs(25),
                ));
                std::thread::spawn(move || t.establish(Rank(me as u32), size, channels))
            })
            .collect();
        let ended = ranks.into_iter().map(|r| r.join().unwrap()).collect();
        (ended, started.elapsed())
    }

    #[test]
    fn each_rank_s_service_loop_connection_is_marked_as_such_at_the_other_end() {
        let sets = 3;
        let meshes: Vec<Mesh> = establish_all(&[sets, sets])
            .0
            .into_iter()
            .map(|m| m.unwrap())
            .collect();
        super::super::assert_service_loop_connections_marked(&meshes, sets);
    }

    /// The transport of a job of one rank (20 s to set up), and a connection to its listener that came
    /// first and sent `first`.
    fn a_rank_alone_after(first: &[u8], token: Token) -> (Box<TcpTransport>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(first).unwrap();
        let t = TcpTransport::new(listener, vec![addr], token, Duration::from_secs(20));
        (Box::new(t), s)
    }

    #[test]
    fn a_rank_of_another_build_with_a_shorter_handshake_is_told_why_at_once() {
        let token = [4u8; 32];
        // A build whose handshake is shorter than this one's (the preamble, then 4 bytes): it waits for
        // the answer, which must come without the bytes this build would read after the preamble.
        let mut old = hello(Rank(0), 2, 0, &token)[..PREAMBLE_LEN + 4].to_vec();
        old[4..8].copy_from_slice(&(PROTOCOL_VERSION - 1).to_le_bytes());
        let (t, mut s) = a_rank_alone_after(&old, token);
        let started = Instant::now();
        let e = t.establish(Rank(0), 1, 2).unwrap_err().to_string();
        assert!(e.contains("every rank must run the same build"), "{e}");
        assert!(started.elapsed() < HELLO_TIME, "{:?}", started.elapsed());
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).unwrap();
        assert_eq!(ack[0], ACK_REFUSED);
        let reason = read_reason(&mut s);
        assert!(reason.contains("protocol version"), "{reason}");
    }

    #[test]
    fn a_connection_opened_twice_is_refused() {
        let token = [6u8; 32];
        // Rank 0 of a job of one opens its sets 0 and 1 to itself; a third connection, first in the
        // backlog, says it is set 0 as well.
        let (t, _s) = a_rank_alone_after(&hello(Rank(0), 2, 0, &token), token);
        let e = t.establish(Rank(0), 1, 2).unwrap_err().to_string();
        assert!(e.contains("rank 0 opened its connection 0 twice"), "{e}");
    }

    #[test]
    fn ranks_with_different_channel_counts_both_fail_at_once_saying_why() {
        let (ended, took) = establish_all(&[4, 3]);
        for rank in ended {
            let e = rank.unwrap_err().to_string();
            assert!(e.contains("give every rank the same DSM_CHANNELS"), "{e}");
        }
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn a_rank_of_other_channels_among_three_stops_all_three_at_once() {
        // Rank 2 has another number of channels. Ranks 0 and 1 may not hear it from rank 2 itself (a
        // rank that refused it closes its listener): the one left must stop at the closed listener too,
        // not retry until the timeout.
        let (ended, took) = establish_all(&[2, 2, 3]);
        for rank in ended {
            assert!(rank.is_err());
        }
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn a_rank_refused_by_another_stops_waiting_for_connections_and_says_why() {
        // Rank 1 here is a stand-in that refuses rank 0's handshake and never connects: rank 0's accepting
        // side must stop with its connecting side, not wait out the timeout for rank 1's connections.
        let mine = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![mine.local_addr().unwrap(), other.local_addr().unwrap()];
        let stand_in = std::thread::spawn(move || {
            let (mut s, _) = other.accept().unwrap();
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h).unwrap();
            refuse(&mut s, "rank 1 is of another mind");
            // Held open until rank 0 has read the refusal and gone.
            let _ = s.read(&mut h);
        });
        let t = Box::new(TcpTransport::new(
            mine,
            peers,
            [5u8; 32],
            Duration::from_secs(20),
        ));
        let started = Instant::now();
        let e = t.establish(Rank(0), 2, 2).unwrap_err().to_string();
        assert!(
            e.contains("refused this rank's handshake: rank 1 is of another mind"),
            "{e}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        stand_in.join().unwrap();
    }

    #[test]
    fn a_rank_that_stopped_setting_up_is_taken_for_failed() {
        // Rank 1 gone before rank 0 connects (its listener closed), or gone during the handshake (it
        // read rank 0's and closed): rank 0's error is rank 1's failure, not one of its own.
        let gone = TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = gone.local_addr().unwrap();
        drop(gone);
        let closing = TcpListener::bind("127.0.0.1:0").unwrap();
        let closes = closing.local_addr().unwrap();
        let stand_in = std::thread::spawn(move || {
            let (mut s, _) = closing.accept().unwrap();
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h).unwrap();
        });
        for (at, what) in [
            (closed, "could not connect to it"),
            (closes, "waiting for the handshake reply from it"),
        ] {
            let mine = TcpListener::bind("127.0.0.1:0").unwrap();
            let peers = vec![mine.local_addr().unwrap(), at];
            let t = Box::new(TcpTransport::new(
                mine,
                peers,
                [3u8; 32],
                Duration::from_secs(20),
            ));
            let started = Instant::now();
            match t.establish(Rank(0), 2, 2) {
                Err(e @ DsmError::PeerFailed { rank: Rank(1), .. }) => {
                    let e = e.to_string();
                    assert!(e.starts_with("rank 1 failed: rank 0"), "{e}");
                    assert!(e.contains(&format!("{what} at {at}")), "{e}");
                }
                other => panic!("rank 1 at {at} ({what}): {:?}", other.map(|_| ())),
            }
            assert!(started.elapsed() < Duration::from_secs(10));
        }
        stand_in.join().unwrap();
    }

    #[test]
    fn a_stranger_sending_its_handshake_a_byte_at_a_time_does_not_hold_the_mesh_up() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token = [1u8; 32];
        // Connected first (the backlog is FIFO), it sends a byte every half second: its whole handshake
        // would take 24 s, and each read alone stays well within any per-read timeout.
        let mut s = TcpStream::connect(addr).unwrap();
        let stranger = std::thread::spawn(move || {
            for b in hello(Rank(0), 2, 0, &[2u8; 32]) {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        // Its handshake is read beside the rank's own connections, which do not wait for it.
        drop(alone_at_once(listener, token));
        stranger.join().unwrap();
    }

    /// Sets up a job of one rank (two channels) on `listener`, which must take less than half a
    /// handshake's time whatever else connected to it; returns its mesh.
    fn alone_at_once(listener: TcpListener, token: Token) -> Mesh {
        let addr = listener.local_addr().unwrap();
        let t = Box::new(TcpTransport::new(
            listener,
            vec![addr],
            token,
            Duration::from_secs(30),
        ));
        let started = Instant::now();
        let mesh = t.establish(Rank(0), 1, 2).unwrap();
        assert!(
            started.elapsed() < HELLO_TIME / 2,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(mesh.outgoing.len(), 2);
        assert_eq!(mesh.incoming.len(), 2);
        mesh
    }

    #[test]
    fn many_silent_strangers_do_not_hold_the_mesh_up() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token = [1u8; 32];
        // Connected first (the backlog is FIFO) and silent: read one after another, they held the mesh
        // up for a handshake's time each, 40 s in all. Past the room for them, the oldest are dropped.
        let silent: Vec<TcpStream> = (0..MAX_GREETING + 8)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        drop(alone_at_once(listener, token));
        drop(silent);
    }

    #[test]
    fn a_wrong_token_is_refused_and_the_mesh_still_forms() {
        let token = [1u8; 32];
        // An intruder with the wrong token connects first (the backlog is FIFO); it must be refused and not
        // counted among the mesh's connections.
        let (t, mut s) = a_rank_alone_after(&hello(Rank(0), 2, 0, &[2u8; 32]), token);
        let intruder = std::thread::spawn(move || {
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).unwrap();
            ack[0]
        });
        let mesh = t.establish(Rank(0), 1, 2).unwrap();
        assert_eq!(intruder.join().unwrap(), ACK_REFUSED);
        assert_eq!(mesh.outgoing.len(), 2);
        assert_eq!(mesh.incoming.len(), 2);
    }

    #[test]
    fn silent_and_truncated_handshakes_are_dropped_and_the_mesh_still_forms() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token = [1u8; 32];
        // A connection that sends nothing is read beside the others and dropped after its handshake's time;
        // one that sends half a handshake and closes is refused at once. Neither counts among the mesh's
        // connections, nor holds it up.
        let silent = TcpStream::connect(addr).unwrap();
        let mut truncated = TcpStream::connect(addr).unwrap();
        truncated
            .write_all(&hello(Rank(0), 2, 0, &token)[..HELLO_LEN / 2])
            .unwrap();
        drop(truncated);
        drop(alone_at_once(listener, token));
        drop(silent);
    }
}
