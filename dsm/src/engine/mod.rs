//! The service loop: one thread per rank that serves the other ends of every rank's channels. It owns the
//! manager side of the pages homed here (with the fault path of this rank's own threads, through the
//! per-page manager lock), performs leaf operations on this rank's copies (send, downgrade, drop), and runs
//! the lock and barrier servers. It never waits for another rank: a request that cannot be served yet is
//! queued, and the reply goes out when it can. That is what keeps the protocol free of distributed deadlock.
//!
//! It detects failures: a connection that closes without a `Goodbye`, or that carries a malformed frame,
//! means its rank has failed, and so does a rank not heard from for the peer timeout (`Liveness`: each
//! service loop sends the others heartbeats); waiting barriers are failed and, under
//! `FailurePolicy::Exit`, the rank ends with an error naming the failed rank. Failed is not gone: only
//! the end of a rank's service-loop connection (`Incoming::control`), which a rank never ends before it
//! leaves the job, says that it has left with its copies of pages (`Shared::gone`). A rank that took this
//! one for failed cuts off its other connections and lives on, copies and all.
//!
//! This file holds the loop itself (connections, dispatch, failures); `pages` the pages homed here and
//! this rank's copies; `sync` the lock and barrier servers.

use crate::channel::write_frame;
use crate::direct::{self, Host};
use crate::dsm::{FailurePolicy, Shared};
use crate::fault::unlock_slot;
use crate::protocol::release::VectorClock;
use crate::protocol::swmr::{self, Access};
use crate::region::{Consistency, RegionShared};
use crate::stats::Counters;
use crate::transport::memory::{Doorbell, Shut};
use crate::transport::{Conn, Incoming, Readiness};
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::ZERO_PAGE;
use crate::wire::{self, RefusedReason, Reply, Request, MAX_HEADER};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most pages one read-ahead reply carries, and the default largest window (4 MiB): see
/// `docs/ARCHITECTURE.md`, "Read-ahead replies are installed as they arrive", for the measurements.
pub const MAX_READAHEAD: u32 = 1024;

/// The largest request frame a service loop accepts (requests carry diffs and write notices).
pub(crate) const MAX_REQUEST: usize = 16 << 20;

/// The epoll tokens of the loop's eventfd and of its in-memory connections' doorbell; a socket's token
/// is its index in `conns`.
const WAKER: u64 = u64::MAX;
const MEMORY: u64 = u64::MAX - 1;

/// A connection the loop serves.
#[derive(Debug)]
struct Served {
    /// Shared with the `Responder`s of services that answer later.
    link: Arc<Conn>,
    peer: Rank,
    buf: Vec<u8>,
    filled: usize,
    open: bool,
    goodbye: bool,
    /// The peer's service-loop connection ([`Incoming::control`](crate::transport::Incoming)): its end
    /// says that the peer has left the job.
    control: bool,
    /// The connection reached its end (or an error): nothing more will come on it.
    ended: bool,
    /// Closed, and still read for its end alone (what arrives is dropped): the service-loop connection of
    /// a peer failed here, which may live on, and whose end says when it has left.
    watched: bool,
    /// A service request that came on this connection waits for its answer (its `Responder` lives
    /// unanswered). A requester waits for each answer before it sends again, so a second request meanwhile
    /// is a peer breaking the protocol: each would hold memory here for as long as it waits.
    service_waiting: Arc<AtomicBool>,
}

/// When this rank last sent every other rank its heartbeat, and (with a peer timeout:
/// `DsmBuilder::peer_timeout`) when it last heard from each.
#[derive(Debug)]
struct Liveness {
    /// `None`: this rank takes nobody for failed on silence, but still sends heartbeats, for the ranks
    /// that do.
    timeout: Option<Duration>,
    heard: Vec<Instant>,
    /// Ranks that said `Goodbye`: they left the job and send nothing more.
    left: Vec<bool>,
    beat: Instant,
    /// When the loop last looked at the time: a long gap means that the loop itself was held up.
    looked: Instant,
}

/// The longest time between two heartbeats, whatever this rank's own timeout: ranks may be given
/// different ones, and every timeout (at least [`MIN_PEER_TIMEOUT`]) must see two.
const MAX_BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest peer timeout a rank may be given (`DsmBuilder::peer_timeout`): two heartbeat intervals.
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_secs(2);

impl Liveness {
    /// How often heartbeats go out: four in this rank's timeout, and at least once a second.
    fn interval(&self) -> Duration {
        self.timeout
            .map_or(MAX_BEAT_INTERVAL, |t| (t / 4).min(MAX_BEAT_INTERVAL))
    }

    /// The ranks not heard from for longer than the timeout at `now` (none without a timeout), other
    /// than `me`, the ranks that left, and those `failed` already.
    fn late(&self, now: Instant, me: usize, failed: impl Fn(usize) -> bool) -> Vec<Rank> {
        let Some(timeout) = self.timeout else {
            return Vec::new();
        };
        (0..self.heard.len())
            .filter(|&r| {
                r != me
                    && !self.left[r]
                    && !failed(r)
                    && now.duration_since(self.heard[r]) > timeout
            })
            .map(|r| Rank(r as u32))
            .collect()
    }
}

