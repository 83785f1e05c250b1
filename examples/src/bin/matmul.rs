//! C = A x B for n x n matrices of f64 in shared regions, with row blocks of C handed out through the task
//! farm: rank 0 puts one task per block of `--block` rows, every rank (rank 0 too) takes blocks and computes
//! them, and rank 0 checks C against its own single-rank product.
//!
//! Each block is put near the rank that homes its first row of A and C (`TaskFarm::put_near`): ranks
//! compute their own rows first, reading A and writing C in place, and take other ranks' blocks only once
//! theirs are done (`--anywhere` hands blocks to whoever asks, for comparison).
//!
//! Each rank reads B where it is, in the shared region: a helper thread prefetches it in order, a band of
//! `K_TILE` rows at a time (`GlobalVec::prefetch`: a band homed elsewhere comes in one request; the rows
//! homed here are here already), while the rank computes its first block, whose tiles of B are taken band
//! by band as they arrive. Blocks are computed with a cache-blocked kernel: a tile of B's rows is reused
//! across a block of C's rows while it is in cache. On a CPU with AVX2 and FMA (checked at run time) blocks of 4 x 8
//! elements of C stay in registers across the tile (about 23 GFLOP/s on one core of this project's
//! machine, against 7 for the loop along contiguous rows that other CPUs run). Every element of C gets its
//! terms in the same order (by k) on every path, and the check uses the same kernel on the whole matrix,
//! so the product is bit-identical whatever the number of ranks, as long as every rank's CPU takes the
//! same path (an FMA rounds once where a multiply and an add round twice: a job whose ranks run on CPUs
//! with and without FMA gets products that differ in the last bits, and fails its check).
//!
//! Prints the time of the product (from the tasks being put to the last result), to a tenth of a
//! millisecond (a 2-rank product of n = 1024 takes under 40 ms here), and GFLOP/s.
//!
//! Run: `dsmrun -n 2 target/release/matmul --n 1024 --block 32`

use clap::{Parser, ValueEnum};
use dsm::Placement;
use dsm_runtime::{TaskFarm, TupleSpace};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Consistency {
    Sequential,
    Release,
}

#[derive(Debug, Parser)]
struct Args {
    /// Matrix size (n x n).
    #[arg(long, default_value_t = 512)]
    n: usize,
    /// Rows of C per task [default: 32, or --n if smaller].
    #[arg(long)]
    block: Option<usize>,
    /// Consistency model of the matrices.
    #[arg(long, value_enum, default_value_t = Consistency::Sequential)]
    consistency: Consistency,
    /// Skip the single-rank check (for timing large runs).
    #[arg(long)]
    no_check: bool,
    /// Hand blocks to whichever rank asks first, ignoring where their rows are homed.
    #[arg(long)]
    anywhere: bool,
}

/// A tile of B is K_TILE rows by J_TILE columns (128 KiB) and the matching part of a block of C's rows is
/// at most 64 KiB: both stay in L2 while the tile is reused across the block's rows, so two ranks on two
/// cores do not compete for the shared cache and memory bus.
const K_TILE: usize = 64;
/// Rows of C per task unless `--block` says.
const DEFAULT_BLOCK: usize = 32;
const J_TILE: usize = 256;

/// C[rows] = A[rows] x B, where `a` holds the rows' part of A (rows x n) and `c` receives rows x n.
fn multiply_rows(a: &[f64], b: &[f64], c: &mut [f64], n: usize) {
    c.fill(0.0);
    let rows = a.len() / n;
    for j0 in (0..n).step_by(J_TILE) {
        let j1 = (j0 + J_TILE).min(n);
        for k0 in (0..n).step_by(K_TILE) {
            let k1 = (k0 + K_TILE).min(n);
            tile(a, b, c, n, rows, (j0, j1), (k0, k1));
        }
    }
}

