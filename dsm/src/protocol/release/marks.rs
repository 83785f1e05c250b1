//! What a rank writes, as the engine records it: marks in each page's state word (`crate::region`), because
//! the fault handler must not wait for the rank's `RcRank` (a release holds it while it waits for homes).
//! `RcRank` learns the pages only when an interval closes, from the rank's written lists.
//!
//! - `WRITTEN`: written in the open interval; the page is on its region's written list once.
//! - `TWINNED`: a twin whose diff has not reached the page's home.
//! - `SHARED`, at the home: another rank has fetched the page, so the home's own writes to it are tracked.
//!   Until then the home writes in place unseen: no other copy exists to go stale.
//! - `DIFFED`, at the home: listed, with a twin of the page without the home's own writes of the open
//!   interval: made by the home's first write to a page other ranks hold (`AtWrite::home_twin`), or by a
//!   diff that made the page writable here (see `at_diff`); later diffs go to the twin too.
//! - `AHEAD`: listed (and twinned) ahead of a write (`ahead`), and no write of the page seen since: no
//!   write fault has marked it and no diff of it that carried writes has gone to its home
//!   (`cleared_at_diff`). Unchanged at a release, it is left out of the notice (`announced_at_release`).
//!   Its twin may be gone (a selective release or an acquire's flush found it unchanged) while it stays
//!   listed. A page brought up to date at a barrier by other ranks' diffs (`updated`) is marked the same
//!   way.
//! - `PARTIAL`: homed elsewhere, and some of the open interval's writes to it already went to its home
//!   (`partial_after_flush`): the release's diff lacks them, so it is not sent as an update.
//!
//! A selective release of a range sends its pages' diffs as a release does, but closes no interval; a
//! selective acquire of a range drops its pages as an acquire drops the pages notices name.
//!
//! These rules are the whole of how the marks change. The fault handler, a release, an acquire and a home's
//! service loop follow them (`fault/release.rs`, `rc/`, `engine/pages.rs`), and so does the randomized whole-job
//! test beside this file, on its model of each rank's memory.

use crate::region::{
    AHEAD, DIFFED, INVALID, PARTIAL, READ_ONLY, READ_WRITE, SHARED, STATE_MASK, TWINNED, WRITTEN,
};

/// Whether a write to the page is recorded: always, unless the page is homed here and no other rank has
/// fetched it.
pub(crate) fn tracked(state: u32, homed_here: bool) -> bool {
    !homed_here || state & SHARED != 0
}

/// What a recorded write to a page that is not writable does, besides marking it `WRITTEN` and making it
/// writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AtWrite {
    /// Put the page on the written list: its first write in the interval.
    pub(crate) list: bool,
    /// Copy the page to a twin (and mark it `TWINNED`): homed elsewhere and without a twin. A page whose
    /// twin was flushed at an acquire, and which is written again in the same interval, gets a new one.
    pub(crate) twin: bool,
    /// Homed here (and tracked: another rank holds a copy), first written in the interval: copy the page
    /// to a twin and mark it `DIFFED`, so that the home's release can tell, and send, its own writes
    /// apart from the diffs applied here (which go to the twin too: `AtDiff::Both`).
    pub(crate) home_twin: bool,
}

/// The marks a write fault sets and clears: `WRITTEN` on, `AHEAD` off (the page is written).
pub(crate) fn marked_at_write(state: u32) -> u32 {
    (state | WRITTEN) & !AHEAD
}

/// The marks a page homed elsewhere gets when its home has performed an atomic operation on one of its
/// words for this rank (`rc::atomic`), after this rank's copy is dropped: a write of the open interval
/// (`marked_at_write`, so not `AHEAD` any more: the notice must name it) whose diff is at the home already
/// (`PARTIAL`: the release's diff, if the page is written again, lacks it). It is listed if it was not
/// `WRITTEN`.
pub(crate) fn marked_at_home_write(state: u32) -> u32 {
    marked_at_write(state) | PARTIAL
}

