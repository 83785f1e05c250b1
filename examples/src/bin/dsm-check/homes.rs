//! Checks of first-touch placement: a page is homed at the rank that touched it first, every rank
//! comes to know that one home, and the contents are those of any other placement.

use crate::*;

/// First-touch placement: each page is homed at the rank that touched it first. Every rank writes
/// a part of its own, of a size that grows with its rank, so that most parts lie partly or wholly
/// in other ranks' directory blocks (the rank that records a page's home is its home under block
/// placement): the first half in one copy (which takes the whole run at its first fault), the rest
/// page by page. Then every rank reads a shared tail at once, each from another page on. After a
/// barrier every rank reads every page's word, finds each page of the parts homed at its writer,
/// and every rank has seen the same home for each page of the tail; and a rank's own part is homed
/// here indeed: reading it again takes no fault.
pub(crate) fn touchhomes(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, model, ..
    } = *c;
    ensure!(n > 1, "touchhomes needs at least 2 ranks");
    let (parts, tail) = (48 * n * n, 40);
    let bound = |r: usize| parts * r * r / (n * n);
    let writer = |p: usize| {
        (0..n)
            .find(|&r| p < bound(r + 1))
            .expect("a page of the parts")
    };
    let value = |p: usize| mix(&[writer(p) as u64, p as u64]);
    let v = dsm.alloc_vec_in::<u64>(
        (parts + tail) * WORDS_PER_PAGE,
        dsm::Placement::FirstTouch,
        model,
    )?;
    let seen = dsm.alloc_vec_in::<u64>(n * tail, dsm::Placement::At(dsm::Rank(0)), model)?;
    let home = |p: usize| v.region().home_of(dsm::PageId(p as u64));
    ensure!(
        (0..parts + tail).all(|p| home(p).is_none()),
        "rank {me}: a page of a fresh first-touch region has a home before any rank touched it"
    );
    // (A directory learns of the pages others take as they take them.)
    dsm.barrier()?;
    let (start, end) = (bound(me), bound(me + 1));
    let half = (start + end) / 2;
    let words: Vec<u64> = (start * WORDS_PER_PAGE..half * WORDS_PER_PAGE)
        .map(|i| {
            if i % WORDS_PER_PAGE == 0 {
                value(i / WORDS_PER_PAGE)
            } else {
                0
            }
        })
        .collect();
    v.write_slice(start * WORDS_PER_PAGE, &words);
    for p in half..end {
        v.set(p * WORDS_PER_PAGE, value(p));
    }
    for k in 0..tail {
        let p = parts + (k + me * tail / n) % tail;
        ensure!(
            v.get(p * WORDS_PER_PAGE) == 0,
            "rank {me}: page {p} of the tail, never written, is not zeros"
        );
        let h = home(p).with_context(|| format!("rank {me} read page {p} and knows no home"))?;
        seen.set(me * tail + p - parts, u64::from(h.0));
    }
    dsm.barrier()?;
    for p in 0..parts {
        ensure!(
            v.get(p * WORDS_PER_PAGE) == value(p),
            "rank {me}: page {p}, written by rank {}, reads wrong",
            writer(p)
        );
        ensure!(
            home(p) == Some(dsm::Rank(writer(p) as u32)),
            "rank {me}: page {p}, touched first by rank {}, is homed at {:?}",
            writer(p),
            home(p)
        );
    }
    if me == 0 {
        for k in 0..tail {
            let homes: Vec<u64> = (0..n).map(|r| seen.get(r * tail + k)).collect();
            ensure!(
                homes.iter().all(|&h| h == homes[0] && h < n as u64),
                "page {} of the tail, read by every rank at once, has the homes {homes:?}",
                parts + k
            );
        }
    }
    let faults = || {
        let s = dsm.stats();
        s.read_faults + s.write_faults + s.upgrade_faults
    };
    let before = faults();
    for p in start..end {
        ensure!(
            v.get(p * WORDS_PER_PAGE) == value(p),
            "rank {me}: page {p} of its own part reads wrong"
        );
    }
    ensure!(
        faults() == before,
        "rank {me}: reading its own part again took {} faults: its pages are not homed here",
        faults() - before
    );
    // A copy out of pages that another rank took, whose home this rank learns at the copy's first
    // fault, reads them as it would in a region placed in blocks: the run, in one fault, and nothing
    // past it (the home of a page fetched past it would track this rank's copy for good).
    let (part, run) = (64, 16);
    let w =
        dsm.alloc_vec_in::<u64>(n * part * WORDS_PER_PAGE, dsm::Placement::FirstTouch, model)?;
    w.write_slice(
        me * part * WORDS_PER_PAGE,
        &vec![me as u64 + 1; part * WORDS_PER_PAGE],
    );
    dsm.barrier()?;
    // (Faults that fetch: under release consistency a write to a page fetched for it is an upgrade.)
    let fetching = || {
        let s = dsm.stats();
        (s.read_faults + s.write_faults, s.pages_fetched)
    };
    // (The faults and pages fetched since `before`.)
    let since = |before: (u64, u64)| {
        let now = fetching();
        (now.0 - before.0, now.1 - before.1)
    };
    let next = (me + 1) % n;
    let before = fetching();
    let mut copy = vec![0u64; run * WORDS_PER_PAGE];
    w.read_slice((next * part + 8) * WORDS_PER_PAGE, &mut copy);
    let (faulted, fetched) = since(before);
    ensure!(
        copy.iter().all(|&x| x == next as u64 + 1),
        "rank {me}: a copy out of the part of rank {next} reads wrong"
    );
    ensure!(
        faulted == 1 && fetched == run as u64,
        "rank {me}: a copy of {run} pages out of the part of rank {next} took {faulted} faults and \
         fetched {fetched} pages, where a region placed in blocks takes 1 fault and {run} pages"
    );
    // The same for a copy into the part of another rank, whose homes the read above did not learn:
    // the run in one fault. Under sequential consistency the home, which alone holds those pages,
    // gives them up to this writer with the page that faulted (write-ahead); under release
    // consistency the run is fetched as for a read.
    let prev = (me + n - 1) % n;
    if prev != next {
        let before = fetching();
        w.write_slice((prev * part + 32) * WORDS_PER_PAGE, &copy);
        let (faulted, fetched) = since(before);
        ensure!(
            faulted == 1 && fetched == run as u64,
            "rank {me}: a copy of {run} pages into the part of rank {prev} took {faulted} faults and \
             fetched {fetched} pages, where a region placed in blocks takes 1 fault and {run} pages"
        );
        // Then one word of each of the part's last pages, page after page: the faults after the first
        // take the following pages along, with the home's data, which the rest of each page keeps.
        for p in 48..part {
            w.set((prev * part + p) * WORDS_PER_PAGE, 1000 + p as u64);
        }
    }
    dsm.barrier()?;
    // Every rank's part, as the rank after it left it (with two ranks nobody wrote into another's).
    let writer_next = (me + 2) % n;
    for p in 0..part {
        let mut got = vec![0u64; WORDS_PER_PAGE];
        w.read_slice((me * part + p) * WORDS_PER_PAGE, &mut got);
        let written = n > 2;
        let expected = |i: usize| match p {
            32..48 if written => writer_next as u64 + 1,
            48.. if written && i == 0 => 1000 + p as u64,
            _ => me as u64 + 1,
        };
        ensure!(
            (0..WORDS_PER_PAGE).all(|i| got[i] == expected(i)),
            "rank {me}: page {p} of its own part reads wrong after rank {} wrote into the part",
            (me + 1) % n
        );
    }
    dsm.barrier()?;
    println!("touchhomes ok");
    Ok(())
}

