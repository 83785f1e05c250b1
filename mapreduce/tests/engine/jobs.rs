//! Jobs that succeed: counts against a plain count, with and without spilling, values without a
//! combiner, the tuples jobs leave behind, and an output overwritten only by a job that succeeds.

use super::*;

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
