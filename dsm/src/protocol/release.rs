//! Release consistency: home-based lazy release consistency (HLRC), the decisions of one rank.
//!
//! A rank's execution is cut into intervals at releases (lock release, barrier arrival). The first write to
//! a page in an interval is caught by a write-protect fault: a page homed elsewhere gets a twin (a copy to
//! diff against later); a page homed here is written in place (the home's copy is the master). At a release
//! every twinned page is diffed and the diff applied at the page's home before the release completes, every
//! written page is write-protected again, and the interval's pages become a write notice stamped with this
//! rank's vector clock entry. Acquires (a lock grant, a barrier) bring the notices this rank has not seen:
//! it invalidates those pages, except pages homed here (their home copy already holds every released write)
//! and pages only this rank wrote; the next access fetches the whole page from its home. At a barrier, the
//! small diffs of the intervals it closes come along (`Update`), and a page whose every new notice comes
//! with one is brought up to date in place instead (`Acquire::update`). Notices are dropped at barriers,
//! after which every rank has seen every notice issued before them.
//!
//! Between barriers the notices kept by a rank and by a lock's home are bounded (a program that only takes
//! locks would otherwise keep every notice of the job): past the bound, the oldest are forgotten and their
//! intervals recorded in a *horizon*, a vector clock that travels with the remaining notices. An acquirer
//! whose clock does not cover the horizon it receives may have missed forgotten notices, so it drops every
//! cached page of release-consistency regions not homed here, and then counts the horizon as seen.
//!
//! This module decides about intervals, clocks and notices; `marks` holds the rules by which the engine
//! records, per page, what a rank writes between its releases. The engine performs. The test beside this
//! file drives whole jobs of ranks, following both, through random interleavings of writes, reads, locks
//! and barriers against a model of the memory.

use crate::types::Rank;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

pub(crate) mod marks;

/// A page of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageKey {
    /// The region's id.
    pub region: u32,
    /// The page within the region.
    pub page: u64,
}

/// Consecutive pages of one region: `len` pages from `first`. Notices name pages this way: a rank mostly
/// writes whole blocks, so the pages of an interval are a few runs however many they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageRun {
    /// The region's id.
    pub region: u32,
    /// The first page.
    pub first: u64,
    /// How many pages (at least one; `first + len` does not overflow: decoding checks both).
    pub len: u64,
}

impl PageRun {
    /// The page after the last (saturating: decoding refuses runs that overflow, but a run can be built
    /// by hand).
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.len)
    }

    /// Its pages as a range of keys (for ordered maps by page).
    pub fn keys(&self) -> std::ops::Range<PageKey> {
        let key = |page| PageKey {
            region: self.region,
            page,
        };
        key(self.first)..key(self.end())
    }

    /// Its pages, in order.
    pub fn pages(self) -> impl Iterator<Item = PageKey> {
        (self.first..self.end()).map(move |page| PageKey {
            region: self.region,
            page,
        })
    }
}

/// The runs of `pages` (sorted and without repeats; any order still names the same pages, in more runs).
pub fn runs_of(pages: impl IntoIterator<Item = PageKey>) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for k in pages {
        match runs.last_mut() {
            Some(r) if r.region == k.region && r.end() == k.page => r.len += 1,
            _ => runs.push(PageRun {
                region: k.region,
                first: k.page,
                len: 1,
            }),
        }
    }
    runs
}

/// Sorts `runs` and merges those that overlap or touch, so that each page is named once.
fn coalesce(mut runs: Vec<PageRun>) -> Vec<PageRun> {
    runs.sort_unstable();
    let mut out: Vec<PageRun> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(last) if last.region == r.region && r.first <= last.end() => {
                last.len = last.len.max(r.end() - last.first);
            }
            _ => out.push(r),
        }
    }
    out
}

/// Per rank, the number of intervals it has closed that this rank knows of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorClock(pub Vec<u32>);

impl VectorClock {
    /// All zeros for a job of `size` ranks.
    pub fn new(size: usize) -> VectorClock {
        VectorClock(vec![0; size])
    }

    /// Whether the notice's interval is already known.
    pub fn covers(&self, n: &WriteNotice) -> bool {
        self.0.get(n.rank.index()).is_some_and(|&i| i >= n.interval)
    }

