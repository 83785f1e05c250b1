//! The shuffle: every rank serves the map output it holds to reducers on other ranks, through a dsm service
//! over the job's own connections. A reducer first asks a holder to write the batches it needs (if no
//! reduce has asked before) and how many runs of its partition each has; then it asks for all those runs at
//! once, and each answer carries up to [`CHUNK`] bytes of them, run after run. Requests are handed to a
//! thread of the job's own (`MapReduce::run`), never handled on the service loop (which also resolves page
//! faults).

use crate::master::Source;
use dsm::{Dsm, DsmError, Rank, Responder, Service, ServiceId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The service id of the shuffle (the tuple space has 1).
pub(crate) const SERVICE: ServiceId = 2;

/// The most bytes of runs one answer carries.
const CHUNK: usize = 4 << 20;

/// The most runs of one holder a reduce fetches: a fetch names every run still wanted, each in at most
/// 30 bytes (a `RunId`'s varints: 10, 10, 5 and 5), with 64 bytes for the rest of the request, and a
/// request is at most [`dsm::MAX_SERVICE_REQUEST`] bytes.
const MAX_RUNS: u64 = ((dsm::MAX_SERVICE_REQUEST - 64) / 30) as u64;

/// Names one run of a batch of map output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunId {
    pub(crate) job: u64,
    pub(crate) batch: u64,
    pub(crate) partition: u32,
    pub(crate) run: u32,
}

impl RunId {
    /// Where the rank that wrote the run keeps it.
    pub(crate) fn path(&self, root: &Path) -> PathBuf {
        job_dir(root, self.job).join(format!("b{}-p{}-r{}", self.batch, self.partition, self.run))
    }
}

/// The directory of one job's files under a rank's spill root.
pub(crate) fn job_dir(root: &Path, job: u64) -> PathBuf {
    root.join(format!("job-{job}"))
}

/// A reducer asks a holder for the runs it still needs from it, the first from byte `offset` on. The
/// answer carries as much as fits in [`CHUNK`], run after run, so a reducer fetches all it needs from one
/// holder in one round trip per chunk, not one per run (a job of M maps on P ranks has M/P runs of each
/// partition on each rank).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Fetch {
    runs: Vec<RunId>,
    offset: u64,
}

/// What a reducer asks of a holder.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Write these batches of job `job` (those not yet written) and say how many runs of `partition` each
    /// has; each must hold exactly the map tasks its source names.
    Seal {
        job: u64,
        partition: u32,
        sources: Vec<Source>,
    },
    /// Send runs.
    Fetch(Fetch),
}

impl Request {
    fn job(&self) -> Option<u64> {
        match self {
            Request::Seal { job, .. } => Some(*job),
            Request::Fetch(f) => f.runs.first().map(|r| r.job),
        }
    }
}

/// A piece of one run in an answer: its index in the fetch's `runs`, the bytes, and whether they end it.
#[derive(Debug, PartialEq)]
struct Piece<'a> {
    index: u32,
    bytes: &'a [u8],
    last: bool,
}

/// A piece's header in an answer: its index (u32), whether it ends its run (u8) and its length (u64),
/// little-endian; its bytes follow. Framed by hand rather than by serde, which moves a `Vec<u8>` a byte
/// at a time (a few milliseconds for the 1.6 MB one reducer of the 100 MB word count fetches).
const PIECE_HEADER: usize = 4 + 1 + 8;

fn piece_header(index: u32, last: bool, len: u64) -> [u8; PIECE_HEADER] {
    let mut h = [0u8; PIECE_HEADER];
    h[..4].copy_from_slice(&index.to_le_bytes());
    h[4] = u8::from(last);
    h[5..].copy_from_slice(&len.to_le_bytes());
    h
}

