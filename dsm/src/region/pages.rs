//! A region's pages as the fault path and the service loop see them: the per-page local state and manager
//! records, the read-ahead detectors, and the `unsafe` reads, installs and protections of page bytes.
//! It keeps the state that coherence decisions read and write; the decisions are `protocol`'s.

use super::{
    Consistency, Placement, Sequential, Steps, Twins, ZeroedArray, ANNOUNCED_RUNS, INVALID, NOBODY,
    STATE_MASK,
};
use crate::dsm::Shared;
use crate::error::Result;
use crate::protocol::swmr::{CopySet, Entry, MAX_RANKS};
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd;
use nix::errno::Errno;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// The manager's record of a page, kept at its home: 40 bytes. With the 4-byte local state every rank keeps
/// 44 bytes of metadata per page, touched only for pages in use.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct ManagerSlot {
    pub(crate) lock: AtomicU32,
    /// Owner rank + 1; 0: never touched.
    owner: AtomicU32,
    copyset: [AtomicU64; MAX_RANKS / 64],
}

impl ManagerSlot {
    /// Reads the record. Call with the lock held.
    pub(crate) fn load(&self) -> Entry {
        let o = self.owner.load(Ordering::Relaxed);
        Entry {
            owner: (o != 0).then(|| Rank(o - 1)),
            copyset: CopySet(std::array::from_fn(|i| {
                self.copyset[i].load(Ordering::Relaxed)
            })),
        }
    }

    /// Writes the record. Call with the lock held.
    pub(crate) fn store(&self, e: &Entry) {
        self.owner
            .store(e.owner.map_or(0, |r| r.0 + 1), Ordering::Relaxed);
        for (slot, w) in self.copyset.iter().zip(e.copyset.0) {
            slot.store(w, Ordering::Relaxed);
        }
    }
}

/// Everything about one region that the fault path and the service loop share.
#[derive(Debug)]
pub(crate) struct RegionShared {
    pub(crate) id: u32,
    pub(crate) base: usize,
    pub(crate) len: usize,
    pub(crate) pages: u64,
    pub(crate) placement: Placement,
    pub(crate) uffd: RawFd,
    pub(crate) local: ZeroedArray<AtomicU32>,
    pub(crate) manager: ZeroedArray<ManagerSlot>,
    pub(crate) shared: Arc<Shared>,
    /// Sequential access detectors: for read-ahead from other homes and for first writes of untouched
    /// pages homed elsewhere (one per home in a cyclic or block-cyclic region, whose homes take turns page
    /// by page or block by block, so that a sequential reader or writer is seen as one by each), and for
    /// zero fills of this rank's own untouched pages (kept apart, so that one kind of fault does not reset
    /// another's window).
    readahead: Vec<Sequential>,
    write_ahead: Vec<Sequential>,
    pub(crate) zero_fill: Sequential,
    /// A first-touch region: the home of each page as far as this rank knows it, rank + 1 (0: not known
    /// here yet); at a page's directory, the record of which rank took it. An entry is set once and
    /// never changes. `None` for the other placements, whose homes follow from the page number.
    homes: Option<ZeroedArray<AtomicU32>>,
    /// A first-touch region: the runs of pages whose homes this rank does not know that a copy
    /// announced (`announce`): a first touch at the start of one takes the run's untouched pages.
    pub(crate) first_touch: Sequential,
    pub(crate) consistency: Consistency,
    /// Release consistency: one twin page per page, backed only where used.
    pub(super) twins: Option<Twins>,
    /// Release consistency: pages written in the open interval. Its capacity is the page count and each page
    /// is listed at most once per interval (the WRITTEN bit), so pushing never allocates: the fault handler
    /// pushes.
    pub(crate) dirty: std::sync::Mutex<Vec<u64>>,
}

impl Drop for RegionShared {
    fn drop(&mut self) {
        // The twins' memory goes with the region's mappings: what they kept goes back to the rank's budget.
        if let Some(twins) = &self.twins {
            let kept = twins.kept_count.load(Ordering::Acquire);
            self.shared.twin_budget.fetch_add(kept, Ordering::AcqRel);
        }
    }
}

