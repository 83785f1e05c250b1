//! The `Dsm` handle: one rank's membership in a job. It owns the channels, the service loop, the arena and
//! the userfaultfd, and offers collective allocation, barriers, distributed locks and statistics. Dropping
//! it ends the rank's part in the job: `Finishing` to every peer, a final barrier, `Goodbye` to every peer,
//! and the service loop stops (from a thread unwinding a panic, or after [`Dsm::abandon`], none of them: the
//! others see this rank fail).
//!
//! Here: the handle, the state its threads share, and joining and leaving. Beside it: `builder` (joining a
//! job), `alloc` (the arena and collective allocation), `sync` (barriers and locks) and `services`
//! (programs' request handlers and calls to them).

use crate::channel::{Channels, RecvError};
use crate::engine::{ServicePriority, MAX_READAHEAD};
use crate::error::{DsmError, Result};
use crate::installer::Installer;
use crate::keepawake::KeepAwake;
use crate::protocol::release::{RcRank, VectorClock, WriteNotice};
use crate::region::{Arena, RegionShared, Retired};
use crate::service::Service;
use crate::stats::{Counters, Stats};
use crate::transport::memory::Doorbell;
use crate::transport::Conn;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::{self, Uffd};
use crate::wire::{Reply, Request};
use nix::sys::eventfd::EventFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod alloc;
mod builder;
mod services;
mod sync;

// For the service loop's tests, which allocate as a rank does.
#[cfg(test)]
pub(crate) use alloc::{alloc_tag, ARENA_MAPPED, ARENA_RESERVED};
pub use builder::{DsmBuilder, DEFAULT_PEER_TIMEOUT, DEFAULT_TWIN_MEMORY};
pub(crate) use services::outside_regions;
pub use services::MAX_SERVICE_REQUEST;
pub use sync::LockGuard;

/// Where rank 0 reserves the shared arena unless told otherwise.
pub const DEFAULT_ARENA_BASE: usize = 0x1000_0000_0000;

/// What a rank does when another rank of the job fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Print an error naming the failed rank and exit with status `EXIT_PEER_FAILED` (the default: nothing
    /// hangs).
    #[default]
    Exit,
    /// Record the failure (`Dsm::failed_ranks`) and fail the operations that depend on that rank; the
    /// program decides. Locks held by the failed rank stay held.
    Report,
}