/// At the home, whether its own thread may perform an atomic operation on a word of the page in place:
/// writable here (a write of its threads is accounted for: written unseen, or listed for the release), and
/// not `DIFFED`. The release finds a `DIFFED` page's own writes by comparing it with its twin, and another
/// rank's atomic operation on the same word, applied to page and twin alike (`AtDiff::Both`), would hide
/// the home's: the service loop performs it instead, as the home's own write (`AtDiff::Own`), which ends
/// `DIFFED`.
pub(crate) fn in_place_at_home(state: u32) -> bool {
    state & STATE_MASK == READ_WRITE && state & DIFFED == 0
}

/// Whether a page homed elsewhere may be twinned and made writable ahead of a write, beside a page a write
/// faulted on: present read-only and neither written nor twinned in the open interval. It is then marked
/// `WRITTEN | TWINNED | AHEAD` and listed, as a write would, with `AHEAD` saying that no write has been
/// seen.
pub(crate) fn ahead(state: u32) -> bool {
    state & STATE_MASK == READ_ONLY && state & (WRITTEN | TWINNED) == 0
}

/// The rule for a write, given the page's state word before the write marks it.
pub(crate) fn at_write(state: u32, homed_here: bool) -> AtWrite {
    AtWrite {
        list: state & WRITTEN == 0,
        twin: !homed_here && state & TWINNED == 0,
        home_twin: homed_here && state & (WRITTEN | DIFFED) == 0,
    }
}

/// Whether a page homed elsewhere may be brought up to date in place at a barrier by other ranks' diffs of
/// it (`Acquire::update`) instead of dropped: the same pages as `ahead`, a clean read-only copy. It is
/// then twinned as the diffs leave it, marked `WRITTEN | TWINNED | AHEAD`, listed, made writable and
/// written: a write by another thread of this rank once it is writable is caught by its twin, and the next
/// write to it by this rank takes no fault. Unchanged at the next release, it is left out of the notice.
pub(crate) fn updated(state: u32) -> bool {
    ahead(state)
}

/// The marks a page homed elsewhere gains once a diff of it that is not empty reaches its home before its
/// interval closes (a selective release, an acquire's flush): `PARTIAL`.
pub(crate) fn partial_after_flush() -> u32 {
    PARTIAL
}

/// At a release, whether the diff of a page homed elsewhere may go to the other ranks as an update: it
/// carries every write of the interval (`PARTIAL` is not set).
pub(crate) fn whole_interval(state: u32) -> bool {
    state & PARTIAL == 0
}

/// At a release, for a page taken from the written list (after it is write-protected, if it was
/// writable): whether its writes go to its home as a diff. After that the page loses the marks of
/// `cleared_at_release` (a page with a diff only once its home has acknowledged it).
pub(crate) fn diffs_at_release(state: u32) -> bool {
    state & TWINNED != 0 && state & STATE_MASK != INVALID
}

/// The marks a page loses, besides `TWINNED`, once a diff of it that is not empty reaches its home (at a
/// release, a selective release or an acquire's flush): `AHEAD`, since the diff shows it written.
pub(crate) fn cleared_at_diff() -> u32 {
    AHEAD
}

/// The marks a page loses once its writes are at its home (or it has none to send): at a release every
/// one of the interval's, `WRITTEN | TWINNED | DIFFED | AHEAD | PARTIAL` (its interval is closing); at a selective
/// release (`Region::release_range`) only `TWINNED` (and `AHEAD` with a diff, `cleared_at_diff`): the page stays `WRITTEN` and listed, so that the interval's write notice still names it
/// (ranks that synchronize through locks and barriers learn of the writes as before), and its next write
/// in the interval makes a new twin.
pub(crate) fn cleared_at_release(selective: bool) -> u32 {
    if selective {
        TWINNED
    } else {
        WRITTEN | TWINNED | DIFFED | AHEAD | PARTIAL
    }
}

