//! Whole jobs under release consistency, in random interleavings, against a model of the memory.
//!
//! Ranks write bytes of shared pages, each byte owned by one rank per barrier phase (so writers share pages
//! and words but never bytes: the program is data-race-free), and take a lock around a shared counter. The
//! simulation keeps each rank's page states and marks as the engine does and follows the same rules
//! (`marks`): twins at first writes of pages homed elsewhere, written lists, diffs applied at homes at
//! releases (the home recording them as its own writes), invalidation at acquires (with a flush of this
//! rank's own writes first), whole-page fetches from the home on the next access, and homes writing in
//! place unseen until another rank fetches the page. Checked at every step:
//! - inside the lock, the counter holds the last value written under the lock (no stale read after an
//!   acquire that follows the write's release);
//! - a rank always reads its own writes;
//! - after every barrier, every rank reads every byte's last write (no diff lost).
//!
//! Barrier arrivals carry small diffs as updates (homes' own writes included, diffed against the twin a
//! home makes at its first write to a page others hold), and acquirers bring clean copies up to date
//! with them instead of dropping them; some jobs leave out updates at random, as a barrier past its bound
//! does.
//!
//! Some jobs bound the notices kept between barriers so tightly that ranks and locks forget them all the
//! time, and acquirers behind the horizon drop every cached page. In others, ranks also hand pages over by
//! a selective release and acquire (`Region::release_range`, `acquire_range`), ordered by nothing else:
//! the acquirer must then read every byte of the page whose last write was released (by any release).

use super::marks::{self, AtDiff, AtDrop};
use super::*;
use crate::protocol::diff;
use crate::region::{
    AHEAD, DIFFED, INVALID, PARTIAL, READ_ONLY, READ_WRITE, SHARED, STATE_MASK, TWINNED, WRITTEN,
};
use crate::types::PAGE_SIZE;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// No horizon: nothing forgotten.
const Z: VectorClock = VectorClock(Vec::new());

const COUNTER: usize = 8; // counter `l` (of lock `l`) lives in bytes 8l..8l+8 of the last page
const LOCK_DATA: usize = 64; // byte 64 + l of every page is data written and read only under lock `l`
const LOCKS: usize = 2;

struct Sim {
    ranks: usize,
    pages: usize,
    /// Each page's copy at its home (the home reads and writes it in place).
    master: Vec<Vec<u8>>,
    /// Per rank and page homed elsewhere, the rank's copy.
    local: Vec<Vec<Option<Vec<u8>>>>,
    twin: Vec<Vec<Option<Vec<u8>>>>,
    /// Per rank and page, its state word as the engine keeps it: INVALID, READ_ONLY or READ_WRITE, and
    /// the marks.
    state: Vec<Vec<u32>>,
    /// Per rank, the pages on its written list, in the order listed.
    listed: Vec<Vec<usize>>,
    rc: Vec<RcRank>,
    model: Vec<Vec<u8>>,
    owner: Vec<Vec<usize>>,
    /// Per lock, as the engine's lock server: the union of the notices its holders passed on, and its
    /// horizon.
    lock_notices: Vec<NoticeSet>,
    lock_horizons: Vec<VectorClock>,
    /// The bound on the notices kept by the locks' home (each rank's is in its `RcRank`).
    lock_memory: usize,
    /// One in this many critical sections is followed by the lock's home letting an idle lock server go
    /// (0: never), as the engine's `let_idle_locks_go` does: what the server knew is folded into its home's
    /// `gone` horizon, which the lock's next server starts with.
    let_go_odds: u32,
    gone: Vec<VectorClock>,
    /// Locks whose server was let go and not made again yet.
    absent: Vec<bool>,
    lock_servers_let_go: u64,
    full_invalidations: u64,
    /// Acquires that dropped only the pages their notices named.
    targeted_invalidations: u64,
    /// The cut below which every rank has seen every notice (the engine's `lock_cut`).
    lock_cut: Option<VectorClock>,
    /// One in this many steps that would arrive at a barrier does; the others take a lock instead.
    barrier_odds: u32,
    in_barrier: Vec<bool>,
    counter_model: Vec<u64>,
    checks: u64,
    diffs_applied: u64,
    /// Pages whose writes an acquire sent to their home before dropping them.
    flushed: u64,
    /// Writes by a home to a page no other rank had fetched (not recorded).
    unseen_home_writes: u64,
    /// One in this many steps is a selective handoff (0: none).
    selective_odds: u32,
    /// 1 in this many steps twins a page ahead of writes, as a write fault does beside its page (0: never).
    ahead_odds: u32,
    /// Pages twinned ahead, and of those, left out of a notice unwritten.
    twinned_ahead: u64,
    ahead_spared: u64,
    /// Per rank and page, the bytes it wrote there (homed elsewhere) that no release of its has sent
    /// to the home yet.
    unreleased: Vec<Vec<std::collections::BTreeSet<usize>>>,
    /// Bytes read after a selective acquire, and checked.
    selective_checks: u64,
    /// Pages a home's release left out of its notice: only diffs had written them.
    home_notices_spared: u64,
    /// 1 in this many updates is left out of a barrier (0: no updates at all, as before them).
    update_odds: u32,
    /// Per rank, the updates its barrier arrival carries.
    pending: Vec<Vec<Update>>,
    /// Updates barriers handed over, and pages brought up to date with them.
    updates_sent: u64,
    pages_updated: u64,
    /// Diffs at barriers' releases kept from going as updates: some of their interval's writes went
    /// before (`PARTIAL`).
    partial_withheld: u64,
}

fn with_state(word: u32, state: u32) -> u32 {
    (word & !STATE_MASK) | state
}

/// `droppable` for an acquire: the pages of a run that are not homed here, as runs.
fn not_homed(homed_here: impl Fn(PageKey) -> bool) -> impl Fn(PageRun, &mut Vec<PageRun>) {
    move |run, out| out.extend(runs_of(run.pages().filter(|&k| !homed_here(k))))
}

/// The pages of `runs`, in order.
fn pages_of(runs: &[PageRun]) -> Vec<PageKey> {
    runs.iter().flat_map(|r| r.pages()).collect()
}

fn key(p: usize) -> PageKey {
    PageKey {
        region: 0,
        page: p as u64,
    }
}

impl Sim {
    fn new(ranks: usize, pages: usize, notice_memory: usize, rng: &mut StdRng) -> Sim {
        let mut sim = Sim {
            ranks,
            pages,
            master: vec![vec![0; PAGE_SIZE]; pages],
            local: vec![vec![None; pages]; ranks],
            twin: vec![vec![None; pages]; ranks],
            state: vec![vec![INVALID; pages]; ranks],
            listed: vec![Vec::new(); ranks],
            rc: (0..ranks)
                .map(|r| RcRank::new(Rank(r as u32), ranks).with_notice_memory(notice_memory))
                .collect(),
            model: vec![vec![0; PAGE_SIZE]; pages],
            owner: Vec::new(),
            lock_notices: vec![NoticeSet::default(); LOCKS],
            lock_horizons: vec![VectorClock::new(ranks); LOCKS],
            lock_memory: notice_memory,
            let_go_odds: 0,
            gone: vec![VectorClock::new(ranks); ranks],
            absent: vec![false; LOCKS],
            lock_servers_let_go: 0,
            full_invalidations: 0,
            targeted_invalidations: 0,
            lock_cut: None,
            barrier_odds: 1,
            in_barrier: vec![false; ranks],
            counter_model: vec![0; LOCKS],
            checks: 0,
            diffs_applied: 0,
            flushed: 0,
            unseen_home_writes: 0,
            selective_odds: 0,
            ahead_odds: 0,
            twinned_ahead: 0,
            ahead_spared: 0,
            unreleased: vec![vec![Default::default(); pages]; ranks],
            selective_checks: 0,
            home_notices_spared: 0,
            update_odds: 0,
            pending: vec![Vec::new(); ranks],
            updates_sent: 0,
            pages_updated: 0,
            partial_withheld: 0,
        };
        sim.assign_owners(rng);
        sim
    }

