//! Checks of how pages move: read-ahead, copies into and out of regions, faults coalesced between
//! threads, and first touch (zero fill) ahead of a sequential reader or writer.

use crate::*;

/// Rank 0 reads other ranks' pages in order (read-ahead fetches them in growing windows: from
/// one home, then from every home of a cyclic region, its pages a stride apart, and of a
/// block-cyclic one, block after block of a home), then writes
/// some of them, while the others write others back: pages that came by read-ahead must be
/// ordinary read-only copies afterwards, writable here and invalidatable from elsewhere.
/// Not a multiple of 2 or 3 ranks (a run ends on a partial stride), and long enough for replies
/// from one home of 256 and 512 pages, which are offered to the install helper when they come
/// over the connection. When every other rank installs pages here directly (same host), the
/// first two passes take them that way (at 2 ranks the cyclic one's replies of 256 pages a
/// stride apart are shared with the home's helper) and the third, cyclic too, over the
/// connections (direct install switched off for it), so that both paths are checked in one job;
/// so do the two block-cyclic passes (blocks of 7 pages, so that runs end on partial blocks too;
/// replies over the connection are installed a block at a time, by the helper too).
pub(crate) fn readahead(c: &Check) -> anyhow::Result<()> {
    let Check {
        rt,
        dsm,
        me,
        n,
        model,
        args,
    } = *c;
    let pages = 1201;
    let wanted = dsm.direct_install();
    let passes = [
        (dsm::Placement::At(dsm::Rank(1)), true),
        (dsm::Placement::Cyclic, true),
        (dsm::Placement::Cyclic, false),
        (dsm::Placement::BlockCyclic(7), true),
        (dsm::Placement::BlockCyclic(7), false),
    ];
    for (placement, want_direct) in passes {
        let v = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, placement, model)?;
        // Ranks introduce themselves at the first allocation.
        let direct = wanted && dsm.stats().peers_installing_here as usize == n - 1;
        let direct_now = direct && want_direct;
        dsm.set_direct_install(direct_now);
        let home = |p: usize| v.region().home_of(dsm::PageId(p as u64));
        for p in (0..pages).filter(|&p| home(p) == Some(rt.rank()) && me != 0) {
            v.set(p * WORDS_PER_PAGE, p as u64);
        }
        let home_before = dsm.stats();
        dsm.barrier()?;
        if me == 0 {
            let before = dsm.stats();
            for p in 0..pages {
                let want = if home(p) == Some(rt.rank()) {
                    0
                } else {
                    p as u64
                };
                ensure!(
                    v.get(p * WORDS_PER_PAGE) == want,
                    "page {p} read wrong ({placement:?})"
                );
            }
            let s = dsm.stats();
            ensure!(
                s.pages_readahead > before.pages_readahead,
                "read-ahead did not happen ({placement:?}): {s}"
            );
            let installed = s.pages_installed_by_sender - before.pages_installed_by_sender;
            if direct_now {
                ensure!(
                    installed == s.pages_fetched - before.pages_fetched,
                    "pages read were not all installed by their home: {s}"
                );
            } else {
                ensure!(
                    installed == 0,
                    "a home installed pages with direct install off: {s}"
                );
                // Replies from one home grow to 512 pages: long enough for the install helper.
                if dsm.install_helper() && placement == dsm::Placement::At(dsm::Rank(1)) {
                    ensure!(
                        s.replies_offered_to_helper > before.replies_offered_to_helper,
                        "no reply was offered to the install helper: {s}"
                    );
                }
            }
        }
        dsm.set_direct_install(wanted);
        dsm.barrier()?;
        // Rank 1, the home of the first pass, installed replies of 256 pages and more into rank 0
        // itself: with its install helper, when that is on.
        let s = dsm.stats();
        if me == 1
            && direct_now
            && dsm.install_helper()
            && placement == dsm::Placement::At(dsm::Rank(1))
        {
            ensure!(
                s.pages_installed_into_peers - home_before.pages_installed_into_peers >= 256
                    && s.replies_offered_to_helper > home_before.replies_offered_to_helper,
                "the home's long direct installs were not shared with its install helper: {s}"
            );
        }
        for p in (me..pages).step_by(2) {
            v.set(p * WORDS_PER_PAGE + 1, 1000 + p as u64);
        }
        dsm.barrier()?;
        for p in 0..pages {
            ensure!(
                v.get(p * WORDS_PER_PAGE + 1) == 1000 + p as u64,
                "rank {me}: page {p} lost a write ({placement:?})"
            );
        }
        dsm.barrier()?;
        drop(v);
    }
    // With --threads T, T threads of rank 0 each read their own 1024 pages of rank 1's in order,
    // at once: their long replies compete for the one install helper.
    let threads = args.threads;
    if threads > 1 {
        let per = 1024;
        let v = marked_at_rank1(c, threads * per)?;
        if me == 0 {
            on_threads(threads, |t| {
                for p in t * per..(t + 1) * per {
                    let got = v.get(p * WORDS_PER_PAGE);
                    ensure!(got == p as u64 + 1, "thread {t}: page {p} read {got}");
                }
                Ok(())
            })?;
        }
        dsm.barrier()?;
        drop(v);
    }
    let s = dsm.stats();
    println!(
        "readahead ok ({} pages installed by their sender, {} by the helper)",
        s.pages_installed_by_sender, s.pages_helper_installed
    );
    Ok(())
}

