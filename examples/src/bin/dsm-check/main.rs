//! Multi-process correctness checks, run by the tests under the launcher at 2, 3 and 4 ranks. Among them
//! (the others are described at their functions, in the modules by theme):
//! - `counter`: lock-protected counters spread over pages reach exact totals (`--threads T`: T threads per
//!   rank take the locks at once while one of them also calls barriers);
//! - `atomics`: counters, tickets and a chain under a lock changed with atomic operations on shared words,
//!   under either model, exact and handed out once (`--threads T` at once per rank);
//! - `mp`: message passing (data then flag on different pages): a reader that sees the flag sees the data;
//! - `sb`: store buffering: both ranks reading the other's old value is forbidden under sequential consistency;
//! - `pages`: every rank writes its own words of the same pages; after a barrier everyone sees all writes;
//! - `latehome`: the same on pages homed at rank 0, which writes late, while the others' diffs arrive;
//! - `homediffs`: (release consistency, 2 ranks) rank 1 writes pages homed at rank 0 under a lock, and rank
//!   0 under the same lock writes one of them too: rank 1 sees rank 0's writes, and drops and fetches
//!   again only the page rank 0 wrote (a home's notice does not name pages only others' diffs wrote);
//! - `revertedhome`: (release consistency, 3 ranks) a page homed at rank 0 that rank 1's diff made writable
//!   there is written by rank 0 under a lock, fetched by rank 2 while that write is in place, and written
//!   back to its old bytes before the lock goes: rank 2, taking the lock next, must read the last bytes
//!   written, not the ones its copy caught (a home that compared the page with its twin at the release
//!   found them equal and did not announce it);
//! - `flushbatch`: (release consistency, 2 ranks) rank 1 writes its words of pages homed at rank 0 and,
//!   without a release in between, takes a lock that rank 0 let go after writing its own words of the same
//!   pages: rank 1's acquire sends its writes to those pages to their home in one batch (not one round trip
//!   a page) before it drops them, and both ranks see both writes;
//! - `carrylock`: (release consistency) one thread of rank 1 writes a page homed at rank 0 before each
//!   barrier (whose arrival carries the diff to rank 0) while another passes a lock on to the others:
//!   what they read under the lock includes the first thread's writes that the second had seen, and
//!   after each barrier every rank sees its write;
//! - `selective`: (3 ranks or more) rank 1 writes pages homed at rank 2 and at itself, releases some of
//!   them selectively and says so through a flag of sequential consistency; rank 0, which holds old copies,
//!   sees the new bytes of exactly those pages once it acquires them selectively, and the rest after a
//!   barrier;
//! - `readahead`: pages fetched ahead of a sequential reader (from one home, and a stride apart from every
//!   home of a cyclic region) behave as ordinary copies afterwards;
//! - `slices`: copies into and out of a region (`read_slice`, `write_slice`, `prefetch`) take each run of
//!   pages with one home in one fault, and copy the right values;
//! - `coalesce`: threads of one rank faulting on the same page at once make one fetch between them;
//! - `firsttouch`: a home filling its untouched pages with zeros ahead of a sequential first touch stops
//!   at pages other ranks have touched, whose data it must keep; so does a home handing a sequential
//!   remote writer untouched pages ahead;
//! - `manylocks`: counters each behind a lock of its own, more locks than a home keeps servers for, reach
//!   exact values (idle lock servers are let go of, and under release consistency what they knew is kept
//!   as a horizon);
//! - `lockfault`: threads waiting for a lock do not keep the lock's holder from resolving faults;
//! - `ownmpi`: (under mpirun) the program's own MPI messages, received with wildcards on `MPI_COMM_WORLD`
//!   beside the job's traffic, are exactly the program's, whichever transport carries the job;
//! - `die`: one rank kills itself mid-job; the others must end with an error instead of hanging;
//! - `panicbarrier`: rank 0 panics while the others wait at a barrier (which rank 0 serves) and return
//!   its error from `main`: they end as the failure's consequence (`EXIT_PEER_FAILED`), so that the
//!   launcher names rank 0;
//! - `stop`: one rank stops itself (SIGSTOP) mid-job, its connections open and silent; the others must end
//!   with an error naming it once the peer timeout (`DSM_PEER_TIMEOUT`) has passed;
//! - `freeze`: (as root, with a cgroup v2 hierarchy mounted) one rank freezes itself in a cgroup of its own
//!   mid-job: it runs on but answers nothing, and it is not stopped (SIGSTOP) either; the others end once
//!   the peer timeout has passed, and the launcher names it;
//! - `partition`: (in a network namespace of its own, as root, with `DSM_UNIX_SOCKETS=off`) rank 0 takes
//!   the loopback interface down mid-job: connections stay open and sends succeed, but nothing arrives;
//!   every rank must end with an error once the peer timeout (`DSM_PEER_TIMEOUT`) has passed;
//! - `pause`: the whole job is stopped for twice the peer timeout (`DSM_PEER_TIMEOUT`, which must be set)
//!   while its ranks wait at a barrier, then resumed: no rank may take another for failed;
//! - `readerdies`: (under --keep-going, 3 ranks) a rank that read two pages dies; the home, then another
//!   rank, write them: neither waits for the dead reader nor fails for it;
//! - `ownerdies`: (under --keep-going, 3 ranks) a rank that wrote two pages, which the home and another
//!   rank then read, dies: the pages are read and written from the copies that live on;
//! - `diffhomedies`: (under --keep-going, 3 ranks) a release sends diffs to two homes, one of them dead: it
//!   fails naming the dead one, the live one applies its diff, and the releasing rank goes on;
//! - `releaseafterdeath`: (under --keep-going, 4 ranks) rank 1 holds a write to a page homed at rank 2 when
//!   rank 2 dies, so that every release of rank 1 fails from then on: its writes to rank 0's pages must
//!   still reach their home (a release goes on past a home that failed), and be announced once, not again
//!   at every release that fails after (rank 3, reading them under the lock, drops them only once);
//! - `lockedcopy`: (2 ranks) rank 0 locks its memory (`mlockall`, now and to come) between allocating two
//!   regions homed at rank 1, which writes their pages round after round: rank 0 must read each round's
//!   values, fetched (not a zero page the kernel filled in for the locked mapping) and dropped again when
//!   written (locked pages cannot be dropped until unlocked);
//! - `sentsigbus`: a SIGBUS sent to a rank (not a fault) kills it, as it would without dsm;
//! - `diewriting`: (under --keep-going) a rank dies while it and another write one page in turn; the other
//!   must finish or fail naming it, never hang.
#![forbid(unsafe_code)]

