//! A bag of tasks on the tuple space: a master puts tasks, workers take and run them, results come back as
//! tuples. Workers take tasks under leases, so a task held by a rank that fails goes back into the bag and
//! another rank does it; its result is put in the same step as the lease ends, so every task's result
//! arrives exactly once.
//!
//! The bag lives on the master's rank (the farm picks its tuples' first field so that it hashes there): the
//! master puts and collects without the network, and the bag is lost only with the master, which would end
//! the farm anyway. Tasks and results are serde values, encoded with postcard.
//!
//! A task fails where its function panics, where it does not decode as the worker's type, or where its
//! result cannot be put (too large for the space): the worker ends its lease with a failure in place of
//! the result, and the master's [`TaskFarm::results`] reports it ([`RuntimeError::TaskFailed`]). It is not
//! run again: another worker would most likely fail the same way, and a task that every worker in turn
//! took and failed on would leave the master waiting for ever once none was left. The tasks the worker
//! held after it go back to the bag. Should the failure itself not go in (its home refuses it, or cannot
//! be reached), the failed task goes back to the bag too, and may be run again: kept leased by a rank
//! that goes on, it would leave the master waiting for ever.
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
//! let farm = TaskFarm::new(&space, "squares", dsm::Rank(0))?;
//! if rt.rank().0 == 0 {
//!     farm.put((0..100u64).map(|i| (i, i)))?;
//!     let results: Vec<(u64, u64)> = farm.results(100)?;
//!     farm.stop()?;
//! } else {
//!     farm.serve(|_id, x: u64| x * x)?;
//! }
//! drop(farm);
//! drop(space);
//! rt.finish()?; // the job went well (a rank that ends without it leaves as a failed one)
//! # Ok::<(), dsm_runtime::RuntimeError>(())
//! ```

use crate::tuple::{Template, Tuple, MAX_TUPLE_BYTES};
use crate::{template, tuple, Lease, RuntimeError, TupleSpace};
use dsm::Rank;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The task id of the mark that tells workers to stop (each worker puts it back for the next).
const STOP: u64 = u64::MAX;

/// The most bytes of a failed task's reason (a panic's message, say) that go to the master.
const MAX_REASON_BYTES: usize = 4096;

/// Why a task failed where it ran.
enum Failure {
    Error(RuntimeError),
    Panic(Box<dyn Any + Send>),
}

/// The longest name a task farm may have, in bytes. A worker's request at the end of its tasks names
/// what it takes next, a template for each rank's tasks holding the name: at most about 260 names
/// (`MAX_RANKS` of 256, and the farm's own) of 4 KiB, 1 MiB in all, well inside one service request.
pub const MAX_FARM_NAME: usize = 4096;

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
    /// The first field of the stop mark.
    stop_key: String,
    /// This rank.
    me: Rank,
    /// `serve` calls running on this rank through this farm or its clones.
    serving: Arc<AtomicUsize>,
    /// Whether this farm or a clone of it put the stop mark.
    stopped: Arc<AtomicBool>,
}

