//! A rank's service loop when a thread of its transport runs it (`ServiceLoop`), and the scheduling of
//! the loop's own thread (`ServicePriority`).

use super::*;
use crate::types::Rank;
use std::sync::atomic::Ordering;

/// A rank's service loop run by a thread of its transport ([`Mesh::host`](crate::transport::Mesh::host))
/// instead of a thread of its own: the host calls [`ServiceLoop::poll`] whenever its doorbell rings, and
/// now and then without (heartbeats go out at least once a second), until the rank stops; then it drops
/// the loop, which ends its connections. The loop runs at the host thread's priority
/// (`DsmBuilder::service_priority` does not apply).
#[derive(Debug)]
pub struct ServiceLoop {
    engine: Engine,
    /// The doorbell's count when the loop last looked at its connections.
    looked: u32,
    /// Dropped with the loop: the rank's shutdown waits for that.
    _running: std::sync::mpsc::Sender<()>,
}

/// What one [`ServiceLoop::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Nothing had arrived.
    Idle,
    /// It served what had arrived (replies may be waiting to go out).
    Served,
    /// The rank has stopped: drop the loop.
    Stopped,
}

impl ServiceLoop {
    pub(crate) fn new(engine: Engine, running: std::sync::mpsc::Sender<()>) -> ServiceLoop {
        ServiceLoop {
            looked: engine.doorbell.seen().wrapping_sub(1),
            engine,
            _running: running,
        }
    }

    /// Serves what has arrived on the loop's connections and what this rank's threads woke it for, and
    /// sends heartbeats when they are due. Never waits.
    pub fn poll(&mut self) -> Polled {
        crate::fault::mark_serving();
        let e = &mut self.engine;
        if e.ending {
            return Polled::Idle;
        }
        let mut polled = Polled::Idle;
        let seen = e.doorbell.seen();
        if seen != self.looked {
            self.looked = seen;
            if e.shared.woken.swap(false, Ordering::AcqRel) {
                if e.shared.stop.load(Ordering::Acquire) {
                    return Polled::Stopped;
                }
                e.woken();
            }
            e.read_memory();
            e.shared.awake.touch();
            polled = Polled::Served;
        }
        if e.shared.stop.load(Ordering::Acquire) {
            return Polled::Stopped;
        }
        e.keep_time();
        polled
    }
}

/// How the service loop's thread is scheduled relative to the application's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServicePriority {
    /// Real-time `SCHED_FIFO` priority 1 when permitted (root or `CAP_SYS_NICE`), else nice -10 when
    /// permitted, else normal. The loop only runs short bursts and never spins, so a real-time priority lets
    /// it answer at once even when every core is busy computing, instead of after a scheduler slice.
    #[default]
    Favoured,
    /// Nice -10 when permitted: favoured within the normal scheduler, which keeps its wake-up placement.
    Nice,
    /// The same scheduling as the application's threads.
    Normal,
}

pub(super) fn favour_this_thread(me: Rank, how: ServicePriority) {
    if how == ServicePriority::Normal {
        return;
    }
    let param = libc::sched_param { sched_priority: 1 };
    if how == ServicePriority::Nice {
        // SAFETY: setpriority on the calling thread (PRIO_PROCESS with who = 0 names the calling thread).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
        return;
    }
    // SAFETY: sched_setscheduler(0, ...) changes only the calling thread's policy; `param` is a valid
    // sched_param that lives across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return;
    }
    // SAFETY: setpriority on the calling thread (who = 0 with PRIO_PROCESS names the calling thread on Linux).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } == 0 {
        return;
    }
    tracing::debug!("{me}: the service loop runs at normal priority (no permission to raise it)");
}