/// How a home applies another rank's diff to its copy of a page, given the page's state word there. The
/// page becomes writable here (its threads may then write it without a fault), so it is listed for the
/// home's release to protect again, *before* it becomes writable: listed after, a release draining the
/// list in between would leave the home's writes out of its notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtDiff {
    /// Not writable here and not written in the open interval: twin the page as the diff leaves it (its
    /// bytes, or zeros if not here, with the diff applied), mark it `WRITTEN | DIFFED` and list it, make
    /// it writable, apply the diff.
    Twin,
    /// `DIFFED` already: apply the diff to the page and to its twin.
    Both,
    /// Any other, and any diff of a selective release: the home is writing the page (listed), or writes
    /// it unseen (no other rank has fetched it), or it is listed already (put back by a release that
    /// failed), or the diff's writer has made no notice of it yet (a selective release makes none, so a
    /// rank that learns of the home's later writes through the home must drop the page even if those
    /// writes left its bytes as the diff did). Mark it `WRITTEN` (not `DIFFED`) and list it if it was
    /// not, make it writable, apply in place: announced as the home's own write.
    Own,
}

/// The rule for a diff a home applies (`selective`: sent by a selective release).
pub(crate) fn at_diff(state: u32, selective: bool) -> AtDiff {
    if selective {
        AtDiff::Own
    } else if state & STATE_MASK != READ_WRITE && state & WRITTEN == 0 {
        AtDiff::Twin
    } else if state & DIFFED != 0 {
        AtDiff::Both
    } else {
        AtDiff::Own
    }
}

/// At a release, for a page taken from its written list (write-protected by then) that sends no diff:
/// whether the interval's notice names it. Not an `AHEAD` page: nothing wrote it. At a home, a `DIFFED`
/// page only if its bytes differ from its twin: then the home's threads wrote it too; else the diffs'
/// writers announce their writes themselves, and a notice of the home's would have every rank holding the
/// page drop it and fetch it again for nothing. (A page whose diff goes to its home is named.)
pub(crate) fn announced_at_release(state: u32, same_as_twin: bool) -> bool {
    state & AHEAD == 0 && (state & DIFFED == 0 || !same_as_twin)
}

/// What an acquire does with a page a notice names (not homed here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtDrop {
    /// Nothing: no copy here.
    Absent,
    /// This rank wrote the page too, and the writes are not at the home yet: write-protect it if
    /// writable, send its diff (with the acquire's others, a batch to each home) and wait for the
    /// acknowledgement, drop the twin (clear `TWINNED`), then discard it as for `Discard`. It stays
    /// `WRITTEN` and listed: the interval's notice still names it.
    FlushThenDiscard,
    /// Mark it invalid and discard the copy: the next access fetches it from its home.
    Discard,
}

/// The rule for a page an acquire drops.
pub(crate) fn at_drop(state: u32) -> AtDrop {
    if state & STATE_MASK == INVALID {
        AtDrop::Absent
    } else if state & TWINNED != 0 {
        AtDrop::FlushThenDiscard
    } else {
        AtDrop::Discard
    }
}

/// At the home, serving another rank's fetch (the page is marked `SHARED` from then on): whether to
/// write-protect the page first, so that the home's next write is recorded. A page written in the open
/// interval stays writable: it is listed, and the home's release protects it and announces it.
pub(crate) fn protect_for_fetch(state: u32) -> bool {
    state & STATE_MASK == READ_WRITE && state & WRITTEN == 0
}

