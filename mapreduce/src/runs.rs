//! Sorted runs: the files map tasks leave for reducers, and the merge that reads many of them back in key
//! order. A run is a sequence of records, each a LEB128 length and the postcard encoding of one `(key,
//! value)` pair, sorted by key, and then an end mark: the length [`END`], which no record has, and the
//! number of records, 8 bytes little-endian. A run cut off anywhere, even between two records, or with
//! anything after its end mark, is an error to its reader, not a shorter run.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::cmp::Ordering;
use std::io::{self, BufRead, Read, Write};

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Writes `pairs` (sorted) as a run, with its end mark; returns the bytes written.
pub(crate) fn write_run<K: Serialize, V: Serialize>(
    out: impl Write,
    pairs: &[(K, V)],
) -> io::Result<u64> {
    let mut run = RunWriter::new(out);
    for (k, v) in pairs {
        run.push(k, v)?;
    }
    run.finish()
}

/// Writes a run record by record (pairs in key order), counting them for its end mark.
pub(crate) struct RunWriter<W: Write> {
    out: W,
    /// Scratch space for one record's encoding.
    buf: Vec<u8>,
    records: u64,
    bytes: u64,
}

impl<W: Write> RunWriter<W> {
    pub(crate) fn new(out: W) -> RunWriter<W> {
        RunWriter {
            out,
            buf: Vec::new(),
            records: 0,
            bytes: 0,
        }
    }

    /// Writes the record `(key, value)`.
    pub(crate) fn push<K: Serialize, V: Serialize>(
        &mut self,
        key: &K,
        value: &V,
    ) -> io::Result<()> {
        self.buf.clear();
        let body = postcard::to_extend(&(key, value), std::mem::take(&mut self.buf))
            .map_err(|e| invalid(format!("encoding a map output pair: {e}")))?;
        if body.len() > MAX_RECORD as usize {
            return Err(invalid(format!(
                "a map output pair of {} bytes: the limit is {MAX_RECORD}",
                body.len()
            )));
        }
        let mut len = [0u8; 5];
        let n = put_varint(&mut len, body.len() as u32);
        self.out.write_all(&len[..n])?;
        self.out.write_all(&body)?;
        self.bytes += (n + body.len()) as u64;
        self.records += 1;
        self.buf = body;
        Ok(())
    }

    /// Writes the end mark and flushes; returns the bytes of the whole run.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        let mut len = [0u8; 5];
        let n = put_varint(&mut len, END);
        self.out.write_all(&len[..n])?;
        self.out.write_all(&self.records.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.bytes + n as u64 + 8)
    }
}

/// The longest record a run may hold (a key and its value, encoded).
const MAX_RECORD: u32 = 1 << 30;

/// The length that marks the end of a run (longer than any record).
const END: u32 = MAX_RECORD + 1;

/// The LEB128 length at the start of `bytes` and its size, if it is complete there and fits in 32 bits.
fn get_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for (i, b) in bytes.iter().take(5).enumerate() {
        if i == 4 && b & 0xf0 != 0 {
            // Read again byte by byte, which says what is wrong.
            return None;
        }
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((len, i + 1));
        }
    }
    None
}

fn put_varint(out: &mut [u8; 5], mut v: u32) -> usize {
    let mut i = 0;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[i] = byte;
            return i + 1;
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// The pair encoded in `body`, which must be all of it; `what` names the run in errors.
fn decode<K: DeserializeOwned, V: DeserializeOwned>(body: &[u8], what: &str) -> io::Result<(K, V)> {
    match postcard::take_from_bytes(body) {
        Ok((pair, [])) => Ok(pair),
        Ok((_, rest)) => Err(invalid(format!(
            "{what}: a record has {} bytes after its pair",
            rest.len()
        ))),
        Err(e) => Err(invalid(format!("{what}: a record does not decode: {e}"))),
    }
}

/// Reads the pairs of one run in order.
pub(crate) struct RunReader<K, V> {
    src: Box<dyn BufRead + Send>,
    buf: Vec<u8>,
    what: String,
    /// Records read so far.
    records: u64,
    /// Whether the end mark was read.
    ended: bool,
    _pair: std::marker::PhantomData<fn() -> (K, V)>,
}

/// An error of reading the run `what`, naming it (the kind kept).
fn reading(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("reading {what}: {e}"))
}

impl<K: DeserializeOwned, V: DeserializeOwned> RunReader<K, V> {
    /// A reader of the run in `src`; `what` names it in errors.
    pub(crate) fn new(src: Box<dyn BufRead + Send>, what: String) -> RunReader<K, V> {
        RunReader {
            src,
            buf: Vec::new(),
            what,
            records: 0,
            ended: false,
            _pair: std::marker::PhantomData,
        }
    }