impl TaskFarm {
    /// The farm `name` whose master (and bag) is `master`. Every rank that takes part builds it with the
    /// same arguments; farms whose names differ are independent. A name holds at most [`MAX_FARM_NAME`]
    /// bytes and no NUL character (the farm's own keys use it to add to the name).
    pub fn new(space: &TupleSpace, name: &str, master: Rank) -> Result<TaskFarm, RuntimeError> {
        let refused = |reason: String| RuntimeError::Refused {
            rank: space.dsm().rank(),
            reason,
        };
        if name.len() > MAX_FARM_NAME {
            return Err(refused(format!(
                "a task farm's name holds at most {MAX_FARM_NAME} bytes, not {}: give it a shorter one",
                name.len()
            )));
        }
        if name.contains('\0') {
            return Err(refused(format!(
                "a task farm's name may not hold a NUL character (the farm adds to its name after one): {name:?}"
            )));
        }
        let size = space.dsm().size();
        if master.index() >= size {
            return Err(refused(format!(
                "a task farm's master must be a rank of the job: {master} is not in a job of {size} ranks"
            )));
        }
        // Tasks, results and the stop mark share one home, the master: a worker ends a lease and puts its
        // result in one step. Each kind has a first field of its own, so each has its own bucket there:
        // taking a result never scans past the tasks still in the bag, nor a task past results not yet
        // collected, and the stop mark is taken only once every task bucket is empty.
        let homed_at_master = |prefix: String| {
            (0u64..)
                .map(|k| format!("{prefix}#{k}"))
                .find(|k| space.home_of(Some(&k.as_str().into()), 4) == master)
                .expect("some suffix hashes to every rank")
        };
        Ok(TaskFarm {
            space: space.clone(),
            key: homed_at_master(name.to_string()),
            results_key: homed_at_master(format!("{name}\0results")),
            near: (0..space.dsm().size())
                .map(|r| homed_at_master(format!("{name}\0near{r}")))
                .collect(),
            stop_key: homed_at_master(format!("{name}\0stop")),
            me: space.dsm().rank(),
            serving: Arc::new(AtomicUsize::new(0)),
            stopped: Arc::new(AtomicBool::new(false)),
        })
    }

    fn tasks(&self) -> Template {
        template!(self.key.as_str(), "task", ?u64, ?Vec<u8>)
    }

    fn tasks_near(&self, rank: usize) -> Template {
        template!(self.near[rank].as_str(), "task", ?u64, ?Vec<u8>)
    }

    /// What a worker of this rank takes, in order of preference: tasks near it, tasks for anyone, tasks
    /// near the other ranks, the stop mark. When there is none of them, it waits for the first of any.
    /// (One template per rank and two: within what a home takes in one request, for the largest job.)
    fn wanted(&self) -> Vec<Template> {
        let (me, n) = (self.me.index(), self.near.len());
        let mut order = vec![self.tasks_near(me), self.tasks()];
        order.extend((1..n).map(|k| self.tasks_near((me + k) % n)));
        order.push(template!(self.stop_key.as_str(), "task", ?u64, ?Vec<u8>));
        order
    }

    fn check_id(id: u64) -> Result<(), RuntimeError> {
        if id == STOP {
            return Err(RuntimeError::Codec {
                what: format!("task {id}"),
                reason: "task ids must be below u64::MAX (that one means stop)".into(),
            });
        }
        Ok(())
    }

