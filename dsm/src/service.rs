//! Services: request handlers that the layers above the shared memory (the tuple space of `dsm-runtime`)
//! run in every rank's service loop, over the job's own connections. `dsm` carries their bytes and knows
//! nothing of what they mean.
//!
//! A service is called on the service-loop thread and must never block there: it answers at once, or keeps
//! the [`Responder`] and answers later from any thread (a blocked `in` is answered by the `out` that
//! satisfies it). Every request gets at most one answer; a request that expects none (a cancellation) is
//! simply dropped. A requester sends on one channel and waits for the answer on it, so each connection has
//! at most one request outstanding, and a late answer from an application thread never interleaves with
//! another frame on its connection. The service loop holds peers to that: a request (other than a
//! cancellation) that comes on a connection whose last request is still unanswered closes the connection,
//! as any protocol error does, instead of holding one more waiting request here.

use crate::channel::write_frame;
use crate::dsm::Shared;
use crate::error::Result;
use crate::transport::memory::Shut;
use crate::transport::Conn;
use crate::types::Rank;
use crate::wire::Reply;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Names a service; every rank registers the same services under the same ids.
pub type ServiceId = u8;

/// The largest number of services a job can register.
pub const MAX_SERVICES: usize = 8;

/// A request handler run in the service loop of every rank.
pub trait Service: Send + Sync + std::fmt::Debug + 'static {
    /// A request from `from`. Runs on the service-loop thread: answer through `reply` now, or keep it and
    /// answer later, but never block, and never read or write shared regions (a page fault there could
    /// not be served, this loop, or the transport thread running it, being what serves it: the rank ends
    /// saying so).
    fn request(&self, from: Rank, payload: Vec<u8>, reply: Responder);

    /// `rank` failed (under `FailurePolicy::Report`; under `Exit` this rank ends instead). Requests it has
    /// waiting here can be dropped, and what it held given back. Runs on the service-loop thread.
    fn peer_failed(&self, rank: Rank) {
        let _ = rank;
    }
}

/// The way back to one request's sender. Dropping it unanswered sends nothing.
#[derive(Debug)]
pub struct Responder {
    pub(crate) link: Arc<Conn>,
    pub(crate) peer: Rank,
    pub(crate) shared: Arc<Shared>,
    /// The connection's mark that a request on it waits for its answer, cleared once this one is answered
    /// (or dropped unanswered); `None` for a cancellation (`Request::ServiceCancel`), which is never
    /// answered.
    pub(crate) waiting: Option<Arc<AtomicBool>>,
}

impl Responder {
    /// The rank that sent the request.
    pub fn peer(&self) -> Rank {
        self.peer
    }

    /// Whether the request withdraws one sent before on its connection (a call that gave up waiting).
    /// A cancellation is never answered: [`Responder::send`] sends nothing for it, since the requester
    /// would read that answer as the reply to its next request on the connection.
    pub fn cancels(&self) -> bool {
        self.waiting.is_none()
    }

    /// Answers the request with the concatenation of `payload`'s slices. An error means the sender is gone,
    /// or stopped reading for half the peer timeout: the rank is then failed, as when a reply of the service
    /// loop's own cannot reach it (what it held is given back through [`Service::peer_failed`]; a
    /// sender that lives on sees its connections end instead of an answer it would read only in part).
    ///
    /// A payload that lies in a shared region is copied out of it first (a thread answering later may
    /// send from there; the service loop's own thread may not, see [`Service`]): the kernel, writing the
    /// connection, would take a page not present here for a bad address, and the answer would fail.
    pub fn send(mut self, payload: &[&[u8]]) -> Result<()> {
        crate::dsm::outside_regions(payload, |payload| self.write(payload))
    }

    fn write(&mut self, payload: &[&[u8]]) -> Result<()> {
        if !self.answered() {
            return Ok(());
        }
        write_frame(&self.link, &Reply::Service, payload, &self.shared.counters).map_err(|e| {
            // Part of the answer may have gone out: the connection ends, so that a sender that reads on
            // (one that was stopped, and resumes) sees it end instead of waiting for ever for the rest.
            self.link.shutdown(Shut::Write);
            let reason = format!("answering its request failed: {e}");
            self.shared
                .unreachable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((self.peer, reason.clone()));
            self.shared.wake_service();
            self.shared.peer_failed_error(self.peer, reason)
        })
    }

    /// Clears the connection's mark for this request, before its answer goes out (the requester, once it
    /// has the answer, may send its next request at once); false for a cancellation.
    fn answered(&mut self) -> bool {
        match self.waiting.take() {
            Some(waiting) => {
                waiting.store(false, Ordering::Release);
                true
            }
            None => false,
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.answered();
    }
}
