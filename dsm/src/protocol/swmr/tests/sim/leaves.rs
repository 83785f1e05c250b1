//! A rank's service loop meeting a leaf request (`Fetch`, `Invalidate`) it cannot serve at once, as
//! `engine/pages.rs`'s `defer_or_refuse` does: deferred until the install (a request marked
//! `wait_for_own`, copy or no copy), revoking a grant that the home ended early, or refused.

use super::*;

impl Sim {
    /// Returns true if `rank` does not serve the leaf request `msg` from `from` for `page` now: the request
    /// is marked `wait_for_own` and a transaction of `rank`'s own is on the page (or on pages it claimed
    /// with it), or `rank` holds no copy, and either such a transaction makes the request wait for the
    /// install, or a later writer's invalidation revokes its running grant, or, with no transaction on
    /// the page, the request is refused.
    pub(super) fn defer_or_refuse(&mut self, from: u32, rank: u32, page: usize, msg: &Msg) -> bool {
        let r = rank as usize;
        let wait_for_own = matches!(
            msg,
            Msg::Fetch {
                wait_for_own: true,
                ..
            } | Msg::Invalidate {
                wait_for_own: true,
                ..
            }
        );
        let own = self.txns[r]
            .as_ref()
            .is_some_and(|t| t.page == page || t.claimed.contains(&page));
        if wait_for_own && own {
            // The home granted the request's transaction while it took this rank for failed: a fault of
            // this rank on the page is one the home ended early (or will never answer), and the home's
            // record has it done. Served before it ends, the request would take or hand out the copy an
            // upgrade keeps and is about to write.
            self.stats.waited_for_own += 1;
            self.deferred[r].push((from, msg.clone()));
            return true;
        }
        let unknown = self.installed_unknown(rank, page);
        if self.copies[r][page] != Copy::Invalid && !unknown {
            return false;
        }
        if unknown {
            // Installed here by its home, the answer not yet read: the state is still INVALID | BUSY.
            self.stats.deferred_direct += 1;
        }
        if !own {
            return self.refuse(from, rank, page);
        }
        let txn = self.txns[r].as_mut().expect("a transaction on the page");
        let granted = txn.page == page && matches!(txn.phase, Phase::Collecting { .. });
        if granted && matches!(msg, Msg::Invalidate { send: false, .. }) {
            // The home ended this grant early, having taken this rank for failed, and granted a writer that
            // now drops the copy the ended grant was recorded with: there is none yet, and there will be
            // none (`fault::end_grant`).
            assert!(
                self.stats.suspicions > 0,
                "page {page}: a grant at rank {rank} revoked in a job where no rank lives on taken for failed"
            );
            txn.revoked = true;
            self.stats.revoked += 1;
            self.send(rank, from, Msg::LeafReply { data: None });
            return true;
        }
        self.deferred[r].push((from, msg.clone()));
        true
    }

    /// The engine refuses a leaf request that finds no copy and no transaction on the page: the ranks
    /// disagree about it, which only a rank taken for failed while it lives explains.
    fn refuse(&mut self, from: u32, rank: u32, page: usize) -> bool {
        assert!(
            self.stats.suspicions > 0,
            "leaf request for page {page} reached rank {rank}, which holds no copy"
        );
        self.stats.leaf_refused += 1;
        self.send(rank, from, Msg::LeafRefused);
        true
    }

    /// A grant has reached `rank` (`GRANTED` is set): the requests for its page the service loop deferred
    /// before are looked at again (`fault::mark_granted`), and a later writer's invalidation among them
    /// revokes the grant.
    pub(super) fn look_again_at_deferred(&mut self, rank: u32, page: usize) {
        let (again, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred[rank as usize])
            .into_iter()
            .partition(|(_, m)| {
                matches!(m, Msg::Fetch { page: p, .. } | Msg::Invalidate { page: p, .. } if *p == page)
            });
        self.deferred[rank as usize] = kept;
        for (from, msg) in again {
            self.handle(from, rank, msg);
        }
    }
}
