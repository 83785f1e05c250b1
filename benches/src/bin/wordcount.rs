//! Word count on the MapReduce engine, beside the floor measured in the same run: the same count done by
//! `LC_ALL=C tr -cs "A-Za-z'" '\n' | tr A-Z a-z | sort | uniq -c` on the same file, whose output is compared
//! with the engine's for equality.
//!
//! Times the whole `wordcount` command (process start, job, output written) at 1 rank x 1 thread, 2 ranks x 1
//! thread (the process scaling the targets are about) and 1 rank x 2 threads (rayon inside one rank), each
//! the median of `--runs` runs, alternating configurations so that drift in the machine's speed hits all
//! alike; and two 1-rank runs side by side, whose speedup (twice the work in the time of the slower) is the
//! reference the 2-rank speedup is read against: what a second core gives an independent copy during the
//! run (below 2 when the cores share memory bandwidth or the host is busy). With `--big-mb`, also runs 2 ranks on a corpus of that size with `--budget-mib` of memory budget
//! and reports each rank's peak resident memory.
//!
//! The corpus is real English text from Debian's packages (`scripts/corpus.sh`, run by this program when the
//! file is missing). Run: `cargo build --release --bin wordcount && cargo run --release --bin wordcount-bench
//! -- [--runs 3] [--big-mb 1000] [--json]`

use anyhow::{bail, Context};
use clap::Parser;
use dsm_benches::{quantile, report, run_together, Measurement};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// The corpus (default: the 100 MB corpus of scripts/corpus.sh, made when missing).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Runs of each configuration.
    #[arg(long, default_value_t = 3, value_parser = dsm_benches::at_least_one::<usize>)]
    runs: usize,
    /// Also run 2 ranks on a corpus of this many MB under the memory budget, reporting peak memory.
    #[arg(long)]
    big_mb: Option<u64>,
    /// The memory budget of the big run, in MiB.
    #[arg(long, default_value_t = 64)]
    budget_mib: u64,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

const PIPELINE: &str =
    r#"LC_ALL=C tr -cs "A-Za-z'" '\n' < "$1" | tr A-Z a-z | sort | uniq -c > "$2""#;

