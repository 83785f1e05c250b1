//! How write notices, their horizons and vector clocks travel between ranks: notices with their runs of
//! consecutive pages, every decoded message checked against the job's size and its runs for overflow, so
//! that a peer's bytes can neither name ranks that do not exist nor make decoding allocate more than in
//! proportion to the message's size (a run of any length takes the same memory). An acquire then merges
//! the runs of every notice it takes before the engine walks them, each clamped to its region, so the
//! pages it looks at are at most the regions' pages, however many notices or runs name them.

use crate::error::{DsmError, Result};
use crate::protocol::release::{PageRun, VectorClock, WriteNotice};
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

/// Write notices as they travel, with the horizon that comes with them (empty when it is all zeros).
#[derive(serde::Serialize, serde::Deserialize)]
struct WireNotices {
    horizon: Vec<u32>,
    notices: Vec<WireNotice>,
}

/// Encodes write notices and their horizon for a lock release or grant, or a barrier's messages.
pub(crate) fn encode_notices(notices: &[WriteNotice], horizon: &VectorClock) -> Vec<u8> {
    if notices.is_empty() && horizon.is_zero() {
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
    postcard::to_allocvec(&WireNotices { horizon, notices }).unwrap_or_default()
}

/// The notices and horizon a lock release passes, encoded in at most `max` bytes: when they do not fit,
/// no notice goes and the horizon is raised over them all, so that an acquirer that has not seen them
/// drops every cached page of release-consistency regions instead (as for notices forgotten on the way).
/// A release the lock's home would refuse as too large would leave the lock held for ever.
pub(crate) fn encode_notices_within(
    notices: &[WriteNotice],
    horizon: &VectorClock,
    max: usize,
) -> Vec<u8> {
    let bytes = encode_notices(notices, horizon);
    if bytes.len() <= max {
        return bytes;
    }
    let mut raised = horizon.clone();
    for n in notices {
        raised.learn(n);
    }
    encode_notices(&[], &raised)
}

/// Decodes write notices and their horizon received from `from`, in a job of `size` ranks.
pub(crate) fn decode_notices(
    bytes: &[u8],
    from: Rank,
    size: usize,
) -> Result<(Vec<WriteNotice>, VectorClock)> {
    let mut horizon = VectorClock::new(size);
    if bytes.is_empty() {
        return Ok((Vec::new(), horizon));
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
    Ok((notices, horizon))
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
        assert_eq!(encode_notices_within(&notices, &h, whole.len()), whole);
        let small = encode_notices_within(&notices, &h, whole.len() - 1);
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
}
