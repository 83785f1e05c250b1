//! Distributed locks and barriers: uncontended remote and local lock acquire+release, contended lock
//! handoff, and barrier latency, beside the raw round trip between two ranks measured in the same run.
//!
//! Run: `cargo run --release --bin sync -- [--ranks N] [--json]` (it launches itself as N ranks, 2 by
//! default; the docs record 2, 3 and 4).

use clap::Parser;
use dsm::Rank;
use dsm_benches::{
    floor_row, quantile, raw_label, raw_link, raw_link_over, raw_round_trip, raw_star, report,
    run_as_job_of, us, Measurement, Medium,
};
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Ranks in the job.
    #[arg(long, default_value_t = 2, value_parser = dsm_benches::two_or_more_ranks)]
    ranks: usize,
    /// Operations per measurement.
    #[arg(long, default_value_t = 2000, value_parser = dsm_benches::at_least_one::<usize>)]
    ops: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_as_job_of(args.ranks);
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let (me, n) = (dsm.rank(), dsm.size());
    let mut link = raw_link(dsm)?;
    let mut raw = link.round_trips(args.ops, 64, 4096)?;
    // Beside a floor over Unix sockets, the TCP one, which earlier measurements are against.
    let mut raw_tcp = match Medium::of_job() {
        Medium::Unix => raw_link_over(dsm, Medium::Tcp)?.round_trips(args.ops, 64, 4096)?,
        Medium::Tcp => Vec::new(),
    };
    dsm.barrier()?;

    // Uncontended: rank 0 takes and releases a lock homed at rank 1 while the others wait at a barrier.
    let mut uncontended = Vec::new();
    if me == Rank(0) {
        for _ in 0..args.ops {
            let t = Instant::now();
            drop(dsm.lock(1)?); // lock 1 is homed at rank 1 (id % size)
            uncontended.push(us(t.elapsed()));
        }
    }
    dsm.barrier()?;

    // Local: rank 0 takes and releases a lock homed at itself (its requests go to its own service loop).
    let mut local = Vec::new();
    if me == Rank(0) {
        for _ in 0..args.ops {
            let t = Instant::now();
            drop(dsm.lock(n as u64)?); // lock `size` is homed at rank 0
            local.push(us(t.elapsed()));
        }
    }
    dsm.barrier()?;

    // Contended: every rank takes lock 1 in turn, `ops` times in all; time per handoff.
    let per_rank = args.ops / n;
    let t = Instant::now();
    for _ in 0..per_rank {
        drop(dsm.lock(1)?);
    }
    dsm.barrier()?;
    let handoff = us(t.elapsed()) / (per_rank * n) as f64;

    // Barriers of the sockets alone, back to back: what a central barrier costs with no runtime.
    let raw_barrier = raw_star(dsm)?.barriers(args.ops)?;
    dsm.barrier()?;

    // Barriers back to back.
    let t = Instant::now();
    for _ in 0..args.ops {
        dsm.barrier()?;
    }
    let barrier = us(t.elapsed()) / args.ops as f64;

    if me == Rank(0) {
        let floor = quantile(&mut raw, 0.5);
        let mut out = vec![floor_row(floor)];
        if !raw_tcp.is_empty() {
            out.push(Measurement::new(
                &Medium::Tcp.label("round trip, median"),
                quantile(&mut raw_tcp, 0.5),
                "us",
                floor,
                raw_round_trip(),
                "",
            ));
        }
        out.extend([
            Measurement::new(
                "uncontended remote lock acquire+release, median",
                quantile(&mut uncontended, 0.5),
                "us",
                floor,
                raw_round_trip(),
                &format!("<= 2.5 floors = {:.1}", 2.5 * floor),
            ),
            Measurement::new(
                "uncontended local lock acquire+release, median",
                quantile(&mut local, 0.5),
                "us",
                floor,
                raw_round_trip(),
                "",
            ),
            Measurement::new(
                &format!("contended lock handoff, {n} ranks"),
                handoff,
                "us",
                floor,
                raw_round_trip(),
                "",
            ),
            Measurement::new(
                &raw_label(&format!("barrier of {n} processes, mean")),
                raw_barrier,
                "us",
                floor,
                raw_round_trip(),
                "",
            ),
            Measurement::new(
                &format!("barrier, {n} ranks"),
                barrier,
                "us",
                floor,
                raw_round_trip(),
                if n == 4 { "<= 4 floors" } else { "" },
            ),
        ]);
        report(&out, args.json);
    }
    rt.finish()?;
    Ok(())
}
