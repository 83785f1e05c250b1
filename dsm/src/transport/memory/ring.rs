//! One direction of an in-memory connection: a single-producer single-consumer ring of bytes, the futex
//! words its reader and writer sleep on, the writers' lock, the ends, and the spill that takes what a
//! direction whose writes never wait had no room for. Every copy stays within the ring's buffer, however
//! the ring is misused.

use super::Doorbell;
use crate::uffd::futex;
use nix::errno::Errno;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

/// One direction of a connection.
pub(super) struct Ring {
    buf: Box<[UnsafeCell<u8>]>,
    /// The writers' lock: 0 free, 1 held, 2 held with writers asleep on it.
    writing: AtomicU32,
    /// Bytes ever taken by the reader, and ever put by the writer: `tail - head` are waiting.
    pub(super) head: AtomicUsize,
    pub(super) tail: AtomicUsize,
    /// Bumped whenever bytes or an end arrive (the reader sleeps on it), and whenever room is made or
    /// either side ends (the writer sleeps on it); with the number of threads asleep on each.
    data: AtomicU32,
    readers: AtomicU32,
    room: AtomicU32,
    writers: AtomicU32,
    /// The writer's end: the reader reads what is left, then the end of the stream.
    pub(super) writer_done: AtomicBool,
    /// The reader's end: nothing more is read, writes fail.
    pub(super) reader_done: AtomicBool,
    /// Rung with every arrival, for a reader that waits on many rings.
    pub(super) bell: OnceLock<Arc<Doorbell>>,
    /// Rung when room is made after a write that would not wait found none, for a writer that waits on
    /// many rings ([`End::ring_on_room`]).
    pub(super) room_bell: OnceLock<Arc<Doorbell>>,
    /// A write that would not wait found no room, and `room_bell` is to ring when the reader makes some.
    room_wanted: AtomicBool,
    /// How long a write may wait for room without any being made (0: for ever), in nanoseconds.
    pub(super) send_timeout: AtomicU64,
    /// Set for a direction whose writes never wait ([`End::never_wait_to_send`]).
    pub(super) spill: OnceLock<Spill>,
}

/// What a direction whose writes never wait had no room for, in order, until its reader takes it. Once
/// anything waits here, every later write comes here too, so the reader reads the ring empty, then this.
#[derive(Default)]
pub(super) struct Spill {
    bytes: Mutex<VecDeque<u8>>,
    /// `bytes.len()`, for the reader's look without the lock.
    len: AtomicUsize,
}

impl Spill {
    pub(super) fn waiting(&self) -> bool {
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
    pub(super) fn new(capacity: usize) -> Ring {
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
    pub(super) fn waiting(&self, head: usize, tail: usize) -> usize {
        tail.wrapping_sub(head).min(self.capacity())
    }

    /// Takes the writers' lock (a futex lock: the fault path writes from the SIGBUS handler, where only a
    /// system call may wait).
    pub(super) fn lock_writing(&self) {
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

    pub(super) fn unlock_writing(&self) {
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
    pub(super) fn want_room(&self) -> bool {
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
    pub(super) fn put(&self, bytes: &[u8]) -> Result<usize, Errno> {
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
    pub(super) fn put_or_spill(&self, spill: &Spill, bytes: &[u8]) -> Result<usize, Errno> {
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
    pub(super) fn take(&self, buf: &mut [u8]) -> Option<usize> {
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
    pub(super) fn ready(&self) -> bool {
        self.writer_done.load(Ordering::Acquire)
            || self.reader_done.load(Ordering::Acquire)
            || self.tail.load(Ordering::Acquire) != self.head.load(Ordering::Acquire)
            || self.spill.get().is_some_and(Spill::waiting)
    }

    /// Sleeps until `ready`, or `deadline`; whether it is ready.
    pub(super) fn wait_ready(&self, deadline: Option<Instant>) -> bool {
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
    pub(super) fn wait_room(&self, deadline: Option<Instant>) {
        self.writers.fetch_add(1, Ordering::SeqCst);
        let seen = self.room.load(Ordering::SeqCst);
        let ended =
            self.reader_done.load(Ordering::Acquire) || self.writer_done.load(Ordering::Acquire);
        if self.full() && !ended {
            sleep_on(&self.room, seen, deadline);
        }
        self.writers.fetch_sub(1, Ordering::SeqCst);
    }

    pub(super) fn end_writing(&self) {
        self.writer_done.store(true, Ordering::Release);
        self.tell_reader();
        self.tell_writer();
    }

    pub(super) fn end_reading(&self) {
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
