//! Remote read-fault latency and sequential remote-read bandwidth, beside the raw transport measured in the
//! same run between the same two processes.
//!
//! Rank 1 homes and writes the pages; rank 0 faults them in. Reported:
//! - the raw floor: a plain TCP connection, 64 B request / 4 KiB reply, blocking reads; and the same
//!   exchange through dsm's own channel and service loop (`Dsm::ping`);
//! - read-fault latency (median, p99) with rank 1 idle, and with rank 1's main thread busy computing;
//! - sequential read bandwidth of a remote region without read-ahead and with windows of 16 to 1024 pages
//!   (`--windows` picks others; the target applies to the default window), beside raw streaming
//!   bandwidth and the rate at which this process gets fresh pages from the kernel (each installed page
//!   is one, and on a virtual machine that rate swings with the host); the default window is read three
//!   times: as the job is set up (on one host, rank 1 installs the pages into rank 0 itself, with its
//!   install helper), with the install helpers switched the other way, and with direct install the other
//!   way (then the pages come over the connection and rank 0 installs them);
//! - sequential read of a cyclic region (the default placement), whose remote pages are every other page,
//!   and of block-cyclic ones (blocks of 16 and 64 pages), whose remote pages are every other block;
//! - first touch of pages homed at the faulting rank, without read-ahead (a fault per page) and with the
//!   default window (untouched pages filled ahead), beside the kernel's first touch of plain memory;
//! - writes under sequential consistency into pages that rank 1 wrote and alone holds: a word a page
//!   without read-ahead (a fault per page) and with the default window (write-ahead takes the following
//!   pages with their data), and in one copy.
//!
//! Run: `cargo run --release --bin fault-latency -- [--json]` (it launches itself as 2 ranks).

use clap::Parser;
use dsm::{Placement, Rank};
use dsm_benches::{
    floor_row, fresh_page_rate, quantile, raw_label, raw_link, raw_round_trip, report, run_as_job,
    us, Measurement,
};
use std::hint::black_box;
use std::time::Instant;

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Faults (pages) per latency measurement.
    #[arg(long, default_value_t = 4000, value_parser = dsm_benches::at_least_one::<usize>)]
    faults: usize,
    /// MiB of the remote region read sequentially.
    #[arg(long, default_value_t = 256, value_parser = dsm_benches::at_least_one::<usize>)]
    mib: usize,
    /// Read-ahead windows (pages) to measure sequential bandwidth with.
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 64, 256, 1024])]
    windows: Vec<u32>,
}

const WORDS: usize = 512;

/// The pages of a block in the block-cyclic regions read (ArgoDSM's default block size).
const BLOCK: u64 = 16;

/// How pages reach the sequential reader: installed by their home itself (on one host), and with the
/// install helpers taking part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    direct: bool,
    helper: bool,
}

