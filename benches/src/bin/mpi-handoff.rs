//! What a remote fault could cost over MPI with no socket on its path: the floor of a message-level MPI
//! transport, measured on this machine.
//!
//! The MPI transport today keeps the file-descriptor interface (`runtime/src/mpi_bridge.rs`): a request
//! crosses a socket pair into a bridge thread, MPI, a socket pair out of the other rank's bridge into its
//! service loop, and the reply the same way back. The design that would replace it hands the request from
//! the faulting thread (which runs in a SIGBUS handler and may not call MPI) to one MPI thread per rank
//! through memory, and the serving rank's MPI thread answers it itself. This program measures that path
//! with nothing else on it, under `mpirun -n 2`:
//! - the raw MPI round trip, 64 B request and 4 KiB reply, between the two main threads (the floor);
//! - the same exchange from a requesting thread of rank 0, handed to rank 0's MPI thread through an atomic
//!   slot, answered by rank 1's MPI thread (which probes, receives, copies a page and sends), the reply
//!   handed back: with the requester spinning, yielding between looks, or parked until woken; with rank
//!   1's main thread idle, and computing.
//!
//! The MPI threads poll, yielding the CPU between looks, as the bridge does. Run: `cargo build --release
//! -p dsm-benches --features mpi --bin mpi-handoff`, then `mpirun -n 2 target/release/mpi-handoff`.

use clap::Parser;
use dsm_benches::{quantile, report, Measurement};
use mpi::collective::CommunicatorCollectives;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::Communicator;
use mpi::Threading;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
struct Args {
    /// Round trips per measurement.
    #[arg(long, default_value_t = 20_000, value_parser = dsm_benches::at_least_one::<usize>)]
    iters: usize,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

const REQUEST: usize = 64;
const PAGE: usize = 4096;
const TAG_RAW: i32 = 11;
const TAG_ASK: i32 = 12;
const TAG_ANSWER: i32 = 13;
const TAG_DONE: i32 = 14;

/// The slot between rank 0's requesting thread and its MPI thread.
const IDLE: u32 = 0;
const ASKED: u32 = 1;
const ANSWERED: u32 = 2;
const QUIT: u32 = 3;

/// How rank 0's requesting thread waits for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Spin,
    Yield,
    Park,
}

impl Wait {
    fn name(self) -> &'static str {
        match self {
            Wait::Spin => "spinning",
            Wait::Yield => "yielding",
            Wait::Park => "parked",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| anyhow::anyhow!("MPI is initialized already"))?;
    anyhow::ensure!(
        provided == Threading::Multiple,
        "this MPI provides {provided:?}, not MPI_THREAD_MULTIPLE"
    );
    let world = universe.world();
    anyhow::ensure!(
        world.size() == 2,
        "run it as 2 ranks: mpirun -n 2 {}",
        std::env::args().next().unwrap_or_default()
    );
    let me = world.rank();
    let other = world.process_at_rank(1 - me);

    // The floor: main thread to main thread.
    let mut raw = Vec::with_capacity(args.iters);
    let (mut ask, mut page) = (vec![0u8; REQUEST], vec![0u8; PAGE]);
    for _ in 0..args.iters {
        if me == 0 {
            let t = Instant::now();
            other.send_with_tag(&ask[..], TAG_RAW);
            other.receive_into_with_tag(&mut page[..], TAG_RAW);
            raw.push(t.elapsed().as_secs_f64() * 1e6);
        } else {
            other.receive_into_with_tag(&mut ask[..], TAG_RAW);
            other.send_with_tag(&page[..], TAG_RAW);
        }
    }
    // Timed on rank 0 only.
    let floor = if me == 0 {
        quantile(&mut raw, 0.5)
    } else {
        0.0
    };

