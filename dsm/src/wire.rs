//! Messages between ranks and their framing. A frame is `[u32 LE length of the rest][u16 LE header
//! length][postcard header][payload]`; page payloads travel as raw bytes after the header so that they can
//! be written straight from the page (`sendmsg` with several slices) and read straight into a buffer that `UFFDIO_COPY` installs.
//!
//! Encoding writes into a caller's buffer and decoding borrows from one: neither allocates, which the fault
//! path (running in a SIGBUS handler) relies on. Every decode failure is an error, never a panic.

use crate::protocol::swmr::{Access, Data, Grant};
use crate::types::Rank;
use serde::{Deserialize, Serialize};

/// Requests: from a requester (fault path, locks, barriers) to a service loop.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Fault on `count` consecutive pages starting at `page` (count > 1: read-ahead for a read,
    /// write-ahead for a first write: of untouched pages, or of pages only the home holds when the home
    /// gives up its copy of `page`). `direct`: the home may install the pages it
    /// sends straight into the requester's memory (`Reply::Installed`) if the requester introduced itself.
    Acquire {
        region: u32,
        page: u64,
        access: Access,
        count: u32,
        direct: bool,
    },
    /// End of the transaction on `count` pages from `page`; `granted`: the requester ran a grant.
    Unlock {
        region: u32,
        page: u64,
        count: u32,
        access: Access,
        granted: bool,
    },
    /// End of a granted transaction on `page` that did not run: the owner the grant named left the job
    /// before the page came, and the grant dropped no copy (it asked no copy holder still in the job, and
    /// the home kept its own). The home's entry for the page stays as it was; the requester asks again (a
    /// home that has seen the owner leave answers from a copy that lives on, or says that the page's data
    /// left the job).
    Abandon {
        region: u32,
        page: u64,
        access: Access,
    },
    /// Owner: downgrade your copy to read-only and send it. `wait_for_own`: as for `Invalidate`.
    Fetch {
        region: u32,
        page: u64,
        wait_for_own: bool,
    },
    /// Drop your copy, sending it first when `send_data`. `wait_for_own` (a request for the owner's copy
    /// whose grant said `owner_failed`): served only once no fault of the receiver's own is resolving the
    /// page, for such a fault may be one the home ended early.
    Invalidate {
        region: u32,
        page: u64,
        send_data: bool,
        wait_for_own: bool,
    },
    /// Take lock `lock` (its home queues the request until it is free). The grant carries the write notices
    /// the last releaser passed on.
    LockAcquire { lock: u64 },
    /// Give lock `lock` back; the payload holds the write notices to pass to the next holder.
    LockRelease { lock: u64 },
    /// Arrival at barrier `epoch`; `tag` must be equal on every rank (it checks collective arguments). The
    /// payload holds, in its first `carried` bytes, diffs for pages homed at rank 0 (`rc::carry::Carry`),
    /// which rank 0 applies before it answers, then the arriving rank's own write notices since the last
    /// barrier.
    Barrier { epoch: u64, tag: u64, carried: u32 },
    /// Release consistency: send your copy of `count` pages homed here from `page` (zeros where never
    /// touched); the home may send fewer (read-ahead stops at a page it cannot take at once). `direct` as
    /// for `Acquire`.
    FetchPage {
        region: u32,
        page: u64,
        count: u32,
        direct: bool,
    },
    /// Release consistency: apply the `count` diffs in the payload, a batch (`protocol::diff`), to your
    /// copies of pages homed here, then ack once. `selective`: sent by a selective release, which makes no
    /// write notice (`marks::at_diff`).
    Diffs {
        region: u32,
        count: u32,
        selective: bool,
    },
    /// Release consistency, rank 0: apply the diffs in the payload (`rc::carry::Carry`) unless they are
    /// applied already, then ack once: a carry a barrier arrival is taking there too.
    Carried,
    /// Release consistency: perform `op` on the word of kind `kind` at byte `offset` of page `page`, homed
    /// here, in your copy (the master), and answer `Reply::Atomic` with the word as it was (`rc::atomic`).
    Atomic {
        region: u32,
        page: u64,
        offset: u16,
        kind: WordKind,
        op: AtomicOp,
    },
    /// A first-touch region, at the directory of pages `page..page + count` (one directory block): the
    /// homes of those pages, the sender taking every untouched one from `page` on, up to `ahead` of them
    /// and stopping at the first taken (`RegionShared::take_homes`). Answered with `Reply::Homes`.
    Homes {
        region: u32,
        page: u64,
        count: u32,
        ahead: u32,
    },
    /// Rank 0: where is the shared arena?
    ArenaBase,
    /// The sender runs on the same host as the receiver may: process `pid`, whose userfaultfd is its
    /// descriptor `uffd`, on the machine booted as `boot` in the PID namespace `pid_ns`. The receiver may
    /// take that descriptor and from then on install pages into the sender itself (`direct.rs`).
    Introduce {
        pid: u32,
        uffd: i32,
        boot: [u8; 16],
        pid_ns: u64,
    },
    /// Reply with `reply_bytes` bytes of payload: the transport's raw round trip, for benchmarks.
    Ping { reply_bytes: u32 },
    /// This connection closes normally: what follows is not a failure.
    Goodbye,
    /// The sender lost `rank` and is ending: the failure to report is `rank`'s, not the sender's. The
    /// payload says why (UTF-8, at most 512 bytes).
    PeerLost { rank: u32 },
    /// The sender's service loop is alive (sent on its control connection when nothing else has gone to
    /// the receiver for a while; no answer).
    Heartbeat,
    /// For the service registered as `id`; the payload is its request.
    Service { id: u8 },
    /// For the service registered as `id`: the payload withdraws a request sent before on this connection
    /// (a call that gave up waiting), and is never answered here, even when no service `id` is registered
    /// (the request it withdraws got the refusal, and a second would be read as the next call's answer).
    ServiceCancel { id: u8 },
    /// The sender's program is leaving the job: it has reached its final barrier and starts nothing more
    /// of its own (its service loop goes on answering until it says `Goodbye`). No answer.
    Finishing,
}

