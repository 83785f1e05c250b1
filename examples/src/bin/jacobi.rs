//! Jacobi relaxation of a 2-D grid, the classic DSM benchmark: the grid's rows are split into one block per
//! rank, each iteration computes every interior point as the mean of its four neighbours into the other of
//! two shared grids, and a barrier separates the steps. The top edge is held at 1.0, the others at 0.
//! Pages are placed in blocks, so each rank's rows are homed at that rank and only the pages holding the
//! rows next to a neighbour's block travel. `--placement first-touch` gets the same from the ranks'
//! first writes (each rank writes its own rows before the first step), wherever the blocks of rows fall
//! on pages; `--placement cyclic` spreads every rank's rows over every home, for comparison.
//!
//! One step runs `--fuse` iterations (temporal blocking): a rank reads the shared grid with `--fuse` rows
//! of each neighbour's block around its own, relaxes the iterations between them in a few rows of private
//! memory that stay in the cache, and writes only the last iteration into the other shared grid. The
//! neighbours' rows it relaxes too are recomputed by each rank (a few rows a step) instead of exchanged
//! after every iteration. A sweep over the whole grid moves about 24 bytes of memory per point and
//! computes four additions, so a rank relaxing one iteration at a time waits for memory, and two ranks on
//! one machine share its bandwidth; fusing iterations divides that traffic, and the barriers, by
//! `--fuse`. `--fuse 1` is the plain one-barrier-per-iteration relaxation.
//!
//! Prints the time of the iterations and a checksum, identical to a single-rank run's and to any other
//! `--fuse` (each point is computed the same way whatever the partition and the fusion, and rank 0 sums in
//! the same order).
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
    /// Iterations relaxed per step between two barriers (1: a barrier after every iteration).
    #[arg(long, default_value_t = 4)]
    fuse: usize,
    /// Consistency model of the grids.
    #[arg(long, value_enum, default_value_t = Consistency::Sequential)]
    consistency: Consistency,
    /// Where the grids' pages are homed.
    #[arg(long, value_enum, default_value_t = PagePlacement::Block)]
    placement: PagePlacement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PagePlacement {
    /// In one block of pages per rank, in rank order.
    Block,
    /// Page after page on rank after rank.
    Cyclic,
    /// At the rank that touches each page first.
    FirstTouch,
}

/// How much of its rows a rank writes at a time before the first step.
const PIECE_BYTES: usize = 1 << 20;

/// The largest `--fuse`: a step keeps three rows per fused iteration in private memory, and recomputes
/// about `fuse` squared rows of its neighbours.
const MAX_FUSE: usize = 64;

