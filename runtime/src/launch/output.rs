//! The ranks' output on its way to the launcher's own standard output and error: a thread per stream that
//! copies it whole lines at a time (prefixed with the rank unless told not to), and what the launcher needs
//! to know at the end (whether everything was written, and whether to wait for more).
//!
//! Never drops output silently: a write that fails stops that stream (its rank then sees its pipe closed,
//! as it would writing to the failed file itself) and is reported in the job's outcome; and the launcher
//! waits for a reader that is slow, however slow.

use super::lock;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The most bytes a stream's thread holds: a line longer than this is written in pieces (which another
/// rank's lines may come between).
const CHUNK: usize = 64 * 1024;

/// How long the launcher waits, once every rank has ended, for output that stopped coming while no write
/// was under way: a process that left the ranks' groups but kept their output open would hold it for ever.
const QUIET: Duration = Duration::from_secs(2);
/// How often the wait for the ranks' last output looks whether it was interrupted.
const LOOK: Duration = Duration::from_millis(100);

/// How long the launcher waits for the ranks' last output after a job with a time limit ended (a reader
/// that stopped reading must not keep it past its limit by more than this).
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Held while a forwarded piece (or the launcher's own word) is written, so that lines never interleave
/// inside one another. Standard output and error have one each, unless they are the same file (a
/// `2>&1`, or a terminal): then they share one, since a line longer than the pipe's atomic write size is
/// written in pieces. With two, a standard output nobody reads does not hold up the launcher's word.
static STDOUT: Mutex<()> = Mutex::new(());
static STDERR: Mutex<()> = Mutex::new(());

fn writing_lock(to_stderr: bool) -> &'static Mutex<()> {
    static SAME: OnceLock<bool> = OnceLock::new();
    let same = *SAME.get_or_init(|| {
        use std::os::fd::AsFd;
        let out = nix::sys::stat::fstat(std::io::stdout().as_fd());
        let err = nix::sys::stat::fstat(std::io::stderr().as_fd());
        match (out, err) {
            (Ok(o), Ok(e)) => o.st_dev == e.st_dev && o.st_ino == e.st_ino,
            // Cannot tell: one lock is always safe.
            _ => true,
        }
    });
    if to_stderr && !same {
        &STDERR
    } else {
        &STDOUT
    }
}

/// Writes `bytes` to the launcher's standard output or error, whole, under the stream's lock.
fn write_out(to_stderr: bool, bytes: &[u8]) -> std::io::Result<()> {
    let _writing = lock(writing_lock(to_stderr));
    if to_stderr {
        let mut e = std::io::stderr().lock();
        e.write_all(bytes).and_then(|()| e.flush())
    } else {
        let mut o = std::io::stdout().lock();
        o.write_all(bytes).and_then(|()| o.flush())
    }
}

/// Says `what` on the launcher's standard error as `name: what`, between the ranks' lines (a standard
/// error nobody reads any more is no reason to stop: eprintln! would panic).
pub(super) fn say(name: &str, what: &str) {
    let _ = write_out(true, format!("{name}: {what}\n").as_bytes());
}

/// A write of a rank's output that failed.
#[derive(Debug)]
struct Failed {
    rank: usize,
    to_stderr: bool,
    /// The reader closed its end (EPIPE).
    closed: bool,
    error: String,
}

/// The threads that copy the ranks' output, and what they have done.
#[derive(Debug)]
pub(super) struct Output {
    prefix: bool,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    progress: Arc<Progress>,
    done: Sender<()>,
    ended: Receiver<()>,
    streams: usize,
}

#[derive(Debug, Default)]
struct Progress {
    /// Bytes read from the ranks.
    read: AtomicU64,
    /// Threads inside a write (one blocked by a slow reader is still working).
    writing: AtomicUsize,
    /// The first write that failed.
    failed: Mutex<Option<Failed>>,
}

impl Output {
    /// Copies to the launcher's own streams, or with `capture` into it.
    pub(super) fn new(prefix: bool, capture: Option<Arc<Mutex<Vec<u8>>>>) -> Output {
        let (done, ended) = std::sync::mpsc::channel();
        Output {
            prefix,
            capture,
            progress: Arc::default(),
            done,
            ended,
            streams: 0,
        }
    }

    /// Copies `stream`, rank `rank`'s standard output or error, on a thread of its own until the rank's
    /// end of it is closed.
    pub(super) fn forward(
        &mut self,
        rank: usize,
        stream: impl Read + Send + 'static,
        to_stderr: bool,
    ) -> std::io::Result<()> {
        let pump = Pump {
            rank,
            to_stderr,
            prefix: self.prefix,
            capture: self.capture.clone(),
            progress: self.progress.clone(),
            line_begun: false,
        };
        let done = self.done.clone();
        std::thread::Builder::new()
            .name(format!("dsmrun-output-{rank}"))
            .spawn(move || {
                pump.run(stream);
                let _ = done.send(());
            })?;
        self.streams += 1;
        Ok(())
    }