/// The pieces of an answer's body, or `None` if it is not a sequence of whole pieces.
fn pieces(mut body: &[u8]) -> Option<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    while !body.is_empty() {
        let (header, rest) = body.split_at_checked(PIECE_HEADER)?;
        let index = u32::from_le_bytes(header[..4].try_into().ok()?);
        let last = match header[4] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let len = usize::try_from(u64::from_le_bytes(header[5..].try_into().ok()?)).ok()?;
        let (bytes, rest) = rest.split_at_checked(len)?;
        pieces.push(Piece { index, bytes, last });
        body = rest;
    }
    Some(pieces)
}

/// A job's requests, and where each answer goes.
pub(crate) type Requests = crossbeam::channel::Receiver<(Request, Responder)>;

/// The service half: hands each request to the thread of its job on this rank.
#[derive(Debug, Default)]
pub(crate) struct ShuffleService {
    jobs: Mutex<HashMap<u64, crossbeam::channel::Sender<(Request, Responder)>>>,
}

impl ShuffleService {
    /// Job `job`'s requests from now on, until [`ShuffleService::close`].
    pub(crate) fn open(&self, job: u64) -> Requests {
        let (tx, rx) = crossbeam::channel::unbounded();
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job, tx);
        rx
    }

    /// No more requests of job `job`: its thread ends once it has answered those it has.
    pub(crate) fn close(&self, job: u64) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&job);
    }
}

impl Service for ShuffleService {
    fn request(&self, from: Rank, payload: Vec<u8>, reply: Responder) {
        let request: Request = match postcard::from_bytes(&payload) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(&[&failure(&format!("a malformed request from {from}: {e}"))]);
                return;
            }
        };
        let job = request.job();
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        match job.and_then(|j| jobs.get(&j)) {
            // The job's thread lives until the job is closed here, unless it panicked: then the request
            // comes back, and is answered, not left without an answer for its caller to wait on.
            Some(tx) => {
                if let Err(crossbeam::channel::SendError((_, reply))) = tx.send((request, reply)) {
                    let what = "the rank's shuffle thread for the job has ended";
                    let _ = reply.send(&[&failure(what)]);
                }
            }
            None => {
                drop(jobs);
                let what = match job {
                    Some(j) => {
                        format!("job {j} is not running here (it has ended, or never began)")
                    }
                    None => "a fetch of no runs".to_string(),
                };
                let _ = reply.send(&[&failure(&what)]);
            }
        }
    }
}

/// An answer saying what went wrong: `1` and the message.
pub(crate) fn failure(what: &str) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(what.as_bytes());
    out
}

/// The answer to a seal: `0` and the run counts, or the failure.
pub(crate) fn sealed(counts: Result<Vec<u32>, String>) -> Vec<u8> {
    counts
        .and_then(|c| {
            postcard::to_extend(&c, vec![0u8]).map_err(|e| format!("encoding run counts: {e}"))
        })
        .unwrap_or_else(|e| failure(&e))
}

/// Asks `holder` to write the batches of `sources` (all its own) and returns how many runs of
/// `partition` each has.
pub(crate) fn seal(
    dsm: &Dsm,
    holder: Rank,
    job: u64,
    partition: u32,
    sources: &[Source],
) -> Result<Vec<u32>, FetchError> {
    let request = postcard::to_allocvec(&Request::Seal {
        job,
        partition,
        sources: sources.to_vec(),
    })
    .map_err(|e| FetchError::Failed(format!("encoding a request: {e}")))?;
    let answer = call(dsm, holder, &request)?;
    counts_in(&answer, holder, partition, sources.len())
}

