//! Runs a job: random steps, crashes at random steps, then everything under way to its end.

use super::*;

/// Runs `job` for its steps, with its crashes at random steps; then lets every message and fault still
/// under way finish, and checks that every fault of a rank alive did.
pub(in super::super) fn run(seed: u64, job: Job) -> Sim {
    let Job {
        ranks,
        steps,
        crashes,
        suspicions,
        crash_first_writers,
        ..
    } = job;
    let mut sim = Sim::new(seed, &job);
    let crash_at: BTreeSet<usize> = (0..crashes)
        .map(|_| sim.rng.random_range(0..steps))
        .collect();
    let suspect_at: BTreeSet<usize> = (0..suspicions)
        .map(|_| sim.rng.random_range(0..steps))
        .collect();
    // Crashes due (under `crash_first_writers`, one waits for a rank to strike).
    let mut due = 0;
    for step in 0..steps {
        if suspect_at.contains(&step) {
            sim.suspect_one();
        }
        if crash_at.contains(&step) {
            due += 1;
        }
        let live = || (0..ranks as u32).filter(|r| sim.alive[*r as usize]);
        if due > 0 && live().count() > 1 {
            let aim: Vec<u32> = live()
                .filter(|&r| !crash_first_writers || sim.first_write_waiting(r))
                .collect();
            if !aim.is_empty() {
                let victim = aim[sim.rng.random_range(0..aim.len())];
                due -= 1;
                sim.stats.crashes += 1;
                sim.crash(victim);
                sim.check();
            }
        }
        if !sim.step(true) {
            assert!(
                !sim.alive.iter().any(|a| *a),
                "deadlock: no rank can move and no message is in flight: transactions {:?}, deferred {:?}, locks {:?}, queued {:?}, alive {:?}",
                sim.txns, sim.deferred, sim.locks, sim.queues, sim.alive
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
    /// Whether `rank` has a request on the wire for a write with pages claimed after it.
    fn first_write_waiting(&self, rank: u32) -> bool {
        self.wire.iter().any(|(from, _, msg)| {
            *from == rank
                && matches!(
                    msg,
                    Msg::Acquire {
                        access: Access::Write,
                        extras: 1..,
                        ..
                    }
                )
        })
    }

    /// A rank alive takes another rank alive for failed, as its peer timeout does (both live on). Half
    /// the time, if there is one, a home takes for failed a requester it granted a transaction to: the
    /// narrow case where the home ends the grant early while it runs.
    fn suspect_one(&mut self) {
        let mut pairs: Vec<(u32, u32)> = (0..self.ranks as u32)
            .flat_map(|x| (0..self.ranks as u32).map(move |r| (x, r)))
            .filter(|&(x, r)| {
                x != r
                    && self.alive[x as usize]
                    && self.alive[r as usize]
                    && !self.failed[x as usize][r as usize]
            })
            .collect();
        let granting: Vec<(u32, u32)> = (0..self.truth.len())
            .filter_map(|p| match self.locks[p] {
                Some(Lock {
                    by,
                    held: Held::Granted { .. },
                    ..
                }) => Some((self.home[p], by)),
                _ => None,
            })
            .filter(|pair| pairs.contains(pair))
            .collect();
        if !granting.is_empty() && self.rng.random_bool(0.5) {
            pairs = granting;
        }
        if pairs.is_empty() {
            return;
        }
        let (x, r) = pairs[self.rng.random_range(0..pairs.len())];
        self.stats.suspicions += 1;
        self.learn_failed(x, r);
        self.check();
    }

    /// The ranks alive whose grant waits for a copy holder they cannot reach and do not know gone: each
    /// may give up (`LEAVING` passes), which fails its fault.
    fn waiting_in_vain(&self) -> Vec<u32> {
        if !self.timeouts {
            return Vec::new();
        }
        self.faulting()
            .filter(|r| {
                let gone = &self.gone[*r as usize];
                matches!(
                    &self.txns[*r as usize],
                    Some(Txn { phase: Phase::Collecting { unreachable, .. }, .. })
                        if unreachable.iter().any(|h| !gone[*h as usize])
                )
            })
            .collect()
    }

    /// The ranks alive that are in a fault.
    pub(super) fn faulting(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.ranks as u32)
            .filter(|r| self.alive[*r as usize] && self.txns[*r as usize].is_some())
    }

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
        let giving_up = self.waiting_in_vain();
        // The threads of a rank a home installed pages into directly read (or write) them before the
        // answer's install; only while ranks still fault, so that the job settles.
        let early = if start {
            self.installed_early()
        } else {
            Vec::new()
        };
        let choices =
            idle.len() + installing.len() + deliverable.len() + giving_up.len() + early.len();
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
                return true;
            }
            k -= installing.len();
            if k < early.len() {
                self.early_access(early[k]);
                return true;
            }
            k -= early.len();
            if k < deliverable.len() {
                self.deliver(deliverable[k]);
            } else {
                self.stats.timed_out += 1;
                self.crash(giving_up[k - deliverable.len()]);
            }
        }
        true
    }
}
