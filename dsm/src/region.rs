//! Shared regions: the arena reserved at the same virtual address in every rank, collective allocation of
//! regions inside it, per-page metadata, and the typed view `GlobalVec`.
//!
//! Memory and metadata are mapped `MAP_NORESERVE` and cost nothing until touched: a region of several GiB
//! is created in microseconds. This module owns the `unsafe` that maps memory and reads or installs page
//! bytes; it never decides coherence (that is `protocol`) and never sends messages (`engine`, `fault`).

use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::protocol::swmr::{CopySet, Entry, MAX_RANKS};
use crate::types::{GlobalAddr, PageId, Rank, PAGE_SIZE};
use crate::uffd;
use nix::errno::Errno;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

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
    /// Every page is homed at one rank.
    At(Rank),
}

impl Placement {
    pub(crate) fn home(self, page: u64, pages: u64, size: usize) -> Rank {
        match self {
            Placement::Cyclic => Rank((page % size as u64) as u32),
            Placement::Block => {
                let per = pages.div_ceil(size as u64).max(1);
                Rank((page / per) as u32)
            }
            Placement::At(r) => r,
        }
    }

    pub(crate) fn code(self) -> u64 {
        match self {
            Placement::Cyclic => 1,
            Placement::Block => 2,
            Placement::At(r) => 3 + u64::from(r.0),
        }
    }
}

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

/// An array of `T` in anonymous `MAP_NORESERVE` memory, zero-initialized by the kernel and backed only
/// where touched. `T` must be valid when all-zero (atomics are).
#[derive(Debug)]
pub(crate) struct ZeroedArray<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the array owns its mapping; `T` is only reachable through `&[T]`, so sharing it is as safe as
// sharing `&[T]`, which needs `T: Sync`.
unsafe impl<T: Sync> Sync for ZeroedArray<T> {}
// SAFETY: the mapping is not tied to a thread.
unsafe impl<T: Send> Send for ZeroedArray<T> {}

