//! Resolving a fault in the faulting thread, for either consistency model.
//!
//! Runs inside the SIGBUS handler, so it allocates nothing and takes only locks that the interrupted code
//! cannot hold (channels, page words, and a release-consistency region's `dirty` list, whose holders
//! never touch registered memory and whose push never grows it: one entry a page an interval). Threads of
//! one rank that fault on the same page coalesce: the first marks the page BUSY and fetches, the others
//! sleep on the page word until it is done (`words`). The fault then goes to its model's resolver:
//! `sequential` (the requester side of the SWMR protocol) or `release`; `install` claims and installs the
//! runs of pages a fault covers.

use crate::channel::{Channel, RecvError};
use crate::error::DsmError;
use crate::protocol::swmr::Access;
use crate::region::{self, Consistency, RegionShared, BUSY, READ_ONLY, READ_WRITE, STATE_MASK};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::signal;
use crate::wire::{RefusedReason, Reply, Request};
use nix::errno::Errno;
use std::sync::atomic::Ordering;
use std::time::Instant;

mod homes;
mod install;
mod release;
mod sequential;
mod words;

use release::release_fault;
use sequential::{local_transaction, remote_transaction};
// For the service loop's tests, which play a fault's part.
pub(crate) use words::{claim_step, release_busy, set_state, try_lock_slot, unlock_slot};
#[cfg(test)]
pub(crate) use {
    sequential::{end_grant, mark_granted},
    words::lock_slot,
};

/// Why a fault could not be resolved. Carries no heap data: it is built inside the signal handler.
#[derive(Debug)]
pub(crate) enum FaultError {
    Peer(Rank, RecvError),
    Send(Rank, Errno),
    Sys(&'static str, Errno),
    Protocol(Rank, &'static str),
    /// The page's only up-to-date copy left the job with this rank (its home found no other).
    Lost(Rank),
    /// The page's owner, this rank, left the job while the fault was fetching the page from it.
    OwnerLeft(Rank),
    /// As `OwnerLeft`, but the grant changed nothing anywhere: the fault asks again (a remote page's
    /// fault turns it into `OwnerLeft` once its home has had time to see the owner leave; the home's own
    /// fault decides again at once).
    Abandoned(Rank),
}

/// The error of a fault whose request `peer` refused.
fn refused(peer: Rank, reason: RefusedReason) -> FaultError {
    match reason {
        RefusedReason::DataLeftWith(r) => FaultError::Lost(r),
        _ => FaultError::Protocol(peer, reason.what()),
    }
}

thread_local! {
    /// Set on a thread that runs a rank's service loop (its own thread, or a transport's thread that hosts
    /// it, such as the MPI bridge, which also carries the rank's messages).
    static SERVING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as one that runs a service loop: a fault on a shared page here cannot be served (the
/// loop, or the transport that carries its messages, is what would serve it), and ends the rank saying so.
pub(crate) fn mark_serving() {
    SERVING.with(|s| s.set(true));
}

/// The SIGBUS resolver: returns false when `addr` is not in a region of ours.
pub(crate) fn on_fault(addr: usize, write: bool) -> bool {
    let Some(region) = region::lookup(addr) else {
        return false;
    };
    let page = ((addr - region.base) / PAGE_SIZE) as u64;
    if SERVING.with(std::cell::Cell::get) {
        let mut w = StackWriter::default();
        let _ = std::fmt::Write::write_fmt(
            &mut w,
            format_args!(
                "dsm: {}: the thread that serves this rank's requests touched shared memory at {:#x} (page {} of region {}): a Service must not read or write shared regions while it answers (the fault would wait for the loop it stops)\n",
                region.shared.me, addr, page, region.id
            ),
        );
        signal::fatal(w.as_bytes());
    }
    if let Err(e) = resolve(region, page, write) {
        let mut w = StackWriter::default();
        let _ = std::fmt::Write::write_fmt(
            &mut w,
            format_args!(
                "dsm: {}: cannot resolve the {} fault at {:#x} (page {} of region {}): {}\n",
                region.shared.me,
                if write { "write" } else { "read" },
                addr,
                page,
                region.id,
                Explain(&e, region.shared.me)
            ),
        );
        signal::fatal(w.as_bytes());
    }
    true
}

/// A fault's error as its rank `.1` tells it.
struct Explain<'a>(&'a FaultError, Rank);

impl std::fmt::Display for Explain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            // The page's home is this rank: its own record of the page disagrees with its memory.
            FaultError::Protocol(r, what) if *r == self.1 => {
                write!(f, "protocol error in this rank's own record of the page (it is the page's home): {what}")
            }
            FaultError::Peer(r, e) => write!(f, "{r} failed ({e})"),
            FaultError::Send(r, e) => write!(f, "sending to {r} failed ({e})"),
            FaultError::Sys(call, e) => write!(f, "{call} failed ({e})"),
            FaultError::Protocol(r, what) => write!(f, "protocol error with {r}: {what}"),
            FaultError::Lost(r) => write!(
                f,
                "its only up-to-date copy left the job with {r}, which owned it when it failed or left (its writes to the page are lost; a program that survives failed ranks must not touch pages they may have written last)"
            ),
            FaultError::OwnerLeft(r) | FaultError::Abandoned(r) => write!(
                f,
                "its owner, {r}, left the job while this fault fetched the page from it (its writes to the page may have left with it)"
            ),
        }
    }
}

