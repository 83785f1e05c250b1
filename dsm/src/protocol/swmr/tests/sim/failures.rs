//! What ranks do about a rank that crashed: its end, how each other rank learns of it, and what a home
//! and a requester then do, as the engine does.

use super::*;

impl Sim {
    /// Ends a grant that did not run and asks the home again (`ask` fails the fault should the home be
    /// taken for failed: the Abandon could not be sent either).
    pub(super) fn abandon(&mut self, rank: u32, page: usize, access: Access) {
        let home = self.home[page];
        // Asked again as `ask_home` asks, with the following pages claimed again (the grant released
        // those claimed before).
        let claimed = self.claim(rank, page, access);
        let extras = claimed.len();
        let txn = self.txns[rank as usize].as_mut().unwrap();
        txn.phase = Phase::Waiting;
        txn.claimed = claimed;
        self.send(rank, home, Msg::Abandon { page, access });
        self.ask(rank, page, access, extras);
    }

    /// Rank `x` takes `r` for failed (`peer_failed`).
    pub(super) fn learn_failed(&mut self, x: u32, r: u32) {
        let (xi, ri) = (x as usize, r as usize);
        if self.failed[xi][ri] {
            return;
        }
        self.failed[xi][ri] = true;
        if self.alive[ri] {
            // `x` cuts off its connections to `r`, which lives on: `r` reads their end after what `x`
            // sent, and takes `x` for failed in turn (`Channels::cut_off`). Neither is ever known gone.
            self.wire.push((x, r, Msg::End));
        }
        // What `r` sent and is still unread is never read.
        self.wire
            .retain(|(f, t, m)| !(*f == r && *t == x && !matches!(m, Msg::ServiceEnd)));
        // As a home: the transactions `r` holds end (`end_transactions_of`), a grant as if it had run.
        for page in 0..self.truth.len() {
            let Some(lock) = self.locks[page] else {
                continue;
            };
            if self.home[page] != x || lock.by != r {
                continue;
            }
            if let Held::Granted { .. } = lock.held {
                complete(&mut self.entries[page], Rank(r), lock.access);
            }
            if let Some(t) = self.txns[ri].as_mut().filter(|t| t.page == page) {
                t.ended_early = true;
            }
            self.stats.ended_for_failed += 1;
            self.unlock(page);
        }
        // As a requester.
        match &mut self.txns[xi] {
            Some(Txn {
                page,
                phase: Phase::Waiting,
                ..
            }) if self.home[*page] == r => {
                // The request went unanswered: the fault ends with an error.
                self.stats.home_failed += 1;
                self.crash(x);
            }
            Some(Txn {
                phase:
                    Phase::Collecting {
                        pending,
                        unreachable,
                        ..
                    },
                ..
            }) => {
                if pending.remove(&r) {
                    unreachable.insert(r);
                }
                self.advance(x);
            }
            _ => {}
        }
    }

    /// Rank `x` learns that `r` left the job.
    pub(super) fn learn_gone(&mut self, x: u32, r: u32) {
        self.learn_failed(x, r);
        if self.alive[x as usize] {
            self.gone[x as usize][r as usize] = true;
            self.advance(x);
        }
    }

    /// Ends rank `rank` at once, as a SIGKILL or a fault handler's exit does.
    pub(super) fn crash(&mut self, rank: u32) {
        let r = rank as usize;
        if !self.alive[r] {
            return;
        }
        self.alive[r] = false;
        self.txns[r] = None;
        self.deferred[r].clear();
        self.copies[r].iter_mut().for_each(|c| *c = Copy::Invalid);
        // Each connection keeps what arrived before the reset: a prefix of what the rank sent.
        for to in 0..self.ranks as u32 {
            let sent = self
                .wire
                .iter()
                .filter(|(f, t, _)| *f == rank && *t == to)
                .count();
            let kept = self.rng.random_range(0..=sent);
            let mut seen = 0;
            self.wire.retain(|(f, t, _)| {
                if *f != rank || *t != to {
                    return true;
                }
                seen += 1;
                seen <= kept
            });
            if to != rank && self.alive[to as usize] {
                self.wire.push((rank, to, Msg::End));
                self.wire.push((rank, to, Msg::ServiceEnd));
            }
        }
    }
}
