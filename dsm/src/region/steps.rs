//! The pages one home holds, in the order a sequential reader or writer meets them: consecutive (a region
//! homed at one rank, or placed in blocks), every size-th page (cyclic), or block after block of the home
//! (block-cyclic). Read-ahead, write-ahead and zero fills take a run of a home's pages along these steps,
//! the home serves them in that order, and a reply's pages are installed in groups of adjacent ones.

use super::Placement;

/// How a home's pages follow each other in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Steps {
    /// Pages from one of the home's pages to its next: 1, or the job's size in a cyclic region.
    stride: u64,
    /// Block-cyclic: the pages of a block, and the other homes' pages between two blocks of one home.
    blocks: Option<(u64, u64)>,
}

impl Steps {
    /// Consecutive pages.
    pub(crate) const ADJACENT: Steps = Steps {
        stride: 1,
        blocks: None,
    };

    /// Every `stride`-th page (at least 1).
    pub(crate) fn strided(stride: u64) -> Steps {
        Steps {
            stride: stride.max(1),
            blocks: None,
        }
    }

    /// The steps of a home's pages in a region placed so, in a job of `size` ranks.
    pub(crate) fn of(placement: Placement, size: usize) -> Steps {
        match placement {
            _ if size < 2 => Steps::ADJACENT,
            Placement::Cyclic => Steps::strided(size as u64),
            Placement::BlockCyclic(n) if n > 1 => Steps {
                stride: 1,
                blocks: Some((n, (size as u64 - 1) * n)),
            },
            Placement::BlockCyclic(_) => Steps::strided(size as u64),
            Placement::Block | Placement::At(_) | Placement::FirstTouch => Steps::ADJACENT,
        }
    }

    /// The steps as three words, for a board that threads share without a lock (`installer.rs`).
    pub(crate) fn words(self) -> [u64; 3] {
        let (n, gap) = self.blocks.unwrap_or((0, 0));
        [self.stride, n, gap]
    }

    /// The steps whose [`Steps::words`] these are.
    pub(crate) fn from_words([stride, n, gap]: [u64; 3]) -> Steps {
        Steps {
            stride: stride.max(1),
            blocks: (n > 0).then_some((n, gap)),
        }
    }

    /// Whether each home holds pages of its own apart from the others' (cyclic or block-cyclic), so that
    /// a sequential reader meets the homes in turn.
    pub(crate) fn interleaved(self) -> bool {
        self.stride > 1 || self.blocks.is_some()
    }

    /// The page `k` pages of `first`'s home after it.
    pub(crate) fn page(self, first: u64, k: u64) -> u64 {
        match self.blocks {
            Some((n, gap)) => {
                let within = first % n + k;
                (first - first % n)
                    .saturating_add((within / n).saturating_mul(n + gap))
                    .saturating_add(within % n)
            }
            None => first.saturating_add(k.saturating_mul(self.stride)),
        }
    }

    /// How many pages of `page`'s home lie from `page` up to `end` (not included).
    pub(crate) fn between(self, page: u64, end: u64) -> u64 {
        if end <= page {
            return 0;
        }
        match self.blocks {
            Some((n, gap)) => {
                let start = page - page % n;
                let (periods, rest) = ((end - start) / (n + gap), (end - start) % (n + gap));
                periods * n + rest.min(n) - page % n
            }
            None => (end - page).div_ceil(self.stride),
        }
    }

    /// Pages `from..from + count` of the run from `first`, in groups of pages adjacent in the region:
    /// `(k, pages, page)`, the group's first index in the run, its length and its first page.
    pub(crate) fn groups(
        self,
        first: u64,
        from: u64,
        count: u64,
    ) -> impl Iterator<Item = (u64, u64, u64)> {
        let end = from.saturating_add(count);
        let mut k = from;
        std::iter::from_fn(move || {
            if k >= end {
                return None;
            }
            let page = self.page(first, k);
            let adjacent = match self.blocks {
                Some((n, _)) => n - page % n,
                None if self.stride == 1 => u64::MAX,
                None => 1,
            };
            let pages = adjacent.min(end - k);
            let group = (k, pages, page);
            k += pages;
            Some(group)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Rank;

    #[test]
    fn steps_follow_the_pages_of_one_home() {
        // Every home's pages, walked along its steps from its first, are exactly the pages the placement
        // gives it, in order; `between` counts them and `groups` cuts them where they stop being adjacent.
        let placements = [
            Placement::Cyclic,
            Placement::Block,
            Placement::At(Rank(1)),
            Placement::BlockCyclic(1),
            Placement::BlockCyclic(3),
            Placement::BlockCyclic(16),
        ];
        let pages = 200u64;
        for size in 1..=4usize {
            for placement in placements {
                if placement == Placement::At(Rank(1)) && size < 2 {
                    continue;
                }
                let steps = Steps::of(placement, size);
                for home in (0..size as u32).map(Rank) {
                    let mine: Vec<u64> = (0..pages)
                        .filter(|&p| placement.home(p, pages, size) == home)
                        .collect();
                    let Some(&first) = mine.first() else {
                        continue;
                    };
                    // Within a band (a region placed in blocks, or at one rank), steps go on past it: the
                    // callers stop at a page of another home.
                    let walked: Vec<u64> = (0..mine.len() as u64)
                        .map(|k| steps.page(first, k))
                        .collect();
                    assert_eq!(walked, mine, "{placement:?} at {size} ranks, {home}");
                    for (i, &p) in mine.iter().enumerate() {
                        // A band's steps count on past it, as they walk on.
                        let rest = if steps.interleaved() {
                            mine.len() - i
                        } else {
                            (pages - p) as usize
                        };
                        assert_eq!(steps.between(p, pages), rest as u64, "{placement:?} {p}");
                        assert_eq!(steps.between(p, p + 1), 1);
                        assert_eq!(steps.between(p, p), 0);
                    }
                    let mut grouped = Vec::new();
                    let mut next = 0;
                    for (k, n, page) in steps.groups(first, 0, mine.len() as u64) {
                        assert_eq!(k, next, "groups follow each other");
                        assert!(n >= 1);
                        grouped.extend(page..page + n);
                        next = k + n;
                    }
                    assert_eq!(grouped, mine, "{placement:?} at {size} ranks, {home}");
                }
            }
        }
        // Groups of a run that starts inside a block and ends inside another.
        let steps = Steps::of(Placement::BlockCyclic(4), 2);
        let groups: Vec<_> = steps.groups(1, 1, 6).collect();
        assert_eq!(groups, [(1, 2, 2), (3, 4, 8)]);
    }
}
