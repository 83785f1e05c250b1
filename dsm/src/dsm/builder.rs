//! Joining a job: the options of a rank (`DsmBuilder`) with their defaults, and `build`, which connects
//! the rank to the others and starts its service loop.

use super::{Dsm, FailurePolicy, ServiceThread, Shared};
use crate::channel::{Channels, ReplyPoll};
use crate::engine::{Engine, ServiceLoop, ServicePriority, MAX_READAHEAD, MIN_PEER_TIMEOUT};
use crate::error::{DsmError, Result};
use crate::installer::Installer;
use crate::keepawake::KeepAwake;
use crate::protocol::release::{RcRank, DEFAULT_NOTICE_MEMORY, MIN_NOTICE_MEMORY};
use crate::service::MAX_SERVICES;
use crate::stats::Counters;
use crate::transport::memory::Doorbell;
use crate::transport::{connections, local::local_cluster, Transport};
use crate::types::{Rank, PAGE_SIZE};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
/// Options for joining a job. Defaults suit a local job; `dsm-runtime` fills them from the environment.
#[derive(Debug)]
pub struct DsmBuilder {
    rank: Rank,
    size: usize,
    transport: Option<Box<dyn Transport>>,
    channels: usize,
    readahead: u32,
    arena_base: Option<usize>,
    arena_size: usize,
    policy: FailurePolicy,
    exit_grace: Duration,
    service_priority: ServicePriority,
    spin: Option<Duration>,
    keep_awake: Option<Duration>,
    install_helper: Option<bool>,
    direct_install: bool,
    notice_memory: usize,
    twin_memory: usize,
    peer_timeout: Option<Duration>,
}

/// Memory the twins of a rank's release-consistency pages keep between intervals unless told otherwise
/// ([`DsmBuilder::twin_memory`]).
pub const DEFAULT_TWIN_MEMORY: usize = 32 << 20;

/// How long a rank waits to hear from another before it takes it for failed, unless told otherwise
/// ([`DsmBuilder::peer_timeout`]).
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for DsmBuilder {
    fn default() -> Self {
        DsmBuilder {
            rank: Rank(0),
            size: 1,
            transport: None,
            channels: 4,
            readahead: MAX_READAHEAD,
            arena_base: None,
            arena_size: 1 << 40,
            policy: FailurePolicy::Exit,
            exit_grace: Duration::ZERO,
            service_priority: ServicePriority::Favoured,
            spin: None,
            keep_awake: None,
            install_helper: None,
            direct_install: true,
            notice_memory: DEFAULT_NOTICE_MEMORY,
            twin_memory: DEFAULT_TWIN_MEMORY,
            peer_timeout: Some(DEFAULT_PEER_TIMEOUT),
        }
    }
}

impl DsmBuilder {
    /// This process's rank and the job's size.
    pub fn rank(mut self, rank: Rank, size: usize) -> Self {
        self.rank = rank;
        self.size = size;
        self
    }

    /// How ranks reach each other. Without one, a job of one rank uses the in-process transport.
    pub fn transport(mut self, t: Box<dyn Transport>) -> Self {
        self.transport = Some(t);
        self
    }

    /// How many threads of this rank can fault or call into the job at once (default 4, at least 2).
    pub fn channels(mut self, n: usize) -> Self {
        self.channels = n;
        self
    }

    /// The number of channels set so far (every rank of a job must have the same).
    pub fn channel_count(&self) -> usize {
        self.channels
    }

    /// The largest sequential read-ahead window in pages, 1 to [`MAX_READAHEAD`] (the default, 4 MiB; 1 turns
    /// read-ahead off). Read-ahead fetches the following pages with the same home when faults walk a region
    /// in order; the window doubles from one page on each fault that continues the walk. Under sequential
    /// consistency it bounds write-ahead as well: a first write that walks a region takes the following
    /// pages with the same home along, those nobody touched (zeros, up to 64 pages) or, when the home
    /// gives up its copy of the page, those the home alone holds, with their data (not under
    /// [`FailurePolicy::Report`], where a failed writer would take them with it).
    pub fn readahead(mut self, pages: u32) -> Self {
        self.readahead = pages;
        self
    }

    /// Whether a helper thread installs pages of long read-ahead replies (256 pages or more) beside the
    /// faulting thread. Installing pages is most of a sequential remote read's time, and two threads
    /// install twice as fast as one when a core is free; the helper sleeps otherwise. Default: on when the
    /// job has several ranks and no more ranks than this machine has cores (the job's size, as for the
    /// polling default of [`DsmBuilder::spin`]: when ranks share cores, a faulting thread could wait for
    /// a helper that waits for a core). Also switchable at run time: [`Dsm::set_install_helper`].
    pub fn install_helper(mut self, on: bool) -> Self {
        self.install_helper = Some(on);
        self
    }

