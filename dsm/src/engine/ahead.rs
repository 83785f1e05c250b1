//! The pages a home hands out along with the one a fault asked for, under sequential consistency: the
//! following pages of the same home that it can give at once (read-ahead for a reader, write-ahead for a
//! writer). Each is decided by `swmr::decide` like the faulting page, and a page whose decision differs,
//! or whose manager lock is held, ends the run. Nothing here sends: `pages::serve_acquire` answers with
//! the run, and takes it back if the answer does not go.

use super::Engine;
use crate::fault::{give_untouched, lock_untouched, set_state, try_lock_slot, unlock_slot};
use crate::protocol::swmr::{self, Access, Data, Decision, HomeAction};
use crate::region::{RegionShared, INVALID, READ_ONLY, READ_WRITE, STATE_MASK};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use std::sync::atomic::Ordering;

impl Engine {
    /// Adds to `pages` the following pages that the home can hand out read-only at once: homed here, lock
    /// free, and either untouched or owned by the home. Like the faulting page, they are released as soon as
    /// the reply is sent (the requester held no copy of them; see `fault`).
    pub(super) fn gather_readahead(
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
    pub(super) fn gather_untouched(
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

    /// Adds to `pages` the following pages that a writer with no copy of `page`, taking the home's copy
    /// of it, can take along at once (write-ahead of written pages): homed here, lock free, and either
    /// untouched or held by the home alone (owned here, no copy anywhere else). A page that another rank
    /// holds a copy of ends the run: that copy would have to be dropped first, a round trip of its own.
    ///
    /// The home gives its copies up as it gives up the faulting page's (`home_action`): it write-protects
    /// the writable ones, copies them into `taken` (one page there for each page after `page`, zeros for
    /// an untouched one) and drops them, all before the answer goes, so that none of its threads reads a
    /// copy that the writer is already changing. `was` receives each page's entry as it was, to be put
    /// back if the answer does not reach the requester. Like the faulting page, they are released as soon
    /// as the answer is sent.
    pub(super) fn gather_written(
        &mut self,
        region: &RegionShared,
        page: u64,
        count: u32,
        requester: Rank,
        pages: &mut Vec<u64>,
        was: &mut Vec<swmr::Entry>,
    ) {
        let me = self.shared.me;
        // The pages whose copy here goes to the writer (the others are untouched: zeros).
        let mut given_up = Vec::new();
        for p in following_here(region, page, count, me) {
            let lock = &region.slot(p).lock;
            if !try_lock_slot(lock) {
                break;
            }
            let slot = region.slot(p);
            let mut entry = slot.load();
            let before = entry;
            let here = region.state(p).load(Ordering::Acquire) & STATE_MASK;
            match swmr::decide(&mut entry, me, requester, Access::Write) {
                Decision::Done {
                    data: Data::Zero, ..
                } => {}
                Decision::Done {
                    home_action: HomeAction::Invalidate,
                    data: Data::Home,
                } if here != INVALID => given_up.push(p),
                _ => {
                    if unlock_slot(lock) {
                        // A queued request for this page is served when the loop next looks at its queues.
                        self.shared.wake_service();
                    }
                    break;
                }
            }
            slot.store(&entry);
            was.push(before);
            pages.push(p);
        }
        let mut taken = std::mem::take(&mut self.taken);
        taken.clear();
        taken.resize((pages.len() - 1) * PAGE_SIZE, 0);
        let writable: Vec<u64> = given_up
            .iter()
            .copied()
            .filter(|&p| region.state(p).load(Ordering::Acquire) & STATE_MASK == READ_WRITE)
            .collect();
        for (start, count) in runs(&writable) {
            if let Err(e) = region.protect(start, count, true) {
                self.die(&format!(
                    "write-protecting pages {start}..{} of region {} failed: {e}",
                    start + count,
                    region.id
                ));
            }
        }
        for (k, &p) in pages[1..].iter().enumerate() {
            if given_up.contains(&p) {
                region.read_page(p, &mut taken[k * PAGE_SIZE..]);
            }
        }
        // The state first (a new fault here then waits for the manager lock, held), then the copies.
        for &p in &given_up {
            set_state(region.state(p), INVALID);
        }
        for (start, count) in runs(&given_up) {
            region.drop_copies(me, start, count);
        }
        Counters::add(&self.shared.counters.invalidations, given_up.len() as u64);
        self.taken = taken;
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
}

/// The pages after `page` that a reply of up to `count` pages can carry with it, along the home's steps
/// (the next page, in a cyclic region the next one with the same home, in a block-cyclic one the rest
/// of its block and then its next block), inside the region and homed at `me`.
pub(super) fn following_here(
    region: &RegionShared,
    page: u64,
    count: u32,
    me: Rank,
) -> impl Iterator<Item = u64> + '_ {
    let steps = region.home_steps();
    (1..u64::from(count))
        .map(move |k| steps.page(page, k))
        .take_while(move |&p| p < region.pages && region.home(p) == me)
}

/// The runs of neighbouring pages in `pages` (ascending), as `(first, count)`: one system call each.
fn runs(pages: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let &first = pages.get(at)?;
        let len = pages[at..]
            .iter()
            .zip(first..)
            .take_while(|(&p, expected)| p == *expected)
            .count();
        at += len;
        Some((first, len as u64))
    })
}
