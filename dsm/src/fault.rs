//! Resolving a fault in the faulting thread: the requester side of the SWMR protocol.
//!
//! Runs inside the SIGBUS handler, so it allocates nothing and takes only locks that the interrupted code
//! cannot hold (channels, page words, and a release-consistency region's `dirty` list, whose holders
//! never touch registered memory and whose push never grows it: one entry a page an interval). Threads of one rank that fault on the same page coalesce: the first
//! marks the page BUSY and fetches, the others sleep on the page word until it is done. A fault on a page
//! homed here takes the manager lock directly; a fault on a remote page asks its home, which either answers
//! at once (`Done`) or grants the transaction to the requester, who then talks to the owner and copy holders
//! itself. The home keeps the page locked until the requester's `Unlock` after a grant or an upgrade; when
//! the requester had no copy and the home answered at once, the home releases the page as it answers, and
//! a leaf request that reaches this rank before the install is deferred by the service loop (see
//! `protocol/README.md`).

use crate::channel::{Channel, RecvError};
use crate::installer;
use crate::protocol::release::marks;
use crate::protocol::swmr::{self, Access, CopySet, Data, Decision, Grant};
use crate::region::Sequential;
use crate::region::{
    self, Consistency, RegionShared, AHEAD, BUSY, DEFERRED, DIFFED, GRANTED, INVALID, LOCKED,
    LOCK_WAITERS, QUEUED, READ_ONLY, READ_WRITE, REVOKED, STATE_MASK, TWINNED, WAITERS, WRITTEN,
};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::{futex, signal, ZERO_FILL_MAX, ZERO_PAGE, ZERO_PAGES};
use crate::wire::{RefusedReason, Reply, Request};
use nix::errno::Errno;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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
            FaultError::OwnerLeft(r) => write!(
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

/// Sets the state bits of a page word, keeping BUSY and WAITERS.
pub(crate) fn set_state(word: &AtomicU32, state: u32) {
    let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
        Some((s & !STATE_MASK) | state)
    });
}

