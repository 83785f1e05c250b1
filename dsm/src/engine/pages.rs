//! The pages of the service loop under sequential consistency: the manager side of the pages homed at
//! this rank (fault requests served or queued under the per-page manager lock, with read-ahead and
//! write-ahead, and the transactions that hold it until their Unlock or Abandon), and the leaf operations
//! on this rank's copies (send, downgrade, drop). Release consistency's side is in `release`.

use super::Engine;
use super::MAX_READAHEAD;
use crate::channel::write_frame;
use crate::direct::{self};
use crate::dsm::FailurePolicy;
use crate::fault::{set_state, unlock_slot};
use crate::protocol::swmr::{self, Access, Data, Decision, HomeAction};
use crate::region::{
    RegionShared, BUSY, DEFERRED, GRANTED, INVALID, LOCKED, QUEUED, READ_ONLY, READ_WRITE, REVOKED,
    STATE_MASK,
};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::{ZERO_FILL_MAX, ZERO_PAGE};
use crate::wire::{RefusedReason, Reply, Request};
use nix::errno::Errno;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Engine {
    /// Serves a fault request now if the page's manager lock is free, else queues it.
    pub(super) fn acquire_or_queue(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        req: Request,
    ) {
        let Request::Acquire { page, .. } = req else {
            return;
        };
        let lock = &region.slot(page).lock;
        loop {
            let s = lock.load(Ordering::Acquire);
            if s & LOCKED == 0 {
                if lock
                    .compare_exchange(s, s | LOCKED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.serve_acquire(idx, region, req);
                    return;
                }
                continue;
            }
            // Held: mark the page queued so that whoever unlocks wakes this loop, then re-check.
            if lock
                .compare_exchange(s, s | QUEUED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.queues
                    .entry((region.id, page))
                    .or_default()
                    .push_back((idx, req));
                return;
            }
        }
    }

    pub(super) fn serve_queue(&mut self, region: &Arc<RegionShared>, page: u64) {
        let key = (region.id, page);
        // Called again from a request this loop serves: the loop below goes on with the next one.
        if !self.serving.insert(key) {
            return;
        }
        let lock = &region.slot(page).lock;
        while lock.load(Ordering::Acquire) & LOCKED == 0 {
            let Some((idx, req)) = self.queues.get_mut(&key).and_then(|q| q.pop_front()) else {
                lock.fetch_and(!QUEUED, Ordering::AcqRel);
                self.queues.remove(&key);
                break;
            };
            self.acquire_or_queue(idx, region, req);
        }
        self.serving.remove(&key);
    }

    pub(super) fn serve_all_queues(&mut self) {
        let keys: Vec<(u32, u64)> = self.queues.keys().copied().collect();
        for (id, page) in keys {
            match self.shared.region(id) {
                Some(r) => self.serve_queue(&r, page),
                None => {
                    self.queues.remove(&(id, page));
                }
            }
        }
    }

    /// The scratch buffer, a page long. (An answer being sent borrows it, leaving it empty; when sending
    /// fails, the failure's handling serves requests queued behind the failed rank's, which use it too.)
    fn scratch_page(&mut self) -> &mut [u8] {
        self.scratch.resize(PAGE_SIZE, 0);
        &mut self.scratch
    }

    /// Applies a home action to this rank's own copy; returns whether `scratch` holds the page bytes taken
    /// before an invalidation. They are kept whether or not the answer carries them: should it not reach
    /// the requester, the home puts its copy back (a 4 KiB copy, against the round trip it answers).
    fn home_action(&mut self, region: &RegionShared, page: u64, action: HomeAction) -> bool {
        let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
        match action {
            HomeAction::None => false,
            HomeAction::Downgrade => {
                if st == READ_WRITE {
                    self.protect_or_die(region, page);
                    set_state(region.state(page), READ_ONLY);
                }
                false
            }
            HomeAction::Invalidate => {
                if st == INVALID {
                    return false;
                }
                if st == READ_WRITE {
                    self.protect_or_die(region, page);
                }
                region.read_page(page, self.scratch_page());
                self.drop_copy(region, page);
                true
            }
        }
    }

    fn serve_acquire(&mut self, idx: usize, region: &Arc<RegionShared>, req: Request) {
        let Request::Acquire {
            page,
            access,
            count,
            direct,
            ..
        } = req
        else {
            return;
        };
        let requester = self.conns[idx].peer;
        let me = self.shared.me;
        if self.shared.failed[requester.index()].load(Ordering::Acquire) || !self.conns[idx].open {
            // A request queued by a rank that has failed since: nobody waits for the answer, and a grant
            // would keep the page locked for an Unlock that never comes.
            if unlock_slot(&region.slot(page).lock) {
                self.serve_queue(region, page);
            }
            return;
        }
        if !region.accept_home(page) {
            if unlock_slot(&region.slot(page).lock) {
                self.serve_queue(region, page);
            }
            self.refuse(idx, RefusedReason::WrongRank);
            return;
        }
        let slot = region.slot(page);
        let mut entry = slot.load();
        let gone = &self.shared.gone;
        if let Some(owner) = entry.forget_gone(me, |r| gone[r.index()].load(Ordering::Acquire)) {
            // Nothing to grant: the page's data left the job with its owner.
            if unlock_slot(&region.slot(page).lock) {
                self.serve_queue(region, page);
            }
            self.refuse(idx, RefusedReason::DataLeftWith(owner));
            return;
        }
        let before = entry;
        match swmr::decide(&mut entry, me, requester, access) {
            Decision::Done { home_action, data } => {
                let copied = self.home_action(region, page, home_action);
                slot.store(&entry);
                let mut pages = vec![page];
                // The entries of pages taken along with their data by a writer, as they were; their
                // bytes are in `taken`, one page each after `page`'s.
                let mut written_were = Vec::new();
                if access == Access::Read && data != Data::None {
                    self.gather_readahead(
                        region,
                        page,
                        count.min(MAX_READAHEAD),
                        requester,
                        &mut pages,
                    );
                } else if access == Access::Write && data == Data::Zero {
                    self.gather_untouched(
                        region,
                        page,
                        count.min(ZERO_FILL_MAX as u32),
                        requester,
                        &mut pages,
                    );
                } else if access == Access::Write
                    && data == Data::Home
                    && self.shared.policy == FailurePolicy::Exit
                {
                    // (Not in a job that lives on after a rank fails: a failed writer would take with it
                    // the pages it was given ahead and never wrote, which the home alone held.)
                    written_were = self.gather_written(
                        region,
                        page,
                        count.min(MAX_READAHEAD),
                        requester,
                        &mut pages,
                    );
                }
                // One page, or several for read-ahead (each present here now, downgraded, or untouched:
                // zeros), or several untouched pages for a first writer (zeros, no payload), or several
                // pages given up here for a writer (the home's copies, or zeros).
                let owned = std::mem::take(&mut self.scratch);
                let taken = std::mem::take(&mut self.taken);
                let reply_data = if pages.len() > 1 && access == Access::Read {
                    Data::Home
                } else {
                    data
                };
                let slices: Vec<&[u8]> = match reply_data {
                    Data::Home => pages
                        .iter()
                        .enumerate()
                        .map(|(k, p)| {
                            if *p == page && copied {
                                &owned[..]
                            } else if k > 0 && !written_were.is_empty() {
                                &taken[(k - 1) * PAGE_SIZE..k * PAGE_SIZE]
                            } else if region.state(*p).load(Ordering::Acquire) & STATE_MASK
                                == INVALID
                            {
                                &ZERO_PAGE[..]
                            } else {
                                region.present_page(*p)
                            }
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Counters::add(&self.shared.counters.pages_sent, slices.len() as u64);
                let count = pages.len() as u32;
                let mut sent = false;
                // Whether pages may be in the requester's memory whatever becomes of the reply: an
                // install straight into it puts them where its threads use them at once, and one that
                // failed may have put some there.
                let mut tried_direct = false;
                if self.conns[idx].open {
                    let writable = access == Access::Write;
                    tried_direct = reply_data == Data::Home
                        && direct
                        && self.direct[requester.index()].is_some();
                    let installed = tried_direct
                        && self.install_directly(requester, region, &pages, &slices, writable);
                    let (reply, payload) = if installed {
                        (Reply::Installed { count }, &[][..])
                    } else {
                        let data = reply_data;
                        (Reply::Done { data, count }, &slices[..])
                    };
                    match write_frame(
                        &self.conns[idx].link,
                        &reply,
                        payload,
                        &self.shared.counters,
                    ) {
                        Ok(()) => sent = true,
                        Err(e) => {
                            drop(slices);
                            // The pages stay locked meanwhile (and out of `held_by`): the failure's
                            // handling serves no request for them before they are taken back below.
                            self.close(idx, &format!("sending pages failed: {e}"));
                        }
                    }
                }
                if sent && data == Data::None {
                    // An upgrade (or a read of a copy the requester holds): the lock stays held until the
                    // requester's Unlock, or its failure (`peer_failed`).
                    self.held_by
                        .insert((region.id, page), (requester, access, Held::Answered));
                }
                let may_hold_them = tried_direct && access == Access::Read;
                if !sent && may_hold_them {
                    // Pages it may hold stay listed as its copies (a writer invalidates them, should it
                    // live on), but the zeros of an untouched page it was to own become the home's, held
                    // read-only here: a later fault on the page finds them instead of a failed owner.
                    for &p in &pages {
                        let s = region.slot(p);
                        let mut e = s.load();
                        if e.owner == Some(requester) {
                            self.restore_home_copy(region, p, &ZERO_PAGE);
                            e.owner = Some(me);
                            e.copyset = swmr::CopySet::EMPTY;
                            e.copyset.insert(requester);
                            s.store(&e);
                        }
                    }
                } else if !sent {
                    // Whatever a requester that never got its answer was to have goes back to the way it
                    // was, so that nobody later has to ask a failed rank for a page it never had, and the
                    // home keeps a copy it gave up. (A writer's page is taken back even if it was installed
                    // straight into the requester's memory, where its threads may have written it: the
                    // home's copy may be the only one, and the requester, failed, is out of the job; should
                    // it live on, what it writes there is its own.)
                    if copied {
                        self.restore_home_copy(region, page, &owned);
                    }
                    slot.store(&before);
                    for (k, &p) in pages[1..].iter().enumerate() {
                        let s = region.slot(p);
                        match written_were.get(k) {
                            // A page given up here for a writer comes back, as the page itself does.
                            Some(was) => {
                                if was.owner == Some(me) {
                                    let bytes = &taken[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                                    self.restore_home_copy(region, p, bytes);
                                }
                                s.store(was);
                            }
                            None => {
                                let mut e = s.load();
                                swmr::withdraw(&mut e, requester);
                                s.store(&e);
                            }
                        }
                    }
                }
                self.scratch = owned;
                self.taken = taken;
                if data != Data::None || !sent {
                    // The requester held no copy (or never heard of the upgrade): release now; no Unlock
                    // follows (see `fault`).
                    for p in pages {
                        if unlock_slot(&region.slot(p).lock) {
                            self.serve_queue(region, p);
                        }
                    }
                }
            }
            Decision::Grant(grant) => {
                // The home's copy is kept aside even when the grant does not carry it: were the grant not
                // sent, it is put back (the entry, unchanged until `complete`, still lists it).
                let copied = self.home_action(region, page, grant.home_action);
                if grant.data_from_home {
                    Counters::add(&self.shared.counters.pages_sent, 1);
                }
                let owned = std::mem::take(&mut self.scratch);
                let payload: &[u8] = if copied && grant.data_from_home {
                    &owned
                } else {
                    &[]
                };
                let owner_failed = grant
                    .fetch_from
                    .is_some_and(|o| self.shared.failed[o.index()].load(Ordering::Acquire));
                if self.reply(
                    idx,
                    &Reply::Granted {
                        grant,
                        owner_failed,
                    },
                    &[payload],
                ) {
                    // Held until the requester's Unlock (or Abandon); should the requester fail before,
                    // `peer_failed` ends the transaction as if it had completed (it may have invalidated
                    // the others).
                    let held = Held::Granted {
                        home_kept_its_copy: grant.home_action == HomeAction::None,
                    };
                    self.held_by
                        .insert((region.id, page), (requester, access, held));
                } else {
                    // The requester never heard of the grant, so nothing changed anywhere but here.
                    if copied {
                        self.restore_home_copy(region, page, &owned);
                    }
                    if unlock_slot(&slot.lock) {
                        self.serve_queue(region, page);
                    }
                }
                self.scratch = owned;
            }
        }
    }

    /// A leaf request found no copy here. If a thread of this rank is installing the page (the home answered
    /// it and released the page before the install), the request waits for the install; returns true then.
    /// Otherwise the ranks disagree about the page, and the request is refused (also true: it is handled).
    /// Returns false when the page got installed meanwhile: serve the request now.
    ///
    /// An invalidation without data that finds the fault running a grant (GRANTED) comes from a writer the
    /// home granted after it ended that fault's transaction early, having taken this rank for failed: it is
    /// acknowledged at once (there is no copy yet) and the transaction revoked, so that the fault installs
    /// nothing (`fault::end_grant`). Deferred, it could wait for ever: the grant's fetch may wait at an
    /// owner whose own fault waits for the home lock that writer holds.
    ///
    /// A request for this rank's copy from such a later transaction (`wait_for_own`: the home granted it
    /// while taking this rank for failed) waits while a fault of this rank resolves the page, copy or no
    /// copy: the home ended that fault's transaction early and recorded it as done, so the page is to be
    /// taken from this rank as that transaction leaves it. Served at once, it would hand out or take the
    /// copy an upgrade keeps, which the upgrade then makes writable while the requester reads the old
    /// bytes, or before the other copies the upgrade drops are gone. The fault ends on its own: it
    /// installs, or fails (its home answers it no more). A request without the mark is served from a
    /// copy here even then: it comes from a transaction the home decided before, which this rank's own
    /// may be waiting for.
    fn defer_or_refuse(
        &mut self,
        idx: usize,
        region: &RegionShared,
        page: u64,
        req: Request,
    ) -> bool {
        let word = region.state(page);
        let wait_for_own = matches!(
            req,
            Request::Fetch {
                wait_for_own: true,
                ..
            } | Request::Invalidate {
                wait_for_own: true,
                ..
            }
        );
        loop {
            let s = word.load(Ordering::Acquire);
            if s & STATE_MASK != INVALID && !(wait_for_own && s & BUSY != 0) {
                return false;
            }
            if s & BUSY == 0 {
                self.refuse(idx, RefusedReason::NoCopyHere);
                return true;
            }
            if s & GRANTED != 0
                && s & STATE_MASK == INVALID
                && matches!(
                    req,
                    Request::Invalidate {
                        send_data: false,
                        ..
                    }
                )
            {
                if word
                    .compare_exchange(s, s | REVOKED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.reply(idx, &Reply::Ack, &[]);
                    return true;
                }
                continue;
            }
            if word
                .compare_exchange(s, s | DEFERRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.deferred.push((idx, req, Vec::new()));
                return true;
            }
        }
    }

    /// Refuses a leaf request (a fetch or an invalidation from a granted requester) for a page homed here:
    /// the manager deals with the home's copy itself, and never grants a transaction that asks the home
    /// for it. (Served, an invalidation would drop a copy the manager's entry still lists.)
    fn leaf_request_at_home(&mut self, idx: usize, region: &RegionShared, page: u64) -> bool {
        if region.home(page) != self.shared.me {
            return false;
        }
        self.refuse(idx, RefusedReason::WrongRank);
        true
    }

    pub(super) fn fetch(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        page: u64,
        wait_for_own: bool,
    ) {
        if self.leaf_request_at_home(idx, region, page) {
            return;
        }
        let req = Request::Fetch {
            region: region.id,
            page,
            wait_for_own,
        };
        if self.defer_or_refuse(idx, region, page, req) {
            return;
        }
        let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
        if st == READ_WRITE {
            self.protect_or_die(region, page);
            set_state(region.state(page), READ_ONLY);
        }
        Counters::add(&self.shared.counters.pages_sent, 1);
        let region = region.clone();
        self.reply(idx, &Reply::Page, &[region.present_page(page)]);
    }

    pub(super) fn invalidate(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        page: u64,
        send_data: bool,
        wait_for_own: bool,
    ) {
        if self.leaf_request_at_home(idx, region, page) {
            return;
        }
        let req = Request::Invalidate {
            region: region.id,
            page,
            send_data,
            wait_for_own,
        };
        if self.defer_or_refuse(idx, region, page, req) {
            return;
        }
        let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
        if send_data {
            if st == READ_WRITE {
                self.protect_or_die(region, page);
            }
            region.read_page(page, self.scratch_page());
        }
        self.drop_copy(region, page);
        if send_data {
            Counters::add(&self.shared.counters.pages_sent, 1);
            let owned = std::mem::take(&mut self.scratch);
            self.reply(idx, &Reply::Page, &[&owned]);
            self.scratch = owned;
        } else {
            self.reply(idx, &Reply::Ack, &[]);
        }
    }

    /// Installs `pages` (with their bytes in `sources`) straight into `peer`'s memory if this rank holds its
    /// userfaultfd (`direct.rs`); returns whether it did. After a failure the peer gets the bytes over
    /// its connection, now and from then on: whatever it had installed already, the install it does itself
    /// skips (`UFFDIO_COPY` leaves present pages alone, and they hold the same bytes).
    pub(super) fn install_directly(
        &mut self,
        peer: Rank,
        region: &RegionShared,
        pages: &[u64],
        sources: &[&[u8]],
        writable: bool,
    ) -> bool {
        let Some(fd) = &self.direct[peer.index()] else {
            return false;
        };
        match direct::install(fd.as_fd(), region, pages, sources, writable) {
            Ok(()) => {
                Counters::add(
                    &self.shared.counters.pages_installed_into_peers,
                    pages.len() as u64,
                );
                true
            }
            Err(e) => {
                // Out of memory (the peer's, charged to it either way): this reply goes over the
                // connection. Anything else means the peer's memory is out of reach. (`uffd::copy` retries
                // EAGAIN and EINTR itself.)
                let lasting = e != Errno::ENOMEM;
                tracing::warn!(
                    "{}: installing pages into {peer} directly failed ({e}); sending them{}",
                    self.shared.me,
                    if lasting { " from now on" } else { "" }
                );
                if lasting {
                    self.direct[peer.index()] = None;
                }
                false
            }
        }
    }

    /// Puts back the home's copy of `page` (its bytes in `bytes`), dropped for a request whose answer could
    /// not be sent. Read-only: the caller restores the manager's entry, in which the home holds the page, and
    /// a write by the home then upgrades it as usual. A thread of this rank faulting on the page meanwhile
    /// waits for the manager lock, which the caller holds, and finds the copy present when it gets it.
    fn restore_home_copy(&mut self, region: &RegionShared, page: u64, bytes: &[u8]) {
        if let Err(e) = region.install(page, 1, bytes, false) {
            self.die(&format!(
                "putting back page {page} of region {} failed: {e}",
                region.id
            ));
        }
        set_state(region.state(page), READ_ONLY);
    }

    /// Drops this rank's copy: the state first (so that a new fault waits for the manager), then the page.
    fn drop_copy(&mut self, region: &RegionShared, page: u64) {
        set_state(region.state(page), INVALID);
        region.drop_copies(self.shared.me, page, 1);
        Counters::add(&self.shared.counters.invalidations, 1);
    }

    fn protect_or_die(&mut self, region: &RegionShared, page: u64) {
        if let Err(e) = region.protect(page, 1, true) {
            self.die(&format!(
                "write-protecting page {page} of region {} failed: {e}",
                region.id
            ));
        }
    }
}
/// How a transaction of another rank holds a page's manager lock here (`Engine::held_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// Answered at once (an upgrade, or a read of a copy the requester holds), held for its `Unlock`.
    Answered,
    /// Granted, held for its `Unlock`; or, when the home kept its own copy (the grant dropped no copy
    /// here), for its `Abandon` should the owner it names have left.
    Granted { home_kept_its_copy: bool },
}

/// How a requester ends a transaction that holds a page's manager lock here.
pub(super) enum Ending {
    /// Its `Unlock`: `granted` says whether it ran a grant, which is recorded as done.
    Unlock { count: u32, granted: bool },
    /// Its `Abandon` of a grant that did not run (the owner it named left the job): nothing is recorded.
    Abandon,
}

impl Engine {
    /// Ends the transactions `peer` holds here, which no Unlock or Abandon will end: it failed, or left the
    /// job without one. Otherwise their pages would stay locked for ever. One that was writing may have taken
    /// the only copy (it invalidated the others first): the page is recorded as `peer`'s, so that a later
    /// fault on it fails naming that rank rather than reading what may be stale. A reader is recorded as
    /// holding its copy: taken for failed, it may live on and have installed the page, and a writer must
    /// then invalidate it (the copy set forgets it once it is gone). A transaction the home completed
    /// itself (`Done`, held only for the requester's install) was recorded when it was decided, as its
    /// Unlock would find it: only a grant is completed here.
    pub(super) fn end_transactions_of(&mut self, peer: Rank) {
        let held: Vec<((u32, u64), Access, Held)> = self
            .held_by
            .iter()
            .filter(|(_, (r, _, _))| *r == peer)
            .map(|(k, (_, a, held))| (*k, *a, *held))
            .collect();
        for ((id, page), access, held) in held {
            self.held_by.remove(&(id, page));
            let Some(region) = self.shared.region(id) else {
                continue;
            };
            let slot = region.slot(page);
            if held != Held::Answered {
                let mut e = slot.load();
                swmr::complete(&mut e, peer, access);
                slot.store(&e);
            }
            if unlock_slot(&slot.lock) {
                self.serve_queue(&region, page);
            }
        }
    }

    /// Ends the transaction on `page` that the rank on connection `idx` holds, as its request says. A
    /// transaction holds one page, and only the rank it was granted to ends it: a stale, duplicate or
    /// corrupt request must not free a page lock another transaction holds. Nor may a grant that dropped
    /// the home's copy be abandoned: the entry, unchanged, would list a copy that is gone.
    pub(super) fn end_transaction(
        &mut self,
        idx: usize,
        region: u32,
        page: u64,
        access: Access,
        ending: Ending,
    ) {
        let peer = self.conns[idx].peer;
        let holder = self.held_by.get(&(region, page)).copied();
        let held = holder.and_then(|(r, a, held)| (r == peer && a == access).then_some(held));
        let (count, agrees, completed, what) = match ending {
            Ending::Unlock { count, granted } => {
                let agrees = held.is_some_and(|h| (h != Held::Answered) == granted);
                (count, agrees, granted, "an Unlock")
            }
            Ending::Abandon => {
                let agrees = held
                    == Some(Held::Granted {
                        home_kept_its_copy: true,
                    });
                (1, agrees, false, "an Abandon")
            }
        };
        if count != 1 || !agrees {
            self.close(
                idx,
                &format!(
                    "{what} of {count} page(s) from page {page} of region {region}, which {peer} does not hold that way"
                ),
            );
            return;
        }
        self.held_by.remove(&(region, page));
        let Some(r) = self.shared.region(region) else {
            return;
        };
        let slot = r.slot(page);
        if completed {
            let mut e = slot.load();
            swmr::complete(&mut e, peer, access);
            slot.store(&e);
        }
        if unlock_slot(&slot.lock) {
            self.serve_queue(&r, page);
        }
    }
}
