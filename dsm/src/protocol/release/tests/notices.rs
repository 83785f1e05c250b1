//! Write notices on their own: what a lock passes on and a barrier keeps, horizons, the bound on a
//! notice set, and each rank's interval counter.

use super::*;

#[test]
fn a_notice_learned_through_a_lock_but_not_exchanged_survives_the_barrier() {
    // Rank 1 has two threads: one arrives at the barrier with no notice, then the other closes interval 1
    // and releases a lock, which rank 0 takes, learning interval 1. The barrier exchanges nothing of rank 1,
    // so rank 0 must keep interval 1 and pass it with the next lock it releases, or a rank 2 that takes that
    // lock would never drop its stale copy of page 5 until the next barrier.
    let mut r0 = RcRank::new(Rank(0), 3);
    let mut r1 = RcRank::new(Rank(1), 3);
    let exchanged_by_r1 = r1.own_notices().to_vec();
    assert!(exchanged_by_r1.is_empty());
    r1.close_interval(vec![key(5)]).unwrap();
    r0.acquire(&r1.notices_to_pass(0).0, &Z, &[], not_homed(|_| false));
    assert_eq!(r0.clock().0, vec![0, 1, 0]);
    assert_eq!(
        r0.barrier_done(&exchanged_by_r1, &Z),
        None,
        "no barrier before this one"
    );
    let passed = r0.notices_to_pass(0).0;
    assert!(
        passed.iter().any(|n| n.rank == Rank(1) && n.interval == 1),
        "interval 1 of rank 1 was dropped: {passed:?}"
    );
    let mut r2 = RcRank::new(Rank(2), 3);
    assert_eq!(
        pages_of(
            &r2.acquire(&passed, &Z, &[], not_homed(|_| false))
                .invalidate
        ),
        vec![key(5)]
    );
    // Once a barrier exchanges it, it is still passed on until the barrier after, when lock homes may
    // forget it too.
    let exchanged = r1.own_notices().to_vec();
    for rc in [&mut r0, &mut r2] {
        rc.acquire(&exchanged, &Z, &[], not_homed(|_| false));
    }
    let stable = r0
        .barrier_done(&exchanged, &Z)
        .expect("the cut of the first barrier");
    assert!(
        !stable.covers(&exchanged[0]),
        "the first barrier exchanged nothing of rank 1"
    );
    assert_eq!(r0.notices_to_pass(0).0.len(), 1);
    let stable = r0
        .barrier_done(&[], &Z)
        .expect("the cut of the second barrier");
    assert!(stable.covers(&exchanged[0]));
    assert!(r0.notices_to_pass(0).0.is_empty());
}

#[test]
fn a_later_interval_learned_through_a_lock_does_not_hide_an_earlier_one_a_barrier_brings() {
    // Rank 1 (the writer) and rank 0 have passed one barrier. Rank 1 writes page 5 in interval 1 and
    // arrives at the next barrier with it. That barrier completes at rank 1 first; a thread of rank 1
    // writes page 6 (interval 2) and releases a lock, which a thread of rank 0 takes before rank 0's own
    // thread has taken the barrier's notices in. Rank 0 must still drop page 5: the lock must bring
    // interval 1 along with interval 2, since the clock then covers interval 1 and the barrier's acquire
    // skips it. (Once, rank 1 forgot interval 1 at that barrier and passed interval 2 alone.)
    let mut r0 = RcRank::new(Rank(0), 2);
    let mut r1 = RcRank::new(Rank(1), 2);
    assert_eq!(r0.barrier_done(&[], &Z), None);
    assert_eq!(r1.barrier_done(&[], &Z), None);
    r1.close_interval(vec![key(5)]).unwrap();
    let exchanged = r1.own_notices().to_vec();
    r1.acquire(&exchanged, &Z, &[], not_homed(|_| false));
    r1.barrier_done(&exchanged, &Z);
    r1.close_interval(vec![key(6)]).unwrap();
    let mut dropped = pages_of(
        &r0.acquire(&r1.notices_to_pass(0).0, &Z, &[], not_homed(|_| false))
            .invalidate,
    );
    dropped.extend(pages_of(
        &r0.acquire(&exchanged, &Z, &[], not_homed(|_| false))
            .invalidate,
    ));
    r0.barrier_done(&exchanged, &Z);
    dropped.sort();
    assert_eq!(dropped, vec![key(5), key(6)], "rank 0 kept a stale page");
}

