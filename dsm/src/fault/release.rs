//! Faults on release-consistency regions: whole pages fetched from their homes and installed read-only,
//! and the first write of an interval noticed, listed and twinned (with the pages written in earlier
//! intervals twinned ahead). Diffs, notices and invalidations happen at releases and acquires (`rc`).

use super::install::{
    claim_readahead, claim_zero_fill, count_fetched, install, install_chunks, install_zeros,
    installed_as_done,
};
use super::words::{release_busy, set_state};
use super::{ask, refused, FaultError};
use crate::protocol::release::marks;
use crate::protocol::swmr::{Access, Data};
use crate::region::{
    RegionShared, Steps, AHEAD, BUSY, DIFFED, INVALID, READ_ONLY, READ_WRITE, TWINNED, WRITTEN,
};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::ZERO_PAGE;
use crate::wire::{Reply, Request};
use std::sync::atomic::Ordering;

/// Release consistency: fetches a page (and, for a sequential reader, the following pages with the same
/// home) from its home and installs them read-only. The caller holds `page` BUSY and sets its state; the
/// following pages are claimed, installed and released here.
fn fetch_from_home(region: &RegionShared, page: u64, home: Rank) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let c = &shared.counters;
    let (count, steps) = if shared.readahead.load(Ordering::Relaxed) > 1 {
        claim_readahead(region, page, home)
    } else {
        (1, Steps::ADJACENT)
    };
    let mut ch = shared.channels.claim();
    let outcome = (|| {
        let direct = shared.direct_install.load(Ordering::Relaxed);
        let request = Request::FetchPage {
            region: region.id,
            page,
            count,
            direct,
        };
        let (reply, len) = ask(&mut ch, c, home, &request)?;
        let (reply, installed) = installed_as_done(reply, count, direct, home)?;
        match reply {
            Reply::Done {
                data: Data::Zero, ..
            } if len == 0 => {
                install(region, page, 1, &ZERO_PAGE, Access::Read)?;
                Ok(1)
            }
            Reply::Done {
                data: Data::Home,
                count: served,
            } if served >= 1
                && served <= count
                && len
                    == if installed {
                        0
                    } else {
                        served as usize * PAGE_SIZE
                    } =>
            {
                let served = u64::from(served);
                if !installed {
                    install_chunks(&mut ch, region, home, page, served, steps, Access::Read)?;
                }
                count_fetched(c, served, installed);
                Ok(served)
            }
            Reply::Refused { reason } => Err(refused(home, reason)),
            _ => Err(FaultError::Protocol(
                home,
                "unexpected reply to a page fetch",
            )),
        }
    })();
    let served = *outcome.as_ref().unwrap_or(&0);
    for k in 1..u64::from(count) {
        let p = steps.page(page, k);
        if k < served {
            set_state(region.state(p), READ_ONLY);
        }
        release_busy(region, p);
    }
    if served > 0 {
        region
            .readahead_for(home)
            .last
            .store(steps.page(page, served - 1), Ordering::Relaxed);
    }
    outcome.map(|_| ())
}