    fn home(&self, p: usize) -> usize {
        p % self.ranks
    }

    fn assign_owners(&mut self, rng: &mut StdRng) {
        self.owner = (0..self.pages)
            .map(|p| {
                (0..PAGE_SIZE)
                    .map(|b| {
                        if (p == self.pages - 1 && b < COUNTER * LOCKS)
                            || (LOCK_DATA..LOCK_DATA + LOCKS).contains(&b)
                        {
                            usize::MAX // a counter, or a lock's data: written only under the lock
                        } else {
                            rng.random_range(0..self.ranks)
                        }
                    })
                    .collect()
            })
            .collect();
    }

    /// A whole-page fetch by rank `r` from the page's home, as the home serves it: from then on the
    /// home's writes to the page are recorded.
    fn fetch(&mut self, r: usize, p: usize) {
        let h = self.home(p);
        let hs = self.state[h][p];
        let hs = if marks::protect_for_fetch(hs) {
            with_state(hs, READ_ONLY)
        } else {
            hs
        };
        let differs = || self.twin[h][p].as_ref() != Some(&self.master[p]);
        let hs = if marks::undiffed_at_fetch(hs, differs) {
            self.twin[h][p] = None;
            hs & !DIFFED
        } else {
            hs
        };
        self.state[h][p] = hs | SHARED;
        self.local[r][p] = Some(self.master[p].clone());
        self.state[r][p] = with_state(self.state[r][p], READ_ONLY);
    }

    fn read(&mut self, r: usize, p: usize, b: usize) -> u8 {
        if self.state[r][p] & STATE_MASK == INVALID {
            if r == self.home(p) {
                // Never touched here: the home installs zeros.
                assert!(self.master[p].iter().all(|&x| x == 0), "home page {p} lost");
                self.state[r][p] = with_state(self.state[r][p], READ_ONLY);
            } else {
                self.fetch(r, p);
            }
        }
        if r == self.home(p) {
            self.master[p][b]
        } else {
            self.local[r][p].as_ref().expect("a valid page has a copy")[b]
        }
    }

    fn write(&mut self, r: usize, p: usize, b: usize, v: u8) {
        let homed = r == self.home(p);
        if self.state[r][p] & STATE_MASK != READ_WRITE {
            self.read(r, p, b); // a write to an invalid page fetches it first
            let s = self.state[r][p];
            if marks::tracked(s, homed) {
                let at = marks::at_write(s, homed);
                if at.list {
                    self.listed[r].push(p);
                }
                let mut s = marks::marked_at_write(s);
                if at.twin {
                    self.twin[r][p] = self.local[r][p].clone();
                    s |= TWINNED;
                }
                if at.home_twin {
                    self.twin[r][p] = Some(self.master[p].clone());
                    s |= DIFFED;
                }
                self.state[r][p] = with_state(s, READ_WRITE);
            } else {
                self.unseen_home_writes += 1;
                self.state[r][p] = with_state(s, READ_WRITE);
            }
        }
        if homed {
            self.master[p][b] = v;
        } else {
            self.local[r][p].as_mut().unwrap()[b] = v;
            self.unreleased[r][p].insert(b);
        }
    }

    /// Sends rank `r`'s writes to page `p` (write-protected, twinned) to its home, which applies them and
    /// records them as its own writes; drops the twin. Returns the diff.
    fn send_diff(&mut self, r: usize, p: usize, selective: bool) -> Vec<u8> {
        let twin = self.twin[r][p]
            .take()
            .expect("a diff of a page without a twin");
        let local = self.local[r][p]
            .as_ref()
            .expect("a diff of a page not here");
        let mut d = Vec::new();
        diff::encode(&twin, local, &mut d);
        self.state[r][p] &= !TWINNED;
        if d.is_empty() {
            return d;
        }
        self.state[r][p] &= !marks::cleared_at_diff();
        let h = self.home(p);
        let hs = self.state[h][p];
        match marks::at_diff(hs, selective) {
            AtDiff::Twin => {
                let mut twin = self.master[p].clone();
                diff::apply(&mut twin, &d).expect("a well-formed diff");
                self.twin[h][p] = Some(twin);
                if marks::at_write(hs, true).list {
                    self.listed[h].push(p);
                }
                self.state[h][p] = with_state(hs | WRITTEN | DIFFED, READ_WRITE);
            }
            AtDiff::Both => {
                let twin = self.twin[h][p].as_mut().expect("a DIFFED page has a twin");
                diff::apply(twin, &d).expect("a well-formed diff");
            }
            AtDiff::Own => {
                if marks::at_write(hs, true).list {
                    self.listed[h].push(p);
                }
                self.twin[h][p] = None;
                self.state[h][p] = with_state((hs | WRITTEN) & !DIFFED, READ_WRITE);
            }
        }
        diff::apply(&mut self.master[p], &d).expect("a well-formed diff");
        self.diffs_applied += 1;
        d
    }

    fn release(&mut self, r: usize) -> Option<WriteNotice> {
        self.release_collecting(r, false).0
    }

