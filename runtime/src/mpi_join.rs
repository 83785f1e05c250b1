//! Joining a job started by `mpirun`/`mpiexec` (MPICH, Open MPI, or Slurm's `srun` with PMI): MPI is
//! initialized, gives this process its rank and the job's size, and carries what the ranks must agree on
//! before the TCP transport connects them: that they run the same build, one secret token, and every
//! rank's listener address. MPI is used only here, from the thread that calls `Runtime::init`, so the
//! funneled thread level is all it must provide; it is finalized by `Runtime::finish`, after the job's
//! final barrier (a rank that leaves the job as a failed one is not finalized: `mpirun` sees it fail).

use crate::mpi_bridge::{Bridge, MpiTransport};
use crate::RuntimeError;
use dsm::transport::tcp::PeerAddr;
use dsm::transport::Transport;
use dsm::Rank;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Threading;
use std::hash::Hasher;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// MPI, initialized.
pub(crate) struct Universe(mpi::environment::Universe);

/// Finalizes MPI when dropped, but only once the job has been left: if handles on the job's `Dsm` (a
/// tuple space, say) outlive the `Runtime`, MPI stays initialized rather than be finalized under a job
/// that other ranks are still in.
pub(crate) struct Finalizer {
    pub(crate) universe: Option<Universe>,
    pub(crate) dsm: std::sync::Weak<dsm::Dsm>,
    pub(crate) bridge: Option<Bridge>,
    /// The rank left the job as a failed one (its `Runtime` was dropped unfinished).
    pub(crate) abandoned: bool,
}

/// How long MPI's finalization waits for the bridge thread to see every connection end.
const BRIDGE_GRACE: Duration = Duration::from_secs(10);
/// How long a rank that leaves the job as a failed one waits for the other ranks' bridges to acknowledge
/// its connections' ends: a few milliseconds when they run; a rank that died or is stopped never does,
/// and costs the whole wait.
const ENDS_GRACE: Duration = Duration::from_secs(2);

impl Drop for Finalizer {
    fn drop(&mut self) {
        let Some(u) = self.universe.take() else {
            return;
        };
        if self.dsm.upgrade().is_some() {
            // Finalizing MPI belongs to the thread that initialized it, which is this one, now.
            eprintln!(
                "dsm: the Runtime was dropped while handles on the job (a TupleSpace, say) live on, so MPI is left unfinalized and mpirun may report this rank as failed: drop them before the Runtime"
            );
            std::mem::forget(u.0);
            return;
        }
        if std::thread::panicking() || self.abandoned {
            // The rank is ending with a panic or an error: waiting for the bridge to see the other ranks'
            // ends would only delay that, and MPI's finalization may wait for ranks that wait for this one.
            // The launcher sees a rank end without finalizing, and ends the job. One that lets the others
            // run on (Slurm's `srun` with `KillOnBadExit=0`, Hydra's `-disable-auto-cleanup`) leaves them
            // to learn of it from its connections' ends, which the bridge sends (buffered: a message still
            // in the send buffer at exit is lost, and about half of such jobs of 3 ranks waited out their
            // peer timeout, or for ever with none): they are given a moment to be acknowledged.
            if let Some(b) = &self.bridge {
                b.wait_for_ends(ENDS_GRACE);
            }
            std::mem::forget(u.0);
            return;
        }
        let thread = self
            .bridge
            .as_ref()
            .and_then(|b| b.thread.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = thread {
            let deadline = std::time::Instant::now() + BRIDGE_GRACE;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !t.is_finished() {
                eprintln!(
                    "dsm: the MPI bridge did not end within {BRIDGE_GRACE:?}; leaving MPI unfinalized"
                );
                std::mem::forget(u.0);
                return;
            }
            let _ = t.join();
        }
        drop(u);
    }
}

impl std::fmt::Debug for Finalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Finalizer")
    }
}

/// The room one rank's listener addresses take in the exchange (an IPv6 address with its port and a Unix
/// socket's name: 80 bytes at most).
const ADDR_BYTES: usize = 96;

/// What joining through MPI gives the runtime.
pub(crate) struct Joined {
    pub(crate) rank: Rank,
    pub(crate) size: usize,
    /// None for a job of one rank.
    pub(crate) transport: Option<Box<dyn Transport>>,
    pub(crate) universe: Universe,
    /// The MPI transport's bridge thread, when the job uses it.
    pub(crate) bridge: Option<Bridge>,
}

/// How the ranks of an MPI job carry their traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carrier {
    /// TCP connections, set up through MPI.
    Tcp,
    /// MPI messages, through a bridge thread.
    Mpi,
}