/// State shared by the application threads, the fault handler and the service loop of one rank.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) me: Rank,
    pub(crate) size: usize,
    pub(crate) channels: Channels,
    /// Keeps idle CPUs awake for a moment after each request (`keepawake.rs`).
    pub(crate) awake: Arc<KeepAwake>,
    pub(crate) counters: Counters,
    /// The largest read-ahead window in pages (1: off); changeable at run time.
    pub(crate) readahead: AtomicU32,
    pub(crate) waker: EventFd,
    /// The service loop's doorbell when a thread of the transport runs the loop (`Mesh::host`): waking
    /// the loop rings it, with `woken` set, instead of writing `waker`.
    pub(crate) hosted: Option<Arc<Doorbell>>,
    pub(crate) woken: AtomicBool,
    /// Ranks an answer sent from outside the service loop could not reach (a service's late answer,
    /// `service::Responder`), with the reason: the loop fails them when it next wakes, as it fails a rank
    /// its own reply cannot reach.
    pub(crate) unreachable: Mutex<Vec<(Rank, String)>>,
    pub(crate) stop: AtomicBool,
    pub(crate) failed: Vec<AtomicBool>,
    /// The service loop's own connection to every rank's, for messages that expect no answer: heartbeats,
    /// failure reports, `Goodbye`. The one to this rank itself is never written to, but stays open: its
    /// end closing would tell this rank's service loop that this rank is gone.
    pub(crate) control: Mutex<Vec<Conn>>,
    /// How long a rank may go unheard before it is taken for failed (`DsmBuilder::peer_timeout`).
    pub(crate) peer_timeout: Option<Duration>,
    /// Ranks whose process is gone as far as this rank can tell: they closed (or reset) their service
    /// loop's connection to this rank's (`Incoming::control`). A rank never ends that one before it leaves
    /// the job (it cuts off its channels' connections to a rank it takes for failed, and lives on), so
    /// this, unlike `failed` (set on any broken connection, protocol errors included), means its memory
    /// went with it: no copy of a page survives there to be kept coherent.
    pub(crate) gone: Vec<AtomicBool>,
    /// Ranks whose programs are leaving the job: they said `Finishing` (at their final barrier) or
    /// `Goodbye`.
    pub(crate) finishing: Vec<AtomicBool>,
    /// Ranks that said `Goodbye`: they left the job. Neither silence nor a failed send to one of them means
    /// that it failed, and they are sent no more heartbeats. (They read on until their service loop
    /// stops: the `Goodbye` of a rank that leaves after them must still reach them, or they would take
    /// its end for a failure.)
    pub(crate) left: Vec<AtomicBool>,
    pub(crate) policy: FailurePolicy,
    /// Set when an operation of this rank returned `PeerFailed` (`Shared::peer_failed_error`): a rank that
    /// then leaves unfinished under `FailurePolicy::Exit` lets the service loop end it as a failure's
    /// consequence (see `Dsm::shutdown`).
    pub(crate) heard_of_failure: AtomicBool,
    /// Set when this rank met an error of its own that the others learn of from it and fail for (its
    /// arena could not be mapped: they see its barrier tag). It leaves with that error: under
    /// `FailurePolicy::Exit`, the failures that follow from it (a rank that leaves because of it) do not
    /// end it first, as a consequence, before it could say why.
    pub(crate) caused_failure: AtomicBool,
    /// Under `FailurePolicy::Exit`, how long a rank ending because another failed waits before it exits.
    pub(crate) exit_grace: Duration,
    pub(crate) service_priority: ServicePriority,
    uffd: OnceLock<Uffd>,
    regions: RwLock<Vec<Option<Weak<RegionShared>>>>,
    /// Release consistency: this rank's intervals, vector clock and write notices.
    pub(crate) rc: Mutex<RcRank>,
    /// Release consistency: how many more twins may keep their memory between intervals
    /// (`DsmBuilder::twin_memory`, in pages; `RegionShared::drop_twins`).
    pub(crate) twin_budget: AtomicU64,
    /// Release consistency: selective acquires begun on this rank, counted under `rc`. A barrier whose
    /// acquire finds it moved since the barrier began applies no updates (`rc::acquire`): a thread of
    /// this rank may have dropped and fetched again a page with writes newer than the barrier's updates
    /// of it, which a selective acquire does without moving the rank's clock.
    pub(crate) selective_acquires: AtomicU64,
    /// Release consistency, on ranks other than 0: the diffs a barrier arrival carries to rank 0 until it
    /// has them (`rc::carry`). Taken under `rc` when both are, and never while holding a channel:
    /// `rc::carry::deliver` holds it across a round trip to rank 0 on a channel it claims.
    pub(crate) carry: Mutex<crate::rc::carry::CarrySlot>,
    /// Release consistency: notices this cut covers are known to every rank, so the locks homed here need
    /// not keep them (see `RcRank::barrier_done`). Read by the service loop, hence a mutex of its own: a
    /// holder of `rc` may be waiting for this rank's service loop.
    pub(crate) lock_cut: Mutex<Option<crate::protocol::release::VectorClock>>,
    /// The bound on the memory of the write notices kept by the locks homed here (and, in `rc`, by this
    /// rank) between barriers.
    pub(crate) notice_memory: usize,
    arena: Mutex<Option<Arena>>,
    arena_base: Option<usize>,
    arena_size: usize,
    epoch: AtomicU64,
    in_process: bool,
    /// Services registered by the layers above, by id.
    services: RwLock<Vec<Option<Arc<dyn Service>>>>,
    /// Regions this rank has dropped, oldest first, each freed at the rank's next collective operation
    /// (see `Region::drop`).
    pub(crate) retired: Mutex<Vec<Retired>>,
    /// Regions whose freeing barrier failed: mapped and served until this rank leaves the job.
    pub(crate) kept: Mutex<Vec<Retired>>,
    /// The helper that installs pages of long read-ahead replies beside the faulting thread.
    pub(crate) installer: Installer,
    /// Whether this rank's page requests let the sender install the pages itself (`direct.rs`).
    pub(crate) direct_install: AtomicBool,
}

/// Write notices and the horizon that came with them (see `protocol::release`).
/// What a barrier hands each rank: every rank's notices, their horizon, and the updates of their pages.
type Notices = (
    Vec<WriteNotice>,
    VectorClock,
    Vec<crate::protocol::release::Update>,
);