impl RegionShared {
    pub(crate) fn new(
        id: u32,
        base: usize,
        len: usize,
        placement: Placement,
        consistency: Consistency,
        uffd: RawFd,
        shared: Arc<Shared>,
    ) -> Result<RegionShared> {
        let pages = (len / PAGE_SIZE) as u64;
        let size = shared.size;
        let steps = Steps::of(placement, size);
        let per_home = |remember: bool| -> Vec<Sequential> {
            if steps.interleaved() {
                (0..size)
                    .map(|_| Sequential::new(remember, steps))
                    .collect()
            } else {
                vec![Sequential::new(remember, steps)]
            }
        };
        Ok(RegionShared {
            id,
            base,
            len,
            pages,
            placement,
            uffd,
            // SAFETY: all-zero AtomicU32 is 0 = INVALID, a valid value.
            local: unsafe { ZeroedArray::new(pages as usize)? },
            // SAFETY: all-zero ManagerSlot: unlocked, never touched, empty copyset.
            manager: unsafe { ZeroedArray::new(pages as usize)? },
            shared,
            readahead: per_home(true),
            write_ahead: per_home(false),
            zero_fill: Sequential::new(false, steps),
            homes: match placement {
                // SAFETY: an all-zero AtomicU32 is 0: no home known.
                Placement::FirstTouch => Some(unsafe { ZeroedArray::new(pages as usize)? }),
                _ => None,
            },
            first_touch: Sequential::new(false, Steps::ADJACENT),
            consistency,
            twins: match consistency {
                Consistency::Release => Some(Twins {
                    // SAFETY: an all-zero TwinPage is a page of zeros, a valid value.
                    pages: unsafe { ZeroedArray::new(pages as usize)? },
                    // SAFETY: an all-zero AtomicU64 is 0, a valid value.
                    kept: unsafe { ZeroedArray::new(pages.div_ceil(64) as usize)? },
                    kept_count: AtomicU64::new(0),
                }),
                Consistency::Sequential => None,
            },
            dirty: std::sync::Mutex::new(match consistency {
                Consistency::Release => Vec::with_capacity(pages as usize),
                Consistency::Sequential => Vec::new(),
            }),
        })
    }

    /// The page's home; in a first-touch region, [`NOBODY`] while this rank has not learned it (a
    /// fault learns it before it asks the home anything: `fault::homes`).
    pub(crate) fn home(&self, page: u64) -> Rank {
        match &self.homes {
            None => self.placement.home(page, self.pages, self.shared.size),
            Some(homes) => match homes.as_slice()[page as usize].load(Ordering::Acquire) {
                0 => NOBODY,
                h => Rank(h - 1),
            },
        }
    }

    /// Whether this rank must learn the page's home before a fault on it can ask the home: a
    /// first-touch page whose home it does not know yet.
    pub(crate) fn home_unknown(&self, page: u64) -> bool {
        self.homes.is_some() && self.home(page) == NOBODY
    }

    /// A first-touch page's directory: the rank that records which rank took it.
    pub(crate) fn directory(&self, page: u64) -> Rank {
        Placement::directory(page, self.pages, self.shared.size)
    }

    /// The last page (exclusive) that the directory of `page` also records: its block's end.
    pub(crate) fn directory_end(&self, page: u64) -> u64 {
        let band = Placement::band(self.pages, self.shared.size);
        ((page / band + 1) * band).min(self.pages)
    }

    /// Records that `page` is homed at `home`, as its directory said; returns the home on record, which
    /// is `home` unless another was recorded first (a directory never names two homes for one page, so
    /// then the directory or its message is wrong).
    pub(crate) fn record_home(&self, page: u64, home: Rank) -> Rank {
        let Some(homes) = &self.homes else {
            return self.home(page);
        };
        match homes.as_slice()[page as usize].compare_exchange(
            0,
            home.0 + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => home,
            Err(h) => Rank(h - 1),
        }
    }

    /// At the directory of pages `first..first + count` (inside one directory block): gives `taker`
    /// every page from `first` that no rank has taken, up to `ahead` pages and stopping at the first
    /// taken one, and writes the home of each of the `count` pages (`NOBODY` for one still untaken past
    /// the run) to `out`. `first` itself always has a home afterwards.
    pub(crate) fn take_homes(
        &self,
        first: u64,
        count: u64,
        ahead: u64,
        taker: Rank,
        mut out: impl FnMut(Rank),
    ) {
        let mut taking = true;
        for (k, page) in (first..first + count).enumerate() {
            let known = self.home(page);
            let home = if known != NOBODY {
                taking = false;
                known
            } else if taking && (k as u64) < ahead.max(1) {
                self.record_home(page, taker)
            } else {
                taking = false;
                NOBODY
            };
            out(home);
        }
    }

