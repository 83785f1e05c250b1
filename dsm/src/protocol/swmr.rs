//! Sequential consistency: single writer / multiple readers, write-invalidate, with a fixed distributed
//! manager (Li and Hudak's Ivy). The home of a page is its manager; it records the owner (the rank whose copy
//! is authoritative) and the copyset (other ranks holding read-only copies) and serializes transactions on
//! the page.
//!
//! This module decides; it never performs I/O or touches memory. `decide` answers a fault request at the
//! manager, `complete` records the end of a transaction the requester ran itself. Everything here is
//! exercised by randomized interleavings of whole jobs, some with ranks that crash (`swmr/tests/`).

use crate::types::Rank;
use serde::{Deserialize, Serialize};

/// The most ranks a job may have: the copyset is a fixed-size bit set so that page metadata stays small.
pub const MAX_RANKS: usize = 256;

/// The kind of access that faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// A load from a page with no copy here.
    Read,
    /// A store to a page with no copy or a read-only copy here.
    Write,
}

/// A set of ranks, as a fixed bit set of `MAX_RANKS` bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySet(pub [u64; MAX_RANKS / 64]);

impl CopySet {
    /// The empty set.
    pub const EMPTY: CopySet = CopySet([0; MAX_RANKS / 64]);

    /// Adds `rank`.
    pub fn insert(&mut self, rank: Rank) {
        self.0[rank.index() / 64] |= 1 << (rank.index() % 64);
    }

    /// Removes `rank`.
    pub fn remove(&mut self, rank: Rank) {
        self.0[rank.index() / 64] &= !(1 << (rank.index() % 64));
    }

    /// Whether `rank` is in the set.
    pub fn contains(&self, rank: Rank) -> bool {
        self.0[rank.index() / 64] & (1 << (rank.index() % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The members, in increasing rank order.
    pub fn iter(&self) -> impl Iterator<Item = Rank> + '_ {
        (0..MAX_RANKS)
            .filter(move |i| self.0[i / 64] & (1 << (i % 64)) != 0)
            .map(|i| Rank(i as u32))
    }
}

/// The manager's record of one page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    /// The rank whose copy is authoritative (read-only or writable there). `None`: the page was never
    /// touched anywhere and its content is zero.
    pub owner: Option<Rank>,
    /// Ranks other than the owner that hold read-only copies.
    pub copyset: CopySet,
}

impl Entry {
    fn has_copy(&self, rank: Rank) -> bool {
        self.owner == Some(rank) || self.copyset.contains(rank)
    }

    /// Forgets the copies of the ranks for which `gone` holds (they left the job, or died, and took their
    /// copies with them), at the page's home `home`. Readers leave the copyset: a writer told to have
    /// their copies dropped would fail. A gone owner is replaced by a rank that still holds a copy, the
    /// home first: with copies elsewhere, the owner's was read-only and the same as theirs, and a fault
    /// sent to fetch it from the gone owner would fail while a good copy lives on. With no copy left,
    /// the gone owner stays, and is returned: its copy was the only one, the page's data left the job
    /// with it, and the fault that asks for the page must fail saying so. Allocates nothing: the fault
    /// path calls it.
    pub fn forget_gone(&mut self, home: Rank, gone: impl Fn(Rank) -> bool) -> Option<Rank> {
        self.forget_readers(&gone);
        let owner = self.owner?;
        if !gone(owner) {
            return None;
        }
        let heir = if self.copyset.contains(home) {
            Some(home)
        } else {
            self.copyset.iter().next()
        };
        match heir {
            Some(heir) => {
                self.copyset.remove(heir);
                self.owner = Some(heir);
                None
            }
            None => Some(owner),
        }
    }

    fn forget_readers(&mut self, gone: impl Fn(Rank) -> bool) {
        for (w, word) in self.copyset.0.iter_mut().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                if gone(Rank(w as u32 * 64 + b)) {
                    *word &= !(1u64 << b);
                }
            }
        }
    }
}

/// What the home does to its own copy of the page before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HomeAction {
    /// Nothing.
    None,
    /// Write-protect the home's copy (a writable copy becomes read-only).
    Downgrade,
    /// Drop the home's copy (after reading it out when the reply carries it).
    Invalidate,
}

