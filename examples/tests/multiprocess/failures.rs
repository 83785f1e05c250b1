//! Ranks that fail: a rank that panics, errs, exits, is stopped, frozen or killed, or cut off by the
//! network, and what the others see; jobs that keep going past a dead rank (`--keep-going`).

use super::*;

/// Runs `check` (`panicwaited` or `errorwaited`): rank 1 gives up, printing `says`, while rank 0 waits for it.
fn gives_up_while_another_waits(check: &str, says: &str) {
    let t = Instant::now();
    let (o, out) = job(CHECK, 2, &[check]);
    assert_ne!(o.code, 0, "{out}");
    assert!(out.contains(says), "{out}");
    assert_eq!(o.failed_rank, Some(1), "{out}");
    assert!(!out.contains("neither wrote"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn a_rank_that_panics_while_another_waits_on_it_ends_the_job() {
    gives_up_while_another_waits("panicwaited", "rank 1 gives up");
}

#[test]
fn a_rank_that_returns_an_error_while_another_waits_on_it_ends_the_job() {
    gives_up_while_another_waits("errorwaited", "rank 1 gives up on an error");
}

#[test]
fn a_service_that_touches_shared_memory_ends_its_rank_saying_why() {
    let t = Instant::now();
    let (o, out) = job(CHECK, 2, &["servicefault"]);
    assert_eq!(o.failed_rank, Some(0), "{out}");
    assert!(
        out.contains("a Service must not read or write shared regions"),
        "{out}"
    );
    assert!(!out.contains("the service answered"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn a_rank_that_exits_well_without_leaving_the_job_is_named() {
    let t = Instant::now();
    let (o, out) = job(CHECK, 2, &["quitwaited"]);
    assert_ne!(o.code, 0, "{out}");
    assert_eq!(o.failed_rank, Some(1), "{out}");
    assert!(o.reason.contains("without leaving the job"), "{}", o.reason);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn ranks_that_give_up_because_another_failed_end_as_its_consequence() {
    // Rank 0 panics; the others, waiting at a barrier, get an error and return it from `main`. They and
    // their service loops learn of the failure at about the same time: they used to end with a status of
    // their own (1, "Error: rank 0 failed" from `main`), which the launcher takes for a failure of theirs
    // and named as the cause whenever it came before rank 0's. Now they end as the failure's consequence,
    // their service loops saying why.
    for ranks in [2, 3] {
        let (o, out) = job(CHECK, ranks, &["panicbarrier"]);
        assert_eq!(o.failed_rank, Some(0), "{out}");
        assert_eq!(o.code, 101, "{out}");
        for r in 1..ranks {
            assert!(
                out.contains(&format!("[{r}] dsm: rank {r}: rank 0 failed")),
                "{out}"
            );
            assert!(!out.contains(&format!("[{r}] Error:")), "{out}");
        }
    }
}

#[test]
fn a_rank_whose_final_barrier_fails_is_a_failure_to_the_others() {
    // Rank 1 runs one round of `mp`, the others two: its final barrier meets their second round's, and
    // fails. It then left without a goodbye, so the others see it fail (under --keep-going they finish)
    // instead of waiting for it at their own final barrier for ever.
    let t = Instant::now();
    let line = format!(
        "if [ \"$DSM_RANK\" = 1 ]; then exec {CHECK} mp --rounds 1; fi; exec {CHECK} mp --rounds 2"
    );
    let (o, out) = launch_captured("/bin/sh", 3, &["-c", &line], &[], true);
    assert!(out.contains("collective mismatch"), "{out}");
    assert_ne!(o.code, 0, "{out}");
    assert!(!out.contains("time limit"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn lock_waiters_leave_a_channel_for_faults() {
    let t = Instant::now();
    let (outcome, out) = job_with_env(CHECK, 2, &["lockfault"], &[("DSM_CHANNELS", "2")]);
    assert_eq!(outcome.code, 0, "{out}");
    assert!(out.contains("lockfault ok"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_sigbus_sent_to_a_rank_kills_it_as_without_dsm() {
    let (outcome, out) = job(CHECK, 2, &["sentsigbus"]);
    assert_eq!(outcome.failed_rank, Some(1), "{outcome:?}\n{out}");
    assert_eq!(
        outcome.code,
        128 + 7,
        "killed by SIGBUS: {outcome:?}\n{out}"
    );
    assert!(!out.contains("swallowed"), "{out}");
}

#[test]
fn a_sigbus_a_rank_ignores_stays_ignored() {
    // The program ignored SIGBUS before dsm took it for its faults (here inherited from the shell): a
    // SIGBUS sent to it is still ignored, so `sentsigbus` finds it swallowed, as it would without dsm.
    let line = format!("trap '' BUS; exec {CHECK} sentsigbus");
    let (outcome, out) = launch_captured("/bin/sh", 2, &["-c", &line], &[], false);
    assert!(
        out.contains("[1] Error: rank 1: a SIGBUS sent to this rank was swallowed"),
        "{out}"
    );
    assert_eq!(outcome.failed_rank, Some(1), "{outcome:?}\n{out}");
}

#[test]
fn a_frozen_rank_that_runs_on_silent_is_named_after_the_peer_timeout() {
    // Frozen, not stopped: the launcher sees it running, and every other rank ending for want of it.
    let (outcome, out) = job_with_env(CHECK, 3, &["freeze"], &[("DSM_PEER_TIMEOUT", "2")]);
    let frozen_in = out
        .lines()
        .find_map(|l| l.strip_prefix("[2] freeze: in "))
        .map(str::to_string);
    if let Some(dir) = &frozen_in {
        // The rank was killed: its cgroup empties, and goes.
        let gone = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::remove_dir(dir).is_ok()
        });
        assert!(gone, "{dir} was not removed");
    }
    if out.contains("freeze: no cgroup v2 freezer here") && frozen_in.is_none() {
        eprintln!("skipped: this machine gives no cgroup v2 freezer to root:\n{out}");
        return;
    }
    assert_eq!(outcome.failed_rank, Some(2), "{outcome:?}\n{out}");
    assert!(
        outcome
            .reason
            .starts_with("stopped answering the others while it ran on"),
        "{outcome:?}\n{out}"
    );
}

#[test]
fn a_stopped_rank_is_given_up_on_after_the_peer_timeout_and_named() {
    // Its connections stay open: only its silence tells.
    let t = Instant::now();
    let (outcome, out) = job_with_env(CHECK, 3, &["stop"], &[("DSM_PEER_TIMEOUT", "2")]);
    let took = t.elapsed();
    assert_eq!(outcome.failed_rank, Some(2), "{outcome:?}\n{out}");
    assert!(
        outcome
            .reason
            .starts_with("was stopped (SIGSTOP, or a debugger)"),
        "{outcome:?}"
    );
    // Each survivor names rank 2: for its silence, or for the reason of the first to give up, which told it.
    for r in 0..2 {
        assert!(
            out.contains(&format!("[{r}] dsm: rank {r}: rank 2 failed (")),
            "rank {r} must report rank 2's failure:\n{out}"
        );
    }
    assert!(
        out.contains("rank 2 failed (nothing heard from it for 2 s"),
        "{out}"
    );
    // The timeout, a heartbeat interval, and the launcher ending the stopped rank (SIGCONT lets it take
    // its SIGTERM, instead of waiting two seconds for SIGKILL).
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "took {took:?}"
    );
}

#[test]
fn the_first_rank_to_give_up_on_a_silent_one_tells_the_others_why() {
    // Rank 0 would wait 60 s: it can only hear of rank 2's silence from rank 1 (timeout 2 s).
    let line =
        format!("if [ \"$DSM_RANK\" = 0 ]; then export DSM_PEER_TIMEOUT=60; fi; exec {CHECK} stop");
    let (outcome, out) = job_with_env("/bin/sh", 3, &["-c", &line], &[("DSM_PEER_TIMEOUT", "2")]);
    assert_eq!(outcome.failed_rank, Some(2), "{outcome:?}\n{out}");
    assert!(
        out.contains("[1] dsm: rank 1: rank 2 failed (nothing heard from it for 2 s"),
        "{out}"
    );
    assert!(
        out.contains(
            "[0] dsm: rank 0: rank 2 failed (rank 1 gave up on it: nothing heard from it for 2 s"
        ),
        "{out}"
    );
}

#[test]
fn ranks_cut_off_by_a_network_that_went_down_give_up_after_the_peer_timeout() {
    // The whole job in a network namespace of its own, whose loopback interface rank 0 takes down
    // mid-job: TCP connections stay open and accept sends, but nothing arrives, as when a link or a switch
    // fails between hosts. Needs root (to make the namespace) and iproute2 (scripts/setup.sh). The ranks
    // connect over TCP only, as ranks on different hosts do: Unix sockets do not cross the interface.
    let dsmrun = Path::new(CHECK).with_file_name("dsmrun");
    let line = format!(
        "ip link set lo up && exec {} -n 3 --timeout 60 -- env DSM_PEER_TIMEOUT=2 DSM_UNIX_SOCKETS=off {CHECK} partition",
        dsmrun.display()
    );
    let t = Instant::now();
    let out = std::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c", &line])
        .output()
        .expect("running unshare (util-linux)");
    let took = t.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        !text.contains("unshare failed") && !text.contains("Operation not permitted"),
        "this test needs root, to make a network namespace: {text}"
    );
    // Each rank gives up on its own (the failure reports the first one sends cannot arrive either).
    for r in 0..3 {
        let mine = format!("[{r}] dsm: rank {r}: rank ");
        assert!(
            text.lines().any(
                |l| l.starts_with(&mine) && l.contains("failed (nothing heard from it for 2 s")
            ),
            "rank {r} must report a silent rank:\n{text}"
        );
    }
    assert!(!text.contains("time limit"), "{text}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {text}");
}

#[test]
fn a_job_stopped_whole_and_resumed_goes_on() {
    // Stopped for 4 s with a peer timeout of 2 s: every service loop sees that it was held up itself.
    let t = Instant::now();
    let (outcome, out) = job_with_env(CHECK, 3, &["pause"], &[("DSM_PEER_TIMEOUT", "2")]);
    assert_eq!(outcome.code, 0, "{outcome:?}\n{out}");
    assert_eq!(out.matches("pause ok").count(), 3, "{out}");
    assert!(out.contains("pause: the job was stopped for 4 s"), "{out}");
    assert!(t.elapsed() >= Duration::from_secs(4), "{out}");
}

#[test]
fn a_killed_rank_ends_the_job_quickly() {
    let t = Instant::now();
    let (outcome, out) = job(CHECK, 3, &["die"]);
    // Ended by the failure, not by a timeout (30 s) or the launcher's limit (60 s).
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        outcome.failed_rank,
        Some(2),
        "the killed rank is the cause: {outcome:?}\n{out}"
    );
    assert_eq!(outcome.code, 128 + 9, "killed by SIGKILL: {outcome:?}");
    // Both survivors end with an error that names the dead rank.
    for r in 0..2 {
        assert!(
            out.contains(&format!("[{r}] dsm: rank {r}: rank 2 failed")),
            "rank {r} must report rank 2's failure:\n{out}"
        );
    }
}

/// Under --keep-going, a rank that stops for good (it never exits) does not keep the launcher waiting
/// once rank 0 has finished: it is ended after a grace period and reported lost.
#[test]
fn under_keep_going_a_stopped_rank_is_ended_once_rank_0_has_finished() {
    let t = Instant::now();
    let (o, out) = launch_captured(CHECK, 3, &["stopkeep"], &[("DSM_PEER_TIMEOUT", "2")], true);
    assert_eq!(o.code, 0, "{o:?}\n{out}");
    for r in 0..2 {
        assert!(
            out.contains(&format!(
                "stopkeep: rank {r} went on without the stopped rank"
            )),
            "{out}"
        );
    }
    assert_eq!(o.lost.len(), 1, "{o:?}");
    assert_eq!(o.lost[0].0, 2, "{o:?}");
    assert!(o.lost[0].1.contains("still running"), "{o:?}");
    // The peer timeout, the grace period (10 s) and the ending, well under the 60 s limit.
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
}

/// Under --keep-going, pages a dead rank had read are written afterwards, by their home and by another
/// rank, without asking the dead rank to drop its copy (which failed the writer).
#[test]
fn pages_a_dead_rank_read_can_be_written() {
    let (o, out) = job_keep_going(CHECK, 3, &["readerdies"]);
    assert_eq!(o.code, 0, "{out}");
    assert!(
        out.contains("readerdies: the home wrote a page the dead rank had read")
            && out.contains("readerdies: rank 1 wrote a page the dead rank had read"),
        "{out}"
    );
}

/// Under --keep-going, the pages of a dead owner that others read are read and written from their
/// copies: the home's for a reader, a reader's for the home's write.
#[test]
fn pages_of_a_dead_owner_live_on_in_their_copies() {
    let (o, out) = job_keep_going(CHECK, 3, &["ownerdies"]);
    assert_eq!(o.code, 0, "{out}");
    assert!(
        out.contains("ownerdies: rank 1 read the dead owner's page from the home's copy")
            && out.contains("ownerdies: the home wrote the dead owner's page from rank 1's copy"),
        "{out}"
    );
}

/// Under --keep-going, a page whose only copy died with its owner fails the faults on it saying so, on a
/// rank that asks its home and on the home itself.
///
/// A home that has not yet seen rank 2 leave when rank 1 asks (its service loop reads the ended
/// connection a moment after rank 1's own does) grants a fetch from rank 2; rank 1 abandons it and asks
/// again until the home answers that the page's only copy left (this raced, and failed CI once, before
/// `Request::Abandon`).
#[test]
fn a_page_whose_only_copy_died_with_its_owner_fails_its_readers_naming_the_owner() {
    let (o, out) = job_keep_going(CHECK, 3, &["datalost"]);
    assert_ne!(o.code, 0, "{out}");
    for r in 0..2 {
        let said = out.lines().any(|l| {
            l.starts_with(&format!(
                "[{r}] dsm: rank {r}: cannot resolve the read fault"
            )) && l.contains("its only up-to-date copy left the job with rank 2")
        });
        assert!(said, "rank {r}:\n{out}");
    }
    assert!(
        !out.contains("from a page whose only copy left the job"),
        "{out}"
    );
}

/// Under --keep-going, a release whose diffs go to a dead home and a live one fails naming the dead one;
/// the live one applies its diff, and the releasing rank reads pages from it afterwards over the same
/// channels (two of them, without read-ahead, so that the channel of the release is soon used again).
#[test]
fn a_release_with_a_dead_home_fails_and_leaves_the_channels_in_step() {
    let (o, out) = launch_captured(
        CHECK,
        3,
        &["diffhomedies"],
        &[("DSM_CHANNELS", "2"), ("DSM_READAHEAD", "1")],
        true,
    );
    assert_eq!(o.code, 0, "{out}");
    assert!(
        out.contains("diffhomedies: rank 1 applied rank 0's diff")
            && out.contains("diffhomedies: the release failed naming rank 2, and rank 0 went on")
            && out.contains("diffhomedies: rank 1 read what rank 0 wrote under the lock"),
        "{out}"
    );
}

#[test]
fn a_release_goes_on_past_a_dead_home_and_names_what_reached_the_others_once() {
    let (o, out) = launch_captured(CHECK, 4, &["releaseafterdeath"], &[], true);
    assert_eq!(o.code, 0, "{out}");
    assert!(
        out.contains("releaseafterdeath: rank 1's write reached its home past the dead one")
            && out.contains("releaseafterdeath: every release of rank 1 failed naming rank 2")
            && out.contains("releaseafterdeath: rank 3 dropped"),
        "{out}"
    );
}