/// Replies, on the connection the request came on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// The home completed the transaction; with `Data::Home` the payload holds `count` pages.
    Done { data: Data, count: u32 },
    /// The home completed the transaction with its own copy of `count` pages (as `Done` with `Data::Home`)
    /// and has installed them into the requester's memory itself, read-only unless the fault was a write:
    /// no payload.
    Installed { count: u32 },
    /// The answer to `Introduce`: whether the receiver will install pages into the sender.
    Introduced { accepted: bool },
    /// The requester runs the transaction; the payload holds the page when `grant.data_from_home`.
    /// `owner_failed`: the home takes `grant.fetch_from` for failed, and so has ended any transaction of
    /// that rank's on the page early, as if it had run (`Engine::end_transactions_of`), while the rank may
    /// live on and still run it: the request for its copy says to wait for it (`wait_for_own`).
    Granted { grant: Grant, owner_failed: bool },
    /// A page follows.
    Page,
    /// Done.
    Ack,
    /// The lock is yours; the payload holds write notices.
    LockGranted,
    /// `rank` held the lock when it failed: the lock stays held (what it protects may be half written),
    /// and nobody waits for it.
    LockFailed { rank: u32 },
    /// Everyone arrived; the payload holds every rank's write notices.
    BarrierDone,
    /// `rank` arrived with a different tag than rank 0.
    BarrierMismatch { rank: u32 },
    /// `rank` failed while the barrier waited for it.
    BarrierFailed { rank: u32 },
    /// The arena reserved by rank 0.
    Arena { base: u64, size: u64 },
    /// The payload of a ping.
    Pong,
    /// A service's answer; the payload is its content.
    Service,
    /// The request could not be served.
    Refused { reason: RefusedReason },
    /// The answer to `Atomic`: the word before the operation (its bits, zero-extended).
    Atomic { old: u64 },
    /// The answer to `Homes`: the payload holds each page's home, 4 bytes little-endian, `u32::MAX` for
    /// a page no rank has taken.
    Homes,
}

/// The type of a shared word an atomic operation acts on: its width, and whether `Max` and `Min` compare
/// it as signed. A word travels as its bits, zero-extended to 64 (`AtomicOp`, `Reply::Atomic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WordKind {
    U32,
    I32,
    U64,
    I64,
}

impl WordKind {
    /// The word's width in bytes.
    pub(crate) fn width(self) -> usize {
        match self {
            WordKind::U32 | WordKind::I32 => 4,
            WordKind::U64 | WordKind::I64 => 8,
        }
    }

    /// The bits of a word of this kind: the low `width` bytes.
    fn mask(self) -> u64 {
        match self.width() {
            4 => u64::from(u32::MAX),
            _ => u64::MAX,
        }
    }

    /// The word as a number that orders as the word does: sign-extended for the signed kinds.
    fn ordered(self, bits: u64) -> i128 {
        match self {
            WordKind::U32 | WordKind::U64 => i128::from(bits),
            WordKind::I32 => i128::from(bits as u32 as i32),
            WordKind::I64 => i128::from(bits as i64),
        }
    }
}