    /// Counts `n`'s interval as known.
    pub(crate) fn learn(&mut self, n: &WriteNotice) {
        if let Some(i) = self.0.get_mut(n.rank.index()) {
            *i = (*i).max(n.interval);
        }
    }

    /// Whether every interval `other` counts is counted here too.
    pub fn covers_clock(&self, other: &VectorClock) -> bool {
        other
            .0
            .iter()
            .enumerate()
            .all(|(r, &i)| i == 0 || self.0.get(r).is_some_and(|&mine| mine >= i))
    }

    /// Raises every entry to `other`'s where that is later (entries past this clock's length are ignored:
    /// clocks are as long as the job).
    pub fn merge(&mut self, other: &VectorClock) {
        for (mine, &i) in self.0.iter_mut().zip(&other.0) {
            *mine = (*mine).max(i);
        }
    }

    /// Whether every entry is zero.
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|&i| i == 0)
    }
}

/// What a kept notice is counted as taking, for the bound on notices kept between barriers: the notice
/// and its place in a set, and each run of pages it names.
const NOTICE_BYTES: usize = 160;
const RUN_BYTES: usize = std::mem::size_of::<PageRun>();

/// The memory a rank's write notices, and those of the locks it is the home of, may take between barriers
/// before the oldest are forgotten (`DSM_NOTICE_MEMORY`).
pub const DEFAULT_NOTICE_MEMORY: usize = 8 << 20;

/// The smallest bound accepted (a few dozen notices): small bounds are for tests, which want notices
/// forgotten often.
pub const MIN_NOTICE_MEMORY: usize = 4 << 10;

/// The pages one rank wrote in one interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteNotice {
    /// The writer.
    pub rank: Rank,
    /// The writer's interval, counted from 1.
    pub interval: u32,
    /// The pages written, as runs in order.
    pub runs: Vec<PageRun>,
}

impl WriteNotice {
    /// The pages written, in order.
    pub fn pages(&self) -> impl Iterator<Item = PageKey> + '_ {
        self.runs.iter().flat_map(|r| r.pages())
    }
}

/// Write notices kept by writer and interval: adding one already there, forgetting those a cut covers and
/// finding those a clock lacks each cost a lookup per rank, not a scan of them all (a program that only
/// takes locks gathers notices until its next barrier, and scanning them at every lock operation made
/// such a program quadratic: 4000 lock rounds of two ranks took 47 s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoticeSet {
    /// Per writer (rank index), its notices by interval.
    by_rank: Vec<BTreeMap<u32, WriteNotice>>,
    /// What the notices are counted as taking (`NOTICE_BYTES` each and `RUN_BYTES` per run of pages).
    bytes: usize,
}

fn weight(n: &WriteNotice) -> usize {
    NOTICE_BYTES + n.runs.len() * RUN_BYTES
}

impl NoticeSet {
    /// Adds `n` unless a notice of the same writer and interval is there.
    pub fn insert(&mut self, n: WriteNotice) {
        let r = n.rank.index();
        if self.by_rank.len() <= r {
            self.by_rank.resize_with(r + 1, BTreeMap::new);
        }
        if let std::collections::btree_map::Entry::Vacant(e) = self.by_rank[r].entry(n.interval) {
            self.bytes += weight(&n);
            e.insert(n);
        }
    }

    /// Forgets the notices `cut` covers.
    pub fn forget_covered(&mut self, cut: &VectorClock) {
        for (r, notices) in self.by_rank.iter_mut().enumerate() {
            let Some(&upto) = cut.0.get(r) else { break };
            if notices.first_key_value().is_some_and(|(&i, _)| i <= upto) {
                let kept = match upto.checked_add(1) {
                    Some(from) => notices.split_off(&from),
                    None => BTreeMap::new(),
                };
                self.bytes -= notices.values().map(weight).sum::<usize>();
                *notices = kept;
            }
        }
    }

