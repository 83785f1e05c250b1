//! Release consistency in the engine: what a rank does at its release points (lock release, barrier
//! arrival) and acquire points (lock grant, barrier completion), following `protocol::release` and using
//! `protocol::diff`. Runs in ordinary threads, never in the fault handler: the handler only marks pages
//! written (the WRITTEN bit and the region's dirty list) and makes twins (TWINNED).

use crate::channel::RecvError;
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::{claim_step, release_busy, set_state};
use crate::protocol::diff;
use crate::protocol::release::marks::{self, AtDrop};
use crate::protocol::release::{PageKey, PageRun, PageUpdate, Update, VectorClock, WriteNotice};
use crate::region::{
    Consistency, RegionShared, AHEAD, BUSY, DIFFED, INVALID, READ_ONLY, READ_WRITE, STATE_MASK,
    TWINNED, WRITTEN,
};
use crate::stats::Counters;
use crate::types::Rank;
use crate::wire::{Reply, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(crate) mod carry;
mod notices;

pub(crate) use notices::{
    decode_clock, decode_exchange, decode_notices, encode_clock, encode_notices,
    encode_notices_within,
};

/// Diffs in flight before the release waits for their acknowledgements (bounds the pages held and the
/// diffs' memory).
const DIFF_WINDOW: usize = 1024;

/// Diff bytes past which a batch to a home is closed and the next one begun: a home applies a batch in one
/// go, so the bound keeps its service loop answering others meanwhile, and its receive buffer small.
const BATCH_BYTES: usize = 256 << 10;

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

/// The diffs of one region's pages to their homes, a message to a home at a time (a batch: see
/// `protocol::diff`). Their pages are held BUSY until their homes acknowledge them; the twins are kept till
/// then.
#[derive(Default)]
struct Outbox {
    batches: Vec<Batch>,
    /// Where the diff `add` added last is: its batch, and its bytes there.
    last: Option<(usize, std::ops::Range<usize>)>,
}

struct Batch {
    home: Rank,
    /// In increasing order, as the batch holds them.
    pages: Vec<u64>,
    bytes: Vec<u8>,
    /// Of `bytes`, those of diffs (the rest are the entries' headers).
    diff_bytes: usize,
}

impl Outbox {
    /// Adds the diff of a twinned page (held BUSY, write-protected) against its twin to a batch for its
    /// home: the last one, unless it is full or holds a later page. Returns false (adding nothing) when the
    /// page equals its twin.
    fn add(&mut self, region: &RegionShared, page: u64) -> bool {
        let home = region.home(page);
        let open = self.batches.iter().rposition(|b| b.home == home);
        let i = match open {
            Some(i)
                if self.batches[i].bytes.len() < BATCH_BYTES
                    && self.batches[i].pages.last().is_some_and(|&p| p < page) =>
            {
                i
            }
            _ => {
                self.batches.push(Batch {
                    home,
                    pages: Vec::new(),
                    bytes: Vec::new(),
                    diff_bytes: 0,
                });
                self.batches.len() - 1
            }
        };
        let batch = &mut self.batches[i];
        let n = diff::push_entry(
            page,
            region.twin(page),
            region.present_page(page),
            &mut batch.bytes,
        );
        if n == 0 {
            if batch.pages.is_empty() {
                self.batches.remove(i);
            }
            return false;
        }
        batch.pages.push(page);
        batch.diff_bytes += n;
        self.last = Some((i, batch.bytes.len() - n..batch.bytes.len()));
        true
    }

    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.batches.iter().flat_map(|b| b.pages.iter().copied())
    }

    /// The diff `add` put in a batch last (after it returned true).
    fn last_diff(&self) -> &[u8] {
        self.last
            .as_ref()
            .and_then(|(i, r)| self.batches.get(*i)?.bytes.get(r.clone()))
            .unwrap_or_default()
    }
}

