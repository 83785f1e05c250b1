//! Shared regions: the arena reserved at the same virtual address in every rank, collective allocation of
//! regions inside it, per-page metadata, and the typed view `GlobalVec`.
//!
//! Memory and metadata are mapped `MAP_NORESERVE` and cost nothing until touched: a region of several GiB
//! is created in microseconds. This module owns the `unsafe` that maps memory and reads or installs page
//! bytes; it never decides coherence (that is `protocol`) and never sends messages (`engine`, `fault`).
//!
//! The parts: the page state bits and the public `Region` handle with its collective drop (here),
//! `mapping` (the arena and fresh anonymous memory), `pages` (a region's page metadata and page bytes),
//! `twins` (release consistency's twins and their memory budget), `sequential` (the read-ahead
//! detector), `registry` (the table the SIGBUS handler searches) and `global_vec` (the typed view).

use crate::error::{DsmError, Result};
use crate::types::{GlobalAddr, PageId, Rank, PAGE_SIZE};
use crate::uffd;
use nix::errno::Errno;
use std::marker::PhantomData;
use std::sync::Arc;

pub(crate) mod atomics;
pub use atomics::AtomicElement;
mod global_vec;
mod mapping;
mod pages;
mod registry;
mod sequential;
mod steps;
mod twins;

pub use global_vec::GlobalVec;
use mapping::map_empty;
pub(crate) use mapping::Arena;
use mapping::ZeroedArray;
pub(crate) use pages::RegionShared;
pub(crate) use registry::{lookup, unregister_all_of};
use registry::{register, unregister};
pub(crate) use sequential::Sequential;
use sequential::ANNOUNCED_RUNS;
pub(crate) use steps::Steps;
use twins::Twins;

/// The memory model of a region, chosen at allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Sequential consistency: single writer / multiple readers; every write is seen everywhere at once.
    #[default]
    Sequential,
    /// Release consistency (home-based lazy): several ranks may write a page at once; writes become visible
    /// to a rank when it acquires (a lock, a barrier) after the writer released. Programs must synchronize
    /// through the job's locks and barriers.
    Release,
}

/// Where the pages of a region have their home (their manager).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Page `i` is homed at rank `i % size`.
    #[default]
    Cyclic,
    /// The region is cut into `size` contiguous blocks, block `r` homed at rank `r`.
    Block,
    /// The region is cut into blocks of this many pages, homed in turn: block `i` (pages `i * n` to
    /// `(i + 1) * n - 1`) at rank `i % size`. The homes share the region as under [`Placement::Cyclic`],
    /// while a sequential reader's fault takes several blocks of a home, each block in one copy. At
    /// least 1; `BlockCyclic(1)` homes pages as `Cyclic` does.
    BlockCyclic(u64),
    /// Every page is homed at one rank.
    At(Rank),
    /// Each page is homed at the rank whose fault reaches it first, read or write (first touch): a
    /// program whose ranks each start by touching the part they will work on has that part homed where
    /// it is used, whatever its shape. A fault takes its own page only, unless a copy into or out of the
    /// region ([`GlobalVec::write_slice`], [`GlobalVec::read_slice`]) announced the run of pages it
    /// touches in order: its first fault then takes the run's untouched pages with it (page by page with
    /// `DSM_READAHEAD=1`). Which rank took a page is recorded by its *directory*, the rank that would be
    /// its home under [`Placement::Block`]; a rank learns a page's home from it once (a round trip when
    /// the directory is another rank), along with the homes of up to 1024 pages after it.
    FirstTouch,
}

impl Placement {
    pub(crate) fn home(self, page: u64, pages: u64, size: usize) -> Rank {
        match self {
            Placement::Cyclic => Rank((page % size as u64) as u32),
            Placement::Block => Rank((page / Placement::band(pages, size)) as u32),
            Placement::BlockCyclic(n) => Rank((page / n.max(1) % size as u64) as u32),
            Placement::At(r) => r,
            // Decided at run time; the region's table holds what this rank knows
            // (`RegionShared::home`).
            Placement::FirstTouch => NOBODY,
        }
    }

    /// The pages of each rank's band under [`Placement::Block`] (the last band may be shorter).
    pub(crate) fn band(pages: u64, size: usize) -> u64 {
        pages.div_ceil(size as u64).max(1)
    }

    /// The rank that records which rank took each page of a first-touch region: the page's home under
    /// [`Placement::Block`], so that ranks touching their own part of a region first find its
    /// directory at home.
    pub(crate) fn directory(page: u64, pages: u64, size: usize) -> Rank {
        Placement::Block.home(page, pages, size)
    }

