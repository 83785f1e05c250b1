//! Locks and barriers at their manager: releases by a rank that does not hold the lock, arrivals that
//! carry another rank's notices, holders that fail, and grants that cannot be sent.

use super::*;

/// A thread of rank 0 that takes lock 0 and says what came of it (the time it got the lock, or the
/// error). The thread is left to itself, so that a lock lost for good fails a test instead of hanging
/// it.
fn taker(dsm: &Arc<Dsm>) -> std::sync::mpsc::Receiver<crate::Result<Instant>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dsm = Arc::clone(dsm);
    std::thread::spawn(move || {
        let _ = tx.send(dsm.lock(0).map(|_g| Instant::now()));
    });
    rx
}

/// When another thread of rank 0 gets lock 0 (homed at rank 0), asking while `guard` is held for 200
/// ms, and when the guard went: `None` if it did not get it within 5 s.
fn next_taker_gets_it(dsm: &Arc<Dsm>, guard: crate::LockGuard<'_>) -> Option<(Instant, Instant)> {
    let rx = taker(dsm);
    std::thread::sleep(Duration::from_millis(200));
    let released = Instant::now();
    drop(guard);
    let got = rx.recv_timeout(Duration::from_secs(5)).ok()?.ok()?;
    Some((released, got))
}

#[test]
fn a_release_by_a_rank_that_does_not_hold_the_lock_is_refused() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    let guard = dsm.lock(0).unwrap();
    // Rank 1 releases lock 0, which rank 0 holds: a protocol error, and rank 1 is cut off.
    fake_sends(&fake, Request::LockRelease { lock: 0 });
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    // The lock is still rank 0's: another taker gets it only once the guard goes.
    let (released, got) = next_taker_gets_it(&dsm, guard).expect("the lock was lost");
    assert!(
        got >= released,
        "a second holder got the lock while the first held it"
    );
}

#[test]
fn a_barrier_arrival_carrying_another_ranks_notices_or_horizon_cuts_its_sender_off() {
    use crate::protocol::release::{PageRun, WriteNotice};
    let others_notice = WriteNotice {
        rank: Rank(0),
        interval: 1_000_000,
        runs: vec![PageRun {
            region: 1,
            first: 0,
            len: 1,
        }],
    };
    let own_notice = WriteNotice {
        rank: Rank(1),
        ..others_notice.clone()
    };
    let others_horizon = VectorClock(vec![1_000_000, 0]);
    for (notices, horizon, foreign) in [
        (vec![own_notice.clone()], VectorClock::new(2), false),
        (vec![own_notice, others_notice], VectorClock::new(2), true),
        (Vec::new(), others_horizon, true),
    ] {
        let (dsm, fake, _other) = rank0_with_fake_peer();
        let payload = crate::rc::encode_notices(&notices, &horizon);
        let request = Request::Barrier {
            epoch: 0,
            tag: 0,
            carried: 0,
        };
        write_frame(&dup(&fake), &request, &[&payload], &Counters::default()).unwrap();
        let failed = failed_within(&dsm, Duration::from_millis(500));
        let want = if foreign { vec![Rank(1)] } else { Vec::new() };
        assert_eq!(failed, want, "{notices:?} {horizon:?}");
    }
}

#[test]
fn those_waiting_for_a_lock_whose_holder_failed_are_told_and_later_takers_too() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // Rank 1 takes lock 0 (homed at rank 0), then a thread of rank 0 waits for it.
    fake_sends(&fake, Request::LockAcquire { lock: 0 });
    std::thread::sleep(Duration::from_millis(100));
    let rx = taker(&dsm);
    std::thread::sleep(Duration::from_millis(100));
    // Rank 1 fails holding it (a frame rank 0 cannot take: a reply where a request belongs).
    write_frame(&dup(&fake), &Reply::Ack, &[], &Counters::default()).unwrap();
    let told = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the waiter was left waiting");
    match told {
        Err(crate::DsmError::PeerFailed { rank, .. }) => assert_eq!(rank, Rank(1)),
        other => panic!("{other:?}"),
    }
    match dsm.lock(0).map(drop) {
        Err(crate::DsmError::PeerFailed { rank, .. }) => assert_eq!(rank, Rank(1)),
        other => panic!("a later taker: {other:?}"),
    }
}

#[test]
fn a_lock_being_granted_is_not_let_go_with_the_idle_ones() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // Idle lock servers (even ids are homed at rank 0), as many as the home keeps less one: a
    // release lets the idle ones go once there are more (servers are let go only at releases).
    for k in 0..(2 * sync::KEPT_LOCKS as u64 - 1) {
        drop(dsm.lock(1000 + 2 * k).unwrap());
    }
    // Rank 0 holds lock 0 and rank 1 waits for it; with one more lock held, rank 0's release of lock
    // 0 hands it to rank 1 while the home lets its idle servers go.
    let guard = dsm.lock(0).unwrap();
    fake_sends(&fake, Request::LockAcquire { lock: 0 });
    std::thread::sleep(Duration::from_millis(100));
    let other = dsm.lock(998).unwrap();
    drop(guard);
    // Rank 1 holds it now: rank 0 gets it again only after rank 1's release.
    let rx = taker(&dsm);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "rank 0 got the lock while rank 1 held it"
    );
    let released = Instant::now();
    fake_sends(&fake, Request::LockRelease { lock: 0 });
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("rank 1's release did not hand the lock on")
        .unwrap();
    assert!(got >= released);
    assert!(dsm.failed_ranks().is_empty());
    drop(other);
    // Rank 1 leaves, so that rank 0's end of the job does not wait for it.
    drop(fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
}

#[test]
fn a_grant_that_cannot_be_sent_passes_the_lock_on() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    let guard = dsm.lock(0).unwrap();
    // Rank 1 waits for lock 0, then stops reading (as a rank that dies does, before its end of the
    // connection is seen): the grant to it fails when rank 0 releases.
    fake_sends(&fake, Request::LockAcquire { lock: 0 });
    // The wait is queued before rank 0's own next request (the loop serves in order of arrival).
    std::thread::sleep(Duration::from_millis(100));
    fake.shutdown(std::net::Shutdown::Read).unwrap();
    // Rank 0's next taker (queued behind rank 1) gets the lock after all.
    assert!(
        next_taker_gets_it(&dsm, guard).is_some(),
        "the lock stayed with a rank that never got it"
    );
    assert_eq!(dsm.failed_ranks(), vec![Rank(1)]);
}
