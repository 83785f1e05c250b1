//! Whole jobs in random interleavings (`sim`), without and with ranks that crash.

use super::sim::{run, Stats};

/// Runs `seeds` jobs of 2 to 4 ranks on 1 to 3 pages and adds up what they did.
fn jobs(seeds: u64, pages: u64, crashes: impl Fn(u64) -> usize) -> Stats {
    let mut total = Stats::default();
    for seed in 0..seeds {
        let ranks = 2 + (seed % 3) as usize;
        let pages = 1 + (seed % pages) as usize;
        let s = run(seed, ranks, pages, 3000, crashes(seed)).stats;
        total.reads += s.reads;
        total.writes += s.writes;
        total.crashes += s.crashes;
        total.lost += s.lost;
        total.abandoned += s.abandoned;
        total.owner_left += s.owner_left;
        total.home_failed += s.home_failed;
        total.invalidations_gone += s.invalidations_gone;
        total.ended_for_failed += s.ended_for_failed;
    }
    total
}

#[test]
fn randomized_interleavings_keep_single_writer_and_fresh_reads() {
    let s = jobs(300, 2, |_| 0);
    // The runs must have exercised both kinds of access many times, or the invariants were checked on nothing.
    assert!(s.reads > 50_000 && s.writes > 50_000, "{s:?}");
}

#[test]
fn ranks_that_crash_leave_no_stale_copy_readable_and_no_fault_hanging() {
    let s = jobs(1500, 3, |seed| 1 + (seed % 2) as usize);
    eprintln!("{s:?}");
    // Each way the engine handles a rank's failure must have been taken, or it was checked on nothing.
    assert!(
        s.crashes > 1500 && s.reads > 100_000 && s.writes > 100_000,
        "{s:?}"
    );
    assert!(
        s.lost > 50
            && s.abandoned > 50
            && s.owner_left > 0
            && s.home_failed > 50
            && s.invalidations_gone > 50
            && s.ended_for_failed > 50,
        "{s:?}"
    );
}