    /// What the notices kept are counted as taking, in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets every notice, each writer's latest too, raising `horizon` (a clock of the job's length) to
    /// the latest interval forgotten of each writer: for when keeping even the latest takes too much (an
    /// acquirer that has not seen them then drops every cached page). Returns how many were forgotten.
    pub fn forget_all(&mut self, horizon: &mut VectorClock) -> usize {
        let mut forgotten = 0;
        for (r, notices) in self.by_rank.iter_mut().enumerate() {
            if let (Some((&latest, _)), Some(h)) = (notices.last_key_value(), horizon.0.get_mut(r))
            {
                *h = (*h).max(latest);
            }
            forgotten += notices.len();
            notices.clear();
        }
        self.bytes = 0;
        forgotten
    }

    /// While the notices take more than `target` bytes, forgets each writer's oldest in turn, but never a
    /// writer's latest (an acquirer that has not seen the latest interval of a writer would then drop
    /// everything, where the notice lets it drop the few pages it names); raises `horizon` (a clock of the
    /// job's length) to the latest interval forgotten of each writer. Returns how many were forgotten.
    pub fn forget_oldest(&mut self, target: usize, horizon: &mut VectorClock) -> usize {
        let mut forgotten = 0;
        while self.bytes > target {
            let mut any = false;
            for (r, notices) in self.by_rank.iter_mut().enumerate() {
                if self.bytes <= target {
                    break;
                }
                if notices.len() < 2 {
                    continue;
                }
                if let Some((interval, n)) = notices.pop_first() {
                    self.bytes -= weight(&n);
                    if let Some(h) = horizon.0.get_mut(r) {
                        *h = (*h).max(interval);
                    }
                    forgotten += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        forgotten
    }

    /// Raises `horizon` (a clock of the job's length) to the latest interval kept of each writer.
    pub fn raise_over(&self, horizon: &mut VectorClock) {
        for (r, notices) in self.by_rank.iter().enumerate() {
            if let (Some((&latest, _)), Some(h)) = (notices.last_key_value(), horizon.0.get_mut(r))
            {
                *h = (*h).max(latest);
            }
        }
    }

    /// The notices `clock` does not cover, by writer and interval.
    pub fn unseen(&self, clock: &VectorClock) -> Vec<WriteNotice> {
        let mut out = Vec::new();
        for (r, notices) in self.by_rank.iter().enumerate() {
            let seen = clock.0.get(r).copied().unwrap_or(0);
            if let Some(from) = seen.checked_add(1) {
                out.extend(notices.range(from..).map(|(_, n)| n.clone()));
            }
        }
        out
    }

    /// Every notice, by writer and interval.
    pub fn all(&self) -> Vec<WriteNotice> {
        self.by_rank
            .iter()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    /// How many notices are kept.
    pub fn len(&self) -> usize {
        self.by_rank.iter().map(BTreeMap::len).sum()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.by_rank.iter().all(BTreeMap::is_empty)
    }
}

/// What a lock server that is let go of leaves behind, as a horizon for the lock servers made after it:
/// its notices that not every rank has seen (`cut`, the last stable cut, covers the rest) and its own
/// horizon. `None` when every rank has seen all of it: there is nothing to remember.
pub fn left_by_lock(
    mut notices: NoticeSet,
    horizon: &VectorClock,
    cut: Option<&VectorClock>,
) -> Option<VectorClock> {
    if let Some(cut) = cut {
        notices.forget_covered(cut);
    }
    let mut left = horizon.clone();
    notices.raise_over(&mut left);
    (!cut.is_some_and(|c| c.covers_clock(&left))).then_some(left)
}

/// The bytes one rank changed in one page in one interval (the diff its release sent to the page's home,
/// or a home's diff of its own writes against its twin), sent with the rank's barrier arrival and handed
/// by the barrier to every rank, so that a rank holding a clean copy of the page can bring it up to date in
/// place instead of dropping it and fetching it whole again (`Acquire::update`). Only small diffs of the
/// interval a barrier closes travel so; anything else is dropped as before, which is always correct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The writer, and the interval whose notice names the page.
    pub rank: Rank,
    pub interval: u32,
    pub page: PageKey,
    /// Encoded as `protocol::diff` encodes, and checked: never empty.
    pub diff: Vec<u8>,
}

/// A page an acquire brings up to date in place: the indices, in the acquire's updates, of the diffs to
/// apply, which write disjoint bytes (so in any order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageUpdate {
    pub page: PageKey,
    pub diffs: Vec<usize>,
}

/// What the engine does at an acquire, before the acquire returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acquire {
    /// Pages to drop, as runs in order, each page once (`marks::at_drop` says how: a page this rank wrote
    /// too has its writes sent to its home first): the next access fetches the whole page from its home.
    pub invalidate: Vec<PageRun>,
    /// Drop every cached page of release-consistency regions that is not homed here (as for
    /// `invalidate`): notices this rank had not seen were forgotten before they reached it.
    pub everything: bool,
    /// Pages (not homed here, and in no run of `invalidate`) that every notice this acquire takes in
    /// names with an update: a copy here that is clean (`marks::updated`) gets their diffs applied instead
    /// of being dropped; any other copy is dropped as for `invalidate`. In page order.
    pub update: Vec<PageUpdate>,
}

/// Of the pages `updates` name, those that every notice of `taken` naming them names with an update, from
/// that notice alone, and whose updates write disjoint bytes: with the indices of those updates, in page
/// order.
fn updatable(taken: &[&WriteNotice], updates: &[Update]) -> BTreeMap<PageKey, Vec<usize>> {
    let fresh: std::collections::HashSet<(Rank, u32)> =
        taken.iter().map(|n| (n.rank, n.interval)).collect();
    // Per page: the updates of taken-in notices, how many taken-in notices name it, and whether one of
    // them names it without exactly one update.
    let mut pages: BTreeMap<PageKey, (Vec<usize>, usize, bool)> = BTreeMap::new();
    for (i, u) in updates.iter().enumerate() {
        if fresh.contains(&(u.rank, u.interval)) {
            pages.entry(u.page).or_default().0.push(i);
        }
    }
    if pages.is_empty() {
        return BTreeMap::new();
    }
    for n in taken {
        for run in &n.runs {
            for (_, (diffs, named, missing)) in pages.range_mut(run.keys()) {
                *named += 1;
                let with = diffs
                    .iter()
                    .filter(|&&i| updates[i].rank == n.rank && updates[i].interval == n.interval)
                    .count();
                // None, or (from a faulty peer) two for one notice and page: the page is dropped.
                *missing |= with != 1;
            }
        }
    }
    // Each naming notice with its one update, and no update besides (one whose notice does not name its
    // page is counted by no notice above).
    pages
        .into_iter()
        .filter(|(_, (diffs, named, missing))| {
            !missing && *named == diffs.len() && disjoint(diffs.iter().map(|&i| &updates[i].diff))
        })
        .map(|(page, (diffs, _, _))| (page, diffs))
        .collect()
}

/// Whether the diffs write disjoint bytes (a malformed one counts as overlapping).
fn disjoint<'a>(diffs: impl Iterator<Item = &'a Vec<u8>>) -> bool {
    let mut seen = [0u64; crate::types::PAGE_SIZE / 64];
    for d in diffs {
        let Ok(mask) = crate::protocol::diff::written_mask(d) else {
            return false;
        };
        for (s, m) in seen.iter_mut().zip(mask) {
            if *s & m != 0 {
                return false;
            }
            *s |= m;
        }
    }
    true
}

