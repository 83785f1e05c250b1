//! Launching a job of local processes, as `dsmrun` does: N ranks with rank, size, rendezvous address and a
//! fresh secret token in their environment, output lines prefixed with the rank, and when one rank fails,
//! the others are ended and its status is returned. No process is left behind: the ranks' process groups
//! are ended with the job, ranks end themselves if the launcher dies (`DSM_LAUNCHER_PID`), and a
//! watchdog (`Watchdog`) ends what they started if the launcher dies without ending it (SIGKILL). The ranks'
//! output is copied by the `output` module.

mod output;

use crate::RuntimeError;
use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use output::{say, Output};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What the launch loop and the rendezvous know of ranks that will never join.
#[derive(Default)]
struct Meeting {
    /// Ranks that exited, as the launch loop saw them, and how.
    exited: Vec<(usize, ExitStatus)>,
    /// The first rank the rendezvous found to have exited before it joined, and how it ended: the job
    /// cannot start, and that rank is the one to name.
    never: Option<(usize, ExitStatus)>,
    /// When each rank joined at the rendezvous (sent its address), by rank.
    joined: Vec<Option<Instant>>,
    /// Ranks that came to the rendezvous: joined, or were told the job cannot start.
    came: Vec<bool>,
    /// Whether every rank joined and the table was sent out.
    met: bool,
}

impl Meeting {
    /// The rank to blame when rank `failed` ended with an exit code (not a signal) at `ended`, having
    /// joined at the rendezvous at least `waited` before, while the others had not all come: the first
    /// rank that has neither joined nor exited (`done`), which the rank gave up waiting for
    /// (`DSM_CONNECT_TIMEOUT`). A rank that ended sooner after joining failed for a reason of its own.
    fn never_came(
        &self,
        failed: (usize, ExitStatus),
        ended: Instant,
        waited: Duration,
        done: &[bool],
    ) -> Option<usize> {
        let (r, status) = failed;
        let joined = self.joined.get(r).copied().flatten();
        let gave_up = !self.met
            && status.code().is_some()
            && joined.is_some_and(|t| ended.saturating_duration_since(t) >= waited);
        gave_up
            .then(|| (0..done.len()).find(|&s| self.joined.get(s) == Some(&None) && !done[s]))
            .flatten()
    }
}

type Exits = Arc<Mutex<Meeting>>;

/// What the launch loop sends the rendezvous to wake it (after noting an exit in `Exits`).
const WAKE: &str = "wake";

/// How long the launcher keeps watching after a rank that failed on its own exits, for the others' exits.
const GRACE: Duration = Duration::from_millis(300);
/// How long it keeps watching after the first failure while only ranks that ended because of another
/// (`EXIT_PEER_FAILED`) have exited, for the rank that failed first.
const CAUSE_GRACE: Duration = Duration::from_secs(2);
/// Under `--keep-going`, how long the launcher waits for the other ranks once rank 0 has ended well, before
/// it ends those still running (stopped, or hung in their own code: the job went on without them).
const KEEP_GOING_GRACE: Duration = Duration::from_secs(10);

/// How long a connection to the rendezvous may take to send its line.
const LINE_WITHIN: Duration = Duration::from_secs(5);

/// The first line `stream` sends (without its newline, at most `max` bytes, invalid UTF-8 replaced), all
/// of it within `within`; an error if none comes in time.
fn read_line_within(
    stream: &std::net::TcpStream,
    within: Duration,
    max: usize,
) -> std::io::Result<String> {
    let deadline = Instant::now() + within;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 512];
    while !bytes.contains(&b'\n') && bytes.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let room = (max - bytes.len()).min(buf.len());
        match (&*stream).read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // A read that waited out its timeout says so as `WouldBlock` here.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// The most connections to the rendezvous whose lines are awaited at once beyond one for each rank; more
/// are refused (told `busy`), so that strangers cannot make the launcher start threads without bound while
/// every rank of the job still has room.
const MAX_READING: usize = 64;

/// A connection to the rendezvous, with its first line (or why none came).
type Arrival = (std::net::TcpStream, SocketAddr, std::io::Result<String>);

/// Accepts connections to the rendezvous and reads their lines side by side, each on a thread of its own
/// (a connection that sends nothing holds up no other), sending each connection with its line on
/// `arrivals`. Ends once `stop` is set, at the next connection.
fn accept_lines(
    name: &str,
    listener: TcpListener,
    ranks: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    arrivals: std::sync::mpsc::Sender<Arrival>,
) {
    let reading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = ranks + MAX_READING;
    while let Ok((stream, from)) = listener.accept() {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if reading.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= most {
            reading.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            say(
                name,
                &format!(
                "refused a rendezvous from {from}: {most} connections are sending theirs already"
            ),
            );
            // Told, so that a rank among them says why it cannot join (not written should the
            // connection take nothing: it is dropped either way).
            let _ = stream.set_nonblocking(true);
            let _ = (&stream).write_all(b"busy\n");
            continue;
        }
        let (count, arrivals) = (reading.clone(), arrivals.clone());
        let read = std::thread::Builder::new()
            .name("dsmrun-rendezvous-line".into())
            .spawn(move || {
                // A rank sends its line at once: a connection that sends nothing, or a byte now and then,
                // must not be waited for long, nor grow without bound.
                let line = read_line_within(&stream, LINE_WITHIN, 512);
                count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                let _ = arrivals.send((stream, from, line));
            });
        if read.is_err() {
            reading.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            say(
                name,
                &format!("refused a rendezvous from {from}: no thread to read it"),
            );
        }
    }
}