    /// Whether ranks on this host may install the pages they send this rank straight into its memory
    /// (default: on). This rank then introduces itself to the others when it first maps the arena, and a
    /// rank on the same host that may (with ptrace's permission: root, or the same user where Yama's
    /// `ptrace_scope` is 0) takes its userfaultfd and copies the pages
    /// it hands this rank's faults (its own copy of a page, and the pages read ahead after it) in itself:
    /// no page bytes on the connection and no copy by this rank, where otherwise the faulting thread reads
    /// them from the socket and copies them in. Ranks on other hosts, and ranks that may not, send the
    /// bytes. The kernel allocates those pages on behalf of the rank that copies them, so on a machine with
    /// several memory nodes they follow that rank's memory policy, not this one's: turn direct install
    /// off for a rank bound to its own node. Switchable for the faults that follow with
    /// [`Dsm::set_direct_install`]; turning it on at run time works only if it was on when this rank
    /// introduced itself.
    pub fn direct_install(mut self, on: bool) -> Self {
        self.direct_install = on;
        self
    }

    /// Release consistency: the memory that each list of write notices kept between barriers may take
    /// (default 8 MiB; at least [`MIN_NOTICE_MEMORY`]): this rank keeps two (the notices it knows, and its
    /// own), and the locks it is the home of share one bound. A program that synchronizes only through
    /// locks would otherwise keep every notice of the job until its next barrier. Past the bound the
    /// oldest notices are forgotten (each writer's latest is kept, but by a lock home that the latest
    /// alone would put over the bound): a rank that then acquires without
    /// having seen them drops every cached page of release-consistency regions not homed here (counted in
    /// [`Stats::full_invalidations`](crate::Stats::full_invalidations)), and fetches again what it reads next.
    pub fn notice_memory(mut self, bytes: usize) -> Self {
        self.notice_memory = bytes;
        self
    }

    /// Release consistency: memory the twins of this rank's pages may keep once their writes are released
    /// (default 32 MiB, [`DEFAULT_TWIN_MEMORY`]; 0 gives every twin's memory back at once). A page written
    /// again in a later interval then gets its twin in memory that is already there: in a program that
    /// writes the same pages interval after interval (a lock's data, a partition's rows), that saves a
    /// page fault, a zeroed page and a `madvise` per page and interval. The first pages whose twins are
    /// let go keep their memory until it is used up (rounded down to whole pages), and keep it until their
    /// region is freed. A kept twin also tells a write fault that its page was written before: the fault
    /// twins such pages after its own ahead of their writes and makes them writable with it, one fault
    /// for the run ([`Stats::twins_ahead`](crate::Stats::twins_ahead)); a page so twinned and left
    /// unwritten keeps its twin's memory no more. 0 turns that off too.
    pub fn twin_memory(mut self, bytes: usize) -> Self {
        self.twin_memory = bytes;
        self
    }

    /// Where and how large the shared arena is (default: 1 TiB of address space at `DEFAULT_ARENA_BASE`,
    /// 16 TiB, or wherever rank 0's kernel puts it when that range is taken; it costs nothing until regions
    /// are used).
    pub fn arena(mut self, base: Option<usize>, size: usize) -> Self {
        self.arena_base = base;
        self.arena_size = size;
        self
    }

