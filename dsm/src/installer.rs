//! A second installer for long read-ahead replies: a helper thread that installs pages of a reply while
//! the faulting thread reads the rest of it from the socket.
//!
//! A sequential reader's time goes mostly into `UFFDIO_COPY`: every page it installs is a fresh page that
//! the kernel allocates, charges and fills (1.3-1.6 us per page on this project's VM; the socket read of
//! the same bytes takes about 0.8 us). The copies of different pages are independent: one thread copying
//! into a region ran at 2.5-3.0 GiB/s here, two threads at 5.0-5.7. So a reply of at least
//! [`HELP_MIN_PAGES`] is put on a [`Board`] as its bytes arrive; the faulting thread keeps the socket
//! drained and the helper installs, and each claims the pages that are there when it has nothing else to
//! do. What that gains on two cores is in docs/ARCHITECTURE.md ("Read-ahead replies are installed as they
//! arrive").
//!
//! The faulting thread runs inside the SIGBUS handler, so nothing here allocates, takes a lock or touches
//! registered memory: the hand-off is atomics and futexes. The helper is started with the rank, sleeps on
//! a futex while there is nothing to help with, and serves one reply at a time; a fault that finds it busy
//! (or switched off, `Dsm::set_install_helper`) installs alone.

use crate::region::{RegionShared, Steps};
use crate::stats::Counters;
use crate::types::PAGE_SIZE;
use crate::uffd::futex;
use nix::errno::Errno;
use std::os::fd::RawFd;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

/// Replies of at least this many pages are worth waking the helper for: waking a thread on another vCPU
/// takes about 40 us here, and 256 pages take 350-450 us to install.
pub(crate) const HELP_MIN_PAGES: u64 = 256;

/// The most pages one claim takes, so that the two installers share a reply evenly and the first pages
/// go in while the rest is still arriving.
const CLAIM_PAGES: u64 = 64;

/// A reply being installed: where its pages go, how many have arrived, how many are claimed. Written by the
/// thread that reads the reply, claimed from by it and (when posted) by the helper.
#[derive(Debug, Default)]
pub(crate) struct Board {
    region: AtomicPtr<RegionShared>,
    source: AtomicPtr<u8>,
    /// Bytes from one page's source to the next one's.
    source_step: AtomicUsize,
    first: AtomicU64,
    /// How the reply's pages follow each other from `first`: `Steps` in the words of `Steps::words`.
    steps: [AtomicU64; 3],
    writable: AtomicBool,
    /// The userfaultfd of the rank the pages go to, for a direct install into another rank (`direct.rs`);
    /// -1: this rank's own.
    target: AtomicI32,
    /// Whole pages that have arrived.
    arrived: AtomicU64,
    /// Pages claimed for installing.
    claimed: AtomicU64,
    /// Pages of the reply in all; once the reply is cut short, the pages claimed by then.
    total: AtomicU64,
    /// The first install error (an errno), or 0.
    error: AtomicI32,
    /// Bumped whenever pages arrive: the futex word the helper sleeps on while none are claimable.
    progress: AtomicU32,
    sleeping: AtomicBool,
}

/// What a claim found.
enum Claim {
    /// Pages `from..from + count` of the reply are this installer's to install.
    Pages { from: u64, count: u64 },
    /// Nothing claimable yet: more of the reply is still on its way.
    Wait,
    /// Every page is claimed (or the reply was cut short): nothing more to do.
    Finished,
}

impl Board {
    /// Sets the board up for `incoming`, none of it arrived yet.
    fn set(&self, incoming: &Incoming<'_>) {
        let region = incoming.region as *const RegionShared as *mut RegionShared;
        self.region.store(region, Ordering::Relaxed);
        self.source
            .store(incoming.source as *mut u8, Ordering::Relaxed);
        self.source_step
            .store(incoming.source_step, Ordering::Relaxed);
        self.first.store(incoming.first, Ordering::Relaxed);
        for (word, value) in self.steps.iter().zip(incoming.steps.words()) {
            word.store(value, Ordering::Relaxed);
        }
        self.writable.store(incoming.writable, Ordering::Relaxed);
        self.target
            .store(incoming.target.unwrap_or(-1), Ordering::Relaxed);
        self.arrived.store(0, Ordering::SeqCst);
        self.claimed.store(0, Ordering::SeqCst);
        self.total.store(incoming.pages, Ordering::SeqCst);
        self.error.store(0, Ordering::Relaxed);
    }

