//! What the fault path, the channels and the service loop do with a connection, whichever kind it is: a
//! socket read and written with plain system calls, or an in-memory connection (`memory/`). Everything
//! here is async-signal-safe.

use super::memory::{self, Shut};
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// One connection of a rank, as a transport establishes it.
#[derive(Debug)]
pub enum Conn {
    /// A stream socket (TCP, or Unix-domain: a connected one, or one end of a socket pair).
    Socket(OwnedFd),
    /// An in-memory connection whose other end a thread of the transport serves.
    Memory(memory::End),
}

impl From<OwnedFd> for Conn {
    fn from(fd: OwnedFd) -> Conn {
        Conn::Socket(fd)
    }
}

impl From<memory::End> for Conn {
    fn from(end: memory::End) -> Conn {
        Conn::Memory(end)
    }
}

/// What a read would find now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Nothing yet.
    Waiting,
    /// Bytes.
    Bytes,
    /// The end of the stream, or an error that the read will report.
    Ended,
}

/// The most slices one `sendmsg` takes on Linux.
pub(crate) const IOV_MAX: usize = 1024;

impl Conn {
    /// Writes all of `bufs`, blocking until it is written (or the send timeout passes: `EAGAIN`).
    pub(crate) fn write_all(&self, mut bufs: &mut [IoSlice<'_>]) -> Result<(), Errno> {
        match self {
            Conn::Socket(fd) => {
                while !bufs.is_empty() {
                    // MSG_NOSIGNAL: a peer that is gone is an error on this connection, never a SIGPIPE.
                    let flags = MsgFlags::MSG_NOSIGNAL;
                    // One call takes at most IOV_MAX slices; a long read-ahead reply goes out in several.
                    let batch = bufs.len().min(IOV_MAX);
                    match nix::sys::socket::sendmsg::<()>(
                        fd.as_raw_fd(),
                        &bufs[..batch],
                        &[],
                        flags,
                        None,
                    ) {
                        Ok(w) => IoSlice::advance_slices(&mut bufs, w),
                        Err(Errno::EINTR) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Conn::Memory(end) => end.send_all_of(bufs),
        }
    }

    /// Reads what has arrived into `buf`, waiting for at least one byte when `wait`: `Some(n)`, `Some(0)`
    /// at the end of the stream, `None` when nothing has arrived and not `wait`.
    pub(crate) fn recv(&self, buf: &mut [u8], wait: bool) -> Result<Option<usize>, Errno> {
        loop {
            let got = match self {
                Conn::Socket(fd) => {
                    let flags = if wait {
                        MsgFlags::empty()
                    } else {
                        MsgFlags::MSG_DONTWAIT
                    };
                    nix::sys::socket::recv(fd.as_raw_fd(), buf, flags)
                }
                Conn::Memory(end) => end.recv(buf, wait),
            };
            return match got {
                Ok(n) => Ok(Some(n)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) if !wait => Ok(None),
                Err(e) => Err(e),
            };
        }
    }

    /// What a read would find now, without taking anything.
    pub(crate) fn readiness(&self) -> Readiness {
        match self {
            Conn::Socket(fd) => {
                let mut byte = [0u8; 1];
                let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
                match nix::sys::socket::recv(fd.as_raw_fd(), &mut byte, flags) {
                    Ok(n) if n > 0 => Readiness::Bytes,
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => Readiness::Waiting,
                    _ => Readiness::Ended,
                }
            }
            Conn::Memory(end) if end.at_end() => Readiness::Ended,
            Conn::Memory(end) if end.readable() => Readiness::Bytes,
            Conn::Memory(_) => Readiness::Waiting,
        }
    }

    /// Waits until a read would return at once, or `deadline` passes (false).
    pub(crate) fn wait_readable(&self, deadline: Instant) -> Result<bool, Errno> {
        use nix::poll::{ppoll, PollFd, PollFlags};
        use nix::sys::time::TimeSpec;
        match self {
            Conn::Socket(fd) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                // ppoll: timeouts below a millisecond are kept (poll would round them up to one).
                match ppoll(&mut fds, Some(TimeSpec::from_duration(left)), None) {
                    Ok(0) if Instant::now() >= deadline => return Ok(false),
                    Ok(0) | Err(Errno::EINTR) => continue,
                    Ok(_) => return Ok(true),
                    Err(e) => return Err(e),
                }
            },
            Conn::Memory(end) => Ok(end.wait_readable(deadline)),
        }
    }

    /// Ends one side of the connection, or both.
    pub(crate) fn shutdown(&self, how: Shut) {
        match self {
            Conn::Socket(fd) => {
                let how = match how {
                    Shut::Read => nix::sys::socket::Shutdown::Read,
                    Shut::Write => nix::sys::socket::Shutdown::Write,
                    Shut::Both => nix::sys::socket::Shutdown::Both,
                };
                let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), how);
            }
            Conn::Memory(end) => end.shutdown(how),
        }
    }

    /// Makes writes fail (`EAGAIN`) after `t` without progress instead of blocking for ever.
    pub(crate) fn set_send_timeout(&self, t: Duration) -> Result<(), Errno> {
        match self {
            Conn::Socket(fd) => {
                let tv = nix::sys::time::TimeVal::new(
                    t.as_secs() as nix::sys::time::time_t,
                    t.subsec_micros() as nix::sys::time::suseconds_t,
                );
                nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::SendTimeout, &tv)
            }
            Conn::Memory(end) => {
                end.set_send_timeout(t);
                Ok(())
            }
        }
    }

    /// Whether bytes this end sent wait for the other end to take them (`SIOCOUTQ`: on a Unix socket,
    /// what the other end has not read; over TCP, what it has not acknowledged). Never for an in-memory
    /// connection.
    pub(crate) fn unread_by_peer(&self) -> bool {
        let Conn::Socket(fd) = self else {
            return false;
        };
        let mut queued: libc::c_int = 0;
        // SAFETY: `TIOCOUTQ` (`SIOCOUTQ`) writes one `int` through the pointer, which points at `queued`,
        // alive for the call; the descriptor is this connection's own, open while `self` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        r == 0 && queued > 0
    }

    /// The socket, for an epoll set.
    pub(crate) fn socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Conn::Socket(fd) => Some(fd.as_fd()),
            Conn::Memory(_) => None,
        }
    }

    /// The in-memory connection.
    pub(crate) fn memory(&self) -> Option<&memory::End> {
        match self {
            Conn::Socket(_) => None,
            Conn::Memory(end) => Some(end),
        }
    }
}
