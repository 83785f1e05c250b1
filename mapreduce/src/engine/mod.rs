//! Running a job: every rank calls [`MapReduce::run`]. Rank 0 prepares (inputs checked, splits cut, output
//! directory made), drives the master state machine over a task farm homed on itself, and works on a thread
//! of its own like every other rank; the others take tasks until the farm stops, then read how the job
//! ended. A job's spill files live under the rank's spill directory until the job ends.
//!
//! Rank 0's part of a job is in `lead`, its report in `report`, and the output and spill directories on
//! disk (staging, commit, the locks that keep them alive) in `dirs`.

use crate::config::JobConfig;
use crate::master::Task;
use crate::shuffle::{self, job_dir};
use crate::worker::Worker;
use crate::{Job, MapReduceError};
use dsm::Rank;
use dsm_runtime::{template, tuple, RuntimeError, TaskFarm, TupleSpace};
use nix::fcntl::Flock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

mod dirs;
mod lead;
mod report;

pub use dirs::SUCCESS;
use dirs::{make_spill_dir, remove_locked_dir, remove_stale_spill_dirs, spill_host};
pub use report::JobReport;

/// One rank's MapReduce engine: create one per rank (collectively), then run jobs on it, every rank the same
/// jobs in the same order. A rank has one engine at a time; once every rank has dropped theirs, they may
/// create new ones (collectively again).
#[derive(Debug)]
pub struct MapReduce {
    space: TupleSpace,
    root: PathBuf,
    shuffle: std::sync::Arc<shuffle::ShuffleService>,
    jobs: AtomicU64,
    /// Rank 0: the first job whose outcome may still be in the space (see `clear_after`).
    outcomes_from: AtomicU64,
    /// The lock on the spill directory's [`ALIVE`] file, held for the engine's life: what tells other
    /// engines that the directory is in use (`None` on a file system without `flock`).
    alive: Option<Flock<std::fs::File>>,
}

impl MapReduce {
    /// Creates this rank's engine, keeping map output under the system's temporary directory. Collective.
    pub fn new(space: &TupleSpace) -> Result<MapReduce, MapReduceError> {
        let tmp = std::env::temp_dir();
        // Made for a spill directory that is asked for, not for the system's: a TMPDIR naming none is
        // a mistake to say.
        if !tmp.is_dir() {
            return Err(MapReduceError::Config(format!(
                "the system's temporary directory {} is not a directory (is TMPDIR set wrong?): set TMPDIR to one, or give the engine a spill directory (MapReduce::with_spill_dir, --spill-dir)",
                tmp.display()
            )));
        }
        MapReduce::with_spill_dir(space, tmp)
    }

    /// Creates this rank's engine, keeping map output in a directory of its own under `dir` (a local disk
    /// with room for the rank's share of the map output). Collective.
    pub fn with_spill_dir(
        space: &TupleSpace,
        dir: impl AsRef<Path>,
    ) -> Result<MapReduce, MapReduceError> {
        let dsm = space.dsm();
        if dsm.service_registered(shuffle::SERVICE) {
            return Err(MapReduceError::Config(format!(
                "{} has a MapReduce engine already: create one per rank and run every job on it (or drop it first)",
                dsm.rank()
            )));
        }
        let host = spill_host();
        remove_stale_spill_dirs(dir.as_ref(), &host);
        // The sequence number keeps apart the engines of one process that have the same rank (jobs of
        // ranks as threads, one after another or side by side): each removes only its own directory.
        static ENGINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = ENGINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!(
            "dsm-mapreduce-{host}-{}-{}-{seq}",
            std::process::id(),
            dsm.rank().0
        );
        let (root, alive) = make_spill_dir(dir.as_ref(), &name)?;
        // Each task slot's merge holds up to `merge_fan_in` run files open, and map tasks write theirs:
        // Joining the job (`DsmBuilder::build`) let the process have as many files as the system allows.
        let service = std::sync::Arc::new(shuffle::ShuffleService::default());
        // No engine owns the directory, or the service once registered, to let them go when dropped.
        let joined = dsm
            .register_service(shuffle::SERVICE, service.clone())
            .and_then(|()| {
                dsm.barrier().inspect_err(|_| {
                    dsm.unregister_service(shuffle::SERVICE);
                })
            });
        if let Err(e) = joined {
            remove_locked_dir(&root, alive);
            return Err(RuntimeError::from(e).into());
        }
        Ok(MapReduce {
            space: space.clone(),
            root,
            shuffle: service,
            jobs: AtomicU64::new(0),
            outcomes_from: AtomicU64::new(0),
            alive,
        })
    }

