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
//! Ranks alive may also take others alive for failed, as a peer timeout does (`Job::suspicions`): the
//! rank that does ends the other's transactions on its pages early and cuts off its connections to it,
//! and the other takes it for failed in turn on reading their end; neither is known gone, so faults that
//! need one of them give up waiting (`LEAVING`) and fail. A grant the home ended early is revoked by a
//! later writer's invalidation (`sim/leaves.rs`), and a request for the copy of an owner its home takes for
//! failed waits for the owner's own fault on the page (`wait_for_own`).
//!
//! Invariants checked after every step, over the ranks alive:
//! - at most one writable copy of a page, and no other valid copy while it exists;
//! - every valid copy holds the last value written (so every read returns the last write, and a page
//!   whose last write left with a crashed rank is never read with an older value);
//! - the manager's record covers every valid copy (no copy the manager would forget to invalidate),
//!   unless the page is lost (its record names a crashed owner and no copy besides), when every fault
//!   on it fails and a copy left over (a reader's, whose invalidation by a crashed writer never arrived
//!   or was still unread when the reader took the writer for failed) can only ever be read, or while a
//!   grant the home ended early is under way (it drops the copies it was granted to drop);
//! - no deadlock: some rank or message can always move; and once ranks stop faulting, every fault of a
//!   rank alive ends.
//!
//! A `Done` to a requester that holds no copy releases the page's lock at once (no `Unlock`); a leaf
//! request that reaches that requester before its install is deferred until the install, as the engine
//! does. Leaf requests only reach ranks that hold a copy (the engine refuses others, failing the fault),
//! unless a rank alive was taken for failed.
//!
//! Jobs may fault with read-ahead (`Job::window`) on pages laid out in runs with one home (`Job::run`),
//! or cyclically, where the pages of one home are a stride apart: the requester claims the following
//! pages with the page's home that it holds no copy of (again when it asks again after an abandoned
//! grant), and the home hands over with a `Done` those it can at once (`Sim::gather`); they are deferred
//! on and installed as the page is. A home's own first touch takes the untouched pages after it too,
//! locked until its install (`Sim::zero_fill_ahead`).
//!
//! In jobs with direct installs (`Job::direct`), a home installs the pages of a `Done` that carries its
//! copy (or several pages read ahead) straight into the requester, whose threads read or write them
//! before the answer is read, while leaf requests for them are deferred as for pages not there
//! (`sim/direct.rs`). A home's answer to a requester whose connection reset may fail to send: the home
//! takes back what it gave, as the engine does (pages a direct install may have put there stay recorded).
//! A requester alive whose home could not answer it is not modelled: one that cuts its home off while
//! waiting for it fails at once.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, VecDeque};

mod ahead;
mod check;
mod direct;
mod driver;
mod failures;
mod grants;
mod home;
mod leaves;

pub(super) use driver::run;

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
    /// `extras`: the following pages claimed for read-ahead or write-ahead.
    Acquire {
        page: usize,
        access: Access,
        extras: usize,
    },
    /// `ahead`: the following pages handed over with the page, with their content.
    Done {
        page: usize,
        data: Option<u64>,
        keep: bool,
        ahead: Vec<(usize, u64)>,
    },
    /// `owner_failed`: the home takes the rank to fetch from for failed (it ended that rank's own
    /// transactions on its pages early, and serves it no more).
    Granted {
        page: usize,
        grant: Grant,
        data: Option<u64>,
        owner_failed: bool,
    },
    /// The page's data left the job with `owner`.
    Refused {
        page: usize,
        owner: Rank,
    },
    /// `wait_for_own`: served only once no fault of the receiver's own is resolving the page.
    Fetch {
        page: usize,
        wait_for_own: bool,
    },
    Invalidate {
        page: usize,
        send: bool,
        wait_for_own: bool,
    },
    LeafReply {
        data: Option<u64>,
    },
    /// A leaf request refused: the rank holds no copy and runs no transaction on the page (`NoCopyHere`).
    LeafRefused,
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
        ahead: Vec<(usize, u64)>,
    },
}

