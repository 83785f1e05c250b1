//! Faults on sequential-consistency regions: the requester side of the SWMR protocol. A fault on a page
//! homed here takes the manager lock directly; a fault on a remote page asks its home, which either
//! answers at once (`Done`) or grants the transaction to the requester, who then talks to the owner and
//! copy holders itself. The home keeps the page locked until the requester's `Unlock` after a grant or
//! an upgrade; when the requester had no copy and the home answered at once, the home releases the page
//! as it answers, and a leaf request that reaches this rank before the install is deferred by the
//! service loop (see `protocol/README.md`).

use super::install::{
    claim_following, claim_readahead, claim_zero_fill, count_fetched, install, install_chunks,
    install_zeros, installed_as_done, no_payload,
};
use super::words::{
    give_untouched, lock_slot, lock_untouched, release_busy, set_state, unlock_slot,
};
use super::{ask, refused, FaultError};
use crate::channel::{Channel, RecvError};
use crate::protocol::swmr::{self, Access, CopySet, Data, Decision, Grant, HomeAction};
use crate::region::{
    RegionShared, Steps, DEFERRED, GRANTED, INVALID, READ_ONLY, READ_WRITE, REVOKED, STATE_MASK,
};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::ZERO_FILL_MAX;
use crate::wire::{Reply, Request};
use nix::errno::Errno;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The manager found the copy this rank holds enough: for a write, it is made writable; for a read (a
/// copy that came back while this thread waited, as the home's own does when an answer could not be
/// sent), it stays as it is.
fn upgrade_in_place(region: &RegionShared, page: u64, access: Access) -> Result<(), FaultError> {
    let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
    if st == INVALID {
        return Err(FaultError::Protocol(
            region.home(page),
            "the home says this rank holds a copy it does not have",
        ));
    }
    if access == Access::Read {
        return Ok(());
    }
    region
        .protect(page, 1, false)
        .map_err(|e| FaultError::Sys("UFFDIO_WRITEPROTECT", e))
}

/// Refuses a grant that the home's manager could not have made: one that names this rank or the home as
/// a rank to fetch from or to invalidate (this rank would ask its own service loop, which defers the
/// request until this very fault ends: a wait for ever), or a read grant with copies to invalidate.
fn check_grant(grant: &Grant, me: Rank, home: Rank, access: Access) -> Result<(), FaultError> {
    let names = |r: Rank| grant.fetch_from == Some(r) || grant.invalidate.contains(r);
    if names(me) || names(home) || (access == Access::Read && grant.invalidate != CopySet::EMPTY) {
        return Err(FaultError::Protocol(
            home,
            "a grant the manager cannot make",
        ));
    }
    Ok(())
}

fn new_state(access: Access) -> u32 {
    match access {
        Access::Read => READ_ONLY,
        Access::Write => READ_WRITE,
    }
}

/// A fault on a page homed at another rank: asks the home, and runs the grant it may give.
///
/// A grant abandoned because its owner left the job (see [`run_grant`]) is asked for again, for as long
/// as the home may take to see the owner leave (`LEAVING`): the home then answers from a copy that lives
/// on, or says that the page's data left the job, instead of this fault failing for a race.
pub(super) fn remote_transaction(
    region: &RegionShared,
    page: u64,
    access: Access,
) -> Result<(), FaultError> {
    let mut deadline = None;
    loop {
        match ask_home(region, page, access) {
            Err(FaultError::Abandoned(owner)) => {
                let until = *deadline.get_or_insert_with(|| Instant::now() + LEAVING);
                if Instant::now() >= until {
                    return Err(FaultError::OwnerLeft(owner));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            done => return done,
        }
    }
}

/// One request to the home of a remote page and what follows it. A grant abandoned because its owner
/// left (`FaultError::Abandoned`) is ended at the home here.
fn ask_home(region: &RegionShared, page: u64, access: Access) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let home = region.home(page);
    let missing = region.state(page).load(Ordering::Acquire) & STATE_MASK == INVALID;
    let window = shared.readahead.load(Ordering::Relaxed);
    let (count, steps) = match access {
        Access::Read if window > 1 => claim_readahead(region, page, home),
        // A first write of a page not here: the following pages with the same home are asked for too, in
        // the sequential window, and the home hands over those nobody has touched, as zeros, or, when it
        // gives up its own copy of the page, those only it holds, with their data (write-ahead; a page
        // the home cannot take at once ends the run).
        Access::Write if missing && window > 1 => {
            let detector = region.write_ahead_for(home);
            (
                claim_following(region, detector, page, home, window),
                detector.steps,
            )
        }
        _ => (1, Steps::ADJACENT),
    };
    let mut ch = shared.channels.claim();
    let direct = shared.direct_install.load(Ordering::Relaxed);
    let acquire = Request::Acquire {
        region: region.id,
        page,
        access,
        count,
        direct,
    };
    let c = &shared.counters;
    // Every page claimed ahead is released once the reply is in: installed or not (the one that faulted is
    // released by `resolve`). A page left BUSY would hang the next fault on it and every deferred request
    // for it. A grant releases them before its further round trips, as nothing will be installed there.
    let extras_held = std::cell::Cell::new(count > 1);
    let release_extras = || {
        if extras_held.replace(false) {
            for k in 1..u64::from(count) {
                release_busy(region, steps.page(page, k));
            }
        }
    };
    let outcome = (|| {
        let (reply, payload_len) = ask(&mut ch, c, home, &acquire)?;
        let peer = |e| FaultError::Peer(home, e);
        let (reply, installed) = installed_as_done(reply, count, direct, home)?;
        match reply {
            Reply::Done {
                data,
                count: served,
            } => {
                let served = u64::from(served.clamp(1, count));
                match data {
                    // The pages after the first were claimed for read-ahead, not held: only the first can
                    // already be here.
                    Data::None if served > 1 => {
                        return Err(FaultError::Protocol(
                            home,
                            "several pages said to be here already",
                        ))
                    }
                    Data::None => {
                        no_payload(home, payload_len)?;
                        upgrade_in_place(region, page, access)?
                    }
                    Data::Zero => {
                        no_payload(home, payload_len)?;
                        if served > ZERO_FILL_MAX {
                            return Err(FaultError::Protocol(
                                home,
                                "more pages of zeros than a home hands out at once",
                            ));
                        }
                        if served > 1 && access == Access::Write {
                            Counters::add(&c.pages_zero_filled, served - 1);
                        } else if served > 1 {
                            return Err(FaultError::Protocol(
                                home,
                                "several pages of zeros for a read fault",
                            ));
                        }
                        install_zeros(region, page, served, steps, access)?
                    }
                    Data::Home => {
                        let payload = if installed {
                            0
                        } else {
                            served as usize * PAGE_SIZE
                        };
                        if payload_len != payload {
                            return Err(FaultError::Protocol(
                                home,
                                "reply length does not match the pages it announces",
                            ));
                        }
                        // (Several pages for a write fault: those its home gave up along with the one
                        // asked for, or zeros of untouched ones, all writable here now.)
                        // Install in pieces as they arrive: copying into pages overlaps with the rest of
                        // the transfer still in flight.
                        if !installed {
                            install_chunks(&mut ch, region, home, page, served, steps, access)?;
                        }
                        count_fetched(c, served, installed);
                    }
                }
                for k in 0..served {
                    set_state(region.state(steps.page(page, k)), new_state(access));
                }
                Ok((served, false, data == Data::None))
            }
            Reply::Granted {
                grant,
                owner_failed,
            } => {
                release_extras();
                check_grant(&grant, shared.me, home, access)?;
                mark_granted(region, page);
                let mut have = false;
                if grant.data_from_home {
                    if payload_len != PAGE_SIZE {
                        return Err(FaultError::Protocol(
                            home,
                            "grant without the page it announces",
                        ));
                    }
                    ch.recv_page(home).map_err(peer)?;
                    have = true;
                    Counters::add(&c.pages_fetched, 1);
                } else {
                    no_payload(home, payload_len)?;
                }
                let ran = run_grant(
                    &mut ch,
                    region,
                    page,
                    access,
                    &grant,
                    owner_failed,
                    &mut have,
                );
                if let Err(FaultError::Abandoned(_)) = ran {
                    end_grant(region, page, home)?;
                    let abandon = Request::Abandon {
                        region: region.id,
                        page,
                        access,
                    };
                    ch.send(c, home, &abandon, &[])
                        .map_err(|e| FaultError::Send(home, e))?;
                }
                ran?;
                end_grant(region, page, home)?;
                if have {
                    install(region, page, 1, &ch.page, access)?;
                } else {
                    upgrade_in_place(region, page, access)?;
                }
                set_state(region.state(page), new_state(access));
                Ok((1, true, false))
            }
            Reply::Refused { reason } => Err(refused(home, reason)),
            _ => Err(FaultError::Protocol(
                home,
                "unexpected reply to a fault request",
            )),
        }
    })();
    release_extras();
    let (served, granted, upgrade) = outcome?;
    // Where a sequential reader or first writer faults next: right after the pages it just received.
    let detector = match access {
        Access::Read => Some(region.readahead_for(home)),
        Access::Write if missing => Some(region.write_ahead_for(home)),
        Access::Write => None,
    };
    if let Some(d) = detector {
        d.last
            .store(d.steps.page(page, served - 1), Ordering::Relaxed);
    }
    if !granted && !upgrade {
        // The home released the page when it answered: a rank without a copy needs no Unlock, because a
        // leaf request that reaches it before the install is deferred until the install (`engine`).
        return Ok(());
    }
    let unlock = Request::Unlock {
        region: region.id,
        page,
        count: served as u32,
        access,
        granted,
    };
    match ch.send(&shared.counters, home, &unlock, &[]) {
        // The page is installed: a home that has left the job since it answered took its entry for the
        // page with it, and waits for no Unlock (under `FailurePolicy::Report` this rank lives on).
        Err(e) if closed_send(e) && left_the_job(shared, home) => Ok(()),
        sent => sent.map_err(|e| FaultError::Send(home, e)),
    }
}

/// Marks the faulting page GRANTED while its grant runs. A leaf request of another transaction that
/// reaches this rank meanwhile can only come from a transaction the home started after it ended this one
/// early, taking this rank for failed (a home with a shorter peer timeout, under `FailurePolicy::Report`):
/// the service loop answers a later writer's invalidation at once and revokes this transaction
/// (`engine::pages`, `defer_or_refuse`), where deferring it until the install would wait for ever if this
/// grant's own fetch waits, through its owner's fault, for the home lock that writer holds. A request the
/// loop deferred before the mark is looked at again.
pub(crate) fn mark_granted(region: &RegionShared, page: u64) {
    let prev = region.state(page).fetch_or(GRANTED, Ordering::AcqRel);
    if prev & DEFERRED != 0 {
        region.shared.wake_service();
    }
}

/// Ends the GRANTED mark of the faulting page before its install; an error if the transaction was revoked
/// meanwhile (the page must not be installed: the home's entry no longer lists this rank's copy). After
/// this only local work is left, or, for a grant abandoned because its owner left, a new request to the
/// home, as at the start of a fault: a leaf request that finds the page BUSY waits for it as usual.
pub(crate) fn end_grant(region: &RegionShared, page: u64, home: Rank) -> Result<(), FaultError> {
    let word = region.state(page);
    let mut s = word.load(Ordering::Acquire);
    loop {
        if s & REVOKED != 0 {
            return Err(FaultError::Protocol(
                home,
                "a later writer invalidated the page while this rank's grant ran: the home ended the transaction early, having taken this rank for failed",
            ));
        }
        match word.compare_exchange(s, s & !GRANTED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(now) => s = now,
        }
    }
}

/// A fault on a page homed here: decided under the page's manager lock, and run under it too.
///
/// A transaction that must ask other ranks takes a channel, and never waits for one with the manager lock
/// held: the channels may all be held by this rank's threads waiting in `lock`, `barrier` or a service
/// call, and by a fault waiting for another rank's page, whose home may be stuck the same way on a page
/// whose request waits for this one's lock (two ranks each waiting for the other, for ever). With no
/// channel free, the lock is let go while one is awaited, and the fault decided again.
pub(super) fn local_transaction(
    region: &RegionShared,
    page: u64,
    access: Access,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let slot = region.slot(page);
    let mut channel = None;
    loop {
        lock_slot(&slot.lock);
        let result = (|| {
            let mut entry = slot.load();
            let gone = |r: Rank| shared.gone[r.index()].load(Ordering::Acquire);
            if let Some(owner) = entry.forget_gone(shared.me, gone) {
                return Err(FaultError::Lost(owner));
            }
            match swmr::decide(&mut entry, shared.me, shared.me, access) {
                Decision::Done { data, .. } => {
                    match data {
                        Data::Zero => {
                            return zero_fill_home(region, page, access, entry).map(|()| true)
                        }
                        Data::None => upgrade_in_place(region, page, access)?,
                        Data::Home => {
                            return Err(FaultError::Protocol(
                                shared.me,
                                "the home asked itself for its own copy",
                            ))
                        }
                    }
                    slot.store(&entry);
                }
                Decision::Grant(grant) => {
                    let Some(mut ch) = channel.take().or_else(|| shared.channels.try_claim())
                    else {
                        return Ok(false);
                    };
                    let mut have = false;
                    // (A rank this home takes for failed is not asked at all: sends to it fail.)
                    match run_grant(&mut ch, region, page, access, &grant, false, &mut have) {
                        // This rank, the home, has seen the owner leave (`left_the_job`): decided
                        // again, the page comes from a copy that lives on, or is lost.
                        Err(FaultError::Abandoned(_)) => {
                            channel = Some(ch);
                            return Ok(false);
                        }
                        ran => ran?,
                    }
                    if have {
                        install(region, page, 1, &ch.page, access)?;
                    } else {
                        upgrade_in_place(region, page, access)?;
                    }
                    swmr::complete(&mut entry, shared.me, access);
                    slot.store(&entry);
                }
            }
            set_state(region.state(page), new_state(access));
            Ok(true)
        })();
        if unlock_slot(&slot.lock) {
            shared.wake_service();
        }
        match result {
            Ok(false) => channel = channel.or_else(|| Some(shared.channels.claim())),
            done => return done.map(|_| ()),
        }
    }
}

/// A first touch of `page` (homed here, never touched, its manager lock held, `entry` decided): installs
/// it with zeros, and with it the untouched pages after it whose manager locks are free at once (see
/// [`claim_zero_fill`]), each taken by this rank as the page itself is. Sets the state of every page and
/// stores `entry`; the caller unlocks `page`'s manager lock and releases its BUSY bit.
fn zero_fill_home(
    region: &RegionShared,
    page: u64,
    access: Access,
    entry: swmr::Entry,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    // Each following page is taken only with its manager lock free and nothing queued on it, and only
    // while it has never been touched; its lock stays held until it is installed, so no request for it
    // is served meanwhile (the service loop queues them, and is woken below).
    let count = claim_zero_fill(region, page, |p| lock_untouched(region, p));
    let steps = region.zero_fill.steps;
    let installed = install_zeros(region, page, count, steps, access);
    if installed.is_ok() {
        Counters::add(&shared.counters.pages_zero_filled, count - 1);
        region.slot(page).store(&entry);
        set_state(region.state(page), new_state(access));
    }
    for p in (1..count).map(|k| steps.page(page, k)) {
        if installed.is_ok() {
            // The same decision as for `page`: this rank becomes the owner of zeros.
            give_untouched(region, p, shared.me, access);
            set_state(region.state(p), new_state(access));
        }
        if unlock_slot(&region.slot(p).lock) {
            shared.wake_service();
        }
        release_busy(region, p);
    }
    installed
}

/// How long a fault waits, after a copy holder's connection ended, for this rank's service loop to see
/// the holder's service-loop connection end (it left the job) before taking it for a rank that lives on.
const LEAVING: Duration = Duration::from_millis(500);

/// A send that failed because the peer closed or reset the connection.
fn closed_send(e: Errno) -> bool {
    matches!(e, Errno::EPIPE | Errno::ECONNRESET)
}

/// Whether rank `r`, whose connection ended, has left the job (its memory with it): once this rank's
/// service loop has seen its service-loop connection end (`Shared::gone`), waited for up to `LEAVING`.
fn left_the_job(shared: &crate::dsm::Shared, r: Rank) -> bool {
    let known = || shared.gone[r.index()].load(Ordering::Acquire);
    let deadline = Instant::now() + LEAVING;
    while !known() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    known()
}

/// Runs a granted transaction: asks the owner for the page (downgrading or dropping its copy) and every
/// copy holder to drop theirs, all requests first and then all replies, so they proceed in parallel.
/// With `owner_failed` (the home takes the owner for failed) the owner is asked to serve the request
/// only once no fault of its own is resolving the page (`wait_for_own`, `engine::pages`).
///
/// An owner that left the job before it sent the page fails the grant with `Abandoned` when nothing
/// changed anywhere (no copy holder was asked to drop its copy, and the home kept its own): the fault may
/// then ask again. Otherwise the copies dropped may have been the page's last, and it fails with
/// `OwnerLeft`.
fn run_grant(
    ch: &mut Channel,
    region: &RegionShared,
    page: u64,
    access: Access,
    grant: &Grant,
    owner_failed: bool,
    have: &mut bool,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let c = &shared.counters;
    let id = region.id;
    let home_kept_its_copy = grant.home_action == HomeAction::None;
    let owner_left = |owner: Rank, asked: CopySet| {
        if home_kept_its_copy && asked == CopySet::EMPTY {
            FaultError::Abandoned(owner)
        } else {
            FaultError::OwnerLeft(owner)
        }
    };
    if let Some(owner) = grant.fetch_from {
        let req = match access {
            Access::Read => Request::Fetch {
                region: id,
                page,
                wait_for_own: owner_failed,
            },
            Access::Write => Request::Invalidate {
                region: id,
                page,
                send_data: true,
                wait_for_own: owner_failed,
            },
        };
        match ch.send(c, owner, &req, &[]) {
            Ok(()) => {}
            // The owner left the job after the home decided (which other ranks hold copies of the page,
            // only the home knows).
            Err(e) if closed_send(e) && left_the_job(shared, owner) => {
                return Err(owner_left(owner, CopySet::EMPTY))
            }
            Err(e) => return Err(FaultError::Send(owner, e)),
        }
    }
    // A copy holder whose end of this channel's connection is closed (the connection was closed or reset
    // by it) is gone, and its copy with it, once this rank's service loop has seen its service-loop
    // connection end too (`Shared::gone`: a rank ends that one only by leaving the job). Nothing more is
    // asked of it. One taken for failed without that (unheard for the peer timeout, or a frame refused:
    // this rank shut its connections to it itself, so sends to it fail the same way) may live on with
    // its copy, as may one that only cut its channels' connections, having taken this rank for failed
    // (under `FailurePolicy::Report`): its copy cannot be dropped, and this fault ends with an error, as
    // for any other error, rather than leave a stale copy readable (the home's `forget_gone` prunes
    // on `gone` alone for the same reason).
    let left_the_job = |r: Rank| left_the_job(shared, r);
    let mut asked = CopySet::EMPTY;
    for r in grant.invalidate.iter() {
        let req = Request::Invalidate {
            region: id,
            page,
            send_data: false,
            wait_for_own: false,
        };
        match ch.send(c, r, &req, &[]) {
            Ok(()) => asked.insert(r),
            Err(e) if closed_send(e) && left_the_job(r) => {}
            Err(e) => return Err(FaultError::Send(r, e)),
        }
    }
    if let Some(owner) = grant.fetch_from {
        let (reply, payload, page_buf) = match ch.recv(c, owner) {
            Ok(got) => got,
            Err(RecvError::Eof) if left_the_job(owner) => return Err(owner_left(owner, asked)),
            Err(RecvError::Sys(e)) if closed_send(e) && left_the_job(owner) => {
                return Err(owner_left(owner, asked))
            }
            Err(e) => return Err(FaultError::Peer(owner, e)),
        };
        match reply {
            Reply::Page if payload.len() >= PAGE_SIZE => {
                page_buf.copy_from_slice(&payload[..PAGE_SIZE]);
                *have = true;
                Counters::add(&c.pages_fetched, 1);
            }
            Reply::Refused { reason } => return Err(refused(owner, reason)),
            _ => {
                return Err(FaultError::Protocol(
                    owner,
                    "the owner did not send the page",
                ))
            }
        }
    }
    for r in asked.iter() {
        match ch.recv(c, r) {
            Ok((Reply::Ack, _, _)) => {}
            Err(RecvError::Eof) if left_the_job(r) => {}
            Err(RecvError::Sys(e)) if closed_send(e) && left_the_job(r) => {}
            Err(e) => return Err(FaultError::Peer(r, e)),
            Ok((Reply::Refused { reason }, _, _)) => return Err(refused(r, reason)),
            Ok(_) => {
                return Err(FaultError::Protocol(
                    r,
                    "a copy holder did not acknowledge the invalidation",
                ))
            }
        }
    }
    Ok(())
}