/// The run counts in `holder`'s answer to a seal of `sources` batches.
fn counts_in(
    answer: &[u8],
    holder: Rank,
    partition: u32,
    sources: usize,
) -> Result<Vec<u32>, FetchError> {
    let malformed = || FetchError::Failed(format!("{holder} sent a malformed answer to a seal"));
    match answer.split_first() {
        Some((0, body)) => {
            let counts: Vec<u32> = postcard::from_bytes(body).map_err(|_| malformed())?;
            if counts.len() != sources {
                return Err(malformed());
            }
            let runs: u64 = counts.iter().map(|&c| u64::from(c)).sum();
            if runs > MAX_RUNS {
                return Err(FetchError::Failed(format!(
                    "{holder} holds {runs} runs of partition {partition} for one reduce, more than a fetch can name ({MAX_RUNS}): a larger memory budget makes maps spill fewer"
                )));
            }
            Ok(counts)
        }
        Some((1, message)) => Err(FetchError::Failed(format!(
            "{holder} could not hand over its map output: {}",
            String::from_utf8_lossy(message)
        ))),
        _ => Err(malformed()),
    }
}

/// Sends `request` to `holder`'s shuffle and returns the answer.
fn call(dsm: &Dsm, holder: Rank, request: &[u8]) -> Result<Vec<u8>, FetchError> {
    dsm.call(holder, SERVICE, &[request]).map_err(|e| match e {
        DsmError::PeerFailed { .. } => FetchError::Lost,
        other => FetchError::Failed(format!("fetching map output from {holder}: {other}")),
    })
}

/// The answer to one fetch: `0` and the pieces (up to `CHUNK` bytes of runs from the position asked
/// for), or `1` and what went wrong.
pub(crate) fn serve(root: &Path, fetch: &Fetch) -> Vec<u8> {
    let read = || -> Result<Vec<u8>, String> {
        // Room for what the answer will carry (the runs' sizes on disk, up to the chunk), so that reading
        // them does not grow the buffer by doubling, copying what it holds each time.
        // Looked at only until they pass the chunk: a fetch may name many runs.
        let mut on_disk = 0u64;
        for r in &fetch.runs {
            if on_disk.saturating_sub(fetch.offset) >= CHUNK as u64 {
                break;
            }
            on_disk += std::fs::metadata(r.path(root)).map_or(0, |m| m.len());
        }
        let carried = on_disk.saturating_sub(fetch.offset).min(CHUNK as u64) as usize;
        let headers = fetch.runs.len().saturating_mul(PIECE_HEADER);
        let mut out = Vec::with_capacity((1 + carried).saturating_add(headers).min(2 * CHUNK));
        out.push(0u8);
        let mut room = CHUNK as u64;
        let mut offset = fetch.offset;
        for (index, run) in fetch.runs.iter().enumerate() {
            if room == 0 {
                break;
            }
            let path = run.path(root);
            let what = |e: std::io::Error| format!("reading {}: {e}", path.display());
            let mut f = File::open(&path).map_err(what)?;
            f.seek(SeekFrom::Start(offset)).map_err(what)?;
            // The header is written once the length is known.
            let header = out.len();
            out.resize(header + PIECE_HEADER, 0);
            let len = f.take(room).read_to_end(&mut out).map_err(what)? as u64;
            room -= len;
            // A run that filled the room may end exactly there: the next fetch then gets its empty end.
            let last = room > 0;
            out[header..header + PIECE_HEADER].copy_from_slice(&piece_header(
                index as u32,
                last,
                len,
            ));
            offset = 0;
        }
        Ok(out)
    };
    read().unwrap_or_else(|e| failure(&e))
}

/// Why a fetch failed.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// The rank holding the run is gone: its map output must be made again.
    Lost,
    /// Anything else.
    Failed(String),
}

/// Fetches the runs `runs` from `holder`, handing their bytes to `each` piece by piece as they come
/// (with the run's index in `runs`, and whether the piece ends its run), so that no more than an answer
/// is held here at once: where the runs go, memory or files, is `each`'s to say.
pub(crate) fn fetch_all(
    dsm: &Dsm,
    holder: Rank,
    runs: &[RunId],
    each: impl FnMut(usize, &[u8], bool) -> Result<(), FetchError>,
) -> Result<(), FetchError> {
    fetch_through(|request| call(dsm, holder, request), holder, runs, each)
}

