//! The doorbell a thread that serves many in-memory connections sleeps on (or waits for in `epoll`): rung
//! by every arrival on the connections it hangs on, and by room made in those it found full.

use crate::uffd::futex;
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Wakes a thread that waits on many connections at once: rung whenever bytes, or an end, arrive on any
/// connection it hangs on ([`End::ring_on_input`]), or room is made in one it found full
/// ([`End::ring_on_room`]). The thread either sleeps on it ([`Doorbell::wait`]), or, made with
/// [`Doorbell::with_eventfd`], waits for its descriptor in an epoll set with other things.
#[derive(Debug)]
pub struct Doorbell {
    rung: AtomicU32,
    sleepers: AtomicU32,
    eventfd: Option<EventFd>,
    /// Rung whenever this one is ([`Doorbell::chained`]).
    next: Option<Arc<Doorbell>>,
}

impl Doorbell {
    /// A doorbell to sleep on with [`Doorbell::wait`].
    pub fn new() -> Arc<Doorbell> {
        Doorbell::made(None, None)
    }

    fn made(eventfd: Option<EventFd>, next: Option<Arc<Doorbell>>) -> Arc<Doorbell> {
        Arc::new(Doorbell {
            rung: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            eventfd,
            next,
        })
    }

    /// A doorbell that rings `next` too whenever it rings: for a server run by another thread, which
    /// sleeps on `next` and wakes for everything, while the server tells its own arrivals apart by this
    /// doorbell's count ([`Doorbell::seen`]).
    pub fn chained(next: Arc<Doorbell>) -> Arc<Doorbell> {
        Doorbell::made(None, Some(next))
    }

    /// A doorbell that also makes its descriptor ([`Doorbell::fd`]) readable whenever it rings, for a
    /// thread that waits in `epoll`; it reads the count away with [`Doorbell::drain`].
    pub fn with_eventfd() -> Result<Arc<Doorbell>, Errno> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Doorbell::made(Some(fd), None))
    }

    /// The descriptor that becomes readable when the doorbell rings (made [`Doorbell::with_eventfd`]).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.eventfd.as_ref().map(|e| e.as_fd())
    }

    /// Takes the rings counted on the descriptor, so that it waits for the next one.
    pub fn drain(&self) {
        if let Some(e) = &self.eventfd {
            let _ = e.read();
        }
    }

    /// Rings: a thread sleeping on the doorbell wakes.
    pub fn ring(&self) {
        self.rung.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = &self.eventfd {
            let _ = e.write(1);
        } else if self.sleepers.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&self.rung);
        }
        if let Some(next) = &self.next {
            next.ring();
        }
    }

    /// The count of rings so far: take it before looking for work, and pass it to [`Doorbell::wait`], so
    /// that a ring between the look and the sleep is not missed.
    pub fn seen(&self) -> u32 {
        self.rung.load(Ordering::SeqCst)
    }

    /// Sleeps until the doorbell rings after `seen` was taken, or `timeout` passes.
    pub fn wait(&self, seen: u32, timeout: Duration) {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        if self.rung.load(Ordering::SeqCst) == seen {
            futex::wait_for(&self.rung, seen, timeout);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}