    /// At a rank that a request for a page's home reached: whether this rank is the page's home. A
    /// first-touch page not yet known here is recorded as homed here: a rank asks a page's home only
    /// after its directory named it, and this rank's own fault may not have read that answer yet.
    pub(crate) fn accept_home(&self, page: u64) -> bool {
        let me = self.shared.me;
        if self.home_unknown(page) {
            return self.record_home(page, me) == me;
        }
        self.home(page) == me
    }

    /// How a page leads to the next one with the same home that read-ahead and write-ahead take: the
    /// next page, every size-th page in a cyclic region, or block after block in a block-cyclic one.
    pub(crate) fn home_steps(&self) -> Steps {
        self.readahead[0].steps
    }

    /// The read-ahead detector for pages homed at `home`; its steps lead from one of them to the next.
    pub(crate) fn readahead_for(&self, home: Rank) -> &Sequential {
        &self.readahead[home.index() % self.readahead.len()]
    }

    /// The write-ahead detector for pages homed at `home`, like [`RegionShared::readahead_for`].
    pub(crate) fn write_ahead_for(&self, home: Rank) -> &Sequential {
        &self.write_ahead[home.index() % self.write_ahead.len()]
    }

    /// The detector that takes an announced run of pages homed at `home` (`write`: to write them): the
    /// first-touch one while the home is not known (the run is this rank's to take: `fault::homes`), the
    /// zero fill for pages homed here, else the home's write-ahead or read-ahead.
    pub(crate) fn announced_to(&self, home: Rank, write: bool) -> &Sequential {
        if home == NOBODY {
            &self.first_touch
        } else if home == self.shared.me {
            &self.zero_fill
        } else if write && self.consistency == Consistency::Sequential {
            // Under release consistency a first write fetches the page as a read does.
            self.write_ahead_for(home)
        } else {
            self.readahead_for(home)
        }
    }

    /// Announces that this thread is about to touch the pages holding bytes `start..end` of the region in
    /// order (`write`: to write them): each run of them with one home is then taken by the fault at its
    /// first page that is not here yet, up to the window's maximum, instead of by a window growing from
    /// one page (a few round trips more for every short copy). Pages homed here that were never touched
    /// are filled with zeros the same way.
    pub(crate) fn announce(&self, start: usize, end: usize, write: bool) {
        if start >= end || end > self.len {
            return;
        }
        let (first, last) = ((start / PAGE_SIZE) as u64, ((end - 1) / PAGE_SIZE) as u64);
        // Only a missing page's fault takes pages with it (an upgrade of a copy here takes none).
        let faults = |p: u64| self.state(p).load(Ordering::Relaxed) & STATE_MASK == INVALID;
        // The pages of `home` from `from` (one of them) up to `to`, in the order its detector follows.
        let announce_run = |home: Rank, from: u64, to: u64| {
            let detector = self.announced_to(home, write);
            let Some(p) = std::iter::successors(Some(from), |&p| Some(detector.steps.page(p, 1)))
                .take_while(|&p| p <= to)
                .find(|&p| faults(p))
            else {
                return;
            };
            detector.announce(p, detector.steps.between(p, to + 1));
        };
        if self.readahead.len() > 1 {
            // Cyclic or block-cyclic: each home has detectors of its own, and its run in the range
            // starts at its first page there, in the range's first `size` runs of pages with one home.
            let mut p = first;
            for _ in 0..self.shared.size {
                if p > last {
                    break;
                }
                let home = self.home(p);
                announce_run(home, p, last);
                p = (p + 1..=last)
                    .find(|&q| self.home(q) != home)
                    .unwrap_or(last + 1);
            }
            return;
        }
        // Blocks: every home's run goes to one detector of each kind, which keeps the first few (the copy
        // reaches them first).
        let mut p = first;
        for _ in 0..ANNOUNCED_RUNS {
            if p > last {
                break;
            }
            // From the page after `p`: a first-touch page's home may be learned between two reads of it
            // (by another thread's fault), and the run must not come out empty.
            let home = self.home(p);
            let next = (p + 1..=last)
                .find(|&q| self.home(q) != home)
                .unwrap_or(last + 1);
            announce_run(home, p, next - 1);
            p = next;
        }
    }