    pub(crate) fn code(self) -> u64 {
        match self {
            Placement::Cyclic => 1,
            Placement::Block => 2,
            Placement::At(r) => 3 + u64::from(r.0),
            // Above every rank's code (ranks are 32-bit).
            Placement::BlockCyclic(n) => (1 << 33) ^ n,
            // The code `BlockCyclic(0)` would have, which is refused before any code is taken: every
            // other value is some block-cyclic placement's.
            Placement::FirstTouch => 1 << 33,
        }
    }
}

/// The home of a first-touch page that this rank has not learned yet (no rank's fault may have reached
/// it). Never a rank: a message is never sent to it (a fault learns the page's home first), and it
/// compares unequal to every rank.
pub(crate) const NOBODY: Rank = Rank(u32::MAX);

/// The most pages whose homes one question to a first-touch directory learns (`Request::Homes`): 4 KiB
/// of answer.
pub(crate) const LEARN_PAGES: u64 = 1024;

// Local page state, one `AtomicU32` per page per rank.
pub(crate) const INVALID: u32 = 0;
pub(crate) const READ_ONLY: u32 = 1;
pub(crate) const READ_WRITE: u32 = 2;
pub(crate) const STATE_MASK: u32 = 3;
/// A thread of this rank is resolving a fault on the page; others wait for it (coalescing).
pub(crate) const BUSY: u32 = 4;
/// Threads sleep on the word, waiting for BUSY to clear.
pub(crate) const WAITERS: u32 = 8;
/// Release consistency: the page was written in this rank's open interval (it is in the dirty list).
pub(crate) const WRITTEN: u32 = 32;
/// Release consistency: the page has a twin whose diff has not been sent.
pub(crate) const TWINNED: u32 = 64;
/// Release consistency, at a page's home: another rank has fetched the page, so the home's writes to it are
/// tracked (write-protect faults, notices). Until then the home writes it freely: no other copy exists.
pub(crate) const SHARED: u32 = 128;
/// The service loop deferred a leaf request until BUSY clears (the page is being installed here).
pub(crate) const DEFERRED: u32 = 16;
/// Release consistency, at a page's home: listed for the open interval because another rank's diff made
/// the page writable here, with a twin of what the diffs alone left in it; the home's release announces
/// the page only if its bytes differ from the twin (the home's threads wrote it too).
pub(crate) const DIFFED: u32 = 256;
/// Release consistency: twinned and made writable ahead of a write, with the page before it that a write
/// faulted on (`fault::twin_ahead`), and not known to be written since: no write fault has marked it, and
/// no diff of it that carried writes has gone to its home. A release that finds it unchanged leaves it out
/// of its notice.
pub(crate) const AHEAD: u32 = 512;
/// Release consistency: some of the open interval's writes to the page (homed elsewhere) went to its home
/// before the interval closed (a selective release, an acquire's flush), so the release's diff does not
/// carry all of them and the page's barrier update is not sent (`protocol::release::Update`).
pub(crate) const PARTIAL: u32 = 1024;
/// Sequential consistency: the fault that holds BUSY has a grant from the page's home and runs it. The
/// home keeps the page locked for that transaction until its Unlock, so no other transaction's leaf
/// request can reach this rank for the page meanwhile, unless the home ended the transaction early,
/// having taken this rank for failed (`engine::pages`, `defer_or_refuse`).
pub(crate) const GRANTED: u32 = 2048;
/// Sequential consistency: a later writer's invalidation reached this rank while its fault held a grant
/// (GRANTED): the home ended the transaction, and the fault must not install the page.
pub(crate) const REVOKED: u32 = 4096;

// Manager lock word bits.
/// A transaction on the page is in progress.
pub(crate) const LOCKED: u32 = 1;
/// Local threads sleep waiting for the lock.
pub(crate) const LOCK_WAITERS: u32 = 2;
/// The service loop has queued remote requests for the page.
pub(crate) const QUEUED: u32 = 4;

/// A shared region: the same bytes at the same address in every rank.
///
/// Created collectively by [`crate::Dsm::alloc`]; dropping it is collective too: every rank drops it
/// between the same two collective operations. A drop does not wait for the others: the region stays
/// mapped, its pages served to the ranks still using it, until this rank's next collective operation (a
/// barrier, an allocation, or leaving the job), which first waits at a barrier of the region's own so
/// that no rank still uses it, and then unmaps it. A rank that ends on an error therefore never waits in
/// a drop for ranks that wait for it.
#[derive(Debug)]
pub struct Region<'d> {
    pub(crate) inner: Arc<RegionShared>,
    slot: usize,
    _dsm: PhantomData<&'d crate::Dsm>,
}