mod atomics;
mod coherence;
mod failures;
mod homes;
mod pages;
mod release;

use anyhow::{ensure, Context};
use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Debug, Parser)]
struct Args {
    /// The check to run: a name in `CHECKS`, or `servicefault`. An unknown name lists them all; each is
    /// described at the top of `examples/src/bin/dsm-check/main.rs` or at its function.
    check: String,
    /// Iterations or rounds.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Threads per rank (counter, touchrace; readahead, coalesce: threads of rank 0 reading at once).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Memory model of the shared data: sequential or release (counter, atomics, pages, latehome, bytes, mplock,
    /// firsttouch, touchhomes, touchrace, readahead, lockedcopy).
    #[arg(long, default_value = "sequential")]
    consistency: String,
}

/// A deterministic hash of small integers, so that every rank can compute what every other rank wrote.
fn mix(parts: &[u64]) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in parts {
        x ^= p.wrapping_add(0x632b_e59b_d9b4_e019);
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 31;
    }
    x
}

const WORDS_PER_PAGE: usize = 512;

/// Runs `f(t)` for `t` in `0..threads`, each on a thread of its own, all at once; the first error wins.
fn on_threads(
    threads: usize,
    f: impl Fn(usize) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("a thread of the check panicked"))
    })
}

/// Checks the first three words of each of the `pages` pages of `v`: words 0 and 1 as `want` gives them,
/// word 2 still zero (nothing filled over what was written).
fn check_words(
    v: &dsm::GlobalVec<'_, u64>,
    pages: usize,
    who: &str,
    want: impl Fn(usize) -> (u64, u64),
) -> anyhow::Result<()> {
    for p in 0..pages {
        let at = p * WORDS_PER_PAGE;
        let (w0, w1) = want(p);
        ensure!(v.get(at) == w0, "{who} page {p} lost word 0");
        ensure!(v.get(at + 1) == w1, "{who} page {p} lost word 1");
        ensure!(v.get(at + 2) == 0, "{who} page {p} is not zero");
    }
    Ok(())
}

/// What every check gets: this rank's runtime and shared memory, its rank and the job's size, the memory
/// model asked for, and the command line.
#[derive(Clone, Copy)]
struct Check<'a> {
    rt: &'a dsm_runtime::Runtime,
    dsm: &'a dsm::Dsm,
    me: usize,
    n: usize,
    model: dsm::Consistency,
    args: &'a Args,
}

