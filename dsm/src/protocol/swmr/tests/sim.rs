//! Whole jobs under the SWMR protocol in random interleavings: ranks fault on pages, messages travel on
//! FIFO connections and are delivered in random order across connections, the manager serializes
//! transactions with a per-page lock held until the requester reports the install (as the engine does).
//!
//! Ranks may also crash, at any step, and then everything the engine does about a rank that failed is
//! followed (`engine/failure.rs`, `engine/pages.rs`, `fault/sequential.rs`):
//! - what a crashed rank had sent and no one had read yet arrives or not: each of its connections keeps a
//!   prefix (a reset discards what its kernel still held), then ends;
//! - each other rank learns of the crash on its own: it takes the rank for failed when it reads the end
//!   of the rank's connection to it (after whatever arrived), and for gone (it left the job, its copies
//!   with it) when it reads the end of its service-loop connection, which may come first (and counts as
//!   failed too); what a failed rank sent and is still unread is never read;
//! - a home that takes a rank for failed ends the transactions it holds (`end_transactions_of`: a grant
//!   as if it had completed) and drops its queued requests; at every decision it forgets the copies of
//!   ranks gone (`Entry::forget_gone`) and refuses a fault on a page whose only copy left with one;
//! - a requester whose grant names a copy holder it cannot reach waits until it knows the holder gone:
//!   an invalidation counts as done; a page to fetch from it fails the grant, as abandoned (the fault asks
//!   again) when nothing changed anywhere, or else as the owner having left, which ends the fault;
//! - a fault that ends with an error (its home failed, the page's data lost, the owner left mid-grant)
//!   ends its rank, as the fault handler does: one more crash.
//!
//! Invariants checked after every step, over the ranks alive:
//! - at most one writable copy of a page, and no other valid copy while it exists;
//! - every valid copy holds the last value written (so every read returns the last write, and a page
//!   whose last write left with a crashed rank is never read with an older value);
//! - the manager's record covers every valid copy (no copy the manager would forget to invalidate),
//!   unless the page is lost (its record names a crashed owner and no copy besides), when every fault
//!   on it fails and a copy left over (a reader's, whose invalidation by a crashed writer never arrived
//!   or was still unread when the reader took the writer for failed) can only ever be read;
//! - no deadlock: some rank or message can always move; and once ranks stop faulting, every fault of a
//!   rank alive ends.
//!
//! A `Done` to a requester that holds no copy releases the page's lock at once (no `Unlock`); a leaf
//! request that reaches that requester before its install is deferred until the install, as the engine
//! does. Leaf requests only reach ranks that hold a copy (the engine refuses others, failing the fault).

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, VecDeque};

mod failures;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    Invalid,
    ReadOnly(u64),
    Writable(u64),
}

impl Copy {
    fn value(self) -> Option<u64> {
        match self {
            Copy::Invalid => None,
            Copy::ReadOnly(v) | Copy::Writable(v) => Some(v),
        }
    }
}

#[derive(Debug, Clone)]
enum Msg {
    Acquire {
        page: usize,
        access: Access,
    },
    Done {
        page: usize,
        data: Option<u64>,
        keep: bool,
    },
    Granted {
        page: usize,
        grant: Grant,
        data: Option<u64>,
    },
    /// The page's data left the job with `owner`.
    Refused {
        page: usize,
        owner: Rank,
    },
    Fetch {
        page: usize,
    },
    Invalidate {
        page: usize,
        send: bool,
    },
    LeafReply {
        data: Option<u64>,
    },
    Unlock {
        page: usize,
        access: Access,
        granted: bool,
    },
    /// A grant that did not run: the owner it named left, and nothing changed.
    Abandon {
        page: usize,
        access: Access,
    },
    /// The end of the sender's connection, read after everything that arrived on it: the reader takes the
    /// sender for failed.
    End,
    /// The end of the sender's service-loop connection, ordered with nothing else: the reader knows the
    /// sender gone (and failed).
    ServiceEnd,
}

/// How a transaction holds its page's lock at the home (the engine's `Held`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Answered at once (an upgrade, or a read of a copy the requester holds), until its `Unlock`.
    Answered,
    /// Granted, until its `Unlock` or `Abandon`.
    Granted { home_kept_its_copy: bool },
    /// The home's own transaction, answered at once, until its install.
    OwnInstall,
}