    /// Records that the first `pages` pages are in the buffer, and wakes the helper if it waits for them.
    fn arrive(&self, pages: u64) {
        if pages == self.arrived.load(Ordering::SeqCst) {
            return;
        }
        self.arrived.store(pages, Ordering::SeqCst);
        self.progress.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            futex::wake_all(&self.progress);
        }
    }

    /// Takes up to `CLAIM_PAGES` of the pages that have arrived and nobody has claimed.
    fn claim(&self) -> Claim {
        loop {
            match self.peek() {
                Claim::Pages { from, count } => {
                    if self
                        .claimed
                        .compare_exchange(from, from + count, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        return Claim::Pages { from, count };
                    }
                }
                other => return other,
            }
        }
    }

    /// What a claim would find now, without claiming.
    fn peek(&self) -> Claim {
        let from = self.claimed.load(Ordering::SeqCst);
        let arrived = self.arrived.load(Ordering::SeqCst);
        if from >= self.total.load(Ordering::SeqCst) {
            Claim::Finished
        } else if from >= arrived {
            Claim::Wait
        } else {
            Claim::Pages {
                from,
                count: (arrived - from).min(CLAIM_PAGES),
            }
        }
    }

    /// Installs pages `from..from + count` of the reply, recording the first error; `by_helper` counts them
    /// in the statistics as the helper's.
    ///
    /// # Safety
    /// The board was `set` for a reply that is still being installed: its region is alive, and the claimed
    /// pages have arrived in the source buffer (and are not written while the reply lasts).
    unsafe fn install(&self, from: u64, count: u64, by_helper: bool) {
        // SAFETY: the caller guarantees the region outlives the reply.
        let region = unsafe { &*self.region.load(Ordering::Relaxed) };
        let steps = Steps::from_words(self.steps.each_ref().map(|w| w.load(Ordering::Relaxed)));
        let first = self.first.load(Ordering::Relaxed);
        let writable = self.writable.load(Ordering::Relaxed);
        let source = self.source.load(Ordering::Relaxed);
        let step = self.source_step.load(Ordering::Relaxed);
        let target = self.target.load(Ordering::Relaxed);
        let fd = if target < 0 { region.uffd } else { target };
        let put = |k: u64, pages: u64, page: u64| {
            // SAFETY: the source of page `k` of the reply is the page at `source + k * step` (consecutive for
            // `pages` pages when `step` is a page), which has arrived (it is claimed) and which nobody writes
            // while the reply lasts: this function's contract.
            unsafe {
                region.install_through(
                    fd,
                    page,
                    pages,
                    source.wrapping_add(k as usize * step),
                    writable,
                )
            }
        };
        // Pages that follow each other in the region and in the source go in with one copy (a block of a
        // block-cyclic region, every page of a band); pages a stride apart (a cyclic region), or from
        // sources apart, one by one.
        let result = if step == PAGE_SIZE {
            steps
                .groups(first, from, count)
                .try_for_each(|(k, pages, page)| put(k, pages, page))
        } else {
            (from..from + count).try_for_each(|k| put(k, 1, steps.page(first, k)))
        };
        if by_helper && result.is_ok() {
            Counters::add(&region.shared.counters.pages_helper_installed, count);
        }
        if let Err(e) = result {
            let _ = self
                .error
                .compare_exchange(0, e as i32, Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Ends the reply early (the reader failed): nothing more is claimed, and a sleeping helper wakes to
    /// see that. Pages already claimed are installed by their claimers.
    fn cut_short(&self) {
        self.total
            .store(self.claimed.load(Ordering::SeqCst), Ordering::SeqCst);
        // A claim in flight may still move `claimed` past `total`; `peek` then finds the reply finished.
        self.progress.fetch_add(1, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            futex::wake_all(&self.progress);
        }
    }

    fn result(&self) -> Result<(), Errno> {
        match self.error.load(Ordering::SeqCst) {
            0 => Ok(()),
            e => Err(Errno::from_raw(e)),
        }
    }
}

/// The helper thread's side: whether it runs, is free, or is working on a posted reply.
#[derive(Debug)]
pub(crate) struct Installer {
    /// One of the states below; the futex word both sides sleep on for a change of state.
    state: AtomicU32,
    board: Board,
}

/// No helper thread (a job of one rank).
const ABSENT: u32 = 0;
/// The helper sleeps, free for a reply.
const IDLE: u32 = 1;
/// A reader is filling in the board.
const SETUP: u32 = 2;
/// A reply is on the board for the helper to join.
const POSTED: u32 = 3;
/// The helper is installing pages of the posted reply.
const JOINED: u32 = 4;
/// The helper is done with the posted reply and touches it no more.
const LEFT: u32 = 5;
/// Switched off by the program: readers install alone.
const OFF: u32 = 6;
/// The rank is leaving: the helper thread ends.
const STOP: u32 = 7;

impl Default for Installer {
    fn default() -> Self {
        Installer {
            state: AtomicU32::new(ABSENT),
            board: Board::default(),
        }
    }
}

impl Installer {
    /// Readies the board for a helper thread about to start (`run`), switched on or off.
    pub(crate) fn start(&self, on: bool) {
        self.state
            .store(if on { IDLE } else { OFF }, Ordering::SeqCst);
    }

    /// The helper thread's loop, until `stop`.
    pub(crate) fn run(&self) {
        loop {
            match self.state.load(Ordering::SeqCst) {
                STOP => return,
                POSTED => {
                    if self
                        .state
                        .compare_exchange(POSTED, JOINED, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        // A reader waits (in its SIGBUS handler) for this thread to leave: a panic here
                        // would leave it waiting for ever, so it ends the process instead.
                        let helped =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.help()));
                        if helped.is_err() {
                            std::process::abort();
                        }
                        self.state.store(LEFT, Ordering::SeqCst);
                        futex::wake_all(&self.state);
                    }
                }
                s => futex::wait(&self.state, s),
            }
        }
    }

    /// Installs claimed pages of the posted reply until every page is claimed.
    fn help(&self) {
        let board = &self.board;
        loop {
            match board.claim() {
                // SAFETY: the reader that posted the reply waits for this thread to leave (`finish`)
                // before the reply's region or buffer can go away, and claimed pages have arrived.
                Claim::Pages { from, count } => unsafe { board.install(from, count, true) },
                Claim::Finished => return,
                Claim::Wait => {
                    let seen = board.progress.load(Ordering::SeqCst);
                    board.sleeping.store(true, Ordering::SeqCst);
                    // Pages that arrived between the claim and `sleeping` bumped `progress` first, so the
                    // wait returns at once; later ones see `sleeping` and wake this thread.
                    if matches!(board.peek(), Claim::Wait) {
                        futex::wait(&board.progress, seen);
                    }
                    board.sleeping.store(false, Ordering::SeqCst);
                }
            }
        }
    }

    /// Ends the helper thread (the rank is leaving). A reply being installed is finished first: its reader
    /// waits for the helper, and the state goes to STOP only from IDLE, OFF or ABSENT.
    pub(crate) fn stop(&self) {
        loop {
            let s = self.state.load(Ordering::SeqCst);
            if matches!(s, IDLE | OFF | ABSENT)
                && self
                    .state
                    .compare_exchange(s, STOP, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                futex::wake_all(&self.state);
                return;
            }
            if s == STOP {
                return;
            }
            futex::wait(&self.state, s);
        }
    }

    /// Switches the helper on or off for the replies that follow. Returns false when there is no helper
    /// (a job of one rank).
    pub(crate) fn set_enabled(&self, on: bool) -> bool {
        let (from, to) = if on { (OFF, IDLE) } else { (IDLE, OFF) };
        loop {
            match self.state.load(Ordering::SeqCst) {
                ABSENT | STOP => return false,
                s if s == to => return true,
                s if s == from => {
                    if self
                        .state
                        .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        return true;
                    }
                }
                // A reply in progress: wait for its reader to hand the helper back.
                s => futex::wait(&self.state, s),
            }
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !matches!(self.state.load(Ordering::SeqCst), ABSENT | OFF | STOP)
    }
}