/// Sends batches of diffs of `region`'s pages to their homes and waits for their acknowledgements. The
/// caller holds the pages BUSY (so no thread of this rank fetches them again before their homes have the
/// diffs) and no channel. Returns which batches their homes acknowledged (`true` at their index), and the
/// first error. A home that fails takes no more diffs, but the others' are still sent and their
/// acknowledgements read: a diff a home applied must not stay twinned (sent again after later writes by
/// others, it would undo them), and an acknowledgement left unread would go back to the pool with the
/// channel and be taken by its next user for an answer of its own.
fn send_diffs(
    shared: &Shared,
    region: u32,
    batches: &[Batch],
    selective: bool,
) -> (Vec<bool>, Result<()>) {
    let mut acked = vec![false; batches.len()];
    if batches.is_empty() {
        return (acked, Ok(()));
    }
    let c = &shared.counters;
    let mut ch = shared.channels.claim();
    // Homes whose connection on this channel failed: nothing more is sent to them or read from them. A
    // home that answers a batch with something other than an acknowledgement (refusing it, or with a
    // malformed frame, which is read to its end) is not one of them: it answers each batch once, so the
    // rest of its answers are still read.
    let mut broken: Vec<Rank> = Vec::new();
    let mut first_error = None;
    let mut sent = vec![false; batches.len()];
    for (i, batch) in batches.iter().enumerate() {
        let home = batch.home;
        if broken.contains(&home) {
            continue;
        }
        Counters::add(&c.diffs, batch.pages.len() as u64);
        Counters::add(&c.diff_bytes, batch.diff_bytes as u64);
        let request = Request::Diffs {
            region,
            count: batch.pages.len() as u32,
            selective,
        };
        match ch.send(c, home, &request, &[&batch.bytes]) {
            Ok(()) => sent[i] = true,
            Err(e) => {
                broken.push(home);
                first_error.get_or_insert_with(|| {
                    shared.peer_failed_error(home, format!("sending diffs: {e}"))
                });
            }
        }
    }
    for (i, batch) in batches.iter().enumerate() {
        let home = batch.home;
        if !sent[i] || broken.contains(&home) {
            continue;
        }
        match ch.recv(c, home) {
            Ok((Reply::Ack, _, _)) => acked[i] = true,
            Ok((other, _, _)) => {
                first_error.get_or_insert(DsmError::Protocol {
                    rank: home,
                    what: format!("expected a diff ack, got {other:?}"),
                });
            }
            // A malformed answer was read to its end (the connection stays aligned on frames), so the
            // home's other answers are still read.
            Err(RecvError::Frame(e)) => {
                first_error.get_or_insert(DsmError::Protocol {
                    rank: home,
                    what: format!("a malformed answer to diffs: {e}"),
                });
            }
            Err(e) => {
                broken.push(home);
                first_error.get_or_insert_with(|| shared.peer_failed_error(home, e.to_string()));
            }
        }
    }
    (acked, first_error.map_or(Ok(()), Err))
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
    // The pages it drops are fetched again from their homes, rank 0 among them (`carry`); when rank 0
    // failed, the others are dropped all the same.
    let undelivered = carry::deliver(shared).err();
    // A barrier of this rank in progress applies no updates now (`acquire`).
    shared.selective_acquires.fetch_add(1, Ordering::AcqRel);
    let mut dropper = Dropper {
        shared,
        run: None,
        flush: Vec::new(),
        first_error: undelivered,
    };
    for page in pages {
        if region.home(page) == shared.me {
            dropper.end_run();
        } else {
            dropper.add(region, page);
        }
    }
    dropper.finish()
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
    let mut dropper = Dropper {
        shared,
        run: None,
        flush: Vec::new(),
        first_error: undelivered,
    };
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
struct Dropper<'a> {
    shared: &'a Shared,
    /// The open run: its region, first page and length; every page held BUSY and already marked invalid.
    run: Option<(Arc<RegionShared>, u64, u64)>,
    /// Pages this rank wrote too (twinned), in the order met: flushed together at the end, a batch to
    /// each home, then dropped. Not held meanwhile.
    flush: Vec<(Arc<RegionShared>, u64)>,
    first_error: Option<DsmError>,
}

impl Dropper<'_> {
    /// Drops `page`: with the open run when it extends it, else on its own or in a new run.
    fn add(&mut self, region: &Arc<RegionShared>, page: u64) {
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
    fn end_run(&mut self) {
        let Some((region, first, len)) = self.run.take() else {
            return;
        };
        region.drop_copies(self.shared.me, first, len);
        Counters::add(&self.shared.counters.acquire_invalidations, len);
        for page in first..first + len {
            release_busy(&region, page);
        }
    }

    fn note(&mut self, result: Result<()>) {
        if let Err(e) = result {
            self.first_error.get_or_insert(e);
        }
    }

    /// Drops the open run, then flushes the pages this rank wrote too, a region at a time (one batch of
    /// diffs to each of their homes, where one page went per round trip), and drops them. A page written
    /// again meanwhile by another thread of this rank is flushed on its own when dropped; one whose flush
    /// failed keeps its copy and twin, so that its writes stay.
    fn finish(mut self) -> Result<()> {
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
fn drop_page(shared: &Shared, region: &Arc<RegionShared>, page: u64) -> Result<()> {
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