/// C's rows (`rows` of them) += A's columns `k` x B's rows `k`, on columns `j`: a tile of B reused across
/// C's rows while it is in cache. With AVX2 and FMA (checked once, at run time), blocks of 4 x 8 elements
/// of C stay in registers over the tile's `k`.
fn tile(
    a: &[f64],
    b: &[f64],
    c: &mut [f64],
    n: usize,
    rows: usize,
    (j0, j1): (usize, usize),
    (k0, k1): (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert!(
            a.len() >= rows * n && c.len() >= rows * n && b.len() >= k1 * n && j1 <= n && k1 <= n,
            "a tile past the matrices"
        );
        // SAFETY: the CPU has AVX2 and FMA (checked above), and every index `tile_fma` forms lies within
        // the slices (their lengths are checked above).
        unsafe { tile_fma(a, b, c, n, rows, (j0, j1), (k0, k1)) };
        return;
    }
    for i in 0..rows {
        let c_row = &mut c[i * n + j0..i * n + j1];
        for k in k0..k1 {
            let aik = a[i * n + k];
            let b_row = &b[k * n + j0..k * n + j1];
            for (cj, bj) in c_row.iter_mut().zip(b_row) {
                *cj += aik * bj;
            }
        }
    }
}

/// `tile` with AVX2 and FMA: C's rows four at a time and its columns eight at a time, each 4 x 8 block of
/// C held in registers while the tile's `k` runs (two loads of B and four broadcasts of A per eight fused
/// multiply-adds), and the rows and columns left over one element at a time. Every element gets its terms
/// by `k` in the same order, each with one fused multiply-add, on either path: which path an element takes
/// (it depends on where a block of rows starts) does not change it.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` and `c` must hold `rows * n` elements, `b` at least `k1 * n`, and
/// `j1` and `k1` be at most `n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_fma(
    a: &[f64],
    b: &[f64],
    c: &mut [f64],
    n: usize,
    rows: usize,
    (j0, j1): (usize, usize),
    (k0, k1): (usize, usize),
) {
    use std::arch::x86_64::*;
    let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // The 4 x 8 blocks cover rows ..i_end and columns j0..j_end.
    let (i_end, j_end) = (rows / 4 * 4, j0 + (j1 - j0) / 8 * 8);
    // SAFETY: every index is `r * n + x` with row r < rows and x < n (a column j < j1 <= n of `c`, or
    // k < k1 <= n of `a`), within their `rows * n` elements, or `k * n + j` with k < k1 and j < j1 <= n,
    // within `b`'s `k1 * n` (the caller's contract); loads and stores are unaligned ones.
    unsafe {
        for i in (0..i_end).step_by(4) {
            for j in (j0..j_end).step_by(8) {
                let mut acc = [[_mm256_setzero_pd(); 2]; 4];
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc[0] = _mm256_loadu_pd(cp.add((i + r) * n + j));
                    acc[1] = _mm256_loadu_pd(cp.add((i + r) * n + j + 4));
                }
                for k in k0..k1 {
                    let b0 = _mm256_loadu_pd(bp.add(k * n + j));
                    let b1 = _mm256_loadu_pd(bp.add(k * n + j + 4));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_pd(*ap.add((i + r) * n + k));
                        acc[0] = _mm256_fmadd_pd(av, b0, acc[0]);
                        acc[1] = _mm256_fmadd_pd(av, b1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    _mm256_storeu_pd(cp.add((i + r) * n + j), acc[0]);
                    _mm256_storeu_pd(cp.add((i + r) * n + j + 4), acc[1]);
                }
            }
        }
        // What the blocks leave, an element at a time: the last columns of their rows, and whole rows
        // after them.
        for r in 0..rows {
            for jj in if r < i_end { j_end } else { j0 }..j1 {
                let mut x = *cp.add(r * n + jj);
                for k in k0..k1 {
                    x = (*ap.add(r * n + k)).mul_add(*bp.add(k * n + jj), x);
                }
                *cp.add(r * n + jj) = x;
            }
        }
    }
}