/// A reply's pages on their way in: where they arrive and where they go.
pub(crate) struct Incoming<'a> {
    pub(crate) region: &'a RegionShared,
    /// The receive buffer the reply's payload is read into, or for a direct install the first page's bytes.
    pub(crate) source: *const u8,
    /// Bytes from one page's source to the next one's: a page for a receive buffer, more for the pages of a
    /// cyclic region installed from where they are.
    pub(crate) source_step: usize,
    /// The page the first one goes to; the others follow along `steps`.
    pub(crate) first: u64,
    pub(crate) steps: Steps,
    pub(crate) pages: u64,
    pub(crate) writable: bool,
    /// Another rank's userfaultfd when the pages go into that rank (a direct install, `direct.rs`); `None`:
    /// into this rank.
    pub(crate) target: Option<RawFd>,
}

/// Reads the reply `incoming` with `recv_more` and installs its pages, with the helper when the reply is
/// long and the helper free. `recv_more(filled, wait)` reads what has arrived into the buffer after the
/// `filled` bytes there and returns how many are there in all (`None`: none arrived and `wait` was false).
/// Returns once every page is installed and the helper has let go of the reply: the receive error, or the
/// first install error (an errno).
pub(crate) fn receive_and_install<E>(
    installer: &Installer,
    incoming: &Incoming<'_>,
    mut recv_more: impl FnMut(usize, bool) -> Result<Option<usize>, E>,
) -> Result<Result<(), Errno>, E> {
    let own = Board::default();
    let posted = incoming.pages >= HELP_MIN_PAGES
        && installer
            .state
            .compare_exchange(IDLE, SETUP, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
    let board = if posted { &installer.board } else { &own };
    board.set(incoming);
    // Should this thread unwind (it cannot, short of a bug), the helper must still be let go of before the
    // buffer and region it reads from can go away.
    let guard = posted.then(|| Posted(installer));
    if posted {
        let counters = &incoming.region.shared.counters;
        Counters::add(&counters.replies_offered_to_helper, 1);
        installer.state.store(POSTED, Ordering::SeqCst);
        futex::wake_all(&installer.state);
    }
    let len = incoming.pages as usize * PAGE_SIZE;
    let mut filled = 0;
    let received = loop {
        if filled == len {
            break Ok(());
        }
        // Alone, install everything that has arrived, then wait for more. With the helper, keep the socket
        // drained first (a reader that installs while bytes wait stalls the sender, and the helper has
        // pages to install) and install only while nothing has arrived.
        let claim = if posted {
            match recv_more(filled, false) {
                Ok(Some(n)) => {
                    filled = n;
                    board.arrive((filled / PAGE_SIZE) as u64);
                    continue;
                }
                Ok(None) => board.claim(),
                Err(e) => {
                    board.cut_short();
                    break Err(e);
                }
            }
        } else {
            board.claim()
        };
        if let Claim::Pages { from, count } = claim {
            // SAFETY: the board was set just above for this reply, whose region the caller holds; claimed
            // pages have arrived, and `recv_more` writes only past them.
            unsafe { board.install(from, count, false) };
            continue;
        }
        match recv_more(filled, true) {
            Ok(n) => {
                filled = n.unwrap_or(filled);
                board.arrive((filled / PAGE_SIZE) as u64);
            }
            Err(e) => {
                board.cut_short();
                break Err(e);
            }
        }
    };
    // What is left once the whole reply is in (nothing after a receive error).
    while let Claim::Pages { from, count } = board.claim() {
        // SAFETY: as above.
        unsafe { board.install(from, count, false) };
    }
    let installed = match guard {
        Some(g) => {
            std::mem::forget(g);
            finish(installer)
        }
        None => board.result(),
    };
    received.map(|()| installed)
}

/// Installs `incoming`, whose pages are all in its source buffer already (a direct install into another
/// rank, `direct.rs`), with the helper when the reply is long and the helper free.
pub(crate) fn install_all(installer: &Installer, incoming: &Incoming<'_>) -> Result<(), Errno> {
    let all = incoming.pages as usize * PAGE_SIZE;
    match receive_and_install(installer, incoming, |_, _| {
        Ok::<_, std::convert::Infallible>(Some(all))
    }) {
        Ok(installed) => installed,
        Err(never) => match never {},
    }
}

/// Lets go of the helper if the reader unwinds (see `receive_and_install`).
struct Posted<'a>(&'a Installer);

