//! Checks of what ranks see in shared memory under either model: litmus tests, merged writes, exact
//! counters behind locks, locks under contention, and what a waiting rank costs.

use crate::*;

/// With --threads T, T threads of each rank take the locks at once, and the first also calls a
/// barrier every 10 rounds while the others go on: releases, acquires and barriers of one rank
/// run concurrently.
pub(crate) fn counter(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let counters = dsm.alloc_vec_in::<u64>(4 * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    let threads = args.threads.max(1);
    on_threads(threads, |t| {
        for i in 0..args.rounds {
            let k = (i + me + t) % 4;
            let guard = dsm.lock(k as u64)?;
            let at = k * WORDS_PER_PAGE;
            counters.set(at, counters.get(at) + 1);
            guard.unlock()?;
            if t == 0 && threads > 1 && i % 10 == 0 {
                dsm.barrier()?;
            }
        }
        Ok(())
    })?;
    dsm.barrier()?;
    let total: u64 = (0..4).map(|k| counters.get(k * WORDS_PER_PAGE)).sum();
    let expected = (args.rounds * n * threads) as u64;
    ensure!(
        total == expected,
        "rank {me}: total {total}, expected {expected}"
    );
    println!("counter ok: {total}");
    Ok(())
}

/// Rank 0 writes data then flag; every other rank waits for the flag and checks the data.
pub(crate) fn mp(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, args, .. } = *c;
    let v = dsm.alloc_vec::<u64>(2 * WORDS_PER_PAGE)?;
    let (data, flag) = (0, WORDS_PER_PAGE);
    for round in 1..=args.rounds as u64 {
        if me == 0 {
            v.set(data, round);
            v.set(flag, round);
        } else {
            while v.get(flag) < round {
                std::hint::spin_loop();
            }
            let d = v.get(data);
            ensure!(
                d >= round,
                "rank {me}: saw flag {round} but data {d}: message passing broken"
            );
        }
        dsm.barrier()?;
    }
    println!("mp ok: {} rounds", args.rounds);
    Ok(())
}

/// Ranks 0 and 1: x = 1; r0 = y  ||  y = 1; r1 = x. Forbidden: r0 == 0 and r1 == 0.
pub(crate) fn sb(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, args, .. } = *c;
    let v = dsm.alloc_vec::<u64>(4 * WORDS_PER_PAGE)?;
    let (x, y, r0, r1) = (0, WORDS_PER_PAGE, 2 * WORDS_PER_PAGE, 3 * WORDS_PER_PAGE);
    // How often each allowed outcome came: r0 = r1 = 1 shows rounds where the two ranks' writes
    // both came before their reads, the rounds that could show the forbidden one.
    let mut seen = std::collections::BTreeMap::<(u64, u64), u32>::new();
    for round in 0..args.rounds {
        // Every other round each rank resets (and so holds) the word it writes next: both writes
        // are then local and both reads fault, which makes the writes overlap most of the time.
        // In the others rank 0 holds both, and the rank that writes first mostly reads first.
        match (me, round % 2) {
            (0, 0) => {
                v.set(x, 0);
                v.set(y, 0);
            }
            (0, _) => v.set(x, 0),
            (1, 1) => v.set(y, 0),
            _ => {}
        }
        dsm.barrier()?;
        match me {
            0 => {
                v.set(x, 1);
                v.set(r0, v.get(y));
            }
            1 => {
                v.set(y, 1);
                v.set(r1, v.get(x));
            }
            _ => {}
        }
        dsm.barrier()?;
        let (a, b) = (v.get(r0), v.get(r1));
        ensure!(
            !(a == 0 && b == 0),
            "rank {me}: store buffering showed r0 = r1 = 0"
        );
        *seen.entry((a, b)).or_default() += 1;
        dsm.barrier()?;
    }
    println!("sb ok: {} rounds, (r0, r1) seen {seen:?}", args.rounds);
    Ok(())
}

pub(crate) fn pages(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let pages = 3;
    let v = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    for round in 1..=args.rounds as u64 {
        for p in 0..pages {
            v.set(p * WORDS_PER_PAGE + me, round * 100 + me as u64);
        }
        dsm.barrier()?;
        for p in 0..pages {
            for r in 0..n {
                let got = v.get(p * WORDS_PER_PAGE + r);
                ensure!(
                    got == round * 100 + r as u64,
                    "rank {me}: page {p} word {r} is {got} in round {round}"
                );
            }
        }
        dsm.barrier()?;
    }
    println!("pages ok: {} rounds", args.rounds);
    Ok(())
}

