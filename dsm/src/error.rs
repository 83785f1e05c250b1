//! The one error type of the `dsm` crate. Messages name the rank, the address or page, and what to do.

use crate::types::{GlobalAddr, Rank};
use nix::errno::Errno;

/// Everything that can go wrong in the shared memory layer.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// userfaultfd(2) refused.
    #[error(
        "userfaultfd is not permitted ({0}): run as root or set vm.unprivileged_userfaultfd=1 (in a container, its seccomp profile must also allow the userfaultfd system call)"
    )]
    UffdNotPermitted(Errno),
    /// userfaultfd exists but lacks a feature this crate needs.
    #[error("userfaultfd on this kernel lacks {what}: dsm needs Linux 5.11 or newer with userfaultfd write-protect support")]
    UffdUnsupported {
        /// The missing feature.
        what: &'static str,
    },
    /// A system call failed.
    #[error("{call} failed: {errno}")]
    Sys {
        /// The call and its arguments, as far as they explain the failure.
        call: String,
        /// The error number.
        errno: Errno,
    },
    /// The shared arena could not be placed at the address rank 0 chose.
    #[error("{rank} cannot map the shared arena at {addr} ({size} bytes): {errno}; set DSM_ARENA_BASE to a free address range, or a smaller DSM_ARENA_SIZE")]
    ArenaUnavailable {
        /// The rank that failed.
        rank: Rank,
        /// The base rank 0 chose.
        addr: GlobalAddr,
        /// The arena size.
        size: usize,
        /// Why mmap refused.
        errno: Errno,
    },
    /// No free range of the arena's size exists anywhere in rank 0's address space.
    #[error("{rank} cannot reserve a shared arena of {size} bytes anywhere in its address space: {errno}; set a smaller DSM_ARENA_SIZE (the default, 1T, holds regions totalling 1 TiB)")]
    ArenaTooLarge {
        /// The rank that failed (rank 0, which places the arena).
        rank: Rank,
        /// The arena size asked for.
        size: usize,
        /// Why mmap refused.
        errno: Errno,
    },
    /// A collective allocation does not fit in the arena.
    #[error("allocating {requested} bytes exceeds the shared arena ({available} bytes left of {size}); set DSM_ARENA_SIZE larger")]
    ArenaExhausted {
        /// Bytes asked for (rounded to pages).
        requested: usize,
        /// Bytes left.
        available: usize,
        /// The arena's size.
        size: usize,
    },
    /// Ranks called a collective operation with different arguments or in a different order.
    #[error("collective mismatch: {rank} called {what} differently from rank 0 (every rank must allocate the same regions in the same order)")]
    CollectiveMismatch {
        /// The first rank that disagreed.
        rank: Rank,
        /// The operation.
        what: &'static str,
    },
    /// An argument outside what the call takes (a byte range beyond a region's end, say).
    #[error("{0}")]
    InvalidArgument(String),
    /// A peer died or its connection broke.
    #[error("{rank} failed: {reason}")]
    PeerFailed {
        /// The rank that is gone.
        rank: Rank,
        /// What was observed.
        reason: String,
    },
    /// A peer sent something that does not parse or does not fit the protocol.
    #[error("protocol error from {rank}: {what}")]
    Protocol {
        /// The peer.
        rank: Rank,
        /// What was wrong.
        what: String,
    },
    /// A service call reached a rank where no service has the id.
    #[error("no service {id} is registered on {rank}: every rank registers its services (for example by creating its TupleSpace) before any rank calls them")]
    NoSuchService {
        /// The rank called.
        rank: Rank,
        /// The service id.
        id: u8,
    },
    /// A connection's handshake was refused, or did not prove that its other end knows the job's token.
    #[error("connection refused: {0}")]
    BadHandshake(String),
    /// A call with a deadline could not even be sent before the deadline passed.
    #[error("timed out: {what}")]
    TimedOut {
        /// What waited.
        what: String,
    },
    /// A configuration value is out of range or malformed.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A release could not announce its writes ([`crate::protocol::release::IntervalsExhausted`]).
    #[error(transparent)]
    IntervalsExhausted(#[from] crate::protocol::release::IntervalsExhausted),
    /// The rank left the job from a thread that was panicking: it skipped the final barrier and said no
    /// goodbye, so the other ranks see it fail.
    #[error("left the job while panicking: the final barrier was skipped and the other ranks see this rank fail")]
    LeftWhilePanicking,
    /// The rank was abandoned ([`crate::Dsm::abandon`]): it skipped the final barrier and said no goodbye,
    /// so the other ranks see it fail.
    #[error("left the job unfinished (without Runtime::finish, as when main returns an error): the other ranks see this rank fail")]
    Abandoned,
    /// Regions need each rank in its own process.
    #[error("shared regions need one rank per process; the in-process transport supports messaging, locks and barriers only")]
    RegionsNeedProcesses,
    /// An I/O error with context.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error (in the message, so not also given as the error's `source`: error
        /// reports would say it twice).
        error: std::io::Error,
    },
}

/// Results of this crate.
pub type Result<T, E = DsmError> = std::result::Result<T, E>;

impl DsmError {
    pub(crate) fn sys(call: impl Into<String>, errno: Errno) -> DsmError {
        DsmError::Sys {
            call: call.into(),
            errno,
        }
    }

    pub(crate) fn io(context: impl Into<String>, error: std::io::Error) -> DsmError {
        DsmError::Io {
            context: context.into(),
            error,
        }
    }
}

/// The message of a caught panic (its payload, as `std::panic::catch_unwind` returns it), for reporting a
/// panic of a rank, a task or an `eval` that was caught so that the job could end cleanly.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
