//! In-memory connections: byte streams between threads of one process, with what the fault path and the
//! service loop rely on from a socket (blocking and non-blocking reads, writes that wait for room, ends
//! and shutdowns, a send timeout), made of two single-producer single-consumer rings.
//!
//! A transport whose own thread carries the bytes on (the MPI transport of `dsm-runtime`) gives the job
//! in-memory connections instead of socket pairs: a request reaches that thread without a system call,
//! and a reply wakes its requester with a futex instead of a socket. A thread that serves many
//! connections (the service loop, a transport's thread) hangs one [`Doorbell`] on all of them and sleeps
//! on it; one that also writes into many without waiting has it rung when room is made in any of them
//! that was full. Every operation is async-signal-safe (atomics, copies, futexes, an eventfd write): the
//! fault path uses them from the SIGBUS handler. (But for a direction made to never wait for room,
//! [`End::never_wait_to_send`], which takes a lock and allocates: the service loop's replies to other
//! ranks when its transport's thread runs it, never read or written by the fault path.)
//!
//! Writers of one direction take turns (a lock held for a whole frame: the service loop's replies and a
//! service's late answer can share a connection), so frames never interleave. Reads need no lock: each
//! direction has one reader, the holder of a channel at one end and the server at the other; and however
//! an `End` is misused, a copy never leaves the ring's buffer.

mod doorbell;
mod ring;

pub use doorbell::Doorbell;
use nix::errno::Errno;
use ring::{Ring, Spill};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The room of each direction of a connection made by [`pair`] unless told otherwise: as much as a Unix
/// socket pair buffers on Linux by default, so that a reply of a few pages goes in without waiting.
pub const DEFAULT_CAPACITY: usize = 256 << 10;

/// Which sides of an [`End`] to shut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shut {
    /// Reading: this end's reads return the end of the stream, the other end's writes fail.
    Read,
    /// Writing: the other end reads what was written, then the end of the stream.
    Write,
    /// Both.
    Both,
}

/// One end of an in-memory connection ([`pair`]). Dropping it shuts both sides, as closing a socket does.
pub struct End {
    tx: Arc<Ring>,
    rx: Arc<Ring>,
}

impl std::fmt::Debug for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("End")
            .field("sent", &self.tx.tail.load(Ordering::Relaxed))
            .field("received", &self.rx.head.load(Ordering::Relaxed))
            .finish()
    }
}

/// A connection: two ends, each sending `capacity` bytes (rounded up to a power of two) before it waits
/// for the other to read.
pub fn pair(capacity: usize) -> (End, End) {
    let a = Arc::new(Ring::new(capacity));
    let b = Arc::new(Ring::new(capacity));
    (
        End {
            tx: a.clone(),
            rx: b.clone(),
        },
        End { tx: b, rx: a },
    )
}

impl End {
    /// Writes what there is room for of `bytes`, waiting for room when there is none and `wait` (for at
    /// most the send timeout, then `EAGAIN`). Returns how many bytes went in: at least one unless `bytes` is
    /// empty, or `EAGAIN` when there is no room and not `wait`. `EPIPE` once either end has ended.
    pub fn send(&self, bytes: &[u8], wait: bool) -> Result<usize, Errno> {
        self.tx.lock_writing();
        let sent = self.send_locked(bytes, wait);
        self.tx.unlock_writing();
        sent
    }