/// Every round each byte of three pages belongs to one rank (by a hash), which may write it; after
/// each barrier every rank checks every byte against the model all ranks compute alike. Ranks
/// write disjoint bytes of the same pages and words: release consistency must merge them exactly.
pub(crate) fn bytes(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let pages = 3;
    let size = pages * dsm::PAGE_SIZE;
    let v = dsm.alloc_vec_in::<u8>(size, dsm::Placement::Cyclic, model)?;
    let mut expected = vec![0u8; size];
    for round in 0..args.rounds as u64 {
        for (i, e) in expected.iter_mut().enumerate() {
            let h = mix(&[round, i as u64]);
            if h.is_multiple_of(3) {
                let value = (h >> 8) as u8;
                if (h >> 16) as usize % n == me {
                    v.set(i, value);
                }
                *e = value;
            }
        }
        dsm.barrier()?;
        for (i, e) in expected.iter().enumerate() {
            let got = v.get(i);
            ensure!(
                got == *e,
                "rank {me}, round {round}: byte {i} is {got}, expected {e}"
            );
        }
        dsm.barrier()?;
    }
    drop(v);
    println!("bytes ok: {} rounds", args.rounds);
    Ok(())
}

/// Release consistency: every rank writes its own word of pages homed at rank 0, which writes its
/// word late (after a delay that sweeps from nothing to half a millisecond over the rounds), so
/// that the others' diffs reach rank 0 before, while and after it writes. However the writes
/// interleave, after the barrier every rank must see every word: the home's own writes are in
/// its write notice even when a diff made the page writable before the home touched it.
pub(crate) fn latehome(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let pages = 4;
    let v = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        model,
    )?;
    for round in 1..=args.rounds as u64 {
        if me == 0 {
            let delay = std::time::Duration::from_micros(round % 64 * 8);
            let t = std::time::Instant::now();
            while t.elapsed() < delay {
                std::hint::spin_loop();
            }
        }
        for p in 0..pages {
            v.set(p * WORDS_PER_PAGE + me, mix(&[round, me as u64, p as u64]));
        }
        dsm.barrier()?;
        for p in 0..pages {
            for r in 0..n {
                let got = v.get(p * WORDS_PER_PAGE + r);
                ensure!(
                    got == mix(&[round, r as u64, p as u64]),
                    "rank {me}: page {p} word {r} is stale in round {round}"
                );
            }
        }
        dsm.barrier()?;
    }
    drop(v);
    println!("latehome ok: {} rounds", args.rounds);
    Ok(())
}

/// Message passing through a lock: rank 0 writes data then a flag under the lock; the others take
/// the lock until they see the flag, and then must see the data.
pub(crate) fn mplock(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        model,
        args,
        ..
    } = *c;
    let v = dsm.alloc_vec_in::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    let (data, flag) = (0, WORDS_PER_PAGE);
    for round in 1..=args.rounds as u64 {
        if me == 0 {
            let _g = dsm.lock(7)?;
            v.set(data, round * 10);
            v.set(flag, round);
        } else {
            loop {
                let _g = dsm.lock(7)?;
                let f = v.get(flag);
                if f >= round {
                    let d = v.get(data);
                    ensure!(d >= round * 10, "rank {me}: saw flag {f} but data {d}");
                    break;
                }
            }
        }
        dsm.barrier()?;
    }
    drop(v);
    println!("mplock ok: {} rounds", args.rounds);
    Ok(())
}

