//! Release consistency's twins: the copy of a page taken at its first write in an interval, against
//! which the release diffs it, and the budget that decides which twins keep their memory between
//! intervals. A twin is touched only by the thread that holds its page's BUSY bit.

use super::{RegionShared, ZeroedArray};
use crate::types::PAGE_SIZE;
use crate::uffd;
use nix::errno::Errno;
use std::sync::atomic::{AtomicU64, Ordering};

/// A twin: the copy of a page taken at its first write in an interval.
#[repr(C, align(4096))]
pub(crate) struct TwinPage(std::cell::UnsafeCell<[u8; PAGE_SIZE]>);

/// A release-consistency region's twins, and which of them keep their memory once let go.
#[derive(Debug)]
pub(super) struct Twins {
    pub(super) pages: ZeroedArray<TwinPage>,
    /// A bit per page: the page's twin keeps its memory between intervals (counted against the rank's
    /// twin memory, `Shared::twin_budget`).
    pub(super) kept: ZeroedArray<AtomicU64>,
    /// How many bits of `kept` are set: given back to the budget when the region goes.
    pub(super) kept_count: AtomicU64,
}

impl Twins {
    /// The word of `kept` that holds `page`'s bit, and the bit.
    fn kept_bit(&self, page: u64) -> (&AtomicU64, u64) {
        (&self.kept.as_slice()[page as usize / 64], 1 << (page % 64))
    }
}

// SAFETY: a twin is written only by the thread that holds its page's BUSY bit for the page's first write
// fault of an interval, and read only by a thread that holds the same BUSY bit at a release or acquire; BUSY
// makes those accesses exclusive.
unsafe impl Sync for TwinPage {}

impl std::fmt::Debug for TwinPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TwinPage")
    }
}