fn main() {
    dsm_examples::exit_on_error("jacobi", run());
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();

    anyhow::ensure!(args.n >= 3, "--n must be at least 3");
    anyhow::ensure!(
        args.n
            .checked_mul(args.n)
            .and_then(|e| e.checked_mul(8))
            .is_some(),
        "--n {} is too large: an n x n grid of f64 would not fit in the address space",
        args.n
    );
    anyhow::ensure!(
        (1..=MAX_FUSE).contains(&args.fuse),
        "--fuse must be between 1 and {MAX_FUSE}"
    );
    // Rank 0 sums the whole grid at the end: every page of it comes to rank 0.
    dsm_examples::ensure_memory(
        &format!("a {0} x {0} grid", args.n),
        (args.n as u128).pow(2) * 8,
        "give a smaller --n",
    )?;
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let (me, size, n) = (rt.rank().0 as usize, rt.size(), args.n);
    let model = match args.consistency {
        Consistency::Sequential => dsm::Consistency::Sequential,
        Consistency::Release => dsm::Consistency::Release,
    };
    let placement = match args.placement {
        PagePlacement::Block => Placement::Block,
        PagePlacement::Cyclic => Placement::Cyclic,
        PagePlacement::FirstTouch => Placement::FirstTouch,
    };
    let grids = [
        dsm.alloc_vec_in::<f64>(n * n, placement, model)?,
        dsm.alloc_vec_in::<f64>(n * n, placement, model)?,
    ];
    // This rank's rows: blocks as even as possible, in rank order. Each rank writes its own rows of both
    // grids (the top edge 1.0, the rest 0), which homes them here under first-touch placement: a piece
    // of rows at a time, since a rank's rows may take much of the machine's memory.
    let lo = me * n / size;
    let hi = (me + 1) * n / size;
    let rows_a_piece = (PIECE_BYTES / 8 / n).max(1);
    let mut piece = vec![0.0; rows_a_piece.min(hi - lo) * n];
    for first in (lo..hi).step_by(rows_a_piece) {
        let piece = &mut piece[..(hi - first).min(rows_a_piece) * n];
        for (x, v) in (first * n..).zip(piece.iter_mut()) {
            *v = if x < n { 1.0 } else { 0.0 };
        }
        for g in &grids {
            g.write_slice(first * n, piece);
        }
    }
    let mut levels = Levels::new(n, args.fuse);
    dsm.barrier()?;
    let t = Instant::now();
    let mut done = 0;
    let mut steps = 0;
    while done < args.iters {
        let fuse = args.fuse.min(args.iters - done);
        let (from, to) = (&grids[steps % 2], &grids[(steps + 1) % 2]);
        // The neighbours' rows this step reads, each side in one request (they changed in the last step,
        // so the barrier dropped them here).
        if lo < hi {
            let below = lo.saturating_sub(fuse);
            let above = (hi + fuse).min(n);
            if below < lo {
                from.prefetch(below * n..lo * n);
            }
            if hi < above {
                from.prefetch(hi * n..above * n);
            }
        }
        // SAFETY: between two barriers no rank writes `from`, and each rank writes only its own rows of `to`;
        // this process touches the grids from this thread only.
        let (a, b) = unsafe { (from.as_slice(), to.as_mut_slice()) };
        levels.step(a, b, lo..hi, fuse);
        dsm.barrier()?;
        done += fuse;
        steps += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    if me == 0 {
        let last = &grids[steps % 2];
        let mut sum = 0.0f64;
        for i in 0..n * n {
            sum += last.get(i);
        }
        dsm_examples::outln!(
            "jacobi {n}x{n}, {} iterations, {size} ranks, {:?} placement: {secs:.3} s",
            args.iters,
            args.placement
        )?;
        dsm_examples::outln!("checksum {sum:.17e} (bits {:#018x})", sum.to_bits())?;
    }
    dsm.barrier()?;
    drop(grids);
    rt.finish()?;
    Ok(())
}

/// Relaxes row `mid`'s interior points from the rows above and below it into `out` (whose edge points,
/// like every edge of the grid, never change). The sum is taken in one order everywhere, so every way of
/// scheduling the rows gives the same bits.
fn relax_row(up: &[f64], mid: &[f64], down: &[f64], out: &mut [f64]) {
    let n = mid.len();
    let points = out[1..n - 1]
        .iter_mut()
        .zip(&up[1..n - 1])
        .zip(&down[1..n - 1])
        .zip(mid[..n - 2].iter().zip(&mid[2..]));
    for (((o, u), d), (left, right)) in points {
        *o = 0.25 * (u + d + left + right);
    }
}

/// The private rows of the iterations a step relaxes between the shared grids: for each fused iteration
/// but the last, the three newest rows (all a row of the next iteration needs), by row number modulo 3.
struct Levels {
    n: usize,
    rows: Vec<f64>,
}

impl Levels {
    fn new(n: usize, fuse: usize) -> Levels {
        Levels {
            n,
            rows: vec![0.0; (fuse - 1) * 3 * n],
        }
    }

    /// Relaxes `fuse` iterations of the rows `own` from grid `a` into grid `b`. Iteration `m` (1 to
    /// `fuse`) is relaxed for the rows within `fuse - m` of `own`, the rows the later iterations of `own`
    /// depend on. The iterations go together down the grid: once row `v` of iteration 1 is relaxed, row
    /// `v - 1` of iteration 2 has all it needs, and so on, so each row is used while still in the cache.
    fn step(&mut self, a: &[f64], b: &mut [f64], own: std::ops::Range<usize>, fuse: usize) {
        let n = self.n;
        // Iteration m relaxes the interior rows in span(m).
        let span = |m: usize| {
            let reach = fuse - m;
            own.start.saturating_sub(reach).max(1)..(own.end + reach).min(n - 1)
        };
        if span(fuse).is_empty() {
            return; // no interior row of this rank's own
        }
        let first = span(1);
        // Row v of iteration 1 comes with row v - (m - 1) of iteration m.
        for v in first.start..first.end + fuse - 1 {
            for m in 1..=fuse {
                let Some(i) = v.checked_sub(m - 1).filter(|i| span(m).contains(i)) else {
                    continue;
                };
                let (inputs, outputs) = self.rows.split_at_mut((m - 1) * 3 * n);
                // Iteration m - 1's rows i - 1, i and i + 1: the shared grid for iteration 0 and for the
                // fixed top and bottom rows, else the private rows.
                let row = |r: usize| -> &[f64] {
                    if m == 1 || r == 0 || r == n - 1 {
                        &a[r * n..(r + 1) * n]
                    } else {
                        let at = ((m - 2) * 3 + r % 3) * n;
                        &inputs[at..at + n]
                    }
                };
                let (up, mid, down) = (row(i - 1), row(i), row(i + 1));
                if m == fuse {
                    relax_row(up, mid, down, &mut b[i * n..(i + 1) * n]);
                } else {
                    let out = &mut outputs[(i % 3) * n..(i % 3 + 1) * n];
                    // The edge points of a private row: the grid's, which never change.
                    out[0] = a[i * n];
                    out[n - 1] = a[i * n + n - 1];
                    relax_row(up, mid, down, out);
                }
            }
        }
    }
}
