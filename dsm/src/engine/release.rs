//! Release consistency at the home: whole-page fetches from it (`FetchPage`, with read-ahead and direct
//! install), the diffs that releases send it, and the diffs a barrier arrival carries to rank 0.

use super::ahead::following_here;
use super::Engine;
use super::MAX_READAHEAD;
use crate::fault::set_state;
use crate::protocol::diff;
use crate::protocol::release::marks::{self, AtDiff};
use crate::protocol::swmr::Data;
use crate::region::SHARED;
use crate::region::{
    RegionShared, BUSY, DEFERRED, DIFFED, INVALID, READ_ONLY, READ_WRITE, STATE_MASK, WRITTEN,
};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::ZERO_PAGE;
use crate::wire::{AtomicOp, RefusedReason, Reply, Request, WordKind};
use nix::errno::Errno;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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

impl Engine {
    /// Takes a page's BUSY bit (setting `extra` with it) and returns the page word as it was, with the
    /// request's payload; or, when a fault of this rank holds the page, marks it DEFERRED and parks the
    /// request until the fault is done (the faulting thread wakes this loop), returning `None`.
    pub(super) fn claim_or_defer(
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
        if !region.accept_home(page) {
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
        Counters::add(&self.shared.counters.diffs_applied, entries.len() as u64);
        self.reply(idx, &Reply::Ack, &[]);
    }

    /// Release consistency, at the home: performs an atomic operation on a word of a page homed here, in
    /// the home's copy, and answers with the word as it was (`rc::atomic`). This loop performs the atomic
    /// operations on words of its pages one at a time, the home's own threads' too unless they act in
    /// place (holding the page, as this loop does): that is what makes them atomic. A change is applied as a diff of the word would be (`apply_claimed`): from another
    /// rank, whose next write notice announces it, as that rank's diff; from this rank, as the home's own
    /// write (its release announces it).
    pub(super) fn atomic(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        page: u64,
        offset: u16,
        kind: WordKind,
        op: AtomicOp,
    ) {
        if !region.accept_home(page) {
            self.refuse(idx, RefusedReason::WrongRank);
            return;
        }
        let (at, width) = (usize::from(offset), kind.width());
        if !at.is_multiple_of(width) || at + width > PAGE_SIZE {
            let what = format!(
                "an atomic operation on a word of {width} bytes at byte {at} of a page of {PAGE_SIZE}: not inside it, or not aligned"
            );
            self.close(idx, &what);
            return;
        }
        let req = Request::Atomic {
            region: region.id,
            page,
            offset,
            kind,
            op,
        };
        let Some((s, _)) = self.claim_or_defer(idx, region, page, 0, req, Vec::new()) else {
            return;
        };
        let old = if s & STATE_MASK == INVALID {
            0 // never touched here: zeros
        } else {
            region.read_word(page, at, width)
        };
        let new = op.apply(kind, old);
        if new == old {
            crate::fault::release_busy(region, page);
        } else {
            let (four, eight) = ((new as u32).to_ne_bytes(), new.to_ne_bytes());
            let diff = diff::run(at, if width == 4 { &four } else { &eight });
            let own = self.conns[idx].peer == self.shared.me;
            self.apply_claimed(region, &[(page, 0..diff.len())], &[s], &diff, own);
        }
        Counters::add(&self.shared.counters.atomics_served, 1);
        self.reply(idx, &Reply::Atomic { old }, &[]);
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
            Counters::add(&self.shared.counters.diffs_applied, entries.len() as u64);
        }
        self.carries[peer.index()] = carry.seq;
        CarryApplied::Yes
    }

    /// The entries of a batch of `count` diffs for pages of `region` homed here, checked whole; `None`
    /// (the sender failed, or its request refused) when it is malformed, names a page past the region's
    /// end, or one homed elsewhere. `carried`: the batch came with a barrier arrival.
    pub(super) fn checked_batch(
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
        if let Some((page, _)) = entries.iter().find(|(page, _)| !region.accept_home(*page)) {
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
    pub(super) fn apply_claimed(
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
    }

    /// The kernel refused to make a page writable for a diff: this rank's own failure, not the sender's.
    /// The home cannot keep its pages right, and blaming the sender would end the job naming a healthy rank.
    pub(super) fn not_writable(&self, region: &RegionShared, page: u64, e: Errno) -> ! {
        self.die(&format!(
            "making page {page} of region {} writable for a diff failed: {e}",
            region.id
        ))
    }
}
