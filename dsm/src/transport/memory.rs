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

use crate::uffd::futex;
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The room of each direction of a connection made by [`pair`] unless told otherwise: as much as a Unix
/// socket pair buffers on Linux by default, so that a reply of a few pages goes in without waiting.
pub const DEFAULT_CAPACITY: usize = 256 << 10;

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

/// One direction of a connection.
struct Ring {
    buf: Box<[UnsafeCell<u8>]>,
    /// The writers' lock: 0 free, 1 held, 2 held with writers asleep on it.
    writing: AtomicU32,
    /// Bytes ever taken by the reader, and ever put by the writer: `tail - head` are waiting.
    head: AtomicUsize,
    tail: AtomicUsize,
    /// Bumped whenever bytes or an end arrive (the reader sleeps on it), and whenever room is made or
    /// either side ends (the writer sleeps on it); with the number of threads asleep on each.
    data: AtomicU32,
    readers: AtomicU32,
    room: AtomicU32,
    writers: AtomicU32,
    /// The writer's end: the reader reads what is left, then the end of the stream.
    writer_done: AtomicBool,
    /// The reader's end: nothing more is read, writes fail.
    reader_done: AtomicBool,
    /// Rung with every arrival, for a reader that waits on many rings.
    bell: OnceLock<Arc<Doorbell>>,
    /// Rung when room is made after a write that would not wait found none, for a writer that waits on
    /// many rings ([`End::ring_on_room`]).
    room_bell: OnceLock<Arc<Doorbell>>,
    /// A write that would not wait found no room, and `room_bell` is to ring when the reader makes some.
    room_wanted: AtomicBool,
    /// How long a write may wait for room without any being made (0: for ever), in nanoseconds.
    send_timeout: AtomicU64,
    /// Set for a direction whose writes never wait ([`End::never_wait_to_send`]).
    spill: OnceLock<Spill>,
}

/// What a direction whose writes never wait had no room for, in order, until its reader takes it. Once
/// anything waits here, every later write comes here too, so the reader reads the ring empty, then this.
#[derive(Default)]
struct Spill {
    bytes: Mutex<VecDeque<u8>>,
    /// `bytes.len()`, for the reader's look without the lock.
    len: AtomicUsize,
}

impl Spill {
    fn waiting(&self) -> bool {
        self.len.load(Ordering::Acquire) > 0
    }
}

// SAFETY: the bytes in `buf` are shared between one writer (the holder of `writing`) and the reader. The
// writer only writes the free part (`tail..head + capacity`), then publishes it with a release store of
// `tail`; the reader only reads the waiting part (`head..tail`, seen through an acquire load of `tail`),
// then gives it back with a release store of `head`, which the writer loads with acquire before writing
// there again. Two readers at once (a misuse nothing in dsm does) may read the same bytes, but every copy
// is bounded by the buffer's length, so it stays inside the allocation. Everything else is atomic.
unsafe impl Sync for Ring {}

impl Ring {
    fn new(capacity: usize) -> Ring {
        let capacity = capacity.max(64).next_power_of_two();
        // Zeroed by the allocator (`calloc`: pages the ring never reaches are never touched).
        let bytes: Box<[u8]> = vec![0u8; capacity].into_boxed_slice();
        // SAFETY: `UnsafeCell<u8>` has the layout of `u8` (`repr(transparent)`), so the allocation is a
        // valid `[UnsafeCell<u8>]` of the same length, freed with the same layout.
        let buf = unsafe { Box::from_raw(Box::into_raw(bytes) as *mut [UnsafeCell<u8>]) };
        Ring {
            buf,
            writing: AtomicU32::new(0),
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
            data: AtomicU32::new(0),
            readers: AtomicU32::new(0),
            room: AtomicU32::new(0),
            writers: AtomicU32::new(0),
            writer_done: AtomicBool::new(false),
            reader_done: AtomicBool::new(false),
            bell: OnceLock::new(),
            room_bell: OnceLock::new(),
            room_wanted: AtomicBool::new(false),
            send_timeout: AtomicU64::new(0),
            spill: OnceLock::new(),
        }
    }

    fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// A pointer to byte `i` (mod the capacity) of the buffer, valid for the bytes from there to the
    /// buffer's end.
    fn at(&self, i: usize) -> *mut u8 {
        // SAFETY: the offset is below the capacity, so the pointer stays inside the buffer; it comes from
        // the whole slice, so it may reach the rest of it.
        UnsafeCell::raw_get(unsafe { self.buf.as_ptr().add(i & (self.capacity() - 1)) })
    }

    /// How many bytes wait between `head` and `tail`, at most the capacity whatever the two hold.
    fn waiting(&self, head: usize, tail: usize) -> usize {
        tail.wrapping_sub(head).min(self.capacity())
    }

    /// Takes the writers' lock (a futex lock: the fault path writes from the SIGBUS handler, where only a
    /// system call may wait).
    fn lock_writing(&self) {
        if self
            .writing
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
        while self.writing.swap(2, Ordering::Acquire) != 0 {
            futex::wait(&self.writing, 2);
        }
    }

    fn unlock_writing(&self) {
        if self.writing.swap(0, Ordering::Release) == 2 {
            futex::wake_all(&self.writing);
        }
    }

    fn tell_reader(&self) {
        self.data.fetch_add(1, Ordering::SeqCst);
        if self.readers.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&self.data);
        }
        if let Some(bell) = self.bell.get() {
            bell.ring();
        }
    }

    fn tell_writer(&self) {
        self.room.fetch_add(1, Ordering::SeqCst);
        if self.writers.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&self.room);
        }
        if let Some(bell) = self.room_bell.get() {
            // Pairs with the fence in `want_room`: either the writer's second look sees the room made
            // before this, or this sees its wish.
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.room_wanted.load(Ordering::Relaxed)
                && self.room_wanted.swap(false, Ordering::Relaxed)
            {
                bell.ring();
            }
        }
    }

    /// A write that would not wait found no room: asks for `room_bell` to ring when the reader makes
    /// some, then looks once more (room made just before the wish was seen would ring nothing). Whether
    /// there is room now.
    fn want_room(&self) -> bool {
        if self.room_bell.get().is_none() {
            return false;
        }
        self.room_wanted.store(true, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        !self.full()
    }

    /// Whether the ring holds as many bytes as it can.
    fn full(&self) -> bool {
        self.waiting(
            self.head.load(Ordering::Acquire),
            self.tail.load(Ordering::Acquire),
        ) == self.capacity()
    }

    /// Puts as much of `bytes` as there is room for; `Ok(0)` when there is none.
    fn put(&self, bytes: &[u8]) -> Result<usize, Errno> {
        if self.reader_done.load(Ordering::Acquire) || self.writer_done.load(Ordering::Acquire) {
            return Err(Errno::EPIPE);
        }
        let tail = self.tail.load(Ordering::Acquire);
        let head = self.head.load(Ordering::Acquire);
        let n = bytes.len().min(self.capacity() - self.waiting(head, tail));
        if n == 0 {
            return Ok(0);
        }
        let start = tail & (self.capacity() - 1);
        let first = n.min(self.capacity() - start);
        // SAFETY: `tail..tail + n` is free (n is at most the room), so the reader reads none of it until
        // `tail` is published below; the two copies stay inside the buffer (`first` ends at its end, the
        // rest starts at its beginning), and `bytes` cannot overlap the ring's own buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.at(tail), first);
            std::ptr::copy_nonoverlapping(bytes[first..].as_ptr(), self.at(0), n - first);
        }
        self.tail.store(tail.wrapping_add(n), Ordering::Release);
        self.tell_reader();
        // Ended while the bytes went in: the reader may have stopped before them, so the write fails, as
        // a socket's does once it is shut.
        if self.reader_done.load(Ordering::Acquire) || self.writer_done.load(Ordering::Acquire) {
            return Err(Errno::EPIPE);
        }
        Ok(n)
    }

    /// Puts all of `bytes`: what the ring has no room for goes to `spill` (and everything once anything
    /// waits there, to keep the order).
    fn put_or_spill(&self, spill: &Spill, bytes: &[u8]) -> Result<usize, Errno> {
        let mut spilled = spill.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        let n = if spilled.is_empty() {
            self.put(bytes)?
        } else {
            0
        };
        if n < bytes.len() {
            if self.reader_done.load(Ordering::Acquire) || self.writer_done.load(Ordering::Acquire)
            {
                return Err(Errno::EPIPE);
            }
            spilled.extend(&bytes[n..]);
            spill.len.store(spilled.len(), Ordering::Release);
            drop(spilled);
            self.tell_reader();
        }
        Ok(bytes.len())
    }

    /// Takes up to `buf.len()` waiting bytes: `Some(n)`, `Some(0)` at the end of the stream, `None` when
    /// nothing waits.
    fn take(&self, buf: &mut [u8]) -> Option<usize> {
        let got = self.take_from_ring(buf);
        let Some(spill) = self.spill.get() else {
            return got;
        };
        // The ring is read empty before what waits in the spill, which came after all of it; and nothing
        // goes into the ring while anything waits there.
        if got.is_some_and(|n| n > 0)
            || buf.is_empty()
            || !spill.waiting()
            || self.reader_done.load(Ordering::Acquire)
        {
            return got;
        }
        let mut spilled = spill.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        // The ring is looked at again under the spill's lock, which writers hold while they fill it: a
        // write between the look above and the lock may have filled the ring and spilled the rest, and
        // the ring's bytes come first.
        let again = self.take_from_ring(buf);
        if again.is_some_and(|n| n > 0) {
            return again;
        }
        let n = buf.len().min(spilled.len());
        let (front, back) = spilled.as_slices();
        let first = n.min(front.len());
        buf[..first].copy_from_slice(&front[..first]);
        buf[first..n].copy_from_slice(&back[..n - first]);
        spilled.drain(..n);
        spill.len.store(spilled.len(), Ordering::Release);
        Some(n)
    }

    /// [`Ring::take`] from the ring alone.
    fn take_from_ring(&self, buf: &mut [u8]) -> Option<usize> {
        // The end is looked at before the bytes: bytes put before the end was marked are then seen.
        let ended =
            self.writer_done.load(Ordering::Acquire) || self.reader_done.load(Ordering::Acquire);
        if self.reader_done.load(Ordering::Acquire) {
            return Some(0);
        }
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        let n = buf.len().min(self.waiting(head, tail));
        if n == 0 {
            return if ended || buf.is_empty() {
                Some(0)
            } else {
                None
            };
        }
        let start = head & (self.capacity() - 1);
        let first = n.min(self.capacity() - start);
        // SAFETY: `head..head + n` was published by the writer (acquire load of `tail` above) and the
        // writer does not touch it until `head` moves past it below; the copies stay inside the buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.at(head), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(self.at(0), buf[first..].as_mut_ptr(), n - first);
        }
        self.head.store(head.wrapping_add(n), Ordering::Release);
        self.tell_writer();
        Some(n)
    }

    /// Whether a read would return at once (bytes, or the end).
    fn ready(&self) -> bool {
        self.writer_done.load(Ordering::Acquire)
            || self.reader_done.load(Ordering::Acquire)
            || self.tail.load(Ordering::Acquire) != self.head.load(Ordering::Acquire)
            || self.spill.get().is_some_and(Spill::waiting)
    }

    /// Sleeps until `ready`, or `deadline`; whether it is ready.
    fn wait_ready(&self, deadline: Option<Instant>) -> bool {
        loop {
            if self.ready() {
                return true;
            }
            self.readers.fetch_add(1, Ordering::SeqCst);
            let seen = self.data.load(Ordering::SeqCst);
            if !self.ready() {
                sleep_on(&self.data, seen, deadline);
            }
            self.readers.fetch_sub(1, Ordering::SeqCst);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return self.ready();
            }
        }
    }

    /// Sleeps until there is room to write or a side ends, or `deadline` passes.
    fn wait_room(&self, deadline: Option<Instant>) {
        self.writers.fetch_add(1, Ordering::SeqCst);
        let seen = self.room.load(Ordering::SeqCst);
        let ended =
            self.reader_done.load(Ordering::Acquire) || self.writer_done.load(Ordering::Acquire);
        if self.full() && !ended {
            sleep_on(&self.room, seen, deadline);
        }
        self.writers.fetch_sub(1, Ordering::SeqCst);
    }

    fn end_writing(&self) {
        self.writer_done.store(true, Ordering::Release);
        self.tell_reader();
        self.tell_writer();
    }

    fn end_reading(&self) {
        self.reader_done.store(true, Ordering::Release);
        self.tell_reader();
        self.tell_writer();
    }
}

