//! Pages under sequential consistency at their home: what the home keeps when a page, grant or
//! upgrade cannot reach its rank, faults whose home leaves, grants naming an owner that left, coalesced
//! faults, invalidations that find a grant running, and requests for the copy of a rank whose home took
//! it for failed.

use super::*;

/// Rank 0 and the `fakes` allocate a region of one page, under sequential consistency, homed at rank 1
/// (a fake: the test plays its home).
fn page_at_rank1<'d>(dsm: &'d Dsm, fakes: &[FakeRank]) -> Region<'d> {
    region_at(
        dsm,
        fakes,
        1,
        Placement::At(Rank(1)),
        Consistency::Sequential,
    )
}

/// Once rank 1 is failed and the request it made is done with, rank 0 still holds the page as it was
/// (read-only: the copy was put back), with the manager's entry `expected`.
fn home_kept_it(dsm: &Dsm, region: &Region<'_>, expected: swmr::Entry) {
    assert_eq!(failed_within(dsm, Duration::from_secs(5)), vec![Rank(1)]);
    let shared = &region.inner;
    // The failure is recorded while the request is served, under the page's manager lock.
    let entry = entry_when_free(shared, 0);
    let state = || shared.state(0).load(Ordering::Acquire) & STATE_MASK;
    assert_eq!(
        state(),
        READ_ONLY,
        "the home's copy went with a rank that never got it"
    );
    assert_eq!(entry, expected);
    // SAFETY: the region is one page long, present here, so reading it does not fault.
    let now = unsafe { std::slice::from_raw_parts(region.as_ptr(), PAGE_SIZE) };
    assert!(now == &pattern()[..], "the page came back changed");
}

#[test]
fn a_home_whose_page_cannot_reach_a_writer_keeps_it() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    let before = shared.slot(0).load();
    assert_eq!(before.owner, Some(Rank(0)));
    // Rank 1 asks to write the page, then stops reading, as a rank that dies does: the page the home
    // gives up for it cannot be sent.
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults(&fakes[0].fake, shared, Access::Write);
    home_kept_it(&dsm, &region, before);
    // And the home writes it again, an upgrade of the copy it holds.
    // SAFETY: the region is one page long, and this test's only user of it.
    unsafe { *region.as_ptr() = 0xAB };
    assert_eq!(
        shared.state(0).load(Ordering::Acquire) & STATE_MASK,
        READ_WRITE
    );
}

#[test]
fn a_home_whose_grant_cannot_reach_a_writer_keeps_its_copy() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 2 reads the page: the home keeps a copy beside it.
    fake_reads_the_home_page(&fakes[1].fake, shared);
    // Rank 1 asks to write it, and stops reading: the grant (the home's copy, and rank 2's to
    // invalidate) cannot reach it, and rank 2's copy stays valid.
    let mut readers = swmr::CopySet::EMPTY;
    readers.insert(Rank(2));
    let expected = swmr::Entry {
        owner: Some(Rank(0)),
        copyset: readers,
    };
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults(&fakes[0].fake, shared, Access::Write);
    home_kept_it(&dsm, &region, expected);
}

#[test]
fn a_home_whose_upgrade_cannot_reach_its_reader_keeps_its_copy() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 reads the page: the home keeps its copy, read-only, beside rank 1's.
    fake_reads_the_home_page(&fakes[0].fake, shared);
    let before = shared.slot(0).load();
    assert!(before.owner == Some(Rank(0)) && before.copyset.contains(Rank(1)));
    // Rank 1 asks to write the copy it holds, and stops reading: the home drops its copy for an
    // upgrade that cannot be sent, and rank 1's copy, the only other one, is with a failed rank.
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults(&fakes[0].fake, shared, Access::Write);
    home_kept_it(&dsm, &region, before);
}

/// The next request rank 0 sends the fake on one of its channels (within ten seconds), and that
/// channel's end.
fn fake_takes_request(f: &FakeRank) -> (Request, &UnixStream) {
    use std::os::fd::AsFd;
    let mut fds: Vec<nix::poll::PollFd> = f
        .channels
        .iter()
        .map(|c| nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN))
        .collect();
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
    let ready = fds
        .iter()
        .position(|p| p.revents().is_some_and(|r| !r.is_empty()))
        .expect("rank 0 sent no request within ten seconds");
    let mut end = &f.channels[ready];
    let mut header = [0u8; 4];
    end.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; wire::body_len(header, usize::MAX >> 1).unwrap()];
    end.read_exact(&mut body).unwrap();
    (wire::decode::<Request>(&body).unwrap().0, end)
}

