//! Atomic operations on shared words of release-consistency regions (`GlobalVec::fetch_add` and the
//! others). Each is performed at the word's home, by its service loop, one at a time there
//! (`Engine::atomic`): that is what makes them atomic, since several ranks may hold copies of the page
//! and write them at once. The requesting rank then counts the operation as a write of its own whose diff
//! has reached the home already, as an acquire's flush leaves one (`marks::marked_at_home_write`): its
//! copy of the page is dropped, its own unsent writes to it flushed first, so that its next read sees the
//! operation; and the page is marked written in the open interval, so that the interval's write notice
//! announces it to the ranks that synchronize with this one after its release. Runs in ordinary threads,
//! never in the fault handler.

use super::acquire::drop_range;
use super::claim;
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::release_busy;
use crate::protocol::release::marks;
use crate::region::{RegionShared, TWINNED, WRITTEN};
use crate::stats::Counters;
use crate::wire::{AtomicOp, Reply, Request, WordKind};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Performs `op` on the word of `kind` at byte `offset` of `page` of `region` at the page's home, and
/// returns the word as it was before (its bits, zero-extended). On a page homed here that
/// `marks::in_place_at_home` allows, this thread performs it in place; otherwise this rank's own service
/// loop does, as for another rank's.
pub(crate) fn atomic(
    shared: &Shared,
    region: &Arc<RegionShared>,
    page: u64,
    offset: u16,
    kind: WordKind,
    op: AtomicOp,
) -> Result<u64> {
    let home = crate::fault::home_for_call(region, page)?;
    if home == shared.me {
        if let Some(old) = in_place_at_home(region, page, offset, kind, op) {
            Counters::add(&shared.counters.atomics_served, 1);
            return Ok(old);
        }
    } else if region.state(page).load(Ordering::Acquire) & TWINNED != 0 {
        // This rank's unsent writes to the page reach the home first (a selective release of the page),
        // so that the operation comes after them there, as it does in this thread's program order: sent
        // later, when the copy is dropped, their diff would write over the operation's word if they
        // wrote it too.
        super::release_range(shared, region, page..page + 1)?;
    }
    Counters::add(&shared.counters.atomics, 1);
    let request = Request::Atomic {
        region: region.id,
        page,
        offset,
        kind,
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
    if home != shared.me && op.apply(kind, old) != old {
        written_at_home(shared, region, page)?;
    }
    Ok(old)
}

/// At the home: performs `op` in place when `marks::in_place_at_home` allows it, holding the page BUSY as
/// the service loop holds it for every atomic operation it performs (so the two never act on the word at
/// once), and returns the word before; `None` otherwise.
fn in_place_at_home(
    region: &RegionShared,
    page: u64,
    offset: u16,
    kind: WordKind,
    op: AtomicOp,
) -> Option<u64> {
    claim(region, page);
    let writable = marks::in_place_at_home(region.state(page).load(Ordering::Acquire));
    let old = writable.then(|| {
        let at = region.addr(page) + usize::from(offset);
        // SAFETY: the word lies inside a page of the region (the caller's offset is an element's, aligned
        // for its width, pages being aligned), present and writable here, and this thread holds the page
        // BUSY: the service loop performs no other atomic operation on it, and nothing protects or drops
        // the page, until it is released.
        unsafe { crate::region::atomics::in_place(at as *mut u8, kind, op) }
    });
    release_busy(region, page);
    old
}

/// After a home changed `page` for this rank: this rank's copy is dropped, as a selective acquire drops
/// it (its own unsent writes to it flushed to the home first), and the page is marked
/// `marks::marked_at_home_write` and listed if it was not, so that the open interval's notice names it.
fn written_at_home(shared: &Shared, region: &Arc<RegionShared>, page: u64) -> Result<()> {
    // One flush at a time on this rank, as for every flush; and no release drains the written lists
    // while this one is marked.
    let _one_at_a_time = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    let dropped = drop_range(shared, region, page..page + 1);
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
