//! Page shuttling, the cost each memory model pays for sharing a page, beside the raw round trip of the
//! same run.
//!
//! - Default: two ranks alternately increment a counter in one page, each waiting for its turn by reading
//!   the page (sequential consistency). Every handoff moves the page. The handoffs run in eight rounds,
//!   each after a block of raw round trips, so that the floor is measured under the same conditions as
//!   the handoffs (on this VM a raw block alone once ran at 16 us, both processes on one vCPU, where the
//!   handoffs that followed ran across vCPUs).
//! - `--false-sharing`: P ranks each increment their own 8-byte slot of one page K times with a barrier
//!   every M increments, under sequential and then release consistency: the slots never overlap, yet under
//!   sequential consistency the page moves on every increment; release consistency merges the slots' diffs
//!   at the barriers.
//!
//! Run: `cargo run --release --bin shuttle -- [--handoffs N | --false-sharing --ranks P --k K --m M] [--json]`
//! (it launches itself).

use clap::Parser;
use dsm::{Placement, Rank};
use dsm_benches::{
    floor_row, quantile, raw_link, raw_round_trip, report, run_as_job_of, Measurement,
};
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Handoffs of the counter between the ranks.
    #[arg(long, default_value_t = 4000, value_parser = dsm_benches::at_least_one::<u64>)]
    handoffs: u64,
    /// Measure false sharing under both memory models instead of handoffs.
    #[arg(long)]
    false_sharing: bool,
    /// Ranks (false sharing; handoffs always use 2).
    #[arg(long, default_value_t = 2, value_parser = dsm_benches::two_or_more_ranks)]
    ranks: usize,
    /// Increments per rank (false sharing).
    #[arg(long, default_value_t = 10_000, value_parser = dsm_benches::at_least_one::<u64>)]
    k: u64,
    /// Increments between barriers (false sharing).
    #[arg(long, default_value_t = 100, value_parser = dsm_benches::at_least_one::<u64>)]
    m: u64,
    /// Steps of local computation between two increments (false sharing); 0 increments back to back.
    #[arg(long, default_value_t = 0)]
    work: u64,
}

