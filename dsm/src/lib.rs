//! dsm: distributed shared memory for Rust. Processes on one machine or across a cluster map one shared
//! address space; a userfaultfd page-fault handler fetches and invalidates pages so that every rank sees
//! every other's writes under sequential consistency (single writer / multiple readers) or, for regions
//! allocated with [`Consistency::Release`], release consistency (multiple writers, diffs merged at locks and
//! barriers).
//!
//! Parts: `region` (mapping, allocation, typed views), `uffd` (fault delivery and the raw operations that
//! resolve faults), `fault` (resolving a fault in the faulting thread), `installer` (a helper thread that
//! installs long read-ahead replies), `direct` (installing pages straight into another rank's memory on the
//! same host), `rc` (release consistency's twins, diffs and write notices at this rank), `protocol`
//! (coherence as pure state machines), `engine` (the service loop that answers other ranks), `service`
//! (services programs register on it), `channel` and `transport` (connections and frames), `wire`
//! (messages), `keepawake`, `stats`. Programs normally join a job through `dsm-runtime`.

pub mod protocol;
pub mod transport;
pub mod types;

mod channel;
mod direct;
mod dsm;
mod engine;
mod error;
mod fault;
mod installer;
mod keepawake;
mod rc;
mod region;
mod service;
mod stats;
mod uffd;
mod wire;

pub use crate::dsm::{
    Dsm, DsmBuilder, FailurePolicy, LockGuard, DEFAULT_ARENA_BASE, DEFAULT_PEER_TIMEOUT,
    DEFAULT_TWIN_MEMORY, MAX_SERVICE_REQUEST,
};
pub use crate::engine::{ServicePriority, MAX_READAHEAD, MIN_PEER_TIMEOUT};
pub use crate::error::{panic_message, DsmError, Result};
pub use crate::protocol::release::{DEFAULT_NOTICE_MEMORY, MIN_NOTICE_MEMORY};
pub use crate::region::{AtomicElement, Consistency, GlobalVec, Placement, Region};
pub use crate::service::{Responder, Service, ServiceId, MAX_SERVICES};
pub use crate::stats::{Stats, LATENCY_BUCKETS};
pub use crate::types::{GlobalAddr, PageId, Rank, PAGE_SIZE};

/// Exit status of a rank that ends because another rank failed (so launchers can report the root cause),
/// under [`FailurePolicy::Exit`]: while the job runs, and while it is set up (`DsmBuilder::build`, when a
/// rank it connects to has stopped setting up the job).
pub const EXIT_PEER_FAILED: i32 = 75;
/// Exit status of a rank that hit an error it cannot return to the program (for example a fault that could
/// not be resolved: the memory access has no way to fail).
pub const EXIT_INTERNAL: i32 = 70;
