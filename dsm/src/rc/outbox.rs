//! The diffs a release sends: made page by page into batches, one per home, sent as they fill, with
//! at most `DIFF_WINDOW` in flight before the release waits for the homes' acknowledgements.

use crate::channel::RecvError;
use crate::dsm::Shared;
use crate::error::{DsmError, Result};
use crate::protocol::diff;
use crate::region::RegionShared;
use crate::stats::Counters;
use crate::types::Rank;
use crate::wire::{Reply, Request};

/// Diff bytes past which a batch to a home is closed and the next one begun: a home applies a batch in one
/// go, so the bound keeps its service loop answering others meanwhile, and its receive buffer small.
const BATCH_BYTES: usize = 256 << 10;

/// The diffs of one region's pages to their homes, a message to a home at a time (a batch: see
/// `protocol::diff`). Their pages are held BUSY until their homes acknowledge them; the twins are kept till
/// then.
#[derive(Default)]
pub(super) struct Outbox {
    pub(super) batches: Vec<Batch>,
    /// Where the diff `add` added last is: its batch, and its bytes there.
    pub(super) last: Option<(usize, std::ops::Range<usize>)>,
}

pub(super) struct Batch {
    pub(super) home: Rank,
    /// In increasing order, as the batch holds them.
    pub(super) pages: Vec<u64>,
    pub(super) bytes: Vec<u8>,
    /// Of `bytes`, those of diffs (the rest are the entries' headers).
    pub(super) diff_bytes: usize,
}

impl Outbox {
    /// Adds the diff of a twinned page (held BUSY, write-protected) against its twin to a batch for its
    /// home: the last one, unless it is full or holds a later page. Returns false (adding nothing) when the
    /// page equals its twin.
    pub(super) fn add(&mut self, region: &RegionShared, page: u64) -> bool {
        let home = region.home(page);
        let open = self.batches.iter().rposition(|b| b.home == home);
        let i = match open {
            Some(i)
                if self.batches[i].bytes.len() < BATCH_BYTES
                    && self.batches[i].pages.last().is_some_and(|&p| p < page) =>
            {
                i
            }
            _ => {
                self.batches.push(Batch {
                    home,
                    pages: Vec::new(),
                    bytes: Vec::new(),
                    diff_bytes: 0,
                });
                self.batches.len() - 1
            }
        };
        let batch = &mut self.batches[i];
        let n = diff::push_entry(
            page,
            region.twin(page),
            region.present_page(page),
            &mut batch.bytes,
        );
        if n == 0 {
            if batch.pages.is_empty() {
                self.batches.remove(i);
            }
            return false;
        }
        batch.pages.push(page);
        batch.diff_bytes += n;
        self.last = Some((i, batch.bytes.len() - n..batch.bytes.len()));
        true
    }

    pub(super) fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.batches.iter().flat_map(|b| b.pages.iter().copied())
    }

    /// The diff `add` put in a batch last (after it returned true).
    pub(super) fn last_diff(&self) -> &[u8] {
        self.last
            .as_ref()
            .and_then(|(i, r)| self.batches.get(*i)?.bytes.get(r.clone()))
            .unwrap_or_default()
    }
}

/// Sends batches of diffs of `region`'s pages to their homes and waits for their acknowledgements. The
/// caller holds the pages BUSY (so no thread of this rank fetches them again before their homes have the
/// diffs) and no channel. Returns which batches their homes acknowledged (`true` at their index), and the
/// first error. A home that fails takes no more diffs, but the others' are still sent and their
/// acknowledgements read: a diff a home applied must not stay twinned (sent again after later writes by
/// others, it would undo them), and an acknowledgement left unread would go back to the pool with the
/// channel and be taken by its next user for an answer of its own.
pub(super) fn send_diffs(
    shared: &Shared,
    region: u32,
    batches: &[Batch],
    selective: bool,
) -> (Vec<bool>, Result<()>) {
    let mut acked = vec![false; batches.len()];
    if batches.is_empty() {
        return (acked, Ok(()));
    }
    let c = &shared.counters;
    let mut ch = shared.channels.claim();
    // Homes whose connection on this channel failed: nothing more is sent to them or read from them. A
    // home that answers a batch with something other than an acknowledgement (refusing it, or with a
    // malformed frame, which is read to its end) is not one of them: it answers each batch once, so the
    // rest of its answers are still read.
    let mut broken: Vec<Rank> = Vec::new();
    let mut first_error = None;
    let mut sent = vec![false; batches.len()];
    for (i, batch) in batches.iter().enumerate() {
        let home = batch.home;
        if broken.contains(&home) {
            continue;
        }
        Counters::add(&c.diffs, batch.pages.len() as u64);
        Counters::add(&c.diff_bytes, batch.diff_bytes as u64);
        let request = Request::Diffs {
            region,
            count: batch.pages.len() as u32,
            selective,
        };
        match ch.send(c, home, &request, &[&batch.bytes]) {
            Ok(()) => sent[i] = true,
            Err(e) => {
                broken.push(home);
                first_error.get_or_insert_with(|| {
                    shared.peer_failed_error(home, format!("sending diffs: {e}"))
                });
            }
        }
    }
    for (i, batch) in batches.iter().enumerate() {
        let home = batch.home;
        if !sent[i] || broken.contains(&home) {
            continue;
        }
        match ch.recv(c, home) {
            Ok((Reply::Ack, _, _)) => acked[i] = true,
            Ok((other, _, _)) => {
                first_error.get_or_insert(DsmError::Protocol {
                    rank: home,
                    what: format!("expected a diff ack, got {other:?}"),
                });
            }
            // A malformed answer was read to its end (the connection stays aligned on frames), so the
            // home's other answers are still read.
            Err(RecvError::Frame(e)) => {
                first_error.get_or_insert(DsmError::Protocol {
                    rank: home,
                    what: format!("a malformed answer to diffs: {e}"),
                });
            }
            Err(e) => {
                broken.push(home);
                first_error.get_or_insert_with(|| shared.peer_failed_error(home, e.to_string()));
            }
        }
    }
    (acked, first_error.map_or(Ok(()), Err))
}
