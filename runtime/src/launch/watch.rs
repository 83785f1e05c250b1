//! Watching a job's ranks until it ends, and the verdict on how it ended: which rank to name, why, and
//! the job's status.
//!
//! At the first failure the launcher keeps watching for a while, so that the rank that failed on its own
//! is reported rather than the ranks that ended because of it (they exit with `EXIT_PEER_FAILED`): briefly
//! once that rank has exited, longer while only ranks that ended because of another have (the one that
//! failed first may have closed its connections well before its process ends: on a loaded machine, more
//! than 300 ms before).

use super::meeting::{Exits, WAKE};
use super::output::say;
use super::ranks::{describe, exit_status, is_stopped};
use super::signals::Interrupts;
use super::{connect_timeout, lock, LaunchOptions, Outcome};
use nix::sys::signal::Signal;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, ExitStatus};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

/// How long the launcher keeps watching after a rank that failed on its own exits, for the others' exits.
const GRACE: Duration = Duration::from_millis(300);
/// How long it keeps watching after the first failure while only ranks that ended because of another
/// (`EXIT_PEER_FAILED`) have exited, for the rank that failed first.
const CAUSE_GRACE: Duration = Duration::from_secs(2);
/// Under `--keep-going`, how long the launcher waits for the other ranks once rank 0 has ended well, before
/// it ends those still running (stopped, or hung in their own code: the job went on without them).
pub(super) const KEEP_GOING_GRACE: Duration = Duration::from_secs(10);

/// What the launcher has seen of the ranks since they started.
pub(super) struct Watch<'a> {
    opts: &'a LaunchOptions,
    /// Shared with the rendezvous, which tells the ranks waiting there of one that exited before it joined.
    meeting: &'a Exits,
    /// The rendezvous's address, to wake it at each exit.
    at: SocketAddr,
    started: Instant,
    /// By rank: its exit has been seen.
    done: Vec<bool>,
    failures: Vec<(usize, ExitStatus)>,
    first_failure: Option<Instant>,
    grace_until: Option<Instant>,
    /// Under --keep-going: the ranks that failed while the job went on, and what happened to them.
    lost: Vec<(usize, String)>,
    /// The first rank seen to end well. If ranks then fail, all because a rank went (`EXIT_PEER_FAILED`)
    /// and none on its own, it is the one that went: it left without finishing the job
    /// (`Runtime::finish`). (Ranks end well only after every rank has come to the final barrier, and then
    /// none fails for want of another; which of the ranks' exits is seen first says nothing, the one that
    /// went being slower to end than the one it failed.)
    ended_well: Option<(usize, ExitStatus)>,
    timed_out: bool,
    /// Under --keep-going: rank 0 ended well (the others then have `KEEP_GOING_GRACE` to end).
    root_ended_well: bool,
    /// Under --keep-going: rank 0 is stopped, every other rank having ended (seen when the launcher last
    /// looked, at most once a second), since when; and whether that went on for `KEEP_GOING_GRACE`.
    root_stopped_since: Option<Instant>,
    root_stopped: bool,
    looked_stopped: Instant,
    /// Under --keep-going: the first rank seen to exit before it joined, before the job started.
    unmet: Option<usize>,
    /// Per rank that failed, the rank that never came to the rendezvous, if it gave up waiting for one
    /// (`Meeting::never_came`), judged when its exit was seen: what a rank's wait there ended by.
    blame_for: Vec<Option<usize>>,
    gave_up_after: Duration,
}

impl<'a> Watch<'a> {
    pub(super) fn new(opts: &'a LaunchOptions, meeting: &'a Exits, at: SocketAddr) -> Self {
        let started = Instant::now();
        Watch {
            opts,
            meeting,
            at,
            started,
            done: vec![false; opts.ranks],
            failures: Vec::new(),
            first_failure: None,
            grace_until: None,
            lost: Vec::new(),
            ended_well: None,
            timed_out: false,
            root_ended_well: false,
            root_stopped_since: None,
            root_stopped: false,
            looked_stopped: started,
            unmet: None,
            blame_for: vec![None; opts.ranks],
            gave_up_after: connect_timeout(opts).mul_f64(0.8),
        }
    }

