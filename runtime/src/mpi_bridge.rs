//! The MPI transport (`DSM_TRANSPORT=mpi` under `mpirun`): the job's connections are in-memory
//! connections (`dsm::transport::memory`), and a bridge thread carries their bytes between ranks as MPI
//! messages. The fault path reads and writes them as it would sockets, without a system call (MPI is not
//! async-signal-safe and offers nothing to wait on), and only the bridge thread calls MPI.
//!
//! The bridge thread also runs the rank's service loop (`Mesh::host`): a request that arrives is served
//! on the thread that received it, and its reply goes out with the bridge's next look, instead of waking
//! a service-loop thread and waiting for the bridge to look again (docs/BENCHMARKS.md, eighteenth
//! session: the remote fault fell from about 51 to about 35 us). So that the loop never waits for the
//! thread it runs on, what it writes (its replies, and its own messages to the other ranks) never waits
//! for room in a connection (`End::never_wait_to_send`).
//!
//! Each connection of a channel to a peer has its own MPI tag (channel x direction), so bytes arrive in
//! order per connection. Sends are buffered (`MPI_Bsend` into an attached buffer), so two bridges sending
//! to each other never wait for each other, and flow-controlled so that the buffer never overflows: each
//! connection may have at most its share of the buffer in flight (its window), and the receiving bridge
//! gives credit back with an acknowledgement once it has passed the bytes on to their connection, so a rank
//! that does not read (or many ranks sending to one) slows the senders down instead of failing
//! `MPI_Bsend`. A connection's end is sent as an empty message. The bridge
//! looks at MPI (a probe per tag, on its own communicator) and at its connections (atomic loads) while
//! there is traffic, goes on polling briefly when it stops (yielding the
//! core between looks to any other thread that can run, such as the rank's computing thread or its service
//! loop: with a pure spin, a busy rank answered a fault in about a millisecond, with yields in about 0.25
//! ms), then sleeps on a doorbell that its connections ring when bytes arrive, for growing intervals (MPI
//! cannot wake it), which bounds a waiting rank's CPU use at the cost of latency for the first message
//! from another rank after a quiet spell.

use dsm::transport::memory::{self, Doorbell, Shut};
use dsm::transport::{Conn, Host, Incoming, Mesh, Polled, ServiceLoop, Transport};
use dsm::{DsmError, Rank};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};
use nix::errno::Errno;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most bytes one MPI message carries.
const CHUNK: usize = 64 << 10;
/// The room of each direction of a connection between the job and the bridge: two messages' worth, so
/// that the bridge can take one while the other is being written.
const CONNECTION_ROOM: usize = 2 * CHUNK;
/// The buffer attached for buffered sends, unless `DSM_MPI_SEND_BUFFER` says otherwise.
pub(crate) const SEND_BUFFER: usize = 64 << 20;
/// What one message is counted as taking of the send buffer beyond its bytes: at least the MPI library's
/// `MPI_BSEND_OVERHEAD` and alignment (MPICH 4.0's overhead is 96 bytes, Open MPI's of the same order).
const MESSAGE_COST: usize = 512;
/// An acknowledgement: the tag the acknowledged bytes came with (4 bytes) and their cost (8 bytes).
const ACK_LEN: usize = 12;
/// Acknowledgements one connection can have in flight at once (one per quarter of a window, and one more).
const ACKS_IN_FLIGHT: usize = 5;
/// The smallest piece a connection may send at once: below this the buffer is too small for the job.
const MIN_PIECE: usize = 1 << 10;
/// How long the bridge polls without traffic (yielding between looks) before it starts to sleep: long
/// enough to cover the gap between a fault's reply and the next request of a thread that faults on, short
/// enough to leave a computing rank its core (with 500 us, `matmul` under `mpirun -n 2` took 0.150-0.190 s
/// against 0.125-0.154 s; with 20 us the bridge napped between back-to-back faults, and they took 120 us:
/// docs/BENCHMARKS.md, eighteenth session).
const SPIN: Duration = Duration::from_micros(100);
/// The longest sleep between looks at MPI when nothing happens.
const MAX_NAP: Duration = Duration::from_micros(200);

/// The bridge thread of a rank, shared with what finalizes MPI.
pub(crate) type Bridge = Arc<BridgeState>;

#[derive(Debug, Default)]
pub(crate) struct BridgeState {
    /// The thread, once started: joined before MPI is finalized.
    pub(crate) thread: Mutex<Option<JoinHandle<()>>>,
    /// Set once every connection of this rank has sent its end and the peer's bridge has acknowledged
    /// everything sent on it, the end included (it has passed the end on to the peer's connection).
    ends_acknowledged: AtomicBool,
}

