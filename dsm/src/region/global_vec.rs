//! `GlobalVec`, the typed view of a region: element reads and writes as single volatile accesses, slice
//! copies that announce their pages to the fault handler, and selective synchronization of a range.

use super::Region;
use crate::error::Result;
use crate::types::PAGE_SIZE;
use std::marker::PhantomData;

/// A typed array in a shared region: element `i` is the same memory in every rank.
///
/// Reads and writes through [`get`](Self::get) and [`set`](Self::set) are single volatile accesses, so they
/// are never cached in registers across a synchronization point and every rank sees them under the
/// region's consistency model. Borrowing the memory as a slice is `unsafe`, because other ranks may change
/// it while the borrow lives; do it between barriers or under a lock.
#[derive(Debug)]
pub struct GlobalVec<'d, T: bytemuck::Pod> {
    region: Region<'d>,
    len: usize,
    _t: PhantomData<T>,
}

impl<'d, T: bytemuck::Pod> GlobalVec<'d, T> {
    pub(crate) fn new(region: Region<'d>, len: usize) -> GlobalVec<'d, T> {
        GlobalVec {
            region,
            len,
            _t: PhantomData,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying region.
    pub fn region(&self) -> &Region<'d> {
        &self.region
    }

    pub(super) fn ptr(&self, i: usize) -> *mut T {
        assert!(
            i < self.len,
            "index {i} out of range for a GlobalVec of {} elements",
            self.len
        );
        // SAFETY: `i < len` and the region holds at least `len` elements, so the offset stays inside it.
        unsafe { (self.region.as_ptr() as *mut T).add(i) }
    }

    /// Reads element `i` (faults the page in if needed).
    pub fn get(&self, i: usize) -> T {
        // SAFETY: the pointer is in bounds and aligned (regions are page aligned, `T: Pod`), and every bit
        // pattern is a valid `T`. The memory is mapped for the region's lifetime; a fault is resolved by the
        // SIGBUS handler before the load completes.
        unsafe { self.ptr(i).read_volatile() }
    }

    /// Writes element `i` (faults the page in and takes write access if needed).
    pub fn set(&self, i: usize, value: T) {
        // SAFETY: as in `get`; the region is writable shared memory, so writes through `&self` are intended
        // (the coherence protocol, not Rust's borrow rules, orders them between ranks).
        unsafe { self.ptr(i).write_volatile(value) }
    }

    /// The byte range of elements `start..start + len`, which must lie within the vector, announced to the
    /// fault handler as about to be touched (`write`: to be written); `None` when it is empty.
    fn announce(&self, start: usize, len: usize, write: bool) -> Option<std::ops::Range<usize>> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "elements {start}..{} out of range for a GlobalVec of {} elements",
            start.saturating_add(len),
            self.len
        );
        let size = std::mem::size_of::<T>();
        let bytes = start * size..(start + len) * size;
        if bytes.is_empty() {
            return None;
        }
        self.region.inner.announce(bytes.start, bytes.end, write);
        Some(bytes)
    }

    /// Copies `src` into elements `start..start + src.len()`.
    ///
    /// The pages are taken as the copy reaches them, each run of pages with one home in one request (up to
    /// the read-ahead window, [`Dsm::readahead`](crate::Dsm::readahead)), not a page at a time.
    pub fn write_slice(&self, start: usize, src: &[T]) {
        let Some(bytes) = self.announce(start, src.len(), true) else {
            return;
        };
        // SAFETY: the destination is the bytes of `src.len()` elements inside the region (checked above),
        // mapped for the region's lifetime (faults are resolved by the SIGBUS handler as the copy goes);
        // `src` is a separate Rust slice of the same length, so the two do not overlap. As with `set`, the
        // coherence protocol, not Rust's borrow rules, orders these writes between ranks.
        unsafe {
            copy_in_page_order(
                src.as_ptr().cast(),
                self.region.as_ptr().add(bytes.start),
                bytes.len(),
                bytes.start,
            )
        }
    }

