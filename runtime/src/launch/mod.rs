//! Launching a job of local processes, as `dsmrun` does: N ranks with rank, size, rendezvous address and a
//! fresh secret token in their environment, output lines prefixed with the rank, and when one rank fails,
//! the others are ended and its status is returned. No process is left behind: the ranks' process groups
//! are ended with the job, ranks end themselves if the launcher dies (`DSM_LAUNCHER_PID`), and a
//! watchdog (`Watchdog`) ends what they started if the launcher dies without ending it (SIGKILL). The ranks'
//! output is copied by the `output` module.

mod meeting;
mod output;
mod ranks;
mod signals;
mod watch;

use crate::RuntimeError;
use meeting::{rendezvous, EndRendezvous, Exits, Meeting};
use nix::libc;
use nix::unistd::Pid;
use output::{say, Output};
use ranks::{end_all, in_child_before_exec, watch, Watchdog};
use signals::Interrupts;
use std::ffi::OsString;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use watch::Watch;

/// How to launch a job.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// Number of ranks.
    pub ranks: usize,
    /// The address the rendezvous server and the ranks' listeners bind to.
    pub bind: IpAddr,
    /// Prefix every output line with `[rank] `.
    pub prefix: bool,
    /// Extra environment for every rank.
    pub env: Vec<(String, String)>,
    /// Collect the ranks' output (prefixed lines, stdout and stderr together) here instead of printing it.
    pub capture: Option<Arc<Mutex<Vec<u8>>>>,
    /// End the job, with status 124, if it runs longer than this.
    pub timeout: Option<Duration>,
    /// A failing rank does not end the others: they are told (`DSM_ON_PEER_FAILURE=report`, unless `env`
    /// says otherwise), the job runs on, and its status is rank 0's. For programs that survive the loss
    /// of a worker (the task farm).
    pub keep_going: bool,
    /// The name the launcher's own lines start with ("dsmrun: rank 1 was killed by SIGKILL; ending the
    /// job"): that of the program the user ran, which for a program that launches itself (`wordcount
    /// --procs 2`) is not `dsmrun`.
    pub name: String,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// 0 when every rank succeeded; else the status of the rank that failed first (128 + signal for a
    /// signal), preferring a rank that failed on its own over ranks that ended because of it.
    pub code: i32,
    /// The rank whose failure ended the job.
    pub failed_rank: Option<usize>,
    /// What happened to it, as printed.
    pub reason: String,
    /// With `keep_going`: the ranks that failed while the job went on, and what happened to them.
    pub lost: Vec<(usize, String)>,
    /// The signal (SIGINT, SIGTERM, SIGHUP or SIGQUIT) that ended the job by reaching the launcher, if one
    /// did (`code` is then 128 + it). `dsmrun` dies of it itself once the ranks have ended, so that a shell
    /// running it in a loop or a script stops there too, as it would for any program a Ctrl-C ended.
    pub signal: Option<i32>,
}

impl LaunchOptions {
    /// The address `DSM_BIND` names, or 127.0.0.1 when it is not set: what `dsmrun` binds to without
    /// `--bind`, and what a program that launches itself (`wordcount --procs 2`) should give as `bind`, so
    /// that the variable means the same under both.
    pub fn bind_from_env() -> Result<IpAddr, RuntimeError> {
        Ok(crate::env::get(
            "DSM_BIND",
            "an IP address such as 127.0.0.1 (or unset it)",
            |s| s.parse().ok(),
        )?
        .unwrap_or(IpAddr::from([127, 0, 0, 1])))
    }
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            ranks: 1,
            bind: IpAddr::from([127, 0, 0, 1]),
            prefix: true,
            env: Vec::new(),
            capture: None,
            timeout: None,
            keep_going: false,
            name: "dsmrun".into(),
        }
    }
}

pub(crate) fn fresh_token() -> Result<[u8; 32], RuntimeError> {
    let mut t = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut t))
        .map_err(|e| RuntimeError::Io {
            context: "reading /dev/urandom for the job token".into(),
            error: e,
        })?;
    Ok(t)
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The value of `name` the ranks will see: the launch's environment for them, else the launcher's own.
fn ranks_env(opts: &LaunchOptions, name: &str) -> Option<String> {
    ranks_var(opts, name).ok()
}

/// The value of `name` the ranks will see, as `std::env::var` would read it there (not for the variables
/// the launcher sets for each rank, such as `DSM_RANK`: for those, the launcher's own value).
fn ranks_var(opts: &LaunchOptions, name: &str) -> Result<String, std::env::VarError> {
    match opts.env.iter().rev().find(|(k, _)| k == name) {
        Some((_, v)) => Ok(v.clone()),
        None if opts.keep_going && name == "DSM_ON_PEER_FAILURE" => Ok("report".into()),
        None => std::env::var(name),
    }
}

