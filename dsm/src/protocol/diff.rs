//! Diffs of a page against its twin, for release consistency: the bytes a rank changed in an interval,
//! encoded compactly, to be applied at the page's home.
//!
//! Pages are compared a word (8 bytes) at a time, and changes are recorded at byte precision: a diff never
//! carries a byte its writer did not change. That is what lets several ranks write disjoint bytes of one
//! page, even of one word, and have all their writes merged at the home in any order.
//!
//! Encoding, whichever of two is smaller (an empty diff is zero bytes):
//! - runs: `[0]`, then runs `[u16 LE offset][u16 LE length][length bytes]` in increasing offset order,
//!   non-overlapping: compact for a few contiguous changes;
//! - masked: `[1]`, then a bit per byte of the page (512 bytes; bit `i % 8` of byte `i / 8` is set when byte
//!   `i` changed), then the changed bytes in order: at most 513 + 4096 bytes however scattered the changes.
//!
//! Decoding checks every bound: a malformed diff is an error, never a panic or a write outside the page.
//!
//! A release sends a home the diffs of many of its pages as one message, a batch: for each page, in
//! strictly increasing page order, `[u64 LE page][u32 LE length][the page's diff]` (`push_entry`,
//! `decode_batch`). One message per batch instead of one per page spares the home a system call per page
//! (it makes a run of neighbouring pages writable with one) and both sides a message and an
//! acknowledgement per page.

use crate::types::PAGE_SIZE;

const RUN_HEADER: usize = 4;
const WORD: usize = 8;
const RUNS: u8 = 0;
const MASKED: u8 = 1;
const MASK_BYTES: usize = PAGE_SIZE / 8;

/// Why a diff could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffError {
    /// The diff ends inside a run header or a run's bytes.
    Truncated { at: usize },
    /// A run reaches past the end of the page, or overlaps or precedes the previous run.
    OutOfOrder { offset: usize, len: usize },
    /// The first byte names no encoding.
    UnknownEncoding(u8),
    /// A masked diff has a different number of bytes than its mask has bits set.
    MaskMismatch,
}

impl std::fmt::Display for DiffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiffError::Truncated { at } => write!(f, "diff truncated at byte {at}"),
            DiffError::OutOfOrder { offset, len } => write!(
                f,
                "diff run of {len} bytes at offset {offset} is out of the page or out of order"
            ),
            DiffError::UnknownEncoding(t) => write!(f, "diff encoding {t} is unknown"),
            DiffError::MaskMismatch => {
                write!(f, "masked diff does not have one byte per bit of its mask")
            }
        }
    }
}

/// How many bytes of `page` differ from `twin`, counted a word at a time up to the first word that takes
/// the count past `limit` (a diff of more changed bytes than `limit` takes more than `limit` bytes
/// encoded, so a caller that wants only small diffs stops looking at a page that changed much early).
pub fn changed_up_to(twin: &[u8], page: &[u8], limit: usize) -> usize {
    let mut changed = 0;
    for (a, b) in twin.chunks_exact(WORD).zip(page.chunks_exact(WORD)) {
        if a != b {
            changed += a.iter().zip(b).filter(|(x, y)| x != y).count();
            if changed > limit {
                break;
            }
        }
    }
    changed
}

/// Appends to `out` the diff that turns `twin` into `page`; returns the number of bytes appended.
pub fn encode(twin: &[u8], page: &[u8], out: &mut Vec<u8>) -> usize {
    assert!(
        twin.len() == PAGE_SIZE && page.len() == PAGE_SIZE,
        "diffs are of whole pages"
    );
    let start = out.len();
    out.push(RUNS);
    let changed = encode_runs(twin, page, out);
    if changed == 0 {
        out.truncate(start);
    } else if out.len() - start > 1 + MASK_BYTES + changed {
        out.truncate(start);
        encode_masked(twin, page, out);
    }
    out.len() - start
}