/// A read-modify-write of one shared word, as a home performs it (`Request::Atomic`). Operands are the
/// word kind's bits, zero-extended to 64; bits above the kind's width are ignored, as the processor's
/// instruction on a narrower word ignores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum AtomicOp {
    /// Read the word; change nothing.
    Load,
    /// Add, wrapping around (a subtraction adds the operand's two's complement).
    Add(u64),
    /// Store the value.
    Swap(u64),
    /// Store `new` if the word is `current`.
    CompareExchange {
        current: u64,
        new: u64,
    },
    /// Bitwise and, or, exclusive or with the operand, and the negation of the and ("nand").
    And(u64),
    Or(u64),
    Xor(u64),
    Nand(u64),
    /// Store the greater, or the lesser, of the word and the operand, compared as the word's kind.
    Max(u64),
    Min(u64),
}

impl AtomicOp {
    /// The word after the operation, given the word before it, both the bits of a word of `kind`.
    pub(crate) fn apply(self, kind: WordKind, old: u64) -> u64 {
        let mask = kind.mask();
        let new = match self {
            AtomicOp::Load => old,
            AtomicOp::Add(delta) => old.wrapping_add(delta),
            AtomicOp::Swap(value) => value,
            AtomicOp::CompareExchange { current, new } if old == current & mask => new,
            AtomicOp::CompareExchange { .. } => old,
            AtomicOp::And(v) => old & v,
            AtomicOp::Or(v) => old | v,
            AtomicOp::Xor(v) => old ^ v,
            AtomicOp::Nand(v) => !(old & v),
            AtomicOp::Max(v) => std::cmp::max_by_key(old, v & mask, |&b| kind.ordered(b)),
            AtomicOp::Min(v) => std::cmp::min_by_key(old, v & mask, |&b| kind.ordered(b)),
        };
        new & mask
    }
}

/// Why a service loop refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RefusedReason {
    /// The region id is unknown here.
    UnknownRegion,
    /// The page is out of the region.
    PageOutOfRange,
    /// A leaf request reached a rank without a copy: the ranks disagree about page state.
    NoCopyHere,
    /// The arena is not reserved yet.
    NoArena,
    /// The request does not belong on this rank.
    WrongRank,
    /// No service is registered under the id on this rank.
    UnknownService,
    /// The page's only up-to-date copy left the job with this rank (it failed or left while it owned the
    /// page, and no other rank holds a copy).
    DataLeftWith(Rank),
}

impl RefusedReason {
    /// What a refusal of a page request means, and what to do, for the error of the fault it ends (a
    /// static string: the fault path may not allocate).
    pub(crate) fn what(self) -> &'static str {
        match self {
            RefusedReason::UnknownRegion => {
                "refused the page request: it has no such region (every rank must allocate the same regions, in the same order)"
            }
            RefusedReason::PageOutOfRange => {
                "refused the page request: the page lies outside the region as it knows it (every rank must allocate the same regions, of the same sizes)"
            }
            RefusedReason::NoCopyHere => {
                "refused the page request: it has no copy of the page, so the ranks disagree about the page's state (a protocol error: please report it)"
            }
            RefusedReason::NoArena => {
                "refused the page request: its shared arena is not reserved yet"
            }
            RefusedReason::WrongRank => {
                "refused the page request: the page is not homed there (ranks of different builds, or of different placements for one region)"
            }
            RefusedReason::UnknownService => {
                "refused the request: no service is registered under its id there"
            }
            RefusedReason::DataLeftWith(_) => {
                "refused the page request: the page's only up-to-date copy left the job with a rank that failed or left"
            }
        }
    }
}

/// Size of the fixed frame prefix.
pub(crate) const PREFIX: usize = 6;
/// Upper bound of an encoded header.
pub(crate) const MAX_HEADER: usize = 96;

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The length fields are inconsistent or over the limit.
    BadLength(usize),
    /// The header does not decode.
    BadHeader,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::BadLength(n) => write!(f, "frame length {n} is out of range"),
            FrameError::BadHeader => write!(f, "frame header does not decode"),
        }
    }
}

/// Encodes `msg` as a frame prefix + header into `out`, for a frame whose payload has `payload_len` bytes.
/// Returns the number of bytes of `out` used.
pub(crate) fn encode<T: Serialize>(
    msg: &T,
    payload_len: usize,
    out: &mut [u8; PREFIX + MAX_HEADER],
) -> usize {
    let (prefix, rest) = out.split_at_mut(PREFIX);
    // Our messages are small fixed-shape enums: a failure here is a bug in this file, not bad input.
    let header_len = postcard::to_slice(msg, rest).map(|s| s.len()).unwrap_or(0);
    let total = 2 + header_len + payload_len;
    prefix[..4].copy_from_slice(&(total as u32).to_le_bytes());
    prefix[4..6].copy_from_slice(&(header_len as u16).to_le_bytes());
    PREFIX + header_len
}