/// One step of taking a page's BUSY bit, given the word's value `s` just read: sleeps while another thread
/// holds the bit (returns false: read the word again), or tries to take it (true when taken).
pub(crate) fn claim_step(word: &AtomicU32, s: u32) -> bool {
    if s & BUSY != 0 {
        if s & WAITERS != 0
            || word
                .compare_exchange(s, s | WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            futex::wait(word, s | WAITERS);
        }
        return false;
    }
    word.compare_exchange(s, s | BUSY, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
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

/// Clears BUSY, wakes the threads that waited for the page, and the service loop if it deferred a request.
pub(crate) fn release_busy(region: &RegionShared, page: u64) {
    let word = region.state(page);
    let prev = word.fetch_and(
        !(BUSY | WAITERS | DEFERRED | GRANTED | REVOKED),
        Ordering::AcqRel,
    );
    if prev & WAITERS != 0 {
        futex::wake_all(word);
    }
    if prev & DEFERRED != 0 {
        region.shared.wake_service();
    }
}

/// Takes the manager lock of a page homed here, sleeping while a transaction holds it.
pub(crate) fn lock_slot(lock: &AtomicU32) {
    loop {
        let s = lock.load(Ordering::Acquire);
        if s & LOCKED == 0 {
            if lock
                .compare_exchange(s, s | LOCKED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        } else if s & LOCK_WAITERS != 0
            || lock
                .compare_exchange(s, s | LOCK_WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            futex::wait(lock, s | LOCK_WAITERS);
        }
    }
}

/// Takes a manager lock only if it is free with nothing queued on it, without waiting: for pages taken
/// along with another (read-ahead, write-ahead, zero fills), where a busy page ends the run.
pub(crate) fn try_lock_slot(lock: &AtomicU32) -> bool {
    lock.compare_exchange(0, LOCKED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Takes the manager lock of page `p`, homed here, at once if it is free and the page has never been
/// touched anywhere; otherwise leaves it as it was (waking the service loop if a request was queued on it
/// meanwhile). For untouched pages handed out along with another (zero fills, write-ahead).
pub(crate) fn lock_untouched(region: &RegionShared, p: u64) -> bool {
    let lock = &region.slot(p).lock;
    if !try_lock_slot(lock) {
        return false;
    }
    if region.slot(p).load().owner.is_some() {
        if unlock_slot(lock) {
            region.shared.wake_service();
        }
        return false;
    }
    true
}

/// Makes `owner` the first toucher of page `p` (untouched, its manager lock taken by
/// [`lock_untouched`]), as `swmr::decide` does for any untouched page: it owns zeros.
pub(crate) fn give_untouched(region: &RegionShared, p: u64, owner: Rank, access: Access) {
    let slot = region.slot(p);
    let mut entry = slot.load();
    let decided = swmr::decide(&mut entry, region.shared.me, owner, access);
    debug_assert!(matches!(
        decided,
        Decision::Done {
            data: Data::Zero,
            ..
        }
    ));
    slot.store(&entry);
}

/// Releases a manager lock; returns whether the service loop has requests queued on it.
pub(crate) fn unlock_slot(lock: &AtomicU32) -> bool {
    let prev = lock.fetch_and(!(LOCKED | LOCK_WAITERS), Ordering::AcqRel);
    if prev & LOCK_WAITERS != 0 {
        futex::wake_all(lock);
    }
    prev & QUEUED != 0
}

fn resolve(region: &RegionShared, page: u64, write: bool) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let c = &shared.counters;
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

/// Marks up to `window - 1` following pages with the same home BUSY for read-ahead (not present, not in
/// use): the next pages, or in a cyclic region every size-th page. Returns how many pages the request
/// covers, `page` included, and the distance between them.
fn claim_readahead(region: &RegionShared, page: u64, home: Rank) -> (u32, u64) {
    let max = region.shared.readahead.load(Ordering::Relaxed).max(1);
    let detector = region.readahead_for(home);
    (
        claim_following(region, detector, page, home, max),
        detector.stride,
    )
}

/// For a first touch of `page`, homed here and never touched: marks BUSY the untouched pages after it
/// that a sequential toucher reaches next, to be filled with zeros at once, as read-ahead does for pages
/// homed elsewhere (same window, at most [`ZERO_FILL_MAX`] pages, off with read-ahead). `untouched`
/// tells whether a page homed here has never been touched anywhere. Returns how many pages the fill
/// covers, `page` included; the caller installs them and releases the extra ones.
///
/// One fault instead of one per page: on this machine a first-touch fault costs about 10 us (a signal,
/// a copy into the page, the return), where the kernel alone zero-fills a page in well under one.
fn claim_zero_fill(region: &RegionShared, page: u64, untouched: impl Fn(u64) -> bool) -> u64 {
    let me = region.shared.me;
    let max = region
        .shared
        .readahead
        .load(Ordering::Relaxed)
        .clamp(1, ZERO_FILL_MAX as u32);
    let detector = &region.zero_fill;
    let stride = detector.stride;
    let count = u64::from(claim_following(region, detector, page, me, max));
    // A claimed page that has been touched (at another rank, or by this one before it dropped its copy)
    // ends the fill there: it holds data, not zeros.
    let mut fill = 1;
    while fill < count && untouched(page + fill * stride) {
        fill += 1;
    }
    for k in fill..count {
        release_busy(region, page + k * stride);
    }
    detector
        .last
        .store(page + (fill - 1) * stride, Ordering::Relaxed);
    fill
}

/// Installs `count` pages of zeros from `page`, `stride` apart (the pages of one home in a cyclic region):
/// with one copy when they are contiguous.
fn install_zeros(
    region: &RegionShared,
    page: u64,
    count: u64,
    stride: u64,
    access: Access,
) -> Result<(), FaultError> {
    if stride == 1 {
        return install(region, page, count, zeros(count), access);
    }
    for k in 0..count {
        install(region, page + k * stride, 1, &ZERO_PAGE, access)?;
    }
    Ok(())
}

/// Marks up to `window - 1` pages following `page` BUSY (one `detector.stride` apart, same home, not
/// present, not in use), `window` doubling while faults are sequential, up to `max`, or the length of a
/// run announced from `page` (up to `max`). Returns how many pages are covered, `page` included.
fn claim_following(
    region: &RegionShared,
    detector: &Sequential,
    page: u64,
    home: Rank,
    max: u32,
) -> u32 {
    let stride = detector.stride;
    let window = detector.window_at(page, max);
    let mut count = 1u32;
    while count < window {
        let p = page + u64::from(count) * stride;
        if p >= region.pages || region.home(p) != home {
            break;
        }
        if region
            .state(p)
            .compare_exchange(INVALID, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            break;
        }
        count += 1;
    }
    count
}

fn install(
    region: &RegionShared,
    page: u64,
    count: u64,
    data: &[u8],
    access: Access,
) -> Result<(), FaultError> {
    region
        .install(page, count, data, access == Access::Write)
        .map_err(|e| FaultError::Sys("UFFDIO_COPY", e))
}

/// The manager found the copy this rank holds enough: for a write, it is made writable; for a read (a
/// copy that came back while this thread waited, as the home's own does when an answer could not be
/// sent), it stays as it is.
fn upgrade_in_place(region: &RegionShared, page: u64, access: Access) -> Result<(), FaultError> {
    let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
    if st == INVALID {
        return Err(FaultError::Protocol(
            region.home(page),
            "the home says this rank holds a copy it does not have",
        ));
    }
    if access == Access::Read {
        return Ok(());
    }
    region
        .protect(page, 1, false)
        .map_err(|e| FaultError::Sys("UFFDIO_WRITEPROTECT", e))
}

/// Release consistency: fetches a page (and, for a sequential reader, the following pages with the same
/// home) from its home and installs them read-only. The caller holds `page` BUSY and sets its state; the
/// following pages are claimed, installed and released here.
fn fetch_from_home(region: &RegionShared, page: u64, home: Rank) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let c = &shared.counters;
    let (count, stride) = if shared.readahead.load(Ordering::Relaxed) > 1 {
        claim_readahead(region, page, home)
    } else {
        (1, 1)
    };
    let mut ch = shared.channels.claim();
    let outcome = (|| {
        let direct = shared.direct_install.load(Ordering::Relaxed);
        let request = Request::FetchPage {
            region: region.id,
            page,
            count,
            direct,
        };
        let (reply, len) = ask(&mut ch, c, home, &request)?;
        let (reply, installed) = installed_as_done(reply, count, direct, home)?;
        match reply {
            Reply::Done {
                data: Data::Zero, ..
            } if len == 0 => {
                install(region, page, 1, &ZERO_PAGE, Access::Read)?;
                Ok(1)
            }
            Reply::Done {
                data: Data::Home,
                count: served,
            } if served >= 1
                && served <= count
                && len
                    == if installed {
                        0
                    } else {
                        served as usize * PAGE_SIZE
                    } =>
            {
                let served = u64::from(served);
                if !installed {
                    install_chunks(&mut ch, region, home, page, served, stride, Access::Read)?;
                }
                count_fetched(c, served, installed);
                Ok(served)
            }
            Reply::Refused { reason } => Err(refused(home, reason)),
            _ => Err(FaultError::Protocol(
                home,
                "unexpected reply to a page fetch",
            )),
        }
    })();
    let served = *outcome.as_ref().unwrap_or(&0);
    for k in 1..u64::from(count) {
        let p = page + k * stride;
        if k < served {
            set_state(region.state(p), READ_ONLY);
        }
        release_busy(region, p);
    }
    if served > 0 {
        region
            .readahead_for(home)
            .last
            .store(page + (served - 1) * stride, Ordering::Relaxed);
    }
    outcome.map(|_| ())
}

/// A fault on a page of a release-consistency region. A missing page is fetched whole from its home (zeros
/// when never touched) and installed read-only, so that the first write of an interval is noticed; a write
/// marks the page written in the open interval, gives it a twin when it is homed elsewhere (the home writes
/// in place), and makes it writable.
fn release_fault(
    region: &RegionShared,
    page: u64,
    access: Access,
    before: u32,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let home = region.home(page);
    let word = region.state(page);
    if !marks::tracked(word.load(Ordering::Acquire), home == shared.me) {
        // No other rank holds a copy: the home writes in place without tracking. (A fetch from another
        // rank waits for this fault to finish, then write-protects the page and tracks it from then on.)
        if before == INVALID {
            // Untouched pages after it that no rank has fetched (claimed in exactly the INVALID state,
            // so without SHARED) are filled too, the same way.
            let count = claim_zero_fill(region, page, |_| true);
            let stride = region.zero_fill.stride;
            let installed = install_zeros(region, page, count, stride, Access::Write);
            if installed.is_ok() {
                Counters::add(&shared.counters.pages_zero_filled, count - 1);
            }
            for p in (1..count).map(|k| page + k * stride) {
                if installed.is_ok() {
                    set_state(region.state(p), READ_WRITE);
                }
                release_busy(region, p);
            }
            installed?;
        } else {
            region
                .protect(page, 1, false)
                .map_err(|e| FaultError::Sys("UFFDIO_WRITEPROTECT", e))?;
        }
        set_state(word, READ_WRITE);
        return Ok(());
    }
    if before == INVALID {
        if home == shared.me {
            install(region, page, 1, &ZERO_PAGE, Access::Read)?;
        } else {
            fetch_from_home(region, page, home)?;
        }
        set_state(word, READ_ONLY);
    }
    if access == Access::Write {
        let was = word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(marks::marked_at_write(s))
            })
            .unwrap_or_else(|s| s);
        let at = marks::at_write(was, home == shared.me);
        if at.list {
            region
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(page);
        }
        if at.twin {
            region.make_twin(page);
            word.fetch_or(TWINNED, Ordering::AcqRel);
            Counters::add(&shared.counters.twins, 1);
        }
        if at.home_twin {
            // Other ranks hold copies: the home's release diffs its own writes against this twin, to
            // send them with its barrier arrival (diffs applied here meanwhile go to both).
            region.make_twin(page);
            word.fetch_or(DIFFED, Ordering::AcqRel);
            Counters::add(&shared.counters.twins, 1);
        }
        // This rank wrote the page in an earlier interval (its twin kept its memory): the pages after it
        // that it wrote then too are likely written again now.
        let ahead = if at.twin && region.twin_kept(page) {
            twin_ahead(region, page)
        } else {
            0
        };
        let lifted = region.protect(page, 1 + ahead, false);
        for p in page + 1..=page + ahead {
            // Left protected on an error (which ends the rank), they stay twinned and unchanged.
            if lifted.is_ok() {
                set_state(region.state(p), READ_WRITE);
            }
            release_busy(region, p);
        }
        lifted.map_err(|e| FaultError::Sys("UFFDIO_WRITEPROTECT", e))?;
        set_state(word, READ_WRITE);
    }
    Ok(())
}

/// Most pages a write fault twins ahead of writes (`twin_ahead`).
const AHEAD_MAX: u64 = 64;

/// Twins, marks written and lists the pages right after `page` (homed elsewhere, which a write faulted on)
/// that this rank wrote in an earlier interval (their twins kept their memory) and that `marks::ahead`
/// allows, up to `AHEAD_MAX`, stopping at the first that is not or that another thread holds; returns how
/// many it took, held BUSY, so that the fault lifts their write protection with its own page's in one call.
/// A program that writes the same pages interval after interval (the data behind a lock) then takes one
/// write fault for a run of them instead of one each, and each fault's change of protection costs a signal
/// and interrupts every other CPU running a thread of this rank. A page twinned ahead that is not written
/// costs a copy, and a comparison at the release, which leaves it out of its notice (`AHEAD`).
fn twin_ahead(region: &RegionShared, page: u64) -> u64 {
    let shared = &*region.shared;
    let mut n = 0;
    while n < AHEAD_MAX {
        let p = page + 1 + n;
        if p >= region.pages || region.home(p) == shared.me || !region.twin_kept(p) {
            break;
        }
        let word = region.state(p);
        let s = word.load(Ordering::Acquire);
        // Taken and marked written in one step, as a write marks a page: a page is listed once in an
        // interval, by whoever sets WRITTEN (a failed release puts back those it finds unmarked).
        if s & BUSY != 0
            || !marks::ahead(s)
            || word
                .compare_exchange(
                    s,
                    s | BUSY | WRITTEN | AHEAD,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            break;
        }
        region.make_twin(p);
        word.fetch_or(TWINNED, Ordering::AcqRel);
        n += 1;
    }
    if n > 0 {
        // Listed before the fault makes them writable, as a write's page is.
        region
            .dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(page + 1..=page + n);
        Counters::add(&shared.counters.twins, n);
        Counters::add(&shared.counters.twins_ahead, n);
    }
    n
}

/// Receives `served` pages of a reply's payload from `home` and installs them from `page`, `stride` apart,
/// in pieces as they arrive, so that copying into pages overlaps with the rest of the transfer still in
/// flight; a long reply is installed by this thread and the rank's install helper together
/// (`installer.rs`).
fn install_chunks(
    ch: &mut Channel,
    region: &RegionShared,
    home: Rank,
    page: u64,
    served: u64,
    stride: u64,
    access: Access,
) -> Result<(), FaultError> {
    let payload = ch
        .payload(served as usize * PAGE_SIZE)
        .map_err(|e| FaultError::Peer(home, e))?;
    let incoming = installer::Incoming {
        region,
        source: payload.base(),
        source_step: PAGE_SIZE,
        first: page,
        stride,
        pages: served,
        writable: access == Access::Write,
        target: None,
    };
    installer::receive_and_install(&region.shared.installer, &incoming, |filled, wait| {
        payload.recv_more(home, filled, wait)
    })
    .map_err(|e| FaultError::Peer(home, e))?
    .map_err(|e| FaultError::Sys("UFFDIO_COPY", e))
}

/// Refuses a payload on a reply that announces none (no data, zeros, a grant without the page). It is
/// not read through: a length from a confused peer may be of bytes that never come, and a fault that
/// fails ends this rank, so the channel need not stay aligned on frames.
fn no_payload(home: Rank, payload_len: usize) -> Result<(), FaultError> {
    if payload_len == 0 {
        Ok(())
    } else {
        Err(FaultError::Protocol(
            home,
            "a reply carries bytes it does not announce",
        ))
    }
}

/// Refuses a grant that the home's manager could not have made: one that names this rank or the home as
/// a rank to fetch from or to invalidate (this rank would ask its own service loop, which defers the
/// request until this very fault ends: a wait for ever), or a read grant with copies to invalidate.
fn check_grant(grant: &Grant, me: Rank, home: Rank, access: Access) -> Result<(), FaultError> {
    let names = |r: Rank| grant.fetch_from == Some(r) || grant.invalidate.contains(r);
    if names(me) || names(home) || (access == Access::Read && grant.invalidate != CopySet::EMPTY) {
        return Err(FaultError::Protocol(
            home,
            "a grant the manager cannot make",
        ));
    }
    Ok(())
}

/// Reads a reply to a request for `count` pages that let the home install them directly (`direct.rs`):
/// `Installed` is `Done` with the home's copy, already in place (true), with no payload to install.
fn installed_as_done(
    reply: Reply,
    count: u32,
    direct: bool,
    home: Rank,
) -> Result<(Reply, bool), FaultError> {
    match reply {
        Reply::Installed { .. } if !direct => Err(FaultError::Protocol(
            home,
            "a direct install this rank did not allow",
        )),
        Reply::Installed { count: served } if served == 0 || served > count => {
            Err(FaultError::Protocol(
                home,
                "a direct install of no pages, or of more than asked for",
            ))
        }
        Reply::Installed { count } => Ok((
            Reply::Done {
                data: Data::Home,
                count,
            },
            true,
        )),
        other => Ok((other, false)),
    }
}

/// Counts `pages` received from their home, the first for the fault and the others read ahead; `direct`:
/// the home installed them itself.
fn count_fetched(c: &Counters, pages: u64, direct: bool) {
    Counters::add(&c.pages_fetched, pages);
    Counters::add(&c.pages_readahead, pages - 1);
    if direct {
        Counters::add(&c.pages_installed_by_sender, pages);
    }
}

fn new_state(access: Access) -> u32 {
    match access {
        Access::Read => READ_ONLY,
        Access::Write => READ_WRITE,
    }
}

fn remote_transaction(region: &RegionShared, page: u64, access: Access) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let home = region.home(page);
    let missing = region.state(page).load(Ordering::Acquire) & STATE_MASK == INVALID;
    let window = shared.readahead.load(Ordering::Relaxed);
    let (count, stride) = match access {
        Access::Read if window > 1 => claim_readahead(region, page, home),
        // A first write of a page not here: the following pages with the same home are asked for too, in
        // the sequential window, and the home hands over those nobody has touched, as zeros (write-ahead;
        // a page the home cannot take at once ends the run).
        Access::Write if missing && window > 1 => {
            let detector = region.write_ahead_for(home);
            (
                claim_following(
                    region,
                    detector,
                    page,
                    home,
                    window.min(ZERO_FILL_MAX as u32),
                ),
                detector.stride,
            )
        }
        _ => (1, 1),
    };
    let mut ch = shared.channels.claim();
    let direct = shared.direct_install.load(Ordering::Relaxed);
    let acquire = Request::Acquire {
        region: region.id,
        page,
        access,
        count,
        direct,
    };
    let c = &shared.counters;
    // Every page claimed ahead is released once the reply is in: installed or not (the one that faulted is
    // released by `resolve`). A page left BUSY would hang the next fault on it and every deferred request
    // for it. A grant releases them before its further round trips, as nothing will be installed there.
    let extras_held = std::cell::Cell::new(count > 1);
    let release_extras = || {
        if extras_held.replace(false) {
            for k in 1..u64::from(count) {
                release_busy(region, page + k * stride);
            }
        }
    };
    let outcome = (|| {
        let (reply, payload_len) = ask(&mut ch, c, home, &acquire)?;
        let peer = |e| FaultError::Peer(home, e);
        let (reply, installed) = installed_as_done(reply, count, direct, home)?;
        match reply {
            Reply::Done {
                data,
                count: served,
            } => {
                let served = u64::from(served.clamp(1, count));
                match data {
                    // The pages after the first were claimed for read-ahead, not held: only the first can
                    // already be here.
                    Data::None if served > 1 => {
                        return Err(FaultError::Protocol(
                            home,
                            "several pages said to be here already",
                        ))
                    }
                    Data::None => {
                        no_payload(home, payload_len)?;
                        upgrade_in_place(region, page, access)?
                    }
                    Data::Zero => {
                        no_payload(home, payload_len)?;
                        if served > 1 && access == Access::Write {
                            Counters::add(&c.pages_zero_filled, served - 1);
                        } else if served > 1 {
                            return Err(FaultError::Protocol(
                                home,
                                "several pages of zeros for a read fault",
                            ));
                        }
                        install_zeros(region, page, served, stride, access)?
                    }
                    Data::Home => {
                        let payload = if installed {
                            0
                        } else {
                            served as usize * PAGE_SIZE
                        };
                        if payload_len != payload {
                            return Err(FaultError::Protocol(
                                home,
                                "reply length does not match the pages it announces",
                            ));
                        }
                        if served > 1 && access == Access::Write {
                            return Err(FaultError::Protocol(
                                home,
                                "several pages of data for a write fault",
                            ));
                        }
                        // Install in pieces as they arrive: copying into pages overlaps with the rest of
                        // the transfer still in flight.
                        if !installed {
                            install_chunks(&mut ch, region, home, page, served, stride, access)?;
                        }
                        count_fetched(c, served, installed);
                    }
                }
                for k in 0..served {
                    set_state(region.state(page + k * stride), new_state(access));
                }
                Ok((served, false, data == Data::None))
            }
            Reply::Granted { grant } => {
                release_extras();
                check_grant(&grant, shared.me, home, access)?;
                mark_granted(region, page);
                let mut have = false;
                if grant.data_from_home {
                    if payload_len != PAGE_SIZE {
                        return Err(FaultError::Protocol(
                            home,
                            "grant without the page it announces",
                        ));
                    }
                    ch.recv_page(home).map_err(peer)?;
                    have = true;
                    Counters::add(&c.pages_fetched, 1);
                } else {
                    no_payload(home, payload_len)?;
                }
                run_grant(&mut ch, region, page, access, &grant, &mut have)?;
                end_grant(region, page, home)?;
                if have {
                    install(region, page, 1, &ch.page, access)?;
                } else {
                    upgrade_in_place(region, page, access)?;
                }
                set_state(region.state(page), new_state(access));
                Ok((1, true, false))
            }
            Reply::Refused { reason } => Err(refused(home, reason)),
            _ => Err(FaultError::Protocol(
                home,
                "unexpected reply to a fault request",
            )),
        }
    })();
    release_extras();
    let (served, granted, upgrade) = outcome?;
    // Where a sequential reader or first writer faults next: right after the pages it just received.
    let detector = match access {
        Access::Read => Some(region.readahead_for(home)),
        Access::Write if missing => Some(region.write_ahead_for(home)),
        Access::Write => None,
    };
    if let Some(d) = detector {
        d.last
            .store(page + (served - 1) * d.stride, Ordering::Relaxed);
    }
    if !granted && !upgrade {
        // The home released the page when it answered: a rank without a copy needs no Unlock, because a
        // leaf request that reaches it before the install is deferred until the install (`engine`).
        return Ok(());
    }
    let unlock = Request::Unlock {
        region: region.id,
        page,
        count: served as u32,
        access,
        granted,
    };
    match ch.send(&shared.counters, home, &unlock, &[]) {
        // The page is installed: a home that has left the job since it answered took its entry for the
        // page with it, and waits for no Unlock (under `FailurePolicy::Report` this rank lives on).
        Err(e) if closed_send(e) && left_the_job(shared, home) => Ok(()),
        sent => sent.map_err(|e| FaultError::Send(home, e)),
    }
}

/// Marks the faulting page GRANTED while its grant runs. A leaf request of another transaction that
/// reaches this rank meanwhile can only come from a transaction the home started after it ended this one
/// early, taking this rank for failed (a home with a shorter peer timeout, under `FailurePolicy::Report`):
/// the service loop answers a later writer's invalidation at once and revokes this transaction
/// (`engine::pages`, `defer_or_refuse`), where deferring it until the install would wait for ever if this
/// grant's own fetch waits, through its owner's fault, for the home lock that writer holds. A request the
/// loop deferred before the mark is looked at again.
pub(crate) fn mark_granted(region: &RegionShared, page: u64) {
    let prev = region.state(page).fetch_or(GRANTED, Ordering::AcqRel);
    if prev & DEFERRED != 0 {
        region.shared.wake_service();
    }
}

/// Ends the GRANTED mark of the faulting page before its install; an error if the transaction was revoked
/// meanwhile (the page must not be installed: the home's entry no longer lists this rank's copy). After
/// this only local work is left, so a leaf request that finds the page BUSY waits for it as usual.
pub(crate) fn end_grant(region: &RegionShared, page: u64, home: Rank) -> Result<(), FaultError> {
    let word = region.state(page);
    let mut s = word.load(Ordering::Acquire);
    loop {
        if s & REVOKED != 0 {
            return Err(FaultError::Protocol(
                home,
                "a later writer invalidated the page while this rank's grant ran: the home ended the transaction early, having taken this rank for failed",
            ));
        }
        match word.compare_exchange(s, s & !GRANTED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(now) => s = now,
        }
    }
}

/// A fault on a page homed here: decided under the page's manager lock, and run under it too.
///
/// A transaction that must ask other ranks takes a channel, and never waits for one with the manager lock
/// held: the channels may all be held by this rank's threads waiting in `lock`, `barrier` or a service
/// call, and by a fault waiting for another rank's page, whose home may be stuck the same way on a page
/// whose request waits for this one's lock (two ranks each waiting for the other, for ever). With no
/// channel free, the lock is let go while one is awaited, and the fault decided again.
fn local_transaction(region: &RegionShared, page: u64, access: Access) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let slot = region.slot(page);
    let mut channel = None;
    loop {
        lock_slot(&slot.lock);
        let result = (|| {
            let mut entry = slot.load();
            let gone = |r: Rank| shared.gone[r.index()].load(Ordering::Acquire);
            if let Some(owner) = entry.forget_gone(shared.me, gone) {
                return Err(FaultError::Lost(owner));
            }
            match swmr::decide(&mut entry, shared.me, shared.me, access) {
                Decision::Done { data, .. } => {
                    match data {
                        Data::Zero => {
                            return zero_fill_home(region, page, access, entry).map(|()| true)
                        }
                        Data::None => upgrade_in_place(region, page, access)?,
                        Data::Home => {
                            return Err(FaultError::Protocol(
                                shared.me,
                                "the home asked itself for its own copy",
                            ))
                        }
                    }
                    slot.store(&entry);
                }
                Decision::Grant(grant) => {
                    let Some(mut ch) = channel.take().or_else(|| shared.channels.try_claim())
                    else {
                        return Ok(false);
                    };
                    let mut have = false;
                    run_grant(&mut ch, region, page, access, &grant, &mut have)?;
                    if have {
                        install(region, page, 1, &ch.page, access)?;
                    } else {
                        upgrade_in_place(region, page, access)?;
                    }
                    swmr::complete(&mut entry, shared.me, access);
                    slot.store(&entry);
                }
            }
            set_state(region.state(page), new_state(access));
            Ok(true)
        })();
        if unlock_slot(&slot.lock) {
            shared.wake_service();
        }
        match result {
            Ok(false) => channel = Some(shared.channels.claim()),
            done => return done.map(|_| ()),
        }
    }
}