/// Every check by its name on the command line (`servicefault`, which keeps its runtime for as long as
/// the process lives, is run apart).
type CheckFn = fn(&Check) -> anyhow::Result<()>;
const CHECKS: &[(&str, CheckFn)] = &[
    ("counter", coherence::counter),
    ("atomics", atomics::atomics),
    ("mp", coherence::mp),
    ("sb", coherence::sb),
    ("pages", coherence::pages),
    ("bytes", coherence::bytes),
    ("latehome", coherence::latehome),
    ("lockedcopy", coherence::lockedcopy),
    ("homediffs", release::homediffs),
    ("revertedhome", release::revertedhome),
    ("flushbatch", release::flushbatch),
    ("selective", release::selective),
    ("idle", coherence::idle),
    ("manylocks", coherence::manylocks),
    ("carrylock", release::carrylock),
    ("mplock", coherence::mplock),
    ("readahead", pages::readahead),
    ("slices", pages::slices),
    ("coalesce", pages::coalesce),
    ("firsttouch", pages::firsttouch),
    ("touchhomes", homes::touchhomes),
    ("touchrace", homes::touchrace),
    ("lockfault", coherence::lockfault),
    ("grantwait", coherence::grantwait),
    ("diewriting", failures::diewriting),
    ("readerdies", failures::readerdies),
    ("datalost", failures::datalost),
    ("ownerdies", failures::ownerdies),
    ("diffhomedies", failures::diffhomedies),
    ("releaseafterdeath", failures::releaseafterdeath),
    ("sentsigbus", failures::sentsigbus),
    ("ownmpi", ownmpi),
    ("quitwaited", failures::quitwaited),
    ("panicwaited", failures::panic_or_error_waited),
    ("errorwaited", failures::panic_or_error_waited),
    ("die", failures::die),
    ("panicbarrier", failures::panicbarrier),
    ("pause", failures::pause),
    ("partition", failures::partition),
    ("stopkeep", failures::stopkeep),
    ("freeze", failures::freeze),
    ("stop", failures::stop),
];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = dsm_runtime::Runtime::init()?;
    if args.check == "servicefault" {
        // The service holds the region for as long as the process lives, and the process ends in it.
        return service_fault(Box::leak(Box::new(rt)));
    }
    let model = match args.consistency.as_str() {
        "sequential" => dsm::Consistency::Sequential,
        "release" => dsm::Consistency::Release,
        other => anyhow::bail!("unknown consistency {other:?}: use sequential or release"),
    };
    let Some((_, check)) = CHECKS.iter().find(|(name, _)| *name == args.check) else {
        let names: Vec<&str> = CHECKS.iter().map(|(name, _)| *name).collect();
        anyhow::bail!(
            "unknown check {:?}: use {} or servicefault",
            args.check,
            names.join(", ")
        );
    };
    let c = Check {
        rt: &rt,
        dsm: rt.dsm(),
        me: rt.rank().0 as usize,
        n: rt.size(),
        model,
        args: &args,
    };
    check(&c)?;
    rt.finish()?;
    Ok(())
}

pub(crate) fn ownmpi(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    own_mpi(dsm, me, n, args.rounds)
}

