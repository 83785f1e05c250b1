//! A job of one rank: real userfaultfd faults on pages homed here (first touch, read then write upgrade),
//! locks through the rank's own service loop, barriers without messages, and statistics that count what happened.

use dsm::{Dsm, Placement};

#[test]
fn one_rank_reads_zeros_writes_and_counts_faults() {
    // Read-ahead off: one fault per page touched (no zero fill ahead of a sequential first touch).
    let dsm = Dsm::builder()
        .readahead(1)
        .build()
        .expect("a job of one rank");
    let v = dsm.alloc_vec::<u64>(4096).unwrap();
    // Read first: a missing fault installs a zero page read-only; the write then upgrades it.
    assert_eq!(v.get(1000), 0);
    v.set(1000, 7);
    assert_eq!(v.get(1000), 7);
    for i in 0..v.len() {
        v.set(i, i as u64 * 3);
    }
    dsm.barrier().unwrap();
    for i in (0..v.len()).step_by(97) {
        assert_eq!(v.get(i), i as u64 * 3);
    }
    {
        let _g = dsm.lock(5).unwrap();
    }
    let s = dsm.stats();
    assert_eq!(s.read_faults, 1, "{s}");
    assert_eq!(s.upgrade_faults, 1, "{s}");
    // 4096 u64 = 8 pages; one was touched by the read above.
    assert_eq!(s.write_faults, 7, "{s}");
    assert_eq!(s.lock_acquires, 1);
    assert!(s.barriers >= 1);
}

#[test]
fn one_rank_barriers_send_nothing_and_release_consistency_keeps_its_writes() {
    let dsm = Dsm::builder().build().unwrap();
    let v = dsm
        .alloc_vec_in::<u64>(8 * 512, Placement::Block, dsm::Consistency::Release)
        .unwrap();
    dsm.barrier().unwrap();
    let before = dsm.stats();
    for round in 1..=50u64 {
        for i in (0..v.len()).step_by(64) {
            v.set(i, round * i as u64);
        }
        dsm.barrier().unwrap();
    }
    let after = dsm.stats();
    assert_eq!(
        after.messages_sent, before.messages_sent,
        "a barrier of one rank needs no message: {after}"
    );
    assert_eq!(after.barriers, before.barriers + 50);
    for i in (0..v.len()).step_by(64) {
        assert_eq!(v.get(i), 50 * i as u64);
    }
    // A lock of one rank still works after those barriers.
    drop(dsm.lock(1).unwrap());
}

#[test]
fn a_sequential_first_touch_fills_pages_ahead_and_a_scattered_one_does_not() {
    use dsm::Consistency::{Release, Sequential};
    for model in [Sequential, Release] {
        let dsm = Dsm::builder().build().unwrap();
        let pages = 1024;
        let v = dsm
            .alloc_vec_in::<u64>(pages * 512, Placement::Block, model)
            .unwrap();
        // In order: the fill doubles up to 64 pages per fault.
        for p in 0..pages {
            v.set(p * 512 + 1, p as u64);
        }
        let s = dsm.stats();
        let faults = s.read_faults + s.write_faults + s.upgrade_faults;
        assert!(
            faults <= 32,
            "{model:?}: {faults} faults for {pages} pages: {s}"
        );
        assert_eq!(s.pages_zero_filled + faults, pages as u64, "{model:?}: {s}");
        for p in 0..pages {
            assert_eq!(v.get(p * 512 + 1), p as u64);
            assert_eq!(v.get(p * 512), 0);
        }
        // Every other page of a second region: no page is sequential, so nothing is filled ahead and
        // the pages between stay untouched (a fault each when touched later).
        let w = dsm
            .alloc_vec_in::<u64>(pages * 512, Placement::Block, model)
            .unwrap();
        let before = dsm.stats();
        for p in (0..pages).step_by(2) {
            w.set(p * 512, 1);
        }
        let after = dsm.stats();
        assert_eq!(
            after.write_faults - before.write_faults,
            pages as u64 / 2,
            "{model:?}"
        );
        assert_eq!(
            after.pages_zero_filled, before.pages_zero_filled,
            "{model:?}"
        );
        // The pages between were left untouched: reading each is a fault of its own.
        for p in (1..pages).step_by(2) {
            assert_eq!(w.get(p * 512), 0);
        }
        let reads = dsm.stats().read_faults - after.read_faults;
        assert_eq!(reads, pages as u64 / 2, "{model:?}");
    }
}

