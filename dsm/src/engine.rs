//! The service loop: one thread per rank that serves the other ends of every rank's channels. It owns the
//! manager side of the pages homed here (with the fault path of this rank's own threads, through the
//! per-page manager lock), performs leaf operations on this rank's copies (send, downgrade, drop), and runs
//! the lock and barrier servers. It never waits for another rank: a request that cannot be served yet is
//! queued, and the reply goes out when it can. That is what keeps the protocol free of distributed deadlock.
//!
//! It detects failures: a connection that closes without a `Goodbye`, or that carries a malformed frame,
//! means its rank is gone; waiting barriers are failed and, under `FailurePolicy::Exit`, the rank ends with
//! an error naming the failed rank.

use crate::channel::write_frame;
use crate::direct::{self, Host};
use crate::dsm::{FailurePolicy, Shared};
use crate::fault::{give_untouched, lock_untouched, set_state, try_lock_slot, unlock_slot};
use crate::protocol::release::{self, NoticeSet, VectorClock};
use crate::protocol::swmr::{self, Access, Data, Decision, HomeAction};
use crate::region::{Consistency, SHARED};
use crate::region::{
    RegionShared, BUSY, DEFERRED, INVALID, LOCKED, QUEUED, READ_ONLY, READ_WRITE, STATE_MASK,
    WRITTEN,
};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::{ZERO_FILL_MAX, ZERO_PAGE};
use crate::wire::{self, RefusedReason, Reply, Request, MAX_HEADER};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The most pages one read-ahead reply carries, and the default largest window (4 MiB): see
/// `docs/ARCHITECTURE.md`, "Read-ahead replies are installed as they arrive", for the measurements.
pub const MAX_READAHEAD: u32 = 1024;

/// The largest request frame a service loop accepts (requests carry diffs and write notices).
pub(crate) const MAX_REQUEST: usize = 16 << 20;

const WAKER: u64 = u64::MAX;

#[derive(Debug)]
struct Conn {
    /// Shared with the `Responder`s of services that answer later.
    fd: Arc<OwnedFd>,
    peer: Rank,
    buf: Vec<u8>,
    filled: usize,
    open: bool,
    goodbye: bool,
}

#[derive(Debug)]
struct LockServer {
    held: bool,
    waiters: VecDeque<(usize, VectorClock)>,
    /// Release consistency: the write notices the lock's holders passed on that not every rank has seen yet
    /// (trimmed with `Shared::lock_cut` at each release), for the next holders (each grant carries those the
    /// acquirer's clock does not cover).
    notices: NoticeSet,
    /// The intervals whose notices this lock may lack (forgotten here or by a holder to bound their
    /// memory): sent with every grant, so that an acquirer that has not seen them drops its cached pages.
    horizon: VectorClock,
}

impl LockServer {
    /// A lock server whose horizon starts at `horizon` (what the servers let go of may have known).
    fn new(horizon: VectorClock) -> LockServer {
        LockServer {
            held: false,
            waiters: VecDeque::new(),
            notices: NoticeSet::default(),
            horizon,
        }
    }
}

/// Past twice this many lock servers, a rank lets every idle one go (`Engine::let_idle_locks_go`): a
/// program that takes many distinct locks (one per bucket of a table, say) would otherwise keep a server
/// for every lock it ever took.
const KEPT_LOCKS: usize = 1024;

/// The state of the service loop of one rank.
#[derive(Debug)]
pub(crate) struct Engine {
    shared: Arc<Shared>,
    conns: Vec<Conn>,
    epoll: Epoll,
    /// Fault requests waiting for a page's manager lock, by (region, page).
    queues: HashMap<(u32, u64), VecDeque<(usize, Request)>>,
    /// Pages whose manager lock a transaction of another rank holds until its `Unlock` (a grant, or an
    /// upgrade answered at once), by (region, page): the rank and its access. If that rank fails, the lock
    /// is released here instead of being held for ever (see `peer_failed`).
    held_by: HashMap<(u32, u64), (Rank, Access)>,
    locks: HashMap<u64, LockServer>,
    /// Leaf requests waiting for this rank to finish installing the page they name.
    deferred: Vec<(usize, Request, Vec<u8>)>,
    /// Barrier arrivals at rank 0: (connection, epoch, tag).
    arrivals: Vec<(usize, u64, u64)>,
    /// Release consistency: the write notices the arrivals brought, and their horizons merged, for everyone
    /// at the barrier's end.
    arrival_notices: Vec<crate::protocol::release::WriteNotice>,
    arrival_horizon: VectorClock,
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
}

