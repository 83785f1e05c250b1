//! How write notices, their horizons and vector clocks travel between ranks: notices as runs of
//! consecutive pages, every decoded message checked against the job's size and a bound on the pages it
//! may name, so that a peer's bytes can neither name ranks that do not exist nor make this rank allocate
//! without bound.

use crate::error::{DsmError, Result};
use crate::protocol::release::{PageKey, VectorClock, WriteNotice};
use crate::types::Rank;

/// A write notice as it travels: its pages as runs of consecutive pages of one region, `(region, first
/// page, pages)`. A rank mostly writes whole blocks, so a notice of a million pages is a few runs, where
/// page by page it would outgrow the frames that carry it.
#[derive(serde::Serialize, serde::Deserialize)]
struct WireNotice {
    rank: Rank,
    interval: u32,
    runs: Vec<(u32, u64, u64)>,
}

/// Write notices as they travel, with the horizon that comes with them (empty when it is all zeros).
#[derive(serde::Serialize, serde::Deserialize)]
struct WireNotices {
    horizon: Vec<u32>,
    notices: Vec<WireNotice>,
}

/// The most pages that the notices of one message may name once expanded (a bound on what a peer's
/// bytes can make this rank allocate): 2^26 pages, 256 GiB of writes.
const MAX_NOTICE_PAGES: u64 = 1 << 26;

/// Encodes write notices and their horizon for a lock release or grant, or a barrier's messages.
pub(crate) fn encode_notices(notices: &[WriteNotice], horizon: &VectorClock) -> Vec<u8> {
    if notices.is_empty() && horizon.is_zero() {
        return Vec::new();
    }
    let notices: Vec<WireNotice> = notices
        .iter()
        .map(|n| {
            // Pages come sorted (an interval's pages are sorted when it closes); any order would still
            // give the same pages, in more runs.
            let mut runs: Vec<(u32, u64, u64)> = Vec::new();
            for k in &n.pages {
                match runs.last_mut() {
                    Some((r, first, len)) if *r == k.region && *first + *len == k.page => *len += 1,
                    _ => runs.push((k.region, k.page, 1)),
                }
            }
            WireNotice {
                rank: n.rank,
                interval: n.interval,
                runs,
            }
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
    let mut total = 0u64;
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
            for (_, first, len) in &w.runs {
                total = total.saturating_add(*len);
                if total > MAX_NOTICE_PAGES || first.checked_add(*len).is_none() {
                    return Err(bad(format!(
                        "write notices name more than {MAX_NOTICE_PAGES} pages, or pages past the end of any region"
                    )));
                }
            }
            let pages = w
                .runs
                .iter()
                .flat_map(|&(region, first, len)| {
                    (first..first + len).map(move |page| PageKey { region, page })
                })
                .collect();
            Ok(WriteNotice {
                rank: w.rank,
                interval: w.interval,
                pages,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((notices, horizon))
}

/// Encodes a vector clock (sent with a lock request, so that the grant carries only unseen notices).
pub(crate) fn encode_clock(clock: &VectorClock) -> Vec<u8> {
    postcard::to_allocvec(clock).unwrap_or_default()
}

/// Decodes a vector clock received from `from`.
pub(crate) fn decode_clock(bytes: &[u8], from: Rank) -> Result<VectorClock> {
    postcard::from_bytes(bytes).map_err(|e| DsmError::Protocol {
        rank: from,
        what: format!("a vector clock does not decode: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(rank: u32, interval: u32, pages: &[(u32, u64)]) -> WriteNotice {
        WriteNotice {
            rank: Rank(rank),
            interval,
            pages: pages
                .iter()
                .map(|&(region, page)| PageKey { region, page })
                .collect(),
        }
    }

    #[test]
    fn notices_travel_as_runs_and_come_back_whole() {
        let scattered = notice(
            1,
            3,
            &[(0, 9), (0, 2), (1, 4), (0, 3), (0, 4), (1, 5), (2, 0)],
        );
        let block = WriteNotice {
            rank: Rank(0),
            interval: 7,
            pages: (0..1_000_000)
                .map(|page| PageKey { region: 4, page })
                .collect(),
        };
        let none = VectorClock::new(2);
        let bytes = encode_notices(&[scattered.clone(), block.clone()], &none);
        assert!(
            bytes.len() < 64,
            "a million consecutive pages take {} bytes",
            bytes.len()
        );
        let (back, horizon) = decode_notices(&bytes, Rank(1), 2).unwrap();
        assert_eq!(back[0].pages, scattered.pages);
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
    fn notices_naming_too_many_pages_are_refused() {
        let wire = |runs| WireNotices {
            horizon: Vec::new(),
            notices: vec![WireNotice {
                rank: Rank(0),
                interval: 1,
                runs,
            }],
        };
        let bytes = postcard::to_allocvec(&wire(vec![(0, 0, MAX_NOTICE_PAGES + 1)])).unwrap();
        let e = decode_notices(&bytes, Rank(2), 3).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let bytes = postcard::to_allocvec(&wire(vec![(0, u64::MAX, 2)])).unwrap();
        assert!(decode_notices(&bytes, Rank(2), 3).is_err());
    }
}
