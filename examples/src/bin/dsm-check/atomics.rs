//! `atomics`: shared words changed with `GlobalVec`'s atomic operations, without a lock, under either
//! model (`--consistency`), by `--threads` threads of every rank at once.

use crate::*;

/// Three parts, each on words of pages homed at different ranks (the caller's own among them):
/// - counters: every thread adds 1 to each of `COUNTERS` words `rounds` times (`fetch_add`); after a
///   barrier, every rank's plain read and atomic load of each gives the exact total;
/// - tickets: every thread takes `rounds` tickets from one word (`fetch_add`) and marks each in a table
///   (`compare_exchange` from 0): a ticket handed out twice fails the mark; after a barrier, every ticket
///   below the total is marked exactly once, and none past it;
/// - a chain under a lock: the holder reads a word with a plain read and stores one more with `swap`, which
///   must return what the plain read saw: an atomic operation's result reaches the lock's next holder
///   (under release consistency, through the write notice of the release that follows it);
/// - the other widths and operations (`widths`).
pub(crate) fn atomics(c: &Check) -> anyhow::Result<()> {
    const COUNTERS: usize = 4;
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let threads = args.threads.max(1);
    let rounds = args.rounds;
    // One counter a page, on pages homed at ranks 0, 1, 2, 3 (mod n); the ticket word and the chain on the
    // last two.
    let words = dsm.alloc_vec_in::<u64>(
        (COUNTERS + 2) * WORDS_PER_PAGE,
        dsm::Placement::Cyclic,
        model,
    )?;
    let (ticket_at, chain_at) = (
        COUNTERS * WORDS_PER_PAGE,
        (COUNTERS + 1) * WORDS_PER_PAGE + 3,
    );
    let total = (n * threads * rounds) as u64;
    let marks = dsm.alloc_vec_in::<u64>(total as usize, dsm::Placement::Cyclic, model)?;
    on_threads(threads, |t| {
        for i in 0..rounds {
            for k in 0..COUNTERS {
                words.fetch_add(((k + i + t) % COUNTERS) * WORDS_PER_PAGE, 1)?;
            }
            let ticket = words.fetch_add(ticket_at, 1)?;
            ensure!(ticket < total, "rank {me}: ticket {ticket} of {total}");
            let mark = (me * threads + t + 1) as u64;
            if let Err(found) = marks.compare_exchange(ticket as usize, 0, mark)? {
                anyhow::bail!(
                    "rank {me}: ticket {ticket} handed out twice (marked {found} already)"
                );
            }
            let guard = dsm.lock(7)?;
            let seen = words.get(chain_at);
            let old = words.swap(chain_at, seen + 1)?;
            ensure!(
                old == seen,
                "rank {me}: under the lock a plain read of the chain gave {seen}, the atomic swap {old}: the last holder's swap did not reach this one"
            );
            guard.unlock()?;
        }
        Ok(())
    })?;
    dsm.barrier()?;
    for k in 0..COUNTERS {
        let at = k * WORDS_PER_PAGE;
        let (plain, loaded) = (words.get(at), words.load(at)?);
        ensure!(
            plain == total && loaded == total,
            "rank {me}: counter {k} reads {plain} (load {loaded}), expected {total}"
        );
    }
    ensure!(
        words.get(ticket_at) == total,
        "rank {me}: tickets {}",
        words.get(ticket_at)
    );
    ensure!(
        words.get(chain_at) == total,
        "rank {me}: chain {}",
        words.get(chain_at)
    );
    let mut seen = vec![0u64; total as usize];
    marks.read_slice(0, &mut seen);
    if let Some(t) = seen.iter().position(|&m| m == 0) {
        anyhow::bail!("rank {me}: ticket {t} was never taken");
    }
    widths(c)?;
    println!("atomics ok: {total} per counter, {total} tickets, chain {total}");
    Ok(())
}