/// The diff that writes `bytes` at `offset` of a page, whatever the page holds there (one run): how a home
/// performs an atomic operation on a word (`rc::atomic`).
pub fn run(offset: usize, bytes: &[u8]) -> Vec<u8> {
    assert!(
        !bytes.is_empty() && offset + bytes.len() <= PAGE_SIZE,
        "a run lies inside one page"
    );
    let mut out = Vec::with_capacity(1 + RUN_HEADER + bytes.len());
    out.push(RUNS);
    out.extend_from_slice(&(offset as u16).to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Appends the runs encoding (after its tag); returns the number of changed bytes.
fn encode_runs(twin: &[u8], page: &[u8], out: &mut Vec<u8>) -> usize {
    let mut changed = 0;
    let mut run: Option<usize> = None; // start offset of the open run
    let close = |out: &mut Vec<u8>, from: usize, to: usize| {
        out.extend_from_slice(&(from as u16).to_le_bytes());
        out.extend_from_slice(&((to - from) as u16).to_le_bytes());
        out.extend_from_slice(&page[from..to]);
    };
    for (w, (a, b)) in twin
        .chunks_exact(WORD)
        .zip(page.chunks_exact(WORD))
        .enumerate()
    {
        if a == b {
            if let Some(from) = run.take() {
                close(out, from, w * WORD);
            }
            continue;
        }
        for i in 0..WORD {
            let at = w * WORD + i;
            let differs = a[i] != b[i];
            changed += usize::from(differs);
            match (differs, run) {
                (true, None) => run = Some(at),
                (false, Some(from)) => {
                    close(out, from, at);
                    run = None;
                }
                _ => {}
            }
        }
    }
    if let Some(from) = run {
        close(out, from, PAGE_SIZE);
    }
    changed
}

/// Appends the masked encoding, tag included.
fn encode_masked(twin: &[u8], page: &[u8], out: &mut Vec<u8>) {
    out.push(MASKED);
    let mask_at = out.len();
    out.resize(mask_at + MASK_BYTES, 0);
    for (i, (a, b)) in twin.iter().zip(page).enumerate() {
        if a != b {
            out[mask_at + i / 8] |= 1 << (i % 8);
            out.push(*b);
        }
    }
}

/// Applies `diff` to `page`; returns the number of bytes written.
pub fn apply(page: &mut [u8], diff: &[u8]) -> Result<usize, DiffError> {
    if page.len() < PAGE_SIZE {
        return Err(DiffError::OutOfOrder {
            offset: 0,
            len: PAGE_SIZE,
        });
    }
    apply_with(diff, |offset, bytes| {
        page[offset..offset + bytes.len()].copy_from_slice(bytes)
    })
}

/// Checks `diff` whole without applying it; returns the number of bytes it would write.
pub fn check(diff: &[u8]) -> Result<usize, DiffError> {
    match diff.split_first() {
        None => Ok(0),
        Some((&RUNS, runs)) => check_runs(runs),
        Some((&MASKED, rest)) => check_masked(rest),
        Some((&tag, _)) => Err(DiffError::UnknownEncoding(tag)),
    }
}

/// The bytes of the page `diff` writes, a bit per byte (bit `i % 64` of word `i / 64`): two diffs whose
/// masks share no bit can be applied in either order.
pub fn written_mask(diff: &[u8]) -> Result<[u64; PAGE_SIZE / 64], DiffError> {
    let mut mask = [0u64; PAGE_SIZE / 64];
    apply_with(diff, |offset, bytes| {
        for i in offset..offset + bytes.len() {
            mask[i / 64] |= 1 << (i % 64);
        }
    })?;
    Ok(mask)
}

/// Applies `diff` through `write(offset, bytes)`, called only after the whole diff has been checked, with
/// ranges inside one page that do not overlap. Returns the number of bytes written. For a page that other
/// threads write at the same time, where a `&mut [u8]` over it must not exist.
pub fn apply_with(diff: &[u8], mut write: impl FnMut(usize, &[u8])) -> Result<usize, DiffError> {
    // Check first, then write: a malformed diff writes nothing.
    let changed = check(diff)?;
    match diff.split_first() {
        Some((&RUNS, runs)) => runs_each(runs, &mut write),
        Some((_, rest)) => {
            let (mask, bytes) = rest.split_at(MASK_BYTES);
            let mut next = bytes.iter();
            for (i, m) in mask.iter().enumerate() {
                let mut m = *m;
                while m != 0 {
                    let bit = m.trailing_zeros() as usize;
                    if let Some(b) = next.next() {
                        write(i * 8 + bit, std::slice::from_ref(b));
                    }
                    m &= m - 1;
                }
            }
        }
        None => {}
    }
    Ok(changed)
}

/// Calls `write` for each run of a checked runs encoding.
fn runs_each(diff: &[u8], write: &mut impl FnMut(usize, &[u8])) {
    let mut at = 0;
    while at + RUN_HEADER <= diff.len() {
        let offset = u16::from_le_bytes([diff[at], diff[at + 1]]) as usize;
        let len = u16::from_le_bytes([diff[at + 2], diff[at + 3]]) as usize;
        write(offset, &diff[at + RUN_HEADER..at + RUN_HEADER + len]);
        at += RUN_HEADER + len;
    }
}

/// Checks a runs encoding (after its tag): every run whole, inside the page, after the one before it.
/// Returns the bytes its runs carry.
fn check_runs(diff: &[u8]) -> Result<usize, DiffError> {
    let mut at = 0;
    let mut next_free = 0; // runs must not overlap or go backwards
    let mut carried = 0;
    while at < diff.len() {
        let header = diff
            .get(at..at + RUN_HEADER)
            .ok_or(DiffError::Truncated { at })?;
        let offset = u16::from_le_bytes([header[0], header[1]]) as usize;
        let len = u16::from_le_bytes([header[2], header[3]]) as usize;
        if len == 0 || offset < next_free || offset + len > PAGE_SIZE {
            return Err(DiffError::OutOfOrder { offset, len });
        }
        if at + RUN_HEADER + len > diff.len() {
            return Err(DiffError::Truncated { at });
        }
        carried += len;
        next_free = offset + len;
        at += RUN_HEADER + len;
    }
    Ok(carried)
}

/// Checks a masked encoding (after its tag): a whole mask, and one byte per bit set in it. Returns the
/// bytes it carries.
fn check_masked(diff: &[u8]) -> Result<usize, DiffError> {
    let mask = diff
        .get(..MASK_BYTES)
        .ok_or(DiffError::Truncated { at: 0 })?;
    let set: usize = mask.iter().map(|m| m.count_ones() as usize).sum();
    if set != diff.len() - MASK_BYTES {
        return Err(DiffError::MaskMismatch);
    }
    Ok(set)
}

/// Bytes before each diff in a batch: the page number and the diff's length.
pub const ENTRY_HEADER: usize = 12;

/// Appends to the batch `out` the entry of `page` with the diff that turns `twin` into `bytes`; returns
/// the diff's length. When the two are equal nothing is appended and 0 returned.
pub fn push_entry(page: u64, twin: &[u8], bytes: &[u8], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&page.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let n = encode(twin, bytes, out);
    if n == 0 {
        out.truncate(start);
    } else {
        out[start + 8..start + ENTRY_HEADER].copy_from_slice(&(n as u32).to_le_bytes());
    }
    n
}

/// Why a batch of diffs could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// The batch ends inside an entry's header or its diff.
    Truncated { at: usize },
    /// A page does not come after the one before it.
    PagesOutOfOrder { page: u64 },
    /// The batch holds a different number of entries than its message says.
    Count { said: u32, found: usize },
    /// The diff of `page` is malformed.
    Diff { page: u64, error: DiffError },
    /// The diff of `page` is empty: a page with no changes has no entry.
    Empty { page: u64 },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Truncated { at } => write!(f, "batch of diffs truncated at byte {at}"),
            BatchError::PagesOutOfOrder { page } => {
                write!(f, "page {page} of a batch of diffs is out of order")
            }
            BatchError::Count { said, found } => {
                write!(f, "a batch said to hold {said} diffs holds {found}")
            }
            BatchError::Diff { page, error } => write!(f, "the diff of page {page}: {error}"),
            BatchError::Empty { page } => write!(f, "the diff of page {page} is empty"),
        }
    }
}