mod pages;
mod sync;

use sync::LockServer;

/// How a transaction of another rank holds a page's manager lock here (`Engine::held_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Answered at once (an upgrade, or a read of a copy the requester holds), held for its `Unlock`.
    Answered,
    /// Granted, held for its `Unlock`; or, when the home kept its own copy (the grant dropped no copy
    /// here), for its `Abandon` should the owner it names have left.
    Granted { home_kept_its_copy: bool },
}

/// How a requester ends a transaction that holds a page's manager lock here.
enum Ending {
    /// Its `Unlock`: `granted` says whether it ran a grant, which is recorded as done.
    Unlock { count: u32, granted: bool },
    /// Its `Abandon` of a grant that did not run (the owner it named left the job): nothing is recorded.
    Abandon,
}

/// The state of the service loop of one rank.
#[derive(Debug)]
pub(crate) struct Engine {
    shared: Arc<Shared>,
    conns: Vec<Served>,
    /// What the loop waits on when it runs on its own thread ([`Engine::run`]): its eventfd, its sockets and
    /// the in-memory connections' doorbell. A loop a transport's thread runs (`shared.hosted`) waits on
    /// that doorbell instead, and has none.
    epoll: Option<Epoll>,
    /// Rung when bytes arrive on any in-memory connection (which epoll cannot watch); `memory` lists
    /// them.
    doorbell: Arc<Doorbell>,
    memory: Vec<usize>,
    /// Fault requests waiting for a page's manager lock, by (region, page).
    queues: HashMap<(u32, u64), VecDeque<(usize, Request)>>,
    /// Pages whose queue is being served, by (region, page): a request served from a queue may unlock
    /// its page at once, and serving the queue from there again would recurse once per queued request.
    serving: HashSet<(u32, u64)>,
    /// Pages whose manager lock a transaction of another rank holds until its `Unlock` (a grant, or an
    /// upgrade answered at once) or `Abandon` (a grant that did not run), by (region, page): the rank,
    /// its access, and how it holds the page (its request must agree). If that rank fails, the lock is
    /// released here instead of being held for ever (see `peer_failed`).
    held_by: HashMap<(u32, u64), (Rank, Access, Held)>,
    locks: HashMap<u64, LockServer>,
    /// Leaf requests waiting for this rank to finish installing the page they name.
    deferred: Vec<(usize, Request, Vec<u8>)>,
    /// Barrier arrivals at rank 0: (connection, epoch, tag).
    arrivals: Vec<(usize, u64, u64)>,
    /// Release consistency, at rank 0: the number of the last carry applied from each rank (`rc::carry`).
    carries: Vec<u64>,
    /// Release consistency: the write notices the arrivals brought, and their horizons merged, for everyone
    /// at the barrier's end.
    arrival_notices: Vec<crate::protocol::release::WriteNotice>,
    arrival_horizon: VectorClock,
    /// Release consistency: the updates the arrivals brought (`sync::all_update_bytes` of diffs at most), and
    /// their diffs' bytes.
    arrival_updates: Vec<crate::protocol::release::Update>,
    arrival_update_bytes: usize,
    /// Release consistency: what the notices of all the locks homed here take (bounded by
    /// `Shared::notice_memory`).
    lock_notice_bytes: usize,
    /// Release consistency: what the lock servers let go of may have known that not every rank has seen
    /// (their notices and horizons, as a horizon), which every new lock server starts with.
    let_go_horizon: VectorClock,
    scratch: Vec<u8>,
    /// The host this rank runs on, to compare with those of the ranks that introduce themselves.
    host: Option<Host>,
    /// The userfaultfds of the ranks on this host that introduced themselves and whose descriptor this
    /// rank could take, by rank: pages they ask for are installed into them directly (`direct.rs`).
    direct: Vec<Option<OwnedFd>>,
    liveness: Liveness,
    /// The rank is ending for another's failure, on a thread of its own, while the transport's thread that
    /// runs this loop carries what the loop sent last: nothing more is served.
    ending: bool,
}

