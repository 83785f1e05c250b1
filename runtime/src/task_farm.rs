//! A bag of tasks on the tuple space: a master puts tasks, workers take and run them, results come back as
//! tuples. Workers take tasks under leases, so a task held by a rank that fails goes back into the bag and
//! another rank does it; its result is put in the same step as the lease ends, so every task's result
//! arrives exactly once.
//!
//! The bag lives on the master's rank (the farm picks its tuples' first field so that it hashes there): the
//! master puts and collects without the network, and the bag is lost only with the master, which would end
//! the farm anyway. Tasks and results are serde values, encoded with postcard.
//!
//! A task can name the rank it would best run on, where its data lives ([`TaskFarm::put_near`]): each
//! worker takes the tasks near it first, then tasks for anyone, then the tasks of other ranks that are still
//! waiting (so a slow or dead rank's share still gets done). Workers take several tasks per trip when tasks
//! are short (see `Batch`).
//!
//! ```no_run
//! use dsm_runtime::{Runtime, TaskFarm, TupleSpace};
//! let rt = Runtime::init()?;
//! let space = TupleSpace::join(&rt)?;
//! let farm = TaskFarm::new(&space, "squares", dsm::Rank(0));
//! if rt.rank().0 == 0 {
//!     farm.put((0..100u64).map(|i| (i, i)))?;
//!     let results: Vec<(u64, u64)> = farm.results(100)?;
//!     farm.stop()?;
//! } else {
//!     farm.serve(|_id, x: u64| x * x)?;
//! }
//! # Ok::<(), dsm_runtime::RuntimeError>(())
//! ```

use crate::tuple::{Template, Tuple};
use crate::{template, tuple, RuntimeError, TupleSpace};
use dsm::Rank;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::{Duration, Instant};

/// The task id that tells workers to stop (it is put back for the next worker).
const STOP: u64 = u64::MAX;

/// The task id of a nudge: put with tasks near ranks, so that a worker waiting for tasks for anyone wakes
/// and looks at its own. Taken and dropped. Task ids stay below it.
const NUDGE: u64 = u64::MAX - 1;

/// A bag of tasks named `name`, with its master.
#[derive(Debug, Clone)]
pub struct TaskFarm {
    space: TupleSpace,
    /// The first field of task tuples.
    key: String,
    /// The first field of result tuples.
    results_key: String,
    /// The first field of tasks near each rank, by rank.
    near: Vec<String>,
    /// This rank.
    me: Rank,
}

impl TaskFarm {
    /// The farm `name` whose master (and bag) is `master`. Every rank that takes part builds it with the
    /// same arguments.
    pub fn new(space: &TupleSpace, name: &str, master: Rank) -> TaskFarm {
        // Tasks and results share one home, the master: a worker ends a lease and puts its result in one
        // step. They have first fields of their own, so that each kind has its own bucket there: taking a
        // result never scans past the tasks still in the bag, nor a task past results not yet collected.
        let homed_at_master = |prefix: String| {
            (0u64..)
                .map(|k| format!("{prefix}#{k}"))
                .find(|k| space.home_of(Some(&k.as_str().into()), 4) == master)
                .expect("some suffix hashes to every rank")
        };
        TaskFarm {
            space: space.clone(),
            key: homed_at_master(name.to_string()),
            results_key: homed_at_master(format!("{name}#results")),
            near: (0..space.dsm().size())
                .map(|r| homed_at_master(format!("{name}#near{r}")))
                .collect(),
            me: space.dsm().rank(),
        }
    }

    fn tasks(&self) -> Template {
        template!(self.key.as_str(), "task", ?u64, ?Vec<u8>)
    }

    fn tasks_near(&self, rank: usize) -> Template {
        template!(self.near[rank].as_str(), "task", ?u64, ?Vec<u8>)
    }

    /// What a worker of this rank looks for, in order: tasks near it, tasks for anyone, tasks near the
    /// other ranks; and, when there are none, it waits for tasks for anyone (where nudges and the stop mark
    /// go).
    fn wanted(&self) -> Vec<Template> {
        let (me, n) = (self.me.index(), self.near.len());
        let mut order = vec![self.tasks_near(me), self.tasks()];
        order.extend((1..n).map(|k| self.tasks_near((me + k) % n)));
        if n > 1 {
            order.push(self.tasks());
        }
        order
    }

    fn check_id(id: u64) -> Result<(), RuntimeError> {
        if id >= NUDGE {
            return Err(RuntimeError::Codec {
                what: format!("task {id}"),
                reason: format!("task ids must be below {NUDGE}"),
            });
        }
        Ok(())
    }

