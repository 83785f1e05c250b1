//! Ranks that leave or fail holding pages: their copies, grants and ownership, and pages whose only
//! copy left with its owner.

use super::*;

/// The fake rank asks rank 0 for page 0 of `region`: rank 0's answer.
fn fake_asks(fake: &UnixStream, region: &RegionShared, access: Access) -> Reply {
    fake_faults(fake, region, access);
    fake_reads(fake).0
}

/// The fake rank writes page 0 of `region`, which its home (rank 0) hands over at once: the fake then
/// owns the page, and its copy is the only one.
fn fake_owns(fake: &UnixStream, region: &RegionShared) {
    let reply = fake_asks(fake, region, Access::Write);
    assert!(matches!(reply, Reply::Done { .. }), "{reply:?}");
}

/// The fake rank `writer` asks rank 0 for write access to page 0 of `shared`, which rank 0 holds: the
/// ranks whose copies it must invalidate (none: the home completes the write itself).
fn copies_a_writer_invalidates(writer: &UnixStream, shared: &RegionShared) -> swmr::CopySet {
    fake_faults(writer, shared, Access::Write);
    match fake_reads(writer) {
        (Reply::Granted { grant, .. }, _) => grant.invalidate,
        (Reply::Done { .. }, _) => swmr::CopySet::EMPTY,
        (reply, _) => panic!("the write was answered with {reply:?}"),
    }
}

#[test]
fn a_rank_that_cuts_this_one_off_lives_on_with_its_copies() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    fake_reads_the_home_page(&fakes[0].fake, shared);
    // Rank 1 takes rank 0 for failed (its silence, say) and cuts it off, as `Channels::cut_off`
    // does: its channels' connections end both ways. Its service loop's own stays: it lives on.
    fakes[0].fake.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    // Its copy is still there, and a writer must have it invalidated (which fails while rank 1 is cut
    // off) rather than leave it readable and stale.
    let invalidate = copies_a_writer_invalidates(&fakes[1].fake, shared);
    assert!(
        invalidate.contains(Rank(1)),
        "the home forgot the copy of a rank that lives on: {invalidate:?}"
    );
}

#[test]
fn a_grant_to_fetch_from_a_rank_the_home_took_for_failed_says_so() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page: it owns the only copy.
    fake_owns(&fakes[0].fake, shared);
    // Rank 2 asks to read it, is granted a fetch from rank 1, and abandons the grant (the page is
    // unlocked as it was, for the next request): whether the grant said the home takes rank 1 for failed.
    let reader = &fakes[1].fake;
    let owner_failed = || {
        let reply = fake_asks(reader, shared, Access::Read);
        let Reply::Granted {
            grant,
            owner_failed,
        } = reply
        else {
            panic!("the read was answered with {reply:?}")
        };
        assert_eq!(grant.fetch_from, Some(Rank(1)));
        let abandon = Request::Abandon {
            region: shared.id,
            page: 0,
            access: Access::Read,
        };
        fake_sends(reader, abandon);
        owner_failed
    };
    assert!(!owner_failed());
    // Rank 1 cuts rank 0 off and lives on: the home takes it for failed (ending any transaction of
    // rank 1's on its pages early), and says so in a grant to fetch from it, so that rank 1 serves the
    // fetch only after any fault of its own on the page.
    fakes[0].fake.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    assert!(
        owner_failed(),
        "the grant did not say that its owner is taken for failed"
    );
}

