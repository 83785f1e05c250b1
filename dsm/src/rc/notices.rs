//! How write notices, their horizons and vector clocks travel between ranks: notices with their runs of
//! consecutive pages, every decoded message checked against the job's size and its runs for overflow, so
//! that a peer's bytes can neither name ranks that do not exist nor make decoding allocate more than in
//! proportion to the message's size (a run of any length takes the same memory). An acquire then merges
//! the runs of every notice it takes before the engine walks them, each clamped to its region, so the
//! pages it looks at are at most the regions' pages, however many notices or runs name them.

use crate::error::{DsmError, Result};
use crate::protocol::diff;
use crate::protocol::release::{PageKey, PageRun, Update, VectorClock, WriteNotice};
use crate::types::Rank;

/// A write notice as it travels: its pages as runs of consecutive pages of one region, `(region, first
/// page, pages)`. A rank mostly writes whole blocks, so a notice of a million pages is a few runs, where
/// page by page it would outgrow the frames that carry it.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireNotice {
    rank: Rank,
    interval: u32,
    runs: Vec<PageRun>,
}

/// An update as it travels (`Update`).
#[derive(serde::Serialize, serde::Deserialize)]
struct WireUpdate {
    rank: Rank,
    interval: u32,
    page: PageKey,
    diff: Vec<u8>,
}

/// Write notices as they travel, with the horizon that comes with them (empty when it is all zeros), and
/// at barriers the updates of their pages.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireNotices {
    horizon: Vec<u32>,
    notices: Vec<WireNotice>,
    updates: Vec<WireUpdate>,
}

/// Encodes write notices and their horizon for a lock release or grant.
pub(crate) fn encode_notices(notices: &[WriteNotice], horizon: &VectorClock) -> Vec<u8> {
    encode_exchange(notices, horizon, &[])
}

/// Encodes write notices, their horizon and updates of their pages, for a barrier's messages.
fn encode_exchange(notices: &[WriteNotice], horizon: &VectorClock, updates: &[Update]) -> Vec<u8> {
    if notices.is_empty() && horizon.is_zero() && updates.is_empty() {
        return Vec::new();
    }
    let notices: Vec<WireNotice> = notices
        .iter()
        .map(|n| WireNotice {
            rank: n.rank,
            interval: n.interval,
            runs: n.runs.clone(),
        })
        .collect();
    let horizon = if horizon.is_zero() {
        Vec::new()
    } else {
        horizon.0.clone()
    };
    let updates = updates
        .iter()
        .map(|u| WireUpdate {
            rank: u.rank,
            interval: u.interval,
            page: u.page,
            diff: u.diff.clone(),
        })
        .collect();
    postcard::to_allocvec(&WireNotices {
        horizon,
        notices,
        updates,
    })
    .unwrap_or_default()
}

/// The notices and horizon a lock release passes (or a barrier's message, with `updates`), encoded in at
/// most `max` bytes: when they do not fit, the updates are left out (their pages are dropped, which is
/// always correct), and if still too large no notice goes and the horizon is raised over them all, so that
/// an acquirer that has not seen them drops every cached page of release-consistency regions instead (as
/// for notices forgotten on the way). A release the lock's home would refuse as too large would leave the
/// lock held for ever.
pub(crate) fn encode_notices_within(
    notices: &[WriteNotice],
    horizon: &VectorClock,
    updates: &[Update],
    max: usize,
) -> Vec<u8> {
    let bytes = encode_exchange(notices, horizon, updates);
    if bytes.len() <= max {
        return bytes;
    }
    let bytes = encode_exchange(notices, horizon, &[]);
    if bytes.len() <= max {
        return bytes;
    }
    let mut raised = horizon.clone();
    for n in notices {
        raised.learn(n);
    }
    encode_notices(&[], &raised)
}

/// Decodes write notices and their horizon received from `from`, in a job of `size` ranks (updates, which
/// only a barrier's messages carry, are passed over).
pub(crate) fn decode_notices(
    bytes: &[u8],
    from: Rank,
    size: usize,
) -> Result<(Vec<WriteNotice>, VectorClock)> {
    decode_exchange(bytes, from, size).map(|(notices, horizon, _)| (notices, horizon))
}

