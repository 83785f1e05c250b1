//! Release consistency in the engine: what a rank does at its release points (lock release, barrier
//! arrival) and acquire points (lock grant, barrier completion), following `protocol::release` and using
//! `protocol::diff`. Runs in ordinary threads, never in the fault handler: the handler only marks pages
//! written (the WRITTEN bit and the region's dirty list) and makes twins (TWINNED).

use crate::channel::Channel;
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::fault::{claim_step, release_busy, set_state};
use crate::protocol::diff;
use crate::protocol::release::{PageKey, WriteNotice};
use crate::region::{
    Consistency, RegionShared, INVALID, READ_ONLY, READ_WRITE, STATE_MASK, TWINNED, WRITTEN,
};
use crate::stats::Counters;
use crate::types::Rank;
use crate::wire::{Reply, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Diffs in flight before the release waits for their acknowledgements (bounds what the acks can queue).
const DIFF_WINDOW: usize = 1024;

/// Encodes write notices for a lock release or a barrier arrival.
pub(crate) fn encode_notices(notices: &[WriteNotice]) -> Vec<u8> {
    if notices.is_empty() {
        return Vec::new();
    }
    postcard::to_allocvec(notices).unwrap_or_default()
}

/// Decodes write notices received from `from`.
pub(crate) fn decode_notices(bytes: &[u8], from: Rank) -> Result<Vec<WriteNotice>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    postcard::from_bytes(bytes).map_err(|e| DsmError::Protocol {
        rank: from,
        what: format!("write notices do not decode: {e}"),
    })
}

/// Takes the page's BUSY bit, waiting while a fault of this rank holds it.
fn claim(region: &RegionShared, page: u64) {
    let word = region.state(page);
    while !claim_step(word, word.load(Ordering::Acquire)) {}
}

/// Diffs a twinned page (held BUSY and write-protected or invalid-but-present... present here) against its
/// twin and sends the diff to the page's home. Returns the home when a diff went out (an ack will follow).
fn send_diff(
    shared: &Shared,
    ch: &Channel,
    region: &RegionShared,
    page: u64,
) -> Result<Option<Rank>> {
    let word = region.state(page);
    word.fetch_and(!TWINNED, Ordering::AcqRel);
    let mut bytes = Vec::new();
    diff::encode(region.twin(page), region.present_page(page), &mut bytes);
    region.drop_twin(page);
    if bytes.is_empty() {
        return Ok(None);
    }
    let home = region.home(page);
    let c = &shared.counters;
    Counters::add(&c.diffs, 1);
    Counters::add(&c.diff_bytes, bytes.len() as u64);
    ch.send(
        c,
        home,
        &Request::Diff {
            region: region.id,
            page,
        },
        &[&bytes],
    )
    .map_err(|e| DsmError::PeerFailed {
        rank: home,
        reason: format!("sending a diff: {e}"),
    })?;
    Ok(Some(home))
}

fn await_acks(shared: &Shared, ch: &mut Channel, homes: &mut Vec<Rank>) -> Result<()> {
    for home in homes.drain(..) {
        match ch.recv(&shared.counters, home) {
            Ok((Reply::Ack, _, _)) => {}
            Ok((other, _, _)) => {
                return Err(DsmError::Protocol {
                    rank: home,
                    what: format!("expected a diff ack, got {other:?}"),
                })
            }
            Err(e) => {
                return Err(DsmError::PeerFailed {
                    rank: home,
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
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
pub(crate) fn release(shared: &Shared) -> Result<()> {
    let regions = release_regions(shared);
    if regions.is_empty() {
        return Ok(());
    }
    let mut rc = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    let mut ch = shared.channels.claim();
    let mut written = Vec::new();
    let mut pending = Vec::new();
    for region in &regions {
        let pages: Vec<u64> = region
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for page in pages {
            claim(region, page);
            let word = region.state(page);
            let s = word.load(Ordering::Acquire);
            if s & STATE_MASK == READ_WRITE {
                region.protect(page, 1, true).map_err(|e| {
                    DsmError::sys(format!("write-protecting page {page} at a release"), e)
                })?;
                set_state(word, READ_ONLY);
            }
            word.fetch_and(!WRITTEN, Ordering::AcqRel);
            let sent = if s & TWINNED != 0 && s & STATE_MASK != INVALID {
                send_diff(shared, &ch, region, page)
            } else {
                Ok(None)
            };
            release_busy(region, page);
            if let Some(home) = sent? {
                pending.push(home);
            }
            written.push(PageKey {
                region: region.id,
                page,
            });
            if pending.len() >= DIFF_WINDOW {
                await_acks(shared, &mut ch, &mut pending)?;
            }
        }
    }
    await_acks(shared, &mut ch, &mut pending)?;
    if rc.close_interval(written).is_some() {
        Counters::add(&shared.counters.write_notices, 1);
    }
    Ok(())
}

/// An acquire: pages named by notices this rank has not seen are dropped, except pages homed here; a
/// dropped page with an unsent twin is flushed first, so that this rank's own writes are not lost.
pub(crate) fn acquire(shared: &Shared, notices: &[WriteNotice]) -> Result<()> {
    if notices.is_empty() {
        return Ok(());
    }
    let mut rc = shared.rc.lock().unwrap_or_else(|p| p.into_inner());
    let me = shared.me;
    let plan = rc.acquire(notices, |k| {
        shared.region(k.region).is_none_or(|r| r.home(k.page) == me)
    });
    drop(rc);
    let mut ch: Option<std::sync::MutexGuard<'_, Channel>> = None;
    for k in plan.invalidate {
        let Some(region) = shared.region(k.region) else {
            continue;
        };
        if region.consistency != Consistency::Release || k.page >= region.pages {
            continue;
        }
        claim(&region, k.page);
        let word = region.state(k.page);
        let s = word.load(Ordering::Acquire);
        let mut result = Ok(());
        if s & STATE_MASK != INVALID {
            if s & TWINNED != 0 {
                if s & STATE_MASK == READ_WRITE {
                    let _ = region.protect(k.page, 1, true);
                }
                let ch = ch.get_or_insert_with(|| shared.channels.claim());
                result = send_diff(shared, ch, &region, k.page).and_then(|home| match home {
                    Some(h) => await_acks(shared, ch, &mut vec![h]),
                    None => Ok(()),
                });
            }
            set_state(word, INVALID);
            let _ = region.discard(k.page);
            Counters::add(&shared.counters.acquire_invalidations, 1);
        }
        release_busy(&region, k.page);
        result?;
    }
    Ok(())
}
