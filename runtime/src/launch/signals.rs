//! The signals that end or stop a job while it runs, taken by the launcher for its ranks (`Interrupts`).

use super::lock;
use super::ranks::is_stopped;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::Child;
use std::sync::{Arc, Mutex};

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
pub(super) struct Interrupts {
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
    pub(super) fn start(wake: std::sync::mpsc::Sender<()>) -> Interrupts {
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
    pub(super) fn started(&self, pid: Pid) {
        let mut groups = lock(&self.groups);
        if groups.stopping {
            let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGSTOP);
        }
        groups.leaders.push(pid);
    }

    /// The ranks are about to be ended (and reaped, after which their process groups' ids may be taken
    /// by other processes): a Ctrl-Z from now on stops only the launcher.
    pub(super) fn forget_groups(&self) {
        lock(&self.groups).leaders.clear();
    }

    /// Whether the rank `child` is stopped (see [`is_stopped`]), and not by a Ctrl-Z being passed on to the
    /// ranks: between the ranks' stop and the launcher's own, and between the launcher going on and the
    /// ranks' `SIGCONT`, every rank is stopped for a moment that says nothing of the rank itself.
    pub(super) fn stopped_alone(&self, child: &Child) -> bool {
        let groups = lock(&self.groups);
        !groups.stopping && is_stopped(child)
    }

    /// The first signal that came, if one did.
    pub(super) fn signal(&self) -> Option<Signal> {
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
}