impl Engine {
    /// The service loop of the rank `shared` describes, serving `incoming`. Run by a transport's thread
    /// (`ServiceLoop`) when `shared.hosted` holds the loop's doorbell, else by [`Engine::run`].
    pub(crate) fn new(shared: Arc<Shared>, incoming: Vec<Incoming>) -> crate::Result<Engine> {
        let (epoll, doorbell) = match &shared.hosted {
            Some(bell) => (None, bell.clone()),
            None => {
                let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
                    .map_err(|e| crate::DsmError::sys("epoll_create", e))?;
                epoll
                    .add(
                        shared.waker.as_fd(),
                        EpollEvent::new(EpollFlags::EPOLLIN, WAKER),
                    )
                    .map_err(|e| crate::DsmError::sys("epoll_ctl(eventfd)", e))?;
                let bell =
                    Doorbell::with_eventfd().map_err(|e| crate::DsmError::sys("eventfd", e))?;
                epoll
                    .add(
                        bell.fd().expect("made with an eventfd"),
                        EpollEvent::new(EpollFlags::EPOLLIN, MEMORY),
                    )
                    .map_err(|e| crate::DsmError::sys("epoll_ctl(eventfd)", e))?;
                (Some(epoll), bell)
            }
        };
        if let Some(t) = shared.peer_timeout {
            // A reply to a rank that stopped reading (a stopped process: its socket buffer fills up) fails
            // after half a timeout instead of holding this loop, and with it this rank's heartbeats, for ever.
            for i in &incoming {
                send_timeout(&i.conn, t / 2)?;
            }
        }
        // The loop's own messages (heartbeats go out with or without a timeout) are tiny: a rank that let
        // them fill its connection and then makes no room for a second is not waited for, and is failed
        // (`Shared::tell_others`).
        for conn in shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            send_timeout(conn, Duration::from_secs(1))?;
        }
        let mut conns = Vec::with_capacity(incoming.len());
        let mut memory = Vec::new();
        for (
            i,
            Incoming {
                from,
                control,
                conn: link,
            },
        ) in incoming.into_iter().enumerate()
        {
            match (link.socket(), link.memory()) {
                (Some(fd), _) => match &epoll {
                    Some(epoll) => epoll
                        .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                        .map_err(|e| crate::DsmError::sys("epoll_ctl(connection)", e))?,
                    None => return Err(crate::DsmError::Config(
                        "a transport that runs the service loop itself gave it a socket: it serves in-memory connections only".into(),
                    )),
                },
                (None, Some(end)) => {
                    end.ring_on_input(&doorbell);
                    memory.push(i);
                }
                (None, None) => unreachable!("a connection is a socket or in memory"),
            }
            conns.push(Served {
                link: Arc::new(link),
                peer: from,
                buf: vec![0; 4 + 2 + MAX_HEADER],
                filled: 0,
                open: true,
                goodbye: false,
                control,
                ended: false,
                watched: false,
                service_waiting: Arc::new(AtomicBool::new(false)),
            });
        }
        Ok(Engine {
            conns,
            epoll,
            doorbell,
            memory,
            queues: HashMap::new(),
            serving: HashSet::new(),
            held_by: HashMap::new(),
            locks: HashMap::new(),
            deferred: Vec::new(),
            carries: vec![0; shared.size],
            arrivals: Vec::new(),
            arrival_notices: Vec::new(),
            arrival_horizon: VectorClock::new(shared.size),
            arrival_updates: Vec::new(),
            arrival_update_bytes: 0,
            lock_notice_bytes: 0,
            let_go_horizon: VectorClock::new(shared.size),
            scratch: vec![0; PAGE_SIZE],
            host: Host::this(),
            direct: (0..shared.size).map(|_| None).collect(),
            ending: false,
            liveness: {
                let now = Instant::now();
                Liveness {
                    timeout: shared.peer_timeout,
                    heard: vec![now; shared.size],
                    left: vec![false; shared.size],
                    beat: now,
                    looked: now,
                }
            },
            shared,
        })
    }

    /// Serves until the rank shuts down.
    pub(crate) fn run(mut self) {
        crate::fault::mark_serving();
        favour_this_thread(self.shared.me, self.shared.service_priority);
        let mut events = vec![EpollEvent::empty(); 64];
        // At most a second (`MAX_BEAT_INTERVAL`).
        let wait_ms = self.liveness.interval().as_millis() as u16;
        loop {
            let Some(epoll) = &self.epoll else {
                eprintln!(
                    "dsm: {}: a service loop meant for a transport's thread was run on its own; it stops",
                    self.shared.me
                );
                return;
            };
            let n = match epoll.wait(&mut events, EpollTimeout::from(wait_ms)) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!(
                        "dsm: {}: epoll_wait failed: {e}; the service loop stops",
                        self.shared.me
                    );
                    return;
                }
            };
            if n > 0 {
                // A request is being served: CPUs stay awake for the next one (`keepawake.rs`).
                self.shared.awake.touch();
            }
            for ev in &events[..n] {
                if ev.data() == MEMORY {
                    self.doorbell.drain();
                    self.read_memory();
                } else if ev.data() == WAKER {
                    let _ = self.shared.waker.read();
                    if self.shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    self.woken();
                } else {
                    self.read_conn(ev.data() as usize);
                }
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            self.keep_time();
        }
    }

    /// This rank's threads woke the loop: pages were unlocked (their queued requests can be served) or
    /// installed (requests deferred for them can be).
    fn woken(&mut self) {
        let unreachable = std::mem::take(
            &mut *self
                .shared
                .unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (peer, reason) in unreachable {
            self.peer_failed(peer, &reason);
        }
        self.serve_all_queues();
        for (idx, req, payload) in std::mem::take(&mut self.deferred) {
            // Nothing a failed rank sent is served any more, as it would not be read now: its diffs, say,
            // would change pages here for a release that it, and every rank after it, takes as failed.
            let peer = self.conns[idx].peer;
            if !self.shared.failed[peer.index()].load(Ordering::Acquire) {
                self.handle(idx, req, payload);
            }
        }
    }

    /// Sends heartbeats when they are due and, with a peer timeout, fails the ranks not heard from for it.
    fn keep_time(&mut self) {
        let me = self.shared.me;
        let l = &mut self.liveness;
        let now = Instant::now();
        let beat = now.duration_since(l.beat) >= l.interval();
        if beat {
            l.beat = now;
            self.shared.tell_others(&Request::Heartbeat, &[], None);
        }
        let Some(timeout) = l.timeout else {
            return;
        };
        if now.duration_since(l.looked) > timeout / 2 {
            // This loop was held up itself (the whole job stopped and resumed, the host paused, a reply
            // that took long to go out): the others' silence in that time says nothing about them, and
            // they are heard from again within an interval.
            l.heard.fill(now);
        }
        l.looked = now;
        let late = l.late(now, me.index(), |r| {
            self.shared.failed[r].load(Ordering::Acquire)
        });
        for r in late {
            self.peer_failed(
                r,
                &format!(
                    "nothing heard from it for {} s (DSM_PEER_TIMEOUT): its process is stopped or hung, or its host or the network to it is down",
                    timeout.as_secs_f64()
                ),
            );
            // (Under `FailurePolicy::Report`.) A thread of this rank blocked sending to it would otherwise
            // wait for ever: it does not read.
            self.shared.channels.cut_off(r);
        }
    }

    /// Something came from `peer`: it is alive.
    fn heard(&mut self, peer: Rank) {
        if self.liveness.timeout.is_some() {
            self.liveness.heard[peer.index()] = Instant::now();
        }
    }

    /// Reads every in-memory connection (one with nothing waiting returns at once): their doorbell rang.
    fn read_memory(&mut self) {
        for i in 0..self.memory.len() {
            self.read_conn(self.memory[i]);
        }
    }

    fn read_conn(&mut self, idx: usize) {
        if self.ending {
            return;
        }
        loop {
            let conn = &mut self.conns[idx];
            if !conn.open {
                if conn.watched {
                    self.watch_end(idx);
                }
                return;
            }
            let filled = conn.filled;
            if filled == conn.buf.len() {
                // A frame larger than the buffer (a diff, write notices): grow; the frame's length is
                // checked against MAX_REQUEST when it is parsed.
                let grown = (conn.buf.len() * 2).min(4 + MAX_REQUEST).max(filled + 1);
                conn.buf.resize(grown, 0);
            }
            match conn.link.recv(&mut conn.buf[filled..], false) {
                Ok(Some(0)) => {
                    self.reached_end(idx, true);
                    self.close(idx, "connection closed");
                    return;
                }
                Ok(Some(n)) => {
                    conn.filled += n;
                    let peer = conn.peer;
                    Counters::add(&self.shared.counters.bytes_received, n as u64);
                    self.heard(peer);
                    if let Err(reason) = self.parse_frames(idx) {
                        self.close(idx, &reason);
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.reached_end(idx, false);
                    self.close(idx, &format!("receive failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Connection `idx` reached its end: the end of its stream (`closed`), or a reset or another error.
    /// The end of a service-loop connection's stream is the peer's leaving the job. (Not a reset: nothing
    /// is ever written to the peer on that connection, so its kernel closes it with a FIN when the
    /// process ends, and a reset may come from the network while the peer lives on.)
    fn reached_end(&mut self, idx: usize, closed: bool) {
        let conn = &mut self.conns[idx];
        conn.ended = true;
        if closed && conn.control {
            self.shared.gone[conn.peer.index()].store(true, Ordering::Release);
        }
    }

    /// Reads the watched connection `idx` (`Served::watched`) until it would wait, dropping what came,
    /// and stops watching it at its end.
    fn watch_end(&mut self, idx: usize) {
        let closed = loop {
            let conn = &mut self.conns[idx];
            match conn.link.recv(&mut conn.buf, false) {
                Ok(Some(0)) => break true,
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => break false,
            }
        };
        self.reached_end(idx, closed);
        let conn = &mut self.conns[idx];
        conn.watched = false;
        if let (Some(fd), Some(epoll)) = (conn.link.socket(), &self.epoll) {
            let _ = epoll.delete(fd);
        }
    }

    /// Serves the whole frames read on connection `idx`, then moves what is left of a frame to the front of
    /// its buffer (once: moving the rest after each frame cost time quadratic in the frames a read brings).
    fn parse_frames(&mut self, idx: usize) -> Result<(), String> {
        let mut at = 0;
        let parsed = loop {
            let conn = &self.conns[idx];
            let rest = conn.filled - at;
            if rest < 4 {
                break Ok(());
            }
            let header = conn.buf[at..at + 4].try_into().expect("4 bytes");
            let n = match wire::body_len(header, MAX_REQUEST) {
                Ok(n) => n,
                Err(e) => break Err(format!("malformed frame: {e}")),
            };
            if rest < 4 + n {
                break Ok(());
            }
            let (req, payload) = match wire::decode::<Request>(&conn.buf[at + 4..at + 4 + n]) {
                Ok((req, payload)) => (req, payload.to_vec()),
                Err(e) => break Err(format!("malformed frame: {e}")),
            };
            at += 4 + n;
            Counters::add(&self.shared.counters.messages_received, 1);
            self.handle(idx, req, payload);
            if !self.conns[idx].open {
                // Closed while handling (a protocol error, a failed reply): what is left is not served.
                return Ok(());
            }
        };
        let conn = &mut self.conns[idx];
        conn.buf.copy_within(at..conn.filled, 0);
        conn.filled -= at;
        parsed
    }

    fn close(&mut self, idx: usize, reason: &str) {
        let leaving = self.shared.stop.load(Ordering::Acquire);
        let me = self.shared.me;
        let conn = &mut self.conns[idx];
        if !conn.open {
            return;
        }
        conn.open = false;
        let peer = conn.peer;
        // A peer's service-loop connection is still read, for its end, once it is closed (the peer failed
        // here, or said goodbye and was failed before its connections ended): whether the peer has left the
        // job or lives on decides what becomes of its copies of pages.
        conn.watched = conn.control && !conn.ended && !leaving && peer != me;
        let expected = conn.goodbye || leaving || peer == me;
        if let (false, Some(fd), Some(epoll)) = (conn.watched, conn.link.socket(), &self.epoll) {
            let _ = epoll.delete(fd);
        }
        if expected {
            // A rank that said goodbye on every connection to this one sends nothing more: a transaction
            // it still holds (it left without its Unlock) would keep its page locked for ever.
            let done =
                conn.goodbye && peer != me && !self.conns.iter().any(|c| c.open && c.peer == peer);
            if done {
                self.end_transactions_of(peer);
            }
            return;
        }
        // The connection is shut for writing, not just left unread: a peer that lives on (one whose
        // connection broke, or that sent a frame this rank could not take) then reads its end, and gets
        // an error for the requests it sent, instead of waiting for ever for replies that will not come.
        // Only for writing: what it sends still goes in (unread), as to a rank that lives: its sends fail
        // only once this rank has left the job.
        conn.link.shutdown(Shut::Write);
        self.peer_failed(peer, reason);
    }

    fn peer_failed(&mut self, peer: Rank, reason: &str) {
        if self.shared.failed[peer.index()].swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!("{}: {peer} failed: {reason}", self.shared.me);
        self.direct[peer.index()] = None;
        // Its other connections end too: nothing it sends is served any more, and it must not wait.
        let others: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].open && self.conns[i].peer == peer)
            .collect();
        for i in others {
            self.close(i, reason);
        }
        for service in self.shared.services() {
            service.peer_failed(peer);
        }
        if self.shared.policy == FailurePolicy::Exit
            && !self.shared.caused_failure.load(Ordering::Acquire)
        {
            // Tell the others which rank is gone before ending, so that they report it rather than this rank,
            // whose connections close next.
            let why = truncated(reason, MAX_LOST_REASON);
            self.shared.tell_others(
                &Request::PeerLost { rank: peer.0 },
                why.as_bytes(),
                Some(peer),
            );
            say(&format!(
                "dsm: {}: {peer} failed ({reason}); ending this rank",
                self.shared.me
            ));
            // Nothing is served meanwhile: the rank is ending (`DsmBuilder::exit_grace`).
            let grace = self.shared.exit_grace;
            if self.shared.hosted.is_some() {
                // A transport's thread runs this loop, and carries the `PeerLost` just written: it must go
                // on carrying while the rank waits, so the wait is another thread's, and the loop serves
                // nothing more (`Engine::ending`).
                self.ending = true;
                let ends = std::thread::Builder::new()
                    .name("dsm-ending".into())
                    .spawn(move || {
                        std::thread::sleep(grace);
                        std::process::exit(crate::EXIT_PEER_FAILED)
                    });
                if ends.is_ok() {
                    return;
                }
            }
            std::thread::sleep(grace);
            std::process::exit(crate::EXIT_PEER_FAILED);
        }
        // Those waiting at a barrier are told it failed (not under `Exit`, where every rank ends for the
        // failure with `EXIT_PEER_FAILED`: a waiter told first might end before that with a status of
        // its own, which the launcher would take for a second failure).
        let waiting: Vec<usize> = self.arrivals.drain(..).map(|(c, _, _)| c).collect();
        for c in waiting {
            self.reply(c, &Reply::BarrierFailed { rank: peer.0 }, &[]);
        }
        // Threads of this rank waiting for its replies are told, whether or not it lives on.
        self.shared.channels.stop_reading_from(peer);
        // Lock requests the failed rank left waiting are dropped: a grant to it would keep the lock for
        // ever. A lock it holds stays held (what it protects may be half written), and those waiting for
        // it, and any that ask later, are told so instead of waiting for ever.
        let conns = &self.conns;
        let mut told: Vec<usize> = Vec::new();
        for l in self.locks.values_mut() {
            l.waiters.retain(|(w, _)| conns[*w].peer != peer);
            if l.held == Some(peer) {
                told.extend(l.waiters.drain(..).map(|(w, _)| w));
            }
        }
        for w in told {
            self.reply(w, &Reply::LockFailed { rank: peer.0 }, &[]);
        }
        self.end_transactions_of(peer);
    }

    /// Ends the transactions `peer` holds here, which no Unlock or Abandon will end: it failed, or left the
    /// job without one. Otherwise their pages would stay locked for ever. One that was writing may have taken
    /// the only copy (it invalidated the others first): the page is recorded as `peer`'s, so that a later
    /// fault on it fails naming that rank rather than reading what may be stale. A reader is recorded as
    /// holding its copy: taken for failed, it may live on and have installed the page, and a writer must
    /// then invalidate it (the copy set forgets it once it is gone). A transaction the home completed
    /// itself (`Done`, held only for the requester's install) was recorded when it was decided, as its
    /// Unlock would find it: only a grant is completed here.
    fn end_transactions_of(&mut self, peer: Rank) {
        let held: Vec<((u32, u64), Access, Held)> = self
            .held_by
            .iter()
            .filter(|(_, (r, _, _))| *r == peer)
            .map(|(k, (_, a, held))| (*k, *a, *held))
            .collect();
        for ((id, page), access, held) in held {
            self.held_by.remove(&(id, page));
            let Some(region) = self.shared.region(id) else {
                continue;
            };
            let slot = region.slot(page);
            if held != Held::Answered {
                let mut e = slot.load();
                swmr::complete(&mut e, peer, access);
                slot.store(&e);
            }
            if unlock_slot(&slot.lock) {
                self.serve_queue(&region, page);
            }
        }
    }

    /// Ends the transaction on `page` that the rank on connection `idx` holds, as its request says. A
    /// transaction holds one page, and only the rank it was granted to ends it: a stale, duplicate or
    /// corrupt request must not free a page lock another transaction holds. Nor may a grant that dropped
    /// the home's copy be abandoned: the entry, unchanged, would list a copy that is gone.
    fn end_transaction(
        &mut self,
        idx: usize,
        region: u32,
        page: u64,
        access: Access,
        ending: Ending,
    ) {
        let peer = self.conns[idx].peer;
        let holder = self.held_by.get(&(region, page)).copied();
        let held = holder.and_then(|(r, a, held)| (r == peer && a == access).then_some(held));
        let (count, agrees, completed, what) = match ending {
            Ending::Unlock { count, granted } => {
                let agrees = held.is_some_and(|h| (h != Held::Answered) == granted);
                (count, agrees, granted, "an Unlock")
            }
            Ending::Abandon => {
                let agrees = held
                    == Some(Held::Granted {
                        home_kept_its_copy: true,
                    });
                (1, agrees, false, "an Abandon")
            }
        };
        if count != 1 || !agrees {
            self.close(
                idx,
                &format!(
                    "{what} of {count} page(s) from page {page} of region {region}, which {peer} does not hold that way"
                ),
            );
            return;
        }
        self.held_by.remove(&(region, page));
        let Some(r) = self.shared.region(region) else {
            return;
        };
        let slot = r.slot(page);
        if completed {
            let mut e = slot.load();
            swmr::complete(&mut e, peer, access);
            slot.store(&e);
        }
        if unlock_slot(&slot.lock) {
            self.serve_queue(&r, page);
        }
    }

    /// Sends a reply on connection `idx`; false when it could not be sent (the connection is closed then).
    fn reply(&mut self, idx: usize, reply: &Reply, payload: &[&[u8]]) -> bool {
        let conn = &self.conns[idx];
        if !conn.open {
            return false;
        }
        if let Err(e) = write_frame(&conn.link, reply, payload, &self.shared.counters) {
            self.close(idx, &format!("sending a reply failed: {e}"));
            return false;
        }
        true
    }

    fn handle(&mut self, idx: usize, req: Request, payload: Vec<u8>) {
        let cancel = matches!(req, Request::ServiceCancel { .. });
        match req {
            Request::Acquire { region, page, .. } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Sequential) else {
                    return;
                };
                self.acquire_or_queue(idx, &r, req);
            }
            Request::Unlock {
                region,
                page,
                count,
                access,
                granted,
            } => self.end_transaction(idx, region, page, access, Ending::Unlock { count, granted }),
            Request::Abandon {
                region,
                page,
                access,
            } => self.end_transaction(idx, region, page, access, Ending::Abandon),
            Request::Fetch { region, page } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Sequential) else {
                    return;
                };
                self.fetch(idx, &r, page);
            }
            Request::Invalidate {
                region,
                page,
                send_data,
            } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Sequential) else {
                    return;
                };
                self.invalidate(idx, &r, page, send_data);
            }
            Request::LockAcquire { lock } => {
                let peer = self.conns[idx].peer;
                let clock = match crate::rc::decode_clock(&payload, peer, self.shared.size) {
                    Ok(c) => c,
                    Err(e) => {
                        self.close(idx, &e.to_string());
                        return;
                    }
                };
                let let_go = &self.let_go_horizon;
                let l = self
                    .locks
                    .entry(lock)
                    .or_insert_with(|| LockServer::new(let_go.clone()));
                if let Some(holder) = l
                    .held
                    .filter(|h| self.shared.failed[h.index()].load(Ordering::Acquire))
                {
                    self.reply(idx, &Reply::LockFailed { rank: holder.0 }, &[]);
                } else if l.held.is_some() {
                    l.waiters.push_back((idx, clock));
                } else {
                    let grant = crate::rc::encode_notices(&l.notices.unseen(&clock), &l.horizon);
                    self.grant_lock(lock, idx, grant);
                }
            }
            Request::LockRelease { lock } => {
                let peer = self.conns[idx].peer;
                let (passed, horizon) =
                    match crate::rc::decode_notices(&payload, peer, self.shared.size) {
                        Ok(n) => n,
                        Err(e) => {
                            self.close(idx, &e.to_string());
                            return;
                        }
                    };
                // Only the holder releases (once): a stray release would hand the lock to a second holder.
                if self.locks.get(&lock).and_then(|l| l.held) != Some(peer) {
                    self.close(
                        idx,
                        &format!("{peer} released lock {lock}, which it does not hold"),
                    );
                    return;
                }
                if let Some((w, grant)) = self.lock_released(lock, passed, &horizon) {
                    self.grant_lock(lock, w, grant);
                }
            }
            Request::Barrier {
                epoch,
                tag,
                carried,
            } => self.barrier(idx, epoch, tag, carried, payload),
            Request::Carried => self.carried(idx, payload),
            Request::FetchPage {
                region,
                page,
                count,
                direct,
            } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Release) else {
                    return;
                };
                self.fetch_page(idx, &r, page, count, direct);
            }
            Request::Diffs { region, .. } => {
                let Some(r) = self.region_for(idx, region, 0, Consistency::Release) else {
                    return;
                };
                self.apply_diffs(idx, &r, req, payload);
            }
            Request::ArenaBase => {
                let reply = match self.shared.arena_base() {
                    Some((base, size)) => Reply::Arena {
                        base: base as u64,
                        size: size as u64,
                    },
                    None => Reply::Refused {
                        reason: RefusedReason::NoArena,
                    },
                };
                self.reply(idx, &reply, &[]);
            }
            Request::Introduce {
                pid,
                uffd,
                boot,
                pid_ns,
            } => {
                let peer = self.conns[idx].peer;
                let theirs = Host { boot, pid_ns };
                let conn = self.conns[idx].link.clone();
                let alive = || conn.readiness() != Readiness::Ended;
                let accepted = match direct::take_peer_uffd(
                    self.host.as_ref(),
                    &theirs,
                    pid,
                    uffd,
                    alive,
                ) {
                    Ok(fd) => {
                        self.direct[peer.index()] = Some(fd);
                        true
                    }
                    Err(why) => {
                        tracing::info!(
                            "{}: pages for {peer} go over the connection, not installed directly: {why} (pidfd_getfd needs ptrace's permission: the same user without Yama's ptrace_scope 1 or more, or root; DSM_DIRECT_INSTALL=off stops asking)",
                            self.shared.me
                        );
                        false
                    }
                };
                self.reply(idx, &Reply::Introduced { accepted }, &[]);
            }
            Request::Ping { reply_bytes } => {
                let n = (reply_bytes as usize).min(PAGE_SIZE);
                self.reply(idx, &Reply::Pong, &[&ZERO_PAGE[..n]]);
            }
            Request::Goodbye => {
                let peer = self.conns[idx].peer.index();
                self.conns[idx].goodbye = true;
                self.liveness.left[peer] = true;
                self.shared.finishing[peer].store(true, Ordering::Release);
            }
            Request::Finishing => {
                let peer = self.conns[idx].peer.index();
                self.shared.finishing[peer].store(true, Ordering::Release);
            }
            Request::Heartbeat => {}
            Request::PeerLost { rank } if rank == self.shared.me.0 => {
                self.close(idx, "a failure report names this rank itself")
            }
            Request::PeerLost { rank } if (rank as usize) < self.shared.size => {
                let reporter = self.conns[idx].peer;
                let why = String::from_utf8_lossy(&payload[..payload.len().min(MAX_LOST_REASON)]);
                self.peer_failed(Rank(rank), &format!("{reporter} gave up on it: {why}"));
            }
            Request::PeerLost { .. } => {
                self.close(idx, "a failure report names no rank of this job")
            }
            Request::Service { id } | Request::ServiceCancel { id } => {
                match self.shared.service(id) {
                    Some(service) => {
                        let conn = &self.conns[idx];
                        // A cancellation withdraws the request that waits; anything else must come after
                        // its answer.
                        let waiting = (!cancel).then(|| conn.service_waiting.clone());
                        if waiting
                            .as_ref()
                            .is_some_and(|w| w.swap(true, Ordering::AcqRel))
                        {
                            self.close(
                                idx,
                                &format!(
                                    "a request to service {id} came before the answer to the one before it on the connection"
                                ),
                            );
                            return;
                        }
                        let reply = crate::service::Responder {
                            link: conn.link.clone(),
                            peer: conn.peer,
                            shared: self.shared.clone(),
                            waiting,
                        };
                        service.request(self.conns[idx].peer, payload, reply);
                    }
                    // A cancellation is never answered here (see `Request::ServiceCancel`).
                    None if cancel => {}
                    None => self.refuse(idx, RefusedReason::UnknownService),
                }
            }
        }
    }

    /// The region a request names, when the page is in it and the request is one of the region's memory
    /// model (sequential-consistency transactions, or release-consistency fetches and diffs). A request of
    /// the other model is a peer's protocol error: its connection is closed.
    fn region_for(
        &mut self,
        idx: usize,
        region: u32,
        page: u64,
        model: Consistency,
    ) -> Option<Arc<RegionShared>> {
        let reason = match self.shared.region(region) {
            Some(r) if page < r.pages && r.consistency == model => return Some(r),
            Some(r) if page < r.pages => {
                self.close(
                    idx,
                    &format!(
                        "a {model:?}-consistency request for region {region}, which is {:?}",
                        r.consistency
                    ),
                );
                return None;
            }
            Some(_) => RefusedReason::PageOutOfRange,
            None => RefusedReason::UnknownRegion,
        };
        self.refuse(idx, reason);
        None
    }

    /// Answers the request on connection `idx` with a refusal.
    fn refuse(&mut self, idx: usize, reason: RefusedReason) {
        self.reply(idx, &Reply::Refused { reason }, &[]);
    }

    fn die(&self, what: &str) -> ! {
        end_rank(self.shared.me, what)
    }
}