/// Copies into and out of a region (`read_slice`, `write_slice`, `prefetch`) announce the pages
/// they are about to touch: each run of them with one home comes in one fault, whatever its
/// length (up to the window), where a sequential reader's window grows from one page. Checked
/// on a region homed at rank 1, one placed in blocks (a copy across several homes), a cyclic
/// one and a block-cyclic one (whose runs go block after block of a home), by counting rank 0's
/// faults; the contents are checked everywhere.
pub(crate) fn slices(c: &Check) -> anyhow::Result<()> {
    let Check {
        rt, dsm, me, model, ..
    } = *c;
    let pages = 400;
    let value = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9) ^ 7;
    let placements = [
        dsm::Placement::At(dsm::Rank(1)),
        dsm::Placement::Block,
        dsm::Placement::Cyclic,
        dsm::Placement::BlockCyclic(16),
    ];
    for placement in placements {
        let v = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, placement, model)?;
        let home = |p: usize| v.region().home_of(dsm::PageId(p as u64));
        // How many homes the pages have, leaving out this rank with `but_mine` (when it wrote its
        // own pages, which are then here and take no fault).
        let homes = |pages: std::ops::Range<usize>, but_mine: bool| {
            let mut h: Vec<_> = pages
                .map(home)
                .filter(|&h| !(but_mine && h == Some(rt.rank())))
                .collect();
            h.sort();
            h.dedup();
            h.len() as u64
        };

        let faults = || {
            let s = dsm.stats();
            (s.read_faults, s.write_faults + s.upgrade_faults)
        };
        // Each rank fills its own pages; rank 1 the first 50 pages of a region homed at it in one
        // copy (its untouched pages filled with zeros by one fault), then the rest.
        let mine: Vec<usize> = (0..pages).filter(|&p| home(p) == Some(rt.rank())).collect();
        let words = |pages: std::ops::Range<usize>| -> Vec<u64> {
            (pages.start * WORDS_PER_PAGE..pages.end * WORDS_PER_PAGE)
                .map(value)
                .collect()
        };
        if placement == dsm::Placement::At(dsm::Rank(1)) {
            if me == 1 {
                let before = faults();
                v.write_slice(0, &words(0..50));
                let writes = faults().1 - before.1;
                ensure!(
                    writes == 1,
                    "rank 1 wrote 50 untouched pages of its own in {writes} faults, not 1"
                );
                v.write_slice(50 * WORDS_PER_PAGE, &words(50..pages));
            }
        } else {
            for p in mine {
                v.write_slice(p * WORDS_PER_PAGE, &words(p..p + 1));
            }
        }
        dsm.barrier()?;
        if me == 0 {
            // Pages 3..=340, from the start of page 3 (where a copy into a fresh vector is one that
            // glibc's memcpy takes backwards) to the middle of page 340: longer than the caches,
            // where memcpy changes strategy.
            let (from, to) = (3 * WORDS_PER_PAGE, 340 * WORDS_PER_PAGE + 7);
            let mut got = vec![0; to - from];
            let before = faults();
            v.read_slice(from, &mut got);
            let (reads, want) = (faults().0 - before.0, homes(3..341, true));
            ensure!(
                reads == want,
                "reading pages 3..=340 took {reads} faults, not {want} ({placement:?}, {model:?})"
            );
            ensure!(
                got.iter().enumerate().all(|(k, &x)| x == value(from + k)),
                "read_slice read wrong values ({placement:?}, {model:?})"
            );
            // Pages 345..400 prefetched (not where the last run ended, so no window carries
            // over), then read without a fault.
            let prefetched = 345 * WORDS_PER_PAGE..pages * WORDS_PER_PAGE;
            let before = faults();
            v.prefetch(prefetched.clone());
            let (reads, want) = (faults().0 - before.0, homes(345..pages, true));
            ensure!(
                reads == want,
                "prefetching pages 345..400 took {reads} faults, not {want} ({placement:?}, {model:?})"
            );
            let before = faults();
            for i in prefetched {
                ensure!(v.get(i) == value(i), "word {i} read wrong after a prefetch");
            }
            ensure!(
                faults().0 == before.0,
                "prefetched pages faulted again ({placement:?}, {model:?})"
            );
        }
        dsm.barrier()?;
        // Rank 0 writes pages 2..=30 of a region nobody has touched. Under sequential consistency
        // each home hands over its untouched pages of the run in one fault (rank 0's own are
        // filled with zeros by one); under release consistency a first write fetches the pages as
        // a read does, and then marks each page written (one fault a page).
        let w = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, placement, model)?;
        let (from, to) = (2 * WORDS_PER_PAGE, 31 * WORDS_PER_PAGE);
        if me == 0 {
            let before = faults();
            w.write_slice(from, &words(2..31));
            let (writes, homes) = (faults().1 - before.1, homes(2..31, false));
            if model == dsm::Consistency::Sequential {
                ensure!(
                    writes == homes,
                    "writing pages 2..=30 took {writes} faults, not {homes} ({placement:?})"
                );
            }
        }
        dsm.barrier()?;
        for i in 0..pages * WORDS_PER_PAGE {
            let want = if (from..to).contains(&i) { value(i) } else { 0 };
            ensure!(
                w.get(i) == want,
                "rank {me}: word {i} of the written region is wrong ({placement:?}, {model:?})"
            );
        }
        dsm.barrier()?;
    }
    println!("slices ok");
    Ok(())
}