/// `multiply_rows` with the tiles of B's rows taken in order as they arrive: `ready(k)` waits until
/// rows `..k` of B are here. Each element of C gets its terms in the same order as in `multiply_rows`
/// (by `k`), so the result is bit-identical; only the tiles go k-first, so that the rows of B still
/// on their way are needed last.
fn multiply_rows_as_b_arrives(
    a: &[f64],
    b: &[f64],
    c: &mut [f64],
    n: usize,
    mut ready: impl FnMut(usize),
) {
    c.fill(0.0);
    let rows = a.len() / n;
    for k0 in (0..n).step_by(K_TILE) {
        let k1 = (k0 + K_TILE).min(n);
        ready(k1);
        for j0 in (0..n).step_by(J_TILE) {
            let j1 = (j0 + J_TILE).min(n);
            tile(a, b, c, n, rows, (j0, j1), (k0, k1));
        }
    }
}

/// The blocks of rows handed out: each rank's band of rows (those of its pages) cut into blocks of
/// `block` rows and, with several ranks, the last two of each band into quarters. A rank that finishes
/// its band takes the other ranks' last blocks, and small last blocks leave less for the slower one to
/// finish alone while the other waits (a whole block took about 6% of a 2-rank run at n = 1024). One
/// rank waits for no one: its blocks are all whole.
fn row_blocks(
    n: usize,
    block: usize,
    ranks: usize,
    home_of_row: impl Fn(usize) -> dsm::Rank,
) -> Vec<(usize, usize)> {
    let mut blocks = Vec::new();
    let mut band = 0;
    while band < n {
        let end = (band..n)
            .find(|&r| home_of_row(r) != home_of_row(band))
            .unwrap_or(n);
        let whole: Vec<(usize, usize)> = (band..end)
            .step_by(block)
            .map(|lo| (lo, (lo + block).min(end)))
            .collect();
        let split_from = if ranks > 1 {
            whole.len().saturating_sub(2)
        } else {
            whole.len()
        };
        for (k, &(lo, hi)) in whole.iter().enumerate() {
            let piece = if k >= split_from {
                (hi - lo).div_ceil(4)
            } else {
                hi - lo
            };
            blocks.extend((lo..hi).step_by(piece).map(|l| (l, (l + piece).min(hi))));
        }
        band = end;
    }
    blocks
}

fn a_at(i: usize, j: usize) -> f64 {
    ((i * 7 + j * 3) % 11) as f64 - 5.0
}

fn b_at(i: usize, j: usize) -> f64 {
    ((i * 5 + j * 13) % 7) as f64 - 3.0
}