/// The next request rank 0 sends the fake (played as page 0's home), which must be a fault on page 0
/// for `access`, and the channel's end to answer it on.
fn fake_home_takes_fault(f: &FakeRank, access: Access) -> &UnixStream {
    let (request, end) = fake_takes_request(f);
    assert!(
        matches!(request, Request::Acquire { page: 0, access: a, .. } if a == access),
        "{request:?}"
    );
    end
}

/// The fake home's answer on `end` to rank 0's read of its page: granted, to fetch the page from `owner`
/// (which the home says it takes for failed, with `owner_failed`).
fn fake_grants_a_fetch_from(end: &UnixStream, owner: Rank, owner_failed: bool) {
    let grant = swmr::Grant {
        home_action: swmr::HomeAction::None,
        data_from_home: false,
        fetch_from: Some(owner),
        invalidate: swmr::CopySet::EMPTY,
    };
    let granted = Reply::Granted {
        grant,
        owner_failed,
    };
    write_frame(&dup(end), &granted, &[], &Counters::default()).unwrap();
}

/// The fake home's answer on `end` to rank 0's request for its page: granted, with `home_action`, and
/// the page (`pattern()`) from the home.
fn fake_grants_with_page(end: &UnixStream, home_action: swmr::HomeAction) {
    let grant = swmr::Grant {
        home_action,
        data_from_home: true,
        fetch_from: None,
        invalidate: swmr::CopySet::EMPTY,
    };
    write_frame(
        &dup(end),
        &Reply::Granted {
            grant,
            owner_failed: false,
        },
        &[&pattern()],
        &Counters::default(),
    )
    .unwrap();
}

#[test]
fn a_fault_whose_home_leaves_before_its_unlock_keeps_the_page_and_the_rank_lives_on() {
    let (dsm, fakes) = rank0_with_fakes(2, None);
    let region = page_at_rank1(&dsm, &fakes);
    let page = region.as_ptr() as usize;
    // SAFETY: the region is one page long and outlives the thread (joined below).
    let writer = std::thread::spawn(move || unsafe { (page as *mut u8).write_volatile(7) });
    let f = &fakes[0];
    let end = fake_home_takes_fault(f, Access::Write);
    // The home reads nothing more on the channel, answers with the page, and leaves the job (its
    // service-loop connection ends cleanly): rank 0's Unlock, after its install, finds the
    // connection closed.
    end.shutdown(std::net::Shutdown::Read).unwrap();
    fake_grants_with_page(end, swmr::HomeAction::Invalidate);
    f.other.shutdown(std::net::Shutdown::Both).unwrap();
    writer.join().unwrap();
    // SAFETY: the page is installed (the write above returned) and nothing else uses it.
    let (first, second) = unsafe { (*region.as_ptr(), *region.as_ptr().add(1)) };
    assert_eq!((first, second), (7, pattern()[1]));
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
}

#[test]
fn a_grant_naming_an_owner_that_left_is_abandoned_and_asked_for_again() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    // Page 0 homed at rank 1, whose only copy rank 2 owned when it left the job.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = region.inner.clone();
    let mut fakes = fakes.into_iter();
    let (home, owner) = (fakes.next().unwrap(), fakes.next().unwrap());
    drop(owner);
    assert!(
        gone_within(&shared, Rank(2)),
        "rank 2 was not seen to leave"
    );
    let reading = shared.clone();
    let reader = std::thread::spawn(move || crate::fault::resolve(&reading, 0, false));
    // The home has not yet seen rank 2 leave: it grants a fetch from it.
    let end = fake_home_takes_fault(&home, Access::Read);
    fake_grants_a_fetch_from(end, Rank(2), false);
    // Rank 0 finds rank 2 gone, abandons the grant, and asks again (perhaps on another channel, so the
    // two may be read in either order); the home, having seen rank 2 leave by then, says the page is
    // lost with it.
    let mut abandoned = false;
    let mut asked_again = None;
    for _ in 0..2 {
        let (request, end) = fake_takes_request(&home);
        match request {
            Request::Abandon {
                page: 0,
                access: Access::Read,
                ..
            } => abandoned = true,
            Request::Acquire {
                page: 0,
                access: Access::Read,
                ..
            } => asked_again = Some(end),
            other => panic!("unexpected request {other:?}"),
        }
    }
    assert!(abandoned, "rank 0 did not abandon the grant");
    let end = asked_again.expect("rank 0 did not ask again");
    let refused = Reply::Refused {
        reason: RefusedReason::DataLeftWith(Rank(2)),
    };
    write_frame(&dup(end), &refused, &[], &Counters::default()).unwrap();
    let read = reader.join().unwrap();
    assert!(
        matches!(read, Err(crate::fault::FaultError::Lost(Rank(2)))),
        "{read:?}"
    );
}

