//! A bag of tasks on the tuple space: a master puts tasks, workers take and run them, results come back as
//! tuples. Workers take tasks under leases, so a task held by a rank that fails goes back into the bag and
//! another rank does it; its result is put in the same step as the lease ends, so every task's result
//! arrives exactly once.
//!
//! The bag lives on the master's rank (the farm picks its tuples' first field so that it hashes there): the
//! master puts and collects without the network, and the bag is lost only with the master, which would end
//! the farm anyway. Tasks and results are serde values, encoded with postcard.
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

/// The task id that tells workers to stop (it is put back for the next worker).
const STOP: u64 = u64::MAX;

/// A bag of tasks named `name`, with its master.
#[derive(Debug, Clone)]
pub struct TaskFarm {
    space: TupleSpace,
    key: String,
}

impl TaskFarm {
    /// The farm `name` whose master (and bag) is `master`. Every rank that takes part builds it with the
    /// same arguments.
    pub fn new(space: &TupleSpace, name: &str, master: Rank) -> TaskFarm {
        // Tasks and results have the same first field and arity, so they share one home: a worker ends a
        // lease and puts its result in one step. Pick the first field so that this home is the master.
        let key = (0u64..)
            .map(|k| format!("{name}#{k}"))
            .find(|k| space.home_of(Some(&k.as_str().into()), 4) == master)
            .expect("some suffix hashes to every rank");
        TaskFarm {
            space: space.clone(),
            key,
        }
    }

    fn tasks(&self) -> Template {
        template!(self.key.as_str(), "task", ?u64, ?Vec<u8>)
    }

    fn encode<T: Serialize>(&self, kind: &str, id: u64, value: &T) -> Result<Tuple, RuntimeError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| RuntimeError::Codec {
            what: format!("{kind} {id}"),
            reason: e.to_string(),
        })?;
        Ok(tuple!(self.key.as_str(), kind, id, bytes))
    }

    /// Puts tasks into the bag: `(id, task)` pairs, ids below `u64::MAX` (that one means stop).
    pub fn put<T: Serialize>(
        &self,
        tasks: impl IntoIterator<Item = (u64, T)>,
    ) -> Result<(), RuntimeError> {
        let mut batch = Vec::new();
        for (id, task) in tasks {
            if id == STOP {
                return Err(RuntimeError::Codec {
                    what: format!("task {id}"),
                    reason: "task ids must be below u64::MAX".into(),
                });
            }
            batch.push(self.encode("task", id, &task)?);
        }
        self.space.out_many(batch)
    }

    /// Waits for `n` results and returns them as `(task id, result)`, in the order they came.
    pub fn results<R: DeserializeOwned>(&self, n: usize) -> Result<Vec<(u64, R)>, RuntimeError> {
        let wanted = template!(self.key.as_str(), "result", ?u64, ?Vec<u8>);
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
        let tasks = self.tasks();
        let mut n = 0;
        while self.space.inp(&tasks)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Tells the workers to stop once the bag is empty of earlier tasks.
    pub fn stop(&self) -> Result<(), RuntimeError> {
        self.space
            .out(tuple!(self.key.as_str(), "task", STOP, Vec::<u8>::new()))
    }

    /// Takes tasks and runs `f` on each until the farm stops; returns the number of tasks this worker did.
    pub fn serve<T: DeserializeOwned, R: Serialize>(
        &self,
        mut f: impl FnMut(u64, T) -> R,
    ) -> Result<usize, RuntimeError> {
        let tasks = self.tasks();
        let mut lease = self.space.in_leased(&tasks)?;
        let mut done = 0;
        loop {
            let id = lease.tuple.get::<u64>(2)?;
            if id == STOP {
                // Leave the stop mark for the other workers.
                let mark = lease.tuple.clone();
                self.space.complete(lease, vec![mark])?;
                return Ok(done);
            }
            let task = decode(&lease.tuple, "task", id)?;
            let result = self.encode("result", id, &f(id, task))?;
            lease = self.space.complete_and_lease(lease, vec![result], &tasks)?;
            done += 1;
        }
    }
}

fn decode<T: DeserializeOwned>(t: &Tuple, kind: &str, id: u64) -> Result<T, RuntimeError> {
    let bytes = t.get::<Vec<u8>>(3)?;
    postcard::from_bytes(&bytes).map_err(|e| RuntimeError::Codec {
        what: format!("{kind} {id}"),
        reason: format!("does not decode as the type asked for: {e}"),
    })
}
