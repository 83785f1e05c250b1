//! Checks particular to release consistency: homes that write their own pages, batched flushes at an
//! acquire, diffs carried by barrier arrivals, selective release and acquire.

use crate::*;

pub(crate) fn homediffs(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    ensure!(n == 2, "homediffs needs 2 ranks");
    let pages = 8;
    let v = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        dsm::Consistency::Release,
    )?;
    // Rank 1 writes word 1 of every page, rank 0 word 0 of the last one, in turns under lock 1; each
    // checks the other's latest words. Rank 0 applies rank 1's diffs as their home.
    let last = (pages - 1) * WORDS_PER_PAGE;
    dsm.barrier()?;
    let before = dsm.stats().acquire_invalidations;
    let mut turn = 0u64;
    let mut turns_here = 0u64;
    let mut waiting_since = std::time::Instant::now();
    while turn < 2 * args.rounds as u64 {
        let _g = dsm.lock(1)?;
        let (r1_turns, r0_turns) = (v.get(1), v.get(last));
        let seen = r1_turns + r0_turns;
        if seen != turn {
            waiting_since = std::time::Instant::now();
        }
        // The other rank's turn never seen to end: a stale read of its count, which no later
        // acquire corrects.
        ensure!(
            waiting_since.elapsed() < std::time::Duration::from_secs(20),
            "rank {me} waited 20 s for the other's turn {turn} to end"
        );
        turn = seen;
        // Rank 1 goes on even turns, rank 0 on odd ones.
        if turn as usize % 2 != 1 - me || turn >= 2 * args.rounds as u64 {
            continue;
        }
        if me == 1 {
            ensure!(
                r1_turns == r0_turns,
                "turn {turn}: rank 1 saw rank 0's count {r0_turns} stale"
            );
            for p in 0..pages {
                v.set(p * WORDS_PER_PAGE + 1, r1_turns + 1);
            }
        } else {
            for p in 0..pages {
                ensure!(
                    v.get(p * WORDS_PER_PAGE + 1) == r1_turns,
                    "turn {turn}: rank 0 sees page {p} stale"
                );
            }
            v.set(last, r0_turns + 1);
        }
        turns_here += 1;
        turn += 1;
    }
    let dropped = dsm.stats().acquire_invalidations - before;
    if me == 1 {
        // Only the page rank 0 wrote, once per turn of rank 0's (the first turn has none before it).
        ensure!(
            dropped <= turns_here,
            "rank 1 dropped {dropped} pages at {turns_here} acquires: pages only its own diffs wrote were announced by their home"
        );
    }
    dsm.barrier()?;
    drop(v);
    println!("homediffs ok: {} rounds", args.rounds);
    Ok(())
}

pub(crate) fn revertedhome(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    ensure!(n == 3, "revertedhome needs 3 ranks");
    // One page homed at rank 0: word 0 is rank 0's, word 1 rank 1's, and word 2 is what rank 2
    // reads to fetch the page.
    let v = dsm.alloc_vec_in::<u64>(
        WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        dsm::Consistency::Release,
    )?;
    // The ranks take turns through flags of sequential consistency (coherent, and neither an
    // acquire nor a release of `v`), each on a page of its own.
    // (A barrier would do for none of them: it would tell rank 2 of rank 1's notice, which names
    // the page, and rank 2 would drop its copy for it.)
    let flags = dsm.alloc_vec_in::<u64>(
        4 * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        dsm::Consistency::Sequential,
    )?;
    let [diffed, wrote, fetched, unlocked] = [0, 1, 2, 3].map(|k| k * WORDS_PER_PAGE);
    let wait_for = |at: usize, what: &str| -> anyhow::Result<()> {
        let t = std::time::Instant::now();
        while flags.get(at) == 0 {
            ensure!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "rank {me} waited 20 s for {what}"
            );
            std::thread::yield_now();
        }
        Ok(())
    };
    dsm.barrier()?;
    match me {
        1 => {
            // Fetched first, so that the home's copy is write-protected when the diff comes:
            // the home then twins it, to tell its own writes from the diff's.
            ensure!(v.get(1) == 0, "rank 1 read a word no one wrote");
            {
                let _g = dsm.lock(7)?;
                v.set(1, 5);
            }
            flags.set(diffed, 1);
        }
        0 => {
            wait_for(diffed, "rank 1's diff")?;
            {
                let _g = dsm.lock(1)?;
                v.set(0, 1);
                flags.set(wrote, 1);
                wait_for(fetched, "rank 2's fetch")?;
                // Back to the bytes the page had when the diff came.
                v.set(0, 0);
            }
            flags.set(unlocked, 1);
        }
        _ => {
            wait_for(wrote, "rank 0's write")?;
            ensure!(v.get(2) == 0, "rank 2 read a word no one wrote");
            flags.set(fetched, 1);
            wait_for(unlocked, "rank 0's release")?;
            let _g = dsm.lock(1)?;
            let x = v.get(0);
            ensure!(
                x == 0,
                "rank 2 read {x} under the lock rank 0 let go after writing 0: its copy, fetched while rank 0's 1 was in place, was not dropped"
            );
        }
    }
    dsm.barrier()?;
    drop((v, flags));
    println!("revertedhome ok");
    Ok(())
}

