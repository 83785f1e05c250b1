//! The pages of the service loop: the manager side of the pages homed at this rank (fault requests served
//! or queued under the per-page manager lock, with read-ahead and write-ahead), the leaf operations on
//! this rank's copies (send, downgrade, drop), page fetches and diffs under release consistency.

use super::MAX_READAHEAD;
use super::{Engine, Held};
use crate::channel::write_frame;
use crate::direct::{self};
use crate::fault::{give_untouched, lock_untouched, set_state, try_lock_slot, unlock_slot};
use crate::protocol::diff;
use crate::protocol::release::marks::{self, AtDiff};
use crate::protocol::swmr::{self, Access, Data, Decision, HomeAction};
use crate::region::SHARED;
use crate::region::{
    RegionShared, BUSY, DEFERRED, DIFFED, GRANTED, INVALID, LOCKED, QUEUED, READ_ONLY, READ_WRITE,
    REVOKED, STATE_MASK, WRITTEN,
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
        if region.home(page) != me {
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
                }
                // One page, or several for read-ahead (each present here now, downgraded, or untouched:
                // zeros), or several untouched pages for a first writer (zeros, no payload).
                let owned = std::mem::take(&mut self.scratch);
                let reply_data = if pages.len() > 1 && access == Access::Read {
                    Data::Home
                } else {
                    data
                };
                let slices: Vec<&[u8]> = match reply_data {
                    Data::Home => pages
                        .iter()
                        .map(|p| {
                            if *p == page && copied {
                                &owned[..]
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
                // install straight into it wakes its fault, and one that failed may have put some there.
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
                    // straight into the requester's memory, which woke its fault: the home's copy may be the
                    // only one, and the requester, failed, is out of the job; should it live on, what it
                    // writes there is its own.)
                    if copied {
                        self.restore_home_copy(region, page, &owned);
                    }
                    slot.store(&before);
                    for &p in &pages[1..] {
                        let s = region.slot(p);
                        let mut e = s.load();
                        swmr::withdraw(&mut e, requester);
                        s.store(&e);
                    }
                }
                self.scratch = owned;
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
                if self.reply(idx, &Reply::Granted { grant }, &[payload]) {
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

    /// Adds to `pages` the following pages that the home can hand out read-only at once: homed here, lock
    /// free, and either untouched or owned by the home. Like the faulting page, they are released as soon as
    /// the reply is sent (the requester held no copy of them; see `fault`).
    fn gather_readahead(
        &mut self,
        region: &RegionShared,
        page: u64,
        count: u32,
        requester: Rank,
        pages: &mut Vec<u64>,
    ) {
        let me = self.shared.me;
        let mut run: Option<(u64, u64)> = None;
        for p in following_here(region, page, count, me) {
            let lock = &region.slot(p).lock;
            if !try_lock_slot(lock) {
                break;
            }
            let slot = region.slot(p);
            let mut entry = slot.load();
            match swmr::decide(&mut entry, me, requester, Access::Read) {
                Decision::Done {
                    home_action,
                    data: data @ (Data::Home | Data::Zero),
                } => {
                    // Untouched pages (zeros) change nothing here. Writable home copies are downgraded below,
                    // one UFFDIO_WRITEPROTECT per contiguous run rather than one per page.
                    let writable =
                        region.state(p).load(Ordering::Acquire) & STATE_MASK == READ_WRITE;
                    if data == Data::Home && home_action == HomeAction::Downgrade && writable {
                        match &mut run {
                            Some((start, len)) if *start + *len == p => *len += 1,
                            _ => {
                                self.downgrade_run(region, run.take());
                                run = Some((p, 1));
                            }
                        }
                    }
                    slot.store(&entry);
                    pages.push(p);
                }
                _ => {
                    if unlock_slot(lock) {
                        // A queued request for this page is served when the loop next looks at its queues.
                        self.shared.wake_service();
                    }
                    break;
                }
            }
        }
        self.downgrade_run(region, run);
    }

    /// Adds to `pages` the following pages that nobody has touched, homed here with their manager locks
    /// free, each handed to `requester` as its first writer (zeros): write-ahead for a sequential first
    /// writer. Like the faulting page, they are released as soon as the reply is sent.
    fn gather_untouched(
        &mut self,
        region: &RegionShared,
        page: u64,
        count: u32,
        requester: Rank,
        pages: &mut Vec<u64>,
    ) {
        for p in following_here(region, page, count, self.shared.me) {
            if !lock_untouched(region, p) {
                break;
            }
            give_untouched(region, p, requester, Access::Write);
            pages.push(p);
        }
    }

    /// Write-protects a run of writable home pages `(start, count)` with one ioctl and marks them read-only.
    fn downgrade_run(&mut self, region: &RegionShared, run: Option<(u64, u64)>) {
        let Some((start, count)) = run else { return };
        if let Err(e) = region.protect(start, count, true) {
            self.die(&format!(
                "write-protecting pages {start}..{} of region {} failed: {e}",
                start + count,
                region.id
            ));
        }
        for p in start..start + count {
            set_state(region.state(p), READ_ONLY);
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
    /// owner whose own fault waits for the home lock that writer holds. (A request that needs this rank's
    /// data can reach a running grant only after the home completed a failed write, and that grant ends
    /// on its own.)
    fn defer_or_refuse(
        &mut self,
        idx: usize,
        region: &RegionShared,
        page: u64,
        req: Request,
    ) -> bool {
        let word = region.state(page);
        loop {
            let s = word.load(Ordering::Acquire);
            if s & STATE_MASK != INVALID {
                return false;
            }
            if s & BUSY == 0 {
                self.refuse(idx, RefusedReason::NoCopyHere);
                return true;
            }
            if s & GRANTED != 0
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

    pub(super) fn fetch(&mut self, idx: usize, region: &Arc<RegionShared>, page: u64) {
        if self.leaf_request_at_home(idx, region, page) {
            return;
        }
        let req = Request::Fetch {
            region: region.id,
            page,
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
    ) {
        if self.leaf_request_at_home(idx, region, page) {
            return;
        }
        let req = Request::Invalidate {
            region: region.id,
            page,
            send_data,
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

    /// Takes a page's BUSY bit (setting `extra` with it) and returns the page word as it was, with the
    /// request's payload; or, when a fault of this rank holds the page, marks it DEFERRED and parks the
    /// request until the fault is done (the faulting thread wakes this loop), returning `None`.
    fn claim_or_defer(
        &mut self,
        idx: usize,
        region: &RegionShared,
        page: u64,
        extra: u32,
        req: Request,
        payload: Vec<u8>,
    ) -> Option<(u32, Vec<u8>)> {
        match claim_or_flag(region.state(page), extra) {
            Some(s) => Some((s, payload)),
            None => {
                self.deferred.push((idx, req, payload));
                None
            }
        }
    }

    /// Release consistency, at the home: sends the home's copy of a page (zeros when never touched here). The
    /// home's own threads may be writing the page meanwhile; see `RegionShared::snapshot_page`.
    pub(super) fn fetch_page(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        page: u64,
        count: u32,
        direct: bool,
    ) {
        if region.home(page) != self.shared.me {
            self.refuse(idx, RefusedReason::WrongRank);
            return;
        }
        // From now on the home's writes to these pages must be tracked: take each page (the first one waiting
        // for a fault of this rank in progress, the following ones only if free at once), mark it shared and
        // write-protect it, then send them.
        let req = Request::FetchPage {
            region: region.id,
            page,
            count,
            direct,
        };
        let Some((first, _)) = self.claim_or_defer(idx, region, page, SHARED, req, Vec::new())
        else {
            return;
        };
        let mut claimed = vec![(page, first)];
        for p in following_here(region, page, count.min(MAX_READAHEAD), self.shared.me) {
            let w = region.state(p);
            let s = w.load(Ordering::Acquire);
            if s & BUSY != 0
                || w.compare_exchange(s, s | BUSY | SHARED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                break;
            }
            claimed.push((p, s));
        }
        if claimed.len() == 1 && first & STATE_MASK == INVALID {
            crate::fault::release_busy(region, page);
            self.reply(
                idx,
                &Reply::Done {
                    data: Data::Zero,
                    count: 1,
                },
                &[],
            );
            return;
        }
        // Pages written here in place are write-protected before they are copied, a run of neighbours per
        // system call (a page each cost a TLB shootdown each while this rank's threads run).
        let writable: Vec<u64> = claimed
            .iter()
            .filter(|&&(_, s)| marks::protect_for_fetch(s))
            .map(|&(p, _)| p)
            .collect();
        if let Err((done, e)) = region.protect_runs(&writable, true) {
            self.die(&format!(
                "write-protecting page {} for a fetch failed: {e}",
                writable[done]
            ));
        }
        for &p in &writable {
            set_state(region.state(p), READ_ONLY);
        }
        let mut bytes = vec![0u8; claimed.len() * PAGE_SIZE];
        let mut exposed = Vec::new();
        for (i, (p, s)) in claimed.iter().enumerate() {
            if s & STATE_MASK == INVALID {
                continue; // never touched here: zeros
            }
            let copy = &mut bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            region.snapshot_page(*p, copy);
            // The copy may hold writes of this home's open interval that the home then undoes: see
            // `marks::undiffed_at_fetch`.
            if marks::undiffed_at_fetch(*s, || region.twin(*p) != &copy[..]) {
                region.state(*p).fetch_and(!DIFFED, Ordering::AcqRel);
                exposed.push(*p);
            }
        }
        region.drop_twins(&exposed);
        for (p, _) in &claimed {
            crate::fault::release_busy(region, *p);
        }
        Counters::add(&self.shared.counters.pages_sent, claimed.len() as u64);
        let count = claimed.len() as u32;
        let requester = self.conns[idx].peer;
        let installed =
            direct && self.conns[idx].open && self.direct[requester.index()].is_some() && {
                let pages: Vec<u64> = claimed.iter().map(|(p, _)| *p).collect();
                let sources: Vec<&[u8]> = bytes.chunks(PAGE_SIZE).collect();
                self.install_directly(requester, region, &pages, &sources, false)
            };
        if installed {
            self.reply(idx, &Reply::Installed { count }, &[]);
        } else {
            let reply = Reply::Done {
                data: Data::Home,
                count,
            };
            self.reply(idx, &reply, &[&bytes]);
        }
    }

    /// Installs `pages` (with their bytes in `sources`) straight into `peer`'s memory if this rank holds its
    /// userfaultfd (`direct.rs`); returns whether it did. After a failure the peer gets the bytes over
    /// its connection, now and from then on: whatever it had installed already, the install it does itself
    /// skips (`UFFDIO_COPY` leaves present pages alone, and they hold the same bytes).
    fn install_directly(
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

    /// Release consistency, at the home: applies a batch of diffs (`protocol::diff`) to the home's copies
    /// and acknowledges it once, each page as `marks::at_diff` says. The batch is checked whole before
    /// anything changes, and its pages taken all at once, or none: while a thread of this rank holds one
    /// (a fault, a release), the batch waits for it, and is checked and taken again when it is let go. A page is recorded as written (listed) before it becomes writable here: from then
    /// on this rank's threads write it without a fault, so a release that drained the list in between
    /// would leave their writes out of its notice. A page only diffs write keeps a twin of what they left
    /// in it (`DIFFED`), so that the home's release announces it only if its threads wrote it too.
    /// Neighbouring pages are made writable with one system call.
    pub(super) fn apply_diffs(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        req: Request,
        batch: Vec<u8>,
    ) {
        let Request::Diffs {
            count, selective, ..
        } = req
        else {
            return;
        };
        // A release sends its batches to a home one after another and takes the acknowledgements in the
        // same order, crediting each to its batch by position: a batch that comes after one parked here
        // waits behind it, so that its acknowledgement does not overtake the parked one's (were the
        // connection to break in between, the releaser would count the parked pages delivered and the
        // others not). It is served when the parked one is, from the same list, in order.
        if self.deferred.iter().any(|(i, _, _)| *i == idx) {
            self.deferred.push((idx, req, batch));
            return;
        }
        let Some(entries) = self.checked_batch(idx, region, &batch, count, false) else {
            return;
        };
        // Exclude this rank's faults on the pages while they change; a fault in progress finishes first.
        let Some(claimed) = claim_all(region, entries.iter().map(|(page, _)| *page)) else {
            self.deferred.push((idx, req, batch));
            return;
        };
        self.apply_claimed(region, &entries, &claimed, &batch, selective);
        self.reply(idx, &Reply::Ack, &[]);
    }

    /// Rank 0: applies a carry sent on its own (`Request::Carried`) and acknowledges it.
    pub(super) fn carried(&mut self, idx: usize, payload: Vec<u8>) {
        if self.shared.me != Rank(0) {
            self.refuse(idx, RefusedReason::WrongRank);
            return;
        }
        // Behind a request of the same connection parked here, as for diffs.
        if self.deferred.iter().any(|(i, _, _)| *i == idx) {
            self.deferred.push((idx, Request::Carried, payload));
            return;
        }
        match self.apply_carry(idx, &payload) {
            CarryApplied::Yes => {
                self.reply(idx, &Reply::Ack, &[]);
            }
            CarryApplied::Waits => self.deferred.push((idx, Request::Carried, payload)),
            CarryApplied::SenderFailed => {}
        }
    }

    /// Rank 0: applies the diffs a rank's barrier arrival carries (`rc::carry::Carry`), unless this rank
    /// has applied them (or a later carry of that rank) already. Every batch is checked whole, and every
    /// page taken, before any changes; while a thread of this rank holds one, none is taken and the carry
    /// waits (the caller parks its request). A malformed carry fails its sender.
    pub(super) fn apply_carry(&mut self, idx: usize, bytes: &[u8]) -> CarryApplied {
        let peer = self.conns[idx].peer;
        let carry: crate::rc::carry::Carry = match postcard::from_bytes(bytes) {
            Ok(carry) => carry,
            Err(e) => {
                self.close(idx, &format!("carried diffs do not decode: {e}"));
                return CarryApplied::SenderFailed;
            }
        };
        if carry.seq <= self.carries[peer.index()] {
            return CarryApplied::Yes;
        }
        let mut checked: Vec<(Arc<RegionShared>, Vec<Entry>)> =
            Vec::with_capacity(carry.batches.len());
        for batch in &carry.batches {
            let region = match self.shared.region(batch.region) {
                Some(r) if r.consistency == crate::Consistency::Release => r,
                _ => {
                    let what = format!(
                        "carried diffs for region {}, not a release-consistency region here",
                        batch.region
                    );
                    self.close(idx, &what);
                    return CarryApplied::SenderFailed;
                }
            };
            // A page twice would be taken twice, and wait for itself.
            if checked.iter().any(|(r, _)| r.id == region.id) {
                let what = format!("carried two batches of diffs for region {}", region.id);
                self.close(idx, &what);
                return CarryApplied::SenderFailed;
            }
            let Some(entries) = self.checked_batch(idx, &region, &batch.bytes, batch.count, true)
            else {
                return CarryApplied::SenderFailed;
            };
            checked.push((region, entries));
        }
        let mut claimed = Vec::with_capacity(checked.len());
        for (region, entries) in &checked {
            match claim_all(region, entries.iter().map(|(page, _)| *page)) {
                Some(words) => claimed.push(words),
                None => {
                    for ((region, entries), _) in checked.iter().zip(&claimed) {
                        for (page, _) in entries {
                            crate::fault::release_busy(region, *page);
                        }
                    }
                    return CarryApplied::Waits;
                }
            }
        }
        for (((region, entries), words), batch) in checked.iter().zip(&claimed).zip(&carry.batches)
        {
            self.apply_claimed(region, entries, words, &batch.bytes, false);
        }
        self.carries[peer.index()] = carry.seq;
        CarryApplied::Yes
    }

    /// The entries of a batch of `count` diffs for pages of `region` homed here, checked whole; `None`
    /// (the sender failed, or its request refused) when it is malformed, names a page past the region's
    /// end, or one homed elsewhere. `carried`: the batch came with a barrier arrival.
    fn checked_batch(
        &mut self,
        idx: usize,
        region: &RegionShared,
        batch: &[u8],
        count: u32,
        carried: bool,
    ) -> Option<Vec<Entry>> {
        let entries = match diff::decode_batch(batch, count) {
            Ok(entries) => entries,
            // The sender is broken. Nothing changed here.
            Err(e) => {
                self.close(idx, &format!("diffs for region {}: {e}", region.id));
                return None;
            }
        };
        if let Some((page, _)) = entries.last().filter(|(page, _)| *page >= region.pages) {
            // A request of its own is refused (the sender may have a stale view of the region); a
            // barrier arrival cannot be, so its sender fails.
            if carried {
                let what = format!(
                    "carried a diff for page {page} of region {}, past its end",
                    region.id
                );
                self.close(idx, &what);
            } else {
                self.refuse(idx, RefusedReason::PageOutOfRange);
            }
            return None;
        }
        let me = self.shared.me;
        if let Some((page, _)) = entries.iter().find(|(page, _)| region.home(*page) != me) {
            let what = format!(
                "a diff for page {page} of region {}, not homed here",
                region.id
            );
            self.close(idx, &what);
            return None;
        }
        Some(entries)
    }

    /// Applies checked diffs (`entries` of `batch`) to the home's copies of their pages, which this loop
    /// holds BUSY (`claimed`: their words as taken), and lets the pages go. See `apply_diffs`.
    fn apply_claimed(
        &mut self,
        region: &Arc<RegionShared>,
        entries: &[Entry],
        claimed: &[u32],
        batch: &[u8],
        selective: bool,
    ) {
        let mut dropped_twins = Vec::new();
        let mut listed = Vec::new();
        let mut untouched = Vec::new();
        let mut protected = Vec::new();
        for ((page, diff), &s) in entries.iter().zip(claimed) {
            let (page, diff) = (*page, &batch[diff.clone()]);
            let rule = marks::at_diff(s, selective);
            // Checked whole above: applying cannot fail.
            let _ = match rule {
                AtDiff::Twin => {
                    // The page is not writable here (nobody writes it meanwhile): its twin is its bytes, or
                    // zeros, as the diff leaves them.
                    let twin = region.twin_mut(page);
                    if s & STATE_MASK == INVALID {
                        twin.fill(0);
                    } else {
                        twin.copy_from_slice(region.present_page(page));
                    }
                    diff::apply(twin, diff)
                }
                AtDiff::Both => diff::apply(region.twin_mut(page), diff),
                AtDiff::Own => Ok(0),
            };
            // Own: announced whatever its twin says, so the twin (if any) goes.
            let (mark, unmark) = match rule {
                AtDiff::Twin => (WRITTEN | DIFFED, 0),
                AtDiff::Both => (WRITTEN, 0),
                AtDiff::Own => (WRITTEN, DIFFED),
            };
            let was = region
                .state(page)
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                    Some((w | mark) & !unmark)
                })
                .unwrap_or_else(|w| w);
            if was & unmark != 0 {
                dropped_twins.push(page);
            }
            if marks::at_write(was, true).list {
                listed.push(page);
            }
            match s & STATE_MASK {
                INVALID => untouched.push(page),
                READ_ONLY => protected.push(page),
                _ => {}
            }
        }
        region.drop_twins(&dropped_twins);
        if !listed.is_empty() {
            region
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(listed);
        }
        for page in untouched {
            if let Err(e) = region.install(page, 1, &ZERO_PAGE, true) {
                self.not_writable(region, page, e);
            }
        }
        if let Err((done, e)) = region.protect_runs(&protected, false) {
            self.not_writable(region, protected[done], e);
        }
        for (page, diff) in entries {
            set_state(region.state(*page), READ_WRITE);
            // Checked whole above: applying cannot fail.
            let _ = region.apply_diff(*page, &batch[diff.clone()]);
            crate::fault::release_busy(region, *page);
        }
        Counters::add(&self.shared.counters.diffs_applied, entries.len() as u64);
    }

    /// The kernel refused to make a page writable for a diff: this rank's own failure, not the sender's.
    /// The home cannot keep its pages right, and blaming the sender would end the job naming a healthy rank.
    fn not_writable(&self, region: &RegionShared, page: u64, e: Errno) -> ! {
        self.die(&format!(
            "making page {page} of region {} writable for a diff failed: {e}",
            region.id
        ))
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

/// Takes the BUSY bits of `pages` (each once) and returns their words as they were; or, when a thread of
/// this rank holds one, lets the others go, marks that one DEFERRED (as `claim_or_flag`) and returns
/// `None`: the caller parks its request until the thread lets the page go.
fn claim_all(region: &RegionShared, pages: impl Iterator<Item = u64> + Clone) -> Option<Vec<u32>> {
    let mut claimed = Vec::new();
    for page in pages.clone() {
        match claim_or_flag(region.state(page), 0) {
            Some(s) => claimed.push(s),
            None => {
                for page in pages.take(claimed.len()) {
                    crate::fault::release_busy(region, page);
                }
                return None;
            }
        }
    }
    Some(claimed)
}

/// Takes a page's BUSY bit (setting `extra` with it) and returns its word as it was; or, when a thread of
/// this rank holds the page, marks it DEFERRED (the thread wakes this loop when it lets the page go) and
/// returns `None`.
fn claim_or_flag(word: &std::sync::atomic::AtomicU32, extra: u32) -> Option<u32> {
    loop {
        let s = word.load(Ordering::Acquire);
        let next = if s & BUSY != 0 {
            s | DEFERRED
        } else {
            s | BUSY | extra
        };
        if word
            .compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return (s & BUSY == 0).then_some(s);
        }
    }
}

/// The pages after `page` that a reply of up to `count` pages can carry with it: each a stride on (the
/// next page, or in a cyclic region the next one with the same home), inside the region and homed at `me`.
fn following_here(
    region: &RegionShared,
    page: u64,
    count: u32,
    me: Rank,
) -> impl Iterator<Item = u64> + '_ {
    let stride = region.home_stride();
    (1..u64::from(count))
        .map(move |k| page + k * stride)
        .take_while(move |&p| p < region.pages && region.home(p) == me)
}

/// A diff of a checked batch: its page, and where its bytes are in the batch.
type Entry = (u64, std::ops::Range<usize>);

/// What became of a carry of diffs at rank 0 (`Engine::apply_carry`).
pub(super) enum CarryApplied {
    /// Applied now, or before.
    Yes,
    /// A thread of this rank holds one of its pages: the request waits until it lets the page go.
    Waits,
    /// It was malformed: its sender is failed.
    SenderFailed,
}