#[derive(Debug, Clone, Copy)]
struct Lock {
    by: u32,
    access: Access,
    held: Held,
}

#[derive(Debug)]
enum Phase {
    Waiting,
    Collecting {
        /// Copy holders asked and not yet answered.
        pending: BTreeSet<u32>,
        /// Copy holders whose connection ended, waited on until they are known gone.
        unreachable: BTreeSet<u32>,
        fetch_from: Option<u32>,
        /// Some copy holder was asked to drop its copy.
        asked: bool,
        home_kept_its_copy: bool,
        data: Option<u64>,
        keep: bool,
    },
    Installing {
        data: Option<u64>,
        keep: bool,
        granted: bool,
    },
}

#[derive(Debug)]
struct Txn {
    page: usize,
    access: Access,
    phase: Phase,
}

pub(super) struct Sim {
    ranks: usize,
    rng: StdRng,
    home: Vec<u32>,
    entries: Vec<Entry>,
    locks: Vec<Option<Lock>>,
    queues: Vec<VecDeque<(u32, Access)>>,
    copies: Vec<Vec<Copy>>,
    truth: Vec<u64>,
    txns: Vec<Option<Txn>>,
    /// In-flight messages: (from, to, message), FIFO per (from, to), `ServiceEnd` on a connection of its own.
    wire: Vec<(u32, u32, Msg)>,
    next_value: u64,
    /// Leaf requests a rank's service loop deferred until its install.
    deferred: Vec<Vec<(u32, Msg)>>,
    alive: Vec<bool>,
    /// `failed[x][r]`: rank x takes rank r for failed.
    failed: Vec<Vec<bool>>,
    /// `gone[x][r]`: rank x knows rank r gone.
    gone: Vec<Vec<bool>>,
    pub(super) stats: Stats,
}

/// What a run did, so that a test can tell it exercised what it claims to.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stats {
    pub reads: u64,
    pub writes: u64,
    /// Ranks crashed by the run (not by a fault that failed).
    pub crashes: u64,
    /// Faults refused because the page's data left with a crashed rank.
    pub lost: u64,
    /// Grants abandoned and asked again.
    pub abandoned: u64,
    /// Grants failed because the owner left after copies were dropped.
    pub owner_left: u64,
    /// Faults failed because their home failed.
    pub home_failed: u64,
    /// Invalidations counted as done because their copy holder left.
    pub invalidations_gone: u64,
    /// Transactions a home ended for a requester that failed.
    pub ended_for_failed: u64,
}

impl Sim {
    fn new(seed: u64, ranks: usize, pages: usize) -> Sim {
        Sim {
            ranks,
            rng: StdRng::seed_from_u64(seed),
            home: (0..pages).map(|p| (p % ranks) as u32).collect(),
            entries: vec![Entry::default(); pages],
            locks: vec![None; pages],
            queues: vec![VecDeque::new(); pages],
            copies: vec![vec![Copy::Invalid; pages]; ranks],
            truth: vec![0; pages],
            txns: (0..ranks).map(|_| None).collect(),
            wire: Vec::new(),
            next_value: 1,
            deferred: vec![Vec::new(); ranks],
            alive: vec![true; ranks],
            failed: vec![vec![false; ranks]; ranks],
            gone: vec![vec![false; ranks]; ranks],
            stats: Stats::default(),
        }
    }

    /// Sends `msg`; a rank that takes the receiver for failed has closed its connection, and the callers
    /// that care (a send that fails) look before.
    fn send(&mut self, from: u32, to: u32, msg: Msg) {
        if !self.failed[from as usize][to as usize] {
            self.wire.push((from, to, msg));
        }
    }