pub(crate) fn flushbatch(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    ensure!(n == 2, "flushbatch needs 2 ranks");
    let pages = 32;
    let v = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        dsm::Consistency::Release,
    )?;
    for round in 1..=args.rounds as u64 {
        // Rank 0 holds lock 1 from before the barrier, so rank 1 takes it after rank 0's writes.
        let held = if me == 0 { Some(dsm.lock(1)?) } else { None };
        if me == 1 {
            // Copies here, so that rank 0's writes are recorded and announced.
            for p in 0..pages {
                ensure!(
                    v.get(p * WORDS_PER_PAGE) == round - 1,
                    "round {round}: page {p} stale"
                );
            }
        }
        dsm.barrier()?;
        if me == 1 {
            for p in 0..pages {
                v.set(p * WORDS_PER_PAGE + 1, round);
            }
            let sent = dsm.stats().messages_sent;
            let g = dsm.lock(1)?;
            let messages = dsm.stats().messages_sent - sent;
            // The lock request, the grant (lock 1 is homed here), and one batch of diffs.
            ensure!(
                messages < 8,
                "round {round}: taking the lock sent {messages} messages: the {pages} pages' diffs went one at a time"
            );
            for p in 0..pages {
                let (theirs, mine) = (v.get(p * WORDS_PER_PAGE), v.get(p * WORDS_PER_PAGE + 1));
                ensure!(
                    (theirs, mine) == (round, round),
                    "round {round}: page {p} holds {theirs}, {mine} after the acquire"
                );
            }
            drop(g);
        } else {
            for p in 0..pages {
                v.set(p * WORDS_PER_PAGE, round);
            }
            drop(held);
        }
        dsm.barrier()?;
        for p in 0..pages {
            let mine = v.get(p * WORDS_PER_PAGE + 1);
            ensure!(
                mine == round,
                "round {round}: rank {me} sees page {p}'s word 1 at {mine}"
            );
        }
    }
    let flushed = dsm.stats().acquire_invalidations;
    ensure!(
        me == 0 || flushed >= args.rounds as u64 * pages as u64,
        "rank 1 dropped only {flushed} pages at its acquires"
    );
    drop(v);
    println!("flushbatch ok: {} rounds", args.rounds);
    Ok(())
}