impl BridgeState {
    /// Waits up to `limit` for every connection's end to be acknowledged (no longer once the bridge
    /// thread has ended, or when it never started).
    pub(crate) fn wait_for_ends(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.ends_acknowledged.load(Ordering::Acquire) && Instant::now() < deadline {
            let running = self
                .thread
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|t| !t.is_finished());
            if !running {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The transport: establishing it starts the bridge thread.
#[derive(Debug)]
pub(crate) struct MpiTransport {
    pub(crate) bridge: Bridge,
    /// The size of the buffer attached for buffered sends.
    pub(crate) send_buffer: usize,
}

/// How much each connection may have in flight, and the largest message it sends, for `links`
/// connections sharing a send buffer of `buffer` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Credit {
    window: usize,
    piece: usize,
}

impl Credit {
    fn new(buffer: usize, links: usize) -> dsm::Result<Credit> {
        let links = links.max(1);
        // Every connection's acknowledgements and its end message are set aside first.
        let reserve = links * (ACKS_IN_FLIGHT * (ACK_LEN + MESSAGE_COST) + MESSAGE_COST);
        let window = buffer.saturating_sub(reserve) / links;
        // At least two pieces in flight per connection, so that a sender never waits for a whole round
        // trip between two of them.
        let piece = (window / 2).saturating_sub(MESSAGE_COST).min(CHUNK);
        if piece < MIN_PIECE {
            let need = links * (2 * (MIN_PIECE + MESSAGE_COST)) + reserve;
            return Err(DsmError::Config(format!(
                "the MPI send buffer of {buffer} bytes is too small for this job's {links} connections: set DSM_MPI_SEND_BUFFER to at least {need} (or use fewer DSM_CHANNELS)"
            )));
        }
        Ok(Credit { window, piece })
    }
}

/// One connection's bridge end.
struct Link {
    peer: i32,
    send_tag: i32,
    /// The tag this connection's bytes arrive with (the peer's `send_tag` for it).
    recv_tag: i32,
    /// The bridge's end of the connection.
    end: memory::End,
    /// Sending: the cost of what was sent and not yet acknowledged.
    in_flight: usize,
    /// Receiving: the cost of what arrived and is not yet all written to the socket, and of what was
    /// written and not yet acknowledged.
    arrived: usize,
    to_ack: usize,
    /// Bytes from MPI not yet written to the connection (it was full).
    pending: Vec<u8>,
    written: usize,
    /// This side's socket reached its end (and the end was sent on).
    local_done: bool,
    /// The peer's end arrived (the socket is shut for writing once `pending` is out).
    remote_done: bool,
    /// The connection has been shut for writing.
    shut: bool,
}

/// The first MPI tag of the transport's messages on its own communicator (a duplicate of
/// `MPI_COMM_WORLD`, so a program's MPI messages never meet them): tags from here up to
/// `TAG_BASE + 2 x connections` (that last one for acknowledgements; MPI guarantees tags up to 32767, and
/// a rank has at most 65 connections to each: 64 channels and its service loop's).
const TAG_BASE: i32 = 32_000;

fn tag(channel: usize, reply: bool) -> i32 {
    TAG_BASE + (channel * 2 + usize::from(reply)) as i32
}

fn pair() -> (memory::End, memory::End) {
    memory::pair(CONNECTION_ROOM)
}

impl Transport for MpiTransport {
    fn establish(self: Box<Self>, me: Rank, size: usize, channels: usize) -> dsm::Result<Mesh> {
        let mut outgoing: Vec<Vec<Conn>> = (0..channels).map(|_| Vec::new()).collect();
        let mut incoming = Vec::new();
        let mut links = Vec::new();
        let mut route = HashMap::new();
        for (c, out) in outgoing.iter_mut().enumerate() {
            for r in 0..size {
                let (app, other) = pair();
                if r == me.index() {
                    // Requests to this rank itself never leave the process.
                    out.push(Conn::from(app));
                    incoming.push(Incoming::new(me, c, channels, Conn::from(other)));
                    continue;
                }
                if c == channels - 1 {
                    // The service loop's own messages (the last set), written on the bridge thread.
                    app.never_wait_to_send();
                }
                out.push(Conn::from(app));
                // This rank's requests on channel c to r go out tagged as requests; r's replies come back
                // tagged as replies.
                route.insert((r as i32, tag(c, true)), links.len());
                links.push(Link::new(r as i32, tag(c, false), tag(c, true), other));
                // r's requests on its channel c arrive here and are answered with replies.
                let (app, other) = pair();
                // The service loop's replies, written on the bridge thread.
                app.never_wait_to_send();
                incoming.push(Incoming::new(Rank(r as u32), c, channels, Conn::from(app)));
                route.insert((r as i32, tag(c, false)), links.len());
                links.push(Link::new(r as i32, tag(c, true), tag(c, false), other));
            }
        }
        let doorbell = Doorbell::new();
        for l in &links {
            // Woken for bytes from the job, and for room in a connection that had none for what came
            // from MPI (the reader may take longer than the bridge polls).
            l.end.ring_on_input(&doorbell);
            l.end.ring_on_room(&doorbell);
        }
        let credit = Credit::new(self.send_buffer, links.len())?;
        let acked = links
            .iter()
            .enumerate()
            .map(|(i, l)| ((l.peer, l.send_tag), i))
            .collect();
        let (hand, handed) = mpsc::channel::<ServiceLoop>();
        let host = Host {
            bell: doorbell.clone(),
            start: Box::new(move |service| {
                hand.send(service).map_err(|_| {
                    DsmError::Config(
                        "the MPI bridge thread ended before the service loop started".into(),
                    )
                })
            }),
        };
        let bridging = Bridging {
            state: self.bridge.clone(),
            service: None,
            handed: Some(handed),
            links,
            route,
            acked,
            doorbell,
            ack_tag: tag(channels, false),
            tags: std::iter::once(tag(channels, false))
                .chain((0..channels).flat_map(|c| [tag(c, false), tag(c, true)]))
                .collect(),
            credit,
            buf: vec![0u8; credit.piece],
        };
        let (ready, started) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("dsm-mpi-bridge".into())
            .spawn(move || {
                // The bridge's own communicator, so that a program's MPI messages on MPI_COMM_WORLD
                // (wildcard receives included) and the bridge's never meet. It is made here while the
                // thread that initializes the runtime waits below: no other collective on
                // MPI_COMM_WORLD runs beside this one.
                let comm = SimpleCommunicator::world().duplicate();
                let _ = ready.send(());
                // A panic here (the service loop's, which this thread runs) would end every MPI message of
                // the rank, and the others would learn of it only at their peer timeout: the job ends now.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    bridge(&comm, bridging)
                }));
                if let Err(panic) = ran {
                    // Not a `RuntimeError::Mpi`, whose message speaks of joining: the job ran.
                    crate::mpi_join::abort_job(&format!(
                        "the MPI bridge thread panicked: {}",
                        dsm::panic_message(&*panic)
                    ));
                }
            })
            .map_err(|e| DsmError::Config(format!("starting the MPI bridge thread: {e}")))?;
        started.recv().map_err(|_| {
            DsmError::Config("the MPI bridge thread ended before it started".into())
        })?;
        *self.bridge.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Mesh {
            outgoing,
            incoming,
            host: Some(host),
        })
    }

    fn name(&self) -> &'static str {
        "mpi"
    }

    fn polls_for_replies(&self) -> bool {
        true
    }
}

