//! Learning a first-touch page's home before a fault asks it anything (`Placement::FirstTouch`): from
//! the page's directory, which gives the page to this rank when no rank has taken it (with the rest of a
//! run that a copy announced), and tells the homes of the pages after it, so that the faults that
//! follow (and their read-ahead) find them known.

use super::{ask, refused, FaultError};
use crate::region::{RegionShared, LEARN_PAGES, NOBODY};
use crate::types::Rank;
use crate::wire::{Reply, Request};
use std::sync::atomic::Ordering;

/// The home of `page`, learned from its directory when this rank does not know it yet. This rank may
/// become the home of `page` and, when a copy into the region announced that it touches them next in
/// order (`RegionShared::announce`), of the untouched pages after it in that run; a fault that nothing
/// announced takes its own page only, so that each page goes to the rank that really touches it first.
/// The announced run, as far as its pages share the home learned, goes on to the detector that takes
/// it for the fault that follows (`write`: a write fault): the zero fill of pages taken here, or the
/// home's read-ahead or write-ahead.
pub(super) fn learn_home(
    region: &RegionShared,
    page: u64,
    write: bool,
) -> Result<Rank, FaultError> {
    let shared = &*region.shared;
    let me = shared.me;
    let count = (region.directory_end(page) - page).min(LEARN_PAGES);
    let announced = u64::from(region.first_touch.take_announced(page));
    let ahead = if shared.readahead.load(Ordering::Relaxed) > 1 {
        announced.clamp(1, count)
    } else {
        1
    };
    if announced > count {
        // The rest of the run is another question's, to this or the next block's directory.
        region.first_touch.announce(page + count, announced - count);
    }
    let directory = region.directory(page);
    if directory == me {
        // The table is the directory's own record: there is nothing past the run to learn.
        region.take_homes(page, ahead, ahead, me, |_| {});
    } else {
        let request = Request::Homes {
            region: region.id,
            page,
            count: count as u32,
            ahead: ahead as u32,
        };
        let mut ch = shared.channels.claim();
        let (reply, len) = ask(&mut ch, &shared.counters, directory, &request)?;
        match reply {
            Reply::Homes if len == count as usize * 4 => {}
            Reply::Refused { reason } => return Err(refused(directory, reason)),
            _ => {
                return Err(FaultError::Protocol(
                    directory,
                    "an answer that is not the homes asked for",
                ))
            }
        }
        let homes = ch
            .recv_payload(directory, len)
            .map_err(|e| FaultError::Peer(directory, e))?;
        for (p, word) in (page..).zip(homes.chunks_exact(4)) {
            let home = Rank(u32::from_le_bytes(word.try_into().expect("4 bytes")));
            if home == NOBODY {
                continue;
            }
            if home.index() >= shared.size || region.record_home(p, home) != home {
                return Err(FaultError::Protocol(
                    directory,
                    "the directory named a home that is not a rank, or another than it named before",
                ));
            }
        }
    }
    let home = region.home(page);
    if home == NOBODY {
        return Err(FaultError::Protocol(
            directory,
            "the directory named no home for the page this rank touched",
        ));
    }
    if ahead > 1 {
        // The fault fetches (or, for pages taken here, fills with zeros) the run in one go, as it would
        // have had the home been known when the copy announced it; without this, a window growing from
        // one page took the run and ran on past it.
        let run = (page..page + ahead)
            .take_while(|&p| region.home(p) == home)
            .count() as u64;
        region.announced_to(home, write).announce(page, run);
    }
    Ok(home)
}