/// The entries of a batch of `count` diffs: each page with where its diff lies in `batch`. Checks all of
/// it (framing, page order, every diff) before returning, so that a malformed batch changes nothing.
pub fn decode_batch(
    batch: &[u8],
    count: u32,
) -> Result<Vec<(u64, std::ops::Range<usize>)>, BatchError> {
    let mut entries: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
    let mut at = 0;
    while at < batch.len() {
        let header = batch
            .get(at..at + ENTRY_HEADER)
            .ok_or(BatchError::Truncated { at })?;
        let page = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(header[8..].try_into().expect("4 bytes")) as usize;
        let diff = at + ENTRY_HEADER..at + ENTRY_HEADER + len;
        let bytes = batch
            .get(diff.clone())
            .ok_or(BatchError::Truncated { at })?;
        if entries.last().is_some_and(|(last, _)| *last >= page) {
            return Err(BatchError::PagesOutOfOrder { page });
        }
        if len == 0 {
            return Err(BatchError::Empty { page });
        }
        check(bytes).map_err(|error| BatchError::Diff { page, error })?;
        at = diff.end;
        entries.push((page, diff));
    }
    if entries.len() != count as usize {
        return Err(BatchError::Count {
            said: count,
            found: entries.len(),
        });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn page(rng: &mut StdRng) -> Vec<u8> {
        (0..PAGE_SIZE).map(|_| rng.random()).collect()
    }

    #[test]
    fn a_diff_s_mask_has_a_bit_for_exactly_the_bytes_it_writes_in_either_encoding() {
        let mut rng = StdRng::seed_from_u64(9);
        for changes in [1, 3, 40, 900, 4096] {
            let twin = page(&mut rng);
            let mut p = twin.clone();
            for _ in 0..changes {
                let i = rng.random_range(0..PAGE_SIZE);
                p[i] = p[i].wrapping_add(1);
            }
            let mut d = Vec::new();
            encode(&twin, &p, &mut d);
            let mask = written_mask(&d).unwrap();
            for i in 0..PAGE_SIZE {
                let bit = mask[i / 64] >> (i % 64) & 1 == 1;
                assert_eq!(bit, twin[i] != p[i], "byte {i}, {changes} changes");
            }
        }
        assert!(written_mask(&[7]).is_err());
    }

    #[test]
    fn a_run_writes_its_bytes_whatever_the_page_holds_and_nothing_else() {
        let mut rng = StdRng::seed_from_u64(10);
        for offset in [0, 8, PAGE_SIZE - 8] {
            let before = page(&mut rng);
            let word = before[offset..offset + 8].to_vec(); // written over with what it holds
            for bytes in [[0xa5u8; 8].to_vec(), word] {
                let d = run(offset, &bytes);
                assert_eq!(check(&d), Ok(8));
                let mut p = before.clone();
                apply(&mut p, &d).unwrap();
                assert_eq!(&p[offset..offset + 8], &bytes[..]);
                assert_eq!(p[..offset], before[..offset]);
                assert_eq!(p[offset + 8..], before[offset + 8..]);
            }
        }
    }

    #[test]
    fn changed_bytes_are_counted_exactly_up_to_the_limit_and_past_it_the_count_stops_early() {
        let mut rng = StdRng::seed_from_u64(10);
        let twin = page(&mut rng);
        let mut p = twin.clone();
        assert_eq!(changed_up_to(&twin, &p, 0), 0);
        for i in [0, 1, 9, 4095] {
            p[i] ^= 0x5a;
        }
        assert_eq!(changed_up_to(&twin, &p, 4), 4);
        let mut d = Vec::new();
        // Past the limit the count stops within a word of it, and the diff is larger than the limit.
        let n = changed_up_to(&twin, &p, 1);
        assert!((2..=3).contains(&n), "{n}");
        assert!(encode(&twin, &p, &mut d) > 1);
    }

    #[test]
    fn identical_pages_give_an_empty_diff() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = page(&mut rng);
        let mut out = Vec::new();
        assert_eq!(encode(&p, &p, &mut out), 0);
        let mut q = p.clone();
        assert_eq!(apply(&mut q, &out), Ok(0));
        assert_eq!(q, p);
    }

    #[test]
    fn a_diff_turns_the_twin_into_the_page_and_carries_only_changed_bytes() {
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..500 {
            let twin = page(&mut rng);
            let mut p = twin.clone();
            for _ in 0..rng.random_range(0..200) {
                let i = rng.random_range(0..PAGE_SIZE);
                p[i] = rng.random();
            }
            let mut diff = Vec::new();
            encode(&twin, &p, &mut diff);
            let mut q = twin.clone();
            let written = apply(&mut q, &diff).unwrap();
            assert_eq!(q, p);
            let really_changed = twin.iter().zip(&p).filter(|(a, b)| a != b).count();
            assert_eq!(
                written, really_changed,
                "a diff carries exactly the changed bytes"
            );
        }
    }

    #[test]
    fn writers_of_disjoint_bytes_merge_in_any_order() {
        let mut rng = StdRng::seed_from_u64(3);
        for round in 0..300 {
            let base = page(&mut rng);
            let writers = 2 + round % 3;
            // Every byte belongs to one writer at random, so writers share words but never bytes.
            let owner: Vec<usize> = (0..PAGE_SIZE)
                .map(|_| rng.random_range(0..writers))
                .collect();
            let mut expected = base.clone();
            let mut diffs = Vec::new();
            for w in 0..writers {
                let mut mine = base.clone();
                for i in 0..PAGE_SIZE {
                    if owner[i] == w && rng.random_bool(0.3) {
                        mine[i] = rng.random();
                        expected[i] = mine[i];
                    }
                }
                let mut d = Vec::new();
                encode(&base, &mine, &mut d);
                diffs.push(d);
            }
            // Apply in a random order.
            let mut order: Vec<usize> = (0..writers).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let mut home = base.clone();
            for w in order {
                apply(&mut home, &diffs[w]).unwrap();
            }
            assert_eq!(home, expected, "round {round}");
        }
    }

    #[test]
    fn runs_are_compact() {
        let twin = vec![0u8; PAGE_SIZE];
        let mut p = twin.clone();
        p[100..108].copy_from_slice(&7u64.to_le_bytes().map(|b| b | 1));
        let mut out = Vec::new();
        assert_eq!(encode(&twin, &p, &mut out), 1 + RUN_HEADER + 8);
        p[4095] = 1;
        out.clear();
        assert_eq!(
            encode(&twin, &p, &mut out),
            1 + 2 * RUN_HEADER + 9,
            "a run at the last byte closes"
        );
        // Scattered changes switch to the masked encoding, which never exceeds mask + page.
        for (i, b) in p.iter_mut().enumerate() {
            if i % 2 == 0 {
                *b = 9;
            }
        }
        out.clear();
        let n = encode(&twin, &p, &mut out);
        assert_eq!(out[0], MASKED);
        let changed = twin.iter().zip(&p).filter(|(a, b)| a != b).count();
        assert!(changed > PAGE_SIZE / 2);
        assert_eq!(n, 1 + MASK_BYTES + changed);
        let mut q = twin.clone();
        assert_eq!(apply(&mut q, &out), Ok(changed));
        assert_eq!(q, p);
    }

    #[test]
    fn malformed_diffs_are_errors() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert_eq!(
            apply(&mut p, &[RUNS, 1, 0]),
            Err(DiffError::Truncated { at: 0 })
        );
        assert_eq!(
            apply(&mut p, &[RUNS, 0, 0, 4, 0, 1]),
            Err(DiffError::Truncated { at: 0 })
        );
        let past_end = [RUNS, 0xff, 0x0f, 2, 0, 1, 1];
        assert!(matches!(
            apply(&mut p, &past_end),
            Err(DiffError::OutOfOrder { .. })
        ));
        let backwards = [RUNS, 8, 0, 1, 0, 1, 0, 0, 1, 0, 1];
        assert!(matches!(
            apply(&mut p, &backwards),
            Err(DiffError::OutOfOrder { .. })
        ));
        assert!(matches!(
            apply(&mut p, &[RUNS, 0, 0, 0, 0]),
            Err(DiffError::OutOfOrder { .. })
        ));
        assert_eq!(apply(&mut p, &[7]), Err(DiffError::UnknownEncoding(7)));
        assert_eq!(
            apply(&mut p, &[MASKED, 1, 2]),
            Err(DiffError::Truncated { at: 0 })
        );
        let mut masked = vec![MASKED];
        masked.extend_from_slice(&[0xff; MASK_BYTES]);
        assert_eq!(
            apply(&mut p, &masked),
            Err(DiffError::MaskMismatch),
            "a mask with no bytes"
        );
        // Random bytes never panic and never write outside the page: short ones of any first byte, and
        // long ones of either encoding's tag (a masked diff is at least 513 bytes).
        let mut rng = StdRng::seed_from_u64(4);
        let inside = |o: usize, b: &[u8]| assert!(o + b.len() <= PAGE_SIZE, "{o} + {}", b.len());
        for i in 0..20_000 {
            let n = if i % 2 == 0 {
                rng.random_range(0..40)
            } else {
                rng.random_range(1..5000)
            };
            let mut d: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if i % 2 == 1 {
                d[0] = [RUNS, MASKED][i / 2 % 2];
            }
            let _ = apply_with(&d, inside);
            let _ = apply(&mut p, &d);
        }
        // Real diffs of both encodings, damaged: bytes changed, cut short, or grown.
        for i in 0..5_000 {
            let twin: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.random()).collect();
            let mut page = twin.clone();
            // A few runs of changes, or changes scattered over the page (the masked encoding).
            let changes = if i % 2 == 0 { 3 } else { 600 };
            for _ in 0..changes {
                let at = rng.random_range(0..PAGE_SIZE);
                page[at] = page[at].wrapping_add(1);
            }
            let mut d = Vec::new();
            encode(&twin, &page, &mut d);
            assert_eq!(d[0], [RUNS, MASKED][i % 2], "the encoding meant");
            match rng.random_range(0..3) {
                0 => {
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..d.len());
                        d[at] = rng.random();
                    }
                }
                1 => d.truncate(rng.random_range(0..d.len())),
                _ => d.extend((0..rng.random_range(1..16)).map(|_| rng.random::<u8>())),
            }
            let _ = apply_with(&d, inside);
            let _ = apply(&mut p, &d);
        }
    }

    #[test]
    fn a_batch_carries_each_changed_page_s_diff_in_page_order() {
        let mut rng = StdRng::seed_from_u64(5);
        let twins: Vec<Vec<u8>> = (0..4).map(|_| page(&mut rng)).collect();
        let mut pages = twins.clone();
        pages[0][7] ^= 1;
        pages[3][4095] ^= 0x80;
        let mut batch = Vec::new();
        for (i, (t, p)) in twins.iter().zip(&pages).enumerate() {
            push_entry(10 + i as u64, t, p, &mut batch);
        }
        // Pages 11 and 12 did not change: no entry.
        let entries = decode_batch(&batch, 2).expect("a well-formed batch");
        assert_eq!(
            entries.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![10, 13]
        );
        for (page, diff) in entries {
            let i = (page - 10) as usize;
            let mut q = twins[i].clone();
            assert_eq!(apply(&mut q, &batch[diff]), Ok(1));
            assert_eq!(q, pages[i]);
        }
        assert_eq!(decode_batch(&[], 0), Ok(Vec::new()));
    }

    #[test]
    fn malformed_batches_are_errors() {
        let twin = vec![0u8; PAGE_SIZE];
        let mut one = twin.clone();
        one[0] = 1;
        let entry = |page: u64| {
            let mut b = Vec::new();
            push_entry(page, &twin, &one, &mut b);
            b
        };
        let good = [entry(3), entry(4)].concat();
        assert!(decode_batch(&good, 2).is_ok());
        assert_eq!(
            decode_batch(&good, 3),
            Err(BatchError::Count { said: 3, found: 2 })
        );
        let repeated = [entry(3), entry(3)].concat();
        assert_eq!(
            decode_batch(&repeated, 2),
            Err(BatchError::PagesOutOfOrder { page: 3 }),
            "a page twice would be claimed twice"
        );
        let backwards = [entry(4), entry(3)].concat();
        assert_eq!(
            decode_batch(&backwards, 2),
            Err(BatchError::PagesOutOfOrder { page: 3 })
        );
        for cut in [1, ENTRY_HEADER - 1, ENTRY_HEADER + 1, good.len() - 1] {
            assert!(
                matches!(
                    decode_batch(&good[..cut], 2),
                    Err(BatchError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        let mut bad_diff = good.clone();
        bad_diff[ENTRY_HEADER] = 9;
        assert_eq!(
            decode_batch(&bad_diff, 2),
            Err(BatchError::Diff {
                page: 3,
                error: DiffError::UnknownEncoding(9)
            })
        );
        // An empty entry (the home would list the page as written for nothing).
        let mut empty = 4u64.to_le_bytes().to_vec();
        empty.extend_from_slice(&[0; 4]);
        assert_eq!(
            decode_batch(&[entry(3), empty].concat(), 2),
            Err(BatchError::Empty { page: 4 })
        );
        // A length past the end, however large, is an error and no allocation.
        let mut long = entry(3);
        long[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_batch(&long, 1),
            Err(BatchError::Truncated { at: 0 })
        ));
        // Random bytes never panic.
        let mut rng = StdRng::seed_from_u64(6);
        for _ in 0..5_000 {
            let mut b = good.clone();
            let at = rng.random_range(0..b.len());
            b[at] = rng.random();
            let _ = decode_batch(&b, rng.random_range(0..3));
        }
    }

    #[test]
    fn apply_with_checks_the_whole_diff_before_writing() {
        let mut twin = vec![0u8; PAGE_SIZE];
        twin[10] = 1;
        let mut page = twin.clone();
        page[20] = 2;
        page[4000] = 3;
        let mut good = Vec::new();
        encode(&twin, &page, &mut good);
        let mut writes = Vec::new();
        assert_eq!(
            apply_with(&good, |o, b| writes.push((o, b.to_vec()))),
            Ok(2)
        );
        assert_eq!(writes, vec![(20, vec![2]), (4000, vec![3])]);
        // A valid first run followed by a broken one: nothing may be written at all.
        let mut bad = good.clone();
        bad.extend_from_slice(&[0xff, 0xff, 1, 0, 9]);
        let mut called = false;
        assert!(apply_with(&bad, |_, _| called = true).is_err());
        assert!(!called, "a malformed diff wrote bytes");
    }
}