/// A service that answers with the last word of a shared array (what a service must not do: that word's
/// page is homed at the last rank and not present here).
#[derive(Debug)]
struct ReadsShared(dsm::GlobalVec<'static, u64>);

impl dsm::Service for ReadsShared {
    fn request(&self, _: dsm::Rank, _: Vec<u8>, reply: dsm::Responder) {
        let word = self.0.get(self.0.len() - 1);
        let _ = reply.send(&[&word.to_le_bytes()]);
    }
}

/// `servicefault`: rank 1 calls a service of rank 0's that reads a page of rank 1's while it answers.
/// Rank 0 must end saying why, not hang with its service loop waiting for its own fault.
fn service_fault(rt: &'static dsm_runtime::Runtime) -> anyhow::Result<()> {
    let dsm = rt.dsm();
    anyhow::ensure!(rt.size() == 2, "servicefault runs at 2 ranks");
    let v = dsm.alloc_vec_in::<u64>(
        2 * WORDS_PER_PAGE,
        dsm::Placement::Block,
        dsm::Consistency::Sequential,
    )?;
    dsm.register_service(7, std::sync::Arc::new(ReadsShared(v)))?;
    dsm.barrier()?;
    if rt.rank().0 == 1 {
        // Rank 0 ends, and the call fails with it; an answer means the service touched the page.
        let answer = dsm.call(dsm::Rank(0), 7, &[])?;
        anyhow::bail!("rank 1: the service answered {answer:?}");
    }
    within_30_s(0, "rank 0's service neither answered nor ended it", &|| {
        false
    })?;
    Ok(())
}

/// Each round, a locked increment of a shared counter (the job's traffic) and a message of the program's
/// own to the next rank, received with any source and any tag, on tags the MPI transport once used on
/// `MPI_COMM_WORLD` itself: every message received must be the one the previous rank sent.
#[cfg(feature = "mpi")]
fn own_mpi(dsm: &dsm::Dsm, me: usize, n: usize, rounds: usize) -> anyhow::Result<()> {
    use mpi::traits::{Communicator, Destination, Source};
    ensure!(
        mpi::environment::is_initialized(),
        "ownmpi runs under mpirun"
    );
    let world = mpi::topology::SimpleCommunicator::world();
    let counter = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    for round in 0..rounds {
        let guard = dsm.lock(0)?;
        counter.set(0, counter.get(0) + 1);
        guard.unlock()?;
        let tag = 32_000 + (round % 3) as i32;
        let sent = format!("own {me} {round}");
        let (got, status) = mpi::request::scope(|scope| {
            let request = world.process_at_rank(next as i32).immediate_send_with_tag(
                scope,
                sent.as_bytes(),
                tag,
            );
            let got = world.any_process().receive_vec::<u8>();
            request.wait();
            got
        });
        let want = format!("own {prev} {round}");
        ensure!(
            got == want.as_bytes() && status.tag() == tag && status.source_rank() == prev as i32,
            "rank {me} round {round}: received {:?} with tag {} from rank {}, expected {want:?} with tag {tag} from rank {prev}",
            String::from_utf8_lossy(&got),
            status.tag(),
            status.source_rank()
        );
    }
    dsm.barrier()?;
    let total = counter.get(0);
    ensure!(
        total == (rounds * n) as u64,
        "rank {me}: counter {total}, expected {}",
        rounds * n
    );
    println!("ownmpi ok: {rounds} rounds");
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn own_mpi(_: &dsm::Dsm, _: usize, _: usize, _: usize) -> anyhow::Result<()> {
    anyhow::bail!("ownmpi needs a build with the mpi feature, run under mpirun")
}

/// Whether this rank has seen rank `r` fail.
fn has_failed(dsm: &dsm::Dsm, r: u32) -> bool {
    dsm.failed_ranks().contains(&dsm::Rank(r))
}

/// Rank 2 dies (SIGKILL); every other rank returns once it has seen it fail (within 30 s).
fn rank_2_dies(dsm: &dsm::Dsm, me: usize) -> anyhow::Result<()> {
    if me == 2 {
        nix_kill_self();
    }
    within_30_s(me, "rank 2's death was not noticed in 30 s", &|| {
        has_failed(dsm, 2)
    })
}

/// Waits (polling every millisecond) until `done` holds, or fails with `what` after 30 s.
fn within_30_s(me: usize, what: &str, done: &dyn Fn() -> bool) -> anyhow::Result<()> {
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        ensure!(std::time::Instant::now() < limit, "rank {me}: {what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// User and system CPU time of this process so far, in seconds.
fn cpu_seconds() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(f64::NAN)
}

/// Every rank writes its word of one page and meets the others at a barrier; then the last rank calls
/// `leave` (which kills, stops or signals it, and returns only with the error that it did not), and the
/// others wait at a barrier it never comes to: they must end with an error naming it instead of hanging.
/// `who` names the last rank should that barrier complete all the same.
fn last_rank_leaves(
    dsm: &dsm::Dsm,
    who: &str,
    leave: impl FnOnce() -> anyhow::Error,
) -> anyhow::Result<()> {
    let (me, n) = (dsm.rank().index(), dsm.size());
    let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    v.set(me, 1);
    dsm.barrier()?;
    if me == n - 1 {
        return Err(leave());
    }
    dsm.barrier()?;
    anyhow::bail!("rank {me}: a barrier completed without {who}")
}

/// Freezes this process in a cgroup of its own, made under the first cgroup v2 hierarchy mounted; says
/// which first (its directory is left for the caller to remove once the process has been killed).
fn freeze_self() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let root = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| f[1].to_string())
        .context("no cgroup2 file system is mounted")?;
    let me = std::process::id();
    let dir = std::path::Path::new(&root).join(format!("dsm-check-freeze-{me}"));
    std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
    println!("freeze: in {}", dir.display());
    std::fs::write(dir.join("cgroup.procs"), me.to_string())
        .with_context(|| format!("moving into {}", dir.display()))?;
    std::fs::write(dir.join("cgroup.freeze"), "1")
        .with_context(|| format!("freezing {}", dir.display()))?;
    // Frozen on the way back from the write; should the freeze take a moment, it is waited for here.
    std::thread::sleep(std::time::Duration::from_secs(5));
    Ok(())
}

fn nix_kill_self() -> ! {
    let me = std::process::id();
    let _ = std::process::Command::new("kill")
        .args(["-9", &me.to_string()])
        .status();
    std::process::exit(99);
}