impl RegionShared {
    /// Release consistency: copies a present page into its twin. Call holding the page's BUSY bit.
    pub(crate) fn make_twin(&self, page: u64) {
        let twin = self.twin_page(page).0.get();
        // SAFETY: the caller holds the page's BUSY bit, so no other thread reads or writes this twin; the
        // source page is present (the caller checked its state) and is 4096 bytes long like the twin.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr(page) as *const u8,
                twin.cast::<u8>(),
                PAGE_SIZE,
            )
        };
    }

    /// Release consistency: the twin of `page`. Call holding the page's BUSY bit.
    pub(crate) fn twin(&self, page: u64) -> &[u8] {
        // SAFETY: the caller holds the page's BUSY bit, so no thread writes the twin while the slice lives.
        unsafe { &*self.twin_page(page).0.get() }
    }

    /// Release consistency: a twin to write (at a home, the twin of a page diffs reached: `DIFFED`). Call
    /// holding the page's BUSY bit.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn twin_mut(&self, page: u64) -> &mut [u8] {
        // SAFETY: the caller holds the page's BUSY bit, so no other thread reads or writes the twin while
        // the slice lives; the twin is 4096 bytes of this region's private shadow mapping.
        unsafe { &mut *self.twin_page(page).0.get() }
    }

    fn twin_page(&self, page: u64) -> &TwinPage {
        let twins = self
            .twins
            .as_ref()
            .expect("twins exist in release-consistency regions");
        &twins.pages.as_slice()[page as usize]
    }

    /// Release consistency: lets a twin go.
    pub(crate) fn drop_twin(&self, page: u64) {
        self.drop_twins(&[page]);
    }

    /// Release consistency: lets the twins of `pages` (held BUSY) go. A twin keeps its memory for the
    /// page's next twin while the rank's twin memory allows (`DsmBuilder::twin_memory`): made again in
    /// memory that stayed, a twin costs a copy; in memory given back, a page fault and a zeroed page first,
    /// and a `madvise` to give it back again. Past the budget the memory goes back to the system, one call
    /// per run of neighbouring pages (their twins are neighbours too).
    pub(crate) fn drop_twins(&self, pages: &[u64]) {
        self.let_twins_go(pages, true);
    }

    /// Release consistency: gives back the memory of the twins of `pages` (held BUSY, in increasing
    /// order) whatever the budget, and keeps it no more: pages twinned ahead of writes that did not come,
    /// which `fault::twin_ahead`, guessing from kept twins, should not twin ahead again.
    pub(crate) fn forget_twins(&self, pages: &[u64]) {
        self.let_twins_go(pages, false);
    }

    fn let_twins_go(&self, pages: &[u64], keep: bool) {
        let Some(twins) = &self.twins else { return };
        let give_back = |(first, n): (u64, usize)| {
            let addr = twins.pages.as_slice()[first as usize].0.get() as usize;
            // Memory a program locked after the region was made (`mlockall`) is unlocked, as the
            // region's is (`drop_copies`). A twin that stays is only memory not given back.
            if uffd::discard(addr, n * PAGE_SIZE) == Err(Errno::EINVAL) {
                let all = twins.pages.as_slice();
                let _ = uffd::unlock(all.as_ptr() as usize, std::mem::size_of_val(all))
                    .and_then(|()| uffd::discard(addr, n * PAGE_SIZE));
            }
        };
        // The open run of twins whose memory goes back: its first page and length.
        let mut run: Option<(u64, usize)> = None;
        for &page in pages {
            let kept = if keep {
                self.keep_twin(twins, page)
            } else {
                self.unkeep_twin(twins, page);
                false
            };
            if kept {
                continue;
            }
            run = match run {
                Some((first, n)) if first + n as u64 == page => Some((first, n + 1)),
                other => {
                    other.map(give_back);
                    Some((page, 1))
                }
            };
        }
        run.map(give_back);
    }

    /// Release consistency: whether the twin of `page` has kept its memory: a twin of it was let go before
    /// (so the page was written in an earlier interval), and the rank's twin memory had room for it.
    pub(crate) fn twin_kept(&self, page: u64) -> bool {
        self.twins.as_ref().is_some_and(|twins| {
            let (word, bit) = twins.kept_bit(page);
            word.load(Ordering::Acquire) & bit != 0
        })
    }

    /// Whether the twin of `page` keeps its memory: it did before, or the rank's twin memory has room for
    /// it (which it then takes).
    fn keep_twin(&self, twins: &Twins, page: u64) -> bool {
        let (word, bit) = twins.kept_bit(page);
        if word.load(Ordering::Acquire) & bit != 0 {
            return true;
        }
        let room = self
            .shared
            .twin_budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if room.is_err() {
            return false;
        }
        if word.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            // Kept meanwhile (the caller holds the page, so not by another twin of it): counted once.
            self.shared.twin_budget.fetch_add(1, Ordering::AcqRel);
        } else {
            twins.kept_count.fetch_add(1, Ordering::AcqRel);
        }
        true
    }

    /// Stops keeping the memory of `page`'s twin, giving its share of the budget back.
    fn unkeep_twin(&self, twins: &Twins, page: u64) {
        let (word, bit) = twins.kept_bit(page);
        if word.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
            twins.kept_count.fetch_sub(1, Ordering::AcqRel);
            self.shared.twin_budget.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{Consistency, Placement, Region, BUSY};

    /// Whether the page of memory at `addr` is resident.
    fn resident(addr: *const u8) -> bool {
        let mut vec = [0u8; 1];
        // SAFETY: `addr` is the page-aligned start of a page of a live mapping of this process; `vec` has
        // room for the one page's answer.
        let r = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE_SIZE, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "mincore: {}", Errno::last());
        vec[0] & 1 == 1
    }

    #[test]
    fn twins_keep_their_memory_up_to_the_rank_s_twin_memory_which_their_region_gives_back() {
        let dsm = crate::Dsm::builder()
            .twin_memory(2 * PAGE_SIZE + 100)
            .build()
            .unwrap();
        let budget = |r: &Region<'_>| r.inner.shared.twin_budget.load(Ordering::Acquire);
        let region = dsm
            .alloc_with(4 * PAGE_SIZE, Placement::Block, Consistency::Release)
            .unwrap();
        let inner = &region.inner;
        assert_eq!(budget(&region), 2, "whole pages");
        // Twins made (as a fault makes them, holding each page's BUSY bit), then let go.
        for page in 0..4 {
            inner.state(page).fetch_or(BUSY, Ordering::AcqRel);
            inner.twin_mut(page).fill(1);
            assert!(resident(inner.twin(page).as_ptr()));
        }
        inner.drop_twins(&[0, 1, 2, 3]);
        let kept: Vec<bool> = (0..4).map(|p| resident(inner.twin(p).as_ptr())).collect();
        assert_eq!(kept, [true, true, false, false]);
        assert_eq!(budget(&region), 0);
        // Made and let go again: the same two keep theirs, counted once.
        for page in 0..4 {
            inner.twin_mut(page).fill(2);
        }
        inner.drop_twins(&[0, 1, 2, 3]);
        let kept: Vec<bool> = (0..4).map(|p| resident(inner.twin(p).as_ptr())).collect();
        assert_eq!(kept, [true, true, false, false]);
        assert_eq!(budget(&region), 0);
        // A twin forgotten (twinned ahead of a write that did not come) gives its memory and budget back.
        assert!(inner.twin_kept(1) && !inner.twin_kept(2));
        inner.forget_twins(&[1]);
        assert!(!inner.twin_kept(1) && !resident(inner.twin(1).as_ptr()));
        assert_eq!(budget(&region), 1);
        for page in 0..4 {
            crate::fault::release_busy(inner, page);
        }
        // A region freed gives its twins' memory back to the rank's budget.
        let shared = inner.shared.clone();
        drop(region);
        dsm.barrier().unwrap();
        assert_eq!(shared.twin_budget.load(Ordering::Acquire), 2);
        dsm.finish().unwrap();
    }
}