impl Engine {
    pub(crate) fn new(
        shared: Arc<Shared>,
        incoming: Vec<(Rank, OwnedFd)>,
    ) -> crate::Result<Engine> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| crate::DsmError::sys("epoll_create", e))?;
        epoll
            .add(
                shared.waker.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, WAKER),
            )
            .map_err(|e| crate::DsmError::sys("epoll_ctl(eventfd)", e))?;
        let mut conns = Vec::with_capacity(incoming.len());
        for (i, (peer, fd)) in incoming.into_iter().enumerate() {
            epoll
                .add(fd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
                .map_err(|e| crate::DsmError::sys("epoll_ctl(connection)", e))?;
            conns.push(Conn {
                fd: Arc::new(fd),
                peer,
                buf: vec![0; 4 + 2 + MAX_HEADER],
                filled: 0,
                open: true,
                goodbye: false,
            });
        }
        Ok(Engine {
            conns,
            epoll,
            queues: HashMap::new(),
            held_by: HashMap::new(),
            locks: HashMap::new(),
            deferred: Vec::new(),
            arrivals: Vec::new(),
            arrival_notices: Vec::new(),
            arrival_horizon: VectorClock::new(shared.size),
            lock_notice_bytes: 0,
            let_go_horizon: VectorClock::new(shared.size),
            scratch: vec![0; PAGE_SIZE],
            host: Host::this(),
            direct: (0..shared.size).map(|_| None).collect(),
            shared,
        })
    }

    /// Serves until the rank shuts down.
    pub(crate) fn run(mut self) {
        favour_this_thread(self.shared.me, self.shared.service_priority);
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::from(1000u16)) {
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
                if ev.data() == WAKER {
                    let _ = self.shared.waker.read();
                    if self.shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    self.serve_all_queues();
                    for (idx, req, payload) in std::mem::take(&mut self.deferred) {
                        self.handle(idx, req, payload);
                    }
                } else {
                    self.read_conn(ev.data() as usize);
                }
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }

    fn read_conn(&mut self, idx: usize) {
        loop {
            let conn = &mut self.conns[idx];
            if !conn.open {
                return;
            }
            let filled = conn.filled;
            if filled == conn.buf.len() {
                // A frame larger than the buffer (a diff, write notices): grow; the frame's length is
                // checked against MAX_REQUEST when it is parsed.
                let grown = (conn.buf.len() * 2).min(4 + MAX_REQUEST).max(filled + 1);
                conn.buf.resize(grown, 0);
            }
            match recv(
                conn.fd.as_raw_fd(),
                &mut conn.buf[filled..],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    self.shared.gone[conn.peer.index()].store(true, Ordering::Release);
                    self.close(idx, "connection closed");
                    return;
                }
                Ok(n) => {
                    conn.filled += n;
                    Counters::add(&self.shared.counters.bytes_received, n as u64);
                    if let Err(reason) = self.parse_frames(idx) {
                        self.close(idx, &reason);
                        return;
                    }
                }
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    if e == Errno::ECONNRESET {
                        self.shared.gone[conn.peer.index()].store(true, Ordering::Release);
                    }
                    self.close(idx, &format!("receive failed: {e}"));
                    return;
                }
            }
        }
    }

    fn parse_frames(&mut self, idx: usize) -> Result<(), String> {
        loop {
            let conn = &self.conns[idx];
            if conn.filled < 4 {
                return Ok(());
            }
            let n = wire::body_len(conn.buf[..4].try_into().expect("4 bytes"), MAX_REQUEST)
                .map_err(|e| format!("malformed frame: {e}"))?;
            if conn.filled < 4 + n {
                return Ok(());
            }
            let (req, payload) = wire::decode::<Request>(&conn.buf[4..4 + n])
                .map_err(|e| format!("malformed frame: {e}"))?;
            let payload = payload.to_vec();
            let conn = &mut self.conns[idx];
            conn.buf.copy_within(4 + n..conn.filled, 0);
            conn.filled -= 4 + n;
            Counters::add(&self.shared.counters.messages_received, 1);
            self.handle(idx, req, payload);
            if !self.conns[idx].open {
                // Closed while handling (a protocol error, a failed reply): what is left is not served.
                return Ok(());
            }
        }
    }

    fn close(&mut self, idx: usize, reason: &str) {
        let conn = &mut self.conns[idx];
        if !conn.open {
            return;
        }
        conn.open = false;
        let _ = self.epoll.delete(conn.fd.as_fd());
        let peer = conn.peer;
        if conn.goodbye || self.shared.stop.load(Ordering::Acquire) || peer == self.shared.me {
            return;
        }
        self.peer_failed(peer, reason);
    }

    fn peer_failed(&mut self, peer: Rank, reason: &str) {
        if self.shared.failed[peer.index()].swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!("{}: {peer} failed: {reason}", self.shared.me);
        self.direct[peer.index()] = None;
        for service in self.shared.services() {
            service.peer_failed(peer);
        }
        let waiting: Vec<usize> = self.arrivals.drain(..).map(|(c, _, _)| c).collect();
        for c in waiting {
            self.reply(c, &Reply::BarrierFailed { rank: peer.0 }, &[]);
        }
        if self.shared.policy == FailurePolicy::Exit {
            // Tell the others which rank is gone before ending, so that they report it rather than this rank,
            // whose connections close next.
            if let Some(ch) = self.shared.channels.try_claim() {
                let lost = Request::PeerLost { rank: peer.0 };
                for r in (0..self.shared.size as u32).map(Rank) {
                    if r != self.shared.me && r != peer {
                        let _ = ch.send(&self.shared.counters, r, &lost, &[]);
                    }
                }
            }
            say(&format!(
                "dsm: {}: {peer} failed ({reason}); ending this rank",
                self.shared.me
            ));
            std::process::exit(crate::EXIT_PEER_FAILED);
        }
        // Lock requests the failed rank left waiting are dropped: a grant to it would keep the lock for
        // ever. (A lock it holds stays held.)
        let conns = &self.conns;
        for l in self.locks.values_mut() {
            l.waiters.retain(|(w, _)| conns[*w].peer != peer);
        }
        // Transactions the failed rank held here end now, or their pages would stay locked for ever. One
        // that was writing may have taken the only copy (it invalidated the others before it died): the
        // page is recorded as the failed rank's, so that a later fault on it fails naming that rank
        // rather than reading what may be stale. A reader took nothing away.
        let held: Vec<((u32, u64), Access)> = self
            .held_by
            .iter()
            .filter(|(_, (r, _))| *r == peer)
            .map(|(k, (_, a))| (*k, *a))
            .collect();
        for ((id, page), access) in held {
            self.held_by.remove(&(id, page));
            let Some(region) = self.shared.region(id) else {
                continue;
            };
            let slot = region.slot(page);
            if access == Access::Write {
                let mut e = slot.load();
                swmr::complete(&mut e, peer, Access::Write);
                slot.store(&e);
            }
            if unlock_slot(&slot.lock) {
                self.serve_queue(&region, page);
            }
        }
    }

    fn reply(&mut self, idx: usize, reply: &Reply, payload: &[&[u8]]) {
        let conn = &self.conns[idx];
        if !conn.open {
            return;
        }
        if let Err(e) = write_frame(conn.fd.as_fd(), reply, payload, &self.shared.counters) {
            self.close(idx, &format!("sending a reply failed: {e}"));
        }
    }

    fn handle(&mut self, idx: usize, req: Request, payload: Vec<u8>) {
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
            } => {
                // A transaction holds one page, and only the rank it was granted to ends it: a stale,
                // duplicate or corrupt Unlock must not free a page lock another transaction holds.
                let peer = self.conns[idx].peer;
                let holder = self.held_by.get(&(region, page)).copied();
                if count != 1 || holder != Some((peer, access)) {
                    self.close(
                        idx,
                        &format!(
                            "an Unlock of {count} page(s) from page {page} of region {region}, which {peer} does not hold that way"
                        ),
                    );
                    return;
                }
                self.held_by.remove(&(region, page));
                let Some(r) = self.shared.region(region) else {
                    return;
                };
                let slot = r.slot(page);
                if granted {
                    let mut e = slot.load();
                    swmr::complete(&mut e, peer, access);
                    slot.store(&e);
                }
                if unlock_slot(&slot.lock) {
                    self.serve_queue(&r, page);
                }
            }
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
                let clock = match crate::rc::decode_clock(&payload, self.conns[idx].peer) {
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
                if l.held {
                    l.waiters.push_back((idx, clock));
                } else {
                    l.held = true;
                    let grant = crate::rc::encode_notices(&l.notices.unseen(&clock), &l.horizon);
                    self.reply(idx, &Reply::LockGranted, &[&grant]);
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
                let next = self.lock_released(lock, passed, &horizon);
                if let Some((w, grant)) = next {
                    self.reply(w, &Reply::LockGranted, &[&grant]);
                }
            }
            Request::Barrier { epoch, tag } => self.barrier(idx, epoch, tag, payload),
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
            Request::Diff { region, page } => {
                let Some(r) = self.region_for(idx, region, page, Consistency::Release) else {
                    return;
                };
                if r.home(page) != self.shared.me {
                    let what = format!("a diff for page {page} of region {region}, not homed here");
                    self.close(idx, &what);
                    return;
                }
                self.apply_diff(idx, &r, page, payload);
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
                let conn = self.conns[idx].fd.clone();
                let alive = || connection_open(conn.as_fd());
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
            Request::Goodbye => self.conns[idx].goodbye = true,
            Request::PeerLost { rank } if rank == self.shared.me.0 => {
                self.close(idx, "a failure report names this rank itself")
            }
            Request::PeerLost { rank } if (rank as usize) < self.shared.size => {
                let reporter = self.conns[idx].peer;
                self.peer_failed(Rank(rank), &format!("{reporter} lost its connection to it"));
            }
            Request::PeerLost { .. } => {
                self.close(idx, "a failure report names no rank of this job")
            }
            Request::Service { id } => match self.shared.service(id) {
                Some(service) => {
                    let reply = crate::service::Responder {
                        fd: self.conns[idx].fd.clone(),
                        peer: self.conns[idx].peer,
                        shared: self.shared.clone(),
                    };
                    service.request(self.conns[idx].peer, payload, reply);
                }
                None => self.reply(
                    idx,
                    &Reply::Refused {
                        reason: RefusedReason::UnknownService,
                    },
                    &[],
                ),
            },
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
        self.reply(idx, &Reply::Refused { reason }, &[]);
        None
    }

    /// A holder released `lock`, passing on `passed` and its horizon: the lock's union takes them in (less
    /// what every rank has seen), the notices of the locks homed here are kept under their bound, and the
    /// lock goes to its next waiter, if any, with the grant to send it.
    fn lock_released(
        &mut self,
        lock: u64,
        passed: Vec<crate::protocol::release::WriteNotice>,
        horizon: &VectorClock,
    ) -> Option<(usize, Vec<u8>)> {
        let cut = self
            .shared
            .lock_cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let l = self.locks.get_mut(&lock)?;
        let before = l.notices.bytes();
        // Notices every rank has seen are dropped, so that a lock's union does not grow for the whole job.
        if let Some(cut) = cut.as_ref() {
            l.notices.forget_covered(cut);
        }
        for n in passed {
            if !cut.as_ref().is_some_and(|c| c.covers(&n)) {
                l.notices.insert(n);
            }
        }
        l.horizon.merge(horizon);
        self.lock_notice_bytes = self.lock_notice_bytes - before + l.notices.bytes();
        if self.lock_notice_bytes > self.shared.notice_memory {
            // Every lock homed here keeps the newer half of its notices (a program with few locks and
            // one with many are bounded alike).
            let mut forgotten = 0;
            for l in self.locks.values_mut() {
                let target = l.notices.bytes() / 2;
                forgotten += l.notices.forget_oldest(target, &mut l.horizon);
            }
            self.lock_notice_bytes = self.locks.values().map(|l| l.notices.bytes()).sum();
            Counters::add(&self.shared.counters.notices_forgotten, forgotten as u64);
        }
        let l = self.locks.get_mut(&lock)?;
        let next = l.waiters.pop_front();
        l.held = next.is_some();
        let next = next.map(|(w, clock)| {
            let grant = crate::rc::encode_notices(&l.notices.unseen(&clock), &l.horizon);
            (w, grant)
        });
        if self.locks.len() > 2 * KEPT_LOCKS {
            self.let_idle_locks_go(cut.as_ref());
        }
        next
    }

    /// Lets every lock server go that nobody holds or waits for. What a later holder of such a lock could
    /// need from it, its notices that not every rank has seen (`cut` covers the rest) and its horizon, is
    /// folded into the horizon new lock servers start with: an acquirer that has not seen those intervals
    /// drops its cached pages of release-consistency regions, as for notices forgotten on the way. Under
    /// sequential consistency there is nothing to fold. Called when more than twice [`KEPT_LOCKS`] servers
    /// are kept, so the look at them all is paid for by the locks taken since the last one.
    fn let_idle_locks_go(&mut self, cut: Option<&VectorClock>) {
        let let_go = &mut self.let_go_horizon;
        let before = self.locks.len();
        self.locks.retain(|_, l| {
            if l.held || !l.waiters.is_empty() {
                return true;
            }
            let notices = std::mem::take(&mut l.notices);
            if let Some(left) = release::left_by_lock(notices, &l.horizon, cut) {
                let_go.merge(&left);
            }
            false
        });
        self.lock_notice_bytes = self.locks.values().map(|l| l.notices.bytes()).sum();
        Counters::add(
            &self.shared.counters.locks_let_go,
            (before - self.locks.len()) as u64,
        );
    }

    fn barrier(&mut self, idx: usize, epoch: u64, tag: u64, notices: Vec<u8>) {
        if self.shared.me != Rank(0) {
            self.reply(
                idx,
                &Reply::Refused {
                    reason: RefusedReason::WrongRank,
                },
                &[],
            );
            return;
        }
        if let Some(dead) = self
            .shared
            .failed
            .iter()
            .position(|f| f.load(Ordering::Acquire))
        {
            self.reply(idx, &Reply::BarrierFailed { rank: dead as u32 }, &[]);
            return;
        }
        match crate::rc::decode_notices(&notices, self.conns[idx].peer, self.shared.size) {
            Ok((n, horizon)) => {
                self.arrival_notices.extend(n);
                self.arrival_horizon.merge(&horizon);
            }
            Err(e) => {
                self.close(idx, &e.to_string());
                return;
            }
        }
        self.arrivals.push((idx, epoch, tag));
        if self.arrivals.len() < self.shared.size {
            return;
        }
        let horizon = std::mem::replace(
            &mut self.arrival_horizon,
            VectorClock::new(self.shared.size),
        );
        let all = crate::rc::encode_notices(&std::mem::take(&mut self.arrival_notices), &horizon);
        let arrivals = std::mem::take(&mut self.arrivals);
        let reference = arrivals
            .iter()
            .find(|(c, _, _)| self.conns[*c].peer == Rank(0))
            .map(|(_, e, t)| (*e, *t))
            .unwrap_or((epoch, tag));
        let mismatch = arrivals
            .iter()
            .find(|(_, e, t)| (*e, *t) != reference)
            .map(|(c, _, _)| self.conns[*c].peer);
        let reply = match mismatch {
            Some(rank) => Reply::BarrierMismatch { rank: rank.0 },
            None => Reply::BarrierDone,
        };
        for (c, _, _) in arrivals {
            self.reply(c, &reply, &[&all]);
        }
    }

    /// Serves a fault request now if the page's manager lock is free, else queues it.
    fn acquire_or_queue(&mut self, idx: usize, region: &Arc<RegionShared>, req: Request) {
        let Request::Acquire { page, .. } = req else {
            return;
        };
        let lock = &region.slot(page).lock;
        loop {
            let s = lock.load(Ordering::Acquire);
            if s & LOCKED == 0 {
                if lock
                    .compare_exchange(s, s | LOCKED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.serve_acquire(idx, region, req);
                    return;
                }
                continue;
            }
            // Held: mark the page queued so that whoever unlocks wakes this loop, then re-check.
            if lock
                .compare_exchange(s, s | QUEUED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.queues
                    .entry((region.id, page))
                    .or_default()
                    .push_back((idx, req));
                return;
            }
        }
    }

    fn serve_queue(&mut self, region: &Arc<RegionShared>, page: u64) {
        let key = (region.id, page);
        let lock = &region.slot(page).lock;
        while lock.load(Ordering::Acquire) & LOCKED == 0 {
            let Some((idx, req)) = self.queues.get_mut(&key).and_then(|q| q.pop_front()) else {
                lock.fetch_and(!QUEUED, Ordering::AcqRel);
                self.queues.remove(&key);
                return;
            };
            self.acquire_or_queue(idx, region, req);
        }
    }

    fn serve_all_queues(&mut self) {
        let keys: Vec<(u32, u64)> = self.queues.keys().copied().collect();
        for (id, page) in keys {
            match self.shared.region(id) {
                Some(r) => self.serve_queue(&r, page),
                None => {
                    self.queues.remove(&(id, page));
                }
            }
        }
    }

    /// Applies a home action to this rank's own copy; returns whether `scratch` holds the page bytes taken
    /// before an invalidation.
    fn home_action(
        &mut self,
        region: &RegionShared,
        page: u64,
        action: HomeAction,
        keep_bytes: bool,
    ) -> bool {
        let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
        match action {
            HomeAction::None => false,
            HomeAction::Downgrade => {
                if st == READ_WRITE {
                    self.protect_or_die(region, page);
                    set_state(region.state(page), READ_ONLY);
                }
                false
            }
            HomeAction::Invalidate => {
                if st == INVALID {
                    return false;
                }
                if keep_bytes {
                    if st == READ_WRITE {
                        self.protect_or_die(region, page);
                    }
                    region.read_page(page, &mut self.scratch);
                }
                self.drop_copy(region, page);
                keep_bytes
            }
        }
    }

    fn serve_acquire(&mut self, idx: usize, region: &Arc<RegionShared>, req: Request) {
        let Request::Acquire {
            page,
            access,
            count,
            direct,
            ..
        } = req
        else {
            return;
        };
        let requester = self.conns[idx].peer;
        let me = self.shared.me;
        if self.shared.failed[requester.index()].load(Ordering::Acquire) || !self.conns[idx].open {
            // A request queued by a rank that has failed since: nobody waits for the answer, and a grant
            // would keep the page locked for an Unlock that never comes.
            if unlock_slot(&region.slot(page).lock) {
                self.serve_queue(region, page);
            }
            return;
        }
        if region.home(page) != me {
            if unlock_slot(&region.slot(page).lock) {
                self.serve_queue(region, page);
            }
            self.reply(
                idx,
                &Reply::Refused {
                    reason: RefusedReason::WrongRank,
                },
                &[],
            );
            return;
        }
        let slot = region.slot(page);
        let mut entry = slot.load();
        let gone = &self.shared.gone;
        entry.forget_readers(|r| gone[r.index()].load(Ordering::Acquire));
        match swmr::decide(&mut entry, me, requester, access) {
            Decision::Done { home_action, data } => {
                let copied = self.home_action(region, page, home_action, data == Data::Home);
                slot.store(&entry);
                let mut pages = vec![page];
                if access == Access::Read && data != Data::None {
                    self.gather_readahead(
                        region,
                        page,
                        count.min(MAX_READAHEAD),
                        requester,
                        &mut pages,
                    );
                } else if access == Access::Write && data == Data::Zero {
                    self.gather_untouched(
                        region,
                        page,
                        count.min(ZERO_FILL_MAX as u32),
                        requester,
                        &mut pages,
                    );
                }
                // One page, or several for read-ahead (each present here now, downgraded, or untouched:
                // zeros), or several untouched pages for a first writer (zeros, no payload).
                let owned = std::mem::take(&mut self.scratch);
                let reply_data = if pages.len() > 1 && access == Access::Read {
                    Data::Home
                } else {
                    data
                };
                let slices: Vec<&[u8]> = match reply_data {
                    Data::Home => pages
                        .iter()
                        .map(|p| {
                            if *p == page && copied {
                                &owned[..]
                            } else if region.state(*p).load(Ordering::Acquire) & STATE_MASK
                                == INVALID
                            {
                                &ZERO_PAGE[..]
                            } else {
                                region.present_page(*p)
                            }
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Counters::add(&self.shared.counters.pages_sent, slices.len() as u64);
                if data == Data::None {
                    // An upgrade: the lock stays held until the requester's Unlock. Recorded before the
                    // reply goes out, so that a failure while sending it finds the page to release.
                    self.held_by.insert((region.id, page), (requester, access));
                }
                let count = pages.len() as u32;
                let mut sent = false;
                if self.conns[idx].open {
                    let writable = access == Access::Write;
                    let installed = reply_data == Data::Home
                        && direct
                        && self.install_directly(requester, region, &pages, &slices, writable);
                    let (reply, payload) = if installed {
                        (Reply::Installed { count }, &[][..])
                    } else {
                        let data = reply_data;
                        (Reply::Done { data, count }, &slices[..])
                    };
                    match write_frame(
                        self.conns[idx].fd.as_fd(),
                        &reply,
                        payload,
                        &self.shared.counters,
                    ) {
                        Ok(()) => sent = true,
                        Err(e) => {
                            drop(slices);
                            self.close(idx, &format!("sending pages failed: {e}"));
                        }
                    }
                }
                if !sent && data == Data::Zero && access == Access::Write {
                    // Untouched pages handed to a first writer that never heard of them stay untouched,
                    // so that nobody later has to ask a failed rank for them. (Each of them was untouched:
                    // `gather_untouched` takes no other.)
                    for &p in &pages {
                        region.slot(p).store(&swmr::Entry::default());
                    }
                }
                self.scratch = owned;
                if data != Data::None {
                    // The requester held no copy: release now; no Unlock follows (see `fault`).
                    for p in pages {
                        if unlock_slot(&region.slot(p).lock) {
                            self.serve_queue(region, p);
                        }
                    }
                }
            }
            Decision::Grant(grant) => {
                let copied =
                    self.home_action(region, page, grant.home_action, grant.data_from_home);
                if grant.data_from_home {
                    Counters::add(&self.shared.counters.pages_sent, 1);
                }
                let owned = std::mem::take(&mut self.scratch);
                let payload: &[u8] = if copied { &owned } else { &[] };
                self.held_by.insert((region.id, page), (requester, access));
                self.reply(idx, &Reply::Granted { grant }, &[payload]);
                self.scratch = owned;
            }
        }
    }

    /// Adds to `pages` the following pages that the home can hand out read-only at once: homed here, lock
    /// free, and either untouched or owned by the home. Like the faulting page, they are released as soon as
    /// the reply is sent (the requester held no copy of them; see `fault`).
    fn gather_readahead(
        &mut self,
        region: &RegionShared,
        page: u64,
        count: u32,
        requester: Rank,
        pages: &mut Vec<u64>,
    ) {
        let me = self.shared.me;
        let mut run: Option<(u64, u64)> = None;
        for p in following_here(region, page, count, me) {
            let lock = &region.slot(p).lock;
            if !try_lock_slot(lock) {
                break;
            }
            let slot = region.slot(p);
            let mut entry = slot.load();
            match swmr::decide(&mut entry, me, requester, Access::Read) {
                Decision::Done {
                    home_action,
                    data: data @ (Data::Home | Data::Zero),
                } => {
                    // Untouched pages (zeros) change nothing here. Writable home copies are downgraded below,
                    // one UFFDIO_WRITEPROTECT per contiguous run rather than one per page.
                    let writable =
                        region.state(p).load(Ordering::Acquire) & STATE_MASK == READ_WRITE;
                    if data == Data::Home && home_action == HomeAction::Downgrade && writable {
                        match &mut run {
                            Some((start, len)) if *start + *len == p => *len += 1,
                            _ => {
                                self.downgrade_run(region, run.take());
                                run = Some((p, 1));
                            }
                        }
                    }
                    slot.store(&entry);
                    pages.push(p);
                }
                _ => {
                    if unlock_slot(lock) {
                        // A queued request for this page is served when the loop next looks at its queues.
                        self.shared.wake_service();
                    }
                    break;
                }
            }
        }
        self.downgrade_run(region, run);
    }

    /// Adds to `pages` the following pages that nobody has touched, homed here with their manager locks
    /// free, each handed to `requester` as its first writer (zeros): write-ahead for a sequential first
    /// writer. Like the faulting page, they are released as soon as the reply is sent.
    fn gather_untouched(
        &mut self,
        region: &RegionShared,
        page: u64,
        count: u32,
        requester: Rank,
        pages: &mut Vec<u64>,
    ) {
        for p in following_here(region, page, count, self.shared.me) {
            if !lock_untouched(region, p) {
                break;
            }
            give_untouched(region, p, requester, Access::Write);
            pages.push(p);
        }
    }

    /// Write-protects a run of writable home pages `(start, count)` with one ioctl and marks them read-only.
    fn downgrade_run(&mut self, region: &RegionShared, run: Option<(u64, u64)>) {
        let Some((start, count)) = run else { return };
        if let Err(e) = region.protect(start, count, true) {
            self.die(&format!(
                "write-protecting pages {start}..{} of region {} failed: {e}",
                start + count,
                region.id
            ));
        }
        for p in start..start + count {
            set_state(region.state(p), READ_ONLY);
        }
    }

    /// A leaf request found no copy here. If a thread of this rank is installing the page (the home answered
    /// it and released the page before the install), the request waits for the install; returns true then.
    /// Otherwise the ranks disagree about the page, and the request is refused (also true: it is handled).
    /// Returns false when the page got installed meanwhile: serve the request now.
    fn defer_or_refuse(
        &mut self,
        idx: usize,
        region: &RegionShared,
        page: u64,
        req: Request,
    ) -> bool {
        let word = region.state(page);
        loop {
            let s = word.load(Ordering::Acquire);
            if s & STATE_MASK != INVALID {
                return false;
            }
            if s & BUSY == 0 {
                let reason = RefusedReason::NoCopyHere;
                self.reply(idx, &Reply::Refused { reason }, &[]);
                return true;
            }
            if word
                .compare_exchange(s, s | DEFERRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.deferred.push((idx, req, Vec::new()));
                return true;
            }
        }
    }

    fn fetch(&mut self, idx: usize, region: &Arc<RegionShared>, page: u64) {
        let req = Request::Fetch {
            region: region.id,
            page,
        };
        if self.defer_or_refuse(idx, region, page, req) {
            return;
        }
        let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
        if st == READ_WRITE {
            self.protect_or_die(region, page);
            set_state(region.state(page), READ_ONLY);
        }
        Counters::add(&self.shared.counters.pages_sent, 1);
        let region = region.clone();
        self.reply(idx, &Reply::Page, &[region.present_page(page)]);
    }

    fn invalidate(&mut self, idx: usize, region: &Arc<RegionShared>, page: u64, send_data: bool) {
        let req = Request::Invalidate {
            region: region.id,
            page,
            send_data,
        };
        if self.defer_or_refuse(idx, region, page, req) {
            return;
        }
        let st = region.state(page).load(Ordering::Acquire) & STATE_MASK;
        if send_data {
            if st == READ_WRITE {
                self.protect_or_die(region, page);
            }
            region.read_page(page, &mut self.scratch);
        }
        self.drop_copy(region, page);
        if send_data {
            Counters::add(&self.shared.counters.pages_sent, 1);
            let owned = std::mem::take(&mut self.scratch);
            self.reply(idx, &Reply::Page, &[&owned]);
            self.scratch = owned;
        } else {
            self.reply(idx, &Reply::Ack, &[]);
        }
    }

    /// Takes a page's BUSY bit (setting `extra` with it) and returns the page word as it was, with the
    /// request's payload; or, when a fault of this rank holds the page, marks it DEFERRED and parks the
    /// request until the fault is done (the faulting thread wakes this loop), returning `None`.
    fn claim_or_defer(
        &mut self,
        idx: usize,
        region: &RegionShared,
        page: u64,
        extra: u32,
        req: Request,
        payload: Vec<u8>,
    ) -> Option<(u32, Vec<u8>)> {
        let word = region.state(page);
        loop {
            let s = word.load(Ordering::Acquire);
            let next = if s & BUSY != 0 {
                s | DEFERRED
            } else {
                s | BUSY | extra
            };
            if word
                .compare_exchange(s, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if s & BUSY != 0 {
                    self.deferred.push((idx, req, payload));
                    return None;
                }
                return Some((s, payload));
            }
        }
    }

    /// Release consistency, at the home: sends the home's copy of a page (zeros when never touched here). The
    /// home's own threads may be writing the page meanwhile; see `RegionShared::snapshot_page`.
    fn fetch_page(
        &mut self,
        idx: usize,
        region: &Arc<RegionShared>,
        page: u64,
        count: u32,
        direct: bool,
    ) {
        if region.home(page) != self.shared.me {
            let reason = RefusedReason::WrongRank;
            self.reply(idx, &Reply::Refused { reason }, &[]);
            return;
        }
        // From now on the home's writes to these pages must be tracked: take each page (the first one waiting
        // for a fault of this rank in progress, the following ones only if free at once), mark it shared and
        // write-protect it, then send them.
        let req = Request::FetchPage {
            region: region.id,
            page,
            count,
            direct,
        };
        let Some((first, _)) = self.claim_or_defer(idx, region, page, SHARED, req, Vec::new())
        else {
            return;
        };
        let mut claimed = vec![(page, first)];
        for p in following_here(region, page, count.min(MAX_READAHEAD), self.shared.me) {
            let w = region.state(p);
            let s = w.load(Ordering::Acquire);
            if s & BUSY != 0
                || w.compare_exchange(s, s | BUSY | SHARED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                break;
            }
            claimed.push((p, s));
        }
        if claimed.len() == 1 && first & STATE_MASK == INVALID {
            crate::fault::release_busy(region, page);
            self.reply(
                idx,
                &Reply::Done {
                    data: Data::Zero,
                    count: 1,
                },
                &[],
            );
            return;
        }
        // Pages written here in place are write-protected before they are copied, a run of neighbours per
        // system call (a page each cost a TLB shootdown each while this rank's threads run).
        let writable: Vec<u64> = claimed
            .iter()
            .filter(|(_, s)| s & STATE_MASK == READ_WRITE && s & WRITTEN == 0)
            .map(|&(p, _)| p)
            .collect();
        if let Err((done, e)) = region.protect_runs(&writable, true) {
            self.die(&format!(
                "write-protecting page {} for a fetch failed: {e}",
                writable[done]
            ));
        }
        for &p in &writable {
            set_state(region.state(p), READ_ONLY);
        }
        let mut bytes = vec![0u8; claimed.len() * PAGE_SIZE];
        for (i, (p, s)) in claimed.iter().enumerate() {
            if s & STATE_MASK == INVALID {
                continue; // never touched here: zeros
            }
            region.snapshot_page(*p, &mut bytes[i * PAGE_SIZE..]);
        }
        for (p, _) in &claimed {
            crate::fault::release_busy(region, *p);
        }
        Counters::add(&self.shared.counters.pages_sent, claimed.len() as u64);
        let count = claimed.len() as u32;
        let requester = self.conns[idx].peer;
        let installed =
            direct && self.conns[idx].open && self.direct[requester.index()].is_some() && {
                let pages: Vec<u64> = claimed.iter().map(|(p, _)| *p).collect();
                let sources: Vec<&[u8]> = bytes.chunks(PAGE_SIZE).collect();
                self.install_directly(requester, region, &pages, &sources, false)
            };
        if installed {
            self.reply(idx, &Reply::Installed { count }, &[]);
        } else {
            let reply = Reply::Done {
                data: Data::Home,
                count,
            };
            self.reply(idx, &reply, &[&bytes]);
        }
    }

    /// Installs `pages` (with their bytes in `sources`) straight into `peer`'s memory if this rank holds its
    /// userfaultfd (`direct.rs`); returns whether it did. After a failure the peer gets the bytes over
    /// its connection, now and from then on: whatever it had installed already, the install it does itself
    /// skips (`UFFDIO_COPY` leaves present pages alone, and they hold the same bytes).
    fn install_directly(
        &mut self,
        peer: Rank,
        region: &RegionShared,
        pages: &[u64],
        sources: &[&[u8]],
        writable: bool,
    ) -> bool {
        let Some(fd) = &self.direct[peer.index()] else {
            return false;
        };
        match direct::install(fd.as_fd(), region, pages, sources, writable) {
            Ok(()) => {
                Counters::add(
                    &self.shared.counters.pages_installed_into_peers,
                    pages.len() as u64,
                );
                true
            }
            Err(e) => {
                // Out of memory (the peer's, charged to it either way): this reply goes over the
                // connection. Anything else means the peer's memory is out of reach. (`uffd::copy` retries
                // EAGAIN and EINTR itself.)
                let lasting = e != Errno::ENOMEM;
                tracing::warn!(
                    "{}: installing pages into {peer} directly failed ({e}); sending them{}",
                    self.shared.me,
                    if lasting { " from now on" } else { "" }
                );
                if lasting {
                    self.direct[peer.index()] = None;
                }
                false
            }
        }
    }

    /// Release consistency, at the home: applies a diff to the home's copy and acknowledges it. The page
    /// counts as written in the home's own open interval (marked before it is made writable here, if it was
    /// not), so that the home write-protects it again and announces it at its next release.
    fn apply_diff(&mut self, idx: usize, region: &Arc<RegionShared>, page: u64, diff: Vec<u8>) {
        let word = region.state(page);
        // Exclude this rank's faults on the page while it changes; a fault in progress finishes first.
        let req = Request::Diff {
            region: region.id,
            page,
        };
        let Some((claimed, diff)) = self.claim_or_defer(idx, region, page, 0, req, diff) else {
            return;
        };
        let st = claimed & STATE_MASK;
        if word.fetch_or(WRITTEN, Ordering::AcqRel) & WRITTEN == 0 {
            // Recorded before the page becomes writable: from then on this rank's threads write it without
            // a fault, so a release that drained the dirty list between the two would leave their writes out
            // of its notice, and the other ranks would read stale copies for a whole interval.
            region
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(page);
        }
        let made_writable = match st {
            INVALID => region.install(page, 1, &ZERO_PAGE, true),
            READ_ONLY => region.protect(page, 1, false),
            _ => Ok(()),
        };
        if let Err(e) = made_writable {
            // This rank's own failure (the kernel refused), not the sender's: the home cannot keep its
            // pages right, and blaming the sender would end the job naming a healthy rank.
            crate::fault::release_busy(region, page);
            self.die(&format!(
                "making page {page} of region {} writable for a diff failed: {e}",
                region.id
            ));
        }
        set_state(word, READ_WRITE);
        let applied = region.apply_diff(page, &diff);
        crate::fault::release_busy(region, page);
        match applied {
            Ok(_) => {
                Counters::add(&self.shared.counters.diffs_applied, 1);
                self.reply(idx, &Reply::Ack, &[]);
            }
            // A diff that does not decode: the sender is broken.
            Err(e) => self.close(idx, &format!("a diff for page {page}: {e}")),
        }
    }

    /// Drops this rank's copy: the state first (so that a new fault waits for the manager), then the page.
    fn drop_copy(&mut self, region: &RegionShared, page: u64) {
        set_state(region.state(page), INVALID);
        if let Err(e) = region.discard(page) {
            self.die(&format!(
                "MADV_DONTNEED of page {page} of region {} failed: {e}",
                region.id
            ));
        }
        Counters::add(&self.shared.counters.invalidations, 1);
    }

    fn protect_or_die(&mut self, region: &RegionShared, page: u64) {
        if let Err(e) = region.protect(page, 1, true) {
            self.die(&format!(
                "write-protecting page {page} of region {} failed: {e}",
                region.id
            ));
        }
    }

    fn die(&self, what: &str) -> ! {
        say(&format!(
            "dsm: {}: {what}; ending this rank",
            self.shared.me
        ));
        std::process::exit(crate::EXIT_INTERNAL);
    }
}

/// Whether the peer at the other end of a connection still has it open: a look at what waits to be read,
/// without taking it (the end of the stream, or an error, means it is gone). Asked of a peer that is
/// waiting for an answer, so it has nothing more to send.
fn connection_open(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recv(fd.as_raw_fd(), &mut byte, flags) {
        Ok(n) => n > 0,
        Err(e) => e == Errno::EAGAIN,
    }
}

/// Writes `line` and a newline to standard error in one `write`, so that the lines of ranks whose error
/// streams a launcher merges (mpirun does, unbuffered) do not run into each other (`eprintln!` writes a
/// formatted line piece by piece).
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// The pages after `page` that a reply of up to `count` pages can carry with it: each a stride on (the
/// next page, or in a cyclic region the next one with the same home), inside the region and homed at `me`.
fn following_here(
    region: &RegionShared,
    page: u64,
    count: u32,
    me: Rank,
) -> impl Iterator<Item = u64> + '_ {
    let stride = region.home_stride();
    (1..u64::from(count))
        .map(move |k| page + k * stride)
        .take_while(move |&p| p < region.pages && region.home(p) == me)
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
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_reply_of_more_slices_than_one_sendmsg_takes_goes_out_whole() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let pages: Vec<[u8; 3]> = (0..crate::channel::IOV_MAX + 300)
            .map(|i| [i as u8, (i >> 8) as u8, 7])
            .collect();
        let slices: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            b.read_to_end(&mut all).unwrap();
            all
        });
        let counters = Counters::default();
        let reply = Reply::Done {
            data: Data::Home,
            count: slices.len() as u32,
        };
        write_frame(a.as_fd(), &reply, &slices, &counters).unwrap();
        drop(a);
        let all = reader.join().unwrap();
        let body = wire::body_len(all[..4].try_into().unwrap(), usize::MAX >> 1).unwrap();
        assert_eq!(body, all.len() - 4);
        let (r, payload) = wire::decode::<Reply>(&all[4..]).unwrap();
        assert!(matches!(r, Reply::Done { count, .. } if count as usize == pages.len()));
        assert_eq!(payload, pages.concat());
    }
}
