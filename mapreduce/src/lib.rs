//! MapReduce over dsm: a [`Job`] with typed keys and values, run by every rank of a job. Rank 0 is the
//! master: it cuts the input into splits at line boundaries and hands out map and reduce tasks through the
//! tuple space (a task farm homed on rank 0), so ranks take work as they become free. Map output is folded
//! by the combiner into one table per task slot, shared by every map that slot runs, and stays in memory
//! (spilled to local disk as sorted runs when it outgrows the memory budget); when the first reduce needs
//! it, each rank cuts what it holds into partitions, sorts them and writes them as runs on local disk. A
//! reduce task fetches its partition's runs from the ranks that hold them over the job's own connections
//! (a dsm service), merges them, and writes its output file atomically. Inside a rank, several task slots
//! take tasks at once, and a `rayon` pool sorts and writes the partitions in parallel.
//!
//! A worker that dies loses nothing for good: the task it held goes back into the bag (the farm's leases), and
//! map output it held is recomputed when a reducer finds it gone. The master's death ends the job with an
//! error on every rank. Run a job that should survive a worker's death with `dsmrun --keep-going`. A rank
//! that is alive but cannot take part (its own settings are refused, its threads or its directory for
//! runs cannot be made) fails the job on every rank, naming itself: the job does not go on without it.
//!
//! This crate never touches memory directly: no unsafe code, no shared regions; only the tuple space and
//! services of `dsm-runtime` and `dsm`.
//!
//! ```no_run
//! use dsm_mapreduce::{Counters, Emitter, Job, JobConfig, MapReduce, Record};
//!
//! struct LineLengths;
//! impl Job for LineLengths {
//!     type Key = u64;
//!     type Value = u64;
//!     type Output = u64;
//!     fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, u64, u64>) {
//!         emit.emit(record.line.len() as u64, 1);
//!     }
//!     fn combiner(&self) -> Option<dsm_mapreduce::Combiner<u64>> {
//!         Some(|total, n| *total += n)
//!     }
//!     fn reduce(&self, _len: &u64, counts: Vec<u64>, _: &mut Counters) -> Option<u64> {
//!         Some(counts.iter().sum())
//!     }
//! }
//!
//! let rt = dsm_runtime::Runtime::init()?;
//! let space = dsm_runtime::TupleSpace::join(&rt)?;
//! let mr = MapReduce::new(&space)?;
//! let report = mr.run(&LineLengths, &JobConfig::new("out").input("input.txt"))?;
//! if let Some(report) = report {
//!     eprintln!("{report}");
//! }
//! drop(mr);
//! drop(space);
//! rt.finish()?; // the job went well (a rank that ends without it leaves as a failed one)
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod config;
mod emit;
mod engine;
mod input;
mod master;
mod progress;
mod runs;
mod shuffle;
mod worker;

pub use config::{
    JobConfig, ProgressMode, DEFAULT_MEMORY_BUDGET, DEFAULT_MERGE_FAN_IN, DEFAULT_SPLIT_SIZE,
    MAX_MAPS, MAX_MAP_OUTPUTS, MAX_PARTITIONS, MAX_THREADS, MIN_MEMORY_BUDGET,
};
pub use emit::{Counters, Emitter};
pub use engine::{JobReport, MapReduce, SUCCESS};
pub use input::{Record, Split};

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Display;
use std::hash::Hash;
use std::path::PathBuf;

/// Folds `value` into `total`, the value already held for the same key: a job's combiner. It must be
/// associative and agree with `reduce` (reducing combined values gives what reducing the originals would).
/// Values are folded in whatever order the tasks run in, which differs from run to run (and more so when a
/// rank fails and its tasks run again): for the same output every time, it must be commutative too (a sum,
/// a count, a maximum; not an append to a list, whose order would vary).
pub type Combiner<V> = fn(&mut V, V);

