//! Checks of how a job fails: a rank that dies, stops, freezes, panics, quits or loses its network, under
//! the default fail-fast policy and under --keep-going (pages and homes left behind by a dead rank).

use crate::*;

/// Ranks 1 and 2 write one page homed at rank 0 in turn, so that every write moves the page
/// through a transaction rank 0 grants; rank 1 dies at a random moment, often in the middle of
/// one. Run under --keep-going: rank 2 must then either finish its writes or fail with an error
/// naming rank 1 (the page it needs may have died with it), and never wait for ever.
pub(crate) fn diewriting(c: &Check) -> anyhow::Result<()> {
    let Check {
        dsm, me, n, args, ..
    } = *c;
    anyhow::ensure!(n >= 3, "diewriting needs 3 ranks");
    let page = dsm.alloc_vec_with::<u64>(WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
    let done = dsm.alloc_vec_with::<u64>(WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
    dsm.barrier()?;
    match me {
        0 => {
            let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                if done.get(0) != 0 {
                    done.set(1, 1); // rank 2 may leave now; this rank leaves after it
                    while !has_failed(dsm, 2) {
                        ensure!(std::time::Instant::now() < limit, "rank 2 did not leave");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    println!("diewriting: rank 2 finished");
                    break;
                }
                if has_failed(dsm, 2) {
                    println!("diewriting: rank 2 failed");
                    break;
                }
                ensure!(
                    std::time::Instant::now() < limit,
                    "rank 2 neither finished nor failed in 30 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        1 => {
            let ms = 20 + std::process::id() as u64 % 30;
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                nix_kill_self();
            });
            for i in 0.. {
                page.set(1, i);
            }
        }
        _ => {
            // Writes while rank 1 lives, then `rounds` more.
            let mut i = 0u64;
            while !has_failed(dsm, 1) {
                page.set(2, i);
                i += 1;
            }
            for k in 0..args.rounds as u64 {
                page.set(2, i + k);
            }
            done.set(0, 1);
            println!(
                "diewriting: rank 2 wrote {} times after rank 1 died",
                args.rounds
            );
            // Stays until rank 0 has seen the flag (the page is this rank's until then).
            let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while done.get(1) == 0 && std::time::Instant::now() < limit {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    std::process::exit(0);
}

/// Rank 2 reads two pages homed at rank 0 (so it is in their copysets) and dies. Then rank 0
/// writes the first (its own fault path) and rank 1 the second (a grant from the home): a
/// writer told to have the dead rank's copy dropped failed, and ended its rank.
pub(crate) fn readerdies(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    anyhow::ensure!(n == 3, "readerdies needs 3 ranks");
    let v = dsm.alloc_vec_with::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
    if me == 0 {
        v.set(0, 1);
        v.set(WORDS_PER_PAGE, 1);
    }
    dsm.barrier()?;
    if me == 2 {
        ensure!(
            v.get(0) + v.get(WORDS_PER_PAGE) == 2,
            "rank 2 read stale pages"
        );
    }
    dsm.barrier()?;
    let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
    let failed = |r: u32| has_failed(dsm, r);
    match me {
        2 => nix_kill_self(),
        1 => {
            until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
            v.set(WORDS_PER_PAGE, 21);
            println!("readerdies: rank 1 wrote a page the dead rank had read");
            until("rank 0 did not leave in 30 s", &|| failed(0))?;
        }
        _ => {
            until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
            v.set(0, 10);
            println!("readerdies: the home wrote a page the dead rank had read");
            until("rank 1's write did not show in 30 s", &|| {
                v.get(WORDS_PER_PAGE) == 21
            })?;
            ensure!(v.get(0) == 10, "the home lost its own write");
        }
    }
    std::process::exit(0);
}

/// Rank 2 writes a page homed at rank 0, so that it holds the page's only copy, and dies. Rank
/// 1 then reads the page (a request to its home), and rank 0 once rank 1 has ended (its own
/// fault path): each fault must end its rank saying that the page's data left the job with
/// rank 2 (they used to say that sending to rank 2 failed).
pub(crate) fn datalost(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    anyhow::ensure!(n == 3, "datalost needs 3 ranks");
    let v = dsm.alloc_vec_with::<u64>(WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
    if me == 2 {
        v.set(0, 7);
    }
    dsm.barrier()?;
    rank_2_dies(dsm, me)?;
    if me == 0 {
        within_30_s(me, "rank 1 did not end in 30 s", &|| has_failed(dsm, 1))?;
    }
    println!("datalost: rank {me} reads the page");
    let got = v.get(0);
    anyhow::bail!("rank {me} read {got} from a page whose only copy left the job");
}

/// Rank 2 writes two pages homed at rank 0 (it owns them); rank 0 reads the first and rank 1
/// the second (each a read-only copy, the owner's downgraded), and rank 2 dies. Rank 1 then
/// reads the first and rank 0 writes the second: both used to be sent to fetch the page
/// from the dead owner, and failed, while a copy lived on.
pub(crate) fn ownerdies(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    anyhow::ensure!(n == 3, "ownerdies needs 3 ranks");
    let v = dsm.alloc_vec_with::<u64>(2 * WORDS_PER_PAGE, dsm::Placement::At(dsm::Rank(0)))?;
    let (first, second) = (0, WORDS_PER_PAGE);
    if me == 2 {
        v.set(first, 7);
        v.set(second, 8);
    }
    dsm.barrier()?;
    match me {
        0 => ensure!(v.get(first) == 7, "the home read a stale page"),
        1 => ensure!(v.get(second) == 8, "rank 1 read a stale page"),
        _ => {}
    }
    dsm.barrier()?;
    let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
    let failed = |r: u32| has_failed(dsm, r);
    rank_2_dies(dsm, me)?;
    // A rank is failed at the end of its first connection, and gone (its copies with it) at the
    // end of its service loop's, which the home reads in the same pass when a process dies. The
    // pause lets the home see it gone before its own write: a write granted before would find
    // the owner gone only after asking rank 1 to drop its copy, the page's last (rank 1's read
    // needs no pause: a grant that asked nobody else is abandoned and asked again).
    std::thread::sleep(std::time::Duration::from_millis(100));
    if me == 1 {
        ensure!(
            v.get(first) == 7,
            "rank 1 read a wrong copy of the dead owner's page"
        );
        println!("ownerdies: rank 1 read the dead owner's page from the home's copy");
        until("rank 0's write did not show in 30 s", &|| {
            v.get(second) == 9
        })?;
        v.set(first, 11);
        until("rank 0 did not leave in 30 s", &|| failed(0))?;
    } else {
        v.set(second, 9);
        println!("ownerdies: the home wrote the dead owner's page from rank 1's copy");
        until("rank 1's write did not show in 30 s", &|| {
            v.get(first) == 11
        })?;
    }
    std::process::exit(0);
}

/// Rank 0 writes a page homed at rank 2, then one homed at rank 1, so that one release sends a
/// diff to each, rank 2's first; rank 2 has died by then. The release fails naming rank 2, rank
/// 1 applies its diff, and rank 0 reads pages from rank 1 afterwards: the channel of the release
/// must go back to the pool with rank 1's acknowledgement read (left there, it was taken for the
/// answer to a later page fetch, and the rank ended).
pub(crate) fn diffhomedies(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    anyhow::ensure!(n == 3, "diffhomedies needs 3 ranks");
    let pages = 48; // page p homed at rank p % 3
    let v = dsm.alloc_vec_in::<u64>(
        pages * WORDS_PER_PAGE,
        dsm::Placement::Cyclic,
        dsm::Consistency::Release,
    )?;
    if me == 0 {
        // Copies of both pages, so that writing them later needs no home.
        ensure!(v.get(2 * WORDS_PER_PAGE) + v.get(WORDS_PER_PAGE) == 0);
    }
    if me == 1 {
        // A copy of page 3 (homed at rank 0), which rank 0 writes in the failing release.
        ensure!(v.get(3 * WORDS_PER_PAGE) == 0);
    }
    dsm.barrier()?;
    let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
    let failed = |r: u32| has_failed(dsm, r);
    match me {
        2 => nix_kill_self(),
        1 => {
            until("rank 0's diff did not arrive in 30 s", &|| {
                v.get(WORDS_PER_PAGE) == 11
            })?;
            println!("diffhomedies: rank 1 applied rank 0's diff");
            // The lock the failed release passed on tells its next holder what reached the
            // homes: rank 0's write of page 3 did, and this rank's copy of it is dropped.
            let guard = dsm.lock(0)?;
            ensure!(
                v.get(3 * WORDS_PER_PAGE) == 13,
                "rank 1 read page 3 stale after taking the lock rank 0 wrote it under"
            );
            v.set(6 * WORDS_PER_PAGE, 1); // homed at rank 0: rank 0 may leave
            guard.unlock()?;
            println!("diffhomedies: rank 1 read what rank 0 wrote under the lock");
            until("rank 0 did not leave in 30 s", &|| failed(0))?;
        }
        _ => {
            until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
            let guard = dsm.lock(0)?; // homed here
            v.set(2 * WORDS_PER_PAGE, 7);
            v.set(WORDS_PER_PAGE, 11);
            v.set(3 * WORDS_PER_PAGE, 13);
            let Err(e) = guard.unlock() else {
                anyhow::bail!("a release with a diff for a dead home succeeded");
            };
            ensure!(e.to_string().contains("rank 2"), "the release failed: {e}");
            // Faults on the pages homed at rank 1, one page each, over every channel.
            for p in (4..pages).step_by(3) {
                ensure!(v.get(p * WORDS_PER_PAGE) == 0, "page {p} is not zero");
            }
            ensure!(v.get(WORDS_PER_PAGE) == 11, "rank 0 lost its own write");
            println!("diffhomedies: the release failed naming rank 2, and rank 0 went on");
            until("rank 1 did not take the lock after rank 0 in 30 s", &|| {
                v.get(6 * WORDS_PER_PAGE) == 1
            })?;
        }
    }
    std::process::exit(0);
}

pub(crate) fn releaseafterdeath(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    anyhow::ensure!(n == 4, "releaseafterdeath needs 4 ranks");
    const ROUNDS: u64 = 40;
    // Allocated first, so flushed first: the page homed at rank 2.
    let dead = dsm.alloc_vec_in::<u64>(
        WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(2)),
        dsm::Consistency::Release,
    )?;
    // Page 0 (P) rank 1 writes once; page 1 (Q) at every round.
    let v = dsm.alloc_vec_in::<u64>(
        2 * WORDS_PER_PAGE,
        dsm::Placement::At(dsm::Rank(0)),
        dsm::Consistency::Release,
    )?;
    if me == 1 {
        // A copy, so that writing it later needs no home.
        ensure!(dead.get(0) == 0);
    }
    dsm.barrier()?;
    let until = |what: &str, done: &dyn Fn() -> bool| within_30_s(me, what, done);
    let failed = |r: u32| has_failed(dsm, r);
    match me {
        2 => nix_kill_self(),
        1 => {
            until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
            for round in 1..=ROUNDS {
                let guard = dsm.lock(0)?;
                if round == 1 {
                    dead.set(0, 1);
                    v.set(0, 42);
                }
                v.set(WORDS_PER_PAGE, round);
                let Err(e) = guard.unlock() else {
                    anyhow::bail!("a release with a diff for a dead home succeeded");
                };
                ensure!(e.to_string().contains("rank 2"), "the release failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            println!("releaseafterdeath: every release of rank 1 failed naming rank 2");
            until("rank 3 did not finish in 30 s", &|| failed(3))?;
        }
        3 => {
            until("rank 2's death was not noticed in 30 s", &|| failed(2))?;
            // Under the lock, Q changes once for each of rank 1's releases seen: each time, the
            // copy of Q is dropped, and P's only the first time it is named.
            let (mut last, mut changes) = (0, 0u64);
            while last < ROUNDS {
                let guard = dsm.lock(0)?;
                let (p, q) = (v.get(0), v.get(WORDS_PER_PAGE));
                guard.unlock()?;
                ensure!(q == 0 || p == 42, "rank 3 read P stale ({p}) in round {q}");
                if q != last {
                    (last, changes) = (q, changes + 1);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let dropped = dsm.stats().acquire_invalidations;
            ensure!(
                dropped <= changes + 2,
                "rank 3 dropped {dropped} copies at acquires for {changes} releases of rank 1 it saw: P named again at every one"
            );
            println!("releaseafterdeath: rank 3 dropped {dropped} copies for {changes} releases");
        }
        _ => {
            until(
                "rank 1's write of a page homed here did not arrive in 30 s",
                &|| v.get(0) == 42,
            )?;
            println!("releaseafterdeath: rank 1's write reached its home past the dead one");
            until("ranks 1 and 3 did not finish in 30 s", &|| {
                failed(1) && failed(3)
            })?;
        }
    }
    std::process::exit(0);
}

/// A SIGBUS sent to a rank (not raised by a fault) must take its default action, killing the
/// rank, even though dsm handles SIGBUS for its page faults.
pub(crate) fn sentsigbus(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    last_rank_leaves(dsm, "the signalled rank", || match nix::sys::signal::raise(
        nix::sys::signal::Signal::SIGBUS,
    ) {
        Ok(()) => anyhow::anyhow!("rank {me}: a SIGBUS sent to this rank was swallowed"),
        Err(e) => e.into(),
    })
}

/// Rank 1 ends with status 0 without leaving the job (`process::exit`, no `Runtime::finish`)
/// while rank 0 waits for it: the launcher must name rank 1, not rank 0, which ends because
/// rank 1 went.
pub(crate) fn quitwaited(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    dsm.barrier()?;
    if me == 1 {
        std::process::exit(0);
    }
    within_30_s(me, "rank 1 neither wrote nor was seen to go", &|| {
        v.get(0) != 0
    })?;
    anyhow::bail!("rank {me}: rank 1 wrote after all");
}

/// Rank 1 gives up while rank 0 waits, outside any barrier, for a word only rank 1 would write:
/// by a panic, or by returning an error from `main` (dropping its region and its `Runtime` as at
/// a normal end). Neither the unwinding nor the drops may wait for rank 0 at a barrier (rank 0
/// never comes): the job then ends when rank 0 sees rank 1 fail, instead of both waiting for ever.
pub(crate) fn panic_or_error_waited(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, args, .. } = *c;
    let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    dsm.barrier()?;
    if me == 1 {
        if args.check == "panicwaited" {
            panic!("rank 1 gives up before writing");
        }
        anyhow::bail!("rank 1 gives up on an error before writing");
    }
    within_30_s(me, "rank 1 neither wrote nor was seen to fail", &|| {
        v.get(0) != 0
    })?;
    anyhow::bail!("rank {me}: rank 1 wrote after all");
}

pub(crate) fn die(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, .. } = *c;
    last_rank_leaves(dsm, "the dead rank", || nix_kill_self())
}

pub(crate) fn panicbarrier(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    dsm.barrier()?;
    if me == 0 {
        panic!("rank 0 gives up");
    }
    dsm.barrier()?;
    anyhow::bail!("rank {me}: a barrier completed without rank 0");
}

pub(crate) fn pause(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    let timeout: u64 = std::env::var("DSM_PEER_TIMEOUT")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .filter(|t| *t > 0)
        .context("the pause check needs DSM_PEER_TIMEOUT set to a few seconds")?;
    let pids = dsm.alloc_vec::<u64>(n)?;
    pids.set(me, u64::from(std::process::id()));
    dsm.barrier()?;
    if me == 0 {
        let list: Vec<String> = (0..n).map(|r| pids.get(r).to_string()).collect();
        let list = list.join(" ");
        // Every rank stopped at once, as a terminal's Ctrl-Z or a batch system's suspend does.
        // This rank waits for the shell, so the job is stopped while the others wait at the
        // barrier, and resumed before this rank comes to it.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "kill -STOP {list} && sleep {} && kill -CONT {list} && echo \"pause: the job was stopped for {} s\"",
                2 * timeout,
                2 * timeout
            ))
            .status()
            .context("running sh to stop the job")?;
        ensure!(status.success(), "stopping the job: {status}");
    }
    dsm.barrier()?;
    // After the pause, a second round of messages.
    pids.set(me, 0);
    dsm.barrier()?;
    ensure!((0..n).all(|r| pids.get(r) == 0), "a rank's write was lost");
    println!("pause ok");
    Ok(())
}

pub(crate) fn partition(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    ensure!(
        std::env::var("DSM_UNIX_SOCKETS").is_ok_and(|v| v.trim() == "off"),
        "partition cuts the ranks' TCP connections: run it with DSM_UNIX_SOCKETS=off, or the ranks connect through Unix sockets, which taking the interface down does not cut"
    );
    let v = dsm.alloc_vec::<u64>(WORDS_PER_PAGE)?;
    v.set(me, 1);
    dsm.barrier()?;
    if me == 0 {
        let down = std::process::Command::new("ip")
            .args(["link", "set", "lo", "down"])
            .status()
            .context("running ip (iproute2)")?;
        ensure!(down.success(), "ip link set lo down: {down}");
    }
    // Every rank arrives only once the link is down (the ranks share its network namespace), so that no
    // arrival crosses before it: rank 0's own arrival goes to its own service loop in memory, and would
    // otherwise complete the barrier with arrivals that came through in time.
    let up = |flags: &str| {
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).map(|f| f & 1 != 0)
    };
    let waiting = std::time::Instant::now();
    while up(&std::fs::read_to_string("/sys/class/net/lo/flags")?)? {
        ensure!(
            waiting.elapsed() < std::time::Duration::from_secs(10),
            "rank {me}: the loopback interface is still up 10 s after rank 0 took it down"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Nobody hears anybody from here: every rank waits at the barrier until it gives up.
    dsm.barrier()?;
    anyhow::bail!("rank {me}: a barrier completed across a network that is down");
}

/// Under --keep-going: the last rank stops for good; the others go on once they have given
/// up hearing from it, and finish.
pub(crate) fn stopkeep(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, n, .. } = *c;
    let last = n - 1;
    dsm.barrier()?;
    if me == last {
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP)?;
        anyhow::bail!("rank {me} went on after SIGSTOP");
    }
    within_30_s(me, "the stopped rank was not seen to fail", &|| {
        has_failed(dsm, last as u32)
    })?;
    println!("stopkeep: rank {me} went on without the stopped rank");
    Ok(())
}

pub(crate) fn freeze(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    last_rank_leaves(dsm, "the frozen rank", || match freeze_self() {
        Ok(()) => anyhow::anyhow!("rank {me} went on after freezing itself"),
        Err(e) => e.context("freeze: no cgroup v2 freezer here"),
    })
}

pub(crate) fn stop(c: &Check) -> anyhow::Result<()> {
    let Check { dsm, me, .. } = *c;
    last_rank_leaves(dsm, "the stopped rank", || {
        // Stopped until the launcher kills it: it closes nothing and says nothing.
        match nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP) {
            Ok(()) => anyhow::anyhow!("rank {me} went on after SIGSTOP"),
            Err(e) => e.into(),
        }
    })
}