/// Counter k behind lock k, for 8192 of them: every home has more locks than the servers it
/// keeps (`KEPT_LOCKS` in dsm's engine), so idle ones are let go of and made again as the
/// rounds come back to them.
pub(crate) fn manylocks(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    let locks = 8192;
    let counters = dsm.alloc_vec_in::<u64>(locks, dsm::Placement::Cyclic, model)?;
    dsm.barrier()?;
    let pick = |rank: usize, i: usize| (i * 7 + rank * 3) % locks;
    for i in 0..args.rounds {
        let k = pick(me, i);
        let guard = dsm.lock(k as u64)?;
        counters.set(k, counters.get(k) + 1);
        guard.unlock()?;
    }
    dsm.barrier()?;
    let mut want = vec![0u64; locks];
    for rank in 0..n {
        for i in 0..args.rounds {
            want[pick(rank, i)] += 1;
        }
    }
    for (k, w) in want.iter().enumerate() {
        let got = counters.get(k);
        ensure!(got == *w, "rank {me}: counter {k} is {got}, expected {w}");
    }
    let gone = dsm.stats().locks_let_go;
    ensure!(
        locks / n <= 2048 || args.rounds < locks || gone > 0,
        "rank {me} is the home of {} locks and let none go",
        locks / n
    );
    println!("manylocks ok: {} rounds", args.rounds);
    Ok(())
}

/// Threads of rank 0 wait for a lock while the thread that holds it faults on remote pages: the
/// waiting threads must not take every channel, or the fault could never be resolved.
pub(crate) fn lockfault(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    let data = dsm.alloc_vec_with::<u64>(64 * WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(1)))?;
    if me == 1 {
        for p in 0..64 {
            data.set(p * WORDS_PER_PAGE, p as u64 + 1);
        }
    }
    dsm.barrier()?;
    if me == 0 {
        let guard = dsm.lock(9)?;
        std::thread::scope(|s| -> anyhow::Result<()> {
            let waiters: Vec<_> = (0..3).map(|_| s.spawn(|| dsm.lock(9).map(drop))).collect();
            std::thread::sleep(std::time::Duration::from_millis(100));
            for p in 0..64 {
                ensure!(
                    data.get(p * WORDS_PER_PAGE) == p as u64 + 1,
                    "page {p} read wrong"
                );
            }
            drop(guard);
            for w in waiters {
                w.join().expect("a waiter panicked")?;
            }
            Ok(())
        })?;
    }
    dsm.barrier()?;
    drop(data);
    println!("lockfault ok");
    Ok(())
}

/// Run with two channels a rank. On each rank at once: a thread waits for a lock (holding one
/// channel), a thread writes the other rank's page (taking the other channel, and waiting at
/// that page's home), and a thread writes this rank's own page, of which the other rank holds
/// a copy: a transaction that needs a channel to drop that copy, and finds none free in some
/// rounds (about one in six on a 2-core machine). If it waited for one with the page's
/// manager lock held, and both ranks did so before the other's remote write reached them,
/// each remote write would wait at the other's home for that lock, the lock for a channel,
/// the channel for the remote write: for ever. (That timing was not reproduced here; the
/// rounds check what the writes leave.)
pub(crate) fn grantwait(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    anyhow::ensure!(n == 2, "grantwait runs at 2 ranks");
    let pages = dsm.alloc_vec_with::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::Cyclic)?;
    let (own, other) = (me * WORDS_PER_PAGE, (1 - me) * WORDS_PER_PAGE);
    for round in 1..=args.rounds as u64 {
        // Each rank holds a copy of the other's page.
        ensure!(
            pages.get(other) == round - 1,
            "rank {me}, round {round}: the other page holds {}",
            pages.get(other)
        );
        dsm.barrier()?;
        let guard = dsm.lock(100 + me as u64)?;
        std::thread::scope(|s| -> anyhow::Result<()> {
            let waiter = s.spawn(|| dsm.lock(100 + me as u64).map(drop));
            std::thread::sleep(std::time::Duration::from_millis(2));
            // The remote write starts first, and this rank's own write right after it, while
            // the remote one holds the other channel and its request is still on its way. Both
            // ranks start at the same moment of the machine's clock, so that each own write
            // takes its page's manager lock before the other rank's request for the page comes.
            fn now() -> u128 {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            }
            fn wait_until(nanos: u128) {
                while now() < nanos {
                    std::hint::spin_loop();
                }
            }
            let tick = 4_000_000;
            let start = (now() / tick + 2) * tick;
            let pages = &pages;
            let remote = s.spawn(move || {
                wait_until(start);
                pages.set(other + 1, round)
            });
            wait_until(start + 10_000);
            pages.set(own, round);
            remote.join().expect("the remote write panicked");
            drop(guard);
            waiter.join().expect("the lock waiter panicked")?;
            Ok(())
        })?;
        dsm.barrier()?;
        for (page, at) in [(me, own), (1 - me, other)] {
            ensure!(
                pages.get(at) == round && pages.get(at + 1) == round,
                "rank {me}, round {round}: page {page} holds {} and {}",
                pages.get(at),
                pages.get(at + 1)
            );
        }
        dsm.barrier()?;
    }
    drop(pages);
    println!("grantwait ok");
    Ok(())
}