/// At a home serving a fetch of a page it holds `DIFFED` (another rank's diff made it writable here, and
/// its release announces it only if it then differs from its twin): whether it stops being `DIFFED`, its
/// twin dropped, so that the release announces it as the home's own write whatever its bytes. When the
/// copy going out differs from the twin (`differs`, asked only then): the copy holds writes of the home's
/// open interval, which the home may write back to the twin's bytes before it releases, and the requester,
/// acquiring that release, must drop the copy.
pub(crate) fn undiffed_at_fetch(state: u32, differs: impl FnOnce() -> bool) -> bool {
    state & DIFFED != 0 && differs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::READ_ONLY;

    #[test]
    fn a_first_write_lists_the_page_and_twins_it_only_when_homed_elsewhere() {
        assert_eq!(
            at_write(READ_ONLY, false),
            AtWrite {
                list: true,
                twin: true,
                home_twin: false
            }
        );
        assert_eq!(
            at_write(READ_ONLY | SHARED, true),
            AtWrite {
                list: true,
                twin: false,
                home_twin: true
            }
        );
        // Written again after a release protected it, in the same interval: listed already.
        assert_eq!(
            at_write(READ_ONLY | WRITTEN | TWINNED, false),
            AtWrite {
                list: false,
                twin: false,
                home_twin: false
            }
        );
        // Written again after an acquire flushed and dropped it: a new twin, not a second listing.
        assert_eq!(
            at_write(READ_ONLY | WRITTEN, false),
            AtWrite {
                list: false,
                twin: true,
                home_twin: false
            }
        );
        // A home page a diff made writable has its twin already; one the home listed without a twin
        // (a selective release's diff) is announced whatever its bytes.
        assert!(!at_write(READ_ONLY | SHARED | WRITTEN | DIFFED, true).home_twin);
        assert!(!at_write(READ_ONLY | SHARED | WRITTEN, true).home_twin);
        assert!(!tracked(READ_WRITE, true) && tracked(READ_WRITE | SHARED, true));
        assert!(tracked(INVALID, false));
        // A write fault marks a page written, and written it is no longer only twinned ahead.
        assert_eq!(
            marked_at_write(READ_ONLY | AHEAD | TWINNED),
            READ_ONLY | WRITTEN | TWINNED
        );
        // An atomic operation at the home: announced (not AHEAD), never sent whole as an update.
        let s = marked_at_home_write(INVALID | WRITTEN | AHEAD);
        assert!(announced_at_release(s, false) && !whole_interval(s));
        assert!(at_write(s, false).twin);
    }

    #[test]
    fn only_an_untouched_read_only_copy_is_twinned_ahead_and_announced_only_once_written() {
        assert!(ahead(READ_ONLY));
        assert!(
            !ahead(READ_ONLY | WRITTEN),
            "written in the interval already"
        );
        assert!(!ahead(READ_ONLY | TWINNED));
        assert!(!ahead(READ_WRITE) && !ahead(INVALID));
        assert!(!announced_at_release(READ_ONLY | WRITTEN | AHEAD, false));
        assert!(updated(READ_ONLY) && !updated(READ_ONLY | TWINNED) && !updated(READ_WRITE));
        assert!(!whole_interval(READ_ONLY | WRITTEN | partial_after_flush()));
        assert_ne!(cleared_at_release(false) & PARTIAL, 0);
        assert_eq!(cleared_at_release(true) & PARTIAL, 0);
        assert!(announced_at_release(READ_ONLY | WRITTEN, false));
        assert_ne!(cleared_at_release(false) & AHEAD, 0);
        assert_eq!(
            cleared_at_release(true) & AHEAD,
            0,
            "cleared only by a diff"
        );
    }

    #[test]
    fn only_a_present_twinned_page_is_diffed_or_flushed() {
        assert!(diffs_at_release(READ_ONLY | WRITTEN | TWINNED));
        assert!(!diffs_at_release(READ_ONLY | WRITTEN));
        assert!(!diffs_at_release(INVALID | WRITTEN | TWINNED));
        assert_eq!(at_drop(INVALID | WRITTEN), AtDrop::Absent);
        assert_eq!(at_drop(READ_WRITE | TWINNED), AtDrop::FlushThenDiscard);
        assert_eq!(at_drop(READ_ONLY | WRITTEN), AtDrop::Discard);
        assert!(protect_for_fetch(READ_WRITE));
        assert!(!protect_for_fetch(READ_WRITE | WRITTEN));
        assert!(!protect_for_fetch(READ_ONLY));
    }
}
