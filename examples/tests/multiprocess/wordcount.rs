//! The `wordcount` example against the shell pipeline, with killed workers, a dead master, bad input and
//! output directories.

use super::*;

const WORDCOUNT: &str = env!("CARGO_BIN_EXE_wordcount");

/// The sample text wordcount ships with.
fn sample() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/devils-dictionary.txt")
}

/// A fresh, absent output path for one test.
fn fresh_output(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dsm-wc-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Word counts by the shell pipeline that wordcount must agree with.
fn pipeline_counts(input: &Path) -> BTreeMap<String, u64> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"LC_ALL=C tr -cs "A-Za-z'" '\n' < "$1" | tr A-Z a-z | sort | uniq -c"#)
        .arg("sh")
        .arg(input)
        .output()
        .expect("running the tr | sort | uniq pipeline");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (count, word) = l.trim_start().split_once(' ')?;
            Some((word.to_string(), count.parse().ok()?))
        })
        .filter(|(w, _)| !w.is_empty())
        .collect()
}

/// The counts wordcount wrote into `dir`.
fn output_counts(dir: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if !path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("part-")
        {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let (w, c) = line.split_once('\t').expect("word<TAB>count");
            assert!(counts.insert(w.to_string(), c.parse().unwrap()).is_none());
        }
    }
    counts
}

/// Text with everything that separates or joins words: capitals, apostrophes, digits, punctuation,
/// bytes that are not UTF-8, NULs, CRLF, words longer than 23 bytes, and a last line without newline.
fn odd_input(path: &Path) {
    let mut text = Vec::new();
    for i in 0..3000u32 {
        text.extend_from_slice(
            format!("The cat's HAT, the Cat's hat; don't-stop {i} x{} ", i % 37).as_bytes(),
        );
        text.extend_from_slice(&[0xff, b'a', 0xc3, 0xa9, b'b', 0, b'Q', b'\r', b'\n']);
        if i % 100 == 0 {
            text.extend_from_slice(b"Pneumonoultramicroscopicsilicovolcanoconiosis '' ' end\n");
        }
    }
    text.extend_from_slice(b"no newline at the END");
    std::fs::write(path, text).unwrap();
}

#[test]
fn wordcount_matches_the_pipeline_at_1_2_and_3_ranks() {
    let odd = std::env::temp_dir().join(format!("dsm-wc-odd-{}.txt", std::process::id()));
    odd_input(&odd);
    for input in [sample(), odd.clone()] {
        let expect = pipeline_counts(&input);
        assert!(expect.len() > 10, "{expect:?}");
        for (ranks, extra) in [
            (1, &[][..]),
            (2, &["--split-size", "32768"][..]),
            (
                3,
                &[
                    "--split-size",
                    "20000",
                    "--memory-budget",
                    "1048576",
                    "--merge-fan-in",
                    "2",
                ][..],
            ),
        ] {
            let out_dir = fresh_output(&format!("ranks{ranks}"));
            let mut args = vec![
                input.to_str().unwrap(),
                "--output",
                out_dir.to_str().unwrap(),
                "--top",
                "3",
            ];
            args.extend_from_slice(extra);
            let (o, out) = job(WORDCOUNT, ranks, &args);
            assert_eq!(o.code, 0, "{out}");
            assert_eq!(
                output_counts(&out_dir),
                expect,
                "{input:?} at {ranks} ranks"
            );
            assert!(
                out_dir.join(dsm_mapreduce::SUCCESS).exists(),
                "a finished job marks its output"
            );
            // The three most frequent words are printed, by count and then alphabetically, in order.
            let mut ranked: Vec<(&String, &u64)> = expect.iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
            let want: Vec<String> = ranked[..3]
                .iter()
                .map(|(w, c)| format!("{c:>10} {w}"))
                .collect();
            let printed: Vec<&str> = out
                .lines()
                .map(|l| l.strip_prefix("[0] ").unwrap_or(l))
                .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
                .collect();
            assert_eq!(printed, want, "{input:?} at {ranks} ranks: {out}");
            let _ = std::fs::remove_dir_all(&out_dir);
        }
    }
    let _ = std::fs::remove_file(&odd);
}

/// The sample text ten times over, in a file of its own: work enough that a rank meant to die at some point
/// of it surely gets there. (With the sample alone, 94 splits mapped in about 5 ms, the other ranks
/// sometimes did every map before rank 2 had mapped 500 lines, and it never died.)
fn tenfold_sample(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("dsm-wc-{name}-{}.txt", std::process::id()));
    std::fs::write(&path, std::fs::read(sample()).unwrap().repeat(10)).unwrap();
    path
}