    /// A release; at a barrier (`collect`), with the updates its arrival carries: the diffs it sent that
    /// hold the whole interval's writes, and a home's diff of its own writes against its twin.
    fn release_collecting(
        &mut self,
        r: usize,
        collect: bool,
    ) -> (Option<WriteNotice>, Vec<Update>) {
        let listed = std::mem::take(&mut self.listed[r]);
        let mut announced = Vec::new();
        let mut offered = Vec::new();
        for &p in &listed {
            let s = self.state[r][p];
            assert!(s & WRITTEN != 0, "rank {r} lists page {p} unmarked");
            let s = if s & STATE_MASK == READ_WRITE {
                with_state(s, READ_ONLY)
            } else {
                s
            };
            self.state[r][p] = s;
            if marks::diffs_at_release(s) {
                let d = self.send_diff(r, p, false);
                if collect && !d.is_empty() {
                    if marks::whole_interval(s) {
                        offered.push((p, d));
                    } else {
                        self.partial_withheld += 1;
                    }
                }
            }
            assert!(
                self.state[r][p] & TWINNED == 0,
                "rank {r} closes its interval with writes to page {p} unsent"
            );
            let s = self.state[r][p];
            let same = s & DIFFED != 0
                && self.twin[r][p].as_ref().expect("a DIFFED page has a twin") == &self.master[p];
            if collect && s & DIFFED != 0 && !same {
                let mut d = Vec::new();
                diff::encode(self.twin[r][p].as_ref().unwrap(), &self.master[p], &mut d);
                offered.push((p, d));
            }
            if marks::announced_at_release(s, same) {
                announced.push(p);
            } else if s & AHEAD != 0 {
                self.ahead_spared += 1;
            } else {
                self.home_notices_spared += 1;
            }
            if s & DIFFED != 0 {
                self.twin[r][p] = None;
            }
            self.state[r][p] &= !marks::cleared_at_release(false);
            self.unreleased[r][p].clear();
        }
        let notice = self.rc[r]
            .close_interval(announced.iter().copied().map(key).collect())
            .unwrap();
        let updates = match &notice {
            Some(n) => offered
                .into_iter()
                .map(|(p, d)| {
                    assert!(announced.contains(&p), "an update of page {p}, unannounced");
                    Update {
                        rank: Rank(r as u32),
                        interval: n.interval,
                        page: key(p),
                        diff: d,
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        (notice, updates)
    }

    fn acquire(&mut self, r: usize, notices: &[WriteNotice], horizon: &VectorClock) {
        self.acquire_with(r, notices, horizon, &[]);
    }

    /// An acquire with a barrier's updates: the clean copies it may bring up to date are, as the engine
    /// does (`marks::updated`); the others are dropped.
    fn acquire_with(
        &mut self,
        r: usize,
        notices: &[WriteNotice],
        horizon: &VectorClock,
        updates: &[Update],
    ) {
        let ranks = self.ranks;
        let a = self.rc[r].acquire(
            notices,
            horizon,
            updates,
            not_homed(|k| k.page as usize % ranks == r),
        );
        for u in &a.update {
            let p = u.page.page as usize;
            assert_ne!(self.home(p), r, "rank {r} updates page {p}, homed here");
            let s = self.state[r][p];
            if !marks::updated(s) {
                self.drop_copy(r, p);
                continue;
            }
            let mut copy = self.local[r][p].clone().expect("a clean copy is here");
            for &i in &u.diffs {
                diff::apply(&mut copy, &updates[i].diff).expect("a well-formed update");
            }
            self.twin[r][p] = Some(copy.clone());
            self.local[r][p] = Some(copy);
            self.listed[r].push(p);
            self.state[r][p] = with_state(s | WRITTEN | TWINNED | AHEAD, READ_WRITE);
            self.pages_updated += 1;
        }
        let mut invalidate = pages_of(&a.invalidate);
        if !a.everything && !invalidate.is_empty() {
            self.targeted_invalidations += 1;
        }
        if a.everything {
            self.full_invalidations += 1;
            invalidate = (0..self.pages)
                .filter(|&p| self.home(p) != r && self.state[r][p] & STATE_MASK != INVALID)
                .map(key)
                .collect();
        }
        for k in &invalidate {
            self.drop_copy(r, k.page as usize);
        }
    }

    /// Drops rank `r`'s copy of page `p` (homed elsewhere), as an acquire does: this rank's unsent writes
    /// to it go to the home first.
    fn drop_copy(&mut self, r: usize, p: usize) {
        assert_ne!(self.home(p), r, "rank {r} drops page {p}, homed here");
        match marks::at_drop(self.state[r][p]) {
            AtDrop::Absent => return,
            AtDrop::FlushThenDiscard => {
                self.state[r][p] = with_state(self.state[r][p], READ_ONLY);
                if !self.send_diff(r, p, false).is_empty() {
                    self.state[r][p] |= marks::partial_after_flush();
                }
                self.unreleased[r][p].clear();
                self.flushed += 1;
            }
            AtDrop::Discard => {}
        }
        assert!(
            self.twin[r][p].is_none(),
            "dropping a page whose writes were not sent"
        );
        self.local[r][p] = None;
        self.state[r][p] = with_state(self.state[r][p], INVALID);
    }

    /// Rank `r` twins page `p` ahead of a write, as a write fault does to the pages after its own
    /// (`fault::twin_ahead`): homed elsewhere, present read-only, not written in the interval.
    fn twin_ahead(&mut self, r: usize, p: usize) {
        let s = self.state[r][p];
        if self.home(p) == r || !marks::ahead(s) {
            return;
        }
        self.listed[r].push(p);
        self.twin[r][p] = self.local[r][p].clone();
        self.state[r][p] = with_state(s | WRITTEN | TWINNED | AHEAD, READ_WRITE);
        self.twinned_ahead += 1;
    }

    /// A selective release of page `p` by rank `r`, as the engine's `release_range`: unsent writes go to
    /// the home (write-protected first), and the page stays written and listed.
    fn release_page(&mut self, r: usize, p: usize) {
        if self.home(p) == r {
            return;
        }
        let s = self.state[r][p];
        if marks::diffs_at_release(s) {
            self.state[r][p] = if s & STATE_MASK == READ_WRITE {
                with_state(s, READ_ONLY)
            } else {
                s
            };
            if !self.send_diff(r, p, true).is_empty() {
                self.state[r][p] |= marks::partial_after_flush();
            }
        }
        self.state[r][p] &= !marks::cleared_at_release(true);
        self.unreleased[r][p].clear();
    }

    /// Rank `r` releases page `p` selectively, and rank `q` (ordered after it by other means) acquires it
    /// selectively and reads its bytes: each one whose last write was released reads as written.
    fn selective_handoff(&mut self, r: usize, q: usize, p: usize) {
        self.release_page(r, p);
        if self.home(p) != q {
            self.drop_copy(q, p);
        }
        for b in 0..PAGE_SIZE {
            let pending = (0..self.ranks).any(|w| w != q && self.unreleased[w][p].contains(&b));
            if !pending {
                let got = self.read(q, p, b);
                assert_eq!(
                    got, self.model[p][b],
                    "rank {q} reads page {p} byte {b} after a selective handoff from rank {r}"
                );
                self.selective_checks += 1;
            }
        }
    }

    fn check(&mut self, r: usize, p: usize, b: usize) {
        let got = self.read(r, p, b);
        assert_eq!(got, self.model[p][b], "rank {r} reads page {p} byte {b}");
        self.checks += 1;
    }

    fn counter(&mut self, r: usize, lock: usize) -> u64 {
        let p = self.pages - 1;
        u64::from_le_bytes(std::array::from_fn(|i| self.read(r, p, COUNTER * lock + i)))
    }

    /// One step of rank `r`.
    fn step(&mut self, r: usize, rng: &mut StdRng) {
        if self.in_barrier[r] {
            return;
        }
        if self.selective_odds > 0 && rng.random_range(0..self.selective_odds) == 0 {
            let q = rng.random_range(0..self.ranks);
            if !self.in_barrier[q] {
                let p = rng.random_range(0..self.pages);
                self.selective_handoff(r, q, p);
            }
            return;
        }
        if self.ahead_odds > 0 && rng.random_range(0..self.ahead_odds) == 0 {
            let p = rng.random_range(0..self.pages);
            self.twin_ahead(r, p);
        }
        match rng.random_range(0..10) {
            0..=4 => {
                // Write one of my bytes.
                let p = rng.random_range(0..self.pages);
                let b = rng.random_range(0..PAGE_SIZE);
                if self.owner[p][b] == r {
                    let v: u8 = rng.random();
                    self.write(r, p, b, v);
                    self.model[p][b] = v;
                }
            }
            5..=6 => {
                // Read one of my bytes back.
                let p = rng.random_range(0..self.pages);
                let b = rng.random_range(0..PAGE_SIZE);
                if self.owner[p][b] == r {
                    self.check(r, p, b);
                }
            }
            7..=8 => self.critical_section(r, rng),
            _ if self.barrier_odds > 1 && rng.random_range(0..self.barrier_odds) != 0 => {
                self.critical_section(r, rng)
            }
            _ => {
                // Arrive at the barrier (a release, with updates), then wait for the others.
                self.pending[r] = self.release_collecting(r, self.update_odds > 0).1;
                self.in_barrier[r] = true;
                if self.in_barrier.iter().all(|b| *b) {
                    self.complete_barrier(rng);
                }
            }
        }
    }

    /// A critical section of rank `r` on one of the counters.
    fn critical_section(&mut self, r: usize, rng: &mut StdRng) {
        // A critical section on one of the counters. As in the engine, the grant carries the lock's
        // notices that the acquirer's clock does not cover, and the release passes the notices the
        // releaser knows and has not passed through this lock before, which the lock's home adds to
        // its union.
        let lock = rng.random_range(0..LOCKS);
        if std::mem::take(&mut self.absent[lock]) {
            // A new server, as the engine makes one: no notices, the home's horizon of those let go.
            self.lock_notices[lock] = NoticeSet::default();
            self.lock_horizons[lock] = self.gone[lock % self.ranks].clone();
        }
        let clock = self.rc[r].clock().clone();
        let grant = self.lock_notices[lock].unseen(&clock);
        let horizon = self.lock_horizons[lock].clone();
        self.acquire(r, &grant, &horizon);
        let c = self.counter(r, lock);
        assert_eq!(
            c, self.counter_model[lock],
            "rank {r} read a stale counter {lock} after acquiring its lock"
        );
        // The lock's data on every page is as its last holders left it; then some of it changes.
        for p in 0..self.pages {
            let got = self.read(r, p, LOCK_DATA + lock);
            assert_eq!(
                got,
                self.model[p][LOCK_DATA + lock],
                "rank {r} read stale data of lock {lock} on page {p}"
            );
            self.checks += 1;
        }
        let p = rng.random_range(0..self.pages);
        let v: u8 = rng.random();
        self.write(r, p, LOCK_DATA + lock, v);
        self.model[p][LOCK_DATA + lock] = v;
        let p = self.pages - 1;
        for (i, byte) in (c + 1).to_le_bytes().into_iter().enumerate() {
            self.write(r, p, COUNTER * lock + i, byte);
            self.model[p][COUNTER * lock + i] = byte;
        }
        self.counter_model[lock] = c + 1;
        self.release(r);
        let (passed, horizon, clock) = self.rc[r].notices_to_pass(lock as u64);
        // As the engine's lock home: what the last stable cut covers every rank has seen.
        for n in passed {
            if !self.lock_cut.as_ref().is_some_and(|c| c.covers(&n)) {
                self.lock_notices[lock].insert(n);
            }
        }
        self.lock_horizons[lock].merge(&horizon);
        self.rc[r].passed_through(lock as u64, clock);
        // As the engine's lock home (rank `lock % ranks`): past the bound, every lock it homes keeps the
        // newer half of its notices.
        let home = lock % self.ranks;
        let homed: Vec<usize> = (0..LOCKS).filter(|l| l % self.ranks == home).collect();
        let total: usize = homed.iter().map(|&l| self.lock_notices[l].bytes()).sum();
        if total > self.lock_memory {
            for &l in &homed {
                let target = self.lock_notices[l].bytes() / 2;
                self.lock_notices[l].forget_oldest(target, &mut self.lock_horizons[l]);
            }
            // Still over (each writer's latest stays): the largest sets go whole, behind their horizons.
            let mut total: usize = homed.iter().map(|&l| self.lock_notices[l].bytes()).sum();
            let mut largest = homed;
            largest.sort_by_key(|&l| std::cmp::Reverse(self.lock_notices[l].bytes()));
            for l in largest {
                if total <= self.lock_memory {
                    break;
                }
                total -= self.lock_notices[l].bytes();
                self.lock_notices[l].forget_all(&mut self.lock_horizons[l]);
            }
        }
        if self.let_go_odds > 0 && rng.random_range(0..self.let_go_odds) == 0 {
            // Every lock is idle between steps here: any may go, as the engine lets idle ones go.
            let l = rng.random_range(0..LOCKS);
            if !self.absent[l] {
                // As the engine's `let_idle_locks_go`.
                let notices = std::mem::take(&mut self.lock_notices[l]);
                if let Some(left) =
                    left_by_lock(notices, &self.lock_horizons[l], self.lock_cut.as_ref())
                {
                    self.gone[l % self.ranks].merge(&left);
                }
                self.absent[l] = true;
                self.lock_servers_let_go += 1;
            }
        }
        self.checks += 1;
    }

    fn complete_barrier(&mut self, rng: &mut StdRng) {
        let all: Vec<WriteNotice> = (0..self.ranks)
            .flat_map(|r| self.rc[r].own_notices().to_vec())
            .collect();
        let mut horizon = VectorClock::new(self.ranks);
        for r in 0..self.ranks {
            horizon.merge(&self.rc[r].own_horizon());
        }
        let mut updates = Vec::new();
        for r in 0..self.ranks {
            for u in std::mem::take(&mut self.pending[r]) {
                if rng.random_range(0..self.update_odds.max(1)) != 0 {
                    updates.push(u);
                }
            }
        }
        self.updates_sent += updates.len() as u64;
        for r in 0..self.ranks {
            self.acquire_with(r, &all, &horizon, &updates);
        }
        for r in 0..self.ranks {
            // As in the engine: lock homes forget the notices of the barrier before this one.
            if let Some(stable) = self.rc[r].barrier_done(&all, &horizon) {
                for notices in &mut self.lock_notices {
                    notices.forget_covered(&stable);
                }
                self.lock_cut = Some(stable);
            }
            self.in_barrier[r] = false;
        }

        // Everything before the barrier happens before everything after it: every rank sees every byte.
        for r in 0..self.ranks {
            for p in 0..self.pages {
                for b in 0..PAGE_SIZE {
                    self.check(r, p, b);
                }
            }
        }
        self.assign_owners(rng);
    }
}

#[test]
fn a_rank_that_acquires_invalidates_what_others_wrote_except_its_home_pages() {
    let mut a = RcRank::new(Rank(0), 2);
    let mut b = RcRank::new(Rank(1), 2);
    let notice = b.close_interval(vec![key(4), key(3), key(4)]).unwrap();
    let notice = notice.expect("pages were written");
    assert_eq!((notice.rank, notice.interval), (Rank(1), 1));
    assert_eq!(notice.pages().collect::<Vec<_>>(), vec![key(3), key(4)]);
    // Rank 0 is the home of page 4 (even pages here): it keeps it.
    let acq = a.acquire(
        &b.notices_to_pass(0).0,
        &Z,
        &[],
        not_homed(|k| k.page % 2 == 0),
    );
    assert_eq!(pages_of(&acq.invalidate), vec![key(3)]);
    // The same notices again change nothing.
    assert_eq!(
        a.acquire(&b.notices_to_pass(0).0, &Z, &[], not_homed(|_| false)),
        Acquire::default()
    );
    assert_eq!(a.clock().0, vec![0, 1]);
}

#[test]
fn an_acquire_drops_each_page_of_overlapping_runs_once() {
    let run = |first, len| PageRun {
        region: 0,
        first,
        len,
    };
    let notice = |rank, runs| WriteNotice {
        rank: Rank(rank),
        interval: 1,
        runs,
    };
    let mut a = RcRank::new(Rank(0), 3);
    // Two writers' runs overlap (10..20 and 15..30) and touch (30..35).
    let notices = [
        notice(1, vec![run(10, 10), run(30, 5)]),
        notice(2, vec![run(2, 2), run(15, 15)]),
    ];
    let acq = a.acquire(&notices, &Z, &[], not_homed(|k| k.page == 16));
    assert_eq!(
        acq.invalidate,
        vec![run(2, 2), run(10, 6), run(17, 18)],
        "sorted, merged, without the page homed here"
    );
}

#[test]
fn runs_named_by_many_notices_are_walked_once() {
    // A thousand intervals of one writer, each writing the same 2^20 pages (a lock-protected sweep, say):
    // the acquire hands the engine one run to walk, not a thousand.
    let mut a = RcRank::new(Rank(0), 2);
    let notices: Vec<WriteNotice> = (1..=1000)
        .map(|interval| WriteNotice {
            rank: Rank(1),
            interval,
            runs: vec![PageRun {
                region: 3,
                first: 0,
                len: 1 << 20,
            }],
        })
        .collect();
    let calls = std::cell::Cell::new(0);
    let acq = a.acquire(&notices, &Z, &[], |run, out| {
        calls.set(calls.get() + 1);
        out.push(run);
    });
    assert_eq!(calls.get(), 1);
    assert_eq!(
        acq.invalidate,
        vec![PageRun {
            region: 3,
            first: 0,
            len: 1 << 20
        }]
    );
}

#[test]
fn a_page_written_here_and_elsewhere_is_flushed_before_it_is_dropped() {
    // Page 1 is homed at rank 1. Rank 0 writes byte 0 of it (a twin), rank 1 byte 1 (recorded: rank 0
    // fetched the page), then rank 1 releases and rank 0 acquires its notice before releasing.
    let mut sim = Sim::new(2, 2, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    sim.write(0, 1, 0, 7);
    sim.write(1, 1, 1, 9);
    assert_eq!(sim.unseen_home_writes, 0);
    let notice = sim.release(1).expect("the home's write is recorded");
    sim.acquire(0, &[notice], &Z);
    assert_eq!(sim.flushed, 1);
    assert_eq!(sim.master[1][..2], [7, 9], "both writes at the home");
    assert_eq!(
        sim.state[0][1],
        INVALID | WRITTEN | PARTIAL,
        "dropped, still listed for the notice, its write sent before the interval closes"
    );
    assert_eq!(sim.read(0, 1, 1), 9);
    // The release names the page but sends no second diff, since it was not written again.
    let diffs = sim.diffs_applied;
    let notice = sim.release(0).expect("rank 0 wrote page 1");
    assert_eq!(notice.pages().collect::<Vec<_>>(), vec![key(1)]);
    assert_eq!(sim.diffs_applied, diffs);
    // Written again after the flush, in a new interval: a new twin, and a diff of that write alone.
    sim.write(0, 1, 0, 8);
    sim.release(0);
    assert_eq!(sim.master[1][..2], [8, 9]);
}

#[test]
fn a_home_writes_unseen_until_another_rank_fetches_its_page() {
    let mut sim = Sim::new(2, 2, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    sim.write(1, 1, 5, 3);
    assert_eq!(sim.unseen_home_writes, 1);
    assert_eq!(
        sim.release(1),
        None,
        "no copy elsewhere: nothing to announce"
    );
    assert_eq!(sim.read(0, 1, 5), 3);
    assert_eq!(
        sim.state[1][1],
        READ_ONLY | SHARED,
        "the fetch write-protects the home's page"
    );
    sim.write(1, 1, 5, 4);
    assert_eq!(sim.unseen_home_writes, 1);
    let notice = sim.release(1).expect("recorded once shared");
    assert_eq!(sim.read(0, 1, 5), 3, "stale until rank 0 acquires");
    sim.acquire(0, &[notice], &Z);
    assert_eq!(sim.read(0, 1, 5), 4);
}

/// A home's write that leaves a byte as another rank's diff made it is a write all the same: a rank that
/// acquires from the home after it must drop its copy, though the diff's writer, whose release was
/// selective, has made no notice of the page yet.
#[test]
fn a_home_announces_its_write_over_a_selectively_released_diff_even_of_the_same_value() {
    let mut sim = Sim::new(3, 1, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    let (home, writer, reader) = (0, 1, 2);
    assert_eq!(sim.read(reader, 0, 5), 0);
    sim.write(writer, 0, 5, 1);
    sim.release_page(writer, 0);
    // Ordered after the selective release by other means, the home stores the value the byte has.
    assert_eq!(sim.read(home, 0, 5), 1);
    sim.write(home, 0, 5, 1);
    let notice = sim.release(home).expect("the home wrote the page");
    sim.acquire(reader, &[notice], &Z);
    assert_eq!(sim.read(reader, 0, 5), 1, "the reader kept its stale copy");
}

/// A home's write that a fetch caught and the home then undid, on a page another rank's diff made
/// writable there: the home's release must announce the page although its bytes are its twin's again,
/// or the rank that fetched it keeps the undone write after it acquires that release.
#[test]
fn a_home_write_a_fetch_caught_and_the_home_undid_is_announced() {
    let mut sim = Sim::new(3, 1, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    let (home, writer, reader) = (0, 1, 2);
    // The writer's copy write-protects the home's page; its diff then makes it DIFFED there.
    sim.write(writer, 0, 1, 5);
    sim.release(writer);
    assert_ne!(sim.state[home][0] & DIFFED, 0);
    sim.write(home, 0, 0, 1);
    assert_eq!(
        sim.read(reader, 0, 2),
        0,
        "the reader's fetch catches the home's 1"
    );
    assert_eq!(sim.local[reader][0].as_ref().unwrap()[0], 1);
    sim.write(home, 0, 0, 0);
    let notice = sim.release(home).expect("the home wrote the page");
    sim.acquire(reader, &[notice], &Z);
    assert_eq!(
        sim.read(reader, 0, 0),
        0,
        "the reader kept the undone write"
    );
    // Caught by nothing, a write the home undoes is spared as before: its twin says nothing changed.
    sim.write(writer, 0, 1, 6);
    sim.release(writer);
    sim.write(home, 0, 0, 1);
    sim.write(home, 0, 0, 0);
    assert_eq!(sim.release(home), None);
}

/// Runs 60 jobs of 2 to 4 ranks and 1 to 4 pages (the seeds from `first` on), 3000 random steps each
/// after `setup`, and hands each finished job to `each`.
fn sixty_jobs(first: u64, setup: impl Fn(&mut Sim), mut each: impl FnMut(&Sim)) {
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(first + seed);
        let ranks = 2 + (seed % 3) as usize;
        let pages = 1 + (seed % 4) as usize;
        let mut sim = Sim::new(ranks, pages, DEFAULT_NOTICE_MEMORY, &mut rng);
        setup(&mut sim);
        for _ in 0..3000 {
            let r = rng.random_range(0..ranks);
            sim.step(r, &mut rng);
        }
        each(&sim);
    }
}

#[test]
fn randomized_jobs_never_read_stale_data_or_lose_a_diff() {
    let (mut checks, mut diffs, mut flushed, mut unseen, mut spared) = (0, 0, 0, 0, 0);
    sixty_jobs(
        0,
        |_| {},
        |sim| {
            assert_eq!(
                sim.full_invalidations, 0,
                "nothing is forgotten under the default bound"
            );
            checks += sim.checks;
            diffs += sim.diffs_applied;
            flushed += sim.flushed;
            unseen += sim.unseen_home_writes;
            spared += sim.home_notices_spared;
        },
    );
    // Every path is taken: diffs at releases, flushes at acquires, homes' writes before any fetch, homes
    // leaving pages only diffs wrote out of their notices.
    assert!(
        checks > 100_000 && diffs > 1_000 && flushed > 100 && unseen > 10 && spared > 100,
        "checks {checks}, diffs {diffs}, flushed at acquires {flushed}, unseen home writes {unseen}, pages left out of homes' notices {spared}"
    );
}

#[test]
fn randomized_jobs_that_twin_pages_ahead_of_writes_never_read_stale_data() {
    let (mut checks, mut ahead, mut spared, mut diffs) = (0, 0, 0, 0);
    let setup = |sim: &mut Sim| {
        sim.ahead_odds = 2;
        sim.selective_odds = 16;
    };
    sixty_jobs(12000, setup, |sim| {
        checks += sim.checks;
        ahead += sim.twinned_ahead;
        spared += sim.ahead_spared;
        diffs += sim.diffs_applied;
    });
    // Pages are twinned ahead often, some of them written afterwards and some not (left out of notices).
    assert!(
        checks > 50_000 && ahead > 1_000 && spared > 100 && ahead > spared + 100 && diffs > 1_000,
        "checks {checks}, pages twinned ahead {ahead}, of them left out of notices {spared}, diffs {diffs}"
    );
}

#[test]
fn randomized_jobs_whose_barriers_carry_updates_never_read_stale_data() {
    let (mut checks, mut sent, mut updated, mut diffs, mut withheld) = (0, 0, 0, 0, 0);
    let setup = |sim: &mut Sim| {
        // Some updates left out; some pages handed over selectively or flushed at acquires (PARTIAL), some
        // twinned ahead.
        sim.update_odds = 5;
        sim.selective_odds = 16;
        sim.ahead_odds = 8;
    };
    sixty_jobs(15000, setup, |sim| {
        checks += sim.checks;
        sent += sim.updates_sent;
        updated += sim.pages_updated;
        diffs += sim.diffs_applied;
        withheld += sim.partial_withheld;
    });
    assert!(
        checks > 50_000 && sent > 1_000 && updated > 500 && diffs > 1_000 && withheld > 10,
        "checks {checks}, updates handed over {sent}, pages brought up to date {updated}, diffs {diffs}, partial diffs withheld {withheld}"
    );
}

/// A diff that writes `value` at each of `offsets` of a zeroed page.
fn diff_at(offsets: &[usize], value: u8) -> Vec<u8> {
    let twin = vec![0u8; PAGE_SIZE];
    let mut page = twin.clone();
    for &o in offsets {
        page[o] = value;
    }
    let mut d = Vec::new();
    diff::encode(&twin, &page, &mut d);
    d
}

fn update(rank: u32, interval: u32, page: u64, offsets: &[usize]) -> Update {
    Update {
        rank: Rank(rank),
        interval,
        page: key(page as usize),
        diff: diff_at(offsets, rank as u8 + 1),
    }
}

#[test]
fn a_page_is_brought_up_to_date_only_when_every_unseen_notice_of_it_comes_with_disjoint_bytes() {
    // Rank 0 acquires what ranks 1 and 2 wrote; rank 1's interval 1 was a lock's (no updates), its
    // interval 2 and rank 2's interval 1 a barrier's.
    let notices = [
        WriteNotice {
            rank: Rank(1),
            interval: 1,
            runs: runs_of([key(7)]),
        },
        WriteNotice {
            rank: Rank(1),
            interval: 2,
            runs: runs_of([1, 2, 3, 4, 7].map(key)),
        },
        WriteNotice {
            rank: Rank(2),
            interval: 1,
            runs: runs_of([2, 3, 5].map(key)),
        },
    ];
    let updates = [
        update(1, 2, 1, &[8]),
        update(1, 2, 2, &[8, 9]),
        update(2, 1, 2, &[10]),
        update(1, 2, 3, &[8]),
        update(2, 1, 3, &[8]), // the same byte as rank 1's: the order would matter
        update(1, 2, 7, &[8]), // page 7 is named by interval 1 too, with no update
        update(2, 1, 6, &[8]), // page 6 is not named by rank 2's notice
        update(2, 1, 5, &[8]),
    ];
    let mut a = RcRank::new(Rank(0), 3);
    let acq = a.acquire(&notices, &Z, &updates, not_homed(|k| k.page == 5));
    let spared: Vec<(u64, Vec<usize>)> = acq
        .update
        .iter()
        .map(|u| (u.page.page, u.diffs.clone()))
        .collect();
    // Page 5 is homed here (neither dropped nor updated), page 6 named by no notice.
    assert_eq!(spared, vec![(1, vec![0]), (2, vec![1, 2])]);
    assert_eq!(pages_of(&acq.invalidate), [3, 4, 7].map(key).to_vec());

    // Notices seen already bring nothing, their updates included: the copies here hold their writes, and
    // rank 2's updates alone decide.
    let mut b = RcRank::new(Rank(0), 3);
    b.acquire(&notices[..2], &Z, &[], not_homed(|_| false));
    let acq = b.acquire(&notices, &Z, &updates, not_homed(|_| false));
    assert!(acq.invalidate.is_empty(), "{:?}", acq.invalidate);
    let spared: Vec<(u64, Vec<usize>)> = acq
        .update
        .iter()
        .map(|u| (u.page.page, u.diffs.clone()))
        .collect();
    assert_eq!(spared, vec![(2, vec![2]), (3, vec![4]), (5, vec![7])]);
    // The writer itself takes nothing from its own notices.
    let mut c = RcRank::new(Rank(1), 3);
    let acq = c.acquire(&notices[1..2], &Z, &updates, not_homed(|_| false));
    assert_eq!(acq, Acquire::default());
}

#[test]
fn randomized_jobs_that_hand_pages_over_selectively_never_read_stale_data() {
    let (mut checks, mut selective, mut diffs) = (0, 0, 0);
    let setup = |sim: &mut Sim| {
        sim.selective_odds = 8;
        sim.barrier_odds = 4;
    };
    sixty_jobs(9000, setup, |sim| {
        checks += sim.checks;
        selective += sim.selective_checks;
        diffs += sim.diffs_applied;
    });
    // Handoffs happen often, and between them the usual checks (locks, barriers) still hold.
    assert!(
        checks > 50_000 && selective > 1_000_000 && diffs > 1_000,
        "checks {checks}, bytes checked after selective acquires {selective}, diffs {diffs}"
    );
}

#[test]
fn randomized_jobs_whose_lock_homes_let_servers_go_never_read_stale_data() {
    // Lock servers let go after one critical section in three, and made again, with the horizon of what
    // they knew, at the lock's next use. Nothing else is forgotten (the default bound).
    let (mut checks, mut gone, mut full) = (0, 0, 0);
    let setup = |sim: &mut Sim| {
        sim.barrier_odds = 10;
        sim.let_go_odds = 3;
    };
    sixty_jobs(5000, setup, |sim| {
        checks += sim.checks;
        gone += sim.lock_servers_let_go;
        full += sim.full_invalidations;
    });
    assert!(
        checks > 50_000 && gone > 1_000 && full > 100,
        "checks {checks}, lock servers let go {gone}, acquires that dropped everything {full}"
    );
}

#[test]
fn randomized_jobs_that_forget_notices_all_the_time_never_read_stale_data() {
    // A bound of a few notices: ranks and the locks' home forget notices at most releases, and acquirers
    // behind the horizon drop every cached page. Long runs between barriers (barriers are rare here), so
    // that the lock path carries the forgetting.
    let (mut checks, mut full, mut targeted) = (0, 0, 0);
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let ranks = 2 + (seed % 3) as usize;
        let pages = 1 + (seed % 4) as usize;
        let memory = 2 * (NOTICE_BYTES + RUN_BYTES) * (1 + (seed % 3) as usize);
        let mut sim = Sim::new(ranks, pages, memory, &mut rng);
        sim.barrier_odds = 20;
        if seed % 2 == 0 {
            // Only the ranks forget: what reaches a lock's home without a notice must bring its horizon.
            sim.lock_memory = DEFAULT_NOTICE_MEMORY;
        }
        for step in 0..4000 {
            let r = rng.random_range(0..ranks);
            sim.step(r, &mut rng);
            if step % 500 == 0 {
                // Over the bound only by writers' latest notices, which are always kept.
                let bound = memory.max(ranks * (NOTICE_BYTES + pages * RUN_BYTES));
                for rc in &sim.rc {
                    assert!(
                        rc.known.bytes() <= bound && rc.own_bytes <= memory,
                        "{} keeps {} and {} bytes of notices over a bound of {bound}",
                        rc.me,
                        rc.known.bytes(),
                        rc.own_bytes
                    );
                }
            }
        }
        checks += sim.checks;
        full += sim.full_invalidations;
        targeted += sim.targeted_invalidations;
    }
    // Both paths are taken often: acquires behind a horizon, and acquires whose notices say what to drop.
    assert!(
        checks > 50_000 && full > 1_000 && targeted > 1_000,
        "checks {checks}, acquires that dropped everything {full}, that dropped what notices named {targeted}"
    );
}

#[test]
fn a_notice_learned_through_a_lock_but_not_exchanged_survives_the_barrier() {
    // Rank 1 has two threads: one arrives at the barrier with no notice, then the other closes interval 1
    // and releases a lock, which rank 0 takes, learning interval 1. The barrier exchanges nothing of rank 1,
    // so rank 0 must keep interval 1 and pass it with the next lock it releases, or a rank 2 that takes that
    // lock would never drop its stale copy of page 5 until the next barrier.
    let mut r0 = RcRank::new(Rank(0), 3);
    let mut r1 = RcRank::new(Rank(1), 3);
    let exchanged_by_r1 = r1.own_notices().to_vec();
    assert!(exchanged_by_r1.is_empty());
    r1.close_interval(vec![key(5)]).unwrap();
    r0.acquire(&r1.notices_to_pass(0).0, &Z, &[], not_homed(|_| false));
    assert_eq!(r0.clock().0, vec![0, 1, 0]);
    assert_eq!(
        r0.barrier_done(&exchanged_by_r1, &Z),
        None,
        "no barrier before this one"
    );
    let passed = r0.notices_to_pass(0).0;
    assert!(
        passed.iter().any(|n| n.rank == Rank(1) && n.interval == 1),
        "interval 1 of rank 1 was dropped: {passed:?}"
    );
    let mut r2 = RcRank::new(Rank(2), 3);
    assert_eq!(
        pages_of(
            &r2.acquire(&passed, &Z, &[], not_homed(|_| false))
                .invalidate
        ),
        vec![key(5)]
    );
    // Once a barrier exchanges it, it is still passed on until the barrier after, when lock homes may
    // forget it too.
    let exchanged = r1.own_notices().to_vec();
    for rc in [&mut r0, &mut r2] {
        rc.acquire(&exchanged, &Z, &[], not_homed(|_| false));
    }
    let stable = r0
        .barrier_done(&exchanged, &Z)
        .expect("the cut of the first barrier");
    assert!(
        !stable.covers(&exchanged[0]),
        "the first barrier exchanged nothing of rank 1"
    );
    assert_eq!(r0.notices_to_pass(0).0.len(), 1);
    let stable = r0
        .barrier_done(&[], &Z)
        .expect("the cut of the second barrier");
    assert!(stable.covers(&exchanged[0]));
    assert!(r0.notices_to_pass(0).0.is_empty());
}

#[test]
fn a_later_interval_learned_through_a_lock_does_not_hide_an_earlier_one_a_barrier_brings() {
    // Rank 1 (the writer) and rank 0 have passed one barrier. Rank 1 writes page 5 in interval 1 and
    // arrives at the next barrier with it. That barrier completes at rank 1 first; a thread of rank 1
    // writes page 6 (interval 2) and releases a lock, which a thread of rank 0 takes before rank 0's own
    // thread has taken the barrier's notices in. Rank 0 must still drop page 5: the lock must bring
    // interval 1 along with interval 2, since the clock then covers interval 1 and the barrier's acquire
    // skips it. (Once, rank 1 forgot interval 1 at that barrier and passed interval 2 alone.)
    let mut r0 = RcRank::new(Rank(0), 2);
    let mut r1 = RcRank::new(Rank(1), 2);
    assert_eq!(r0.barrier_done(&[], &Z), None);
    assert_eq!(r1.barrier_done(&[], &Z), None);
    r1.close_interval(vec![key(5)]).unwrap();
    let exchanged = r1.own_notices().to_vec();
    r1.acquire(&exchanged, &Z, &[], not_homed(|_| false));
    r1.barrier_done(&exchanged, &Z);
    r1.close_interval(vec![key(6)]).unwrap();
    let mut dropped = pages_of(
        &r0.acquire(&r1.notices_to_pass(0).0, &Z, &[], not_homed(|_| false))
            .invalidate,
    );
    dropped.extend(pages_of(
        &r0.acquire(&exchanged, &Z, &[], not_homed(|_| false))
            .invalidate,
    ));
    r0.barrier_done(&exchanged, &Z);
    dropped.sort();
    assert_eq!(dropped, vec![key(5), key(6)], "rank 0 kept a stale page");
}

fn notice(rank: u32, interval: u32, page: u64) -> WriteNotice {
    WriteNotice {
        rank: Rank(rank),
        interval,
        runs: runs_of([key(page as usize)]),
    }
}

#[test]
fn a_notice_set_keeps_one_of_each_forgets_what_a_cut_covers_and_finds_what_a_clock_lacks() {
    let mut set = NoticeSet::default();
    for (r, i) in [(2, 1), (0, 3), (0, 1), (2, 2), (0, 2), (0, 3)] {
        set.insert(notice(r, i, u64::from(10 * r + i)));
    }
    assert_eq!(set.len(), 5, "the second (0, 3) is the same notice");
    let keys = |v: Vec<WriteNotice>| v.iter().map(|n| (n.rank.0, n.interval)).collect::<Vec<_>>();
    assert_eq!(keys(set.all()), [(0, 1), (0, 2), (0, 3), (2, 1), (2, 2)]);
    assert_eq!(
        keys(set.unseen(&VectorClock(vec![2, 0, 1]))),
        [(0, 3), (2, 2)]
    );
    // A clock shorter than the job, or at the end of the counter, covers what it can.
    assert_eq!(keys(set.unseen(&VectorClock(vec![3]))), [(2, 1), (2, 2)]);
    assert!(set.unseen(&VectorClock(vec![u32::MAX; 3])).is_empty());
    set.forget_covered(&VectorClock(vec![2, 5, 0]));
    assert_eq!(keys(set.all()), [(0, 3), (2, 1), (2, 2)]);
    assert_eq!(set.len(), 3);
    set.forget_covered(&VectorClock(vec![u32::MAX, 0, 2]));
    assert!(set.is_empty() && set.all().is_empty());
}

#[test]
fn a_release_passes_through_a_lock_only_what_it_did_not_pass_before_and_nothing_is_lost() {
    // Three ranks take turns on two locks, with no barrier: rank 0 writes under lock A, rank 1 takes A
    // and releases lock B, rank 2 takes B and must drop rank 0's page (transitively), and every release
    // passes only what is new for its lock.
    let mut rc: Vec<RcRank> = (0..3).map(|r| RcRank::new(Rank(r), 3)).collect();
    let mut union = [NoticeSet::default(), NoticeSet::default()];
    let (a, b) = (0usize, 1usize);
    let take = |rc: &mut RcRank, union: &NoticeSet| {
        let grant = union.unseen(rc.clock());
        pages_of(&rc.acquire(&grant, &Z, &[], not_homed(|_| false)).invalidate)
    };
    let give = |rc: &mut RcRank, union: &mut NoticeSet, lock: usize| {
        let (passed, _, clock) = rc.notices_to_pass(lock as u64);
        let n = passed.len();
        for p in passed {
            union.insert(p);
        }
        rc.passed_through(lock as u64, clock);
        n
    };
    for round in 1..=50u64 {
        take(&mut rc[0], &union[a]);
        rc[0].close_interval(vec![key(round as usize)]).unwrap();
        assert!(
            give(&mut rc[0], &mut union[a], a) <= 1,
            "rank 0 passes its new interval only"
        );
        let dropped = take(&mut rc[1], &union[a]);
        assert_eq!(dropped, vec![key(round as usize)]);
        give(&mut rc[1], &mut union[a], a);
        take(&mut rc[1], &union[b]);
        let passed = give(&mut rc[1], &mut union[b], b);
        assert!(
            passed <= 2,
            "round {round}: rank 1 passed {passed} notices through B"
        );
        let dropped = take(&mut rc[2], &union[b]);
        assert_eq!(
            dropped,
            vec![key(round as usize)],
            "round {round}: rank 2 kept a stale page"
        );
        give(&mut rc[2], &mut union[b], b);
    }
    assert_eq!(union[a].len(), 50);
}

#[test]
fn a_notice_learned_between_passing_and_recording_is_passed_next_time() {
    // Another thread of the rank learns a notice between the release's snapshot and its record: the record
    // must be the snapshot, or that notice would never go through this lock.
    let mut x = RcRank::new(Rank(0), 2);
    let (passed, _, clock) = x.notices_to_pass(7);
    assert!(passed.is_empty());
    x.acquire(&[notice(1, 1, 3)], &Z, &[], not_homed(|_| false));
    x.passed_through(7, clock);
    let (passed, ..) = x.notices_to_pass(7);
    assert_eq!(passed, vec![notice(1, 1, 3)]);
}

#[test]
fn an_acquirer_behind_a_horizon_drops_everything_and_passes_the_horizon_on() {
    // Rank 0 writes page 1 in interval 1 and page 2 in interval 2. Rank 1 takes a lock whose home forgot
    // interval 1: the grant brings interval 2 and a horizon of interval 1. Rank 1 cannot know what interval
    // 1 wrote, so it drops every cached page; then it passes both notices it has and the horizon through
    // another lock, and rank 2, which has seen nothing of rank 0, must drop everything too (interval 2
    // alone would leave its copy of page 1).
    let mut w = RcRank::new(Rank(0), 3);
    let mut y = RcRank::new(Rank(1), 3);
    let mut z = RcRank::new(Rank(2), 3);
    w.close_interval(vec![key(1)]).unwrap();
    w.close_interval(vec![key(2)]).unwrap();
    let interval_2: Vec<WriteNotice> = w
        .notices_to_pass(0)
        .0
        .into_iter()
        .filter(|n| n.interval == 2)
        .collect();
    let forgot_1 = VectorClock(vec![1, 0, 0]);
    let a = y.acquire(&interval_2, &forgot_1, &[], not_homed(|_| false));
    assert!(a.everything, "rank 1 could not know what interval 1 wrote");
    assert_eq!(y.clock().0, vec![2, 0, 0]);
    assert_eq!(y.horizon(), &forgot_1);
    // Seen from now on: the same horizon again changes nothing.
    assert!(
        !y.acquire(&[], &forgot_1, &[], not_homed(|_| false))
            .everything
    );
    let (passed, ..) = y.notices_to_pass(7);
    assert_eq!(passed, interval_2);
    let a = z.acquire(&passed, y.horizon(), &[], not_homed(|_| false));
    assert!(a.everything, "rank 2 kept its copy of page 1");
    // A rank whose clock covered the horizon already takes the notices as usual.
    let mut v = RcRank::new(Rank(2), 3);
    let all = w.notices_to_pass(0).0;
    v.acquire(&all[..1], &Z, &[], not_homed(|_| false));
    let a = v.acquire(&passed, y.horizon(), &[], not_homed(|_| false));
    assert!(!a.everything);
    assert_eq!(pages_of(&a.invalidate), vec![key(2)]);
}

#[test]
fn a_notice_set_over_its_bound_forgets_each_writers_oldest_first() {
    let mut set = NoticeSet::default();
    for i in 1..=6 {
        set.insert(notice(0, i, u64::from(i)));
        set.insert(notice(2, i, u64::from(10 + i)));
    }
    let one = NOTICE_BYTES + RUN_BYTES;
    assert_eq!(set.bytes(), 12 * one);
    let mut horizon = VectorClock::new(3);
    assert_eq!(set.forget_oldest(7 * one, &mut horizon), 5);
    assert_eq!(set.bytes(), 7 * one);
    assert_eq!(horizon.0, vec![3, 0, 2], "writers take turns, oldest first");
    let keys: Vec<_> = set.all().iter().map(|n| (n.rank.0, n.interval)).collect();
    assert_eq!(
        keys,
        [(0, 4), (0, 5), (0, 6), (2, 3), (2, 4), (2, 5), (2, 6)]
    );
    // Forgetting what a cut covers keeps the count right.
    set.forget_covered(&VectorClock(vec![5, 0, 3]));
    assert_eq!(set.bytes(), 4 * one);
    // Each writer's latest notice stays, whatever the bound.
    assert_eq!(set.forget_oldest(0, &mut horizon), 2);
    let keys: Vec<_> = set.all().iter().map(|n| (n.rank.0, n.interval)).collect();
    assert_eq!(keys, [(0, 6), (2, 6)]);
    assert_eq!(set.bytes(), 2 * one);
    assert_eq!(horizon.0, vec![3, 0, 5]);
    // Forgetting them all takes the latest too, behind the horizon.
    assert_eq!(set.forget_all(&mut horizon), 2);
    assert!(set.all().is_empty());
    assert_eq!(set.bytes(), 0);
    assert_eq!(horizon.0, vec![6, 0, 6]);
}

#[test]
fn a_peer_cannot_move_a_ranks_own_interval_counter() {
    // A horizon or a notice naming intervals of this rank that it never closed comes only from a faulty
    // peer: both are ignored (taking them would make this rank's next interval look seen everywhere).
    let mut x = RcRank::new(Rank(1), 2);
    let a = x.acquire(
        &[notice(1, u32::MAX, 4)],
        &VectorClock(vec![0, u32::MAX]),
        &[],
        not_homed(|_| false),
    );
    assert_eq!(a, Acquire::default());
    assert_eq!(x.clock().0, vec![0, 0]);
    assert_eq!(
        x.close_interval(vec![key(4)]).unwrap().map(|n| n.interval),
        Some(1)
    );
}

#[test]
fn the_last_interval_number_is_used_and_then_releases_are_refused() {
    let mut x = RcRank::new(Rank(0), 2);
    x.clock.0[0] = u32::MAX - 1;
    let last = x.close_interval(vec![key(1)]).unwrap();
    assert_eq!(last.map(|n| n.interval), Some(u32::MAX));
    // The next would wrap to 0, an interval every rank takes for seen.
    assert_eq!(x.close_interval(vec![key(2)]), Err(IntervalsExhausted));
    assert_eq!(x.clock().0, vec![u32::MAX, 0], "nothing changed");
    // Nothing written, nothing to announce: not refused.
    assert_eq!(x.close_interval(Vec::new()), Ok(None));
}
