//! Distributed locks, barriers and atomic operations on shared words: uncontended remote and local lock
//! acquire+release, contended lock handoff, barrier latency, and `fetch_add` under each consistency model
//! (uncontended on a word homed elsewhere and here, and every rank on one word at once, beside a counter
//! incremented under a lock), beside the raw round trip between two ranks measured in the same run.
//!
//! Run: `cargo run --release --bin sync -- [--ranks N] [--json]` (it launches itself as N ranks, 2 by
//! default; the docs record 2, 3 and 4).

use clap::Parser;
use dsm::Rank;
use dsm_benches::{
    floor_row, quantile, raw_label, raw_link, raw_link_over, raw_mesh, raw_round_trip, raw_star,
    report, run_as_job_of, us, Measurement, Medium,
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

    let atomics = atomics(dsm, args.ops)?;

    // Barriers of the sockets alone, back to back: what a central barrier costs with no runtime.
    let raw_barrier = raw_star(dsm)?.barriers(args.ops)?;
    dsm.barrier()?;
    let raw_dissemination = raw_mesh(dsm)?.barriers(args.ops)?;
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
                &raw_label(&format!("dissemination barrier of {n} processes, mean")),
                raw_dissemination,
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
        for (label, value) in atomics {
            out.push(Measurement::new(
                &label,
                value,
                "us",
                floor,
                raw_round_trip(),
                "",
            ));
        }
        report(&out, args.json);
    }
    rt.finish()?;
    Ok(())
}

/// `fetch_add` under each model, as rows for rank 0's table (empty on the other ranks): rank 0 alone on a
/// word homed at rank 1 and on one homed at itself (medians), then every rank on one word homed at rank 1,
/// `ops` operations in all (mean time per operation), and, under release consistency, the same counter
/// incremented under a lock (plain read and write), which is what a program without atomics does.
fn atomics(dsm: &dsm::Dsm, ops: usize) -> anyhow::Result<Vec<(String, f64)>> {
    let (me, n) = (dsm.rank(), dsm.size());
    let mut rows = Vec::new();
    for (model, name) in [
        (dsm::Consistency::Sequential, "sequential"),
        (dsm::Consistency::Release, "release"),
    ] {
        // Page 0 homed at rank 0, page 1 at rank 1.
        let words = dsm.alloc_vec_in::<u64>(2 * PER_PAGE, dsm::Placement::Cyclic, model)?;
        let (here, there) = (0, PER_PAGE);
        dsm.barrier()?;
        for (at, whose) in [(there, "remote"), (here, "local")] {
            let mut times = Vec::new();
            if me == Rank(0) {
                for _ in 0..ops {
                    let t = Instant::now();
                    words.fetch_add(at, 1)?;
                    times.push(us(t.elapsed()));
                }
            }
            dsm.barrier()?;
            if me == Rank(0) {
                let label = format!("{name} fetch_add, {whose} word, median");
                rows.push((label, quantile(&mut times, 0.5)));
            }
        }
        // An atomic read of a word homed elsewhere: the round trip alone, with nothing changed to record.
        let mut loads = Vec::new();
        if me == Rank(0) {
            for _ in 0..ops {
                let t = Instant::now();
                words.load(there)?;
                loads.push(us(t.elapsed()));
            }
            rows.push((
                format!("{name} load, remote word, median"),
                quantile(&mut loads, 0.5),
            ));
        }
        let per_rank = ops / n;
        dsm.barrier()?;
        let t = Instant::now();
        for _ in 0..per_rank {
            words.fetch_add(there + 1, 1)?;
        }
        dsm.barrier()?;
        let contended = us(t.elapsed()) / (per_rank * n) as f64;
        anyhow::ensure!(
            words.load(there + 1)? == (per_rank * n) as u64,
            "the contended counter is not exact"
        );
        rows.push((
            format!("{name} fetch_add, {n} ranks on one word"),
            contended,
        ));
        if model == dsm::Consistency::Release {
            let t = Instant::now();
            for _ in 0..per_rank {
                let guard = dsm.lock(1)?;
                words.set(there + 2, words.get(there + 2) + 1);
                guard.unlock()?;
            }
            dsm.barrier()?;
            let locked = us(t.elapsed()) / (per_rank * n) as f64;
            anyhow::ensure!(
                words.get(there + 2) == (per_rank * n) as u64,
                "the counter under the lock is not exact"
            );
            rows.push((format!("{name} counter under a lock, {n} ranks"), locked));
        }
        drop(words);
    }
    Ok(if me == Rank(0) { rows } else { Vec::new() })
}

/// 8-byte words in a page.
const PER_PAGE: usize = dsm::PAGE_SIZE / 8;
