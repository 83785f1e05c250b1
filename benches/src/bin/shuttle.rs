//! Page shuttling: two ranks alternately increment a counter in one page, each waiting for its turn by
//! reading the page. Under sequential consistency every handoff moves the page: this is the cost the
//! single-writer protocol pays for write sharing. Reported beside the raw TCP round trip of the same run.
//!
//! Run: `cargo run --release --bin shuttle -- [--handoffs N] [--json]` (it launches itself as 2 ranks).

use clap::Parser;
use dsm::{Placement, Rank};
use dsm_benches::{quantile, raw_link, report, run_as_job, Measurement};
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Handoffs of the counter between the ranks.
    #[arg(long, default_value_t = 4000)]
    handoffs: u64,
}

fn main() -> anyhow::Result<()> {
    run_as_job(2);
    let args = Args::parse();
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    anyhow::ensure!(dsm.size() == 2, "shuttle runs as 2 ranks");
    let me = dsm.rank().0 as u64;
    let mut link = raw_link(dsm)?;
    let mut raw = link.round_trips(4000, 64, 4096)?;

    let counter = dsm.alloc_vec_with::<u64>(512, Placement::At(Rank(0)))?;
    let fetched = dsm.alloc_vec_with::<u64>(2 * 512, Placement::At(Rank(0)))?;
    dsm.barrier()?;
    let before = dsm.stats();
    let t = Instant::now();
    for turn in (me..args.handoffs).step_by(2) {
        while counter.get(0) != turn {
            std::hint::spin_loop();
        }
        counter.set(0, turn + 1);
    }
    while counter.get(0) < args.handoffs {
        std::hint::spin_loop();
    }
    let elapsed = t.elapsed();
    let mine = dsm.stats().pages_fetched - before.pages_fetched;
    fetched.set(me as usize * 512, mine);
    dsm.barrier()?;
    if me == 0 {
        let total = fetched.get(0) + fetched.get(512);
        let raw_med = quantile(&mut raw, 0.5);
        let per_handoff_us = elapsed.as_secs_f64() * 1e6 / args.handoffs as f64;
        let out = vec![
            Measurement::new(
                "raw TCP round trip, median",
                raw_med,
                "us",
                raw_med,
                "raw TCP round trip 64 B / 4 KiB",
                "(floor)",
            ),
            Measurement::new(
                "shuttle: time per handoff",
                per_handoff_us,
                "us",
                raw_med,
                "raw TCP round trip 64 B / 4 KiB",
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