    /// Indices of messages that are first on their connection.
    fn deliverable(&self) -> Vec<usize> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (i, (from, to, msg)) in self.wire.iter().enumerate() {
            if seen.insert((*from, *to, matches!(msg, Msg::ServiceEnd))) {
                out.push(i);
            }
        }
        out
    }

    fn access_locally(&mut self, rank: u32, page: usize, access: Access) {
        let copy = &mut self.copies[rank as usize][page];
        match (access, *copy) {
            (Access::Read, c) => {
                let v = c.value().expect("read without a copy");
                assert_eq!(
                    v, self.truth[page],
                    "rank {rank} read a stale value of page {page}"
                );
                self.stats.reads += 1;
            }
            (Access::Write, Copy::Writable(_)) => {
                let v = self.next_value;
                self.next_value += 1;
                *copy = Copy::Writable(v);
                self.truth[page] = v;
                self.stats.writes += 1;
            }
            (Access::Write, c) => panic!("rank {rank} wrote page {page} holding {c:?}"),
        }
    }

    fn start(&mut self, rank: u32, page: usize, access: Access) {
        let c = self.copies[rank as usize][page];
        let hit = matches!(
            (access, c),
            (Access::Read, Copy::ReadOnly(_) | Copy::Writable(_))
                | (Access::Write, Copy::Writable(_))
        );
        if hit {
            self.access_locally(rank, page, access);
            return;
        }
        let home = self.home[page];
        if self.failed[rank as usize][home as usize] {
            // The request cannot be sent: the fault ends with an error, and its rank with it.
            self.stats.home_failed += 1;
            self.crash(rank);
            return;
        }
        self.txns[rank as usize] = Some(Txn {
            page,
            access,
            phase: Phase::Waiting,
        });
        self.send(rank, home, Msg::Acquire { page, access });
    }

    fn home_copy_action(&mut self, home: u32, page: usize, action: HomeAction) -> Option<u64> {
        let copy = &mut self.copies[home as usize][page];
        let before = copy.value();
        match action {
            HomeAction::None => {}
            HomeAction::Downgrade => {
                let v = before.expect("downgrade of an absent home copy");
                *copy = Copy::ReadOnly(v);
            }
            HomeAction::Invalidate => {
                before.expect("invalidation of an absent home copy");
                *copy = Copy::Invalid;
            }
        }
        before
    }

    fn serve(&mut self, home: u32, page: usize, requester: u32, access: Access) {
        assert!(self.locks[page].is_none());
        if self.failed[home as usize][requester as usize] {
            // A request queued by a rank that failed since: nobody waits for the answer.
            return;
        }
        let mut entry = self.entries[page];
        let gone = &self.gone[home as usize];
        if let Some(owner) = entry.forget_gone(Rank(home), |r| gone[r.index()]) {
            self.send(home, requester, Msg::Refused { page, owner });
            return;
        }
        match decide(&mut entry, Rank(home), Rank(requester), access) {
            Decision::Done { home_action, data } => {
                self.entries[page] = entry;
                let before = self.home_copy_action(home, page, home_action);
                let (data, keep) = match data {
                    Data::None => (None, true),
                    Data::Zero => (Some(0), false),
                    Data::Home => (Some(before.expect("home data from an absent copy")), false),
                };
                if keep || requester == home {
                    let held = if keep {
                        Held::Answered
                    } else {
                        Held::OwnInstall
                    };
                    self.lock(page, requester, access, held);
                }
                // Otherwise the requester has no copy: the home leaves the page unlocked and the requester
                // sends no Unlock. A leaf request that reaches it before its install is deferred.
                self.send(home, requester, Msg::Done { page, data, keep });
            }
            Decision::Grant(grant) => {
                // The entry pruned of gone ranks is not kept: the Unlock completes the stored one, as in
                // the engine (the next decision prunes it again).
                if requester == home {
                    self.entries[page] = entry;
                }
                let before = self.home_copy_action(home, page, grant.home_action);
                let data = if grant.data_from_home {
                    Some(before.expect("grant data from an absent home copy"))
                } else {
                    None
                };
                let held = Held::Granted {
                    home_kept_its_copy: grant.home_action == HomeAction::None,
                };
                self.lock(page, requester, access, held);
                self.send(home, requester, Msg::Granted { page, grant, data });
            }
        }
    }

    fn lock(&mut self, page: usize, by: u32, access: Access, held: Held) {
        self.locks[page] = Some(Lock { by, access, held });
    }

    fn unlock(&mut self, page: usize) {
        self.locks[page] = None;
        while self.locks[page].is_none() {
            let Some((r, a)) = self.queues[page].pop_front() else {
                break;
            };
            let home = self.home[page];
            self.serve(home, page, r, a);
        }
    }

    fn leaf_copy(&self, rank: u32, page: usize) -> Copy {
        let c = self.copies[rank as usize][page];
        assert_ne!(
            c,
            Copy::Invalid,
            "leaf request for page {page} reached rank {rank}, which holds no copy"
        );
        c
    }

    fn deliver(&mut self, i: usize) {
        let (from, to, msg) = self.wire.remove(i);
        self.handle(from, to, msg);
    }

    fn handle(&mut self, from: u32, to: u32, msg: Msg) {
        if !self.alive[to as usize] {
            return;
        }
        match msg {
            Msg::End => return self.learn_failed(to, from),
            Msg::ServiceEnd => return self.learn_gone(to, from),
            _ if self.failed[to as usize][from as usize] => return,
            Msg::Fetch { page } | Msg::Invalidate { page, .. } => {
                let busy_here = self.txns[to as usize]
                    .as_ref()
                    .is_some_and(|t| t.page == page);
                if self.copies[to as usize][page] == Copy::Invalid && busy_here {
                    self.deferred[to as usize].push((from, msg));
                    return;
                }
            }
            _ => {}
        }
        match msg {
            Msg::Acquire { page, access } => {
                if self.locks[page].is_some() {
                    self.queues[page].push_back((from, access));
                } else {
                    self.serve(to, page, from, access);
                }
            }
            Msg::Done { page, data, keep } => {
                let txn = self.txns[to as usize].as_mut().unwrap();
                assert_eq!(txn.page, page);
                txn.phase = Phase::Installing {
                    data,
                    keep,
                    granted: false,
                };
            }
            Msg::Granted { page, grant, data } => self.run_grant(to, page, grant, data),
            Msg::Refused { page, owner } => {
                assert_eq!(self.txns[to as usize].as_ref().unwrap().page, page);
                assert!(
                    !self.alive[owner.index()],
                    "page {page}: a fault was refused as lost with {owner}, which lives"
                );
                self.stats.lost += 1;
                self.crash(to);
            }
            Msg::Fetch { page } => {
                let v = self.leaf_copy(to, page).value().unwrap();
                self.copies[to as usize][page] = Copy::ReadOnly(v);
                self.send(to, from, Msg::LeafReply { data: Some(v) });
            }
            Msg::Invalidate { page, send } => {
                let v = self.leaf_copy(to, page).value().unwrap();
                self.copies[to as usize][page] = Copy::Invalid;
                self.send(
                    to,
                    from,
                    Msg::LeafReply {
                        data: send.then_some(v),
                    },
                );
            }
            Msg::LeafReply { data: d } => {
                let txn = self.txns[to as usize].as_mut().unwrap();
                let Phase::Collecting { pending, data, .. } = &mut txn.phase else {
                    panic!("leaf reply outside a transaction")
                };
                assert!(pending.remove(&from));
                if d.is_some() {
                    *data = d;
                }
                self.advance(to);
            }
            Msg::Unlock {
                page,
                access,
                granted,
            } => {
                let lock = self.locks[page].expect("an Unlock of a page not locked");
                assert_eq!(
                    lock.by, from,
                    "page {page}: an Unlock by a rank not holding it"
                );
                if granted {
                    complete(&mut self.entries[page], Rank(from), access);
                }
                self.unlock(page);
            }
            Msg::Abandon { page, access } => {
                // The engine takes a rank whose Abandon does not match what it holds for failed: in jobs
                // whose ranks only crash, that would end a rank alive.
                let lock = self.locks[page];
                assert!(
                    lock.is_some_and(|l| l.by == from
                        && l.access == access
                        && l.held
                            == Held::Granted {
                                home_kept_its_copy: true
                            }),
                    "page {page}: an Abandon by {from} that the home refuses ({lock:?})"
                );
                self.unlock(page);
            }
            Msg::End | Msg::ServiceEnd => unreachable!(),
        }
    }

    /// Runs a grant at `rank` as `fault/sequential.rs`'s `run_grant` does: the request to the owner first
    /// (the grant is abandoned, or fails, once the owner is known gone if that send fails), then the
    /// invalidations (a copy holder that cannot be reached is waited on until it is known gone).
    fn run_grant(&mut self, rank: u32, page: usize, grant: Grant, data: Option<u64>) {
        let r = rank as usize;
        let txn = self.txns[r].as_mut().unwrap();
        assert_eq!(txn.page, page);
        let access = txn.access;
        let mut pending = BTreeSet::new();
        let mut unreachable = BTreeSet::new();
        let mut out = Vec::new();
        let home_kept_its_copy = grant.home_action == HomeAction::None;
        let fetch_from = grant.fetch_from.map(|o| o.0);
        let mut asked = false;
        if let Some(o) = fetch_from {
            if self.failed[r][o as usize] {
                // The send fails before any copy holder was asked.
                unreachable.insert(o);
            } else {
                pending.insert(o);
                let m = match access {
                    Access::Read => Msg::Fetch { page },
                    Access::Write => Msg::Invalidate { page, send: true },
                };
                out.push((o, m));
            }
        }
        if unreachable.is_empty() {
            for h in grant.invalidate.iter() {
                if self.failed[r][h.index()] {
                    unreachable.insert(h.0);
                } else {
                    pending.insert(h.0);
                    asked = true;
                    out.push((h.0, Msg::Invalidate { page, send: false }));
                }
            }
        }
        let keep = data.is_none() && fetch_from.is_none();
        txn.phase = Phase::Collecting {
            pending,
            unreachable,
            fetch_from,
            asked,
            home_kept_its_copy,
            data,
            keep,
        };
        for (dst, m) in out {
            self.send(rank, dst, m);
        }
        self.advance(rank);
    }

    /// Moves `rank`'s grant on as far as what it knows allows.
    fn advance(&mut self, rank: u32) {
        let r = rank as usize;
        let Some(Txn {
            page,
            access,
            phase:
                Phase::Collecting {
                    pending,
                    unreachable,
                    fetch_from,
                    asked,
                    home_kept_its_copy,
                    data,
                    keep,
                },
        }) = &mut self.txns[r]
        else {
            return;
        };
        let (page, access) = (*page, *access);
        let gone = &self.gone[r];
        let left: Vec<u32> = unreachable
            .iter()
            .copied()
            .filter(|h| gone[*h as usize])
            .collect();
        for h in left {
            unreachable.remove(&h);
            if Some(h) == *fetch_from {
                // The page was to come from a rank that left with it.
                let abandon = *home_kept_its_copy && !*asked;
                if abandon {
                    self.stats.abandoned += 1;
                    self.abandon(rank, page, access);
                } else {
                    self.stats.owner_left += 1;
                    self.crash(rank);
                }
                return;
            }
            self.stats.invalidations_gone += 1;
        }
        if pending.is_empty() && unreachable.is_empty() {
            let (data, keep) = (*data, *keep);
            self.txns[r].as_mut().unwrap().phase = Phase::Installing {
                data,
                keep,
                granted: true,
            };
        }
    }

    fn install(&mut self, rank: u32) {
        let txn = self.txns[rank as usize].take().unwrap();
        let Phase::Installing {
            data,
            keep,
            granted,
        } = txn.phase
        else {
            unreachable!()
        };
        let page = txn.page;
        let current = self.copies[rank as usize][page];
        let value = if keep {
            current.value().expect("kept a copy that is not here")
        } else {
            data.expect("install without data")
        };
        self.copies[rank as usize][page] = match txn.access {
            Access::Read => Copy::ReadOnly(value),
            Access::Write => Copy::Writable(value),
        };
        self.access_locally(rank, page, txn.access);
        let home = self.home[page];
        let waiting = std::mem::take(&mut self.deferred[rank as usize]);
        let installed_remote_done = !granted && !keep && home != rank;
        if home == rank {
            // The home's own transactions hold the lock until the install, as the fault path does.
            if granted {
                complete(&mut self.entries[page], Rank(rank), txn.access);
            }
            self.unlock(page);
        } else if !installed_remote_done {
            // An Unlock to a home taken for failed counts as sent once it is gone (the page stays here).
            let access = txn.access;
            self.send(
                rank,
                home,
                Msg::Unlock {
                    page,
                    access,
                    granted,
                },
            );
        }
        for (from, msg) in waiting {
            self.handle(from, rank, msg);
        }
    }

    fn check(&self) {
        let live: Vec<usize> = (0..self.ranks).filter(|r| self.alive[*r]).collect();
        for page in 0..self.truth.len() {
            let writers = live
                .iter()
                .filter(|r| matches!(self.copies[**r][page], Copy::Writable(_)))
                .count();
            let holders: Vec<usize> = live
                .iter()
                .copied()
                .filter(|r| self.copies[*r][page] != Copy::Invalid)
                .collect();
            assert!(writers <= 1, "page {page}: {writers} writable copies");
            if writers == 1 {
                assert_eq!(
                    holders.len(),
                    1,
                    "page {page}: a writable copy beside other copies"
                );
            }
            let mut pruned = self.entries[page];
            let lost = pruned
                .forget_gone(Rank(self.home[page]), |r| !self.alive[r.index()])
                .is_some();
            for r in &holders {
                assert_eq!(
                    self.copies[*r][page].value(),
                    Some(self.truth[page]),
                    "page {page}: rank {r} holds a stale copy"
                );
                // A copy the manager does not know of could never be invalidated. Copies in the middle of an
                // unfinished transaction are covered by the manager's lock instead.
                if self.locks[page].is_none() && self.alive[self.home[page] as usize] && !lost {
                    assert!(
                        self.entries[page].has_copy(Rank(*r as u32)),
                        "page {page}: rank {r} holds a copy the manager does not record"
                    );
                }
            }
        }
    }

    /// The ranks alive that are in a fault.
    fn faulting(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.ranks as u32)
            .filter(|r| self.alive[*r as usize] && self.txns[*r as usize].is_some())
    }
}