/// Where the requester's page content comes from when the manager completes the transaction itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    /// The requester's own copy is valid (an upgrade from read-only to writable).
    None,
    /// The page was never touched: zeros.
    Zero,
    /// The home's copy, carried in the reply.
    Home,
}

/// A transaction that the requester must run itself while the manager holds the page locked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// What the home does to its own copy at grant time.
    pub home_action: HomeAction,
    /// The grant carries the home's copy of the page.
    pub data_from_home: bool,
    /// The remote rank that must send its copy: downgrading to read-only for a read, dropping it for a write.
    pub fetch_from: Option<Rank>,
    /// Remote ranks that must drop their copies (write only). Never contains `fetch_from` or the home.
    pub invalidate: CopySet,
}

/// The manager's answer to a fault request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The manager completed the transaction: the entry is already updated, the requester only installs.
    Done {
        /// What the home does to its own copy before replying.
        home_action: HomeAction,
        /// Where the requester's content comes from.
        data: Data,
    },
    /// The requester runs the transaction and then reports `complete`; the page stays locked until then.
    Grant(Grant),
}

/// Decides a fault request by `requester` for `access` at the page's home `home`.
///
/// A `Done` decision has already updated `entry`; a `Grant` leaves it unchanged until [`complete`].
pub fn decide(entry: &mut Entry, home: Rank, requester: Rank, access: Access) -> Decision {
    let Some(owner) = entry.owner else {
        // Never touched: the requester gets zeros and becomes the owner.
        entry.owner = Some(requester);
        entry.copyset = CopySet::EMPTY;
        return Decision::Done {
            home_action: HomeAction::None,
            data: Data::Zero,
        };
    };
    match access {
        Access::Read => {
            if entry.has_copy(requester) {
                // The requester already holds a copy: nothing moves.
                return Decision::Done {
                    home_action: HomeAction::None,
                    data: Data::None,
                };
            }
            if owner == home {
                entry.copyset.insert(requester);
                Decision::Done {
                    home_action: HomeAction::Downgrade,
                    data: Data::Home,
                }
            } else {
                Decision::Grant(Grant {
                    home_action: HomeAction::None,
                    data_from_home: false,
                    fetch_from: Some(owner),
                    invalidate: CopySet::EMPTY,
                })
            }
        }
        Access::Write => {
            let need_data = !entry.has_copy(requester);
            let mut others = entry.copyset;
            others.insert(owner);
            others.remove(requester);
            let home_holds = others.contains(home);
            let mut remote = others;
            remote.remove(home);
            let home_action = if home_holds {
                HomeAction::Invalidate
            } else {
                HomeAction::None
            };
            if remote.is_empty() {
                entry.owner = Some(requester);
                entry.copyset = CopySet::EMPTY;
                let data = if need_data { Data::Home } else { Data::None };
                return Decision::Done { home_action, data };
            }
            let data_from_home = need_data && owner == home;
            let fetch_from = (need_data && owner != home).then_some(owner);
            if let Some(o) = fetch_from {
                remote.remove(o);
            }
            Decision::Grant(Grant {
                home_action,
                data_from_home,
                fetch_from,
                invalidate: remote,
            })
        }
    }
}

/// Records the end of a granted transaction: the requester holds the page as `access` asked.
pub fn complete(entry: &mut Entry, requester: Rank, access: Access) {
    match access {
        Access::Read => entry.copyset.insert(requester),
        Access::Write => {
            entry.owner = Some(requester);
            entry.copyset = CopySet::EMPTY;
        }
    }
}

/// Takes back a page that a `Done` decision handed to `requester` together with the one decided (a
/// read-ahead or write-ahead page) when the answer never reached it: a read-only copy leaves the copy set,
/// and a page it was to own as its first toucher (zeros) is untouched again. (Such a decision makes the
/// requester owner only of an untouched page; the page decided itself goes back to its entry as it was.)
pub fn withdraw(entry: &mut Entry, requester: Rank) {
    if entry.owner == Some(requester) {
        *entry = Entry::default();
    } else {
        entry.copyset.remove(requester);
    }
}

#[cfg(test)]
mod tests;
