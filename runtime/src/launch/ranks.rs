//! The ranks' processes: how each is set up before its exec, watched, found stopped or exited, and ended
//! with whatever it started (`end_all`, and the `Watchdog` should the launcher die first).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The status of `child` if it has exited, leaving it unreaped: a rank's pid stays taken (a zombie) until
/// `end_all` has signalled its process group, so that the group's id can never be a new process's by then.
pub(super) fn exit_status(child: &Child) -> Option<ExitStatus> {
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

pub(super) fn describe(status: ExitStatus) -> (String, i32) {
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
pub(super) fn in_child_before_exec(cmd: &mut Command, launcher: Pid) {
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
pub(super) fn watch(pid: Pid, exited: std::sync::mpsc::Sender<()>) {
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
pub(super) fn is_stopped(child: &Child) -> bool {
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
pub(super) struct Watchdog {
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
    pub(super) fn start() -> Option<Watchdog> {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", WATCHDOG])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn().ok().map(|shell| Watchdog { shell })
    }

    /// Adds the process group `group` (a rank's, which it leads).
    pub(super) fn watch(&mut self, group: u32) {
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
pub(super) fn end_all(children: &mut [Child]) {
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
