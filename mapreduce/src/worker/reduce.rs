//! The reduce side of a worker: finding a partition's runs (this rank's on disk, others' fetched through
//! the shuffle and kept in memory or in files of the reduce's own within its budget), merging them, calling
//! `reduce` once per key in key order, and writing the partition's file under a temporary name that it
//! then renames.

use super::{lock, Worker};
use crate::emit::Counters;
use crate::master::{Source, TaskResult};
use crate::runs::{self, RunReader};
use crate::shuffle::{self, FetchError, RunId};
use crate::Job;
use dsm::{panic_message, Rank};
use serde::de::DeserializeOwned;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

type Readers<J> = Vec<RunReader<<J as Job>::Key, <J as Job>::Value>>;

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
pub(super) struct Keeping<'a> {
    budget: u64,
    fetched: &'a mut u64,
    runs: &'a mut Vec<Located>,
    arriving: Option<Arriving>,
}

impl<'a> Keeping<'a> {
    /// Keeps runs in memory up to `budget` bytes fetched in all (counted in `fetched`), listing them in
    /// `runs`.
    pub(super) fn new(
        budget: u64,
        fetched: &'a mut u64,
        runs: &'a mut Vec<Located>,
    ) -> Keeping<'a> {
        Keeping {
            budget,
            fetched,
            runs,
            arriving: None,
        }
    }

    /// Takes the next piece of the run under way (`last`: it ends the run); `file` names the run's file
    /// should it need one, and `what` names the run.
    pub(super) fn piece(
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
pub(super) enum RunSource {
    /// A file that stays (this rank's map output: the job's directory goes at the end of the job).
    Kept(PathBuf),
    /// A file of this reduce's own (fetched past the budget, or merged in an earlier pass): removed once
    /// open, so its space comes back as it is read.
    Own(PathBuf),
    /// A fetched run held in memory.
    Bytes(Vec<u8>),
}

/// A run and its name in errors.
pub(super) struct Located {
    pub(super) source: RunSource,
    pub(super) what: String,
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
    pub(super) fn open<K: DeserializeOwned, V: DeserializeOwned>(
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

impl<J: Job> Worker<'_, J> {
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
            let mut keeping = Keeping::new(self.budget, &mut fetched, &mut runs);
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
    pub(super) fn merge_runs(
        &self,
        partition: u32,
        group: Vec<Located>,
        path: &Path,
    ) -> Result<(), String> {
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

    pub(super) fn reduce(
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
