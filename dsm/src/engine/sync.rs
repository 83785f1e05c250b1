//! The lock and barrier servers of the service loop: a lock's queue of waiters and the write notices its
//! holders pass on, and a barrier's arrivals, answered together once every rank has arrived.

use super::release::CarryApplied;
use super::Engine;
use crate::protocol::release::{self, NoticeSet, VectorClock};
use crate::stats::Counters;
use crate::types::Rank;
use crate::wire::{RefusedReason, Reply, Request};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;

#[derive(Debug)]
pub(super) struct LockServer {
    /// The rank holding the lock (one of its threads does), if any: only it may release it.
    pub(super) held: Option<Rank>,
    pub(super) waiters: VecDeque<(usize, VectorClock)>,
    /// Release consistency: the write notices the lock's holders passed on that not every rank has seen yet
    /// (trimmed with `Shared::lock_cut` at each release), for the next holders (each grant carries those the
    /// acquirer's clock does not cover).
    pub(super) notices: NoticeSet,
    /// The intervals whose notices this lock may lack (forgotten here or by a holder to bound their
    /// memory): sent with every grant, so that an acquirer that has not seen them drops its cached pages.
    pub(super) horizon: VectorClock,
}

/// The most diff bytes of updates one barrier's answers carry in all, summed over the ranks they go to
/// (rank 0 sends every rank all of them): 1 MiB, so that what updates add to rank 0's sending at a
/// barrier stays bounded whatever the job's size.
const FANOUT_UPDATE_BYTES: usize = 16 * crate::rc::UPDATE_BYTES;

/// The most diff bytes of updates a barrier hands each rank of a job of `size` (`protocol::release::Update`):
/// four ranks' worth of arrivals (`rc::UPDATE_BYTES` each, 256 KiB) in a job of up to four ranks, and
/// `FANOUT_UPDATE_BYTES / size` in a larger one (128 KiB at 8 ranks, 16 KiB at 64). Updates left out
/// cost only the fetch of their pages where a copy is held.
pub(super) fn all_update_bytes(size: usize) -> usize {
    (4 * crate::rc::UPDATE_BYTES).min(FANOUT_UPDATE_BYTES / size.max(1))
}

impl LockServer {
    /// A lock server whose horizon starts at `horizon` (what the servers let go of may have known).
    pub(super) fn new(horizon: VectorClock) -> LockServer {
        LockServer {
            held: None,
            waiters: VecDeque::new(),
            notices: NoticeSet::default(),
            horizon,
        }
    }
}

/// Past twice this many lock servers, a rank lets every idle one go (`Engine::let_idle_locks_go`): a
/// program that takes many distinct locks (one per bucket of a table, say) would otherwise keep a server
/// for every lock it ever took.
pub(super) const KEPT_LOCKS: usize = 1024;

