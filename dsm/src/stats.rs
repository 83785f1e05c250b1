//! Per-rank counters and the fault-latency histogram. Counters are relaxed atomics bumped on the fault path
//! (no allocation, no lock: safe inside the SIGBUS handler); `Stats` is the snapshot users read.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Histogram buckets: bucket `i` counts latencies in `[2^i, 2^(i+1))` microseconds; bucket 0 also holds 0 us.
pub const LATENCY_BUCKETS: usize = 24;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) read_faults: AtomicU64,
    pub(crate) write_faults: AtomicU64,
    pub(crate) upgrade_faults: AtomicU64,
    pub(crate) faults_coalesced: AtomicU64,
    pub(crate) pages_fetched: AtomicU64,
    pub(crate) pages_sent: AtomicU64,
    pub(crate) pages_readahead: AtomicU64,
    pub(crate) pages_zero_filled: AtomicU64,
    pub(crate) replies_offered_to_helper: AtomicU64,
    pub(crate) pages_helper_installed: AtomicU64,
    pub(crate) pages_installed_by_sender: AtomicU64,
    pub(crate) pages_installed_into_peers: AtomicU64,
    pub(crate) peers_installing_here: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) messages_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) messages_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) lock_acquires: AtomicU64,
    pub(crate) lock_wait_ns: AtomicU64,
    pub(crate) barriers: AtomicU64,
    pub(crate) barrier_wait_ns: AtomicU64,
    pub(crate) fault_ns: AtomicU64,
    pub(crate) latency: [AtomicU64; LATENCY_BUCKETS],
    pub(crate) twins: AtomicU64,
    pub(crate) twins_ahead: AtomicU64,
    pub(crate) diffs: AtomicU64,
    pub(crate) diff_bytes: AtomicU64,
    pub(crate) diffs_applied: AtomicU64,
    pub(crate) diffs_carried: AtomicU64,
    pub(crate) write_notices: AtomicU64,
    pub(crate) acquire_invalidations: AtomicU64,
    pub(crate) pages_updated: AtomicU64,
    pub(crate) selective_releases: AtomicU64,
    pub(crate) selective_acquires: AtomicU64,
    pub(crate) atomics: AtomicU64,
    pub(crate) atomics_served: AtomicU64,
    pub(crate) full_invalidations: AtomicU64,
    pub(crate) notices_forgotten: AtomicU64,
    pub(crate) locks_let_go: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub(crate) fn record_fault_latency(&self, nanos: u64) {
        self.fault_ns.fetch_add(nanos, Relaxed);
        let us = nanos / 1000;
        let bucket = (64 - us.leading_zeros() as usize)
            .saturating_sub(1)
            .min(LATENCY_BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Relaxed);
        Stats {
            read_faults: g(&self.read_faults),
            write_faults: g(&self.write_faults),
            upgrade_faults: g(&self.upgrade_faults),
            faults_coalesced: g(&self.faults_coalesced),
            pages_fetched: g(&self.pages_fetched),
            pages_sent: g(&self.pages_sent),
            pages_readahead: g(&self.pages_readahead),
            pages_zero_filled: g(&self.pages_zero_filled),
            replies_offered_to_helper: g(&self.replies_offered_to_helper),
            pages_helper_installed: g(&self.pages_helper_installed),
            pages_installed_by_sender: g(&self.pages_installed_by_sender),
            pages_installed_into_peers: g(&self.pages_installed_into_peers),
            peers_installing_here: g(&self.peers_installing_here),
            invalidations: g(&self.invalidations),
            messages_sent: g(&self.messages_sent),
            bytes_sent: g(&self.bytes_sent),
            messages_received: g(&self.messages_received),
            bytes_received: g(&self.bytes_received),
            lock_acquires: g(&self.lock_acquires),
            lock_wait_ns: g(&self.lock_wait_ns),
            barriers: g(&self.barriers),
            barrier_wait_ns: g(&self.barrier_wait_ns),
            fault_ns: g(&self.fault_ns),
            latency_us_log2: std::array::from_fn(|i| g(&self.latency[i])),
            twins: g(&self.twins),
            twins_ahead: g(&self.twins_ahead),
            diffs: g(&self.diffs),
            diff_bytes: g(&self.diff_bytes),
            diffs_applied: g(&self.diffs_applied),
            diffs_carried: g(&self.diffs_carried),
            write_notices: g(&self.write_notices),
            acquire_invalidations: g(&self.acquire_invalidations),
            pages_updated: g(&self.pages_updated),
            selective_releases: g(&self.selective_releases),
            selective_acquires: g(&self.selective_acquires),
            atomics: g(&self.atomics),
            atomics_served: g(&self.atomics_served),
            full_invalidations: g(&self.full_invalidations),
            notices_forgotten: g(&self.notices_forgotten),
            locks_let_go: g(&self.locks_let_go),
        }
    }
}