#[derive(Debug)]
struct Txn {
    page: usize,
    access: Access,
    phase: Phase,
    /// A later writer's invalidation reached this rank while its grant ran (`REVOKED`): the home ended the
    /// transaction early, and the grant must install nothing.
    revoked: bool,
    /// Its home ended the transaction as if it had run, having taken this rank for failed: until it ends
    /// here, the copies it was granted to drop are recorded nowhere, and it is what drops them.
    ended_early: bool,
    /// Following pages held BUSY here (claimed for the request, then those the reply hands over, until
    /// the install): a leaf request for one that finds no copy is deferred, as for `page`.
    claimed: Vec<usize>,
    /// The home installed the answer's pages straight into this rank's memory (`Reply::Installed`),
    /// where the rank's threads use them at once: until the install, they are readable here (their
    /// copies are set) while their state is still `INVALID | BUSY`, and leaf requests for them are
    /// deferred.
    direct: bool,
}

/// A job: its ranks and pages, and how the pages and faults go.
#[derive(Debug, Clone, Copy)]
pub(super) struct Job {
    pub ranks: usize,
    pub pages: usize,
    /// Consecutive pages with one home (the region's layout: 1 is cyclic).
    pub run: usize,
    /// The read-ahead window: a fault asks for up to this many pages (1: one).
    pub window: usize,
    pub steps: usize,
    /// Ranks crashed at random steps.
    pub crashes: usize,
    /// Times a rank takes another for failed while both live (the peer timeout), at random steps.
    pub suspicions: usize,
    /// Homes install the pages of a `Done` that carries the home's copy straight into the requester
    /// (`direct.rs`), whose threads may use them before the answer is read.
    pub direct: bool,
    /// A crash strikes, when there is one, a rank whose request for a write with pages claimed after it
    /// is on its way to the home (which may then be unable to send an answer that gives up its copies),
    /// rather than any rank.
    pub crash_first_writers: bool,
}

pub(super) struct Sim {
    ranks: usize,
    window: usize,
    /// From one page to the next with the same home, as read-ahead takes them (`home_stride`): the rank
    /// count in the cyclic layout, 1 in runs.
    stride: usize,
    /// The job's `Job::direct`.
    direct: bool,
    /// Whether a fault waiting for a copy holder it cannot reach may give up (`LEAVING` passing): in jobs
    /// where ranks are taken for failed while they live, such a holder may never be known gone.
    timeouts: bool,
    rng: StdRng,
    home: Vec<u32>,
    entries: Vec<Entry>,
    locks: Vec<Option<Lock>>,
    /// Requests waiting for a page's lock: requester, access, pages claimed after it.
    queues: Vec<VecDeque<(u32, Access, usize)>>,
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
    /// Pages handed over ahead of a fault (read-ahead and write-ahead).
    pub ahead: u64,
    /// Of those, pages a stride apart (the cyclic layout).
    pub ahead_strided: u64,
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
    /// Times a rank took another for failed while both lived.
    pub suspicions: u64,
    /// Grants revoked by a later writer's invalidation (the home had ended them early).
    pub revoked: u64,
    /// Faults that gave up waiting for a copy holder, or a home, that was taken for failed and lives on.
    pub timed_out: u64,
    /// Leaf requests refused by a rank without a copy.
    pub leaf_refused: u64,
    /// Upgrades that found their copy taken by a later transaction (the home had ended them early).
    pub upgrade_lost: u64,
    /// Requests for a copy, from a transaction granted while the home took the copy's holder for failed,
    /// that waited for a fault of the holder's own on the page.
    pub waited_for_own: u64,
    /// Pages a home installed straight into a requester.
    pub direct: u64,
    /// Accesses to pages a home installed directly, before the answer was read.
    pub early_accesses: u64,
    /// Leaf requests deferred at a rank whose pages were installed there directly but not yet known.
    pub deferred_direct: u64,
    /// Answers a home could not send (the requester's connection reset), and took back.
    pub unsent: u64,
    /// Of those, answers after a direct install of a read, whose pages the requester may hold.
    pub unsent_held: u64,
    /// Home copies given up for a writer along with the page it faulted on, in answers not sent, and put
    /// back.
    pub unsent_written: u64,
    /// Untouched pages a home filled with zeros along with its own first touch of the page before them.
    pub zero_filled: u64,
    /// Pages a home gave up, with their data, to a first writer along with the page it faulted on.
    pub written_ahead: u64,
}