/// Maps `len` bytes of fresh private anonymous memory, readable and writable and empty until touched: at
/// `at`, replacing what is there, or where the kernel chooses. In a process that locked its future memory
/// (`mlockall` with `MCL_FUTURE`) an accessible new mapping is locked and filled in at once: a region's
/// pages with zeros before userfaultfd watches them, so that they would never be fetched from their homes,
/// and an array of twins with as many pages as its region. So the mapping is made inaccessible, unlocked
/// (nothing is filled in while it is inaccessible) and only then opened.
///
/// # Safety
/// With `at`, `[at, at + len)` must be memory of this process that nothing uses: it is replaced. Should
/// the call fail after replacing it, the range is left mapped inaccessible and empty.
unsafe fn map_empty(at: Option<usize>, len: usize) -> Result<*mut libc::c_void, Errno> {
    let (addr, fixed) = match at {
        Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: a private anonymous mapping where the kernel chooses (it aliases nothing), or at `at`, which
    // the caller vouches nothing uses.
    let ptr = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    let opened = uffd::unlock(ptr as usize, len).and_then(|()| {
        // SAFETY: the mapping made just above, which holds nothing yet.
        let rc = unsafe { libc::mprotect(ptr, len, libc::PROT_READ | libc::PROT_WRITE) };
        Errno::result(rc).map(drop)
    });
    match opened {
        Ok(()) => Ok(ptr),
        Err(e) => {
            if at.is_none() {
                // SAFETY: the mapping made above, which nothing has seen.
                unsafe { libc::munmap(ptr, len) };
            }
            Err(e)
        }
    }
}

impl<T> ZeroedArray<T> {
    /// # Safety
    /// The all-zero bit pattern must be a valid `T`.
    unsafe fn new(len: usize) -> Result<ZeroedArray<T>> {
        let bytes = (len.max(1) * std::mem::size_of::<T>()).next_multiple_of(PAGE_SIZE);
        // SAFETY: where the kernel chooses: nothing is replaced.
        let ptr = unsafe { map_empty(None, bytes) }
            .map_err(|e| DsmError::sys(format!("mapping {bytes} bytes of page metadata"), e))?;
        Ok(ZeroedArray {
            ptr: ptr.cast(),
            len,
        })
    }

    fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` is a live mapping of at least `len` zero-initialized `T`s (valid per `new`'s contract),
        // page aligned, and only ever accessed through shared references.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        let bytes = (self.len.max(1) * std::mem::size_of::<T>()).next_multiple_of(PAGE_SIZE);
        // SAFETY: unmapping the mapping this value owns; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), bytes) };
    }
}

/// The shared arena: one reservation at the same address in every rank; regions are carved from it in
/// allocation order, so every rank computes the same addresses.
#[derive(Debug)]
pub(crate) struct Arena {
    pub(crate) base: usize,
    pub(crate) size: usize,
    pub(crate) next: usize,
}

impl Arena {
    /// Reserves `size` bytes, at `base` exactly when given (`MAP_FIXED_NOREPLACE`), else where the kernel
    /// chooses. Reserved memory is `PROT_NONE`: a stray access is a plain segmentation fault.
    pub(crate) fn reserve(me: Rank, base: Option<usize>, size: usize) -> Result<Arena> {
        // Address 0 would also be taken for no region at all (the registry's empty slots start at 0).
        if let Some(b) = base.filter(|b| *b == 0 || b % PAGE_SIZE != 0) {
            return Err(DsmError::Config(format!(
                "the arena's base {b:#x} must be a non-zero multiple of the {PAGE_SIZE}-byte page"
            )));
        }
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_NORESERVE
            | if base.is_some() {
                libc::MAP_FIXED_NOREPLACE
            } else {
                0
            };
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; without it the kernel picks a free
        // range. Either way no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                base.unwrap_or(0) as *mut libc::c_void,
                size,
                libc::PROT_NONE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED || base.is_some_and(|b| ptr as usize != b) {
            let errno = Errno::last();
            return Err(DsmError::ArenaUnavailable {
                rank: me,
                addr: GlobalAddr(base.unwrap_or(0)),
                size,
                errno,
            });
        }
        Ok(Arena {
            base: ptr as usize,
            size,
            next: 0,
        })
    }

    /// Takes the next `len` bytes (a multiple of the page size).
    pub(crate) fn carve(&mut self, len: usize) -> Result<usize> {
        if len > self.size - self.next {
            return Err(DsmError::ArenaExhausted {
                requested: len,
                available: self.size - self.next,
                size: self.size,
            });
        }
        let addr = self.base + self.next;
        self.next += len;
        Ok(addr)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the arena's regions are gone (they borrow the Dsm that owns the arena); unmapping the
        // reservation affects no live memory.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
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
    /// pages homed elsewhere (one per home in a cyclic region, whose homes take turns page by page, so that
    /// a sequential reader or writer is seen as one by each), and for zero fills of this rank's own
    /// untouched pages (kept apart, so that one kind of fault does not reset another's window).
    readahead: Vec<Sequential>,
    write_ahead: Vec<Sequential>,
    pub(crate) zero_fill: Sequential,
    pub(crate) consistency: Consistency,
    /// Release consistency: one twin page per page, backed only where used.
    twins: Option<Twins>,
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

/// A detector of sequential faults: the last page covered by a fault, and the window (in pages) that the
/// next fault right after it may cover. With `remember`, it also keeps where the last few runs started and
/// how long they were, and a run that starts where one of them did starts with that one's length: a
/// program that reads the same pages again after every barrier (a neighbour's boundary row, which the
/// barrier invalidated) gets them in one fault instead of a window growing from one page, while a fault
/// anywhere else still starts from one page.
#[derive(Debug)]
pub(crate) struct Sequential {
    pub(crate) last: AtomicU64,
    pub(crate) window: AtomicU32,
    /// The distance between two pages of a run: 1, or the job's size in a cyclic region (read-ahead,
    /// write-ahead and the zero fill alike), where the pages one home holds are every size-th page.
    pub(crate) stride: u64,
    /// The first page of the current run, and how many faults continued it.
    run_start: AtomicU64,
    run_faults: AtomicU32,
    /// Recent runs: their first pages and lengths (a heuristic: updated without a lock).
    runs: Option<[(AtomicU64, AtomicU32); REMEMBERED_RUNS]>,
    next_slot: AtomicU32,
    /// Runs threads announced before touching them ([`Sequential::announce`]): first page and length packed
    /// as `page << 16 | length` (0: none), each taken by the fault that reaches its page; the oldest is
    /// replaced first.
    announced: [AtomicU64; ANNOUNCED_RUNS],
    next_announced: AtomicU32,
    /// The page after the announced run the current run is in (0: none).
    announced_end: AtomicU64,
}

/// How many announced runs a detector keeps: a copy across several homes of a region placed in blocks
/// announces one run per home to the same detector.
pub(crate) const ANNOUNCED_RUNS: usize = 4;

/// How many runs a remembering detector keeps.
pub(crate) const REMEMBERED_RUNS: usize = 4;

impl Sequential {
    pub(crate) fn new(remember: bool, stride: u64) -> Sequential {
        Sequential {
            last: AtomicU64::new(u64::MAX),
            window: AtomicU32::new(1),
            stride: stride.max(1),
            run_start: AtomicU64::new(u64::MAX),
            run_faults: AtomicU32::new(0),
            runs: remember
                .then(|| std::array::from_fn(|_| (AtomicU64::new(u64::MAX), AtomicU32::new(0)))),
            next_slot: AtomicU32::new(0),
            announced: std::array::from_fn(|_| AtomicU64::new(0)),
            next_announced: AtomicU32::new(0),
            announced_end: AtomicU64::new(0),
        }
    }

    /// The window (pages, `page` included, at most `max`) of a fault at `page`, which it records as the
    /// window of the current run.
    ///
    /// An announced run is taken as it is: no further (pages past it may be another rank's to write first,
    /// and a home that filled them with zeros would have to hand each over again). When its first fault
    /// got only part of it (the home served fewer pages), the fault that continues it takes the rest.
    /// Otherwise a fault right after the last one's pages doubles the window, and one anywhere else starts
    /// a run (see [`Sequential::start_run`]).
    pub(crate) fn window_at(&self, page: u64, max: u32) -> u32 {
        let last = self.last.load(Ordering::Relaxed);
        let announced = self.take_announced(page);
        let continuing = last != u64::MAX && page == last.wrapping_add(self.stride);
        let end = self.announced_end.load(Ordering::Relaxed);
        let window = if continuing {
            self.continue_run();
            (self.window.load(Ordering::Relaxed) * 2).min(max)
        } else {
            self.start_run(page, last, max)
        };
        let window = if announced > 0 {
            self.announced_end.store(
                page.saturating_add(u64::from(announced) * self.stride),
                Ordering::Relaxed,
            );
            announced.min(max)
        } else if continuing && end > page {
            u32::try_from((end - page).div_ceil(self.stride))
                .unwrap_or(u32::MAX)
                .min(max)
        } else {
            self.announced_end.store(0, Ordering::Relaxed);
            window
        };
        self.window.store(window, Ordering::Relaxed);
        window
    }

    /// Announces that `pages` pages from `page` (`stride` apart) are about to be touched in order: the
    /// fault at `page` covers them (up to the window's maximum), no fewer and no more, instead of a window
    /// that starts from one page and doubles. The latest [`ANNOUNCED_RUNS`] announcements are kept; they
    /// are hints: one that no fault takes is replaced by later ones, and a fault elsewhere leaves them.
    pub(crate) fn announce(&self, page: u64, pages: u64) {
        if pages > 1 && page < 1 << 47 {
            let slot =
                self.next_announced.fetch_add(1, Ordering::Relaxed) as usize % ANNOUNCED_RUNS;
            self.announced[slot].store(page << 16 | pages.min(0xffff), Ordering::Relaxed);
        }
    }

    /// The length announced for a run from `page`, taken (one fault uses it), or 0.
    pub(crate) fn take_announced(&self, page: u64) -> u32 {
        for slot in &self.announced {
            let a = slot.load(Ordering::Relaxed);
            if a != 0
                && a >> 16 == page
                && slot
                    .compare_exchange(a, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return (a & 0xffff) as u32;
            }
        }
        0
    }

    /// A fault continues the current run.
    pub(crate) fn continue_run(&self) {
        self.run_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// A fault at `page` starts a new run: records the run that ended (from its start to `last`) and
    /// returns the window to start with, at most `max`.
    ///
    /// Only a run that a later fault continued is recorded with its length: it shows the pages were
    /// read. A run of one fault may have fetched pages ahead that nobody read (read-ahead cannot tell), so
    /// it halves what was recorded for its start instead, and a length once learned decays unless runs
    /// keep confirming it; a length recorded from a run mixed up with another thread's also decays.
    pub(crate) fn start_run(&self, page: u64, last: u64, max: u32) -> u32 {
        let start = self.run_start.swap(page, Ordering::Relaxed);
        let continued = self.run_faults.swap(0, Ordering::Relaxed) > 0;
        let Some(runs) = &self.runs else {
            return 1;
        };
        let slot_of = |start: u64| {
            runs.iter()
                .position(|(s, _)| s.load(Ordering::Relaxed) == start)
        };
        if continued && start != u64::MAX && last != u64::MAX && start <= last {
            let len = u32::try_from((last - start) / self.stride + 1).unwrap_or(u32::MAX);
            let slot = slot_of(start).unwrap_or_else(|| {
                self.next_slot.fetch_add(1, Ordering::Relaxed) as usize % REMEMBERED_RUNS
            });
            runs[slot].0.store(start, Ordering::Relaxed);
            runs[slot].1.store(len, Ordering::Relaxed);
        } else if let Some(slot) = slot_of(start) {
            let len = &runs[slot].1;
            len.store(len.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
        }
        slot_of(page).map_or(1, |slot| runs[slot].1.load(Ordering::Relaxed).clamp(1, max))
    }
}

/// A twin: the copy of a page taken at its first write in an interval.
#[repr(C, align(4096))]
pub(crate) struct TwinPage(std::cell::UnsafeCell<[u8; PAGE_SIZE]>);

/// A release-consistency region's twins, and which of them keep their memory once let go.
#[derive(Debug)]
struct Twins {
    pages: ZeroedArray<TwinPage>,
    /// A bit per page: the page's twin keeps its memory between intervals (counted against the rank's
    /// twin memory, `Shared::twin_budget`).
    kept: ZeroedArray<AtomicU64>,
    /// How many bits of `kept` are set: given back to the budget when the region goes.
    kept_count: AtomicU64,
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
        let cyclic = placement == Placement::Cyclic && size > 1;
        let per_home = |remember: bool| -> Vec<Sequential> {
            if cyclic {
                (0..size)
                    .map(|_| Sequential::new(remember, size as u64))
                    .collect()
            } else {
                vec![Sequential::new(remember, 1)]
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
            // The pages homed here are every size-th page of a cyclic region.
            zero_fill: Sequential::new(false, if cyclic { size as u64 } else { 1 }),
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

    pub(crate) fn home(&self, page: u64) -> Rank {
        self.placement.home(page, self.pages, self.shared.size)
    }

    /// The distance from a page to the next one with the same home that read-ahead and write-ahead take:
    /// 1, or the job's size in a cyclic region.
    pub(crate) fn home_stride(&self) -> u64 {
        self.readahead[0].stride
    }

    /// The read-ahead detector for pages homed at `home`; its stride leads from one of them to the next.
    pub(crate) fn readahead_for(&self, home: Rank) -> &Sequential {
        &self.readahead[home.index() % self.readahead.len()]
    }

    /// The write-ahead detector for pages homed at `home`, like [`RegionShared::readahead_for`].
    pub(crate) fn write_ahead_for(&self, home: Rank) -> &Sequential {
        &self.write_ahead[home.index() % self.write_ahead.len()]
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
        // The pages `from..=to`, `stride` apart, all homed at `home`.
        let announce_run = |home: Rank, from: u64, to: u64, stride: u64| {
            let Some(p) = (from..=to).step_by(stride as usize).find(|&p| faults(p)) else {
                return;
            };
            let detector = if home == self.shared.me {
                &self.zero_fill
            } else if write && self.consistency == Consistency::Sequential {
                // Under release consistency a first write fetches the page as a read does.
                self.write_ahead_for(home)
            } else {
                self.readahead_for(home)
            };
            detector.announce(p, (to - p) / stride + 1);
        };
        let stride = self.home_stride();
        if stride > 1 {
            // Cyclic: each of the range's first `stride` pages starts its home's run.
            for p in first..=last.min(first + stride - 1) {
                announce_run(self.home(p), p, last, stride);
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
            let home = self.home(p);
            let next = (p..=last)
                .find(|&q| self.home(q) != home)
                .unwrap_or(last + 1);
            announce_run(home, p, next - 1, 1);
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
        while let Some(&first) = pages.get(done) {
            let len = pages[done..]
                .iter()
                .zip(first..)
                .take_while(|(&p, expected)| p == *expected)
                .count();
            self.protect(first, len as u64, on).map_err(|e| (done, e))?;
            done += len;
        }
        Ok(())
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
fn register(region: &Arc<RegionShared>) -> Result<usize> {
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

fn unregister(index: usize) {
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

    /// The home rank of a page of this region.
    pub fn home_of(&self, page: PageId) -> Rank {
        self.inner.home(page.0)
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

    fn ptr(&self, i: usize) -> *mut T {
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
        let shared = kept.region.inner.shared.clone();
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

    #[test]
    fn a_fault_continuing_an_announced_run_takes_its_rest_and_no_more() {
        let d = Sequential::new(false, 1);
        d.announce(10, 5);
        assert_eq!(d.window_at(10, 1024), 5);
        // The home served only page 10: the next fault, at 11, takes 11 to 14.
        d.last.store(10, Ordering::Relaxed);
        assert_eq!(d.window_at(11, 1024), 4, "past the announced run");
        // The run served whole, a fault right after it grows the window as usual.
        d.last.store(14, Ordering::Relaxed);
        assert_eq!(d.window_at(15, 1024), 8);
        // A cyclic region's detector counts a home's pages, `stride` apart.
        let d = Sequential::new(false, 3);
        d.announce(6, 4); // pages 6, 9, 12, 15
        assert_eq!(d.window_at(6, 1024), 4);
        d.last.store(9, Ordering::Relaxed);
        assert_eq!(d.window_at(12, 1024), 2);
        // A fault elsewhere starts a run of its own.
        d.announce(30, 10);
        assert_eq!(d.window_at(30, 1024), 10);
        d.last.store(30, Ordering::Relaxed);
        assert_eq!(d.window_at(100, 1024), 1);
    }

    #[test]
    fn an_announced_run_is_taken_once_by_the_fault_at_its_first_page() {
        let d = Sequential::new(true, 1);
        assert_eq!(d.take_announced(7), 0);
        // One page is no run: nothing to announce.
        d.announce(7, 1);
        assert_eq!(d.take_announced(7), 0);
        d.announce(7, 40);
        assert_eq!(d.take_announced(8), 0, "a fault elsewhere leaves it");
        assert_eq!(d.take_announced(7), 40);
        assert_eq!(d.take_announced(7), 0, "taken once");
        // The latest few are kept (a copy across several homes of a block-placed region announces one run
        // per home here), and a length past what fits is cut (windows are far shorter).
        d.announce(3, 5);
        for k in 0..ANNOUNCED_RUNS as u64 {
            d.announce(100 + 10 * k, 2 + k);
        }
        assert_eq!(d.take_announced(3), 0, "the oldest was replaced");
        for k in (0..ANNOUNCED_RUNS as u64).rev() {
            assert_eq!(u64::from(d.take_announced(100 + 10 * k)), 2 + k);
        }
        d.announce(0, 1 << 20);
        assert_eq!(d.take_announced(0), 0xffff);
    }

    #[test]
    fn a_remembering_detector_starts_a_run_again_with_its_length_and_others_with_one_page() {
        let d = Sequential::new(true, 1);
        // Starts a run at `page` after one that covered up to `last`; `more` faults continue the new one.
        let run = |page: u64, last: u64, more: u32| {
            let w = d.start_run(page, last, 1024);
            for _ in 0..more {
                d.continue_run();
            }
            w
        };
        // A run over pages 100..=106 (faults at 100, 101 and 103, the last covering 103..=106).
        assert_eq!(run(100, u64::MAX, 2), 1);
        // Random faults elsewhere start with one page, whatever came before.
        assert_eq!(run(5000, 106, 0), 1);
        assert_eq!(run(9000, 5000, 0), 1);
        // The run at 100 again: its length at once.
        assert_eq!(run(100, 9000, 0), 7);
        // That run was one fault (its pages ahead may not have been read): the length halves each time
        // a run at 100 is not continued, and is learned again when one is.
        assert_eq!(run(100, 106, 0), 3);
        assert_eq!(run(100, 102, 0), 1);
        assert_eq!(run(100, 100, 1), 1);
        assert_eq!(run(100, 109, 0), 10);
        // A length once learned does not renew itself: a pass over 1024 pages from 0, then only page
        // 0 read in every phase, fetches fewer pages ahead each time.
        assert_eq!(run(0, 109, 5), 1);
        let mut windows = Vec::new();
        let mut last = 1023;
        for _ in 0..12 {
            let w = run(0, last, 0);
            windows.push(w);
            last = u64::from(w) - 1;
        }
        assert_eq!(windows, [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1]);
        // Only a few runs are kept: after many others, the run at 100 is forgotten.
        let mut last = 0;
        for k in 0..REMEMBERED_RUNS as u64 {
            let start = 20_000 + 100 * k;
            assert_eq!(run(start, last, 1), 1);
            last = start + 1;
        }
        assert_eq!(run(100, last, 0), 1);

        let plain = Sequential::new(false, 1);
        plain.start_run(100, u64::MAX, 1024);
        plain.continue_run();
        assert_eq!(plain.start_run(100, 106, 1024), 1);
    }

    #[test]
    fn placements_spread_pages_as_documented() {
        assert_eq!(Placement::Cyclic.home(5, 10, 3), Rank(2));
        assert_eq!(Placement::Block.home(0, 10, 3), Rank(0));
        assert_eq!(Placement::Block.home(4, 10, 3), Rank(1));
        assert_eq!(Placement::Block.home(9, 10, 3), Rank(2));
        assert_eq!(Placement::At(Rank(1)).home(7, 10, 3), Rank(1));
    }

    #[test]
    fn page_metadata_fits_the_budget() {
        let per_page = std::mem::size_of::<ManagerSlot>() + std::mem::size_of::<AtomicU32>();
        assert!(per_page <= 64, "{per_page} bytes of metadata per page");
    }

    #[test]
    fn a_large_reservation_succeeds_and_carving_checks_space() {
        // Address space only, more of it than the machine has memory.
        let mut arena = Arena::reserve(Rank(0), None, 64 << 30).unwrap();
        let a = arena.carve(4 << 30).unwrap();
        assert_eq!(a, arena.base);
        let err = arena.carve(61 << 30).unwrap_err();
        assert!(matches!(err, DsmError::ArenaExhausted { .. }), "{err}");
        // Another reservation over the same range must be refused, with the address in the message.
        let err = Arena::reserve(Rank(1), Some(arena.base), 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{:#x}", arena.base)),
            "{err}"
        );
    }
}
