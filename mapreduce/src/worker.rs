//! What a rank does with a task (each of its task slots runs one at a time). A map task reads its split,
//! runs `map` over its lines, and folds what it emitted into the output its task slot holds for the
//! task's batch (spilling sorted runs under the rank's spill directory past the memory budget). The first
//! reduce to need a batch has it written: what is held becomes sorted runs, one per partition. A reduce
//! task gathers its partition's runs (its own rank's from disk, others' through the shuffle), merges
//! them, calls `reduce` once per key in key order, and writes the partition's file under a temporary name
//! that it then renames.
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
use crate::runs::{self, RunReader};
use crate::shuffle::{self, FetchError, RunId};
use crate::Job;
use dsm::{panic_message, Dsm, Rank};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

type Pairs<J> = Vec<(<J as Job>::Key, <J as Job>::Value)>;
type Readers<J> = Vec<RunReader<<J as Job>::Key, <J as Job>::Value>>;
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

/// A file being written, removed when dropped unless it was finished (`.0` taken).
struct Unfinished(Option<PathBuf>);

impl Unfinished {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new("(finished)"))
    }

    /// The file, kept.
    fn finish(&mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

/// A fetched run coming in, piece by piece.
enum Arriving {
    Memory(Vec<u8>),
    /// In a file of the reduce's own, being written.
    File(Unfinished, File),
}

/// Where a reduce keeps the runs it fetches: in memory while everything fetched fits in its budget, then
/// in files of its own (a run under way when the budget is passed goes on in a file, with what came of it
/// before). A run whose end never comes (the fetch failed) leaves no file behind.
struct Keeping<'a> {
    budget: u64,
    fetched: &'a mut u64,
    runs: &'a mut Vec<Located>,
    arriving: Option<Arriving>,
}

