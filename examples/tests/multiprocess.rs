//! Multi-process tests: real processes started by the launcher, real userfaultfd faults, TCP on loopback.

use dsm_runtime::launch::{launch, LaunchOptions};
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

fn run(program: &str, ranks: usize, args: &[&str]) -> i32 {
    let opts = LaunchOptions {
        ranks,
        ..LaunchOptions::default()
    };
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    launch(&opts, Path::new(program), &args).expect("launch")
}

const CHECK: &str = env!("CARGO_BIN_EXE_dsm-check");

#[test]
fn hello_at_2_3_and_4_ranks() {
    for n in [2, 3, 4] {
        assert_eq!(run(env!("CARGO_BIN_EXE_hello"), n, &[]), 0, "hello at {n} ranks");
    }
}

#[test]
fn lock_protected_counters_are_exact() {
    for n in [2, 3, 4] {
        assert_eq!(run(CHECK, n, &["counter", "--rounds", "300"]), 0, "counter at {n} ranks");
    }
}

#[test]
fn message_passing_litmus() {
    for n in [2, 3, 4] {
        assert_eq!(run(CHECK, n, &["mp", "--rounds", "200"]), 0, "mp at {n} ranks");
    }
}

#[test]
fn store_buffering_litmus() {
    assert_eq!(run(CHECK, 2, &["sb", "--rounds", "300"]), 0);
    assert_eq!(run(CHECK, 3, &["sb", "--rounds", "100"]), 0);
}

#[test]
fn several_ranks_writing_one_page() {
    for n in [2, 3, 4] {
        assert_eq!(run(CHECK, n, &["pages", "--rounds", "50"]), 0, "pages at {n} ranks");
    }
}

#[test]
fn a_killed_rank_ends_the_job_quickly() {
    let t = Instant::now();
    let code = run(CHECK, 3, &["die"]);
    assert_ne!(code, 0, "the job must fail");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
}
