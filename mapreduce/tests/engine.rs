//! The MapReduce engine with ranks as threads over the in-process transport: the same task farm, shuffle
//! service and files as multi-process jobs (`examples/tests` runs those, with ranks killed), in a second.

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

/// For every first word of a line, the sorted byte offsets of its lines: no combiner, every value kept.
struct Offsets;

impl Job for Offsets {
    type Key = String;
    type Value = u64;
    type Output = String;
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
        if let Some(w) = record.line.split(|b| *b == b' ').next() {
            emit.emit(String::from_utf8_lossy(w).into_owned(), record.offset);
        }
    }
    /// By the key's first byte, so that a test can tell the partitioner was used.
    fn partition(&self, key: &String, partitions: usize) -> usize {
        key.bytes().next().map_or(0, |b| b as usize % partitions)
    }
    fn reduce(&self, _: &String, mut offsets: Vec<u64>, c: &mut Counters) -> Option<String> {
        offsets.sort();
        c.add("keys", 1);
        Some(format!("{offsets:?}"))
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

#[test]
fn word_counts_match_a_plain_count_with_and_without_spilling() {
    let scratch = Scratch::new("words");
    let dir = scratch.path();
    let files = write_inputs(&dir, 6, 10_000, 1_000_000);
    let expect = expected_words(&files);
    let lines: u64 = files
        .iter()
        .map(|f| {
            std::fs::read(f)
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64
        })
        .sum();
    job(3, move |rt, mr| {
        // Small splits and room to spare; then whole files as splits, one partition, and the smallest
        // budget, so that maps spill and the reducer keeps fetched runs on disk; then many small splits
        // spilling and merged three runs at a time, so that reduces merge in passes; then more threads per
        // rank than
        // the ranks have channels to wait on (3 channels, 2 for waits), so that workers waiting for tasks
        // must make room for one that holds a map's result (this job once hung there).
        for (name, split, budget, threads, parts, fan_in) in [
            ("roomy", 64 << 10, 64 << 20, 2, 5, 128),
            ("crowded", 64 << 10, 64 << 20, 5, 2, 128),
            ("tight", 1 << 20, 1 << 20, 1, 1, 128),
            ("passes", 16 << 10, 1 << 20, 1, 2, 3),
        ] {
            let out = dir.join(name);
            let config = JobConfig::new(&out)
                .inputs(&files)
                .split_size(split)
                .memory_budget(budget)
                .threads(threads)
                .partitions(parts)
                .merge_fan_in(fan_in)
                .progress(ProgressMode::Never);
            let report = mr.run(&Words, &config).unwrap();
            if rt.rank() == Rank(0) {
                let report = report.expect("rank 0 reports");
                assert_eq!(read_output(&out, parts), expect, "{name}");
                assert_eq!(
                    report.counters.get("lines"),
                    lines,
                    "each line counted once"
                );
                assert_eq!(report.output_records, expect.len() as u64);
                // Without spilling, each partition has a run from each task slot that mapped (3 ranks
                // times `threads`), whatever the number of maps: a rank folds its maps together.
                let slots = (3 * threads * parts) as u64;
                if budget > 1 << 20 {
                    assert!(report.maps > 6, "inputs cut into several splits: {report}");
                    assert!(report.map_runs <= slots, "{name}: {report}");
                } else {
                    // About 40,000 distinct words per file do not fit in 1 MiB: maps spilled, so there
                    // are more runs than task slots (and, merged three at a time, several passes).
                    assert!(report.map_runs > slots, "{name}: {report}");
                }
                // What crossed between ranks is map output, counted once. (How much crosses depends on
                // which rank took which task: asserting a floor here failed once under load, when the
                // reducer's own rank had taken most of the maps.)
                assert!(
                    report.shuffled_bytes <= report.map_output_bytes,
                    "{name}: {report}"
                );
            } else {
                assert!(report.is_none());
            }
        }
    });
}

#[test]
fn jobs_leave_no_tuples_behind_but_the_last_outcome() {
    let scratch = Scratch::new("leftovers");
    let dir = scratch.path();
    let files = write_inputs(&dir, 2, 500, 1000);
    let expect = expected_words(&files);
    let bomb = dir.join("bomb.txt");
    std::fs::write(&bomb, b"a boom\n").unwrap();
    dsm_runtime::local::run_local_job(2, 3, move |rt| {
        let space = TupleSpace::join(rt).unwrap();
        let mr = MapReduce::new(&space).unwrap();
        for k in 0..4 {
            let out = dir.join(format!("out-{k}"));
            let config = JobConfig::new(&out)
                .inputs(&files)
                .split_size(4 << 10)
                .partitions(2)
                .progress(ProgressMode::Never);
            // A job that fails before it starts (settings out of range) leaves nothing either, nor does
            // one that fails while other maps still run (their results come after the master stopped
            // taking them).
            let bad = config.clone().merge_fan_in(1);
            assert!(mr.run(&Words, &bad).is_err());
            let failing = JobConfig::new(dir.join(format!("failed-{k}")))
                .input(&bomb)
                .inputs(&files)
                .split_size(4 << 10)
                .progress(ProgressMode::Never);
            assert!(mr.run(&Fragile, &failing).is_err());
            mr.run(&Words, &config).unwrap();
            if rt.rank() == Rank(0) {
                assert_eq!(read_output(&out, 2), expect, "job {k}");
            }
        }
        rt.dsm().barrier().unwrap();
        if rt.rank() == Rank(0) {
            // The farms' stop marks (key, "task", id, bytes), results nobody took (key, "result", id,
            // bytes) and the jobs' outcomes (key, ok, message): of all twelve jobs, only the last one's
            // outcome is left.
            let marks = space
                .count(&dsm_runtime::template!(?String, "task", ?u64, ?Vec<u8>))
                .unwrap();
            let results = space
                .count(&dsm_runtime::template!(?String, "result", ?u64, ?Vec<u8>))
                .unwrap();
            let outcomes = space
                .count(&dsm_runtime::template!(?String, ?bool, ?String))
                .unwrap();
            assert_eq!((marks, results, outcomes), (0, 0, 1));
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn every_value_reaches_its_key_without_a_combiner() {
    let scratch = Scratch::new("offsets");
    let dir = scratch.path();
    let files = write_inputs(&dir, 1, 3000, 50);
    let mut offsets: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let text = std::fs::read(&files[0]).unwrap();
    let mut at = 0u64;
    for line in text.split(|b| *b == b'\n') {
        if at < text.len() as u64 {
            let first = line.split(|b| *b == b' ').next().unwrap();
            offsets
                .entry(String::from_utf8_lossy(first).into_owned())
                .or_default()
                .push(at);
        }
        at += line.len() as u64 + 1;
    }
    let expect: BTreeMap<String, String> = offsets
        .into_iter()
        .map(|(k, v)| (k, format!("{v:?}")))
        .collect();
    assert!(expect.len() > 10);
    // Splits of the caller's own: the file cut at every 500th line.
    let mut cuts = vec![0u64];
    let mut at = 0u64;
    for (i, line) in text.split(|b| *b == b'\n').enumerate() {
        at += line.len() as u64 + 1;
        if i % 500 == 499 && at < text.len() as u64 {
            cuts.push(at);
        }
    }
    cuts.push(text.len() as u64);
    let splits: Vec<Split> = cuts
        .windows(2)
        .map(|w| Split {
            file: files[0].clone(),
            start: w[0],
            end: w[1],
        })
        .collect();
    job(2, move |rt, mr| {
        for (name, config) in [
            (
                "cut",
                JobConfig::new(dir.join("cut"))
                    .input(&files[0])
                    .split_size(4 << 10),
            ),
            (
                "given",
                JobConfig::new(dir.join("given")).splits(splits.clone()),
            ),
            (
                "passes",
                JobConfig::new(dir.join("passes"))
                    .splits(splits.clone())
                    .merge_fan_in(2),
            ),
        ] {
            let config = config.partitions(3).progress(ProgressMode::Never);
            let report = mr.run(&Offsets, &config).unwrap();
            if rt.rank() == Rank(0) {
                let report = report.unwrap();
                let out = dir.join(name);
                assert_eq!(read_output(&out, 3), expect, "{name}");
                assert_eq!(report.counters.get("keys"), expect.len() as u64);
                if name != "cut" {
                    assert_eq!(report.maps, splits.len());
                }
                // Every key is in the partition the job's partitioner chose.
                for p in 0..3 {
                    let text = std::fs::read_to_string(out.join(format!("part-{p:05}"))).unwrap();
                    for line in text.lines() {
                        let key = line.split_once('\t').unwrap().0.to_string();
                        assert_eq!(Offsets.partition(&key, 3), p, "{key}");
                    }
                }
            }
        }
    });
}

#[test]
fn bad_input_and_output_are_clear_errors_on_every_rank() {
    let scratch = Scratch::new("bad");
    let dir = scratch.path();
    let files = write_inputs(&dir, 1, 10, 5);
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    job(2, move |rt, mr| {
        let me = rt.rank();
        // A missing input: named, and nothing written.
        let out = dir.join("never");
        let missing = dir.join("no-such-file.txt");
        let e = mr
            .run(
                &Words,
                &JobConfig::new(&out).input(&files[0]).input(&missing),
            )
            .unwrap_err();
        assert!(e.to_string().contains("no-such-file.txt"), "{me}: {e}");
        assert!(
            !out.exists(),
            "nothing written for a job with a missing input"
        );

        // Empty input: a valid, empty output.
        let out = dir.join("empty-out");
        let r = mr
            .run(&Words, &JobConfig::new(&out).input(&empty).partitions(2))
            .unwrap();
        if me == Rank(0) {
            assert_eq!(r.unwrap().output_records, 0);
            assert!(read_output(&out, 2).is_empty());
        }

        // An output that exists: refused, unless told to overwrite.
        let e = mr
            .run(&Words, &JobConfig::new(&out).input(&files[0]))
            .unwrap_err();
        if me == Rank(0) {
            assert!(matches!(e, MapReduceError::OutputExists(_)), "{e}");
        }
        assert!(e.to_string().contains("overwrit"), "{me}: {e}");
        let r = mr
            .run(
                &Words,
                &JobConfig::new(&out)
                    .input(&files[0])
                    .partitions(1)
                    .overwrite(true),
            )
            .unwrap();
        if me == Rank(0) {
            assert_eq!(read_output(&out, 1), expected_words(&files[..1]));
            assert!(!out.join("part-00001").exists(), "old part files removed");
            assert!(r.is_some());
            // Parts that cannot be removed (directories of such names) are refused before the job runs,
            // and the old output stays whole (once, they failed the commit halfway, after the old parts
            // were gone).
            for k in 0..16 {
                std::fs::create_dir(out.join(format!("part-x{k}"))).unwrap();
            }
        }
        rt.dsm().barrier().unwrap();
        let e = mr
            .run(
                &Words,
                &JobConfig::new(&out).input(&files[0]).overwrite(true),
            )
            .unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{me}: {e}");
        if me == Rank(0) {
            assert!(matches!(e, MapReduceError::Config(_)), "{e}");
            assert!(out.join("_SUCCESS").exists(), "{e}");
            assert_eq!(read_output(&out, 1), expected_words(&files[..1]));
            for k in 0..16 {
                std::fs::remove_dir(out.join(format!("part-x{k}"))).unwrap();
            }
        }
        rt.dsm().barrier().unwrap();

        // Settings out of range.
        for config in [
            JobConfig::new(dir.join("x")).input(&files[0]).partitions(0),
            JobConfig::new(dir.join("x"))
                .input(&files[0])
                .memory_budget(10),
            JobConfig::new(dir.join("x")).input(&files[0]).split_size(0),
            JobConfig::new(dir.join("x"))
                .input(&files[0])
                .merge_fan_in(1),
            JobConfig::new(dir.join("x"))
                .input(&files[0])
                .partitions(dsm_mapreduce::MAX_PARTITIONS + 1),
            JobConfig::new(dir.join("x")).input(&files[0]).threads(0),
            JobConfig::new(dir.join("x"))
                .input(&files[0])
                .threads(dsm_mapreduce::MAX_THREADS + 1),
        ] {
            let e = mr.run(&Words, &config).unwrap_err();
            assert!(matches!(e, MapReduceError::Config(_)), "{e}");
        }
        // A setting that only one follower gets wrong (each rank has its own budget): that rank cannot
        // take part, and the job fails on every rank, naming it, instead of succeeding without it.
        // Also when that rank comes late, once the others have done every task.
        for late in [false, true] {
            let budget = if me == Rank(1) { 10 } else { 64 << 20 };
            if late && me == Rank(1) {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            let e = mr
                .run(
                    &Words,
                    &JobConfig::new(dir.join("y"))
                        .input(&files[0])
                        .memory_budget(budget),
                )
                .unwrap_err();
            assert!(e.to_string().contains("memory budget"), "{me}: {e}");
            if me == Rank(0) {
                assert!(e.to_string().contains("rank 1"), "late {late}: {e}");
            } else {
                assert!(matches!(e, MapReduceError::Config(_)), "{e}");
            }
            rt.dsm().barrier().unwrap();
            assert!(
                !dir.join("y").exists(),
                "{me}, late {late}: the failed job left its output"
            );
        }
        // Splits larger than a map task may read: refused before anything is written.
        let e = mr
            .run(
                &Words,
                &JobConfig::new(dir.join("x"))
                    .input(&files[0])
                    .memory_budget(64 << 20)
                    .threads(1)
                    .split_size(65 << 20),
            )
            .unwrap_err();
        assert!(e.to_string().contains("use smaller splits"), "{me}: {e}");
        assert!(!dir.join("x").exists(), "{me}: an output was made");
        // More splits than a reduce task can list: refused before any map runs.
        let lines = dir.join("many-lines");
        if me == Rank(0) {
            std::fs::write(&lines, "a\n".repeat(dsm_mapreduce::MAX_MAPS + 10)).unwrap();
        }
        rt.dsm().barrier().unwrap();
        let e = mr
            .run(
                &Words,
                &JobConfig::new(dir.join("x")).input(&lines).split_size(1),
            )
            .unwrap_err();
        assert!(e.to_string().contains("use larger splits"), "{me}: {e}");
        // Splits times partitions over what the master keeps track of: refused, saying what to change.
        let some_lines = dir.join("some-lines");
        let splits = dsm_mapreduce::MAX_MAP_OUTPUTS / dsm_mapreduce::MAX_PARTITIONS + 10;
        if me == Rank(0) {
            std::fs::write(&some_lines, "a\n".repeat(splits)).unwrap();
        }
        rt.dsm().barrier().unwrap();
        let e = mr
            .run(
                &Words,
                &JobConfig::new(dir.join("x"))
                    .input(&some_lines)
                    .split_size(1)
                    .partitions(dsm_mapreduce::MAX_PARTITIONS),
            )
            .unwrap_err();
        assert!(e.to_string().contains("fewer partitions"), "{me}: {e}");
        // A split past the end of its file, and one that ends before it starts: rank 0 checks the
        // inputs, and every rank hears why the job did not start.
        for (start, end) in [(0, 1 << 40), (10, 5)] {
            let split = Split {
                file: files[0].clone(),
                start,
                end,
            };
            let e = mr
                .run(&Words, &JobConfig::new(dir.join("x")).splits([split]))
                .unwrap_err();
            assert!(e.to_string().contains("a split runs from"), "{me}: {e}");
        }
        assert!(!dir.join("x").exists(), "nothing written for a refused job");

        // An input that is neither a regular file nor a directory (it could block for ever).
        let fifo = dir.join("fifo");
        if me == Rank(0) {
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        }
        rt.dsm().barrier().unwrap();
        let e = mr
            .run(&Words, &JobConfig::new(dir.join("y")).input(&fifo))
            .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{me}: {e}");
        // The path is right: nothing to check about it.
        assert!(!e.to_string().contains("check the path"), "{me}: {e}");
        // Given as a split, too: opening it to check the split would block the master for ever.
        let split = Split {
            file: fifo.clone(),
            start: 0,
            end: 0,
        };
        let e = mr
            .run(&Words, &JobConfig::new(dir.join("y")).splits([split]))
            .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{me}: {e}");

        // One line of 65 MiB (a sparse file without a newline), with a budget of 4 MiB: a clear error, not
        // an allocation that could kill the rank.
        let long = dir.join("one-long-line");
        if me == Rank(0) {
            std::fs::File::create(&long)
                .unwrap()
                .set_len(65 << 20)
                .unwrap();
        }
        rt.dsm().barrier().unwrap();
        let e = mr
            .run(
                &Words,
                &JobConfig::new(dir.join("z"))
                    .input(&long)
                    .memory_budget(4 << 20)
                    .progress(ProgressMode::Never),
            )
            .unwrap_err();
        assert!(e.to_string().contains("a line this long"), "{me}: {e}");
    });
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

#[test]
fn a_panic_in_the_job_fails_it_with_where_it_happened() {
    let scratch = Scratch::new("panic");
    let dir = scratch.path();
    let map_input = dir.join("map.txt");
    std::fs::write(
        &map_input,
        b"fine line\nanother one\nhere is a boom\nlast\n",
    )
    .unwrap();
    let reduce_input = dir.join("reduce.txt");
    std::fs::write(&reduce_input, b"a b\nbang c\nfar\n").unwrap();
    // The first job's output has parents that do not exist, the second's one that does.
    let kept = dir.join("kept");
    std::fs::create_dir(&kept).unwrap();
    job(2, move |_rt, mr| {
        let e = mr
            .run(
                &Fragile,
                &JobConfig::new(dir.join("new/parents/m")).input(&map_input),
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("the map found a bomb"), "{text}");
        assert!(
            text.contains("map.txt") && text.contains("byte 22"),
            "{text}"
        );
        let e = mr
            .run(
                &Fragile,
                &JobConfig::new(kept.join("r")).input(&reduce_input),
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("the reduce found a bang"), "{text}");
        assert!(text.contains("key bang"), "{text}");
        // A partitioner that answers past the last partition fails the job, saying so.
        let e = mr
            .run(
                &BadPartition,
                &JobConfig::new(dir.join("p")).input(&reduce_input),
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("partition() gave") && text.contains("far"),
            "{text}"
        );
        // A failed job leaves no output at all: the directories it made go with it, once every rank's
        // reduces have ended, and those that were there stay.
        for failed in ["new", "kept/r", "p"] {
            assert!(!dir.join(failed).exists(), "{failed} left behind");
        }
        assert!(kept.is_dir());
        // One that was there before (overwritten) stays, without the failed job's part files.
        let there = dir.join("there");
        std::fs::create_dir_all(&there).unwrap();
        mr.run(
            &Fragile,
            &JobConfig::new(&there).input(&reduce_input).overwrite(true),
        )
        .unwrap_err();
        assert!(there.exists());
        assert!(!there.join(dsm_mapreduce::SUCCESS).exists());
        // The engine is still usable after a failed job, and marks a finished job's output.
        let out = dir.join("ok");
        mr.run(
            &Words,
            &JobConfig::new(&out).input(&reduce_input).partitions(1),
        )
        .unwrap();
        assert!(out.join(dsm_mapreduce::SUCCESS).exists());
    });
}

/// Reduces running at any rank of the in-process job, and reduces begun on other ranks than 0, for
/// `SlowFollower`.
static REDUCING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static FOLLOWER_REDUCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Word count whose reduce fails on rank 0 after 200 ms (time for the other rank to take the other
/// partition), and on the other ranks after 400 ms (counted in `REDUCING` meanwhile).
struct SlowFollower {
    rank: Rank,
}

impl Job for SlowFollower {
    type Key = String;
    type Value = u64;
    type Output = u64;
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
        Words.map(record, emit)
    }
    fn reduce(&self, _: &String, _: Vec<u64>, _: &mut Counters) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.rank == Rank(0) {
            std::thread::sleep(std::time::Duration::from_millis(200));
        } else {
            FOLLOWER_REDUCES.fetch_add(1, SeqCst);
            REDUCING.fetch_add(1, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(400));
            REDUCING.fetch_sub(1, SeqCst);
        }
        panic!("the reduce failed at {}", self.rank)
    }
}

/// A job that fails while another rank is still reducing ends only once that reduce has ended, so that no
/// part file of it can appear after the failed job cleaned up (into the output of the next job, even):
/// the master once returned as soon as its own threads had stopped.
#[test]
fn a_failed_job_ends_once_every_rank_has_stopped_reducing() {
    let scratch = Scratch::new("failstop");
    let dir = scratch.path();
    let input = dir.join("in.txt");
    std::fs::write(
        &input,
        b"a b c d
e f g h
",
    )
    .unwrap();
    job(2, move |rt, mr| {
        let job = SlowFollower { rank: rt.rank() };
        let out = dir.join("out");
        // Both ranks reduce at once: one partition each (one thread each).
        let config = JobConfig::new(&out).input(&input).partitions(2).threads(1);
        let e = mr.run(&job, &config).unwrap_err();
        assert!(e.to_string().contains("the reduce failed"), "{e}");
        assert_eq!(
            REDUCING.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{} saw a reduce of the failed job still running",
            rt.rank()
        );
        // Nothing of the failed job is left (it made the directory).
        rt.dsm().barrier().unwrap();
        assert!(!out.exists(), "the failed job left {}", out.display());
        assert!(
            FOLLOWER_REDUCES.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "rank 1 never reduced: the test tested nothing"
        );
    });
}

/// Word count whose first map rewrites its input file: as many bytes, other words, another modification
/// time (a file changed while the job runs).
struct Rewriter {
    done: std::sync::atomic::AtomicBool,
}

impl Job for Rewriter {
    type Key = String;
    type Value = u64;
    type Output = u64;
    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, String, u64>) {
        if !self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let text = std::fs::read(record.file).unwrap().to_ascii_uppercase();
            std::fs::write(record.file, text).unwrap();
            std::fs::File::options()
                .write(true)
                .open(record.file)
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(7))
                .unwrap();
        }
        Words.map(record, emit)
    }
    fn combiner(&self) -> Option<Combiner<u64>> {
        Words.combiner()
    }
    fn reduce(&self, k: &String, counts: Vec<u64>, c: &mut Counters) -> Option<u64> {
        Words.reduce(k, counts, c)
    }
}

#[test]
fn an_input_changed_while_the_job_runs_fails_it_naming_the_file() {
    let scratch = Scratch::new("changed");
    let dir = scratch.path();
    let input = dir.join("changing.txt");
    let text: String = (0..400).map(|i| format!("line {i} of words\n")).collect();
    std::fs::write(&input, &text).unwrap();
    let (rt, space) = one_rank();
    let mr = MapReduce::new(&space).unwrap();
    let job = Rewriter {
        done: std::sync::atomic::AtomicBool::new(false),
    };
    // Splits of about 1 KiB, taken one at a time: the splits after the first read the rewritten file.
    let config = JobConfig::new(dir.join("out"))
        .input(&input)
        .split_size(1024)
        .threads(1)
        .progress(ProgressMode::Never);
    let e = mr.run(&job, &config).unwrap_err().to_string();
    assert!(
        e.contains("changed while the job ran") && e.contains("changing.txt"),
        "{e}"
    );
    assert!(!dir.join("out").exists(), "a failed job leaves no output");
    // Files given as inputs and as splits in one job, none changing: each split is checked against its
    // own file's version (two files of different lengths, so that a version given to the wrong split
    // fails the job).
    let (a, b) = (dir.join("a.txt"), dir.join("b.txt"));
    std::fs::write(&a, "alpha beta\n".repeat(300)).unwrap();
    std::fs::write(&b, "gamma\n".repeat(100)).unwrap();
    let split = Split {
        file: b.clone(),
        start: 0,
        end: 600,
    };
    let config = JobConfig::new(dir.join("both"))
        .input(&a)
        .splits([split])
        .input(&input)
        .split_size(1024)
        .partitions(1)
        .progress(ProgressMode::Never);
    mr.run(&Words, &config).unwrap();
    let counts = read_output(&dir.join("both"), 1);
    assert_eq!(counts.get("gamma").map(String::as_str), Some("100"));
    assert_eq!(counts.get("alpha").map(String::as_str), Some("300"));
    drop(mr);
    drop(space);
    rt.finish().unwrap();
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

#[test]
fn spill_directories_left_by_dead_processes_are_removed() {
    let scratch = Scratch::new("stale");
    let dir = scratch.path();
    let (rt, space) = one_rank();
    let host = this_host();
    let dead = dead_pid();
    let stale = dir.join(format!("dsm-mapreduce-{host}-{dead}-0"));
    let other_host = dir.join(format!("dsm-mapreduce-elsewhere-{dead}-0"));
    let alive = dir.join(format!("dsm-mapreduce-{host}-{}-7", std::process::id()));
    // With the lock file engines hold for their life: one whose number names no process here, but
    // whose lock is held (an engine in another PID namespace), and one whose number names a process
    // here but whose lock nobody holds (the engine died and its number was used again).
    let locked_elsewhere = dir.join(format!("dsm-mapreduce-{host}-{dead}-1-0"));
    let number_reused = dir.join(format!("dsm-mapreduce-{host}-{}-9-0", std::process::id()));
    for d in [
        &stale,
        &other_host,
        &alive,
        &locked_elsewhere,
        &number_reused,
    ] {
        std::fs::create_dir_all(d.join("job-0")).unwrap();
        std::fs::write(d.join("job-0").join("t0-p0-r0"), b"old run").unwrap();
    }
    // Hidden ones: one whose engine died before renaming it into place (its lock file there, nobody
    // holding it), and one being made (no lock file yet).
    let died_hidden = dir.join(format!(".dsm-mapreduce-{host}-{dead}-2-0-0000abcd"));
    let being_made = dir.join(format!(".dsm-mapreduce-{host}-{dead}-3-0-0000abce"));
    std::fs::create_dir_all(&died_hidden).unwrap();
    std::fs::create_dir_all(&being_made).unwrap();
    std::fs::File::create(died_hidden.join("alive.lock")).unwrap();
    std::fs::File::create(number_reused.join("alive.lock")).unwrap();
    let held = std::fs::File::create(locked_elsewhere.join("alive.lock")).unwrap();
    let held = Flock::lock(held, FlockArg::LockExclusiveNonblock).unwrap();
    let engine = MapReduce::with_spill_dir(&space, &dir).unwrap();
    assert!(!stale.exists(), "a dead process's directory is removed");
    assert!(other_host.exists(), "another host's directory stays");
    assert!(alive.exists(), "a running process's directory stays");
    assert!(
        locked_elsewhere.exists(),
        "a directory whose lock is held stays"
    );
    assert!(
        !number_reused.exists(),
        "a directory whose lock nobody holds is removed"
    );
    assert!(!died_hidden.exists(), "so is a hidden one");
    assert!(
        being_made.exists(),
        "a hidden one without its lock file stays"
    );
    let _ = std::fs::remove_dir_all(&being_made);
    drop(held);
    let prefix = format!("dsm-mapreduce-{host}-{}-0-", std::process::id());
    let ours = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .expect("the engine's own directory is named HOST-PID-RANK-SEQ-NONCE");
    assert!(ours.is_dir());
    // Its lock is held: another engine would leave it alone.
    let lock = std::fs::File::open(ours.join("alive.lock")).unwrap();
    assert!(Flock::lock(lock, FlockArg::LockExclusiveNonblock).is_err());
    drop(engine);
    assert!(!ours.exists(), "and removed with the engine");
    drop(space);
    rt.finish().unwrap();
}

#[test]
fn one_engine_per_rank() {
    let (rt, space) = one_rank();
    let first = MapReduce::new(&space).unwrap();
    let e = MapReduce::new(&space).unwrap_err();
    assert!(e.to_string().contains("one per rank"), "{e}");
    drop(first);
    drop(space);
    rt.finish().unwrap();
}

#[test]
fn an_engine_dropped_on_every_rank_makes_way_for_a_new_one() {
    let scratch = Scratch::new("again");
    let dir = scratch.path();
    let files = write_inputs(&dir, 2, 200, 500);
    let expect = expected_words(&files);
    dsm_runtime::local::run_local_job(2, 3, move |rt| {
        let space = TupleSpace::join(rt).unwrap();
        for k in 0..2 {
            let mr = MapReduce::new(&space).unwrap();
            let out = dir.join(format!("out-{k}"));
            let config = JobConfig::new(&out)
                .inputs(&files)
                .split_size(4 << 10)
                .partitions(2)
                .progress(ProgressMode::Never);
            mr.run(&Words, &config).unwrap();
            if rt.rank() == Rank(0) {
                assert_eq!(read_output(&out, 2), expect, "engine {k}");
            }
        }
    });
}

#[test]
fn an_engine_whose_barrier_fails_leaves_no_spill_directory() {
    let scratch = Scratch::new("failed-barrier");
    let dir = scratch.path();
    let under = dir.clone();
    dsm::transport::local::run_local_job(2, 3, move |dsm| {
        let rt = Runtime::from_dsm(dsm);
        let space = TupleSpace::join(&rt).unwrap();
        if rt.rank() == Rank(1) {
            // Leaves the job instead of creating its engine: rank 0's barrier cannot end.
            drop(space);
            let _ = rt.finish();
            return;
        }
        let e = MapReduce::with_spill_dir(&space, &under).err();
        assert!(e.is_some(), "an engine was made without rank 1");
        let left: Vec<_> = std::fs::read_dir(&under)
            .unwrap()
            .map(|d| d.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        drop(space);
        let _ = rt.finish();
    });
}

#[test]
fn an_overwrite_replaces_the_output_only_when_it_succeeds() {
    let scratch = Scratch::new("overwrite");
    let dir = scratch.path();
    let files = write_inputs(&dir, 2, 2_000, 1_000);
    let expect = expected_words(&files);
    let far = dir.join("far.txt");
    std::fs::write(&far, "near far\n").unwrap();
    job(2, move |rt, mr| {
        let out = dir.join("out");
        let config = |inputs: &[PathBuf], parts| {
            JobConfig::new(&out)
                .inputs(inputs)
                .partitions(parts)
                .overwrite(true)
                .progress(ProgressMode::Never)
        };
        mr.run(&Words, &config(&files, 3)).unwrap();
        // A job that fails (its partitioner is out of range for "far") leaves the earlier output as it
        // was, complete, and nothing of its own.
        let e = mr
            .run(&BadPartition, &config(std::slice::from_ref(&far), 2))
            .unwrap_err();
        assert!(e.to_string().contains("partition"), "{e}");
        let listing = |d: &Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        if rt.rank() == Rank(0) {
            assert_eq!(
                listing(&out),
                ["_SUCCESS", "part-00000", "part-00001", "part-00002"]
            );
            assert_eq!(read_output(&out, 3), expect);
        }
        // Staging directories of other jobs in the same output. Running ones: one of this host whose lock
        // is held, one of this host without a lock file whose number names a running process. Those of
        // masters of this host that died: one with its lock file nobody holds, one without a lock file
        // whose number names no process. And another host's, with its lock file nobody holds here (a lock
        // held there may not show here): left alone.
        let host = this_host();
        let staged =
            |engine: String| out.join(format!(".dsm-job-dsm-mapreduce-{engine}-0-0-0000abcd-7"));
        let me = std::process::id();
        let running_locked = staged(format!("{host}-{me}-1"));
        let running_here = staged(format!("{host}-{me}-2"));
        let unlocked = staged(format!("{host}-{me}-3"));
        let dead_here = staged(format!("{host}-{}-4", dead_pid()));
        let elsewhere = staged("elsewhere-1-5".into());
        let mut held = None;
        if rt.rank() == Rank(0) {
            for d in [
                &running_locked,
                &running_here,
                &unlocked,
                &dead_here,
                &elsewhere,
            ] {
                std::fs::create_dir(d).unwrap();
                std::fs::write(d.join("part-00000"), b"theirs\t1\n").unwrap();
            }
            std::fs::File::create(unlocked.join("alive.lock")).unwrap();
            std::fs::File::create(elsewhere.join("alive.lock")).unwrap();
            let lock = std::fs::File::create(running_locked.join("alive.lock")).unwrap();
            held = Some(Flock::lock(lock, FlockArg::LockExclusiveNonblock).unwrap());
        }
        // One that succeeds replaces it whole: fewer partitions leave no part of the earlier output.
        mr.run(&Words, &config(&files, 2)).unwrap();
        if rt.rank() == Rank(0) {
            for kept in [&running_locked, &running_here, &elsewhere] {
                assert!(
                    kept.join("part-00000").exists(),
                    "{} was removed: {:?}",
                    kept.display(),
                    listing(&out)
                );
            }
            assert!(
                !unlocked.exists() && !dead_here.exists(),
                "a dead master's staging directory stayed: {:?}",
                listing(&out)
            );
            drop(held);
            for kept in [&running_locked, &running_here, &elsewhere] {
                std::fs::remove_dir_all(kept).unwrap();
            }
            assert_eq!(listing(&out), ["_SUCCESS", "part-00000", "part-00001"]);
            assert_eq!(read_output(&out, 2), expect);
        }
    });
}