/// Runs a job of `ranks` ranks faulting on `pages` pages for `steps` random steps, `crashes` of which (at
/// random) end a rank; then lets every message and fault still under way finish, and checks that every
/// fault of a rank alive did.
pub(super) fn run(seed: u64, ranks: usize, pages: usize, steps: usize, crashes: usize) -> Sim {
    let mut sim = Sim::new(seed, ranks, pages);
    let crash_at: BTreeSet<usize> = (0..crashes)
        .map(|_| sim.rng.random_range(0..steps))
        .collect();
    for step in 0..steps {
        if crash_at.contains(&step) {
            let live: Vec<u32> = (0..ranks as u32)
                .filter(|r| sim.alive[*r as usize])
                .collect();
            if live.len() > 1 {
                let victim = live[sim.rng.random_range(0..live.len())];
                sim.stats.crashes += 1;
                sim.crash(victim);
                sim.check();
            }
        }
        if !sim.step(true) {
            assert!(
                !sim.alive.iter().any(|a| *a),
                "deadlock: no rank can move and no message is in flight"
            );
            break;
        }
        sim.check();
    }
    // Once ranks stop faulting, everything under way ends.
    let mut left = 1_000_000;
    while sim.step(false) {
        sim.check();
        left -= 1;
        assert!(left > 0, "the job never settled");
    }
    let stuck: Vec<u32> = sim.faulting().collect();
    assert!(
        stuck.is_empty(),
        "the faults of ranks {stuck:?} never ended"
    );
    sim
}

