//! Running a job: every rank calls [`MapReduce::run`]. Rank 0 prepares (inputs checked, splits cut, output
//! directory made), drives the master state machine over a task farm homed on itself, and works on a thread
//! of its own like every other rank; the others take tasks until the farm stops, then read how the job
//! ended. A job's spill files live under the rank's spill directory until the job ends.
//!
//! The output and spill directories on disk (staging, commit, the locks that keep them alive) are in `dirs`.

use crate::config::JobConfig;
use crate::input;
use crate::master::{Master, Step, Task, TaskResult};
use crate::progress::Progress;
use crate::shuffle::{self, job_dir};
use crate::worker::Worker;
use crate::{Counters, Job, MapReduceError};
use dsm::Rank;
use dsm_runtime::{template, tuple, RuntimeError, TaskFarm, TupleSpace};
use nix::fcntl::Flock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod dirs;

pub use dirs::SUCCESS;
use dirs::{
    check_replaceable, commit, lock_alive, make_spill_dir, missing_dirs, remove_locked_dir,
    remove_made_dirs, remove_part_tmps, remove_stale_spill_dirs, spill_host, STAGING,
};

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

/// What a job did, as the master saw it.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Map tasks (one per split).
    pub maps: usize,
    /// Reduce tasks (one per partition).
    pub reduces: usize,
    /// Map tasks done again because the rank holding their output was lost.
    pub redone_maps: usize,
    /// Bytes of input read.
    pub input_bytes: u64,
    /// Bytes of map output the reduces read (after combining: each rank folds the output of the maps it
    /// runs together).
    pub map_output_bytes: u64,
    /// Sorted runs of map output the reduces read: for each partition, one per task slot that ran maps
    /// (ranks times threads), more when map output spilled past the memory budget.
    pub map_runs: u64,
    /// Bytes of map output that crossed between ranks.
    pub shuffled_bytes: u64,
    /// Lines written to the output.
    pub output_records: u64,
    /// The job's counters, summed.
    pub counters: Counters,
    /// From the start until every map output existed for the first time.
    pub map_time: Duration,
    /// From the start until every partition was written.
    pub total_time: Duration,
    /// The output files, in partition order.
    pub output_files: Vec<PathBuf>,
    /// Ranks in the job.
    pub ranks: usize,
    /// Threads each rank used inside a task (the master's setting).
    pub threads: usize,
}

impl std::fmt::Display for JobReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: u64| b as f64 / 1e6;
        writeln!(
            f,
            "mapreduce: {} ranks x {} threads, {} maps ({} redone), {} reduces",
            self.ranks, self.threads, self.maps, self.redone_maps, self.reduces
        )?;
        writeln!(
            f,
            "  input {:.1} MB, map output {:.1} MB in {} runs, shuffled {:.1} MB, {} output records",
            mb(self.input_bytes),
            mb(self.map_output_bytes),
            self.map_runs,
            mb(self.shuffled_bytes),
            self.output_records
        )?;
        write!(
            f,
            "  map phase {:.3} s, total {:.3} s",
            self.map_time.as_secs_f64(),
            self.total_time.as_secs_f64()
        )?;
        for (name, n) in self.counters.iter() {
            write!(f, "\n  counter {name}: {n}")?;
        }
        Ok(())
    }
}