/// The most runs one fetch names.
const FETCH_RUNS: usize = 4096;

/// `fetch_all` over `call`, which sends a fetch and returns the answer.
fn fetch_through(
    mut call: impl FnMut(&[u8]) -> Result<Vec<u8>, FetchError>,
    holder: Rank,
    runs: &[RunId],
    mut each: impl FnMut(usize, &[u8], bool) -> Result<(), FetchError>,
) -> Result<(), FetchError> {
    let malformed = || FetchError::Failed(format!("{holder} sent a malformed answer to a fetch"));
    let mut at = 0usize;
    // How much of run `at` has come.
    let mut offset = 0u64;
    while at < runs.len() {
        // The runs from `at`, at most `FETCH_RUNS` of them: a request's size, and the holder's work for
        // it, do not grow with the runs left.
        let end = runs.len().min(at + FETCH_RUNS);
        let request = postcard::to_allocvec(&Request::Fetch(Fetch {
            runs: runs[at..end].to_vec(),
            offset,
        }))
        .map_err(|e| FetchError::Failed(format!("encoding a fetch: {e}")))?;
        let answer = call(&request)?;
        let pieces = match answer.split_first() {
            Some((0, body)) => pieces(body).ok_or_else(malformed)?,
            Some((1, message)) => {
                return Err(FetchError::Failed(format!(
                    "{holder} could not serve map output: {}",
                    String::from_utf8_lossy(message)
                )))
            }
            _ => return Err(malformed()),
        };
        // An answer that neither brings bytes nor ends a run would have the same fetch asked for ever.
        if !pieces.iter().any(|p| p.last || !p.bytes.is_empty()) {
            return Err(malformed());
        }
        let (first, count) = (at, pieces.len());
        for (k, piece) in pieces.into_iter().enumerate() {
            // Pieces come in order from the position asked for, name only runs asked for, and only the
            // last may leave its run unfinished: anything else would misplace bytes.
            if piece.index as usize != k || first + k >= end || (!piece.last && k + 1 < count) {
                return Err(malformed());
            }
            each(first + k, piece.bytes, piece.last)?;
            offset += piece.bytes.len() as u64;
            if piece.last {
                offset = 0;
                at = first + k + 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(batch: u64) -> RunId {
        RunId {
            job: 0,
            batch,
            partition: 0,
            run: 0,
        }
    }

    /// A receiver of fetched pieces that puts each run, once whole, into `got` with its index (a run
    /// whose pieces came out of order, or mixed with another's, fails the test).
    fn whole_runs(
        got: &mut Vec<(usize, Vec<u8>)>,
    ) -> impl FnMut(usize, &[u8], bool) -> Result<(), FetchError> + '_ {
        let mut current: Option<(usize, Vec<u8>)> = None;
        move |index, bytes, last| {
            let (i, run) = current.get_or_insert_with(|| (index, Vec::new()));
            assert_eq!(*i, index, "a piece of run {index} within run {i}");
            run.extend_from_slice(bytes);
            if last {
                got.push(current.take().expect("a run under way"));
            }
            Ok(())
        }
    }

    /// Serves `request` as the job's thread does a fetch.
    fn serve_encoded(root: &Path, request: &[u8]) -> Vec<u8> {
        match postcard::from_bytes(request) {
            Ok(Request::Fetch(f)) => serve(root, &f),
            other => panic!("a fetch expected: {other:?}"),
        }
    }

    #[test]
    fn runs_of_any_size_arrive_whole_and_in_order_in_few_answers() {
        let root = std::env::temp_dir().join(format!("dsm-shuffle-test-{}", std::process::id()));
        std::fs::create_dir_all(job_dir(&root, 0)).unwrap();
        // Empty runs, a run that ends exactly at the end of an answer, and one that spans several answers.
        let sizes = [0, 10, CHUNK - 10, 0, 20, CHUNK, 3 * CHUNK + 5, 7, 0];
        let runs: Vec<RunId> = (0..sizes.len() as u64).map(run).collect();
        let content =
            |i: usize, n: usize| -> Vec<u8> { (0..n).map(|b| (b * 7 + i) as u8).collect() };
        for (i, (&n, r)) in sizes.iter().zip(&runs).enumerate() {
            std::fs::write(r.path(&root), content(i, n)).unwrap();
        }
        let mut answers = 0;
        let mut got = Vec::new();
        fetch_through(
            |request| {
                answers += 1;
                Ok(serve_encoded(&root, request))
            },
            Rank(1),
            &runs,
            whole_runs(&mut got),
        )
        .unwrap();
        assert_eq!(got.len(), sizes.len());
        for (i, (index, bytes)) in got.iter().enumerate() {
            assert_eq!(*index, i);
            assert!(*bytes == content(i, sizes[i]), "run {i} differs");
        }
        let total: usize = sizes.iter().sum();
        assert!(
            answers <= total / CHUNK + 2,
            "{answers} answers for {total} bytes"
        );
        // A run that is missing is an error naming it, not a hang or a short run.
        std::fs::remove_file(runs[4].path(&root)).unwrap();
        let e = fetch_through(
            |r| Ok(serve_encoded(&root, r)),
            Rank(1),
            &runs,
            |_, _, _| Ok(()),
        )
        .unwrap_err();
        let FetchError::Failed(what) = e else {
            panic!("a missing run is a failure")
        };
        assert!(
            what.contains("b4-p0-r0") && what.contains("rank 1"),
            "{what}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn many_runs_are_fetched_a_bounded_number_at_a_time() {
        let root = std::env::temp_dir().join(format!("dsm-shuffle-many-{}", std::process::id()));
        std::fs::create_dir_all(job_dir(&root, 0)).unwrap();
        let count = FETCH_RUNS + FETCH_RUNS / 2;
        let runs: Vec<RunId> = (0..count as u64).map(run).collect();
        for (i, r) in runs.iter().enumerate() {
            std::fs::write(r.path(&root), (i as u32).to_le_bytes()).unwrap();
        }
        let (mut answers, mut got) = (0, Vec::new());
        fetch_through(
            |request| {
                let Ok(Request::Fetch(f)) = postcard::from_bytes(request) else {
                    panic!("a fetch expected")
                };
                assert!(f.runs.len() <= FETCH_RUNS, "{} runs named", f.runs.len());
                answers += 1;
                Ok(serve(&root, &f))
            },
            Rank(1),
            &runs,
            whole_runs(&mut got),
        )
        .unwrap();
        assert_eq!(answers, 2);
        assert_eq!(got.len(), count);
        for (i, (index, bytes)) in got.iter().enumerate() {
            assert_eq!((*index, &bytes[..]), (i, &(i as u32).to_le_bytes()[..]));
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn answers_out_of_order_or_empty_are_refused() {
        let runs = [run(0), run(1)];
        let answer = |pieces: Vec<Piece>| {
            let mut out = vec![0u8];
            for p in pieces {
                out.extend_from_slice(&piece_header(p.index, p.last, p.bytes.len() as u64));
                out.extend_from_slice(p.bytes);
            }
            out
        };
        let wrong = answer(vec![Piece {
            index: 1,
            bytes: &[1],
            last: true,
        }]);
        let e = fetch_through(|_| Ok(wrong.clone()), Rank(2), &runs, |_, _, _| Ok(())).unwrap_err();
        assert!(matches!(e, FetchError::Failed(w) if w.contains("malformed")));
        let empty = answer(Vec::new());
        let e = fetch_through(|_| Ok(empty.clone()), Rank(2), &runs, |_, _, _| Ok(())).unwrap_err();
        assert!(matches!(e, FetchError::Failed(w) if w.contains("malformed")));
        let e = fetch_through(|_| Ok(vec![9]), Rank(2), &runs, |_, _, _| Ok(())).unwrap_err();
        assert!(matches!(e, FetchError::Failed(w) if w.contains("malformed")));
        // A piece past the runs asked for, one that brings nothing and ends nothing (asked again, it would
        // be asked for ever), and an unfinished piece before others: each is refused.
        let piece = |index, bytes: &'static [u8], last| Piece { index, bytes, last };
        for bad in [
            vec![
                piece(0, b"a", true),
                piece(1, b"b", true),
                piece(2, b"c", true),
            ],
            vec![piece(0, b"", false)],
            vec![piece(0, b"a", false), piece(1, b"b", true)],
        ] {
            let bad = answer(bad);
            let mut calls = 0;
            let e = fetch_through(
                |_| {
                    calls += 1;
                    Ok(bad.clone())
                },
                Rank(2),
                &runs,
                |_, _, _| Ok(()),
            )
            .unwrap_err();
            assert!(matches!(e, FetchError::Failed(w) if w.contains("malformed")));
            assert_eq!(calls, 1);
        }
        // A header cut short, a length past the answer's end, and an end flag neither 0 nor 1.
        let whole = answer(vec![piece(0, b"abc", true), piece(1, b"d", true)]);
        let mut got = Vec::new();
        fetch_through(|_| Ok(whole.clone()), Rank(2), &runs, whole_runs(&mut got)).unwrap();
        assert_eq!(got, vec![(0, b"abc".to_vec()), (1, b"d".to_vec())]);
        let mut long = whole.clone();
        long.truncate(long.len() - 1);
        let mut flag = whole.clone();
        flag[1 + 4] = 7;
        for bad in [vec![0, 0, 0], long, flag] {
            let e =
                fetch_through(|_| Ok(bad.clone()), Rank(2), &runs, |_, _, _| Ok(())).unwrap_err();
            assert!(matches!(e, FetchError::Failed(w) if w.contains("malformed")));
        }
    }

    #[test]
    fn seal_answers_are_read_and_bad_ones_refused() {
        let holder = Rank(1);
        assert_eq!(
            counts_in(&sealed(Ok(vec![3, 0])), holder, 0, 2).unwrap(),
            [3, 0]
        );
        let e = counts_in(&sealed(Err("disk full".into())), holder, 0, 2).unwrap_err();
        assert!(matches!(e, FetchError::Failed(w) if w.contains("disk full")));
        // A count per batch asked about, no more and no fewer; a reply neither 0 nor 1.
        for bad in [
            sealed(Ok(vec![1])),
            sealed(Ok(vec![1, 2, 3])),
            vec![7],
            Vec::new(),
        ] {
            let e = counts_in(&bad, holder, 0, 2).unwrap_err();
            assert!(matches!(e, FetchError::Failed(w) if w.contains("malformed")));
        }
        // Counts past what a fetch can name are refused before anything is made for them.
        let e = counts_in(&sealed(Ok(vec![u32::MAX, 1])), holder, 0, 2).unwrap_err();
        assert!(matches!(e, FetchError::Failed(w) if w.contains("more than a fetch can name")));
        let most = MAX_RUNS as u32;
        assert!(counts_in(&sealed(Ok(vec![most - 1, 1])), holder, 0, 2).is_ok());
        assert!(counts_in(&sealed(Ok(vec![most, 1])), holder, 0, 2).is_err());
        // A fetch naming that many runs, each of the longest encoding, fits in one request.
        let longest = RunId {
            job: u64::MAX,
            batch: u64::MAX,
            partition: u32::MAX,
            run: u32::MAX,
        };
        let fetch = Request::Fetch(Fetch {
            runs: vec![longest; MAX_RUNS as usize],
            offset: u64::MAX,
        });
        let bytes = postcard::to_allocvec(&fetch).unwrap().len();
        assert!(bytes <= dsm::MAX_SERVICE_REQUEST, "{bytes} bytes");
    }
}
