//! Atomic operations on the 8-byte elements of a `GlobalVec<u64>`: shared counters, tickets and flags that
//! every rank changes without a lock. Under sequential consistency they are the processor's own atomic
//! instructions on the shared memory, made atomic across ranks by the page's single writer; under release
//! consistency, where several ranks may write copies of one page at once, the word's home performs them
//! (`rc::atomic`).

use super::{Consistency, GlobalVec};
use crate::error::Result;
use crate::types::PAGE_SIZE;
use crate::wire::AtomicOp;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Performs `op` on the word at `ptr` with the processor's atomic instructions; returns the word before.
///
/// # Safety
/// `ptr` must be 8-byte aligned and point into shared memory mapped for the duration of the call, whose
/// page's coherence makes the instruction atomic across ranks: one writer at a time under sequential
/// consistency, or, at a page's home under release consistency, the page held BUSY and writable here.
pub(crate) unsafe fn in_place(ptr: *mut u64, op: AtomicOp) -> u64 {
    // SAFETY: aligned and mapped (the caller's contract); every bit pattern is a valid `u64`. Other threads
    // and ranks may access the word at once: that is what atomic instructions are for.
    let word = unsafe { AtomicU64::from_ptr(ptr) };
    match op {
        AtomicOp::Load => word.load(SeqCst),
        AtomicOp::Add(delta) => word.fetch_add(delta, SeqCst),
        AtomicOp::Swap(value) => word.swap(value, SeqCst),
        AtomicOp::CompareExchange { current, new } => word
            .compare_exchange(current, new, SeqCst, SeqCst)
            .unwrap_or_else(|found| found),
    }
}

/// Atomic operations on elements, under either consistency model.
///
/// Operations on one element are atomic with respect to each other on every rank: each takes effect at one
/// instant, and all ranks agree on the order of those on the element (a counter incremented by every rank
/// with [`fetch_add`](Self::fetch_add) ends exact, and no two callers get the same value back). They order
/// nothing else: they are not a lock or a barrier, and the program's other accesses are ordered, as ever,
/// by the runtime's locks and barriers. Mixing them with plain writes ([`set`](Self::set), slices) of the
/// same element that are not ordered with them by a lock or a barrier is a race, whose outcome is not
/// defined.
///
/// Under [`Consistency::Sequential`] each is one atomic instruction on the shared memory, with a write
/// fault when the page is not writable here: uncontended, as fast as a local atomic; contended by several
/// ranks, the page moves between them at each. Under [`Consistency::Release`] each is a request to the
/// element's home, which performs it on its copy: a round trip (measured in `docs/BENCHMARKS.md`). The
/// home's own threads perform theirs in place while the page is writable there (most of the time), and
/// otherwise ask their own service loop. The calling rank sees the result in its own reads at once;
/// another rank's plain [`get`](Self::get) of the element sees it, as it would see a write, after
/// acquiring a lock or passing a barrier that follows the caller's next release (lock release or
/// barrier). [`load`](Self::load) reads the element at its home at any time.
///
/// Under release consistency a rank's own unsent writes to the element's page go to the home first (a
/// selective release of that page), so that an operation follows the caller's earlier writes there too.
///
/// An error means the home could not be reached or failed while answering, or a home this rank had to
/// send its writes to failed (before the operation, or as its copy of the page was dropped after it): the
/// operation may have taken effect or not. Under the default failure policy the job is ending by then.
impl GlobalVec<'_, u64> {
    /// Adds `delta` to element `i` (wrapping around) and returns the element as it was before.
    pub fn fetch_add(&self, i: usize, delta: u64) -> Result<u64> {
        self.atomic(i, AtomicOp::Add(delta))
    }

    /// Stores `value` in element `i` and returns the element as it was before.
    pub fn swap(&self, i: usize, value: u64) -> Result<u64> {
        self.atomic(i, AtomicOp::Swap(value))
    }

    /// Stores `new` in element `i` if it holds `current`. Returns `Ok(current)` when it stored, and
    /// `Err(found)` with the element's value when it did not, as `std`'s `compare_exchange` does.
    pub fn compare_exchange(
        &self,
        i: usize,
        current: u64,
        new: u64,
    ) -> Result<std::result::Result<u64, u64>> {
        let old = self.atomic(i, AtomicOp::CompareExchange { current, new })?;
        Ok(if old == current { Ok(old) } else { Err(old) })
    }

    /// Reads element `i` atomically: under release consistency, the value at its home now, with every
    /// atomic operation on it so far (where [`get`](Self::get) may read this rank's older copy).
    pub fn load(&self, i: usize) -> Result<u64> {
        self.atomic(i, AtomicOp::Load)
    }

    fn atomic(&self, i: usize, op: AtomicOp) -> Result<u64> {
        let ptr = self.ptr(i);
        let inner = &self.region().inner;
        match inner.consistency {
            // SAFETY: `ptr` is element `i` of the region (`ptr` checked the index) and mapped for as long as
            // `self` lives; the coherence protocol gives the page to one writer at a time, and a fault is
            // resolved by the SIGBUS handler before the instruction completes.
            Consistency::Sequential => Ok(unsafe { in_place(ptr, op) }),
            Consistency::Release => {
                let at = i * std::mem::size_of::<u64>();
                let page = (at / PAGE_SIZE) as u64;
                let word = ((at % PAGE_SIZE) / std::mem::size_of::<u64>()) as u16;
                crate::rc::atomic(&inner.shared, inner, page, word, op)
            }
        }
    }
}
