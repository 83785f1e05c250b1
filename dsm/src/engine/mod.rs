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
//! This file holds the loop itself (connections and dispatch); `failure` heartbeats, ended connections
//! and failed peers; `pages` the pages homed here and this rank's copies under sequential consistency,
//! `release` the home's side of release consistency; `sync` the lock and barrier servers; `service_loop`
//! the loop as a transport's thread runs it, and the loop thread's priority.

use crate::channel::write_frame;
use crate::direct::{self, Host};
use crate::dsm::Shared;
use crate::protocol::release::VectorClock;
use crate::protocol::swmr::Access;
use crate::region::{Consistency, RegionShared};
use crate::stats::Counters;
use crate::transport::memory::Doorbell;
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

mod ahead;
mod failure;
mod homes;
mod pages;
mod release;
mod service_loop;
mod sync;

pub use failure::MIN_PEER_TIMEOUT;
use failure::{Liveness, MAX_LOST_REASON};
use pages::{Ending, Held};
use service_loop::favour_this_thread;
pub use service_loop::{Polled, ServiceLoop, ServicePriority};
use sync::LockServer;

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
    /// The home's copies of the pages a write fault takes along with its own (`gather_written`), one page
    /// each after the faulting page's (up to the read-ahead window, 4 MiB, kept for the next); lent out
    /// while an answer is built, as `scratch` is.
    taken: Vec<u8>,
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
            taken: Vec::new(),
            host: Host::this(),
            direct: (0..shared.size).map(|_| None).collect(),
            ending: false,
            liveness: {
                let now = Instant::now();
                Liveness {
                    timeout: shared.peer_timeout,
                    heard: vec![now; shared.size],
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
            // A send fails at once to a rank whose end of the connection has closed (a Unix socket says
            // so with the first send after, TCP often only with a later one): what that rank sent before
            // it closed is read first, and a `Goodbye` there means it left the job, not that it failed.
            let from_peer: Vec<usize> = (0..self.conns.len())
                .filter(|&i| self.conns[i].open && self.conns[i].peer == peer)
                .collect();
            for i in from_peer {
                self.read_conn(i);
            }
            if !self.shared.left[peer.index()].load(Ordering::Acquire) {
                self.peer_failed(peer, &reason);
            }
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
            Request::Fetch {
                region,
                page,
                wait_for_own,
            } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Sequential) else {
                    return;
                };
                self.fetch(idx, &r, page, wait_for_own);
            }
            Request::Invalidate {
                region,
                page,
                send_data,
                wait_for_own,
            } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Sequential) else {
                    return;
                };
                self.invalidate(idx, &r, page, send_data, wait_for_own);
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
            Request::Atomic {
                region,
                page,
                offset,
                kind,
                op,
            } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Release) else {
                    return;
                };
                self.atomic(idx, &r, page, offset, kind, op);
            }
            Request::Diffs { region, .. } => {
                let Some(r) = self.region_for(idx, region, 0, Consistency::Release) else {
                    return;
                };
                self.apply_diffs(idx, &r, req, payload);
            }
            Request::Homes {
                region,
                page,
                count,
                ahead,
            } => self.homes(idx, region, page, count, ahead),
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
                self.shared.left[peer].store(true, Ordering::Release);
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

#[cfg(test)]
mod tests;