/// Takes the pages of `spared` out of the runs of `invalidate` (in order, each page once), and returns
/// those it took, with their updates, in page order.
fn spare(invalidate: &mut Vec<PageRun>, spared: BTreeMap<PageKey, Vec<usize>>) -> Vec<PageUpdate> {
    if spared.is_empty() {
        return Vec::new();
    }
    let mut kept = Vec::with_capacity(invalidate.len());
    let mut update = Vec::new();
    for run in invalidate.drain(..) {
        let mut first = run.first;
        for (page, diffs) in spared.range(run.keys()) {
            if page.page > first {
                kept.push(PageRun {
                    region: run.region,
                    first,
                    len: page.page - first,
                });
            }
            first = page.page + 1;
            update.push(PageUpdate {
                page: *page,
                diffs: diffs.clone(),
            });
        }
        if run.end() > first {
            kept.push(PageRun {
                region: run.region,
                first,
                len: run.end() - first,
            });
        }
    }
    *invalidate = kept;
    update
}

/// A rank has closed as many intervals as their 32-bit numbers allow (about four billion releases that
/// wrote something): it cannot announce more writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntervalsExhausted;

impl std::fmt::Display for IntervalsExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this rank has made {} releases that wrote shared data, the most one job can announce",
            u32::MAX
        )
    }
}

