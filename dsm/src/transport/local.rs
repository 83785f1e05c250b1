//! In-process transport: ranks are threads of one process and connections are Unix socket pairs, or
//! in-memory connections ([`Links::Memory`], [`Links::Hosted`]). The same service loop and requester
//! code run as over TCP; only the establishment differs. Shared regions need one
//! process per rank (each rank maps the same addresses), so this backend serves fast tests of messaging,
//! locks and barriers.

use super::{channels_in, connections, memory, Conn, Host, Incoming, Mesh, Polled, Transport};
use crate::error::{DsmError, Result};
use crate::types::Rank;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

/// The pre-connected mesh of one rank of an in-process job. Create all ranks' with [`local_cluster`].
#[derive(Debug)]
pub struct LocalTransport {
    mesh: Mesh,
    size: usize,
    channels: usize,
}

/// How the ranks of an in-process job are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Links {
    /// Unix socket pairs, as the TCP transport's connections are sockets.
    #[default]
    Sockets,
    /// In-memory connections (`memory`), as a transport with a thread of its own hands them out.
    Memory,
    /// In-memory connections, and each rank's service loop run by a thread of the transport
    /// ([`Mesh::host`]), as the MPI transport of `dsm-runtime` runs it on its bridge thread.
    Hosted,
}

/// Creates the transports of an in-process job of `size` ranks with `channels` channels per rank,
/// connected by Unix socket pairs.
pub fn local_cluster(size: usize, channels: usize) -> Result<Vec<LocalTransport>> {
    local_cluster_with(Links::Sockets, size, channels)
}

/// Creates the transports of an in-process job of `size` ranks with `channels` channels per rank,
/// connected as `links` says.
pub fn local_cluster_with(
    links: Links,
    size: usize,
    channels: usize,
) -> Result<Vec<LocalTransport>> {
    let pair = || -> Result<(Conn, Conn)> {
        match links {
            Links::Sockets => {
                let (a, b) = UnixStream::pair()
                    .map_err(|e| DsmError::io("socketpair for the in-process transport", e))?;
                Ok((OwnedFd::from(a).into(), OwnedFd::from(b).into()))
            }
            Links::Memory | Links::Hosted => {
                let (a, b) = memory::pair(memory::DEFAULT_CAPACITY);
                Ok((a.into(), b.into()))
            }
        }
    };
    let sets = connections(channels);
    let mut meshes: Vec<Mesh> = (0..size)
        .map(|r| Mesh {
            outgoing: (0..sets).map(|_| Vec::with_capacity(size)).collect(),
            incoming: Vec::new(),
            host: (links == Links::Hosted).then(|| host(r)),
        })
        .collect();
    for ch in 0..sets {
        for from in 0..size {
            for to in 0..size {
                let (a, b) = pair()?;
                if links == Links::Hosted && from != to {
                    // What the hosted service loops write (replies, and their own messages on the last
                    // set) never waits for room, as `Host` asks.
                    b.memory().expect("in memory").never_wait_to_send();
                    if ch == sets - 1 {
                        a.memory().expect("in memory").never_wait_to_send();
                    }
                }
                meshes[from].outgoing[ch].push(a);
                meshes[to]
                    .incoming
                    .push(Incoming::new(Rank(from as u32), ch, sets, b));
            }
        }
    }
    Ok(meshes
        .into_iter()
        .map(|mesh| LocalTransport {
            mesh,
            size,
            channels,
        })
        .collect())
}

/// A host for rank `rank`'s service loop: a thread that polls it whenever its doorbell rings, and at
/// least every 100 ms for its heartbeats.
fn host(rank: usize) -> Host {
    let bell = memory::Doorbell::new();
    let sleep_on = bell.clone();
    Host {
        bell,
        start: Box::new(move |mut service| {
            std::thread::Builder::new()
                .name(format!("dsm-host-{rank}"))
                .spawn(move || loop {
                    let seen = sleep_on.seen();
                    match service.poll() {
                        Polled::Stopped => return,
                        Polled::Served => {}
                        Polled::Idle => sleep_on.wait(seen, std::time::Duration::from_millis(100)),
                    }
                })
                .map(drop)
                .map_err(|e| DsmError::io("spawning the thread that hosts a service loop", e))
        }),
    }
}

impl Transport for LocalTransport {
    fn establish(self: Box<Self>, _me: Rank, size: usize, sets: usize) -> Result<Mesh> {
        if size != self.size || sets != connections(self.channels) {
            return Err(DsmError::Config(format!(
                "the in-process cluster was made for {} ranks with {} channels, not {size} with {}",
                self.size,
                self.channels,
                channels_in(sets)
            )));
        }
        Ok(self.mesh)
    }

    fn name(&self) -> &'static str {
        "local"
    }

    fn ranks_share_a_process(&self) -> bool {
        true
    }
}

/// What a rank thread of an in-process job knows about itself, for the panic hook.
struct RankThread {
    rank: usize,
    /// The first panic on any rank of this job, with its rank: the cause, when later panics are its
    /// consequences (a peer that lost the panicking rank, say).
    first: std::sync::Arc<std::sync::OnceLock<String>>,
}

