//! Atomic operations on shared words of release-consistency regions (`GlobalVec::fetch_add` and the
//! others). Each is performed at the word's home, by its service loop, one at a time there
//! (`Engine::atomic`): that is what makes them atomic, since several ranks may hold copies of the page
//! and write them at once. The requesting rank then counts the operation as a write of its own whose diff
//! has reached the home already, as an acquire's flush leaves one (`marks::marked_at_home_write`): its
//! copy of the page is dropped, its own unsent writes to it flushed first, so that its next read sees the
//! operation; and the page is marked written in the open interval, so that the interval's write notice
//! announces it to the ranks that synchronize with this one after its release. Runs in ordinary threads,
//! never in the fault handler.

use super::{carry, claim, Dropper};
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::release_busy;
use crate::protocol::release::marks;
use crate::region::{RegionShared, WRITTEN};
use crate::stats::Counters;
use crate::wire::{AtomicOp, Reply, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Performs `op` on the 8-byte word `word` of `page` of `region` at the page's home, and returns the word
/// as it was before. A page homed here is performed on by this rank's own service loop all the same, so
/// that its threads' operations and other ranks' are one sequence.
pub(crate) fn atomic(
    shared: &Shared,
    region: &Arc<RegionShared>,
    page: u64,
    word: u16,
    op: AtomicOp,
) -> Result<u64> {
    let home = region.home(page);
    Counters::add(&shared.counters.atomics, 1);
    let request = Request::Atomic {
        region: region.id,
        page,
        word,
        op,
    };
    // The channel goes back before `rc` is taken below: a thread holding `rc` may be waiting for a channel.
    let answer = {
        let mut ch = shared.channels.claim();
        match ch.call(&shared.counters, home, &request) {
            Ok((Reply::Atomic { old }, _, _)) => Ok(old),
            Ok((Reply::Refused { reason }, _, _)) => Err(DsmError::Protocol {
                rank: home,
                what: format!(
                    "an atomic operation on page {page} of region {}: {}",
                    region.id,
                    reason.what()
                ),
            }),
            Ok((other, _, _)) => Err(DsmError::Protocol {
                rank: home,
                what: format!("expected the answer to an atomic operation, got {other:?}"),
            }),
            Err(e) => Err(shared.peer_failed_error(home, format!("an atomic operation: {e}"))),
        }
    };
    let old = answer?;
    if home != shared.me && op.apply(old) != old {
        written_at_home(shared, region, page)?;
    }
    Ok(old)
}

/// After a home changed `page` for this rank: this rank's copy is dropped, as a selective acquire drops
/// it (its own unsent writes to it flushed to the home first), and the page is marked
/// `marks::marked_at_home_write` and listed if it was not, so that the open interval's notice names it.
fn written_at_home(shared: &Shared, region: &Arc<RegionShared>, page: u64) -> Result<()> {
    // One flush at a time on this rank, as for every flush; and no release drains the written lists
    // while this one is marked.
    let _one_at_a_time = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    // The page may be fetched again from rank 0, which must hold this rank's writes to it first.
    let undelivered = carry::deliver(shared).err();
    // A barrier of this rank in progress applies no updates now (as after a selective acquire).
    shared.selective_acquires.fetch_add(1, Ordering::AcqRel);
    let mut dropper = Dropper::new(shared, undelivered);
    dropper.add(region, page);
    let dropped = dropper.finish();
    // Marked while held, as a fault marks it: a thread of this rank may have fetched the page again
    // since it was dropped, and be writing it.
    claim(region, page);
    let was = region
        .state(page)
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            Some(marks::marked_at_home_write(s))
        })
        .unwrap_or_else(|s| s);
    release_busy(region, page);
    if was & WRITTEN == 0 {
        region
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(page);
    }
    dropped
}