impl Engine {
    /// A holder released `lock`, passing on `passed` and its horizon: the lock's union takes them in (less
    /// what every rank has seen), the notices of the locks homed here are kept under their bound, and the
    /// lock goes to its next waiter, if any, with the grant to send it.
    pub(super) fn lock_released(
        &mut self,
        lock: u64,
        passed: Vec<crate::protocol::release::WriteNotice>,
        horizon: &VectorClock,
    ) -> Option<(usize, Vec<u8>)> {
        let cut = self
            .shared
            .lock_cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let l = self.locks.get_mut(&lock)?;
        let before = l.notices.bytes();
        // Notices every rank has seen are dropped, so that a lock's union does not grow for the whole job.
        if let Some(cut) = cut.as_ref() {
            l.notices.forget_covered(cut);
        }
        for n in passed {
            if !cut.as_ref().is_some_and(|c| c.covers(&n)) {
                l.notices.insert(n);
            }
        }
        l.horizon.merge(horizon);
        self.lock_notice_bytes = self.lock_notice_bytes - before + l.notices.bytes();
        if self.lock_notice_bytes > self.shared.notice_memory {
            // Every lock homed here keeps the newer half of its notices (a program with few locks and
            // one with many are bounded alike).
            let mut forgotten = 0;
            for l in self.locks.values_mut() {
                let target = l.notices.bytes() / 2;
                forgotten += l.notices.forget_oldest(target, &mut l.horizon);
            }
            self.lock_notice_bytes = self.locks.values().map(|l| l.notices.bytes()).sum();
            // Each writer's latest notice stays with every lock it passed through: large ones (a release
            // of writes scattered over many pages) through many locks can still take more than the
            // bound. The largest sets then go whole, behind a horizon (their acquirers drop every cached
            // page instead of the few the notices name).
            if self.lock_notice_bytes > self.shared.notice_memory {
                let mut largest: Vec<&mut LockServer> = self.locks.values_mut().collect();
                largest.sort_by_key(|l| std::cmp::Reverse(l.notices.bytes()));
                for l in largest {
                    if self.lock_notice_bytes <= self.shared.notice_memory {
                        break;
                    }
                    self.lock_notice_bytes -= l.notices.bytes();
                    forgotten += l.notices.forget_all(&mut l.horizon);
                }
            }
            Counters::add(&self.shared.counters.notices_forgotten, forgotten as u64);
        }
        let l = self.locks.get_mut(&lock)?;
        let next = l.waiters.pop_front();
        // Held again once the grant has gone out (`grant_lock`).
        l.held = None;
        let next = next.map(|(w, clock)| {
            let grant = crate::rc::encode_notices(&l.notices.unseen(&clock), &l.horizon);
            (w, grant)
        });
        if self.locks.len() > 2 * KEPT_LOCKS {
            // A lock whose grant is about to go out is not idle, though nobody holds it yet.
            let granting = next.as_ref().map(|_| lock);
            self.let_idle_locks_go(cut.as_ref(), granting);
        }
        next
    }

    /// Grants `lock` (free) to the waiter on connection `w`, sending it `grant`; its rank holds the lock once
    /// the grant has gone out. A grant that cannot be sent (its rank is gone, and declared failed, which
    /// drops its other waits) passes the lock on to the next waiter: that rank never held it, so nothing
    /// it protects was left half done.
    pub(super) fn grant_lock(&mut self, lock: u64, mut w: usize, mut grant: Vec<u8>) {
        loop {
            self.reply(w, &Reply::LockGranted, &[&grant]);
            if self.conns[w].open {
                let peer = self.conns[w].peer;
                if let Some(l) = self.locks.get_mut(&lock) {
                    l.held = Some(peer);
                }
                return;
            }
            let nothing = VectorClock::new(self.shared.size);
            match self.lock_released(lock, Vec::new(), &nothing) {
                Some(next) => (w, grant) = next,
                None => return,
            }
        }
    }

    /// Lets every lock server go that nobody holds or waits for. What a later holder of such a lock could
    /// need from it, its notices that not every rank has seen (`cut` covers the rest) and its horizon, is
    /// folded into the horizon new lock servers start with: an acquirer that has not seen those intervals
    /// drops its cached pages of release-consistency regions, as for notices forgotten on the way. Under
    /// sequential consistency there is nothing to fold. Called when more than twice [`KEPT_LOCKS`] servers
    /// are kept, so the look at them all is paid for by the locks taken since the last one.
    fn let_idle_locks_go(&mut self, cut: Option<&VectorClock>, granting: Option<u64>) {
        let let_go = &mut self.let_go_horizon;
        let before = self.locks.len();
        self.locks.retain(|id, l| {
            if l.held.is_some() || !l.waiters.is_empty() || granting == Some(*id) {
                return true;
            }
            let notices = std::mem::take(&mut l.notices);
            if let Some(left) = release::left_by_lock(notices, &l.horizon, cut) {
                let_go.merge(&left);
            }
            false
        });
        self.lock_notice_bytes = self.locks.values().map(|l| l.notices.bytes()).sum();
        Counters::add(
            &self.shared.counters.locks_let_go,
            (before - self.locks.len()) as u64,
        );
    }