    /// Reads the rest of the end mark, whose length was just read, and checks it and that nothing follows.
    fn end(&mut self) -> io::Result<()> {
        let mut count = [0u8; 8];
        self.src
            .read_exact(&mut count)
            .map_err(|e| invalid(format!("{}: cut off in its end mark: {e}", self.what)))?;
        let count = u64::from_le_bytes(count);
        if count != self.records {
            return Err(invalid(format!(
                "{}: its end mark counts {count} records, and {} came before it",
                self.what, self.records
            )));
        }
        if !self
            .src
            .fill_buf()
            .map_err(|e| reading(&self.what, e))?
            .is_empty()
        {
            return Err(invalid(format!("{}: bytes after its end mark", self.what)));
        }
        self.ended = true;
        Ok(())
    }

    /// The next pair, or `None` at the end of the run.
    pub(crate) fn next_pair(&mut self) -> io::Result<Option<(K, V)>> {
        if self.ended {
            return Ok(None);
        }
        // Usually the whole record is in the reader's buffer: decode it in place.
        let buffered = self.src.fill_buf().map_err(|e| reading(&self.what, e))?;
        if buffered.is_empty() {
            return Err(invalid(format!(
                "{}: cut off after {} records, without its end mark",
                self.what, self.records
            )));
        }
        if let Some((len, n)) = get_varint(buffered) {
            if let Some(body) = buffered.get(n..n + len) {
                let pair = decode(body, &self.what)?;
                self.records += 1;
                self.src.consume(n + len);
                return Ok(Some(pair));
            }
        }
        // A record across the buffer's end, or the end mark: read it piece by piece.
        let mut len: u32 = 0;
        for i in 0..5 {
            let mut b = [0u8; 1];
            if self.src.read(&mut b).map_err(|e| reading(&self.what, e))? == 0 {
                return Err(invalid(format!(
                    "{}: cut off in a record length",
                    self.what
                )));
            }
            // The fifth byte holds the top 4 bits of 32: any more is a length no run holds.
            if i == 4 && b[0] & 0xf0 != 0 {
                return Err(invalid(format!("{}: a record length overflows", self.what)));
            }
            len |= u32::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        if len == END {
            self.end()?;
            return Ok(None);
        }
        if len > MAX_RECORD {
            // A damaged run (or one from a confused peer): not a reason to allocate gigabytes.
            return Err(invalid(format!(
                "{}: a record of {len} bytes is longer than any this engine writes ({MAX_RECORD})",
                self.what
            )));
        }
        // Read as it comes, not into a buffer of the length given first: a damaged length costs only the
        // bytes that are really there.
        self.buf.clear();
        let src: &mut Box<dyn BufRead + Send> = &mut self.src;
        let got = src
            .take(u64::from(len))
            .read_to_end(&mut self.buf)
            .map_err(|e| invalid(format!("{}: cut off in a record: {e}", self.what)))?;
        if got < len as usize {
            return Err(invalid(format!(
                "{}: cut off in a record: {got} of its {len} bytes",
                self.what
            )));
        }
        let pair = decode(&self.buf, &self.what)?;
        self.records += 1;
        Ok(Some(pair))
    }
}

/// A tournament (loser) tree over the heads of `k` runs: the next record of a merge is found with one
/// comparison per level of the tree (about log2 k in all) and no keys moved, where a binary heap takes
/// about twice the comparisons and moves its entries. Node 0 holds the winner (the run whose head comes
/// first: the smallest key, the first run among equals, an exhausted run last); nodes `1..k` hold the
/// loser of the match played there; leaf `i` is node `k + i`.
struct Tournament {
    nodes: Vec<usize>,
}

impl Tournament {
    fn new<K: Ord, V>(heads: &[Option<(K, V)>]) -> Tournament {
        let k = heads.len();
        let mut winners = vec![0; 2 * k];
        for (i, w) in winners[k..].iter_mut().enumerate() {
            *w = i;
        }
        let mut nodes = vec![0; k.max(1)];
        for n in (1..k).rev() {
            let (a, b) = (winners[2 * n], winners[2 * n + 1]);
            let (win, lose) = if beats(heads, a, b) { (a, b) } else { (b, a) };
            winners[n] = win;
            nodes[n] = lose;
        }
        nodes[0] = if k > 1 { winners[1] } else { 0 };
        Tournament { nodes }
    }

    fn winner(&self) -> usize {
        self.nodes[0]
    }

