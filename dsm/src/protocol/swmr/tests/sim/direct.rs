//! A home installing pages straight into a requester (`direct.rs`), where its threads use them before
//! the answer is read (faults are resolved in SIGBUS handlers: only the faulting thread waits for it);
//! and a home whose answer does not reach its requester (the connection reset) taking back what the
//! answer gave, as `engine/pages.rs`'s `serve_acquire` does.

use super::*;

impl Sim {
    /// The home installs the answer's pages (`page` with `value`, and `ahead`) into `rank`'s memory: they
    /// are readable there (writable, for a write) before the answer is read.
    pub(super) fn install_directly(
        &mut self,
        rank: u32,
        page: usize,
        value: u64,
        ahead: &[(usize, u64)],
    ) {
        let r = rank as usize;
        let txn = self.txns[r]
            .as_mut()
            .expect("a direct install into a rank with no fault");
        assert_eq!(txn.page, page, "a direct install of a page not asked for");
        txn.direct = true;
        let kind = match txn.access {
            Access::Read => Copy::ReadOnly,
            Access::Write => Copy::Writable,
        };
        for (q, v) in std::iter::once((page, value)).chain(ahead.iter().copied()) {
            assert_eq!(
                self.copies[r][q],
                Copy::Invalid,
                "page {q} installed over a copy"
            );
            self.copies[r][q] = kind(v);
        }
        self.stats.direct += 1 + ahead.len() as u64;
    }

    /// The ranks alive holding pages a home installed into them directly, the answer not yet installed.
    pub(super) fn installed_early(&self) -> Vec<u32> {
        self.faulting()
            .filter(|r| self.txns[*r as usize].as_ref().is_some_and(|t| t.direct))
            .collect()
    }

    /// A thread of `rank` accesses a page installed into it directly before the answer is read (one
    /// other than the faulting thread, which waits for the answer): the faulting page as the fault
    /// asked, or a page read ahead with it.
    pub(super) fn early_access(&mut self, rank: u32) {
        let r = rank as usize;
        let txn = self.txns[r]
            .as_ref()
            .expect("pages installed early into a rank with no fault");
        let (page, access) = (txn.page, txn.access);
        let installed: Vec<usize> = std::iter::once(page)
            .chain(txn.claimed.iter().copied())
            .filter(|q| self.copies[r][*q] != Copy::Invalid)
            .collect();
        let q = installed[self.rng.random_range(0..installed.len())];
        self.stats.early_accesses += 1;
        self.access_locally(rank, q, if q == page { access } else { Access::Read });
    }

    /// Whether `rank` holds `page` only because a home installed it directly, its answer not yet
    /// installed: its state there is still `INVALID | BUSY`.
    pub(super) fn installed_unknown(&self, rank: u32, page: usize) -> bool {
        self.txns[rank as usize]
            .as_ref()
            .is_some_and(|t| t.direct && (t.page == page || t.claimed.contains(&page)))
    }

    /// Whether the home's answer to `requester` is sent. The write may fail (`EPIPE`) or not, as the
    /// kernel has it, once the requester's end of the connection is gone: it crashed, or cut the home
    /// off. The home's own faults send nothing.
    pub(super) fn sent(&mut self, home: u32, requester: u32) -> bool {
        let (h, r) = (home as usize, requester as usize);
        let reset = requester != home && (!self.alive[r] || self.failed[r][h]);
        !(reset && self.rng.random_bool(0.5))
    }

    /// Takes back what a `Done` for a page (`decided`: the page, its entry before the decision, and the
    /// home's copy if the decision dropped it) and the pages handed over `ahead` of it (`ahead_were`:
    /// their entries before) gave a requester it never reached. After a direct install of a read, the
    /// requester may hold the pages whatever became of the answer: they stay recorded as its copies, and
    /// the zeros of an untouched page it was to own become the home's, read-only there. Otherwise every
    /// page's record goes back as it was, and a home copy given up comes back read-only.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take_back(
        &mut self,
        home: u32,
        requester: u32,
        access: Access,
        tried_direct: bool,
        decided: (usize, Entry, Option<u64>),
        ahead: &[(usize, u64)],
        ahead_were: &[Entry],
    ) {
        self.stats.unsent += 1;
        let (h, req) = (home as usize, Rank(requester));
        let (page, before, home_copy) = decided;
        if tried_direct && access == Access::Read {
            self.stats.unsent_held += 1;
            for p in std::iter::once(page).chain(ahead.iter().map(|(q, _)| *q)) {
                let e = &mut self.entries[p];
                if e.owner == Some(req) {
                    self.copies[h][p] = Copy::ReadOnly(0);
                    e.owner = Some(Rank(home));
                    e.copyset = CopySet::EMPTY;
                    e.copyset.insert(req);
                }
            }
            return;
        }
        if let Some(v) = home_copy {
            self.copies[h][page] = Copy::ReadOnly(v);
        }
        self.entries[page] = before;
        for (&(q, v), was) in ahead.iter().zip(ahead_were) {
            // (A read-ahead page stayed with the home, read-only.)
            if access == Access::Write && was.owner == Some(Rank(home)) {
                self.copies[h][q] = Copy::ReadOnly(v);
                self.stats.unsent_written += 1;
            }
            self.entries[q] = *was;
        }
    }
}
