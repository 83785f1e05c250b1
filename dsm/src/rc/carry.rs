//! Diffs that a barrier arrival carries to rank 0.
//!
//! At a barrier's release a rank other than 0 sends its diffs to their homes and waits for their
//! acknowledgements before it arrives: two round trips to rank 0 when rank 0 is the home, which it is of
//! much of what ranks share (a reduction's slots, a page every rank writes a word of). Instead, up to
//! `CARRY_BYTES` of the diff batches for pages homed at rank 0 go with the arrival itself, and rank 0, the
//! barrier's manager, applies them when the arrival comes, before it answers anyone: no rank can pass the
//! barrier, and learn of the writes from its notices, before rank 0 holds them.
//!
//! Until rank 0 has applied them, this rank's own threads must not let anyone learn of those writes
//! another way: a lock released by another thread while the arrival is on its way passes on the barrier's
//! notices too (they are in the snapshot of notices it passes), a range released selectively promises
//! that every write before it is at its home, and a page dropped at an acquire would be fetched again
//! from a home that lacks them. So the carry waits in `Shared::carry` until the barrier's answer comes, and
//! every release (a lock's, under the same hold of `Shared::rc` as its snapshot of notices), selective
//! release and acquire that takes in notices first delivers a carry still waiting there (`deliver`: the
//! same bytes, in a request of their own). Rank 0 applies each carry once, by its number: whichever of the
//! two copies comes second is passed over. When rank 0 has failed, these go on without it and fail
//! naming it at the end (what it homed is lost with it).

use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::stats::Counters;
use crate::types::Rank;
use crate::wire::{Reply, Request};
use serde::{Deserialize, Serialize};

/// The most bytes of diff batches one barrier arrival carries to rank 0; batches past it go to rank 0
/// before the arrival, as at any release.
pub(crate) const CARRY_BYTES: usize = 64 << 10;

/// A rank's carry as it travels.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Carry {
    /// The rank's carries are numbered from 1: rank 0 applies one numbered above the last it applied from
    /// that rank, and passes over any other.
    pub seq: u64,
    /// At most one batch a region.
    pub batches: Vec<CarriedBatch>,
}

/// A batch of `count` diffs of pages of `region` homed at rank 0, encoded as `protocol::diff` encodes a
/// batch (the payload of a `Request::Diffs`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct CarriedBatch {
    pub region: u32,
    pub count: u32,
    pub bytes: Vec<u8>,
}

/// A rank's carries: the number of the last, and the one not yet known to be at rank 0, encoded.
#[derive(Debug, Default)]
pub(crate) struct CarrySlot {
    seq: u64,
    waiting: Option<(u64, Vec<u8>)>,
}

/// The batches a barrier's release gathers to carry, within `CARRY_BYTES`.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    batches: Vec<CarriedBatch>,
    bytes: usize,
}

impl Gathered {
    /// Whether a batch of `len` bytes of `region`'s diffs fits: at most one batch a region.
    pub(crate) fn fits(&self, region: u32, len: usize) -> bool {
        self.bytes + len <= CARRY_BYTES && !self.batches.iter().any(|b| b.region == region)
    }

    /// Adds `bytes`, a batch of `count` diffs of `region`'s pages homed at rank 0, which `fits`.
    pub(crate) fn add(&mut self, region: u32, count: u32, bytes: Vec<u8>) {
        self.bytes += bytes.len();
        self.batches.push(CarriedBatch {
            region,
            count,
            bytes,
        });
    }
}

/// Puts what a barrier's release gathered in `shared`'s slot, numbered, for its arrival to carry. The
/// caller holds `Shared::rc`, under which the slot was emptied (`deliver`) before the release began.
pub(crate) fn hold(shared: &Shared, gathered: Gathered) {
    if gathered.batches.is_empty() {
        return;
    }
    let mut slot = shared.carry.lock().unwrap_or_else(|p| p.into_inner());
    slot.seq += 1;
    let carry = Carry {
        seq: slot.seq,
        batches: gathered.batches,
    };
    // A struct of integers and byte vectors always encodes.
    let bytes = postcard::to_allocvec(&carry).unwrap_or_default();
    debug_assert!(slot.waiting.is_none(), "a carry was left undelivered");
    slot.waiting = Some((carry.seq, bytes));
}

/// The carry waiting for the barrier arrival to take it (its number and bytes), if any.
pub(crate) fn waiting(shared: &Shared) -> Option<(u64, Vec<u8>)> {
    shared
        .carry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .waiting
        .clone()
}

/// Rank 0 has applied carry `seq`: it answered the arrival that carried it.
pub(crate) fn arrived(shared: &Shared, seq: u64) {
    let mut slot = shared.carry.lock().unwrap_or_else(|p| p.into_inner());
    if slot.waiting.as_ref().is_some_and(|(s, _)| *s == seq) {
        slot.waiting = None;
    }
}

/// Sends a carry still waiting to rank 0 and waits for its acknowledgement (see the module's comment),
/// holding the slot's lock throughout. The caller holds `Shared::rc`, and no channel. On an error the carry
/// stays, for the next release or acquire to try, and no new one is made meanwhile.
pub(crate) fn deliver(shared: &Shared) -> Result<()> {
    let mut slot = shared.carry.lock().unwrap_or_else(|p| p.into_inner());
    let Some((_, bytes)) = &slot.waiting else {
        return Ok(());
    };
    let root = Rank(0);
    let c = &shared.counters;
    let mut ch = shared.channels.claim();
    ch.send(c, root, &Request::Carried, &[bytes])
        .map_err(|e| shared.peer_failed_error(root, format!("sending carried diffs: {e}")))?;
    match ch.recv(c, root) {
        Ok((Reply::Ack, _, _)) => {
            slot.waiting = None;
            Ok(())
        }
        Ok((other, _, _)) => Err(DsmError::Protocol {
            rank: root,
            what: format!("expected an ack of carried diffs, got {other:?}"),
        }),
        Err(e) => Err(shared.peer_failed_error(root, e.to_string())),
    }
}

/// Counts a carried batch of `count` diffs in `bytes` bytes.
pub(crate) fn count(shared: &Shared, count: usize, bytes: usize) {
    let c = &shared.counters;
    Counters::add(&c.diffs, count as u64);
    Counters::add(&c.diff_bytes, bytes as u64);
    Counters::add(&c.diffs_carried, count as u64);
}
