//! What a job runs on and how: inputs, output directory, partitions, split size, memory budget, threads.
//! Every setting has a default that suits one machine; the master's inputs, output and partitions are the
//! ones that count (it sends them with the tasks), the budget and threads are each rank's own.

use crate::input::Split;
use crate::MapReduceError;
use std::path::{Path, PathBuf};

/// When rank 0 shows a progress line on standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// When standard error is a terminal and the job runs longer than a second.
    #[default]
    Auto,
    /// Never.
    Never,
}

/// A job's inputs, output and resources.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub(crate) inputs: Vec<PathBuf>,
    pub(crate) splits: Vec<Split>,
    pub(crate) output: PathBuf,
    pub(crate) partitions: Option<usize>,
    pub(crate) split_size: u64,
    pub(crate) memory_budget: u64,
    pub(crate) threads: Option<usize>,
    pub(crate) overwrite: bool,
    pub(crate) progress: ProgressMode,
    pub(crate) merge_fan_in: usize,
}

/// The default split size: big enough that a task's fixed costs vanish, small enough to balance the load
/// (word count of 100 MB on 2 ranks: 8 MiB splits leave one rank idle at the end of the map phase, 4 MiB
/// ones scale 1.96x; see docs/BENCHMARKS.md).
pub const DEFAULT_SPLIT_SIZE: u64 = 4 << 20;
/// The default memory budget of a rank's map output held in memory.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;
/// The smallest memory budget accepted.
pub const MIN_MEMORY_BUDGET: u64 = 1 << 20;
/// The most reduce partitions a job may have: every batch of map output keeps a run count per partition,
/// and is written as at least one run per partition it has output for.
pub const MAX_PARTITIONS: usize = 1 << 16;
/// The most map tasks (splits) a job may have: every reduce task names every map task, by the batch
/// holding its output (its id, about 4 bytes each), in one task of at most the tuple space's 1 MiB field.
pub const MAX_MAPS: usize = 131_072;

/// The most map outputs (splits times partitions) a job may have: every reduce task names every map task,
/// so the reduce tasks the master puts hold this many ids, encoded (about 4 bytes each: 512 MiB at this
/// bound, where the two limits above allow 8.6 billion), in the task bag and at the master while it puts
/// them. In memory the master keeps one list of the ids, which its reduce tasks share.
pub const MAX_MAP_OUTPUTS: usize = 1 << 27;

/// The most threads a rank runs a job with (`JobConfig::threads`): each is a worker and a thread of the
/// rank's pool.
pub const MAX_THREADS: usize = 1024;
/// The default most runs a reduce merges at once.
pub const DEFAULT_MERGE_FAN_IN: usize = 128;

impl JobConfig {
    /// A job writing its output (files `part-00000`, `part-00001`, ...) into the directory `output`, which
    /// must not exist yet unless [`JobConfig::overwrite`] is set.
    pub fn new(output: impl AsRef<Path>) -> JobConfig {
        JobConfig {
            inputs: Vec::new(),
            splits: Vec::new(),
            output: output.as_ref().to_path_buf(),
            partitions: None,
            split_size: DEFAULT_SPLIT_SIZE,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            threads: None,
            overwrite: false,
            progress: ProgressMode::Auto,
            merge_fan_in: DEFAULT_MERGE_FAN_IN,
        }
    }

    /// Adds an input file, or a directory whose files (all of them, recursively, in name order) are inputs.
    /// Links are followed; a file or directory a walk reaches twice is taken once.
    pub fn input(mut self, path: impl AsRef<Path>) -> JobConfig {
        self.inputs.push(path.as_ref().to_path_buf());
        self
    }

    /// Adds several inputs.
    pub fn inputs<P: AsRef<Path>>(mut self, paths: impl IntoIterator<Item = P>) -> JobConfig {
        self.inputs
            .extend(paths.into_iter().map(|p| p.as_ref().to_path_buf()));
        self
    }

    /// Adds splits chosen by the caller, taken as they are: each becomes one map task, which reads its byte
    /// range line by line (a line that crosses a split's end is cut there, so start and end splits at line
    /// boundaries). Their files are checked before the job starts, like other inputs, and must not change
    /// while it runs (a change anywhere in a file fails the job, as for files given as inputs).
    pub fn splits(mut self, splits: impl IntoIterator<Item = Split>) -> JobConfig {
        self.splits.extend(splits);
        self
    }

    /// The number of reduce partitions, and so of output files (default: one per task slot, the ranks times
    /// the threads of a rank).
    pub fn partitions(mut self, n: usize) -> JobConfig {
        self.partitions = Some(n);
        self
    }

    /// The size of the splits input files are cut into (at line boundaries; default 4 MiB). The last
    /// splits are smaller, down to a sixteenth, so that the ranks finish their maps close together.
    pub fn split_size(mut self, bytes: u64) -> JobConfig {
        self.split_size = bytes;
        self
    }