impl Sim {
    /// Takes one random step: starts a fault or a local access on a rank alive and idle (when `start`),
    /// delivers a message or installs. Returns false when nothing can move.
    fn step(&mut self, start: bool) -> bool {
        let idle: Vec<u32> = if start {
            (0..self.ranks as u32)
                .filter(|r| self.alive[*r as usize] && self.txns[*r as usize].is_none())
                .collect()
        } else {
            Vec::new()
        };
        let installing: Vec<u32> = self
            .faulting()
            .filter(|r| {
                matches!(
                    self.txns[*r as usize],
                    Some(Txn {
                        phase: Phase::Installing { .. },
                        ..
                    })
                )
            })
            .collect();
        let deliverable = self.deliverable();
        let choices = idle.len() + installing.len() + deliverable.len();
        if choices == 0 {
            return false;
        }
        let pages = self.truth.len();
        let mut k = self.rng.random_range(0..choices);
        if k < idle.len() {
            let page = self.rng.random_range(0..pages);
            let access = if self.rng.random_bool(0.5) {
                Access::Read
            } else {
                Access::Write
            };
            self.start(idle[k], page, access);
        } else {
            k -= idle.len();
            if k < installing.len() {
                self.install(installing[k]);
            } else {
                self.deliver(deliverable[k - installing.len()]);
            }
        }
        true
    }
}
