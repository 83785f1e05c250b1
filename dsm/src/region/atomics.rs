//! Atomic operations on the elements of a `GlobalVec` of 4- or 8-byte integers: shared counters, tickets,
//! flags and maxima that every rank changes without a lock. Under sequential consistency they are the
//! processor's own atomic instructions on the shared memory, made atomic across ranks by the page's single
//! writer; under release consistency, where several ranks may write copies of one page at once, the word's
//! home performs them (`rc::atomic`), computing the result as `AtomicOp::apply` says, which the unit tests
//! below hold to what the processor's instructions do.

use super::{Consistency, GlobalVec};
use crate::error::Result;
use crate::types::PAGE_SIZE;
use crate::wire::{AtomicOp, WordKind};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64};

mod sealed {
    /// What the atomic operations need of an element type, out of the public API.
    pub trait Sealed: Copy {
        /// Whether `fetch_max` and `fetch_min` compare elements as signed.
        const SIGNED: bool;
        /// The element's bits, zero-extended to 64.
        fn to_bits(self) -> u64;
        /// The element whose bits are the low bits of `bits`.
        fn from_bits(bits: u64) -> Self;
    }
}

use sealed::Sealed;

/// The element types of a [`GlobalVec`] that atomic operations act on: `u32`, `i32`, `u64` and `i64`
/// (sealed: no other type can implement it).
pub trait AtomicElement: bytemuck::Pod + Sealed {}

/// The wire's name for elements of type `T`.
fn kind<T: AtomicElement>() -> WordKind {
    match (std::mem::size_of::<T>(), T::SIGNED) {
        (4, false) => WordKind::U32,
        (4, true) => WordKind::I32,
        (_, false) => WordKind::U64,
        (_, true) => WordKind::I64,
    }
}

macro_rules! atomic_element {
    ($t:ty, $bits:ty, $signed:expr) => {
        impl Sealed for $t {
            const SIGNED: bool = $signed;
            fn to_bits(self) -> u64 {
                self as $bits as u64
            }
            fn from_bits(bits: u64) -> Self {
                bits as $bits as $t
            }
        }
        impl AtomicElement for $t {}
    };
}

atomic_element!(u32, u32, false);
atomic_element!(i32, u32, true);
atomic_element!(u64, u64, false);
atomic_element!(i64, u64, true);

/// `op` on the word at `$ptr` as the std atomic `$atomic` of element `$t`, operands and result as bits.
macro_rules! rmw {
    ($atomic:ty, $t:ty, $ptr:expr, $op:expr) => {{
        // SAFETY: the caller of `in_place` guarantees that the word is mapped, aligned for its width and
        // made atomic across ranks by its page's coherence; every bit pattern is a valid integer. Other
        // threads and ranks may access the word at once: that is what atomic instructions are for.
        let word = unsafe { <$atomic>::from_ptr($ptr.cast()) };
        let v = <$t>::from_bits;
        let old = match $op {
            AtomicOp::Load => word.load(SeqCst),
            AtomicOp::Add(d) => word.fetch_add(v(d), SeqCst),
            AtomicOp::Swap(x) => word.swap(v(x), SeqCst),
            AtomicOp::CompareExchange { current, new } => word
                .compare_exchange(v(current), v(new), SeqCst, SeqCst)
                .unwrap_or_else(|found| found),
            AtomicOp::And(x) => word.fetch_and(v(x), SeqCst),
            AtomicOp::Or(x) => word.fetch_or(v(x), SeqCst),
            AtomicOp::Xor(x) => word.fetch_xor(v(x), SeqCst),
            AtomicOp::Nand(x) => word.fetch_nand(v(x), SeqCst),
            AtomicOp::Max(x) => word.fetch_max(v(x), SeqCst),
            AtomicOp::Min(x) => word.fetch_min(v(x), SeqCst),
        };
        old.to_bits()
    }};
}

/// Performs `op` on the word of `kind` at `ptr` with the processor's atomic instructions; returns the word
/// before (its bits, zero-extended).
///
/// # Safety
/// `ptr` must be aligned for the kind's width and point into shared memory mapped for the duration of the
/// call, whose page's coherence makes the instruction atomic across ranks: one writer at a time under
/// sequential consistency, or, at a page's home under release consistency, the page held BUSY and writable
/// here.
pub(crate) unsafe fn in_place(ptr: *mut u8, kind: WordKind, op: AtomicOp) -> u64 {
    match kind {
        WordKind::U32 => rmw!(AtomicU32, u32, ptr, op),
        WordKind::I32 => rmw!(AtomicI32, i32, ptr, op),
        WordKind::U64 => rmw!(AtomicU64, u64, ptr, op),
        WordKind::I64 => rmw!(AtomicI64, i64, ptr, op),
    }
}

