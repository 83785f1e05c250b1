//! The MPI transport (`DSM_TRANSPORT=mpi` under `mpirun`): the job's connections are local socket pairs,
//! and a bridge thread carries their bytes between ranks as MPI messages. The rest of dsm is unchanged: the
//! fault path and the service loop read and write file descriptors with plain system calls (MPI is not
//! async-signal-safe and offers nothing to wait on), and only the bridge thread calls MPI.
//!
//! Each connection of a channel to a peer has its own MPI tag (channel x direction), so bytes arrive in
//! order per connection. Sends are buffered (`MPI_Bsend` into an attached buffer), so two bridges sending
//! to each other never wait for each other. A connection's end is sent as an empty message. The bridge
//! polls MPI and its sockets while there is traffic, spins briefly when it stops, then sleeps in `ppoll` on
//! its sockets for growing intervals (MPI cannot wake it), which bounds a waiting rank's CPU use at the
//! cost of latency for the first message after a quiet spell.

use dsm::transport::{Mesh, Transport};
use dsm::{DsmError, Rank};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::Communicator;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::time::TimeSpec;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most bytes one MPI message carries.
const CHUNK: usize = 64 << 10;
/// The buffer attached for buffered sends.
pub(crate) const SEND_BUFFER: usize = 64 << 20;
/// How long the bridge polls without traffic before it starts to sleep.
const SPIN: Duration = Duration::from_micros(500);
/// The longest sleep between looks at MPI when nothing happens.
const MAX_NAP: Duration = Duration::from_micros(200);

/// The bridge thread, once started: joined before MPI is finalized.
pub(crate) type Bridge = Arc<Mutex<Option<JoinHandle<()>>>>;

/// The transport: establishing it starts the bridge thread.
#[derive(Debug)]
pub(crate) struct MpiTransport {
    pub(crate) bridge: Bridge,
}

/// One connection's bridge end.
struct Link {
    peer: i32,
    send_tag: i32,
    stream: UnixStream,
    /// Bytes from MPI not yet written to the socket.
    pending: Vec<u8>,
    written: usize,
    /// This side's socket reached its end (and the end was sent on).
    local_done: bool,
    /// The peer's end arrived (the socket is shut for writing once `pending` is out).
    remote_done: bool,
    /// The socket has been shut for writing.
    shut: bool,
}

/// The first MPI tag of the transport's messages on `MPI_COMM_WORLD`: tags from here up to
/// `TAG_BASE + 2 x channels` are the transport's (MPI guarantees tags up to 32767), and it only ever
/// receives those, so a program's own MPI messages on other tags pass it by.
const TAG_BASE: i32 = 32_000;

fn tag(channel: usize, reply: bool) -> i32 {
    TAG_BASE + (channel * 2 + usize::from(reply)) as i32
}

fn pair() -> dsm::Result<(UnixStream, UnixStream)> {
    UnixStream::pair()
        .map_err(|e| DsmError::Config(format!("a socket pair for the MPI transport: {e}")))
}

impl Transport for MpiTransport {
    fn establish(self: Box<Self>, me: Rank, size: usize, channels: usize) -> dsm::Result<Mesh> {
        let mut outgoing: Vec<Vec<OwnedFd>> = (0..channels).map(|_| Vec::new()).collect();
        let mut incoming = Vec::new();
        let mut links = Vec::new();
        let mut route = HashMap::new();
        for (c, out) in outgoing.iter_mut().enumerate() {
            for r in 0..size {
                let (app, other) = pair()?;
                out.push(OwnedFd::from(app));
                if r == me.index() {
                    // Requests to this rank itself never leave the process.
                    incoming.push((me, OwnedFd::from(other)));
                    continue;
                }
                // This rank's requests on channel c to r go out tagged as requests; r's replies come back
                // tagged as replies.
                route.insert((r as i32, tag(c, true)), links.len());
                links.push(Link::new(r as i32, tag(c, false), other));
                // r's requests on its channel c arrive here and are answered with replies.
                let (app, other) = pair()?;
                incoming.push((Rank(r as u32), OwnedFd::from(app)));
                route.insert((r as i32, tag(c, false)), links.len());
                links.push(Link::new(r as i32, tag(c, true), other));
            }
        }
        for l in &links {
            l.stream.set_nonblocking(true).map_err(|e| {
                DsmError::Config(format!("a non-blocking socket for the MPI transport: {e}"))
            })?;
        }
        let handle = std::thread::Builder::new()
            .name("dsm-mpi-bridge".into())
            .spawn(move || bridge(links, route, channels))
            .map_err(|e| DsmError::Config(format!("starting the MPI bridge thread: {e}")))?;
        *self.bridge.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(Mesh { outgoing, incoming })
    }

