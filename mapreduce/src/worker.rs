//! What a rank does with a task (each of its task slots runs one at a time). A map task reads its split,
//! runs `map` over its lines, and writes what it emitted as sorted runs, one or more per partition, under
//! the rank's spill directory. A reduce task gathers its partition's runs (its own from disk, others'
//! through the shuffle), merges them, calls `reduce` once per key in key order, and writes the partition's
//! file under a temporary name that it then renames.
//!
//! A panic in the job's code fails the task with the panic's message and where it happened (the record's
//! file and byte, or the key); it never takes the rank down.

use crate::emit::{Counters, Emitter};
use crate::input::{self, FileVersion, Record, Split};
use crate::master::{Source, Task, TaskResult};
use crate::runs::{self, RunReader};
use crate::shuffle::{self, FetchError, RunId};
use crate::Job;
use dsm::{panic_message, Dsm, Rank};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

type Pairs<J> = Vec<(<J as Job>::Key, <J as Job>::Value)>;
/// One partition's pairs, in place: its number and its slice.
type Slice<'a, J> = (usize, &'a mut [(<J as Job>::Key, <J as Job>::Value)]);
type Readers<J> = Vec<RunReader<<J as Job>::Key, <J as Job>::Value>>;

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
    /// Emptied tables of finished map tasks, whose allocations the next map tasks reuse (a table that
    /// grew to a split's distinct keys need not grow again, page by page, for the next split), and the
    /// buffers they read their splits into. Both go when the first reduce starts (the reduce phase has a
    /// budget of its own) and with the worker at the end of the job.
    pub(crate) tables: Mutex<Vec<Table<J>>>,
    pub(crate) buffers: Mutex<Vec<Vec<u8>>>,
}

type Table<J> = rustc_hash::FxHashMap<<J as Job>::Key, <J as Job>::Value>;

/// A file being written, removed when dropped unless it was finished (`.0` taken).
struct Unfinished(Option<PathBuf>);

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