/// Pages of each `touchrace` round's region: several directory blocks at every size of job.
const RACE_PAGES: usize = 96;
/// A `touchrace` region is cut into segments of this many pages; a third of them hold a run that one
/// thread alone writes whole, with one copy.
const RACE_SEGMENT: usize = 8;
/// Touches in each thread's plan, besides its whole-page copies.
const RACE_TOUCHES: usize = 24;
/// The longest run a `touchrace` read copy or prefetch covers.
const RACE_RUN: usize = 16;

/// One touch of a `touchrace` plan.
#[derive(Debug, Clone)]
enum Touch {
    /// Reads a word of a page.
    Read(usize, usize),
    /// Writes the thread's own word of a page.
    Write(usize, u64),
    /// Prefetches a run of pages (announced: the first fault takes the run).
    Prefetch(std::ops::Range<usize>),
    /// Copies a run of pages out (announced).
    ReadSlice(std::ops::Range<usize>),
    /// Copies whole pages of a run that this thread alone writes in (announced).
    WriteSlice(std::ops::Range<usize>),
}

impl Touch {
    fn pages(&self) -> std::ops::Range<usize> {
        match self {
            Touch::Read(p, _) | Touch::Write(p, _) => *p..*p + 1,
            Touch::Prefetch(run) | Touch::ReadSlice(run) | Touch::WriteSlice(run) => run.clone(),
        }
    }
}

/// Numbers drawn from a seed, the same at every rank.
struct Draws {
    seed: u64,
    drawn: u64,
}

