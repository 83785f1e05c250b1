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
///   (under release consistency, through the write notice of the release that follows it).
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
    println!("atomics ok: {total} per counter, {total} tickets, chain {total}");
    Ok(())
}