/// The ranks' `DSM_CONNECT_TIMEOUT`, or its default.
fn connect_timeout(opts: &LaunchOptions) -> Duration {
    let secs = ranks_env(opts, "DSM_CONNECT_TIMEOUT").and_then(|v| v.trim().parse::<u64>().ok());
    Duration::from_secs(secs.unwrap_or(crate::DEFAULT_CONNECT_TIMEOUT))
}

/// Runs `program args` as a job of `opts.ranks` local processes and returns how it ended.
pub fn launch(
    opts: &LaunchOptions,
    program: &Path,
    args: &[OsString],
) -> Result<Outcome, RuntimeError> {
    check_options(opts)?;
    let token = crate::env::token_hex(&fresh_token()?);
    let listener = TcpListener::bind((opts.bind, 0)).map_err(|e| RuntimeError::Io {
        context: format!("binding the rendezvous listener on {}", opts.bind),
        error: e,
    })?;
    let at = listener.local_addr().map_err(|e| RuntimeError::Io {
        context: "rendezvous address".into(),
        error: e,
    })?;
    // A watcher per rank says when it has exited (without reaping it: that stays with `children`), so the
    // watch wakes at once instead of polling; so does a signal to the launcher.
    let (exited, exits) = std::sync::mpsc::channel::<()>();
    // Before any thread of the launch starts, so that they all leave these signals to `interrupts`.
    let interrupts = Interrupts::start(exited.clone());
    let meeting: Exits = Arc::new(Mutex::new(Meeting {
        joined: vec![None; opts.ranks],
        came: vec![false; opts.ranks],
        ..Meeting::default()
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::Builder::new()
        .name("dsmrun-rendezvous".into())
        .spawn({
            let (name, ranks) = (opts.name.clone(), opts.ranks);
            let (token, stop, told) = (token.clone(), stop.clone(), meeting.clone());
            move || rendezvous(name, listener, ranks, token, stop, told)
        })
        .map_err(|e| RuntimeError::Io {
            context: "starting the rendezvous thread".into(),
            error: e,
        })?;
    // However the launch ends, the rendezvous thread ends with it (a program that launches jobs would
    // otherwise keep a thread and a listening port for every job that ended before all its ranks joined).
    let _rendezvous = EndRendezvous { stop, at };

    let mut job = Job {
        children: Vec::with_capacity(opts.ranks),
        watchdog: Watchdog::start(),
        output: Output::new(opts.prefix, opts.capture.clone()),
    };
    let pid_namespace = crate::rendezvous::pid_namespace();
    for r in 0..opts.ranks {
        let cmd = rank_command(
            opts,
            (program, args),
            r,
            &token,
            at,
            pid_namespace.as_deref(),
        );
        if let Err(e) = job.start(r, cmd, &interrupts) {
            interrupts.forget_groups();
            end_all(&mut job.children);
            // The last lines of the ranks already started come out before the launcher's error.
            let _ = job.output.drain(true, &|| interrupts.signal().is_some());
            return Err(start_failed(e, r, opts.ranks, program));
        }
        if let Some(child) = job.children.last() {
            watch(Pid::from_raw(child.id() as i32), exited.clone());
        }
    }

    let mut watched = Watch::new(opts, &meeting, at);
    watched.run(&job.children, &interrupts, &exits);
    let (mut outcome, message) = watched.verdict(&job.children, interrupts.signal());
    interrupts.forget_groups();
    end_all(&mut job.children);
    // Every group is ended: should the launcher be killed from here on, the watchdog must not kill groups
    // whose ids may since have been taken by others.
    drop(job.watchdog.take());
    // The ranks' last lines come out before the launcher's own word on the job, unless a signal says not
    // to wait for a reader that takes none.
    let unwritten = job
        .output
        .drain(opts.timeout.is_some(), &|| interrupts.signal().is_some());
    if let Some(m) = message {
        say(&opts.name, &m);
    }
    // A signal that came while the job was being ended is the launcher's end, as the shell expects of it
    // (the job's own outcome has been said).
    if let Some(sig) = interrupts.signal().filter(|_| outcome.signal.is_none()) {
        say(
            &opts.name,
            &format!(
                "the launcher was interrupted by {} while it ended the job",
                sig.as_str()
            ),
        );
        outcome.code = 128 + sig as i32;
        outcome.signal = Some(sig as i32);
    }
    if let Some(u) = unwritten {
        say(&opts.name, &u.what);
        // Output lost fails a job that succeeded otherwise.
        if outcome.code == 0 {
            outcome.code = u.code;
            outcome.reason = u.what;
        }
    }
    // Only now: a second Ctrl-C pending since would otherwise end the launcher before it said why.
    drop(interrupts);
    Ok(outcome)
}

/// Refuses, once and before any rank starts, options and settings that every rank would refuse.
fn check_options(opts: &LaunchOptions) -> Result<(), RuntimeError> {
    if opts.ranks == 0 || opts.ranks > dsm::protocol::swmr::MAX_RANKS {
        return Err(RuntimeError::RankCount {
            asked: opts.ranks,
            max: dsm::protocol::swmr::MAX_RANKS,
        });
    }
    if let Some(t) = ranks_env(opts, "DSM_TRANSPORT").filter(|t| t.trim() != "tcp") {
        return Err(RuntimeError::Env {
            var: "DSM_TRANSPORT",
            value: t,
            expected: crate::DSMRUN_TRANSPORT.into(),
        });
    }
    // Ranks that go on after a failure, in a job the launcher ends at the first one. The launcher is
    // named as the user ran it: dsmrun, or a program that starts its own ranks (`wordcount --procs`).
    if !opts.keep_going {
        if let Some(p) = ranks_env(opts, "DSM_ON_PEER_FAILURE").filter(|p| p.trim() == "report") {
            let name = &opts.name;
            return Err(RuntimeError::Env {
                var: "DSM_ON_PEER_FAILURE",
                value: p,
                expected: format!("exit: {name} ends the job at the first rank that fails; for a job that goes on without it, ask {name} to keep going (dsmrun --keep-going; LaunchOptions::keep_going in a program that starts its own ranks), which sets DSM_ON_PEER_FAILURE=report for every rank").into(),
            });
        }
    }
    crate::check_rank_settings(&|name| ranks_var(opts, name))
}

/// The command that starts rank `r` of the job, `program args`: its environment (rank, size, rendezvous,
/// token, the launcher's PID namespace, and the launch's own `env` last), its output piped to the
/// launcher, and a process group it leads.
fn rank_command(
    opts: &LaunchOptions,
    (program, args): (&Path, &[OsString]),
    r: usize,
    token: &str,
    rendezvous: SocketAddr,
    pid_namespace: Option<&str>,
) -> Command {
    let mut cmd = Command::new(program);
    match pid_namespace {
        Some(ns) => cmd.env("DSM_LAUNCHER_PIDNS", ns),
        // Not one a launcher around this one set.
        None => cmd.env_remove("DSM_LAUNCHER_PIDNS"),
    };
    cmd.args(args)
        .env("DSM_RANK", r.to_string())
        .env("DSM_SIZE", opts.ranks.to_string())
        .env("DSM_RENDEZVOUS", rendezvous.to_string())
        .env("DSM_TOKEN", token)
        .env("DSM_BIND", opts.bind.to_string())
        .env("DSM_LAUNCHER_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Each rank leads a process group of its own, so that ending the job ends whatever the rank started
    // too (a background process that kept the rank's output open would otherwise outlive the job and
    // hold the launcher). The launcher takes the signals a terminal sends and ends the ranks with SIGTERM
    // (see `Interrupts`).
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    in_child_before_exec(&mut cmd, Pid::this());
    if opts.keep_going {
        cmd.env("DSM_ON_PEER_FAILURE", "report");
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    cmd
}

/// The ranks started so far, and what watches over them.
struct Job {
    children: Vec<Child>,
    watchdog: Option<Watchdog>,
    output: Output,
}

impl Job {
    /// Starts rank `r` with `cmd`: the watchdog and `interrupts` learn of its process group, and its output
    /// is copied.
    fn start(
        &mut self,
        r: usize,
        mut cmd: Command,
        interrupts: &Interrupts,
    ) -> std::io::Result<()> {
        let mut child = cmd.spawn()?;
        let out: Option<Box<dyn Read + Send>> = child.stdout.take().map(|s| Box::new(s) as _);
        let err: Option<Box<dyn Read + Send>> = child.stderr.take().map(|s| Box::new(s) as _);
        if let Some(w) = &mut self.watchdog {
            w.watch(child.id());
        }
        interrupts.started(Pid::from_raw(child.id() as i32));
        self.children.push(child);
        for (stream, to_stderr) in [(out, false), (err, true)] {
            if let Some(stream) = stream {
                self.output.forward(r, stream, to_stderr)?;
            }
        }
        Ok(())
    }
}

/// The error of a launch that could not start rank `r` of `ranks`, with advice where the cause is known.
fn start_failed(e: std::io::Error, r: usize, ranks: usize, program: &Path) -> RuntimeError {
    let advice = match e.raw_os_error() {
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR) => {
            return RuntimeError::CannotRun {
                program: program.to_path_buf(),
                error: e,
            };
        }
        Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
            " (the system may allow fewer processes, threads or files: try a smaller -n)"
        }
        _ => "",
    };
    RuntimeError::Io {
        context: format!(
            "starting rank {r} of {ranks}: {}{advice}",
            program.display()
        ),
        error: e,
    }
}