impl Draws {
    fn new(seed: &[u64]) -> Draws {
        Draws {
            seed: mix(seed),
            drawn: 0,
        }
    }

    /// A number in `0..k`.
    fn below(&mut self, k: usize) -> usize {
        self.drawn += 1;
        (mix(&[self.seed, self.drawn]) % k as u64) as usize
    }
}

/// What one `touchrace` round does, drawn from the round's number alone, so that every rank knows every
/// thread's plan: which pages one thread writes whole (`whole[p]`, in a run of its plan's), and each
/// thread's touches, in its order. Threads are numbered `rank * threads + thread`; thread `w` writes word
/// `1 + w` of the pages nobody writes whole.
struct Round {
    whole: Vec<bool>,
    plans: Vec<Vec<Touch>>,
}

impl Round {
    fn draw(round: usize, writers: usize) -> Round {
        let mut d = Draws::new(&[0x70c4, round as u64]);
        let mut whole = vec![false; RACE_PAGES];
        let mut runs = vec![Vec::new(); writers];
        for segment in (0..RACE_PAGES).step_by(RACE_SEGMENT) {
            if d.below(3) == 0 {
                let len = 1 + d.below(RACE_SEGMENT);
                let start = segment + d.below(RACE_SEGMENT - len + 1);
                let w = d.below(writers);
                whole[start..start + len].fill(true);
                runs[w].push(start..start + len);
            }
        }
        let run = |d: &mut Draws| {
            let start = d.below(RACE_PAGES);
            start..(start + 1 + d.below(RACE_RUN)).min(RACE_PAGES)
        };
        let plans = (0..writers)
            .map(|w| {
                let mut d = Draws::new(&[0x70c5, round as u64, w as u64]);
                let mut plan: Vec<Touch> = (0..RACE_TOUCHES)
                    .map(|i| {
                        let p = d.below(RACE_PAGES);
                        match d.below(8) {
                            3 | 4 if !whole[p] => {
                                Touch::Write(p, mix(&[round as u64, w as u64, i as u64]) | 1)
                            }
                            5 => Touch::Prefetch(run(&mut d)),
                            6 => Touch::ReadSlice(run(&mut d)),
                            _ => Touch::Read(p, d.below(WORDS_PER_PAGE)),
                        }
                    })
                    .collect();
                for r in std::mem::take(&mut runs[w]) {
                    let at = d.below(plan.len() + 1);
                    plan.insert(at, Touch::WriteSlice(r));
                }
                plan
            })
            .collect();
        Round { whole, plans }
    }

    /// The words of a page written whole, word by word.
    fn whole_word(round: usize, p: usize, word: usize) -> u64 {
        mix(&[round as u64, p as u64, word as u64]) | 1
    }