impl MapReduce {
    /// Creates this rank's engine, keeping map output under the system's temporary directory. Collective.
    pub fn new(space: &TupleSpace) -> Result<MapReduce, MapReduceError> {
        let tmp = std::env::temp_dir();
        // Made for a spill directory that is asked for, not for the system's: a TMPDIR naming none is
        // a mistake to say.
        if !tmp.is_dir() {
            return Err(MapReduceError::Config(format!(
                "the system's temporary directory {} is not a directory (is TMPDIR set wrong?): set TMPDIR to one, or give the engine a spill directory (MapReduce::with_spill_dir)",
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

    /// Waits until every other rank's workers of job `job_id` have returned (each rank says so with a
    /// mark) or the rank has failed. After that no task of the job runs anywhere, so no part file can
    /// appear in the output any more: a reduce still running when another failed the job has finished.
    fn wait_for_workers(&self, job_id: u64) -> Result<(), MapReduceError> {
        let dsm = self.space.dsm();
        let key = self.stopped_key(job_id);
        let mut stopped = vec![false; dsm.size()];
        stopped[dsm.rank().index()] = true;
        loop {
            let failed = dsm.failed_ranks();
            let waiting = (0..dsm.size()).any(|r| !stopped[r] && !failed.contains(&Rank(r as u32)));
            if !waiting {
                return Ok(());
            }
            let mark = self
                .space
                .in_timeout(&template!(key.as_str(), ?u64), STOPPED_LOOK)?;
            if let Some(t) = mark {
                let rank = t.get::<u64>(1).map_err(RuntimeError::from)?;
                if let Some(s) = usize::try_from(rank).ok().and_then(|r| stopped.get_mut(r)) {
                    *s = true;
                }
            }
        }
    }

    /// What jobs leave in the space once it is sure no rank needs it (rank 0, once every rank's workers of
    /// job `job_id` have returned): the job's stop mark, and the outcomes of the jobs before it, which
    /// every live rank read before its workers of this job started (those of jobs that ended before
    /// this step included). So a program that runs many jobs keeps one outcome tuple, not one per job.
    fn clear_after(&self, job_id: u64, farm: &TaskFarm) -> Result<(), RuntimeError> {
        farm.close()?;
        for earlier in self.outcomes_from.swap(job_id, Ordering::AcqRel)..job_id {
            let key = self.outcome_key(earlier);
            self.space.inp(&template!(key.as_str(), ?bool, ?String))?;
        }
        Ok(())
    }

    /// Tells every rank how job `job_id` ended (rank 0, after stopping the farm).
    fn publish(&self, job_id: u64, outcome: &Result<(), String>) -> Result<(), MapReduceError> {
        let key = self.outcome_key(job_id);
        let (ok, message) = match outcome {
            Ok(()) => (true, String::new()),
            // The tuple space takes fields of up to 1 MiB.
            Err(e) => (false, e.chars().take(64 << 10).collect()),
        };
        self.space.out(tuple!(key.as_str(), ok, message))?;
        Ok(())
    }

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

    fn lead<J: Job>(
        &self,
        job_id: u64,
        farm: &TaskFarm,
        worker: &Worker<'_, J>,
        config: &JobConfig,
        threads: usize,
    ) -> Result<Option<JobReport>, MapReduceError> {
        let started = Instant::now();
        // Whether this job made or cleared the output directory: only then are its part files its own, to
        // remove if it fails (a job refused up front leaves an earlier job's output alone).
        let mut ours_to_clear = false;
        // The directories this job made for its output (the output and any parents it lacked), innermost
        // first: a failed job removes them too.
        let mut made_dirs = Vec::new();
        // The lock on the job's staging directory, held until the job is done with it: another job's
        // commit into the same output leaves the directory alone meanwhile. (Let go before the directory
        // is removed: on NFS a file removed while open stays, as `.nfs*`, and the directory with it.)
        let mut staging_alive = None;
        let outcome = std::thread::scope(|s| {
            let (ours, outcome) = match spawn_workers(s, threads, farm, worker) {
                Ok(ours) => {
                    let outcome = self.prepare(job_id, config).and_then(|mut prepared| {
                        ours_to_clear = true;
                        made_dirs = std::mem::take(&mut prepared.made_dirs);
                        staging_alive = prepared.staging_alive;
                        self.drive(prepared.master, farm, config, started)
                    });
                    (ours, outcome)
                }
                Err(e) => (Vec::new(), Err(MapReduceError::from(e))),
            };
            // Stop the farm whatever happened, so that every worker (this rank's among them) returns; tasks
            // still in the bag (after a failure, or maps redone for partitions written since) are dropped.
            let withdrawn = farm.withdraw();
            let stopped = farm.stop();
            let served: Vec<_> = ours.into_iter().map(|t| t.join()).collect();
            // Before anything is cleaned up or published. (Without the stop mark the workers do not
            // return, and their marks never come.)
            let all_stopped = match stopped {
                Ok(()) => {
                    let waited = self.wait_for_workers(job_id).and_then(|()| {
                        // A rank that could not take part, and said so only once the others had done
                        // every task (it came late), still fails the job.
                        let late = farm.worker_failure().map_err(MapReduceError::from)?;
                        self.clear_after(job_id, farm)
                            .map_err(MapReduceError::from)?;
                        late.map_or(Ok(()), |e| Err(MapReduceError::from(e)))
                    });
                    withdrawn.map_err(MapReduceError::from).and(waited)
                }
                Err(e) => Err(MapReduceError::from(e)),
            };
            outcome.and_then(|o| {
                all_stopped?;
                for s in served {
                    match s {
                        Ok(r) => r.map(|_| ()).map_err(MapReduceError::from)?,
                        Err(_) => {
                            return Err(MapReduceError::TaskFailed(
                                "a worker thread of the master panicked".into(),
                            ))
                        }
                    }
                }
                Ok(o)
            })
        });
        // The output is complete only with its marker: a job that failed leaves none, and its part files
        // are removed (every rank's workers have returned: none can rename one in after this).
        // Once the commit has begun to clear the old output, the new one stays in the staging directory
        // (the error names it): removing it then would leave neither.
        let mut clearing = false;
        let outcome = outcome.and_then(|o| {
            commit(&o.0, &config.output, &mut clearing, staging_alive.take())?;
            Ok(o)
        });
        if outcome.is_err() && ours_to_clear && !clearing {
            drop(staging_alive.take());
            let _ = std::fs::remove_dir_all(config.output.join(self.staging_name(job_id)));
            remove_made_dirs(&made_dirs);
        }
        let said = match &outcome {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        self.publish(job_id, &said)?;
        let (master, map_time) = outcome?;
        let t = master.totals();
        Ok(Some(JobReport {
            maps: master.maps(),
            reduces: master.reduces(),
            redone_maps: master.redone,
            input_bytes: t.input_bytes,
            map_output_bytes: t.map_output_bytes,
            map_runs: t.map_runs,
            shuffled_bytes: t.shuffled_bytes,
            output_records: t.records,
            counters: t.counters,
            map_time,
            total_time: started.elapsed(),
            output_files: (0..master.reduces())
                .map(|p| config.output.join(format!("part-{p:05}")))
                .collect(),
            ranks: self.space.dsm().size(),
            threads,
        }))
    }

    /// The directory of job `job_id`'s part files inside its output directory until the job succeeds:
    /// named after this engine's spill directory, which no other engine's name is.
    fn staging_name(&self, job_id: u64) -> String {
        let engine = self.root.file_name().unwrap_or_default().to_string_lossy();
        format!("{STAGING}{engine}-{job_id}")
    }

    /// Checks the inputs, cuts the splits and makes the output directory (saying whether it made it, or
    /// took one that was there) and the job's staging directory in it; nothing is written if an input is
    /// missing or the output exists.
    fn prepare(&self, job_id: u64, config: &JobConfig) -> Result<Prepared, MapReduceError> {
        config.has_input()?;
        // Paths go to other ranks as the master names them: absolute, so that a rank started in another
        // working directory (mpirun on another host) reads and writes the same files.
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let inputs: Vec<PathBuf> = config.inputs.iter().map(|p| absolute(p)).collect();
        let files = input::expand(&inputs)?;
        let size = self.space.dsm().size();
        // A map task reads its split into memory: a split size over what it may read fails every task.
        let limit = config.task_budget(size).max(input::MIN_SPLIT_LIMIT);
        if config.split_size > limit {
            return Err(MapReduceError::Config(format!(
                "a split size of {} bytes is more than a map task may read into memory here, {limit} bytes (the larger of the memory budget per thread and 64 MiB): use smaller splits or a larger memory budget",
                config.split_size
            )));
        }
        let workers = size.saturating_mul(config.threads_for(size));
        let (mut splits, mut versions): (Vec<_>, Vec<_>) =
            input::cut(&files, config.split_size, workers)?
                .into_iter()
                .unzip();
        for s in &config.splits {
            let err = |error| MapReduceError::Input {
                path: s.file.clone(),
                error,
            };
            // Its kind is looked at before it is opened: opening a FIFO would block the master for ever.
            let meta = std::fs::metadata(&s.file).map_err(err)?;
            if !meta.is_file() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file",
                )));
            }
            let opened = std::fs::File::open(&s.file).map_err(err)?;
            let meta = opened.metadata().map_err(err)?;
            versions.push(input::FileVersion::of(&meta));
            let len = meta.len();
            if s.start > s.end || s.end > len {
                return Err(MapReduceError::Config(format!(
                    "split {}..{} of {}: a split runs from a start to an end no greater, within the file's {len} bytes",
                    s.start,
                    s.end,
                    s.file.display()
                )));
            }
        }
        splits.extend(config.splits.iter().map(|s| input::Split {
            file: absolute(&s.file),
            ..s.clone()
        }));
        // Paths travel with the tasks as text, made absolute: one that is not UTF-8 (as given, or once
        // the working directory is put before it) is refused here, naming it, before the output is
        // touched (nothing is written or removed).
        let output = absolute(&config.output);
        let paths = files.iter().map(|(p, _)| p);
        let paths = paths.chain(splits.iter().map(|s| &s.file));
        if let Some(p) = paths
            .chain(std::iter::once(&output))
            .find(|p| p.to_str().is_none())
        {
            return Err(MapReduceError::Config(format!(
                "{}: the path is not valid UTF-8, which the job's tasks cannot carry; rename it",
                p.display()
            )));
        }
        if splits.len() > crate::config::MAX_MAPS {
            return Err(MapReduceError::Config(format!(
                "{} splits: a job has at most {} map tasks (every reduce task lists them); use larger splits (the split size is {} bytes)",
                splits.len(),
                crate::config::MAX_MAPS,
                config.split_size
            )));
        }
        let size = self.space.dsm().size();
        let partitions = config
            .partitions
            .unwrap_or_else(|| default_partitions(size, config.threads_for(size)))
            .max(1);
        if splits.len().saturating_mul(partitions) > crate::config::MAX_MAP_OUTPUTS {
            return Err(MapReduceError::Config(format!(
                "{} splits and {partitions} partitions: the master keeps track of every map's output in every partition, at most {} of them; use larger splits (the split size is {} bytes) or fewer partitions",
                splits.len(),
                crate::config::MAX_MAP_OUTPUTS,
                config.split_size
            )));
        }
        let out = &config.output;
        let made = match std::fs::metadata(out) {
            // What it holds is replaced only when the job has succeeded (`commit`), which could then
            // fail halfway through on an entry it cannot remove: such entries are refused now, while
            // the old output is whole.
            Ok(there) => {
                config.may_take_output(&there)?;
                check_replaceable(out)?;
                Vec::new()
            }
            Err(_) => {
                // The directory itself with create_dir, which fails if it exists: of two jobs started at
                // once on one new output directory, only one takes it (create_dir_all succeeds for both,
                // and the failing one's clean-up would remove the other's parts).
                let mut parents = Vec::new();
                if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                    parents = missing_dirs(parent);
                    std::fs::create_dir_all(parent).map_err(|e| {
                        MapReduceError::io(format!("creating {}", parent.display()), e)
                    })?;
                }
                let refused = |e| {
                    remove_made_dirs(&parents);
                    e
                };
                match std::fs::create_dir(out) {
                    Ok(()) => std::iter::once(out.clone()).chain(parents).collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(refused(MapReduceError::OutputExists(out.clone())))
                    }
                    Err(e) => {
                        return Err(refused(MapReduceError::io(
                            format!("creating {}", out.display()),
                            e,
                        )))
                    }
                }
            }
        };
        // The reduces write into a directory of the job's own inside the output, moved into place once
        // every part is there: a job that fails leaves an earlier output as it was and no partial one
        // beside it (one whose master dies leaves this directory, which a later job's commit on this host
        // removes: `remove_stale_staging_dirs`).
        let staging = out.join(self.staging_name(job_id));
        let staging_alive = std::fs::create_dir(&staging).and_then(|()| {
            lock_alive(&staging).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&staging);
            })
        });
        let staging_alive = match staging_alive {
            Ok(alive) => alive,
            Err(e) => {
                remove_made_dirs(&made);
                return Err(MapReduceError::io(
                    format!("creating {}", staging.display()),
                    e,
                ));
            }
        };
        Ok(Prepared {
            master: Master::new(splits, partitions as u32, absolute(&staging))
                .with_versions(versions),
            made_dirs: made,
            staging_alive,
        })
    }

    /// Hands out tasks and takes results until every partition is written; returns the master and the
    /// time the map phase took.
    fn drive(
        &self,
        mut master: Master,
        farm: &TaskFarm,
        config: &JobConfig,
        started: Instant,
    ) -> Result<(Master, Duration), MapReduceError> {
        let mut tasks: HashMap<u64, Task> = HashMap::new();
        let put = |tasks: &mut HashMap<u64, Task>, list: Vec<(u64, Task)>| {
            if list.is_empty() {
                return Ok(());
            }
            tasks.extend(list.iter().cloned());
            farm.put(list)
        };
        put(&mut tasks, master.start())?;
        let mut progress = Progress::new(config.progress, started);
        let mut map_time = None;
        loop {
            if master.maps_done() == master.maps() && map_time.is_none() {
                map_time = Some(started.elapsed());
            }
            progress.show(|| master.totals(), master.maps(), master.reduces());
            // Map output on a rank known to be gone is made again before a reducer trips over it.
            for r in self.space.dsm().failed_ranks() {
                let again = master.lose(r.0);
                put(&mut tasks, again)?;
            }
            let Some((id, result)) = farm.results::<TaskResult>(1)?.pop() else {
                continue;
            };
            let Some(task) = tasks.remove(&id) else {
                continue;
            };
            let result = match result {
                TaskResult::Lost { holder } if !self.has_failed(Rank(holder)) => {
                    TaskResult::Failed {
                        what: format!(
                            "a reducer could not fetch map output from {}, which has not failed (its connection broke): the job cannot go on without it",
                            Rank(holder)
                        ),
                    }
                }
                other => other,
            };
            match master.on_result(id, &task, result) {
                Step::Put(list) => put(&mut tasks, list)?,
                Step::Finished => break,
                Step::Failed(what) => return Err(MapReduceError::TaskFailed(what)),
            }
        }
        progress.finish();
        // Every partition is written: a temporary part file left now is a reducer's that died writing it.
        remove_part_tmps(master.output());
        Ok((master, map_time.unwrap_or_else(|| started.elapsed())))
    }

    /// Whether `rank`, whose map output a reducer lost, has failed, as this rank sees within a few
    /// seconds (its own connection to a rank that died breaks at about the same time). A rank that has
    /// not is not taken for lost: its maps would be done again, and their output refused, for ever.
    fn has_failed(&self, rank: Rank) -> bool {
        self.space.dsm().fails_within(rank, LOST_NOTICED_WITHIN)
    }
}