pub(crate) fn selective(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    ensure!(n >= 3, "selective needs 3 ranks or more");
    let release = dsm::Consistency::Release;
    let (pages, released) = (4, 3);
    // Rank 1 writes both: `far`'s writes go to rank 2 as diffs, `own`'s stay in place at rank 1.
    let far = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(2)),
        release,
    )?;
    let own = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(1)),
        release,
    )?;
    // Rank 1 says it has released through a region of sequential consistency: every access to it
    // is coherent, and none is an acquire or a release of the others.
    let flag = dsm.alloc_vec_in::<u64>(
        1,
        dsm::Placement::At(dsm::Rank(0)),
        dsm::Consistency::Sequential,
    )?;
    let value = |round: u64, p: usize, word: u64| {
        if round == 0 {
            0
        } else {
            mix(&[round, p as u64, word])
        }
    };
    let first_words = |v: &dsm::GlobalVec<'_, u64>, ps: std::ops::Range<usize>| {
        ps.map(|p| v.get(p * WORDS_PER_PAGE)).collect::<Vec<_>>()
    };
    let expect =
        |round: u64, ps: std::ops::Range<usize>| ps.map(|p| value(round, p, 0)).collect::<Vec<_>>();
    for round in 1..=args.rounds as u64 {
        if me == 0 {
            // Copies of every page, as they were at the last barrier.
            for v in [&far, &own] {
                ensure!(
                    first_words(v, 0..pages) == expect(round - 1, 0..pages),
                    "round {round}: rank 0 started from stale pages"
                );
            }
        }
        dsm.barrier()?;
        if me == 1 {
            for v in [&far, &own] {
                for p in 0..pages {
                    v.set(p * WORDS_PER_PAGE, value(round, p, 0));
                }
                v.release_range(0..released * WORDS_PER_PAGE)?;
            }
            flag.set(0, round);
            // Written again after the selective release, in the same interval: the barrier's
            // release sends it.
            far.set(1, value(round, 0, 1));
        } else if me == 0 {
            let t = std::time::Instant::now();
            while flag.get(0) != round {
                ensure!(
                    t.elapsed() < std::time::Duration::from_secs(20),
                    "round {round}: rank 1 did not raise the flag"
                );
                std::thread::yield_now();
            }
            // `own`'s copies here are the old ones until acquired: nothing announced its pages
            // since rank 0 fetched them. (`far`'s are not looked at before the acquire: whether
            // its home's notices name them is not what this check is about.)
            ensure!(
                first_words(&own, 0..pages) == expect(round - 1, 0..pages),
                "round {round}: old copies changed before an acquire"
            );
            for (name, v) in [("far", &far), ("own", &own)] {
                v.acquire_range(0..released * WORDS_PER_PAGE)?;
                ensure!(
                    first_words(v, 0..released) == expect(round, 0..released),
                    "round {round}: {name}'s released pages are stale after the selective acquire"
                );
            }
            // Only the range was dropped: the page past it keeps its old copy.
            ensure!(
                first_words(&own, released..pages) == expect(round - 1, released..pages),
                "round {round}: a page outside the range was dropped"
            );
        }
        dsm.barrier()?;
        for v in [&far, &own] {
            ensure!(
                first_words(v, 0..pages) == expect(round, 0..pages),
                "round {round}: rank {me} sees stale pages after the barrier"
            );
        }
        ensure!(
            far.get(1) == value(round, 0, 1),
            "round {round}: rank {me} lost the write made after the selective release"
        );
    }
    let stats = dsm.stats();
    if me == 0 {
        ensure!(stats.selective_acquires == 2 * args.rounds as u64);
    }
    if me == 1 {
        ensure!(stats.selective_releases == 2 * args.rounds as u64);
    }
    drop((far, own, flag));
    println!("selective ok: {} rounds", args.rounds);
    Ok(())
}

/// Rank 1's first thread writes a word of a page homed at rank 0 and says so in its rank's own
/// memory (an atomic), then arrives at a barrier, whose arrival carries the word's diff to rank
/// 0. Rank 1's second thread meanwhile takes a lock, copies what the first said into shared
/// memory and lets the lock go; the other ranks' second threads take the same lock and must
/// find the word at least as new as the copy. A release passes on what another thread of its
/// rank wrote before, even while that thread's barrier arrival is still carrying it. Rank 0
/// also writes another word of the page under the lock, so that rank 1's second thread drops
/// its copy when it takes the lock, and must find its own rank's write in the copy it fetches
/// again. After each barrier every rank must see that round's word (a third rank that fetched
/// the page under the lock before rank 0 had the word would keep a stale copy).
pub(crate) fn carrylock(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    ensure!(n >= 2, "carrylock needs 2 ranks or more");
    // Page 0 is homed at rank 0, page 1 at rank 1.
    let v = dsm.alloc_vec_in::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::Block, model)?;
    let (word, mark, said) = (8, 16, WORDS_PER_PAGE);
    let published = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let looks = AtomicU64::new(0);
    on_threads(2, |t| {
        if t == 0 {
            let result = (1..=args.rounds as u64).try_for_each(|round| {
                if me == 1 {
                    v.set(word, round);
                    published.store(round, Ordering::Release);
                }
                dsm.barrier()?;
                let w = v.get(word);
                ensure!(
                    w >= round,
                    "rank {me}: after barrier {round} the word is {w}"
                );
                Ok(())
            });
            done.store(true, Ordering::Release);
            return result;
        }
        while !done.load(Ordering::Acquire) {
            let guard = dsm.lock(3)?;
            let look = looks.fetch_add(1, Ordering::Relaxed) + 1;
            if me == 1 {
                let p = published.load(Ordering::Acquire);
                let w = v.get(word);
                ensure!(w >= p, "rank 1: the word is {w}, and this rank wrote {p}");
                v.set(said, p);
            } else {
                let (s, w) = (v.get(said), v.get(word));
                ensure!(
                    w >= s,
                    "rank {me}: the word is {w}, and rank 1 said it wrote {s}"
                );
                if me == 0 {
                    v.set(mark, look);
                }
            }
            guard.unlock()?;
        }
        Ok(())
    })?;
    dsm.barrier()?;
    ensure!(
        v.get(word) == args.rounds as u64,
        "rank {me}: the word is {}",
        v.get(word)
    );
    println!(
        "carrylock ok: {} rounds, {} looks",
        args.rounds,
        looks.load(Ordering::Relaxed)
    );
    Ok(())
}
