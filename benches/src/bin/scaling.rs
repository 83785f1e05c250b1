//! How much faster 2 ranks run than 1, for the examples the issues set speedup targets for (`jacobi` under
//! release consistency: 1.5x; `matmul`: 1.7x), beside what the machine gives a second copy of the program
//! at that moment, measured in the same run: two single-rank runs side by side.
//!
//! Two copies of a single-rank run, one per core, do twice the work in the time of the slower one, so
//! `1-rank time / (slower side-by-side time / 2)` is the speedup two independent copies reach: below 2
//! when the cores share memory bandwidth or the host gives them other work, and it moves with the host's
//! load from one minute to the next. It is the reference a 2-rank speedup is read against, not a bound: a
//! rank of a 2-rank job works on half the data, which can fit the caches better (`matmul`). Each round runs
//! the three (1 rank, two side by side, 2 ranks) one after the other, so that drift in the machine's speed
//! hits them alike; the times are the ones the programs report for their computation, not their start-up.
//!
//! Run: `cargo build --release && target/release/scaling [--rounds 5] [--json]`

use anyhow::{bail, Context};
use clap::Parser;
use dsm_benches::{quantile, report, run_together, Measurement};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Parser)]
struct Args {
    /// Rounds of each program (each round: 1 rank, two 1-rank runs side by side, 2 ranks).
    #[arg(long, default_value_t = 5, value_parser = dsm_benches::at_least_one::<usize>)]
    rounds: usize,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

/// A program measured: its name, arguments, and the speedup its issue asks for at 2 ranks.
struct Program {
    name: &'static str,
    args: &'static [&'static str],
    target: f64,
}

const PROGRAMS: [Program; 2] = [
    Program {
        name: "jacobi",
        args: &["--n", "2048", "--iters", "100", "--consistency", "release"],
        target: 1.5,
    },
    Program {
        name: "matmul",
        args: &["--n", "1024", "--block", "32", "--no-check"],
        target: 1.7,
    },
];

/// The seconds a program reports for its computation: the number before the first " s" unit on its line
/// that names the ranks (`jacobi ..., 2 ranks: 0.512 s`, `matmul: ... ranks=2 ...: 0.0372 s, 57.7 GFLOP/s`).
fn reported_secs(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .filter(|l| l.contains("ranks"))
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.windows(2).find_map(|w| {
                let unit = w[1].trim_end_matches(',');
                (unit == "s").then(|| w[0].parse::<f64>().ok()).flatten()
            })
        })
}

/// Runs `cmds` at once and returns the slowest of the times they reported, failing with the output of
/// any that failed.
fn timed_together(cmds: &mut [Command], what: &str) -> anyhow::Result<f64> {
    let mut slowest = 0.0f64;
    for out in run_together(cmds)? {
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let secs =
            reported_secs(&stdout).with_context(|| format!("{what} printed no time: {stdout}"))?;
        slowest = slowest.max(secs);
    }
    Ok(slowest)
}

fn single(bin: &Path, p: &Program) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(p.args);
    cmd
}

/// The executable `name` beside this one, or an error saying how to build it.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --release)",
        path.display()
    );
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let dsmrun = sibling("dsmrun")?;
    let mut results = Vec::new();
    for p in &PROGRAMS {
        let bin = sibling(p.name)?;
        let (mut alone, mut side, mut job) = (Vec::new(), Vec::new(), Vec::new());
        let (mut speedups, mut side_by_side) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            let a = timed_together(&mut [single(&bin, p)], &format!("{} at 1 rank", p.name))?;
            let slower = timed_together(
                &mut [single(&bin, p), single(&bin, p)],
                &format!("{} side by side", p.name),
            )?;
            let mut two = Command::new(&dsmrun);
            two.args(["-n", "2"]).arg(&bin).args(p.args);
            let j = timed_together(&mut [two], &format!("{} at 2 ranks", p.name))?;
            alone.push(a);
            side.push(slower);
            job.push(j);
            speedups.push(a / j);
            side_by_side.push(a / (slower / 2.0));
        }
        let at_target = speedups.iter().filter(|s| **s >= p.target).count();
        let pair = quantile(&mut side_by_side.clone(), 0.5);
        let floor = "two 1-rank runs side by side";
        let per_round = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !args.json {
            println!(
                "{}: per round, speedup of 2 ranks {} | of two 1-rank runs side by side {}",
                p.name,
                per_round(&speedups),
                per_round(&side_by_side)
            );
        }
        let one = quantile(&mut alone, 0.5);
        for (what, times) in [
            ("1 rank", &mut alone),
            ("2 ranks", &mut job),
            ("two 1-rank runs side by side", &mut side),
        ] {
            results.push(Measurement::new(
                &format!("{} {what}, median", p.name),
                quantile(times, 0.5),
                "s",
                one,
                "1 rank, median",
                "",
            ));
        }
        results.push(Measurement::new(
            &format!("{} side-by-side speedup, median", p.name),
            pair,
            "x",
            pair,
            floor,
            "(reference)",
        ));
        results.push(Measurement::new(
            &format!("{} speedup 2 ranks over 1, median", p.name),
            quantile(&mut speedups, 0.5),
            "x",
            pair,
            floor,
            &format!(">= {} ({at_target} of {} rounds)", p.target, args.rounds),
        ));
    }
    report(&results, args.json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reported_secs;

    #[test]
    fn reads_the_time_the_examples_print() {
        assert_eq!(
            reported_secs("jacobi 2048x2048, 100 iterations, 2 ranks: 0.512 s\nchecksum 1.2e4\n"),
            Some(0.512)
        );
        assert_eq!(
            reported_secs(
                "matmul: n=1024 block=32 ranks=1 consistency=Sequential: 0.0372 s, 57.73 GFLOP/s"
            ),
            Some(0.0372)
        );
        assert_eq!(
            reported_secs("matmul: rank 1 computed 19 of 44 blocks (in 0.026 s)"),
            None,
            "a line that does not name the ranks"
        );
        assert_eq!(reported_secs("2 ranks, no time here: 3 ms"), None);
    }
}
