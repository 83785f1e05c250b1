//! The detector of sequential faults behind read-ahead, write-ahead and zero fills: from the pages a
//! run of faults covered, how many pages the next fault may take. A heuristic on atomics, updated
//! from the fault handler without a lock; it decides how far to look, never what a page holds.

use super::Steps;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A detector of sequential faults: the last page covered by a fault, and the window (in pages) that the
/// next fault right after it may cover. With `remember`, it also keeps where the last few runs started and
/// how long they were, and a run that starts where one of them did starts with that one's length: a
/// program that reads the same pages again after every barrier (a neighbour's boundary row, which the
/// barrier invalidated) gets them in one fault instead of a window growing from one page, while a fault
/// anywhere else still starts from one page.
#[derive(Debug)]
pub(crate) struct Sequential {
    pub(crate) last: AtomicU64,
    pub(crate) window: AtomicU32,
    /// How the pages of a run follow each other: the pages one home holds (read-ahead, write-ahead and
    /// the zero fill alike), consecutive, every size-th page, or block after block.
    pub(crate) steps: Steps,
    /// The first page of the current run, and how many faults continued it.
    run_start: AtomicU64,
    run_faults: AtomicU32,
    /// Recent runs: their first pages and lengths (a heuristic: updated without a lock).
    runs: Option<[(AtomicU64, AtomicU32); REMEMBERED_RUNS]>,
    next_slot: AtomicU32,
    /// Runs threads announced before touching them ([`Sequential::announce`]): first page and length packed
    /// as `page << 16 | length` (0: none), each taken by the fault that reaches its page; the oldest is
    /// replaced first.
    announced: [AtomicU64; ANNOUNCED_RUNS],
    next_announced: AtomicU32,
    /// The page after the announced run the current run is in (0: none).
    announced_end: AtomicU64,
}

/// How many announced runs a detector keeps: a copy across several homes of a region placed in blocks
/// announces one run per home to the same detector.
pub(crate) const ANNOUNCED_RUNS: usize = 4;

/// How many runs a remembering detector keeps.
pub(crate) const REMEMBERED_RUNS: usize = 4;

impl Sequential {
    pub(crate) fn new(remember: bool, steps: Steps) -> Sequential {
        Sequential {
            last: AtomicU64::new(u64::MAX),
            window: AtomicU32::new(1),
            steps,
            run_start: AtomicU64::new(u64::MAX),
            run_faults: AtomicU32::new(0),
            runs: remember
                .then(|| std::array::from_fn(|_| (AtomicU64::new(u64::MAX), AtomicU32::new(0)))),
            next_slot: AtomicU32::new(0),
            announced: std::array::from_fn(|_| AtomicU64::new(0)),
            next_announced: AtomicU32::new(0),
            announced_end: AtomicU64::new(0),
        }
    }

    /// The window (pages, `page` included, at most `max`) of a fault at `page`, which it records as the
    /// window of the current run.
    ///
    /// An announced run is taken as it is: no further (pages past it may be another rank's to write first,
    /// and a home that filled them with zeros would have to hand each over again). When its first fault
    /// got only part of it (the home served fewer pages), the fault that continues it takes the rest.
    /// Otherwise a fault right after the last one's pages doubles the window, and one anywhere else starts
    /// a run (see [`Sequential::start_run`]).
    pub(crate) fn window_at(&self, page: u64, max: u32) -> u32 {
        let last = self.last.load(Ordering::Relaxed);
        let announced = self.take_announced(page);
        let continuing = last != u64::MAX && page == self.steps.page(last, 1);
        let end = self.announced_end.load(Ordering::Relaxed);
        let window = if continuing {
            self.continue_run();
            (self.window.load(Ordering::Relaxed) * 2).min(max)
        } else {
            self.start_run(page, last, max)
        };
        let window = if announced > 0 {
            self.announced_end.store(
                self.steps.page(page, u64::from(announced)),
                Ordering::Relaxed,
            );
            announced.min(max)
        } else if continuing && end > page {
            u32::try_from(self.steps.between(page, end))
                .unwrap_or(u32::MAX)
                .min(max)
        } else {
            self.announced_end.store(0, Ordering::Relaxed);
            window
        };
        self.window.store(window, Ordering::Relaxed);
        window
    }

    /// Announces that `pages` pages of `page`'s home from `page` (along its steps: one after another, a
    /// stride apart, or block after block) are about to be touched in order: the fault at `page` covers
    /// them (up to the window's maximum), no fewer and no more, instead of a window that starts from one
    /// page and doubles. The latest [`ANNOUNCED_RUNS`] announcements are kept; they
    /// are hints: one that no fault takes is replaced by later ones, and a fault elsewhere leaves them.
    pub(crate) fn announce(&self, page: u64, pages: u64) {
        if pages > 1 && page < 1 << 47 {
            let slot =
                self.next_announced.fetch_add(1, Ordering::Relaxed) as usize % ANNOUNCED_RUNS;
            self.announced[slot].store(page << 16 | pages.min(0xffff), Ordering::Relaxed);
        }
    }

