//! Every environment variable the runtime reads, in one place.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DSM_RANK`, `DSM_SIZE` | this process's rank and the job's size (set by `dsmrun`): a size of 1 to 256 and a rank below it; `DSM_SIZE` without `DSM_RANK` is an error | a job of one rank |
//! | `DSM_RENDEZVOUS` | `host:port` where ranks exchange their addresses (set by `dsmrun`) | required when `DSM_SIZE` > 1 |
//! | `DSM_TOKEN` | the job's secret, 64 hex digits (set by `dsmrun`, fresh for every job) | required when `DSM_SIZE` > 1 |
//! | `DSM_BIND` | the address this rank's listener binds to (under `mpirun`, `0.0.0.0` listens on all and advertises the address the host name resolves to) | `127.0.0.1`; under `mpirun`, `0.0.0.0` unless the launcher says every rank is on this host (`MPI_LOCALNRANKS` or `OMPI_COMM_WORLD_LOCAL_SIZE` equal to the job's size) |
//! | `DSM_CHANNELS` | threads of a rank that can fault or call into the job at once, 2 to 64 (one is kept for faults) | 4 |
//! | `DSM_READAHEAD` | largest sequential read-ahead window in pages, 1 to 1024 (1 = off); the window doubles from 1 page on each sequential fault (a run that starts where a recent one did starts with that one's length); it also bounds, at 64 pages, the untouched pages filled with zeros ahead of a sequential first touch of pages homed here and, under sequential consistency, those a home hands a first writer; 1 turns those off too | 1024 (4 MiB) |
//! | `DSM_ARENA_SIZE` | bytes of address space reserved for shared regions, a multiple of 4 KiB (suffixes K, M, G, T) | 1T |
//! | `DSM_ARENA_BASE` | where rank 0 reserves the arena: a non-zero hexadecimal address (with or without `0x`), a multiple of 4 KiB; if the default range is taken, rank 0 lets the kernel choose, and a base set here that is taken is an error | `0x100000000000`, else wherever the kernel puts it |
//! | `DSM_UNIX_SOCKETS` | `on`: each rank also listens on a Unix-domain socket (an abstract name, random, advertised with its TCP address), and ranks that find each other's on their host (in their network namespace) connect through them, which costs less than TCP loopback; `off`: TCP only (a rank with it off neither listens on one nor connects through the others') | on |
//! | `DSM_CONNECT_TIMEOUT` | seconds to wait for every rank to connect, 1 to 86400 | 30 |
//! | `DSM_PEER_TIMEOUT` | seconds a rank may go unheard before the others take it for failed (a stopped or hung process, a host or network that went down: none of them closes a connection); each rank's service loop sends heartbeats four times a timeout and at least once a second (also with 0); 0 never takes a rank for failed on silence (for a rank stopped in a debugger); otherwise 2 to 86400 | 30 |
//! | `DSM_SERVICE_PRIORITY` | `favoured`: the service loop runs `SCHED_FIFO` when permitted, else at nice -10 when permitted; `nice`: nice -10 only; `normal`: as the program's other threads; not with `DSM_TRANSPORT=mpi`, whose bridge thread runs the service loop at normal priority | favoured |
//! | `DSM_INSTALL_HELPER` | `on`: a helper thread installs pages of long read-ahead replies (256 pages or more) beside the faulting thread, on another core; `off` | on when ranks <= cores, else off |
//! | `DSM_DIRECT_INSTALL` | `on`: ranks on this host may install the pages this rank fetches straight into its memory (they take its userfaultfd with `pidfd_getfd`, which needs ptrace's permission: root, or the same user where Yama's `ptrace_scope` is 0; refused, pages come over the connections); `off`: pages always come over the connections | on |
//! | `DSM_NOTICE_MEMORY` | release consistency: memory each list of write notices kept between barriers may take (a rank's known notices, its own, and those of the locks it is the home of; suffixes K, M, G, T, either case; at least 4K); past it the oldest are forgotten (each writer's latest is kept, unless those alone are over it at a lock's home), and a rank that acquires without having seen them drops every cached page of release-consistency regions not homed here | 8M |
//! | `DSM_TWIN_MEMORY` | release consistency: memory the twins of a rank's pages keep once their writes are released, so that a page written again in a later interval gets its twin without a page fault and a zeroed page, and a write fault twins the pages after its own that were written before too, making a run writable at once (suffixes K, M, G, T, either case; 0 gives every twin's memory back at once and turns twinning ahead off) | 32M |
//! | `DSM_SPIN_US` | microseconds a thread waiting for a reply polls before it sleeps, 0 to 1000000 | 50 when the job has 2 ranks or more and no more than the cores, else 0 (with `DSM_TRANSPORT=mpi` the thread yields between looks) |
//! | `DSM_KEEP_AWAKE_US` | microseconds after each request during which `SCHED_IDLE` threads keep idle CPUs awake, 0 (off) to 1000000 | 0 |
//! | `DSM_ON_PEER_FAILURE` | `exit`: a rank ends (status 75) when another fails; `report`: operations that need the failed rank return errors and the program decides (set by `dsmrun --keep-going`; dsmrun refuses `report` without that flag, since it ends the job at the first failure) | exit |
//! | `DSM_STATS` | `1`: print each rank's statistics when it leaves the job; `0`: do not | off |
//! | `DSM_LAUNCHER_PID` | set by `dsmrun`: a rank ends itself when this process dies | unset |
//! | `DSM_LAUNCHER_PIDNS` | set by `dsmrun`: its PID namespace (`/proc/self/ns/pid`); a rank in another one cannot see the launcher's process by its pid, and leaves ending it to the parent-death signal and the launcher's watchdog | unset |
//! | `DSM_LOCAL_JOB_LIMIT` | tests only: seconds (1 or more) an in-process job (`run_local_job`) may run before it ends the test process as a failure | 120 |
//! | `DSM_TRANSPORT` | under `mpirun` (feature `mpi`): `tcp`, connections set up through MPI, or `mpi`, the job's traffic carried by MPI messages (slower here; see docs/BENCHMARKS.md); under `dsmrun` only `tcp`, and any other value is refused; in a program run directly (a job of one rank, which carries no traffic) `tcp` or `mpi` | tcp |
//! | `DSM_MPI_SEND_BUFFER` | with `DSM_TRANSPORT=mpi`: bytes of the buffer attached for the bridge's buffered sends, shared among the job's connections by flow control, 64K to 2047M (suffixes K, M, G, either case) | 64M |
//!
//! Under `mpirun`/`mpiexec`/`srun` (built with the `mpi` feature) the rank and size come from MPI instead of
//! `DSM_RANK`/`DSM_SIZE`, and the token and addresses are exchanged over MPI. The launchers' own variables
//! are read too: `OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `PMIX_RANK` or `MPI_LOCALRANKID` mark a process an MPI
//! launcher started; `OMPI_COMM_WORLD_SIZE` or `PMI_SIZE` is the size the launcher meant (a different size
//! seen by MPI means a program built against another MPI library); `MPI_LOCALNRANKS` or
//! `OMPI_COMM_WORLD_LOCAL_SIZE` tells whether every rank shares this host (for `DSM_BIND`'s default) and
//! how many ranks share it (a MapReduce rank's default thread count is the cores over that number, or over
//! the job's size when neither is set); and `SLURM_STEP_NUM_TASKS` with `SLURM_PROCID` marks a task of
//! `srun` started without PMI, which is refused with the fix. These are the launchers' to set: a value that
//! is not a number is taken as not set (the check it serves is skipped).
//!
//! MapReduce jobs also read `TMPDIR`, through the system's temporary directory, where a rank's map output
//! goes unless the program gives a spill directory (`MapReduce::with_spill_dir`).
//!
//! The project's scripts read three more: `DSM_DEMO_PROCS` (processes of `scripts/demo.sh`, default 2),
//! `DSM_WITH_MPI` (`1`: `scripts/setup.sh` also installs MPICH) and `DSM_FOR_TESTS` (`1`: it installs
//! everything the tests use, MPICH and iproute2, as `scripts/test.sh` asks it to).