    /// Watches `children` until every one has exited, the grace period after a failure has passed, the
    /// job's time is up, a signal reached the launcher, or (under --keep-going) rank 0 was left stopped.
    /// `exits` wakes it at each exit, and at a signal.
    pub(super) fn run(
        &mut self,
        children: &[Child],
        interrupts: &Interrupts,
        exits: &Receiver<()>,
    ) {
        while self.done.iter().any(|d| !d) {
            if self
                .opts
                .timeout
                .is_some_and(|t| self.started.elapsed() > t)
            {
                self.timed_out = true;
                return;
            }
            if interrupts.signal().is_some() {
                return;
            }
            for (r, child) in children.iter().enumerate() {
                if self.done[r] {
                    continue;
                }
                if let Some(status) = exit_status(child) {
                    self.exited(r, status);
                }
            }
            if self.grace_until.is_some_and(|g| Instant::now() > g) || self.done.iter().all(|d| *d)
            {
                return;
            }
            if self.root_left_stopped(children, interrupts) {
                self.root_stopped = true;
                return;
            }
            // Until a rank exits, the grace period ends, or at most 50 ms (a bound should a watcher fail).
            let mut wait = Duration::from_millis(50);
            if let Some(g) = self.grace_until {
                wait = wait.min(g.saturating_duration_since(Instant::now()));
            }
            if let Some(t) = self.opts.timeout {
                wait = wait.min(t.saturating_sub(self.started.elapsed()));
            }
            let _ = exits.recv_timeout(wait);
        }
    }

