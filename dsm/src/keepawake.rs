//! Keeping idle CPUs awake while the rank communicates. A message to a rank whose CPU has gone idle waits
//! for that CPU to wake up, which on a virtual machine (an idle vCPU is halted and must be re-entered by
//! the host) is most of a loopback round trip: on the 2-vCPU VM the project is measured on, a raw TCP round
//! trip between two processes takes about 60-80 us when their vCPUs sleep between messages and about 24 us
//! when they stay awake. So for a short window after each request this rank sends or serves, a thread of
//! its own spins at `SCHED_IDLE`: it runs only on a CPU that nothing else wants (it never takes a CPU from
//! a computing thread, of this process or another), and keeps that CPU from going to sleep. After the
//! window it sleeps until the next request, so a rank that waits for a long time (at a barrier, for a
//! tuple) uses no CPU for it.

use crate::uffd::futex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest a sleeping spinner waits before it looks at the clock again (only a bound: a request wakes
/// it at once).
const NAP: Duration = Duration::from_millis(100);

/// The time of the rank's latest request, and the spinner's sleep.
#[derive(Debug)]
pub(crate) struct KeepAwake {
    start: Instant,
    /// How long after a request the spinner keeps spinning, in nanoseconds; 0: no spinner.
    window_ns: AtomicU64,
    /// When the latest request was sent or served, in nanoseconds since `start`.
    last: AtomicU64,
    /// 1 while the spinner sleeps (a futex word).
    asleep: AtomicU32,
    stop: AtomicBool,
}

impl KeepAwake {
    /// Spins for `window` after each request (`Duration::ZERO`: never).
    pub(crate) fn new(window: Duration) -> KeepAwake {
        KeepAwake {
            start: Instant::now(),
            window_ns: AtomicU64::new(window.as_nanos().min(u64::MAX as u128) as u64),
            last: AtomicU64::new(0),
            asleep: AtomicU32::new(0),
            stop: AtomicBool::new(false),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.window_ns.load(Ordering::Relaxed) > 0
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }

    /// A request was sent or served: the spinner spins for the window from now. Async-signal-safe (the
    /// fault path calls it): a clock read, atomics, and a futex wake only when the spinner sleeps.
    pub(crate) fn touch(&self) {
        if !self.enabled() {
            return;
        }
        self.last.store(self.now_ns(), Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) == 1 && self.asleep.swap(0, Ordering::SeqCst) == 1 {
            futex::wake_all(&self.asleep);
        }
    }

    /// Ends the spinner.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.asleep.store(0, Ordering::SeqCst);
        futex::wake_all(&self.asleep);
    }

    /// A spinner, on `cpu`: spins while the latest request is within the window, sleeps otherwise.
    /// Without `SCHED_IDLE` it would take CPUs from computing threads, so it does not run at all then.
    pub(crate) fn run(&self, cpu: usize) {
        if !idle_priority() {
            self.window_ns.store(0, Ordering::Relaxed);
            return;
        }
        pin_to(cpu);
        let window = self.window_ns.load(Ordering::Relaxed);
        while !self.stop.load(Ordering::Acquire) {
            let quiet = self
                .now_ns()
                .saturating_sub(self.last.load(Ordering::SeqCst));
            if quiet < window {
                for _ in 0..256 {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Asleep first, then one more look at the clock: a request that came in between either is
            // seen here or finds the flag set and wakes this thread.
            self.asleep.store(1, Ordering::SeqCst);
            let quiet = self
                .now_ns()
                .saturating_sub(self.last.load(Ordering::SeqCst));
            if quiet >= window && !self.stop.load(Ordering::Acquire) {
                futex::wait_for(&self.asleep, 1, NAP);
            }
            self.asleep.store(0, Ordering::SeqCst);
        }
    }
}

/// Moves the calling thread to `SCHED_IDLE`, below every ordinary thread (any user may lower a thread's
/// priority). Whether it worked.
fn idle_priority() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(0, ...) changes only the calling thread's policy; `param` is a valid
    // sched_param that lives across the call.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

/// The CPUs this process may run on (CPU 0 alone if the system does not say).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size into it,
    // and CPU_ISSET reads inside it for indices below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu` (best effort: unpinned, a spinner still keeps some CPU awake).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it for `cpu` below
    // CPU_SETSIZE (checked); sched_setaffinity(0, ...) changes only the calling thread's mask.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (at most 20 s, polling) until the spinner's sleep flag reads `want`.
    fn until_asleep_is(a: &KeepAwake, want: u32) -> bool {
        let limit = Instant::now() + Duration::from_secs(20);
        while Instant::now() < limit {
            if a.asleep.load(Ordering::SeqCst) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn the_spinner_sleeps_when_quiet_wakes_at_a_request_and_stops() {
        let a = KeepAwake::new(Duration::from_millis(5));
        std::thread::scope(|s| {
            let spinner = s.spawn(|| a.run(allowed_cpus()[0]));
            // Nothing was sent yet: it goes to sleep.
            assert!(until_asleep_is(&a, 1), "the spinner never slept");
            // A request wakes it (the flag is cleared by the request itself), and it sleeps again once
            // the window has passed.
            a.touch();
            assert_eq!(a.asleep.load(Ordering::SeqCst), 0);
            assert!(until_asleep_is(&a, 1), "the spinner did not sleep again");
            a.stop();
            spinner.join().unwrap();
        });
        // Off: a request costs nothing and starts nothing.
        let off = KeepAwake::new(Duration::ZERO);
        off.touch();
        assert!(!off.enabled());
        assert_eq!(off.last.load(Ordering::SeqCst), 0);
    }
}
