//! The pages a home hands out along with the one a fault asked for, under sequential consistency: the
//! following pages of the same home that it can give at once (read-ahead for a reader, write-ahead for a
//! writer). Each is decided by `swmr::decide` like the faulting page, and a page whose decision differs,
//! or whose manager lock is held, ends the run. Nothing here sends: `pages::serve_acquire` answers with
//! the run, and takes it back if the answer does not go.

use super::Engine;
use crate::fault::{set_state, try_lock_slot, unlock_slot};
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
        // Untouched pages (zeros) change nothing here. Writable home copies are downgraded below, one
        // UFFDIO_WRITEPROTECT per run of neighbours rather than one per page.
        let mut writable = Vec::new();
        self.take_following(
            region,
            (page, count),
            requester,
            Access::Read,
            (pages, None),
            |p, here, decided| match decided {
                Decision::Done {
                    home_action,
                    data: data @ (Data::Home | Data::Zero),
                } => {
                    if data == Data::Home
                        && home_action == HomeAction::Downgrade
                        && here == READ_WRITE
                    {
                        writable.push(p);
                    }
                    true
                }
                _ => false,
            },
        );
        self.protect_runs(region, &writable);
        for p in writable {
            set_state(region.state(p), READ_ONLY);
        }
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
        self.take_following(
            region,
            (page, count),
            requester,
            Access::Write,
            (pages, None),
            |_, _, decided| {
                matches!(
                    decided,
                    Decision::Done {
                        data: Data::Zero,
                        ..
                    }
                )
            },
        );
    }

    /// Adds to `pages` the following pages that a writer with no copy of `page`, taking the home's copy
    /// of it, can take along at once (write-ahead of written pages): homed here, lock free, and either
    /// untouched or held by the home alone (owned here, no copy anywhere else). A page that another rank
    /// holds a copy of ends the run: that copy would have to be dropped first, a round trip of its own.
    ///
    /// The home gives its copies up as it gives up the faulting page's (`home_action`): it write-protects
    /// the writable ones, copies them into `taken` (one page there for each page after `page`, zeros for
    /// an untouched one) and drops them, all before the answer goes, so that none of its threads reads a
    /// copy that the writer is already changing. Returns each page's entry as it was, to be put back if
    /// the answer does not reach the requester. Like the faulting page, they are released as soon as the
    /// answer is sent.
    pub(super) fn gather_written(
        &mut self,
        region: &RegionShared,
        page: u64,
        count: u32,
        requester: Rank,
        pages: &mut Vec<u64>,
    ) -> Vec<swmr::Entry> {
        // The pages whose copy here goes to the writer (the others are untouched: zeros), and those of
        // them writable here.
        let (mut given_up, mut writable) = (Vec::new(), Vec::new());
        let mut was = Vec::new();
        self.take_following(
            region,
            (page, count),
            requester,
            Access::Write,
            (pages, Some(&mut was)),
            |p, here, decided| match decided {
                Decision::Done {
                    data: Data::Zero, ..
                } => true,
                Decision::Done {
                    home_action: HomeAction::Invalidate,
                    data: Data::Home,
                } if here != INVALID => {
                    given_up.push(p);
                    if here == READ_WRITE {
                        writable.push(p);
                    }
                    true
                }
                _ => false,
            },
        );
        let mut taken = std::mem::take(&mut self.taken);
        taken.resize((pages.len() - 1) * PAGE_SIZE, 0);
        self.protect_runs(region, &writable);
        // (`given_up` is in the order of `pages`.)
        let mut mine = given_up.iter().peekable();
        for (&p, bytes) in pages[1..].iter().zip(taken.chunks_exact_mut(PAGE_SIZE)) {
            if mine.next_if_eq(&&p).is_some() {
                region.read_page(p, bytes);
            } else {
                bytes.fill(0);
            }
        }
        // The state first (a new fault here then waits for the manager lock, held), then the copies.
        for &p in &given_up {
            set_state(region.state(p), INVALID);
        }
        region.drop_copy_runs(self.shared.me, &given_up);
        Counters::add(&self.shared.counters.invalidations, given_up.len() as u64);
        self.taken = taken;
        was
    }

    /// Decides, for `requester`'s `access`, the pages after `page` that an answer of up to `count` pages
    /// can carry (`following_here`), each under its manager lock taken without waiting, for as long as
    /// `takes` accepts the decision (given the page, its state here and the decision): stores the entries
    /// of the pages taken, adds them to `pages` (their locks stay held), and their entries as they were to
    /// `was`, if given. The page that ends the run is left as it was, its lock free again.
    fn take_following(
        &mut self,
        region: &RegionShared,
        (page, count): (u64, u32),
        requester: Rank,
        access: Access,
        (pages, mut was): (&mut Vec<u64>, Option<&mut Vec<swmr::Entry>>),
        mut takes: impl FnMut(u64, u32, Decision) -> bool,
    ) {
        let me = self.shared.me;
        for p in following_here(region, page, count, me) {
            let slot = region.slot(p);
            if !try_lock_slot(&slot.lock) {
                break;
            }
            let before = slot.load();
            let mut entry = before;
            let here = region.state(p).load(Ordering::Acquire) & STATE_MASK;
            if !takes(p, here, swmr::decide(&mut entry, me, requester, access)) {
                if unlock_slot(&slot.lock) {
                    // A queued request for this page is served when the loop next looks at its queues.
                    self.shared.wake_service();
                }
                break;
            }
            slot.store(&entry);
            if let Some(was) = was.as_deref_mut() {
                was.push(before);
            }
            pages.push(p);
        }
    }

    /// Write-protects home pages `pages` (ascending), one ioctl per run of neighbours; the rank ends if
    /// the kernel refuses (a writable copy would be written behind the protocol's back).
    fn protect_runs(&mut self, region: &RegionShared, pages: &[u64]) {
        if let Err((done, e)) = region.protect_runs(pages, true) {
            self.die(&format!(
                "write-protecting page {} of region {} failed: {e}",
                pages[done], region.id
            ));
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