impl Located {
    /// A reader of the run, with a read buffer of `buffer` bytes for one in a file.
    fn open<K: DeserializeOwned, V: DeserializeOwned>(
        self,
        buffer: usize,
    ) -> Result<RunReader<K, V>, String> {
        let file =
            |path: &Path| File::open(path).map_err(|e| format!("opening {}: {e}", path.display()));
        let src: Box<dyn BufRead + Send> = match self.source {
            RunSource::Kept(path) => Box::new(BufReader::with_capacity(buffer, file(&path)?)),
            RunSource::Own(path) => {
                let f = file(&path)?;
                // Open, it stays readable; unlinked, its space goes back once it is read.
                let _ = std::fs::remove_file(&path);
                Box::new(BufReader::with_capacity(buffer, f))
            }
            RunSource::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
        };
        Ok(RunReader::new(src, self.what))
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

/// Where one map task's runs go, from any of its threads.
struct RunSink<'a> {
    root: &'a Path,
    job: u64,
    task: u64,
    runs: Mutex<Vec<u32>>,
    bytes: AtomicU64,
}

impl RunSink<'_> {
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
            task: self.task,
            partition: partition as u32,
            run,
        };
        let path = id.path(self.root);
        let what = |e: std::io::Error| format!("writing map output {}: {e}", path.display());
        let mut out = BufWriter::new(File::create(&path).map_err(what)?);
        let n = runs::write_run(&mut out, pairs).map_err(what)?;
        out.flush().map_err(what)?;
        self.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
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
                ..
            } => self.map(id, &split, version.as_ref(), partitions as usize),
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

    /// Groups `pairs` by partition and sorts each group by key, in place, and writes each partition's
    /// pairs as one run (the partitions' sorts and writes in parallel when `parallel`). The pairs' keys
    /// need no combining here: with a combiner they come from its table, one pair per key; without one,
    /// all are kept.
    fn write_runs(
        &self,
        mut pairs: Pairs<J>,
        n: usize,
        sink: &RunSink<'_>,
        parallel: bool,
    ) -> Result<(), String> {
        // Each key's partition, computed once; then each pair is swapped straight into its partition's
        // place (a sort by partition took as long as the sorts by key that follow, for two partitions).
        let mut parts = Vec::with_capacity(pairs.len());
        let mut ends = vec![0usize; n];
        for (k, _) in &pairs {
            let p = self.job.partition(k, n);
            if p >= n {
                return Err(format!(
                    "the job's partition() gave {p} for key {k}, with {n} partitions"
                ));
            }
            ends[p] += 1;
            parts.push(p);
        }
        let mut next = Vec::with_capacity(n);
        let mut at = 0;
        for end in ends.iter_mut() {
            next.push(at);
            at += *end;
            *end = at;
        }
        for p in 0..n {
            // The pairs before `next[p]` in partition p's place belong there. The one at `next[p]` does,
            // or goes to the first unsettled place of its own partition (a later one: the earlier ones
            // are full), whose pair comes here to be looked at in turn.
            while next[p] < ends[p] {
                let i = next[p];
                let q = parts[i];
                if q == p {
                    next[p] += 1;
                } else {
                    let j = next[q];
                    pairs.swap(i, j);
                    parts.swap(i, j);
                    next[q] += 1;
                }
            }
        }
        let mut slices: Vec<Slice<'_, J>> = Vec::new();
        let mut rest: &mut [(J::Key, J::Value)] = &mut pairs;
        let mut start = 0;
        for (p, &end) in ends.iter().enumerate() {
            let (mine, after) = std::mem::take(&mut rest).split_at_mut(end - start);
            if !mine.is_empty() {
                slices.push((p, mine));
            }
            rest = after;
            start = end;
        }
        let each = |(p, slice): Slice<'_, J>| {
            slice.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            sink.write(p, slice)
        };
        if parallel {
            slices.into_par_iter().try_for_each(each)
        } else {
            slices.into_iter().try_for_each(each)
        }
    }

    fn map(
        &self,
        id: u64,
        split: &Split,
        version: Option<&FileVersion>,
        partitions: usize,
    ) -> Result<TaskResult, String> {
        // A kept buffer: taken for this map, given back after it (unless a long line made it large).
        let mut data = lock(&self.buffers).pop().unwrap_or_default();
        let limit = self.budget.max(input::MIN_SPLIT_LIMIT);
        input::read_split_into(split, version, limit, &mut data)?;
        let result = self.map_split(id, split, &data, partitions);
        if data.capacity() as u64 <= KEPT_BUFFER.min(self.budget) {
            lock(&self.buffers).push(data);
        }
        result
    }

    fn map_split(
        &self,
        id: u64,
        split: &Split,
        data: &[u8],
        partitions: usize,
    ) -> Result<TaskResult, String> {
        let sink = RunSink {
            root: self.root,
            job: self.job_id,
            task: id,
            runs: Mutex::new(vec![0; partitions]),
            bytes: AtomicU64::new(0),
        };
        let (held, counters) = self.map_lines(split, data, &sink, partitions)?;
        // What is still held is sorted and written, one run per partition, on the rank's threads (the
        // other task slots may be idle at the end of the map phase).
        self.pool
            .install(|| self.write_runs(held, partitions, &sink, true))?;
        Ok(TaskResult::Mapped {
            holder: self.dsm.rank().0,
            runs: sink.runs.into_inner().unwrap_or_else(|p| p.into_inner()),
            input_bytes: data.len() as u64,
            output_bytes: sink.bytes.into_inner(),
            counters,
        })
    }

    /// Maps the lines of a split (`bytes`); returns what is still held and the counters.
    fn map_lines(
        &self,
        split: &Split,
        bytes: &[u8],
        sink: &RunSink<'_>,
        partitions: usize,
    ) -> Result<(Pairs<J>, Counters), String> {
        let combiner = self.job.combiner();
        let mut spill = |held: Pairs<J>| -> Result<(), String> {
            self.write_runs(held, partitions, sink, false)
        };
        let table = lock(&self.tables).pop().unwrap_or_default();
        let mut emit = Emitter::with_table(combiner, self.budget, &mut spill, table);
        let mut at = split.start;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            for (o, line) in input::lines(bytes) {
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
        let held = emit.take();
        let counters = std::mem::take(&mut emit.counters);
        lock(&self.tables).push(emit.into_table());
        Ok((held, counters))
    }

    /// Finds every run of `partition` at `sources`: its own on disk, others fetched (kept in memory up to
    /// the budget, then in files of its own), all of one holder's in one exchange. Returns them, unopened,
    /// and the bytes fetched.
    fn locate(
        &self,
        id: u64,
        partition: u32,
        sources: &[Source],
    ) -> Result<(Vec<Located>, u64), TaskResult> {
        let failed = |what: String| TaskResult::Failed { what };
        let me = self.dsm.rank();
        let mut runs = Vec::new();
        let mut fetched = 0u64;
        let job = self.job_id;
        let run_ids = |s: &Source| {
            let task = s.task;
            (0..s.runs).map(move |run| RunId {
                job,
                task,
                partition,
                run,
            })
        };
        let what = |rid: &RunId| {
            format!(
                "map output {} of task {} for partition {partition}",
                rid.run, rid.task
            )
        };
        let mut holders: Vec<u32> = Vec::new();
        for s in sources {
            if s.holder == me.0 {
                for rid in run_ids(s) {
                    runs.push(Located {
                        source: RunSource::Kept(rid.path(self.root)),
                        what: what(&rid),
                    });
                }
            } else if !holders.contains(&s.holder) {
                holders.push(s.holder);
            }
        }
        for holder in holders {
            let wanted: Vec<RunId> = sources
                .iter()
                .filter(|s| s.holder == holder)
                .flat_map(run_ids)
                .collect();
            let mut keep = |index: usize, bytes: Vec<u8>| -> Result<(), FetchError> {
                let rid = &wanted[index];
                fetched += bytes.len() as u64;
                let source = if fetched <= self.budget {
                    RunSource::Bytes(bytes)
                } else {
                    let path = shuffle::job_dir(self.root, self.job_id)
                        .join(format!("fetched-{id}-{holder}-{}-{}", rid.task, rid.run));
                    std::fs::write(&path, &bytes).map_err(|e| {
                        FetchError::Failed(format!("writing {}: {e}", path.display()))
                    })?;
                    RunSource::Own(path)
                };
                runs.push(Located {
                    source,
                    what: what(rid),
                });
                Ok(())
            };
            match shuffle::fetch_all(self.dsm, Rank(holder), &wanted, &mut keep) {
                Ok(()) => {}
                Err(FetchError::Lost) => return Err(TaskResult::Lost { holder }),
                Err(FetchError::Failed(e)) => return Err(failed(e)),
            }
        }
        Ok((runs, fetched))
    }

    /// Opens `runs` to be merged at once, each with a read buffer of 64 KiB while their buffers fit in a
    /// quarter of the budget, smaller (down to 4 KiB) for many.
    fn open_all(&self, runs: Vec<Located>) -> Result<Readers<J>, String> {
        let buffer = (self.budget / 4 / runs.len().max(1) as u64).clamp(4 << 10, 64 << 10) as usize;
        runs.into_iter().map(|r| r.open(buffer)).collect()
    }

    /// Merges `group` into one run written to `path` (values of a key folded by the combiner, or all kept).
    fn merge_runs(&self, group: Vec<Located>, path: &Path) -> Result<(), String> {
        let readers = self.open_all(group)?;
        let io = |e: std::io::Error| format!("writing {}: {e}", path.display());
        let mut out = BufWriter::with_capacity(256 << 10, File::create(path).map_err(io)?);
        let combiner = self.job.combiner();
        let mut buf = Vec::new();
        runs::merge(readers, |key, values| {
            match combiner {
                Some(combine) => {
                    let mut values = values.into_iter();
                    if let Some(mut total) = values.next() {
                        for v in values {
                            combine(&mut total, v);
                        }
                        runs::write_pair(&mut out, &mut buf, &key, &total)?;
                    }
                }
                None => {
                    for v in &values {
                        runs::write_pair(&mut out, &mut buf, &key, v)?;
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| format!("merging runs into {}: {e}", path.display()))?;
        out.flush().map_err(io)
    }

    fn reduce(
        &self,
        id: u64,
        partition: u32,
        sources: &[Source],
        output: &Path,
    ) -> Result<TaskResult, String> {
        // The map phase is over (a map redone after a failure makes its buffers anew).
        lock(&self.tables).clear();
        lock(&self.buffers).clear();
        let (mut runs, fetched) = match self.locate(id, partition, sources) {
            Ok(r) => r,
            Err(result) => return Ok(result),
        };
        // More runs than one merge takes: merge them a group at a time into runs of this reduce's own,
        // oldest first, until one merge takes what is left.
        let mut pass = 0;
        while runs.len() > self.fan_in {
            let group: Vec<Located> = runs.drain(..self.fan_in).collect();
            let path = shuffle::job_dir(self.root, self.job_id).join(format!("merged-{id}-{pass}"));
            self.merge_runs(group, &path)?;
            pass += 1;
            runs.push(Located {
                source: RunSource::Own(path),
                what: format!("intermediate merge {pass} of partition {partition}"),
            });
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
        let file = File::create(tmp).map_err(io)?;
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