    fn encode<T: Serialize>(&self, kind: &str, id: u64, value: &T) -> Result<Tuple, RuntimeError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| RuntimeError::Codec {
            what: format!("{kind} {id}"),
            reason: e.to_string(),
        })?;
        let key = if kind == "result" {
            &self.results_key
        } else {
            &self.key
        };
        Ok(tuple!(key.as_str(), kind, id, bytes))
    }

    /// Puts tasks into the bag: `(id, task)` pairs, ids below `u64::MAX - 1` (the two above are the
    /// farm's own marks).
    pub fn put<T: Serialize>(
        &self,
        tasks: impl IntoIterator<Item = (u64, T)>,
    ) -> Result<(), RuntimeError> {
        let mut batch = Vec::new();
        for (id, task) in tasks {
            Self::check_id(id)?;
            batch.push(self.encode("task", id, &task)?);
        }
        self.space.out_many(batch)
    }

    /// Puts tasks that would best run on a given rank (where their data is homed): `(id, rank, task)`.
    /// That rank's workers take them before any other task; other ranks take them once they have nothing
    /// else to do. Ids as for [`TaskFarm::put`].
    pub fn put_near<T: Serialize>(
        &self,
        tasks: impl IntoIterator<Item = (u64, Rank, T)>,
    ) -> Result<(), RuntimeError> {
        let mut batch = Vec::new();
        for (id, rank, task) in tasks {
            Self::check_id(id)?;
            let Some(key) = self.near.get(rank.index()) else {
                return Err(RuntimeError::Codec {
                    what: format!("task {id}"),
                    reason: format!(
                        "it is put near {rank}, and the job has {} ranks",
                        self.near.len()
                    ),
                });
            };
            let bytes = postcard::to_allocvec(&task).map_err(|e| RuntimeError::Codec {
                what: format!("task {id}"),
                reason: e.to_string(),
            })?;
            batch.push(tuple!(key.as_str(), "task", id, bytes));
        }
        // Workers already waiting wait for tasks for anyone: one nudge per rank wakes them to look.
        for _ in 0..self.near.len() {
            batch.push(tuple!(self.key.as_str(), "task", NUDGE, Vec::<u8>::new()));
        }
        self.space.out_many(batch)
    }

    /// Waits for `n` results and returns them as `(task id, result)`, in the order they came.
    pub fn results<R: DeserializeOwned>(&self, n: usize) -> Result<Vec<(u64, R)>, RuntimeError> {
        let wanted = template!(self.results_key.as_str(), "result", ?u64, ?Vec<u8>);
        (0..n)
            .map(|_| {
                let t = self.space.in_(&wanted)?;
                let id = t.get::<u64>(2)?;
                Ok((id, decode(&t, "result", id)?))
            })
            .collect()
    }

    /// Takes back the tasks still in the bag (not those a worker holds), so that workers stop sooner after
    /// [`TaskFarm::stop`]; returns how many. Only the master calls it, before `stop`.
    pub fn withdraw(&self) -> Result<usize, RuntimeError> {
        let mut n = 0;
        let mut stopped = false;
        let bags =
            std::iter::once(self.tasks()).chain((0..self.near.len()).map(|r| self.tasks_near(r)));
        for tasks in bags {
            while let Some(t) = self.space.inp(&tasks)? {
                match t.get::<u64>(2)? {
                    NUDGE => {}
                    STOP => stopped = true,
                    _ => n += 1,
                }
            }
        }
        if stopped {
            // Called after `stop` after all: the mark stays for the workers.
            self.stop()?;
        }
        Ok(n)
    }

    /// Tells the workers to stop once the bag is empty of earlier tasks.
    pub fn stop(&self) -> Result<(), RuntimeError> {
        self.space
            .out(tuple!(self.key.as_str(), "task", STOP, Vec::<u8>::new()))
    }

    /// Takes tasks and runs `f` on each until the farm stops; returns the number of tasks this worker did.
    ///
    /// Tasks that take less time than a round trip to the bag are taken several at a time (see [`Batch`]):
    /// each trip ends the leases of the tasks just done, puts their results, and leases the next ones.
    pub fn serve<T: DeserializeOwned, R: Serialize>(
        &self,
        mut f: impl FnMut(u64, T) -> R,
    ) -> Result<usize, RuntimeError> {
        let wanted = self.wanted();
        let mut leases = self
            .space
            .complete_and_lease_many(Vec::new(), Vec::new(), &wanted, 0)?;
        let mut batch = Batch::default();
        let mut done = 0;
        loop {
            let started = Instant::now();
            let (mut ended, mut results, mut stop) = (Vec::new(), Vec::new(), None);
            for lease in leases {
                let id = lease.tuple.get::<u64>(2)?;
                if id == STOP {
                    stop = Some(lease);
                    continue;
                }
                if id == NUDGE {
                    ended.push(lease);
                    continue;
                }
                let task = decode(&lease.tuple, "task", id)?;
                results.push(self.encode("result", id, &f(id, task))?);
                ended.push(lease);
            }
            let ran = results.len();
            done += ran;
            if let Some(mark) = stop {
                // Leave the stop mark for the other workers.
                results.push(mark.tuple.clone());
                ended.push(mark);
                self.space.complete_many(ended, results)?;
                return Ok(done);
            }
            let work = started.elapsed();
            let trip = Instant::now();
            leases = self
                .space
                .complete_and_lease_many(ended, results, &wanted, batch.more())?;
            batch.observe(work, ran, trip.elapsed());
        }
    }
}