    /// The length announced for a run from `page`, taken (one fault uses it), or 0.
    pub(crate) fn take_announced(&self, page: u64) -> u32 {
        for slot in &self.announced {
            let a = slot.load(Ordering::Relaxed);
            if a != 0
                && a >> 16 == page
                && slot
                    .compare_exchange(a, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                return (a & 0xffff) as u32;
            }
        }
        0
    }

    /// A fault continues the current run.
    pub(crate) fn continue_run(&self) {
        self.run_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// A fault at `page` starts a new run: records the run that ended (from its start to `last`) and
    /// returns the window to start with, at most `max`.
    ///
    /// Only a run that a later fault continued is recorded with its length: it shows the pages were
    /// read. A run of one fault may have fetched pages ahead that nobody read (read-ahead cannot tell), so
    /// it halves what was recorded for its start instead, and a length once learned decays unless runs
    /// keep confirming it; a length recorded from a run mixed up with another thread's also decays.
    pub(crate) fn start_run(&self, page: u64, last: u64, max: u32) -> u32 {
        let start = self.run_start.swap(page, Ordering::Relaxed);
        let continued = self.run_faults.swap(0, Ordering::Relaxed) > 0;
        let Some(runs) = &self.runs else {
            return 1;
        };
        let slot_of = |start: u64| {
            runs.iter()
                .position(|(s, _)| s.load(Ordering::Relaxed) == start)
        };
        if continued && start != u64::MAX && last != u64::MAX && start <= last {
            let len = u32::try_from(self.steps.between(start, last + 1)).unwrap_or(u32::MAX);
            let slot = slot_of(start).unwrap_or_else(|| {
                self.next_slot.fetch_add(1, Ordering::Relaxed) as usize % REMEMBERED_RUNS
            });
            runs[slot].0.store(start, Ordering::Relaxed);
            runs[slot].1.store(len, Ordering::Relaxed);
        } else if let Some(slot) = slot_of(start) {
            let len = &runs[slot].1;
            len.store(len.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
        }
        slot_of(page).map_or(1, |slot| runs[slot].1.load(Ordering::Relaxed).clamp(1, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Placement;

    #[test]
    fn a_fault_continuing_an_announced_run_takes_its_rest_and_no_more() {
        let d = Sequential::new(false, Steps::ADJACENT);
        d.announce(10, 5);
        assert_eq!(d.window_at(10, 1024), 5);
        // The home served only page 10: the next fault, at 11, takes 11 to 14.
        d.last.store(10, Ordering::Relaxed);
        assert_eq!(d.window_at(11, 1024), 4, "past the announced run");
        // The run served whole, a fault right after it grows the window as usual.
        d.last.store(14, Ordering::Relaxed);
        assert_eq!(d.window_at(15, 1024), 8);
        // A cyclic region's detector counts a home's pages, `stride` apart.
        let d = Sequential::new(false, Steps::strided(3));
        d.announce(6, 4); // pages 6, 9, 12, 15
        assert_eq!(d.window_at(6, 1024), 4);
        d.last.store(9, Ordering::Relaxed);
        assert_eq!(d.window_at(12, 1024), 2);
        // A fault elsewhere starts a run of its own.
        d.announce(30, 10);
        assert_eq!(d.window_at(30, 1024), 10);
        d.last.store(30, Ordering::Relaxed);
        assert_eq!(d.window_at(100, 1024), 1);
    }

    #[test]
    fn a_block_cyclic_detector_goes_on_from_a_block_to_its_homes_next() {
        // Blocks of 4 pages over 2 ranks: one home's pages are 0-3, 8-11, 16-19...
        let d = Sequential::new(false, Steps::of(Placement::BlockCyclic(4), 2));
        assert_eq!(d.window_at(0, 1024), 1);
        d.last.store(0, Ordering::Relaxed);
        assert_eq!(d.window_at(1, 1024), 2);
        d.last.store(2, Ordering::Relaxed);
        assert_eq!(d.window_at(3, 1024), 4);
        // The block's last page served, the run goes on at the next block, not at the other home's.
        d.last.store(3, Ordering::Relaxed);
        assert_eq!(d.window_at(8, 1024), 8);
        d.last.store(11, Ordering::Relaxed);
        assert_eq!(d.window_at(16, 1024), 16);
        d.last.store(19, Ordering::Relaxed);
        assert_eq!(
            d.window_at(12, 1024),
            1,
            "the other home's block starts a run"
        );
        // Without blocks, the page after 3 is 4.
        let plain = Sequential::new(false, Steps::ADJACENT);
        plain.last.store(3, Ordering::Relaxed);
        assert_eq!(plain.window_at(8, 1024), 1);

        // A run announced from page 1 to page 17: the home's pages 1-3, 8-11 and 16-17, 9 in all. A
        // fault that got fewer (the home served only part) leaves the next one the rest, and none goes
        // past the run.
        let d = Sequential::new(false, Steps::of(Placement::BlockCyclic(4), 2));
        let between: Vec<u64> = [(1, 18), (8, 18), (16, 18), (3, 8), (3, 9), (0, 4), (5, 4)]
            .map(|(p, end)| d.steps.between(p, end))
            .into();
        assert_eq!(between, [9, 6, 2, 1, 2, 4, 0]);
        let advanced: Vec<u64> = [(1, 0), (1, 2), (1, 3), (1, 9), (3, 1), (8, 8)]
            .map(|(p, k)| d.steps.page(p, k))
            .into();
        assert_eq!(advanced, [1, 3, 8, 18, 8, 24]);
        d.announce(1, d.steps.between(1, 18));
        assert_eq!(d.window_at(1, 1024), 9);
        d.last.store(3, Ordering::Relaxed);
        assert_eq!(d.window_at(8, 1024), 6);
        d.last.store(11, Ordering::Relaxed);
        assert_eq!(d.window_at(16, 1024), 2, "the announced run's end");
    }

    #[test]
    fn an_announced_run_is_taken_once_by_the_fault_at_its_first_page() {
        let d = Sequential::new(true, Steps::ADJACENT);
        assert_eq!(d.take_announced(7), 0);
        // One page is no run: nothing to announce.
        d.announce(7, 1);
        assert_eq!(d.take_announced(7), 0);
        d.announce(7, 40);
        assert_eq!(d.take_announced(8), 0, "a fault elsewhere leaves it");
        assert_eq!(d.take_announced(7), 40);
        assert_eq!(d.take_announced(7), 0, "taken once");
        // The latest few are kept (a copy across several homes of a block-placed region announces one run
        // per home here), and a length past what fits is cut (windows are far shorter).
        d.announce(3, 5);
        for k in 0..ANNOUNCED_RUNS as u64 {
            d.announce(100 + 10 * k, 2 + k);
        }
        assert_eq!(d.take_announced(3), 0, "the oldest was replaced");
        for k in (0..ANNOUNCED_RUNS as u64).rev() {
            assert_eq!(u64::from(d.take_announced(100 + 10 * k)), 2 + k);
        }
        d.announce(0, 1 << 20);
        assert_eq!(d.take_announced(0), 0xffff);
    }

    #[test]
    fn a_remembering_detector_starts_a_run_again_with_its_length_and_others_with_one_page() {
        let d = Sequential::new(true, Steps::ADJACENT);
        // Starts a run at `page` after one that covered up to `last`; `more` faults continue the new one.
        let run = |page: u64, last: u64, more: u32| {
            let w = d.start_run(page, last, 1024);
            for _ in 0..more {
                d.continue_run();
            }
            w
        };
        // A run over pages 100..=106 (faults at 100, 101 and 103, the last covering 103..=106).
        assert_eq!(run(100, u64::MAX, 2), 1);
        // Random faults elsewhere start with one page, whatever came before.
        assert_eq!(run(5000, 106, 0), 1);
        assert_eq!(run(9000, 5000, 0), 1);
        // The run at 100 again: its length at once.
        assert_eq!(run(100, 9000, 0), 7);
        // That run was one fault (its pages ahead may not have been read): the length halves each time
        // a run at 100 is not continued, and is learned again when one is.
        assert_eq!(run(100, 106, 0), 3);
        assert_eq!(run(100, 102, 0), 1);
        assert_eq!(run(100, 100, 1), 1);
        assert_eq!(run(100, 109, 0), 10);
        // A length once learned does not renew itself: a pass over 1024 pages from 0, then only page
        // 0 read in every phase, fetches fewer pages ahead each time.
        assert_eq!(run(0, 109, 5), 1);
        let mut windows = Vec::new();
        let mut last = 1023;
        for _ in 0..12 {
            let w = run(0, last, 0);
            windows.push(w);
            last = u64::from(w) - 1;
        }
        assert_eq!(windows, [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1, 1]);
        // Only a few runs are kept: after many others, the run at 100 is forgotten.
        let mut last = 0;
        for k in 0..REMEMBERED_RUNS as u64 {
            let start = 20_000 + 100 * k;
            assert_eq!(run(start, last, 1), 1);
            last = start + 1;
        }
        assert_eq!(run(100, last, 0), 1);

        let plain = Sequential::new(false, Steps::ADJACENT);
        plain.start_run(100, u64::MAX, 1024);
        plain.continue_run();
        assert_eq!(plain.start_run(100, 106, 1024), 1);
    }
}
