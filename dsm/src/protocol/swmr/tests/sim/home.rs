//! The home's side of a fault: the decision on a request and its answer, and the page's lock with the
//! requests queued on it, as `engine/pages.rs`'s `serve_acquire` does.

use super::*;

impl Sim {
    /// Applies a decision's action to the home's own copy; returns the copy's value before it.
    pub(super) fn home_copy_action(
        &mut self,
        home: u32,
        page: usize,
        action: HomeAction,
    ) -> Option<u64> {
        let copy = &mut self.copies[home as usize][page];
        let before = copy.value();
        match action {
            HomeAction::None => {}
            HomeAction::Downgrade => {
                let v = before.expect("downgrade of an absent home copy");
                *copy = Copy::ReadOnly(v);
            }
            HomeAction::Invalidate => {
                before.expect("invalidation of an absent home copy");
                *copy = Copy::Invalid;
            }
        }
        before
    }

    /// Decides `requester`'s request for `page` (with `extras` following pages claimed) and answers it.
    pub(super) fn serve(
        &mut self,
        home: u32,
        page: usize,
        requester: u32,
        access: Access,
        extras: usize,
    ) {
        assert!(self.locks[page].is_none());
        if self.failed[home as usize][requester as usize] {
            // A request queued by a rank that failed since: nobody waits for the answer.
            return;
        }
        let mut entry = self.entries[page];
        let gone = &self.gone[home as usize];
        if let Some(owner) = entry.forget_gone(Rank(home), |r| gone[r.index()]) {
            // The page's data left the job: not while the home holds it (a copy of its own is never
            // dropped but by its own decisions, so it would be recorded and inherit the page).
            assert_eq!(
                self.copies[home as usize][page],
                Copy::Invalid,
                "page {page}: refused as lost while its home holds it"
            );
            self.send(home, requester, Msg::Refused { page, owner });
            return;
        }
        let before = entry;
        match decide(&mut entry, Rank(home), Rank(requester), access) {
            Decision::Done { home_action, data } => {
                self.entries[page] = entry;
                let copied = home_action == HomeAction::Invalidate;
                let held_here = self.home_copy_action(home, page, home_action);
                // Pages ahead go with an answer that carries the page (zeros, or the home's copy); the
                // home's own first touch fills untouched pages after it with zeros.
                let carried = (data != Data::None).then_some(data);
                let reply_data = data;
                let (data, keep) = match data {
                    Data::None => (None, true),
                    Data::Zero => (Some(0), false),
                    Data::Home => (
                        Some(held_here.expect("home data from an absent copy")),
                        false,
                    ),
                };
                let (ahead, ahead_were): (Vec<(usize, u64)>, Vec<Entry>) = if requester == home {
                    let ahead = self.zero_fill_ahead(home, page, access, reply_data == Data::Zero);
                    (ahead, Vec::new())
                } else {
                    self.gather(home, page, requester, access, carried, extras)
                        .into_iter()
                        .map(|(q, v, was)| ((q, v), was))
                        .unzip()
                };
                // The answer carries pages (the home's copy, or several read ahead) that the home installs
                // straight into the requester when the job allows it.
                let tried_direct = self.direct
                    && requester != home
                    && (reply_data == Data::Home || (access == Access::Read && !ahead.is_empty()));
                if tried_direct && self.alive[requester as usize] {
                    let value = data.expect("a direct install without data");
                    self.install_directly(requester, page, value, &ahead);
                }
                if !self.sent(home, requester) {
                    let home_copy = held_here.filter(|_| copied);
                    self.take_back(
                        home,
                        requester,
                        access,
                        tried_direct,
                        (page, before, home_copy),
                        &ahead,
                        &ahead_were,
                    );
                    return;
                }
                if keep || requester == home {
                    let held = if keep {
                        Held::Answered
                    } else {
                        Held::OwnInstall
                    };
                    self.lock(page, requester, access, held);
                }
                // Otherwise the requester has no copy: the home leaves the page unlocked and the requester
                // sends no Unlock. A leaf request that reaches it before its install is deferred.
                self.send(
                    home,
                    requester,
                    Msg::Done {
                        page,
                        data,
                        keep,
                        ahead,
                    },
                );
            }
            Decision::Grant(grant) => {
                // The entry pruned of gone ranks is not kept: the Unlock completes the stored one, as in
                // the engine (the next decision prunes it again).
                if requester == home {
                    self.entries[page] = entry;
                }
                let held_here = self.home_copy_action(home, page, grant.home_action);
                if !self.sent(home, requester) {
                    // The requester never heard of the grant: nothing changed anywhere but here, and the
                    // home puts its copy back (read-only).
                    self.stats.unsent += 1;
                    if grant.home_action == HomeAction::Invalidate {
                        let v = held_here.expect("an invalidation of an absent home copy");
                        self.copies[home as usize][page] = Copy::ReadOnly(v);
                    }
                    return;
                }
                let data = if grant.data_from_home {
                    Some(held_here.expect("grant data from an absent home copy"))
                } else {
                    None
                };
                let held = Held::Granted {
                    home_kept_its_copy: grant.home_action == HomeAction::None,
                };
                self.lock(page, requester, access, held);
                let owner_failed = grant
                    .fetch_from
                    .is_some_and(|o| self.failed[home as usize][o.index()]);
                self.send(
                    home,
                    requester,
                    Msg::Granted {
                        page,
                        grant,
                        data,
                        owner_failed,
                    },
                );
            }
        }
    }

    pub(super) fn lock(&mut self, page: usize, by: u32, access: Access, held: Held) {
        self.locks[page] = Some(Lock { by, access, held });
    }

    /// Releases `page`'s lock and serves the requests queued on it until one takes it again.
    pub(super) fn unlock(&mut self, page: usize) {
        self.locks[page] = None;
        while self.locks[page].is_none() {
            let Some((r, a, extras)) = self.queues[page].pop_front() else {
                break;
            };
            let home = self.home[page];
            self.serve(home, page, r, a, extras);
        }
    }
}