    /// Copies elements `start..start + out.len()` into `out`, taking the pages it needs as
    /// [`write_slice`](Self::write_slice) does.
    pub fn read_slice(&self, start: usize, out: &mut [T]) {
        let Some(bytes) = self.announce(start, out.len(), false) else {
            return;
        };
        // SAFETY: as in `write_slice`, with the region as the source; `out` is an exclusive Rust slice, and
        // any bytes are a valid `T` (`T: Pod`).
        unsafe {
            copy_in_page_order(
                self.region.as_ptr().add(bytes.start),
                out.as_mut_ptr().cast(),
                bytes.len(),
                bytes.start,
            )
        }
    }

    /// Brings the pages holding elements `range` here for reading, so that the accesses that follow do
    /// not fault: each run of them with one home comes in one request (up to the read-ahead window,
    /// [`Dsm::readahead`](crate::Dsm::readahead)) rather than in a window growing from one page. A thread
    /// that reads a large part of a remote region can prefetch it piece by piece beside the computation
    /// that needs it.
    pub fn prefetch(&self, range: std::ops::Range<usize>) {
        let Some(bytes) = self.announce(range.start, range.end.saturating_sub(range.start), false)
        else {
            return;
        };
        let mut at = bytes.start;
        while at < bytes.end {
            // SAFETY: `at` is inside the region (within the checked range), any byte is a valid `u8`, and
            // the memory is mapped for the region's lifetime; the fault is resolved before the load
            // completes, as in `get`.
            unsafe { std::hint::black_box(self.region.as_ptr().add(at).read_volatile()) };
            at = (at / PAGE_SIZE + 1) * PAGE_SIZE;
        }
    }

    /// [`Region::release_range`] of the bytes of elements `range`, which must lie within the vector.
    pub fn release_range(&self, range: std::ops::Range<usize>) -> Result<()> {
        self.region.release_range(self.bytes_of(range))
    }

    /// [`Region::acquire_range`] of the bytes of elements `range`, which must lie within the vector.
    pub fn acquire_range(&self, range: std::ops::Range<usize>) -> Result<()> {
        self.region.acquire_range(self.bytes_of(range))
    }

    /// The byte range of elements `range`, which must lie within the vector (as an index must).
    fn bytes_of(&self, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "elements {}..{} out of range for a GlobalVec of {} elements",
            range.start,
            range.end,
            self.len
        );
        let size = std::mem::size_of::<T>();
        range.start * size..range.end * size
    }

    /// Borrows the elements as a slice.
    ///
    /// # Safety
    /// No rank (this one included) may write the borrowed elements while the slice lives: borrow between
    /// barriers, or under a lock that every writer takes.
    pub unsafe fn as_slice(&self) -> &[T] {
        // SAFETY: in bounds and aligned; the caller guarantees no concurrent writes.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr() as *const T, self.len) }
    }

    /// Borrows the elements mutably.
    ///
    /// # Safety
    /// No other rank or thread may access the borrowed elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [T] {
        // SAFETY: in bounds and aligned; the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr() as *mut T, self.len) }
    }
}

/// Copies `len` bytes from `src` to `dst` a page of the region at a time, in ascending order (`at` is the
/// offset in the region of whichever side lives there), so that its pages fault in the order their
/// announcement expects: `memcpy` may take a long copy backwards (glibc does, to avoid 4 KiB aliasing
/// between source and destination) or touch its end first, and each page would then fault alone.
///
/// # Safety
/// Both ranges must be valid for `len` bytes and not overlap, as for `copy_nonoverlapping`.
unsafe fn copy_in_page_order(src: *const u8, dst: *mut u8, len: usize, at: usize) {
    let mut done = 0;
    while done < len {
        let piece = (PAGE_SIZE - (at + done) % PAGE_SIZE).min(len - done);
        // SAFETY: `done + piece <= len`, within both ranges (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), piece) };
        done += piece;
    }
}