/// Words of 4 bytes, signed words, and every operation, on pages homed at each rank in turn, by every
/// thread of every rank at once (thread `k` of the job is `me * threads + t`):
/// - a `u32` counter (`fetch_add`) in the lower half of an 8-byte word whose upper half rank 0 writes
///   plainly at the same time: neither loses the other's bytes;
/// - an `i32` taken below zero (`fetch_sub`); maxima and minima compared as signed (`fetch_max` of values
///   of both signs on an `i32` that starts at `i32::MIN`, and of values from 0 up on an `i64` that starts
///   at `i64::MIN`, where an unsigned compare would keep the start; `fetch_min` of their negatives from
///   `i64::MAX`): each page's extreme exact;
/// - a `u32` counter incremented by `compare_exchange` loops, and one by `fetch_update` that refuses
///   past a cap (half the page's attempts): it ends at the cap, and the callers' successes, counted in
///   another word, add up to it;
/// - bits (`u64`): each thread sets bit `k % 64` of one word (`fetch_or`), clears it in another that starts
///   all ones (`fetch_and`), and flips it in a third once a round (`fetch_xor`); and it takes a word of
///   its own through a sequence of `fetch_nand`s, each of whose results it checks against its own model;
/// - a `u32` flag stored and loaded (`store`, `load`) under a lock: the next holder loads what the last
///   stored.
fn widths(c: &Check) -> anyhow::Result<()> {
    const WORDS32: usize = 2 * WORDS_PER_PAGE;
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let (threads, rounds) = (args.threads.max(1), args.rounds);
    let (all, total) = (n * threads, n * threads * rounds);
    if total == 0 {
        return Ok(());
    }
    // Thread k's operands in round i go to page (i + k) mod pages; the i32 maximum's are centred on 0.
    let half = (total / 2) as i64;
    // Page p of each vector is homed at rank p mod n.
    let pages = n.max(2);
    let small = dsm.alloc_vec_in::<u32>(pages * WORDS32, dsm::Placement::Cyclic, model)?;
    let signed32 = dsm.alloc_vec_in::<i32>(pages * WORDS32, dsm::Placement::Cyclic, model)?;
    let signed64 =
        dsm.alloc_vec_in::<i64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    let bits = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    // One word of each kind on every page; the u32 counter at word 0 beside rank 0's plain word 1.
    let (or_at, and_at, xor_at) = (0, 1, 2);
    // Thread k's own word for `fetch_nand`, on page k mod pages.
    let nand_at = |k: usize| (k % pages) * WORDS_PER_PAGE + 16 + k / pages;
    ensure!(
        16 + all.div_ceil(pages) <= WORDS_PER_PAGE,
        "atomics: --threads {threads} is too many for one word per thread on a page"
    );
    let (max_at, min_at, max32_at, cas_at, update_at, successes_at) = (0, 1, 5, 9, 11, 13);
    // `fetch_nand` operands are this pattern rotated.
    const NAND_OPERAND: u64 = 0x0123_4567_89ab_cdef;
    // The page's attempts of thread k's `fetch_update`, and the cap it stops at.
    let attempts = |p: usize| (0..all).filter(|k| k % pages == p).count() * rounds;
    let cap = |p: usize| (attempts(p) / 2) as u32;
    if me == 0 {
        for p in 0..pages {
            bits.set(p * WORDS_PER_PAGE + and_at, u64::MAX);
            signed64.set(p * WORDS_PER_PAGE + max_at, i64::MIN);
            signed64.set(p * WORDS_PER_PAGE + min_at, i64::MAX);
            signed32.set(p * WORDS32 + max32_at, i32::MIN);
        }
    }
    dsm.barrier()?;
    let flag_at = 7;
    on_threads(threads, |t| {
        let k = me * threads + t;
        let bit = 1u64 << (k % 64);
        let mut successes = 0u32;
        // Thread k's own word, as its `fetch_nand`s have left it (it starts at 0).
        let mut nand = 0u64;
        for i in 0..rounds {
            let p = (i + k) % pages;
            small.fetch_add(p * WORDS32, 1)?;
            if me == 0 && t == 0 {
                small.set(p * WORDS32 + 1, i as u32);
            }
            signed32.fetch_sub(p * WORDS32 + 3, 1)?;
            let value = (k * rounds + i) as i64;
            signed64.fetch_max(p * WORDS_PER_PAGE + max_at, value)?;
            signed64.fetch_min(p * WORDS_PER_PAGE + min_at, -value)?;
            signed32.fetch_max(p * WORDS32 + max32_at, (value - half) as i32)?;
            let cas = (k % pages) * WORDS32 + cas_at;
            loop {
                let v = small.load(cas)?;
                if small.compare_exchange(cas, v, v + 1)?.is_ok() {
                    break;
                }
            }
            let (update, cap) = ((k % pages) * WORDS32 + update_at, cap(k % pages));
            match small.fetch_update(update, |v| (v < cap).then_some(v + 1))? {
                Ok(previous) => {
                    ensure!(
                        previous < cap,
                        "rank {me}: fetch_update stored over {previous}, cap {cap}"
                    );
                    successes += 1;
                }
                Err(refused) => ensure!(
                    refused >= cap,
                    "rank {me}: fetch_update refused {refused}, under the cap {cap}"
                ),
            }
            let b = (k % pages) * WORDS_PER_PAGE;
            bits.fetch_or(b + or_at, bit)?;
            bits.fetch_and(b + and_at, !bit)?;
            bits.fetch_xor(b + xor_at, bit)?;
            let operand = NAND_OPERAND.rotate_left((k + 7 * i) as u32 % 64);
            let old = bits.fetch_nand(nand_at(k), operand)?;
            ensure!(
                old == nand,
                "rank {me}: fetch_nand on thread {k}'s own word returned {old:#x}, expected {nand:#x}"
            );
            nand = !(nand & operand);
            let guard = dsm.lock(8)?;
            let was = small.load(flag_at)?;
            ensure!(
                was == small.get(flag_at),
                "rank {me}: under the lock the flag loads {was} but reads {}",
                small.get(flag_at)
            );
            small.store(flag_at, was + 1)?;
            guard.unlock()?;
        }
        small.fetch_add((k % pages) * WORDS32 + successes_at, successes)?;
        Ok(())
    })?;
    dsm.barrier()?;
    // The operands page p got: thread k's in round i, numbered k * rounds + i.
    let values = |p: usize| {
        (0..all).flat_map(move |k| {
            (0..rounds)
                .filter(move |i| (i + k) % pages == p)
                .map(move |i| (k * rounds + i) as i64)
        })
    };
    for p in 0..pages {
        let mine = values(p).count();
        let counter = small.load(p * WORDS32)?;
        ensure!(
            counter as usize == mine && small.get(p * WORDS32) == counter,
            "rank {me}: page {p}'s u32 counter {counter} (read {}), expected {mine}",
            small.get(p * WORDS32)
        );
        let plain = small.get(p * WORDS32 + 1);
        let last = (0..rounds).rev().find(|i| i % pages == p);
        ensure!(
            last.is_none_or(|i| plain == i as u32),
            "rank {me}: page {p}'s plain word beside the counter reads {plain}, rank 0 wrote {last:?} last"
        );
        let below = signed32.get(p * WORDS32 + 3);
        ensure!(
            below == -(mine as i32) && signed32.load(p * WORDS32 + 3)? == below,
            "rank {me}: page {p}'s i32 reads {below}, expected -{mine}"
        );
        let top = values(p).max();
        let got = (
            signed64.get(p * WORDS_PER_PAGE + max_at),
            signed64.get(p * WORDS_PER_PAGE + min_at),
            signed32.get(p * WORDS32 + max32_at),
        );
        let want = match top {
            Some(top) => (top, -top, (top - half) as i32),
            None => (i64::MIN, i64::MAX, i32::MIN),
        };
        ensure!(
            got == want,
            "rank {me}: page {p}'s i64 maximum, i64 minimum and i32 maximum are {got:?}, expected {want:?}"
        );
        let (updated, succeeded) = (
            small.get(p * WORDS32 + update_at),
            small.get(p * WORDS32 + successes_at),
        );
        let want = cap(p);
        ensure!(
            (updated, succeeded) == (want, want),
            "rank {me}: page {p}'s capped counter {updated} after {succeeded} successful \
             fetch_updates, expected {want} and {want}"
        );
        let cas = small.get(p * WORDS32 + cas_at) as usize;
        let want = (0..all).filter(|k| k % pages == p).count() * rounds;
        ensure!(
            cas == want,
            "rank {me}: page {p}'s counter of compare_exchange loops {cas}, expected {want}"
        );
    }
    for p in 0..pages {
        let b = p * WORDS_PER_PAGE;
        let (mut or, mut xor) = (0u64, 0u64);
        for k in (0..all).filter(|k| k % pages == p) {
            or |= 1 << (k % 64);
            if rounds % 2 == 1 {
                xor ^= 1 << (k % 64);
            }
        }
        let got = (
            bits.get(b + or_at),
            bits.get(b + and_at),
            bits.get(b + xor_at),
        );
        ensure!(
            got == (or, !or, xor),
            "rank {me}: page {p}'s bit words {got:x?}, expected {:x?}",
            (or, !or, xor)
        );
    }
    let flag = small.get(flag_at);
    ensure!(
        flag as usize == total,
        "rank {me}: flag {flag}, expected {total}"
    );
    Ok(())
}
