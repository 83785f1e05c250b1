//! Release consistency in the engine: what a rank does at its release points (lock release, barrier
//! arrival) and acquire points (lock grant, barrier completion), following `protocol::release` and using
//! `protocol::diff`. Runs in ordinary threads, never in the fault handler: the handler only marks pages
//! written (the WRITTEN bit and the region's dirty list) and makes twins (TWINNED).

use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::{claim_step, release_busy, set_state};
use crate::protocol::diff;
use crate::protocol::release::marks::{self};
use crate::protocol::release::{PageKey, Update};
use crate::region::{
    Consistency, RegionShared, AHEAD, BUSY, DIFFED, READ_ONLY, READ_WRITE, STATE_MASK, TWINNED,
    WRITTEN,
};
use crate::stats::Counters;
use crate::types::Rank;
use std::sync::atomic::Ordering;
use std::sync::Arc;

mod acquire;
mod atomic;
pub(crate) mod carry;
mod dropper;
mod notices;
mod outbox;

pub(crate) use acquire::{acquire, acquire_range};
pub(crate) use atomic::atomic;
use dropper::Dropper;
use outbox::{send_diffs, Outbox};

pub(crate) use notices::{
    decode_clock, decode_exchange, decode_notices, encode_clock, encode_notices,
    encode_notices_within,
};

/// Diffs in flight before the release waits for their acknowledgements (bounds the pages held and the
/// diffs' memory).
const DIFF_WINDOW: usize = 1024;

/// The largest diff of a page that a barrier arrival carries as an update (`Update`): a quarter of a page.
/// A larger one reaches only its home, and a rank that needs the page fetches it whole, as before.
const UPDATE_DIFF_MAX: usize = crate::types::PAGE_SIZE / 4;

/// The most diff bytes one barrier arrival carries as updates; the pages past it are dropped where cached.
pub(crate) const UPDATE_BYTES: usize = 64 << 10;

/// Takes the page's BUSY bit, waiting while a fault of this rank holds it.
fn claim(region: &RegionShared, page: u64) {
    let word = region.state(page);
    while !claim_step(word, word.load(Ordering::Acquire)) {}
}