impl Mode {
    /// Sets this rank up so (every rank calls it: rank 0's direct-install setting is the one that counts,
    /// and each rank's helper helps with its own side).
    fn apply(self, dsm: &dsm::Dsm) -> anyhow::Result<()> {
        dsm.set_direct_install(self.direct);
        if self.helper != dsm.install_helper() {
            dsm.set_install_helper(self.helper)?;
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    // Parsed before the ranks start, so that a bad argument is said once, by the command itself.
    let args = Args::parse();
    run_as_job(2);
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    anyhow::ensure!(dsm.size() == 2, "fault-latency runs as 2 ranks");
    let me = dsm.rank();
    let mut link = raw_link(dsm)?;

    // Interleaved samples with the serving rank idle: in each step rank 0 takes one raw round trip
    // (rank 1's main thread answers with blocking reads), one round trip through dsm's own channel and
    // service loop, and one read fault of a page homed and written by rank 1. The three see the same
    // scheduler conditions, and the fault is also reported as its excess over the raw round trip of the
    // same step.
    // The window the job was started with (`DSM_READAHEAD` or the default), which the target applies to.
    let default_window = dsm.readahead();
    dsm.set_readahead(1)?;
    let idle = dsm.alloc_vec_with::<u64>(args.faults * WORDS, Placement::At(Rank(1)))?;
    if me == Rank(1) {
        for p in 0..args.faults {
            idle.set(p * WORDS, p as u64 + 1);
        }
    }
    dsm.barrier()?;
    let (mut raw, mut engine, mut idle_us, mut excess) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if me == Rank(0) {
        for p in 0..args.faults {
            let r = link.round_trips(1, 64, 4096)?[0];
            engine.push(us(dsm.ping(Rank(1), 4096)?));
            let t = Instant::now();
            let v = idle.get(p * WORDS);
            let f = us(t.elapsed());
            anyhow::ensure!(v == p as u64 + 1, "page {p}: read {v}");
            raw.push(r);
            idle_us.push(f);
            excess.push(f - r);
        }
    } else {
        link.round_trips(args.faults, 64, 4096)?;
    }
    dsm.barrier()?;

    // Under mpirun: the raw MPI round trip between the same two processes, the floor an MPI transport
    // would be held to.
    let mut mpi_raw = dsm_benches::mpi_round_trips(args.faults, 64, 4096);
    dsm.barrier()?;

    // Read faults of pages nobody wrote: the home answers with zeros and changes nothing on its side (no
    // write-protect, so no TLB shootdown): the fault path's own cost without the home's page action.
    let zero = dsm.alloc_vec_with::<u64>(args.faults * WORDS, Placement::At(Rank(1)))?;
    dsm.barrier()?;
    let mut zero_us = Vec::new();
    if me == Rank(0) {
        for p in 0..args.faults {
            let t = Instant::now();
            let v = zero.get(p * WORDS);
            zero_us.push(us(t.elapsed()));
            anyhow::ensure!(v == 0, "untouched page {p}: read {v}");
        }
    }
    dsm.barrier()?;

    // Read faults with the serving rank's main thread computing.
    let busy = dsm.alloc_vec_with::<u64>(args.faults * WORDS, Placement::At(Rank(1)))?;
    let done = dsm.alloc_vec_with::<u64>(1, Placement::At(Rank(0)))?;
    if me == Rank(1) {
        for p in 0..args.faults {
            busy.set(p * WORDS, p as u64 + 1);
        }
    }
    dsm.barrier()?;
    let mut busy_us = Vec::new();
    if me == Rank(0) {
        for p in 0..args.faults {
            let t = Instant::now();
            let v = busy.get(p * WORDS);
            busy_us.push(us(t.elapsed()));
            anyhow::ensure!(v == p as u64 + 1, "page {p}: read {v}");
        }
        done.set(0, 1);
    } else {
        let mut x = 1u64;
        while done.get(0) == 0 {
            for _ in 0..200_000 {
                x = black_box(
                    x.wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407),
                );
            }
        }
        black_box(x);
    }
    dsm.barrier()?;

    // Sequential read bandwidth of a remote region, by read-ahead window, and the raw streaming floor.
    let bytes = args.mib << 20;
    // One raw stream's rate swings by 2-3x from one moment to the next on this shared VM, so a raw stream
    // runs right before each read, and the floor is the best of them all: every window is held to the
    // fastest the link managed anywhere in this run.
    let mut raw_mibs = 0.0f64;
    let mut fresh_mibs = 0.0f64;
    let mut bandwidth = Vec::new();
    // The job's window is read three times: as set up, then with the install helpers (both ranks') the
    // other way, then with direct install the other way, to show what each is worth in the same run.
    // Direct install happens only where rank 1 took rank 0's userfaultfd when rank 0 introduced itself
    // (at its first allocation, above): on a machine that refuses that, or with `DSM_DIRECT_INSTALL=off`,
    // it cannot be switched on now, and the read without it is the job's own.
    let can_direct = dsm.stats().peers_installing_here > 0;
    let job = Mode {
        direct: dsm.direct_install() && can_direct,
        helper: dsm.install_helper(),
    };
    let runs = args.windows.iter().flat_map(|&w| {
        let others = if w == default_window {
            let helper_switched = Mode {
                helper: !job.helper,
                ..job
            };
            let direct_switched = Mode {
                direct: !job.direct,
                ..job
            };
            std::iter::once(helper_switched)
                .chain(can_direct.then_some(direct_switched))
                .collect()
        } else {
            Vec::new()
        };
        std::iter::once((w, job)).chain(others.into_iter().map(move |m| (w, m)))
    });
    for (window, mode) in runs {
        let region = dsm.alloc_vec_with::<u64>(bytes / 8, Placement::At(Rank(1)))?;
        if me == Rank(1) {
            for p in 0..bytes / 8 / WORDS {
                region.set(p * WORDS, p as u64);
            }
        }
        dsm.barrier()?;
        raw_mibs = raw_mibs.max(link.stream(bytes)?);
        // Rank 1's helper takes part in direct installs, rank 0's in installing what arrives.
        mode.apply(dsm)?;
        dsm.barrier()?;
        if me == Rank(0) {
            fresh_mibs = fresh_mibs.max(fresh_page_rate(bytes));
            dsm.set_readahead(window)?;
            let before = dsm.stats();
            let t = Instant::now();
            // SAFETY: between two barriers nobody writes the region.
            let sum: u64 = unsafe { region.as_slice() }.iter().sum();
            let secs = t.elapsed().as_secs_f64();
            let pages = (bytes / 8 / WORDS) as u64;
            anyhow::ensure!(
                sum == pages * (pages - 1) / 2,
                "the region read back wrong: sum {sum}"
            );
            let after = dsm.stats();
            let direct_pages = after.pages_installed_by_sender - before.pages_installed_by_sender;
            anyhow::ensure!(
                (direct_pages > 0) == mode.direct,
                "direct install was {} but {direct_pages} pages came that way: {after}",
                if mode.direct { "on" } else { "off" }
            );
            bandwidth.push((
                window,
                mode,
                args.mib as f64 / secs,
                after.read_faults - before.read_faults,
            ));
        }
        dsm.barrier()?;
        job.apply(dsm)?;
        drop(region);
    }

    // Sequential read of a cyclic region (the default placement) and of block-cyclic ones, with the
    // job's window: half their pages are homed at rank 1, every other page or every other block, which
    // read-ahead fetches a stride apart or block after block (each block's pages in one copy).
    let mut interleaved = Vec::new();
    for placement in [
        Placement::Cyclic,
        Placement::BlockCyclic(BLOCK),
        Placement::BlockCyclic(4 * BLOCK),
    ] {
        dsm.set_readahead(default_window)?;
        let region = dsm.alloc_vec_with::<u64>(bytes / 8, placement)?;
        let pages = bytes / 8 / WORDS;
        let remote: Vec<usize> = (0..pages)
            .filter(|&p| region.region().home_of(dsm::PageId(p as u64)) == Some(Rank(1)))
            .collect();
        if me == Rank(1) {
            for &p in &remote {
                region.set(p * WORDS, p as u64);
            }
        }
        dsm.barrier()?;
        if me == Rank(0) {
            let t = Instant::now();
            // SAFETY: between two barriers nobody writes the region.
            let sum: u64 = unsafe { region.as_slice() }.iter().sum();
            // Only rank 1's pages crossed the link.
            let mib = (remote.len() * WORDS * 8) as f64 / (1 << 20) as f64;
            interleaved.push((placement, mib, mib / t.elapsed().as_secs_f64()));
            anyhow::ensure!(
                sum == remote.iter().map(|&p| p as u64).sum::<u64>(),
                "the {placement:?} region read back wrong: sum {sum}"
            );
        }
        dsm.barrier()?;
        drop(region);
    }

    // First touch of pages homed here, written in order: one fault per page without read-ahead, and
    // with the job's window a fault fills the untouched pages after it with zeros (up to 64 pages), beside
    // the kernel's own first touch of plain memory, measured right before each.
    let mut first_touch = Vec::new();
    for window in [1, default_window] {
        let region = dsm.alloc_vec_with::<u64>(bytes / 8, Placement::At(Rank(0)))?;
        if me == Rank(0) {
            dsm.set_readahead(window)?;
            let kernel = fresh_page_rate(bytes);
            let t = Instant::now();
            for p in 0..bytes / 8 / WORDS {
                region.set(p * WORDS, 1);
            }
            first_touch.push((window, args.mib as f64 / t.elapsed().as_secs_f64(), kernel));
        }
        dsm.barrier()?;
        drop(region);
    }
    dsm.set_readahead(default_window)?;

    // First touch of a first-touch region by rank 0, with the job's window: the half whose directory
    // is rank 0 itself, page by page; the half whose directory is rank 1, page by page (a round trip
    // to learn each page's home) and in one copy (a round trip for each run of up to 1024 pages it
    // announces). Each beside the kernel's first touch of plain memory, measured right before.
    let mut first_touch_placed = Vec::new();
    for (what, far, copy) in [
        ("directory here, page by page", false, false),
        ("directory at rank 1, page by page", true, false),
        ("directory at rank 1, one copy", true, true),
    ] {
        let region = dsm.alloc_vec_with::<u64>(bytes / 8, Placement::FirstTouch)?;
        if me == Rank(0) {
            let half = bytes / 8 / 2;
            let from = if far { half } else { 0 };
            let source = if copy { vec![1u64; half] } else { Vec::new() };
            let kernel = fresh_page_rate(bytes / 2);
            let t = Instant::now();
            if copy {
                region.write_slice(from, &source);
            } else {
                for p in 0..half / WORDS {
                    region.set(from + p * WORDS, 1);
                }
            }
            let mibs = args.mib as f64 / 2.0 / t.elapsed().as_secs_f64();
            first_touch_placed.push((what, mibs, kernel));
        }
        dsm.barrier()?;
        drop(region);
    }

    // Writes into pages that rank 1, their home, wrote and alone holds, under sequential consistency:
    // one word of each page in order, without read-ahead (a fault per page, each taking the page and
    // its data from the home) and with the job's window (write-ahead: a fault takes the following pages
    // the home alone holds along, data and all); then the whole region in one copy. Beside the raw
    // streaming floor.
    let mut written = Vec::new();
    for (window, copy) in [(1, false), (default_window, false), (default_window, true)] {
        let region = dsm.alloc_vec_in::<u64>(
            bytes / 8,
            Placement::At(Rank(1)),
            dsm::Consistency::Sequential,
        )?;
        let pages = bytes / 8 / WORDS;
        if me == Rank(1) {
            for p in 0..pages {
                region.set(p * WORDS, p as u64);
            }
        }
        dsm.barrier()?;
        if me == Rank(0) {
            dsm.set_readahead(window)?;
            let source = if copy {
                vec![1u64; bytes / 8]
            } else {
                Vec::new()
            };
            let before = dsm.stats();
            let t = Instant::now();
            if copy {
                region.write_slice(0, &source);
            } else {
                for p in 0..pages {
                    region.set(p * WORDS + 1, 1);
                }
            }
            let mibs = args.mib as f64 / t.elapsed().as_secs_f64();
            let faults = dsm.stats().write_faults - before.write_faults;
            // The home's words came with the pages (the copy overwrote them).
            let expected = |p: usize| if copy { 1 } else { p as u64 };
            anyhow::ensure!(
                (0..pages).all(|p| region.get(p * WORDS) == expected(p)),
                "the pages written read back wrong"
            );
            written.push((window, copy, mibs, faults));
        }
        dsm.barrier()?;
        drop(region);
    }
    dsm.set_readahead(default_window)?;

    if me == Rank(0) {
        let raw_med = quantile(&mut raw, 0.5);
        let idle_med = quantile(&mut idle_us, 0.5);
        let raw_p99 = quantile(&mut raw, 0.99);
        let eng_med = quantile(&mut engine, 0.5);
        let mut out = vec![
            floor_row(raw_med),
            Measurement::new(
                &raw_label("round trip, p99"),
                raw_p99,
                "us",
                raw_med,
                raw_round_trip(),
                "(floor)",
            ),
            Measurement::new(
                "dsm ping (channel + service loop), median",
                eng_med,
                "us",
                raw_med,
                raw_round_trip(),
                "",
            ),
            Measurement::new(
                "read fault minus raw round trip of the same step, median",
                quantile(&mut excess, 0.5),
                "us",
                raw_med,
                raw_round_trip(),
                "<= 15 us",
            ),
            Measurement::new(
                "read fault, server idle, median",
                idle_med,
                "us",
                raw_med,
                raw_round_trip(),
                &format!("<= floor + 15 us = {:.1}", raw_med + 15.0),
            ),
            Measurement::new(
                "read fault, server idle, p99",
                quantile(&mut idle_us, 0.99),
                "us",
                raw_med,
                raw_round_trip(),
                "",
            ),
            Measurement::new(
                "read fault of an untouched page, median",
                quantile(&mut zero_us, 0.5),
                "us",
                raw_med,
                raw_round_trip(),
                "",
            ),
            Measurement::new(
                "read fault, server busy, median",
                quantile(&mut busy_us, 0.5),
                "us",
                raw_med,
                raw_round_trip(),
                &format!("<= 3 floors = {:.1}", 3.0 * raw_med),
            ),
            Measurement::new(
                "read fault, server busy, p99",
                quantile(&mut busy_us, 0.99),
                "us",
                raw_med,
                raw_round_trip(),
                "",
            ),
        ];
        if let Some(mpi) = mpi_raw.as_mut().filter(|m| !m.is_empty()) {
            let mpi_med = quantile(mpi, 0.5);
            let floor = "raw MPI round trip 64 B / 4 KiB";
            out.push(Measurement::floor(
                "raw MPI round trip, median",
                mpi_med,
                "us",
                floor,
            ));
            out.push(Measurement::new(
                "read fault, server idle, median, against MPI",
                idle_med,
                "us",
                mpi_med,
                floor,
                &format!("<= MPI floor + 15 us = {:.1}", mpi_med + 15.0),
            ));
        }
        if fresh_mibs > 0.0 {
            out.push(Measurement::new(
                "fresh 4 KiB pages, first touch (a bound on installs)",
                fresh_mibs,
                "MiB/s",
                raw_mibs,
                &raw_label("streaming"),
                "",
            ));
        }
        for (placement, mib, mibs) in interleaved {
            let layout = match placement {
                Placement::BlockCyclic(n) => format!("a block-cyclic region ({n}-page blocks)"),
                _ => "a cyclic region".to_string(),
            };
            out.push(Measurement::new(
                &format!(
                    "sequential read {} MiB of {layout}, remote {mib:.0} MiB, read-ahead {default_window}",
                    args.mib
                ),
                mibs,
                "MiB/s",
                raw_mibs,
                &raw_label("streaming"),
                "",
            ));
        }
        for (window, mibs, kernel) in first_touch {
            out.push(Measurement::new(
                &format!("first touch of pages homed here, read-ahead {window}"),
                mibs,
                "MiB/s",
                kernel,
                "the kernel's first touch",
                "",
            ));
        }
        for (what, mibs, kernel) in first_touch_placed {
            out.push(Measurement::new(
                &format!("first touch of a first-touch region, {what}"),
                mibs,
                "MiB/s",
                kernel,
                "the kernel's first touch",
                "",
            ));
        }
        for (window, copy, mibs, faults) in written {
            let how = if copy { "in one copy" } else { "a word a page" };
            out.push(Measurement::new(
                &format!(
                    "write {} MiB that rank 1 wrote, sequential consistency, {how}, read-ahead \
                     {window} ({faults} faults)",
                    args.mib
                ),
                mibs,
                "MiB/s",
                raw_mibs,
                &raw_label("streaming"),
                "",
            ));
        }
        for (window, mode, mibs, faults) in bandwidth {
            let default = window == default_window;
            out.push(Measurement::new(
                &format!(
                    "sequential read {} MiB, read-ahead {window}{}, {}, {} ({faults} faults)",
                    args.mib,
                    if default { " (default)" } else { "" },
                    if mode.direct {
                        "direct install"
                    } else {
                        "over the connection"
                    },
                    if mode.helper {
                        "install helper"
                    } else {
                        "no install helper"
                    },
                ),
                mibs,
                "MiB/s",
                raw_mibs,
                &raw_label("streaming"),
                if default && mode == job {
                    ">= 0.30 of floor"
                } else {
                    ""
                },
            ));
        }
        report(&out, args.json);
    }
    drop((idle, zero, busy, done));
    rt.finish()?;
    Ok(())
}