impl Shared {
    pub(crate) fn uffd(&self) -> Result<&Uffd> {
        if let Some(u) = self.uffd.get() {
            return Ok(u);
        }
        let u = Uffd::open()?;
        uffd::signal::install(crate::fault::on_fault)?;
        let _ = self.uffd.set(u);
        Ok(self.uffd.get().expect("set just above"))
    }

    pub(crate) fn service(&self, id: u8) -> Option<Arc<dyn Service>> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        services.get(id as usize)?.clone()
    }

    pub(crate) fn services(&self) -> Vec<Arc<dyn Service>> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        services.iter().flatten().cloned().collect()
    }

    /// Sends `req` (a message that expects no answer) with `payload` on the service loop's own connection to
    /// every rank not failed here, but `except`. A rank that has not read for a second is not waited for
    /// (its connection's send timeout): it is failed, as a rank that a reply cannot reach is. Its
    /// connection ends there, as part of the message may have gone out: the rest of the message never
    /// follows, and neither does another message, which that rank would read from the middle of this one
    /// as a malformed frame (taking this rank for the one that failed).
    pub(crate) fn tell_others(&self, req: &Request, payload: &[u8], except: Option<Rank>) {
        let control = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let mut unreachable = Vec::new();
        for (r, conn) in control.iter().enumerate() {
            let to = Rank(r as u32);
            if to == self.me || except == Some(to) || self.failed[r].load(Ordering::Acquire) {
                continue;
            }
            // A rank that has not read the last heartbeat hears from this one when it reads that: more
            // would only fill the connection (a Unix socket's send buffer holds a few hundred small
            // messages), and a rank stopped in a debugger (`DSM_PEER_TIMEOUT=0`) would be failed when
            // one of them timed out. A rank that left needs none, and once it has closed, a Unix socket
            // refuses them at once.
            if matches!(req, Request::Heartbeat)
                && (self.left[r].load(Ordering::Acquire) || conn.unread_by_peer())
            {
                continue;
            }
            if let Err(e) = crate::channel::write_frame(conn, req, &[payload], &self.counters) {
                conn.shutdown(crate::transport::memory::Shut::Write);
                unreachable.push((
                    to,
                    format!("sending it a message of this rank's service loop failed: {e}"),
                ));
            }
        }
        drop(control);
        if !unreachable.is_empty() {
            self.unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(unreachable);
            self.wake_service();
        }
    }

    pub(crate) fn wake_service(&self) {
        match &self.hosted {
            Some(bell) => {
                self.woken.store(true, Ordering::Release);
                bell.ring();
            }
            None => {
                let _ = self.waker.write(1);
            }
        }
    }

    pub(crate) fn region(&self, id: u32) -> Option<Arc<RegionShared>> {
        let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
        regions.get(id as usize)?.as_ref()?.upgrade()
    }

    /// Every live region of this rank.
    pub(crate) fn regions_snapshot(&self) -> Vec<Arc<RegionShared>> {
        let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
        regions
            .iter()
            .flatten()
            .filter_map(|w| w.upgrade())
            .collect()
    }

    pub(crate) fn forget_region(&self, id: u32) {
        let mut regions = self.regions.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = regions.get_mut(id as usize) {
            *r = None;
        }
    }

    pub(crate) fn arena_base(&self) -> Option<(usize, usize)> {
        let arena = self.arena.lock().unwrap_or_else(|p| p.into_inner());
        arena.as_ref().map(|a| (a.base, a.size))
    }

    fn peer_error(&self, rank: Rank, e: RecvError) -> DsmError {
        self.peer_failed_error(rank, e.to_string())
    }

    /// A channel for a call to `to` (in the job) that waits on other application threads
    /// (`Channels::claim_for_wait`); if none comes free, the error saying `to` failed meanwhile, or that
    /// `deadline` passed. `what` says what the channel was for.
    fn claim_for_waiting_on(
        &self,
        to: Rank,
        deadline: Option<Instant>,
        what: impl FnOnce() -> String,
    ) -> Result<crate::channel::Claimed<'_>, DsmError> {
        let failed = || self.failed[to.index()].load(Ordering::Acquire);
        self.channels.claim_for_wait(deadline, failed).ok_or_else(|| {
            if failed() {
                let reason = format!("it failed while this rank waited for a channel {}", what());
                return self.peer_failed_error(to, reason);
            }
            DsmError::TimedOut {
                what: format!(
                    "waiting for a channel {} (every one was taken by other threads' waiting calls; DSM_CHANNELS sets how many there are)",
                    what()
                ),
            }
        })
    }

    /// The error of an operation that needed `rank`, which has failed (or whose connection broke).
    pub(crate) fn peer_failed_error(&self, rank: Rank, reason: String) -> DsmError {
        self.heard_of_failure.store(true, Ordering::Release);
        DsmError::PeerFailed { rank, reason }
    }

    /// A barrier whose `tag` must be equal on every rank. The regions this rank dropped since its last
    /// collective operation are freed first, each after a barrier of its own, oldest first.
    pub(crate) fn barrier_tagged(&self, tag: u64) -> Result<(), DsmError> {
        loop {
            // Oldest region first, as every rank allocated them (and, in a correct program, drops them):
            // an order that two threads dropping regions at once cannot make differ between ranks.
            let next = {
                let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
                let oldest = (0..retired.len()).min_by_key(|&i| retired[i].id());
                oldest.map(|i| retired.remove(i))
            };
            match next {
                Some(region) => region.free(self)?,
                None => return self.barrier_once(tag),
            }
        }
    }

    /// One barrier: see `barrier_tagged`.
    pub(crate) fn barrier_once(&self, tag: u64) -> Result<(), DsmError> {
        let t0 = Instant::now();
        // A barrier is a release (this rank's writes reach their homes) and then an acquire (every rank's
        // write notices come back with the barrier).
        // A release that failed (a home taken for failed) still arrives, as a lock's release still passes
        // the lock on: the others would otherwise wait for this rank at the barrier for ever. Its error is
        // this barrier's, once the barrier is over.
        // Its small diffs go with the arrival, so that ranks holding their pages can apply them instead of
        // dropping the pages (`protocol::release::Update`).
        let selective_acquires = self.selective_acquires.load(Ordering::Acquire);
        let (released, updates) = match crate::rc::release_for_barrier(self) {
            Ok(updates) => (Ok(()), updates),
            Err(e) => (Err(e), Vec::new()),
        };
        let exchanged = if self.size == 1 {
            // A job of one rank: its own notices are all there is to exchange, and no message is needed.
            let rc = self.rc.lock().unwrap_or_else(|p| p.into_inner());
            let own = (rc.own_notices().to_vec(), rc.own_horizon(), Vec::new());
            Ok((Reply::BarrierDone, Some(own)))
        } else {
            self.exchange_at_barrier(tag, &updates)
        };
        let (reply, notices) = match exchanged {
            Ok(exchanged) => exchanged,
            Err(e) => {
                released?;
                return Err(e);
            }
        };
        if let Some((notices, horizon, updates)) = notices {
            crate::rc::acquire(
                self,
                &notices,
                &horizon,
                Some((&updates, selective_acquires)),
            )?;
            let stable = self
                .rc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .barrier_done(&notices, &horizon);
            if stable.is_some() {
                *self.lock_cut.lock().unwrap_or_else(|p| p.into_inner()) = stable;
            }
        }
        Counters::add(&self.counters.barriers, 1);
        Counters::add(
            &self.counters.barrier_wait_ns,
            t0.elapsed().as_nanos() as u64,
        );
        released?;
        match reply {
            Reply::BarrierDone => Ok(()),
            Reply::BarrierMismatch { rank } => Err(DsmError::CollectiveMismatch {
                rank: Rank(rank),
                what: "a collective operation (alloc, barrier or region drop)",
            }),
            Reply::BarrierFailed { rank } => Err(self.peer_failed_error(
                Rank(rank),
                "it failed while the others waited at a barrier".into(),
            )),
            other => Err(DsmError::Protocol {
                rank: Rank(0),
                what: format!("unexpected reply to a barrier: {other:?}"),
            }),
        }
    }

    /// A barrier's messages: this rank's arrival, with the write notices it issued and `updates` of their
    /// pages, to rank 0, and rank 0's answer, with every rank's notices and updates when the barrier
    /// completed.
    fn exchange_at_barrier(
        &self,
        tag: u64,
        updates: &[crate::protocol::release::Update],
    ) -> Result<(Reply, Option<Notices>), DsmError> {
        // What this rank tells the others: its notices, or, when they are more than an arrival carries
        // (writes scattered over millions of pages), none and a horizon past them, as a lock release
        // does: the ranks that had not seen them then drop every page they cache from other homes.
        // (Refusing to arrive would leave the others waiting at the barrier.)
        // The diffs for rank 0 that the arrival carries (`rc::carry`), ahead of the notices.
        let (seq, carried) = crate::rc::carry::waiting(self).unwrap_or_default();
        let own = {
            let rc = self.rc.lock().unwrap_or_else(|p| p.into_inner());
            crate::rc::encode_notices_within(
                rc.own_notices(),
                &rc.own_horizon(),
                updates,
                MAX_SERVICE_REQUEST - carried.len(),
            )
        };
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed);
        let root = Rank(0);
        let mut ch = self.claim_for_waiting_on(root, None, || "to arrive at a barrier".into())?;
        let arrive = Request::Barrier {
            epoch,
            tag,
            carried: carried.len() as u32,
        };
        ch.send(&self.counters, root, &arrive, &[&carried, &own])
            .map_err(|e| self.peer_error(root, crate::channel::RecvError::Sys(e)))?;
        let (reply, payload) = ch
            .recv_owned(&self.counters, root)
            .map_err(|e| self.peer_error(root, e))?;
        drop(ch);
        // Rank 0 applies what an arrival carries before it answers it, whatever the answer. (After the
        // channel is let go: `carry::deliver` holds the carry's lock while it claims one.)
        if !carried.is_empty()
            && matches!(
                reply,
                Reply::BarrierDone | Reply::BarrierMismatch { .. } | Reply::BarrierFailed { .. }
            )
        {
            crate::rc::carry::arrived(self, seq);
        }
        let notices = match reply {
            Reply::BarrierDone => Some(crate::rc::decode_exchange(&payload, root, self.size)?),
            _ => None,
        };
        Ok((reply, notices))
    }
}