    pub(crate) fn addr(&self, page: u64) -> usize {
        self.base + page as usize * PAGE_SIZE
    }

    pub(crate) fn state(&self, page: u64) -> &AtomicU32 {
        &self.local.as_slice()[page as usize]
    }

    pub(crate) fn slot(&self, page: u64) -> &ManagerSlot {
        &self.manager.as_slice()[page as usize]
    }

    /// Installs `count` pages from `src` at `page`, read-only unless `writable`.
    pub(crate) fn install(
        &self,
        page: u64,
        count: u64,
        src: &[u8],
        writable: bool,
    ) -> Result<(), Errno> {
        assert!(src.len() >= count as usize * PAGE_SIZE);
        // SAFETY: `src` is an ordinary buffer of `count` pages (checked above): a channel buffer or the
        // static zero pages, readable, and not written while the copy reads it.
        unsafe { self.install_through(self.uffd, page, count, src.as_ptr(), writable) }
    }

    /// Installs `count` pages from `src` at `page` through the userfaultfd `fd`: this rank's own, or another
    /// rank's, whose copy of the region sits at the same address (a direct install, `direct.rs`).
    ///
    /// # Safety
    /// `src` is readable for `count` pages without faulting (a buffer, or pages present here) and is not
    /// written until this returns.
    pub(crate) unsafe fn install_through(
        &self,
        fd: RawFd,
        page: u64,
        count: u64,
        src: *const u8,
        writable: bool,
    ) -> Result<(), Errno> {
        assert!(page + count <= self.pages);
        // SAFETY: the destination pages lie inside this region, registered at this address on `fd`: on this
        // rank's userfaultfd, or on another rank's, where the kernel checks the range and writes nothing
        // of this process. The source is the caller's duty.
        unsafe {
            uffd::copy(
                fd,
                self.addr(page),
                src,
                count as usize * PAGE_SIZE,
                !writable,
            )
        }
    }

    /// Sets or clears write protection of `count` pages from `page`.
    pub(crate) fn protect(&self, page: u64, count: u64, on: bool) -> Result<(), Errno> {
        assert!(page + count <= self.pages);
        uffd::write_protect(self.uffd, self.addr(page), count as usize * PAGE_SIZE, on)
    }

    /// Sets write protection of `pages` (in ascending order), one system call per run of neighbours: each
    /// call flushes the TLB of every CPU running a thread of this process, which on a VM costs far more
    /// than the protection itself (docs/ARCHITECTURE.md). On an error, how many of `pages` (from the
    /// first) had been set, and the error.
    pub(crate) fn protect_runs(&self, pages: &[u64], on: bool) -> Result<(), (usize, Errno)> {
        let mut done = 0;
        for (first, len) in runs(pages) {
            self.protect(first, len, on).map_err(|e| (done, e))?;
            done += len as usize;
        }
        Ok(())
    }

    /// [`drop_copies`](Self::drop_copies) of `pages` (in ascending order), one system call per run of
    /// neighbours.
    pub(crate) fn drop_copy_runs(&self, me: Rank, pages: &[u64]) {
        for (first, len) in runs(pages) {
            self.drop_copies(me, first, len);
        }
    }

    /// Drops this rank's (`me`) copies of `count` pages from `page`, with one system call; the caller has
    /// marked them invalid, so that the next access faults and fetches them again. The kernel refuses to
    /// drop locked pages (`EINVAL`): a program that locked its memory after the region was made
    /// (`mlockall` with `MCL_CURRENT`) locked the region's too, which is unlocked, whole, and the drop
    /// tried again. Should the kernel still refuse, the rank ends, saying so: a copy left in place would be
    /// read as it is, stale, for good, since nothing makes a read of a present page fault.
    pub(crate) fn drop_copies(&self, me: Rank, page: u64, count: u64) {
        assert!(page + count <= self.pages);
        let (addr, len) = (self.addr(page), count as usize * PAGE_SIZE);
        let dropped = uffd::discard(addr, len).or_else(|e| match e {
            Errno::EINVAL => {
                uffd::unlock(self.base, self.len)?;
                uffd::discard(addr, len)
            }
            e => Err(e),
        });
        if let Err(e) = dropped {
            let pages = match count {
                1 => format!("page {page}"),
                _ => format!("pages {page}..{}", page + count),
            };
            crate::engine::end_rank(
                me,
                &format!("dropping {pages} of region {} failed: {e}", self.id),
            )
        }
    }

