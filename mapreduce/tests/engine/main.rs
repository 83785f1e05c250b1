//! The MapReduce engine with ranks as threads over the in-process transport: the same task farm, shuffle
//! service and files as multi-process jobs (`examples/tests` runs those, with ranks killed), in a second.
//! The jobs and helpers the tests share are here; the tests, by subject, in the modules.

use dsm::transport::local::local_cluster;
use dsm::{Dsm, Rank};
use dsm_mapreduce::{
    Combiner, Counters, Emitter, Job, JobConfig, MapReduce, MapReduceError, ProgressMode, Record,
    Split,
};
use dsm_runtime::{Runtime, TupleSpace};
use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod engines;
mod failures;
mod jobs;

/// Runs `body` on every rank of an in-process job of `ranks` ranks, each with its engine.
fn job<F>(ranks: usize, body: F)
where
    F: Fn(&Runtime, &MapReduce) + Send + Sync + 'static,
{
    dsm_runtime::local::run_local_job(ranks, 3, move |rt| {
        let space = TupleSpace::join(rt).unwrap();
        let mr = MapReduce::new(&space).unwrap();
        body(rt, &mr);
    });
}

/// A fresh directory for one test, removed when the test ends (passing or failing).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("dsm-mr-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    /// The directory's path (to move into a job's ranks).
    fn path(&self) -> PathBuf {
        self.0.clone()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Counts whitespace-separated words (any bytes, shown lossily), with a combiner.
struct Words;

impl Job for Words {
    type Key = String;
    type Value = u64;
    type Output = u64;
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
        for w in record.line.split(|b| b.is_ascii_whitespace()) {
            if !w.is_empty() {
                emit.emit_ref(String::from_utf8_lossy(w).as_ref(), 1);
            }
        }
        emit.count("lines", 1);
    }
    fn combiner(&self) -> Option<Combiner<u64>> {
        Some(|total, n| *total += n)
    }
    fn reduce(&self, _: &String, counts: Vec<u64>, _: &mut Counters) -> Option<u64> {
        Some(counts.iter().sum())
    }
}

/// Word count whose partitioner answers a partition past the last for the word "far".
struct BadPartition;

impl Job for BadPartition {
    type Key = String;
    type Value = u64;
    type Output = u64;
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
        Words.map(record, emit)
    }
    fn combiner(&self) -> Option<Combiner<u64>> {
        Words.combiner()
    }
    fn partition(&self, key: &String, partitions: usize) -> usize {
        if key == "far" {
            partitions
        } else {
            0
        }
    }
    fn reduce(&self, k: &String, counts: Vec<u64>, c: &mut Counters) -> Option<u64> {
        Words.reduce(k, counts, c)
    }
}

/// Writes `files` input files of `lines` lines of words drawn from `vocabulary` words (with a few bytes
/// that are not UTF-8); returns their paths.
fn write_inputs(dir: &Path, files: usize, lines: usize, vocabulary: usize) -> Vec<PathBuf> {
    let mut seed = 7u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..files)
        .map(|f| {
            let mut text = Vec::new();
            for _ in 0..lines {
                for _ in 0..(next() % 9) {
                    text.extend_from_slice(format!("w{} ", next() % vocabulary as u64).as_bytes());
                }
                if next() % 50 == 0 {
                    text.extend_from_slice(b"\xff\xfe caf\xc3\xa9 ");
                }
                text.push(b'\n');
            }
            let p = dir.join(format!("in-{f}.txt"));
            std::fs::write(&p, text).unwrap();
            p
        })
        .collect()
}

/// The output of a job: every `key<TAB>value` line of its part files, by key.
fn read_output(dir: &Path, parts: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in 0..parts {
        let text = std::fs::read_to_string(dir.join(format!("part-{p:05}"))).unwrap();
        let mut last: Option<String> = None;
        for line in text.lines() {
            let (k, v) = line.split_once('\t').unwrap();
            assert!(last.as_deref() < Some(k), "keys sorted within a part file");
            last = Some(k.to_string());
            assert!(
                out.insert(k.to_string(), v.to_string()).is_none(),
                "{k} in two partitions"
            );
        }
    }
    out
}

fn expected_words(files: &[PathBuf]) -> BTreeMap<String, String> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for f in files {
        for w in std::fs::read(f).unwrap().split(|b| b.is_ascii_whitespace()) {
            if !w.is_empty() {
                *counts
                    .entry(String::from_utf8_lossy(w).into_owned())
                    .or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
}

/// Panics in map on a line holding `boom`, in reduce on the key `bang`.
struct Fragile;

impl Job for Fragile {
    type Key = String;
    type Value = u64;
    type Output = u64;
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
        let line = String::from_utf8_lossy(record.line);
        assert!(!line.contains("boom"), "the map found a bomb");
        for w in line.split_whitespace() {
            emit.emit_ref(w, 1);
        }
    }
    fn reduce(&self, key: &String, counts: Vec<u64>, _: &mut Counters) -> Option<u64> {
        assert_ne!(key, "bang", "the reduce found a bang");
        Some(counts.len() as u64)
    }
}

/// A job of one rank on this thread, with its tuple space (for tests that need the engine outside
/// `run_local_job`).
fn one_rank() -> (Runtime, TupleSpace) {
    let transports = local_cluster(1, 2).unwrap();
    let dsm = Dsm::builder()
        .rank(Rank(0), 1)
        .channels(2)
        .transport(Box::new(transports.into_iter().next().unwrap()))
        .build()
        .unwrap();
    let rt = Runtime::from_dsm(dsm);
    let space = TupleSpace::join(&rt).unwrap();
    (rt, space)
}

/// This host's name as the engine writes it in directory names.
fn this_host() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The id of a process that has ended, and so no longer runs.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    dead
}