/// `pages` pages homed at rank 1, of the check's consistency model, whose first words rank 1 sets
/// (page p's to p + 1) before the barrier that every rank then passes.
fn marked_at_rank1<'d>(c: &Check<'d>, pages: usize) -> anyhow::Result<dsm::GlobalVec<'d, u64>> {
    let v = c.dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(1)),
        c.model,
    )?;
    if c.me == 1 {
        for p in 0..pages {
            v.set(p * WORDS_PER_PAGE, p as u64 + 1);
        }
    }
    c.dsm.barrier()?;
    Ok(v)
}

/// Several threads of rank 0 read the same page of rank 1's at once, page after page: each page
/// must be fetched once, whatever number of threads fault on it (the others wait for that
/// fetch), and each thread must read the page's value.
///
/// Whether two threads ever fault on a page at once is up to the machine: on one whose other
/// programs keep a core busy, the first thread's fetch (30 us) was back before the others ran, for
/// 2000 pages in a row. So the check says how many faults waited for another's fetch, and when none
/// did it says that it tested reads and fetches only, without failing; that a thread which finds a
/// page's fetch out waits for it, and takes it, is tested without timing in the engine's tests
/// (`a_thread_that_faults_on_a_page_being_fetched_waits_for_that_fetch`).
pub(crate) fn coalesce(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    ensure!(n > 1, "coalesce needs at least 2 ranks");
    let threads = args.threads.max(2);
    let pages = args.rounds;
    // Passes over fresh pages, until one has had threads wait for another's fetch.
    const PASSES: usize = 10;
    let v = marked_at_rank1(c, PASSES * pages)?;
    if me == 0 {
        // One page per fetch, so that each page is exactly one fetch.
        dsm.set_readahead(1)?;
        let start = std::sync::Barrier::new(threads);
        let mut coalesced = 0;
        let mut passes = 0;
        while coalesced == 0 && passes < PASSES {
            let first = passes * pages;
            passes += 1;
            let before = dsm.stats();
            on_threads(threads, |t| {
                // Every thread goes through every page's start, even after a wrong read: one that
                // stopped early would leave the others waiting at the next start for ever.
                let mut wrong = None;
                for p in first..first + pages {
                    start.wait();
                    let got = v.get(p * WORDS_PER_PAGE);
                    if got != p as u64 + 1 && wrong.is_none() {
                        wrong = Some((p, got));
                    }
                }
                match wrong {
                    Some((p, got)) => anyhow::bail!("thread {t}: page {p} read {got}"),
                    None => Ok(()),
                }
            })?;
            let after = dsm.stats();
            let fetched = after.pages_fetched - before.pages_fetched;
            let faults = after.read_faults - before.read_faults;
            coalesced = after.faults_coalesced - before.faults_coalesced;
            ensure!(
                fetched == pages as u64 && faults == pages as u64,
                "{pages} pages read by {threads} threads at once took {faults} faults and {fetched} fetches: {after}"
            );
        }
        if coalesced > 0 {
            println!(
                "coalesce ok: {pages} pages, {threads} threads, {coalesced} faults coalesced (pass {passes})"
            );
        } else {
            println!(
                "coalesce ok, reads and fetches only: in {passes} passes of {pages} pages no thread faulted on a page while another's fetch of it was out (a busy machine); {}",
                dsm.stats()
            );
        }
    }
    dsm.barrier()?;
    Ok(())
}