#[test]
fn a_notice_set_keeps_one_of_each_forgets_what_a_cut_covers_and_finds_what_a_clock_lacks() {
    let mut set = NoticeSet::default();
    for (r, i) in [(2, 1), (0, 3), (0, 1), (2, 2), (0, 2), (0, 3)] {
        set.insert(notice(r, i, u64::from(10 * r + i)));
    }
    assert_eq!(set.len(), 5, "the second (0, 3) is the same notice");
    let keys = |v: Vec<WriteNotice>| v.iter().map(|n| (n.rank.0, n.interval)).collect::<Vec<_>>();
    assert_eq!(keys(set.all()), [(0, 1), (0, 2), (0, 3), (2, 1), (2, 2)]);
    assert_eq!(
        keys(set.unseen(&VectorClock(vec![2, 0, 1]))),
        [(0, 3), (2, 2)]
    );
    // A clock shorter than the job, or at the end of the counter, covers what it can.
    assert_eq!(keys(set.unseen(&VectorClock(vec![3]))), [(2, 1), (2, 2)]);
    assert!(set.unseen(&VectorClock(vec![u32::MAX; 3])).is_empty());
    set.forget_covered(&VectorClock(vec![2, 5, 0]));
    assert_eq!(keys(set.all()), [(0, 3), (2, 1), (2, 2)]);
    assert_eq!(set.len(), 3);
    set.forget_covered(&VectorClock(vec![u32::MAX, 0, 2]));
    assert!(set.is_empty() && set.all().is_empty());
}

#[test]
fn a_release_passes_through_a_lock_only_what_it_did_not_pass_before_and_nothing_is_lost() {
    // Three ranks take turns on two locks, with no barrier: rank 0 writes under lock A, rank 1 takes A
    // and releases lock B, rank 2 takes B and must drop rank 0's page (transitively), and every release
    // passes only what is new for its lock.
    let mut rc: Vec<RcRank> = (0..3).map(|r| RcRank::new(Rank(r), 3)).collect();
    let mut union = [NoticeSet::default(), NoticeSet::default()];
    let (a, b) = (0usize, 1usize);
    let take = |rc: &mut RcRank, union: &NoticeSet| {
        let grant = union.unseen(rc.clock());
        pages_of(&rc.acquire(&grant, &Z, &[], not_homed(|_| false)).invalidate)
    };
    let give = |rc: &mut RcRank, union: &mut NoticeSet, lock: usize| {
        let (passed, _, clock) = rc.notices_to_pass(lock as u64);
        let n = passed.len();
        for p in passed {
            union.insert(p);
        }
        rc.passed_through(lock as u64, clock);
        n
    };
    for round in 1..=50u64 {
        take(&mut rc[0], &union[a]);
        rc[0].close_interval(vec![key(round as usize)]).unwrap();
        assert!(
            give(&mut rc[0], &mut union[a], a) <= 1,
            "rank 0 passes its new interval only"
        );
        let dropped = take(&mut rc[1], &union[a]);
        assert_eq!(dropped, vec![key(round as usize)]);
        give(&mut rc[1], &mut union[a], a);
        take(&mut rc[1], &union[b]);
        let passed = give(&mut rc[1], &mut union[b], b);
        assert!(
            passed <= 2,
            "round {round}: rank 1 passed {passed} notices through B"
        );
        let dropped = take(&mut rc[2], &union[b]);
        assert_eq!(
            dropped,
            vec![key(round as usize)],
            "round {round}: rank 2 kept a stale page"
        );
        give(&mut rc[2], &mut union[b], b);
    }
    assert_eq!(union[a].len(), 50);
}

#[test]
fn a_notice_learned_between_passing_and_recording_is_passed_next_time() {
    // Another thread of the rank learns a notice between the release's snapshot and its record: the record
    // must be the snapshot, or that notice would never go through this lock.
    let mut x = RcRank::new(Rank(0), 2);
    let (passed, _, clock) = x.notices_to_pass(7);
    assert!(passed.is_empty());
    x.acquire(&[notice(1, 1, 3)], &Z, &[], not_homed(|_| false));
    x.passed_through(7, clock);
    let (passed, ..) = x.notices_to_pass(7);
    assert_eq!(passed, vec![notice(1, 1, 3)]);
}