    let mut results = Vec::new();
    for busy in [false, true] {
        for wait in [Wait::Spin, Wait::Yield, Wait::Park] {
            world.barrier();
            if me == 0 {
                let mut samples = requester(&world, args.iters, wait);
                let median = quantile(&mut samples, 0.5);
                let server = if busy { "busy" } else { "idle" };
                results.push(Measurement::new(
                    &format!(
                        "handed-off round trip, requester {}, server {server}, median",
                        wait.name()
                    ),
                    median,
                    "us",
                    floor,
                    "raw MPI round trip 64 B / 4 KiB",
                    "",
                ));
                let p99 = quantile(&mut samples, 0.99);
                results.push(Measurement::new(
                    &format!(
                        "handed-off round trip, requester {}, server {server}, p99",
                        wait.name()
                    ),
                    p99,
                    "us",
                    floor,
                    "raw MPI round trip 64 B / 4 KiB",
                    "",
                ));
            } else {
                server(&world, busy);
            }
        }
    }
    if me == 0 {
        let mut all = vec![Measurement::floor(
            "raw MPI round trip, median",
            floor,
            "us",
            "raw MPI round trip 64 B / 4 KiB",
        )];
        all.extend(results);
        report(&all, args.json);
    }
    Ok(())
}

/// Rank 0: a requesting thread (this one) and an MPI thread; returns the round trips in microseconds.
fn requester(world: &mpi::topology::SimpleCommunicator, iters: usize, wait: Wait) -> Vec<f64> {
    let slot = Arc::new(AtomicU32::new(IDLE));
    let me = std::thread::current();
    let mut samples = Vec::with_capacity(iters);
    std::thread::scope(|s| {
        let mpi_thread = {
            let slot = slot.clone();
            s.spawn(move || {
                let peer = world.process_at_rank(1);
                let ask = [1u8; REQUEST];
                let mut page = vec![0u8; PAGE];
                loop {
                    match slot.load(Ordering::Acquire) {
                        ASKED => {
                            peer.send_with_tag(&ask[..], TAG_ASK);
                            while peer.immediate_probe_with_tag(TAG_ANSWER).is_none() {
                                std::thread::yield_now();
                            }
                            peer.receive_into_with_tag(&mut page[..], TAG_ANSWER);
                            slot.store(ANSWERED, Ordering::Release);
                            me.unpark();
                        }
                        QUIT => {
                            peer.send_with_tag(&ask[..], TAG_DONE);
                            return;
                        }
                        _ => std::thread::yield_now(),
                    }
                }
            })
        };
        for _ in 0..iters {
            let t = Instant::now();
            slot.store(ASKED, Ordering::Release);
            loop {
                if slot.load(Ordering::Acquire) == ANSWERED {
                    break;
                }
                match wait {
                    Wait::Spin => std::hint::spin_loop(),
                    Wait::Yield => std::thread::yield_now(),
                    Wait::Park => std::thread::park_timeout(Duration::from_millis(10)),
                }
            }
            samples.push(t.elapsed().as_secs_f64() * 1e6);
            slot.store(IDLE, Ordering::Release);
        }
        slot.store(QUIT, Ordering::Release);
        let _ = mpi_thread.join();
    });
    samples
}

/// Rank 1: an MPI thread answers every request with a page until told to stop; the main thread computes
/// meanwhile when `busy`.
fn server(world: &mpi::topology::SimpleCommunicator, busy: bool) {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let peer = world.process_at_rank(0);
            let mut ask = [0u8; REQUEST];
            let source = vec![7u8; PAGE];
            let mut page = vec![0u8; PAGE];
            loop {
                if let Some(status) = peer.immediate_probe() {
                    peer.receive_into_with_tag(&mut ask[..], status.tag());
                    if status.tag() == TAG_DONE {
                        done.store(true, Ordering::Release);
                        return;
                    }
                    // What a home does for a read fault, at the least: copy the page out.
                    page.copy_from_slice(&source);
                    peer.send_with_tag(&page[..], TAG_ANSWER);
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut x = 1u64;
        while busy && !done.load(Ordering::Acquire) {
            for _ in 0..1000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
        }
    });
}