/// Serves the rendezvous: collects every rank's address, then sends the full table to each. Ends early
/// once `stop` is set (and a connection wakes it): the job ended before every rank joined. A rank that
/// exits before it joined (noted in `exits`) can never join: the ranks waiting, and any that come later,
/// are told so at once, instead of waiting out their connect timeout.
fn rendezvous(
    name: String,
    listener: TcpListener,
    ranks: usize,
    token: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    exits: Exits,
) {
    let (arrived, arrivals) = std::sync::mpsc::channel::<Arrival>();
    let stop_accepting = stop.clone();
    let accepting = std::thread::Builder::new()
        .name("dsmrun-rendezvous-accept".into())
        .spawn({
            let name = name.clone();
            move || accept_lines(&name, listener, ranks, stop_accepting, arrived)
        });
    if let Err(e) = accepting {
        // The ranks give up waiting (their connect timeout) and the launcher names them.
        say(
            &name,
            &format!("the rendezvous could not start ({e}): the ranks cannot join"),
        );
        return;
    }
    let mut conns: Vec<Option<(std::net::TcpStream, SocketAddr)>> =
        (0..ranks).map(|_| None).collect();
    let mut have = 0;
    let mut never: Option<String> = None;
    while have < ranks {
        // Ends when the acceptor has stopped and no line is still being read.
        let Ok((mut stream, from, line)) = arrivals.recv() else {
            return;
        };
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if never.is_none() {
            let mut meeting = lock(&exits);
            meeting.never = meeting
                .exited
                .iter()
                .find(|(r, _)| conns[*r].is_none())
                .cloned();
            never = (meeting.never.as_ref()).map(|(r, status)| {
                format!(
                    "ended: rank {r} {} before it joined the job",
                    describe(*status).0
                )
            });
            if let Some(why) = &never {
                for (mut s, _) in conns.iter_mut().filter_map(Option::take) {
                    let _ = writeln!(s, "{why}");
                }
            }
        }
        let Ok(line) = line else {
            say(
                &name,
                &format!("rendezvous from {from}: no line received within {LINE_WITHIN:?}"),
            );
            continue;
        };
        if line.trim() == WAKE {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (t, r, a) = (parts.next(), parts.next(), parts.next());
        let rank = r.and_then(|r| r.parse::<usize>().ok());
        let addr = a.and_then(|a| a.parse::<SocketAddr>().ok());
        if let Some(why) = &never {
            if let (Some(t), Some(r)) = (t, rank) {
                if t == token && r < ranks {
                    lock(&exits).came[r] = true;
                }
            }
            let _ = writeln!(stream, "{why}");
            continue;
        }
        match (t, rank, addr) {
            (Some(t), Some(r), Some(addr)) if t == token && r < ranks && conns[r].is_none() => {
                conns[r] = Some((stream, addr));
                let mut meeting = lock(&exits);
                meeting.joined[r] = Some(Instant::now());
                meeting.came[r] = true;
                have += 1;
            }
            _ => {
                say(
                    &name,
                    &format!("refused a rendezvous from {from}: wrong token, rank or address"),
                );
                let _ = (&stream).write_all(b"refused\n");
            }
        }
    }
    lock(&exits).met = true;
    let table: Vec<String> = conns.iter().flatten().map(|(_, a)| a.to_string()).collect();
    let line = table.join(" ") + "\n";
    for (mut s, _) in conns.into_iter().flatten() {
        let _ = s.write_all(line.as_bytes());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ends the rendezvous thread when dropped: sets its `stop` and connects once, to wake its `accept`.
struct EndRendezvous {
    stop: Arc<std::sync::atomic::AtomicBool>,
    at: SocketAddr,
}

impl Drop for EndRendezvous {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = std::net::TcpStream::connect_timeout(&self.at, Duration::from_secs(1));
    }
}

/// The status of `child` if it has exited, leaving it unreaped: a rank's pid stays taken (a zombie) until
/// `end_all` has signalled its process group, so that the group's id can never be a new process's by then.
fn exit_status(child: &Child) -> Option<ExitStatus> {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    use std::os::unix::process::ExitStatusExt;
    let pid = Pid::from_raw(child.id() as i32);
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        return match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::from_raw((code & 0xff) << 8)),
            Ok(WaitStatus::Signaled(_, sig, core)) => Some(ExitStatus::from_raw(
                sig as i32 | if core { 0x80 } else { 0 },
            )),
            Err(nix::errno::Errno::EINTR) => continue,
            // Still running, or no longer there to look at (reaped by the caller): nothing new.
            _ => None,
        };
    }
}

