//! The job's barriers and distributed locks, as a program sees them: a lock is homed at a rank by its id,
//! and its guard releases it on drop; under release consistency both are the points where writes are
//! sent and write notices passed.

use super::{Dsm, MAX_SERVICE_REQUEST};
use crate::error::{DsmError, Result};
use crate::stats::Counters;
use crate::types::Rank;
use crate::wire::{Reply, Request};
use std::time::Instant;

/// A held distributed lock; released on drop.
#[derive(Debug)]
pub struct LockGuard<'d> {
    dsm: &'d Dsm,
    id: u64,
}

impl LockGuard<'_> {
    /// Releases the lock and says whether the release went through, which dropping the guard can only
    /// print: under release consistency a release sends this rank's writes to their homes, which fails
    /// when a home has failed. The lock passes to its next holder either way, so that no rank waits for it
    /// forever.
    pub fn unlock(self) -> Result<()> {
        let result = self.release_lock();
        std::mem::forget(self);
        result
    }

    fn release_lock(&self) -> Result<()> {
        let s = &self.dsm.shared;
        let home = self.dsm.lock_home(self.id);
        // Releasing a lock is a release point: this rank's writes reach their homes first, and its write
        // notices go to the lock's next holder.
        let released = crate::rc::release(s);
        // Every notice this rank knows since the last barrier, its earlier intervals included: vector clocks
        // are sound only if learning a rank's interval k brings its intervals before k along. (Passing only
        // what was new since the grant lost updates: an acquirer could learn interval k through this lock
        // without interval k-1, issued under another lock, and later skip it.) Less what this rank passed
        // through this same lock before: the lock's home keeps the union (forgetting only what every rank
        // has seen) and grants each acquirer what its clock does not cover. Where those notices are too
        // many (a first pass through a lock, or more than one request holds), a horizon over them goes
        // instead (`notices_to_pass`, `encode_notices_within`).
        // Under the same hold of `rc` as the snapshot: a barrier's release by another thread of this rank
        // may have closed an interval since this release, whose notices the snapshot takes, and whose
        // diffs for rank 0 its arrival may still be carrying (`rc::carry`). (Passed on all the same when
        // rank 0 failed: what it homed is lost, and reading it fails.)
        let (delivered, notices, clock) = {
            let rc = s.rc.lock().unwrap_or_else(|p| p.into_inner());
            let delivered = crate::rc::carry::deliver(s);
            let (notices, horizon, clock) = rc.notices_to_pass(self.id);
            let bytes =
                crate::rc::encode_notices_within(&notices, &horizon, &[], MAX_SERVICE_REQUEST);
            (delivered, bytes, clock)
        };
        let ch = s.channels.claim();
        let sent = ch.send(
            &s.counters,
            home,
            &Request::LockRelease { lock: self.id },
            &[&notices],
        );
        // The channel goes back before `rc` is taken: a thread holding `rc` may be waiting for a channel
        // (sending diffs, delivering a carry), and with every channel held by a release waiting here for
        // `rc`, neither would ever go on.
        drop(ch);
        if sent.is_ok() {
            // The clock of the snapshot, not the rank's clock now: another thread may have learned notices
            // since, which this release did not pass.
            s.rc.lock()
                .unwrap_or_else(|p| p.into_inner())
                .passed_through(self.id, clock);
        }
        released?;
        delivered?;
        sent.map_err(|e| s.peer_error(home, crate::channel::RecvError::Sys(e)))
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.release_lock() {
            eprintln!(
                "dsm: {}: releasing lock {}: {e}",
                self.dsm.shared.me, self.id
            );
        }
    }
}

impl Dsm {
    /// Waits until every rank has called `barrier` as many times as this one.
    pub fn barrier(&self) -> Result<()> {
        self.shared.barrier_tagged(0)
    }

    fn lock_home(&self, id: u64) -> Rank {
        Rank((id % self.shared.size as u64) as u32)
    }

    /// Takes distributed lock `id` (any number; its home is `id % size`), waiting for it in FIFO order.
    pub fn lock(&self, id: u64) -> Result<LockGuard<'_>> {
        let t0 = Instant::now();
        let home = self.lock_home(id);
        let s = &self.shared;
        let clock =
            s.rc.lock()
                .unwrap_or_else(|p| p.into_inner())
                .clock()
                .clone();
        let mut ch = s.claim_for_waiting_on(home, None, || format!("to ask it for lock {id}"))?;
        let request = Request::LockAcquire { lock: id };
        ch.send(
            &s.counters,
            home,
            &request,
            &[&crate::rc::encode_clock(&clock)],
        )
        .map_err(|e| s.peer_error(home, crate::channel::RecvError::Sys(e)))?;
        let (reply, payload) = ch
            .recv_owned(&s.counters, home)
            .map_err(|e| s.peer_error(home, e))?;
        match reply {
            Reply::LockGranted => {}
            Reply::LockFailed { rank } => {
                return Err(s.peer_failed_error(
                    Rank(rank),
                    format!(
                    "it held lock {id} when it failed (what the lock protects may be half written)"
                ),
                ))
            }
            other => {
                return Err(DsmError::Protocol {
                    rank: home,
                    what: format!("unexpected reply to a lock request: {other:?}"),
                })
            }
        }
        let grant = crate::rc::decode_notices(&payload, home, s.size);
        drop(ch);
        // The lock is ours from here: on any error below, dropping the guard gives it back, or every other
        // rank would wait for it forever.
        let guard = LockGuard { dsm: self, id };
        // Acquiring a lock is an acquire point: drop the pages the notices name.
        let (notices, horizon) = grant?;
        crate::rc::acquire(s, &notices, &horizon, None)?;
        Counters::add(&s.counters.lock_acquires, 1);
        Counters::add(&s.counters.lock_wait_ns, t0.elapsed().as_nanos() as u64);
        Ok(guard)
    }
}
