//! A home handing over the following pages with a fault's answer: read-ahead and write-ahead; and a
//! home filling untouched pages with zeros along with its own first touch.

use super::*;

impl Sim {
    /// The following pages a home hands over with a `Done` that carries the page (`first`: zeros or
    /// the home's copy; the engine's `gather_readahead`, `gather_untouched` and `gather_written`), up to
    /// the `extras` the requester claimed: each with its lock free, for as long as the decision for it
    /// is one such a run takes (for a read, the home's copy or zeros; for a first write after zeros,
    /// zeros of a page nobody has touched; for a first write after the home's copy, that or the home's
    /// copy of a page no other rank holds, which the home gives up). They are not locked: the requester
    /// held no copy of them, and a leaf request that reaches it before the install is deferred. Each
    /// comes with its entry as it was, to be put back should the answer not go.
    pub(super) fn gather(
        &mut self,
        home: u32,
        page: usize,
        requester: u32,
        access: Access,
        first: Option<Data>,
        extras: usize,
    ) -> Vec<(usize, u64, Entry)> {
        let mut ahead = Vec::new();
        let Some(first) = first else {
            return ahead;
        };
        let claimed: Vec<usize> = self.following(page, extras + 1).collect();
        assert_eq!(claimed.len(), extras, "pages claimed past the run");
        for q in claimed {
            let mut entry = self.entries[q];
            let before = entry;
            let untouched = entry.owner.is_none();
            if self.locks[q].is_some() || (zeros_only_run(access, first) && !untouched) {
                break;
            }
            match decide(&mut entry, Rank(home), Rank(requester), access) {
                Decision::Done {
                    home_action,
                    data: data @ (Data::Home | Data::Zero),
                } => {
                    self.entries[q] = entry;
                    let held = self.home_copy_action(home, q, home_action);
                    let value = match data {
                        Data::Home => held.expect("a page handed over from an absent home copy"),
                        _ => 0,
                    };
                    if access == Access::Write && data == Data::Home {
                        self.stats.written_ahead += 1;
                    }
                    ahead.push((q, value, before));
                }
                _ => break,
            }
        }
        if zeros_only_run(access, first) {
            assert!(ahead.iter().all(|(_, v, _)| *v == 0));
        }
        ahead
    }

    /// The untouched pages after `page` that the home takes along with its own first touch of `page`
    /// (`zeros`: the decision gave zeros), as `fault/sequential.rs`'s `zero_fill_home` does: the
    /// following pages with its home in the window that hold no copy here, claimed (`claim_zero_fill`),
    /// for as long as each is untouched with its lock free and nothing queued on it (`lock_untouched`).
    /// Each is decided for the home (`give_untouched`) and locked until the install.
    pub(super) fn zero_fill_ahead(
        &mut self,
        home: u32,
        page: usize,
        access: Access,
        zeros: bool,
    ) -> Vec<(usize, u64)> {
        let mut ahead = Vec::new();
        if !zeros {
            return ahead;
        }
        let following: Vec<usize> = self.following(page, self.window).collect();
        for q in following {
            let free = self.locks[q].is_none() && self.queues[q].is_empty();
            let claimable = self.copies[home as usize][q] == Copy::Invalid;
            if !(claimable && free && self.entries[q].owner.is_none()) {
                break;
            }
            let decided = decide(&mut self.entries[q], Rank(home), Rank(home), access);
            assert!(
                matches!(
                    decided,
                    Decision::Done {
                        data: Data::Zero,
                        ..
                    }
                ),
                "page {q}: an untouched page decided as {decided:?}"
            );
            self.lock(q, home, access, Held::OwnInstall);
            // Claimed by the home's fault (BUSY there) until the install.
            let txn = self.txns[home as usize]
                .as_mut()
                .expect("the home's own fault");
            txn.claimed.push(q);
            ahead.push((q, 0));
        }
        self.stats.zero_filled += ahead.len() as u64;
        ahead
    }
}

/// Whether a run after a page decided as `first` holds zeros only: a first write's after zeros.
fn zeros_only_run(access: Access, first: Data) -> bool {
    access == Access::Write && first == Data::Zero
}
