//! Failures, as the service loop sees them: heartbeats and the peer timeout (`Liveness`), connections
//! that end or break, and what a peer's failure ends here (waiting barriers and locks, its page
//! transactions, the services' requests).

use super::*;
use crate::dsm::FailurePolicy;
use crate::transport::memory::Shut;
use crate::types::Rank;
use crate::wire::{Reply, Request};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// When this rank last sent every other rank its heartbeat, and (with a peer timeout:
/// `DsmBuilder::peer_timeout`) when it last heard from each.
#[derive(Debug)]
pub(super) struct Liveness {
    /// `None`: this rank takes nobody for failed on silence, but still sends heartbeats, for the ranks
    /// that do.
    pub(super) timeout: Option<Duration>,
    pub(super) heard: Vec<Instant>,
    pub(super) beat: Instant,
    /// When the loop last looked at the time: a long gap means that the loop itself was held up.
    pub(super) looked: Instant,
}

/// The longest time between two heartbeats, whatever this rank's own timeout: ranks may be given
/// different ones, and every timeout (at least [`MIN_PEER_TIMEOUT`]) must see two.
const MAX_BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest peer timeout a rank may be given (`DsmBuilder::peer_timeout`): two heartbeat intervals.
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_secs(2);

impl Liveness {
    /// How often heartbeats go out: four in this rank's timeout, and at least once a second.
    pub(super) fn interval(&self) -> Duration {
        self.timeout
            .map_or(MAX_BEAT_INTERVAL, |t| (t / 4).min(MAX_BEAT_INTERVAL))
    }

    /// The ranks not heard from for longer than the timeout at `now` (none without a timeout), other
    /// than `me` and those to `skip` (failed already, or left the job).
    pub(super) fn late(&self, now: Instant, me: usize, skip: impl Fn(usize) -> bool) -> Vec<Rank> {
        let Some(timeout) = self.timeout else {
            return Vec::new();
        };
        (0..self.heard.len())
            .filter(|&r| r != me && !skip(r) && now.duration_since(self.heard[r]) > timeout)
            .map(|r| Rank(r as u32))
            .collect()
    }
}

/// The most bytes of the reason a `PeerLost` carries.
pub(super) const MAX_LOST_REASON: usize = 512;

/// `s` cut to at most `max` bytes, at a character boundary.
pub(super) fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Engine {
    /// Sends heartbeats when they are due and, with a peer timeout, fails the ranks not heard from for it.
    pub(super) fn keep_time(&mut self) {
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
                || self.shared.left[r].load(Ordering::Acquire)
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
    pub(super) fn heard(&mut self, peer: Rank) {
        if self.liveness.timeout.is_some() {
            self.liveness.heard[peer.index()] = Instant::now();
        }
    }

    /// Connection `idx` reached its end: the end of its stream (`closed`), or a reset or another error.
    /// The end of a service-loop connection's stream is the peer's leaving the job. (Not a reset: nothing
    /// is ever written to the peer on that connection, so its kernel closes it with a FIN when the
    /// process ends, and a reset may come from the network while the peer lives on.)
    pub(super) fn reached_end(&mut self, idx: usize, closed: bool) {
        let conn = &mut self.conns[idx];
        conn.ended = true;
        if closed && conn.control {
            self.shared.gone[conn.peer.index()].store(true, Ordering::Release);
        }
    }

    /// Reads the watched connection `idx` (`Served::watched`) until it would wait, dropping what came,
    /// and stops watching it at its end.
    pub(super) fn watch_end(&mut self, idx: usize) {
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

    pub(super) fn close(&mut self, idx: usize, reason: &str) {
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

    pub(super) fn peer_failed(&mut self, peer: Rank, reason: &str) {
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
}