/// How long, beyond the exit grace, a rank that gives up because another failed waits for its service
/// loop to end it for that failure (`Dsm::shutdown`).
const FAILURE_NOTICED_WITHIN: Duration = Duration::from_secs(2);

/// One rank's handle on a job's shared memory.
///
/// ```no_run
/// let dsm = dsm::Dsm::builder().build()?; // a job of one rank
/// let v = dsm.alloc_vec::<u64>(1024)?;
/// v.set(3, 42);
/// dsm.barrier()?;
/// assert_eq!(v.get(3), 42);
/// # Ok::<(), dsm::DsmError>(())
/// ```
#[derive(Debug)]
pub struct Dsm {
    pub(crate) shared: Arc<Shared>,
    service: Option<ServiceThread>,
    installer: Option<JoinHandle<()>>,
    awake: Vec<JoinHandle<()>>,
    allocated: AtomicU32,
    /// Set by [`Dsm::abandon`]: the rank leaves the job as a failed one.
    abandoned: AtomicBool,
    /// `DSM_STATS=1`: print this rank's statistics when it leaves.
    stats_at_exit: bool,
}

impl Dsm {
    /// Options for joining a job.
    pub fn builder() -> DsmBuilder {
        DsmBuilder::default()
    }

    /// This process's rank.
    pub fn rank(&self) -> Rank {
        self.shared.me
    }

