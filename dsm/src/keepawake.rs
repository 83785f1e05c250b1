//! Keeping idle CPUs awake while the rank communicates. A message to a rank whose CPU has gone idle waits
//! for that CPU to wake up, which on a virtual machine (an idle vCPU is halted and must be re-entered by
//! the host) is most of a loopback round trip: on the 2-vCPU VM the project is measured on, a raw TCP round
//! trip between two processes takes about 60-80 us when their vCPUs sleep between messages and about 24 us
//! when they stay awake. So for a short window after each request this rank sends or serves, a thread of
//! its own spins at `SCHED_IDLE`: it runs only on a CPU that nothing else wants (it never takes a CPU from
//! a computing thread, of this process or another), and keeps that CPU from going to sleep. After the
//! window it sleeps until the next request, so a rank that waits for a long time at a barrier uses no CPU
//! for it. (A wait that polls, such as a blocking tuple-space call whose template starts with a formal,
//! which asks every rank every 10 ms, keeps the spinners of the ranks involved spinning about a tenth of
//! the time with a 1 ms window.) Off by default: see `DsmBuilder::keep_awake`.

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
    /// Spinners asleep, or about to be.
    sleepers: AtomicU32,
    /// The futex word sleeping spinners wait on: bumped by a request that finds sleepers, and at `stop`.
    seq: AtomicU32,
    stop: AtomicBool,
    /// The longest a sleeping spinner waits before it looks again ([`NAP`]; longer in a test that must
    /// see a request do the waking).
    nap: Duration,
    /// Rounds of spinning done (for the tests).
    spins: AtomicU64,
}

impl KeepAwake {
    /// Spins for `window` after each request (`Duration::ZERO`: never).
    pub(crate) fn new(window: Duration) -> KeepAwake {
        KeepAwake {
            start: Instant::now(),
            window_ns: AtomicU64::new(window.as_nanos().min(u64::MAX as u128) as u64),
            last: AtomicU64::new(0),
            sleepers: AtomicU32::new(0),
            seq: AtomicU32::new(0),
            stop: AtomicBool::new(false),
            nap: NAP,
            spins: AtomicU64::new(0),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.window_ns.load(Ordering::Relaxed) > 0
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }

    /// How long since the latest request, in nanoseconds.
    fn quiet_ns(&self) -> u64 {
        self.now_ns()
            .saturating_sub(self.last.load(Ordering::SeqCst))
    }

    /// A request was sent or served: the spinner spins for the window from now. Async-signal-safe (the
    /// fault path calls it): a clock read, atomics, and a futex wake only when the spinner sleeps.
    pub(crate) fn touch(&self) {
        if !self.enabled() {
            return;
        }
        self.last.store(self.now_ns(), Ordering::SeqCst);
        // A spinner counts itself a sleeper before it looks at `last` for the last time, and waits only
        // while `seq` is what it read before that: either it sees this request, or this sees it.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.seq.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(&self.seq);
        }
    }

    /// Ends the spinners.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.seq.fetch_add(1, Ordering::SeqCst);
        futex::wake_all(&self.seq);
    }

    /// A spinner, on `cpu`: spins while the latest request is within the window, sleeps otherwise.
    /// Without `SCHED_IDLE` it would take CPUs from computing threads, so it does not run at all then.
    pub(crate) fn run(&self, cpu: usize) {
        if !idle_priority() {
            self.window_ns.store(0, Ordering::Relaxed);
            return;
        }
        pin_to(cpu);
        self.spin_or_sleep();
    }

    /// The spinner's loop, until `stop`.
    fn spin_or_sleep(&self) {
        let window = self.window_ns.load(Ordering::Relaxed);
        while !self.stop.load(Ordering::SeqCst) {
            let quiet = self.quiet_ns();
            if quiet < window {
                for _ in 0..256 {
                    std::hint::spin_loop();
                }
                self.spins.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let seq = self.seq.load(Ordering::SeqCst);
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            let quiet = self.quiet_ns();
            if quiet >= window && !self.stop.load(Ordering::SeqCst) {
                futex::wait_for(&self.seq, seq, self.nap);
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
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

    /// Waits (at most 20 s, polling) until `done` holds.
    fn until(done: impl Fn() -> bool) -> bool {
        let limit = Instant::now() + Duration::from_secs(20);
        while Instant::now() < limit {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn the_spinner_sleeps_when_quiet_spins_after_a_request_and_stops() {
        // The loop itself, at ordinary priority (a SCHED_IDLE thread may get no CPU while other tests
        // run), with a window long enough to be seen.
        let mut a = KeepAwake::new(Duration::from_millis(300));
        a.nap = Duration::from_secs(30);
        let a = a;
        // Stopped however the test ends: a failed assertion must not leave the scope waiting for it.
        struct StopOnDrop<'a>(&'a KeepAwake);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        std::thread::scope(|s| {
            let spinner = s.spawn(|| a.spin_or_sleep());
            let _stop = StopOnDrop(&a);
            // Nothing was sent yet: it goes to sleep, and stays asleep.
            assert!(
                until(|| a.sleepers.load(Ordering::SeqCst) == 1),
                "it never slept"
            );
            let spins = a.spins.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                a.spins.load(Ordering::SeqCst),
                spins,
                "it spun with nothing sent"
            );
            // A request wakes it (its nap here is 30 s: only the request can) and it spins...
            a.touch();
            assert!(
                until(|| a.spins.load(Ordering::SeqCst) > spins),
                "it did not wake"
            );
            // ...then sleeps again once the window has passed.
            assert!(
                until(|| a.sleepers.load(Ordering::SeqCst) == 1),
                "it did not sleep again"
            );
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