    /// Waits, once the ranks have ended, for their last output to be written, however slowly the reader
    /// takes it; with `limited` (the job had a time limit) for at most [`DRAIN_LIMIT`]. A stream that
    /// stays open and quiet while nothing is being written ends the wait after [`QUIET`]. Returns what
    /// was lost, if anything was. The wait also ends, within [`LOOK`], once `interrupted` says so (a
    /// signal to the launcher, whose reader may take nothing more).
    pub(super) fn drain(&self, limited: bool, interrupted: &dyn Fn() -> bool) -> Option<Unwritten> {
        let mut ended = 0;
        let mut seen = self.progress.read.load(Ordering::Relaxed);
        let mut looked = Instant::now();
        let give_up = looked + DRAIN_LIMIT;
        let mut cut_short = false;
        while ended < self.streams && (!limited || Instant::now() < give_up) {
            if interrupted() {
                cut_short = true;
                break;
            }
            match self.ended.recv_timeout(LOOK) {
                Ok(()) => ended += 1,
                Err(_) if looked.elapsed() >= QUIET => {
                    let now = self.progress.read.load(Ordering::Relaxed);
                    if now == seen && self.progress.writing.load(Ordering::Relaxed) == 0 {
                        break;
                    }
                    seen = now;
                    looked = Instant::now();
                }
                Err(_) => {}
            }
        }
        if let Some(f) = lock(&self.progress.failed).as_ref() {
            let stream = if f.to_stderr { "error" } else { "output" };
            return Some(if f.closed {
                Unwritten {
                    what: format!(
                        "the launcher's standard {stream} was closed before rank {}'s was all written",
                        f.rank
                    ),
                    code: SIGPIPE_STATUS,
                }
            } else {
                Unwritten {
                    what: format!(
                        "writing rank {}'s standard {stream} failed ({}); the rest of it is lost (see where the launcher's standard {stream} goes: a full disk, a device that refuses writes)",
                        f.rank, f.error
                    ),
                    code: 1,
                }
            });
        }
        (ended < self.streams && self.progress.writing.load(Ordering::Relaxed) > 0).then(|| {
            Unwritten {
                what: if cut_short {
                    "a signal ended the wait for the ranks' last output, which was still being written (nothing reads the launcher's output?); the rest of it is lost".into()
                } else {
                    format!(
                        "the ranks' output was still being written {} s after the job ended (nothing reads the launcher's output?); the rest of it is lost",
                        DRAIN_LIMIT.as_secs()
                    )
                },
                code: 1,
            }
        })
    }
}

/// The status of a writer killed by SIGPIPE, which a job whose reader closed its end returns.
const SIGPIPE_STATUS: i32 = 128 + nix::sys::signal::Signal::SIGPIPE as i32;

/// Output of the ranks that was not written.
#[derive(Debug)]
pub(super) struct Unwritten {
    /// What happened, as the launcher says it (after its name).
    pub(super) what: String,
    /// The job's status for it, if it succeeded otherwise.
    pub(super) code: i32,
}

/// One stream's copy.
struct Pump {
    rank: usize,
    to_stderr: bool,
    prefix: bool,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
    progress: Arc<Progress>,
    /// Part of a line was written, without its end.
    line_begun: bool,
}

impl Pump {
    fn run(mut self, mut stream: impl Read) {
        let mut held: Vec<u8> = Vec::with_capacity(CHUNK);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            self.progress.read.fetch_add(n as u64, Ordering::Relaxed);
            held.extend_from_slice(&buf[..n]);
            // Whole lines go out; a line's beginning waits for its end unless it fills the chunk.
            let cut = match held.iter().rposition(|&b| b == b'\n') {
                Some(i) => i + 1,
                None if held.len() >= CHUNK => held.len(),
                None => continue,
            };
            if self.write(&held[..cut]).is_err() {
                // Dropping the stream closes it: the rank sees a closed pipe (SIGPIPE, or EPIPE), as if it
                // had written to the failed file itself.
                return;
            }
            held.drain(..cut);
        }
        // With prefixes, the launcher's own lines begin on a line of their own; without, the output goes as
        // it came.
        if self.prefix && (self.line_begun || !held.is_empty()) && !held.ends_with(b"\n") {
            held.push(b'\n');
        }
        if !held.is_empty() {
            let _ = self.write(&held);
        }
    }

    /// Writes `bytes`, prefixing each line that begins in them.
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(bytes.len() + if self.prefix { 64 } else { 0 });
        if self.prefix {
            let tag = format!("[{}] ", self.rank);
            for line in bytes.split_inclusive(|&b| b == b'\n') {
                if !self.line_begun {
                    out.extend_from_slice(tag.as_bytes());
                }
                out.extend_from_slice(line);
                self.line_begun = !line.ends_with(b"\n");
            }
        } else {
            out.extend_from_slice(bytes);
            self.line_begun = !bytes.ends_with(b"\n");
        }
        if let Some(c) = &self.capture {
            lock(c).extend_from_slice(&out);
            return Ok(());
        }
        self.progress.writing.fetch_add(1, Ordering::Relaxed);
        let written = write_out(self.to_stderr, &out);
        self.progress.writing.fetch_sub(1, Ordering::Relaxed);
        if let Err(e) = &written {
            lock(&self.progress.failed).get_or_insert(Failed {
                rank: self.rank,
                to_stderr: self.to_stderr,
                closed: e.kind() == std::io::ErrorKind::BrokenPipe,
                error: e.to_string(),
            });
        }
        written
    }
}
