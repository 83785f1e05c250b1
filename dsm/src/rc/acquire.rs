//! Acquire points: a lock grant or a barrier's completion brings this rank's copies up to date with the
//! write notices it receives (dropping the pages others wrote, or applying the updates a barrier carried),
//! and a selective acquire does the same for one address range.

use super::{carry, release_regions, try_claim, Dropper};
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::{release_busy, set_state};
use crate::protocol::diff;
use crate::protocol::release::marks;
use crate::protocol::release::{PageRun, PageUpdate, Update, VectorClock, WriteNotice};
use crate::region::{
    Consistency, RegionShared, AHEAD, BUSY, INVALID, READ_WRITE, STATE_MASK, TWINNED, WRITTEN,
};
use crate::stats::Counters;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A selective acquire of `pages` of `region`: this rank's copies of those of them homed elsewhere are
/// dropped (its own unsent writes to them flushed to their homes first), so that the next access fetches
/// each from its home, which by then holds every write released to it before (by a release or a selective
/// release). Pages homed here are their homes' copies already.
pub(crate) fn acquire_range(
    shared: &Shared,
    region: &Arc<RegionShared>,
    pages: std::ops::Range<u64>,
) -> Result<()> {
    Counters::add(&shared.counters.selective_acquires, 1);
    // One flush at a time on this rank (see `release_range`): the pages this rank wrote too are flushed
    // together at the end, held while their diffs are out.
    let _one_at_a_time = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    drop_range(shared, region, pages)
}

/// The work of `acquire_range`, for a caller that holds the rank's release-consistency state
/// (`Shared::rc`): drops this rank's copies of `pages` of `region` homed elsewhere, flushing its own
/// unsent writes to them first.
pub(super) fn drop_range(
    shared: &Shared,
    region: &Arc<RegionShared>,
    pages: std::ops::Range<u64>,
) -> Result<()> {
    // The pages it drops are fetched again from their homes, rank 0 among them (`carry`); when rank 0
    // failed, the others are dropped all the same.
    let undelivered = carry::deliver(shared).err();
    // A barrier of this rank in progress applies no updates now (`acquire`).
    shared.selective_acquires.fetch_add(1, Ordering::AcqRel);
    let mut dropper = Dropper::new(shared, undelivered);
    for page in pages {
        if region.home(page) == shared.me {
            dropper.end_run();
        } else {
            dropper.add(region, page);
        }
    }
    dropper.finish()
}

/// An acquire: pages named by notices this rank has not seen are dropped, except pages homed here; a
/// dropped page with an unsent twin is flushed first, so that this rank's own writes are not lost. When
/// the horizon that came with the notices names intervals this rank has not seen (their notices were
/// forgotten on the way), every cached page of release-consistency regions not homed here is dropped.
/// The release-consistency state stays locked until every page is dropped, so that a concurrent acquire
/// by another thread of this rank cannot find the notices seen while their pages are still here.
///
/// A barrier's `updates` spare the pages the protocol says they may (`Acquire::update`): a clean copy of
/// such a page here is brought up to date in place (`bring_up_to_date`), any other is dropped. They come
/// with `Shared::selective_acquires` as the barrier began, and are passed over if it has moved since: a
/// page dropped by a selective acquire meanwhile and fetched again by another thread of this rank may
/// hold writes newer than the updates, made after other ranks passed the barrier, and a selective
/// acquire moves no clock to say so (a lock's acquire does: it takes in the barrier's notices).
pub(crate) fn acquire(
    shared: &Shared,
    notices: &[WriteNotice],
    horizon: &VectorClock,
    updates: Option<(&[Update], u64)>,
) -> Result<()> {
    if notices.is_empty() && horizon.is_zero() {
        return Ok(());
    }
    let mut rc = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    // The pages it drops are fetched again from their homes, rank 0 among them (`carry`); when rank 0
    // failed, the acquire goes on all the same (its pages are dropped, and reading them fails).
    let undelivered = carry::deliver(shared).err();
    // Read under `rc`, under which selective acquires count themselves.
    let updates = match updates {
        Some((updates, selective))
            if shared.selective_acquires.load(Ordering::Acquire) == selective =>
        {
            updates
        }
        _ => &[],
    };
    let me = shared.me;
    let plan = rc.acquire(notices, horizon, updates, |run, out| {
        let Some(region) = shared.region(run.region) else {
            return;
        };
        if region.consistency != Consistency::Release {
            return;
        }
        // Pages past the region's end name nothing here (and a run of any length costs no more than
        // the region's pages); pages homed here are kept.
        let end = run.end().min(region.pages);
        let mut page = run.first;
        while page < end {
            while page < end && region.home(page) == me {
                page += 1;
            }
            let first = page;
            while page < end && region.home(page) != me {
                page += 1;
            }
            if page > first {
                out.push(PageRun {
                    region: run.region,
                    first,
                    len: page - first,
                });
            }
        }
    });
    Counters::add(
        &shared.counters.notices_forgotten,
        rc.take_forgotten() as u64,
    );
    // Every page of the plan is visited even after an error: the clock already covers these notices, so a
    // page left here would never be named again (a program that carries on after a failed peer would read
    // it stale for good). A page whose flush failed keeps its copy and twin, so that its writes stay.
    let mut dropper = Dropper::new(shared, undelivered);
    if plan.everything {
        Counters::add(&shared.counters.full_invalidations, 1);
        for region in release_regions(shared) {
            for page in 0..region.pages {
                // A page neither here nor being fetched is passed over; one a thread of this rank is
                // fetching (BUSY) is waited for, as its copy may predate the forgotten intervals. A fetch
                // that starts after this look gets a copy that holds them.
                let s = region.state(page).load(Ordering::Acquire);
                let cached = s & STATE_MASK != INVALID || s & BUSY != 0;
                if cached && region.home(page) != me {
                    dropper.add(&region, page);
                } else {
                    // The run cannot go on past this page: its pages are not held while the scan goes on.
                    dropper.end_run();
                }
            }
        }
    }
    // The plan's runs come in order (region, then page), each page once.
    for run in plan.invalidate {
        let Some(region) = shared.region(run.region) else {
            continue;
        };
        for page in run.first..run.end() {
            dropper.add(&region, page);
        }
    }
    for group in plan.update.chunk_by(|a, b| a.page.region == b.page.region) {
        let Some(region) = shared.region(group[0].page.region) else {
            continue;
        };
        let result = bring_up_to_date(shared, &region, group, updates, &mut dropper);
        dropper.note(result);
    }
    dropper.finish()
}

