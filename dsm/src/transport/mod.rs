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
    /// Connections from every rank's sets (this rank's own included) to this rank's service loop.
    pub incoming: Vec<Incoming>,
    /// A thread of the transport that runs this rank's service loop itself, in place of a thread of its
    /// own (`None`: the loop has its own thread). A transport whose thread carries the connections' bytes
    /// over another medium saves each request a wake-up and a hop that way.
    pub host: Option<Host>,
}

/// A connection from a rank to this rank's service loop.
#[derive(Debug)]
pub struct Incoming {
    /// The rank at the other end.
    pub from: Rank,
    /// Whether it is `from`'s service loop's own connection (the last set of the `connections` the transport was asked for). A rank
    /// never ends that one before it leaves the job, so its end, and its end alone, says that `from` has
    /// left and taken its copies of pages with it. The others end too when `from` only takes this rank
    /// for failed and cuts it off, living on with its copies. Exactly one connection from each rank is
    /// marked so (`DsmBuilder::build` checks).
    pub control: bool,
    /// The connection: requests from `from` come in on it, and replies go back on it.
    pub conn: Conn,
}

impl Incoming {
    /// The connection from `from`'s set `set` of `sets` (its channels' and its service loop's, last).
    pub fn new(from: Rank, set: usize, sets: usize, conn: Conn) -> Incoming {
        Incoming {
            from,
            control: set + 1 == sets,
            conn,
        }
    }
}

/// A transport's offer to run the service loop ([`Mesh::host`]). The loop then serves in-memory
/// connections only, and must never wait for the thread that runs it: the transport makes the service
/// loop's replies and its own messages never wait for room (`memory::End::never_wait_to_send` on the
/// `incoming` connections' ends and on the last set of `outgoing`, the loop's own), except on the
/// connections of this rank to itself, whose replies go to a thread of its own.
pub struct Host {
    /// The doorbell the host sleeps on: the service loop's connections, and this rank's threads that wake
    /// the loop, ring it.
    pub bell: std::sync::Arc<memory::Doorbell>,
    /// Hands the service loop to the host's thread, which calls [`ServiceLoop::poll`] until it says the
    /// rank has stopped, then drops it. An error: the thread is gone.
    pub start: Box<dyn FnOnce(ServiceLoop) -> Result<()> + Send>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("bell", &self.bell).finish()
    }
}

pub use crate::engine::{Polled, ServiceLoop};

/// How ranks reach each other.
pub trait Transport: Send + std::fmt::Debug {
    /// Connects this rank (`me` of `size`) to every rank with `connections` connections each (the rank's
    /// channels and one more, for the service loop), and accepts the same from every rank. Returns when the
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
pub(crate) const PROTOCOL_VERSION: u32 = 18;

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

/// Checks that every rank of `meshes` (a job's, of `sets` connection sets) marks one connection from each
/// rank as its service loop's own, and that it is the other end of that rank's last set.
#[cfg(test)]
pub(crate) fn assert_service_loop_connections_marked(meshes: &[Mesh], sets: usize) {
    for (me, mesh) in meshes.iter().enumerate() {
        for (from, theirs) in meshes.iter().enumerate() {
            let control: Vec<&Incoming> = mesh
                .incoming
                .iter()
                .filter(|i| i.control && i.from == Rank(from as u32))
                .collect();
            assert_eq!(control.len(), 1, "rank {me}, from rank {from}");
            let byte = [from as u8 + 1];
            let mut bufs = [std::io::IoSlice::new(&byte)];
            theirs.outgoing[sets - 1][me].write_all(&mut bufs).unwrap();
            let mut got = [0u8; 1];
            assert_eq!(control[0].conn.recv(&mut got, true).unwrap(), Some(1));
            assert_eq!(got, byte, "rank {me}, from rank {from}");
        }
    }
}