impl<'d> Region<'d> {
    pub(crate) fn map(inner: Arc<RegionShared>) -> Result<Region<'d>> {
        // SAFETY: the range lies inside the arena reservation owned by this process's Dsm (PROT_NONE so far,
        // holding no data): only that reservation is replaced. Should the mapping fail part-way, the range
        // is left inaccessible and empty, as the reservation was.
        let opened = unsafe { map_empty(Some(inner.base), inner.len) }
            .and_then(|_| uffd::keep_from_children(inner.base, inner.len))
            .map_err(|e| {
                DsmError::sys(
                    format!("mapping a {} byte region at {:#x}", inner.len, inner.base),
                    e,
                )
            });
        let registered = opened
            .and_then(|()| inner.shared.uffd())
            .and_then(|uffd| uffd.register(inner.base, inner.len))
            .and_then(|()| register(&inner));
        match registered {
            Ok(slot) => Ok(Region {
                inner,
                slot,
                _dsm: PhantomData,
            }),
            Err(e) => {
                unmap(&inner);
                Err(e)
            }
        }
    }

    /// The region's address, the same in every rank.
    pub fn addr(&self) -> GlobalAddr {
        GlobalAddr(self.inner.base)
    }

    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the region has no bytes (never: regions have at least one page).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The home rank of a page of this region. Under [`Placement::FirstTouch`], `None` while this rank
    /// has not learned it: no rank may have touched the page yet, or this rank has not asked (it learns
    /// the homes of the pages it touches, and of those after them).
    pub fn home_of(&self, page: PageId) -> Option<Rank> {
        Some(self.inner.home(page.0)).filter(|&h| h != NOBODY)
    }

    /// The base pointer. Accesses through it are coherent shared memory; see [`GlobalVec`] for typed access.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.base as *mut u8
    }

    /// Selective release of the bytes `bytes` (offsets in the region) under release consistency: this
    /// rank's writes to the pages holding them (whole pages: the range is rounded out to them) reach the
    /// pages' homes before it returns. Nothing else of a release happens: no other page is flushed, and no
    /// write notice is made (the next lock release or barrier announces these pages with the others).
    ///
    /// Pair it with [`acquire_range`](Self::acquire_range) of the same range on the reading rank, ordered
    /// after this call by some other means (a tuple, a message, a flag in a region of sequential
    /// consistency): the reader then sees these writes. Only the two ranks are synchronized: a third rank
    /// that later acquires a lock the reader releases does not learn of them (no notice names them yet);
    /// it sees them once it acquires after this rank's next lock release or barrier. Under sequential
    /// consistency it does nothing: every access is coherent already.
    pub fn release_range(&self, bytes: std::ops::Range<usize>) -> Result<()> {
        let Some(pages) = self.pages_of(bytes, "release_range")? else {
            return Ok(());
        };
        crate::rc::release_range(&self.inner.shared, &self.inner, pages)
    }

    /// Selective acquire of the bytes `bytes` (offsets in the region) under release consistency: this
    /// rank's copies of the pages holding them (whole pages), other than pages homed here, are dropped,
    /// so that the next access fetches them from their homes. A reader may rely on seeing every write to
    /// those bytes released before (by a lock release, a barrier or [`release_range`](Self::release_range))
    /// and ordered before this call; it may see more (the pages come whole, with whatever else their homes
    /// hold), and other pages may stay stale until its next lock acquire or barrier. This rank's own
    /// unreleased writes to those pages are sent to their homes first, so they are kept. Under sequential
    /// consistency it does nothing.
    pub fn acquire_range(&self, bytes: std::ops::Range<usize>) -> Result<()> {
        let Some(pages) = self.pages_of(bytes, "acquire_range")? else {
            return Ok(());
        };
        crate::rc::acquire_range(&self.inner.shared, &self.inner, pages)
    }

    /// The pages holding `bytes` of a release-consistency region; `None` when there are none, or the
    /// region is of sequential consistency; an error when the range does not lie within the region.
    fn pages_of(
        &self,
        bytes: std::ops::Range<usize>,
        call: &str,
    ) -> Result<Option<std::ops::Range<u64>>> {
        if bytes.start > bytes.end || bytes.end > self.inner.len {
            return Err(DsmError::InvalidArgument(format!(
                "{call} of bytes {}..{} of a region of {} bytes: give a range within the region",
                bytes.start, bytes.end, self.inner.len
            )));
        }
        if bytes.is_empty() || self.inner.consistency != Consistency::Release {
            return Ok(None);
        }
        let first = (bytes.start / PAGE_SIZE) as u64;
        let end = bytes.end.div_ceil(PAGE_SIZE) as u64;
        Ok(Some(first..end))
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Not a collective drop but a thread unwinding: the other ranks may go on using the region. It
            // stays as it is, its pages served to the others, until the job ends.
            return;
        }
        // No barrier here: the others may be waiting, outside any collective, for what this rank was to
        // write before it dropped the region on its way out of a failed job. The barrier comes with the
        // rank's next collective operation, which a failing rank never calls.
        let retired = Retired {
            region: self.inner.clone(),
            slot: self.slot,
        };
        let shared = &self.inner.shared;
        shared
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(retired);
    }
}

