//! The SWMR protocol under randomized interleavings of whole jobs: ranks fault on pages, messages travel on
//! FIFO connections and are delivered in random order across connections, the manager serializes
//! transactions with a per-page lock held until the requester reports the install (as the engine does).
//!
//! Invariants checked after every step:
//! - at most one writable copy of a page, and no other valid copy while it exists;
//! - every valid copy holds the last value written (so every read returns the last write);
//! - the manager's record covers every valid copy (no copy the manager would forget to invalidate);
//! - no deadlock: some rank or message can always move.
//!
//! A `Done` to a requester that holds no copy releases the page's lock at once (no `Unlock`); a leaf
//! request that reaches that requester before its install is deferred until the install, as the engine does.
//! - leaf requests only reach ranks that hold a copy.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, VecDeque};

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
}

#[derive(Debug)]
enum Phase {
    Waiting,
    Collecting {
        pending: BTreeSet<u32>,
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

struct Sim {
    ranks: usize,
    home: Vec<u32>,
    entries: Vec<Entry>,
    locks: Vec<Option<u32>>,
    queues: Vec<VecDeque<(u32, Access)>>,
    copies: Vec<Vec<Copy>>,
    truth: Vec<u64>,
    txns: Vec<Option<Txn>>,
    /// In-flight messages: (from, to, message), FIFO per (from, to).
    wire: Vec<(u32, u32, Msg)>,
    next_value: u64,
    /// Leaf requests a rank's service loop deferred until its install.
    deferred: Vec<Vec<(u32, Msg)>>,
    reads_checked: u64,
    writes: u64,
}

impl Sim {
    fn new(ranks: usize, pages: usize) -> Sim {
        Sim {
            ranks,
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
            reads_checked: 0,
            writes: 0,
        }
    }

    fn send(&mut self, from: u32, to: u32, msg: Msg) {
        self.wire.push((from, to, msg));
    }

    /// Indices of messages that are first on their connection.
    fn deliverable(&self) -> Vec<usize> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (i, (from, to, _)) in self.wire.iter().enumerate() {
            if seen.insert((*from, *to)) {
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
                self.reads_checked += 1;
            }
            (Access::Write, Copy::Writable(_)) => {
                let v = self.next_value;
                self.next_value += 1;
                *copy = Copy::Writable(v);
                self.truth[page] = v;
                self.writes += 1;
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
        self.txns[rank as usize] = Some(Txn {
            page,
            access,
            phase: Phase::Waiting,
        });
        let home = self.home[page];
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
        self.locks[page] = Some(requester);
        let decision = decide(&mut self.entries[page], Rank(home), Rank(requester), access);
        match decision {
            Decision::Done { home_action, data } => {
                let before = self.home_copy_action(home, page, home_action);
                let (data, keep) = match data {
                    Data::None => (None, true),
                    Data::Zero => (Some(0), false),
                    Data::Home => (Some(before.expect("home data from an absent copy")), false),
                };
                if !keep && requester != home {
                    // The requester has no copy: the home releases the lock now and the requester sends no
                    // Unlock. A leaf request that reaches it before its install is deferred (see `deliver`).
                    self.unlock(page);
                }
                self.send(home, requester, Msg::Done { page, data, keep });
            }
            Decision::Grant(grant) => {
                let before = self.home_copy_action(home, page, grant.home_action);
                let data = if grant.data_from_home {
                    Some(before.expect("grant data from an absent home copy"))
                } else {
                    None
                };
                self.send(home, requester, Msg::Granted { page, grant, data });
            }
        }
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
        if let Msg::Fetch { page } | Msg::Invalidate { page, .. } = msg {
            let busy_here = self.txns[to as usize]
                .as_ref()
                .is_some_and(|t| t.page == page);
            if self.copies[to as usize][page] == Copy::Invalid && busy_here {
                self.deferred[to as usize].push((from, msg));
                return;
            }
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
            Msg::Granted { page, grant, data } => {
                let txn = self.txns[to as usize].as_mut().unwrap();
                assert_eq!(txn.page, page);
                let mut pending = BTreeSet::new();
                let mut out = Vec::new();
                if let Some(o) = grant.fetch_from {
                    pending.insert(o.0);
                    let m = match txn.access {
                        Access::Read => Msg::Fetch { page },
                        Access::Write => Msg::Invalidate { page, send: true },
                    };
                    out.push((o.0, m));
                }
                for r in grant.invalidate.iter() {
                    pending.insert(r.0);
                    out.push((r.0, Msg::Invalidate { page, send: false }));
                }
                let keep = data.is_none() && grant.fetch_from.is_none();
                txn.phase = if pending.is_empty() {
                    Phase::Installing {
                        data,
                        keep,
                        granted: true,
                    }
                } else {
                    Phase::Collecting {
                        pending,
                        data,
                        keep,
                    }
                };
                for (dst, m) in out {
                    self.send(to, dst, m);
                }
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
                let Phase::Collecting {
                    pending,
                    data,
                    keep,
                } = &mut txn.phase
                else {
                    panic!("leaf reply outside a transaction")
                };
                assert!(pending.remove(&from));
                if d.is_some() {
                    *data = d;
                }
                if pending.is_empty() {
                    txn.phase = Phase::Installing {
                        data: *data,
                        keep: *keep,
                        granted: true,
                    };
                }
            }
            Msg::Unlock {
                page,
                access,
                granted,
            } => {
                assert_eq!(self.locks[page], Some(from));
                if granted {
                    complete(&mut self.entries[page], Rank(from), access);
                }
                self.unlock(page);
            }
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
        for page in 0..self.truth.len() {
            let writers = (0..self.ranks)
                .filter(|r| matches!(self.copies[*r][page], Copy::Writable(_)))
                .count();
            let holders: Vec<usize> = (0..self.ranks)
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
            for r in &holders {
                assert_eq!(
                    self.copies[*r][page].value(),
                    Some(self.truth[page]),
                    "page {page}: rank {r} holds a stale copy"
                );
                // A copy the manager does not know of could never be invalidated. Copies in the middle of an
                // unfinished transaction are covered by the manager's lock instead.
                if self.locks[page].is_none() {
                    assert!(
                        self.entries[page].has_copy(Rank(*r as u32)),
                        "page {page}: rank {r} holds a copy the manager does not record"
                    );
                }
            }
        }
    }
}

fn run(seed: u64, ranks: usize, pages: usize, steps: usize) -> Sim {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sim = Sim::new(ranks, pages);
    for _ in 0..steps {
        // Choose among: start a transaction or a local access on an idle rank, deliver a message, install.
        let idle: Vec<u32> = (0..ranks as u32)
            .filter(|r| sim.txns[*r as usize].is_none())
            .collect();
        let installing: Vec<u32> = (0..ranks as u32)
            .filter(|r| {
                matches!(
                    sim.txns[*r as usize],
                    Some(Txn {
                        phase: Phase::Installing { .. },
                        ..
                    })
                )
            })
            .collect();
        let deliverable = sim.deliverable();
        let choices = idle.len() + installing.len() + deliverable.len();
        assert!(
            choices > 0,
            "deadlock: no rank can move and no message is in flight"
        );
        let mut k = rng.random_range(0..choices);
        if k < idle.len() {
            let page = rng.random_range(0..pages);
            let access = if rng.random_bool(0.5) {
                Access::Read
            } else {
                Access::Write
            };
            sim.start(idle[k], page, access);
        } else {
            k -= idle.len();
            if k < installing.len() {
                sim.install(installing[k]);
            } else {
                sim.deliver(deliverable[k - installing.len()]);
            }
        }
        sim.check();
    }
    sim
}

#[test]
fn copyset_set_operations() {
    let mut s = CopySet::EMPTY;
    assert!(s.is_empty());
    s.insert(Rank(3));
    s.insert(Rank(200));
    assert!(s.contains(Rank(3)) && s.contains(Rank(200)) && !s.contains(Rank(4)));
    assert_eq!(s.iter().collect::<Vec<_>>(), vec![Rank(3), Rank(200)]);
    s.remove(Rank(3));
    assert_eq!(s.iter().collect::<Vec<_>>(), vec![Rank(200)]);
}

#[test]
fn first_touch_gives_zeros_and_ownership() {
    let mut e = Entry::default();
    let d = decide(&mut e, Rank(0), Rank(1), Access::Read);
    assert_eq!(
        d,
        Decision::Done {
            home_action: HomeAction::None,
            data: Data::Zero
        }
    );
    assert_eq!(e.owner, Some(Rank(1)));
}

#[test]
fn write_by_a_reader_invalidates_the_other_readers_and_keeps_its_data() {
    let mut e = Entry {
        owner: Some(Rank(1)),
        copyset: CopySet::EMPTY,
    };
    e.copyset.insert(Rank(2));
    e.copyset.insert(Rank(0));
    let Decision::Grant(g) = decide(&mut e, Rank(0), Rank(2), Access::Write) else {
        panic!()
    };
    assert_eq!(g.home_action, HomeAction::Invalidate);
    assert_eq!(g.fetch_from, None, "the writer already holds the data");
    assert_eq!(g.invalidate.iter().collect::<Vec<_>>(), vec![Rank(1)]);
    complete(&mut e, Rank(2), Access::Write);
    assert_eq!(e.owner, Some(Rank(2)));
    assert!(e.copyset.is_empty());
}

#[test]
fn read_of_a_page_owned_by_its_home_is_answered_by_the_home() {
    let mut e = Entry {
        owner: Some(Rank(0)),
        copyset: CopySet::EMPTY,
    };
    let d = decide(&mut e, Rank(0), Rank(1), Access::Read);
    assert_eq!(
        d,
        Decision::Done {
            home_action: HomeAction::Downgrade,
            data: Data::Home
        }
    );
    assert!(e.copyset.contains(Rank(1)));
}

#[test]
fn a_page_handed_out_with_an_answer_that_never_arrived_is_withdrawn_to_what_it_was() {
    let home = Rank(0);
    let owned_by_home = {
        let mut e = Entry {
            owner: Some(home),
            copyset: CopySet::EMPTY,
        };
        e.copyset.insert(Rank(2));
        e
    };
    for (before, access) in [
        (Entry::default(), Access::Read),
        (Entry::default(), Access::Write),
        (owned_by_home, Access::Read),
    ] {
        let mut e = before;
        assert!(matches!(
            decide(&mut e, home, Rank(1), access),
            Decision::Done {
                data: Data::Zero | Data::Home,
                ..
            }
        ));
        assert_ne!(e, before, "{access:?} of {before:?} changed nothing");
        withdraw(&mut e, Rank(1));
        assert_eq!(e, before, "{access:?}");
    }
}

#[test]
fn randomized_interleavings_keep_single_writer_and_fresh_reads() {
    let mut reads = 0;
    let mut writes = 0;
    for seed in 0..300u64 {
        let ranks = 2 + (seed % 3) as usize;
        let pages = 1 + (seed % 2) as usize;
        let sim = run(seed, ranks, pages, 3000);
        reads += sim.reads_checked;
        writes += sim.writes;
    }
    // The runs must have exercised both kinds of access many times, or the invariants were checked on nothing.
    assert!(
        reads > 50_000 && writes > 50_000,
        "reads {reads}, writes {writes}"
    );
}

#[test]
fn ranks_that_left_leave_the_copyset_and_a_reader_takes_over_from_a_gone_owner() {
    let mut e = Entry {
        owner: Some(Rank(3)),
        copyset: CopySet::EMPTY,
    };
    for r in [1, 63, 64, 65, 200, 255] {
        e.copyset.insert(Rank(r));
    }
    assert_eq!(
        e.forget_gone(Rank(0), |r| [3, 63, 65, 255].contains(&r.0)),
        None
    );
    let left: Vec<u32> = e.copyset.iter().map(|r| r.0).collect();
    assert_eq!(left, vec![64, 200]);
    assert_eq!(
        e.owner,
        Some(Rank(1)),
        "the owner's read-only copy lives on at a reader"
    );
    // A write by rank 2 has no gone rank's copy dropped, and fetches the page from the new owner.
    match decide(&mut e, Rank(0), Rank(2), Access::Write) {
        Decision::Grant(g) => {
            assert_eq!(g.fetch_from, Some(Rank(1)));
            let asked: Vec<u32> = g.invalidate.iter().map(|r| r.0).collect();
            assert_eq!(asked, vec![64, 200]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_home_takes_over_from_a_gone_owner_whose_page_it_read() {
    // The owner wrote the page, the home read it, and the owner died: the home's copy is the page.
    let mut e = Entry {
        owner: Some(Rank(2)),
        copyset: CopySet::EMPTY,
    };
    e.copyset.insert(Rank(3));
    e.copyset.insert(Rank(0));
    assert_eq!(e.forget_gone(Rank(0), |r| r == Rank(2)), None);
    assert_eq!(e.owner, Some(Rank(0)));
    assert_eq!(e.copyset.iter().collect::<Vec<_>>(), vec![Rank(3)]);
    // A reader gets the home's copy, not a grant to fetch it from the dead rank.
    assert_eq!(
        decide(&mut e, Rank(0), Rank(1), Access::Read),
        Decision::Done {
            home_action: HomeAction::Downgrade,
            data: Data::Home
        }
    );
}

#[test]
fn a_gone_owner_with_the_only_copy_stays_the_owner_and_is_named_as_having_taken_the_data() {
    let mut e = Entry {
        owner: Some(Rank(2)),
        copyset: CopySet::EMPTY,
    };
    e.copyset.insert(Rank(3));
    let lost = e.forget_gone(Rank(0), |r| r == Rank(2) || r == Rank(3));
    assert_eq!(lost, Some(Rank(2)), "its copy was the only one");
    assert_eq!(e.owner, Some(Rank(2)));
    assert!(e.copyset.is_empty());
    // Pages nobody has touched, or whose owner lives, have lost nothing.
    assert_eq!(Entry::default().forget_gone(Rank(0), |_| true), None);
    let mut live = Entry {
        owner: Some(Rank(1)),
        copyset: CopySet::EMPTY,
    };
    assert_eq!(live.forget_gone(Rank(0), |r| r == Rank(2)), None);
}
