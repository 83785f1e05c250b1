//! Whole jobs in random interleavings (`sim`): without and with ranks that crash, or that are taken for
//! failed while they live on, without and with read-ahead.

use super::sim::{run, Job, Stats};

/// Runs `seeds` jobs of 2 to 4 ranks, each made by `job` from its seed and rank count, and adds up what
/// they did.
fn jobs(seeds: u64, job: impl Fn(u64, usize) -> Job) -> Stats {
    let mut total = Stats::default();
    for seed in 0..seeds {
        let ranks = 2 + (seed % 3) as usize;
        let s = run(seed, job(seed, ranks)).stats;
        total.reads += s.reads;
        total.writes += s.writes;
        total.ahead += s.ahead;
        total.ahead_strided += s.ahead_strided;
        total.crashes += s.crashes;
        total.lost += s.lost;
        total.abandoned += s.abandoned;
        total.owner_left += s.owner_left;
        total.home_failed += s.home_failed;
        total.invalidations_gone += s.invalidations_gone;
        total.ended_for_failed += s.ended_for_failed;
        total.suspicions += s.suspicions;
        total.revoked += s.revoked;
        total.timed_out += s.timed_out;
        total.leaf_refused += s.leaf_refused;
        total.upgrade_lost += s.upgrade_lost;
        total.waited_for_own += s.waited_for_own;
        total.direct += s.direct;
        total.early_accesses += s.early_accesses;
        total.deferred_direct += s.deferred_direct;
        total.unsent += s.unsent;
        total.unsent_held += s.unsent_held;
        total.zero_filled += s.zero_filled;
        total.written_ahead += s.written_ahead;
        total.unsent_written += s.unsent_written;
    }
    total
}

/// A job on a few pages in the cyclic layout, one page a fault.
fn few_pages(seed: u64, ranks: usize, pages: u64, crashes: usize) -> Job {
    Job {
        ranks,
        pages: 1 + (seed % pages) as usize,
        run: 1,
        window: 1,
        steps: 3000,
        crashes,
        suspicions: 0,
        direct: false,
        crash_first_writers: false,
    }
}

/// A job on runs of 2 or 3 pages with one home, or on 3 pages a home in the cyclic layout (read ahead a
/// stride apart), faults asking for up to 2 to 4 pages.
fn read_ahead(seed: u64, ranks: usize, crashes: usize) -> Job {
    let run = 1 + (seed / 6 % 3) as usize;
    Job {
        ranks,
        pages: if run == 1 { 3 } else { run } * ranks,
        run,
        window: 2 + (seed / 2 % 3) as usize,
        steps: 3000,
        crashes,
        suspicions: 0,
        direct: false,
        crash_first_writers: false,
    }
}

/// A job of `few_pages` (even seeds) or `read_ahead` (odd seeds).
fn either_layout(seed: u64, ranks: usize, crashes: usize) -> Job {
    if seed.is_multiple_of(2) {
        few_pages(seed, ranks, 3, crashes)
    } else {
        read_ahead(seed, ranks, crashes)
    }
}

#[test]
fn randomized_interleavings_keep_single_writer_and_fresh_reads() {
    let s = jobs(300, |seed, ranks| few_pages(seed, ranks, 2, 0));
    // The runs must have exercised both kinds of access many times, or the invariants were checked on nothing.
    assert!(s.reads > 50_000 && s.writes > 50_000, "{s:?}");
}

#[test]
fn ranks_that_crash_leave_no_stale_copy_readable_and_no_fault_hanging() {
    let s = jobs(1500, |seed, ranks| {
        few_pages(seed, ranks, 3, 1 + (seed % 2) as usize)
    });
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
            && s.ended_for_failed > 50
            && s.unsent > 5,
        "{s:?}"
    );
}

#[test]
fn pages_handed_over_ahead_of_faults_keep_single_writer_and_fresh_reads() {
    let s = jobs(600, |seed, ranks| read_ahead(seed, ranks, 0));
    // Some of them a stride apart, in the cyclic layout; homes also filled untouched pages with zeros
    // along with their own first touches, and gave up their copies of written pages to first writers.
    assert!(
        s.reads > 100_000 && s.writes > 100_000 && s.ahead > 2_000 && s.ahead_strided > 500,
        "{s:?}"
    );
    assert!(s.zero_filled > 200 && s.written_ahead > 200, "{s:?}");
}

#[test]
fn pages_handed_over_ahead_of_faults_to_ranks_that_crash_leave_no_stale_copy_readable() {
    let s = jobs(1500, |seed, ranks| {
        read_ahead(seed, ranks, 1 + (seed % 2) as usize)
    });
    // Answers to crashed requesters that the home could not send were taken back.
    assert!(
        s.crashes > 1500 && s.ahead > 2_000 && s.lost > 50 && s.unsent > 5 && s.zero_filled > 200,
        "{s:?}"
    );
}

#[test]
fn home_copies_given_up_to_first_writers_that_crash_come_back() {
    // Crashes aimed at ranks whose first write waits for its answer with pages claimed after it: a home
    // that gave up its copies of written pages along with the answer, and could not send it, takes
    // them back, data and all (otherwise a later read of such a page finds it lost, or stale).
    let s = jobs(1500, |seed, ranks| Job {
        crash_first_writers: true,
        ..read_ahead(seed, ranks, 2 + (seed % 2) as usize)
    });
    assert!(
        s.crashes > 1400 && s.written_ahead > 1_000 && s.unsent > 50 && s.unsent_written > 20,
        "{s:?}"
    );
}

#[test]
fn ranks_taken_for_failed_while_they_live_leave_no_stale_copy_readable_and_no_fault_hanging() {
    // Jobs of both layouts, some with crashes too, in which ranks alive take others alive for failed
    // (one to six times a job).
    let s = jobs(3000, |seed, ranks| Job {
        suspicions: 1 + (seed / 7 % 6) as usize,
        ..either_layout(seed, ranks, (seed / 3 % 2) as usize)
    });
    // Each way the engine handles a rank taken for failed that lives on must have been taken: the home
    // ending its transactions early, faults giving up on it, later writers revoking its grants, its
    // refusals, and requests for its copy waiting for its own faults.
    assert!(
        s.suspicions > 2000 && s.reads > 100_000 && s.writes > 100_000 && s.ahead > 2_000,
        "{s:?}"
    );
    assert!(
        s.ended_for_failed > 500
            && s.timed_out > 500
            && s.revoked > 0
            && s.leaf_refused > 0
            && s.waited_for_own > 0,
        "{s:?}"
    );
}

#[test]
fn pages_installed_straight_into_requesters_keep_single_writer_and_fresh_reads() {
    // Jobs of both layouts in which homes install the pages they answer with straight into the
    // requester, whose threads use them before the answer is read: some with crashes, some with ranks
    // taken for failed while they live.
    let s = jobs(3000, |seed, ranks| Job {
        direct: true,
        suspicions: (seed / 9 % 3) as usize,
        ..either_layout(seed, ranks, (seed / 3 % 3) as usize)
    });
    // Pages installed that way, read and written before the answer was read, leaf requests for them
    // deferred until the answer's install, and answers to crashed requesters that a home took back
    // after one.
    assert!(
        s.direct > 50_000 && s.early_accesses > 100_000 && s.deferred_direct > 2_000,
        "{s:?}"
    );
    assert!(
        s.crashes > 500 && s.suspicions > 500 && s.unsent > 10 && s.unsent_held > 0,
        "{s:?}"
    );
}
