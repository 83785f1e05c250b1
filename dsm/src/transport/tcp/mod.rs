//! TCP transport: a full mesh of `TCP_NODELAY` connections between the ranks, through Unix-domain sockets
//! instead between ranks on one host that listen on one (`unix.rs`), and in-memory connections
//! (`memory::pair`) from each rank to its own service loop, whose requests (locks homed here, faults on
//! pages homed here, rank 0's barrier arrivals) then never go through the kernel's network stack. Every
//! socket connection starts with a handshake in which both ends prove that they know the job's secret
//! token, without sending it; a wrong token, protocol version or rank is refused and logged. Listeners
//! bind to 127.0.0.1 unless the launcher is told otherwise (`DSM_BIND`).

mod handshake;
mod mesh;
mod stream;
mod unix;

use super::{memory, Conn, Incoming, Mesh, Transport};
use crate::error::{DsmError, Result};
use crate::types::Rank;
use mesh::{accept_all, connect, Setup, ACCEPTING, CONNECTING, NO_FAILURE};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use unix::{bind_unix, PeerAddr, UnixName};

/// The job's secret: every socket connection of the mesh starts with a handshake in which both ends
/// prove that they know it, without sending it (`handshake.rs`).
pub type Token = [u8; 32];

/// `N` random bytes from the kernel (`getrandom(2)`: no descriptor needed), for `what`.
fn random_bytes<const N: usize>(what: &str) -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| DsmError::Config(format!("no random bytes for {what}: {e}")))?;
    Ok(bytes)
}

/// The mesh of one rank over TCP, and Unix-domain sockets to ranks on its host.
#[derive(Debug)]
pub struct TcpTransport {
    listener: TcpListener,
    unix: Option<UnixListener>,
    peers: Vec<PeerAddr>,
    token: Token,
    timeout: Duration,
}

impl TcpTransport {
    /// `listener` is this rank's bound listener; `peers[r]` is where rank r listens (this rank's
    /// included); `timeout` bounds the whole establishment. Over TCP only, unless given a Unix-domain
    /// listener ([`TcpTransport::with_unix`]).
    pub fn new<P: Into<PeerAddr>>(
        listener: TcpListener,
        peers: impl IntoIterator<Item = P>,
        token: Token,
        timeout: Duration,
    ) -> TcpTransport {
        TcpTransport {
            listener,
            unix: None,
            peers: peers.into_iter().map(Into::into).collect(),
            token,
            timeout,
        }
    }

    /// Also accepts connections on `listener` (made by [`bind_unix`], its name advertised in this rank's
    /// [`PeerAddr`]), and connects through the Unix socket of each rank that advertised one and is found
    /// on this host. Without it, the rank ignores the other ranks' Unix sockets.
    pub fn with_unix(mut self, listener: UnixListener) -> TcpTransport {
        self.unix = Some(listener);
        self
    }

    /// Where every rank listens (`peers[r]`, this rank's included), for a transport made before the
    /// launcher said.
    pub fn with_peers(mut self, peers: Vec<PeerAddr>) -> TcpTransport {
        self.peers = peers;
        self
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
            unix,
            peers,
            token,
            ..
        } = *self;
        let use_unix = unix.is_some();
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
            .spawn(move || accept_all(listener, unix, accepting))
            .map_err(|e| DsmError::io("spawning the accept thread", e))?;
        let mut outgoing = Vec::with_capacity(channels);
        let mut own = Vec::with_capacity(channels);
        let mut failure = None;
        'outer: for set in 0..channels {
            let mut row = Vec::with_capacity(size);
            for (r, addr) in peers.iter().enumerate() {
                if r == me.index() {
                    let (out, back) = memory::pair(memory::DEFAULT_CAPACITY);
                    row.push(Conn::from(out));
                    own.push(Incoming::new(me, set, channels, Conn::from(back)));
                    continue;
                }
                match connect(&setup, Rank(r as u32), set, *addr, use_unix) {
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
                incoming: own
                    .into_iter()
                    .chain(
                        incoming
                            .into_iter()
                            .map(|(r, set, fd)| Incoming::new(r, set, channels, Conn::from(fd))),
                    )
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
mod tests;
