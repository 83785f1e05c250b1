//! The cost of release consistency's diffs per page, beside the network cost of a page measured in the
//! same run (the raw TCP round trip of a 64 B request and a 4 KiB reply between two processes).
//!
//! For several densities of change (one word, 10%, 50%, every byte of a page changed), rank 0 times
//! `diff::encode` (twin against page) and `diff::apply` (at the home), and reports the encoded size.
//!
//! Run: `cargo run --release --bin diff-cost -- [--json]` (it launches itself as 2 ranks).

use clap::Parser;
use dsm::protocol::diff;
use dsm::{Rank, PAGE_SIZE};
use dsm_benches::{floor_row, quantile, raw_link, report, run_as_job, Measurement, RAW_ROUND_TRIP};
use std::hint::black_box;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Pages diffed per density.
    #[arg(long, default_value_t = 20_000)]
    pages: usize,
}

fn main() -> anyhow::Result<()> {
    run_as_job(2);
    let args = Args::parse();
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let mut link = raw_link(dsm)?;
    let mut raw = link.round_trips(4000, 64, 4096)?;
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
                RAW_ROUND_TRIP,
                target,
            ));
            out.push(Measurement::new(
                &format!("diff apply, {label}"),
                apply_us,
                "us",
                floor,
                RAW_ROUND_TRIP,
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
        report(&out, args.json);
    }
    rt.finish()?;
    Ok(())
}