impl Keeping<'_> {
    /// Takes the next piece of the run under way (`last`: it ends the run); `file` names the run's file
    /// should it need one, and `what` names the run.
    fn piece(
        &mut self,
        bytes: &[u8],
        last: bool,
        file: impl FnOnce() -> PathBuf,
        what: impl FnOnce() -> String,
    ) -> Result<(), FetchError> {
        *self.fetched += bytes.len() as u64;
        let run = self
            .arriving
            .get_or_insert_with(|| Arriving::Memory(Vec::new()));
        let writing = |path: &Path, e: std::io::Error| {
            FetchError::Failed(format!("writing {}: {e}", path.display()))
        };
        if let (Arriving::Memory(held), true) = (&*run, *self.fetched > self.budget) {
            let path = file();
            let unfinished = Unfinished(Some(path.clone()));
            let out = File::create(&path)
                .and_then(|mut out| out.write_all(held).map(|()| out))
                .map_err(|e| writing(&path, e))?;
            *run = Arriving::File(unfinished, out);
        }
        match run {
            Arriving::Memory(held) => held.extend_from_slice(bytes),
            Arriving::File(file, out) => {
                out.write_all(bytes).map_err(|e| writing(file.path(), e))?
            }
        }
        if last {
            let source = match self.arriving.take() {
                Some(Arriving::File(mut file, _)) => RunSource::Own(file.finish()),
                // Only the run's bytes stay: grown a piece at a time, it may have room for nearly as
                // many again, which the budget does not count.
                Some(Arriving::Memory(mut held)) => {
                    held.shrink_to_fit();
                    RunSource::Bytes(held)
                }
                None => RunSource::Bytes(Vec::new()),
            };
            self.runs.push(Located {
                source,
                what: what(),
            });
        }
        Ok(())
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Where one run a reduce merges is, until it is opened.
enum RunSource {
    /// A file that stays (this rank's map output: the job's directory goes at the end of the job).
    Kept(PathBuf),
    /// A file of this reduce's own (fetched past the budget, or merged in an earlier pass): removed once
    /// open, so its space comes back as it is read.
    Own(PathBuf),
    /// A fetched run held in memory.
    Bytes(Vec<u8>),
}

/// A run and its name in errors.
struct Located {
    source: RunSource,
    what: String,
}

impl Drop for Located {
    fn drop(&mut self) {
        // A file of this reduce's own that was never opened (the reduce failed first) goes with it, not
        // with the job's directory at the end of the job.
        if let RunSource::Own(path) = &self.source {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Located {
    /// A reader of the run, with a read buffer of `buffer` bytes for one in a file.
    fn open<K: DeserializeOwned, V: DeserializeOwned>(
        mut self,
        buffer: usize,
    ) -> Result<RunReader<K, V>, String> {
        let file =
            |path: &Path| File::open(path).map_err(|e| format!("opening {}: {e}", path.display()));
        let source = std::mem::replace(&mut self.source, RunSource::Bytes(Vec::new()));
        let src: Box<dyn BufRead + Send> = match source {
            RunSource::Kept(path) => Box::new(BufReader::with_capacity(buffer, file(&path)?)),
            RunSource::Own(path) => {
                let opened = file(&path);
                // Open, it stays readable; unlinked, its space goes back once it is read. One that would not
                // open goes too: the reduce fails, and nothing else reads it.
                let _ = std::fs::remove_file(&path);
                Box::new(BufReader::with_capacity(buffer, opened?))
            }
            RunSource::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
        };
        Ok(RunReader::new(src, std::mem::take(&mut self.what)))
    }
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

    /// Finds every run of `partition` in the batches `sources`: this rank's own on disk (written now if
    /// no reduce has asked for them before), others fetched (kept in memory up to the budget, then in files
    /// of this reduce's own), all of one holder's in one exchange once it has written them. Returns them,
    /// unopened, their bytes in all, and the bytes fetched.
    fn locate(
        &self,
        id: u64,
        partition: u32,
        sources: &[Source],
    ) -> Result<(Vec<Located>, u64, u64), TaskResult> {
        let failed = |what: String| TaskResult::Failed { what };
        let me = self.dsm.rank();
        let mut runs = Vec::new();
        let mut bytes = 0u64;
        let mut fetched = 0u64;
        let what = |holder: u32, rid: &RunId| {
            format!(
                "map output {} of batch {} of rank {holder} for partition {partition}",
                rid.run, rid.batch
            )
        };
        let mut holders: Vec<u32> = Vec::new();
        for s in sources {
            if s.holder == me.0 {
                for rid in self.seal(s.batch, &s.tasks, partition).map_err(failed)? {
                    let path = rid.path(self.root);
                    bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
                    runs.push(Located {
                        source: RunSource::Kept(path),
                        what: what(me.0, &rid),
                    });
                }
            } else if !holders.contains(&s.holder) {
                holders.push(s.holder);
            }
        }
        for holder in holders {
            let theirs: Vec<Source> = sources
                .iter()
                .filter(|s| s.holder == holder)
                .cloned()
                .collect();
            let lost = |e: FetchError| match e {
                FetchError::Lost => TaskResult::Lost { holder },
                FetchError::Failed(e) => failed(e),
            };
            let counts = shuffle::seal(self.dsm, Rank(holder), self.job_id, partition, &theirs)
                .map_err(lost)?;
            let wanted: Vec<RunId> = theirs
                .iter()
                .zip(counts)
                .flat_map(|(s, n)| {
                    (0..n).map(move |run| RunId {
                        job: self.job_id,
                        batch: s.batch,
                        partition,
                        run,
                    })
                })
                .collect();
            let mut keeping = Keeping {
                budget: self.budget,
                fetched: &mut fetched,
                runs: &mut runs,
                arriving: None,
            };
            let mut keep = |index: usize, bytes: &[u8], last: bool| {
                let rid = &wanted[index];
                let file = || {
                    shuffle::job_dir(self.root, self.job_id)
                        .join(format!("fetched-{id}-{holder}-{}-{}", rid.batch, rid.run))
                };
                keeping.piece(bytes, last, file, || what(holder, rid))
            };
            shuffle::fetch_all(self.dsm, Rank(holder), &wanted, &mut keep).map_err(lost)?;
        }
        Ok((runs, bytes + fetched, fetched))
    }

    /// Opens `runs` to be merged at once, each with a read buffer of 64 KiB while their buffers fit in a
    /// quarter of the budget, smaller (down to 4 KiB) for many.
    fn open_all(&self, runs: Vec<Located>) -> Result<Readers<J>, String> {
        let buffer = (self.budget / 4 / runs.len().max(1) as u64).clamp(4 << 10, 64 << 10) as usize;
        runs.into_iter().map(|r| r.open(buffer)).collect()
    }

    /// Merges `group`, runs of `partition`, into one run written to `path` (values of a key folded by the
    /// combiner, or all kept). A panic of the combiner is an error naming the key.
    fn merge_runs(&self, partition: u32, group: Vec<Located>, path: &Path) -> Result<(), String> {
        let readers = self.open_all(group)?;
        let io = |e: std::io::Error| format!("writing {}: {e}", path.display());
        let out = BufWriter::with_capacity(256 << 10, File::create(path).map_err(io)?);
        let mut run = runs::RunWriter::new(out);
        let combiner = self.job.combiner();
        // One record at a time: a key's values are folded as they come, or passed on, never held together
        // (a key with more values than the memory budget takes merges like any other).
        // The key as the group's first record has it, and the total so far.
        let mut total = None;
        let mut panicked = None;
        runs::merge_records(readers, |key, value, more| {
            let Some(combine) = combiner else {
                return run.push(&key, &value);
            };
            match &mut total {
                Some((_, t)) => {
                    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| combine(t, value))) {
                        panicked = Some(format!(
                            "the combiner panicked on key {key} of partition {partition} (merging its runs): {}",
                            panic_message(&*panic)
                        ));
                        return Err(std::io::Error::other("the combiner panicked"));
                    }
                }
                None => total = Some((key, value)),
            }
            match total.take_if(|_| !more) {
                Some((k, t)) => run.push(&k, &t),
                None => Ok(()),
            }
        })
        .map_err(|e| {
            panicked
                .take()
                .unwrap_or_else(|| format!("merging runs into {}: {e}", path.display()))
        })?;
        run.finish().map(drop).map_err(io)
    }

    fn reduce(
        &self,
        id: u64,
        partition: u32,
        sources: &[Source],
        output: &Path,
    ) -> Result<TaskResult, String> {
        // The map phase is over (a map redone after a failure makes its buffer anew).
        lock(&self.buffers).clear();
        let (mut runs, run_bytes, fetched) = match self.locate(id, partition, sources) {
            Ok(r) => r,
            Err(result) => return Ok(result),
        };
        let run_count = runs.len() as u64;
        // More runs than one merge takes: merge them a group at a time into runs of this reduce's own,
        // oldest first, until one merge takes what is left.
        let mut pass = 0;
        while runs.len() > self.fan_in {
            let group: Vec<Located> = runs.drain(..self.fan_in).collect();
            let path = shuffle::job_dir(self.root, self.job_id).join(format!("merged-{id}-{pass}"));
            pass += 1;
            // Counted among the runs before it is written: a merge that fails leaves no file behind.
            runs.push(Located {
                source: RunSource::Own(path.clone()),
                what: format!("intermediate merge {pass} of partition {partition}"),
            });
            self.merge_runs(partition, group, &path)?;
        }
        let readers = self.open_all(runs)?;
        let name = format!("part-{partition:05}");
        let tmp = output.join(format!(".{name}.{}.{id}.tmp", self.dsm.rank().0));
        // Removed unless renamed into place, even if writing it panics.
        let mut unfinished = Unfinished(Some(tmp.clone()));
        let (records, counters) = self.write_partition(partition, readers, &tmp)?;
        let done = output.join(&name);
        std::fs::rename(&tmp, &done)
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), done.display()))?;
        unfinished.0 = None;
        Ok(TaskResult::Reduced {
            records,
            runs: run_count,
            run_bytes,
            shuffled_bytes: fetched,
            counters,
        })
    }

    /// Merges `readers`, reduces each key and writes the lines to `tmp`, synced; returns the lines
    /// written and the counters.
    fn write_partition(
        &self,
        partition: u32,
        readers: Readers<J>,
        tmp: &Path,
    ) -> Result<(u64, Counters), String> {
        let io = |e: std::io::Error| format!("writing {}: {e}", tmp.display());
        let file = File::create(tmp).map_err(|e| match tmp.parent() {
            // The job's directory in the output, which rank 0 made: not there is not the same directory.
            Some(dir) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => format!(
                "{} made {} for this job, but it is not there on {}: every rank must see the output directory at the same path (a directory shared between hosts)",
                Rank(0),
                dir.display(),
                self.dsm.rank()
            ),
            _ => io(e),
        })?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        let mut counters = Counters::default();
        let mut records = 0u64;
        let mut panicked = None;
        runs::merge(readers, |key, values| {
            match catch_unwind(AssertUnwindSafe(|| {
                self.job.reduce(&key, values, &mut counters)
            })) {
                Ok(Some(value)) => {
                    records += 1;
                    writeln!(out, "{key}\t{value}")
                }
                Ok(None) => Ok(()),
                Err(panic) => {
                    panicked = Some(format!(
                        "reduce panicked on key {key} of partition {partition}: {}",
                        panic_message(&*panic)
                    ));
                    Err(std::io::Error::other("reduce panicked"))
                }
            }
        })
        .map_err(|e| {
            panicked
                .take()
                .unwrap_or_else(|| format!("reducing partition {partition}: {e}"))
        })?;
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok((records, counters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts words; panics on a line that says so, and has no partition for the word "boom".
    struct Count;

    impl Job for Count {
        type Key = String;
        type Value = u64;
        type Output = u64;

        fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
            let line = String::from_utf8_lossy(record.line);
            assert!(line != "panic", "asked to");
            for w in line.split_whitespace() {
                emit.emit_ref(w, 1);
            }
        }

        fn combiner(&self) -> Option<crate::Combiner<u64>> {
            Some(|total, n| *total += n)
        }

        fn partition(&self, key: &String, partitions: usize) -> usize {
            assert!(key != "boom", "no partition for boom");
            crate::default_partition(key, partitions)
        }

        fn reduce(&self, _: &String, counts: Vec<u64>, _: &mut Counters) -> Option<u64> {
            Some(counts.iter().sum())
        }
    }

    /// Counts words, with a combiner that panics on a total past 100.
    struct Overflowing;

    impl Job for Overflowing {
        type Key = String;
        type Value = u64;
        type Output = u64;

        fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
            Count.map(record, emit)
        }

        fn combiner(&self) -> Option<crate::Combiner<u64>> {
            Some(|total, n| {
                *total += n;
                assert!(*total <= 100, "a total past 100");
            })
        }

        fn reduce(&self, k: &String, counts: Vec<u64>, c: &mut Counters) -> Option<u64> {
            Count.reduce(k, counts, c)
        }
    }

    #[test]
    fn a_combiner_panicking_in_a_merge_of_runs_fails_it_naming_the_key() {
        dsm_runtime::local::run_local_job(1, 2, |rt| {
            let root = std::env::temp_dir().join(format!("dsm-merge-test-{}", std::process::id()));
            std::fs::create_dir_all(&root).unwrap();
            let pool = one_thread();
            let w = worker(&Overflowing, rt.dsm(), &root, &pool);
            // Two runs holding "x" 60 times each: their merge adds up to 120.
            let run = |n: u64| {
                let mut bytes = Vec::new();
                let mut writer = runs::RunWriter::new(&mut bytes);
                writer.push(&"w".to_string(), &1u64).unwrap();
                writer.push(&"x".to_string(), &n).unwrap();
                writer.finish().unwrap();
                Located {
                    source: RunSource::Bytes(bytes),
                    what: format!("a run of {n}"),
                }
            };
            let merged = root.join("merged");
            let e = w
                .merge_runs(3, vec![run(60), run(60)], &merged)
                .unwrap_err();
            assert!(
                e.starts_with(
                    "the combiner panicked on key x of partition 3 (merging its runs): a total past 100"
                ),
                "{e}"
            );
            std::fs::remove_dir_all(&root).unwrap();
        });
    }

    /// A rayon pool of one thread.
    fn one_thread() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
    }

    /// A worker of job 0 running `Count` on `dsm`, with its runs under `root`.
    fn counting<'a>(
        dsm: &'a Dsm,
        root: &'a Path,
        pool: &'a rayon::ThreadPool,
    ) -> Worker<'a, Count> {
        worker(&Count, dsm, root, pool)
    }

    /// A worker of job 0 running `job` on `dsm`, with its runs under `root`.
    fn worker<'a, J: Job>(
        job: &'a J,
        dsm: &'a Dsm,
        root: &'a Path,
        pool: &'a rayon::ThreadPool,
    ) -> Worker<'a, J> {
        Worker {
            job,
            dsm,
            root,
            job_id: 0,
            pool,
            budget: 1 << 20,
            fan_in: 8,
            batches: Mutex::new(HashMap::new()),
            sealing: Mutex::new(()),
            buffers: Mutex::new(Vec::new()),
        }
    }

    /// A map task of bytes `start..end` of `file` into two partitions, folding into batch `batch`.
    fn map_of(file: &Path, start: u64, end: u64, batch: u64) -> Task {
        Task::Map {
            index: 0,
            split: Split {
                file: file.to_path_buf(),
                start,
                end,
            },
            version: None,
            partitions: 2,
            batch,
        }
    }

    /// What the runs of `ids` hold, summed by key.
    fn read_runs(root: &Path, ids: &[RunId]) -> std::collections::BTreeMap<String, u64> {
        let mut all = std::collections::BTreeMap::new();
        for id in ids {
            let file = File::open(id.path(root)).unwrap();
            let mut r: RunReader<String, u64> =
                RunReader::new(Box::new(BufReader::new(file)), "t".into());
            while let Some((k, v)) = r.next_pair().unwrap() {
                *all.entry(k).or_insert(0) += v;
            }
        }
        all
    }

    #[test]
    fn a_batch_folds_its_maps_is_written_once_and_is_checked_against_what_a_reduce_expects() {
        dsm_runtime::local::run_local_job(1, 2, |rt| {
            let root = std::env::temp_dir().join(format!("dsm-batch-test-{}", std::process::id()));
            std::fs::create_dir_all(shuffle::job_dir(&root, 0)).unwrap();
            let input = root.join("in.txt");
            std::fs::write(&input, "a b a\nc a\npanic\nboom\n").unwrap();
            let pool = one_thread();
            let w = counting(rt.dsm(), &root, &pool);
            let map = |task: u64, start, end, batch| w.run(task, map_of(&input, start, end, batch));
            assert!(matches!(map(1, 0, 6, 0), TaskResult::Mapped { .. }));
            assert!(matches!(map(2, 6, 10, 0), TaskResult::Mapped { .. }));
            // The maps' output is folded: one run per partition, with both maps' counts.
            let ids: Vec<RunId> = (0..2)
                .flat_map(|p| w.seal(0, &[1, 2], p).unwrap())
                .collect();
            assert_eq!(ids.len(), 2);
            let counts = read_runs(&root, &ids);
            let expect = [("a", 3), ("b", 1), ("c", 1)];
            assert_eq!(
                counts,
                expect.iter().map(|(k, n)| (k.to_string(), *n)).collect()
            );
            // Written once: asked again, the same runs.
            assert_eq!(w.seal(0, &[1, 2], 0).unwrap(), ids[..1]);
            // A reduce expecting other tasks is refused, naming both sets.
            let e = w.seal(0, &[1], 0).unwrap_err();
            assert!(e.contains("[1, 2]") && e.contains("[1]"), "{e}");
            // No map joins a written batch.
            let TaskResult::Failed { what } = map(3, 0, 6, 0) else {
                panic!("a map into a written batch fails")
            };
            assert!(what.contains("after batch 0 was written"), "{what}");
            // A map folded twice into one batch, or failing halfway, leaves a batch no reduce may read.
            assert!(matches!(map(4, 0, 6, 1), TaskResult::Mapped { .. }));
            let TaskResult::Failed { what } = map(4, 0, 6, 1) else {
                panic!("the same map twice fails")
            };
            assert!(what.contains("twice"), "{what}");
            assert!(w.seal(1, &[4], 0).unwrap_err().contains("twice"));
            assert!(matches!(map(5, 0, 6, 2), TaskResult::Mapped { .. }));
            let TaskResult::Failed { what } = map(6, 10, 16, 2) else {
                panic!("a panicking map fails")
            };
            assert!(what.contains("asked to"), "{what}");
            let e = w.seal(2, &[5], 0).unwrap_err();
            assert!(e.contains("map task 6 failed"), "{e}");
            // A batch whose writing panicked stays failed: asked again, it is not taken for written.
            assert!(matches!(map(7, 16, 21, 3), TaskResult::Mapped { .. }));
            for _ in 0..2 {
                let e = w.seal(3, &[7], 0).unwrap_err();
                assert!(
                    e.contains("the job's partition() panicked on key boom: no partition for boom"),
                    "{e}"
                );
            }
            // A map still folding into a batch that a reduce reads (a task delivered twice): the batch
            // fails, rather than hand out what that map spilled as the batch's.
            assert!(matches!(map(8, 0, 6, 4), TaskResult::Mapped { .. }));
            let in_flight = w.join(9, 4, 2).unwrap();
            assert!(w.join(9, 4, 2).err().unwrap().contains("already folding"));
            let e = w.seal(4, &[8], 0).unwrap_err();
            assert!(e.contains("map tasks {9} were still folding"), "{e}");
            drop(in_flight);
            assert!(w.seal(4, &[8], 0).is_err(), "the batch was taken for sound");
            // A batch this rank never had.
            assert!(w
                .seal(9, &[1], 0)
                .unwrap_err()
                .contains("no map output of batch 9"));
            let _ = std::fs::remove_dir_all(&root);
        });
    }

    #[test]
    fn once_a_newer_batch_starts_older_ones_keep_nothing_in_memory_and_are_still_read_whole() {
        dsm_runtime::local::run_local_job(1, 2, |rt| {
            let root = std::env::temp_dir().join(format!("dsm-older-test-{}", std::process::id()));
            std::fs::create_dir_all(shuffle::job_dir(&root, 0)).unwrap();
            let input = root.join("in.txt");
            std::fs::write(&input, "a b a\nc a\n").unwrap();
            let pool = one_thread();
            let w = counting(rt.dsm(), &root, &pool);
            let map = |task: u64, start, end, batch| w.run(task, map_of(&input, start, end, batch));
            let held = |batch| lock(&w.batches)[&batch].idle.len();
            let runs = |batch| {
                let batches = lock(&w.batches);
                (0..2)
                    .flat_map(|p| batches[&batch].sink.ids(p))
                    .collect::<Vec<_>>()
            };
            let words = |list: &[(&str, u64)]| {
                list.iter()
                    .map(|(k, n)| (k.to_string(), *n))
                    .collect::<std::collections::BTreeMap<_, _>>()
            };
            assert!(matches!(map(1, 0, 6, 0), TaskResult::Mapped { .. }));
            assert!(matches!(map(2, 6, 10, 0), TaskResult::Mapped { .. }));
            // The newest batch keeps its output in memory.
            assert_eq!((held(0), runs(0).len()), (1, 0));
            // Batch 1 fails with output held: map 4 ends well, map 5 beside it fails.
            let five = w.join(5, 1, 2).unwrap();
            assert!(matches!(map(4, 0, 6, 1), TaskResult::Mapped { .. }));
            drop(five);
            assert_eq!(held(1), 1);
            // A map of batch 2 starts: batch 0's output goes to runs, failed batch 1's is dropped.
            assert!(matches!(map(6, 0, 6, 2), TaskResult::Mapped { .. }));
            assert_eq!((held(0), held(1), held(2)), (0, 0, 1));
            assert_eq!((runs(0).len(), runs(1).len(), runs(2).len()), (2, 0, 0));
            assert_eq!(
                read_runs(&root, &runs(0)),
                words(&[("a", 3), ("b", 1), ("c", 1)])
            );
            // A map of batch 0 redone late: its output is written when it ends.
            assert!(matches!(map(7, 0, 6, 0), TaskResult::Mapped { .. }));
            assert_eq!(held(0), 0);
            assert!(runs(0).len() > 2);
            // A reduce reads batch 0 whole: the runs written early and nothing else.
            let ids: Vec<RunId> = (0..2)
                .flat_map(|p| w.seal(0, &[1, 2, 7], p).unwrap())
                .collect();
            assert_eq!(ids, runs(0));
            assert_eq!(
                read_runs(&root, &ids),
                words(&[("a", 5), ("b", 2), ("c", 1)])
            );
            assert!(w
                .seal(1, &[4], 0)
                .unwrap_err()
                .contains("map task 5 failed"));
            let ids: Vec<RunId> = (0..2).flat_map(|p| w.seal(2, &[6], p).unwrap()).collect();
            assert_eq!(read_runs(&root, &ids), words(&[("a", 2), ("b", 1)]));
            let _ = std::fs::remove_dir_all(&root);
        });
    }

    #[test]
    fn a_reduces_own_run_files_go_when_dropped_or_failing_to_open_and_kept_ones_stay() {
        let dir = std::env::temp_dir().join(format!("dsm-mr-located-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (own, kept) = (dir.join("fetched"), dir.join("map-output"));
        for p in [&own, &kept] {
            std::fs::write(p, b"").unwrap();
        }
        drop(Located {
            source: RunSource::Own(own.clone()),
            what: "a fetched run".into(),
        });
        drop(Located {
            source: RunSource::Kept(kept.clone()),
            what: "a map output".into(),
        });
        assert!(!own.exists(), "a reduce's own file outlived it");
        assert!(kept.exists(), "map output went with a reduce");
        // One that is there but will not open (a socket: ENXIO, even for root) goes with the failure.
        let unopenable = dir.join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&unopenable).unwrap();
        let failed = Located {
            source: RunSource::Own(unopenable.clone()),
            what: "a fetched run".into(),
        }
        .open::<String, u64>(4096);
        assert!(failed.is_err_and(|e| e.contains("opening")));
        assert!(
            std::fs::symlink_metadata(&unopenable).is_err(),
            "a reduce's own file outlived a failed open"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fetched_runs_stay_in_memory_within_the_budget_and_go_on_in_files_past_it() {
        let dir = std::env::temp_dir().join(format!("dsm-mr-keeping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut fetched, mut runs) = (0u64, Vec::new());
        let mut keeping = Keeping {
            budget: 10,
            fetched: &mut fetched,
            runs: &mut runs,
            arriving: None,
        };
        let mut piece = |bytes: &[u8], last, name: &str| {
            let path = dir.join(name);
            keeping.piece(bytes, last, || path, || name.to_string())
        };
        // Within the budget; then a run that passes it halfway; then one past it from the start; then one
        // whose end never comes.
        piece(b"aaaaa", true, "a").unwrap();
        piece(b"bbbb", false, "b").unwrap();
        piece(b"BBBB", true, "b").unwrap();
        piece(b"c", true, "c").unwrap();
        piece(b"dd", false, "d").unwrap();
        assert!(dir.join("d").exists());
        drop(keeping);
        assert!(
            !dir.join("d").exists(),
            "an unfinished run's file outlived it"
        );
        assert_eq!(fetched, 16);
        let kept: Vec<(&str, Vec<u8>)> = runs
            .iter()
            .map(|r| match &r.source {
                RunSource::Bytes(b) => ("memory", b.clone()),
                RunSource::Own(path) => ("file", std::fs::read(path).unwrap()),
                RunSource::Kept(_) => ("kept", Vec::new()),
            })
            .collect();
        assert_eq!(
            kept,
            [
                ("memory", b"aaaaa".to_vec()),
                ("file", b"bbbbBBBB".to_vec()),
                ("file", b"c".to_vec())
            ]
        );
        drop(runs);
        // A run kept in memory takes its own size, not the room its growing left.
        let (mut fetched, mut runs) = (0u64, Vec::new());
        let mut keeping = Keeping {
            budget: 16 << 20,
            fetched: &mut fetched,
            runs: &mut runs,
            arriving: None,
        };
        let path = dir.join("e");
        keeping
            .piece(&[1; 4 << 20], false, || path.clone(), || "e".into())
            .unwrap();
        keeping
            .piece(&[2; 1 << 20], true, || path.clone(), || "e".into())
            .unwrap();
        let RunSource::Bytes(held) = &runs[0].source else {
            panic!("kept in memory")
        };
        assert_eq!(held.len(), 5 << 20);
        assert!(held.capacity() < (5 << 20) + 4096, "{}", held.capacity());
        drop(runs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn results_too_large_for_the_tuple_space_become_short_failures() {
        let huge = "x".repeat(2 << 20);
        let TaskResult::Failed { what } = bounded(TaskResult::Failed { what: huge }, "map", 1)
        else {
            panic!("a failure stays a failure")
        };
        assert_eq!(what.len(), 16 << 10);

        let mut counters = Counters::default();
        for i in 0..50_000 {
            counters.add(&format!("key {i}"), 1);
        }
        let big = TaskResult::Reduced {
            records: 1,
            runs: 1,
            run_bytes: 0,
            shuffled_bytes: 0,
            counters,
        };
        let TaskResult::Failed { what } = bounded(big, "reduce", 7) else {
            panic!("a result over the limit becomes a failure")
        };
        assert!(
            what.contains("reduce task 7") && what.contains("counter"),
            "{what}"
        );

        let small = TaskResult::Lost { holder: 3 };
        assert_eq!(bounded(small.clone(), "reduce", 7), small);
    }
}