fn main() {
    dsm_examples::exit_on_error("matmul", run());
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.n >= 1, "--n must be at least 1");
    anyhow::ensure!(
        args.n
            .checked_mul(args.n)
            .and_then(|e| e.checked_mul(8))
            .is_some(),
        "--n {} is too large: an n x n matrix of f64 would not fit in the address space",
        args.n
    );
    let block = args.block.unwrap_or(DEFAULT_BLOCK.min(args.n));
    anyhow::ensure!(
        (1..=args.n).contains(&block),
        "--block must be between 1 and --n ({})",
        args.n
    );
    // Every rank reads all of B; rank 0's check reads all of C too, and makes A, B, C and its own product
    // in private memory.
    let matrices = if args.no_check { 1 } else { 6 };
    dsm_examples::ensure_memory(
        &format!("a product of {0} x {0} matrices", args.n),
        (args.n as u128).pow(2) * 8 * matrices,
        "give a smaller --n",
    )?;
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let (me, size, n) = (rt.rank().0 as usize, rt.size(), args.n);
    let model = match args.consistency {
        Consistency::Sequential => dsm::Consistency::Sequential,
        Consistency::Release => dsm::Consistency::Release,
    };
    // Pages in blocks: rank r is the home of a contiguous band of rows, which it fills itself below, so
    // every page starts out owned at its home and the others fetch B in long sequential runs (read-ahead).
    let a = dsm.alloc_vec_in::<f64>(n * n, Placement::Block, model)?;
    let b = dsm.alloc_vec_in::<f64>(n * n, Placement::Block, model)?;
    let c = dsm.alloc_vec_in::<f64>(n * n, Placement::Block, model)?;
    let space = TupleSpace::join(&rt)?;
    let farm = TaskFarm::new(&space, "matmul", dsm::Rank(0))?;
    let band = |m: &dsm::GlobalVec<'_, f64>| -> (usize, usize) {
        // The elements of the pages homed here (Block placement: an even share of pages, in rank order).
        let pages = (n * n * 8).div_ceil(dsm::PAGE_SIZE);
        let per = pages.div_ceil(size);
        let first = (me * per * dsm::PAGE_SIZE / 8).min(n * n);
        let end = ((me + 1) * per * dsm::PAGE_SIZE / 8).min(n * n);
        debug_assert!(
            first == end
                || m.region()
                    .home_of(dsm::PageId((first * 8 / dsm::PAGE_SIZE) as u64))
                    == Some(rt.rank())
        );
        (first, end)
    };
    let (lo, hi) = band(&a);
    a.write_slice(
        lo,
        &(lo..hi).map(|x| a_at(x / n, x % n)).collect::<Vec<_>>(),
    );
    b.write_slice(
        lo,
        &(lo..hi).map(|x| b_at(x / n, x % n)).collect::<Vec<_>>(),
    );
    dsm.barrier()?;

    let t = Instant::now();
    let home_of_row = |row: usize| {
        c.region()
            .home_of(dsm::PageId((row * n * 8 / dsm::PAGE_SIZE) as u64))
            .expect("C is placed in blocks, which gives every page a home at allocation")
    };
    let blocks: Vec<(u64, (u64, u64))> = row_blocks(n, block, size, home_of_row)
        .into_iter()
        .enumerate()
        .map(|(id, (lo, hi))| (id as u64, (lo as u64, hi as u64)))
        .collect();
    // B is read where it is. A helper thread prefetches it in order, band by band, while this rank
    // computes its first block, whose tiles of B go k-first and wait only for the bands they need. It
    // stops early if this rank gets no block.
    // SAFETY: no rank writes B after the barrier above; the slice is dropped before B is.
    let b_rows: &[f64] = unsafe { b.as_slice() };
    let worker = {
        let farm = farm.clone();
        let (a, b, c) = (&a, &b, &c);
        move || -> anyhow::Result<(usize, Option<f64>)> {
            let t = Instant::now();
            let arrived = std::sync::Mutex::new(0usize);
            let more = std::sync::Condvar::new();
            let served = std::sync::atomic::AtomicBool::new(false);
            let fetch = || {
                for k0 in (0..n).step_by(K_TILE) {
                    if served.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let k1 = (k0 + K_TILE).min(n);
                    b.prefetch(k0 * n..k1 * n);
                    *arrived.lock().unwrap_or_else(|p| p.into_inner()) = k1;
                    more.notify_all();
                }
            };
            let ready = |k: usize| {
                let mut got = arrived.lock().unwrap_or_else(|p| p.into_inner());
                while *got < k {
                    got = more.wait(got).unwrap_or_else(|p| p.into_inner());
                }
            };
            let mut first_block = None;
            let done = std::thread::scope(|s| {
                s.spawn(fetch);
                let mut is_first = true;
                let done = farm.serve(|_, (lo, hi): (u64, u64)| {
                    let (lo, hi) = (lo as usize, hi as usize);
                    let mut rows_a = vec![0.0; (hi - lo) * n];
                    a.read_slice(lo * n, &mut rows_a);
                    let mut rows_c = vec![0.0; (hi - lo) * n];
                    if is_first {
                        multiply_rows_as_b_arrives(&rows_a, b_rows, &mut rows_c, n, ready);
                        first_block = Some(t.elapsed().as_secs_f64());
                        is_first = false;
                    } else {
                        multiply_rows(&rows_a, b_rows, &mut rows_c, n);
                    }
                    c.write_slice(lo * n, &rows_c);
                });
                served.store(true, std::sync::atomic::Ordering::Relaxed);
                done
            })?;
            Ok((done, first_block))
        }
    };
    let (done, first) = std::thread::scope(|s| -> anyhow::Result<(usize, Option<f64>)> {
        if me != 0 {
            return worker();
        }
        let mine = s.spawn(worker);
        if args.anywhere {
            farm.put(blocks.iter().copied())?;
        } else {
            farm.put_near(
                blocks
                    .iter()
                    .map(|&(id, (lo, hi))| (id, home_of_row(lo as usize), (lo, hi))),
            )?;
        }
        let results: Vec<(u64, ())> = farm.results(blocks.len())?;
        anyhow::ensure!(results.len() == blocks.len(), "results are missing");
        farm.stop()?;
        mine.join()
            .map_err(|_| anyhow::anyhow!("rank 0's worker panicked"))?
    })?;
    // Every rank's writes of C reach rank 0 (a barrier is a release and an acquire under both models).
    dsm.barrier()?;
    let secs = t.elapsed().as_secs_f64();
    match first {
        Some(first) => dsm_examples::outln!(
            "matmul: rank {me} computed {done} of {} blocks (the first, as B's rows arrived, in {first:.3} s)",
            blocks.len()
        )?,
        None => dsm_examples::outln!("matmul: rank {me} computed none of {} blocks", blocks.len())?,
    }
    if me == 0 {
        let gflops = 2.0 * (n as f64).powi(3) / secs / 1e9;
        dsm_examples::outln!(
            "matmul: n={n} block={} ranks={size} consistency={:?}: {secs:.4} s, {gflops:.2} GFLOP/s",
            block, args.consistency
        )?;
        if !args.no_check {
            // The reference is the product of A and B as they were made, not as shared memory holds them
            // now: a band lost or damaged at its home would otherwise be in both products alike.
            let all_a: Vec<f64> = (0..n * n).map(|x| a_at(x / n, x % n)).collect();
            let all_b: Vec<f64> = (0..n * n).map(|x| b_at(x / n, x % n)).collect();
            let mut got = vec![0.0; n * n];
            c.read_slice(0, &mut got);
            let mut want = vec![0.0; n * n];
            multiply_rows(&all_a, &all_b, &mut want, n);
            let wrong = (0..n * n).filter(|&x| got[x] != want[x]).count();
            anyhow::ensure!(
                wrong == 0,
                "{wrong} elements of C differ from the single-rank product"
            );
            dsm_examples::outln!("matmul: check passed: C equals the single-rank product")?;
        }
    }
    drop((a, b, c, farm, space));
    rt.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_split_into_row_blocks_gives_the_same_bits_as_the_whole_product() {
        // Sizes that leave rows and columns over (not multiples of 4 and 8) and more than one tile of
        // each kind.
        for n in [37, 300] {
            let a: Vec<f64> = (0..n * n).map(|x| a_at(x / n, x % n) * 0.37).collect();
            let b: Vec<f64> = (0..n * n).map(|x| b_at(x / n, x % n) / 3.0).collect();
            let mut whole = vec![0.0; n * n];
            multiply_rows(&a, &b, &mut whole, n);
            // Each element as the kernel defines it: its terms by k, each added by one rounding step
            // (fused where the CPU has FMA).
            #[cfg(target_arch = "x86_64")]
            let fused = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            #[cfg(not(target_arch = "x86_64"))]
            let fused = false;
            for (i, j) in [(0, 0), (n - 1, n - 1), (n / 2, 5), (3, n - 2)] {
                let mut x = 0.0f64;
                for k in 0..n {
                    let (p, q) = (a[i * n + k], b[k * n + j]);
                    x = if fused { p.mul_add(q, x) } else { x + p * q };
                }
                assert_eq!(
                    x.to_bits(),
                    whole[i * n + j].to_bits(),
                    "n {n}, element {i},{j}"
                );
            }
            for block in [1, 3, 5, 7, 32] {
                let mut pieces = vec![0.0; n * n];
                let mut lo = 0;
                while lo < n {
                    let hi = (lo + block).min(n);
                    multiply_rows(&a[lo * n..hi * n], &b, &mut pieces[lo * n..hi * n], n);
                    lo = hi;
                }
                assert!(
                    pieces
                        .iter()
                        .zip(&whole)
                        .all(|(p, w)| p.to_bits() == w.to_bits()),
                    "n {n}, blocks of {block} rows"
                );
                let mut arriving = vec![0.0; block.min(n) * n];
                multiply_rows_as_b_arrives(&a[..block.min(n) * n], &b, &mut arriving, n, |_| {});
                assert!(arriving
                    .iter()
                    .zip(&whole)
                    .all(|(p, w)| p.to_bits() == w.to_bits()));
            }
        }
    }
}
