//! The table of live regions that the SIGBUS handler searches for the region of a faulting address:
//! lock-free and allocation-free, each slot read as a seqlock. A region is published here before it is
//! handed out and taken out when every rank has dropped it (or its job ends).

use super::RegionShared;
use crate::error::{DsmError, Result};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;

/// A slot of the global table that the SIGBUS handler searches.
#[derive(Debug)]
struct RegistrySlot {
    /// A sequence count, odd while the bounds and owner below change: the fault handler, which reads them
    /// without a lock, takes them only as they stood together (a seqlock), never one region's start with
    /// another's end and pointer.
    seq: AtomicUsize,
    start: AtomicUsize,
    end: AtomicUsize,
    region: AtomicPtr<RegionShared>,
    /// The address of the region's job's shared state (0 while the slot is free), compared without
    /// reading the region, which another job may be freeing meanwhile.
    owner: AtomicUsize,
}

const REGISTRY_SLOTS: usize = 256;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: RegistrySlot = RegistrySlot {
    seq: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    region: AtomicPtr::new(std::ptr::null_mut()),
    owner: AtomicUsize::new(0),
};
static REGISTRY: [RegistrySlot; REGISTRY_SLOTS] = [EMPTY_SLOT; REGISTRY_SLOTS];

/// Publishes `region` to the fault handler. The registry holds one strong count until `unregister`.
pub(super) fn register(region: &Arc<RegionShared>) -> Result<usize> {
    for (i, slot) in REGISTRY.iter().enumerate() {
        let raw = Arc::into_raw(region.clone()) as *mut RegionShared;
        if slot
            .region
            .compare_exchange(
                std::ptr::null_mut(),
                raw,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            // The slot is this thread's from the exchange on: no other writer until `unregister`.
            slot.change(|| {
                slot.owner
                    .store(Arc::as_ptr(&region.shared) as usize, Ordering::Release);
                slot.end.store(region.base + region.len, Ordering::Release);
                slot.start.store(region.base, Ordering::Release);
            });
            return Ok(i);
        }
        // SAFETY: `raw` came from `Arc::into_raw` just above and was not published.
        drop(unsafe { Arc::from_raw(raw) });
    }
    Err(DsmError::Config(format!(
        "more than {REGISTRY_SLOTS} live regions in one process: free regions or allocate fewer, larger ones"
    )))
}

pub(super) fn unregister(index: usize) {
    let slot = &REGISTRY[index];
    // Cleared before the slot is free to be taken (the pointer below), so that a new occupant is never
    // taken for this one's job, and its `register` never changes the slot while this does.
    slot.change(|| {
        slot.start.store(0, Ordering::Release);
        slot.end.store(0, Ordering::Release);
        slot.owner.store(0, Ordering::Release);
    });
    let raw = slot.region.swap(std::ptr::null_mut(), Ordering::AcqRel);
    if !raw.is_null() {
        // SAFETY: the pointer was published by `register` from `Arc::into_raw` and is removed exactly once.
        drop(unsafe { Arc::from_raw(raw) });
    }
}

/// Takes out of the table the regions of the job whose shared state is `shared` that are still in it: those
/// a thread unwinding a panic dropped (`Region::drop` leaves them for the other ranks), when the rank
/// leaves the job. Its arena is unmapped next, and a later job of this process may reserve the same
/// addresses.
pub(crate) fn unregister_all_of(shared: &crate::dsm::Shared) {
    for (i, slot) in REGISTRY.iter().enumerate() {
        if slot.holds_one_of(shared) {
            unregister(i);
        }
    }
}

impl RegistrySlot {
    /// Runs `write`, which changes the slot's bounds and owner, with the sequence count odd. One writer at a
    /// time: the thread that took the slot (`register`), or the one letting it go (`unregister`).
    fn change(&self, write: impl FnOnce()) {
        let before = self.seq.fetch_add(1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        write();
        self.seq.store(before.wrapping_add(2), Ordering::Release);
    }

    /// The slot's bounds and region as they stood together, or `None` while they change.
    fn read(&self) -> Option<(usize, usize, *mut RegionShared)> {
        let seq = self.seq.load(Ordering::Acquire);
        if seq % 2 == 1 {
            return None;
        }
        let start = self.start.load(Ordering::Acquire);
        let end = self.end.load(Ordering::Acquire);
        let region = self.region.load(Ordering::Acquire);
        std::sync::atomic::fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == seq).then_some((start, end, region))
    }

    /// Whether the slot holds a region of the job whose shared state is `shared`. Called by the thread
    /// that ends that job (or its tests): only it or the region's own drop, on that job's threads, empties
    /// such a slot.
    fn holds_one_of(&self, shared: &crate::dsm::Shared) -> bool {
        self.owner.load(Ordering::Acquire) == std::ptr::from_ref(shared) as usize
            && !self.region.load(Ordering::Acquire).is_null()
    }
}

/// Finds the region that contains `addr`, for the SIGBUS handler: lock-free and allocation-free.
///
/// A slot that is changing, or changed while it was read, is passed over: it is not the region of the
/// fault, whose slot stays as it is while the region lives (it was registered before the region was
/// handed out, and is let go only when it is dropped).
pub(crate) fn lookup<'a>(addr: usize) -> Option<&'a RegionShared> {
    for slot in REGISTRY.iter() {
        let Some((start, end, ptr)) = slot.read() else {
            continue;
        };
        if start == 0 || addr < start || addr >= end || ptr.is_null() {
            continue;
        }
        // SAFETY: `start..end` and `ptr` were the slot's together (`read`), so `ptr` is the region that holds
        // `addr`, the address this thread faults on. A published pointer holds a strong count until
        // `unregister`, which happens only when the region is dropped, collectively after a barrier: no
        // access to the region (so no fault on it) is in flight then in a correct program, whichever job
        // of this process frees a region meanwhile, and the address range is made PROT_NONE right after.
        return Some(unsafe { &*ptr });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regions of the job whose shared state is `shared` in the table.
    fn registered_of(shared: &crate::dsm::Shared) -> usize {
        REGISTRY
            .iter()
            .filter(|slot| slot.holds_one_of(shared))
            .count()
    }

    #[test]
    fn regions_leave_the_table_at_the_next_collective_or_while_panicking_with_their_job() {
        let dsm = crate::Dsm::builder().build().unwrap();
        let kept = dsm.alloc_vec::<u64>(512).unwrap();
        let shared = kept.region().inner.shared.clone();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _v = dsm.alloc_vec::<u64>(512).unwrap();
            panic!("a thread of this test unwinds with a region");
        }));
        assert!(unwound.is_err());
        assert_eq!(
            registered_of(&shared),
            2,
            "the unwound region stays for the other ranks"
        );
        drop(kept);
        assert_eq!(
            registered_of(&shared),
            2,
            "a dropped region stays until the rank's next collective operation"
        );
        dsm.barrier().unwrap();
        assert_eq!(registered_of(&shared), 1);
        dsm.finish().unwrap();
        assert_eq!(registered_of(&shared), 0, "left in the table with its job");
    }
}
