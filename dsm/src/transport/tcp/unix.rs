//! Unix-domain sockets between ranks on one host. Besides its TCP listener, a rank may listen on a Unix
//! stream socket with a random abstract name (no file: the name lives in the network namespace, and goes
//! with the socket), and advertise that name with its TCP address. A rank that finds the name on its own
//! host connects through it; one on another host, or in another network namespace, finds nothing there
//! and connects over TCP. A message between processes costs the kernel less through a Unix socket than
//! through the loopback TCP stack (docs/BENCHMARKS.md, "Ranks on one host meet through Unix sockets").
//!
//! The name is bound before it is advertised, as the TCP port is, so on the rank's own host whatever
//! answers at it is that rank. On another host anyone may bind the same name (names are listed to every
//! user in `/proc/net/unix`). Such a socket learns nothing from the handshake (the token is proved, never
//! sent, `handshake.rs`) and could not answer it, but the rank would then fail to reach the rank it meant:
//! it connects through a Unix socket only to a process of its own user (`SO_PEERCRED`), and over TCP
//! otherwise.

use crate::error::{DsmError, Result};
use nix::errno::Errno;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The abstract name of a rank's Unix-domain listener: 16 random bytes, the socket `@dsm-<32 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct UnixName([u8; 16]);

impl UnixName {
    /// The abstract socket name (without the leading NUL): `dsm-` and the 32 hex digits.
    pub fn socket_name(&self) -> Vec<u8> {
        format!("dsm-{self}").into_bytes()
    }
}

impl fmt::Display for UnixName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for UnixName {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<UnixName, String> {
        let bad = || format!("{s:?} is not a Unix socket name (32 hex digits)");
        // Hex digits only: `from_str_radix` would also take a sign.
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut name = [0u8; 16];
        for (i, b) in name.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(UnixName(name))
    }
}

/// Where a rank listens: its TCP address, and the name of its Unix-domain listener if it has one. Written
/// `127.0.0.1:40123` or `127.0.0.1:40123/<32 hex digits>`, as the launchers pass it around.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PeerAddr {
    pub tcp: SocketAddr,
    pub unix: Option<UnixName>,
}

impl From<SocketAddr> for PeerAddr {
    fn from(tcp: SocketAddr) -> PeerAddr {
        PeerAddr { tcp, unix: None }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.unix {
            Some(name) => write!(f, "{}/{name}", self.tcp),
            None => write!(f, "{}", self.tcp),
        }
    }
}

impl FromStr for PeerAddr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<PeerAddr, String> {
        let (tcp, unix) = match s.split_once('/') {
            Some((tcp, unix)) => (tcp, Some(unix.parse()?)),
            None => (s, None),
        };
        let tcp = tcp
            .parse()
            .map_err(|_| format!("{tcp:?} is not an address and port"))?;
        Ok(PeerAddr { tcp, unix })
    }
}

/// Binds a Unix-domain listener under a fresh random abstract name.
pub fn bind_unix() -> Result<(UnixListener, UnixName)> {
    let mut tries = 0;
    loop {
        let name = UnixName(super::random_bytes("a Unix socket's name")?);
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.socket_name())
            .map_err(|e| DsmError::io("naming this rank's Unix socket", e))?;
        match UnixListener::bind_addr(&addr) {
            Ok(l) => return Ok((l, name)),
            // Another socket has that name (a chance of one in 2^128, or a name someone chose to block
            // this one): another name.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 3 => tries += 1,
            Err(e) => return Err(DsmError::io("binding this rank's Unix socket", e)),
        }
    }
}

/// Connects to the Unix-domain listener named `name`, if there is one on this host (in this network
/// namespace): `None` when there is not (the rank that advertised it is on another host, or has closed
/// it: a TCP connection then finds out which). A listener whose queue is full is tried again every
/// millisecond until `deadline`, or until `give_up` says so.
pub(super) fn connect_unix(
    name: UnixName,
    deadline: Instant,
    give_up: &dyn Fn() -> bool,
) -> Result<Option<UnixStream>> {
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|e| DsmError::sys("socket(AF_UNIX)", e))?;
    let addr = UnixAddr::new_abstract(&name.socket_name())
        .map_err(|e| DsmError::sys("naming a Unix socket", e))?;
    loop {
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if Instant::now() < deadline && !give_up() => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(None),
            Err(e @ (Errno::EACCES | Errno::EPERM)) => {
                tracing::warn!("connecting to @dsm-{name}: {e}; connecting over TCP instead");
                return Ok(None);
            }
            Err(Errno::EAGAIN) => {
                return Err(DsmError::Config(format!(
                    "the Unix socket @dsm-{name} of a rank on this host kept its queue of connections full until the connect timeout: that rank is not accepting (raise DSM_CONNECT_TIMEOUT, or set DSM_UNIX_SOCKETS=off)"
                )))
            }
            Err(e) => {
                return Err(DsmError::sys(
                    format!("connecting to the Unix socket @dsm-{name} of a rank (DSM_UNIX_SOCKETS=off connects over TCP only)"),
                    e,
                ))
            }
        }
    }
    let peer = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| DsmError::sys("SO_PEERCRED of a Unix socket", e))?;
    // SAFETY: `geteuid` takes nothing, touches no memory of the program, and cannot fail.
    let me = unsafe { libc::geteuid() };
    if peer.uid() != me {
        tracing::warn!(
            "@dsm-{name} belongs to user {} (pid {}), not to this rank's: connecting over TCP instead",
            peer.uid(),
            peer.pid()
        );
        return Ok(None);
    }
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| DsmError::io("Unix socket set_nonblocking", e))?;
    Ok(Some(stream))
}