/// Every rank increments its own slot of one page `k` times with a barrier every `m`; returns the seconds
/// taken and this rank's pages fetched.
fn false_sharing(
    dsm: &dsm::Dsm,
    model: dsm::Consistency,
    k: u64,
    m: u64,
    work: u64,
) -> anyhow::Result<(f64, u64)> {
    let me = dsm.rank().0 as usize;
    let slots = dsm.alloc_vec_in::<u64>(512, Placement::At(Rank(0)), model)?;
    dsm.barrier()?;
    let before = dsm.stats().pages_fetched;
    let t = Instant::now();
    let mut x = 1u64;
    for i in 1..=k {
        for _ in 0..work {
            x = std::hint::black_box(
                x.wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407),
            );
        }
        slots.set(me, slots.get(me) + 1);
        if i % m == 0 {
            dsm.barrier()?;
        }
    }
    dsm.barrier()?;
    let secs = t.elapsed().as_secs_f64();
    let fetched = dsm.stats().pages_fetched - before;
    for r in 0..dsm.size() {
        anyhow::ensure!(
            slots.get(r) == k,
            "slot {r} holds {}, expected {k}",
            slots.get(r)
        );
    }
    dsm.barrier()?;
    drop(slots);
    Ok((secs, fetched))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_as_job_of(if args.false_sharing { args.ranks } else { 2 });
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    if args.false_sharing {
        let mut link = raw_link(dsm)?;
        let mut raw = link.round_trips(2000, 64, 4096)?;
        let (sc_secs, sc_fetched) =
            false_sharing(dsm, dsm::Consistency::Sequential, args.k, args.m, args.work)?;
        let (rc_secs, rc_fetched) =
            false_sharing(dsm, dsm::Consistency::Release, args.k, args.m, args.work)?;
        // Every rank's page transfers, summed at rank 0 through a region.
        let sums = dsm.alloc_vec_with::<u64>(2 * 512, Placement::At(Rank(0)))?;
        let me = dsm.rank().0 as usize;
        sums.set(me, sc_fetched);
        sums.set(512 + me, rc_fetched);
        dsm.barrier()?;
        if me == 0 {
            let n = dsm.size();
            let sc_total: u64 = (0..n).map(|r| sums.get(r)).sum();
            let rc_total: u64 = (0..n).map(|r| sums.get(512 + r)).sum();
            let floor = quantile(&mut raw, 0.5);
            let label = format!("{n} ranks, K={}, M={}, work={}", args.k, args.m, args.work);
            let out = vec![
                floor_row(floor),
                Measurement::new(
                    &format!("false sharing, sequential, {label}"),
                    sc_secs * 1e3,
                    "ms",
                    floor / 1e3,
                    "raw round trip in ms",
                    "",
                ),
                Measurement::new(
                    &format!("false sharing, release, {label}"),
                    rc_secs * 1e3,
                    "ms",
                    floor / 1e3,
                    "raw round trip in ms",
                    "",
                ),
                Measurement::new(
                    "false sharing: sequential / release time",
                    sc_secs / rc_secs,
                    "x",
                    10.0,
                    "the target",
                    ">= 10",
                ),
                Measurement::new(
                    "page transfers, sequential",
                    sc_total as f64,
                    "pages",
                    1.0,
                    "-",
                    "",
                ),
                Measurement::new(
                    "page transfers, release",
                    rc_total as f64,
                    "pages",
                    1.0,
                    "-",
                    "",
                ),
                // Release consistency may move no page at all (the rank that touches the page first
                // takes it as zeros, without a transfer): the ratio then counts one, understating itself.
                Measurement::new(
                    if rc_total == 0 {
                        "page transfers: sequential / release (as if 1)"
                    } else {
                        "page transfers: sequential / release"
                    },
                    sc_total as f64 / rc_total.max(1) as f64,
                    "x",
                    20.0,
                    "the target",
                    ">= 20",
                ),
            ];
            report(&out, args.json);
        }
        dsm.barrier()?;
        drop(sums);
        rt.finish()?;
        return Ok(());
    }
    anyhow::ensure!(dsm.size() == 2, "shuttle runs as 2 ranks");
    let me = dsm.rank().0 as u64;
    let mut link = raw_link(dsm)?;

    let counter = dsm.alloc_vec_with::<u64>(512, Placement::At(Rank(0)))?;
    let fetched = dsm.alloc_vec_with::<u64>(2 * 512, Placement::At(Rank(0)))?;
    dsm.barrier()?;
    let before = dsm.stats();
    const ROUNDS: u64 = 8;
    let per_round = args.handoffs.div_ceil(ROUNDS);
    let mut raw = Vec::new();
    let mut elapsed = std::time::Duration::ZERO;
    for round in 0..ROUNDS {
        let (lo, hi) = (
            round * per_round,
            ((round + 1) * per_round).min(args.handoffs),
        );
        raw.extend(link.round_trips(500, 64, 4096)?);
        let t = Instant::now();
        for turn in (lo..hi).filter(|t| t % 2 == me) {
            while counter.get(0) != turn {
                std::hint::spin_loop();
            }
            counter.set(0, turn + 1);
        }
        while counter.get(0) < hi {
            std::hint::spin_loop();
        }
        elapsed += t.elapsed();
    }
    let mine = dsm.stats().pages_fetched - before.pages_fetched;
    fetched.set(me as usize * 512, mine);
    dsm.barrier()?;
    if me == 0 {
        let total = fetched.get(0) + fetched.get(512);
        let raw_med = quantile(&mut raw, 0.5);
        let per_handoff_us = elapsed.as_secs_f64() * 1e6 / args.handoffs as f64;
        let out = vec![
            floor_row(raw_med),
            Measurement::new(
                "shuttle: time per handoff",
                per_handoff_us,
                "us",
                raw_med,
                raw_round_trip(),
                &format!("<= 4 floors = {:.1}", 4.0 * raw_med),
            ),
            Measurement::new(
                "shuttle: page transfers per handoff",
                total as f64 / args.handoffs as f64,
                "pages",
                1.0,
                "one page per handoff",
                "",
            ),
        ];
        report(&out, args.json);
    }
    drop((counter, fetched));
    rt.finish()?;
    Ok(())
}