impl std::error::Error for IntervalsExhausted {}

/// One rank's release-consistency state.
#[derive(Debug, Clone)]
pub struct RcRank {
    me: Rank,
    clock: VectorClock,
    /// Notices known here since the last barrier, this rank's own included.
    known: NoticeSet,
    /// Per lock this rank released lately, its clock when it passed its notices on through that lock:
    /// the lock's home has every notice that clock covers (or every rank has seen it), so the next release
    /// through that lock passes only what is newer.
    passed: HashMap<u64, VectorClock>,
    /// This rank's own notices since the last barrier.
    own: Vec<WriteNotice>,
    /// What `own` takes, counted as in `NoticeSet`.
    own_bytes: usize,
    /// The cut of the last barrier this rank completed (see `barrier_done`).
    last_cut: Option<VectorClock>,
    /// Per writer, the latest interval that this rank counts as seen but whose notice it may no longer
    /// pass on (forgotten here, or never received because the rank it came from had forgotten it). Passed
    /// on with the notices, so that acquirers who have not seen those intervals drop every cached page.
    horizon: VectorClock,
    /// The latest of this rank's own intervals forgotten from `own` (sent with the barrier arrival).
    own_horizon: u32,
    /// The bytes `known`, and `own`, may take before their oldest notices are forgotten.
    notice_memory: usize,
    /// Notices forgotten since `take_forgotten` was last called (for statistics).
    forgotten: usize,
}

impl RcRank {
    /// The state of `me` in a job of `size` ranks.
    pub fn new(me: Rank, size: usize) -> RcRank {
        RcRank {
            me,
            clock: VectorClock::new(size),
            known: NoticeSet::default(),
            passed: HashMap::new(),
            own: Vec::new(),
            own_bytes: 0,
            last_cut: None,
            horizon: VectorClock::new(size),
            own_horizon: 0,
            notice_memory: DEFAULT_NOTICE_MEMORY,
            forgotten: 0,
        }
    }

    /// How many notices were forgotten (to bound their memory) since the last call.
    pub fn take_forgotten(&mut self) -> usize {
        std::mem::take(&mut self.forgotten)
    }

    /// Bounds the notices kept between barriers to `bytes` (counted as the engine counts them), each of
    /// `known` and `own`. Each writer's latest notice is always kept (so a list goes over the bound only
    /// when those alone take more).
    pub fn with_notice_memory(mut self, bytes: usize) -> RcRank {
        self.notice_memory = bytes;
        self
    }

    /// Forgets the oldest notices while `known` or `own` take more than the bound allows, down to half of
    /// it (so that forgetting happens once per many intervals). Returns how many were forgotten.
    fn bound_notices(&mut self) -> usize {
        let mut forgotten = 0;
        if self.known.bytes() > self.notice_memory {
            forgotten += self
                .known
                .forget_oldest(self.notice_memory / 2, &mut self.horizon);
        }
        if self.own_bytes > self.notice_memory {
            let mut drop = 0;
            let mut left = self.own_bytes;
            while left > self.notice_memory / 2 && drop + 1 < self.own.len() {
                left -= weight(&self.own[drop]);
                drop += 1;
            }
            if drop > 0 {
                self.own_horizon = self.own_horizon.max(self.own[drop - 1].interval);
                self.own.drain(..drop);
                self.own_bytes = left;
                forgotten += drop;
            }
        }
        forgotten
    }

    /// See `horizon`: sent with the notices of every lock release.
    pub fn horizon(&self) -> &VectorClock {
        &self.horizon
    }

    /// The horizon of this rank's own notices, sent with its barrier arrival: only its own entry can be
    /// set (a barrier brings every rank's own notices since the last barrier).
    pub fn own_horizon(&self) -> VectorClock {
        let mut h = VectorClock::new(self.clock.0.len());
        h.0[self.me.index()] = self.own_horizon;
        h
    }