#[test]
fn a_first_touch_takes_its_own_page_or_the_run_a_copy_announced() {
    use dsm::Consistency::{Release, Sequential};
    use dsm::{PageId, Rank};
    for model in [Sequential, Release] {
        let dsm = Dsm::builder().build().unwrap();
        let pages = 256;
        let v = dsm
            .alloc_vec_in::<u64>(pages * 512, Placement::FirstTouch, model)
            .unwrap();
        let home = |p: usize| v.region().home_of(PageId(p as u64));
        assert!((0..pages).all(|p| home(p).is_none()), "{model:?}");
        let faults = || {
            let s = dsm.stats();
            s.read_faults + s.write_faults + s.upgrade_faults
        };
        // One copy of 100 pages: its first fault takes all of them, and the fills cover them in
        // windows of at most 64 pages.
        let words: Vec<u64> = (0..100 * 512).map(|i| i as u64).collect();
        v.write_slice(0, &words);
        let copied = faults();
        assert!(
            copied <= 2,
            "{model:?}: {copied} faults for a copy of 100 pages"
        );
        assert!((0..100).all(|p| home(p) == Some(Rank(0))), "{model:?}");
        assert!((100..pages).all(|p| home(p).is_none()), "{model:?}");
        // Page by page, in order: nothing announced, so each fault takes its own page only.
        for p in 100..200 {
            v.set(p * 512 + 3, p as u64);
        }
        assert_eq!(faults() - copied, 100, "{model:?}: {}", dsm.stats());
        assert!((100..200).all(|p| home(p) == Some(Rank(0))), "{model:?}");
        assert!((200..pages).all(|p| home(p).is_none()), "{model:?}");
        for p in 0..200 {
            let at = p * 512 + 3;
            let want = if p < 100 { at as u64 } else { p as u64 };
            assert_eq!(v.get(at), want, "{model:?}: page {p}");
        }
    }
}

#[test]
fn a_large_region_costs_nothing_until_touched() {
    let dsm = Dsm::builder().build().unwrap();
    let v = dsm.alloc_vec_with::<u8>(4 << 30, Placement::Block).unwrap();
    assert_eq!(v.region().len(), 4 << 30);
    assert_eq!(resident_pages(v.region().as_ptr(), 4 << 30), 0);
    // One page touched in the middle, then read back, and the last byte.
    v.set(3 << 30, 7);
    assert_eq!(v.get(3 << 30), 7);
    v.set((4 << 30) - 1, 9);
    assert_eq!(v.get((4 << 30) - 1), 9);
    // Counted in the region's own pages: other tests of this process allocate at the same time.
    let resident = resident_pages(v.region().as_ptr(), 4 << 30);
    assert!(
        (2..=16).contains(&resident),
        "a 4 GiB region with two pages touched has {resident} pages in memory"
    );
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let e = Dsm::builder().readahead(0).build().unwrap_err();
    assert!(e.to_string().contains("read-ahead"), "{e}");
    let e = Dsm::builder()
        .notice_memory(dsm::MIN_NOTICE_MEMORY - 1)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("notice memory"), "{e}");
    let e = Dsm::builder().rank(dsm::Rank(3), 2).build().unwrap_err();
    assert!(e.to_string().contains("rank 3"), "{e}");
    let dsm = Dsm::builder().arena(None, 1 << 20).build().unwrap();
    let e = dsm.alloc(2 << 20, Placement::Cyclic).unwrap_err();
    assert!(e.to_string().contains("DSM_ARENA_SIZE"), "{e}");
}

/// A type aligned past a page: regions start on a page, so it cannot be placed in one.
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(8192))]
struct TwoPages([u8; 4096], [u8; 4096]);

#[test]
fn allocations_that_cannot_be_made_are_clear_errors() {
    let dsm = Dsm::builder().build().unwrap();
    for e in [
        dsm.alloc(usize::MAX, Placement::Cyclic).unwrap_err(),
        dsm.alloc_vec::<u64>(usize::MAX / 4).unwrap_err(),
    ] {
        assert!(e.to_string().contains("overflow the address space"), "{e}");
    }
    let e = dsm.alloc_vec::<TwoPages>(4).unwrap_err();
    assert!(e.to_string().contains("aligned to 8192 bytes"), "{e}");
    let e = dsm.alloc(4096, Placement::BlockCyclic(0)).unwrap_err();
    assert!(
        e.to_string()
            .contains("Placement::BlockCyclic(n) with n >= 1"),
        "{e}"
    );
    // Still usable afterwards.
    let v = dsm.alloc_vec::<u64>(8).unwrap();
    v.set(3, 9);
    assert_eq!(v.get(3), 9);
}