/// A rank's service loop run by a thread of its transport ([`Mesh::host`](crate::transport::Mesh::host))
/// instead of a thread of its own: the host calls [`ServiceLoop::poll`] whenever its doorbell rings, and
/// now and then without (heartbeats go out at least once a second), until the rank stops; then it drops
/// the loop, which ends its connections. The loop runs at the host thread's priority
/// (`DsmBuilder::service_priority` does not apply).
#[derive(Debug)]
pub struct ServiceLoop {
    engine: Engine,
    /// The doorbell's count when the loop last looked at its connections.
    looked: u32,
    /// Dropped with the loop: the rank's shutdown waits for that.
    _running: std::sync::mpsc::Sender<()>,
}

/// What one [`ServiceLoop::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Nothing had arrived.
    Idle,
    /// It served what had arrived (replies may be waiting to go out).
    Served,
    /// The rank has stopped: drop the loop.
    Stopped,
}

impl ServiceLoop {
    pub(crate) fn new(engine: Engine, running: std::sync::mpsc::Sender<()>) -> ServiceLoop {
        ServiceLoop {
            looked: engine.doorbell.seen().wrapping_sub(1),
            engine,
            _running: running,
        }
    }

    /// Serves what has arrived on the loop's connections and what this rank's threads woke it for, and
    /// sends heartbeats when they are due. Never waits.
    pub fn poll(&mut self) -> Polled {
        crate::fault::mark_serving();
        let e = &mut self.engine;
        if e.ending {
            return Polled::Idle;
        }
        let mut polled = Polled::Idle;
        let seen = e.doorbell.seen();
        if seen != self.looked {
            self.looked = seen;
            if e.shared.woken.swap(false, Ordering::AcqRel) {
                if e.shared.stop.load(Ordering::Acquire) {
                    return Polled::Stopped;
                }
                e.woken();
            }
            e.read_memory();
            e.shared.awake.touch();
            polled = Polled::Served;
        }
        if e.shared.stop.load(Ordering::Acquire) {
            return Polled::Stopped;
        }
        e.keep_time();
        polled
    }
}

