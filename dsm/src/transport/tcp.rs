//! TCP transport: a full mesh of `TCP_NODELAY` connections. Every connection starts with a handshake that
//! proves knowledge of the job's secret token; a wrong token, protocol version or rank is refused and logged.
//! Listeners bind to 127.0.0.1 unless the launcher is told otherwise (`DSM_BIND`).

use super::{Mesh, Transport, PROTOCOL_VERSION};
use crate::error::{DsmError, Result};
use crate::types::Rank;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// The secret every connection of a job must present.
pub type Token = [u8; 32];

const MAGIC: &[u8; 4] = b"DSM\x01";
const HELLO_LEN: usize = 4 + 4 + 4 + 32;

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

fn hello(me: Rank, token: &Token) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&me.0.to_le_bytes());
    h[12..].copy_from_slice(token);
    h
}

/// Constant-time comparison, so that the time to refuse does not reveal how much of a token was right.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a handshake; returns the peer's rank or the reason to refuse it.
fn check_hello(
    h: &[u8; HELLO_LEN],
    token: &Token,
    size: usize,
) -> std::result::Result<Rank, String> {
    if &h[..4] != MAGIC {
        return Err("not a dsm connection (bad magic)".into());
    }
    let version = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {version} does not match ours ({PROTOCOL_VERSION}): every rank must run the same build"
        ));
    }
    if !same_token(&h[12..], token) {
        return Err("wrong job token".into());
    }
    let rank = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if rank as usize >= size {
        return Err(format!("rank {rank} is outside a job of {size}"));
    }
    Ok(Rank(rank))
}

const ACK_OK: u8 = 0;
const ACK_REFUSED: u8 = 1;

fn accept_all(
    listener: TcpListener,
    me: Rank,
    token: Token,
    size: usize,
    expected: usize,
    deadline: Instant,
) -> Result<Vec<(Rank, OwnedFd)>> {
    listener
        .set_nonblocking(true)
        .map_err(|e| DsmError::io("listener set_nonblocking", e))?;
    let mut accepted = Vec::with_capacity(expected);
    while accepted.len() < expected {
        match listener.accept() {
            Ok((mut stream, addr)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut h = [0u8; HELLO_LEN];
                let verdict = match stream.read_exact(&mut h) {
                    Ok(()) => check_hello(&h, &token, size),
                    Err(e) => Err(format!("handshake not received: {e}")),
                };
                match verdict {
                    Ok(rank) => {
                        stream
                            .write_all(&[ACK_OK])
                            .map_err(|e| DsmError::io(format!("handshake reply to {rank}"), e))?;
                        let _ = stream.set_read_timeout(None);
                        let _ = stream.set_nodelay(true);
                        accepted.push((rank, OwnedFd::from(stream)));
                    }
                    Err(reason) => {
                        tracing::warn!("{me}: refused a connection from {addr}: {reason}");
                        eprintln!("dsm: {me}: refused a connection from {addr}: {reason}");
                        let _ = stream.write_all(&[ACK_REFUSED]);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(DsmError::Config(format!(
                        "{me}: only {} of {expected} connections arrived before the timeout: a rank did not start or cannot reach this one",
                        accepted.len()
                    )));
                }
                // Until the next connection arrives (or the deadline): no polling interval to wait out.
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(left)), None);
            }
            Err(e) => return Err(DsmError::io("accept", e)),
        }
    }
    Ok(accepted)
}

fn connect(
    me: Rank,
    to: Rank,
    addr: SocketAddr,
    token: &Token,
    deadline: Instant,
) -> Result<OwnedFd> {
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
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
        .write_all(&hello(me, token))
        .map_err(|e| DsmError::io(format!("handshake to {to} at {addr}"), e))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut ack = [0u8; 1];
    stream
        .read_exact(&mut ack)
        .map_err(|e| DsmError::io(format!("handshake reply from {to} at {addr}"), e))?;
    if ack[0] != ACK_OK {
        return Err(DsmError::BadHandshake(format!(
            "{to} at {addr} refused our handshake (wrong token or a different build)"
        )));
    }
    let _ = stream.set_read_timeout(None);
    Ok(OwnedFd::from(stream))
}

impl Transport for TcpTransport {
    fn establish(self: Box<Self>, me: Rank, size: usize, channels: usize) -> Result<Mesh> {
        if self.peers.len() != size {
            return Err(DsmError::Config(format!(
                "{} peer addresses for a job of {size} ranks",
                self.peers.len()
            )));
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
        let acceptor = std::thread::Builder::new()
            .name("dsm-accept".into())
            .spawn(move || accept_all(listener, me, token, size, channels * size, deadline))
            .map_err(|e| DsmError::io("spawning the accept thread", e))?;
        let mut outgoing = Vec::with_capacity(channels);
        let mut failure = None;
        'outer: for _ in 0..channels {
            let mut row = Vec::with_capacity(size);
            for (r, addr) in peers.iter().enumerate() {
                match connect(me, Rank(r as u32), *addr, &token, deadline) {
                    Ok(fd) => row.push(fd),
                    Err(e) => {
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
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(Mesh {
            outgoing,
            incoming: incoming?,
        })
    }

    fn name(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_checks_magic_version_token_and_rank() {
        let token = [7u8; 32];
        let good = hello(Rank(1), &token);
        assert_eq!(check_hello(&good, &token, 2), Ok(Rank(1)));
        assert!(check_hello(&good, &[8u8; 32], 2)
            .unwrap_err()
            .contains("token"));
        assert!(check_hello(&good, &token, 1)
            .unwrap_err()
            .contains("outside"));
        let mut bad = good;
        bad[0] = b'X';
        assert!(check_hello(&bad, &token, 2).unwrap_err().contains("magic"));
        let mut old = good;
        old[4] = 99;
        assert!(check_hello(&old, &token, 2)
            .unwrap_err()
            .contains("version"));
    }

    #[test]
    fn a_wrong_token_is_refused_and_the_mesh_still_forms() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let token = [1u8; 32];
        // An intruder with the wrong token connects first (the backlog is FIFO); it must be refused and not
        // counted among the mesh's connections.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&hello(Rank(0), &[2u8; 32])).unwrap();
        let intruder = std::thread::spawn(move || {
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).unwrap();
            ack[0]
        });
        let t = Box::new(TcpTransport::new(
            listener,
            vec![addr],
            token,
            Duration::from_secs(10),
        ));
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
        // A connection that sends nothing holds the accept loop up for its read timeout, no longer; one that
        // sends half a handshake and closes is refused at once. Neither counts among the mesh's connections.
        let silent = TcpStream::connect(addr).unwrap();
        let mut truncated = TcpStream::connect(addr).unwrap();
        truncated
            .write_all(&hello(Rank(0), &token)[..HELLO_LEN / 2])
            .unwrap();
        drop(truncated);
        let t = Box::new(TcpTransport::new(
            listener,
            vec![addr],
            token,
            Duration::from_secs(20),
        ));
        let started = Instant::now();
        let mesh = t.establish(Rank(0), 1, 2).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(mesh.outgoing.len(), 2);
        assert_eq!(mesh.incoming.len(), 2);
        drop(silent);
    }
}