/// A snapshot of one rank's counters (`Dsm::stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Faults on a page with no copy here, by a load.
    pub read_faults: u64,
    /// Faults on a page with no copy here, by a store.
    pub write_faults: u64,
    /// Stores to a read-only copy (write-protect faults).
    pub upgrade_faults: u64,
    /// Faults that another thread's transaction resolved while they waited (a fault of another thread on
    /// the same page, or read-ahead that covered it): not counted above, and no fetch of their own.
    pub faults_coalesced: u64,
    /// Pages received from other ranks (including read-ahead).
    pub pages_fetched: u64,
    /// Pages sent to other ranks.
    pub pages_sent: u64,
    /// Pages fetched ahead of a fault: by sequential read-ahead, or under sequential consistency by a
    /// first write that took the following pages their home alone held, with their data (write-ahead).
    pub pages_readahead: u64,
    /// Untouched pages filled with zeros ahead of a sequential first touch: homed here, or handed over by
    /// their home with the page a first write faulted on (write-ahead).
    pub pages_zero_filled: u64,
    /// Long runs of pages put on the install helper's board (it joins them when it wakes in time): replies
    /// this rank receives over a connection, and direct installs it makes into other ranks.
    pub replies_offered_to_helper: u64,
    /// Pages of those runs that the install helper installed (the thread that offered them installed the
    /// rest: a faulting thread, or the service loop).
    pub pages_helper_installed: u64,
    /// Fetched pages that the rank sending them installed into this rank's memory itself (direct install,
    /// on one host): no bytes on the connection, no copy by this rank.
    pub pages_installed_by_sender: u64,
    /// Pages this rank installed into other ranks' memory itself (the other side of the above).
    pub pages_installed_into_peers: u64,
    /// Ranks that took this rank's userfaultfd when it introduced itself, and so may install pages here
    /// (one that fails to goes back to sending the bytes, without this count changing).
    pub peers_installing_here: u64,
    /// Copies dropped here at another rank's request.
    pub invalidations: u64,
    /// Frames sent.
    pub messages_sent: u64,
    /// Bytes sent, frame headers included.
    pub bytes_sent: u64,
    /// Frames received.
    pub messages_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Distributed lock acquisitions.
    pub lock_acquires: u64,
    /// Time spent waiting for locks, in nanoseconds.
    pub lock_wait_ns: u64,
    /// Barriers passed.
    pub barriers: u64,
    /// Time spent in barriers, in nanoseconds.
    pub barrier_wait_ns: u64,
    /// Total time spent resolving faults, in nanoseconds.
    pub fault_ns: u64,
    /// Fault latency histogram: entry `i` counts faults that took `[2^i, 2^(i+1))` microseconds.
    pub latency_us_log2: [u64; LATENCY_BUCKETS],
    /// Release consistency: twins made at first writes (at a home, of pages other ranks hold: see
    /// [`Stats::pages_updated`]).
    pub twins: u64,
    /// Release consistency: of those, twins made ahead of a write, beside a page a write faulted on
    /// (pages this rank wrote in an earlier interval; see [`DsmBuilder::twin_memory`](crate::DsmBuilder::twin_memory)).
    pub twins_ahead: u64,
    /// Release consistency: diffs sent to homes.
    pub diffs: u64,
    /// Release consistency: bytes of those diffs.
    pub diff_bytes: u64,
    /// Release consistency: diffs applied here as a home.
    pub diffs_applied: u64,
    /// Release consistency: of the diffs sent, those for pages homed at rank 0 that a barrier's release
    /// gave its arrival to carry instead of sending them before it (a round trip fewer a barrier). A
    /// release or acquire of another thread of the rank delivers them itself when it comes first (counted
    /// here all the same).
    pub diffs_carried: u64,
    /// Release consistency: intervals closed with a write notice.
    pub write_notices: u64,
    /// Release consistency: pages dropped at acquires because others wrote them (or, at selective
    /// acquires, because they were in the range).
    pub acquire_invalidations: u64,
    /// Release consistency: pages brought up to date in place at barriers by other ranks' small diffs,
    /// which travel with the barrier, instead of dropped (and fetched whole when next read).
    pub pages_updated: u64,
    /// Release consistency: selective releases of a range ([`crate::Region::release_range`]).
    pub selective_releases: u64,
    /// Release consistency: selective acquires of a range ([`crate::Region::acquire_range`]).
    pub selective_acquires: u64,
    /// Release consistency: atomic operations on shared words ([`crate::GlobalVec::fetch_add`] and the
    /// others) this rank's threads asked of a service loop: another rank's, or this rank's own for a word
    /// homed here whose page was not writable here.
    pub atomics: u64,
    /// Release consistency: atomic operations this rank performed as the home of their words: its service
    /// loop's for any rank, and its threads' own in place.
    pub atomics_served: u64,
    /// Release consistency: acquires that dropped every cached page not homed here, because notices this
    /// rank had not seen were forgotten before they reached it (see `DSM_NOTICE_MEMORY`).
    pub full_invalidations: u64,
    /// Release consistency: write notices forgotten here (by this rank, or by the locks it is the home of)
    /// to keep their memory under the bound between barriers.
    pub notices_forgotten: u64,
    /// Idle lock servers this rank let go of, as the home of more locks than it keeps (their state
    /// folded into a horizon: see `Engine::let_idle_locks_go`).
    pub locks_let_go: u64,
}

