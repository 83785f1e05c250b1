//! The invariants, checked after every step of a job (listed in `sim.rs`).

use super::*;

impl Sim {
    pub(super) fn check(&self) {
        let live: Vec<usize> = (0..self.ranks).filter(|r| self.alive[*r]).collect();
        for page in 0..self.truth.len() {
            let writers = live
                .iter()
                .filter(|r| matches!(self.copies[**r][page], Copy::Writable(_)))
                .count();
            let holders: Vec<usize> = live
                .iter()
                .copied()
                .filter(|r| self.copies[*r][page] != Copy::Invalid)
                .collect();
            assert!(writers <= 1, "page {page}: {writers} writable copies");
            if writers == 1 {
                assert_eq!(
                    holders.len(),
                    1,
                    "page {page}: a writable copy beside other copies"
                );
            }
            let ended_early = live.iter().any(|r| {
                self.txns[*r]
                    .as_ref()
                    .is_some_and(|t| t.page == page && t.ended_early)
            });
            let mut pruned = self.entries[page];
            let lost = pruned
                .forget_gone(Rank(self.home[page]), |r| !self.alive[r.index()])
                .is_some();
            for r in &holders {
                assert_eq!(
                    self.copies[*r][page].value(),
                    Some(self.truth[page]),
                    "page {page}: rank {r} holds a stale copy"
                );
                // A copy the manager does not know of could never be invalidated. Copies in the middle of an
                // unfinished transaction are covered by the manager's lock instead, or by the grant still
                // under way that the home ended early (it drops the copies it was granted to drop).
                if self.locks[page].is_none()
                    && self.alive[self.home[page] as usize]
                    && !lost
                    && !ended_early
                {
                    assert!(
                        self.entries[page].has_copy(Rank(*r as u32)),
                        "page {page}: rank {r} holds a copy the manager does not record"
                    );
                }
            }
        }
    }
}