/// A first touch of `page` (homed here, never touched, its manager lock held, `entry` decided): installs
/// it with zeros, and with it the untouched pages after it whose manager locks are free at once (see
/// [`claim_zero_fill`]), each taken by this rank as the page itself is. Sets the state of every page and
/// stores `entry`; the caller unlocks `page`'s manager lock and releases its BUSY bit.
fn zero_fill_home(
    region: &RegionShared,
    page: u64,
    access: Access,
    entry: swmr::Entry,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    // Each following page is taken only with its manager lock free and nothing queued on it, and only
    // while it has never been touched; its lock stays held until it is installed, so no request for it
    // is served meanwhile (the service loop queues them, and is woken below).
    let count = claim_zero_fill(region, page, |p| lock_untouched(region, p));
    let stride = region.zero_fill.stride;
    let installed = install_zeros(region, page, count, stride, access);
    if installed.is_ok() {
        Counters::add(&shared.counters.pages_zero_filled, count - 1);
        region.slot(page).store(&entry);
        set_state(region.state(page), new_state(access));
    }
    for p in (1..count).map(|k| page + k * stride) {
        if installed.is_ok() {
            // The same decision as for `page`: this rank becomes the owner of zeros.
            give_untouched(region, p, shared.me, access);
            set_state(region.state(p), new_state(access));
        }
        if unlock_slot(&region.slot(p).lock) {
            shared.wake_service();
        }
        release_busy(region, p);
    }
    installed
}