/// Sleeps while `word` holds `seen`, until `deadline` if there is one.
fn sleep_on(word: &AtomicU32, seen: u32, deadline: Option<Instant>) {
    match deadline {
        None => futex::wait(word, seen),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                futex::wait_for(word, seen, left);
            }
        }
    }
}

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
mod tests {
    use super::*;

    /// Held by a test whose threads wait for bytes: a connection that lost some would leave them waiting
    /// for ever, so the test process ends, naming the test (its thread's name), if the test still holds
    /// it after a minute. Dropping it ends the watch.
    fn watchdog() -> std::sync::mpsc::Sender<()> {
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let (held, watch) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                watch.recv_timeout(Duration::from_secs(60))
            {
                eprintln!("{test} still waits after a minute: the test process ends");
                std::process::exit(101);
            }
        });
        held
    }

    #[test]
    fn bytes_arrive_in_order_across_the_ring_s_wrap_and_a_full_ring_waits_for_the_reader() {
        let _bounded = watchdog();
        let (a, b) = pair(64);
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let got = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut got = Vec::new();
                let mut buf = [0u8; 37];
                loop {
                    match b.recv(&mut buf, true).unwrap() {
                        0 => return got,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
            for piece in sent.chunks(100) {
                a.send_all(piece).unwrap();
            }
            a.shutdown(Shut::Write);
            reader.join().unwrap()
        });
        assert_eq!(got, sent);
    }

    #[test]
    fn frames_of_writers_on_several_threads_never_interleave() {
        let _bounded = watchdog();
        let (a, b) = pair(64);
        let a = Arc::new(a);
        let writers: Vec<_> = (0..4u8)
            .map(|w| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        // A frame: its writer's number, then 50 copies of it, in two pieces.
                        a.send_all_of(&[&[w][..], &[w; 50][..]]).unwrap();
                    }
                })
            })
            .collect();
        let mut got = Vec::new();
        let mut buf = [0u8; 97];
        while got.len() < 4 * 200 * 51 {
            let n = b.recv(&mut buf, true).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        for w in writers {
            w.join().unwrap();
        }
        for frame in got.chunks(51) {
            assert!(frame.iter().all(|&x| x == frame[0]), "{frame:?}");
        }
    }

    #[test]
    fn a_read_without_waiting_says_nothing_has_come_and_ends_are_seen_after_the_last_bytes() {
        let (a, b) = pair(64);
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(&mut buf, false), Err(Errno::EAGAIN));
        assert!(!b.readable());
        a.send_all(b"abc").unwrap();
        drop(a);
        assert!(b.readable() && !b.at_end());
        assert_eq!(b.recv(&mut buf, false), Ok(3));
        assert_eq!(&buf[..3], b"abc");
        assert!(b.at_end());
        assert_eq!(b.recv(&mut buf, true), Ok(0), "the end, not a wait");
        assert_eq!(b.send(b"x", true), Err(Errno::EPIPE), "its reader is gone");
    }

    #[test]
    fn shutting_reading_wakes_a_blocked_reader_and_fails_the_writer() {
        let _bounded = watchdog();
        let (a, b) = pair(64);
        std::thread::scope(|s| {
            let reader = s.spawn(|| b.recv(&mut [0u8; 4], true));
            std::thread::sleep(Duration::from_millis(20));
            b.shutdown(Shut::Read);
            assert_eq!(reader.join().unwrap(), Ok(0));
        });
        assert_eq!(a.send(b"late", true), Err(Errno::EPIPE));
    }

    #[test]
    fn a_writer_waiting_for_room_gives_up_at_its_timeout_and_an_end_wakes_it() {
        let _bounded = watchdog();
        let (a, b) = pair(64);
        a.send_all(&[1u8; 64]).unwrap();
        a.set_send_timeout(Duration::from_millis(30));
        let t0 = Instant::now();
        assert_eq!(a.send(b"more", true), Err(Errno::EAGAIN));
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert_eq!(a.send(b"more", false), Err(Errno::EAGAIN));
        a.set_send_timeout(Duration::ZERO);
        std::thread::scope(|s| {
            let writer = s.spawn(|| a.send(b"more", true));
            std::thread::sleep(Duration::from_millis(20));
            drop(b);
            assert_eq!(writer.join().unwrap(), Err(Errno::EPIPE));
        });
    }

    #[test]
    fn a_reader_racing_a_writer_that_spills_takes_the_ring_first() {
        let _bounded = watchdog();
        // The writer puts pieces larger than the ring, each filling it and spilling the rest, while the
        // reader takes what is there: a reader that found the ring empty, and then the spill full, must
        // still take what the ring got in between first.
        let (a, b) = pair(64);
        a.never_wait_to_send();
        const PIECES: u32 = 300_000;
        let got = std::thread::scope(|s| {
            s.spawn(|| {
                let mut next = 0u32;
                for _ in 0..PIECES {
                    let piece: Vec<u8> = (0..150)
                        .map(|_| {
                            next += 1;
                            (next % 251) as u8
                        })
                        .collect();
                    a.send(&piece, false).unwrap();
                }
                a.shutdown(Shut::Write);
            });
            let mut got = 0u32;
            let mut buf = [0u8; 97];
            loop {
                match b.recv(&mut buf, false) {
                    Ok(0) => return got,
                    Ok(n) => {
                        for &x in &buf[..n] {
                            got += 1;
                            assert_eq!(x, (got % 251) as u8, "byte {got} out of order");
                        }
                    }
                    Err(Errno::EAGAIN) => std::hint::spin_loop(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        assert_eq!(got, PIECES * 150);
    }

    #[test]
    fn an_end_that_never_waits_to_send_keeps_what_has_no_room_in_order() {
        let _bounded = watchdog();
        let (a, b) = pair(64);
        a.never_wait_to_send();
        let bell = Doorbell::new();
        b.ring_on_input(&bell);
        let sent: Vec<u8> = (0..5_000u32).map(|i| (i * 13 % 253) as u8).collect();
        let mut got = Vec::new();
        let mut buf = [0u8; 41];
        // Rounds of writing far more than the ring holds with nobody reading, then reading part of it,
        // so that writes go to the ring, to the spill behind it, and to the ring again once it is read.
        for (round, piece) in sent.chunks(1_000).enumerate() {
            let rung = bell.seen();
            assert_eq!(a.send(piece, false), Ok(piece.len()), "never EAGAIN");
            assert_ne!(
                bell.seen(),
                rung,
                "what was spilled rang the reader's doorbell"
            );
            let want = got.len() + piece.len() - 100 * (round % 2);
            while got.len() < want {
                let n = b
                    .recv(&mut buf[..(want - got.len()).min(41)], false)
                    .unwrap();
                got.extend_from_slice(&buf[..n]);
            }
        }
        a.send_all(b"!").unwrap();
        drop(a);
        assert!(b.readable() && !b.at_end(), "bytes wait before the end");
        loop {
            match b.recv(&mut buf, true).unwrap() {
                0 => break,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        assert_eq!(got.pop(), Some(b'!'));
        assert_eq!(got, sent);
        assert!(b.at_end());
        let (a, b) = pair(64);
        a.never_wait_to_send();
        drop(b);
        assert_eq!(
            a.send(&[0u8; 200], false),
            Err(Errno::EPIPE),
            "its reader is gone"
        );
    }

    #[test]
    fn a_doorbell_wakes_its_sleeper_for_bytes_on_any_of_its_connections() {
        let bell = Doorbell::new();
        let ends: Vec<(End, End)> = (0..3).map(|_| pair(64)).collect();
        for (_, theirs) in &ends {
            assert!(theirs.ring_on_input(&bell));
            assert!(!theirs.ring_on_input(&Doorbell::new()), "one doorbell each");
        }
        std::thread::scope(|s| {
            let sleeper = s.spawn(|| {
                let t0 = Instant::now();
                loop {
                    let seen = bell.seen();
                    if ends[2].1.readable() {
                        return t0.elapsed();
                    }
                    bell.wait(seen, Duration::from_secs(10));
                }
            });
            std::thread::sleep(Duration::from_millis(20));
            ends[2].0.send_all(b"x").unwrap();
            assert!(sleeper.join().unwrap() < Duration::from_secs(5));
        });
        let bell = Doorbell::with_eventfd().unwrap();
        let (a, b) = pair(64);
        b.ring_on_input(&bell);
        bell.drain();
        a.send_all(b"y").unwrap();
        let mut fds = [nix::poll::PollFd::new(
            bell.fd().unwrap(),
            nix::poll::PollFlags::POLLIN,
        )];
        assert_eq!(nix::poll::poll(&mut fds, 1000u16), Ok(1));
    }

    #[test]
    fn a_writer_that_found_no_room_is_rung_when_the_reader_makes_some_and_only_then() {
        let bell = Doorbell::new();
        let (a, b) = pair(64);
        assert!(a.ring_on_room(&bell));
        assert!(!a.ring_on_room(&Doorbell::new()), "one doorbell each");
        let mut buf = [0u8; 16];
        // Reads while the writer wants nothing ring nothing.
        a.send_all(&[1; 16]).unwrap();
        let seen = bell.seen();
        assert_eq!(b.recv(&mut buf, false), Ok(16));
        assert_eq!(
            bell.seen(),
            seen,
            "a read rang though no writer wanted room"
        );
        // A write that would not wait fills the ring, and the next finds no room.
        assert_eq!(a.send(&[2; 100], false), Ok(64));
        assert_eq!(a.send(&[3; 10], false), Err(Errno::EAGAIN));
        let seen = bell.seen();
        // A thread sleeping on the doorbell, as the MPI bridge does, wakes when the reader reads.
        std::thread::scope(|s| {
            let sleeper = s.spawn(|| {
                let t0 = Instant::now();
                while bell.seen() == seen && t0.elapsed() < Duration::from_secs(10) {
                    bell.wait(seen, Duration::from_secs(10));
                }
                t0.elapsed()
            });
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(b.recv(&mut buf, false), Ok(16));
            assert!(sleeper.join().unwrap() < Duration::from_secs(5));
        });
        assert_eq!(a.send(&[3; 10], false), Ok(10), "room was made");
        // Rung once per wish: further reads ring nothing until a write finds no room again.
        let seen = bell.seen();
        assert_eq!(b.recv(&mut buf, false), Ok(16));
        assert_eq!(bell.seen(), seen);
        // The reader's end rings a writer that waits for room too.
        assert_eq!(
            a.send(&[4; 64], false),
            Ok(22),
            "the room left: 64 - (64 - 16 + 10 - 16)"
        );
        assert_eq!(a.send(&[4; 1], false), Err(Errno::EAGAIN));
        let seen = bell.seen();
        b.shutdown(Shut::Read);
        assert_ne!(bell.seen(), seen, "the reader's end rang nothing");
        assert_eq!(a.send(&[5; 1], false), Err(Errno::EPIPE));
    }
}