#[test]
fn an_acquirer_behind_a_horizon_drops_everything_and_passes_the_horizon_on() {
    // Rank 0 writes page 1 in interval 1 and page 2 in interval 2. Rank 1 takes a lock whose home forgot
    // interval 1: the grant brings interval 2 and a horizon of interval 1. Rank 1 cannot know what interval
    // 1 wrote, so it drops every cached page; then it passes both notices it has and the horizon through
    // another lock, and rank 2, which has seen nothing of rank 0, must drop everything too (interval 2
    // alone would leave its copy of page 1).
    let mut w = RcRank::new(Rank(0), 3);
    let mut y = RcRank::new(Rank(1), 3);
    let mut z = RcRank::new(Rank(2), 3);
    w.close_interval(vec![key(1)]).unwrap();
    w.close_interval(vec![key(2)]).unwrap();
    let interval_2: Vec<WriteNotice> = w
        .notices_to_pass(0)
        .0
        .into_iter()
        .filter(|n| n.interval == 2)
        .collect();
    let forgot_1 = VectorClock(vec![1, 0, 0]);
    let a = y.acquire(&interval_2, &forgot_1, &[], not_homed(|_| false));
    assert!(a.everything, "rank 1 could not know what interval 1 wrote");
    assert_eq!(y.clock().0, vec![2, 0, 0]);
    assert_eq!(y.horizon(), &forgot_1);
    // Seen from now on: the same horizon again changes nothing.
    assert!(
        !y.acquire(&[], &forgot_1, &[], not_homed(|_| false))
            .everything
    );
    let (passed, ..) = y.notices_to_pass(7);
    assert_eq!(passed, interval_2);
    let a = z.acquire(&passed, y.horizon(), &[], not_homed(|_| false));
    assert!(a.everything, "rank 2 kept its copy of page 1");
    // A rank whose clock covered the horizon already takes the notices as usual.
    let mut v = RcRank::new(Rank(2), 3);
    let all = w.notices_to_pass(0).0;
    v.acquire(&all[..1], &Z, &[], not_homed(|_| false));
    let a = v.acquire(&passed, y.horizon(), &[], not_homed(|_| false));
    assert!(!a.everything);
    assert_eq!(pages_of(&a.invalidate), vec![key(2)]);
}

#[test]
fn a_notice_set_over_its_bound_forgets_each_writers_oldest_first() {
    let mut set = NoticeSet::default();
    for i in 1..=6 {
        set.insert(notice(0, i, u64::from(i)));
        set.insert(notice(2, i, u64::from(10 + i)));
    }
    let one = NOTICE_BYTES + RUN_BYTES;
    assert_eq!(set.bytes(), 12 * one);
    let mut horizon = VectorClock::new(3);
    assert_eq!(set.forget_oldest(7 * one, &mut horizon), 5);
    assert_eq!(set.bytes(), 7 * one);
    assert_eq!(horizon.0, vec![3, 0, 2], "writers take turns, oldest first");
    let keys: Vec<_> = set.all().iter().map(|n| (n.rank.0, n.interval)).collect();
    assert_eq!(
        keys,
        [(0, 4), (0, 5), (0, 6), (2, 3), (2, 4), (2, 5), (2, 6)]
    );
    // Forgetting what a cut covers keeps the count right.
    set.forget_covered(&VectorClock(vec![5, 0, 3]));
    assert_eq!(set.bytes(), 4 * one);
    // Each writer's latest notice stays, whatever the bound.
    assert_eq!(set.forget_oldest(0, &mut horizon), 2);
    let keys: Vec<_> = set.all().iter().map(|n| (n.rank.0, n.interval)).collect();
    assert_eq!(keys, [(0, 6), (2, 6)]);
    assert_eq!(set.bytes(), 2 * one);
    assert_eq!(horizon.0, vec![3, 0, 5]);
    // Forgetting them all takes the latest too, behind the horizon.
    assert_eq!(set.forget_all(&mut horizon), 2);
    assert!(set.all().is_empty());
    assert_eq!(set.bytes(), 0);
    assert_eq!(horizon.0, vec![6, 0, 6]);
}

#[test]
fn a_peer_cannot_move_a_ranks_own_interval_counter() {
    // A horizon or a notice naming intervals of this rank that it never closed comes only from a faulty
    // peer: both are ignored (taking them would make this rank's next interval look seen everywhere).
    let mut x = RcRank::new(Rank(1), 2);
    let a = x.acquire(
        &[notice(1, u32::MAX, 4)],
        &VectorClock(vec![0, u32::MAX]),
        &[],
        not_homed(|_| false),
    );
    assert_eq!(a, Acquire::default());
    assert_eq!(x.clock().0, vec![0, 0]);
    assert_eq!(
        x.close_interval(vec![key(4)]).unwrap().map(|n| n.interval),
        Some(1)
    );
}

#[test]
fn the_last_interval_number_is_used_and_then_releases_are_refused() {
    let mut x = RcRank::new(Rank(0), 2);
    x.clock.0[0] = u32::MAX - 1;
    let last = x.close_interval(vec![key(1)]).unwrap();
    assert_eq!(last.map(|n| n.interval), Some(u32::MAX));
    // The next would wrap to 0, an interval every rank takes for seen.
    assert_eq!(x.close_interval(vec![key(2)]), Err(IntervalsExhausted));
    assert_eq!(x.clock().0, vec![u32::MAX, 0], "nothing changed");
    // Nothing written, nothing to announce: not refused.
    assert_eq!(x.close_interval(Vec::new()), Ok(None));
}