/// A fixed buffer to format a message into without allocating.
struct StackWriter {
    buf: [u8; 512],
    len: usize,
}

impl Default for StackWriter {
    fn default() -> Self {
        StackWriter {
            buf: [0; 512],
            len: 0,
        }
    }
}

impl StackWriter {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for StackWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The home of `page`, learned from its directory first in a first-touch region whose page this rank
/// has not touched (which may make this rank its home), for an operation outside the fault handler that
/// goes to the home (an atomic operation on a word).
pub(crate) fn home_for_call(region: &RegionShared, page: u64) -> Result<Rank, DsmError> {
    if !region.home_unknown(page) {
        return Ok(region.home(page));
    }
    let shared = &*region.shared;
    // (An atomic operation fetches nothing: no copy announces a run for it to take.)
    homes::learn_home(region, page, false).map_err(|e| {
        let what = format!(
            "learning the home of page {page} of region {}: {}",
            region.id,
            Explain(&e, shared.me)
        );
        match e {
            FaultError::Peer(rank, _) | FaultError::Send(rank, _) => {
                shared.peer_failed_error(rank, what)
            }
            _ => DsmError::Protocol {
                rank: region.directory(page),
                what,
            },
        }
    })
}

/// Sends `request` to `home` on `ch` and reads the reply's header (its payload is left to read).
fn ask(
    ch: &mut Channel,
    c: &Counters,
    home: Rank,
    request: &Request,
) -> Result<(Reply, usize), FaultError> {
    ch.send(c, home, request, &[])
        .map_err(|e| FaultError::Send(home, e))?;
    ch.recv_head(c, home).map_err(|e| FaultError::Peer(home, e))
}

/// Resolves a fault on `page` of `region` (the SIGBUS handler's work, without its ending the rank on an
/// error; the engine's tests call it directly).
pub(crate) fn resolve(region: &RegionShared, page: u64, write: bool) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let c = &shared.counters;
    if region.home_unknown(page) {
        // Before the page is BUSY: a page this rank is learning about is not held here, so an acquire
        // meanwhile has nothing of it to drop.
        homes::learn_home(region, page, write)?;
    }
    let word = region.state(page);
    let mut waited = false;
    let before = loop {
        let s = word.load(Ordering::Acquire);
        let st = s & STATE_MASK;
        if st == READ_WRITE || (st == READ_ONLY && !write) {
            // Another thread of this rank resolved it meanwhile: one fetch served both.
            if waited {
                Counters::add(&c.faults_coalesced, 1);
            }
            return Ok(());
        }
        waited |= s & BUSY != 0;
        if claim_step(word, s) {
            break st;
        }
    };
    let access = if write { Access::Write } else { Access::Read };
    Counters::add(
        match (write, before) {
            (false, _) => &c.read_faults,
            (true, READ_ONLY) => &c.upgrade_faults,
            (true, _) => &c.write_faults,
        },
        1,
    );
    let t0 = Instant::now();
    let result = if region.consistency == Consistency::Release {
        release_fault(region, page, access, before)
    } else if region.home(page) == shared.me {
        local_transaction(region, page, access)
    } else {
        remote_transaction(region, page, access)
    };
    release_busy(region, page);
    c.record_fault_latency(t0.elapsed().as_nanos() as u64);
    result
}
