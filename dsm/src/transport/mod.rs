//! Transports establish the connections between ranks; after that every backend is the same: framed byte
//! streams (`wire` frames) on sockets read and written with plain system calls, or on in-memory connections
//! (`memory`) whose other end a thread of the transport serves, so that the fault path can use them from a
//! SIGBUS handler.
//!
//! A rank opens a set of connections to every rank, itself included, per channel and one more. A channel is
//! a set of one connection per rank owned by one requester at a time (a faulting thread, a lock call);
//! replies come back on the connection the request went out on, straight to the thread that waits for
//! them. The last set is the service loop's own, for messages that expect no answer (heartbeats, failure
//! reports). The other ends of all the connections are served by each rank's service loop (`engine`).

mod conn;
pub mod local;
pub mod memory;
pub mod tcp;

pub use conn::Conn;
pub(crate) use conn::Readiness;
#[cfg(test)]
pub(crate) use conn::IOV_MAX;

use crate::error::Result;
use crate::types::Rank;

/// The established connections of one rank.
#[derive(Debug)]
pub struct Mesh {
    /// `outgoing[set][rank]`: requests from this rank to `rank`'s service loop; a set per channel, and the
    /// service loop's own last.
    pub outgoing: Vec<Vec<Conn>>,
    /// Connections from other ranks' channels to this rank's service loop, with the rank at the other end.
    pub incoming: Vec<(Rank, Conn)>,
}

/// How ranks reach each other.
pub trait Transport: Send + std::fmt::Debug {
    /// Connects this rank (`me` of `size`) to every rank with `connections` connections each (the rank's
    /// channels and one more, [`connections`]), and accepts the same from every rank. Returns when the
    /// whole mesh of this rank is up.
    fn establish(self: Box<Self>, me: Rank, size: usize, connections: usize) -> Result<Mesh>;

    /// A short name for messages and statistics.
    fn name(&self) -> &'static str;

    /// Whether the ranks are threads of one process (and so cannot map regions at one address each).
    fn ranks_share_a_process(&self) -> bool {
        false
    }

    /// Whether a thread of the transport itself polls for the replies this rank waits for (a bridge that
    /// carries the connections' bytes over another medium). A requester polling for its reply then yields
    /// the CPU between looks ([`DsmBuilder::spin`](crate::DsmBuilder::spin)): spinning, it would take the
    /// CPU that thread needs.
    fn polls_for_replies(&self) -> bool {
        false
    }
}

/// Bumped whenever the wire format or the protocol changes: ranks of different builds refuse each other.
pub(crate) const PROTOCOL_VERSION: u32 = 8;

/// The connections a rank of `channels` channels opens to every rank: one per channel, and one more for
/// its service loop's own messages (heartbeats, failure reports, `Goodbye`), which it can send whatever
/// the channels are waiting for. The service loop takes the last.
pub(crate) fn connections(channels: usize) -> usize {
    channels + 1
}

/// The channels of a rank that opens `connections` connections to every rank (the other way round from
/// [`connections`], for messages that speak in the user's terms).
pub(crate) fn channels_in(connections: usize) -> usize {
    connections.saturating_sub(1)
}