/// A MapReduce computation. Every rank runs the same job; its functions run on any rank, on any thread.
pub trait Job: Send + Sync {
    /// Keys: sorted in the output, hashed to partitions.
    type Key: Serialize + DeserializeOwned + Ord + Hash + Clone + Send + Sync + Display;
    /// Values emitted by `map` for a key.
    type Value: Serialize + DeserializeOwned + Send + Sync;
    /// What `reduce` makes of a key's values; written as `key<TAB>output` lines.
    type Output: Display;

    /// Emits pairs for one input record (a line, without its newline).
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, Self::Key, Self::Value>);

    /// The combiner, if the job has one: pairs with equal keys are folded together as they are emitted,
    /// which keeps map output small (word counts). A combiner may grow its total (appending to a list):
    /// the growth of one combine in a few hundred is measured and counted against the memory budget, for
    /// all of them.
    fn combiner(&self) -> Option<Combiner<Self::Value>> {
        None
    }

    /// The partition (`0..partitions`) of `key`. The default hashes the key; it must give every rank the
    /// same answer.
    fn partition(&self, key: &Self::Key, partitions: usize) -> usize {
        default_partition(key, partitions)
    }

    /// Reduces all values of `key`, in no particular order (it varies from run to run: a reduce whose
    /// output depends on it writes different part files each time). `None` writes nothing for the key.
    /// A key's values are all in memory for its call, whatever the memory budget: with a combiner they
    /// are at most one for each run merged (`JobConfig::merge_fan_in`), and without one a key with more
    /// values than the budget holds takes more memory than it.
    fn reduce(
        &self,
        key: &Self::Key,
        values: Vec<Self::Value>,
        counters: &mut Counters,
    ) -> Option<Self::Output>;
}

/// The default partitioner: a hash of the key, the same in every process of one build.
pub fn default_partition<K: Hash>(key: &K, partitions: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault};
    // FxHash: deterministic in every process of a job, and a few times cheaper than SipHash per key.
    let h = BuildHasherDefault::<rustc_hash::FxHasher>::default().hash_one(key);
    // The high bits of the product spread evenly over 0..partitions.
    ((h as u128 * partitions as u128) >> 64) as usize
}

/// What to check about an input the system would not let the job find or open.
fn path_hint(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::{NotADirectory, NotFound, PermissionDenied};
    match error.kind() {
        NotFound | PermissionDenied | NotADirectory => " (check the path and its permissions)",
        _ => "",
    }
}

/// What went wrong with a MapReduce job.
#[derive(Debug, thiserror::Error)]
pub enum MapReduceError {
    /// An input file or directory cannot be used.
    #[error("input {path}: {error}{}", path_hint(error))]
    Input {
        /// The file or directory.
        path: PathBuf,
        /// What the system said (in the message, so not also given as the error's `source`).
        error: std::io::Error,
    },
    /// The output directory exists and the job was not told to overwrite it.
    #[error("output directory {0} exists: choose another, remove it, or allow overwriting (JobConfig::overwrite, --overwrite)")]
    OutputExists(PathBuf),
    /// A file operation of the engine failed.
    #[error("{context}: {error}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// What the system said (in the message, so not also given as the error's `source`).
        error: std::io::Error,
    },
    /// The job failed: a map or reduce task failed (a panic in the job's code, an input that changed under
    /// the job), or, on ranks other than the master, the master could not start it (the master's own
    /// error, as it reported it).
    #[error("{0}")]
    TaskFailed(String),
    /// The master rank failed, or could not be reached; the job cannot go on.
    #[error("the master (rank 0) is gone: {0}")]
    MasterLost(String),
    /// A setting is out of range.
    #[error("job configuration: {0}")]
    Config(String),
    /// The runtime (tuple space, transport) failed.
    #[error(transparent)]
    Runtime(#[from] dsm_runtime::RuntimeError),
}

impl MapReduceError {
    pub(crate) fn io(context: impl Into<String>, error: std::io::Error) -> MapReduceError {
        MapReduceError::Io {
            context: context.into(),
            error,
        }
    }
}
