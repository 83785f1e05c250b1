//! Jacobi relaxation of a 2-D grid, the classic DSM benchmark: the grid's rows are split into one block per
//! rank, each iteration computes every interior point as the mean of its four neighbours into the other of
//! two shared grids, and a barrier separates iterations. The top edge is held at 1.0, the others at 0.
//! Pages are placed in blocks, so each rank's rows are homed at that rank and only the pages holding the
//! rows next to a neighbour's block travel.
//!
//! Prints the time of the iterations and a checksum, identical to a single-rank run's (each point is
//! computed the same way whatever the partition, and rank 0 sums in the same order).
//!
//! Run: `dsmrun -n 2 target/release/jacobi --n 2048 --iters 100`

use clap::{Parser, ValueEnum};
use dsm::Placement;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Consistency {
    Sequential,
    Release,
}

#[derive(Debug, Parser)]
struct Args {
    /// Grid size (n x n points).
    #[arg(long, default_value_t = 512)]
    n: usize,
    /// Iterations.
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Consistency model of the grids.
    #[arg(long, value_enum, default_value_t = Consistency::Sequential)]
    consistency: Consistency,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();

    anyhow::ensure!(args.n >= 3, "--n must be at least 3");
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let (me, size, n) = (rt.rank().0 as usize, rt.size(), args.n);
    let model = match args.consistency {
        Consistency::Sequential => dsm::Consistency::Sequential,
        Consistency::Release => dsm::Consistency::Release,
    };
    let grids = [
        dsm.alloc_vec_in::<f64>(n * n, Placement::Block, model)?,
        dsm.alloc_vec_in::<f64>(n * n, Placement::Block, model)?,
    ];
    // This rank's rows: blocks as even as possible, in rank order.
    let lo = me * n / size;
    let hi = (me + 1) * n / size;
    if lo == 0 {
        for g in &grids {
            g.write_slice(0, &vec![1.0; n]);
        }
    }
    dsm.barrier()?;
    let t = Instant::now();
    for it in 0..args.iters {
        let (from, to) = (&grids[it % 2], &grids[(it + 1) % 2]);
        // SAFETY: between two barriers no rank writes `from`, and each rank writes only its own rows of `to`;
        // this process touches the grids from this thread only.
        let (a, b) = unsafe { (from.as_slice(), to.as_mut_slice()) };
        // The neighbours' rows next to this block, each in one request (they changed in the last
        // iteration, so the barrier dropped them here).
        if lo < hi {
            if lo > 0 {
                from.prefetch((lo - 1) * n..lo * n);
            }
            if hi < n {
                from.prefetch(hi * n..(hi + 1) * n);
            }
        }
        for i in lo.max(1)..hi.min(n - 1) {
            for j in 1..n - 1 {
                b[i * n + j] = 0.25
                    * (a[(i - 1) * n + j]
                        + a[(i + 1) * n + j]
                        + a[i * n + j - 1]
                        + a[i * n + j + 1]);
            }
        }
        dsm.barrier()?;
    }
    let secs = t.elapsed().as_secs_f64();
    if me == 0 {
        let last = &grids[args.iters % 2];
        let mut sum = 0.0f64;
        for i in 0..n * n {
            sum += last.get(i);
        }
        println!(
            "jacobi {n}x{n}, {} iterations, {size} ranks: {secs:.3} s",
            args.iters
        );
        println!("checksum {sum:.17e} (bits {:#018x})", sum.to_bits());
    }
    dsm.barrier()?;
    drop(grids);
    rt.finish()?;
    Ok(())
}
