//! `dsmrun -n N [--] program [args]`: runs a dsm job of N local processes.
//!
//! | flag | meaning | default |
//! |---|---|---|
//! | `-n`, `--ranks N` | number of ranks | 1 |
//! | `--bind ADDR` | the IP address the rendezvous and the ranks' listeners bind to (also `DSM_BIND`; the flag wins) | 127.0.0.1 |
//! | `--timeout SECS` | ends the job with status 124 once it has run this long (fractions allowed) | none |
//! | `--no-prefix` | the ranks' output as written, without `[rank] ` before each line | prefixed |
//! | `--keep-going` | a failing rank does not end the job; the others get `DSM_ON_PEER_FAILURE=report` and the job's status is rank 0's | off |
//! | `-h`, `--help`; `-V`, `--version` | help; version | |
//!
//! Everything from the program on is the program's, even words that look like these flags. The status is
//! the job's: 0, or that of the rank that failed first (128 + the signal for one killed); 124 for
//! `--timeout`; 127 for a program not found, 126 for one that cannot be run, and 2 for any other launch
//! error, among them a `DSM_*` setting every rank would refuse (the ranks' variables: `dsm_runtime::env`).
#![forbid(unsafe_code)]

use clap::Parser;
use dsm_runtime::launch::{launch, LaunchOptions};
use dsm_runtime::RuntimeError;
use nix::sys::signal::Signal;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;

/// Run a dsm program as a job of N local processes.
#[derive(Debug, Parser)]
#[command(name = "dsmrun", version)]
struct Args {
    /// Number of ranks.
    #[arg(short = 'n', long = "ranks", default_value_t = 1)]
    ranks: usize,
    /// Address for the ranks' listeners, an IP address [default: DSM_BIND if set, or else 127.0.0.1].
    #[arg(long, value_parser = ip_address)]
    bind: Option<IpAddr>,
    /// End the job (status 124) if it runs longer than this many seconds.
    #[arg(long, value_parser = seconds)]
    timeout: Option<std::time::Duration>,
    /// Do not prefix output lines with the rank.
    #[arg(long)]
    no_prefix: bool,
    /// A failing rank does not end the job: the others are told and go on, and the job's status is rank
    /// 0's (for programs that survive losing a worker, such as a task farm).
    #[arg(long)]
    keep_going: bool,
    /// The program to run and its arguments: everything from the program on is the program's, even words
    /// that look like dsmrun's own options (`dsmrun -n 2 prog --timeout 5 -h` passes both to `prog`).
    #[arg(
        value_name = "PROGRAM [ARGS]",
        required = true,
        trailing_var_arg = true
    )]
    command: Vec<OsString>,
}

/// An IP address for `--bind`.
fn ip_address(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| "not an IP address; give one such as 127.0.0.1".to_string())
}

/// A number of seconds, fractions allowed: finite, at least a millisecond, at most a year.
fn seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.001..=31_536_000.0).contains(&secs) {
        return Err(format!("{s} seconds: use 0.001 to 31536000 (a year)"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn main() {
    let a = Args::parse();
    // Clap requires the program; its absence is still an error here, not a panic.
    let Some((program, args)) = a.command.split_first() else {
        eprintln!("dsmrun: no program to run: give one, as in `dsmrun -n 2 ./my-program`");
        std::process::exit(2);
    };
    let bind = match a.bind.map_or_else(LaunchOptions::bind_from_env, Ok) {
        Ok(bind) => bind,
        Err(e) => {
            eprintln!("dsmrun: {e}; or give --bind");
            std::process::exit(2);
        }
    };
    let program = PathBuf::from(program);
    let opts = LaunchOptions {
        ranks: a.ranks,
        bind,
        prefix: !a.no_prefix,
        env: Vec::new(),
        capture: None,
        timeout: a.timeout,
        keep_going: a.keep_going,
        name: "dsmrun".into(),
    };
    match launch(&opts, &program, args) {
        Ok(outcome) => {
            // The launch has restored the signal mask: a signal left at its default action ends this
            // process now, as the shell expects; one ignored (a job started in the background by a
            // script) does not, and the status says it instead.
            if let Some(sig) = outcome.signal.and_then(|s| Signal::try_from(s).ok()) {
                if sig == Signal::SIGQUIT {
                    // Without a core of the launcher's own, which says nothing about the job.
                    let _ = nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_CORE,
                        0,
                        0,
                    );
                }
                let _ = nix::sys::signal::raise(sig);
            }
            std::process::exit(outcome.code)
        }
        Err(e) => {
            eprintln!("dsmrun: {e}");
            // As shells say it: 127 for a program not found, 126 for one found but not runnable.
            std::process::exit(match &e {
                RuntimeError::CannotRun { error, .. }
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    127
                }
                RuntimeError::CannotRun { .. } => 126,
                _ => 2,
            });
        }
    }
}