    /// Runs `job` as `config` says. Collective: every rank calls it. Returns the report on rank 0 and
    /// `None` on the others; an error on every rank if the job fails.
    pub fn run<J: Job>(
        &self,
        job: &J,
        config: &JobConfig,
    ) -> Result<Option<JobReport>, MapReduceError> {
        let job_id = self.jobs.fetch_add(1, Ordering::Relaxed);
        let dsm = self.space.dsm();
        // Put however this rank leaves the job, an early error or a panic included: the master waits
        // for it.
        let mut mark = (dsm.rank() != Rank(0)).then(|| StoppedMark {
            engine: self,
            job_id,
            put: false,
        });
        let farm = TaskFarm::new(&self.space, &format!("mapreduce-{job_id}"), Rank(0))?;
        let threads = config.threads_for(dsm.size());
        let dir = job_dir(&self.root, job_id);
        let setup = config
            .check()
            .map_err(MapReduceError::Config)
            .and_then(|()| {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| MapReduceError::io(format!("creating {}", dir.display()), e))?;
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("dsm-mapreduce-{i}"))
                    .build()
                    .map_err(|e| MapReduceError::Config(format!("starting {threads} threads: {e}")))
            });
        let pool = match setup {
            Ok(pool) => pool,
            Err(e) => {
                // The job's directory may have been made before the threads failed to start.
                let _ = std::fs::remove_dir_all(&dir);
                return Err(self.fail_early(job_id, &farm, e));
            }
        };
        let worker = Worker {
            job,
            dsm,
            root: &self.root,
            job_id,
            pool: &pool,
            budget: config.task_budget(dsm.size()),
            fan_in: config.merge_fan_in,
            batches: std::sync::Mutex::new(HashMap::new()),
            sealing: std::sync::Mutex::new(()),
            buffers: std::sync::Mutex::new(Vec::new()),
        };
        let requests = self.shuffle.open(job_id);
        let result = std::thread::scope(|s| {
            // However this closure ends (a panic included), the job's requests end, and with them the
            // thread below, which the scope waits for.
            let _closing = Closing {
                shuffle: &self.shuffle,
                job_id,
            };
            // Other ranks' reducers' requests for this rank's map output, answered until the job is over
            // here (every reduce done: the master has stopped the farm).
            let answering = std::thread::Builder::new()
                .name(format!("dsm-shuffle-{job_id}"))
                .spawn_scoped(s, || {
                    for (request, reply) in requests {
                        let answer = match request {
                            shuffle::Request::Seal {
                                partition, sources, ..
                            } => shuffle::sealed(worker.seal_for(partition, &sources)),
                            shuffle::Request::Fetch(fetch) => shuffle::serve(&self.root, &fetch),
                        };
                        // An error means the reducer is gone; the master learns of it separately.
                        let _ = reply.send(&[&answer]);
                    }
                });
            match answering {
                Ok(_) => match &mut mark {
                    None => self.lead(job_id, &farm, &worker, config, threads),
                    Some(mark) => self.follow(job_id, &farm, &worker, threads, mark),
                },
                Err(e) => Err(self.fail_early(
                    job_id,
                    &farm,
                    MapReduceError::io("starting the shuffle thread", e),
                )),
            }
        });
        // Every reducer is done with this rank's runs once the master has stopped the farm.
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// `e`, which ended job `job_id` on this rank before its workers started. The master says so to every
    /// rank, which would otherwise wait for tasks for ever, once their workers (if any started) have
    /// returned, and clears up as after any job. Another rank tells the master, whose job then fails
    /// with `e` (the others would otherwise do every task, and the job succeed while this rank reports
    /// an error).
    fn fail_early(&self, job_id: u64, farm: &TaskFarm, e: MapReduceError) -> MapReduceError {
        if self.space.dsm().rank() == Rank(0) {
            if farm.stop().is_ok() && self.wait_for_workers(job_id).is_ok() {
                let _ = self.clear_after(job_id, farm);
            }
            let _ = self.publish(job_id, &Err(e.to_string()));
        } else {
            // If this fails, the master is out of reach, and sees this rank fail once its connections
            // end.
            let _ = farm.cannot_serve(&e.to_string());
        }
        e
    }

    /// A first field for tuples of `arity` fields about job `job_id`, named `what`, homed at rank 0 (the
    /// master's own operations on them stay off the network).
    fn key_at_master(&self, job_id: u64, what: &str, arity: usize) -> String {
        (0u64..)
            .map(|k| format!("mapreduce-{job_id}-{what}#{k}"))
            .find(|k| self.space.home_of(Some(&k.as_str().into()), arity) == Rank(0))
            .expect("some suffix hashes to every rank")
    }

    /// The tuple that tells every rank how job `job_id` ended.
    fn outcome_key(&self, job_id: u64) -> String {
        self.key_at_master(job_id, "outcome", 3)
    }

    /// The key of the marks other ranks put once their workers of job `job_id` have returned (homed at rank
    /// 0, where the master takes them).
    fn stopped_key(&self, job_id: u64) -> String {
        self.key_at_master(job_id, "stopped", 2)
    }

    /// The part of job `job_id` of a rank other than 0: takes tasks on `threads` threads until the farm
    /// stops, puts its stop mark, and reads how the job ended.
    fn follow<J: Job>(
        &self,
        job_id: u64,
        farm: &TaskFarm,
        worker: &Worker<'_, J>,
        threads: usize,
        mark: &mut StoppedMark<'_>,
    ) -> Result<Option<JobReport>, MapReduceError> {
        let lost = |e: RuntimeError| {
            // Rank 0 failing is the master lost, whether the error says so itself or the service loop
            // noticed first.
            let master_failed = matches!(
                &e,
                RuntimeError::Dsm(dsm::DsmError::PeerFailed { rank, .. }) if *rank == Rank(0)
            );
            if master_failed || self.space.dsm().failed_ranks().contains(&Rank(0)) {
                MapReduceError::MasterLost(e.to_string())
            } else {
                MapReduceError::Runtime(e)
            }
        };
        let served: Vec<_> = std::thread::scope(|s| {
            let others = match spawn_workers(s, threads - 1, farm, worker) {
                Ok(others) => others,
                // This rank takes no task, and the master fails the job.
                Err(e) => {
                    let _ = farm.cannot_serve(&e.to_string());
                    return vec![Err(e)];
                }
            };
            let mine = farm.serve(|id, task: Task| worker.run(id, task));
            let mut all: Vec<_> = others
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(RuntimeError::Refused {
                            rank: self.space.dsm().rank(),
                            reason: "a worker thread panicked".into(),
                        })
                    })
                })
                .collect();
            all.push(mine);
            all
        });
        // The master cleans up after a failed job only once no reduce of this rank can still rename a
        // part file into the output. (If it is gone, reading the outcome below says so.)
        mark.put();
        for s in served {
            s.map_err(lost)?;
        }
        let key = self.outcome_key(job_id);
        let t = self
            .space
            .rd(&template!(key.as_str(), ?bool, ?String))
            .map_err(lost)?;
        if t.get::<bool>(1).map_err(RuntimeError::from)? {
            Ok(None)
        } else {
            Err(MapReduceError::TaskFailed(
                t.get::<String>(2).map_err(RuntimeError::from)?,
            ))
        }
    }
}