fn describe(status: ExitStatus) -> (String, i32) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (format!("exited with status {c}"), c),
        (None, Some(s)) => {
            let name = Signal::try_from(s)
                .map(|s| s.as_str())
                .unwrap_or("an unknown signal");
            (format!("was killed by {name}"), 128 + s)
        }
        _ => ("ended".into(), 1),
    }
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
    if opts.ranks == 0 || opts.ranks > dsm::protocol::swmr::MAX_RANKS {
        return Err(RuntimeError::RankCount {
            asked: opts.ranks,
            max: dsm::protocol::swmr::MAX_RANKS,
        });
    }
    // Every rank would refuse it: said once, here.
    if let Some(t) = ranks_env(opts, "DSM_TRANSPORT").filter(|t| t.trim() != "tcp") {
        return Err(RuntimeError::Env {
            var: "DSM_TRANSPORT",
            value: t,
            expected: crate::DSMRUN_TRANSPORT,
        });
    }
    // Ranks that go on after a failure, in a job the launcher ends at the first one.
    if !opts.keep_going {
        if let Some(p) = ranks_env(opts, "DSM_ON_PEER_FAILURE").filter(|p| p.trim() == "report") {
            return Err(RuntimeError::Env {
                var: "DSM_ON_PEER_FAILURE",
                value: p,
                expected: "exit: dsmrun ends the job at the first rank that fails; for a job that goes on without it, run dsmrun --keep-going (which sets DSM_ON_PEER_FAILURE=report for every rank)",
            });
        }
    }
    // Settings every rank would refuse: said once, here, instead of by every rank.
    crate::check_rank_settings(&|name| ranks_var(opts, name))?;
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
    // loop below wakes at once instead of polling; so does a signal to the launcher.
    let (exited, exits) = std::sync::mpsc::channel::<()>();
    // Before any thread of the launch starts, so that they all leave these signals to `interrupts`.
    let interrupts = Interrupts::start(exited.clone());
    let ranks = opts.ranks;
    let server_token = token.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_server = stop.clone();
    let exits_seen: Exits = Arc::new(Mutex::new(Meeting {
        joined: vec![None; ranks],
        came: vec![false; ranks],
        ..Meeting::default()
    }));
    let exits_told = exits_seen.clone();
    std::thread::Builder::new()
        .name("dsmrun-rendezvous".into())
        .spawn({
            let name = opts.name.clone();
            move || rendezvous(name, listener, ranks, server_token, stop_server, exits_told)
        })
        .map_err(|e| RuntimeError::Io {
            context: "starting the rendezvous thread".into(),
            error: e,
        })?;
    // However the launch ends, the rendezvous thread ends with it (a program that launches jobs would
    // otherwise keep a thread and a listening port for every job that ended before all its ranks joined).
    let _rendezvous = EndRendezvous { stop, at };

    let mut children: Vec<Child> = Vec::with_capacity(ranks);
    let mut watchdog = Watchdog::start();
    let mut output = Output::new(opts.prefix, opts.capture.clone());
    let pid_namespace = crate::rendezvous::pid_namespace();
    for r in 0..ranks {
        let mut cmd = Command::new(program);
        match &pid_namespace {
            Some(ns) => cmd.env("DSM_LAUNCHER_PIDNS", ns),
            // Not one a launcher around this one set.
            None => cmd.env_remove("DSM_LAUNCHER_PIDNS"),
        };
        cmd.args(args)
            .env("DSM_RANK", r.to_string())
            .env("DSM_SIZE", ranks.to_string())
            .env("DSM_RENDEZVOUS", at.to_string())
            .env("DSM_TOKEN", &token)
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
        let started = cmd.spawn().and_then(|mut child| {
            let out: Option<Box<dyn Read + Send>> = child.stdout.take().map(|s| Box::new(s) as _);
            let err: Option<Box<dyn Read + Send>> = child.stderr.take().map(|s| Box::new(s) as _);
            if let Some(w) = &mut watchdog {
                w.watch(child.id());
            }
            interrupts.started(Pid::from_raw(child.id() as i32));
            children.push(child);
            for (stream, to_stderr) in [(out, false), (err, true)] {
                if let Some(stream) = stream {
                    output.forward(r, stream, to_stderr)?;
                }
            }
            Ok(())
        });
        if let Err(e) = started {
            interrupts.forget_groups();
            end_all(&mut children);
            // The last lines of the ranks already started come out before the launcher's error.
            let _ = output.drain(true, &|| interrupts.signal().is_some());
            let advice = match e.raw_os_error() {
                Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR) => {
                    return Err(RuntimeError::CannotRun {
                        program: program.to_path_buf(),
                        error: e,
                    });
                }
                Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
                    " (the system may allow fewer processes, threads or files: try a smaller -n)"
                }
                _ => "",
            };
            return Err(RuntimeError::Io {
                context: format!(
                    "starting rank {r} of {ranks}: {}{advice}",
                    program.display()
                ),
                error: e,
            });
        }
        if let Some(child) = children.last() {
            watch(Pid::from_raw(child.id() as i32), exited.clone());
        }
    }

    // Watch the ranks. At the first failure, keep watching for a while so that the rank that failed on its
    // own is reported rather than the ranks that ended because of it (they exit with EXIT_PEER_FAILED):
    // briefly once that rank has exited, longer while only ranks that ended because of another have (the
    // one that failed first may have closed its connections well before its process ends: on a loaded
    // machine, more than 300 ms before).
    let mut done = vec![false; ranks];
    let mut failures: Vec<(usize, ExitStatus)> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let mut grace_until: Option<Instant> = None;
    let mut lost = Vec::new();
    // The first rank seen to end well. If ranks then fail, all because a rank went (`EXIT_PEER_FAILED`)
    // and none on its own, it is the one that went: it left without finishing the job
    // (`Runtime::finish`). (Ranks end well only after every rank has come to the final barrier, and then
    // none fails for want of another; which of the ranks' exits is seen first says nothing, the one that
    // went being slower to end than the one it failed.)
    let mut ended_well: Option<(usize, ExitStatus)> = None;
    let started = Instant::now();
    let mut timed_out = false;
    // Under --keep-going: rank 0 ended well (the others then have `KEEP_GOING_GRACE` to end); rank 0 is
    // stopped, every other rank having ended (seen when it last looked, at most once a second), since when.
    let mut root_ended_well = false;
    let mut root_stopped = false;
    let mut root_stopped_since: Option<Instant> = None;
    // Under --keep-going: the first rank seen to exit before it joined, before the job started.
    let mut unmet: Option<usize> = None;
    // Per rank that failed, the rank that never came to the rendezvous, if it gave up waiting for one
    // (`Meeting::never_came`), judged when its exit was seen: what a rank's wait there ended by.
    let mut blame_for: Vec<Option<usize>> = vec![None; ranks];
    let gave_up_after = connect_timeout(opts).mul_f64(0.8);
    let mut looked_stopped = started;
    while done.iter().any(|d| !d) {
        if opts.timeout.is_some_and(|t| started.elapsed() > t) {
            timed_out = true;
            break;
        }
        if interrupts.signal().is_some() {
            break;
        }
        for (r, child) in children.iter_mut().enumerate() {
            if done[r] {
                continue;
            }
            if let Some(status) = exit_status(child) {
                done[r] = true;
                // The rendezvous tells those waiting for this rank if it never joined.
                lock(&exits_seen).exited.push((r, status));
                if let Ok(mut s) = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(1))
                {
                    let _ = writeln!(s, "{WAKE}");
                }
                if status.success() {
                    ended_well.get_or_insert((r, status));
                    if opts.keep_going && r == 0 {
                        root_ended_well = true;
                        grace_until.get_or_insert(Instant::now() + KEEP_GOING_GRACE);
                    }
                } else {
                    failures.push((r, status));
                    if opts.keep_going && r != 0 {
                        let (what, _) = describe(status);
                        let (met, joined) = {
                            let m = lock(&exits_seen);
                            (m.met, m.joined[r].is_some())
                        };
                        match unmet {
                            _ if met => say(
                                &opts.name,
                                &format!("rank {r} {what}; the job goes on (--keep-going)"),
                            ),
                            // The others wait for it at the rendezvous, and are told it will not come.
                            None if !joined => {
                                unmet = Some(r);
                                say(
&opts.name,
&format!(
                                    "rank {r} {what} before it joined the job; the others cannot start"
                                ));
                            }
                            Some(f) => say(
                                &opts.name,
                                &format!(
                                    "rank {r} {what}: the job could not start without rank {f}"
                                ),
                            ),
                            None => say(
                                &opts.name,
                                &format!("rank {r} {what} before the job started"),
                            ),
                        }
                        lost.push((r, what));
                    } else {
                        blame_for[r] = lock(&exits_seen).never_came(
                            (r, status),
                            Instant::now(),
                            gave_up_after,
                            &done,
                        );
                        let since = *first_failure.get_or_insert_with(Instant::now);
                        let cause_seen = failures
                            .iter()
                            .any(|(_, s)| s.code() != Some(dsm::EXIT_PEER_FAILED));
                        grace_until = Some(since + if cause_seen { GRACE } else { CAUSE_GRACE });
                    }
                }
            }
        }
        if grace_until.is_some_and(|g| Instant::now() > g) || done.iter().all(|d| *d) {
            break;
        }
        // A rank 0 left alone and stopped (a debugger's breakpoint, say) is given the same time as the
        // others get once it ends, then taken for the cause.
        if opts.keep_going
            && ranks > 1
            && !done[0]
            && done[1..].iter().all(|d| *d)
            && looked_stopped.elapsed() >= Duration::from_secs(1)
        {
            looked_stopped = Instant::now();
            if !interrupts.stopped_alone(&children[0]) {
                root_stopped_since = None;
            } else if root_stopped_since
                .get_or_insert_with(Instant::now)
                .elapsed()
                >= KEEP_GOING_GRACE
            {
                root_stopped = true;
                break;
            }
        }
        // Until a rank exits, the grace period ends, or at most 50 ms (a bound should a watcher fail).
        let mut wait = Duration::from_millis(50);
        if let Some(g) = grace_until {
            wait = wait.min(g.saturating_duration_since(Instant::now()));
        }
        if let Some(t) = opts.timeout {
            wait = wait.min(t.saturating_sub(started.elapsed()));
        }
        let _ = exits.recv_timeout(wait);
    }
    if opts.keep_going {
        // Only rank 0's status counts; the failures of others were reported as they happened.
        failures.retain(|(r, _)| *r == 0);
        if root_ended_well && !timed_out && interrupts.signal().is_none() {
            // Rank 0 ended well and the grace period passed: the ranks still running are ended below.
            for r in (1..ranks).filter(|&r| !done[r]) {
                let what = format!(
                    "was still running {} s after rank 0 ended (stopped, or hung), and was ended",
                    KEEP_GOING_GRACE.as_secs()
                );
                say(&opts.name, &format!("rank {r} {what}"));
                lost.push((r, what));
            }
        }
    }
    let cause = failures
        .iter()
        .find(|(_, s)| s.code() != Some(dsm::EXIT_PEER_FAILED))
        .copied();
    let root = cause
        .or(ended_well.filter(|_| !failures.is_empty() && !opts.keep_going))
        .or(failures.first().copied());
    // A rank of a one-rank job joins no one (it never meets the others at the rendezvous): its ending
    // failed no rank waiting for it.
    let never = lock(&exits_seen).never.filter(|_| ranks > 1);
    // Judged as each failure was seen (a rank joining after it would make the others meet).
    let never_came = root.and_then(|(r, _)| blame_for[r]);
    let (mut outcome, message) = match (root, interrupts.signal()) {
        (_, None) if root_stopped => {
            let reason = format!(
                "was stopped (SIGSTOP, or a debugger) for {} s after every other rank had ended",
                KEEP_GOING_GRACE.as_secs()
            );
            let message = format!("rank 0 {reason}; ending the job");
            let outcome = Outcome {
                code: 1,
                failed_rank: Some(0),
                reason,
                lost,
                signal: None,
            };
            (outcome, Some(message))
        }
        (None, Some(sig)) => {
            let reason = format!("was interrupted by {}", sig.as_str());
            let message = format!("the launcher {reason}; ending the job");
            let code = 128 + sig as i32;
            let outcome = Outcome {
                code,
                failed_rank: None,
                reason,
                lost,
                signal: Some(sig as i32),
            };
            (outcome, Some(message))
        }
        (None, None) if timed_out => {
            let limit = opts.timeout.unwrap_or_default().as_secs_f64();
            let outcome = Outcome {
                code: 124,
                failed_rank: None,
                reason: format!("ran past its time limit of {limit} s"),
                lost,
                signal: None,
            };
            let message = format!("the job ran past its time limit of {limit} s; ending it");
            (outcome, Some(message))
        }
        (None, None) => {
            let outcome = Outcome {
                code: 0,
                failed_rank: None,
                reason: String::new(),
                lost,
                signal: None,
            };
            (outcome, None)
        }
        (Some(root), _) => {
            // A rank that ended before it joined (even with status 0) failed the ranks that waited for it:
            // it is the one to name, unless the failure to name is of a rank that never waited for it
            // either, and failed on its own.
            let waited = lock(&exits_seen).came.get(root.0).copied().unwrap_or(false);
            let own = root.1.code() != Some(dsm::EXIT_PEER_FAILED);
            let ((r, status), joined) = match never {
                Some(n) if waited || !own => (n, false),
                _ => (root, true),
            };
            let (mut what, code) = describe(status);
            // Every rank that ended did so because of another: one still running (it closes no connection,
            // and the others gave up hearing from it) is the cause, a stopped one first. Only once the job
            // met: before, no rank can have seen another fail, and the status is the rank's own (75 is also
            // sysexits' EX_TEMPFAIL).
            let met = lock(&exits_seen).met;
            let silent = (status.code() == Some(dsm::EXIT_PEER_FAILED) && met)
                .then(|| {
                    let running = || (0..ranks).filter(|&s| !done[s]);
                    running()
                        .find(|&s| is_stopped(&children[s]))
                        .map(|s| (s, true))
                        .or_else(|| running().next().map(|s| (s, false)))
                })
                .flatten();
            let (r, message) = if let Some((s, stopped)) = silent {
                what = if stopped {
                    "was stopped (SIGSTOP, or a debugger) and the others gave up waiting for it (DSM_PEER_TIMEOUT)".into()
                } else {
                    "stopped answering the others while it ran on (hung, frozen, or stuck in the kernel), and they gave up waiting for it (DSM_PEER_TIMEOUT)".into()
                };
                (s, format!("rank {s} {what}; ending the job"))
            } else if let Some(s) = never_came.filter(|_| joined) {
                what = format!(
                    "never joined the job: rank {r} gave up waiting for it at the rendezvous (DSM_CONNECT_TIMEOUT); is it stuck or slow before Runtime::init, or stopped?"
                );
                (s, format!("rank {s} {what}; ending the job"))
            } else if joined && status.success() {
                what += " while the others ran, without leaving the job (Runtime::finish), and they could not go on without it";
                (r, format!("rank {r} {what}; ending the job"))
            } else if joined {
                (r, format!("rank {r} {what}; ending the job"))
            } else {
                what += " before it joined the job";
                (r, format!("rank {r} {what}; the others could not start"))
            };
            let outcome = Outcome {
                // Status 0 is no failure of the rank's own, but the job's.
                code: if code == 0 { 1 } else { code },
                failed_rank: Some(r),
                reason: what,
                lost,
                signal: None,
            };
            (outcome, Some(message))
        }
    };
    interrupts.forget_groups();
    end_all(&mut children);
    // Every group is ended: should the launcher be killed from here on, the watchdog must not kill groups
    // whose ids may since have been taken by others.
    drop(watchdog.take());
    // The ranks' last lines come out before the launcher's own word on the job, unless a signal says not
    // to wait for a reader that takes none.
    let unwritten = output.drain(opts.timeout.is_some(), &|| interrupts.signal().is_some());
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

