//! Release consistency at a home: batches of diffs, carries applied once before the barrier that
//! carries them, updates handed out at barriers, and diffs a sender has no right to send.

use super::*;

/// The fake rank's batch of diffs setting byte `at` of each of `pages` of `region` to `value` (pages in
/// the order given).
fn fake_sends_diffs(fake: &UnixStream, region: &RegionShared, pages: &[u64], at: usize, value: u8) {
    let twin = vec![0u8; PAGE_SIZE];
    let mut page = twin.clone();
    page[at] = value;
    let mut batch = Vec::new();
    for &p in pages {
        crate::protocol::diff::push_entry(p, &twin, &page, &mut batch);
    }
    let req = Request::Diffs {
        region: region.id,
        count: pages.len() as u32,
        selective: false,
    };
    write_frame(&dup(fake), &req, &[&batch], &Counters::default()).unwrap();
}

#[test]
fn a_batch_of_diffs_waits_whole_for_a_page_a_fault_of_the_home_holds() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 3, Consistency::Release);
    let shared = &region.inner;
    // Rank 0 writes its pages: present and writable here.
    // SAFETY: the region is three pages long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 1, 3 * PAGE_SIZE) };
    // A fault of rank 0 holds page 1 (as the fault path does, with its BUSY bit).
    shared
        .state(1)
        .fetch_or(crate::region::BUSY, Ordering::AcqRel);
    fake_sends_diffs(&f.fake, shared, &[0, 1, 2], 100, 7);
    let mut fake = &f.fake;
    fake.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        fake.read(&mut byte).is_err(),
        "the batch was answered while a page of it was held"
    );
    let bytes = |page: usize| {
        // SAFETY: the pages are present here (written above); diffs write them only under their BUSY
        // bits, held by this test or checked free below.
        unsafe { *region.as_ptr().add(page * PAGE_SIZE + 100) }
    };
    assert_eq!(
        (bytes(0), bytes(2)),
        (1, 1),
        "a page of a waiting batch changed: the batch is applied whole or not at all"
    );
    crate::fault::release_busy(shared, 1);
    let (reply, _) = fake_reads(&f.fake);
    assert!(matches!(reply, Reply::Ack), "{reply:?}");
    assert_eq!((bytes(0), bytes(1), bytes(2)), (7, 7, 7));
    assert_eq!(dsm.stats().diffs_applied, 3);
    assert!(dsm.failed_ranks().is_empty());
}

#[test]
fn a_batch_of_diffs_parked_here_is_not_applied_once_its_sender_has_failed() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 1, Consistency::Release);
    let shared = &region.inner;
    // SAFETY: the region is one page long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 1, PAGE_SIZE) };
    // A fault of rank 0 holds the page: the batch is parked.
    shared
        .state(0)
        .fetch_or(crate::region::BUSY, Ordering::AcqRel);
    fake_sends_diffs(&f.fake, shared, &[0], 100, 7);
    let mut fake = &f.fake;
    fake.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        fake.read(&mut [0u8; 1]).is_err(),
        "the batch was answered while its page was held"
    );
    // Its sender fails (its connection breaks; it may live on), and then the page is let go.
    drop(f.fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    crate::fault::release_busy(shared, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dsm.stats().diffs_applied,
        0,
        "a failed rank's diffs were applied"
    );
    // SAFETY: the page is present here (written above); nothing writes it any more (no diffs are
    // applied, as the counter says, and this test's thread is the only other user).
    assert_eq!(unsafe { *region.as_ptr().add(100) }, 1);
}

/// A carry (`rc::carry`) numbered `seq` of one diff that writes `value` at byte `at` of page 0 of
/// `region`.
fn carry_of(region: &RegionShared, seq: u64, at: usize, value: u8) -> Vec<u8> {
    let twin = vec![0u8; PAGE_SIZE];
    let mut page = twin.clone();
    page[at] = value;
    let mut bytes = Vec::new();
    crate::protocol::diff::push_entry(0, &twin, &page, &mut bytes);
    let carry = crate::rc::carry::Carry {
        seq,
        batches: vec![crate::rc::carry::CarriedBatch {
            region: region.id,
            count: 1,
            bytes,
        }],
    };
    postcard::to_allocvec(&carry).unwrap()
}

/// The fake rank sends `carry` in a request of its own, as another thread's release does.
fn fake_sends_carry(fake: &UnixStream, carry: &[u8]) {
    write_frame(
        &dup(fake),
        &Request::Carried,
        &[carry],
        &Counters::default(),
    )
    .unwrap();
}