/// How many tasks a worker takes per trip to the bag: about as many as it runs in one round trip, so that
/// tiny tasks do not each pay a trip while a task longer than a trip is taken alone (load stays balanced
/// to within about one round trip of work). Between 1 and [`Batch::MAX`].
#[derive(Debug, Clone, Copy)]
struct Batch {
    /// Estimated time of one task, in nanoseconds (a moving average).
    task_ns: f64,
    /// Estimated round trip, in nanoseconds: follows a faster trip at once and a slower one slowly (by at
    /// most an eighth per trip), since a trip that waited for the master to put tasks says nothing about
    /// the link.
    trip_ns: f64,
}

impl Default for Batch {
    fn default() -> Self {
        // No measurement yet: one task per trip.
        Batch {
            task_ns: f64::INFINITY,
            trip_ns: 0.0,
        }
    }
}

impl Batch {
    const MAX: u32 = 64;

    /// How many tasks to take beyond the first.
    fn more(&self) -> u32 {
        let n = self.trip_ns / self.task_ns.max(1.0);
        (n as u32).clamp(1, Self::MAX) - 1
    }

    /// `ran` tasks took `work` in all; the trip that ended them and fetched the next took `trip`.
    fn observe(&mut self, work: Duration, ran: usize, trip: Duration) {
        if ran > 0 {
            let per_task = work.as_nanos() as f64 / ran as f64;
            self.task_ns = if self.task_ns.is_finite() {
                0.75 * self.task_ns + 0.25 * per_task
            } else {
                per_task
            };
        }
        let t = trip.as_nanos() as f64;
        self.trip_ns = if self.trip_ns == 0.0 || t < self.trip_ns {
            t
        } else {
            self.trip_ns + (t.min(2.0 * self.trip_ns) - self.trip_ns) / 8.0
        };
    }
}

fn decode<T: DeserializeOwned>(t: &Tuple, kind: &str, id: u64) -> Result<T, RuntimeError> {
    let bytes = t.get::<Vec<u8>>(3)?;
    postcard::from_bytes(&bytes).map_err(|e| RuntimeError::Codec {
        what: format!("{kind} {id}"),
        reason: format!("does not decode as the type asked for: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_worker_takes_one_task_until_it_has_measured() {
        assert_eq!(Batch::default().more(), 0);
    }

    #[test]
    fn tiny_tasks_are_taken_many_per_trip_and_long_ones_alone() {
        let mut tiny = Batch::default();
        tiny.observe(us(1), 1, us(100));
        assert_eq!(
            tiny.more(),
            Batch::MAX - 1,
            "100 tasks fit in a trip: capped"
        );
        // 20 us a task now: the average moves to 5.75 us, 17 tasks per 100 us trip.
        tiny.observe(us(200), 10, us(100));
        assert_eq!(tiny.more(), 16, "{tiny:?}");

        let mut long = Batch::default();
        long.observe(Duration::from_millis(50), 1, us(100));
        assert_eq!(long.more(), 0);
    }

    #[test]
    fn a_trip_that_waited_for_tasks_raises_the_batch_only_a_little() {
        let mut b = Batch::default();
        b.observe(us(10), 1, us(100));
        let before = b.more();
        b.observe(us(10), 1, Duration::from_millis(10));
        assert_eq!(b.trip_ns, 112_500.0, "{b:?}");
        assert_eq!(b.more(), before + 1);
        b.observe(us(10), 1, us(80));
        assert_eq!(b.trip_ns, 80_000.0, "a faster trip is believed at once");
    }
}