impl Sim {
    fn new(seed: u64, job: &Job) -> Sim {
        let Job { ranks, pages, .. } = *job;
        Sim {
            ranks,
            window: job.window,
            stride: if job.run == 1 { ranks } else { 1 },
            direct: job.direct,
            timeouts: job.suspicions > 0,
            rng: StdRng::seed_from_u64(seed),
            home: (0..pages).map(|p| (p / job.run % ranks) as u32).collect(),
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
        let claimed = self.claim(rank, page, access);
        let extras = claimed.len();
        self.txns[rank as usize] = Some(Txn {
            page,
            access,
            phase: Phase::Waiting,
            revoked: false,
            ended_early: false,
            claimed,
            direct: false,
        });
        self.ask(rank, page, access, extras);
    }

    /// The pages a remote fault claims along with `page`: read-ahead (a read) or write-ahead (a first
    /// write) claims the following pages with the same home that hold no copy here (`claim_following`).
    /// The home's own faults claim at the home instead (`Sim::zero_fill_ahead`).
    fn claim(&self, rank: u32, page: usize, access: Access) -> Vec<usize> {
        let home = self.home[page];
        let mine = &self.copies[rank as usize];
        let missing = mine[page] == Copy::Invalid;
        if home == rank || !(access == Access::Read || missing) {
            return Vec::new();
        }
        self.following(page, self.window)
            .take_while(|q| mine[*q] == Copy::Invalid)
            .collect()
    }

    /// The next pages after `page` with its home, up to `count` pages with it (`following_here`): a
    /// stride apart, ending at the region's end or, in runs, at the run's.
    pub(super) fn following(&self, page: usize, count: usize) -> impl Iterator<Item = usize> + '_ {
        let home = self.home[page];
        (1..count)
            .map(move |k| page + k * self.stride)
            .take_while(move |q| *q < self.truth.len() && self.home[*q] == home)
    }