    /// Rank `r` was seen to have exited with `status`.
    fn exited(&mut self, r: usize, status: ExitStatus) {
        self.done[r] = true;
        // The rendezvous tells those waiting for this rank if it never joined.
        lock(self.meeting).exited.push((r, status));
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.at, Duration::from_secs(1)) {
            let _ = writeln!(s, "{WAKE}");
        }
        if status.success() {
            self.ended_well.get_or_insert((r, status));
            if self.opts.keep_going && r == 0 {
                self.root_ended_well = true;
                self.grace_until
                    .get_or_insert(Instant::now() + KEEP_GOING_GRACE);
            }
            return;
        }
        self.failures.push((r, status));
        if self.opts.keep_going && r != 0 {
            self.lost_while_going_on(r, status);
            return;
        }
        self.blame_for[r] = lock(self.meeting).never_came(
            (r, status),
            Instant::now(),
            self.gave_up_after,
            &self.done,
        );
        let since = *self.first_failure.get_or_insert_with(Instant::now);
        let cause_seen = self
            .failures
            .iter()
            .any(|(_, s)| s.code() != Some(dsm::EXIT_PEER_FAILED));
        self.grace_until = Some(since + if cause_seen { GRACE } else { CAUSE_GRACE });
    }

    /// Under --keep-going, rank `r` (not rank 0) failed with `status`: said at once, and the job goes on
    /// (or, when `r` never joined, cannot start).
    fn lost_while_going_on(&mut self, r: usize, status: ExitStatus) {
        let name = &self.opts.name;
        let (what, _) = describe(status);
        let (met, joined) = {
            let m = lock(self.meeting);
            (m.met, m.joined[r].is_some())
        };
        match self.unmet {
            _ if met => say(
                name,
                &format!("rank {r} {what}; the job goes on (--keep-going)"),
            ),
            // The others wait for it at the rendezvous, and are told it will not come.
            None if !joined => {
                self.unmet = Some(r);
                say(
                    name,
                    &format!("rank {r} {what} before it joined the job; the others cannot start"),
                );
            }
            Some(f) => say(
                name,
                &format!("rank {r} {what}: the job could not start without rank {f}"),
            ),
            None => say(name, &format!("rank {r} {what} before the job started")),
        }
        self.lost.push((r, what));
    }

    /// Under --keep-going, whether rank 0 has been left alone and stopped (a debugger's breakpoint, say)
    /// for as long as the others get once it ends: it is then taken for the cause.
    fn root_left_stopped(&mut self, children: &[Child], interrupts: &Interrupts) -> bool {
        let alone = self.opts.keep_going
            && self.opts.ranks > 1
            && !self.done[0]
            && self.done[1..].iter().all(|d| *d);
        if !alone || self.looked_stopped.elapsed() < Duration::from_secs(1) {
            return false;
        }
        self.looked_stopped = Instant::now();
        if !interrupts.stopped_alone(&children[0]) {
            self.root_stopped_since = None;
            return false;
        }
        self.root_stopped_since
            .get_or_insert_with(Instant::now)
            .elapsed()
            >= KEEP_GOING_GRACE
    }

    /// How the job ended, and the launcher's line saying so (none for a job that succeeded). `signal`: the
    /// one that reached the launcher, if any.
    pub(super) fn verdict(
        mut self,
        children: &[Child],
        signal: Option<Signal>,
    ) -> (Outcome, Option<String>) {
        let (opts, ranks) = (self.opts, self.opts.ranks);
        if opts.keep_going {
            // Only rank 0's status counts; the failures of others were reported as they happened.
            self.failures.retain(|(r, _)| *r == 0);
            if self.root_ended_well && !self.timed_out && signal.is_none() {
                // Rank 0 ended well and the grace period passed: the ranks still running are ended.
                for r in (1..ranks).filter(|&r| !self.done[r]) {
                    let what = format!(
                        "was still running {} s after rank 0 ended (stopped, or hung), and was ended",
                        KEEP_GOING_GRACE.as_secs()
                    );
                    say(&opts.name, &format!("rank {r} {what}"));
                    self.lost.push((r, what));
                }
            }
        }
        let cause = self
            .failures
            .iter()
            .find(|(_, s)| s.code() != Some(dsm::EXIT_PEER_FAILED))
            .copied();
        let root = cause
            .or(self
                .ended_well
                .filter(|_| !self.failures.is_empty() && !opts.keep_going))
            .or(self.failures.first().copied());
        let lost = std::mem::take(&mut self.lost);
        let ended = move |code: i32, reason: String, signal: Option<Signal>| Outcome {
            code,
            failed_rank: None,
            reason,
            lost,
            signal: signal.map(|s| s as i32),
        };
        match (root, signal) {
            (_, None) if self.root_stopped => {
                let reason = format!(
                    "was stopped (SIGSTOP, or a debugger) for {} s after every other rank had ended",
                    KEEP_GOING_GRACE.as_secs()
                );
                let message = format!("rank 0 {reason}; ending the job");
                let outcome = Outcome {
                    failed_rank: Some(0),
                    ..ended(1, reason, None)
                };
                (outcome, Some(message))
            }
            (None, Some(sig)) => {
                let reason = format!("was interrupted by {}", sig.as_str());
                let message = format!("the launcher {reason}; ending the job");
                (ended(128 + sig as i32, reason, Some(sig)), Some(message))
            }
            (None, None) if self.timed_out => {
                let limit = opts.timeout.unwrap_or_default().as_secs_f64();
                let reason = format!("ran past its time limit of {limit} s");
                let message = format!("the job ran past its time limit of {limit} s; ending it");
                (ended(124, reason, None), Some(message))
            }
            (None, None) => (ended(0, String::new(), None), None),
            (Some(root), _) => {
                let (r, what, code, message) = self.blame(root, children);
                let outcome = Outcome {
                    // Status 0 is no failure of the rank's own, but the job's.
                    failed_rank: Some(r),
                    ..ended(if code == 0 { 1 } else { code }, what, None)
                };
                (outcome, Some(message))
            }
        }
    }

    /// The rank to name for a job whose first failure to report is `root`, what happened to it, its
    /// status, and the launcher's line.
    fn blame(&self, root: (usize, ExitStatus), children: &[Child]) -> (usize, String, i32, String) {
        let ranks = self.opts.ranks;
        let (never, waited, met) = {
            let m = lock(self.meeting);
            (m.never, m.came.get(root.0).copied().unwrap_or(false), m.met)
        };
        // A rank of a one-rank job joins no one (it never meets the others at the rendezvous): its ending
        // failed no rank waiting for it.
        let never = never.filter(|_| ranks > 1);
        // Judged as each failure was seen (a rank joining after it would make the others meet).
        let never_came = self.blame_for[root.0];
        // A rank that ended before it joined (even with status 0) failed the ranks that waited for it
        // (`waited`: `root` came to the rendezvous): it is the one to name, unless the failure to name is
        // of a rank that never waited for it either, and failed on its own.
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
        let silent = (status.code() == Some(dsm::EXIT_PEER_FAILED) && met)
            .then(|| {
                let running = || (0..ranks).filter(|&s| !self.done[s]);
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
        (r, what, code, message)
    }
}