#[test]
fn rank_0_applies_each_carry_once_before_it_answers_the_barrier_that_carries_it() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 1, Consistency::Release);
    let shared = &region.inner;
    // SAFETY: the region is one page long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 1, PAGE_SIZE) };
    let byte = || {
        // SAFETY: the page is present here (written above); diffs write it only under its BUSY bit,
        // checked free or held by this test when this reads.
        unsafe { *region.as_ptr().add(100) }
    };
    let notices = crate::rc::encode_notices(&[], &VectorClock::new(2));
    // The fake's barriers follow the four of the allocation.
    let arrive = |epoch: u64, carry: &[u8]| {
        let request = Request::Barrier {
            epoch,
            tag: 0,
            carried: carry.len() as u32,
        };
        write_frame(
            &dup(&f.fake),
            &request,
            &[carry, &notices],
            &Counters::default(),
        )
        .unwrap();
    };
    let answered = || {
        let (reply, _) = fake_reads(&f.fake);
        assert!(matches!(reply, Reply::BarrierDone), "{reply:?}");
    };
    // Carry 1 sent on its own (as another thread's release sends it) is applied and acknowledged.
    let first = carry_of(shared, 1, 100, 7);
    fake_sends_carry(&f.fake, &first);
    assert!(matches!(fake_reads(&f.fake).0, Reply::Ack));
    assert_eq!(byte(), 7);
    // A later write of the same byte, synchronized after it, reaches the home as diffs.
    fake_sends_diffs(&f.fake, shared, &[0], 100, 9);
    assert!(matches!(fake_reads(&f.fake).0, Reply::Ack));
    assert_eq!(byte(), 9);
    // The barrier arrival that carried carry 1 too comes after: it is not applied again.
    std::thread::scope(|sc| {
        let rank0 = sc.spawn(|| dsm.barrier());
        arrive(4, &first);
        answered();
        rank0.join().unwrap().unwrap();
    });
    assert_eq!(byte(), 9, "a carry was applied twice, over a later write");
    assert_eq!(dsm.stats().diffs_applied, 2);
    // A new carry goes with the next arrival; while a fault of rank 0 holds the page, the arrival waits
    // and the barrier is not answered.
    shared
        .state(0)
        .fetch_or(crate::region::BUSY, Ordering::AcqRel);
    std::thread::scope(|sc| {
        let rank0 = sc.spawn(|| dsm.barrier());
        arrive(5, &carry_of(shared, 2, 100, 3));
        let mut fake = &f.fake;
        fake.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            fake.read(&mut [0u8; 1]).is_err(),
            "the barrier was answered before the diffs its arrival carried were applied"
        );
        assert_eq!(byte(), 9);
        crate::fault::release_busy(shared, 0);
        answered();
        rank0.join().unwrap().unwrap();
    });
    assert_eq!(byte(), 3);
    assert_eq!(dsm.stats().diffs_applied, 3);
    assert!(dsm.failed_ranks().is_empty());
}

#[test]
fn a_carry_of_diffs_for_another_rank_s_pages_fails_its_sender() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    // Page 0 of a region homed at rank 1.
    let placement = Placement::At(Rank(1));
    let region = region_at(
        &dsm,
        std::slice::from_ref(&f),
        1,
        placement,
        Consistency::Release,
    );
    fake_sends_carry(&f.fake, &carry_of(&region.inner, 1, 8, 5));
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    assert_eq!(dsm.stats().diffs_applied, 0);
}

#[test]
fn a_barrier_arrival_carrying_updates_of_another_rank_s_writes_fails_its_sender() {
    use crate::protocol::release::{PageKey, Update};
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // An arrival of rank 1 whose update names `writer` as the rank that wrote it.
    let arrive = |writer: u32, epoch: u64| {
        let twin = vec![0u8; PAGE_SIZE];
        let mut page = twin.clone();
        page[8] = 5;
        let mut diff = Vec::new();
        crate::protocol::diff::encode(&twin, &page, &mut diff);
        let update = Update {
            rank: Rank(writer),
            interval: 1,
            page: PageKey { region: 1, page: 0 },
            diff,
        };
        let notices =
            crate::rc::encode_notices_within(&[], &VectorClock::new(2), &[update], usize::MAX);
        let request = Request::Barrier {
            epoch,
            tag: 0,
            carried: 0,
        };
        write_frame(&dup(&fake), &request, &[&notices], &Counters::default()).unwrap();
    };
    // Its own writes' update goes through: the barrier ends, and hands it back.
    let d = Arc::clone(&dsm);
    let rank0 = std::thread::spawn(move || d.barrier());
    arrive(1, 0);
    let (reply, payload) = fake_reads(&fake);
    assert!(matches!(reply, Reply::BarrierDone), "{reply:?}");
    let (_, _, updates) = crate::rc::decode_exchange(&payload, Rank(0), 2).unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].rank, Rank(1));
    rank0.join().unwrap().unwrap();
    // One naming rank 0 as the writer fails rank 1, and rank 0's next barrier says so.
    arrive(0, 1);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    let e = dsm.barrier().unwrap_err().to_string();
    assert!(e.contains("rank 1"), "{e}");
}

