//! What a rank does with a task (each of its task slots runs one at a time). A map task reads its split,
//! runs `map` over its lines, and folds what it emitted into the output its task slot holds for the
//! task's batch (spilling sorted runs under the rank's spill directory past the memory budget). The first
//! reduce to need a batch has it written: what is held becomes sorted runs, one per partition. A reduce
//! task gathers its partition's runs (its own rank's from disk, others' through the shuffle), merges
//! them, calls `reduce` once per key in key order, and writes the partition's file under a temporary name
//! that it then renames.
//! The reduce side (finding, keeping and merging runs, and writing a partition) is in `reduce`.
//!
//! Folding the maps of a batch together is what Phoenix++ does with its per-thread containers: a word
//! counted by every map is sorted, written, shuffled and merged once per task slot instead of once per
//! map (word count of 100 MB on 2 ranks: 2 runs per partition to merge instead of 34).
//!
//! A panic in the job's code fails the task with the panic's message and where it happened (the record's
//! file and byte, or the key); it never takes the rank down.

use crate::emit::{Counters, Emitter, Held};
use crate::input::{self, FileVersion, Record, Split};
use crate::master::{Source, Task, TaskResult};
use crate::runs::{self};
use crate::shuffle::RunId;
use crate::Job;
use dsm::{panic_message, Dsm, Rank};
use rayon::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod reduce;

type Pairs<J> = Vec<(<J as Job>::Key, <J as Job>::Value)>;

/// A job's map output held in memory.
type HeldOf<J> = Held<<J as Job>::Key, <J as Job>::Value>;
/// A job's batches on this rank, by number.
type Batches<J> = HashMap<u64, Batch<<J as Job>::Key, <J as Job>::Value>>;

/// One rank's means of running tasks of one job.
pub(crate) struct Worker<'a, J: Job> {
    pub(crate) job: &'a J,
    pub(crate) dsm: &'a Dsm,
    pub(crate) root: &'a Path,
    pub(crate) job_id: u64,
    pub(crate) pool: &'a rayon::ThreadPool,
    /// The memory one task's output may take before it spills.
    pub(crate) budget: u64,
    /// The most runs one merge takes.
    pub(crate) fan_in: usize,
    /// The batches of map output this rank holds.
    pub(crate) batches: Mutex<Batches<J>>,
    /// Held by the one writing a batch (a reduce of this rank, or the shuffle for another's), so that
    /// another that needs it waits until it is written.
    pub(crate) sealing: Mutex<()>,
    /// The buffers map tasks read their splits into, kept for the next ones; they go when the first
    /// reduce starts (the reduce phase has a budget of its own) and with the worker at the end of the job.
    pub(crate) buffers: Mutex<Vec<Vec<u8>>>,
}

/// One batch of map output on this rank (see `master`).
pub(crate) struct Batch<K, V> {
    /// What the maps of the batch emitted, one held output per task slot that mapped into it, not
    /// counting those a map is folding into now.
    idle: Vec<Held<K, V>>,
    /// The map tasks whose output is folded in, whole.
    tasks: BTreeSet<u64>,
    /// Where its runs go (spilled by maps, or written when it is sealed).
    sink: Arc<RunSink>,
    /// Written as runs: no map may fold into it any more.
    sealed: bool,
    /// The map tasks folding into it now (joined, not yet finished or failed).
    folding: BTreeSet<u64>,
    /// Why its output cannot be trusted (a map failed folding into it, or it could not be written).
    failed: Option<String>,
}

impl<K, V> Batch<K, V> {
    /// Whether the batch holds the output of exactly the map tasks `tasks` (those a reduce expects).
    fn holds_exactly(&self, tasks: &[u64], batch: u64, me: Rank) -> Result<(), String> {
        if self.tasks.iter().eq(tasks.iter()) {
            return Ok(());
        }
        Err(format!(
            "batch {batch} on {me} holds the output of map tasks {:?}, a reduce expects that of {tasks:?}",
            self.tasks.iter().collect::<Vec<_>>()
        ))
    }