/// Takes the page's BUSY bit if no thread holds it; returns the page's state word as it was taken.
fn try_claim(region: &RegionShared, page: u64) -> Option<u32> {
    let word = region.state(page);
    let s = word.load(Ordering::Acquire);
    (s & BUSY == 0
        && word
            .compare_exchange(s, s | BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok())
    .then_some(s)
}

fn release_regions(shared: &Shared) -> Vec<Arc<RegionShared>> {
    shared
        .regions_snapshot()
        .into_iter()
        .filter(|r| r.consistency == Consistency::Release)
        .collect()
}

/// A release: every page written in the open interval is write-protected, its diff (if it was homed
/// elsewhere) applied at its home and acknowledged, and the interval closed with a write notice.
///
/// Lock order, as in the fault path: a page's BUSY bit, then a channel; never the reverse. A twinned page
/// stays BUSY until its home has acknowledged the diff (so no thread of this rank fetches it again from a home
/// that lacks this rank's writes; a diff a barrier's arrival carries to rank 0 instead is let go at once,
/// and every release and acquire of this rank delivers a carry still waiting first: `carry`); other pages
/// are released at once: a home must never keep its own pages BUSY while it waits for another rank, whose
/// diffs for those pages would wait for them (a cycle). Pages are flushed `DIFF_WINDOW` at a time. On an error every page is marked written again, so nothing is
/// forgotten.
pub(crate) fn release(shared: &Shared) -> Result<()> {
    release_collecting(shared, false).map(|_| ())
}

/// A release at a barrier: as `release`, and returns the small diffs of the interval it closes as updates
/// for the other ranks (see `Update`), none if it failed.
pub(crate) fn release_for_barrier(shared: &Shared) -> Result<Vec<Update>> {
    release_collecting(shared, shared.size > 1)
}

fn release_collecting(shared: &Shared, collect: bool) -> Result<Vec<Update>> {
    let regions = release_regions(shared);
    if regions.is_empty() {
        return Ok(Vec::new());
    }
    let mut rc = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    // A carry still waiting reaches rank 0 first. When it cannot (rank 0 failed), the release goes on
    // for the other homes, carrying nothing itself, and fails naming rank 0 at the end.
    let undelivered = carry::deliver(shared).err();
    let carry = collect && shared.me != Rank(0) && undelivered.is_none();
    let released = release_locked(shared, &mut rc, &regions, collect, carry);
    match undelivered {
        Some(e) => released.and(Err(e)),
        None => released,
    }
}

/// The work of `release_collecting`, under `Shared::rc`; at a barrier, diffs for rank 0 go with the
/// arrival if `carry` (`carry`).
fn release_locked(
    shared: &Shared,
    rc: &mut crate::protocol::release::RcRank,
    regions: &[Arc<RegionShared>],
    collect: bool,
    carry: bool,
) -> Result<Vec<Update>> {
    let mut written: Vec<PageKey> = Vec::new();
    let mut settled = Settled::collecting(collect, carry);
    let result = release_pages(shared, regions, &mut written, &mut settled);
    let Settled {
        cleared,
        unannounced,
        updates,
        carried,
        ..
    } = settled;
    // Their pages are cleared (counted delivered): they go with the arrival, whatever else failed.
    if let Some(carried) = carried {
        carry::hold(shared, carried);
    }
    // Pages only other ranks' diffs wrote here: their writers announce them.
    written.retain(|k| !unannounced.contains(k));
    if result.is_err() {
        let (delivered, undelivered): (Vec<PageKey>, Vec<PageKey>) =
            written.iter().partition(|k| cleared.contains(k));
        // A page whose writes did not reach its home is still marked WRITTEN, and in no list: it goes back
        // for the next release.
        relist(regions, &undelivered, false);
        // The pages whose writes reached their homes are announced all the same, by an interval of their
        // own: the lock whose release failed is passed on even so, and its next holder would keep a stale
        // copy of them. They are not named again: while a home stays unreachable every release fails,
        // and a page named at each would be dropped by every acquirer at each.
        if !delivered.is_empty() {
            match rc.close_interval(delivered.clone()) {
                Ok(Some(_)) => Counters::add(&shared.counters.write_notices, 1),
                Ok(None) => {}
                Err(e) => {
                    // Not announced: they go back, for the next release to name.
                    relist(regions, &delivered, true);
                    return Err(e.into());
                }
            }
        }
        return result.map(|()| Vec::new());
    }
    let notice = rc.close_interval(written)?;
    Counters::add(
        &shared.counters.notices_forgotten,
        rc.take_forgotten() as u64,
    );
    let Some(notice) = notice else {
        return Ok(Vec::new());
    };
    Counters::add(&shared.counters.write_notices, 1);
    // Every page offered is named by the notice: a page with a diff always is, and a home's page only
    // when its own writes changed it (`marks::announced_at_release`), which is when it has a diff.
    Ok(updates
        .unwrap_or_default()
        .into_iter()
        .filter(|(page, _)| !unannounced.contains(page))
        .map(|(page, diff)| Update {
            rank: shared.me,
            interval: notice.interval,
            page,
            diff,
        })
        .collect())
}

/// What a flush did with the pages it took.
#[derive(Default)]
struct Settled {
    /// Pages whose writes are at their homes (or that had none to send), their marks cleared.
    cleared: std::collections::HashSet<PageKey>,
    /// Of those, pages homed here that only other ranks' diffs wrote (`marks::announced_at_release`).
    unannounced: std::collections::HashSet<PageKey>,
    /// At a barrier's release: the small diffs of the interval's pages, this rank's whole writes to each
    /// (`marks::whole_interval`), to go with the arrival as updates, `UPDATE_BYTES` at most.
    updates: Option<Vec<(PageKey, Vec<u8>)>>,
    update_bytes: usize,
    /// At a barrier's release on a rank other than 0: batches of diffs for rank 0 that the arrival carries
    /// instead (`carry`), their pages counted delivered.
    carried: Option<carry::Gathered>,
}

impl Settled {
    /// A release's settled pages, collecting updates if `updates` and diffs for rank 0 to carry if
    /// `carry`.
    fn collecting(updates: bool, carry: bool) -> Settled {
        Settled {
            updates: updates.then(Vec::new),
            carried: carry.then(carry::Gathered::default),
            ..Settled::default()
        }
    }

    /// Moves the batches of `outbox` for rank 0 that the barrier's arrival can carry out of it, and
    /// returns their pages (still held, their diffs as good as delivered).
    fn carry_from(&mut self, shared: &Shared, region: u32, outbox: &mut Outbox) -> Vec<u64> {
        let Some(gathered) = &mut self.carried else {
            return Vec::new();
        };
        let mut pages = Vec::new();
        let mut kept = Vec::with_capacity(outbox.batches.len());
        for batch in std::mem::take(&mut outbox.batches) {
            if batch.home == Rank(0) && gathered.fits(region, batch.bytes.len()) {
                carry::count(shared, batch.pages.len(), batch.diff_bytes);
                gathered.add(region, batch.pages.len() as u32, batch.bytes);
                pages.extend(batch.pages);
            } else {
                kept.push(batch);
            }
        }
        outbox.batches = kept;
        // `last` indexed the batches as they were; it is read only while they are added.
        outbox.last = None;
        pages
    }

    /// Offers the diff of this rank's writes to `page` in the interval that is closing as an update.
    fn offer(&mut self, region: u32, page: u64, diff: &[u8]) {
        let Some(updates) = &mut self.updates else {
            return;
        };
        if !diff.is_empty()
            && diff.len() <= UPDATE_DIFF_MAX
            && self.update_bytes + diff.len() <= UPDATE_BYTES
        {
            self.update_bytes += diff.len();
            updates.push((PageKey { region, page }, diff.to_vec()));
        }
    }
}

/// Puts `pages` back on their regions' dirty lists for the next release; with `mark`, they are marked
/// WRITTEN again first (a page cleared since), and one a fault of this rank marked (and listed) meanwhile
/// is not listed twice.
fn relist(regions: &[Arc<RegionShared>], pages: &[PageKey], mark: bool) {
    for k in pages {
        let Some(region) = regions.iter().find(|r| r.id == k.region) else {
            continue;
        };
        if mark && region.state(k.page).fetch_or(WRITTEN, Ordering::AcqRel) & WRITTEN != 0 {
            continue;
        }
        region
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(k.page);
    }
}

/// The work of `release`; every page taken from a dirty list is added to `written` as soon as it is taken.
/// A region whose flush fails (a home that failed) does not keep the others' writes from their homes: every
/// region is flushed, and the first error returned.
fn release_pages(
    shared: &Shared,
    regions: &[Arc<RegionShared>],
    written: &mut Vec<PageKey>,
    settled: &mut Settled,
) -> Result<()> {
    let mut first_error = None;
    for region in regions {
        let pages: Vec<u64> = region
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        written.extend(pages.iter().map(|&page| PageKey {
            region: region.id,
            page,
        }));
        if let Err(e) = flush_pages(shared, region, &pages, Flush::Release, settled) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What a flush of pages is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// A release: the interval closes.
    Release,
    /// A selective release, which the homes are told (`marks::at_diff`).
    Selective,
    /// An acquire, before it drops pages this rank wrote too: as a selective release, the pages stay
    /// written and listed for the interval's notice; the homes are told nothing, as at a release, since
    /// that notice will announce the writes.
    Acquire,
}

/// Write-protects `pages` of `region` and sends the diffs of those twinned to their homes, `DIFF_WINDOW`
/// pages at a time, in page order. The caller holds the rank's release-consistency state (`Shared::rc`): a
/// flush may hold pages while it waits for another, so two at once could wait for each other. A page is
/// then cleared of `marks::cleared_at_release`'s marks (all of them only for `Flush::Release`) and added to
/// `settled.cleared`, one with a diff once its home has acknowledged it (or, at a barrier, once its diff is
/// in the arrival's carry: `Settled::carry_from`).
fn flush_pages(
    shared: &Shared,
    region: &Arc<RegionShared>,
    pages: &[u64],
    why: Flush,
    settled: &mut Settled,
) -> Result<()> {
    let clear = marks::cleared_at_release(why != Flush::Release);
    let selective = why == Flush::Selective;
    let mut pages = pages.to_vec();
    pages.sort_unstable();
    // A page twice would be taken twice, and the second taking would wait for the first for ever.
    pages.dedup();
    // A window whose diffs a home did not acknowledge (it failed) leaves the next windows to go on: their
    // homes get their diffs all the same, and the first error is returned at the end.
    let mut unsent = None;
    for batch in pages.chunks(DIFF_WINDOW) {
        // Twinned pages with their diffs, held BUSY until the diffs are acknowledged.
        let mut outbox = Outbox::default();
        // Pages taken and not yet settled, with their state word when taken. They are taken without
        // waiting, so that their write protection can go a run of neighbours at a time; a page that
        // another thread of this rank holds is waited for only once the held pages are settled (the
        // home's own pages among them released: requests for them wait while they are held).
        let mut held = Vec::new();
        let mut failed = None;
        for &page in batch {
            if let Some(s) = try_claim(region, page) {
                held.push((page, s));
                continue;
            }
            let result = settle(region, &mut held, &mut outbox, clear, settled);
            if let Err(e) = result {
                failed = Some(e);
                break;
            }
            claim(region, page);
            held.push((page, region.state(page).load(Ordering::Acquire)));
        }
        if failed.is_none() {
            failed = settle(region, &mut held, &mut outbox, clear, settled).err();
        }
        // Write protection that failed here is this rank's own trouble, not a home's: nothing goes on.
        let here = failed.is_some();
        let carried = match failed {
            Some(_) => Vec::new(),
            None => settled.carry_from(shared, region.id, &mut outbox),
        };
        let (acked, sent) = match failed {
            Some(e) => (vec![false; outbox.batches.len()], Err(e)),
            None => send_diffs(shared, region.id, &outbox.batches, selective),
        };
        // A page whose diff its home did not acknowledge keeps its twin, and its writes go later: a release
        // puts it back on the dirty list for the next one; an acquire keeps the copy and tries it once
        // more on its own (`Dropper::finish`).
        let delivered: Vec<u64> = outbox
            .batches
            .iter()
            .zip(&acked)
            .filter(|(_, a)| **a)
            .flat_map(|(b, _)| b.pages.iter().copied())
            .chain(carried.iter().copied())
            .collect();
        clear_settled(
            region,
            delivered.clone(),
            &delivered,
            clear | marks::cleared_at_diff(),
            settled,
        );
        if why != Flush::Release {
            sent_before_release(region, &delivered);
        }
        for page in outbox.pages().chain(carried) {
            release_busy(region, page);
        }
        match sent {
            Err(e) if here => return Err(unsent.unwrap_or(e)),
            Err(e) => {
                unsent.get_or_insert(e);
            }
            Ok(()) => {}
        }
    }
    unsent.map_or(Ok(()), Err)
}

/// Marks `pages` (held BUSY), whose diffs their homes acknowledged before the interval closed (a selective
/// release, an acquire's flush), `marks::partial_after_flush`: the interval's diff at its release will lack
/// those writes, so it does not go as an update.
fn sent_before_release(region: &RegionShared, pages: &[u64]) {
    for &page in pages {
        region
            .state(page)
            .fetch_or(marks::partial_after_flush(), Ordering::AcqRel);
    }
}

/// A selective release of `pages` of `region`: this rank's writes to those of them homed elsewhere reach
/// their homes before it returns (diffs, acknowledged), and the pages are write-protected again (a later
/// write makes a new twin). They stay `WRITTEN` and listed: the next release's write notice still names
/// them, so that ranks synchronizing through locks and barriers learn of the writes as before. Pages homed
/// here need nothing: readers fetch them from here.
pub(crate) fn release_range(
    shared: &Shared,
    region: &Arc<RegionShared>,
    pages: std::ops::Range<u64>,
) -> Result<()> {
    let unsent: Vec<u64> = pages
        .filter(|&page| {
            region.home(page) != shared.me
                && marks::diffs_at_release(region.state(page).load(Ordering::Acquire))
        })
        .collect();
    Counters::add(&shared.counters.selective_releases, 1);
    // One flush at a time on this rank, as for releases: a flush holds the twinned pages it has taken while
    // it waits for one another thread holds, so two flushes taking the same pages in different orders
    // would each wait for the other for ever.
    let _one_at_a_time = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    // Its promise is that the writes before it are at their homes: a carry still waiting among them.
    let undelivered = carry::deliver(shared).err();
    let flushed = flush_pages(
        shared,
        region,
        &unsent,
        Flush::Selective,
        &mut Settled::default(),
    );
    undelivered.map_or(flushed, Err)
}

/// Settles the pages a release holds: write-protects the writable ones (one system call per run of
/// neighbours: one per page cost a TLB shootdown per page, see `Dropper`), then clears (of the marks in
/// `clear`) and releases each page without a diff, and puts each page with one in the outbox (held until
/// its home acknowledges it). On an error every held page is released as it is, still marked written.
fn settle(
    region: &Arc<RegionShared>,
    held: &mut Vec<(u64, u32)>,
    outbox: &mut Outbox,
    clear: u32,
    settled: &mut Settled,
) -> Result<()> {
    let mut writable: Vec<u64> = held
        .iter()
        .filter(|(_, s)| s & STATE_MASK == READ_WRITE)
        .map(|&(page, _)| page)
        .collect();
    writable.sort_unstable();
    if let Err(e) = protect_runs(region, &writable) {
        for (page, _) in held.drain(..) {
            release_busy(region, page);
        }
        return Err(e);
    }
    // Pages with nothing to send, and which of them have a twin to drop (dropped in runs of neighbours,
    // one `madvise` each: see `Dropper` for what one per page costs).
    let mut done = Vec::new();
    let mut twins = Vec::new();
    let mut forgotten = Vec::new();
    let mut own = Vec::new();
    for (page, s) in held.drain(..) {
        if marks::diffs_at_release(s) && outbox.add(region, page) {
            if marks::whole_interval(s) {
                settled.offer(region.id, page, outbox.last_diff());
            }
            continue;
        }
        // DIFFED pages are homed here, and only a release (which clears DIFFED) takes them.
        debug_assert!(s & DIFFED == 0 || clear & DIFFED != 0);
        // A DIFFED page is write-protected above: its bytes now are all it holds this interval, and
        // those that differ from its twin are the home's own writes.
        // Encoded only when it may go as an update: a page the home rewrote whole (a boundary row) is
        // counted a few words past the bound and left.
        let same = if s & DIFFED == 0 {
            false
        } else if settled.updates.is_some() {
            let (twin, bytes) = (region.twin(page), region.present_page(page));
            let changed = diff::changed_up_to(twin, bytes, UPDATE_DIFF_MAX);
            if (1..=UPDATE_DIFF_MAX).contains(&changed) {
                own.clear();
                diff::encode(twin, bytes, &mut own);
                settled.offer(region.id, page, &own);
            }
            changed == 0
        } else {
            region.twin(page) == region.present_page(page)
        };
        if !marks::announced_at_release(s, same) {
            settled.unannounced.insert(PageKey {
                region: region.id,
                page,
            });
        }
        if s & AHEAD != 0 {
            forgotten.push(page);
        } else if s & (TWINNED | DIFFED) != 0 {
            twins.push(page);
        }
        done.push(page);
    }
    // Twinned ahead of writes that did not come: `fault::twin_ahead` guesses no more from them.
    region.forget_twins(&forgotten);
    clear_settled(region, twins, &done, clear, settled);
    for page in done {
        release_busy(region, page);
    }
    Ok(())
}

/// Drops the twins of `twins` (a run of neighbouring pages at a time) and clears `pages` of the marks in
/// `clear`, counting them settled. All are held BUSY, and stay so until their twins are gone: once a page
/// is released, a fault of this rank may make a new twin in the same memory.
fn clear_settled(
    region: &RegionShared,
    mut twins: Vec<u64>,
    pages: &[u64],
    clear: u32,
    settled: &mut Settled,
) {
    twins.sort_unstable();
    region.drop_twins(&twins);
    for &page in pages {
        region.state(page).fetch_and(!clear, Ordering::AcqRel);
        settled.cleared.insert(PageKey {
            region: region.id,
            page,
        });
    }
}

/// Write-protects `pages` (sorted, held BUSY) and marks them read-only, one system call per run of
/// neighbours. On an error the pages protected before it are marked read-only too, so that no page is
/// left protected and marked writable (a write to it would fault for ever).
fn protect_runs(region: &RegionShared, pages: &[u64]) -> Result<()> {
    let protected = region.protect_runs(pages, true);
    let done = match protected {
        Ok(()) => pages.len(),
        Err((done, _)) => done,
    };
    for &page in &pages[..done] {
        set_state(region.state(page), READ_ONLY);
    }
    protected.map_err(|(done, e)| {
        DsmError::sys(
            format!(
                "write-protecting page {} of region {}",
                pages[done], region.id
            ),
            e,
        )
    })
}