    /// Plays run `run`'s new head up from its leaf to the root.
    fn replay<K: Ord, V>(&mut self, heads: &[Option<(K, V)>], run: usize) {
        let mut cur = run;
        let mut n = (heads.len() + run) / 2;
        while n >= 1 {
            if beats(heads, self.nodes[n], cur) {
                std::mem::swap(&mut self.nodes[n], &mut cur);
            }
            n /= 2;
        }
        self.nodes[0] = cur;
    }
}

/// Whether run `a`'s head comes before run `b`'s: by key, then by run; an exhausted run comes last.
fn beats<K: Ord, V>(heads: &[Option<(K, V)>], a: usize, b: usize) -> bool {
    match (&heads[a], &heads[b]) {
        (Some((ka, _)), Some((kb, _))) => ka.cmp(kb).then(a.cmp(&b)) == Ordering::Less,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => a < b,
    }
}

/// Merges sorted runs and calls `group` once per key, in key order, with all of its values (the first
/// run's first).
pub(crate) fn merge<K, V>(
    runs: Vec<RunReader<K, V>>,
    mut group: impl FnMut(K, Vec<V>) -> io::Result<()>,
) -> io::Result<()>
where
    K: Ord + DeserializeOwned,
    V: DeserializeOwned,
{
    // The group's key as its first record has it (keys that compare equal may still differ).
    let mut first = None;
    let mut values = Vec::new();
    merge_records(runs, |key, value, more| {
        let key = first.take().unwrap_or(key);
        values.push(value);
        if more {
            first = Some(key);
            return Ok(());
        }
        group(key, std::mem::take(&mut values))
    })
}

/// Merges sorted runs and calls `record` once per record, in key order (a key's values in run order, the
/// first run's first), saying whether the next record has the same key: what merges one record at a time
/// need, holding no key's values together.
pub(crate) fn merge_records<K, V>(
    mut runs: Vec<RunReader<K, V>>,
    mut record: impl FnMut(K, V, bool) -> io::Result<()>,
) -> io::Result<()>
where
    K: Ord + DeserializeOwned,
    V: DeserializeOwned,
{
    let mut heads = Vec::with_capacity(runs.len());
    for r in runs.iter_mut() {
        heads.push(r.next_pair()?);
    }
    if heads.is_empty() {
        return Ok(());
    }
    let mut tree = Tournament::new(&heads);
    while heads[tree.winner()].is_some() {
        let run = tree.winner();
        // Takes the run's head and reads its next record (which may not come before the head taken).
        let Some((key, value)) = heads[run].take() else {
            return Err(invalid("the merge advanced a run past its end"));
        };
        heads[run] = runs[run].next_pair()?;
        if matches!(&heads[run], Some((k, _)) if *k < key) {
            return Err(invalid(format!("{}: keys out of order", runs[run].what)));
        }
        tree.replay(&heads, run);
        let more = matches!(&heads[tree.winner()], Some((k, _)) if *k == key);
        record(key, value, more)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn reader(bytes: Vec<u8>) -> RunReader<String, u64> {
        RunReader::new(Box::new(io::Cursor::new(bytes)), "test run".into())
    }

    /// A key compared without regard to case: keys that compare equal, yet differ.
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Caseless(String);

    impl PartialEq for Caseless {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Caseless {}
    impl PartialOrd for Caseless {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Caseless {
        fn cmp(&self, other: &Self) -> Ordering {
            self.0.to_lowercase().cmp(&other.0.to_lowercase())
        }
    }

    #[test]
    fn a_group_has_its_first_record_s_key() {
        let runs: Vec<RunReader<Caseless, u64>> = [("apple", 1u64), ("APPLE", 2), ("Apple", 3)]
            .into_iter()
            .map(|(k, v)| {
                let mut bytes = Vec::new();
                write_run(&mut bytes, &[(Caseless(k.into()), v)]).unwrap();
                RunReader::new(Box::new(io::Cursor::new(bytes)), "test run".into())
            })
            .collect();
        let mut groups = Vec::new();
        merge(runs, |k, vs| {
            groups.push((k.0, vs));
            Ok(())
        })
        .unwrap();
        assert_eq!(groups, [("apple".to_string(), vec![1, 2, 3])]);
    }

    #[test]
    fn merge_groups_every_key_once_in_order() {
        let mut rng = rand::rng();
        for _ in 0..50 {
            let mut expect: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
            let mut runs = Vec::new();
            // Up to 40 runs: trees of every shape, not only powers of two.
            for r in 0..rng.random_range(0..40u64) {
                let mut pairs: Vec<(String, u64)> = (0..rng.random_range(0..40))
                    .map(|i| (format!("k{}", rng.random_range(0..30)), r * 1000 + i))
                    .collect();
                pairs.sort();
                for (k, v) in &pairs {
                    expect.entry(k.clone()).or_default().push(*v);
                }
                let mut bytes = Vec::new();
                write_run(&mut bytes, &pairs).unwrap();
                runs.push(reader(bytes));
            }
            let mut got = std::collections::BTreeMap::new();
            let mut last: Option<String> = None;
            merge(runs, |k, vs| {
                assert!(
                    last.as_ref().is_none_or(|l| *l < k),
                    "keys in order, once each"
                );
                last = Some(k.clone());
                got.insert(k, vs);
                Ok(())
            })
            .unwrap();
            // Every value, in run order (the first run's first).
            assert_eq!(got, expect);
        }
    }

    #[test]
    fn records_across_the_read_buffer_are_read_whole() {
        // Keys of every length up to 22 bytes, and some of 200 and 20000 bytes: lengths of one, two
        // and three bytes.
        let pairs: Vec<(String, u64)> = (0..300)
            .map(|i| {
                let tail = match i % 50 {
                    7 => 200,
                    13 => 20_000,
                    _ => i % 23,
                };
                (format!("key-{i:04}-{}", "x".repeat(tail)), i as u64)
            })
            .collect();
        let mut bytes = Vec::new();
        write_run(&mut bytes, &pairs).unwrap();
        // Buffers smaller than a record, and of sizes that cut records and lengths at every place.
        for capacity in [1, 2, 3, 7, 16, 61, 4096, 64 << 10] {
            let src = io::BufReader::with_capacity(capacity, io::Cursor::new(bytes.clone()));
            let mut r: RunReader<String, u64> = RunReader::new(Box::new(src), "test".into());
            let mut got = Vec::new();
            while let Some(p) = r.next_pair().unwrap() {
                got.push(p);
            }
            assert_eq!(got, pairs, "buffer of {capacity} bytes");
        }
    }

    #[test]
    fn a_damaged_run_is_an_error_not_a_panic() {
        let mut bytes = Vec::new();
        write_run(&mut bytes, &[("a".to_string(), 1u64), ("b".to_string(), 2)]).unwrap();
        // Cut anywhere, between the two records too, or with a byte more: never a shorter run.
        for cut in 0..bytes.len() {
            let r = reader(bytes[..cut].to_vec());
            let e = merge(vec![r], |_, _| Ok(())).unwrap_err();
            assert!(e.to_string().contains("test run"), "{e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let e = merge(vec![reader(longer)], |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("after its end mark"), "{e}");
        // The record "b" dropped, its end mark kept: the count tells.
        let (first, end) = {
            let mut one = RunWriter::new(Vec::new());
            one.push(&"a".to_string(), &1u64).unwrap();
            let first = one.bytes as usize;
            (first, one.finish().unwrap() as usize - first)
        };
        let mut dropped = bytes[..first].to_vec();
        dropped.extend_from_slice(&bytes[bytes.len() - end..]);
        let e = merge(vec![reader(dropped)], |_, _| Ok(())).unwrap_err();
        assert!(
            e.to_string().contains("counts 2 records, and 1 came"),
            "{e}"
        );
        // A record whose length covers the next one as well: bytes left after its pair.
        let mut swallowed = bytes.clone();
        swallowed[0] += u8::try_from(first).unwrap();
        let e = merge(vec![reader(swallowed)], |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("bytes after its pair"), "{e}");
        let mut unsorted = Vec::new();
        write_run(
            &mut unsorted,
            &[("b".to_string(), 1u64), ("a".to_string(), 2)],
        )
        .unwrap();
        let e = merge(vec![reader(unsorted)], |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
        // A length no writer produces (2^31), followed by a few bytes.
        let mut huge = vec![0x80, 0x80, 0x80, 0x80, 0x08];
        huge.extend_from_slice(b"abc");
        let e = merge(vec![reader(huge)], |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("longer than any"), "{e}");
        // A length past 32 bits (2^32: its bits would wrap to 0), and a length within the limit with
        // fewer bytes behind it.
        for (bytes, says) in [
            (&[0x80, 0x80, 0x80, 0x80, 0x10, 1, 2][..], "overflows"),
            (
                &[0x80, 0x80, 0x80, 0x08, 1, 2, 3][..],
                "3 of its 16777216 bytes",
            ),
        ] {
            let e = merge(vec![reader(bytes.to_vec())], |_, _| Ok(())).unwrap_err();
            assert!(e.to_string().contains(says), "{bytes:?}: {e}");
        }
    }
}