/// The signals a terminal or a job manager sends to end a job (SIGINT, SIGTERM, SIGHUP, SIGQUIT): while a
/// launch runs they are blocked in its threads and taken by a thread of its own, which records the first
/// and wakes the launcher, which then ends every rank (ranks lead process groups of their own, so the
/// terminal no longer reaches them directly) and returns 128 + the signal. The calling thread's signal
/// mask is restored when the launch ends, and the thread stops.
///
/// The same thread takes SIGTSTP (Ctrl-Z) for the ranks too: it stops every rank's process group, then
/// the launcher, and continues the groups when the launcher is continued (`fg`, `bg`). Without it a
/// Ctrl-Z stopped only the launcher, and the ranks ran on until their output filled its pipes. (A rank's
/// peer timeout does not count the time the whole job was stopped: `Engine::keep_time`.)
struct Interrupts {
    got: Arc<std::sync::atomic::AtomicI32>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    restore: Option<nix::sys::signal::SigSet>,
    /// The process groups of the ranks started and not yet ended (each rank leads its own), to stop and
    /// continue.
    groups: Arc<Mutex<Groups>>,
}

/// The ranks' process groups, and whether they are being stopped.
#[derive(Default)]
struct Groups {
    leaders: Vec<Pid>,
    /// From a SIGTSTP until the ranks are continued, after the launcher's own stop: a rank started then is
    /// stopped as it starts, and a stopped rank 0 is not taken to be stopped by itself.
    stopping: bool,
}