#[test]
fn a_rank_that_leaves_holding_a_grant_does_not_keep_its_page_locked() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 2 takes the page to write; rank 1 then asks to write it, and the home grants it (rank 1 is
    // to fetch it from rank 2), holding the page locked until rank 1's Unlock.
    fake_owns(&fakes[1].fake, shared);
    let reply = fake_asks(&fakes[0].fake, shared, Access::Write);
    assert!(matches!(reply, Reply::Granted { .. }), "{reply:?}");
    // Rank 1 leaves the job cleanly, without its Unlock: goodbye on each of its connections to rank 0.
    let mut fakes = fakes.into_iter();
    let (rank1, _rank2) = (fakes.next().unwrap(), fakes.next().unwrap());
    for c in [&rank1.fake, &rank1.other] {
        fake_sends(c, Request::Goodbye);
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    drop(rank1);
    // The page is not left locked: the transaction ended as granted, rank 1 owning the page.
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = region.inner.clone();
    // (A thread of its own, so that a page left locked fails the test instead of hanging it.)
    std::thread::spawn(move || {
        let _ = tx.send(entry_when_free(&shared, 0));
    });
    let entry = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the page stays locked for a rank that has left");
    assert_eq!(entry.owner, Some(Rank(1)));
    assert_eq!(failed_within(&dsm, Duration::from_millis(200)), vec![]);
}

#[test]
fn an_owner_that_fails_reading_its_own_page_stays_its_owner_and_out_of_its_copies() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page (the home's copy goes to it), then asks to read it, as a rank whose copy
    // was dropped under it would: the home answers that it holds the page, and waits for its Unlock.
    let fake = &fakes[0].fake;
    fake_owns(fake, shared);
    let reply = fake_asks(fake, shared, Access::Read);
    let held = matches!(
        reply,
        Reply::Done {
            data: Data::None,
            ..
        }
    );
    assert!(held, "{reply:?}");
    // It fails before its Unlock: the transaction ends as it was decided, rank 1 owning the page.
    fake.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    let entry = entry_when_free(shared, 0);
    assert_eq!(entry.owner, Some(Rank(1)));
    assert!(
        !entry.copyset.contains(Rank(1)),
        "the owner is listed among its own page's readers: {entry:?}"
    );
}

#[test]
fn a_page_whose_only_copy_left_with_its_owner_is_refused_naming_it() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page: the home's copy goes to it, and its copy is the only one.
    fake_owns(&fakes[0].fake, shared);
    // Rank 1 dies, its service loop's connection ending too: it has left the job with the page.
    let mut fakes = fakes.into_iter();
    let (rank1, rank2) = (fakes.next().unwrap(), fakes.next().unwrap());
    drop(rank1);
    assert!(gone_within(shared, Rank(1)), "rank 1 was not seen to leave");
    // Rank 2's faults are refused naming rank 1 (they were granted, to fetch the page from it, and
    // failed to reach it), and leave the page unlocked for the next.
    for access in [Access::Read, Access::Write, Access::Read] {
        let reply = fake_asks(&rank2.fake, shared, access);
        let refused = matches!(
            reply,
            Reply::Refused {
                reason: RefusedReason::DataLeftWith(Rank(1))
            }
        );
        assert!(refused, "{access:?}: {reply:?}");
    }
    assert_eq!(entry_when_free(shared, 0).owner, Some(Rank(1)));
}

#[test]
fn an_abandoned_grant_unlocks_its_page_as_it_was_and_only_its_holder_may_abandon_it() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page: it owns the only copy.
    fake_owns(&fakes[0].fake, shared);
    // Rank 2 asks to read it and is granted a fetch from rank 1, which (as rank 2 would find were rank
    // 1 gone) it abandons; asked again, the home grants the same, so the first grant ended unrecorded.
    // Had the Abandon left the page locked, the second request would wait, and its reply time out.
    let abandon = Request::Abandon {
        region: shared.id,
        page: 0,
        access: Access::Read,
    };
    for round in 0..2 {
        let reply = fake_asks(&fakes[1].fake, shared, Access::Read);
        let granted =
            matches!(reply, Reply::Granted { grant, .. } if grant.fetch_from == Some(Rank(1)));
        assert!(granted, "round {round}: {reply:?}");
        fake_sends(&fakes[1].fake, abandon);
    }
    let entry = entry_when_free(shared, 0);
    assert_eq!(entry.owner, Some(Rank(1)));
    assert_eq!(entry.copyset, swmr::CopySet::EMPTY, "{entry:?}");
    assert_eq!(failed_within(&dsm, Duration::from_millis(200)), vec![]);
    // An Abandon of a transaction rank 2 does not hold is a protocol error: it could free a page lock
    // another transaction holds.
    fake_sends(&fakes[1].fake, abandon);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(2)]);
}

