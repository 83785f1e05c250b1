//! The words a fault and the service loop take turns on: a page's local state word (its BUSY bit, with
//! threads sleeping on WAITERS through a futex) and a page's manager lock at its home. Every taker of a
//! page goes through these, so that a page has one resolver at a time on each rank.

use crate::protocol::swmr::{self, Access, Data, Decision};
use crate::region::{
    RegionShared, BUSY, DEFERRED, GRANTED, LOCKED, LOCK_WAITERS, QUEUED, REVOKED, STATE_MASK,
    WAITERS,
};
use crate::types::Rank;
use crate::uffd::futex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Sets the state bits of a page word, keeping BUSY and WAITERS.
pub(crate) fn set_state(word: &AtomicU32, state: u32) {
    let _ = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
        Some((s & !STATE_MASK) | state)
    });
}

/// One step of taking a page's BUSY bit, given the word's value `s` just read: sleeps while another thread
/// holds the bit (returns false: read the word again), or tries to take it (true when taken).
pub(crate) fn claim_step(word: &AtomicU32, s: u32) -> bool {
    if s & BUSY != 0 {
        if s & WAITERS != 0
            || word
                .compare_exchange(s, s | WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            futex::wait(word, s | WAITERS);
        }
        return false;
    }
    word.compare_exchange(s, s | BUSY, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Clears BUSY, wakes the threads that waited for the page, and the service loop if it deferred a request.
pub(crate) fn release_busy(region: &RegionShared, page: u64) {
    let word = region.state(page);
    let prev = word.fetch_and(
        !(BUSY | WAITERS | DEFERRED | GRANTED | REVOKED),
        Ordering::AcqRel,
    );
    if prev & WAITERS != 0 {
        futex::wake_all(word);
    }
    if prev & DEFERRED != 0 {
        region.shared.wake_service();
    }
}

/// Takes the manager lock of a page homed here, sleeping while a transaction holds it.
pub(crate) fn lock_slot(lock: &AtomicU32) {
    loop {
        let s = lock.load(Ordering::Acquire);
        if s & LOCKED == 0 {
            if lock
                .compare_exchange(s, s | LOCKED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        } else if s & LOCK_WAITERS != 0
            || lock
                .compare_exchange(s, s | LOCK_WAITERS, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            futex::wait(lock, s | LOCK_WAITERS);
        }
    }
}

/// Takes a manager lock only if it is free with nothing queued on it, without waiting: for pages taken
/// along with another (read-ahead, write-ahead, zero fills), where a busy page ends the run.
pub(crate) fn try_lock_slot(lock: &AtomicU32) -> bool {
    lock.compare_exchange(0, LOCKED, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Takes the manager lock of page `p`, homed here, at once if it is free and the page has never been
/// touched anywhere; otherwise leaves it as it was (waking the service loop if a request was queued on it
/// meanwhile). For untouched pages a home fills with zeros along with its own first touch of another.
pub(super) fn lock_untouched(region: &RegionShared, p: u64) -> bool {
    let lock = &region.slot(p).lock;
    if !try_lock_slot(lock) {
        return false;
    }
    if region.slot(p).load().owner.is_some() {
        if unlock_slot(lock) {
            region.shared.wake_service();
        }
        return false;
    }
    true
}

/// Makes `owner` the first toucher of page `p` (untouched, its manager lock taken by
/// [`lock_untouched`]), as `swmr::decide` does for any untouched page: it owns zeros.
pub(super) fn give_untouched(region: &RegionShared, p: u64, owner: Rank, access: Access) {
    let slot = region.slot(p);
    let mut entry = slot.load();
    let decided = swmr::decide(&mut entry, region.shared.me, owner, access);
    debug_assert!(matches!(
        decided,
        Decision::Done {
            data: Data::Zero,
            ..
        }
    ));
    slot.store(&entry);
}

/// Releases a manager lock; returns whether the service loop has requests queued on it.
pub(crate) fn unlock_slot(lock: &AtomicU32) -> bool {
    let prev = lock.fetch_and(!(LOCKED | LOCK_WAITERS), Ordering::AcqRel);
    if prev & LOCK_WAITERS != 0 {
        futex::wake_all(lock);
    }
    prev & QUEUED != 0
}