impl Interrupts {
    fn start(wake: std::sync::mpsc::Sender<()>) -> Interrupts {
        use nix::sys::signal::{SigSet, SigmaskHow};
        use nix::sys::signalfd::{SfdFlags, SignalFd};
        let got = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let groups = Arc::new(Mutex::new(Groups::default()));
        let mut set = SigSet::empty();
        // A signal this process ignores stays ignored: `nohup` ignores SIGHUP, and a shell ignores SIGINT
        // in a script's background jobs. Blocked, it would still be taken here (a blocked signal stays
        // pending even when ignored) and end the job.
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGTSTP,
        ] {
            if !ignored(s) {
                set.add(s);
            }
        }
        let mut restore = set.thread_swap_mask(SigmaskHow::SIG_BLOCK).ok();
        let flags = SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC;
        let taken = SignalFd::with_flags(&set, flags).ok().and_then(|fd| {
            let (got, stop, groups) = (got.clone(), stop.clone(), groups.clone());
            std::thread::Builder::new()
                .name("dsmrun-signals".into())
                .stack_size(64 << 10)
                .spawn(move || {
                    use std::os::fd::AsFd;
                    while !stop.load(std::sync::atomic::Ordering::Acquire) {
                        let mut fds = [nix::poll::PollFd::new(
                            fd.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8));
                        if let Ok(Some(info)) = fd.read_signal() {
                            if info.ssi_signo == Signal::SIGTSTP as u32 {
                                suspend(&groups);
                                continue;
                            }
                            got.store(info.ssi_signo as i32, std::sync::atomic::Ordering::Release);
                            let _ = wake.send(());
                            return;
                        }
                    }
                })
                .ok()
        });
        if taken.is_none() {
            // Nothing would take the signals: they are left as they were (a Ctrl-C then ends the launcher
            // at once, and the ranks with it, through their parent-death signal).
            if let Some(old) = restore.take() {
                let _ = old.thread_set_mask();
            }
        }
        Interrupts {
            got,
            stop,
            restore,
            groups,
        }
    }

    /// Rank `pid`, the leader of its process group, has started.
    fn started(&self, pid: Pid) {
        let mut groups = lock(&self.groups);
        if groups.stopping {
            let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGSTOP);
        }
        groups.leaders.push(pid);
    }

    /// The ranks are about to be ended (and reaped, after which their process groups' ids may be taken
    /// by other processes): a Ctrl-Z from now on stops only the launcher.
    fn forget_groups(&self) {
        lock(&self.groups).leaders.clear();
    }

    /// Whether the rank `child` is stopped (see [`is_stopped`]), and not by a Ctrl-Z being passed on to the
    /// ranks: between the ranks' stop and the launcher's own, and between the launcher going on and the
    /// ranks' `SIGCONT`, every rank is stopped for a moment that says nothing of the rank itself.
    fn stopped_alone(&self, child: &Child) -> bool {
        let groups = lock(&self.groups);
        !groups.stopping && is_stopped(child)
    }

    /// The first signal that came, if one did.
    fn signal(&self) -> Option<Signal> {
        match self.got.load(std::sync::atomic::Ordering::Acquire) {
            0 => None,
            s => Signal::try_from(s).ok(),
        }
    }
}