    fn new(sink: RunSink) -> Batch<K, V> {
        Batch {
            idle: Vec::new(),
            tasks: BTreeSet::new(),
            sink: Arc::new(sink),
            sealed: false,
            folding: BTreeSet::new(),
            failed: None,
        }
    }
}

/// The batches older than the newest that hold output in memory and are not written yet.
fn older_held<K, V>(batches: &HashMap<u64, Batch<K, V>>) -> Vec<u64> {
    let newest = batches.keys().max().copied().unwrap_or(0);
    batches
        .iter()
        .filter(|(n, b)| **n < newest && !b.sealed && !b.idle.is_empty())
        .map(|(n, _)| *n)
        .collect()
}

/// The largest result a task sends back, encoded: well under the tuple space's 1 MiB field limit, so that a
/// result always reaches the master (one that did not would leave its task held for ever).
const MAX_RESULT: usize = 256 << 10;

/// `result`, or a failure saying it was too large (a panic message of megabytes, a counter per key).
fn bounded(result: TaskResult, kind: &str, id: u64) -> TaskResult {
    let size = postcard::serialize_with_flavor(&result, postcard::ser_flavors::Size::default())
        .unwrap_or(usize::MAX);
    if size <= MAX_RESULT {
        return result;
    }
    let what = match result {
        TaskResult::Failed { what } => what.chars().take(16 << 10).collect(),
        _ => format!(
            "{kind} task {id} made a result of {size} bytes (counters, mostly); the limit is {MAX_RESULT}: use fewer distinct counter names"
        ),
    };
    TaskResult::Failed { what }
}

/// The largest split buffer kept between map tasks (a larger one, made for a split of very long lines, is
/// freed after its task), unless the per-task budget is smaller.
const KEPT_BUFFER: u64 = 16 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where one batch's runs go, from any thread.
pub(crate) struct RunSink {
    root: PathBuf,
    job: u64,
    batch: u64,
    /// Runs written, by partition.
    runs: Mutex<Vec<u32>>,
}

impl RunSink {
    /// The run ids of partition `partition` written so far.
    fn ids(&self, partition: u32) -> Vec<RunId> {
        let n = lock(&self.runs)
            .get(partition as usize)
            .copied()
            .unwrap_or(0);
        (0..n)
            .map(|run| RunId {
                job: self.job,
                batch: self.batch,
                partition,
                run,
            })
            .collect()
    }

    fn write<K: serde::Serialize, V: serde::Serialize>(
        &self,
        partition: usize,
        pairs: &[(K, V)],
    ) -> Result<(), String> {
        let run = {
            let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            runs[partition] += 1;
            runs[partition] - 1
        };
        let id = RunId {
            job: self.job,
            batch: self.batch,
            partition: partition as u32,
            run,
        };
        let path = id.path(&self.root);
        let what = |e: std::io::Error| format!("writing map output {}: {e}", path.display());
        let out = BufWriter::new(File::create(&path).map_err(what)?);
        runs::write_run(out, pairs).map(drop).map_err(what)
    }
}

/// A map task folding into held output of a batch, which it took from the batch when it started
/// ([`Worker::join`]) and gives back when it ends well. Dropped without that (the map failed, or
/// panicked), it marks the batch failed: part of the map's output is in what it held.
struct Folding<'w, J: Job> {
    worker: &'w Worker<'w, J>,
    batch: u64,
    task: u64,
    sink: Arc<RunSink>,
    finished: bool,
}

impl<J: Job> Folding<'_, J> {
    /// Gives `held` back to the batch, with the task in it.
    fn finish(mut self, held: HeldOf<J>) -> Result<(), String> {
        self.finished = true;
        let mut batches = lock(&self.worker.batches);
        let b = batches
            .get_mut(&self.batch)
            .ok_or_else(|| format!("batch {} went while map task {} ran", self.batch, self.task))?;
        b.folding.remove(&self.task);
        let problem = if b.sealed {
            Some(format!(
                "map task {} ended after batch {} was written (it ran twice, or late)",
                self.task, self.batch
            ))
        } else if !b.tasks.insert(self.task) {
            Some(format!(
                "map task {} was folded into batch {} twice",
                self.task, self.batch
            ))
        } else {
            None
        };
        match problem {
            None => {
                b.idle.push(held);
                Ok(())
            }
            Some(what) => {
                b.failed.get_or_insert_with(|| what.clone());
                Err(what)
            }
        }
    }
}