/// The most bytes of the reason a `PeerLost` carries.
const MAX_LOST_REASON: usize = 512;

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Makes sends on `conn` fail (`EAGAIN`) after `t` without progress instead of blocking for ever.
fn send_timeout(conn: &Conn, t: Duration) -> crate::Result<()> {
    conn.set_send_timeout(t)
        .map_err(|e| crate::DsmError::sys("setsockopt(SO_SNDTIMEO)", e))
}

/// Ends this rank (`me`) at once, saying `what` went wrong: for a failure that leaves it unable to keep its
/// pages right, where going on could hand the program stale data. Its peers see it fail as they see any
/// rank die.
pub(crate) fn end_rank(me: Rank, what: &str) -> ! {
    say(&format!("dsm: {me}: {what}; ending this rank"));
    std::process::exit(crate::EXIT_INTERNAL)
}

/// Writes `line` and a newline to standard error in one `write`, so that the lines of ranks whose error
/// streams a launcher merges (mpirun does, unbuffered) do not run into each other (`eprintln!` writes a
/// formatted line piece by piece).
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// How the service loop's thread is scheduled relative to the application's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServicePriority {
    /// Real-time `SCHED_FIFO` priority 1 when permitted (root or `CAP_SYS_NICE`), else nice -10 when
    /// permitted, else normal. The loop only runs short bursts and never spins, so a real-time priority lets
    /// it answer at once even when every core is busy computing, instead of after a scheduler slice.
    #[default]
    Favoured,
    /// Nice -10 when permitted: favoured within the normal scheduler, which keeps its wake-up placement.
    Nice,
    /// The same scheduling as the application's threads.
    Normal,
}

fn favour_this_thread(me: Rank, how: ServicePriority) {
    if how == ServicePriority::Normal {
        return;
    }
    let param = libc::sched_param { sched_priority: 1 };
    if how == ServicePriority::Nice {
        // SAFETY: setpriority on the calling thread (PRIO_PROCESS with who = 0 names the calling thread).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
        return;
    }
    // SAFETY: sched_setscheduler(0, ...) changes only the calling thread's policy; `param` is a valid
    // sched_param that lives across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return;
    }
    // SAFETY: setpriority on the calling thread (who = 0 with PRIO_PROCESS names the calling thread on Linux).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } == 0 {
        return;
    }
    tracing::debug!("{me}: the service loop runs at normal priority (no permission to raise it)");
}

#[cfg(test)]
mod tests;