    /// The tuple `(key, kind, id, value encoded)`.
    fn encode<T: Serialize>(
        key: &str,
        kind: &str,
        id: u64,
        value: &T,
    ) -> Result<Tuple, RuntimeError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| RuntimeError::Codec {
            what: format!("{kind} {id}"),
            reason: e.to_string(),
        })?;
        Ok(tuple!(key, kind, id, bytes))
    }

    /// Puts tasks into the bag: `(id, task)` pairs, ids below `u64::MAX` (that one means stop).
    pub fn put<T: Serialize>(
        &self,
        tasks: impl IntoIterator<Item = (u64, T)>,
    ) -> Result<(), RuntimeError> {
        let mut batch = Vec::new();
        for (id, task) in tasks {
            Self::check_id(id)?;
            batch.push(Self::encode(&self.key, "task", id, &task)?);
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
                        "it is put near {rank}, and the job has {} ranks: put it near one of them",
                        self.near.len()
                    ),
                });
            };
            batch.push(Self::encode(key, "task", id, &task)?);
        }
        self.space.out_many(batch)
    }

    /// Waits for `n` results and returns them as `(task id, result)`, in the order they came. Fails with
    /// [`RuntimeError::TaskFailed`] when a task failed where it ran (once for each such task: the results
    /// taken until then stay in the space, for the next call), with [`RuntimeError::WorkerFailed`] when a
    /// rank's workers could not take part ([`TaskFarm::cannot_serve`]), and with [`RuntimeError::NoWorkers`]
    /// instead of waiting for ever once every other rank has failed or is leaving the job (its program
    /// reached its final barrier: [`dsm::Dsm::finishing_ranks`]) while no `serve` runs on this rank
    /// (through this farm or a clone of it).
    ///
    /// Refused once the farm is stopped ([`TaskFarm::stop`]): workers that found the bag empty have left,
    /// and a task that a failed worker held, back in the bag, would wait for a worker that never comes.
    /// Stop the farm after its results are in.
    pub fn results<R: DeserializeOwned>(&self, n: usize) -> Result<Vec<(u64, R)>, RuntimeError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(RuntimeError::Refused {
                rank: self.me,
                reason: "results were asked for after stop() was called on the task farm (a stop() that returned an error counts: its mark may have gone in): call stop() once the results are in (workers leave when they find the bag empty, and would not come back for a task a failed worker held)".into(),
            });
        }
        let wanted = self.results_and_failures();
        let dsm = self.space.dsm();
        // Room for the results as they come (n is the caller's: it may be far more than will fit).
        let mut got = Vec::with_capacity(n.min(4096));
        // Looks in a row that found no worker anywhere (two are needed, so that a worker thread of this
        // rank that is only starting is not missed).
        let mut deserted = 0;
        // Results taken go back to the space if this call fails: a later call may still take them.
        let fail = |got: Vec<Tuple>, e: RuntimeError| {
            let _ = self.space.out_many(got);
            Err(e)
        };
        while got.len() < n {
            let t = match self.space.in_timeout(&wanted, Self::RESULTS_LOOK) {
                Ok(t) => t,
                Err(e) => return fail(got, e),
            };
            let Some(t) = t else {
                // Ranks that failed, and ranks whose programs are leaving the job (a worker that stopped
                // at a failed task, and went on to finish), will serve no more.
                let (failed, leaving) = (dsm.failed_ranks(), dsm.finishing_ranks());
                let alone = (0..dsm.size() as u32)
                    .map(Rank)
                    .filter(|r| *r != self.me)
                    .all(|r| failed.contains(&r) || leaving.contains(&r));
                if alone && dsm.size() > 1 && self.serving.load(Ordering::Acquire) == 0 {
                    deserted += 1;
                    if deserted == 2 {
                        let missing = n - got.len();
                        return fail(got, RuntimeError::NoWorkers { missing });
                    }
                } else {
                    deserted = 0;
                }
                continue;
            };
            if t.get::<String>(1).is_ok_and(|kind| kind == "failed") {
                return fail(got, Self::failed_task(&t));
            }
            got.push(t);
        }
        // Decoded once all are taken: a result that does not decode as `R` puts every one taken back
        // (another type may read them), instead of losing those before it.
        let decoded: Result<Vec<(u64, R)>, RuntimeError> = got
            .iter()
            .map(|t| {
                let id = t.get::<u64>(2)?;
                Ok((id, decode(t, "result", id)?))
            })
            .collect();
        match decoded {
            Ok(results) => Ok(results),
            Err(e) => fail(got, e),
        }
    }

    /// Results and failures: `(results key, "result" | "failed", id, bytes)`.
    fn results_and_failures(&self) -> Template {
        template!(self.results_key.as_str(), ?String, ?u64, ?Vec<u8>)
    }

    /// Tells the master that this rank's workers cannot take part (whatever they needed to serve
    /// could not be set up): the master's [`TaskFarm::results`] fails with
    /// [`RuntimeError::WorkerFailed`], naming this rank and `reason`. Without it, the others would do
    /// every task and the master would not know that a rank of its job had failed to set up.
    pub fn cannot_serve(&self, reason: &str) -> Result<(), RuntimeError> {
        self.space.out(self.failure_tuple(STOP, reason.to_string()))
    }

    /// Takes the word of a rank whose workers could not take part ([`TaskFarm::cannot_serve`]), if one is
    /// in the space: for a master that got every result without it (that rank came late, say) and must
    /// not take the farm for having run whole.
    pub fn worker_failure(&self) -> Result<Option<RuntimeError>, RuntimeError> {
        let said = template!(self.results_key.as_str(), "failed", STOP, ?Vec<u8>);
        Ok(self.space.inp(&said)?.map(|t| Self::failed_task(&t)))
    }

    /// What a worker puts in place of the result of task `id`, which failed there.
    fn failure(&self, id: u64, failure: &Failure) -> Tuple {
        let reason = match failure {
            Failure::Error(e) => e.to_string(),
            Failure::Panic(payload) => {
                format!("its function panicked: {}", dsm::panic_message(&**payload))
            }
        };
        self.failure_tuple(id, reason)
    }

    /// The failure of task `id` (`STOP`: of the rank's workers) for `reason`, which is cut short past
    /// `MAX_REASON_BYTES`.
    fn failure_tuple(&self, id: u64, mut reason: String) -> Tuple {
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push_str("...");
        }
        // A u32 and a string of bounded length always encode.
        let bytes = postcard::to_allocvec(&(self.me.0, reason)).unwrap_or_default();
        tuple!(self.results_key.as_str(), "failed", id, bytes)
    }

    /// The error a failure tuple reports.
    fn failed_task(t: &Tuple) -> RuntimeError {
        let id = t.get::<u64>(2).unwrap_or(STOP);
        let decoded = t
            .get::<Vec<u8>>(3)
            .ok()
            .and_then(|b| postcard::from_bytes::<(u32, String)>(&b).ok());
        match decoded {
            Some((rank, reason)) if id == STOP => RuntimeError::WorkerFailed {
                rank: Rank(rank),
                reason,
            },
            Some((rank, reason)) => RuntimeError::TaskFailed {
                id,
                rank: Rank(rank),
                reason,
            },
            None => RuntimeError::Codec {
                what: format!("the failure of task {id}"),
                reason: "does not decode".into(),
            },
        }
    }

    /// Runs task `id` (the tuple `task`) with `f`: its result, ready to put, or why it failed.
    fn run_one<T: DeserializeOwned, R: Serialize>(
        &self,
        f: &mut impl FnMut(u64, T) -> R,
        id: u64,
        task: &Tuple,
    ) -> Result<Tuple, Failure> {
        let task = decode(task, "task", id).map_err(Failure::Error)?;
        let result = catch_unwind(AssertUnwindSafe(|| f(id, task))).map_err(Failure::Panic)?;
        let t = Self::encode(&self.results_key, "result", id, &result).map_err(Failure::Error)?;
        t.check().map_err(|e| Failure::Error(e.into()))?;
        Ok(t)
    }

    /// How often a master waiting for results looks whether any worker is left.
    const RESULTS_LOOK: Duration = Duration::from_millis(200);

    /// Takes back the tasks still in the bag (not those a worker holds), so that workers stop sooner after
    /// [`TaskFarm::stop`]; returns how many. Only the master calls it, before `stop`.
    pub fn withdraw(&self) -> Result<usize, RuntimeError> {
        let mut n = 0;
        let bags =
            std::iter::once(self.tasks()).chain((0..self.near.len()).map(|r| self.tasks_near(r)));
        for tasks in bags {
            while self.space.inp(&tasks)?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Tells the workers to stop once the bag is empty: a worker takes the stop mark only when no task is
    /// left for it to take, its own, anyone's or other ranks'. Call it once the results are in
    /// ([`TaskFarm::results`] is refused afterwards, also when `stop` returned an error: the mark may
    /// have gone in all the same), or to give up on the tasks left.
    pub fn stop(&self) -> Result<(), RuntimeError> {
        self.stopped.store(true, Ordering::Release);
        self.space.out(tuple!(
            self.stop_key.as_str(),
            "task",
            STOP,
            Vec::<u8>::new()
        ))
    }

    /// Takes the stop mark back out of the space, and the results nobody took (those of tasks that
    /// ended after the master stopped waiting, as when a job fails while others run), so that a farm that
    /// is done leaves nothing behind (a program that runs many farms would otherwise keep a mark, and
    /// perhaps results, per farm). Only the master calls it, and only once every worker of the farm, on
    /// every rank, has returned from [`TaskFarm::serve`]: a worker still serving would find neither task
    /// nor mark and wait for ever. Whether the mark was there.
    pub fn close(&self) -> Result<bool, RuntimeError> {
        let mark = template!(self.stop_key.as_str(), "task", STOP, ?Vec<u8>);
        let found = self.space.inp(&mark)?.is_some();
        let results = self.results_and_failures();
        while self.space.inp(&results)?.is_some() {}
        Ok(found)
    }

    /// Takes tasks and runs `f` on each until the farm stops; returns the number of tasks this worker did.
    /// A task that fails here (see the module's documentation) is reported to the master in place of its
    /// result, and this worker stops: `serve` returns the error, or, where `f` panicked, the panic goes on
    /// from here.
    ///
    /// Tasks that take less time than a round trip to the bag are taken several at a time (a batch, sized
    /// by the time tasks take): each trip ends the leases of the tasks just done, puts their results, and
    /// leases the next ones.
    pub fn serve<T: DeserializeOwned, R: Serialize>(
        &self,
        mut f: impl FnMut(u64, T) -> R,
    ) -> Result<usize, RuntimeError> {
        self.serving.fetch_add(1, Ordering::AcqRel);
        let _serving = Serving(&self.serving);
        let wanted = self.wanted();
        let mut leases = self
            .space
            .complete_and_lease_many(&mut [], Vec::new(), &wanted, 0)?;
        let mut batch = Batch::default();
        let mut done = 0;
        loop {
            // The stop mark goes back for the other workers before anything else: nothing that goes wrong
            // below may keep it. (It comes only once the task buckets were empty, so normally alone.)
            let (marks, tasks): (Vec<Lease>, Vec<Lease>) = leases
                .into_iter()
                .partition(|l| matches!(l.tuple.get::<u64>(2), Ok(STOP)));
            let stopping = !marks.is_empty();
            // Until their results are put, the tasks go back to the bag if anything below fails (putting
            // the stop mark back included) or `f` panics: another worker does them, and nothing waits for
            // ever on a task held by a rank that is still alive.
            let mut held = Held {
                space: &self.space,
                leases: tasks,
            };
            for mark in marks {
                let back = mark.tuple.clone();
                self.space.complete(mark, vec![back])?;
            }
            let started = Instant::now();
            let mut results = Vec::with_capacity(held.leases.len());
            let mut failed = None;
            for lease in &held.leases {
                let id = lease.tuple.get::<u64>(2)?;
                match self.run_one(&mut f, id, &lease.tuple) {
                    Ok(result) => results.push(result),
                    Err(failure) => {
                        results.push(self.failure(id, &failure));
                        failed = Some(failure);
                        break;
                    }
                }
            }
            let ran = results.len();
            done += ran - usize::from(failed.is_some());
            // Results go to the space in requests of at most MAX_TUPLE_BYTES of data each (with the
            // leases they end), so that many large results never make one request too large to send.
            while let Some(k) = first_requests_worth(&results) {
                let rest = results.split_off(k);
                held.complete_first(results)?;
                results = rest;
            }
            if let Some(failure) = failed {
                // The failure goes in with the results before it; the tasks after it, not run, go back to
                // the bag as `held` is dropped.
                held.complete_first(results)?;
                drop(held);
                return match failure {
                    Failure::Error(e) => Err(e),
                    Failure::Panic(payload) => resume_unwind(payload),
                };
            }
            // The tasks stay held until their results are in: if that fails (a result too large for the
            // space, say), they go back to the bag instead of staying leased to this live rank for ever.
            if stopping {
                if ran > 0 {
                    held.complete_first(results)?;
                }
                return Ok(done);
            }
            let work = started.elapsed();
            let trip = Instant::now();
            leases = self.space.complete_and_lease_many(
                &mut held.leases,
                results,
                &wanted,
                batch.more(),
            )?;
            held.leases.clear();
            batch.observe(work, ran, trip.elapsed());
        }
    }
}

// A worker's templates (`TaskFarm::wanted`: one per rank and two) fit in one request to a home, in the
// largest job.
const _: () = assert!(dsm::protocol::swmr::MAX_RANKS + 2 <= crate::tuple_home::MAX_NEXT_TEMPLATES);

/// How many of `results`, from the first, to send in a request of their own before the rest: `None` when
/// all fit in one (at most [`MAX_TUPLE_BYTES`] of strings and byte strings in all). Always at least one.
fn first_requests_worth(results: &[Tuple]) -> Option<usize> {
    let mut total = 0;
    for (k, r) in results.iter().enumerate() {
        total += r.byte_len();
        if total > MAX_TUPLE_BYTES {
            return Some(k.max(1));
        }
    }
    None
}

/// A running `serve`, counted in its farm's `serving` until it ends.
struct Serving<'a>(&'a AtomicUsize);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Leases of tasks being run, given back if they are dropped before their results are put.
struct Held<'a> {
    space: &'a TupleSpace,
    leases: Vec<Lease>,
}

