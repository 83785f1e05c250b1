//! Jobs that fail: bad input and output, a panic in the job's code, a job failed while other ranks
//! reduce, and an input changed while the job runs.

use super::*;

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
            // Every rank has looked before rank 0 starts the next job, which makes `y` again.
            rt.dsm().barrier().unwrap();
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