pub(crate) fn firsttouch(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, model, ..
    } = *c;
    ensure!(n > 1, "firsttouch needs at least 2 ranks");
    // Pages homed at rank 0; the other ranks touch some of them first (scattered, so they break
    // rank 0's sequential runs), then rank 0 touches every page in order, reading first in one
    // region and writing first in the other. Its fills of untouched pages must stop at the
    // pages the others touched and keep what they wrote.
    let pages = 300;
    let theirs = |p: usize| (1..n).find(|&r| p % 7 == r);
    for read_first in [true, false] {
        let v = dsm.alloc_vec_in::<u64>(
            pages * WORDS_PER_PAGE,
            dsm::Placement::At(dsm::Rank(0)),
            model,
        )?;
        for p in (0..pages).filter(|&p| theirs(p) == Some(me)) {
            v.set(p * WORDS_PER_PAGE, mix(&[me as u64, p as u64]));
        }
        dsm.barrier()?;
        if me == 0 {
            let filled = dsm.stats().pages_zero_filled;
            for p in 0..pages {
                let at = p * WORDS_PER_PAGE;
                if read_first {
                    let want = theirs(p).map_or(0, |r| mix(&[r as u64, p as u64]));
                    ensure!(v.get(at) == want, "page {p}: rank 0 read a wrong word 0");
                }
                v.set(at + 1, mix(&[0, p as u64]));
            }
            let s = dsm.stats();
            ensure!(
                s.pages_zero_filled > filled,
                "nothing was filled ahead: {s}"
            );
        }
        dsm.barrier()?;
        check_words(
            &v,
            pages,
            &format!("rank {me}, read first: {read_first},"),
            |p| {
                (
                    theirs(p).map_or(0, |r| mix(&[r as u64, p as u64])),
                    mix(&[0, p as u64]),
                )
            },
        )?;
        dsm.barrier()?;
    }
    // Rank 1 writes every page homed at rank 0 in order, after rank 0 touched every 16th: the
    // pages it is handed ahead as zeros (write-ahead) must stop at rank 0's, which keep their data.
    let v = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        model,
    )?;
    let early = |p: usize| p % 16 == 5;
    if me == 0 {
        for p in (0..pages).filter(|&p| early(p)) {
            v.set(p * WORDS_PER_PAGE, mix(&[0, p as u64]));
        }
    }
    dsm.barrier()?;
    if me == 1 {
        let filled = dsm.stats().pages_zero_filled;
        for p in 0..pages {
            v.set(p * WORDS_PER_PAGE + 1, mix(&[1, p as u64]));
        }
        let s = dsm.stats();
        ensure!(
            model == dsm::Consistency::Release || s.pages_zero_filled > filled,
            "rank 1 was handed no page ahead: {s}"
        );
    }
    dsm.barrier()?;
    check_words(&v, pages, &format!("rank {me}, write-ahead:"), |p| {
        (
            if early(p) { mix(&[0, p as u64]) } else { 0 },
            mix(&[1, p as u64]),
        )
    })?;
    dsm.barrier()?;
    // A cyclic region: every rank first-touches the pages it homes, every n-th page (page p at
    // rank p % n), in order (its fills take pages a stride apart), after the other ranks touched
    // some of rank 0's.
    let c = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    let home = |p: usize| p % n;
    let early = |p: usize| (1..n).find(|&r| home(p) == 0 && p % 23 == r);
    for p in (0..pages).filter(|&p| early(p) == Some(me)) {
        c.set(p * WORDS_PER_PAGE, mix(&[me as u64, p as u64, 9]));
    }
    dsm.barrier()?;
    let filled = dsm.stats().pages_zero_filled;
    for p in (0..pages).filter(|&p| home(p) == me) {
        c.set(p * WORDS_PER_PAGE + 1, mix(&[me as u64, p as u64, 10]));
    }
    let s = dsm.stats();
    ensure!(
        s.pages_zero_filled > filled,
        "rank {me} filled nothing ahead in a cyclic region: {s}"
    );
    dsm.barrier()?;
    check_words(&c, pages, &format!("rank {me}, cyclic:"), |p| {
        (
            early(p).map_or(0, |r| mix(&[r as u64, p as u64, 9])),
            mix(&[home(p) as u64, p as u64, 10]),
        )
    })?;
    dsm.barrier()?;
    // Rank 1 writes every page of another cyclic region in order, after rank 0 touched some of
    // them: its own pages are filled ahead, the others' handed over a stride apart as zeros
    // (write-ahead), both stopping at the pages rank 0 touched. Far fewer faults than pages.
    let w = dsm.alloc_vec_in::<u64>(pages * WORDS_PER_PAGE, dsm::Placement::Cyclic, model)?;
    let touched_first = |p: usize| p % 23 == 5;
    if me == 0 {
        for p in (0..pages).filter(|&p| touched_first(p)) {
            w.set(p * WORDS_PER_PAGE, mix(&[0, p as u64, 11]));
        }
    }
    dsm.barrier()?;
    if me == 1 {
        let before = dsm.stats();
        for p in 0..pages {
            w.set(p * WORDS_PER_PAGE + 1, mix(&[1, p as u64, 12]));
        }
        let s = dsm.stats();
        let faults = s.write_faults + s.upgrade_faults + s.read_faults
            - before.write_faults
            - before.upgrade_faults
            - before.read_faults;
        ensure!(
            model == dsm::Consistency::Release || faults < pages as u64 / 4,
            "rank 1 took {faults} faults writing {pages} pages in order: {s}"
        );
    }
    dsm.barrier()?;
    check_words(&w, pages, &format!("rank {me}, cyclic write-ahead:"), |p| {
        (
            if touched_first(p) {
                mix(&[0, p as u64, 11])
            } else {
                0
            },
            mix(&[1, p as u64, 12]),
        )
    })?;
    dsm.barrier()?;
    if n > 2 {
        // Pages last written by rank 2, written again in order by rank 1, which holds no copy: each
        // fault claims pages ahead, and the home grants the writes (the data comes from rank 2).
        let words = [(2, 3), (1, 4)];
        for (writer, word) in words {
            if me == writer {
                for p in 0..pages {
                    v.set(
                        p * WORDS_PER_PAGE + word,
                        mix(&[writer as u64, p as u64, 7]),
                    );
                }
            }
            dsm.barrier()?;
        }
        for p in 0..pages {
            for (writer, word) in words {
                ensure!(
                    v.get(p * WORDS_PER_PAGE + word) == mix(&[writer as u64, p as u64, 7]),
                    "rank {me}: page {p} lost rank {writer}'s second write"
                );
            }
        }
        dsm.barrier()?;
    }
    println!("firsttouch ok");
    Ok(())
}