/// Closes a job's requests to the shuffle when dropped.
struct Closing<'a> {
    shuffle: &'a shuffle::ShuffleService,
    job_id: u64,
}

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.shuffle.close(self.job_id);
    }
}

/// A rank's mark that its workers of a job have returned, which the master waits for
/// (`MapReduce::wait_for_workers`) before it cleans up and publishes how the job ended. Put once: by `put`
/// once the workers have returned, or, on any other way out of `MapReduce::run` (an error before the
/// workers started, a panic), when dropped.
struct StoppedMark<'a> {
    engine: &'a MapReduce,
    job_id: u64,
    put: bool,
}

impl StoppedMark<'_> {
    fn put(&mut self) {
        if std::mem::replace(&mut self.put, true) {
            return;
        }
        let space = &self.engine.space;
        let me = space.dsm().rank().0 as u64;
        // If this fails, rank 0 is out of reach, and sees this rank fail once its connections end.
        let _ = space.out(tuple!(self.engine.stopped_key(self.job_id).as_str(), me));
    }
}

impl Drop for StoppedMark<'_> {
    fn drop(&mut self) {
        self.put();
    }
}

/// Starts `n` threads that serve `farm`'s tasks with `worker`. A thread that cannot be started is an
/// error; the ones started serve until the farm stops (the scope waits for them).
fn spawn_workers<'scope, 'env, J: Job>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    n: usize,
    farm: &'env TaskFarm,
    worker: &'env Worker<'env, J>,
) -> Result<Vec<std::thread::ScopedJoinHandle<'scope, Result<usize, RuntimeError>>>, RuntimeError> {
    (0..n)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("dsm-mr-worker-{i}"))
                .spawn_scoped(s, || farm.serve(|id, task: Task| worker.run(id, task)))
                .map_err(|error| RuntimeError::Io {
                    context: format!(
                        "starting worker thread {} of {n} (run the job with fewer threads)",
                        i + 1
                    ),
                    error,
                })
        })
        .collect()
}

impl Drop for MapReduce {
    fn drop(&mut self) {
        // This rank may make another engine (every rank does, collectively).
        self.space.dsm().unregister_service(shuffle::SERVICE);
        remove_locked_dir(&self.root, self.alive.take());
    }
}
