//! The tuple space, beside the floors measured in the same run:
//!
//! - local `out` + `in` pairs on rank 0 for tuples homed at rank 0 (no network), beside a bare push and pop
//!   on a mutex-protected queue;
//! - remote `in` of a present tuple (rank 0 takes tuples homed at rank 1), beside the raw round trip of
//!   a 64-byte request and a 64-byte reply between the same two processes;
//! - bag of tasks: empty tasks through the task farm, rank 0 the master and every rank (rank 0 too) a
//!   worker, in tasks per second.
//!
//! Run: `cargo run --release --bin tuplespace -- [--ranks N] [--json]` (it launches itself as N ranks, 2 by
//! default; the docs record 2 and 4).

use clap::Parser;
use dsm::Rank;
use dsm_benches::{quantile, raw_label, raw_link, report, run_as_job_of, us, Measurement};
use dsm_runtime::{template, tuple, TaskFarm, TupleSpace};
use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Ranks in the job (at least 2).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Local pairs per measurement.
    #[arg(long, default_value_t = 1_000_000, value_parser = dsm_benches::at_least_one::<u64>)]
    pairs: u64,
    /// Remote `in`s per measurement.
    #[arg(long, default_value_t = 5000, value_parser = dsm_benches::at_least_one::<usize>)]
    ops: usize,
    /// Tasks in the bag.
    #[arg(long, default_value_t = 50_000, value_parser = dsm_benches::at_least_one::<u64>)]
    tasks: u64,
}

/// A first field whose tuples of `arity` are homed at `rank`.
fn homed_at(space: &TupleSpace, prefix: &str, arity: usize, rank: Rank) -> String {
    (0..)
        .map(|k| format!("{prefix}{k}"))
        .find(|n| space.home_of(Some(&n.as_str().into()), arity) == rank)
        .expect("some name is homed at every rank")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.ranks >= 2, "--ranks must be at least 2");
    run_as_job_of(args.ranks);
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let me = dsm.rank();
    let space = TupleSpace::join(&rt)?;
    let mut link = raw_link(dsm)?;
    let mut raw = link.round_trips(args.ops, 64, 64)?;
    dsm.barrier()?;

    // Local pairs on rank 0, and the mutex-queue floor.
    let mut local = (0.0, 0.0);
    if me == Rank(0) {
        let queue: Mutex<VecDeque<(u64, u64)>> = Mutex::new(VecDeque::new());
        let t = Instant::now();
        for i in 0..args.pairs {
            queue.lock().unwrap().push_back(black_box((i, i)));
            black_box(queue.lock().unwrap().pop_front());
        }
        let floor = args.pairs as f64 / t.elapsed().as_secs_f64();
        let name = homed_at(&space, "local", 2, me);
        let want = template!(name.as_str(), ?i64);
        let t = Instant::now();
        for i in 0..args.pairs {
            space.out(tuple!(name.as_str(), i as i64))?;
            black_box(space.in_(&want)?);
        }
        local = (args.pairs as f64 / t.elapsed().as_secs_f64(), floor);
    }
    dsm.barrier()?;

    // Remote `in` of present tuples: rank 1 puts them at its own home, rank 0 takes them one by one.
    let name = homed_at(&space, "remote", 2, Rank(1));
    let want = template!(name.as_str(), ?i64);
    if me == Rank(1) {
        space.out_many((0..args.ops as i64).map(|i| tuple!(name.as_str(), i)))?;
    }
    dsm.barrier()?;
    let mut remote = Vec::with_capacity(args.ops);
    if me == Rank(0) {
        for _ in 0..args.ops {
            let t = Instant::now();
            black_box(space.in_(&want)?);
            remote.push(us(t.elapsed()));
        }
    }
    dsm.barrier()?;

    // Bag of empty tasks.
    let farm = TaskFarm::new(&space, "bench", Rank(0))?;
    let t = Instant::now();
    let mine = std::thread::scope(|s| -> anyhow::Result<usize> {
        let worker = s.spawn(|| farm.serve(|_, ()| ()));
        if me == Rank(0) {
            farm.put((0..args.tasks).map(|i| (i, ())))?;
            let results: Vec<(u64, ())> = farm.results(args.tasks as usize)?;
            anyhow::ensure!(results.len() as u64 == args.tasks, "results are missing");
            farm.stop()?;
        }
        Ok(worker
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??)
    })?;
    let bag = args.tasks as f64 / t.elapsed().as_secs_f64();
    // How the tasks spread: the master's own worker takes tasks without the network, so the share the
    // other ranks did says how much of the rate went through round trips.
    let tally = homed_at(&space, "tally", 2, Rank(0));
    space.out(tuple!(tally.as_str(), mine as u64))?;
    let mut remote_done = 0u64;
    if me == Rank(0) {
        for _ in 0..dsm.size() {
            remote_done += space.in_(&template!(tally.as_str(), ?u64))?.get::<u64>(1)?;
        }
        remote_done -= mine as u64;
    }
    dsm.barrier()?;

    if me == Rank(0) {
        let floor = quantile(&mut raw, 0.5);
        let n = dsm.size();
        report(
            &[
                Measurement::floor(
                    "mutex queue push+pop pairs per second",
                    local.1,
                    "1/s",
                    "the floor itself",
                ),
                Measurement::new(
                    "local out+in pairs per second",
                    local.0,
                    "1/s",
                    local.1,
                    "mutex queue push+pop",
                    ">= 1000000",
                ),
                Measurement::floor(
                    &raw_label("round trip 64 B / 64 B, median"),
                    floor,
                    "us",
                    "the floor itself",
                ),
                Measurement::new(
                    "remote in of a present tuple, median",
                    quantile(&mut remote, 0.5),
                    "us",
                    floor,
                    &raw_label("round trip 64 B / 64 B"),
                    &format!("<= 1.5 floors = {:.1}", 1.5 * floor),
                ),
                Measurement::new(
                    &format!("bag of empty tasks, {n} ranks"),
                    bag,
                    "1/s",
                    1e6 / floor,
                    "1 / raw round trip",
                    if n == 4 { ">= 20000" } else { "" },
                ),
                Measurement::new(
                    &format!(
                        "bag of empty tasks, {n} ranks: share done by {}",
                        if n == 2 {
                            "rank 1".to_string()
                        } else {
                            format!("ranks 1-{}", n - 1)
                        }
                    ),
                    remote_done as f64 / args.tasks as f64,
                    "",
                    1.0,
                    "all tasks",
                    "",
                ),
            ],
            args.json,
        );
    }
    drop((farm, space));
    rt.finish()?;
    Ok(())
}