/// Whether this process ignores `sig` (the kernel's mask of ignored signals, `SigIgn` in
/// `/proc/self/status`; not ignored where it cannot be read).
fn ignored(sig: Signal) -> bool {
    let mask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        });
    mask.is_some_and(|m| m >> (sig as u32 - 1) & 1 == 1)
}

/// Stops the ranks' process groups and then this process, as SIGTSTP would have had it not been taken,
/// and continues the groups once this process is continued (those not ended meanwhile).
///
/// Like the kernel with a SIGTSTP it is left to act on, it does nothing when this process's group is
/// orphaned (see [`group_orphaned`]): no shell would continue the job, which would stay stopped for good.
fn suspend(groups: &Mutex<Groups>) {
    if group_orphaned() == Some(true) {
        return;
    }
    {
        let mut groups = lock(groups);
        groups.stopping = true;
        for g in &groups.leaders {
            let _ = kill(Pid::from_raw(-g.as_raw()), Signal::SIGSTOP);
        }
    }
    // The whole launcher stops here (every thread), and goes on when continued. Sent to this thread: it
    // then takes the stop itself before it returns, where one sent to the process (`kill`) may be taken
    // by another thread while this one goes on to continue the ranks at once.
    let _ = nix::sys::signal::raise(Signal::SIGSTOP);
    let mut groups = lock(groups);
    groups.stopping = false;
    for g in &groups.leaders {
        let _ = kill(Pid::from_raw(-g.as_raw()), Signal::SIGCONT);
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(old) = self.restore.take() {
            // A Ctrl-Z that came after the signal thread ended (once an ending signal came) is dropped:
            // let through by the restored mask it would stop the launcher as the job ends. An ending
            // signal still pending is kept, and ends the launcher as it should.
            discard_pending(Signal::SIGTSTP);
            let _ = old.thread_set_mask();
        }
    }
}