/// The repository's root (for scripts/corpus.sh).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A corpus of `mb` MB made by scripts/corpus.sh.
fn make_corpus(mb: u64) -> anyhow::Result<PathBuf> {
    let out = Command::new("bash")
        .arg(repo().join("scripts/corpus.sh"))
        .arg(mb.to_string())
        .output()
        .context("running scripts/corpus.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/corpus.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(repo().join(path))
}

/// Runs `cmd`, failing with its output if it fails; returns its wall time in seconds and its stdout.
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, String)> {
    let t0 = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((secs, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The pipeline's counts (`uniq -c` lines), without the empty word `tr` leaves before leading separators.
fn pipeline_counts(path: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(path)?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let (n, w) = line
            .trim_start()
            .split_once(' ')
            .unwrap_or((line.trim(), ""));
        if !w.is_empty() {
            counts.insert(w.to_string(), n.parse()?);
        }
    }
    Ok(counts)
}

/// wordcount's counts: the `word<TAB>count` lines of its part files.
fn engine_counts(dir: &Path) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("part-"))
        {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let (w, n) = line.split_once('\t').context("a line without a tab")?;
            counts.insert(w.to_string(), n.parse()?);
        }
    }
    Ok(counts)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let exe = std::env::current_exe()?;
    let wordcount = exe.with_file_name("wordcount");
    anyhow::ensure!(
        wordcount.exists(),
        "{} is missing: build it first (cargo build --release --bin wordcount)",
        wordcount.display()
    );
    let corpus = match &args.corpus {
        Some(c) => c.clone(),
        None => make_corpus(100)?,
    };
    let size = std::fs::metadata(&corpus)
        .with_context(|| format!("corpus {}", corpus.display()))?
        .len();
    let scratch = std::env::temp_dir().join(format!("dsm-wordcount-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let piped = scratch.join("pipeline.txt");

    // (name, ranks, threads)
    let configs = [
        ("1 rank x 1 thread", 1, 1),
        ("2 ranks x 1 thread", 2, 1),
        ("1 rank x 2 threads", 1, 2),
    ];
    let mut pipeline_times = Vec::new();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut side_by_side = Vec::new();
    let mut identical = true;
    for run in 0..args.runs {
        let (t, _) = timed(
            Command::new("sh")
                .arg("-c")
                .arg(PIPELINE)
                .arg("sh")
                .arg(&corpus)
                .arg(&piped),
        )?;
        pipeline_times.push(t);
        for (i, (name, ranks, threads)) in configs.iter().enumerate() {
            let out = scratch.join(format!("out-{i}"));
            let mut cmd = Command::new(&wordcount);
            cmd.arg(&corpus)
                .args(["--output", out.to_str().context("scratch path")?])
                .args(["--overwrite", "--quiet", "--top", "0"])
                .args(["--threads", &threads.to_string()]);
            if *ranks > 1 {
                cmd.args(["--procs", &ranks.to_string()]);
            }
            let (t, _) = timed(&mut cmd)?;
            times[i].push(t);
            if run == 0 {
                let same = engine_counts(&out)? == pipeline_counts(&piped)?;
                if !same {
                    eprintln!("wordcount {name}: output differs from the pipeline's");
                }
                identical &= same;
            }
        }
        // Two single-rank runs at once, one per core: the speedup two independent copies reach now.
        let t0 = Instant::now();
        let mut copies = (0..2)
            .map(|c| {
                let out = scratch.join(format!("out-side-{c}"));
                let mut cmd = Command::new(&wordcount);
                cmd.arg(&corpus)
                    .args(["--output", out.to_str().context("scratch path")?])
                    .args(["--overwrite", "--quiet", "--top", "0", "--threads", "1"]);
                Ok(cmd)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for out in run_together(&mut copies)? {
            anyhow::ensure!(
                out.status.success(),
                "wordcount side by side failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        side_by_side.push(t0.elapsed().as_secs_f64());
    }
    let words = pipeline_counts(&piped)?.len();
    let pipe = quantile(&mut pipeline_times, 0.5);
    let med: Vec<f64> = times.iter_mut().map(|t| quantile(t, 0.5)).collect();
    let floor = "tr | sort | uniq -c pipeline, s";
    let mut results = vec![Measurement::floor("pipeline, median", pipe, "s", floor)];
    for (i, (name, _, _)) in configs.iter().enumerate() {
        let target = if i == 1 { "<= 0.167 (6x faster)" } else { "" };
        results.push(Measurement::new(
            &format!("wordcount {name}, median"),
            med[i],
            "s",
            pipe,
            floor,
            target,
        ));
    }
    let side = quantile(&mut side_by_side, 0.5);
    results.push(Measurement::new(
        "two 1-rank runs side by side, median",
        side,
        "s",
        pipe,
        floor,
        "",
    ));
    // Two copies do twice the work in `side`: the speedup a 2-rank job would reach if distributing the
    // work cost nothing, on the machine as it is during this run.
    let reference = 2.0 * med[0] / side;
    results.push(Measurement::new(
        "speedup of two 1-rank runs side by side",
        reference,
        "x",
        reference,
        "two 1-rank runs side by side",
        "(reference)",
    ));
    results.push(Measurement::new(
        "speedup, 2 ranks over 1 rank",
        med[0] / med[1],
        "x",
        reference,
        "two 1-rank runs side by side",
        ">= 1.8",
    ));
    if let Some(mb) = args.big_mb {
        let big = make_corpus(mb)?;
        let out = scratch.join("out-big");
        let (t, printed) = timed(
            Command::new(&wordcount)
                .arg(&big)
                .args(["--output", out.to_str().context("scratch path")?])
                .args(["--overwrite", "--quiet", "--top", "0", "--peak-memory"])
                .args(["--procs", "2", "--threads", "1"])
                .args(["--memory-budget", &(args.budget_mib << 20).to_string()]),
        )?;
        let peak_kib = printed
            .lines()
            .filter_map(|l| {
                l.split_once("peak resident memory: ")?
                    .1
                    .strip_suffix(" KiB")
            })
            .filter_map(|n| n.parse::<u64>().ok())
            .collect::<Vec<_>>();
        anyhow::ensure!(
            peak_kib.len() == 2,
            "expected two ranks' peaks in: {printed}"
        );
        let peak = *peak_kib.iter().max().unwrap_or(&0) as f64 / 1024.0;
        results.push(Measurement::new(
            &format!("{mb} MB, 2 ranks: peak RSS of a rank"),
            peak,
            "MiB",
            args.budget_mib as f64,
            "memory budget, MiB",
            "< 256 MiB",
        ));
        results.push(Measurement::new(
            &format!("{mb} MB, 2 ranks: time"),
            t,
            "s",
            pipe,
            floor,
            "",
        ));
    }
    report(&results, args.json);
    if !args.json {
        println!(
            "corpus {} ({:.1} MB, {words} distinct words); outputs identical to the pipeline's: {}",
            corpus.display(),
            size as f64 / 1e6,
            if identical { "yes" } else { "NO" }
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    anyhow::ensure!(identical, "wordcount's output differs from the pipeline's");
    Ok(())
}