use crate::RuntimeError;
use std::str::FromStr;

/// Where settings are read from: this process's environment ([`process`]), or, for a launcher checking
/// them once for all its ranks, the environment the ranks will have.
pub(crate) type Vars<'a> = &'a dyn Fn(&str) -> Result<String, std::env::VarError>;

/// This process's environment.
pub(crate) fn process(name: &str) -> Result<String, std::env::VarError> {
    std::env::var(name)
}

/// Reads `name` from this process's environment, parsing it with `parse`; a malformed value is an error
/// naming the variable and the form.
pub(crate) fn get<T>(
    name: &'static str,
    expected: &'static str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, RuntimeError> {
    get_in(&process, name, expected, parse)
}

/// Reads `name` from `vars`, as [`get`] does from the environment.
pub(crate) fn get_in<T>(
    vars: Vars<'_>,
    name: &'static str,
    expected: &'static str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, RuntimeError> {
    match vars(name) {
        Ok(v) => parse(v.trim()).map(Some).ok_or(RuntimeError::Env {
            var: name,
            value: v,
            expected: expected.into(),
        }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(RuntimeError::Env {
            var: name,
            value: v.to_string_lossy().into_owned(),
            expected: expected.into(),
        }),
    }
}

/// A number.
pub(crate) fn number<T: FromStr>(s: &str) -> Option<T> {
    s.parse().ok()
}

/// `on` or `off`.
pub(crate) fn on_off(s: &str) -> Option<bool> {
    match s {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// A byte size with an optional K, M, G or T suffix (powers of 1024).
pub(crate) fn bytes(s: &str) -> Option<usize> {
    let (digits, shift) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 10),
        'M' | 'm' => (&s[..s.len() - 1], 20),
        'G' | 'g' => (&s[..s.len() - 1], 30),
        'T' | 't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits.parse::<usize>().ok()?.checked_mul(1usize << shift)
}

/// A hexadecimal address, with or without `0x`.
pub(crate) fn hex_addr(s: &str) -> Option<usize> {
    usize::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// A 32-byte token as 64 hex digits.
pub(crate) fn token(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut t = [0u8; 32];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(t)
}

/// Whether `given` is the job's token `job` (both as written in hex), compared in constant time, so
/// that the time to refuse does not tell how much of a guess was right.
pub(crate) fn same_token(given: &str, job: &str) -> bool {
    subtle::ConstantTimeEq::ct_eq(given.as_bytes(), job.as_bytes()).into()
}

/// Formats a token as 64 hex digits.
pub(crate) fn token_hex(t: &[u8; 32]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_tokens_parse_or_refuse() {
        assert_eq!(bytes("4G"), Some(4 << 30));
        assert_eq!(bytes("512"), Some(512));
        assert_eq!(bytes("x"), None);
        assert_eq!(bytes("99999999999T"), None);
        let t = [0xabu8; 32];
        assert_eq!(token(&token_hex(&t)), Some(t));
        assert_eq!(token("abc"), None);
        let hex = token_hex(&t);
        assert!(same_token(&hex, &hex));
        assert!(!same_token(&token_hex(&[0xacu8; 32]), &hex));
        assert!(!same_token(&hex[..63], &hex));
        assert_eq!(hex_addr("0x7f0000000000"), Some(0x7f00_0000_0000));
    }

    #[test]
    fn a_malformed_variable_names_itself() {
        std::env::set_var("DSM_TEST_MALFORMED", "four");
        let e = get("DSM_TEST_MALFORMED", "a number", number::<usize>).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("DSM_TEST_MALFORMED") && msg.contains("four") && msg.contains("a number"),
            "{msg}"
        );
    }
}