/// A fingerprint of this program's executable: ranks that run different builds would disagree on the
/// layout of every message, so they are stopped at the door.
fn build_id() -> Result<u64, RuntimeError> {
    let mut f = std::fs::File::open("/proc/self/exe").map_err(|e| RuntimeError::Io {
        context: "reading this program's executable (/proc/self/exe) to compare builds".into(),
        error: e,
    })?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| RuntimeError::Io {
            context: "reading this program's executable".into(),
            error: e,
        })?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    Ok(h.finish())
}

/// Whether MPI says every rank of the job runs on this host.
fn all_local(size: usize) -> bool {
    ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        == Some(size)
}

/// The address other ranks reach a listener bound to `bind` at: `bind` itself, or for an unspecified
/// address (0.0.0.0) this host's own, found by resolving its name.
fn advertised(bind: IpAddr, port: u16) -> Result<SocketAddr, RuntimeError> {
    if !bind.is_unspecified() {
        return Ok(SocketAddr::new(bind, port));
    }
    let host = nix::unistd::gethostname()
        .map_err(|e| RuntimeError::Mpi(format!("this host's name: {e}")))?
        .to_string_lossy()
        .into_owned();
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.is_ipv4() && !a.ip().is_loopback()))
        .ok_or_else(|| {
            RuntimeError::Mpi(format!(
                "{host} does not resolve to an address other hosts can reach: set DSM_BIND to this host's address on the network the ranks share"
            ))
        })
}

pub(crate) fn join(
    bind: Option<IpAddr>,
    unix: bool,
    timeout: Duration,
    carrier: Carrier,
    send_buffer: usize,
    channels: usize,
) -> Result<Joined, RuntimeError> {
    // The TCP carrier calls MPI only here, on this thread; the MPI carrier's bridge thread calls it while
    // the program may too (a benchmark's raw round trips).
    let needed = match carrier {
        Carrier::Tcp => Threading::Funneled,
        Carrier::Mpi => Threading::Multiple,
    };
    let (mut universe, provided) = mpi::initialize_with_threading(needed).ok_or_else(|| {
        RuntimeError::Mpi("MPI was initialized already by something else in this process".into())
    })?;
    if provided < needed {
        // Ended for the whole job: ranks that need less (another DSM_TRANSPORT) are in the collective of
        // joining already, which this rank's finalizing would wait for.
        abort_job(&RuntimeError::Mpi(format!(
            "the MPI library provides thread level {provided:?}; dsm needs {needed:?} here: use an MPI library built with thread support{}",
            if carrier == Carrier::Mpi { ", or DSM_TRANSPORT=tcp" } else { "" }
        )));
    }
    if carrier == Carrier::Mpi {
        universe.set_buffer_size(send_buffer);
    }
    let world = universe.world();
    let bridge: Bridge = Arc::default();
    let how = How {
        timeout,
        bind,
        unix,
        carrier,
        send_buffer,
        channels,
    };
    match connect(&world, &how, &bridge) {
        Ok((rank, size, transport)) => Ok(Joined {
            rank,
            size,
            transport,
            universe: Universe(universe),
            bridge: (carrier == Carrier::Mpi).then_some(bridge),
        }),
        // The other ranks may be inside a collective this rank will never join: end the whole job, saying
        // why, rather than leave them waiting.
        Err(e) => abort_job(&e),
    }
}