#[test]
fn a_thread_that_faults_on_a_page_being_fetched_waits_for_that_fetch() {
    use crate::region::WAITERS;
    let (dsm, fakes) = rank0_with_fakes(2, None);
    // Page 0 homed at rank 1, which the test plays.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = region.inner.clone();
    let before = dsm.stats();
    // Each reading thread says how its fault ended; a thread that asked the home again would wait for
    // an answer that never comes, and the test fails on its silence instead of hanging.
    let (done, ended) = std::sync::mpsc::channel();
    let read = |shared: &Arc<RegionShared>| {
        let (shared, done) = (shared.clone(), done.clone());
        std::thread::spawn(move || {
            let _ = done.send(crate::fault::resolve(&shared, 0, false));
        });
    };
    read(&shared);
    let end = fake_home_takes_fault(&fakes[0], Access::Read);
    // While the first thread's fetch is out, a second thread faults on the page: it marks the page's
    // word as waited for and sleeps, instead of asking the home again.
    read(&shared);
    let word = shared.state(0);
    let t = Instant::now();
    while word.load(Ordering::Acquire) & WAITERS == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the second thread never waited for the first one's fetch"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    fake_grants_with_page(end, swmr::HomeAction::None);
    for _ in 0..2 {
        let ended = ended
            .recv_timeout(Duration::from_secs(10))
            .expect("a reading thread's fault never ended");
        assert!(ended.is_ok(), "{ended:?}");
    }
    let after = dsm.stats();
    assert_eq!(after.read_faults - before.read_faults, 1);
    assert_eq!(after.faults_coalesced - before.faults_coalesced, 1);
    assert_eq!(after.pages_fetched - before.pages_fetched, 1);
    // SAFETY: the page is installed (both faults ended) and nothing writes it.
    let got = unsafe { std::slice::from_raw_parts(region.as_ptr(), PAGE_SIZE) };
    assert_eq!(got, &pattern()[..]);
}

/// The next frame rank 0 sends the fake on `fake`, if one comes within `wait`.
fn fake_reads_within(fake: &UnixStream, wait: Duration) -> Option<Reply> {
    use std::os::fd::AsRawFd;
    let mut peek = [0u8; 1];
    fake.set_read_timeout(Some(wait)).unwrap();
    let peeked = nix::sys::socket::recv(
        fake.as_raw_fd(),
        &mut peek,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    );
    match peeked {
        Ok(1) => Some(fake_reads(fake).0),
        _ => None,
    }
}

#[test]
fn an_invalidation_that_finds_a_grant_running_revokes_it_and_data_requests_wait() {
    use crate::region::{BUSY, GRANTED, REVOKED};
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    // Page 0 homed at rank 1; rank 2 plays a writer the home granted.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = &region.inner;
    let word = shared.state(0);
    let writer = &fakes[1].fake;
    let invalidate = |send_data| Request::Invalidate {
        region: shared.id,
        page: 0,
        send_data,
        wait_for_own: false,
    };
    let end = |page| crate::fault::end_grant(shared, page, Rank(1));
    // A fault of rank 0 runs a grant for the page: the invalidation is answered at once and the
    // transaction revoked, so that the fault installs nothing.
    word.fetch_or(BUSY | GRANTED, Ordering::AcqRel);
    fake_sends(writer, invalidate(false));
    assert!(matches!(fake_reads(writer).0, Reply::Ack));
    assert_ne!(word.load(Ordering::Acquire) & REVOKED, 0);
    assert!(end(0).is_err(), "a revoked grant was installed");
    crate::fault::release_busy(shared, 0);
    assert_eq!(word.load(Ordering::Acquire), 0);
    // Deferred while the fault has no grant yet (its home's answer may be on its way), and answered
    // once the grant is marked.
    word.fetch_or(BUSY, Ordering::AcqRel);
    fake_sends(writer, invalidate(false));
    assert!(fake_reads_within(writer, Duration::from_millis(300)).is_none());
    crate::fault::mark_granted(shared, 0);
    assert!(matches!(fake_reads(writer).0, Reply::Ack));
    assert!(end(0).is_err());
    crate::fault::release_busy(shared, 0);
    // Requests that need this rank's copy wait for the fault, grant or not, and a grant that nothing
    // revoked ends well.
    word.fetch_or(BUSY | GRANTED, Ordering::AcqRel);
    fake_sends(writer, invalidate(true));
    fake_sends(
        writer,
        Request::Fetch {
            region: shared.id,
            page: 0,
            wait_for_own: false,
        },
    );
    assert!(fake_reads_within(writer, Duration::from_millis(300)).is_none());
    assert!(end(0).is_ok());
    assert_eq!(word.load(Ordering::Acquire) & (GRANTED | REVOKED), 0);
    // (No copy was installed: both are refused once the fault is over.)
    crate::fault::release_busy(shared, 0);
    for _ in 0..2 {
        let (reply, _) = fake_reads(writer);
        assert!(
            matches!(
                reply,
                Reply::Refused {
                    reason: RefusedReason::NoCopyHere
                }
            ),
            "{reply:?}"
        );
    }
}