/// Reads the length of the frame body (everything after the first 4 bytes) from its first 4 bytes.
pub(crate) fn body_len(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if !(2..=max).contains(&n) {
        return Err(FrameError::BadLength(n));
    }
    Ok(n)
}

/// Splits a frame body (after the 4-byte length) into its decoded header and the payload.
pub(crate) fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<(T, &'a [u8]), FrameError> {
    if body.len() < 2 {
        return Err(FrameError::BadLength(body.len()));
    }
    let header_len = u16::from_le_bytes([body[0], body[1]]) as usize;
    if header_len > body.len() - 2 || header_len > MAX_HEADER {
        return Err(FrameError::BadLength(header_len));
    }
    let msg = postcard::from_bytes(&body[2..2 + header_len]).map_err(|_| FrameError::BadHeader)?;
    Ok((msg, &body[2 + header_len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::swmr::{CopySet, HomeAction};

    fn roundtrip<T: Serialize + for<'a> Deserialize<'a> + std::fmt::Debug>(
        msg: T,
        payload: &[u8],
    ) -> (T, Vec<u8>) {
        let mut buf = [0u8; PREFIX + MAX_HEADER];
        let n = encode(&msg, payload.len(), &mut buf);
        let mut frame = buf[..n].to_vec();
        frame.extend_from_slice(payload);
        let len = body_len(frame[..4].try_into().unwrap(), 1 << 20).unwrap();
        assert_eq!(len, frame.len() - 4);
        let (m, p) = decode::<T>(&frame[4..]).unwrap();
        (m, p.to_vec())
    }

    #[test]
    fn largest_header_fits() {
        let mut invalidate = CopySet::EMPTY;
        for r in 0..256 {
            invalidate.insert(crate::types::Rank(r));
        }
        let grant = Grant {
            home_action: HomeAction::Invalidate,
            data_from_home: true,
            fetch_from: Some(crate::types::Rank(u32::MAX)),
            invalidate,
        };
        let mut buf = [0u8; PREFIX + MAX_HEADER];
        let granted = Reply::Granted {
            grant,
            owner_failed: true,
        };
        let n = encode(&granted, 4096, &mut buf);
        assert!(
            n > PREFIX + 32,
            "header of a full grant must be encoded, got {n} bytes"
        );
        let (m, p) = roundtrip(granted, &[7u8; 4096]);
        assert!(matches!(m, Reply::Granted { grant: g, owner_failed: true } if g == grant));
        assert_eq!(p, vec![7u8; 4096]);
    }

    #[test]
    fn request_round_trips_with_payload() {
        let (m, p) = roundtrip(
            Request::Acquire {
                region: 3,
                page: 1 << 40,
                access: Access::Write,
                count: 9,
                direct: true,
            },
            b"xyz",
        );
        assert!(
            matches!(m, Request::Acquire { region: 3, page: p, access: Access::Write, count: 9, direct: true } if p == 1 << 40)
        );
        assert_eq!(p, b"xyz");
    }

    #[test]
    fn an_introduction_fits_a_header() {
        let intro = Request::Introduce {
            pid: u32::MAX,
            uffd: i32::MAX,
            boot: [0xff; 16],
            pid_ns: u64::MAX,
        };
        let (m, p) = roundtrip(intro, &[]);
        assert!(
            matches!(m, Request::Introduce { pid: u32::MAX, uffd: i32::MAX, boot, pid_ns: u64::MAX } if boot == [0xff; 16])
        );
        assert!(p.is_empty());
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(
            body_len(0u32.to_le_bytes(), 100),
            Err(FrameError::BadLength(0))
        );
        assert_eq!(
            body_len(1000u32.to_le_bytes(), 100),
            Err(FrameError::BadLength(1000))
        );
        assert!(
            decode::<Request>(&[5, 0, 1]).is_err(),
            "header longer than the body"
        );
        assert!(
            decode::<Request>(&[2, 0, 0xff, 0xff]).is_err(),
            "unknown variant"
        );
        assert!(decode::<Request>(&[0]).is_err());
        // Random bytes never panic.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20000 {
            let mut b = [0u8; 12];
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = x as u8;
            }
            let _ = decode::<Request>(&b);
            let _ = decode::<Reply>(&b);
        }
    }
}