/// Decodes a barrier's message from `from`: write notices, their horizon and updates of their pages, each
/// update's writer a rank of the job and its diff well formed and not empty.
pub(crate) fn decode_exchange(
    bytes: &[u8],
    from: Rank,
    size: usize,
) -> Result<(Vec<WriteNotice>, VectorClock, Vec<Update>)> {
    let mut horizon = VectorClock::new(size);
    if bytes.is_empty() {
        return Ok((Vec::new(), horizon, Vec::new()));
    }
    let bad = |what: String| DsmError::Protocol { rank: from, what };
    let wire: WireNotices = postcard::from_bytes(bytes)
        .map_err(|e| bad(format!("write notices do not decode: {e}")))?;
    if wire.horizon.len() > size {
        return Err(bad(format!(
            "a horizon of {} ranks in a job of {size}",
            wire.horizon.len()
        )));
    }
    horizon.0[..wire.horizon.len()].copy_from_slice(&wire.horizon);
    let notices = wire
        .notices
        .into_iter()
        .map(|w| {
            if w.rank.index() >= size {
                return Err(bad(format!(
                    "a write notice of {} in a job of {size} ranks",
                    w.rank
                )));
            }
            if let Some(r) = w
                .runs
                .iter()
                .find(|r| r.len == 0 || r.first.checked_add(r.len).is_none())
            {
                return Err(bad(format!(
                    "a write notice names a run of {} pages from page {} of region {}",
                    r.len, r.first, r.region
                )));
            }
            Ok(WriteNotice {
                rank: w.rank,
                interval: w.interval,
                runs: w.runs,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let updates = wire
        .updates
        .into_iter()
        .map(|w| {
            if w.rank.index() >= size {
                return Err(bad(format!(
                    "an update from {} in a job of {size} ranks",
                    w.rank
                )));
            }
            match diff::check(&w.diff) {
                Ok(n) if n > 0 => Ok(Update {
                    rank: w.rank,
                    interval: w.interval,
                    page: w.page,
                    diff: w.diff,
                }),
                Ok(_) => Err(bad(format!(
                    "an empty update of page {} of region {}",
                    w.page.page, w.page.region
                ))),
                Err(e) => Err(bad(format!(
                    "an update of page {} of region {}: {e}",
                    w.page.page, w.page.region
                ))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((notices, horizon, updates))
}

/// Encodes a vector clock (sent with a lock request, so that the grant carries only unseen notices).
pub(crate) fn encode_clock(clock: &VectorClock) -> Vec<u8> {
    postcard::to_allocvec(clock).unwrap_or_default()
}

/// Decodes a vector clock received from `from`, in a job of `size` ranks (one entry a rank: a clock of
/// another length is refused, so that a peer's request holds no more than that).
pub(crate) fn decode_clock(bytes: &[u8], from: Rank, size: usize) -> Result<VectorClock> {
    let clock: VectorClock = postcard::from_bytes(bytes).map_err(|e| DsmError::Protocol {
        rank: from,
        what: format!("a vector clock does not decode: {e}"),
    })?;
    if clock.0.len() != size {
        return Err(DsmError::Protocol {
            rank: from,
            what: format!(
                "a vector clock of {} entries in a job of {size} ranks",
                clock.0.len()
            ),
        });
    }
    Ok(clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::release::{runs_of, PageKey};

    #[test]
    fn a_clock_of_another_length_than_the_job_is_refused() {
        let clock = VectorClock(vec![3, 0, 7]);
        assert_eq!(
            decode_clock(&encode_clock(&clock), Rank(1), 3).unwrap(),
            clock
        );
        for size in [2, 4] {
            let e = decode_clock(&encode_clock(&clock), Rank(1), size).unwrap_err();
            assert!(e.to_string().contains("3 entries"), "{e}");
        }
        assert!(decode_clock(&[0xff, 0xff], Rank(1), 3).is_err());
    }

    fn notice(rank: u32, interval: u32, pages: &[(u32, u64)]) -> WriteNotice {
        WriteNotice {
            rank: Rank(rank),
            interval,
            runs: runs_of(pages.iter().map(|&(region, page)| PageKey { region, page })),
        }
    }

    #[test]
    fn notices_travel_as_runs_and_come_back_whole() {
        let pages = [(0, 9), (0, 2), (1, 4), (0, 3), (0, 4), (1, 5), (2, 0)];
        let scattered = notice(1, 3, &pages);
        let block = WriteNotice {
            rank: Rank(0),
            interval: 7,
            runs: runs_of((0..1_000_000).map(|page| PageKey { region: 4, page })),
        };
        assert_eq!(block.runs.len(), 1);
        assert_eq!(
            (scattered.runs.len(), scattered.pages().collect::<Vec<_>>()),
            (
                6,
                pages
                    .map(|(region, page)| PageKey { region, page })
                    .to_vec()
            ),
            "pages out of order start new runs, and none is lost"
        );
        let none = VectorClock::new(2);
        let bytes = encode_notices(&[scattered.clone(), block.clone()], &none);
        assert!(
            bytes.len() < 64,
            "a million consecutive pages take {} bytes",
            bytes.len()
        );
        let (back, horizon) = decode_notices(&bytes, Rank(1), 2).unwrap();
        assert_eq!(back[0].runs, scattered.runs);
        assert_eq!((back[0].rank, back[0].interval), (Rank(1), 3));
        assert_eq!(back[1], block);
        assert_eq!(horizon, none);
        // A horizon travels with the notices, or alone.
        let h = VectorClock(vec![4, 0]);
        let (back, horizon) = decode_notices(
            &encode_notices(std::slice::from_ref(&scattered), &h),
            Rank(1),
            2,
        )
        .unwrap();
        assert_eq!((back.len(), horizon), (1, h.clone()));
        let (back, horizon) = decode_notices(&encode_notices(&[], &h), Rank(1), 2).unwrap();
        assert!(back.is_empty());
        assert_eq!(horizon, h);
        assert!(encode_notices(&[], &none).is_empty());
    }

    #[test]
    fn notices_too_large_for_a_release_become_a_horizon_over_them() {
        let scattered: Vec<(u32, u64)> = (0..1000).map(|p| (0, 2 * p)).collect();
        let notices = [
            notice(0, 3, &scattered),
            notice(2, 5, &scattered),
            notice(2, 4, &[(1, 1)]),
        ];
        let h = VectorClock(vec![1, 2, 0]);
        let whole = encode_notices(&notices, &h);
        assert_eq!(encode_notices_within(&notices, &h, &[], whole.len()), whole);
        let small = encode_notices_within(&notices, &h, &[], whole.len() - 1);
        let (back, horizon) = decode_notices(&small, Rank(1), 3).unwrap();
        assert!(back.is_empty());
        // Every notice left out is covered, and what the horizon had stays.
        assert_eq!(horizon, VectorClock(vec![3, 2, 5]));
    }

    #[test]
    fn notices_or_horizons_of_ranks_outside_the_job_are_refused() {
        let h = VectorClock(vec![1, 2, 3]);
        let e = decode_notices(&encode_notices(&[], &h), Rank(1), 2).unwrap_err();
        assert!(e.to_string().contains("horizon of 3 ranks"), "{e}");
        let n = notice(5, 1, &[(0, 1)]);
        let e =
            decode_notices(&encode_notices(&[n], &VectorClock::new(2)), Rank(1), 2).unwrap_err();
        assert!(e.to_string().contains("rank 5 in a job of 2"), "{e}");
    }

    #[test]
    fn runs_of_any_length_decode_as_they_came_and_broken_ones_are_refused() {
        let wire = |(region, first, len)| {
            let runs = vec![PageRun { region, first, len }];
            let bytes = postcard::to_allocvec(&WireNotices {
                horizon: Vec::new(),
                notices: vec![WireNotice {
                    rank: Rank(0),
                    interval: 1,
                    runs: runs.clone(),
                }],
                updates: Vec::new(),
            })
            .unwrap();
            (bytes, runs)
        };
        // 2^40 pages (4 PiB) named in a few bytes take a few bytes here too.
        let (bytes, runs) = wire((3, 7, 1 << 40));
        let (back, _) = decode_notices(&bytes, Rank(2), 3).unwrap();
        assert_eq!(back[0].runs, runs);
        for broken in [(0, u64::MAX, 2), (0, 5, 0)] {
            let e = decode_notices(&wire(broken).0, Rank(2), 3).unwrap_err();
            assert!(e.to_string().contains("names a run of"), "{e}");
        }
    }

    fn update(rank: u32, interval: u32, page: u64, diff: Vec<u8>) -> Update {
        Update {
            rank: Rank(rank),
            interval,
            page: PageKey { region: 1, page },
            diff,
        }
    }

    /// A diff that writes `value` at `offset` of a page.
    fn diff_at(offset: usize, value: u8) -> Vec<u8> {
        let twin = vec![0u8; crate::types::PAGE_SIZE];
        let mut page = twin.clone();
        page[offset] = value;
        let mut d = Vec::new();
        diff::encode(&twin, &page, &mut d);
        d
    }

    #[test]
    fn updates_travel_with_a_barrier_s_notices_and_are_the_first_thing_left_out() {
        let notices = [notice(0, 3, &[(1, 4)]), notice(2, 5, &[(1, 4), (1, 9)])];
        let updates = [
            update(0, 3, 4, diff_at(8, 1)),
            update(2, 5, 9, diff_at(100, 2)),
        ];
        let h = VectorClock::new(3);
        let bytes = encode_notices_within(&notices, &h, &updates, usize::MAX);
        let (back, _, got) = decode_exchange(&bytes, Rank(0), 3).unwrap();
        assert_eq!(back, notices);
        assert_eq!(got, updates);
        // A lock's grant has none: its decoder passes them over.
        assert_eq!(decode_notices(&bytes, Rank(0), 3).unwrap().0, notices);
        // Too large with the updates: the notices go without them.
        let bare = encode_notices(&notices, &h);
        let within = encode_notices_within(&notices, &h, &updates, bytes.len() - 1);
        assert_eq!(within, bare);
        assert!(decode_exchange(&within, Rank(0), 3).unwrap().2.is_empty());
    }

    #[test]
    fn updates_of_ranks_outside_the_job_or_with_broken_or_empty_diffs_are_refused() {
        let h = VectorClock::new(2);
        let n = [notice(0, 1, &[(1, 4)])];
        for (u, what) in [
            (update(5, 1, 4, diff_at(8, 1)), "update from rank 5"),
            (update(0, 1, 4, Vec::new()), "empty update"),
            (
                update(0, 1, 4, vec![0, 0xff, 0x0f, 2, 0, 7, 7]),
                "update of page 4",
            ),
        ] {
            let bytes = encode_notices_within(&n, &h, &[u], usize::MAX);
            let e = decode_exchange(&bytes, Rank(1), 2).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }
}