/// A fault on a page of a release-consistency region. A missing page is fetched whole from its home (zeros
/// when never touched) and installed read-only, so that the first write of an interval is noticed; a write
/// marks the page written in the open interval, gives it a twin when it is homed elsewhere (the home writes
/// in place), and makes it writable.
pub(super) fn release_fault(
    region: &RegionShared,
    page: u64,
    access: Access,
    before: u32,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let home = region.home(page);
    let word = region.state(page);
    if !marks::tracked(word.load(Ordering::Acquire), home == shared.me) {
        // No other rank holds a copy: the home writes in place without tracking. (A fetch from another
        // rank waits for this fault to finish, then write-protects the page and tracks it from then on.)
        if before == INVALID {
            // Untouched pages after it that no rank has fetched (claimed in exactly the INVALID state,
            // so without SHARED) are filled too, the same way.
            let count = claim_zero_fill(region, page, |_| true);
            let steps = region.zero_fill.steps;
            let installed = install_zeros(region, page, count, steps, Access::Write);
            if installed.is_ok() {
                Counters::add(&shared.counters.pages_zero_filled, count - 1);
            }
            for p in (1..count).map(|k| steps.page(page, k)) {
                if installed.is_ok() {
                    set_state(region.state(p), READ_WRITE);
                }
                release_busy(region, p);
            }
            installed?;
        } else {
            region
                .protect(page, 1, false)
                .map_err(|e| FaultError::Sys("UFFDIO_WRITEPROTECT", e))?;
        }
        set_state(word, READ_WRITE);
        return Ok(());
    }
    if before == INVALID {
        if home == shared.me {
            install(region, page, 1, &ZERO_PAGE, Access::Read)?;
        } else {
            fetch_from_home(region, page, home)?;
        }
        set_state(word, READ_ONLY);
    }
    if access == Access::Write {
        let was = word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(marks::marked_at_write(s))
            })
            .unwrap_or_else(|s| s);
        let at = marks::at_write(was, home == shared.me);
        if at.list {
            region
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(page);
        }
        if at.twin {
            region.make_twin(page);
            word.fetch_or(TWINNED, Ordering::AcqRel);
            Counters::add(&shared.counters.twins, 1);
        }
        if at.home_twin {
            // Other ranks hold copies: the home's release diffs its own writes against this twin, to
            // send them with its barrier arrival (diffs applied here meanwhile go to both).
            region.make_twin(page);
            word.fetch_or(DIFFED, Ordering::AcqRel);
            Counters::add(&shared.counters.twins, 1);
        }
        // This rank wrote the page in an earlier interval (its twin kept its memory): the pages after it
        // that it wrote then too are likely written again now.
        let ahead = if at.twin && region.twin_kept(page) {
            twin_ahead(region, page)
        } else {
            0
        };
        let lifted = region.protect(page, 1 + ahead, false);
        for p in page + 1..=page + ahead {
            // Left protected on an error (which ends the rank), they stay twinned and unchanged.
            if lifted.is_ok() {
                set_state(region.state(p), READ_WRITE);
            }
            release_busy(region, p);
        }
        lifted.map_err(|e| FaultError::Sys("UFFDIO_WRITEPROTECT", e))?;
        set_state(word, READ_WRITE);
    }
    Ok(())
}

/// Most pages a write fault twins ahead of writes (`twin_ahead`).
const AHEAD_MAX: u64 = 64;

/// Twins, marks written and lists the pages right after `page` (homed elsewhere, which a write faulted on)
/// that this rank wrote in an earlier interval (their twins kept their memory) and that `marks::ahead`
/// allows, up to `AHEAD_MAX`, stopping at the first that is not or that another thread holds; returns how
/// many it took, held BUSY, so that the fault lifts their write protection with its own page's in one call.
/// A program that writes the same pages interval after interval (the data behind a lock) then takes one
/// write fault for a run of them instead of one each, and each fault's change of protection costs a signal
/// and interrupts every other CPU running a thread of this rank. A page twinned ahead that is not written
/// costs a copy, and a comparison at the release, which leaves it out of its notice (`AHEAD`).
fn twin_ahead(region: &RegionShared, page: u64) -> u64 {
    let shared = &*region.shared;
    let mut n = 0;
    while n < AHEAD_MAX {
        let p = page + 1 + n;
        if p >= region.pages || region.home(p) == shared.me || !region.twin_kept(p) {
            break;
        }
        let word = region.state(p);
        let s = word.load(Ordering::Acquire);
        // Taken and marked written in one step, as a write marks a page: a page is listed once in an
        // interval, by whoever sets WRITTEN (a failed release puts back those it finds unmarked).
        if s & BUSY != 0
            || !marks::ahead(s)
            || word
                .compare_exchange(
                    s,
                    s | BUSY | WRITTEN | AHEAD,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            break;
        }
        region.make_twin(p);
        word.fetch_or(TWINNED, Ordering::AcqRel);
        n += 1;
    }
    if n > 0 {
        // Listed before the fault makes them writable, as a write's page is.
        region
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(page + 1..=page + n);
        Counters::add(&shared.counters.twins, n);
        Counters::add(&shared.counters.twins_ahead, n);
    }
    n
}