    /// The bytes of a page that is present here and write-protected (or otherwise not being written), for
    /// sending. The protocol guarantees both: callers check the local state first.
    pub(crate) fn present_page(&self, page: u64) -> &[u8] {
        assert!(page < self.pages);
        debug_assert_ne!(
            self.state(page).load(Ordering::Acquire) & STATE_MASK,
            INVALID
        );
        // SAFETY: the page is inside the region's live mapping and present here (the caller checked the state,
        // so reading cannot fault), and it is write-protected, so no store changes it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.addr(page) as *const u8, PAGE_SIZE) }
    }

    /// Release consistency, at the home: the word of `width` bytes (4 or 8) at byte `offset` of a page
    /// present here, zero-extended (`rc::atomic`).
    pub(crate) fn read_word(&self, page: u64, offset: usize, width: usize) -> u64 {
        assert!(
            page < self.pages && offset.is_multiple_of(width) && offset + width <= PAGE_SIZE,
            "a word inside the page, aligned"
        );
        let at = self.addr(page) + offset;
        // SAFETY: the word is inside the page (checked), the page inside the region's live mapping and present
        // here (the caller holds it BUSY and checked its state), so the load cannot fault; it is aligned for
        // its width (checked; pages are aligned). A volatile load through a raw pointer makes no reference to
        // memory that other threads of this rank may write (other words of the page; this one only atomic
        // operations write, the service loop's and the home's threads', each holding the page BUSY as the
        // caller does).
        unsafe {
            match width {
                4 => u64::from((at as *const u32).read_volatile()),
                _ => (at as *const u64).read_volatile(),
            }
        }
    }

    /// Release consistency, at the home: applies a diff to the page, which must be present and writable here.
    pub(crate) fn apply_diff(
        &self,
        page: u64,
        diff: &[u8],
    ) -> std::result::Result<usize, crate::protocol::diff::DiffError> {
        assert!(page < self.pages);
        let base = self.addr(page) as *mut u8;
        crate::protocol::diff::apply_with(diff, |offset, bytes| {
            // SAFETY: `apply_with` passes ranges inside one page (checked before any write); the page is inside
            // the region, present and writable here (the caller made it so), so the writes cannot fault. The
            // copy goes through a raw pointer: no reference to the page exists, because other threads of this
            // rank may write other bytes of it at the same time (a data-race-free program writes different
            // bytes, and byte stores do not disturb their neighbours).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(offset), bytes.len()) }
        })
    }

    /// Copies a present page into `out` while other threads of this rank may be writing some of its bytes
    /// (release consistency: a home answers a fetch while its own threads write the page). A byte written
    /// concurrently may be old or new in the copy; a data-race-free reader never depends on such a byte.
    pub(crate) fn snapshot_page(&self, page: u64, out: &mut [u8]) {
        assert!(page < self.pages && out.len() >= PAGE_SIZE);
        // SAFETY: the page is inside the region and present here (the caller checked its state), so reading
        // cannot fault; the copy goes through raw pointers into a distinct buffer, creating no reference to
        // memory that other threads write.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr(page) as *const u8, out.as_mut_ptr(), PAGE_SIZE)
        };
    }

    /// Copies a present page into `out`.
    pub(crate) fn read_page(&self, page: u64, out: &mut [u8]) {
        out[..PAGE_SIZE].copy_from_slice(self.present_page(page));
    }
}

/// The runs of neighbouring pages in `pages` (ascending), as `(first, count)`.
fn runs(pages: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let &first = pages.get(at)?;
        let len = pages[at..]
            .iter()
            .zip(first..)
            .take_while(|(&p, expected)| p == *expected)
            .count();
        at += len;
        Some((first, len as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_metadata_fits_the_budget() {
        let per_page = std::mem::size_of::<ManagerSlot>() + std::mem::size_of::<AtomicU32>();
        assert!(per_page <= 64, "{per_page} bytes of metadata per page");
    }
}