/// Runs wordcount on `input` at 3 ranks with `--keep-going`, rank 2 killing itself as `dying` says
/// (`--die-after N` lines mapped, or `--die-after-keys N` keys reduced), beside `extra` arguments; checks
/// that the job ends well with the pipeline's counts and with maps made again.
fn wordcount_survives_rank_2_killed(name: &str, input: &Path, dying: [&str; 2], extra: &[&str]) {
    let expect = pipeline_counts(input);
    let out_dir = fresh_output(name);
    let mut args = vec![
        input.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--split-size",
        "4096",
        "--die-rank",
        "2",
    ];
    args.extend(dying);
    args.extend(extra);
    let (o, out) = job_keep_going(WORDCOUNT, 3, &args);
    assert_eq!(o.code, 0, "{out}");
    assert_eq!(o.lost, [(2, "was killed by SIGKILL".to_string())], "{out}");
    assert_eq!(output_counts(&out_dir), expect);
    // Rank 2 had finished maps before it died: their output went with it and was made again. (A worker
    // takes a single task on its first trip, and its result reaches the master with the next trip,
    // before the worker maps another line.)
    let redone: u64 = out
        .split_once(" redone)")
        .and_then(|(before, _)| before.rsplit_once('(')?.1.parse().ok())
        .expect("the report says how many maps were redone");
    assert!(redone > 0, "{out}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn wordcount_survives_a_killed_worker_with_identical_output() {
    // Rank 2 dies once it has mapped 500 lines, more than one split's worth.
    let input = tenfold_sample("killed-worker");
    wordcount_survives_rank_2_killed("killed-worker", &input, ["--die-after", "500"], &[]);
    let _ = std::fs::remove_file(&input);
}

#[test]
fn wordcount_survives_a_worker_killed_while_reducing_with_identical_output() {
    // Rank 2 dies in its first reduce, once every map is done: the output it held (written for the
    // reduces, some of which may have read it already) is made again, into a new batch, and the
    // partitions not yet written are reduced again from that. Many partitions, so that rank 2 surely
    // takes one.
    let input = tenfold_sample("killed-reducer");
    wordcount_survives_rank_2_killed(
        "killed-reducer",
        &input,
        ["--die-after-keys", "10"],
        &["--partitions", "24"],
    );
    let _ = std::fs::remove_file(&input);
}

#[test]
fn wordcount_ends_with_a_clear_error_when_the_master_dies() {
    let t0 = Instant::now();
    let out_dir = fresh_output("killed-master");
    // Rank 0 dies once it has mapped 100 lines. The input is large enough that the master surely maps
    // that many: on the one-fold sample, on a machine busy with other tests, ranks 1 and 2 once took all
    // but a few of its splits and the job ended well.
    let input = tenfold_sample("killed-master");
    let args = [
        input.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--split-size",
        "4096",
        "--die-rank",
        "0",
        "--die-after",
        "100",
    ];
    let (o, out) = job_keep_going(WORDCOUNT, 3, &args);
    assert_ne!(o.code, 0, "{out}");
    assert!(out.contains("the master (rank 0) is gone"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(30), "it did not hang");
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = std::fs::remove_file(&input);
}

#[test]
fn wordcount_procs_says_a_failed_rank_in_its_own_name() {
    // The user ran wordcount, not dsmrun: the launcher's lines say so, once.
    let out_dir = fresh_output("own-name");
    let o = std::process::Command::new(WORDCOUNT)
        .arg(sample())
        .args(["--procs", "2", "--split-size", "4096", "--output"])
        .arg(&out_dir)
        .args(["--die-rank", "1", "--die-after", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(128 + 9), "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.contains("rank 1 was")).collect();
    assert_eq!(
        said,
        ["wordcount: rank 1 was killed by SIGKILL; ending the job"],
        "{err}"
    );
    assert!(!err.contains("dsmrun"), "{err}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn wordcount_procs_binds_where_dsm_bind_says_as_dsmrun_does() {
    let run = |bind: &str| {
        std::process::Command::new(WORDCOUNT)
            .arg(sample())
            .args(["--procs", "2", "--top", "1"])
            .env("DSM_BIND", bind)
            .env("DSM_UNIX_SOCKETS", "off")
            .output()
            .unwrap()
    };
    // An address of this host other than the default: the job runs there.
    let o = run("127.0.0.2");
    assert!(o.status.success(), "{o:?}");
    // An address no interface has, and no address at all: refused, naming the variable for the second.
    let o = run("192.0.2.1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("192.0.2.1"), "{err}");
    let o = run("nowhere");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("DSM_BIND=\"nowhere\" is not valid"),
        "{err}"
    );
}

#[test]
fn wordcount_procs_refuses_ranks_that_go_on_in_a_job_it_ends_naming_itself() {
    // Ranks told to go on after a failure, in a job that `--procs` ends at the first one: refused, the
    // launcher named as the user ran it (once "dsmrun"), and the job runs with `--keep-going`.
    let run = |extra: &[&str]| {
        std::process::Command::new(WORDCOUNT)
            .arg(sample())
            .args(["--procs", "2", "--top", "1"])
            .args(extra)
            .env("DSM_ON_PEER_FAILURE", "report")
            .output()
            .unwrap()
    };
    let o = run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("wordcount ends the job at the first rank that fails")
            && err.contains("ask wordcount to keep going"),
        "{err}"
    );
    let o = run(&["--keep-going"]);
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn wordcount_reports_bad_input_and_an_existing_output() {
    let out_dir = fresh_output("bad");
    let (o, out) = job(
        WORDCOUNT,
        2,
        &["/no/such/corpus.txt", "--output", out_dir.to_str().unwrap()],
    );
    assert_ne!(o.code, 0, "{out}");
    assert!(out.contains("/no/such/corpus.txt"), "{out}");
    // The system's word is in the message once, not again as its cause.
    assert!(out.contains("No such file or directory"), "{out}");
    assert!(
        out.lines()
            .all(|l| l.matches("No such file or directory").count() <= 1),
        "{out}"
    );
    assert!(!out_dir.exists(), "nothing written");
    // With --procs, the program that would start the ranks says it once, and starts none.
    let o = std::process::Command::new(WORDCOUNT)
        .args(["--procs", "2", "/no/such/corpus.txt", "--output"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim(),
        "wordcount: input /no/such/corpus.txt: No such file or directory (os error 2) (check the path and its permissions)"
    );
    std::fs::create_dir(&out_dir).unwrap();
    let o = std::process::Command::new(WORDCOUNT)
        .args(["--procs", "2", "--output"])
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.lines().count() == 1 && err.contains("exists"),
        "{err}"
    );
    std::fs::remove_dir(&out_dir).unwrap();
    // A TMPDIR that names no directory is said, and not made.
    let no_tmp = std::env::temp_dir().join(format!("dsm-wc-no-tmp-{}", std::process::id()));
    let o = std::process::Command::new(WORDCOUNT)
        .env("TMPDIR", &no_tmp)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "the system's temporary directory {} is not a directory (is TMPDIR set wrong?)",
            no_tmp.display()
        )),
        "{err}"
    );
    assert!(!no_tmp.exists(), "made");
    // --keep-going belongs to the launcher: without --procs there is none here to keep going.
    let o = std::process::Command::new(WORDCOUNT)
        .arg("--keep-going")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--keep-going goes with --procs"),
        "{err}"
    );
    // An input whose name is not UTF-8: refused, naming it, before the output is made.
    {
        use std::os::unix::ffi::OsStringExt;
        let mut name = format!("dsm-wc-{}-", std::process::id()).into_bytes();
        name.push(0xff);
        let odd = std::env::temp_dir().join(OsString::from_vec(name));
        std::fs::write(&odd, b"a b\n").unwrap();
        let capture = Arc::new(Mutex::new(Vec::new()));
        let opts = LaunchOptions {
            ranks: 1,
            capture: Some(capture.clone()),
            timeout: Some(Duration::from_secs(60)),
            ..LaunchOptions::default()
        };
        let args = [
            odd.clone().into_os_string(),
            "--output".into(),
            out_dir.clone().into_os_string(),
        ];
        let o = launch(&opts, Path::new(WORDCOUNT), &args).unwrap();
        let out = String::from_utf8_lossy(&capture.lock().unwrap()).into_owned();
        assert_ne!(o.code, 0, "{out}");
        assert!(out.contains("not valid UTF-8"), "{out}");
        assert!(!out_dir.exists(), "nothing written");
        let _ = std::fs::remove_file(&odd);
        // A relative output in a working directory whose name is not UTF-8: the path the tasks carry is
        // absolute, so it is refused just the same, and nothing is made.
        let _ = std::fs::remove_dir_all(&odd);
        std::fs::create_dir(&odd).unwrap();
        let input = std::env::temp_dir().join(format!("dsm-wc-in-{}.txt", std::process::id()));
        std::fs::write(&input, b"a b\n").unwrap();
        let o = std::process::Command::new(WORDCOUNT)
            .current_dir(&odd)
            .args([input.as_os_str(), "--output".as_ref(), "counts".as_ref()])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{out}");
        assert!(out.contains("not valid UTF-8"), "{out}");
        assert!(!odd.join("counts").exists(), "nothing written");
        let _ = std::fs::remove_dir_all(&odd);
        let _ = std::fs::remove_file(&input);
    }
    // Splits of one byte over many lines: refused at once for too many map tasks, not after reading the
    // input for every one of them.
    let lines = std::env::temp_dir().join(format!("dsm-wc-lines-{}.txt", std::process::id()));
    std::fs::write(&lines, "a\n".repeat(140_000)).unwrap();
    let t = Instant::now();
    let (o, out) = job(
        WORDCOUNT,
        1,
        &[
            lines.to_str().unwrap(),
            "--split-size",
            "1",
            "--output",
            out_dir.to_str().unwrap(),
        ],
    );
    assert_ne!(o.code, 0, "{out}");
    assert!(out.contains("map tasks"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(!out_dir.exists(), "nothing written");
    let _ = std::fs::remove_file(&lines);
    std::fs::create_dir_all(&out_dir).unwrap();
    let (o, out) = job(WORDCOUNT, 1, &["--output", out_dir.to_str().unwrap()]);
    assert_ne!(o.code, 0, "{out}");
    assert!(out.contains("exists"), "{out}");
    let (o, out) = job(
        WORDCOUNT,
        1,
        &["--output", out_dir.to_str().unwrap(), "--overwrite"],
    );
    assert_eq!(o.code, 0, "{out}");
    assert_eq!(output_counts(&out_dir), pipeline_counts(&sample()));
    // A job refused for an existing output leaves that output as it was, marker included.
    let (o, out) = job(WORDCOUNT, 2, &["--output", out_dir.to_str().unwrap()]);
    assert_ne!(o.code, 0, "{out}");
    assert!(out.contains("exists"), "{out}");
    assert_eq!(output_counts(&out_dir), pipeline_counts(&sample()));
    assert!(out_dir.join(dsm_mapreduce::SUCCESS).exists());
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// Without inputs every rank counts the sample text from its own temporary directory: on different hosts,
/// a file at the same path but a copy of its own. The copies must agree with the master's in length and
/// modification time (a job fails when an input changes while it runs). Here each rank runs in a mount
/// namespace of its own, with its own directory mounted at one path, and rank 1's copy is an older one:
/// the same bytes, an earlier time. It once kept that copy, and every map it took failed the job.
#[test]
fn wordcount_counts_the_sample_from_each_hosts_own_copy() {
    let base = fresh_output("own-sample");
    let out_dir = base.join("out");
    for dir in ["tmp0", "tmp1", "shared"] {
        std::fs::create_dir_all(base.join(dir)).unwrap();
    }
    let text = std::fs::read(sample()).unwrap();
    let old = base
        .join("tmp1")
        .join(format!("dsm-wordcount-sample-{}.txt", text.len()));
    std::fs::write(&old, &text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
        .unwrap();
    // Small splits, so that rank 1 takes maps too.
    let line = in_own_directory(
        &base,
        &format!(
            "TMPDIR={}/shared exec {WORDCOUNT} --top 0 --split-size 16384 --output {}",
            base.display(),
            out_dir.display()
        ),
    );
    let (o, out) = job("/bin/sh", 2, &["-c", &line]);
    assert_eq!(o.code, 0, "{out}");
    assert_eq!(output_counts(&out_dir), pipeline_counts(&sample()));
    let _ = std::fs::remove_dir_all(&base);
}

/// A shell command line that runs `command` in a mount namespace of its own, with `base/tmpR` (R the
/// rank) mounted at `base/shared`: each rank finds its own files at one path, as ranks on different
/// hosts do when a directory is not shared between them.
fn in_own_directory(base: &Path, command: &str) -> String {
    let b = base.display();
    format!("exec unshare --mount sh -c 'mount --bind {b}/tmp$DSM_RANK {b}/shared && {command}'")
}

/// An output directory that is not the same for every rank: a part file written where the master does not
/// look fails the job, which would otherwise mark its output complete without it.
#[test]
fn wordcount_fails_when_a_part_is_written_where_the_master_does_not_look() {
    let base = fresh_output("unshared-output");
    for dir in ["tmp0", "tmp1/out", "shared"] {
        std::fs::create_dir_all(base.join(dir)).unwrap();
    }
    // Many partitions, so that rank 1 reduces some.
    let line = in_own_directory(
        &base,
        &format!(
            "exec {WORDCOUNT} {} --top 0 --partitions 8 --output {}/shared/out",
            sample().display(),
            base.display()
        ),
    );
    let (o, out) = job("/bin/sh", 2, &["-c", &line]);
    assert_ne!(o.code, 0, "{out}");
    assert!(
        out.contains("is not there") && out.contains("same path"),
        "{out}"
    );
    assert!(!base.join("tmp0/out").join(dsm_mapreduce::SUCCESS).exists());
    let _ = std::fs::remove_dir_all(&base);
}