    /// The number of ranks in the job.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// A snapshot of this rank's counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// This rank's largest sequential read-ahead window, in pages.
    pub fn readahead(&self) -> u32 {
        self.shared.readahead.load(Ordering::Relaxed)
    }

    /// Changes this rank's largest sequential read-ahead window (1 turns read-ahead off). Not collective:
    /// each rank decides for the faults it takes.
    pub fn set_readahead(&self, pages: u32) -> Result<()> {
        if pages == 0 || pages > MAX_READAHEAD {
            return Err(DsmError::Config(format!(
                "read-ahead of {pages} pages: use 1..={MAX_READAHEAD} (1 turns it off)"
            )));
        }
        self.shared.readahead.store(pages, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the install helper takes part in long read-ahead replies (see
    /// [`DsmBuilder::install_helper`]); false in a job of one rank, which has no helper.
    pub fn install_helper(&self) -> bool {
        self.shared.installer.enabled()
    }

    /// Switches the install helper on or off for the faults that follow. Blocks while a reply is being
    /// installed with the helper (a few milliseconds at most). Not collective. An error in a job of one
    /// rank, which has no helper.
    pub fn set_install_helper(&self, on: bool) -> Result<()> {
        if self.shared.installer.set_enabled(on) {
            Ok(())
        } else {
            Err(DsmError::Config(
                "this rank has no install helper: a job of one rank installs no remote replies"
                    .into(),
            ))
        }
    }

    /// Whether this rank's read faults let ranks on this host install the pages themselves (see
    /// [`DsmBuilder::direct_install`]).
    pub fn direct_install(&self) -> bool {
        self.shared.direct_install.load(Ordering::Relaxed)
    }

    /// Switches direct install on or off for the faults that follow. Not collective. Turning it on helps only
    /// if it was on when this rank introduced itself (at its first allocation): otherwise no rank holds
    /// this rank's userfaultfd, and pages keep coming over the connections.
    pub fn set_direct_install(&self, on: bool) {
        self.shared.direct_install.store(on, Ordering::Relaxed);
    }

    /// Ranks seen failing (under `FailurePolicy::Report`).
    pub fn failed_ranks(&self) -> Vec<Rank> {
        (0..self.shared.size)
            .filter(|r| self.shared.failed[*r].load(Ordering::Acquire))
            .map(|r| Rank(r as u32))
            .collect()
    }

    /// Ranks whose programs are leaving the job: they have reached their final barrier ([`Dsm::finish`],
    /// or the drop of their `Dsm`) or passed it. Such a rank's program does nothing more in the job than
    /// that barrier, though its service loop goes on answering the others until the job ends: a rank
    /// that waits for work only such ranks could do would wait for ever.
    pub fn finishing_ranks(&self) -> Vec<Rank> {
        (0..self.shared.size)
            .filter(|r| self.shared.finishing[*r].load(Ordering::Acquire))
            .map(|r| Rank(r as u32))
            .collect()
    }

    /// Whether `rank` is seen failing (as [`Dsm::failed_ranks`] reports) within `within`: for telling,
    /// after an error from a call to `rank`, whether it is gone. A rank that dies is noticed at about the
    /// time its connections break; a connection that broke to a rank still alive gives the same error, and
    /// that rank is not seen failing. Never true of this rank.
    pub fn fails_within(&self, rank: Rank, within: std::time::Duration) -> bool {
        let failed = || {
            self.shared
                .failed
                .get(rank.index())
                .is_some_and(|f| f.load(Ordering::Acquire))
        };
        let t0 = std::time::Instant::now();
        loop {
            if failed() {
                return true;
            }
            if rank == self.shared.me || t0.elapsed() > within {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// One round trip to `to`'s service loop carrying a `reply_bytes` reply (at most a page): the raw cost
    /// of the transport under this rank's engine, for benchmarks.
    pub fn ping(&self, to: Rank, reply_bytes: u32) -> Result<Duration> {
        let s = &self.shared;
        let mut ch = s.channels.claim();
        let t0 = Instant::now();
        let (reply, payload, _) = ch
            .call(&s.counters, to, &Request::Ping { reply_bytes })
            .map_err(|e| s.peer_error(to, e))?;
        let dt = t0.elapsed();
        match reply {
            Reply::Pong if payload.len() == (reply_bytes as usize).min(PAGE_SIZE) => Ok(dt),
            other => Err(DsmError::Protocol {
                rank: to,
                what: format!("unexpected reply to a ping: {other:?}"),
            }),
        }
    }

    /// Leaves the job: `Finishing` to every rank ([`Dsm::finishing_ranks`]), a final barrier (so that every
    /// rank is done with every page), then `Goodbye` on every connection. Called by `drop`; call it yourself
    /// to see its error. Under [`FailurePolicy::Report`], a job that has lost a rank skips the barrier (or
    /// has it fail) and the ranks left finish without error.
    pub fn finish(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Makes this rank leave the job as a failed one when its `Dsm` goes (dropped or finished): no
    /// final barrier and no `Goodbye`, so the other ranks see it fail when its connections close, as if it
    /// had panicked, instead of waiting for what it will never do. For a rank that stops on an error:
    /// `dsm_runtime::Runtime` calls it when it is dropped without being finished.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(service) = self.service.take() else {
            return Ok(());
        };
        let s = &self.shared;
        // A thread unwinding from a panic has failed, not finished: it neither waits at the final barrier
        // (the others may never reach it) nor says goodbye, so the others see this rank fail when its
        // connections close.
        let result = if std::thread::panicking() {
            Err(DsmError::LeftWhilePanicking)
        } else if self.abandoned.load(Ordering::Acquire) {
            Err(DsmError::Abandoned)
        } else {
            // The others learn that this rank's program does nothing more than leave: one that waits for
            // work from it (a task farm's master, for its workers) can stop waiting
            // (`Dsm::finishing_ranks`).
            s.tell_others(&Request::Finishing, &[], None);
            if self.failed_ranks().is_empty() {
                match s.barrier_tagged(0x5707) {
                    // A rank failed, and the barrier said so before this rank's own connections did:
                    // under `Report` that is the branch below (the others finish), however the news came.
                    Err(DsmError::PeerFailed { .. }) if s.policy == FailurePolicy::Report => Ok(()),
                    other => other,
                }
            } else {
                Ok(())
            }
        };
        if result.is_err()
            && s.policy == FailurePolicy::Exit
            && s.size > 1
            && !s.caused_failure.load(Ordering::Acquire)
            && (s.heard_of_failure.load(Ordering::Acquire) || !self.failed_ranks().is_empty())
        {
            // This rank fails because another did (an error from it, returned from `main` or unwrapped,
            // or met at the final barrier). Under `Exit` its service loop ends the rank for that failure,
            // with `EXIT_PEER_FAILED`, once it sees it too (at once, or after the exit grace): waiting for
            // that, rather than ending first with a status of its own, lets the launcher tell the
            // failure's cause from its consequences. Bounded, for a failure the loop never sees (a rank
            // that had said goodbye, say).
            std::thread::sleep(s.exit_grace + FAILURE_NOTICED_WITHIN);
        }
        // Goodbye says this rank left the job as it should: the others then take its connections'
        // end for no failure. A final barrier that failed otherwise (this rank called it where the others
        // called another collective) is no way to leave: without goodbyes the others see this rank fail,
        // instead of waiting for it at their own final barrier for ever.
        if result.is_ok() {
            for ch in s.channels.all() {
                for r in 0..s.size {
                    let _ = ch.send(&s.counters, Rank(r as u32), &Request::Goodbye, &[]);
                }
            }
            s.tell_others(&Request::Goodbye, &[], None);
        }
        s.stop.store(true, Ordering::Release);
        s.wake_service();
        service.join();
        // The layers' services (the tuple space's homes, the shuffle) may still hold answers owed to other
        // ranks, and with them this rank's connections and shared state: they go now, so that the
        // connections close and the ranks still waiting for those answers learn that this rank has left.
        let services = std::mem::take(&mut *s.services.write().unwrap_or_else(|p| p.into_inner()));
        drop(services);
        crate::region::unregister_all_of(s);
        // Regions dropped since the last collective operation (all of them when the rank failed) hold the
        // shared state: they go with the arena, when it does.
        s.retired.lock().unwrap_or_else(|p| p.into_inner()).clear();
        s.kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
        s.installer.stop();
        if let Some(helper) = self.installer.take() {
            let _ = helper.join();
        }
        s.awake.stop();
        for spinner in self.awake.drain(..) {
            let _ = spinner.join();
        }
        if self.stats_at_exit {
            eprintln!("dsm stats, {}:\n{}", s.me, self.stats());
        }
        result
    }
}

/// The thread that runs a rank's service loop.
#[derive(Debug)]
pub(crate) enum ServiceThread {
    /// A thread of its own.
    Own(JoinHandle<()>),
    /// A thread of the transport (`Mesh::host`): the receiver ends when the loop is dropped. (In a
    /// mutex: a `Dsm` is shared between threads, and a receiver alone cannot be.)
    Hosted(Mutex<std::sync::mpsc::Receiver<()>>),
}

impl ServiceThread {
    /// Waits until the loop has ended (the rank's `stop` is set and the loop woken).
    fn join(self) {
        match self {
            ServiceThread::Own(thread) => {
                let _ = thread.join();
            }
            ServiceThread::Hosted(running) => {
                let _ = running
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .recv();
            }
        }
    }
}

impl Drop for Dsm {
    fn drop(&mut self) {
        match self.shutdown() {
            // A job of one rank: nobody else to see it fail, and the program says why it failed.
            Err(DsmError::Abandoned | DsmError::LeftWhilePanicking) if self.shared.size == 1 => {}
            Err(e) => eprintln!("dsm: {}: leaving the job: {e}", self.shared.me),
            Ok(()) => {}
        }
    }
}