/// How long the master waits to see a rank fail that a reducer says it lost.
const LOST_NOTICED_WITHIN: Duration = Duration::from_secs(3);

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

/// How long the master waits for another rank's mark that its workers have returned before it looks at
/// which ranks have failed again.
const STOPPED_LOOK: Duration = Duration::from_millis(50);

/// A job ready to run: its master, the directories the job made for its output (innermost first), and
/// the lock on its staging directory's [`ALIVE`] file (`None` on a file system without `flock`).
struct Prepared {
    master: Master,
    made_dirs: Vec<PathBuf>,
    staging_alive: Option<Flock<std::fs::File>>,
}

impl Drop for MapReduce {
    fn drop(&mut self) {
        // This rank may make another engine (every rank does, collectively).
        self.space.dsm().unregister_service(shuffle::SERVICE);
        remove_locked_dir(&self.root, self.alive.take());
    }
}

/// The reduce partitions of a job that does not say: one per task slot (every rank running `threads` tasks
/// at once, like the master), a single wave of reduces, which measured faster here than two
/// (docs/BENCHMARKS.md, eighth session); within `MAX_PARTITIONS`.
fn default_partitions(ranks: usize, threads: usize) -> usize {
    ranks
        .saturating_mul(threads)
        .clamp(1, crate::config::MAX_PARTITIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_gets_a_partition_per_task_slot_within_the_limit() {
        assert_eq!(default_partitions(2, 1), 2);
        assert_eq!(default_partitions(1, 1), 1);
        assert_eq!(default_partitions(4, 3), 12);
        assert_eq!(
            default_partitions(256, 384),
            crate::config::MAX_PARTITIONS,
            "many ranks of many threads stay within the limit"
        );
    }
}