    /// Sends `rank`'s request for `page` to its home; to a home it takes for failed, the request cannot
    /// be sent, and the fault ends with an error, its rank with it.
    fn ask(&mut self, rank: u32, page: usize, access: Access, extras: usize) {
        let home = self.home[page];
        if self.failed[rank as usize][home as usize] {
            self.stats.home_failed += 1;
            self.crash(rank);
            return;
        }
        let request = Msg::Acquire {
            page,
            access,
            extras,
        };
        self.send(rank, home, request);
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
            Msg::Fetch { page, .. } | Msg::Invalidate { page, .. }
                if self.defer_or_refuse(from, to, page, &msg) =>
            {
                return
            }
            _ => {}
        }
        match msg {
            Msg::Acquire {
                page,
                access,
                extras,
            } => {
                if self.locks[page].is_some() {
                    self.queues[page].push_back((from, access, extras));
                } else {
                    self.serve(to, page, from, access, extras);
                }
            }
            Msg::Done {
                page,
                data,
                keep,
                ahead,
            } => {
                let txn = self.txns[to as usize].as_mut().unwrap();
                assert_eq!(txn.page, page);
                // The pages claimed and not handed over are released now; those handed over at the install.
                assert!(ahead.iter().all(|(q, _)| txn.claimed.contains(q)));
                txn.claimed = ahead.iter().map(|(q, _)| *q).collect();
                txn.phase = Phase::Installing {
                    data,
                    keep,
                    granted: false,
                    ahead,
                };
            }
            Msg::Granted {
                page,
                grant,
                data,
                owner_failed,
            } => self.run_grant(to, page, grant, data, owner_failed),
            Msg::Refused { page, owner } => {
                assert_eq!(self.txns[to as usize].as_ref().unwrap().page, page);
                assert!(
                    !self.alive[owner.index()],
                    "page {page}: a fault was refused as lost with {owner}, which lives"
                );
                self.stats.lost += 1;
                self.crash(to);
            }
            Msg::Fetch { page, .. } => {
                let v = self.leaf_copy(to, page).value().unwrap();
                self.copies[to as usize][page] = Copy::ReadOnly(v);
                self.send(to, from, Msg::LeafReply { data: Some(v) });
            }
            Msg::Invalidate { page, send, .. } => {
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
            Msg::LeafRefused => {
                let txn = self.txns[to as usize].as_ref().unwrap();
                let Phase::Collecting { pending, .. } = &txn.phase else {
                    panic!("leaf refusal outside a transaction")
                };
                assert!(pending.contains(&from));
                // The grant fails with the refusal, and the fault with it.
                self.crash(to);
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

    fn install(&mut self, rank: u32) {
        let txn = self.txns[rank as usize].take().unwrap();
        let Phase::Installing {
            data,
            keep,
            granted,
            ahead,
        } = txn.phase
        else {
            unreachable!()
        };
        let page = txn.page;
        let current = self.copies[rank as usize][page];
        let value = if txn.direct {
            // Installed by the home already, and perhaps written since by the rank's threads.
            current
                .value()
                .expect("a page installed directly is not here")
        } else if keep {
            let Some(v) = current.value() else {
                // A later transaction took the copy this upgrade keeps (the home had ended the upgrade
                // early): `upgrade_in_place` fails the fault.
                assert!(
                    self.stats.suspicions > 0,
                    "page {page}: rank {rank} kept a copy that is not here"
                );
                self.stats.upgrade_lost += 1;
                self.crash(rank);
                return;
            };
            v
        } else {
            data.expect("install without data")
        };
        self.copies[rank as usize][page] = match txn.access {
            Access::Read => Copy::ReadOnly(value),
            Access::Write => Copy::Writable(value),
        };
        self.access_locally(rank, page, txn.access);
        self.stats.ahead += ahead.len() as u64;
        if self.stride > 1 {
            self.stats.ahead_strided += ahead.len() as u64;
        }
        let ahead_pages: Vec<usize> = ahead.iter().map(|(q, _)| *q).collect();
        for (q, value) in ahead {
            let copy = match txn.access {
                Access::Read => Copy::ReadOnly(value),
                Access::Write => Copy::Writable(value),
            };
            let here = if txn.direct { copy } else { Copy::Invalid };
            assert_eq!(self.copies[rank as usize][q], here);
            self.copies[rank as usize][q] = copy;
        }
        let home = self.home[page];
        let waiting = std::mem::take(&mut self.deferred[rank as usize]);
        let installed_remote_done = !granted && !keep && home != rank;
        if home == rank {
            // The home's own transactions hold the lock until the install, as the fault path does, and
            // so do the pages it filled with zeros ahead.
            if granted {
                complete(&mut self.entries[page], Rank(rank), txn.access);
            }
            self.unlock(page);
            for q in ahead_pages {
                self.unlock(q);
            }
        } else if !installed_remote_done {
            // An Unlock to a home taken for failed counts as sent once it is known gone (the page stays
            // here); a home that lives on is never known gone, and the fault gives up waiting.
            let (r, h) = (rank as usize, home as usize);
            if self.failed[r][h] && !self.gone[r][h] && self.alive[h] {
                self.stats.timed_out += 1;
                self.crash(rank);
                return;
            }
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
}