impl Drop for Posted<'_> {
    fn drop(&mut self) {
        self.0.board.cut_short();
        let _ = finish(self.0);
    }
}

/// Takes the helper back from the reply the caller posted, at once when it never joined, otherwise once it
/// has left (its claimed pages installed, nothing more to claim), and returns the reply's install result
/// (read before the board is free for another reply).
fn finish(installer: &Installer) -> Result<(), Errno> {
    let s = &installer.state;
    // A helper that has not joined yet cannot join after this (back to SETUP, not IDLE: another reader
    // must not take the board before its result is read).
    if s.compare_exchange(POSTED, SETUP, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        loop {
            match s.load(Ordering::SeqCst) {
                LEFT => break,
                v => futex::wait(s, v),
            }
        }
    }
    // The helper never joined or has left: the board is this thread's until IDLE.
    let result = installer.board.result();
    s.store(IDLE, Ordering::SeqCst);
    futex::wake_all(s);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn claims_take_only_pages_that_arrived_and_end_when_the_reply_is_cut_short() {
        let b = Board::default();
        b.total.store(300, Ordering::SeqCst);
        assert!(matches!(b.claim(), Claim::Wait));
        b.arrive(100);
        assert!(matches!(b.claim(), Claim::Pages { from: 0, count: 64 }));
        assert!(matches!(
            b.claim(),
            Claim::Pages {
                from: 64,
                count: 36
            }
        ));
        assert!(matches!(b.claim(), Claim::Wait));
        b.arrive(150);
        b.cut_short();
        // The 50 pages that arrived but nobody claimed are not installed after a failed receive.
        assert!(matches!(b.claim(), Claim::Finished));
        assert!(matches!(b.peek(), Claim::Finished));
    }

    #[test]
    fn a_whole_reply_is_claimed_once() {
        let b = Board::default();
        b.total.store(200, Ordering::SeqCst);
        b.arrive(200);
        let mut claimed = 0;
        while let Claim::Pages { from, count } = b.claim() {
            assert_eq!(from, claimed);
            assert!(count <= CLAIM_PAGES);
            claimed += count;
        }
        assert_eq!(claimed, 200);
        assert!(matches!(b.claim(), Claim::Finished));
    }

    #[test]
    fn the_helper_switches_off_and_on_and_stops() {
        let installer = Arc::new(Installer::default());
        // Before it starts (and in a job of one rank) there is no helper to switch.
        assert!(!installer.enabled());
        assert!(!installer.set_enabled(true));
        installer.start(true);
        let helper = {
            let i = installer.clone();
            std::thread::spawn(move || i.run())
        };
        assert!(installer.enabled());
        assert!(installer.set_enabled(false));
        assert!(!installer.enabled());
        assert!(installer.set_enabled(true));
        assert!(installer.enabled());
        installer.stop();
        helper.join().unwrap();
        assert!(!installer.enabled());
        assert!(!installer.set_enabled(true));
    }
}