/// Atomic operations on elements, under either consistency model, for elements of the
/// [`AtomicElement`] types. They are those of `std`'s `AtomicU64` and its kin, on shared memory.
///
/// Operations on one element are atomic with respect to each other on every rank: each takes effect at one
/// instant, and all ranks agree on the order of those on the element (a counter incremented by every rank
/// with [`fetch_add`](Self::fetch_add) ends exact, and no two callers get the same value back). They order
/// nothing else: they are not a lock or a barrier, and the program's other accesses are ordered, as ever,
/// by the runtime's locks and barriers. Mixing them with plain writes ([`set`](Self::set), slices) of the
/// same element that are not ordered with them by a lock or a barrier is a race, whose outcome is not
/// defined. Plain writes of other elements, neighbours in the same 8 bytes included, are not a race.
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
impl<T: AtomicElement> GlobalVec<'_, T> {
    /// Adds `delta` to element `i` (wrapping around) and returns the element as it was before.
    pub fn fetch_add(&self, i: usize, delta: T) -> Result<T> {
        self.atomic(i, AtomicOp::Add(delta.to_bits()))
    }

    /// Subtracts `delta` from element `i` (wrapping around) and returns the element as it was before.
    pub fn fetch_sub(&self, i: usize, delta: T) -> Result<T> {
        let minus = T::from_bits(delta.to_bits().wrapping_neg());
        self.atomic(i, AtomicOp::Add(minus.to_bits()))
    }

    /// Stores `value` in element `i` and returns the element as it was before.
    pub fn swap(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::Swap(value.to_bits()))
    }

    /// Stores `value` in element `i`, atomically with respect to the other operations on it.
    pub fn store(&self, i: usize, value: T) -> Result<()> {
        self.swap(i, value).map(drop)
    }

    /// Stores `new` in element `i` if it holds `current`. Returns `Ok(current)` when it stored, and
    /// `Err(found)` with the element's value when it did not, as `std`'s `compare_exchange` does.
    pub fn compare_exchange(
        &self,
        i: usize,
        current: T,
        new: T,
    ) -> Result<std::result::Result<T, T>> {
        let op = AtomicOp::CompareExchange {
            current: current.to_bits(),
            new: new.to_bits(),
        };
        let old = self.atomic_bits(i, op)?;
        let found = T::from_bits(old);
        Ok(if old == current.to_bits() {
            Ok(found)
        } else {
            Err(found)
        })
    }

    /// Bitwise "and" of element `i` with `value`; returns the element as it was before.
    pub fn fetch_and(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::And(value.to_bits()))
    }

    /// Bitwise "or" of element `i` with `value`; returns the element as it was before.
    pub fn fetch_or(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::Or(value.to_bits()))
    }

    /// Bitwise "exclusive or" of element `i` with `value`; returns the element as it was before.
    pub fn fetch_xor(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::Xor(value.to_bits()))
    }

    /// Bitwise "nand" of element `i` with `value` (the element becomes `!(element & value)`); returns the
    /// element as it was before.
    pub fn fetch_nand(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::Nand(value.to_bits()))
    }

    /// Stores the greater of element `i` and `value` (signed comparison for `i32` and `i64`); returns the
    /// element as it was before.
    pub fn fetch_max(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::Max(value.to_bits()))
    }

    /// Stores the lesser of element `i` and `value` (signed comparison for `i32` and `i64`); returns the
    /// element as it was before.
    pub fn fetch_min(&self, i: usize, value: T) -> Result<T> {
        self.atomic(i, AtomicOp::Min(value.to_bits()))
    }

    /// Reads element `i` atomically: under release consistency, the value at its home now, with every
    /// atomic operation on it so far (where [`get`](Self::get) may read this rank's older copy).
    pub fn load(&self, i: usize) -> Result<T> {
        self.atomic(i, AtomicOp::Load)
    }

    /// Replaces element `i` with what `f` makes of it, as `std`'s `fetch_update` does: `f` gets the element
    /// and returns the new value, or `None` to leave it as it is. Returns `Ok(previous)` when it stored,
    /// and `Err(value)` with the value `f` refused when `f` returned `None`.
    ///
    /// It is a loop of [`compare_exchange`](Self::compare_exchange) from a [`load`](Self::load), so `f`
    /// runs again, on the newer value, each time another operation changed the element first: it must
    /// not count on running once. Under release consistency each attempt is a round trip to the element's
    /// home; an operation that has one of its own (`fetch_add`, `fetch_max`...) takes one round trip and
    /// no retries.
    pub fn fetch_update(
        &self,
        i: usize,
        mut f: impl FnMut(T) -> Option<T>,
    ) -> Result<std::result::Result<T, T>> {
        let mut seen = self.load(i)?;
        loop {
            let Some(new) = f(seen) else {
                return Ok(Err(seen));
            };
            match self.compare_exchange(i, seen, new)? {
                Ok(previous) => return Ok(Ok(previous)),
                Err(found) => seen = found,
            }
        }
    }

    fn atomic(&self, i: usize, op: AtomicOp) -> Result<T> {
        self.atomic_bits(i, op).map(T::from_bits)
    }

    /// Performs `op` on element `i`; returns the element's bits before it.
    fn atomic_bits(&self, i: usize, op: AtomicOp) -> Result<u64> {
        let ptr = self.ptr(i);
        let inner = &self.region().inner;
        Ok(match inner.consistency {
            // SAFETY: `ptr` is element `i` of the region (`ptr` checked the index), aligned for `T` and
            // mapped for as long as `self` lives; the coherence protocol gives the page to one writer at a
            // time, and a fault is resolved by the SIGBUS handler before the instruction completes.
            Consistency::Sequential => unsafe { in_place(ptr.cast(), kind::<T>(), op) },
            Consistency::Release => {
                let at = i * std::mem::size_of::<T>();
                let page = (at / PAGE_SIZE) as u64;
                let offset = (at % PAGE_SIZE) as u16;
                crate::rc::atomic(&inner.shared, inner, page, offset, kind::<T>(), op)?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// What a home computes (`AtomicOp::apply`) is what the processor's instruction does, for every kind
    /// and operation: the two models' paths give the same results.
    #[test]
    fn a_homes_result_is_the_processors_for_every_kind_and_operation() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let edges = [
            0u64,
            1,
            2,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            u64::MAX,
            1 << 63,
        ];
        let value = |rng: &mut rand::rngs::StdRng, kind: WordKind| {
            let bits = if rng.random_range(0..3) == 0 {
                edges[rng.random_range(0..edges.len())]
            } else {
                rng.random()
            };
            if kind.width() == 4 {
                bits & u64::from(u32::MAX)
            } else {
                bits
            }
        };
        let mut checked = 0;
        for kind in [WordKind::U32, WordKind::I32, WordKind::U64, WordKind::I64] {
            for _ in 0..4000 {
                let (old, a, b) = (
                    value(&mut rng, kind),
                    value(&mut rng, kind),
                    value(&mut rng, kind),
                );
                let a = if rng.random_range(0..4) == 0 { old } else { a };
                // Bits above a narrow word's width, which both paths ignore.
                let a = if rng.random_range(0..8) == 0 {
                    a | 0xdead << 40
                } else {
                    a
                };
                let op = match rng.random_range(0..10) {
                    0 => AtomicOp::Load,
                    1 => AtomicOp::Add(a),
                    2 => AtomicOp::Add(a.wrapping_neg()),
                    3 => AtomicOp::Swap(a),
                    4 => AtomicOp::CompareExchange { current: a, new: b },
                    5 => AtomicOp::And(a),
                    6 => AtomicOp::Or(a),
                    7 => AtomicOp::Xor(a),
                    8 => AtomicOp::Nand(a),
                    _ if rng.random_range(0..2) == 0 => AtomicOp::Max(a),
                    _ => AtomicOp::Min(a),
                };
                // The word among bytes that must stay as they are: a 4-byte word in the upper half of an
                // 8-byte one.
                let at = if kind.width() == 4 { 12 } else { 8 };
                let mut memory = [0x5a5a_5a5a_5a5a_5a5au64; 3];
                let bytes = bytemuck::bytes_of_mut(&mut memory);
                let (four, eight) = ((old as u32).to_ne_bytes(), old.to_ne_bytes());
                let word: &[u8] = if kind.width() == 4 { &four } else { &eight };
                bytes[at..at + kind.width()].copy_from_slice(word);
                // SAFETY: the word is inside `memory`, aligned for its width (`memory` is 8-byte aligned),
                // and only this thread uses it.
                let before = unsafe { in_place(bytes.as_mut_ptr().add(at), kind, op) };
                let after = match kind.width() {
                    4 => u64::from(u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap())),
                    _ => u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap()),
                };
                assert_eq!(before, old, "{kind:?} {op:?} on {old:#x}: the word before");
                assert_eq!(
                    op.apply(kind, old),
                    after,
                    "{kind:?} {op:?} on {old:#x}: the home's result against the processor's"
                );
                let untouched = bytes[..at].iter().chain(&bytes[at + kind.width()..]);
                assert!(untouched.into_iter().all(|&b| b == 0x5a), "{kind:?} {op:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 16_000);
    }

    #[test]
    fn signed_kinds_compare_as_signed_and_unsigned_as_unsigned() {
        let minus_one_32 = u64::from(u32::MAX);
        assert_eq!(AtomicOp::Max(1).apply(WordKind::I32, minus_one_32), 1);
        assert_eq!(
            AtomicOp::Max(1).apply(WordKind::U32, minus_one_32),
            minus_one_32
        );
        assert_eq!(AtomicOp::Min(1).apply(WordKind::I64, u64::MAX), u64::MAX);
        assert_eq!(AtomicOp::Min(1).apply(WordKind::U64, u64::MAX), 1);
        // A 32-bit add wraps at 32 bits, and a subtraction is the add of the two's complement.
        assert_eq!(AtomicOp::Add(2).apply(WordKind::U32, minus_one_32), 1);
        assert_eq!(
            AtomicOp::Add(3u64.wrapping_neg()).apply(WordKind::I32, 1),
            (-2i32) as u32 as u64
        );
        assert_eq!(i32::from_bits((-2i32).to_bits()), -2);
        assert_eq!((-2i32).to_bits(), 0xffff_fffe);
    }
}