    /// The memory a rank's map output may take before it is spilled to disk as sorted runs (default 256 MiB),
    /// and a reduce's runs fetched from other ranks before they go to a file. Outside it, each of the
    /// rank's threads holds the split it maps (up to the split size, 4 MiB by default) and each reduce the
    /// answer being fetched (up to 4 MiB): a budget near the smallest (1 MiB) is exceeded several times
    /// over by those, and one of 64 MiB keeps a rank of a 1 GB word count under 256 MiB
    /// (docs/BENCHMARKS.md).
    pub fn memory_budget(mut self, bytes: u64) -> JobConfig {
        self.memory_budget = bytes;
        self
    }

    /// The threads of each rank (default: this machine's cores shared among the job's ranks on it): as many
    /// task slots, each running one task at a time, and a rayon pool that sorts and writes a task's output
    /// partitions in parallel.
    pub fn threads(mut self, n: usize) -> JobConfig {
        self.threads = Some(n);
        self
    }

    /// Allows writing into an output directory that exists (its `part-*` files are replaced).
    pub fn overwrite(mut self, yes: bool) -> JobConfig {
        self.overwrite = yes;
        self
    }

    /// The most runs a reduce merges at once (default 128, at least 2). A partition with more runs (many
    /// maps, or maps that spilled) is merged in passes, through intermediate run files on the reducer's
    /// disk, so that a reduce never holds more open files and read buffers than this; lower it where the
    /// limit on open files is low.
    pub fn merge_fan_in(mut self, runs: usize) -> JobConfig {
        self.merge_fan_in = runs;
        self
    }

    /// Whether rank 0 shows progress.
    pub fn progress(mut self, mode: ProgressMode) -> JobConfig {
        self.progress = mode;
        self
    }

    /// Checks, in this process alone, what a job would refuse first: the settings, the inputs (each there,
    /// readable, and walked as the job walks them) and the output (absent, or a directory and
    /// [`JobConfig::overwrite`] set). [`MapReduce::run`](crate::MapReduce::run) checks all this again, with
    /// what depends on the job's ranks; a program that starts its ranks itself calls this first, so that a
    /// mistyped path is said once, before any rank starts, and not by every rank.
    pub fn validate(&self) -> Result<(), MapReduceError> {
        self.check().map_err(MapReduceError::Config)?;
        self.has_input()?;
        crate::input::expand(&self.inputs)?;
        for s in &self.splits {
            std::fs::metadata(&s.file).map_err(|error| MapReduceError::Input {
                path: s.file.clone(),
                error,
            })?;
        }
        match std::fs::metadata(&self.output) {
            Ok(there) => self.may_take_output(&there),
            Err(_) => Ok(()),
        }
    }

    /// Refuses a job that names no input.
    pub(crate) fn has_input(&self) -> Result<(), MapReduceError> {
        if self.inputs.is_empty() && self.splits.is_empty() {
            return Err(MapReduceError::Config(
                "no input: give input files, directories or splits".into(),
            ));
        }
        Ok(())
    }

    /// Refuses an output that is there already (`there`, its metadata) unless it is a directory and the
    /// job may overwrite it.
    pub(crate) fn may_take_output(&self, there: &std::fs::Metadata) -> Result<(), MapReduceError> {
        if !there.is_dir() {
            return Err(MapReduceError::Config(format!(
                "output {} exists and is not a directory",
                self.output.display()
            )));
        }
        if !self.overwrite {
            return Err(MapReduceError::OutputExists(self.output.clone()));
        }
        Ok(())
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.split_size == 0 {
            return Err("the split size must be at least 1 byte".into());
        }
        if self.memory_budget < MIN_MEMORY_BUDGET {
            return Err(format!(
                "a memory budget of {} bytes is too small: use at least {MIN_MEMORY_BUDGET} (1 MiB)",
                self.memory_budget
            ));
        }
        if self.partitions == Some(0) || self.partitions.is_some_and(|p| p > MAX_PARTITIONS) {
            return Err(format!(
                "{} partitions: use 1 to {MAX_PARTITIONS}",
                self.partitions.unwrap_or(0),
            ));
        }
        if self.threads == Some(0) || self.threads.is_some_and(|t| t > MAX_THREADS) {
            return Err(format!(
                "{} threads a rank: use 1 to {MAX_THREADS}",
                self.threads.unwrap_or(0)
            ));
        }
        if self.merge_fan_in < 2 {
            return Err(format!(
                "a merge fan-in of {} runs: use 2 or more",
                self.merge_fan_in
            ));
        }
        Ok(())
    }

    /// The memory budget of one map or reduce task, on a rank of a job of `size` ranks.
    pub(crate) fn task_budget(&self, size: usize) -> u64 {
        (self.memory_budget / self.threads_for(size) as u64).max(1)
    }

    /// The threads a rank of a job of `size` ranks uses.
    pub(crate) fn threads_for(&self, size: usize) -> usize {
        self.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            // Ranks of this job on this machine: MPI launchers say; dsmrun starts them all here.
            let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
                .iter()
                .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
                .unwrap_or(size)
                .max(1);
            (cores / local).max(1)
        })
    }
}
