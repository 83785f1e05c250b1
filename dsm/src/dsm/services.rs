//! Services: programs' own request handlers, registered on every rank and called on one (`Dsm::call`),
//! answered by that rank's service loop. The tuple space and the MapReduce shuffle are built on them.

use super::Dsm;
use crate::channel::{Channel, RecvError};
use crate::error::{DsmError, Result};
use crate::service::{Service, ServiceId, MAX_SERVICES};
use crate::types::Rank;
use crate::wire::{RefusedReason, Reply, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// The most payload bytes a service request (`Dsm::call`) carries: what a service loop accepts in one
/// frame, less room for the header.
pub const MAX_SERVICE_REQUEST: usize = crate::engine::MAX_REQUEST - 2 - crate::wire::MAX_HEADER;

/// Runs `f` with a request's payload, copied out of shared memory first when a slice of it lies in a
/// region (the error for an oversized request tells programs to send where data is, and some send it from
/// there): the pages it touches fault here, before a channel is claimed, instead of while a claimed
/// channel's connection is being written, where the fault would need a channel of its own and could wait
/// for ever for one.
pub(crate) fn outside_regions<R>(payload: &[&[u8]], f: impl FnOnce(&[&[u8]]) -> R) -> R {
    let in_region = |p: &[u8]| {
        let start = p.as_ptr() as usize;
        !p.is_empty()
            && (crate::region::lookup(start).is_some()
                || crate::region::lookup(start + p.len() - 1).is_some())
    };
    if payload.iter().any(|p| in_region(p)) {
        f(&[payload.concat().as_slice()])
    } else {
        f(payload)
    }
}

/// The error for a call to a rank past the job's `size`.
fn not_in_job(to: Rank, size: usize) -> DsmError {
    DsmError::Config(format!("{to} is not in this job of {size} ranks"))
}

impl Dsm {
    /// Registers `service` under `id` on this rank. Every rank registers the same services under the same
    /// ids, and should do so before any rank calls them (a call that arrives first is refused): register,
    /// then `barrier`.
    pub fn register_service(&self, id: ServiceId, service: Arc<dyn Service>) -> Result<()> {
        let mut services = self
            .shared
            .services
            .write()
            .unwrap_or_else(|p| p.into_inner());
        match services.get_mut(id as usize) {
            Some(slot @ None) => {
                *slot = Some(service);
                Ok(())
            }
            Some(Some(_)) => Err(DsmError::Config(format!(
                "service {id} is already registered on {}: register each service once per rank",
                self.shared.me
            ))),
            None => Err(DsmError::Config(format!(
                "service id {id} is out of range: use 0..{MAX_SERVICES}"
            ))),
        }
    }

    /// Removes the service registered under `id` on this rank, returning it. Calls that arrive afterwards
    /// are refused, as for an id never registered; a call being served finishes. Not collective: a
    /// program that registers the service again under the same id does so on every rank, then `barrier`,
    /// as the first time.
    pub fn unregister_service(&self, id: ServiceId) -> Option<Arc<dyn Service>> {
        let mut services = self
            .shared
            .services
            .write()
            .unwrap_or_else(|p| p.into_inner());
        services.get_mut(id as usize)?.take()
    }

    /// Whether a service is registered under `id` on this rank.
    pub fn service_registered(&self, id: ServiceId) -> bool {
        self.shared.service(id).is_some()
    }

    /// Sends `payload` (the concatenation of its slices, at most [`MAX_SERVICE_REQUEST`] bytes; an answer
    /// may be larger) to the service `id` of rank `to` and returns its answer. For requests the service
    /// answers without waiting for anything else to happen; use [`Dsm::call_waiting`] for those it may
    /// hold.
    pub fn call(&self, to: Rank, id: ServiceId, payload: &[&[u8]]) -> Result<Vec<u8>> {
        outside_regions(payload, |payload| {
            let mut ch = self.shared.channels.claim();
            self.exchange(&mut ch, to, id, payload, None)
        })
    }

    /// Like [`Dsm::call`], for a request the service may hold until something else happens (a blocked
    /// `in`). With a `deadline`, once it passes `cancel` is sent to the service on the same connection, and
    /// the call returns the service's answer to the original request, which the service must then give
    /// (either what was asked for, if it was already on its way, or word of the cancellation). Fails with
    /// `TimedOut` if the deadline passes before the request could be sent (other threads' waiting calls
    /// held every channel), and with `PeerFailed` if `to` fails meanwhile.
    pub fn call_waiting(
        &self,
        to: Rank,
        id: ServiceId,
        payload: &[&[u8]],
        deadline: Option<(Instant, &[u8])>,
    ) -> Result<Vec<u8>> {
        outside_regions(payload, |payload| {
            // Other threads' calls may hold every channel for as long as they wait: the deadline also
            // bounds the wait for one.
            let s = &self.shared;
            if to.index() >= s.size {
                return Err(not_in_job(to, s.size));
            }
            let mut ch = s.claim_for_waiting_on(to, deadline.map(|(d, _)| d), || {
                format!("for a call to service {id} of {to}")
            })?;
            self.exchange(&mut ch, to, id, payload, deadline)
        })
    }

    fn exchange(
        &self,
        ch: &mut Channel,
        to: Rank,
        id: ServiceId,
        payload: &[&[u8]],
        deadline: Option<(Instant, &[u8])>,
    ) -> Result<Vec<u8>> {
        let s = &self.shared;
        if to.index() >= s.size {
            return Err(not_in_job(to, s.size));
        }
        if s.failed[to.index()].load(Ordering::Acquire) {
            return Err(s.peer_failed_error(to, "it failed earlier in this job".into()));
        }
        let bytes: usize = payload.iter().map(|p| p.len()).sum();
        if bytes > MAX_SERVICE_REQUEST {
            return Err(DsmError::Config(format!(
                "a service request of {bytes} bytes: a request carries at most {MAX_SERVICE_REQUEST} bytes (answers may be larger); put large data in a shared region and send where it is"
            )));
        }
        let lost = |e: RecvError| s.peer_error(to, e);
        let request = Request::Service { id };
        ch.send(&s.counters, to, &request, payload)
            .map_err(|e| lost(RecvError::Sys(e)))?;
        if let Some((deadline, cancel)) = deadline {
            if !ch.wait_readable(to, deadline).map_err(lost)? {
                ch.send(&s.counters, to, &Request::ServiceCancel { id }, &[cancel])
                    .map_err(|e| lost(RecvError::Sys(e)))?;
            }
        }
        let (reply, answer) = ch.recv_owned(&s.counters, to).map_err(lost)?;
        match reply {
            Reply::Service => Ok(answer),
            Reply::Refused {
                reason: RefusedReason::UnknownService,
            } => Err(DsmError::NoSuchService { rank: to, id }),
            other => Err(DsmError::Protocol {
                rank: to,
                what: format!("unexpected answer to a service request: {other:?}"),
            }),
        }
    }
}
