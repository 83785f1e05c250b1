//! A requester running a grant: the requests to the copy holders, their replies, and holders it cannot
//! reach.

use super::*;

impl Sim {
    /// Runs a grant at `rank` as `fault/sequential.rs`'s `run_grant` does: the request to the owner first
    /// (the grant is abandoned, or fails, once the owner is known gone if that send fails), then the
    /// invalidations (a copy holder that cannot be reached is waited on until it is known gone).
    pub(super) fn run_grant(
        &mut self,
        rank: u32,
        page: usize,
        grant: Grant,
        data: Option<u64>,
        owner_failed: bool,
    ) {
        let r = rank as usize;
        let txn = self.txns[r].as_mut().unwrap();
        assert_eq!(txn.page, page);
        // A grant releases the pages claimed ahead: nothing is installed there.
        txn.claimed.clear();
        let access = txn.access;
        let mut pending = BTreeSet::new();
        let mut unreachable = BTreeSet::new();
        let mut out = Vec::new();
        let home_kept_its_copy = grant.home_action == HomeAction::None;
        let fetch_from = grant.fetch_from.map(|o| o.0);
        let mut asked = false;
        if let Some(o) = fetch_from {
            if self.failed[r][o as usize] {
                // The send fails before any copy holder was asked.
                unreachable.insert(o);
            } else {
                pending.insert(o);
                let m = match access {
                    Access::Read => Msg::Fetch {
                        page,
                        wait_for_own: owner_failed,
                    },
                    Access::Write => Msg::Invalidate {
                        page,
                        send: true,
                        wait_for_own: owner_failed,
                    },
                };
                out.push((o, m));
            }
        }
        if unreachable.is_empty() {
            for h in grant.invalidate.iter() {
                if self.failed[r][h.index()] {
                    unreachable.insert(h.0);
                } else {
                    pending.insert(h.0);
                    asked = true;
                    out.push((
                        h.0,
                        Msg::Invalidate {
                            page,
                            send: false,
                            wait_for_own: false,
                        },
                    ));
                }
            }
        }
        let keep = data.is_none() && fetch_from.is_none();
        txn.phase = Phase::Collecting {
            pending,
            unreachable,
            fetch_from,
            asked,
            home_kept_its_copy,
            data,
            keep,
        };
        for (dst, m) in out {
            self.send(rank, dst, m);
        }
        self.look_again_at_deferred(rank, page);
        self.advance(rank);
    }

    /// Moves `rank`'s grant on as far as what it knows allows.
    pub(super) fn advance(&mut self, rank: u32) {
        let r = rank as usize;
        let Some(Txn {
            page,
            access,
            revoked,
            phase:
                Phase::Collecting {
                    pending,
                    unreachable,
                    fetch_from,
                    asked,
                    home_kept_its_copy,
                    data,
                    keep,
                },
            ..
        }) = &mut self.txns[r]
        else {
            return;
        };
        let (page, access, revoked) = (*page, *access, *revoked);
        let gone = &self.gone[r];
        let left: Vec<u32> = unreachable
            .iter()
            .copied()
            .filter(|h| gone[*h as usize])
            .collect();
        for h in left {
            unreachable.remove(&h);
            if Some(h) == *fetch_from {
                // The page was to come from a rank that left with it.
                if revoked {
                    // `end_grant` fails the fault before it could abandon.
                    self.crash(rank);
                } else if *home_kept_its_copy && !*asked {
                    self.stats.abandoned += 1;
                    self.abandon(rank, page, access);
                } else {
                    self.stats.owner_left += 1;
                    self.crash(rank);
                }
                return;
            }
            self.stats.invalidations_gone += 1;
        }
        if pending.is_empty() && unreachable.is_empty() {
            if revoked {
                // `end_grant` fails the fault: the home ended the transaction early.
                self.crash(rank);
                return;
            }
            let (data, keep) = (*data, *keep);
            self.txns[r].as_mut().unwrap().phase = Phase::Installing {
                data,
                keep,
                granted: true,
                ahead: Vec::new(),
            };
        }
    }
}
