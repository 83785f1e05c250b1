use super::reduce::{Keeping, Located, RunSource};
use super::*;
use crate::runs::RunReader;
use crate::shuffle;
use std::io::BufReader;

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
fn counting<'a>(dsm: &'a Dsm, root: &'a Path, pool: &'a rayon::ThreadPool) -> Worker<'a, Count> {
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
    let mut keeping = Keeping::new(10, &mut fetched, &mut runs);
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
    let mut keeping = Keeping::new(16 << 20, &mut fetched, &mut runs);
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
    let TaskResult::Failed { what } = bounded(TaskResult::Failed { what: huge }, "map", 1) else {
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