/// Takes `sig` off this thread's and this process's pending signals, if it is pending (and blocked).
fn discard_pending(sig: Signal) {
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(sig);
    if let Ok(fd) = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        // One read takes it: a standard signal is pending at most once on each queue.
        while let Ok(Some(_)) = fd.read_signal() {}
    }
}

/// Whether this process's group is orphaned: no member's parent is in another group of the same session
/// (POSIX; a parent that is process 1 does not count, as for the kernel). A shell that started the job
/// is such a parent, and continues it after a Ctrl-Z; an orphaned group has none, and the kernel drops a
/// SIGTSTP sent to it rather than stop it for good. `None` when `/proc` does not tell.
fn group_orphaned() -> Option<bool> {
    let me = stat_ids(std::process::id() as i32)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process that ended while this ran is not a member any more.
        let Some(member) = stat_ids(pid).filter(|m| m.pgrp == me.pgrp) else {
            continue;
        };
        if member.ppid <= 1 {
            continue;
        }
        if let Some(parent) = stat_ids(member.ppid) {
            if parent.pgrp != me.pgrp && parent.session == me.session {
                return Some(false);
            }
        }
    }
    Some(true)
}

/// A process's parent, process group and session, from `/proc/PID/stat`.
struct StatIds {
    ppid: i32,
    pgrp: i32,
    session: i32,
}

fn stat_ids(pid: i32) -> Option<StatIds> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ids(&stat)
}

/// The fields after the command name (which is in parentheses, and may hold spaces and parentheses of
/// its own): state, ppid, pgrp, session.
fn parse_stat_ids(stat: &str) -> Option<StatIds> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(1);
    let mut next = || fields.next()?.parse::<i32>().ok();
    Some(StatIds {
        ppid: next()?,
        pgrp: next()?,
        session: next()?,
    })
}

/// Sets up a rank's process between its fork and its exec:
/// - no signal blocked: the launcher blocks SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGTSTP on the thread that
///   starts the ranks,
///   to take them through a signalfd (`Interrupts`), and a child keeps its parent's mask through exec. A
///   rank that inherited it ignored the SIGTERM that ends a job (it waited out the two seconds before
///   SIGKILL), and its own handlers never ran;
/// - the rank ends with the launcher (SIGKILL when the launcher's thread that started it exits), from its
///   first instruction: `Runtime::init` does the same, but a rank may run long before it calls it, or
///   never. A launcher already gone by then fails the start.
#[allow(unsafe_code)]
fn in_child_before_exec(cmd: &mut Command, launcher: Pid) {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let none = SigSet::empty();
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe functions
    // may be called: it calls sigprocmask, prctl(PR_SET_PDEATHSIG) and getppid, which are, and allocates
    // nothing (its errors are raw OS errors; `none` was made before the fork).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&none), None)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != launcher {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Sends on `exited` once process `pid` (a child of this one) has exited, leaving it to be reaped.
/// (Without a watcher, for want of a thread, the launcher looks at that rank every 50 ms.)
fn watch(pid: Pid, exited: std::sync::mpsc::Sender<()>) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let _ = std::thread::Builder::new()
        .name(format!("dsmrun-watch-{pid}"))
        .stack_size(64 << 10)
        .spawn(move || {
            while let Err(nix::errno::Errno::EINTR) =
                waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
            {}
            let _ = exited.send(());
        });
}

/// Whether a process of the rank's process group (the rank, or the program a wrapper it was started
/// with runs) is stopped, by a signal or a debugger: `T` or `t` in its `/proc/PID/stat`.
fn is_stopped(child: &Child) -> bool {
    let group = child.id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            return false;
        };
        // After the command name, which is in parentheses and may hold anything: the state, the parent's
        // pid, the process group.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().take(3).collect();
        matches!(fields[..], [state, _, pgrp] if (state == "T" || state == "t") && pgrp == group)
    })
}

/// Ends what is left of the ranks' process groups should the launcher die without ending them itself
/// (SIGKILL, the OOM killer, a signal it does not take): the ranks die with it (`PR_SET_PDEATHSIG`), but
/// what they started would live on. A shell of its own, in a process group of its own (a terminal's
/// Ctrl-C does not reach it), reads the groups' ids on a pipe only the launcher can write to; at the
/// pipe's end without the launcher's `done`, it kills each group. (A group whose every process has gone
/// could have had its id taken by a new group in the instant between; a group with a process left
/// cannot.)
struct Watchdog {
    shell: Child,
}