impl<J: Job> Drop for Folding<'_, J> {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(b) = lock(&self.worker.batches).get_mut(&self.batch) {
                b.folding.remove(&self.task);
                b.failed.get_or_insert_with(|| {
                    format!(
                        "map task {} failed while folding into batch {}",
                        self.task, self.batch
                    )
                });
            }
        }
    }
}

impl<J: Job> Worker<'_, J> {
    /// Runs task `id` and says how it went.
    pub(crate) fn run(&self, id: u64, task: Task) -> TaskResult {
        let kind = match &task {
            Task::Map { .. } => "map",
            Task::Reduce { .. } => "reduce",
        };
        // The job's code runs under its own catch below, with the record or key named; this one catches
        // what is left (a partitioner or combiner panicking while output is sorted and written).
        let outcome = catch_unwind(AssertUnwindSafe(|| match task {
            Task::Map {
                split,
                version,
                partitions,
                batch,
                ..
            } => self.map(id, &split, version.as_ref(), partitions as usize, batch),
            Task::Reduce {
                partition,
                sources,
                output,
            } => self.reduce(id, partition, &sources, &output),
        }));
        let result = match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(what)) => TaskResult::Failed { what },
            Err(panic) => TaskResult::Failed {
                what: format!(
                    "{kind} task {id} on {} panicked: {}",
                    self.dsm.rank(),
                    panic_message(&*panic)
                ),
            },
        };
        bounded(result, kind, id)
    }

    /// The job's partitioner for `n` partitions, refusing a partition out of range, and naming the key
    /// it panicked on (it runs when held output is written, set off by a map's line or a reduce that are
    /// not where it failed).
    fn partitioner(&self, n: usize) -> impl Fn(&J::Key) -> Result<usize, String> + '_ {
        move |key| match catch_unwind(AssertUnwindSafe(|| self.job.partition(key, n))) {
            Ok(p) if p < n => Ok(p),
            Ok(p) => Err(format!(
                "the job's partition() gave {p} for key {key}, with {n} partitions"
            )),
            Err(panic) => Err(format!(
                "the job's partition() panicked on key {key}: {}",
                panic_message(&*panic)
            )),
        }
    }

    /// Sorts each partition's pairs (`groups`, by partition) by key and writes them as one run (the
    /// partitions' sorts and writes in parallel when `parallel`). The pairs' keys need no combining
    /// here: with a combiner they come from its table, one pair per key; without one, all are kept.
    fn write_runs(
        &self,
        groups: Vec<Pairs<J>>,
        sink: &RunSink,
        parallel: bool,
    ) -> Result<(), String> {
        let each = |(p, mut pairs): (usize, Pairs<J>)| {
            pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            sink.write(p, &pairs)
        };
        let written = |(_, g): &(usize, Pairs<J>)| !g.is_empty();
        if parallel {
            groups
                .into_par_iter()
                .enumerate()
                .filter(written)
                .try_for_each(each)
        } else {
            groups
                .into_iter()
                .enumerate()
                .filter(written)
                .try_for_each(each)
        }
    }

    fn map(
        &self,
        id: u64,
        split: &Split,
        version: Option<&FileVersion>,
        partitions: usize,
        batch: u64,
    ) -> Result<TaskResult, String> {
        // A kept buffer: taken for this map, given back after it (unless a long line made it large).
        let mut data = lock(&self.buffers).pop().unwrap_or_default();
        let limit = self.budget.max(input::MIN_SPLIT_LIMIT);
        input::read_split_into(split, version, limit, &mut data)?;
        let result = self.map_split(id, split, &data, partitions, batch);
        if data.capacity() as u64 <= KEPT_BUFFER.min(self.budget) {
            lock(&self.buffers).push(data);
        }
        result
    }

    /// Takes held output of batch `batch` (made when the batch is new) for map task `task` to fold into.
    fn join(
        &self,
        task: u64,
        batch: u64,
        partitions: usize,
    ) -> Result<(Folding<'_, J>, HeldOf<J>), String> {
        if partitions == 0 || partitions > crate::config::MAX_PARTITIONS {
            return Err(format!(
                "map task {task} has {partitions} partitions (a job has 1 to {})",
                crate::config::MAX_PARTITIONS
            ));
        }
        let mut batches = lock(&self.batches);
        let b = batches.entry(batch).or_insert_with(|| {
            Batch::new(RunSink {
                root: self.root.to_path_buf(),
                job: self.job_id,
                batch,
                runs: Mutex::new(vec![0; partitions]),
            })
        });
        if b.sealed {
            return Err(format!(
                "map task {task} came after batch {batch} was written (the master puts no map into a batch a reduce has read)"
            ));
        }
        if lock(&b.sink.runs).len() != partitions {
            return Err(format!(
                "map task {task} has {partitions} partitions, other maps of batch {batch} had {}",
                lock(&b.sink.runs).len()
            ));
        }
        if !b.folding.insert(task) {
            return Err(format!(
                "map task {task} is already folding into batch {batch} on this rank (it was delivered twice)"
            ));
        }
        let folding = Folding {
            worker: self,
            batch,
            task,
            sink: b.sink.clone(),
            finished: false,
        };
        Ok((folding, b.idle.pop().unwrap_or_default()))
    }

    fn map_split(
        &self,
        id: u64,
        split: &Split,
        data: &[u8],
        partitions: usize,
        batch: u64,
    ) -> Result<TaskResult, String> {
        let (folding, held) = self.join(id, batch, partitions)?;
        // A map of a newer batch (a map redone after reduces went out) starts while older batches may
        // still hold their output in memory; a map of an older batch may end after one has started.
        self.spill_older();
        let (held, counters) = self.map_lines(split, data, held, &folding.sink, partitions)?;
        folding.finish(held)?;
        self.spill_older();
        Ok(TaskResult::Mapped {
            holder: self.dsm.rank().0,
            input_bytes: data.len() as u64,
            counters,
        })
    }

    /// Maps the lines of a split (`bytes`), folding into `held`; returns what is held after it and the
    /// counters.
    fn map_lines(
        &self,
        split: &Split,
        bytes: &[u8],
        held: HeldOf<J>,
        sink: &RunSink,
        partitions: usize,
    ) -> Result<(HeldOf<J>, Counters), String> {
        let combiner = self.job.combiner();
        let partition = self.partitioner(partitions);
        let mut spill =
            |groups: Vec<Pairs<J>>| -> Result<(), String> { self.write_runs(groups, sink, false) };
        let mut emit = Emitter::folding_into(
            combiner,
            self.budget,
            (partitions, &partition),
            &mut spill,
            held,
        );
        let mut at = split.start;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            for (o, line) in input::lines(bytes) {
                if emit.failed() {
                    // The map fails with its spill's error (below); the rest of the split is not read.
                    break;
                }
                at = split.start + o as u64;
                let record = Record {
                    file: &split.file,
                    offset: at,
                    line,
                };
                self.job.map(&record, &mut emit);
            }
        }));
        if let Err(panic) = outcome {
            return Err(format!(
                "map panicked on the line at byte {at} of {}: {}",
                split.file.display(),
                panic_message(&*panic)
            ));
        }
        if let Some(e) = emit.error() {
            return Err(e);
        }
        let counters = std::mem::take(&mut emit.counters);
        Ok((emit.into_held(), counters))
    }

    /// Writes as runs the output that batches older than this rank's newest hold in memory, so that what
    /// a rank holds stays within the budget of one batch. Once a newer batch has started, an older one
    /// only waits for its reduces (a map redone late may still fold into it, and is written when it
    /// ends): held, its output would stay in memory beside the newer batch's, twice the budget. The
    /// batch stays open: its runs are among those a reduce reads when it writes the rest. A failed
    /// batch's output, which no reduce may read, is dropped instead. An error leaves that batch failed,
    /// for its reduces to report.
    fn spill_older(&self) {
        if older_held(&lock(&self.batches)).is_empty() {
            return;
        }
        // Under the seal's lock: a reduce that writes one of these batches waits until its runs are all
        // there.
        let _one = lock(&self.sealing);
        let (mut to_write, mut dropped) = (Vec::new(), Vec::new());
        {
            let mut batches = lock(&self.batches);
            for n in older_held(&batches) {
                let Some(b) = batches.get_mut(&n) else {
                    continue;
                };
                let held = std::mem::take(&mut b.idle);
                match b.failed {
                    None => to_write.push((n, held, b.sink.clone())),
                    Some(_) => dropped.push(held),
                }
            }
        }
        drop(dropped);
        for (batch, held, sink) in to_write {
            if let Err(e) = self.write_held(held, &sink) {
                if let Some(b) = lock(&self.batches).get_mut(&batch) {
                    b.failed.get_or_insert(e);
                }
            }
        }
    }

    /// Writes held outputs as runs, one per partition and held output, on the rank's threads. A panic
    /// (of the job's partitioner) is an error.
    fn write_held(&self, held: Vec<HeldOf<J>>, sink: &RunSink) -> Result<(), String> {
        let partitions = lock(&sink.runs).len();
        let partition = self.partitioner(partitions);
        catch_unwind(AssertUnwindSafe(|| {
            self.pool.install(|| {
                held.into_iter().try_for_each(|mut h| {
                    self.write_runs(h.take_grouped(partitions, &partition)?, sink, true)
                })
            })
        }))
        .unwrap_or_else(|panic| Err(format!("writing it panicked: {}", panic_message(&*panic))))
    }

    /// Writes batch `batch`'s held output as runs, one per partition and held output (once: after that
    /// it is found written), checks that it holds exactly the map tasks `tasks`, and returns its runs of
    /// `partition`.
    pub(crate) fn seal(
        &self,
        batch: u64,
        tasks: &[u64],
        partition: u32,
    ) -> Result<Vec<RunId>, String> {
        let me = self.dsm.rank();
        let _one = lock(&self.sealing);
        let to_write = {
            let mut batches = lock(&self.batches);
            let b = batches.get_mut(&batch).ok_or_else(|| {
                format!("{me} holds no map output of batch {batch} (a reduce expects that of map tasks {tasks:?})")
            })?;
            if b.sealed {
                None
            } else {
                // Refused before anything changes: the batch stays open to the maps still to come.
                b.holds_exactly(tasks, batch, me)?;
                if !b.folding.is_empty() {
                    // Maps the reduce does not expect: what they spilled is among the batch's runs
                    // already, and would be read as the batch's.
                    let what = format!(
                        "map tasks {:?} were still folding into batch {batch} on {me} when a reduce read it, which expects only map tasks {tasks:?} (a task ran twice)",
                        b.folding
                    );
                    b.failed.get_or_insert_with(|| what.clone());
                    return Err(what);
                }
                b.sealed = true;
                Some((std::mem::take(&mut b.idle), b.sink.clone()))
            }
        };
        if let Some((held, sink)) = to_write {
            // An error (a panic of the job's partitioner included) leaves the batch failed, not taken
            // for written with runs missing.
            if let Err(e) = self.write_held(held, &sink) {
                if let Some(b) = lock(&self.batches).get_mut(&batch) {
                    b.failed.get_or_insert(e);
                }
            }
        }
        let batches = lock(&self.batches);
        let b = batches
            .get(&batch)
            .ok_or_else(|| format!("{me} lost batch {batch} while writing it"))?;
        if let Some(e) = &b.failed {
            return Err(format!("batch {batch} on {me}: {e}"));
        }
        b.holds_exactly(tasks, batch, me)?;
        Ok(b.sink.ids(partition))
    }

    /// Seals batches of this rank for the shuffle: their runs of `partition`, counted.
    pub(crate) fn seal_for(&self, partition: u32, sources: &[Source]) -> Result<Vec<u32>, String> {
        sources
            .iter()
            .map(|s| {
                self.seal(s.batch, &s.tasks, partition)
                    .map(|ids| ids.len() as u32)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