    /// How long this rank waits to hear from another rank before it takes it for failed (default
    /// [`DEFAULT_PEER_TIMEOUT`], 30 s; `None`: never). A rank whose process is stopped or hung, or whose
    /// host or network went down, closes no connection: without this, threads waiting for it would wait
    /// for ever. Each rank's service loop sends every other rank a heartbeat four times a timeout and at
    /// least once a second (also with the timeout off: ranks may be given different timeouts), on a
    /// connection of its own, whatever the program does (a rank computing for an hour is heard from);
    /// anything it sends counts too. The rank not heard from fails as if its connection had broken (see
    /// [`FailurePolicy`]). A service loop that itself was held up for half a timeout (the whole job
    /// stopped and resumed) gives every rank a fresh timeout. Turn it off on the ranks that must not give
    /// up on one stopped in a debugger. At least [`MIN_PEER_TIMEOUT`] (2 s).
    pub fn peer_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.peer_timeout = timeout;
        self
    }

    /// What to do when another rank fails.
    pub fn failure_policy(mut self, p: FailurePolicy) -> Self {
        self.policy = p;
        self
    }

    /// Under [`FailurePolicy::Exit`], how long a rank that ends because another rank failed waits, once it
    /// has said which, before it exits (default: not at all). A launcher that ends the whole job at the
    /// first process to exit with an error (`mpirun`) would otherwise often end the rank that failed first
    /// before it printed why (its `main` returns its error only after the `Runtime` has left the job, and
    /// the others notice at once): that rank's own exit then ends the job, and the launcher names it.
    /// `dsm-runtime` sets 2 s under an MPI launcher; `dsmrun` waits for the first failure itself.
    pub fn exit_grace(mut self, wait: Duration) -> Self {
        self.exit_grace = wait;
        self
    }

    /// How the service loop's thread is scheduled (default: favoured over the application's threads).
    /// Not for a loop that a thread of the transport runs (`Mesh::host`): it runs as that thread does.
    pub fn service_priority(mut self, p: ServicePriority) -> Self {
        self.service_priority = p;
        self
    }

    /// How long a thread waiting for a reply (a fault, a lock, a barrier) polls before it sleeps. Polling
    /// saves the wake-up (tens of microseconds across vCPUs on a VM) when the answer comes quickly, and costs
    /// the CPU of a thread that is stalled anyway. Default: 50 us when the job has no more ranks than this
    /// machine has cores, else 0 (then a polling rank would take the core another rank needs to answer).
    /// Over a transport whose own thread polls for replies (the MPI transport's bridge) the waiting thread
    /// yields the CPU between looks: spinning beside the bridge took the core it needed and doubled the
    /// time of a remote fault.
    /// The service loop never polls: it runs at real-time priority, where polling could starve others.
    pub fn spin(mut self, d: Duration) -> Self {
        self.spin = Some(d);
        self
    }

    /// For how long after each request this rank sends or serves, threads of its own (one per CPU) spin
    /// at `SCHED_IDLE`, keeping CPUs that have nothing else to do from going to sleep, so that the next
    /// message does not wait for a CPU to wake up (on a VM, most of a loopback round trip: 1 ms here took
    /// a remote fault with the serving rank idle from 66 to 49 us). They run only where no other thread
    /// wants the CPU, and sleep once the window has passed without a request. Default: off
    /// (`Duration::ZERO`), because a CPU that runs a spinner never goes idle, and the kernel pulls waiting
    /// threads onto a CPU as it goes idle: with spinners, three threads of one rank often shared one CPU
    /// while the other ran spinners (see docs/ARCHITECTURE.md). Worth trying where a job has a thread per
    /// CPU at most and waits on many round trips.
    pub fn keep_awake(mut self, window: Duration) -> Self {
        self.keep_awake = Some(window);
        self
    }

    /// Joins the job: connects to every rank and starts the service loop.
    pub fn build(self) -> Result<Dsm> {
        raise_open_file_limit();
        if self.size == 0
            || self.size > crate::protocol::swmr::MAX_RANKS
            || self.rank.index() >= self.size
        {
            return Err(DsmError::Config(format!(
                "rank {} of a job of {} ranks: the size must be 1..={} and the rank below it",
                self.rank.0,
                self.size,
                crate::protocol::swmr::MAX_RANKS
            )));
        }
        if self.channels < 2 || self.channels > 64 {
            return Err(DsmError::Config(format!(
                "{} channels: use 2..=64 (one is kept for faults while other threads wait for locks)",
                self.channels
            )));
        }
        if self.readahead == 0 || self.readahead > MAX_READAHEAD {
            return Err(DsmError::Config(format!(
                "read-ahead of {} pages: use 1..={MAX_READAHEAD} (1 turns it off)",
                self.readahead
            )));
        }
        if self.notice_memory < MIN_NOTICE_MEMORY {
            return Err(DsmError::Config(format!(
                "write-notice memory of {} bytes (DSM_NOTICE_MEMORY, or DsmBuilder::notice_memory): use at least {MIN_NOTICE_MEMORY} (4K)",
                self.notice_memory
            )));
        }
        let stats_at_exit = stats_at_exit()?;
        if self.peer_timeout.is_some_and(|t| t < MIN_PEER_TIMEOUT) {
            return Err(DsmError::Config(format!(
                "a peer timeout of {:?} (DSM_PEER_TIMEOUT, or DsmBuilder::peer_timeout): use at least {:?}, or none",
                self.peer_timeout.unwrap_or_default(),
                MIN_PEER_TIMEOUT
            )));
        }
        if self.arena_size < PAGE_SIZE || !self.arena_size.is_multiple_of(PAGE_SIZE) {
            return Err(DsmError::Config(format!(
                "arena size {} is not a positive multiple of the page size ({PAGE_SIZE})",
                self.arena_size
            )));
        }
        let transport: Box<dyn Transport> = match self.transport {
            Some(t) => t,
            None if self.size == 1 => Box::new(local_cluster(1, self.channels)?.remove(0)),
            None => {
                return Err(DsmError::Config(
                    "a job of several ranks needs a transport: use dsm-runtime's Runtime::init or DsmBuilder::transport".into(),
                ))
            }
        };
        let in_process = transport.ranks_share_a_process();
        let transport_name = transport.name();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let poll = ReplyPoll {
            ns: self
                .spin
                .unwrap_or_else(|| default_spin(self.size, cores))
                .as_nanos() as u64,
            yielding: transport.polls_for_replies(),
        };

        let sets = connections(self.channels);
        let mut mesh = match transport.establish(self.rank, self.size, sets) {
            Ok(mesh) => mesh,
            // A rank that stopped setting up the job (it failed, or was killed) fails this one as it would
            // once the job runs: with `EXIT_PEER_FAILED`, which tells a launcher that this rank is not
            // the cause (with a status of its own, it could be blamed instead of the rank that failed).
            Err(e @ DsmError::PeerFailed { .. }) if self.policy == FailurePolicy::Exit => {
                crate::engine::say(&format!("dsm: {}: {e}; ending this rank", self.rank));
                std::process::exit(crate::EXIT_PEER_FAILED);
            }
            Err(e) => return Err(e),
        };
        let host = mesh.host.take();
        if mesh.outgoing.len() != sets || mesh.outgoing.iter().any(|s| s.len() != self.size) {
            return Err(DsmError::Config(format!(
                "the {transport_name} transport set up {} sets of connections, not {sets} of {} ({} channels and the service loop's)",
                mesh.outgoing.len(),
                self.size,
                self.channels
            )));
        }
        // Each rank's service-loop connection, whose end alone says that the rank has left the job.
        let mut marked = vec![0usize; self.size];
        for i in &mesh.incoming {
            match marked.get_mut(i.from.index()) {
                Some(m) => *m += usize::from(i.control),
                None => {
                    return Err(DsmError::Config(format!(
                        "the {transport_name} transport set up a connection from {}, outside a job of {}",
                        i.from, self.size
                    )))
                }
            }
        }
        if let Some(r) = marked.iter().position(|&m| m != 1) {
            return Err(DsmError::Config(format!(
                "the {transport_name} transport marked {} connections from {} as its service loop's, not one (`Incoming::control`)",
                marked[r],
                Rank(r as u32)
            )));
        }
        // The service loop's own set is the last.
        let control = mesh.outgoing.pop().unwrap_or_default();
        let waker =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| DsmError::sys("eventfd", e))?;
        let keep_awake = match self.keep_awake {
            Some(d) if self.size > 1 => d,
            _ => Duration::ZERO,
        };
        let awake = Arc::new(KeepAwake::new(keep_awake));
        let shared = Arc::new(Shared {
            me: self.rank,
            size: self.size,
            // Channels are sized for the largest window, so that the window can change at run time.
            channels: Channels::new(mesh.outgoing, MAX_READAHEAD as usize, poll, awake.clone()),
            awake,
            counters: Counters::default(),
            readahead: AtomicU32::new(self.readahead),
            waker,
            hosted: host.as_ref().map(|h| Doorbell::chained(h.bell.clone())),
            woken: AtomicBool::new(false),
            unreachable: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            failed: (0..self.size).map(|_| AtomicBool::new(false)).collect(),
            control: Mutex::new(control),
            peer_timeout: self.peer_timeout,
            gone: (0..self.size).map(|_| AtomicBool::new(false)).collect(),
            finishing: (0..self.size).map(|_| AtomicBool::new(false)).collect(),
            left: (0..self.size).map(|_| AtomicBool::new(false)).collect(),
            policy: self.policy,
            heard_of_failure: AtomicBool::new(false),
            caused_failure: AtomicBool::new(false),
            exit_grace: self.exit_grace,
            service_priority: self.service_priority,
            uffd: OnceLock::new(),
            regions: RwLock::new(Vec::new()),
            rc: Mutex::new(
                RcRank::new(self.rank, self.size).with_notice_memory(self.notice_memory),
            ),
            notice_memory: self.notice_memory,
            twin_budget: AtomicU64::new((self.twin_memory / PAGE_SIZE) as u64),
            selective_acquires: AtomicU64::new(0),
            carry: Mutex::new(Default::default()),
            lock_cut: Mutex::new(None),
            arena: Mutex::new(None),
            arena_base: self.arena_base,
            arena_size: self.arena_size,
            epoch: AtomicU64::new(0),
            in_process,
            services: RwLock::new(vec![None; MAX_SERVICES]),
            retired: Mutex::new(Vec::new()),
            kept: Mutex::new(Vec::new()),
            installer: Installer::default(),
            direct_install: AtomicBool::new(self.direct_install),
        });
        let engine = Engine::new(shared.clone(), mesh.incoming)?;
        // Only replies from other ranks are installed in pieces: a job of one rank has no helper. Started
        // before the service loop, so that a failure to start it leaves nothing running.
        let installer = if self.size > 1 {
            shared
                .installer
                .start(self.install_helper.unwrap_or(self.size <= cores));
            let s = shared.clone();
            let helper = std::thread::Builder::new()
                .name(format!("dsm-install-{}", self.rank.0))
                .spawn(move || s.installer.run())
                .map_err(|e| DsmError::io("spawning the install helper", e))?;
            Some(helper)
        } else {
            None
        };
        // One spinner per CPU this rank may use, each on its CPU: a CPU without one could still fall asleep.
        let mut awake = Vec::new();
        if shared.awake.enabled() {
            for cpu in crate::keepawake::allowed_cpus() {
                let s = shared.clone();
                let spinner = std::thread::Builder::new()
                    .name(format!("dsm-awake-{}-{cpu}", self.rank.0))
                    .spawn(move || s.awake.run(cpu))
                    .map_err(|e| {
                        shared.installer.stop();
                        shared.awake.stop();
                        DsmError::io("spawning a keep-awake thread", e)
                    })?;
                awake.push(spinner);
            }
        }
        let service = match host {
            Some(host) => {
                let (running, ended) = std::sync::mpsc::channel();
                (host.start)(ServiceLoop::new(engine, running))
                    .map(|()| ServiceThread::Hosted(Mutex::new(ended)))
            }
            None => std::thread::Builder::new()
                .name(format!("dsm-service-{}", self.rank.0))
                .spawn(move || engine.run())
                .map(ServiceThread::Own)
                .map_err(|e| DsmError::io("spawning the service thread", e)),
        }
        .inspect_err(|_| {
            shared.installer.stop();
            shared.awake.stop();
        })?;
        Ok(Dsm {
            shared,
            service: Some(service),
            installer,
            awake,
            allocated: AtomicU32::new(0),
            abandoned: AtomicBool::new(false),
            stats_at_exit,
        })
    }
}

