//! Multi-process correctness checks, run by the tests under the launcher at 2, 3 and 4 ranks:
//! - `counter`: lock-protected counters spread over pages reach exact totals (`--threads T`: T threads per
//!   rank take the locks at once while one of them also calls barriers);
//! - `mp`: message passing (data then flag on different pages): a reader that sees the flag sees the data;
//! - `sb`: store buffering: both ranks reading the other's old value is forbidden under sequential consistency;
//! - `pages`: every rank writes its own words of the same pages; after a barrier everyone sees all writes;
//! - `latehome`: the same on pages homed at rank 0, which writes late, while the others' diffs arrive;
//! - `homediffs`: (release consistency, 2 ranks) rank 1 writes pages homed at rank 0 under a lock, and rank
//!   0 under the same lock writes one of them too: rank 1 sees rank 0's writes, and drops and fetches
//!   again only the page rank 0 wrote (a home's notice does not name pages only others' diffs wrote);
//! - `revertedhome`: (release consistency, 3 ranks) a page homed at rank 0 that rank 1's diff made writable
//!   there is written by rank 0 under a lock, fetched by rank 2 while that write is in place, and written
//!   back to its old bytes before the lock goes: rank 2, taking the lock next, must read the last bytes
//!   written, not the ones its copy caught (a home that compared the page with its twin at the release
//!   found them equal and did not announce it);
//! - `flushbatch`: (release consistency, 2 ranks) rank 1 writes its words of pages homed at rank 0 and,
//!   without a release in between, takes a lock that rank 0 let go after writing its own words of the same
//!   pages: rank 1's acquire sends its writes to those pages to their home in one batch (not one round trip
//!   a page) before it drops them, and both ranks see both writes;
//! - `carrylock`: (release consistency) one thread of rank 1 writes a page homed at rank 0 before each
//!   barrier (whose arrival carries the diff to rank 0) while another passes a lock on to the others:
//!   what they read under the lock includes the first thread's writes that the second had seen, and
//!   after each barrier every rank sees its write;
//! - `selective`: (3 ranks or more) rank 1 writes pages homed at rank 2 and at itself, releases some of
//!   them selectively and says so through a flag of sequential consistency; rank 0, which holds old copies,
//!   sees the new bytes of exactly those pages once it acquires them selectively, and the rest after a
//!   barrier;
//! - `readahead`: pages fetched ahead of a sequential reader (from one home, and a stride apart from every
//!   home of a cyclic region) behave as ordinary copies afterwards;
//! - `slices`: copies into and out of a region (`read_slice`, `write_slice`, `prefetch`) take each run of
//!   pages with one home in one fault, and copy the right values;
//! - `coalesce`: threads of one rank faulting on the same page at once make one fetch between them;
//! - `firsttouch`: a home filling its untouched pages with zeros ahead of a sequential first touch stops
//!   at pages other ranks have touched, whose data it must keep; so does a home handing a sequential
//!   remote writer untouched pages ahead;
//! - `manylocks`: counters each behind a lock of its own, more locks than a home keeps servers for, reach
//!   exact values (idle lock servers are let go of, and under release consistency what they knew is kept
//!   as a horizon);
//! - `lockfault`: threads waiting for a lock do not keep the lock's holder from resolving faults;
//! - `ownmpi`: (under mpirun) the program's own MPI messages, received with wildcards on `MPI_COMM_WORLD`
//!   beside the job's traffic, are exactly the program's, whichever transport carries the job;
//! - `die`: one rank kills itself mid-job; the others must end with an error instead of hanging;
//! - `panicbarrier`: rank 0 panics while the others wait at a barrier (which rank 0 serves) and return
//!   its error from `main`: they end as the failure's consequence (`EXIT_PEER_FAILED`), so that the
//!   launcher names rank 0;
//! - `stop`: one rank stops itself (SIGSTOP) mid-job, its connections open and silent; the others must end
//!   with an error naming it once the peer timeout (`DSM_PEER_TIMEOUT`) has passed;
//! - `freeze`: (as root, with a cgroup v2 hierarchy mounted) one rank freezes itself in a cgroup of its own
//!   mid-job: it runs on but answers nothing, and it is not stopped (SIGSTOP) either; the others end once
//!   the peer timeout has passed, and the launcher names it;
//! - `partition`: (in a network namespace of its own, as root) rank 0 takes the loopback interface down
//!   mid-job: connections stay open and sends succeed, but nothing arrives; every rank must end with an
//!   error once the peer timeout (`DSM_PEER_TIMEOUT`) has passed;
//! - `pause`: the whole job is stopped for twice the peer timeout (`DSM_PEER_TIMEOUT`, which must be set)
//!   while its ranks wait at a barrier, then resumed: no rank may take another for failed;
//! - `readerdies`: (under --keep-going, 3 ranks) a rank that read two pages dies; the home, then another
//!   rank, write them: neither waits for the dead reader nor fails for it;
//! - `ownerdies`: (under --keep-going, 3 ranks) a rank that wrote two pages, which the home and another
//!   rank then read, dies: the pages are read and written from the copies that live on;
//! - `diffhomedies`: (under --keep-going, 3 ranks) a release sends diffs to two homes, one of them dead: it
//!   fails naming the dead one, the live one applies its diff, and the releasing rank goes on;
//! - `releaseafterdeath`: (under --keep-going, 4 ranks) rank 1 holds a write to a page homed at rank 2 when
//!   rank 2 dies, so that every release of rank 1 fails from then on: its writes to rank 0's pages must
//!   still reach their home (a release goes on past a home that failed), and be announced once, not again
//!   at every release that fails after (rank 3, reading them under the lock, drops them only once);
//! - `lockedcopy`: (2 ranks) rank 0 locks its memory (`mlockall`, now and to come) between allocating two
//!   regions homed at rank 1, which writes their pages round after round: rank 0 must read each round's
//!   values, fetched (not a zero page the kernel filled in for the locked mapping) and dropped again when
//!   written (locked pages cannot be dropped until unlocked);
//! - `sentsigbus`: a SIGBUS sent to a rank (not a fault) kills it, as it would without dsm;
//! - `diewriting`: (under --keep-going) a rank dies while it and another write one page in turn; the other
//!   must finish or fail naming it, never hang.
#![forbid(unsafe_code)]

use anyhow::{ensure, Context};
use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Parser)]
struct Args {
    /// counter | mp | sb | pages | latehome | homediffs | revertedhome | flushbatch | carrylock | selective | bytes | mplock | manylocks | readahead | slices | coalesce | firsttouch | lockfault | grantwait | panicwaited |
    /// errorwaited | quitwaited | panicbarrier | servicefault | idle | ownmpi | die | stop | partition | freeze | pause | diewriting | readerdies | ownerdies | datalost | diffhomedies | releaseafterdeath | lockedcopy | sentsigbus
    check: String,
    /// Iterations or rounds.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Threads per rank (counter; readahead, coalesce: threads of rank 0 reading at once).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Memory model of the shared data: sequential or release (counter, pages, latehome, bytes, mplock,
    /// firsttouch, readahead, lockedcopy).
    #[arg(long, default_value = "sequential")]
    consistency: String,
}

/// A deterministic hash of small integers, so that every rank can compute what every other rank wrote.
fn mix(parts: &[u64]) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in parts {
        x ^= p.wrapping_add(0x632b_e59b_d9b4_e019);
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
    }
    x
}

