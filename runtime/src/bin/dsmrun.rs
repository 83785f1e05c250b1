//! `dsmrun -n N [--] program [args]`: runs a dsm job of N local processes.
#![forbid(unsafe_code)]

use clap::Parser;
use dsm_runtime::launch::{launch, LaunchOptions};
use std::ffi::OsString;
use std::path::PathBuf;

/// Run a dsm program as a job of N local processes.
#[derive(Debug, Parser)]
#[command(name = "dsmrun", version, trailing_var_arg = true)]
struct Args {
    /// Number of ranks.
    #[arg(short = 'n', long = "ranks", default_value_t = 1)]
    ranks: usize,
    /// Address for the ranks' listeners (default 127.0.0.1; also DSM_BIND).
    #[arg(long, env = "DSM_BIND", default_value = "127.0.0.1")]
    bind: std::net::IpAddr,
    /// End the job (status 124) if it runs longer than this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Do not prefix output lines with the rank.
    #[arg(long)]
    no_prefix: bool,
    /// A failing rank does not end the job: the others are told and go on, and the job's status is rank
    /// 0's (for programs that survive losing a worker, such as a task farm).
    #[arg(long)]
    keep_going: bool,
    /// The program to run.
    program: PathBuf,
    /// Its arguments.
    #[arg(allow_hyphen_values = true)]
    args: Vec<OsString>,
}

fn main() {
    let a = Args::parse();
    let opts = LaunchOptions {
        ranks: a.ranks,
        bind: a.bind,
        prefix: !a.no_prefix,
        env: Vec::new(),
        capture: None,
        timeout: a.timeout.map(std::time::Duration::from_secs_f64),
        keep_going: a.keep_going,
    };
    match launch(&opts, &a.program, &a.args) {
        Ok(outcome) => std::process::exit(outcome.code),
        Err(e) => {
            eprintln!("dsmrun: {e}");
            std::process::exit(2);
        }
    }
}