/// `DSM_STATS`: whether a rank prints its statistics when it leaves the job (read here, at joining, so
/// that a program that builds its `Dsm` itself gets a misspelt value as an error too, as `Runtime::init`
/// gives it).
fn stats_at_exit() -> Result<bool> {
    let Some(value) = std::env::var_os("DSM_STATS") else {
        return Ok(false);
    };
    match value.to_str().map(str::trim) {
        Some("1") => Ok(true),
        Some("0") => Ok(false),
        _ => Err(DsmError::Config(format!(
            "DSM_STATS={value:?} is not valid: expected 1 (print each rank's statistics when it leaves) or 0"
        ))),
    }
}

/// How long a thread waiting for a reply polls when the program did not say ([`DsmBuilder::spin`]): only
/// when every rank can have a core of its own.
fn default_spin(size: usize, cores: usize) -> Duration {
    if size > 1 && size <= cores {
        Duration::from_micros(50)
    } else {
        Duration::ZERO
    }
}

/// Lets the process open as many files as the system allows it, not the usual soft limit of 1024: a rank
/// keeps a connection per channel and one more to every rank and back (2,560 descriptors for 256 ranks
/// over TCP at the default 4 channels), and MapReduce
/// merges hold many run files open.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requesters_poll_only_when_every_rank_has_a_core() {
        assert_eq!(default_spin(2, 2), Duration::from_micros(50));
        assert_eq!(default_spin(3, 2), Duration::ZERO, "ranks share cores");
        assert_eq!(default_spin(1, 2), Duration::ZERO, "nobody to wait for");
    }
}