/// `count` pages of zeros (at most [`ZERO_FILL_MAX`]).
fn zeros(count: u64) -> &'static [u8] {
    &ZERO_PAGES[..count as usize * PAGE_SIZE]
}

/// How long a fault waits, after a copy holder's connection ended, for this rank's service loop to see
/// the holder's service-loop connection end (it left the job) before taking it for a rank that lives on.
const LEAVING: Duration = Duration::from_millis(500);

/// A send that failed because the peer closed or reset the connection.
fn closed_send(e: Errno) -> bool {
    matches!(e, Errno::EPIPE | Errno::ECONNRESET)
}

/// Whether rank `r`, whose connection ended, has left the job (its memory with it): once this rank's
/// service loop has seen its service-loop connection end (`Shared::gone`), waited for up to `LEAVING`.
fn left_the_job(shared: &crate::dsm::Shared, r: Rank) -> bool {
    let known = || shared.gone[r.index()].load(Ordering::Acquire);
    let deadline = Instant::now() + LEAVING;
    while !known() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    known()
}

/// Runs a granted transaction: asks the owner for the page (downgrading or dropping its copy) and every
/// copy holder to drop theirs, all requests first and then all replies, so they proceed in parallel.
fn run_grant(
    ch: &mut Channel,
    region: &RegionShared,
    page: u64,
    access: Access,
    grant: &Grant,
    have: &mut bool,
) -> Result<(), FaultError> {
    let shared = &*region.shared;
    let c = &shared.counters;
    let id = region.id;
    if let Some(owner) = grant.fetch_from {
        let req = match access {
            Access::Read => Request::Fetch { region: id, page },
            Access::Write => Request::Invalidate {
                region: id,
                page,
                send_data: true,
            },
        };
        match ch.send(c, owner, &req, &[]) {
            Ok(()) => {}
            // The owner left the job after the home decided (which other ranks hold copies of the page,
            // only the home knows).
            Err(e) if closed_send(e) && left_the_job(shared, owner) => {
                return Err(FaultError::OwnerLeft(owner))
            }
            Err(e) => return Err(FaultError::Send(owner, e)),
        }
    }
    // A copy holder whose end of this channel's connection is closed (the connection was closed or reset
    // by it) is gone, and its copy with it, once this rank's service loop has seen its service-loop
    // connection end too (`Shared::gone`: a rank ends that one only by leaving the job). Nothing more is
    // asked of it. One taken for failed without that (unheard for the peer timeout, or a frame refused:
    // this rank shut its connections to it itself, so sends to it fail the same way) may live on with
    // its copy, as may one that only cut its channels' connections, having taken this rank for failed
    // (under `FailurePolicy::Report`): its copy cannot be dropped, and this fault ends with an error, as
    // for any other error, rather than leave a stale copy readable (the home's `forget_gone` prunes
    // on `gone` alone for the same reason).
    let left_the_job = |r: Rank| left_the_job(shared, r);
    let mut asked = CopySet::EMPTY;
    for r in grant.invalidate.iter() {
        let req = Request::Invalidate {
            region: id,
            page,
            send_data: false,
        };
        match ch.send(c, r, &req, &[]) {
            Ok(()) => asked.insert(r),
            Err(e) if closed_send(e) && left_the_job(r) => {}
            Err(e) => return Err(FaultError::Send(r, e)),
        }
    }
    if let Some(owner) = grant.fetch_from {
        let (reply, payload, page_buf) = match ch.recv(c, owner) {
            Ok(got) => got,
            Err(RecvError::Eof) if left_the_job(owner) => return Err(FaultError::OwnerLeft(owner)),
            Err(RecvError::Sys(e)) if closed_send(e) && left_the_job(owner) => {
                return Err(FaultError::OwnerLeft(owner))
            }
            Err(e) => return Err(FaultError::Peer(owner, e)),
        };
        match reply {
            Reply::Page if payload.len() >= PAGE_SIZE => {
                page_buf.copy_from_slice(&payload[..PAGE_SIZE]);
                *have = true;
                Counters::add(&c.pages_fetched, 1);
            }
            Reply::Refused { reason } => return Err(refused(owner, reason)),
            _ => {
                return Err(FaultError::Protocol(
                    owner,
                    "the owner did not send the page",
                ))
            }
        }
    }
    for r in asked.iter() {
        match ch.recv(c, r) {
            Ok((Reply::Ack, _, _)) => {}
            Err(RecvError::Eof) if left_the_job(r) => {}
            Err(RecvError::Sys(e)) if closed_send(e) && left_the_job(r) => {}
            Err(e) => return Err(FaultError::Peer(r, e)),
            Ok((Reply::Refused { reason }, _, _)) => return Err(refused(r, reason)),
            Ok(_) => {
                return Err(FaultError::Protocol(
                    r,
                    "a copy holder did not acknowledge the invalidation",
                ))
            }
        }
    }
    Ok(())
}
