//! Rank 0's part of a job: preparing it (inputs checked, splits cut, output and staging directories
//! made), driving the master state machine over the task farm, waiting for every rank's workers to
//! return, committing the output, and telling every rank how the job ended.

use super::dirs::{
    check_replaceable, commit, lock_alive, missing_dirs, remove_made_dirs, remove_part_tmps,
    STAGING,
};
use super::{spawn_workers, JobReport, MapReduce};
use crate::config::JobConfig;
use crate::input;
use crate::master::{Master, Step, Task, TaskResult};
use crate::progress::Progress;
use crate::worker::Worker;
use crate::{Job, MapReduceError};
use dsm::Rank;
use dsm_runtime::{template, tuple, RuntimeError, TaskFarm};
use nix::fcntl::Flock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl MapReduce {
    /// Rank 0's part of job `job_id`: works on `threads` threads of its own like every rank, prepares the
    /// job (`prepare`) and drives its master over `farm` (`drive`), then stops the farm, waits for every
    /// rank's workers, commits the output (or removes what a failed job made) and tells every rank how the
    /// job ended.
    pub(super) fn lead<J: Job>(
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

    /// Waits until every other rank's workers of job `job_id` have returned (each rank says so with a
    /// mark) or the rank has failed. After that no task of the job runs anywhere, so no part file can
    /// appear in the output any more: a reduce still running when another failed the job has finished.
    pub(super) fn wait_for_workers(&self, job_id: u64) -> Result<(), MapReduceError> {
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
    /// job `job_id` have returned): the farm's stop mark, the marks of ranks that failed after putting
    /// theirs, and the outcomes of the jobs before it, which every live rank read before its workers of
    /// this job started (those of jobs that ended before this step included). So a program that runs many
    /// jobs keeps one outcome tuple, not one per job.
    pub(super) fn clear_after(&self, job_id: u64, farm: &TaskFarm) -> Result<(), RuntimeError> {
        farm.close()?;
        // `wait_for_workers` took every live rank's mark; one still here is a rank's that failed before
        // the master took it (it stopped waiting once it saw the rank fail). A mark still on its way from
        // a rank that has just failed can come after this, and stays.
        let stopped = self.stopped_key(job_id);
        while self
            .space
            .inp(&template!(stopped.as_str(), ?u64))?
            .is_some()
        {}
        for earlier in self.outcomes_from.swap(job_id, Ordering::AcqRel)..job_id {
            let key = self.outcome_key(earlier);
            self.space.inp(&template!(key.as_str(), ?bool, ?String))?;
        }
        Ok(())
    }

    /// Tells every rank how job `job_id` ended (rank 0, after stopping the farm).
    pub(super) fn publish(
        &self,
        job_id: u64,
        outcome: &Result<(), String>,
    ) -> Result<(), MapReduceError> {
        let key = self.outcome_key(job_id);
        let (ok, message) = match outcome {
            Ok(()) => (true, String::new()),
            // The tuple space takes fields of up to 1 MiB.
            Err(e) => (false, e.chars().take(64 << 10).collect()),
        };
        self.space.out(tuple!(key.as_str(), ok, message))?;
        Ok(())
    }
}

/// How long the master waits to see a rank fail that a reducer says it lost.
const LOST_NOTICED_WITHIN: Duration = Duration::from_secs(3);

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
    use dsm_runtime::TupleSpace;

    #[test]
    fn clearing_after_a_job_takes_the_marks_of_ranks_that_failed_after_putting_them() {
        dsm_runtime::local::run_local_job(1, 3, |rt| {
            let space = TupleSpace::join(rt).unwrap();
            let mr = MapReduce::new(&space).unwrap();
            let job_id = 7;
            let farm = TaskFarm::new(&space, "mapreduce-7", Rank(0)).unwrap();
            farm.stop().unwrap();
            // Ranks 1 and 2 put their marks and failed before the master took them.
            let key = mr.stopped_key(job_id);
            for rank in [1u64, 2] {
                space.out(tuple!(key.as_str(), rank)).unwrap();
            }
            // Another job's mark is not this job's to take.
            let other = mr.stopped_key(job_id + 1);
            space.out(tuple!(other.as_str(), 1u64)).unwrap();
            mr.clear_after(job_id, &farm).unwrap();
            let marks = |k: &str| space.count(&template!(k, ?u64)).unwrap();
            assert_eq!(marks(&key), 0, "the job's marks are gone");
            assert_eq!(marks(&other), 1, "the next job's mark stays");
        });
    }

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
