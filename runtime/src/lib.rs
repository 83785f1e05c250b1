//! dsm-runtime: how a program joins a dsm job. `Runtime::init()` reads what the launcher (`dsmrun`) put in
//! the environment, meets the other ranks, and returns the rank's [`dsm::Dsm`]. A program started directly,
//! without a launcher, is a job of one rank. Every environment variable is documented in [`env`](mod@env).
// Unsafe code is refused everywhere but in one function of the launcher, which sets up a rank's process
// between fork and exec (`launch::in_child_before_exec`).
#![deny(unsafe_code)]

pub mod env;
pub mod launch;
pub mod local;
#[cfg(feature = "mpi")]
mod mpi_bridge;
#[cfg(feature = "mpi")]
mod mpi_join;
mod rendezvous;
pub mod task_farm;
pub mod tuple;
mod tuple_home;
pub mod tuple_space;
pub mod tuple_store;

pub use task_farm::TaskFarm;
pub use tuple::{Template, Tuple, TupleError, Value};
pub use tuple_space::{Lease, SpaceBuilder, TupleSpace};

use dsm::{Dsm, DsmError, Rank};
use std::sync::Arc;
use std::time::Duration;

/// Errors of joining or launching a job.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An environment variable is malformed.
    #[error("{var}={value:?} is not valid: expected {expected}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// The form it must have.
        expected: std::borrow::Cow<'static, str>,
    },
    /// A variable the launcher sets is missing.
    #[error("{0} is not set: start multi-rank jobs with dsmrun -n N program")]
    Missing(&'static str),
    /// The process runs under mpirun, but this build has no MPI support.
    #[error("this program was started by mpirun/mpiexec but was built without MPI support: rebuild it with dsm-runtime's `mpi` feature (`dsm-runtime = {{ features = [\"mpi\"] }}` in Cargo.toml, or `cargo build --release --features dsm-runtime/mpi`; it needs an MPI library and libclang, such as Debian's libmpich-dev and libclang-dev), or start it with dsmrun -n N")]
    MpiNotBuilt,
    /// Joining through MPI failed.
    #[error("joining through MPI: {0}")]
    Mpi(String),
    /// Meeting the other ranks failed.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// A job of no ranks, or of more than a job can have, was asked for.
    #[error("{asked} ranks asked for: a job has 1 to {max} ranks")]
    RankCount {
        /// The ranks asked for.
        asked: usize,
        /// The most a job can have.
        max: usize,
    },
    /// The launcher could not start a rank's program: it is missing, not executable, or not a program.
    #[error("{}: it cannot be run ({error}): give the path of an executable file", program.display())]
    CannotRun {
        /// The program as given.
        program: std::path::PathBuf,
        /// Why it could not be run (in the message, so not also given as the error's `source`).
        error: std::io::Error,
    },
    /// The shared memory layer failed.
    #[error(transparent)]
    Dsm(#[from] DsmError),
    /// A tuple or template is malformed or over the limits, or a field was read as the wrong type.
    #[error(transparent)]
    Tuple(#[from] TupleError),
    /// A rank refused a tuple-space request.
    #[error("{rank} refused the request: {reason}")]
    Refused {
        /// The rank that refused.
        rank: Rank,
        /// Why.
        reason: String,
    },
    /// A task or result does not encode or decode.
    #[error("{what}: {reason}")]
    Codec {
        /// Which value.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A task of a task farm failed where it ran: its function panicked, the task did not decode as the
    /// worker's type, or its result could not be put. It is not run again (another worker would most
    /// likely fail the same way); the master's `results` reports it.
    #[error("task {id} failed on {rank}: {reason} (the task farm does not run it again)")]
    TaskFailed {
        /// The task.
        id: u64,
        /// The rank whose worker ran it.
        rank: Rank,
        /// What went wrong there.
        reason: String,
    },
    /// A rank's workers of a task farm could not take part ([`TaskFarm::cannot_serve`]); the master's
    /// `results` reports it.
    #[error("the workers on {rank} could not take part in the task farm: {reason}")]
    WorkerFailed {
        /// The rank.
        rank: Rank,
        /// Why not.
        reason: String,
    },
    /// A task farm's master waits for results that can never come: every other rank failed or is
    /// leaving the job (its program reached its final barrier), and no worker serves on the master's own
    /// rank.
    #[error("every other rank of the job failed or is leaving it, and no worker of the task farm serves on the master's rank: {missing} result(s) will never come")]
    NoWorkers {
        /// Results still awaited.
        missing: usize,
    },
    /// `finish` was called while something still holds the rank's `Dsm`: a tuple-space handle, a lease
    /// not yet completed or given back, or what holds either (the number is of those holders).
    #[error("the runtime is still in use ({0} holder(s): tuple-space handles, leases not completed or given back): drop them before finish()")]
    InUse(usize),
    /// Launching failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The error (in the message, so not also given as the error's `source`).
        error: std::io::Error,
    },
}

/// Under an MPI launcher, how long a rank ending because another failed waits before it exits
/// (`DsmBuilder::exit_grace`; `dsmrun` waits as long for the first failure itself).
#[cfg(feature = "mpi")]
const MPI_EXIT_GRACE: Duration = Duration::from_secs(2);

/// What `DSM_TRANSPORT` may be for ranks that dsmrun starts, as an error says it.
pub(crate) const DSMRUN_TRANSPORT: &str =
    "tcp: the ranks dsmrun starts connect over TCP (DSM_TRANSPORT=mpi is for jobs started by mpirun)";

/// Seconds a rank waits at the rendezvous for the others when `DSM_CONNECT_TIMEOUT` does not say.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: u64 = 30;

/// How this rank meets the others under dsmrun (`DSM_RENDEZVOUS`, `DSM_TOKEN`, `DSM_BIND`,
/// `DSM_CONNECT_TIMEOUT`, `DSM_UNIX_SOCKETS`).
#[derive(Debug)]
struct Meeting {
    at: Option<std::net::SocketAddr>,
    token: Option<[u8; 32]>,
    bind: std::net::IpAddr,
    timeout: Duration,
    unix: bool,
}

/// Reads how this rank meets the others. Read in a job of one rank too, which meets no one: a mistyped
/// setting is said there, not first when the job grows.
fn meeting() -> Result<Meeting, RuntimeError> {
    Ok(Meeting {
        at: env::get(
            "DSM_RENDEZVOUS",
            "an IP address and port, such as 127.0.0.1:4000",
            |s| s.parse::<std::net::SocketAddr>().ok(),
        )?,
        token: env::get("DSM_TOKEN", "64 hex digits", env::token)?,
        bind: env::get("DSM_BIND", "an IP address", |s| {
            s.parse::<std::net::IpAddr>().ok()
        })?
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
        timeout: Duration::from_secs(connect_timeout()?),
        unix: unix_sockets_in(&env::process)?,
    })
}

/// `DSM_UNIX_SOCKETS` as read from `vars`: whether ranks on one host connect through Unix-domain
/// sockets; on when unset.
fn unix_sockets_in(vars: env::Vars<'_>) -> Result<bool, RuntimeError> {
    Ok(env::get_in(vars, "DSM_UNIX_SOCKETS", "on or off", env::on_off)?.unwrap_or(true))
}

/// `DSM_CONNECT_TIMEOUT`: whole seconds, at least one and at most a day; 30 when unset.
fn connect_timeout() -> Result<u64, RuntimeError> {
    connect_timeout_in(&env::process)
}

/// `DSM_CONNECT_TIMEOUT` as read from `vars`.
fn connect_timeout_in(vars: env::Vars<'_>) -> Result<u64, RuntimeError> {
    Ok(
        env::get_in(vars, "DSM_CONNECT_TIMEOUT", "seconds, 1 to 86400", |s| {
            env::number::<u64>(s).filter(|t| (1..=86_400).contains(t))
        })?
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
    )
}

/// Checks the settings every rank reads from its environment (`vars`, what the ranks will have), as each
/// rank would: a launcher says a bad one once, instead of every rank saying it.
pub(crate) fn check_rank_settings(vars: env::Vars<'_>) -> Result<(), RuntimeError> {
    Runtime::options_in(vars)?;
    connect_timeout_in(vars)?;
    unix_sockets_in(vars)?;
    Ok(())
}

/// A rank's membership in a job. End a job that went well with [`Runtime::finish`] (a final barrier with
/// every rank). A `Runtime` dropped without it (the program returned an error from `main`, say) leaves the
/// job as a failed rank ([`Dsm::abandon`]): the other ranks see it fail, which ends the job (or, under
/// `dsmrun --keep-going`, makes their calls to it fail), instead of waiting for what it will never do.
#[derive(Debug)]
pub struct Runtime {
    // Declared first, so that it is dropped (the job left) before MPI is finalized.
    dsm: Arc<Dsm>,
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi_join::Finalizer>,
    finished: bool,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if !self.finished {
            // A rank that stops on an error cannot say so any other way: Rust drops the `Runtime` the same
            // whether `main` returned `Ok` or `Err`.
            self.dsm.abandon();
            #[cfg(feature = "mpi")]
            if let Some(f) = &mut self._mpi {
                f.abandoned = true;
            }
        }
    }
}

const MPI_VARS: &[&str] = &[
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "MPI_LOCALRANKID",
];

/// Whether this process was started as a rank of a job, by `dsmrun` or by an MPI launcher (rather than
/// run directly, which makes it a job of one rank).
pub fn started_as_rank() -> bool {
    std::iter::once(&"DSM_RANK")
        .chain(MPI_VARS)
        .any(|v| std::env::var_os(v).is_some())
}

impl Runtime {
    /// Joins the job this process belongs to.
    pub fn init() -> Result<Runtime, RuntimeError> {
        let rank = env::get("DSM_RANK", "a rank number", env::number::<u32>)?;
        if rank.is_none() && std::env::var_os("DSM_SIZE").is_some() {
            // Half of dsmrun's settings: every rank would run as a job of one rank, unaware of the others.
            return Err(RuntimeError::Missing("DSM_RANK"));
        }
        let Some(rank) = rank else {
            if MPI_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
                return Self::init_mpi();
            }
            // Slurm's srun without PMI starts every task alone: each would be a job of one rank. Only srun
            // sets the step's task count; a batch script (one process, with SLURM_NTASKS of the whole
            // allocation) runs as a job of one rank like any program started directly.
            let tasks =
                env::get("SLURM_STEP_NUM_TASKS", "a number", env::number::<usize>).unwrap_or(None);
            if tasks.is_some_and(|n| n > 1) && std::env::var_os("SLURM_PROCID").is_some() {
                return Err(RuntimeError::Mpi(
                    "started by srun as one of several tasks, but without PMI: run `srun --mpi=pmi2` (or pmix), or mpirun, with a build that has the mpi feature".into(),
                ));
            }
            // A job of one rank carries no traffic, but a misspelt transport is still an error.
            env::get("DSM_TRANSPORT", "tcp or mpi", |s| {
                matches!(s, "tcp" | "mpi").then_some(())
            })?;
            meeting()?;
            return Ok(Runtime::from_dsm(Self::options()?.build()?));
        };
        env::get("DSM_TRANSPORT", DSMRUN_TRANSPORT, |s| {
            (s == "tcp").then_some(())
        })?;
        let size = env::get("DSM_SIZE", "the number of ranks", env::number::<usize>)?
            .ok_or(RuntimeError::Missing("DSM_SIZE"))?;
        if size == 0 || size > dsm::protocol::swmr::MAX_RANKS {
            return Err(RuntimeError::RankCount {
                asked: size,
                max: dsm::protocol::swmr::MAX_RANKS,
            });
        }
        if rank as usize >= size {
            return Err(RuntimeError::Env {
                var: "DSM_RANK",
                value: rank.to_string(),
                expected: "a rank below DSM_SIZE (ranks count from 0)".into(),
            });
        }
        let launcher = env::get("DSM_LAUNCHER_PID", "a process id (1 or more)", |s| {
            env::number::<i32>(s).filter(|pid| *pid > 0)
        })?;
        if let Some(pid) = launcher {
            let ns = env::get(
                "DSM_LAUNCHER_PIDNS",
                "a PID namespace, as /proc/self/ns/pid names it (pid:[N])",
                |s| (!s.is_empty()).then(|| s.to_owned()),
            )?;
            rendezvous::die_with_launcher(pid, ns.as_deref());
        }
        let mut builder = Self::options()?;
        let meeting = meeting()?;
        if size > 1 {
            let at = meeting.at.ok_or(RuntimeError::Missing("DSM_RENDEZVOUS"))?;
            let token = meeting.token.ok_or(RuntimeError::Missing("DSM_TOKEN"))?;
            let transport = rendezvous::join(
                Rank(rank),
                size,
                at,
                meeting.bind,
                meeting.unix,
                token,
                meeting.timeout,
            )?;
            builder = builder.transport(Box::new(transport));
        }
        Ok(Runtime::from_dsm(builder.rank(Rank(rank), size).build()?))
    }

    /// Joins a job started by mpirun/mpiexec: MPI gives the rank and size and carries the exchange of
    /// listener addresses and the job token; the TCP transport takes it from there.
    #[cfg(feature = "mpi")]
    fn init_mpi() -> Result<Runtime, RuntimeError> {
        let bind = env::get("DSM_BIND", "an IP address", |s| {
            s.parse::<std::net::IpAddr>().ok()
        })?;
        let timeout = connect_timeout()?;
        let carrier = env::get("DSM_TRANSPORT", "tcp or mpi", |s| match s {
            "tcp" => Some(mpi_join::Carrier::Tcp),
            "mpi" => Some(mpi_join::Carrier::Mpi),
            _ => None,
        })?
        .unwrap_or(mpi_join::Carrier::Tcp);
        if carrier == mpi_join::Carrier::Mpi
            && std::env::var("DSM_ON_PEER_FAILURE").is_ok_and(|p| p.trim() == "report")
        {
            // Over TCP a rank that dies closes its connections; over MPI nothing tells the others.
            return Err(RuntimeError::Mpi(
                "DSM_ON_PEER_FAILURE=report needs DSM_TRANSPORT=tcp: the MPI transport cannot tell that a rank died, so the others would wait for it for ever".into(),
            ));
        }
        let send_buffer = env::get(
            "DSM_MPI_SEND_BUFFER",
            "a size in bytes from 64K to 2047M (K, M, G suffixes)",
            |s| env::bytes(s).filter(|b| (64 << 10..=2047 << 20).contains(b)),
        )?
        .unwrap_or(mpi_bridge::SEND_BUFFER);
        // Everything that can fail on this rank's own settings is read before joining.
        let options = Self::options()?;
        let joined = mpi_join::join(
            bind,
            unix_sockets_in(&env::process)?,
            Duration::from_secs(timeout),
            carrier,
            send_buffer,
            options.channel_count(),
        )?;
        // mpirun ends the job at the first rank to exit with an error: a rank ending because another failed
        // gives the one that failed first time to say why, and to be the one mpirun names.
        let mut builder = options
            .rank(joined.rank, joined.size)
            .exit_grace(MPI_EXIT_GRACE);
        if let Some(t) = joined.transport {
            builder = builder.transport(t);
        }
        // A panic unwinding past here would drop the universe, finalizing MPI under the bridge thread
        // that the transport has started: the job ends instead, saying why.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.build()));
        let dsm = match built {
            Ok(Ok(dsm)) => Arc::new(dsm),
            Ok(Err(e)) => mpi_join::abort_job(&RuntimeError::from(e)),
            Err(panic) => mpi_join::abort_job(&format!(
                "setting up the DSM panicked: {}",
                dsm::panic_message(&*panic)
            )),
        };
        let finalizer = mpi_join::Finalizer {
            universe: Some(joined.universe),
            dsm: Arc::downgrade(&dsm),
            bridge: joined.bridge,
            abandoned: false,
        };
        Ok(Runtime {
            dsm,
            _mpi: Some(finalizer),
            finished: false,
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi() -> Result<Runtime, RuntimeError> {
        Err(RuntimeError::MpiNotBuilt)
    }

    /// A runtime over a `Dsm` the program built itself (for example ranks as threads over the in-process
    /// transport, or options the environment does not cover).
    pub fn from_dsm(dsm: Dsm) -> Runtime {
        Runtime {
            dsm: Arc::new(dsm),
            #[cfg(feature = "mpi")]
            _mpi: None,
            finished: false,
        }
    }

    /// This rank's options, from its environment.
    fn options() -> Result<dsm::DsmBuilder, RuntimeError> {
        Self::options_in(&env::process)
    }

    /// The options of a rank whose environment is `vars`.
    fn options_in(vars: env::Vars<'_>) -> Result<dsm::DsmBuilder, RuntimeError> {
        let mut b = Dsm::builder();
        // Ranges are checked here too (the builder checks them again), so that the error names the
        // variable.
        if let Some(c) = env::get_in(vars, "DSM_CHANNELS", "a number of channels, 2 to 64", |s| {
            env::number::<usize>(s).filter(|c| (2..=64).contains(c))
        })? {
            b = b.channels(c);
        }
        if let Some(t) = env::get_in(
            vars,
            "DSM_PEER_TIMEOUT",
            "whole seconds, 0 (never) or 2 to 86400",
            |s| env::number::<u64>(s).filter(|t| *t == 0 || (2..=86_400).contains(t)),
        )? {
            b = b.peer_timeout((t > 0).then(|| std::time::Duration::from_secs(t)));
        }
        if let Some(r) = env::get_in(vars, "DSM_READAHEAD", "a number of pages, 1 to 1024", |s| {
            env::number::<u32>(s).filter(|r| (1..=dsm::MAX_READAHEAD).contains(r))
        })? {
            b = b.readahead(r);
        }
        let priority = env::get_in(
            vars,
            "DSM_SERVICE_PRIORITY",
            "favoured, nice or normal",
            |s| match s {
                "favoured" => Some(dsm::ServicePriority::Favoured),
                "normal" => Some(dsm::ServicePriority::Normal),
                "nice" => Some(dsm::ServicePriority::Nice),
                _ => None,
            },
        )?;
        if let Some(p) = priority {
            b = b.service_priority(p);
        }
        let policy = env::get_in(vars, "DSM_ON_PEER_FAILURE", "exit or report", |s| match s {
            "exit" => Some(dsm::FailurePolicy::Exit),
            "report" => Some(dsm::FailurePolicy::Report),
            _ => None,
        })?;
        if let Some(p) = policy {
            b = b.failure_policy(p);
        }
        if let Some(us) = env::get_in(vars, "DSM_SPIN_US", "microseconds, 0 to 1000000", |s| {
            env::number::<u64>(s).filter(|us| *us <= 1_000_000)
        })? {
            b = b.spin(Duration::from_micros(us));
        }
        if let Some(us) = env::get_in(
            vars,
            "DSM_KEEP_AWAKE_US",
            "microseconds, 0 to 1000000",
            |s| env::number::<u64>(s).filter(|us| *us <= 1_000_000),
        )? {
            b = b.keep_awake(Duration::from_micros(us));
        }
        if let Some(on) = env::get_in(vars, "DSM_INSTALL_HELPER", "on or off", env::on_off)? {
            b = b.install_helper(on);
        }
        if let Some(on) = env::get_in(vars, "DSM_DIRECT_INSTALL", "on or off", env::on_off)? {
            b = b.direct_install(on);
        }
        if let Some(m) = env::get_in(
            vars,
            "DSM_NOTICE_MEMORY",
            "a size such as 8M (at least 4K)",
            |s| env::bytes(s).filter(|m| *m >= dsm::MIN_NOTICE_MEMORY),
        )? {
            b = b.notice_memory(m);
        }
        if let Some(m) = env::get_in(
            vars,
            "DSM_TWIN_MEMORY",
            "a size such as 32M, or 0",
            env::bytes,
        )? {
            b = b.twin_memory(m);
        }
        // Read by dsm itself when a rank leaves; checked here so that a typo is an error, not silence.
        env::get_in(vars, "DSM_STATS", "1 or 0", |s| {
            matches!(s, "0" | "1").then_some(())
        })?;
        let size = env::get_in(
            vars,
            "DSM_ARENA_SIZE",
            "a size such as 64G (a multiple of the 4 KiB page)",
            |s| env::bytes(s).filter(|n| *n >= dsm::PAGE_SIZE && n % dsm::PAGE_SIZE == 0),
        )?;
        let base = env::get_in(
            vars,
            "DSM_ARENA_BASE",
            "a non-zero hexadecimal address, a multiple of the 4 KiB page (such as 0x100000000000)",
            |s| env::hex_addr(s).filter(|a| *a != 0 && a % dsm::PAGE_SIZE == 0),
        )?;
        if size.is_some() || base.is_some() {
            b = b.arena(base, size.unwrap_or(1 << 40));
        }
        Ok(b)
    }

    /// The shared memory of this rank.
    pub fn dsm(&self) -> &Dsm {
        &self.dsm
    }

    pub(crate) fn shared_dsm(&self) -> &Arc<Dsm> {
        &self.dsm
    }

    /// This process's rank.
    pub fn rank(&self) -> Rank {
        self.dsm.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.dsm.size()
    }

    /// Leaves the job, reporting a failure of the final barrier. Every rank whose work went well calls it
    /// (see [`Runtime`] for a rank that does not).
    pub fn finish(mut self) -> Result<(), RuntimeError> {
        self.finished = true;
        // MPI is finalized when this function returns, after the job has been left.
        #[cfg(feature = "mpi")]
        let mut mpi = self._mpi.take();
        let dsm = self.dsm.clone();
        drop(self);
        match Arc::try_unwrap(dsm) {
            Ok(dsm) => {
                let left = dsm.finish();
                // A final barrier that failed left the job without goodbyes, as a failed rank: MPI's
                // finalization could wait for ranks that wait for this one.
                #[cfg(feature = "mpi")]
                if let (Err(_), Some(f)) = (&left, &mut mpi) {
                    f.abandoned = true;
                }
                Ok(left?)
            }
            // The job is left when the last handle goes.
            Err(dsm) => Err(RuntimeError::InUse(Arc::strong_count(&dsm) - 1)),
        }
    }
}