impl Link {
    fn new(peer: i32, send_tag: i32, recv_tag: i32, end: memory::End) -> Link {
        Link {
            peer,
            send_tag,
            recv_tag,
            end,
            in_flight: 0,
            arrived: 0,
            to_ack: 0,
            pending: Vec::new(),
            written: 0,
            local_done: false,
            remote_done: false,
            shut: false,
        }
    }

    /// Passes on `data`, which arrived from the peer: what the connection has no room for waits in
    /// `pending`.
    fn deliver(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
        self.flush();
    }

    /// Writes what it can of `pending`; shuts the connection for writing once the peer's end is reached
    /// and everything is out. Whether anything moved.
    fn flush(&mut self) -> bool {
        let mut moved = false;
        while self.written < self.pending.len() {
            match self.end.send(&self.pending[self.written..], false) {
                Ok(n) => {
                    self.written += n;
                    moved = true;
                }
                Err(Errno::EAGAIN) => return moved,
                // The engine closed its end: nothing more can be delivered.
                Err(_) => self.written = self.pending.len(),
            }
        }
        self.pending.clear();
        self.written = 0;
        // Everything that arrived is in the connection now: its cost can go back to the sender.
        self.to_ack += std::mem::take(&mut self.arrived);
        if self.remote_done && !self.shut {
            self.end.shutdown(Shut::Write);
            self.shut = true;
        }
        moved
    }