#[test]
fn a_request_for_the_copy_of_a_rank_its_home_took_for_failed_waits_for_that_ranks_own_fault() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    // Page 0 homed at rank 1, which the test plays; rank 2 plays a writer the home granted.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = region.inner.clone();
    let (home, writer) = (&fakes[0], &fakes[1].fake);
    let state = || shared.state(0).load(Ordering::Acquire) & STATE_MASK;
    // Rank 0 reads the page: the home grants it with its copy, and rank 0 reports the install.
    let reading = shared.clone();
    let reader = std::thread::spawn(move || crate::fault::resolve(&reading, 0, false));
    let end = fake_home_takes_fault(home, Access::Read);
    fake_grants_with_page(end, swmr::HomeAction::None);
    reader.join().unwrap().unwrap();
    let (unlock, _) = fake_takes_request(home);
    assert!(
        matches!(unlock, Request::Unlock { granted: true, .. }),
        "{unlock:?}"
    );
    // Rank 0 writes it: an upgrade of its copy, which the home holds for it and has not answered yet.
    let writing = shared.clone();
    let upgrade = std::thread::spawn(move || crate::fault::resolve(&writing, 0, true));
    let end = fake_home_takes_fault(home, Access::Write);
    // A request from a transaction the home decided before is served from the copy at once (the
    // upgrade may be waiting for that transaction to end) ...
    let fetch = |wait_for_own| Request::Fetch {
        region: shared.id,
        page: 0,
        wait_for_own,
    };
    fake_sends(writer, fetch(false));
    let (reply, page) = fake_reads(writer);
    assert!(
        matches!(reply, Reply::Page) && page == pattern(),
        "{reply:?}"
    );
    // ... but one the home granted while it took rank 0 for failed (having ended the upgrade early, as
    // if it had run) waits for the upgrade: served now, the copy would go out and then be written.
    fake_sends(
        writer,
        Request::Invalidate {
            region: shared.id,
            page: 0,
            send_data: true,
            wait_for_own: true,
        },
    );
    assert!(fake_reads_within(writer, Duration::from_millis(300)).is_none());
    assert_eq!(state(), READ_ONLY);
    // The home answers the upgrade: rank 0 makes its copy writable, and only then hands it over and
    // drops it.
    let done = Reply::Done {
        data: swmr::Data::None,
        count: 1,
    };
    write_frame(&dup(end), &done, &[], &Counters::default()).unwrap();
    upgrade.join().unwrap().unwrap();
    let (reply, page) = fake_reads(writer);
    assert!(
        matches!(reply, Reply::Page) && page.len() == PAGE_SIZE,
        "{reply:?}"
    );
    assert_eq!(state(), crate::region::INVALID);
}

#[test]
fn a_grant_that_says_its_owner_is_taken_for_failed_has_the_owner_wait_for_its_own_fault() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    // Page 0 homed at rank 1, which the test plays, and owned by rank 2, played too.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = region.inner.clone();
    let reading = shared.clone();
    let reader = std::thread::spawn(move || crate::fault::resolve(&reading, 0, false));
    let end = fake_home_takes_fault(&fakes[0], Access::Read);
    // The home, taking rank 2 for failed, grants a fetch from it and says so.
    fake_grants_a_fetch_from(end, Rank(2), true);
    // Rank 0 asks rank 2 for the page, to be served only once no fault of rank 2's is on it.
    let (fetch, end) = fake_takes_request(&fakes[1]);
    assert!(
        matches!(
            fetch,
            Request::Fetch {
                page: 0,
                wait_for_own: true,
                ..
            }
        ),
        "{fetch:?}"
    );
    write_frame(&dup(end), &Reply::Page, &[&pattern()], &Counters::default()).unwrap();
    reader.join().unwrap().unwrap();
    // SAFETY: the page is installed (the fault above ended well) and nothing else uses it.
    let first = unsafe { *region.as_ptr() };
    assert_eq!(first, pattern()[0]);
}
