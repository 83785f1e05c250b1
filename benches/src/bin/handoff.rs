//! Handing a block of pages from one rank to another under release consistency while the producer has
//! also written other pages the consumer does not need: through a lock, and selectively
//! (`Region::release_range` of the block, `Region::acquire_range` of it), beside the raw round trip
//! measured in the same run.
//!
//! Each round, rank 1 writes a word of each of `--block` pages and of `--dirty` other pages (homed at
//! rank 0, the consumer; the block too, or with `--block-home producer` at rank 1), then hands the block
//! to rank 0, which reads it and checks it:
//! - through a lock: rank 1 writes under lock 1 (homed at rank 1) and lets it go (a release: the diffs
//!   of every page it wrote go to their homes, and its notice names them), then says so; rank 0 takes the
//!   lock (an acquire: it drops the pages the notice names that are not homed here) and reads the block;
//! - selectively: rank 1 releases the block's range only, then says so; rank 0 acquires the range (which
//!   drops nothing when the block is homed at rank 0) and reads the block. The other pages' writes stay at
//!   rank 1 until the barrier that ends each set of rounds, which sends each page's diff once instead of
//!   once a round; that barrier is timed with the rounds.
//!
//! "Says so" is a message on the raw link in both (rank 1 answers rank 0's round trip), and so is rank 0's
//! word that it has read the block (before rank 1 writes the next round's), so that the handoffs differ
//! only in what they synchronize. Time per round, at rank 0: a set of `--rounds` rounds and the barrier
//! after it, divided by the rounds.
//!
//! Run: `cargo run --release --bin handoff -- [--block B] [--dirty D] [--rounds R] [--block-home
//! consumer|producer] [--json]` (it launches itself as 2 ranks).

use clap::Parser;
use dsm::{Consistency, GlobalVec, Placement, Rank, PAGE_SIZE};
use dsm_benches::{
    floor_row, quantile, raw_link, raw_round_trip, report, run_as_job, us, Measurement, RawLink,
};
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Pages handed over each round.
    #[arg(long, default_value_t = 4, value_parser = dsm_benches::at_least_one::<usize>)]
    block: usize,
    /// Other pages the producer writes each round.
    #[arg(long, default_value_t = 64)]
    dirty: usize,
    /// Handoffs per way of handing over.
    #[arg(long, default_value_t = 300, value_parser = dsm_benches::at_least_one::<usize>)]
    rounds: usize,
    /// The rank that homes the block: consumer (rank 0) or producer (rank 1).
    #[arg(long, default_value = "consumer", value_parser = ["consumer", "producer"])]
    block_home: String,
}

/// Words of a page.
const WORDS: usize = PAGE_SIZE / 8;

/// How rank 1 hands the block to rank 0.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Lock,
    Selective,
}

/// The shared pages of the run: the block handed over, and the other pages the producer writes (the
/// first `dirty_pages` of `dirty`).
struct Pages<'d> {
    block: GlobalVec<'d, u64>,
    dirty: GlobalVec<'d, u64>,
    dirty_pages: usize,
}

impl Pages<'_> {
    /// Rank 0's time per round for `rounds` handoffs the `way` given, in microseconds (rank 1's own time
    /// on rank 1); the round numbers go on from `first`.
    fn handoffs(
        &self,
        dsm: &dsm::Dsm,
        link: &mut RawLink,
        way: Way,
        first: u64,
        rounds: usize,
    ) -> anyhow::Result<f64> {
        let (block, dirty) = (&self.block, &self.dirty);
        let block_pages = block.len() / WORDS;
        let t = Instant::now();
        for round in first..first + rounds as u64 {
            if dsm.rank() == Rank(1) {
                let guard = if way == Way::Lock {
                    Some(dsm.lock(1)?)
                } else {
                    None
                };
                for p in 0..self.dirty_pages {
                    dirty.set(p * WORDS, round);
                }
                for p in 0..block_pages {
                    block.set(p * WORDS, round);
                }
                match guard {
                    Some(g) => drop(g),
                    None => block.release_range(0..block.len())?,
                }
                link.round_trips(1, 64, 64)?;
            } else {
                link.round_trips(1, 64, 64)?;
                let guard = if way == Way::Lock {
                    Some(dsm.lock(1)?)
                } else {
                    block.acquire_range(0..block.len())?;
                    None
                };
                for p in 0..block_pages {
                    let got = block.get(p * WORDS);
                    anyhow::ensure!(got == round, "round {round}: block page {p} holds {got}");
                }
                drop(guard);
            }
            // Rank 0 has read the block: rank 1 may write the next round's.
            link.round_trips(1, 64, 64)?;
        }
        dsm.barrier()?;
        Ok(us(t.elapsed()) / rounds as f64)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    run_as_job(2);
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let mut link = raw_link(dsm)?;
    let mut raw = link.round_trips(1000, 64, 4096)?;
    let at0 = Placement::At(Rank(0));
    let block_home = match args.block_home.as_str() {
        "producer" => Placement::At(Rank(1)),
        _ => at0,
    };
    let pages = Pages {
        block: dsm.alloc_vec_in::<u64>(args.block * WORDS, block_home, Consistency::Release)?,
        // At least one page: a region is never empty (with `--dirty 0` the producer writes none of it).
        dirty: dsm.alloc_vec_in::<u64>(args.dirty.max(1) * WORDS, at0, Consistency::Release)?,
        dirty_pages: args.dirty,
    };
    let rounds = args.rounds;
    // A few rounds of each first, untimed: faults of first touch, lock servers made.
    pages.handoffs(dsm, &mut link, Way::Lock, 1, 20)?;
    pages.handoffs(dsm, &mut link, Way::Selective, 21, 20)?;
    let mut lock = Vec::new();
    let mut selective = Vec::new();
    let mut next = 41;
    // Alternating, so that both ways see the machine in the same moods.
    for _ in 0..3 {
        lock.push(pages.handoffs(dsm, &mut link, Way::Lock, next, rounds)?);
        next += rounds as u64;
        selective.push(pages.handoffs(dsm, &mut link, Way::Selective, next, rounds)?);
        next += rounds as u64;
    }
    // Every write of the selective rounds reached rank 0 at the barriers that ended them.
    if dsm.rank() == Rank(0) && args.dirty > 0 {
        for p in 0..args.dirty {
            let got = pages.dirty.get(p * WORDS);
            anyhow::ensure!(
                got == next - 1,
                "dirty page {p} holds {got}, not {}",
                next - 1
            );
        }
    }
    if dsm.rank() == Rank(0) {
        let floor = quantile(&mut raw, 0.5);
        let what = format!(
            "{} pages (homed at the {}) handed over, {} other pages written",
            args.block, args.block_home, args.dirty
        );
        let l = quantile(&mut lock, 0.5);
        let s = quantile(&mut selective, 0.5);
        report(
            &[
                floor_row(floor),
                Measurement::new(
                    &format!("through a lock: {what}"),
                    l,
                    "us",
                    floor,
                    raw_round_trip(),
                    "",
                ),
                Measurement::new(
                    &format!("selectively: {what}"),
                    s,
                    "us",
                    floor,
                    raw_round_trip(),
                    &format!("{:.2}x faster than through a lock", l / s),
                ),
            ],
            args.json,
        );
    }
    drop(pages);
    rt.finish()?;
    Ok(())
}
