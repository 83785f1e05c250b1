//! The tuple space's local path: `out` + `in` pairs on one rank through the store behind a mutex (as the
//! runtime holds it), beside the floor measured in the same run: a bare push and pop on a mutex-protected
//! queue. The distributed measurements (remote `in`, bag of tasks) come with the tuple space's distribution.
//!
//! Run: `cargo run --release --bin tuplespace -- [--pairs N] [--json]` (one process).

use clap::Parser;
use dsm_benches::{report, Measurement};
use dsm_runtime::tuple_store::{Mode, TupleStore};
use dsm_runtime::{template, tuple};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Pairs per measurement.
    #[arg(long, default_value_t = 2_000_000)]
    pairs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let queue: Mutex<VecDeque<(u64, u64)>> = Mutex::new(VecDeque::new());
    let t = Instant::now();
    for i in 0..args.pairs {
        queue.lock().unwrap().push_back(black_box((i, i)));
        black_box(queue.lock().unwrap().pop_front());
    }
    let floor = args.pairs as f64 / t.elapsed().as_secs_f64();

    let store = Mutex::new(TupleStore::new());
    let want = template!("task", ?i64);
    let t = Instant::now();
    for i in 0..args.pairs {
        store.lock().unwrap().out(tuple!("task", i as i64))?;
        let got = store.lock().unwrap().find(&want, Mode::Take)?;
        anyhow::ensure!(got.is_some(), "the tuple just put in was not found");
    }
    let pairs = args.pairs as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(store.lock().unwrap().is_empty(), "tuples left behind");
    report(
        &[
            Measurement::new(
                "mutex queue push+pop pairs per second",
                floor,
                "1/s",
                floor,
                "the floor itself",
                "(floor)",
            ),
            Measurement::new(
                "local out+in pairs per second",
                pairs,
                "1/s",
                floor,
                "mutex queue push+pop",
                ">= 1000000",
            ),
        ],
        args.json,
    );
    Ok(())
}