impl Stats {
    /// All faults resolved by this rank.
    pub fn faults(&self) -> u64 {
        self.read_faults + self.write_faults + self.upgrade_faults
    }

    /// An upper bound of the fault latency quantile `q` (0..=1) in microseconds, from the histogram.
    pub fn fault_latency_quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency_us_log2.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_us_log2.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(1u64 << (i + 1));
            }
        }
        None
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mean_us = if self.faults() > 0 {
            self.fault_ns as f64 / self.faults() as f64 / 1000.0
        } else {
            0.0
        };
        writeln!(
            f,
            "faults: {} read, {} write, {} upgrade ({} more coalesced); mean {:.1} us, p50 < {} us, p99 < {} us",
            self.read_faults,
            self.write_faults,
            self.upgrade_faults,
            self.faults_coalesced,
            mean_us,
            self.fault_latency_quantile_us(0.5).unwrap_or(0),
            self.fault_latency_quantile_us(0.99).unwrap_or(0)
        )?;
        writeln!(
            f,
            "pages: {} fetched ({} read-ahead; {} installed by their sender), {} sent ({} installed into the receiver), {} invalidated here, {} zero-filled ahead",
            self.pages_fetched,
            self.pages_readahead,
            self.pages_installed_by_sender,
            self.pages_sent,
            self.pages_installed_into_peers,
            self.invalidations,
            self.pages_zero_filled
        )?;
        writeln!(
            f,
            "installs: {} other rank(s) may install pages here directly; {} long runs offered to the install helper, {} pages installed by it",
            self.peers_installing_here,
            self.replies_offered_to_helper,
            self.pages_helper_installed
        )?;
        writeln!(
            f,
            "wire: {} messages / {} bytes sent, {} messages / {} bytes received",
            self.messages_sent, self.bytes_sent, self.messages_received, self.bytes_received
        )?;
        write!(
            f,
            "sync: {} lock acquires ({:.3} ms waiting), {} barriers ({:.3} ms waiting)",
            self.lock_acquires,
            self.lock_wait_ns as f64 / 1e6,
            self.barriers,
            self.barrier_wait_ns as f64 / 1e6
        )?;
        if self.locks_let_go > 0 {
            write!(f, "; {} idle lock servers let go of", self.locks_let_go)?;
        }
        if self.twins + self.diffs_applied + self.write_notices + self.atomics + self.atomics_served
            > 0
        {
            write!(
                f,
                "\nrelease consistency: {} twins ({} ahead), {} diffs sent ({} bytes, {} with barrier arrivals), {} applied here, {} write notices, {} pages dropped at acquires, {} brought up to date at barriers",
                self.twins, self.twins_ahead, self.diffs, self.diff_bytes, self.diffs_carried, self.diffs_applied, self.write_notices, self.acquire_invalidations, self.pages_updated
            )?;
            if self.selective_releases + self.selective_acquires > 0 {
                write!(
                    f,
                    "; {} selective releases, {} selective acquires",
                    self.selective_releases, self.selective_acquires
                )?;
            }
            if self.atomics + self.atomics_served > 0 {
                write!(
                    f,
                    "; {} atomic operations asked of homes, {} performed here as home",
                    self.atomics, self.atomics_served
                )?;
            }
            if self.notices_forgotten + self.full_invalidations > 0 {
                write!(
                    f,
                    "; {} notices forgotten to bound their memory, {} acquires that dropped every cached page",
                    self.notices_forgotten, self.full_invalidations
                )?;
            }
        }
        Ok(())
    }
}