    /// What page `p`'s word `word` holds once every thread has done its plan.
    fn word(&self, round: usize, p: usize, word: usize) -> u64 {
        if self.whole[p] {
            return Round::whole_word(round, p, word);
        }
        let Some(plan) = word.checked_sub(1).and_then(|w| self.plans.get(w)) else {
            return 0;
        };
        plan.iter()
            .rev()
            .find_map(|t| match *t {
                Touch::Write(q, value) if q == p => Some(value),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// The ranks whose threads touch each page, as bits (rank r is bit r).
    fn touchers(&self, threads: usize) -> Vec<u64> {
        let mut by = vec![0u64; RACE_PAGES];
        for (w, plan) in self.plans.iter().enumerate() {
            for p in plan.iter().flat_map(Touch::pages) {
                by[p] |= 1 << (w / threads);
            }
        }
        by
    }
}

/// First touches at random, many at once: round after round, a fresh first-touch region is touched by
/// every thread of every rank (`--threads` per rank) at once, each following a plan drawn from the
/// round's number: reads of any word, writes of its own word of a page, prefetches and copies out of
/// runs of pages (which the first fault takes whole), and copies that write whole the runs the plan
/// gives that thread alone. After a barrier, before anything else is read: a home this rank knows is
/// that of a rank that touched the page, and a page nobody touched has none. Then every rank reads the
/// whole region (its pages nobody touched are touched now, by every rank at once): every word is what
/// the plans wrote last, every rank knows a home for every page, the same one, which did not change
/// since it was first known, and belongs to a rank that touched the page (the only one, when one did).
pub(crate) fn touchrace(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm,
        me,
        n,
        model,
        args,
        ..
    } = *c;
    ensure!(n > 1, "touchrace needs at least 2 ranks");
    ensure!(
        n <= 64,
        "touchrace keeps the ranks that touched a page as 64 bits: run it at 64 ranks or fewer"
    );
    let threads = args.threads;
    ensure!(
        (1..WORDS_PER_PAGE).contains(&(n * threads)),
        "touchrace gives each thread a word of a page: use fewer than {WORDS_PER_PAGE} threads in all"
    );
    let seen = dsm.alloc_vec_in::<u64>(n * RACE_PAGES, dsm::Placement::At(dsm::Rank(0)), model)?;
    let rank_of = |h: Option<dsm::Rank>| h.map(|h| h.0 as usize);
    for round in 0..args.rounds {
        let plan = Round::draw(round, n * threads);
        let touchers = plan.touchers(threads);
        let v = dsm.alloc_vec_in::<u64>(
            RACE_PAGES * WORDS_PER_PAGE,
            dsm::Placement::FirstTouch,
            model,
        )?;
        // (Allocation ends once every rank can serve the region: the touches start at once.)
        on_threads(threads, |t| {
            let w = me * threads + t;
            let mut buffer = vec![0u64; RACE_RUN * WORDS_PER_PAGE];
            for touch in &plan.plans[w] {
                let words = |run: &std::ops::Range<usize>| {
                    run.start * WORDS_PER_PAGE..run.end * WORDS_PER_PAGE
                };
                match touch {
                    Touch::Read(p, word) => {
                        v.get(p * WORDS_PER_PAGE + word);
                    }
                    Touch::Write(p, value) => v.set(p * WORDS_PER_PAGE + 1 + w, *value),
                    Touch::Prefetch(run) => v.prefetch(words(run)),
                    Touch::ReadSlice(run) => {
                        v.read_slice(run.start * WORDS_PER_PAGE, &mut buffer[..words(run).len()])
                    }
                    Touch::WriteSlice(run) => {
                        let whole: Vec<u64> = words(run)
                            .map(|i| {
                                Round::whole_word(round, i / WORDS_PER_PAGE, i % WORDS_PER_PAGE)
                            })
                            .collect();
                        v.write_slice(run.start * WORDS_PER_PAGE, &whole);
                    }
                }
            }
            Ok(())
        })?;
        dsm.barrier()?;
        let toucher = |p: usize, h: usize| touchers[p] >> h & 1 == 1;
        let touched_by = |p: usize| match (0..n).filter(|&r| toucher(p, r)).collect::<Vec<_>>() {
            ranks if ranks.is_empty() => "no rank touched".to_string(),
            ranks => format!("only the ranks {ranks:?} touched"),
        };
        let known: Vec<Option<usize>> = (0..RACE_PAGES)
            .map(|p| rank_of(v.region().home_of(dsm::PageId(p as u64))))
            .collect();
        for (p, h) in known.iter().enumerate() {
            if let Some(h) = *h {
                ensure!(
                    toucher(p, h),
                    "round {round}: rank {me} knows rank {h} for the home of page {p}, which {}",
                    touched_by(p)
                );
            }
        }
        // (Every rank has looked before any reads the pages nobody touched.)
        dsm.barrier()?;
        let mut words = vec![0u64; RACE_PAGES * WORDS_PER_PAGE];
        v.read_slice(0, &mut words);
        for (i, &got) in words.iter().enumerate() {
            let (p, word) = (i / WORDS_PER_PAGE, i % WORDS_PER_PAGE);
            let want = plan.word(round, p, word);
            ensure!(
                got == want,
                "round {round}: rank {me} reads {got:#x} in word {word} of page {p}, where the last \
                 write left {want:#x}"
            );
        }
        for (p, &before) in known.iter().enumerate() {
            let h = rank_of(v.region().home_of(dsm::PageId(p as u64))).with_context(|| {
                format!("round {round}: rank {me} read page {p} and knows no home for it")
            })?;
            if let Some(before) = before {
                ensure!(
                    before == h,
                    "round {round}: rank {me} knew rank {before} for the home of page {p}, now rank {h}"
                );
            }
            ensure!(
                touchers[p] == 0 || toucher(p, h),
                "round {round}: rank {me} knows rank {h} for the home of page {p}, which {} before \
                 the barrier",
                touched_by(p)
            );
            seen.set(me * RACE_PAGES + p, h as u64);
        }
        dsm.barrier()?;
        if me == 0 {
            for p in 0..RACE_PAGES {
                let homes: Vec<u64> = (0..n).map(|r| seen.get(r * RACE_PAGES + p)).collect();
                ensure!(
                    homes.iter().all(|&h| h == homes[0]),
                    "round {round}: the ranks know the homes {homes:?} for page {p}"
                );
            }
        }
        // (Rank 0 has read `seen` before the next round writes it.)
        dsm.barrier()?;
    }
    println!("touchrace ok: {} rounds", args.rounds);
    Ok(())
}
