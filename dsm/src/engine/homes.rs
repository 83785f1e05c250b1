//! First-touch regions at a page's directory: which rank took each page (`Request::Homes`). The
//! directory gives an untouched page to the rank that asks for it first, and tells every later asker
//! the home it gave. Nothing here touches a page: the home serves the page itself, as any home does.

use super::Engine;
use crate::region::{Placement, LEARN_PAGES};
use crate::wire::{RefusedReason, Reply};
use std::sync::atomic::Ordering;

impl Engine {
    /// Answers a question for the homes of pages `page..page + count` of region `region`, taking the
    /// untouched ones from `page` on for the asking rank (up to `ahead`): `Reply::Homes`.
    pub(super) fn homes(&mut self, idx: usize, region: u32, page: u64, count: u32, ahead: u32) {
        let asker = self.conns[idx].peer;
        if self.shared.failed[asker.index()].load(Ordering::Acquire) || !self.conns[idx].open {
            // Nobody waits for the answer, and pages given to a failed rank would be lost to the others.
            return;
        }
        let Some(r) = self.shared.region(region) else {
            self.refuse(idx, RefusedReason::UnknownRegion);
            return;
        };
        let count = u64::from(count);
        if page >= r.pages
            || count == 0
            || count > LEARN_PAGES
            || page + count > r.directory_end(page)
        {
            self.refuse(idx, RefusedReason::PageOutOfRange);
            return;
        }
        if r.placement != Placement::FirstTouch || r.directory(page) != self.shared.me {
            self.refuse(idx, RefusedReason::WrongRank);
            return;
        }
        let mut homes = Vec::with_capacity(count as usize * 4);
        r.take_homes(page, count, u64::from(ahead), asker, |home| {
            homes.extend_from_slice(&home.0.to_le_bytes())
        });
        self.reply(idx, &Reply::Homes, &[&homes]);
    }
}