thread_local! {
    static RANK_THREAD: std::cell::RefCell<Option<RankThread>> = const { std::cell::RefCell::new(None) };
    /// The last panic on this rank's thread, with where it happened.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keeps the message and place of a panic on a rank's thread for the report (the test harness may have
/// captured what the panic printed), and the job's first panic. Panics are passed on to the hook that was
/// there before; panics on other threads are not looked at.
fn note_where_ranks_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = RANK_THREAD.try_with(|t| {
                if let Some(t) = &*t.borrow() {
                    let _ = t.first.set(format!("rank {} {info}", t.rank));
                    let _ = LAST_PANIC.try_with(|p| p.replace(Some(info.to_string())));
                }
            });
            before(info)
        }));
    });
}

/// Runs `body` on every rank of an in-process job of `ranks` ranks with `channels` channels each (every
/// rank a thread with its own `Dsm`, which reports a failed peer instead of exiting), and returns when all
/// have returned. A rank whose body panics would leave the others waiting for ever at their next collective
/// operation, so the panic's message and place go to the process's own standard error (a test harness
/// capturing output would lose them), with the job's first panic when another rank panicked before, and
/// the process exits at once with status 101. (The panicking rank's `Dsm`, dropped as the panic unwinds,
/// does not wait for the others.) A job still running after [`local_job_limit`] ends the process the same
/// way, so that a test that would hang fails instead. For tests.
pub fn run_local_job<F>(ranks: usize, channels: usize, body: F)
where
    F: Fn(crate::Dsm) + Send + Sync + 'static,
{
    run_local_job_with(Links::Sockets, ranks, channels, body)
}

/// [`run_local_job`] with the ranks connected as `links` says.
pub fn run_local_job_with<F>(links: Links, ranks: usize, channels: usize, body: F)
where
    F: Fn(crate::Dsm) + Send + Sync + 'static,
{
    note_where_ranks_panic();
    let limit = local_job_limit();
    let (finished, watched) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(limit) {
            fail(&format!(
                "the job of {ranks} ranks did not finish within {} s: a hang, or a machine slow enough to need a higher DSM_LOCAL_JOB_LIMIT",
                limit.as_secs()
            ));
        }
    });
    let first = std::sync::Arc::new(std::sync::OnceLock::new());
    let body = std::sync::Arc::new(body);
    let transports = local_cluster_with(links, ranks, channels)
        .unwrap_or_else(|e| fail(&format!("making an in-process job of {ranks} ranks: {e}")));
    let threads: Vec<_> = transports
        .into_iter()
        .enumerate()
        .map(|(r, t)| {
            let body = body.clone();
            let first = first.clone();
            std::thread::spawn(move || {
                RANK_THREAD.with(|c| {
                    *c.borrow_mut() = Some(RankThread {
                        rank: r,
                        first: first.clone(),
                    })
                });
                let dsm = crate::Dsm::builder()
                    .rank(Rank(r as u32), ranks)
                    .channels(channels)
                    .transport(Box::new(t))
                    .failure_policy(crate::FailurePolicy::Report)
                    .build()
                    .unwrap_or_else(|e| fail(&format!("rank {r}: joining: {e}")));
                let run = std::panic::AssertUnwindSafe(|| body(dsm));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let why = LAST_PANIC
                        .with(|p| p.take())
                        .unwrap_or_else(|| format!("panicked: {}", crate::panic_message(&*panic)));
                    let mine = format!("rank {r} {why}");
                    match first.get().filter(|f| **f != mine) {
                        Some(f) => fail(&format!("{mine}\n(the job's first panic: {f})")),
                        None => fail(&mine),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            fail("a rank's thread panicked");
        }
    }
    drop(finished);
}

/// How long an in-process job may run before [`run_local_job`] ends the process: `DSM_LOCAL_JOB_LIMIT`
/// seconds (1 or more), 120 by default.
pub fn local_job_limit() -> std::time::Duration {
    let secs = match std::env::var_os("DSM_LOCAL_JOB_LIMIT") {
        None => 120,
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|s| *s > 0)
            .unwrap_or_else(|| {
                fail(&format!(
                    "DSM_LOCAL_JOB_LIMIT={v:?} is not a number of seconds (1 or more): set it to one, or unset it for 120"
                ))
            }),
    };
    std::time::Duration::from_secs(secs)
}

fn fail(why: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "in-process job: {why}");
    // At once, without exit handlers: `exit` from this thread while the other ranks' threads hold locks
    // was seen to hang the test process instead of ending it.
    // SAFETY: `_exit` ends the process; it touches no memory of this program.
    unsafe { libc::_exit(101) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_s_service_loop_connection_is_marked_as_such_at_the_other_end() {
        for links in [Links::Sockets, Links::Memory] {
            let (size, channels) = (3, 2);
            let sets = connections(channels);
            let meshes: Vec<Mesh> = local_cluster_with(links, size, channels)
                .unwrap()
                .into_iter()
                .enumerate()
                .map(|(me, t)| Box::new(t).establish(Rank(me as u32), size, sets).unwrap())
                .collect();
            super::super::assert_service_loop_connections_marked(&meshes, sets);
        }
    }
}