#[test]
fn a_grant_that_dropped_the_homes_copy_cannot_be_abandoned() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 reads the home's page; rank 2 then asks to write it, and is granted with the home's copy,
    // which the home drops as it grants (rank 1's is for rank 2 to invalidate).
    fake_reads_the_home_page(&fakes[0].fake, shared);
    let reply = fake_asks(&fakes[1].fake, shared, Access::Write);
    let granted = matches!(
        reply,
        Reply::Granted { grant, .. } if grant.home_action == swmr::HomeAction::Invalidate && grant.data_from_home
    );
    assert!(granted, "{reply:?}");
    // Abandoned, the entry would still list the home's copy, which is gone: refused as a protocol error.
    let abandon = Request::Abandon {
        region: shared.id,
        page: 0,
        access: Access::Write,
    };
    fake_sends(&fakes[1].fake, abandon);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(2)]);
}

#[test]
fn a_homes_fault_granted_before_it_saw_the_owner_leave_is_decided_again() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = region.inner.clone();
    // Rank 1 writes the page: the home's copy goes to it, and its copy is the only one.
    fake_owns(&fakes[0].fake, &shared);
    // Rank 1 dies in two steps: the ends of rank 0's channels to it close at once (the fetch of the
    // home's fault fails there), and its service loop's connection, whose end says that it has left the
    // job, 100 ms later. The fault is decided while rank 1 is failed at most, not gone: it is granted a
    // fetch from rank 1, which finds rank 1 gone once the home sees it leave.
    let mut fakes = fakes.into_iter();
    let rank1 = fakes.next().unwrap();
    for c in rank1.channels.iter().chain([&rank1.fake]) {
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let leaves = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(rank1);
    });
    let read = crate::fault::resolve(&shared, 0, false);
    leaves.join().unwrap();
    // Decided again once it was seen to leave, the page's only copy is known lost with rank 1 (the
    // fault used to end saying that the owner left while it fetched, whether a copy lived on or not).
    assert!(
        matches!(read, Err(crate::fault::FaultError::Lost(Rank(1)))),
        "{read:?}"
    );
    assert!(gone_within(&shared, Rank(1)));
}

#[test]
fn a_failed_rank_whose_service_loop_connection_ends_has_left_with_its_copies() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    fake_reads_the_home_page(&fakes[0].fake, shared);
    // Rank 1 dies, and rank 0 sees its channel's connection end first: it is failed, and its service
    // loop's connection, ending later, still says that it has left the job.
    let mut fakes = fakes.into_iter();
    let (rank1, writer) = (fakes.next().unwrap(), fakes.next().unwrap());
    drop(rank1.fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    std::thread::sleep(Duration::from_millis(100));
    drop(rank1.other);
    gone_within(shared, Rank(1));
    // Its copy went with it: a writer has nothing of it to invalidate.
    let invalidate = copies_a_writer_invalidates(&writer.fake, shared);
    assert!(
        !invalidate.contains(Rank(1)),
        "the home keeps the copy of a rank that has left: {invalidate:?}"
    );
}

#[test]
fn untouched_pages_stay_untouched_when_their_first_reader_cannot_be_answered() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let pages = 4;
    let region = homed_region(&dsm, &fakes, pages);
    let shared = &region.inner;
    // Rank 1 reads the first page, with read-ahead over the others, and stops reading: each would be
    // its (zeros, as their first toucher), but the answer cannot be sent.
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults_ahead(&fakes[0].fake, shared, Access::Read, pages as u32);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    for p in 0..pages as u64 {
        assert_eq!(
            entry_when_free(shared, p),
            swmr::Entry::default(),
            "page {p} is recorded as the failed rank's"
        );
    }
    // So the home writes them as their first toucher, without asking the failed rank for them.
    for p in 0..pages {
        // SAFETY: the region is `pages` pages long, and this test's only user of it.
        unsafe { *region.as_ptr().add(p * PAGE_SIZE) = p as u8 + 1 };
    }
    for p in 0..pages as u64 {
        assert_eq!(entry_when_free(shared, p).owner, Some(Rank(0)), "page {p}");
    }
}