    /// [`End::send`], with the writers' lock held.
    fn send_locked(&self, bytes: &[u8], wait: bool) -> Result<usize, Errno> {
        if let Some(spill) = self.tx.spill.get() {
            return self.tx.put_or_spill(spill, bytes);
        }
        let timeout = self.tx.send_timeout.load(Ordering::Relaxed);
        let deadline = (timeout > 0).then(|| Instant::now() + Duration::from_nanos(timeout));
        loop {
            let n = self.tx.put(bytes)?;
            if n > 0 || bytes.is_empty() {
                return Ok(n);
            }
            if !wait {
                if self.tx.want_room() {
                    continue;
                }
                return Err(Errno::EAGAIN);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Errno::EAGAIN);
            }
            self.tx.wait_room(deadline);
        }
    }

    /// Writes all of `bytes`, waiting for room as [`End::send`] does.
    pub fn send_all(&self, bytes: &[u8]) -> Result<(), Errno> {
        self.send_all_of(&[bytes])
    }

    /// Writes all of `pieces`, one after the other, with no other writer's bytes between them (a frame's
    /// header and payload), waiting for room as [`End::send`] does.
    pub fn send_all_of<P: std::ops::Deref<Target = [u8]>>(
        &self,
        pieces: &[P],
    ) -> Result<(), Errno> {
        self.tx.lock_writing();
        let sent = pieces.iter().try_for_each(|piece| {
            let mut left: &[u8] = piece;
            while !left.is_empty() {
                let n = self.send_locked(left, true)?;
                left = &left[n..];
            }
            Ok(())
        });
        self.tx.unlock_writing();
        sent
    }

    /// Reads what has arrived into `buf`, waiting for at least one byte when `wait`: `Ok(n)`, `Ok(0)` at
    /// the end of the stream, `EAGAIN` when nothing has arrived and not `wait`.
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> Result<usize, Errno> {
        loop {
            if let Some(n) = self.rx.take(buf) {
                return Ok(n);
            }
            if !wait {
                return Err(Errno::EAGAIN);
            }
            self.rx.wait_ready(None);
        }
    }

    /// Whether a read would return at once: bytes have arrived, or the end.
    pub fn readable(&self) -> bool {
        self.rx.ready()
    }

    /// Whether the other end has ended (shut its writing, or this end's reading), with nothing left to
    /// read.
    pub fn at_end(&self) -> bool {
        let ended = self.rx.writer_done.load(Ordering::Acquire)
            || self.rx.reader_done.load(Ordering::Acquire);
        ended
            && self.rx.waiting(
                self.rx.head.load(Ordering::Acquire),
                self.rx.tail.load(Ordering::Acquire),
            ) == 0
            && !self.rx.spill.get().is_some_and(Spill::waiting)
    }

    /// Waits until a read would return at once, or `deadline` passes (false).
    pub fn wait_readable(&self, deadline: Instant) -> bool {
        self.rx.wait_ready(Some(deadline))
    }

    /// Ends one side or both; threads waiting on them wake.
    pub fn shutdown(&self, how: Shut) {
        if how != Shut::Write {
            self.rx.end_reading();
        }
        if how != Shut::Read {
            self.tx.end_writing();
        }
    }

    /// Makes writes that wait for room longer than `t` fail with `EAGAIN` (zero: wait for ever).
    pub fn set_send_timeout(&self, t: Duration) {
        let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
        self.tx.send_timeout.store(ns, Ordering::Relaxed);
    }

    /// Makes this end's writes never wait for room: what the connection has no room for waits in memory,
    /// in order, until the other end reads it, and a write fails only once either end has ended. For a
    /// direction whose reader may be the very thread that writes into it (a service loop run by its
    /// transport's thread, [`Mesh::host`](super::Mesh::host)), which would otherwise wait for itself.
    /// What waits in memory is bounded only by what the writer sends without an answer. Writes, and reads
    /// of what waited, take a lock: not for a direction that a signal handler writes or reads.
    pub fn never_wait_to_send(&self) {
        let _ = self.tx.spill.set(Spill::default());
    }

    /// Rings `bell` whenever bytes or an end arrive at this end, from now on (and once now, so that what
    /// arrived before is looked at). An end rings one doorbell: a second one is refused (false).
    pub fn ring_on_input(&self, bell: &Arc<Doorbell>) -> bool {
        let set = self.rx.bell.set(bell.clone()).is_ok();
        if set {
            bell.ring();
        }
        set
    }

    /// Rings `bell` when the other end makes room after a write of this end that would not wait
    /// ([`End::send`] without `wait`) found none, or ends: for a thread that writes into many
    /// connections, keeps what did not fit, and sleeps on one doorbell until it can go on. An end rings
    /// one such doorbell: a second one is refused (false).
    pub fn ring_on_room(&self, bell: &Arc<Doorbell>) -> bool {
        self.tx.room_bell.set(bell.clone()).is_ok()
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.shutdown(Shut::Both);
    }
}

#[cfg(test)]
mod tests;
