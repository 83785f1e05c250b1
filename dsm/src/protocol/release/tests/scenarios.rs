//! Single scenarios of the simulation, each built step by step: what an acquire drops and flushes, and
//! what a home announces of its own writes.

use super::*;

#[test]
fn a_rank_that_acquires_invalidates_what_others_wrote_except_its_home_pages() {
    let mut a = RcRank::new(Rank(0), 2);
    let mut b = RcRank::new(Rank(1), 2);
    let notice = b.close_interval(vec![key(4), key(3), key(4)]).unwrap();
    let notice = notice.expect("pages were written");
    assert_eq!((notice.rank, notice.interval), (Rank(1), 1));
    assert_eq!(notice.pages().collect::<Vec<_>>(), vec![key(3), key(4)]);
    // Rank 0 is the home of page 4 (even pages here): it keeps it.
    let acq = a.acquire(
        &b.notices_to_pass(0).0,
        &Z,
        &[],
        not_homed(|k| k.page % 2 == 0),
    );
    assert_eq!(pages_of(&acq.invalidate), vec![key(3)]);
    // The same notices again change nothing.
    assert_eq!(
        a.acquire(&b.notices_to_pass(0).0, &Z, &[], not_homed(|_| false)),
        Acquire::default()
    );
    assert_eq!(a.clock().0, vec![0, 1]);
}

#[test]
fn an_acquire_drops_each_page_of_overlapping_runs_once() {
    let run = |first, len| PageRun {
        region: 0,
        first,
        len,
    };
    let notice = |rank, runs| WriteNotice {
        rank: Rank(rank),
        interval: 1,
        runs,
    };
    let mut a = RcRank::new(Rank(0), 3);
    // Two writers' runs overlap (10..20 and 15..30) and touch (30..35).
    let notices = [
        notice(1, vec![run(10, 10), run(30, 5)]),
        notice(2, vec![run(2, 2), run(15, 15)]),
    ];
    let acq = a.acquire(&notices, &Z, &[], not_homed(|k| k.page == 16));
    assert_eq!(
        acq.invalidate,
        vec![run(2, 2), run(10, 6), run(17, 18)],
        "sorted, merged, without the page homed here"
    );
}

#[test]
fn runs_named_by_many_notices_are_walked_once() {
    // A thousand intervals of one writer, each writing the same 2^20 pages (a lock-protected sweep, say):
    // the acquire hands the engine one run to walk, not a thousand.
    let mut a = RcRank::new(Rank(0), 2);
    let notices: Vec<WriteNotice> = (1..=1000)
        .map(|interval| WriteNotice {
            rank: Rank(1),
            interval,
            runs: vec![PageRun {
                region: 3,
                first: 0,
                len: 1 << 20,
            }],
        })
        .collect();
    let calls = std::cell::Cell::new(0);
    let acq = a.acquire(&notices, &Z, &[], |run, out| {
        calls.set(calls.get() + 1);
        out.push(run);
    });
    assert_eq!(calls.get(), 1);
    assert_eq!(
        acq.invalidate,
        vec![PageRun {
            region: 3,
            first: 0,
            len: 1 << 20
        }]
    );
}