    fn name(&self) -> &'static str {
        "mpi"
    }
}

impl Link {
    fn new(peer: i32, send_tag: i32, stream: UnixStream) -> Link {
        Link {
            peer,
            send_tag,
            stream,
            pending: Vec::new(),
            written: 0,
            local_done: false,
            remote_done: false,
            shut: false,
        }
    }

    /// Writes what it can of `pending`; shuts the socket for writing once the peer's end is reached and
    /// everything is out. Whether anything moved.
    fn flush(&mut self) -> bool {
        let mut moved = false;
        while self.written < self.pending.len() {
            match self.stream.write(&self.pending[self.written..]) {
                Ok(n) if n > 0 => {
                    self.written += n;
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return moved,
                // The engine closed its end: nothing more can be delivered.
                _ => {
                    self.written = self.pending.len();
                }
            }
        }
        self.pending.clear();
        self.written = 0;
        if self.remote_done && !self.shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.shut = true;
        }
        moved
    }

    fn idle(&self) -> bool {
        self.local_done && self.remote_done && self.pending.is_empty()
    }
}

/// Moves bytes until every connection has ended on both sides.
fn bridge(mut links: Vec<Link>, route: HashMap<(i32, i32), usize>, channels: usize) {
    let tags: Vec<i32> = (0..channels)
        .flat_map(|c| [tag(c, false), tag(c, true)])
        .collect();
    let world = mpi::topology::SimpleCommunicator::world();
    let mut buf = vec![0u8; CHUNK];
    let mut quiet_since: Option<Instant> = None;
    let mut nap = Duration::from_micros(10);
    loop {
        let mut moved = false;
        for l in links.iter_mut().filter(|l| !l.local_done) {
            match l.stream.read(&mut buf) {
                Ok(n) if n > 0 => {
                    world
                        .process_at_rank(l.peer)
                        .buffered_send_with_tag(&buf[..n], l.send_tag);
                    moved = true;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                // The end of this side's connection (or an error on it): the peer is told with an empty
                // message.
                _ => {
                    l.local_done = true;
                    world
                        .process_at_rank(l.peer)
                        .buffered_send_with_tag(&buf[..0], l.send_tag);
                    moved = true;
                }
            }
        }
        for &t in &tags {
            while let Some(probed) = world.any_process().immediate_matched_probe_with_tag(t) {
                let (data, status) = probed.matched_receive_vec::<u8>();
                moved = true;
                let Some(&i) = route.get(&(status.source_rank(), status.tag())) else {
                    continue;
                };
                let l = &mut links[i];
                if data.is_empty() {
                    l.remote_done = true;
                } else {
                    l.pending.extend_from_slice(&data);
                }
                l.flush();
            }
        }
        for l in links
            .iter_mut()
            .filter(|l| !l.pending.is_empty() || (l.remote_done && !l.shut))
        {
            moved |= l.flush();
        }
        if links.iter().all(Link::idle) {
            return;
        }
        if moved {
            quiet_since = None;
            nap = Duration::from_micros(10);
            continue;
        }
        let since = *quiet_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        // Sleep until a socket has bytes, or for a while (MPI messages cannot wake this thread).
        let mut fds: Vec<PollFd<'_>> = links
            .iter()
            .filter(|l| !l.local_done)
            .map(|l| PollFd::new(l.stream.as_fd(), PollFlags::POLLIN))
            .collect();
        let _ = ppoll(&mut fds, Some(TimeSpec::from_duration(nap)), None);
        nap = (nap * 2).min(MAX_NAP);
    }
}