/// Ends the whole MPI job from this rank after a failure past joining, saying why (`e`, the whole reason:
/// a `RuntimeError`, or a line of its own for a failure that is not the join's): the other ranks may wait
/// in a collective this rank will never join, and MPI may not be finalized under the transport's bridge
/// thread.
pub(crate) fn abort_job(e: &dyn std::fmt::Display) -> ! {
    use std::io::Write;
    let world = mpi::topology::SimpleCommunicator::world();
    // One write (`eprintln!` writes a line in pieces, and another rank's abort may end this process between
    // them), then a moment for the launcher to pass it on before the abort tears the job down.
    let line = format!("dsm: rank {}: {e}; aborting the MPI job\n", world.rank());
    let _ = std::io::stderr().write_all(line.as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    world.abort(70)
}

/// Rank, size and (for more than one rank) the transport.
type Connected = (Rank, usize, Option<Box<dyn Transport>>);

/// How this rank means to join: what every rank must agree on, and its own settings.
struct How {
    timeout: Duration,
    bind: Option<IpAddr>,
    /// Whether ranks on one host connect through Unix-domain sockets (`DSM_UNIX_SOCKETS`).
    unix: bool,
    carrier: Carrier,
    send_buffer: usize,
    channels: usize,
}

/// Rank, size and (for more than one rank) the transport, agreed over MPI.
fn connect(
    world: &mpi::topology::SimpleCommunicator,
    how: &How,
    bridge: &Bridge,
) -> Result<Connected, RuntimeError> {
    let How {
        timeout,
        bind,
        unix,
        carrier,
        send_buffer,
        channels,
    } = *how;
    let rank = world.rank() as usize;
    let size = world.size() as usize;
    // A launcher of another MPI library (Open MPI's mpirun for an MPICH build, or the reverse) starts
    // processes that MPI_Init takes for jobs of one rank each: every process would compute alone.
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok());
    if let Some(n) = launched.filter(|n| *n != size) {
        return Err(RuntimeError::Mpi(format!(
            "the launcher started {n} ranks, but MPI sees a job of {size}: this program was built against another MPI library than the one whose mpirun started it (build it and run it with the same MPI)"
        )));
    }
    if size > dsm::protocol::swmr::MAX_RANKS {
        return Err(RuntimeError::Mpi(format!(
            "mpirun started {size} ranks; a job has at most {}",
            dsm::protocol::swmr::MAX_RANKS
        )));
    }

    // Each rank's build, channels, transport and (over MPI) the buffer its bridge's flow control is
    // sized by: ranks that differ in any would wait for each other for ever (a window more than twice
    // another's is never acknowledged in time, and the transports set up differently).
    let over_mpi = carrier == Carrier::Mpi;
    let mine = [
        build_id()?,
        channels as u64,
        u64::from(over_mpi),
        if over_mpi { send_buffer as u64 } else { 0 },
    ];
    let mut all = vec![0u64; mine.len() * size];
    world.all_gather_into(&mine[..], &mut all[..]);
    let differ = |field: usize| -> Vec<usize> {
        (0..size)
            .filter(|r| all[mine.len() * r + field] != mine[field])
            .collect()
    };
    let say = |field: usize, other: &[usize]| {
        match field {
        0 => format!(
            "rank {rank} runs a different build of this program than rank(s) {other:?}: every rank must run the same executable (copy one build to every host)"
        ),
        1 => format!(
            "rank {rank} opens {channels} channels to each rank, and rank(s) {other:?} another number: give every rank the same DSM_CHANNELS"
        ),
        2 => {
            let (mine, theirs) = if over_mpi {
                ("mpi", "tcp")
            } else {
                ("tcp", "mpi")
            };
            format!(
                "rank {rank} carries the job's traffic over {mine}, and rank(s) {other:?} over {theirs}: give every rank the same DSM_TRANSPORT"
            )
        }
        _ => format!(
            "rank {rank} has a send buffer of {send_buffer} bytes, and rank(s) {other:?} another size: give every rank the same DSM_MPI_SEND_BUFFER"
        ),
    }
    };
    if let Some((field, other)) = (0..mine.len())
        .map(|field| (field, differ(field)))
        .find(|(_, other)| !other.is_empty())
    {
        return Err(RuntimeError::Mpi(say(field, &other)));
    }
    if size == 1 {
        return Ok((Rank(0), size, None));
    }
    if carrier == Carrier::Mpi {
        let transport = MpiTransport {
            bridge: bridge.clone(),
            send_buffer,
        };
        return Ok((Rank(rank as u32), size, Some(Box::new(transport))));
    }

    let mut token = if rank == 0 {
        crate::launch::fresh_token()?
    } else {
        [0u8; 32]
    };
    world.process_at_rank(0).broadcast_into(&mut token[..]);

    let bind = bind.unwrap_or(if all_local(size) {
        IpAddr::from([127, 0, 0, 1])
    } else {
        IpAddr::from([0, 0, 0, 0])
    });
    let (transport, mut mine) = crate::rendezvous::listen(bind, unix, token, timeout)?;
    mine.tcp = advertised(bind, mine.tcp.port())?;
    let mine = mine.to_string();
    let mut slot = [0u8; ADDR_BYTES];
    slot[..mine.len()].copy_from_slice(mine.as_bytes());
    let mut all = vec![0u8; ADDR_BYTES * size];
    world.all_gather_into(&slot[..], &mut all[..]);
    let peers = all
        .chunks(ADDR_BYTES)
        .enumerate()
        .map(|(r, c)| {
            let text = String::from_utf8_lossy(c);
            let text = text.trim_end_matches('\0');
            text.parse::<PeerAddr>().map_err(|_| {
                RuntimeError::Mpi(format!("rank {r} sent an unreadable address {text:?}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        Rank(rank as u32),
        size,
        Some(Box::new(transport.with_peers(peers))),
    ))
}
