//! Multi-process tests: real processes started by the launcher, real userfaultfd faults, TCP on loopback.
//! One test program, its tests by subject in the modules below; the helpers they share are here.

use dsm_runtime::launch::{launch, LaunchOptions, Outcome};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod failures;
mod launch;
mod memory;
mod release;
mod tuple_space;
mod wordcount;

/// Runs a job and returns its outcome and everything its ranks printed.
fn job(program: &str, ranks: usize, args: &[&str]) -> (Outcome, String) {
    job_with_env(program, ranks, args, &[])
}

/// Runs a job with extra environment for every rank.
fn job_with_env(
    program: &str,
    ranks: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Outcome, String) {
    launch_captured(program, ranks, args, env, false)
}

/// Runs a job of `hello` in which rank 1 first runs the shell command `first` (another setting, or no
/// start at all), with extra environment for every rank.
fn hello_where_rank1_first(ranks: usize, first: &str, env: &[(&str, &str)]) -> (Outcome, String) {
    let line = format!(
        "if [ \"$DSM_RANK\" = 1 ]; then {first}; fi; exec {}",
        env!("CARGO_BIN_EXE_hello")
    );
    job_with_env("/bin/sh", ranks, &["-c", &line], env)
}

/// Launches a job with a time limit of 60 s, capturing its output.
fn launch_captured(
    program: &str,
    ranks: usize,
    args: &[&str],
    env: &[(&str, &str)],
    keep_going: bool,
) -> (Outcome, String) {
    let capture = Arc::new(Mutex::new(Vec::new()));
    let opts = LaunchOptions {
        ranks,
        capture: Some(capture.clone()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout: Some(Duration::from_secs(60)),
        keep_going,
        ..LaunchOptions::default()
    };
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let outcome = launch(&opts, Path::new(program), &args).expect("launch");
    let out = String::from_utf8_lossy(&capture.lock().unwrap()).into_owned();
    (outcome, out)
}

/// Runs a job and returns its exit code, printing its output when it failed.
fn run(program: &str, ranks: usize, args: &[&str]) -> i32 {
    let (outcome, out) = job(program, ranks, args);
    if outcome.code != 0 {
        eprintln!("{out}");
    }
    outcome.code
}

const CHECK: &str = env!("CARGO_BIN_EXE_dsm-check");

/// Runs `program args` at each job size and expects every job to succeed.
fn passes_at(sizes: &[usize], program: &str, args: &[&str]) {
    for &n in sizes {
        assert_eq!(run(program, n, args), 0, "{program} {args:?} at {n} ranks");
    }
}

const LINDA: &str = env!("CARGO_BIN_EXE_linda-check");

/// Runs a job under `dsmrun --keep-going` semantics: a failing rank does not end the others.
fn job_keep_going(program: &str, ranks: usize, args: &[&str]) -> (Outcome, String) {
    launch_captured(program, ranks, args, &[], true)
}