/// Applies other ranks' diffs (`updates`, as `pages` index them) to this rank's copies of `pages` of
/// `region`, each taken without waiting; a copy that is not clean read-only (`marks::updated`), or that
/// another thread of this rank holds, is dropped with `dropper` instead, once the others are let go. Each
/// page brought up to date is twinned as the diffs leave it (before it becomes writable, so that a write
/// of another thread of this rank is caught by the twin), marked `WRITTEN | TWINNED | AHEAD` and listed,
/// made writable (a run of neighbours in one call) and written: left out of the next notice unless
/// written, and written with no fault. A page that could not be made writable is dropped.
fn bring_up_to_date(
    shared: &Shared,
    region: &Arc<RegionShared>,
    pages: &[PageUpdate],
    updates: &[Update],
    dropper: &mut Dropper,
) -> Result<()> {
    fn diffs<'a>(u: &'a PageUpdate, updates: &'a [Update]) -> impl Iterator<Item = &'a [u8]> {
        u.diffs
            .iter()
            .filter_map(|&i| updates.get(i).map(|d| d.diff.as_slice()))
    }
    let mut taken = Vec::with_capacity(pages.len());
    let mut others = Vec::new();
    for u in pages {
        let page = u.page.page;
        match try_claim(region, page) {
            Some(s) if marks::updated(s) => taken.push(u),
            Some(s) => {
                release_busy(region, page);
                if s & STATE_MASK != INVALID {
                    others.push(page);
                }
            }
            None => others.push(page),
        }
    }
    let mut listed = Vec::with_capacity(taken.len());
    for u in &taken {
        let page = u.page.page;
        let twin = region.twin_mut(page);
        twin.copy_from_slice(region.present_page(page));
        for d in diffs(u, updates) {
            // Checked when they arrived (`decode_exchange`): applying cannot fail.
            let _ = diff::apply(twin, d);
        }
        region
            .state(page)
            .fetch_or(WRITTEN | TWINNED | AHEAD, Ordering::AcqRel);
        listed.push(page);
    }
    region
        .dirty
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend_from_slice(&listed);
    let lifted = region.protect_runs(&listed, false);
    let writable = match &lifted {
        Ok(()) => listed.len(),
        Err((done, _)) => *done,
    };
    for u in &taken[..writable] {
        for d in diffs(u, updates) {
            let _ = region.apply_diff(u.page.page, d);
        }
        set_state(region.state(u.page.page), READ_WRITE);
        release_busy(region, u.page.page);
    }
    // Still write-protected and unchanged: stale, so dropped (its twin with it; it stays listed, as a
    // page twinned ahead that an acquire dropped does).
    let stale = &listed[writable..];
    for &page in stale {
        region.state(page).fetch_and(!TWINNED, Ordering::AcqRel);
        set_state(region.state(page), INVALID);
    }
    region.forget_twins(stale);
    for &page in stale {
        region.drop_copies(shared.me, page, 1);
        release_busy(region, page);
    }
    Counters::add(&shared.counters.pages_updated, writable as u64);
    for page in others {
        dropper.add(region, page);
    }
    lifted.map_err(|(done, e)| {
        DsmError::sys(
            format!(
                "making page {} of region {} writable for a barrier's update",
                listed[done], region.id
            ),
            e,
        )
    })
}