/// Rank 0 computes for `rounds` milliseconds while the others wait at a barrier; every rank
/// reports the CPU time it used, so that a waiting rank's cost (polling, progress) shows.
pub(crate) fn idle(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, args, .. } = *c;
    let cpu0 = cpu_seconds();
    let t0 = std::time::Instant::now();
    if me == 0 {
        let mut x = 0u64;
        while t0.elapsed() < std::time::Duration::from_millis(args.rounds as u64) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
    }
    dsm.barrier()?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "idle: rank {me} used {cpu:.3} s of CPU in {wall:.3} s ({:.1}%)",
        100.0 * cpu / wall
    );
    Ok(())
}

pub(crate) fn lockedcopy(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    ensure!(n == 2, "lockedcopy needs 2 ranks");
    // Rank 0 locks its memory, now and to come, between the two allocations: `early`'s mapping (16
    // MiB) is locked by the call, `late`'s (64 MiB) as it is made. Every page is homed at rank 1.
    let alloc = |words| dsm.alloc_vec_in::<u64>(words, dsm::Placement::At(dsm::Rank(1)), model);
    // A line of /proc/self/status, in KiB.
    let status_kib = |field: &str| -> anyhow::Result<u64> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .with_context(|| format!("no {field} in /proc/self/status"))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    };
    let early = alloc(4096 * WORDS_PER_PAGE)?;
    if me == 0 {
        use nix::sys::mman::{mlockall, MlockAllFlags};
        mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE)
            .context("mlockall (run the check as root)")?;
    }
    let (locked, before) = (status_kib("VmLck:")?, status_kib("VmRSS:")?);
    let late = alloc(16384 * WORDS_PER_PAGE)?;
    if me == 0 {
        ensure!(locked > 0, "mlockall locked nothing");
        // Its metadata takes a few hundred KiB; its pages (and, under release consistency, its
        // twins) nothing until used.
        let grew = status_kib("VmRSS:")?.saturating_sub(before);
        ensure!(
            grew < 8 << 10,
            "allocating a region of 64 MiB took {grew} KiB more of memory"
        );
    }
    for value in 1..=args.rounds as u64 {
        if me == 1 {
            early.set(0, value);
            late.set(0, value);
        }
        // Under sequential consistency rank 1's writes took rank 0's copies away; under release
        // consistency the barrier updates them or drops them, and a selective acquire drops them.
        dsm.barrier()?;
        if me == 0 {
            for (name, v) in [("early", &early), ("late", &late)] {
                ensure!(
                    v.get(0) == value,
                    "rank 0 reads {} in {name}'s page, not {value}",
                    v.get(0)
                );
                if model == dsm::Consistency::Release {
                    v.acquire_range(0..1)?;
                    ensure!(
                        v.get(0) == value,
                        "rank 0 fetched {} in {name}'s page, not {value}",
                        v.get(0)
                    );
                }
            }
        }
        dsm.barrier()?;
    }
    if model == dsm::Consistency::Release && me == 0 {
        // `early`'s copies are all here (locking its mapping filled it in, fetching every page).
        // Their twins (16 MiB) go back at the release (DSM_TWIN_MEMORY=0), though the array that
        // holds them was locked.
        let before = status_kib("VmRSS:")?;
        for p in 0..4096 {
            early.set(p * WORDS_PER_PAGE + 1, 1);
        }
        let guard = dsm.lock(0)?;
        guard.unlock()?;
        let grew = status_kib("VmRSS:")?.saturating_sub(before);
        ensure!(
            grew < 8 << 10,
            "writing 16 MiB of pages took {grew} KiB more of memory once released"
        );
    }
    dsm.barrier()?;
    println!("lockedcopy ok: {}", args.rounds);
    Ok(())
}
