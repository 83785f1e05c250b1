//! Taking pages in: claiming the run of pages a fault covers (read-ahead, write-ahead, zero fills, as the
//! sequential detector allows) and installing what arrives, zeros or a reply's payload, with
//! `UFFDIO_COPY`. It reads replies' payloads but decides nothing about coherence.

use super::words::release_busy;
use super::FaultError;
use crate::channel::Channel;
use crate::installer;
use crate::protocol::swmr::{Access, Data};
use crate::region::{RegionShared, BUSY, INVALID};
use crate::region::{Sequential, Steps};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::{ZERO_FILL_MAX, ZERO_PAGES};
use crate::wire::Reply;
use std::sync::atomic::Ordering;

/// Marks up to `window - 1` following pages with the same home BUSY for read-ahead (not present, not in
/// use): the next pages, in a cyclic region every size-th page, in a block-cyclic one the home's blocks in
/// turn. Returns how many pages the request covers, `page` included, and how they follow each other.
pub(super) fn claim_readahead(region: &RegionShared, page: u64, home: Rank) -> (u32, Steps) {
    let max = region.shared.readahead.load(Ordering::Relaxed).max(1);
    let detector = region.readahead_for(home);
    (
        claim_following(region, detector, page, home, max),
        detector.steps,
    )
}

/// For a first touch of `page`, homed here and never touched: marks BUSY the untouched pages after it
/// that a sequential toucher reaches next, to be filled with zeros at once, as read-ahead does for pages
/// homed elsewhere (same window, at most [`ZERO_FILL_MAX`] pages, off with read-ahead). `untouched`
/// tells whether a page homed here has never been touched anywhere. Returns how many pages the fill
/// covers, `page` included; the caller installs them and releases the extra ones.
///
/// One fault instead of one per page: on this machine a first-touch fault costs about 10 us (a signal,
/// a copy into the page, the return), where the kernel alone zero-fills a page in well under one.
pub(super) fn claim_zero_fill(
    region: &RegionShared,
    page: u64,
    untouched: impl Fn(u64) -> bool,
) -> u64 {
    let me = region.shared.me;
    let max = region
        .shared
        .readahead
        .load(Ordering::Relaxed)
        .clamp(1, ZERO_FILL_MAX as u32);
    let detector = &region.zero_fill;
    let steps = detector.steps;
    let count = u64::from(claim_following(region, detector, page, me, max));
    // A claimed page that has been touched (at another rank, or by this one before it dropped its copy)
    // ends the fill there: it holds data, not zeros.
    let mut fill = 1;
    while fill < count && untouched(steps.page(page, fill)) {
        fill += 1;
    }
    for k in fill..count {
        release_busy(region, steps.page(page, k));
    }
    detector
        .last
        .store(steps.page(page, fill - 1), Ordering::Relaxed);
    fill
}

/// Installs `count` pages of zeros from `page`, along `steps` (the pages of one home): with one copy for
/// each group of adjacent ones.
pub(super) fn install_zeros(
    region: &RegionShared,
    page: u64,
    count: u64,
    steps: Steps,
    access: Access,
) -> Result<(), FaultError> {
    for (_, pages, at) in steps.groups(page, 0, count) {
        install(region, at, pages, zeros(pages), access)?;
    }
    Ok(())
}

/// Marks up to `window - 1` pages following `page` BUSY (along `detector.steps`, same home, not present,
/// not in use), `window` doubling while faults are sequential, up to `max`, or the length of a run
/// announced from `page` (up to `max`). Returns how many pages are covered, `page` included.
pub(super) fn claim_following(
    region: &RegionShared,
    detector: &Sequential,
    page: u64,
    home: Rank,
    max: u32,
) -> u32 {
    let steps = detector.steps;
    let window = detector.window_at(page, max);
    let mut count = 1u32;
    while count < window {
        let p = steps.page(page, u64::from(count));
        if p >= region.pages || region.home(p) != home {
            break;
        }
        if region
            .state(p)
            .compare_exchange(INVALID, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            break;
        }
        count += 1;
    }
    count
}

pub(super) fn install(
    region: &RegionShared,
    page: u64,
    count: u64,
    data: &[u8],
    access: Access,
) -> Result<(), FaultError> {
    region
        .install(page, count, data, access == Access::Write)
        .map_err(|e| FaultError::Sys("UFFDIO_COPY", e))
}

/// Receives `served` pages of a reply's payload from `home` and installs them from `page`, along `steps`,
/// in pieces as they arrive, so that copying into pages overlaps with the rest of the transfer still in
/// flight; a long reply is installed by this thread and the rank's install helper together
/// (`installer.rs`).
pub(super) fn install_chunks(
    ch: &mut Channel,
    region: &RegionShared,
    home: Rank,
    page: u64,
    served: u64,
    steps: Steps,
    access: Access,
) -> Result<(), FaultError> {
    let payload = ch
        .payload(served as usize * PAGE_SIZE)
        .map_err(|e| FaultError::Peer(home, e))?;
    let incoming = installer::Incoming {
        region,
        source: payload.base(),
        source_step: PAGE_SIZE,
        first: page,
        steps,
        pages: served,
        writable: access == Access::Write,
        target: None,
    };
    installer::receive_and_install(&region.shared.installer, &incoming, |filled, wait| {
        payload.recv_more(home, filled, wait)
    })
    .map_err(|e| FaultError::Peer(home, e))?
    .map_err(|e| FaultError::Sys("UFFDIO_COPY", e))
}

/// Refuses a payload on a reply that announces none (no data, zeros, a grant without the page). It is
/// not read through: a length from a confused peer may be of bytes that never come, and a fault that
/// fails ends this rank, so the channel need not stay aligned on frames.
pub(super) fn no_payload(home: Rank, payload_len: usize) -> Result<(), FaultError> {
    if payload_len == 0 {
        Ok(())
    } else {
        Err(FaultError::Protocol(
            home,
            "a reply carries bytes it does not announce",
        ))
    }
}

/// Reads a reply to a request for `count` pages that let the home install them directly (`direct.rs`):
/// `Installed` is `Done` with the home's copy, already in place (true), with no payload to install.
pub(super) fn installed_as_done(
    reply: Reply,
    count: u32,
    direct: bool,
    home: Rank,
) -> Result<(Reply, bool), FaultError> {
    match reply {
        Reply::Installed { .. } if !direct => Err(FaultError::Protocol(
            home,
            "a direct install this rank did not allow",
        )),
        Reply::Installed { count: served } if served == 0 || served > count => {
            Err(FaultError::Protocol(
                home,
                "a direct install of no pages, or of more than asked for",
            ))
        }
        Reply::Installed { count } => Ok((
            Reply::Done {
                data: Data::Home,
                count,
            },
            true,
        )),
        other => Ok((other, false)),
    }
}

/// Counts `pages` received from their home, the first for the fault and the others read ahead; `direct`:
/// the home installed them itself.
pub(super) fn count_fetched(c: &Counters, pages: u64, direct: bool) {
    Counters::add(&c.pages_fetched, pages);
    Counters::add(&c.pages_readahead, pages - 1);
    if direct {
        Counters::add(&c.pages_installed_by_sender, pages);
    }
}

/// `count` pages of zeros (at most [`ZERO_FILL_MAX`]).
pub(super) fn zeros(count: u64) -> &'static [u8] {
    &ZERO_PAGES[..count as usize * PAGE_SIZE]
}
