//! The cost of release consistency's diffs per page, beside the network cost of a page measured in the
//! same run (the raw round trip of a 64 B request and a 4 KiB reply between two processes).
//!
//! For several densities of change (one word, 10%, 50%, every byte of a page changed), rank 0 times
//! `diff::encode` (twin against page) and `diff::apply` (at the home), and reports the encoded size.
//!
//! Then the other per-page costs of a barrier: rank 0 reads `--drop-pages` pages homed at rank 1, rank 1
//! writes a word of each, and rank 0 times the barrier after those writes (rank 1's release write-protects
//! every page again, and rank 0's acquire drops every one), beside plain barriers timed right after,
//! three times (medians); the difference per page is what a page written at one rank and cached at
//! another costs the barrier.
//!
//! Run: `cargo run --release --bin diff-cost -- [--json]` (it launches itself as 2 ranks).

use clap::Parser;
use dsm::protocol::diff;
use dsm::{Consistency, Placement, Rank, PAGE_SIZE};
use dsm_benches::{
    floor_row, quantile, raw_link, raw_round_trip, report, run_as_job, us, Measurement, RawLink,
};
use std::hint::black_box;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Pages diffed per density.
    #[arg(long, default_value_t = 20_000, value_parser = dsm_benches::at_least_one::<usize>)]
    pages: usize,
    /// Cached pages dropped by one acquire.
    #[arg(long, default_value_t = 16_384, value_parser = dsm_benches::at_least_one::<usize>)]
    drop_pages: usize,
}

/// Words of a page.
const WORDS: usize = PAGE_SIZE / 8;

/// Rank 0's time for a barrier whose acquire drops `pages` cached pages, and the median of plain barriers
/// timed right after, in microseconds (on rank 1, its own times of the same barriers, unused).
fn drop_cost(dsm: &dsm::Dsm, link: &mut RawLink, pages: usize) -> anyhow::Result<(f64, f64)> {
    let region =
        dsm.alloc_vec_in::<u64>(pages * WORDS, Placement::At(Rank(1)), Consistency::Release)?;
    if dsm.rank() == Rank(1) {
        for p in 0..pages {
            region.set(p * WORDS, 1);
        }
    }
    dsm.barrier()?;
    if dsm.rank() == Rank(0) {
        let sum: u64 = (0..pages).map(|p| region.get(p * WORDS)).sum();
        anyhow::ensure!(sum == pages as u64, "read {sum} before the writes");
    }
    dsm.barrier()?;
    if dsm.rank() == Rank(1) {
        for p in 0..pages {
            region.set(p * WORDS, 2);
        }
    }
    // Rank 0 times the barrier only once rank 1 has written every page (rank 1 answers this round trip
    // after its writes), so that the time is the barrier's and the acquire's, not the wait for the writer.
    link.round_trips(1, 64, 64)?;
    let before = dsm.stats().acquire_invalidations;
    let t = Instant::now();
    dsm.barrier()?;
    let dropping = us(t.elapsed());
    let dropped = dsm.stats().acquire_invalidations - before;
    let mut plain = Vec::new();
    for _ in 0..20 {
        link.round_trips(1, 64, 64)?;
        let t = Instant::now();
        dsm.barrier()?;
        plain.push(us(t.elapsed()));
    }
    if dsm.rank() == Rank(0) {
        let sum: u64 = (0..pages).map(|p| region.get(p * WORDS)).sum();
        anyhow::ensure!(sum == 2 * pages as u64, "read {sum} after the writes");
        anyhow::ensure!(
            dropped == pages as u64,
            "the barrier dropped {dropped} pages, expected {pages}"
        );
    }
    dsm.barrier()?;
    Ok((dropping, quantile(&mut plain, 0.5)))
}

fn main() -> anyhow::Result<()> {
    // Parsed before the ranks start, so that a bad argument is said once, by the command itself.
    let args = Args::parse();
    run_as_job(2);
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let mut link = raw_link(dsm)?;
    let mut raw = link.round_trips(4000, 64, 4096)?;
    // Three times, each in a region of its own: the median of the dropping barriers, and of the plain ones.
    let (mut dropping, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (d, p) = drop_cost(dsm, &mut link, args.drop_pages)?;
        dropping.push(d);
        plain.push(p);
    }
    let (dropping, plain) = (quantile(&mut dropping, 0.5), quantile(&mut plain, 0.5));
    if dsm.rank() == Rank(0) {
        let floor = quantile(&mut raw, 0.5);
        let mut out = vec![floor_row(floor)];
        // A deterministic pseudo-random page and changes (xorshift), so runs are comparable.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let twin: Vec<u8> = (0..PAGE_SIZE).map(|_| next() as u8).collect();
        for (label, fraction) in [
            ("one word", 0.0),
            ("10% of bytes", 0.1),
            ("50% of bytes", 0.5),
            ("every byte", 1.0),
        ] {
            let mut page = twin.clone();
            if fraction == 0.0 {
                page[1000..1008]
                    .iter_mut()
                    .for_each(|b| *b = b.wrapping_add(1));
            } else {
                for b in page.iter_mut() {
                    if (next() % 1000) as f64 / 1000.0 < fraction {
                        *b = b.wrapping_add(1);
                    }
                }
            }
            let mut encoded = Vec::with_capacity(2 * PAGE_SIZE);
            let t = Instant::now();
            for _ in 0..args.pages {
                encoded.clear();
                diff::encode(black_box(&twin), black_box(&page), &mut encoded);
            }
            let encode_us = t.elapsed().as_secs_f64() * 1e6 / args.pages as f64;
            let mut home = twin.clone();
            let t = Instant::now();
            for _ in 0..args.pages {
                diff::apply(black_box(&mut home), black_box(&encoded))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let apply_us = t.elapsed().as_secs_f64() * 1e6 / args.pages as f64;
            anyhow::ensure!(home == page, "the diff did not reproduce the page");
            let target = "well under the floor";
            out.push(Measurement::new(
                &format!("diff encode, {label}"),
                encode_us,
                "us",
                floor,
                raw_round_trip(),
                target,
            ));
            out.push(Measurement::new(
                &format!("diff apply, {label}"),
                apply_us,
                "us",
                floor,
                raw_round_trip(),
                target,
            ));
            out.push(Measurement::new(
                &format!("diff size, {label}"),
                encoded.len() as f64,
                "bytes",
                PAGE_SIZE as f64,
                "a whole page",
                "",
            ));
        }
        let pages = args.drop_pages;
        out.push(Measurement::new(
            &format!("barrier dropping {pages} cached pages"),
            dropping,
            "us",
            plain,
            "plain barrier, median",
            "",
        ));
        out.push(Measurement::new(
            "page written there, dropped here, each",
            (dropping - plain) / pages as f64,
            "us",
            floor,
            raw_round_trip(),
            "well under the floor",
        ));
        report(&out, args.json);
    }
    rt.finish()?;
    Ok(())
}