    /// This rank's vector clock.
    pub fn clock(&self) -> &VectorClock {
        &self.clock
    }

    /// Closes the interval at a release, with the pages written in it (the engine records them as `marks`
    /// says). Returns the notice, or `None` when nothing was written.
    pub fn close_interval(
        &mut self,
        mut pages: Vec<PageKey>,
    ) -> Result<Option<WriteNotice>, IntervalsExhausted> {
        if pages.is_empty() {
            return Ok(None);
        }
        pages.sort_unstable();
        pages.dedup();
        // (A number that wrapped to 0 would be taken for one every rank has seen: its notice ignored.)
        let interval = self.clock.0[self.me.index()]
            .checked_add(1)
            .ok_or(IntervalsExhausted)?;
        self.clock.0[self.me.index()] = interval;
        let notice = WriteNotice {
            rank: self.me,
            interval,
            runs: runs_of(pages),
        };
        self.known.insert(notice.clone());
        self.own_bytes += weight(&notice);
        self.own.push(notice.clone());
        self.forgotten += self.bound_notices();
        Ok(Some(notice))
    }

    /// The notices to hand over with `lock` as this rank releases it, the horizon to pass with them, and
    /// the clock to record with [`RcRank::passed_through`] once they are sent: every notice it knows since
    /// the last barrier, less those it passed through the same lock before (the lock's home keeps them; the
    /// acquirer keeps those its clock does not cover). Earlier intervals always travel with later ones:
    /// vector clocks are sound only if learning a rank's interval k brings its intervals before k along.
    ///
    /// A first release through a lock (or through one of more locks than this rank remembers) would pass
    /// every notice it knows. When those take more than a 32nd of the notice memory, it passes none and a
    /// horizon raised over them instead: an acquirer that has not seen them drops its cached pages, as for
    /// notices forgotten on the way. Passing them all cost a program that cycled through 8192 locks without
    /// barriers 5 ms a lock operation (every release sent, and every lock home stored, up to the whole bound).
    pub fn notices_to_pass(&self, lock: u64) -> (Vec<WriteNotice>, VectorClock, VectorClock) {
        let mut horizon = self.horizon.clone();
        let notices = match self.passed.get(&lock) {
            Some(before) => self.known.unseen(before),
            None if self.known.bytes() <= self.notice_memory / 32 => self.known.all(),
            None => {
                self.known.raise_over(&mut horizon);
                Vec::new()
            }
        };
        (notices, horizon, self.clock.clone())
    }

    /// The notices of `notices_to_pass(lock)` reached the lock's home; `clock` is the one it returned.
    pub fn passed_through(&mut self, lock: u64, clock: VectorClock) {
        /// Locks remembered at most (a program with more distinct locks passes everything for the others).
        const REMEMBERED_LOCKS: usize = 4096;
        if self.passed.len() >= REMEMBERED_LOCKS && !self.passed.contains_key(&lock) {
            self.passed.clear();
        }
        self.passed.insert(lock, clock);
    }

    /// This rank's own notices since the last barrier, to send at barrier arrival.
    pub fn own_notices(&self) -> &[WriteNotice] {
        &self.own
    }