#[test]
fn a_page_written_here_and_elsewhere_is_flushed_before_it_is_dropped() {
    // Page 1 is homed at rank 1. Rank 0 writes byte 0 of it (a twin), rank 1 byte 1 (recorded: rank 0
    // fetched the page), then rank 1 releases and rank 0 acquires its notice before releasing.
    let mut sim = Sim::new(2, 2, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    sim.write(0, 1, 0, 7);
    sim.write(1, 1, 1, 9);
    assert_eq!(sim.unseen_home_writes, 0);
    let notice = sim.release(1).expect("the home's write is recorded");
    sim.acquire(0, &[notice], &Z);
    assert_eq!(sim.flushed, 1);
    assert_eq!(sim.master[1][..2], [7, 9], "both writes at the home");
    assert_eq!(
        sim.state[0][1],
        INVALID | WRITTEN | PARTIAL,
        "dropped, still listed for the notice, its write sent before the interval closes"
    );
    assert_eq!(sim.read(0, 1, 1), 9);
    // The release names the page but sends no second diff, since it was not written again.
    let diffs = sim.diffs_applied;
    let notice = sim.release(0).expect("rank 0 wrote page 1");
    assert_eq!(notice.pages().collect::<Vec<_>>(), vec![key(1)]);
    assert_eq!(sim.diffs_applied, diffs);
    // Written again after the flush, in a new interval: a new twin, and a diff of that write alone.
    sim.write(0, 1, 0, 8);
    sim.release(0);
    assert_eq!(sim.master[1][..2], [8, 9]);
}

#[test]
fn a_home_writes_unseen_until_another_rank_fetches_its_page() {
    let mut sim = Sim::new(2, 2, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    sim.write(1, 1, 5, 3);
    assert_eq!(sim.unseen_home_writes, 1);
    assert_eq!(
        sim.release(1),
        None,
        "no copy elsewhere: nothing to announce"
    );
    assert_eq!(sim.read(0, 1, 5), 3);
    assert_eq!(
        sim.state[1][1],
        READ_ONLY | SHARED,
        "the fetch write-protects the home's page"
    );
    sim.write(1, 1, 5, 4);
    assert_eq!(sim.unseen_home_writes, 1);
    let notice = sim.release(1).expect("recorded once shared");
    assert_eq!(sim.read(0, 1, 5), 3, "stale until rank 0 acquires");
    sim.acquire(0, &[notice], &Z);
    assert_eq!(sim.read(0, 1, 5), 4);
}

/// A home's write that leaves a byte as another rank's diff made it is a write all the same: a rank that
/// acquires from the home after it must drop its copy, though the diff's writer, whose release was
/// selective, has made no notice of the page yet.
#[test]
fn a_home_announces_its_write_over_a_selectively_released_diff_even_of_the_same_value() {
    let mut sim = Sim::new(3, 1, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    let (home, writer, reader) = (0, 1, 2);
    assert_eq!(sim.read(reader, 0, 5), 0);
    sim.write(writer, 0, 5, 1);
    sim.release_page(writer, 0);
    // Ordered after the selective release by other means, the home stores the value the byte has.
    assert_eq!(sim.read(home, 0, 5), 1);
    sim.write(home, 0, 5, 1);
    let notice = sim.release(home).expect("the home wrote the page");
    sim.acquire(reader, &[notice], &Z);
    assert_eq!(sim.read(reader, 0, 5), 1, "the reader kept its stale copy");
}

/// A home's write that a fetch caught and the home then undid, on a page another rank's diff made
/// writable there: the home's release must announce the page although its bytes are its twin's again,
/// or the rank that fetched it keeps the undone write after it acquires that release.
#[test]
fn a_home_write_a_fetch_caught_and_the_home_undid_is_announced() {
    let mut sim = Sim::new(3, 1, DEFAULT_NOTICE_MEMORY, &mut StdRng::seed_from_u64(0));
    let (home, writer, reader) = (0, 1, 2);
    // The writer's copy write-protects the home's page; its diff then makes it DIFFED there.
    sim.write(writer, 0, 1, 5);
    sim.release(writer);
    assert_ne!(sim.state[home][0] & DIFFED, 0);
    sim.write(home, 0, 0, 1);
    assert_eq!(
        sim.read(reader, 0, 2),
        0,
        "the reader's fetch catches the home's 1"
    );
    assert_eq!(sim.local[reader][0].as_ref().unwrap()[0], 1);
    sim.write(home, 0, 0, 0);
    let notice = sim.release(home).expect("the home wrote the page");
    sim.acquire(reader, &[notice], &Z);
    assert_eq!(
        sim.read(reader, 0, 0),
        0,
        "the reader kept the undone write"
    );
    // Caught by nothing, a write the home undoes is spared as before: its twin says nothing changed.
    sim.write(writer, 0, 1, 6);
    sim.release(writer);
    sim.write(home, 0, 0, 1);
    sim.write(home, 0, 0, 0);
    assert_eq!(sim.release(home), None);
}