    pub(super) fn barrier(
        &mut self,
        idx: usize,
        epoch: u64,
        tag: u64,
        carried: u32,
        payload: Vec<u8>,
    ) {
        if self.shared.me != Rank(0) {
            self.refuse(idx, RefusedReason::WrongRank);
            return;
        }
        // The diffs the arrival carries are applied first, whatever the answer, since the arriving rank
        // counts them delivered once it has one (`rc::carry`). While a thread of this rank holds one of
        // their pages the arrival waits, nothing of it taken yet.
        let Some(notices) = payload.get(carried as usize..) else {
            self.close(idx, "its barrier arrival's carried diffs overran it");
            return;
        };
        if carried > 0 {
            let request = Request::Barrier {
                epoch,
                tag,
                carried,
            };
            let carry = &payload[..carried as usize];
            match self.apply_carry(idx, carry) {
                CarryApplied::Yes => {}
                CarryApplied::Waits => {
                    self.deferred.push((idx, request, payload));
                    return;
                }
                CarryApplied::SenderFailed => return,
            }
        }
        if let Some(dead) = self
            .shared
            .failed
            .iter()
            .position(|f| f.load(Ordering::Acquire))
        {
            self.reply(idx, &Reply::BarrierFailed { rank: dead as u32 }, &[]);
            return;
        }
        // A rank arrives once: a second arrival (on another connection) would let the barrier end
        // without a rank that has not come.
        let peer = self.conns[idx].peer;
        if self
            .arrivals
            .iter()
            .any(|(c, _, _)| self.conns[*c].peer == peer)
        {
            self.close(idx, "it arrived twice at one barrier");
            return;
        }
        match crate::rc::decode_exchange(notices, peer, self.shared.size) {
            Ok((n, horizon, updates)) => {
                // An arrival carries the diffs of its own rank's writes only: an update naming another
                // writer would change what every rank sees of a page under that writer's name.
                if let Some(u) = updates.iter().find(|u| u.rank != peer) {
                    let what = format!(
                        "its barrier arrival carried an update of {}'s writes",
                        u.rank
                    );
                    self.close(idx, &what);
                    return;
                }
                // And its own notices and horizon only: another rank's, with an interval past that
                // rank's, would have every rank skip that rank's real notices up to it (stale reads
                // everywhere). Lock releases pass others' notices on; barrier arrivals never do.
                let foreign = n.iter().map(|x| x.rank).find(|&r| r != peer).or_else(|| {
                    let r =
                        (0..horizon.0.len()).find(|&r| r != peer.index() && horizon.0[r] != 0)?;
                    Some(Rank(r as u32))
                });
                if let Some(r) = foreign {
                    let what =
                        format!("its barrier arrival carried {r}'s write notices or horizon");
                    self.close(idx, &what);
                    return;
                }
                self.arrival_notices.extend(n);
                self.arrival_horizon.merge(&horizon);
                // Every rank gets all of them: past a bound the rest are left out (their pages are
                // dropped where cached, as without updates).
                let budget = all_update_bytes(self.shared.size);
                for u in updates {
                    if self.arrival_update_bytes + u.diff.len() <= budget {
                        self.arrival_update_bytes += u.diff.len();
                        self.arrival_updates.push(u);
                    }
                }
            }
            Err(e) => {
                self.close(idx, &e.to_string());
                return;
            }
        }
        self.arrivals.push((idx, epoch, tag));
        if self.arrivals.len() < self.shared.size {
            return;
        }
        let horizon = std::mem::replace(
            &mut self.arrival_horizon,
            VectorClock::new(self.shared.size),
        );
        // Each arrival is at most a request; all of them together, sent to every rank, are bounded the
        // same way: past that the horizon is raised over them (every rank drops its cached copies).
        self.arrival_update_bytes = 0;
        let all = crate::rc::encode_notices_within(
            &std::mem::take(&mut self.arrival_notices),
            &horizon,
            &std::mem::take(&mut self.arrival_updates),
            crate::MAX_SERVICE_REQUEST,
        );
        let arrivals = std::mem::take(&mut self.arrivals);
        let reference = arrivals
            .iter()
            .find(|(c, _, _)| self.conns[*c].peer == Rank(0))
            .map(|(_, e, t)| (*e, *t))
            .unwrap_or((epoch, tag));
        let mismatch = arrivals
            .iter()
            .find(|(_, e, t)| (*e, *t) != reference)
            .map(|(c, _, _)| self.conns[*c].peer);
        let reply = match mismatch {
            Some(rank) => Reply::BarrierMismatch { rank: rank.0 },
            None => Reply::BarrierDone,
        };
        for (c, _, _) in arrivals {
            self.reply(c, &reply, &[&all]);
        }
    }
}
