//! Dropping this rank's copies of pages that others wrote (at an acquire, or when a barrier's updates
//! stop at `UPDATE_BYTES`): a page written here since it was last sent is flushed to its home first, so
//! that no write of this rank's is lost with the copy.

use super::{
    claim, flush_pages, protect_runs, send_diffs, sent_before_release, try_claim, Flush, Outbox,
    Settled,
};
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::{release_busy, set_state};
use crate::protocol::release::marks::{self, AtDrop};
use crate::region::{RegionShared, AHEAD, INVALID, READ_WRITE, STATE_MASK, TWINNED};
use crate::stats::Counters;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Drops pages at an acquire, a run of neighbouring clean pages at a time: the pages are marked invalid
/// one by one and their copies discarded with one `madvise` per run. One call per page cost a TLB
/// shootdown per page whenever another thread of the process was running: 13 us a page, against under
/// half a microsecond a page in one call (measured on this machine; docs/ARCHITECTURE.md).
///
/// The pages of the open run are held BUSY. A page another thread of this rank holds is not waited for
/// while the run is held: the run is discarded and released first, so that this thread never waits for
/// one page while holding others (a thread holding that page may be waiting for one of them). Pages this
/// rank wrote too are set aside, not held, and flushed together when the dropping ends (`finish`); the
/// caller holds the rank's release-consistency state, as for every flush.
pub(super) struct Dropper<'a> {
    shared: &'a Shared,
    /// The open run: its region, first page and length; every page held BUSY and already marked invalid.
    run: Option<(Arc<RegionShared>, u64, u64)>,
    /// Pages this rank wrote too (twinned), in the order met: flushed together at the end, a batch to
    /// each home, then dropped. Not held meanwhile.
    flush: Vec<(Arc<RegionShared>, u64)>,
    first_error: Option<DsmError>,
}

impl<'a> Dropper<'a> {
    /// A dropper with nothing held, whose `finish` reports `first_error` (an earlier step's) if there is one.
    pub(super) fn new(shared: &'a Shared, first_error: Option<DsmError>) -> Self {
        Dropper {
            shared,
            run: None,
            flush: Vec::new(),
            first_error,
        }
    }

    /// Drops `page`: with the open run when it extends it, else on its own or in a new run.
    pub(super) fn add(&mut self, region: &Arc<RegionShared>, page: u64) {
        let Some(s) = try_claim(region, page) else {
            self.end_run();
            let result = drop_page(self.shared, region, page);
            self.note(result);
            return;
        };
        match marks::at_drop(s) {
            AtDrop::Absent => {
                release_busy(region, page);
                return;
            }
            AtDrop::FlushThenDiscard => {
                // This rank's writes to it go to its home first, with the others' at the end.
                release_busy(region, page);
                self.flush.push((region.clone(), page));
                return;
            }
            AtDrop::Discard => set_state(region.state(page), INVALID),
        }
        match &mut self.run {
            Some((r, first, len)) if Arc::ptr_eq(r, region) && *first + *len == page => *len += 1,
            _ => {
                self.end_run();
                self.run = Some((region.clone(), page, 1));
            }
        }
    }

    /// Discards the open run's copies and releases its pages.
    pub(super) fn end_run(&mut self) {
        let Some((region, first, len)) = self.run.take() else {
            return;
        };
        region.drop_copies(self.shared.me, first, len);
        Counters::add(&self.shared.counters.acquire_invalidations, len);
        for page in first..first + len {
            release_busy(&region, page);
        }
    }

    pub(super) fn note(&mut self, result: Result<()>) {
        if let Err(e) = result {
            self.first_error.get_or_insert(e);
        }
    }

    /// Drops the open run, then flushes the pages this rank wrote too, a region at a time (one batch of
    /// diffs to each of their homes, where one page went per round trip), and drops them. A page written
    /// again meanwhile by another thread of this rank is flushed on its own when dropped; one whose flush
    /// failed keeps its copy and twin, so that its writes stay.
    pub(super) fn finish(mut self) -> Result<()> {
        self.end_run();
        let flush = std::mem::take(&mut self.flush);
        for group in flush.chunk_by(|(a, _), (b, _)| Arc::ptr_eq(a, b)) {
            let region = &group[0].0;
            let pages: Vec<u64> = group.iter().map(|(_, page)| *page).collect();
            let flushed = flush_pages(
                self.shared,
                region,
                &pages,
                Flush::Acquire,
                &mut Settled::default(),
            );
            self.note(flushed);
            for page in pages {
                self.add(region, page);
            }
            self.end_run();
        }
        // Pages still twinned (a flush that failed, or writes since): one at a time.
        for (region, page) in std::mem::take(&mut self.flush) {
            let result = drop_page(self.shared, &region, page);
            self.note(result);
        }
        self.first_error.take().map_or(Ok(()), Err)
    }
}

/// Drops this rank's copy of `page` at an acquire, flushing this rank's writes to it first.
pub(super) fn drop_page(shared: &Shared, region: &Arc<RegionShared>, page: u64) -> Result<()> {
    claim(region, page);
    drop_claimed(shared, region, page)
}

/// `drop_page` of a page this thread holds BUSY; releases it.
fn drop_claimed(shared: &Shared, region: &Arc<RegionShared>, page: u64) -> Result<()> {
    let word = region.state(page);
    let s = word.load(Ordering::Acquire);
    let at = marks::at_drop(s);
    let mut result = Ok(());
    if at != AtDrop::Absent {
        if at == AtDrop::FlushThenDiscard {
            // This rank wrote the page too: its writes go to the home before the copy is dropped.
            result = (|| {
                if s & STATE_MASK == READ_WRITE {
                    protect_runs(region, &[page])?;
                }
                let mut outbox = Outbox::default();
                let mut written = 0;
                if outbox.add(region, page) {
                    send_diffs(shared, region.id, &outbox.batches, false).1?;
                    written = marks::cleared_at_diff();
                    sent_before_release(region, &[page]);
                }
                let was = word.fetch_and(!(TWINNED | written), Ordering::AcqRel);
                if was & !written & AHEAD != 0 {
                    // Twinned ahead of a write that has not come: guess no more from it.
                    region.forget_twins(&[page]);
                } else {
                    region.drop_twin(page);
                }
                Ok(())
            })();
        }
        if result.is_ok() {
            set_state(word, INVALID);
            region.drop_copies(shared.me, page, 1);
            Counters::add(&shared.counters.acquire_invalidations, 1);
        }
    }
    release_busy(region, page);
    result
}
