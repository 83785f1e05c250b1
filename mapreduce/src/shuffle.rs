//! The shuffle: every rank serves the runs its map tasks wrote to reducers on other ranks, through a dsm
//! service over the job's own connections. Reads happen on a thread of their own, never on the service loop
//! (which also resolves page faults). Runs travel in chunks, so no message is larger than [`CHUNK`].

use dsm::{Dsm, DsmError, Rank, Responder, Service, ServiceId};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The service id of the shuffle (the tuple space has 1).
pub(crate) const SERVICE: ServiceId = 2;

/// The largest piece of a run one answer carries.
const CHUNK: usize = 4 << 20;

/// Names one run a map task wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunId {
    pub(crate) job: u64,
    pub(crate) task: u64,
    pub(crate) partition: u32,
    pub(crate) run: u32,
}

impl RunId {
    /// Where the rank that wrote the run keeps it.
    pub(crate) fn path(&self, root: &Path) -> PathBuf {
        job_dir(root, self.job).join(format!("t{}-p{}-r{}", self.task, self.partition, self.run))
    }
}

/// The directory of one job's files under a rank's spill root.
pub(crate) fn job_dir(root: &Path, job: u64) -> PathBuf {
    root.join(format!("job-{job}"))
}

#[derive(Debug, Serialize, Deserialize)]
struct Fetch {
    run: RunId,
    offset: u64,
}

/// The service half: hands requests to the reading thread.
#[derive(Debug)]
pub(crate) struct ShuffleService {
    requests: crossbeam::channel::Sender<(Vec<u8>, Responder)>,
}

impl Service for ShuffleService {
    fn request(&self, _from: Rank, payload: Vec<u8>, reply: Responder) {
        // The reading thread lives as long as the process; a send cannot fail while it does.
        let _ = self.requests.send((payload, reply));
    }
}

/// Starts the reading thread for runs under `root`.
pub(crate) fn start(root: PathBuf) -> std::io::Result<Arc<ShuffleService>> {
    let (tx, rx) = crossbeam::channel::unbounded::<(Vec<u8>, Responder)>();
    std::thread::Builder::new()
        .name("dsm-shuffle".into())
        .spawn(move || {
            for (payload, reply) in rx {
                let answer = serve(&root, &payload);
                // An error means the reducer is gone; the master learns of it separately.
                let _ = reply.send(&[&answer]);
            }
        })?;
    Ok(Arc::new(ShuffleService { requests: tx }))
}

/// The answer to one fetch: `0` and up to `CHUNK` bytes of the run from the offset asked for, or `1` and
/// what went wrong.
fn serve(root: &Path, payload: &[u8]) -> Vec<u8> {
    let read = || -> Result<Vec<u8>, String> {
        let fetch: Fetch =
            postcard::from_bytes(payload).map_err(|e| format!("a malformed fetch: {e}"))?;
        let path = fetch.run.path(root);
        let what = |e: std::io::Error| format!("reading {}: {e}", path.display());
        let mut f = File::open(&path).map_err(what)?;
        f.seek(SeekFrom::Start(fetch.offset)).map_err(what)?;
        let mut out = vec![0u8];
        f.take(CHUNK as u64).read_to_end(&mut out).map_err(what)?;
        Ok(out)
    };
    read().unwrap_or_else(|e| {
        let mut out = vec![1u8];
        out.extend_from_slice(e.as_bytes());
        out
    })
}

/// Why a fetch failed.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// The rank holding the run is gone: its map output must be made again.
    Lost,
    /// Anything else.
    Failed(String),
}

/// Fetches the whole run `run` from `holder`.
pub(crate) fn fetch(dsm: &Dsm, holder: Rank, run: RunId) -> Result<Vec<u8>, FetchError> {
    let mut out = Vec::new();
    loop {
        let request = postcard::to_allocvec(&Fetch {
            run,
            offset: out.len() as u64,
        })
        .map_err(|e| FetchError::Failed(format!("encoding a fetch: {e}")))?;
        let answer = dsm
            .call(holder, SERVICE, &[&request])
            .map_err(|e| match e {
                DsmError::PeerFailed { .. } => FetchError::Lost,
                other => FetchError::Failed(format!("fetching map output from {holder}: {other}")),
            })?;
        match answer.split_first() {
            Some((0, bytes)) => {
                out.extend_from_slice(bytes);
                if bytes.len() < CHUNK {
                    return Ok(out);
                }
            }
            Some((1, message)) => {
                return Err(FetchError::Failed(format!(
                    "{holder} could not serve map output: {}",
                    String::from_utf8_lossy(message)
                )))
            }
            _ => {
                return Err(FetchError::Failed(format!(
                    "{holder} sent a malformed answer to a fetch"
                )))
            }
        }
    }
}