    /// Both ends reached, everything passed on, and every message acknowledged both ways (so that no
    /// acknowledgement is still on its way when MPI is finalized).
    fn idle(&self) -> bool {
        self.local_done
            && self.remote_done
            && self.pending.is_empty()
            && self.in_flight == 0
            && self.to_ack == 0
    }
}

/// Everything one look at MPI and the connections works on.
struct Bridging {
    /// Where the bridge says that its ends are out.
    state: Bridge,
    /// The rank's service loop, which the bridge runs (`Mesh::host`), once handed over and until the rank
    /// stops.
    service: Option<ServiceLoop>,
    handed: Option<mpsc::Receiver<ServiceLoop>>,
    links: Vec<Link>,
    /// The link each (peer, tag) of arriving bytes belongs to.
    route: HashMap<(i32, i32), usize>,
    /// Acknowledgements name the connection by the peer and the tag its bytes were sent with.
    acked: HashMap<(i32, i32), usize>,
    /// Rung when bytes (or an end) arrive on any connection from the job.
    doorbell: Arc<Doorbell>,
    ack_tag: i32,
    /// The tags the bridge receives: acknowledgements first, then every channel's both ways.
    tags: Vec<i32>,
    credit: Credit,
    buf: Vec<u8>,
}

impl Bridging {
    /// Room for one more piece (or the end message) within a connection's window.
    fn has_credit(credit: Credit, l: &Link) -> bool {
        l.in_flight + credit.piece + MESSAGE_COST <= credit.window
    }

    /// One look at the connections and at MPI, moving what can move. Whether anything moved.
    fn step(&mut self, comm: &SimpleCommunicator) -> bool {
        let mut moved = false;
        let credit = self.credit;
        // A connection with no credit waits until the peer acknowledges what it has passed on.
        for l in self
            .links
            .iter_mut()
            .filter(|l| !l.local_done && Self::has_credit(credit, l))
        {
            match l.end.recv(&mut self.buf, false) {
                Ok(n) if n > 0 => {
                    comm.process_at_rank(l.peer)
                        .buffered_send_with_tag(&self.buf[..n], l.send_tag);
                    l.in_flight += n + MESSAGE_COST;
                    moved = true;
                }
                Err(Errno::EAGAIN) => {}
                // The end of this side's connection: the peer is told with an empty message.
                _ => {
                    l.local_done = true;
                    comm.process_at_rank(l.peer)
                        .buffered_send_with_tag(&self.buf[..0], l.send_tag);
                    l.in_flight += MESSAGE_COST;
                    moved = true;
                }
            }
        }
        // Acknowledgements first, then bytes, tag by tag. (One probe for any tag, which would find any
        // message with one call, made sequential reads of a cyclic region 15-20% slower over the socket
        // pairs, and measured no faster over the in-memory connections: docs/BENCHMARKS.md, fourteenth and
        // seventeenth sessions.)
        for k in 0..self.tags.len() {
            let t = self.tags[k];
            while let Some(probed) = comm.any_process().immediate_matched_probe_with_tag(t) {
                let (data, status) = probed.matched_receive_vec::<u8>();
                moved = true;
                self.arrived(status.source_rank(), t, &data);
            }
        }
        for l in self
            .links
            .iter_mut()
            .filter(|l| !l.pending.is_empty() || (l.remote_done && !l.shut))
        {
            moved |= l.flush();
        }
        // Credit goes back once a quarter of a window has been passed on (a sender that waits for credit
        // has more than that in flight, so it always gets some), and once more, for everything, when the
        // peer's end has been passed on: the last acknowledgement on the connection, which the peer waits
        // for before its bridge ends.
        for l in self.links.iter_mut().filter(|l| {
            l.to_ack > 0
                && (l.to_ack >= credit.window / 4 || (l.remote_done && l.pending.is_empty()))
        }) {
            let ack = encode_ack(l.recv_tag, std::mem::take(&mut l.to_ack));
            comm.process_at_rank(l.peer)
                .buffered_send_with_tag(&ack[..], self.ack_tag);
            moved = true;
        }
        moved
    }

    /// Runs the service loop on what has arrived for it. Whether it served anything.
    fn serve(&mut self) -> bool {
        if let Some(handed) = &self.handed {
            match handed.try_recv() {
                Ok(service) => {
                    self.service = Some(service);
                    self.handed = None;
                }
                Err(TryRecvError::Empty) => {}
                // The rank never started (its build failed after the mesh was up).
                Err(TryRecvError::Disconnected) => self.handed = None,
            }
        }
        let Some(service) = &mut self.service else {
            return false;
        };
        match service.poll() {
            Polled::Idle => false,
            Polled::Served => true,
            Polled::Stopped => {
                // Dropping the loop ends its connections: their ends go out with the next steps.
                self.service = None;
                true
            }
        }
    }