impl Held<'_> {
    /// Ends the leases of the first `results.len()` tasks held, putting `results` (one for each, in
    /// order). If that fails, the tasks stay held, and go back to the bag with the rest.
    fn complete_first(&mut self, results: Vec<Tuple>) -> Result<(), RuntimeError> {
        let mut leases: Vec<Lease> = self.leases.drain(..results.len()).collect();
        if let Err(e) = self.space.complete_many(&mut leases, results) {
            self.leases.splice(0..0, leases);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.leases.is_empty() {
            if let Err(e) = self.space.give_back(std::mem::take(&mut self.leases)) {
                eprintln!("dsm-runtime: giving back tasks this worker did not finish: {e}");
            }
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
    /// the link; the first is believed up to [`Batch::FIRST_TRIP_NS`].
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
    /// The most a first trip is believed to take: it often waited for the first tasks to be put.
    const FIRST_TRIP_NS: f64 = 1e6;

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
        self.trip_ns = if self.trip_ns == 0.0 {
            t.min(Self::FIRST_TRIP_NS)
        } else if t < self.trip_ns {
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

    #[test]
    fn results_are_cut_into_requests_of_at_most_a_tuples_worth() {
        let mb = |n: usize| tuple!(vec![0u8; n << 20]);
        // Small results all go in one request.
        assert_eq!(first_requests_worth(&[tuple!(1u64), tuple!(2u64)]), None);
        assert_eq!(first_requests_worth(&[]), None);
        // 1 MiB each: eight fit in one request, the ninth starts the next.
        let nine: Vec<Tuple> = (0..9).map(|_| mb(1)).collect();
        assert_eq!(first_requests_worth(&nine), Some(8));
        assert_eq!(first_requests_worth(&nine[8..]), None);
        // One result that is a request's worth on its own goes alone.
        let big = Tuple(
            (0..9)
                .map(|_| crate::Value::from(vec![0u8; 1 << 20]))
                .collect(),
        );
        assert_eq!(first_requests_worth(&[big.clone(), mb(1)]), Some(1));
    }

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

        // A first trip that waited seconds for the first tasks (reduces after maps, say).
        let mut first = Batch::default();
        first.observe(Duration::from_millis(5), 1, Duration::from_secs(3));
        assert_eq!(first.trip_ns, Batch::FIRST_TRIP_NS);
        assert_eq!(first.more(), 0, "5 ms tasks still go one per trip");
    }
}