/// How many pages of `start..start + len` are in memory (mapped in this process).
fn resident_pages(start: *mut u8, len: usize) -> usize {
    let mut in_memory = vec![0u8; len.div_ceil(dsm::PAGE_SIZE)];
    // SAFETY: `start..start + len` is a region this test holds, page-aligned, and `in_memory` has one
    // byte for each of its pages, as mincore(2) writes.
    let r = unsafe { libc::mincore(start.cast(), len, in_memory.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    in_memory.iter().filter(|&&b| b & 1 == 1).count()
}

#[test]
fn a_selective_range_outside_its_region_is_refused_and_an_empty_one_is_nothing() {
    let dsm = Dsm::builder().build().unwrap();
    let pages = 4;
    for model in [dsm::Consistency::Release, dsm::Consistency::Sequential] {
        let v = dsm
            .alloc_vec_in::<u64>(pages * 512, Placement::Block, model)
            .unwrap();
        let region = v.region();
        let len = region.len();
        for bad in [0..len + 1, len..len + 8] {
            let e = region.release_range(bad.clone()).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "release_range of bytes {}..{}",
                    bad.start, bad.end
                )) && e.contains(&format!("a region of {len} bytes")),
                "{e}"
            );
            let e = region.acquire_range(bad).unwrap_err().to_string();
            assert!(e.contains("acquire_range of bytes"), "{e}");
        }
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 100..10;
        assert!(region.release_range(backwards).is_err());
        // Empty, or the whole region: fine (a job of one rank homes every page, so there is nothing to
        // send or drop).
        region.release_range(8..8).unwrap();
        v.set(0, 5);
        region.release_range(0..len).unwrap();
        region.acquire_range(0..len).unwrap();
        v.release_range(0..v.len()).unwrap();
        v.acquire_range(1..3).unwrap();
        assert_eq!(v.get(0), 5);
        let s = dsm.stats();
        match model {
            dsm::Consistency::Release => assert!(
                s.selective_releases >= 2 && s.selective_acquires >= 2,
                "{s}"
            ),
            dsm::Consistency::Sequential => {}
        }
    }
}

#[test]
fn a_child_process_forked_by_a_rank_has_no_shared_memory() {
    let dsm = Dsm::builder().build().unwrap();
    let v = dsm.alloc_vec::<u64>(1024).unwrap();
    v.set(0, 7);
    let word = v.region().as_ptr() as *const u64;
    // SAFETY: the child only reads one word and ends with `_exit`, both async-signal-safe, so the locks
    // other threads of this test process may have held at the fork do not matter.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: reading the region's first word, present in the parent: in the child the range must not
        // be mapped at all, and the read must kill it.
        let seen = unsafe { std::ptr::read_volatile(word) };
        // SAFETY: ends the child at once, without running anything of the parent's.
        unsafe { libc::_exit(if seen == 7 { 10 } else { 11 }) };
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
        "the child read the region (status {status:#x}: exit 10 = its parent's copy, 11 = zeros)"
    );
    assert_eq!(v.get(0), 7);
}

/// `DSM_STATS` is read when a `Dsm` is built, so that a program that builds its own (not through
/// `Runtime::init`, which checks it too) gets a misspelt value as an error, and `1` still prints the
/// statistics as the rank leaves. The variable is the process's: each case runs in a child process of
/// this test binary, running this test alone.
#[test]
fn dsm_stats_is_checked_by_the_builder_and_prints_at_exit() {
    if std::env::var_os("DSM_STATS_TEST_CHILD").is_some() {
        match Dsm::builder().build() {
            Ok(dsm) => {
                println!("built");
                drop(dsm);
            }
            Err(e) => println!("refused: {e}"),
        }
        return;
    }
    let run = |value: &str| {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "dsm_stats_is_checked_by_the_builder_and_prints_at_exit",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("DSM_STATS_TEST_CHILD", "1")
            .env("DSM_STATS", value)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, _) = run("yes");
    assert!(
        stdout
            .contains("refused: invalid configuration: DSM_STATS=\"yes\" is not valid: expected 1"),
        "{stdout}"
    );
    let (stdout, stderr) = run("1");
    assert!(stdout.contains("built"), "{stdout}");
    assert!(stderr.contains("dsm stats, rank 0"), "{stderr}");
    let (stdout, stderr) = run(" 0 ");
    assert!(
        stdout.contains("built") && !stderr.contains("dsm stats"),
        "{stdout}{stderr}"
    );
}