    /// A message from `peer` with tag `t`: an acknowledgement, or bytes for one of the connections.
    fn arrived(&mut self, peer: i32, t: i32, data: &[u8]) {
        if t == self.ack_tag {
            let Some((sent_with, cost)) = decode_ack(data) else {
                return;
            };
            if let Some(&i) = self.acked.get(&(peer, sent_with)) {
                let l = &mut self.links[i];
                l.in_flight = l.in_flight.saturating_sub(cost);
            }
            return;
        }
        let Some(&i) = self.route.get(&(peer, t)) else {
            return;
        };
        let l = &mut self.links[i];
        l.arrived += data.len() + MESSAGE_COST;
        if data.is_empty() {
            l.remote_done = true;
        }
        l.deliver(data);
    }

    /// Every connection has ended on both sides and everything is acknowledged. Says so, too, once every
    /// connection's own end is out and acknowledged (`BridgeState::wait_for_ends`).
    fn finished(&self) -> bool {
        let state = &self.state.ends_acknowledged;
        if !state.load(Ordering::Relaxed)
            && self.links.iter().all(|l| l.local_done && l.in_flight == 0)
        {
            state.store(true, Ordering::Release);
        }
        self.links.iter().all(Link::idle)
    }
}

/// The bridge thread: moves bytes until every connection has ended on both sides. It looks while there is
/// traffic and for `SPIN` after it stops (yielding its CPU between looks), then sleeps for growing naps
/// on its doorbell (MPI messages cannot wake it).
fn bridge(comm: &SimpleCommunicator, mut bridging: Bridging) {
    let mut quiet_since: Option<Instant> = None;
    let mut nap = Duration::ZERO;
    loop {
        // Taken before the look, so that bytes that arrive after it ring the doorbell for the sleep below.
        let seen = bridging.doorbell.seen();
        // Bytes that arrived are served at once, and the replies go out with the next step.
        let moved = bridging.step(comm);
        if bridging.serve() || moved {
            quiet_since = None;
            nap = Duration::ZERO;
            continue;
        }
        if bridging.finished() {
            return;
        }
        let since = *quiet_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN {
            std::thread::yield_now();
            continue;
        }
        // Sleep until bytes arrive from the job, or for a while.
        nap = (nap * 2).clamp(Duration::from_micros(10), MAX_NAP);
        bridging.doorbell.wait(seen, nap);
    }
}

fn encode_ack(tag: i32, cost: usize) -> [u8; ACK_LEN] {
    let mut ack = [0u8; ACK_LEN];
    ack[..4].copy_from_slice(&tag.to_le_bytes());
    ack[4..].copy_from_slice(&(cost as u64).to_le_bytes());
    ack
}

fn decode_ack(data: &[u8]) -> Option<(i32, usize)> {
    let data: &[u8; ACK_LEN] = data.try_into().ok()?;
    let tag = i32::from_le_bytes(data[..4].try_into().ok()?);
    let cost = u64::from_le_bytes(data[4..].try_into().ok()?);
    Some((tag, usize::try_from(cost).unwrap_or(usize::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_shares_the_buffer_and_refuses_a_buffer_too_small() {
        let c = Credit::new(SEND_BUFFER, 12).unwrap();
        assert_eq!(c.piece, CHUNK, "a few connections send whole chunks");
        assert!(c.window * 12 <= SEND_BUFFER);
        // Many connections: smaller pieces, still two in flight each, and the whole within the buffer.
        let links = 2 * 63 * 4;
        let c = Credit::new(SEND_BUFFER, links).unwrap();
        assert!(c.piece < CHUNK && c.piece >= MIN_PIECE, "{c:?}");
        assert!(2 * (c.piece + MESSAGE_COST) <= c.window);
        let reserve = links * (ACKS_IN_FLIGHT * (ACK_LEN + MESSAGE_COST) + MESSAGE_COST);
        assert!(c.window * links + reserve <= SEND_BUFFER);
        let e = Credit::new(64 << 10, links).unwrap_err().to_string();
        assert!(e.contains("DSM_MPI_SEND_BUFFER"), "{e}");
    }

    #[test]
    fn acknowledgements_travel_whole() {
        assert_eq!(
            decode_ack(&encode_ack(32_005, 70_000)),
            Some((32_005, 70_000))
        );
        assert_eq!(decode_ack(&[1, 2, 3]), None);
    }
}