/// The watchdog's script: the groups' ids come one per line, then `done` when the launcher has ended them.
const WATCHDOG: &str = r#"groups=""
while read -r line; do
  case $line in
    done) exit 0 ;;
    *[!0-9]*|"") ;;
    *) groups="$groups $line" ;;
  esac
done
for g in $groups; do kill -s KILL -- "-$g" 2>/dev/null; done
exit 0"#;

impl Watchdog {
    /// `None` when no shell can be started: the launch goes on without one.
    fn start() -> Option<Watchdog> {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", WATCHDOG])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn().ok().map(|shell| Watchdog { shell })
    }

    /// Adds the process group `group` (a rank's, which it leads).
    fn watch(&mut self, group: u32) {
        if let Some(pipe) = &mut self.shell.stdin {
            let _ = writeln!(pipe, "{group}");
        }
    }
}

impl Drop for Watchdog {
    /// The launcher ended the groups itself: the watchdog leaves them be, and is reaped.
    fn drop(&mut self) {
        if let Some(mut pipe) = self.shell.stdin.take() {
            let _ = writeln!(pipe, "done");
        }
        let _ = self.shell.wait();
    }
}

/// Ends every rank still running and whatever the ranks started: SIGTERM to each rank's process group
/// (and SIGCONT, which a stopped process needs to take it), then, once every rank has exited (at most two
/// seconds later), SIGKILL to what is left of the groups, and reaps them.
fn end_all(children: &mut [Child]) {
    // Each rank leads its own process group: signal the group, so that what the rank started ends too.
    let group = |c: &Child| Pid::from_raw(-(c.id() as i32));
    for c in children.iter() {
        let _ = kill(group(c), Signal::SIGTERM);
        let _ = kill(group(c), Signal::SIGCONT);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for c in children.iter() {
        // Not reaped yet (see `exit_status`): until every group has been signalled, no rank's pid is free.
        while exit_status(c).is_none() {
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Whatever is left of each group (a rank that ignored SIGTERM, a process it started) is killed.
    for c in children.iter() {
        let _ = kill(group(c), Signal::SIGKILL);
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ids_are_read_past_a_command_name_with_spaces_and_parentheses() {
        let ids = parse_stat_ids("4242 (a (b) c) S 17 4242 99 34816 4242 4194304 0").unwrap();
        assert_eq!((ids.ppid, ids.pgrp, ids.session), (17, 4242, 99));
        assert!(parse_stat_ids("4242 (cut) S 17").is_none());
        assert!(parse_stat_ids("no parentheses").is_none());
        let me = stat_ids(std::process::id() as i32).unwrap();
        assert_eq!(me.pgrp, nix::unistd::getpgrp().as_raw());
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw());
    }

    /// A listener on loopback and a connection to it from a thread that sends `bytes`, one every
    /// `every`, then stays connected for a second.
    fn trickle(bytes: &'static [u8], every: Duration) -> std::net::TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            for b in bytes {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        listener.accept().unwrap().0
    }

    #[test]
    fn silent_connections_leave_every_rank_room_and_past_that_are_told_busy() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (arrived, arrivals) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        std::thread::spawn(move || accept_lines("dsmrun", listener, 1, stopping, arrived));
        let silent: Vec<_> = (0..MAX_READING)
            .map(|_| std::net::TcpStream::connect(at).unwrap())
            .collect();
        // The job's one rank still gets its line read.
        let mut rank = std::net::TcpStream::connect(at).unwrap();
        rank.write_all(b"a rank's line\n").unwrap();
        let (_, _, line) = arrivals.recv_timeout(Duration::from_secs(3)).unwrap();
        assert_eq!(line.unwrap(), "a rank's line");
        // The rank's reader is done; one more silent connection fills the room, and the next is told.
        let _more = std::net::TcpStream::connect(at).unwrap();
        let mut late = std::net::TcpStream::connect(at).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut told = String::new();
        std::io::Read::read_to_string(&mut late, &mut told).unwrap();
        assert_eq!(told, "busy\n");
        stop.store(true, std::sync::atomic::Ordering::Release);
        drop(std::net::TcpStream::connect(at));
        drop(silent);
    }

    #[test]
    fn a_line_must_come_whole_within_its_time() {
        let s = trickle(b"0 1 127.0.0.1:5\nafter", Duration::ZERO);
        let line = read_line_within(&s, Duration::from_secs(5), 512).unwrap();
        assert_eq!(line, "0 1 127.0.0.1:5");
        // A byte every 50 ms never ends its line within 300 ms, though each read gets a byte in time.
        let s = trickle(
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            Duration::from_millis(50),
        );
        let t = Instant::now();
        let e = read_line_within(&s, Duration::from_millis(300), 512).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        // A connection that sends nothing at all: the read itself waits out the time.
        let s = trickle(b"", Duration::ZERO);
        let e = read_line_within(&s, Duration::from_millis(200), 512).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        // A line without end stops at the limit.
        let s = trickle(&[b'x'; 64], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            read_line_within(&s, Duration::from_secs(5), 16)
                .unwrap()
                .len(),
            16
        );
    }
}