const WORDS_PER_PAGE: usize = 512;

/// Runs `f(t)` for `t` in `0..threads`, each on a thread of its own, all at once; the first error wins.
fn on_threads(
    threads: usize,
    f: impl Fn(usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a thread of the check panicked"))
    })
}

/// Checks the first three words of each of the `pages` pages of `v`: words 0 and 1 as `want` gives them,
/// word 2 still zero (nothing filled over what was written).
fn check_words(
    v: &dsm::GlobalVec<'_, u64>,
    pages: usize,
    who: &str,
    want: impl Fn(usize) -> (u64, u64),
) -> anyhow::Result<()> {
    for p in 0..pages {
        let at = p * WORDS_PER_PAGE;
        let (w0, w1) = want(p);
        ensure!(v.get(at) == w0, "{who} page {p} lost word 0");
        ensure!(v.get(at + 1) == w1, "{who} page {p} lost word 1");
        ensure!(v.get(at + 2) == 0, "{who} page {p} is not zero");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = dsm_runtime::Runtime::init()?;
    if args.check == "servicefault" {
        // The service holds the region for as long as the process lives, and the process ends in it.
        return service_fault(Box::leak(Box::new(rt)));
    }
    let dsm = rt.dsm();
    let (me, n) = (rt.rank().0 as usize, rt.size());
    let model = match args.consistency.as_str() {
        "sequential" => dsm::Consistency::Sequential,
        "release" => dsm::Consistency::Release,
        other => anyhow::bail!("unknown consistency {other:?}: use sequential or release"),
    };
    match args.check.as_str() {
        "counter" => {
            // With --threads T, T threads of each rank take the locks at once, and the first also calls a
            // barrier every 10 rounds while the others go on: releases, acquires and barriers of one rank
            // run concurrently.
            let counters =
                dsm.alloc_vec_in::<u64>(4 * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
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
        }
        "mp" => {
            // Rank 0 writes data then flag; every other rank waits for the flag and checks the data.
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
        }
        "sb" => {
            // Ranks 0 and 1: x = 1; r0 = y  ||  y = 1; r1 = x. Forbidden: r0 == 0 and r1 == 0.
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
        }
        "pages" => {
            let pages = 3;
            let v =
                dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
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
        }
        "bytes" => {
            // Every round each byte of three pages belongs to one rank (by a hash), which may write it; after
            // each barrier every rank checks every byte against the model all ranks compute alike. Ranks
            // write disjoint bytes of the same pages and words: release consistency must merge them exactly.
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
        }
        "latehome" => {
            // Release consistency: every rank writes its own word of pages homed at rank 0, which writes its
            // word late (after a delay that sweeps from nothing to half a millisecond over the rounds), so
            // that the others' diffs reach rank 0 before, while and after it writes. However the writes
            // interleave, after the barrier every rank must see every word: the home's own writes are in
            // its write notice even when a diff made the page writable before the home touched it.
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
        }
        "lockedcopy" => {
            ensure!(n == 2, "lockedcopy needs 2 ranks");
            // Rank 0 locks its memory, now and to come, between the two allocations: `early`'s mapping (16
            // MiB) is locked by the call, `late`'s (64 MiB) as it is made. Every page is homed at rank 1.
            let alloc =
                |words| dsm.alloc_vec_in::<u64>(words, dsm::Placement::At(dsm::Rank(1)), model);
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
        }
        "homediffs" => {
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
        }
        "revertedhome" => {
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
        }
        "flushbatch" => {
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
                        let (theirs, mine) =
                            (v.get(p * WORDS_PER_PAGE), v.get(p * WORDS_PER_PAGE + 1));
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
        }
        "selective" => {
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
            let expect = |round: u64, ps: std::ops::Range<usize>| {
                ps.map(|p| value(round, p, 0)).collect::<Vec<_>>()
            };
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
        }
        "idle" => {
            // Rank 0 computes for `rounds` milliseconds while the others wait at a barrier; every rank
            // reports the CPU time it used, so that a waiting rank's cost (polling, progress) shows.
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
        }
        "manylocks" => {
            // Counter k behind lock k, for 8192 of them: every home has more locks than the servers it
            // keeps (`KEPT_LOCKS` in dsm's engine), so idle ones are let go of and made again as the
            // rounds come back to them.
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
        }
        "carrylock" => {
            // Rank 1's first thread writes a word of a page homed at rank 0 and says so in its rank's own
            // memory (an atomic), then arrives at a barrier, whose arrival carries the word's diff to rank
            // 0. Rank 1's second thread meanwhile takes a lock, copies what the first said into shared
            // memory and lets the lock go; the other ranks' second threads take the same lock and must
            // find the word at least as new as the copy. A release passes on what another thread of its
            // rank wrote before, even while that thread's barrier arrival is still carrying it. Rank 0
            // also writes another word of the page under the lock, so that rank 1's second thread drops
            // its copy when it takes the lock, and must find its own rank's write in the copy it fetches
            // again. After each barrier every rank must see that round's word (a third rank that fetched
            // the page under the lock before rank 0 had the word would keep a stale copy).
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
        }
        "mplock" => {
            // Message passing through a lock: rank 0 writes data then a flag under the lock; the others take
            // the lock until they see the flag, and then must see the data.
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
        }
        "readahead" => {
            // Rank 0 reads other ranks' pages in order (read-ahead fetches them in growing windows: from
            // one home, then from every home of a cyclic region, its pages a stride apart), then writes
            // some of them, while the others write others back: pages that came by read-ahead must be
            // ordinary read-only copies afterwards, writable here and invalidatable from elsewhere.
            // Not a multiple of 2 or 3 ranks (a run ends on a partial stride), and long enough for replies
            // from one home of 256 and 512 pages, which are offered to the install helper when they come
            // over the connection. When every other rank installs pages here directly (same host), the
            // first two passes take them that way (at 2 ranks the cyclic one's replies of 256 pages a
            // stride apart are shared with the home's helper) and the third, cyclic too, over the
            // connections (direct install switched off for it), so that both paths are checked in one job.
            let pages = 1201;
            let wanted = dsm.direct_install();
            let passes = [
                (dsm::Placement::At(dsm::Rank(1)), true),
                (dsm::Placement::Cyclic, true),
                (dsm::Placement::Cyclic, false),
            ];
            for (placement, want_direct) in passes {
                let v = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, placement, model)?;
                // Ranks introduce themselves at the first allocation.
                let direct = wanted && dsm.stats().peers_installing_here as usize == n - 1;
                let direct_now = direct && want_direct;
                dsm.set_direct_install(direct_now);
                let home = |p: usize| v.region().home_of(dsm::PageId(p as u64));
                for p in (0..pages).filter(|&p| home(p) == rt.rank() && me != 0) {
                    v.set(p * WORDS_PER_PAGE, p as u64);
                }
                let home_before = dsm.stats();
                dsm.barrier()?;
                if me == 0 {
                    let before = dsm.stats();
                    for p in 0..pages {
                        let want = if home(p) == rt.rank() { 0 } else { p as u64 };
                        ensure!(
                            v.get(p * WORDS_PER_PAGE) == want,
                            "page {p} read wrong ({placement:?})"
                        );
                    }
                    let s = dsm.stats();
                    ensure!(
                        s.pages_readahead > before.pages_readahead,
                        "read-ahead did not happen ({placement:?}): {s}"
                    );
                    let installed = s.pages_installed_by_sender - before.pages_installed_by_sender;
                    if direct_now {
                        ensure!(
                            installed == s.pages_fetched - before.pages_fetched,
                            "pages read were not all installed by their home: {s}"
                        );
                    } else {
                        ensure!(
                            installed == 0,
                            "a home installed pages with direct install off: {s}"
                        );
                        // Replies from one home grow to 512 pages: long enough for the install helper.
                        if dsm.install_helper() && placement == dsm::Placement::At(dsm::Rank(1)) {
                            ensure!(
                                s.replies_offered_to_helper > before.replies_offered_to_helper,
                                "no reply was offered to the install helper: {s}"
                            );
                        }
                    }
                }
                dsm.set_direct_install(wanted);
                dsm.barrier()?;
                // Rank 1, the home of the first pass, installed replies of 256 pages and more into rank 0
                // itself: with its install helper, when that is on.
                let s = dsm.stats();
                if me == 1
                    && direct_now
                    && dsm.install_helper()
                    && placement == dsm::Placement::At(dsm::Rank(1))
                {
                    ensure!(
                        s.pages_installed_into_peers - home_before.pages_installed_into_peers
                            >= 256
                            && s.replies_offered_to_helper > home_before.replies_offered_to_helper,
                        "the home's long direct installs were not shared with its install helper: {s}"
                    );
                }
                for p in (me..pages).step_by(2) {
                    v.set(p * WORDS_PER_PAGE + 1, 1000 + p as u64);
                }
                dsm.barrier()?;
                for p in 0..pages {
                    ensure!(
                        v.get(p * WORDS_PER_PAGE + 1) == 1000 + p as u64,
                        "rank {me}: page {p} lost a write ({placement:?})"
                    );
                }
                dsm.barrier()?;
                drop(v);
            }
            // With --threads T, T threads of rank 0 each read their own 1024 pages of rank 1's in order,
            // at once: their long replies compete for the one install helper.
            let threads = args.threads;
            if threads > 1 {
                let per = 1024;
                let v = dsm.alloc_vec_in::<u64>(
                    threads * per * WORDS_PER_PAGE,
                    dsm::Placement::At(dsm::Rank(1)),
                    model,
                )?;
                if me == 1 {
                    for p in 0..threads * per {
                        v.set(p * WORDS_PER_PAGE, p as u64 + 1);
                    }
                }
                dsm.barrier()?;
                if me == 0 {
                    on_threads(threads, |t| {
                        for p in t * per..(t + 1) * per {
                            let got = v.get(p * WORDS_PER_PAGE);
                            ensure!(got == p as u64 + 1, "thread {t}: page {p} read {got}");
                        }
                        Ok(())
                    })?;
                }
                dsm.barrier()?;
                drop(v);
            }
            let s = dsm.stats();
            println!(
                "readahead ok ({} pages installed by their sender, {} by the helper)",
                s.pages_installed_by_sender, s.pages_helper_installed
            );
        }
        "slices" => {
            // Copies into and out of a region (`read_slice`, `write_slice`, `prefetch`) announce the pages
            // they are about to touch: each run of them with one home comes in one fault, whatever its
            // length (up to the window), where a sequential reader's window grows from one page. Checked
            // on a region homed at rank 1, one placed in blocks (a copy across several homes) and a cyclic
            // one, by counting rank 0's faults; the contents are checked everywhere.
            let pages = 400;
            let value = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9) ^ 7;
            let placements = [
                dsm::Placement::At(dsm::Rank(1)),
                dsm::Placement::Block,
                dsm::Placement::Cyclic,
            ];
            for placement in placements {
                let v = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, placement, model)?;
                let home = |p: usize| v.region().home_of(dsm::PageId(p as u64));
                // How many homes the pages have, leaving out this rank with `but_mine` (when it wrote its
                // own pages, which are then here and take no fault).
                let homes = |pages: std::ops::Range<usize>, but_mine: bool| {
                    let mut h: Vec<_> = pages
                        .map(home)
                        .filter(|&h| !(but_mine && h == rt.rank()))
                        .collect();
                    h.sort();
                    h.dedup();
                    h.len() as u64
                };
                let faults = || {
                    let s = dsm.stats();
                    (s.read_faults, s.write_faults + s.upgrade_faults)
                };
                // Each rank fills its own pages; rank 1 the first 50 pages of a region homed at it in one
                // copy (its untouched pages filled with zeros by one fault), then the rest.
                let mine: Vec<usize> = (0..pages).filter(|&p| home(p) == rt.rank()).collect();
                let words = |pages: std::ops::Range<usize>| -> Vec<u64> {
                    (pages.start * WORDS_PER_PAGE..pages.end * WORDS_PER_PAGE)
                        .map(value)
                        .collect()
                };
                if placement == dsm::Placement::At(dsm::Rank(1)) {
                    if me == 1 {
                        let before = faults();
                        v.write_slice(0, &words(0..50));
                        let writes = faults().1 - before.1;
                        ensure!(
                            writes == 1,
                            "rank 1 wrote 50 untouched pages of its own in {writes} faults, not 1"
                        );
                        v.write_slice(50 * WORDS_PER_PAGE, &words(50..pages));
                    }
                } else {
                    for p in mine {
                        v.write_slice(p * WORDS_PER_PAGE, &words(p..p + 1));
                    }
                }
                dsm.barrier()?;
                if me == 0 {
                    // Pages 3..=340, from the start of page 3 (where a copy into a fresh vector is one that
                    // glibc's memcpy takes backwards) to the middle of page 340: longer than the caches,
                    // where memcpy changes strategy.
                    let (from, to) = (3 * WORDS_PER_PAGE, 340 * WORDS_PER_PAGE + 7);
                    let mut got = vec![0; to - from];
                    let before = faults();
                    v.read_slice(from, &mut got);
                    let (reads, want) = (faults().0 - before.0, homes(3..341, true));
                    ensure!(
                        reads == want,
                        "reading pages 3..=340 took {reads} faults, not {want} ({placement:?}, {model:?})"
                    );
                    ensure!(
                        got.iter().enumerate().all(|(k, &x)| x == value(from + k)),
                        "read_slice read wrong values ({placement:?}, {model:?})"
                    );
                    // Pages 345..400 prefetched (not where the last run ended, so no window carries
                    // over), then read without a fault.
                    let prefetched = 345 * WORDS_PER_PAGE..pages * WORDS_PER_PAGE;
                    let before = faults();
                    v.prefetch(prefetched.clone());
                    let (reads, want) = (faults().0 - before.0, homes(345..pages, true));
                    ensure!(
                        reads == want,
                        "prefetching pages 345..400 took {reads} faults, not {want} ({placement:?}, {model:?})"
                    );
                    let before = faults();
                    for i in prefetched {
                        ensure!(v.get(i) == value(i), "word {i} read wrong after a prefetch");
                    }
                    ensure!(
                        faults().0 == before.0,
                        "prefetched pages faulted again ({placement:?}, {model:?})"
                    );
                }
                dsm.barrier()?;
                // Rank 0 writes pages 2..=30 of a region nobody has touched. Under sequential consistency
                // each home hands over its untouched pages of the run in one fault (rank 0's own are
                // filled with zeros by one); under release consistency a first write fetches the pages as
                // a read does, and then marks each page written (one fault a page).
                let w = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, placement, model)?;
                let (from, to) = (2 * WORDS_PER_PAGE, 31 * WORDS_PER_PAGE);
                if me == 0 {
                    let before = faults();
                    w.write_slice(from, &words(2..31));
                    let (writes, homes) = (faults().1 - before.1, homes(2..31, false));
                    if model == dsm::Consistency::Sequential {
                        ensure!(
                            writes == homes,
                            "writing pages 2..=30 took {writes} faults, not {homes} ({placement:?})"
                        );
                    }
                }
                dsm.barrier()?;
                for i in 0..pages * WORDS_PER_PAGE {
                    let want = if (from..to).contains(&i) { value(i) } else { 0 };
                    ensure!(
                        w.get(i) == want,
                        "rank {me}: word {i} of the written region is wrong ({placement:?}, {model:?})"
                    );
                }
                dsm.barrier()?;
            }
            println!("slices ok");
        }
        "coalesce" => {
            // Several threads of rank 0 read the same page of rank 1's at once, page after page: each page
            // must be fetched once, whatever number of threads fault on it (the others wait for that
            // fetch), and each thread must read the page's value.
            ensure!(n > 1, "coalesce needs at least 2 ranks");
            let threads = args.threads.max(2);
            let pages = args.rounds;
            // Passes over fresh pages, until one has had threads wait for another's fetch: on a loaded
            // machine the threads of a pass may never run at once.
            const PASSES: usize = 5;
            let v = dsm.alloc_vec_in::<u64>(
                PASSES * pages * WORDS_PER_PAGE,
                dsm::Placement::At(dsm::Rank(1)),
                model,
            )?;
            if me == 1 {
                for p in 0..PASSES * pages {
                    v.set(p * WORDS_PER_PAGE, p as u64 + 1);
                }
            }
            dsm.barrier()?;
            if me == 0 {
                // One page per fetch, so that each page is exactly one fetch.
                dsm.set_readahead(1)?;
                let start = std::sync::Barrier::new(threads);
                let mut coalesced = 0;
                let mut passes = 0;
                while coalesced == 0 && passes < PASSES {
                    let first = passes * pages;
                    passes += 1;
                    let before = dsm.stats();
                    on_threads(threads, |t| {
                        // Every thread goes through every page's start, even after a wrong read: one that
                        // stopped early would leave the others waiting at the next start for ever.
                        let mut wrong = None;
                        for p in first..first + pages {
                            start.wait();
                            let got = v.get(p * WORDS_PER_PAGE);
                            if got != p as u64 + 1 && wrong.is_none() {
                                wrong = Some((p, got));
                            }
                        }
                        match wrong {
                            Some((p, got)) => anyhow::bail!("thread {t}: page {p} read {got}"),
                            None => Ok(()),
                        }
                    })?;
                    let after = dsm.stats();
                    let fetched = after.pages_fetched - before.pages_fetched;
                    let faults = after.read_faults - before.read_faults;
                    coalesced = after.faults_coalesced - before.faults_coalesced;
                    ensure!(
                        fetched == pages as u64 && faults == pages as u64,
                        "{pages} pages read by {threads} threads at once took {faults} faults and {fetched} fetches: {after}"
                    );
                }
                // Threads released together reach a page within microseconds of each other, long before a
                // fetch returns: some must have waited for another's fetch, or this check tested nothing.
                ensure!(
                    coalesced > 0,
                    "in {PASSES} passes no thread ever waited for another's fetch of the same page: {}",
                    dsm.stats()
                );
                println!(
                    "coalesce ok: {pages} pages, {threads} threads, {coalesced} faults coalesced (pass {passes})"
                );
            }
            dsm.barrier()?;
        }
        "firsttouch" => {
            ensure!(n > 1, "firsttouch needs at least 2 ranks");
            // Pages homed at rank 0; the other ranks touch some of them first (scattered, so they break
            // rank 0's sequential runs), then rank 0 touches every page in order, reading first in one
            // region and writing first in the other. Its fills of untouched pages must stop at the
            // pages the others touched and keep what they wrote.
            let pages = 300;
            let theirs = |p: usize| (1..n).find(|&r| p % 7 == r);
            for read_first in [true, false] {
                let v = dsm.alloc_vec_in::<u64>(
                    pages * WORDS_PER_PAGE,
                    dsm::Placement::At(dsm::Rank(0)),
                    model,
                )?;
                for p in (0..pages).filter(|&p| theirs(p) == Some(me)) {
                    v.set(p * WORDS_PER_PAGE, mix(&[me as u64, p as u64]));
                }
                dsm.barrier()?;
                if me == 0 {
                    let filled = dsm.stats().pages_zero_filled;
                    for p in 0..pages {
                        let at = p * WORDS_PER_PAGE;
                        if read_first {
                            let want = theirs(p).map_or(0, |r| mix(&[r as u64, p as u64]));
                            ensure!(v.get(at) == want, "page {p}: rank 0 read a wrong word 0");
                        }
                        v.set(at + 1, mix(&[0, p as u64]));
                    }
                    let s = dsm.stats();
                    ensure!(
                        s.pages_zero_filled > filled,
                        "nothing was filled ahead: {s}"
                    );
                }
                dsm.barrier()?;
                check_words(
                    &v,
                    pages,
                    &format!("rank {me}, read first: {read_first},"),
                    |p| {
                        (
                            theirs(p).map_or(0, |r| mix(&[r as u64, p as u64])),
                            mix(&[0, p as u64]),
                        )
                    },
                )?;
                dsm.barrier()?;
            }
            // Rank 1 writes every page homed at rank 0 in order, after rank 0 touched every 16th: the
            // pages it is handed ahead as zeros (write-ahead) must stop at rank 0's, which keep their data.
            let v = dsm.alloc_vec_in::<u64>(
                pages * WORDS_PER_PAGE,
                dsm::Placement::At(dsm::Rank(0)),
                model,
            )?;
            let early = |p: usize| p % 16 == 5;
            if me == 0 {
                for p in (0..pages).filter(|&p| early(p)) {
                    v.set(p * WORDS_PER_PAGE, mix(&[0, p as u64]));
                }
            }
            dsm.barrier()?;
            if me == 1 {
                let filled = dsm.stats().pages_zero_filled;
                for p in 0..pages {
                    v.set(p * WORDS_PER_PAGE + 1, mix(&[1, p as u64]));
                }
                let s = dsm.stats();
                ensure!(
                    model == dsm::Consistency::Release || s.pages_zero_filled > filled,
                    "rank 1 was handed no page ahead: {s}"
                );
            }
            dsm.barrier()?;
            check_words(&v, pages, &format!("rank {me}, write-ahead:"), |p| {
                (
                    if early(p) { mix(&[0, p as u64]) } else { 0 },
                    mix(&[1, p as u64]),
                )
            })?;
            dsm.barrier()?;
            // A cyclic region: every rank first-touches the pages it homes, every n-th page, in order (its
            // fills take pages a stride apart), after the other ranks touched some of rank 0's.
            let c =
                dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
            let home = |p: usize| c.region().home_of(dsm::PageId(p as u64)).0 as usize;
            let early = |p: usize| (1..n).find(|&r| home(p) == 0 && p % 23 == r);
            for p in (0..pages).filter(|&p| early(p) == Some(me)) {
                c.set(p * WORDS_PER_PAGE, mix(&[me as u64, p as u64, 9]));
            }
            dsm.barrier()?;
            let filled = dsm.stats().pages_zero_filled;
            for p in (0..pages).filter(|&p| home(p) == me) {
                c.set(p * WORDS_PER_PAGE + 1, mix(&[me as u64, p as u64, 10]));
            }
            let s = dsm.stats();
            ensure!(
                s.pages_zero_filled > filled,
                "rank {me} filled nothing ahead in a cyclic region: {s}"
            );
            dsm.barrier()?;
            check_words(&c, pages, &format!("rank {me}, cyclic:"), |p| {
                (
                    early(p).map_or(0, |r| mix(&[r as u64, p as u64, 9])),
                    mix(&[home(p) as u64, p as u64, 10]),
                )
            })?;
            dsm.barrier()?;
            // Rank 1 writes every page of another cyclic region in order, after rank 0 touched some of
            // them: its own pages are filled ahead, the others' handed over a stride apart as zeros
            // (write-ahead), both stopping at the pages rank 0 touched. Far fewer faults than pages.
            let w =
                dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
            let touched_first = |p: usize| p % 23 == 5;
            if me == 0 {
                for p in (0..pages).filter(|&p| touched_first(p)) {
                    w.set(p * WORDS_PER_PAGE, mix(&[0, p as u64, 11]));
                }
            }
            dsm.barrier()?;
            if me == 1 {
                let before = dsm.stats();
                for p in 0..pages {
                    w.set(p * WORDS_PER_PAGE + 1, mix(&[1, p as u64, 12]));
                }
                let s = dsm.stats();
                let faults = s.write_faults + s.upgrade_faults + s.read_faults
                    - before.write_faults
                    - before.upgrade_faults
                    - before.read_faults;
                ensure!(
                    model == dsm::Consistency::Release || faults < pages as u64 / 4,
                    "rank 1 took {faults} faults writing {pages} pages in order: {s}"
                );
            }
            dsm.barrier()?;
            check_words(&w, pages, &format!("rank {me}, cyclic write-ahead:"), |p| {
                (
                    if touched_first(p) {
                        mix(&[0, p as u64, 11])
                    } else {
                        0
                    },
                    mix(&[1, p as u64, 12]),
                )
            })?;
            dsm.barrier()?;
            if n > 2 {
                // Pages last written by rank 2, written again in order by rank 1, which holds no copy: each
                // fault claims pages ahead, and the home grants the writes (the data comes from rank 2).
                let words = [(2, 3), (1, 4)];
                for (writer, word) in words {
                    if me == writer {
                        for p in 0..pages {
                            v.set(
                                p * WORDS_PER_PAGE + word,
                                mix(&[writer as u64, p as u64, 7]),
                            );
                        }
                    }
                    dsm.barrier()?;
                }
                for p in 0..pages {
                    for (writer, word) in words {
                        ensure!(
                            v.get(p * WORDS_PER_PAGE + word) == mix(&[writer as u64, p as u64, 7]),
                            "rank {me}: page {p} lost rank {writer}'s second write"
                        );
                    }
                }
                dsm.barrier()?;
            }
            println!("firsttouch ok");
        }
        "lockfault" => {
            // Threads of rank 0 wait for a lock while the thread that holds it faults on remote pages: the
            // waiting threads must not take every channel, or the fault could never be resolved.
            let data =
                dsm.alloc_vec_with::<u64>(64 * WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(1)))?;
            if me == 1 {
                for p in 0..64 {
                    data.set(p * WORDS_PER_PAGE, p as u64 + 1);
                }
            }
            dsm.barrier()?;
            if me == 0 {
                let guard = dsm.lock(9)?;
                std::thread::scope(|s| -> anyhow::Result<()> {
                    let waiters: Vec<_> =
                        (0..3).map(|_| s.spawn(|| dsm.lock(9).map(drop))).collect();
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
        }
        "grantwait" => {
            // Run with two channels a rank. On each rank at once: a thread waits for a lock (holding one
            // channel), a thread writes the other rank's page (taking the other channel, and waiting at
            // that page's home), and a thread writes this rank's own page, of which the other rank holds
            // a copy: a transaction that needs a channel to drop that copy, and finds none free in some
            // rounds (about one in six on a 2-core machine). If it waited for one with the page's
            // manager lock held, and both ranks did so before the other's remote write reached them,
            // each remote write would wait at the other's home for that lock, the lock for a channel,
            // the channel for the remote write: for ever. (That timing was not reproduced here; the
            // rounds check what the writes leave.)
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
        }
        "diewriting" => {
            // Ranks 1 and 2 write one page homed at rank 0 in turn, so that every write moves the page
            // through a transaction rank 0 grants; rank 1 dies at a random moment, often in the middle of
            // one. Run under --keep-going: rank 2 must then either finish its writes or fail with an error
            // naming rank 1 (the page it needs may have died with it), and never wait for ever.
            anyhow::ensure!(n >= 3, "diewriting needs 3 ranks");
            let page =
                dsm.alloc_vec_with::<u64>(WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
            let done =
                dsm.alloc_vec_with::<u64>(WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
            dsm.barrier()?;
            match me {
                0 => {
                    let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    loop {
                        if done.get(0) != 0 {
                            done.set(1, 1); // rank 2 may leave now; this rank leaves after it
                            while !has_failed(dsm, 2) {
                                ensure!(std::time::Instant::now() < limit, "rank 2 did not leave");
                                std::thread::sleep(std::time::Duration::from_millis(1));
                            }
                            println!("diewriting: rank 2 finished");
                            break;
                        }
                        if has_failed(dsm, 2) {
                            println!("diewriting: rank 2 failed");
                            break;
                        }
                        ensure!(
                            std::time::Instant::now() < limit,
                            "rank 2 neither finished nor failed in 30 s"
                        );
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
                1 => {
                    let ms = 20 + std::process::id() as u64 % 30;
                    std::thread::spawn(move || {
                        std::thread::sleep(std::time::Duration::from_millis(ms));
                        nix_kill_self();
                    });
                    for i in 0.. {
                        page.set(1, i);
                    }
                }
                _ => {
                    // Writes while rank 1 lives, then `rounds` more.
                    let mut i = 0u64;
                    while !has_failed(dsm, 1) {
                        page.set(2, i);
                        i += 1;
                    }
                    for k in 0..args.rounds as u64 {
                        page.set(2, i + k);
                    }
                    done.set(0, 1);
                    println!(
                        "diewriting: rank 2 wrote {} times after rank 1 died",
                        args.rounds
                    );
                    // Stays until rank 0 has seen the flag (the page is this rank's until then).
                    let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while done.get(1) == 0 && std::time::Instant::now() < limit {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            std::process::exit(0);
        }
        "readerdies" => {
            // Rank 2 reads two pages homed at rank 0 (so it is in their copysets) and dies. Then rank 0
            // writes the first (its own fault path) and rank 1 the second (a grant from the home): a
            // writer told to have the dead rank's copy dropped failed, and ended its rank.
            anyhow::ensure!(n == 3, "readerdies needs 3 ranks");
            let v =
                dsm.alloc_vec_with::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
            if me == 0 {
                v.set(0, 1);
                v.set(WORDS_PER_PAGE, 1);
            }
            dsm.barrier()?;
            if me == 2 {
                ensure!(
                    v.get(0) + v.get(WORDS_PER_PAGE) == 2,
                    "rank 2 read stale pages"
                );
            }
            dsm.barrier()?;
            let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
            let failed = |r: u32| has_failed(dsm, r);
            match me {
                2 => nix_kill_self(),
                1 => {
                    until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
                    v.set(WORDS_PER_PAGE, 21);
                    println!("readerdies: rank 1 wrote a page the dead rank had read");
                    until("rank 0 did not leave in 30 s", &|| failed(0))?;
                }
                _ => {
                    until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
                    v.set(0, 10);
                    println!("readerdies: the home wrote a page the dead rank had read");
                    until("rank 1's write did not show in 30 s", &|| {
                        v.get(WORDS_PER_PAGE) == 21
                    })?;
                    ensure!(v.get(0) == 10, "the home lost its own write");
                }
            }
            std::process::exit(0);
        }
        "datalost" => {
            // Rank 2 writes a page homed at rank 0, so that it holds the page's only copy, and dies. Rank
            // 1 then reads the page (a request to its home), and rank 0 once rank 1 has ended (its own
            // fault path): each fault must end its rank saying that the page's data left the job with
            // rank 2 (they used to say that sending to rank 2 failed).
            anyhow::ensure!(n == 3, "datalost needs 3 ranks");
            let v = dsm.alloc_vec_with::<u64>(WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
            if me == 2 {
                v.set(0, 7);
            }
            dsm.barrier()?;
            rank_2_dies(dsm, me)?;
            if me == 0 {
                within_30_s(me, "rank 1 did not end in 30 s", &|| has_failed(dsm, 1))?;
            }
            println!("datalost: rank {me} reads the page");
            let got = v.get(0);
            anyhow::bail!("rank {me} read {got} from a page whose only copy left the job");
        }
        "ownerdies" => {
            // Rank 2 writes two pages homed at rank 0 (it owns them); rank 0 reads the first and rank 1
            // the second (each a read-only copy, the owner's downgraded), and rank 2 dies. Rank 1 then
            // reads the first and rank 0 writes the second: both used to be sent to fetch the page
            // from the dead owner, and failed, while a copy lived on.
            anyhow::ensure!(n == 3, "ownerdies needs 3 ranks");
            let v =
                dsm.alloc_vec_with::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
            let (first, second) = (0, WORDS_PER_PAGE);
            if me == 2 {
                v.set(first, 7);
                v.set(second, 8);
            }
            dsm.barrier()?;
            match me {
                0 => ensure!(v.get(first) == 7, "the home read a stale page"),
                1 => ensure!(v.get(second) == 8, "rank 1 read a stale page"),
                _ => {}
            }
            dsm.barrier()?;
            let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
            let failed = |r: u32| has_failed(dsm, r);
            rank_2_dies(dsm, me)?;
            // A rank is failed at the end of its first connection, and gone (its copies with it) at the
            // end of its service loop's, which the home reads in the same pass when a process dies. The
            // pause lets the home see it gone before its own write: a write granted before would find
            // the owner gone only after asking rank 1 to drop its copy, the page's last (rank 1's read
            // needs no pause: a grant that asked nobody else is abandoned and asked again).
            std::thread::sleep(std::time::Duration::from_millis(100));
            if me == 1 {
                ensure!(
                    v.get(first) == 7,
                    "rank 1 read a wrong copy of the dead owner's page"
                );
                println!("ownerdies: rank 1 read the dead owner's page from the home's copy");
                until("rank 0's write did not show in 30 s", &|| {
                    v.get(second) == 9
                })?;
                v.set(first, 11);
                until("rank 0 did not leave in 30 s", &|| failed(0))?;
            } else {
                v.set(second, 9);
                println!("ownerdies: the home wrote the dead owner's page from rank 1's copy");
                until("rank 1's write did not show in 30 s", &|| {
                    v.get(first) == 11
                })?;
            }
            std::process::exit(0);
        }
        "diffhomedies" => {
            // Rank 0 writes a page homed at rank 2, then one homed at rank 1, so that one release sends a
            // diff to each, rank 2's first; rank 2 has died by then. The release fails naming rank 2, rank
            // 1 applies its diff, and rank 0 reads pages from rank 1 afterwards: the channel of the release
            // must go back to the pool with rank 1's acknowledgement read (left there, it was taken for the
            // answer to a later page fetch, and the rank ended).
            anyhow::ensure!(n == 3, "diffhomedies needs 3 ranks");
            let pages = 48; // page p homed at rank p % 3
            let v = dsm.alloc_vec_in::<u64>(
                pages * WORDS_PER_PAGE,
                dsm::Placement::Cyclic,
                dsm::Consistency::Release,
            )?;
            if me == 0 {
                // Copies of both pages, so that writing them later needs no home.
                ensure!(v.get(2 * WORDS_PER_PAGE) + v.get(WORDS_PER_PAGE) == 0);
            }
            if me == 1 {
                // A copy of page 3 (homed at rank 0), which rank 0 writes in the failing release.
                ensure!(v.get(3 * WORDS_PER_PAGE) == 0);
            }
            dsm.barrier()?;
            let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
            let failed = |r: u32| has_failed(dsm, r);
            match me {
                2 => nix_kill_self(),
                1 => {
                    until("rank 0's diff did not arrive in 30 s", &|| {
                        v.get(WORDS_PER_PAGE) == 11
                    })?;
                    println!("diffhomedies: rank 1 applied rank 0's diff");
                    // The lock the failed release passed on tells its next holder what reached the
                    // homes: rank 0's write of page 3 did, and this rank's copy of it is dropped.
                    let guard = dsm.lock(0)?;
                    ensure!(
                        v.get(3 * WORDS_PER_PAGE) == 13,
                        "rank 1 read page 3 stale after taking the lock rank 0 wrote it under"
                    );
                    v.set(6 * WORDS_PER_PAGE, 1); // homed at rank 0: rank 0 may leave
                    guard.unlock()?;
                    println!("diffhomedies: rank 1 read what rank 0 wrote under the lock");
                    until("rank 0 did not leave in 30 s", &|| failed(0))?;
                }
                _ => {
                    until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
                    let guard = dsm.lock(0)?; // homed here
                    v.set(2 * WORDS_PER_PAGE, 7);
                    v.set(WORDS_PER_PAGE, 11);
                    v.set(3 * WORDS_PER_PAGE, 13);
                    let Err(e) = guard.unlock() else {
                        anyhow::bail!("a release with a diff for a dead home succeeded");
                    };
                    ensure!(e.to_string().contains("rank 2"), "the release failed: {e}");
                    // Faults on the pages homed at rank 1, one page each, over every channel.
                    for p in (4..pages).step_by(3) {
                        ensure!(v.get(p * WORDS_PER_PAGE) == 0, "page {p} is not zero");
                    }
                    ensure!(v.get(WORDS_PER_PAGE) == 11, "rank 0 lost its own write");
                    println!("diffhomedies: the release failed naming rank 2, and rank 0 went on");
                    until("rank 1 did not take the lock after rank 0 in 30 s", &|| {
                        v.get(6 * WORDS_PER_PAGE) == 1
                    })?;
                }
            }
            std::process::exit(0);
        }
        "releaseafterdeath" => {
            anyhow::ensure!(n == 4, "releaseafterdeath needs 4 ranks");
            const ROUNDS: u64 = 40;
            // Allocated first, so flushed first: the page homed at rank 2.
            let dead = dsm.alloc_vec_in::<u64>(
                WORDS_PER_PAGE,
                dsm::Placement::At(dsm::Rank(2)),
                dsm::Consistency::Release,
            )?;
            // Page 0 (P) rank 1 writes once; page 1 (Q) at every round.
            let v = dsm.alloc_vec_in::<u64>(
                2 * WORDS_PER_PAGE,
                dsm::Placement::At(dsm::Rank(0)),
                dsm::Consistency::Release,
            )?;
            if me == 1 {
                // A copy, so that writing it later needs no home.
                ensure!(dead.get(0) == 0);
            }
            dsm.barrier()?;
            let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
            let failed = |r: u32| has_failed(dsm, r);
            match me {
                2 => nix_kill_self(),
                1 => {
                    until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
                    for round in 1..=ROUNDS {
                        let guard = dsm.lock(0)?;
                        if round == 1 {
                            dead.set(0, 1);
                            v.set(0, 42);
                        }
                        v.set(WORDS_PER_PAGE, round);
                        let Err(e) = guard.unlock() else {
                            anyhow::bail!("a release with a diff for a dead home succeeded");
                        };
                        ensure!(e.to_string().contains("rank 2"), "the release failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    println!("releaseafterdeath: every release of rank 1 failed naming rank 2");
                    until("rank 3 did not finish in 30 s", &|| failed(3))?;
                }
                3 => {
                    until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
                    // Under the lock, Q changes once for each of rank 1's releases seen: each time, the
                    // copy of Q is dropped, and P's only the first time it is named.
                    let (mut last, mut changes) = (0, 0u64);
                    while last < ROUNDS {
                        let guard = dsm.lock(0)?;
                        let (p, q) = (v.get(0), v.get(WORDS_PER_PAGE));
                        guard.unlock()?;
                        ensure!(q == 0 || p == 42, "rank 3 read P stale ({p}) in round {q}");
                        if q != last {
                            (last, changes) = (q, changes + 1);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    let dropped = dsm.stats().acquire_invalidations;
                    ensure!(
                        dropped <= changes + 2,
                        "rank 3 dropped {dropped} copies at acquires for {changes} releases of rank 1 it saw: P named again at every one"
                    );
                    println!(
                        "releaseafterdeath: rank 3 dropped {dropped} copies for {changes} releases"
                    );
                }
                _ => {
                    until(
                        "rank 1's write of a page homed here did not arrive in 30 s",
                        &|| v.get(0) == 42,
                    )?;
                    println!(
                        "releaseafterdeath: rank 1's write reached its home past the dead one"
                    );
                    until("ranks 1 and 3 did not finish in 30 s", &|| {
                        failed(1) && failed(3)
                    })?;
                }
            }
            std::process::exit(0);
        }
        "sentsigbus" => {
            // A SIGBUS sent to a rank (not raised by a fault) must take its default action, killing the
            // rank, even though dsm handles SIGBUS for its page faults.
            last_rank_leaves(dsm, "the signalled rank", || match nix::sys::signal::raise(
                nix::sys::signal::Signal::SIGBUS,
            ) {
                Ok(()) => anyhow::anyhow!("rank {me}: a SIGBUS sent to this rank was swallowed"),
                Err(e) => e.into(),
            })?
        }
        "ownmpi" => own_mpi(dsm, me, n, args.rounds)?,
        "quitwaited" => {
            // Rank 1 ends with status 0 without leaving the job (`process::exit`, no `Runtime::finish`)
            // while rank 0 waits for it: the launcher must name rank 1, not rank 0, which ends because
            // rank 1 went.
            let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
            dsm.barrier()?;
            if me == 1 {
                std::process::exit(0);
            }
            within_30_s(me, "rank 1 neither wrote nor was seen to go", &|| {
                v.get(0) != 0
            })?;
            anyhow::bail!("rank {me}: rank 1 wrote after all");
        }
        "panicwaited" | "errorwaited" => {
            // Rank 1 gives up while rank 0 waits, outside any barrier, for a word only rank 1 would write:
            // by a panic, or by returning an error from `main` (dropping its region and its `Runtime` as at
            // a normal end). Neither the unwinding nor the drops may wait for rank 0 at a barrier (rank 0
            // never comes): the job then ends when rank 0 sees rank 1 fail, instead of both waiting for ever.
            let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
            dsm.barrier()?;
            if me == 1 {
                if args.check == "panicwaited" {
                    panic!("rank 1 gives up before writing");
                }
                anyhow::bail!("rank 1 gives up on an error before writing");
            }
            within_30_s(me, "rank 1 neither wrote nor was seen to fail", &|| {
                v.get(0) != 0
            })?;
            anyhow::bail!("rank {me}: rank 1 wrote after all");
        }
        "die" => last_rank_leaves(dsm, "the dead rank", || nix_kill_self())?,
        "panicbarrier" => {
            dsm.barrier()?;
            if me == 0 {
                panic!("rank 0 gives up");
            }
            dsm.barrier()?;
            anyhow::bail!("rank {me}: a barrier completed without rank 0");
        }
        "pause" => {
            let timeout: u64 = std::env::var("DSM_PEER_TIMEOUT")
                .ok()
                .and_then(|t| t.parse().ok())
                .filter(|t| *t > 0)
                .context("the pause check needs DSM_PEER_TIMEOUT set to a few seconds")?;
            let pids = dsm.alloc_vec::<u64>(n)?;
            pids.set(me, u64::from(std::process::id()));
            dsm.barrier()?;
            if me == 0 {
                let list: Vec<String> = (0..n).map(|r| pids.get(r).to_string()).collect();
                let list = list.join(" ");
                // Every rank stopped at once, as a terminal's Ctrl-Z or a batch system's suspend does.
                // This rank waits for the shell, so the job is stopped while the others wait at the
                // barrier, and resumed before this rank comes to it.
                let status = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "kill -STOP {list} && sleep {} && kill -CONT {list} && echo \"pause: the job was stopped for {} s\"",
                        2 * timeout,
                        2 * timeout
                    ))
                    .status()
                    .context("running sh to stop the job")?;
                ensure!(status.success(), "stopping the job: {status}");
            }
            dsm.barrier()?;
            // After the pause, a second round of messages.
            pids.set(me, 0);
            dsm.barrier()?;
            ensure!((0..n).all(|r| pids.get(r) == 0), "a rank's write was lost");
            println!("pause ok");
        }
        "partition" => {
            let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
            v.set(me, 1);
            dsm.barrier()?;
            if me == 0 {
                let down = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "down"])
                    .status()
                    .context("running ip (iproute2)")?;
                ensure!(down.success(), "ip link set lo down: {down}");
            }
            // Nobody hears anybody from here: every rank waits at the barrier until it gives up.
            dsm.barrier()?;
            anyhow::bail!("rank {me}: a barrier completed across a network that is down");
        }
        "stopkeep" => {
            // Under --keep-going: the last rank stops for good; the others go on once they have given
            // up hearing from it, and finish.
            let last = n - 1;
            dsm.barrier()?;
            if me == last {
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)?;
                anyhow::bail!("rank {me} went on after SIGSTOP");
            }
            within_30_s(me, "the stopped rank was not seen to fail", &|| {
                has_failed(dsm, last as u32)
            })?;
            println!("stopkeep: rank {me} went on without the stopped rank");
        }
        "freeze" => last_rank_leaves(dsm, "the frozen rank", || match freeze_self() {
            Ok(()) => anyhow::anyhow!("rank {me} went on after freezing itself"),
            Err(e) => e.context("freeze: no cgroup v2 freezer here"),
        })?,
        "stop" => last_rank_leaves(dsm, "the stopped rank", || {
            // Stopped until the launcher kills it: it closes nothing and says nothing.
            match nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP) {
                Ok(()) => anyhow::anyhow!("rank {me} went on after SIGSTOP"),
                Err(e) => e.into(),
            }
        })?,
        other => {
            anyhow::bail!(
                "unknown check {other:?}: use counter, mp, sb, pages, latehome, homediffs, flushbatch, carrylock, selective, bytes, mplock, manylocks, readahead, coalesce, firsttouch, lockfault, grantwait, panicwaited, errorwaited, quitwaited, servicefault, idle, ownmpi, die, stop, stopkeep, freeze, partition, pause, diewriting, readerdies, ownerdies, diffhomedies, releaseafterdeath or sentsigbus"
            )
        }
    }
    rt.finish()?;
    Ok(())
}

/// A service that answers with the last word of a shared array (what a service must not do: that word's
/// page is homed at the last rank and not present here).
#[derive(Debug)]
struct ReadsShared(dsm::GlobalVec<'static, u64>);

impl dsm::Service for ReadsShared {
    fn request(&self, _: dsm::Rank, _: Vec<u8>, reply: dsm::Responder) {
        let word = self.0.get(self.0.len() - 1);
        let _ = reply.send(&[&word.to_le_bytes()]);
    }
}

/// `servicefault`: rank 1 calls a service of rank 0's that reads a page of rank 1's while it answers.
/// Rank 0 must end saying why, not hang with its service loop waiting for its own fault.
fn service_fault(rt: &'static dsm_runtime::Runtime) -> anyhow::Result<()> {
    let dsm = rt.dsm();
    anyhow::ensure!(rt.size() == 2, "servicefault runs at 2 ranks");
    let v = dsm.alloc_vec_in::<u64>(
        2 * WORDS_PER_PAGE,
        dsm::Placement::Block,
        dsm::Consistency::Sequential,
    )?;
    dsm.register_service(7, std::sync::Arc::new(ReadsShared(v)))?;
    dsm.barrier()?;
    if rt.rank().0 == 1 {
        // Rank 0 ends, and the call fails with it; an answer means the service touched the page.
        let answer = dsm.call(dsm::Rank(0), 7, &[])?;
        anyhow::bail!("rank 1: the service answered {answer:?}");
    }
    within_30_s(0, "rank 0's service neither answered nor ended it", &|| {
        false
    })?;
    Ok(())
}

/// Each round, a locked increment of a shared counter (the job's traffic) and a message of the program's
/// own to the next rank, received with any source and any tag, on tags the MPI transport once used on
/// `MPI_COMM_WORLD` itself: every message received must be the one the previous rank sent.
#[cfg(feature = "mpi")]
fn own_mpi(dsm: &dsm::Dsm, me: usize, n: usize, rounds: usize) -> anyhow::Result<()> {
    use mpi::traits::{Communicator, Destination, Source};
    ensure!(
        mpi::environment::is_initialized(),
        "ownmpi runs under mpirun"
    );
    let world = mpi::topology::SimpleCommunicator::world();
    let counter = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    for round in 0..rounds {
        let guard = dsm.lock(0)?;
        counter.set(0, counter.get(0) + 1);
        guard.unlock()?;
        let tag = 32_000 + (round % 3) as i32;
        let sent = format!("own {me} {round}");
        let (got, status) = mpi::request::scope(|scope| {
            let request = world.process_at_rank(next as i32).immediate_send_with_tag(
                scope,
                sent.as_bytes(),
                tag,
            );
            let got = world.any_process().receive_vec::<u8>();
            request.wait();
            got
        });
        let want = format!("own {prev} {round}");
        ensure!(
            got == want.as_bytes() && status.tag() == tag && status.source_rank() == prev as i32,
            "rank {me} round {round}: received {:?} with tag {} from rank {}, expected {want:?} with tag {tag} from rank {prev}",
            String::from_utf8_lossy(&got),
            status.tag(),
            status.source_rank()
        );
    }
    dsm.barrier()?;
    let total = counter.get(0);
    ensure!(
        total == (rounds * n) as u64,
        "rank {me}: counter {total}, expected {}",
        rounds * n
    );
    println!("ownmpi ok: {rounds} rounds");
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn own_mpi(_: &dsm::Dsm, _: usize, _: usize, _: usize) -> anyhow::Result<()> {
    anyhow::bail!("ownmpi needs a build with the mpi feature, run under mpirun")
}

/// Whether this rank has seen rank `r` fail.
fn has_failed(dsm: &dsm::Dsm, r: u32) -> bool {
    dsm.failed_ranks().contains(&dsm::Rank(r))
}

/// Rank 2 dies (SIGKILL); every other rank returns once it has seen it fail (within 30 s).
fn rank_2_dies(dsm: &dsm::Dsm, me: usize) -> anyhow::Result<()> {
    if me == 2 {
        nix_kill_self();
    }
    within_30_s(me, "rank 2's death was not noticed in 30 s", &|| {
        has_failed(dsm, 2)
    })
}

/// Waits (polling every millisecond) until `done` holds, or fails with `what` after 30 s.
fn within_30_s(me: usize, what: &str, done: &dyn Fn() -> bool) -> anyhow::Result<()> {
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        ensure!(std::time::Instant::now() < limit, "rank {me}: {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// User and system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(f64::NAN)
}

/// Every rank writes its word of one page and meets the others at a barrier; then the last rank calls
/// `leave` (which kills, stops or signals it, and returns only with the error that it did not), and the
/// others wait at a barrier it never comes to: they must end with an error naming it instead of hanging.
/// `who` names the last rank should that barrier complete all the same.
fn last_rank_leaves(
    dsm: &dsm::Dsm,
    who: &str,
    leave: impl FnOnce() -> anyhow::Error,
) -> anyhow::Result<()> {
    let (me, n) = (dsm.rank().index(), dsm.size());
    let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    v.set(me, 1);
    dsm.barrier()?;
    if me == n - 1 {
        return Err(leave());
    }
    dsm.barrier()?;
    anyhow::bail!("rank {me}: a barrier completed without {who}")
}

/// Freezes this process in a cgroup of its own, made under the first cgroup v2 hierarchy mounted; says
/// which first (its directory is left for the caller to remove once the process has been killed).
fn freeze_self() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| f[1].to_string())
        .context("no cgroup2 file system is mounted")?;
    let me = std::process::id();
    let dir = std::path::Path::new(&root).join(format!("dsm-check-freeze-{me}"));
    std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
    println!("freeze: in {}", dir.display());
    std::fs::write(dir.join("cgroup.procs"), me.to_string())
        .with_context(|| format!("moving into {}", dir.display()))?;
    std::fs::write(dir.join("cgroup.freeze"), "1")
        .with_context(|| format!("freezing {}", dir.display()))?;
    // Frozen on the way back from the write; should the freeze take a moment, it is waited for here.
    std::thread::sleep(std::time::Duration::from_secs(5));
    Ok(())
}

fn nix_kill_self() -> ! {
    let me = std::process::id();
    let _ = std::process::Command::new("kill")
        .args(["-9", &me.to_string()])
        .status();
    std::process::exit(99);
}