    /// Takes in the notices of a lock grant or a barrier and the horizon that came with them. `droppable`
    /// passes on the parts of a run of pages that this rank would drop: those of its release-consistency
    /// regions, not homed here (the engine clamps a run to its region, so that a run naming pages past
    /// any region costs nothing). Notices this rank issued are skipped.
    /// When the horizon names intervals this rank has not seen, their notices may have been forgotten on
    /// the way: every cached page not homed here is dropped (`Acquire::everything`), and the horizon's
    /// intervals count as seen from then on (and are passed on as part of this rank's horizon).
    ///
    /// `updates` (a barrier's; a lock grant carries none) may spare pages: a page every taken-in notice
    /// that names it names with an update, whose updates write disjoint bytes, goes to `Acquire::update`
    /// instead of `invalidate`. Its copy here then holds everything the notices this rank has seen say
    /// (as any copy it keeps), and the diffs bring the rest: every write of those intervals to the page,
    /// and no write of any other rank since this copy was made that this rank has not seen, since such a
    /// write's notice would name the page without an update. Updates of notices this rank does not take
    /// in (its own, or seen already) are passed over: its copy holds their writes.
    pub fn acquire(
        &mut self,
        notices: &[WriteNotice],
        horizon: &VectorClock,
        updates: &[Update],
        droppable: impl Fn(PageRun, &mut Vec<PageRun>),
    ) -> Acquire {
        let mut out = Acquire::default();
        // This rank's own entry cannot be ahead of its clock (only a faulty peer would say so, and taking
        // it would move this rank's own interval counter).
        let mut others = horizon.clone();
        if let Some(mine) = others.0.get_mut(self.me.index()) {
            *mine = 0;
        }
        if !self.clock.covers_clock(&others) {
            out.everything = true;
            // Only the entries this rank had not seen widen its own horizon: intervals its clock covered
            // already are in `known`, or under its horizon.
            for (r, &h) in others.0.iter().enumerate() {
                if self.clock.0.get(r).is_some_and(|&c| c < h) {
                    self.clock.0[r] = h;
                    self.horizon.0[r] = self.horizon.0[r].max(h);
                }
            }
        }
        let mut named: Vec<PageRun> = Vec::new();
        let mut taken: Vec<&WriteNotice> = Vec::new();
        for n in notices {
            // This rank's own notices are known here already (one this rank never issued could only come
            // from a faulty peer, and learning it would move this rank's own interval counter).
            if n.rank == self.me || self.clock.covers(n) {
                continue;
            }
            self.clock.learn(n);
            self.known.insert(n.clone());
            if !out.everything {
                named.extend_from_slice(&n.runs);
                taken.push(n);
            }
        }
        // Merged first, so that a page named by many notices is looked at once (`droppable` walks a run
        // page by page); its parts of disjoint runs in order are disjoint and in order.
        for run in coalesce(named) {
            droppable(run, &mut out.invalidate);
        }
        if !updates.is_empty() && !out.invalidate.is_empty() {
            let spared = updatable(&taken, updates);
            out.update = spare(&mut out.invalidate, spared);
        }
        self.forgotten += self.bound_notices();
        out
    }

    /// A barrier completed, and this rank has acquired the notices exchanged at it: forgets the notices it
    /// need not send or pass on any more, and returns the cut of the barrier before this one (see below).
    ///
    /// A barrier's cut is, per rank, the latest interval exchanged at it. A later interval may be known
    /// here without having been exchanged (a thread of its rank closed it after its rank arrived, and a
    /// lock brought it here), so the cut is not built from the clock: such a notice stays and travels on.
    ///
    /// This rank's own notices covered by the cut are not sent again at the next barrier. The notices it
    /// passes on with locks are kept one barrier longer: a rank whose thread is still taking this barrier's
    /// notices in may meanwhile learn, through a lock, a later interval of the same writer, and a vector
    /// clock that covers interval k is taken to cover every interval before it. Were the earlier one no
    /// longer passed along with it, that rank's barrier acquire would then skip the earlier one as seen
    /// and keep a stale copy of its pages (seen as a lost increment with three threads per rank taking
    /// locks while one of them calls barriers). When the next barrier completes, every rank has finished
    /// this one, acquire included.
    ///
    /// The returned cut is the one lock homes may use to forget notices, by the same argument: when this
    /// barrier completed, every rank had arrived at it, so every rank had finished the barrier before it,
    /// acquire included, and holds no copy of a page that cut's notices name. (Barriers of one rank are
    /// called one at a time.)
    pub fn barrier_done(
        &mut self,
        exchanged: &[WriteNotice],
        horizon: &VectorClock,
    ) -> Option<VectorClock> {
        let mut cut = VectorClock::new(self.clock.0.len());
        for n in exchanged {
            cut.learn(n);
        }
        // Intervals forgotten before the exchange were dropped everywhere by the barrier's acquire.
        cut.merge(horizon);
        self.own.retain(|n| !cut.covers(n));
        self.own_bytes = self.own.iter().map(weight).sum();
        let stable = self.last_cut.replace(cut);
        if let Some(stable) = &stable {
            self.known.forget_covered(stable);
        }
        stable
    }
}

#[cfg(test)]
mod tests;
