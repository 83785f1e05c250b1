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
//!
//! The simulation is here; single scenarios, randomized jobs and the write notices' own tests are in the
//! modules.

use super::marks::{self, AtDiff, AtDrop};
use super::*;
use crate::protocol::diff;
use crate::region::{
    AHEAD, DIFFED, INVALID, PARTIAL, READ_ONLY, READ_WRITE, SHARED, STATE_MASK, TWINNED, WRITTEN,
};
use crate::types::PAGE_SIZE;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod notices;
mod randomized;
mod scenarios;

/// No horizon: nothing forgotten.
const Z: VectorClock = VectorClock(Vec::new());

const COUNTER: usize = 8; // counter `l` (of lock `l`) lives in bytes 8l..8l+8 of the last page
const LOCK_DATA: usize = 64; // byte 64 + l of every page is data written and read only under lock `l`
const LOCKS: usize = 2;
/// Bytes 128..136 of every page: a counter every rank adds to with atomic operations at any time (with
/// `atomic_odds`), never written plainly.
const ATOMIC: usize = 128;

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
    /// 1 in this many writes (and counter increments) is an atomic operation performed at the home (0:
    /// none), as `rc::atomic` and the engine's `atomic` do it.
    atomic_odds: u32,
    /// Atomic writes performed at homes for other ranks, and for the homes themselves.
    atomics_remote: u64,
    atomics_own: u64,
    /// Per rank and page, the least value of the page's atomic counter the rank may read: what its own
    /// additions left, and what it learned through locks and barriers from others'.
    floor: Vec<Vec<u64>>,
    /// Per lock, the floors its releasers passed on.
    lock_floor: Vec<Vec<u64>>,
    /// Reads of atomic counters checked against a floor above zero.
    floor_checks: u64,
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
            atomic_odds: 0,
            atomics_remote: 0,
            atomics_own: 0,
            floor: vec![vec![0; pages]; ranks],
            lock_floor: vec![vec![0; pages]; LOCKS],
            floor_checks: 0,
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
                            || (ATOMIC..ATOMIC + 8).contains(&b)
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
        self.apply_at_home(p, &d, selective);
        self.diffs_applied += 1;
        d
    }

    /// The home of page `p` applies diff `d` to its copy, as `marks::at_diff` says.
    fn apply_at_home(&mut self, p: usize, d: &[u8], selective: bool) {
        let h = self.home(p);
        let hs = self.state[h][p];
        match marks::at_diff(hs, selective) {
            AtDiff::Twin => {
                let mut twin = self.master[p].clone();
                diff::apply(&mut twin, d).expect("a well-formed diff");
                self.twin[h][p] = Some(twin);
                if marks::at_write(hs, true).list {
                    self.listed[h].push(p);
                }
                self.state[h][p] = with_state(hs | WRITTEN | DIFFED, READ_WRITE);
            }
            AtDiff::Both => {
                let twin = self.twin[h][p].as_mut().expect("a DIFFED page has a twin");
                diff::apply(twin, d).expect("a well-formed diff");
            }
            AtDiff::Own => {
                if marks::at_write(hs, true).list {
                    self.listed[h].push(p);
                }
                self.twin[h][p] = None;
                self.state[h][p] = with_state((hs | WRITTEN) & !DIFFED, READ_WRITE);
            }
        }
        diff::apply(&mut self.master[p], d).expect("a well-formed diff");
    }

    /// Rank `r` writes `bytes` at `offset` of page `p` with an atomic operation, as `rc::atomic` does: the
    /// home applies it to its copy (when `r` is the home, in place if the page is writable there, else as
    /// the home's own write; else as `r`'s diff), and `r` drops its copy (flushing its unsent writes first) and marks the page written, its diff at the
    /// home already. An operation that leaves the bytes as they were changes nothing, as in the engine.
    fn atomic_write(&mut self, r: usize, p: usize, offset: usize, bytes: &[u8]) {
        let h = self.home(p);
        // This rank's unsent writes to the page reach the home first (a selective release of it).
        if r != h && self.state[r][p] & TWINNED != 0 {
            self.release_page(r, p);
        }
        if self.master[p][offset..offset + bytes.len()] == *bytes {
            return;
        }
        if r == h {
            // In place when writable here and not DIFFED, as any write of the home's threads; else as its
            // own write.
            if marks::in_place_at_home(self.state[h][p]) {
                self.master[p][offset..offset + bytes.len()].copy_from_slice(bytes);
            } else {
                self.apply_at_home(p, &diff::run(offset, bytes), true);
            }
            self.atomics_own += 1;
            return;
        }
        self.apply_at_home(p, &diff::run(offset, bytes), false);
        self.drop_copy(r, p);
        let was = self.state[r][p];
        if was & WRITTEN == 0 {
            self.listed[r].push(p);
        }
        self.state[r][p] = marks::marked_at_home_write(was);
        self.atomics_remote += 1;
    }

    /// Rank `r` adds 1 to page `p`'s atomic counter at its home.
    fn atomic_add(&mut self, r: usize, p: usize) {
        let at = ATOMIC..ATOMIC + 8;
        let now = u64::from_le_bytes(self.master[p][at.clone()].try_into().unwrap()) + 1;
        self.atomic_write(r, p, ATOMIC, &now.to_le_bytes());
        self.model[p][at].copy_from_slice(&now.to_le_bytes());
        self.floor[r][p] = now;
    }

    /// Rank `r` reads every page's atomic counter plainly: at least its floor.
    fn check_floors(&mut self, r: usize, why: &str) {
        for p in 0..self.pages {
            let got = u64::from_le_bytes(std::array::from_fn(|i| self.read(r, p, ATOMIC + i)));
            let floor = self.floor[r][p];
            assert!(
                got >= floor,
                "rank {r} reads page {p}'s atomic counter {got} {why}, below {floor}"
            );
            self.floor_checks += u64::from(floor > 0);
        }
    }

    /// Whether the next write is an atomic operation at the home.
    fn atomic_now(&self, rng: &mut StdRng) -> bool {
        self.atomic_odds > 0 && rng.random_range(0..self.atomic_odds) == 0
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
        if self.atomic_odds > 0 && rng.random_range(0..self.atomic_odds * 2) == 0 {
            let p = rng.random_range(0..self.pages);
            self.atomic_add(r, p);
            return;
        }
        match rng.random_range(0..10) {
            0..=4 => {
                // Write one of my bytes.
                let p = rng.random_range(0..self.pages);
                let mut b = rng.random_range(0..PAGE_SIZE);
                let atomic = self.atomic_now(rng);
                if atomic && rng.random_range(0..2) == 0 {
                    // Often a byte this rank wrote plainly and has not sent yet: the atomic operation
                    // must come after that write.
                    b = self.unreleased[r][p].iter().next().copied().unwrap_or(b);
                }
                if self.owner[p][b] == r {
                    let v: u8 = rng.random();
                    if atomic {
                        self.atomic_write(r, p, b, &[v]);
                    } else {
                        self.write(r, p, b, v);
                    }
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
        if self.atomic_odds > 0 {
            for p in 0..self.pages {
                self.floor[r][p] = self.floor[r][p].max(self.lock_floor[lock][p]);
            }
            self.check_floors(r, "after acquiring a lock");
            // Some critical sections add to a counter before they release.
            if rng.random_range(0..2) == 0 {
                let p = rng.random_range(0..self.pages);
                self.atomic_add(r, p);
            }
        }
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
        let bytes = (c + 1).to_le_bytes();
        if self.atomic_now(rng) {
            self.atomic_write(r, p, COUNTER * lock, &bytes);
        } else {
            for (i, byte) in bytes.into_iter().enumerate() {
                self.write(r, p, COUNTER * lock + i, byte);
            }
        }
        self.model[p][COUNTER * lock..COUNTER * lock + 8].copy_from_slice(&bytes);
        self.counter_model[lock] = c + 1;
        self.release(r);
        for p in 0..self.pages {
            self.lock_floor[lock][p] = self.lock_floor[lock][p].max(self.floor[r][p]);
        }
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
        // And every atomic addition before it: each rank's floor is the counter's value.
        for p in 0..self.pages {
            let value = u64::from_le_bytes(self.model[p][ATOMIC..ATOMIC + 8].try_into().unwrap());
            for r in 0..self.ranks {
                self.floor[r][p] = value;
            }
        }
        self.assign_owners(rng);
    }
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

fn notice(rank: u32, interval: u32, page: u64) -> WriteNotice {
    WriteNotice {
        rank: Rank(rank),
        interval,
        runs: runs_of([key(page as usize)]),
    }
}