#[test]
fn a_barrier_hands_every_rank_at_most_a_mebibyte_of_updates_in_all() {
    // Up to four ranks, four arrivals' worth each; past that, less, so that the total stays bounded.
    for size in 1..=4 {
        assert_eq!(
            sync::all_update_bytes(size),
            4 * crate::rc::UPDATE_BYTES,
            "{size}"
        );
    }
    for size in 1..=1024 {
        let each = sync::all_update_bytes(size);
        assert!(size * each <= 1 << 20, "{size} ranks, {each} bytes each");
        // More ranks never get more each.
        assert!(each <= sync::all_update_bytes(size.max(2) - 1), "{size}");
    }
    assert_eq!(sync::all_update_bytes(64), 16 << 10);
}

#[test]
fn a_malformed_batch_of_diffs_fails_its_sender_and_changes_nothing() {
    // Pages out of order, a page twice (it would be taken twice, and wait for itself), and a page past
    // the region's end (refused: the sender may have a stale view of the region).
    for (pages, sender_fails) in [(&[1u64, 0][..], true), (&[1, 1], true), (&[0, 3], false)] {
        let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
        let f = fakes.pop().unwrap();
        let region = homed_region_with(&dsm, std::slice::from_ref(&f), 2, Consistency::Release);
        // SAFETY: the region is two pages long, and its test's only user of it.
        unsafe { std::ptr::write_bytes(region.as_ptr(), 1, 2 * PAGE_SIZE) };
        fake_sends_diffs(&f.fake, &region.inner, pages, 5, 9);
        if sender_fails {
            assert_eq!(
                failed_within(&dsm, Duration::from_secs(5)),
                vec![Rank(1)],
                "{pages:?}"
            );
        } else {
            let (reply, _) = fake_reads(&f.fake);
            assert!(
                matches!(
                    reply,
                    Reply::Refused {
                        reason: RefusedReason::PageOutOfRange
                    }
                ),
                "{pages:?}: {reply:?}"
            );
        }
        for page in 0..2 {
            // SAFETY: the pages are present here (written above) and nothing writes them now.
            let b = unsafe { *region.as_ptr().add(page * PAGE_SIZE + 5) };
            assert_eq!(b, 1, "{pages:?}: page {page} changed");
        }
        assert_eq!(dsm.stats().diffs_applied, 0);
    }
}

/// A home performs atomic operations on words of 4 and 8 bytes in place, changing no byte beside the
/// word, and fails a sender that names a word outside the page or not aligned for its width.
#[test]
fn a_home_performs_atomic_operations_on_words_of_either_width_and_fails_a_misplaced_one() {
    use crate::wire::{AtomicOp, WordKind};
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 1, Consistency::Release);
    // SAFETY: the region is one page long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 0x11, PAGE_SIZE) };
    let atomic = |offset: u16, kind: WordKind, op: AtomicOp| {
        fake_sends(
            &f.fake,
            Request::Atomic {
                region: region.inner.id,
                page: 0,
                offset,
                kind,
                op,
            },
        );
        match fake_reads(&f.fake).0 {
            Reply::Atomic { old } => old,
            other => panic!("{kind:?} {op:?} at {offset}: {other:?}"),
        }
    };
    // The upper half of an 8-byte word, then a whole word after it, signed.
    assert_eq!(atomic(12, WordKind::U32, AtomicOp::Add(5)), 0x1111_1111);
    assert_eq!(
        atomic(16, WordKind::I64, AtomicOp::Min(u64::MAX)),
        0x1111_1111_1111_1111
    );
    // SAFETY: the page is present here, and nothing else writes it now (the fake rank has its answers).
    let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), PAGE_SIZE) };
    assert_eq!(bytes[12..16], 0x1111_1116u32.to_ne_bytes());
    assert_eq!(bytes[16..24], (-1i64).to_ne_bytes());
    let untouched = bytes[..12].iter().chain(&bytes[24..]);
    assert!(
        untouched.into_iter().all(|&b| b == 0x11),
        "a byte beside the words changed"
    );
    assert_eq!(dsm.stats().atomics_served, 2);
    // A word of 8 bytes at byte 4: not aligned. The sender is failed, and the page stays as it was.
    fake_sends(
        &f.fake,
        Request::Atomic {
            region: region.inner.id,
            page: 0,
            offset: 4,
            kind: WordKind::U64,
            op: AtomicOp::Swap(0),
        },
    );
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    assert_eq!(bytes[4..8], [0x11; 4]);
    assert_eq!(dsm.stats().atomics_served, 2);
}