/// A region this rank has dropped, still mapped and served until every rank has dropped it.
#[derive(Debug)]
pub(crate) struct Retired {
    region: Arc<RegionShared>,
    slot: usize,
}

impl Retired {
    /// The region's id: regions are numbered in allocation order.
    pub(crate) fn id(&self) -> u32 {
        self.region.id
    }

    /// Waits until every rank has dropped the region, then unmaps it. After a failed barrier (a dead peer,
    /// or a rank that called another collective) it stays mapped and served until this rank leaves the
    /// job, and the barrier's error is returned: a live rank may still be using it (faulting on the pages
    /// homed here), and this rank's service loop may be serving it.
    pub(crate) fn free(self, shared: &crate::dsm::Shared) -> Result<()> {
        let waited = shared.barrier_once(0xD0_0000 + u64::from(self.region.id));
        if waited.is_err() {
            shared
                .kept
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(self);
            return waited;
        }
        unregister(self.slot);
        shared.forget_region(self.region.id);
        unmap(&self.region);
        waited
    }
}

/// Gives a region's range back to the arena's reservation: `PROT_NONE` memory in place of its pages (which
/// are dropped, with the userfaultfd registration), so that a stray access is a plain segmentation fault.
///
/// Should the kernel refuse (out of memory maps, `vm.max_map_count`, when the arena's mapping must be
/// split), the pages are still dropped, so that their memory comes back; the range stays mapped, and
/// registered until the arena goes.
fn unmap(region: &RegionShared) {
    // SAFETY: the range is this region's mapping inside the arena (no other memory of the process is
    // there); replacing it with PROT_NONE memory keeps the reservation.
    let replaced = unsafe {
        libc::mmap(
            region.base as *mut libc::c_void,
            region.len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if replaced == libc::MAP_FAILED {
        let errno = Errno::last();
        // SAFETY: as above; dropping the range's pages (no thread uses the region any more) changes no
        // mapping.
        unsafe {
            libc::madvise(
                region.base as *mut libc::c_void,
                region.len,
                libc::MADV_DONTNEED,
            )
        };
        tracing::warn!(
            "region {} at {:#x} ({} bytes) could not be unmapped ({errno}): its pages were dropped, and its range stays mapped until the job ends (raise vm.max_map_count, or free fewer, larger regions)",
            region.id,
            region.base,
            region.len
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_spread_pages_as_documented() {
        assert_eq!(Placement::Cyclic.home(5, 10, 3), Rank(2));
        assert_eq!(Placement::Block.home(0, 10, 3), Rank(0));
        assert_eq!(Placement::Block.home(4, 10, 3), Rank(1));
        assert_eq!(Placement::Block.home(9, 10, 3), Rank(2));
        assert_eq!(Placement::At(Rank(1)).home(7, 10, 3), Rank(1));
        // Blocks of 4 pages over 3 ranks: pages 0-3 at rank 0, 4-7 at 1, 8-11 at 2, 12-15 at 0 again.
        let homes: Vec<u32> = (0..17)
            .map(|p| Placement::BlockCyclic(4).home(p, 17, 3).0)
            .collect();
        assert_eq!(homes, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 1]);
        for p in 0..20 {
            assert_eq!(
                Placement::BlockCyclic(1).home(p, 20, 3),
                Placement::Cyclic.home(p, 20, 3)
            );
        }
    }

    #[test]
    fn placements_have_codes_of_their_own() {
        // Ranks that allocate one region with different placements must meet at barriers of different
        // tags (`alloc_tag`), so no two placements share a code.
        let mut placements = vec![Placement::Cyclic, Placement::Block];
        placements.extend((0..256).map(|r| Placement::At(Rank(r))));
        placements
            .extend([1, 2, 3, 16, 256, 1 << 20, 3 << 33, u64::MAX].map(Placement::BlockCyclic));
        placements.push(Placement::FirstTouch);
        let mut codes: Vec<u64> = placements.iter().map(|p| p.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), placements.len());
    }
}
