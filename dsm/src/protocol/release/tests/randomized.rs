//! Randomized jobs of the simulation (2 to 4 ranks, many seeds) under each of the protocol's ways:
//! twinning ahead, updates carried by barriers, selective hand-overs, lock homes that let servers go,
//! notices forgotten all the time; and when an update brings a page up to date.

use super::*;

/// Runs 60 jobs of 2 to 4 ranks and 1 to 4 pages (the seeds from `first` on), 3000 random steps each
/// after `setup`, and hands each finished job to `each`.
fn sixty_jobs(first: u64, setup: impl Fn(&mut Sim), mut each: impl FnMut(&Sim)) {
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(first + seed);
        let ranks = 2 + (seed % 3) as usize;
        let pages = 1 + (seed % 4) as usize;
        let mut sim = Sim::new(ranks, pages, DEFAULT_NOTICE_MEMORY, &mut rng);
        setup(&mut sim);
        for _ in 0..3000 {
            let r = rng.random_range(0..ranks);
            sim.step(r, &mut rng);
        }
        each(&sim);
    }
}

#[test]
fn randomized_jobs_never_read_stale_data_or_lose_a_diff() {
    let (mut checks, mut diffs, mut flushed, mut unseen, mut spared) = (0, 0, 0, 0, 0);
    sixty_jobs(
        0,
        |_| {},
        |sim| {
            assert_eq!(
                sim.full_invalidations, 0,
                "nothing is forgotten under the default bound"
            );
            checks += sim.checks;
            diffs += sim.diffs_applied;
            flushed += sim.flushed;
            unseen += sim.unseen_home_writes;
            spared += sim.home_notices_spared;
        },
    );
    // Every path is taken: diffs at releases, flushes at acquires, homes' writes before any fetch, homes
    // leaving pages only diffs wrote out of their notices.
    assert!(
        checks > 100_000 && diffs > 1_000 && flushed > 100 && unseen > 10 && spared > 100,
        "checks {checks}, diffs {diffs}, flushed at acquires {flushed}, unseen home writes {unseen}, pages left out of homes' notices {spared}"
    );
}

#[test]
fn randomized_jobs_that_twin_pages_ahead_of_writes_never_read_stale_data() {
    let (mut checks, mut ahead, mut spared, mut diffs) = (0, 0, 0, 0);
    let setup = |sim: &mut Sim| {
        sim.ahead_odds = 2;
        sim.selective_odds = 16;
    };
    sixty_jobs(12000, setup, |sim| {
        checks += sim.checks;
        ahead += sim.twinned_ahead;
        spared += sim.ahead_spared;
        diffs += sim.diffs_applied;
    });
    // Pages are twinned ahead often, some of them written afterwards and some not (left out of notices).
    assert!(
        checks > 50_000 && ahead > 1_000 && spared > 100 && ahead > spared + 100 && diffs > 1_000,
        "checks {checks}, pages twinned ahead {ahead}, of them left out of notices {spared}, diffs {diffs}"
    );
}

#[test]
fn randomized_jobs_whose_barriers_carry_updates_never_read_stale_data() {
    let (mut checks, mut sent, mut updated, mut diffs, mut withheld) = (0, 0, 0, 0, 0);
    let setup = |sim: &mut Sim| {
        // Some updates left out; some pages handed over selectively or flushed at acquires (PARTIAL), some
        // twinned ahead.
        sim.update_odds = 5;
        sim.selective_odds = 16;
        sim.ahead_odds = 8;
    };
    sixty_jobs(15000, setup, |sim| {
        checks += sim.checks;
        sent += sim.updates_sent;
        updated += sim.pages_updated;
        diffs += sim.diffs_applied;
        withheld += sim.partial_withheld;
    });
    assert!(
        checks > 50_000 && sent > 1_000 && updated > 500 && diffs > 1_000 && withheld > 10,
        "checks {checks}, updates handed over {sent}, pages brought up to date {updated}, diffs {diffs}, partial diffs withheld {withheld}"
    );
}

#[test]
fn randomized_jobs_with_atomic_operations_at_homes_never_read_stale_data() {
    let (mut checks, mut remote, mut own, mut flushed, mut withheld, mut floors) =
        (0, 0, 0, 0, 0, 0);
    let setup = |sim: &mut Sim| {
        // Atomic writes among plain ones, under the lock (the counter, read by the lock's next holder
        // with a plain read) and outside it, and additions by every rank at any time to a counter on
        // each page, which a lock's next holder must read at least as its last holder left it; beside pages twinned ahead, updates carried by barriers and
        // selective hand-overs.
        sim.atomic_odds = 3;
        sim.ahead_odds = 8;
        sim.update_odds = 5;
        sim.selective_odds = 16;
    };
    sixty_jobs(18000, setup, |sim| {
        checks += sim.checks;
        remote += sim.atomics_remote;
        own += sim.atomics_own;
        flushed += sim.flushed;
        withheld += sim.partial_withheld;
        floors += sim.floor_checks;
    });
    assert!(
        checks > 50_000
            && remote > 1_000
            && own > 500
            && flushed > 100
            && withheld > 10
            && floors > 10_000,
        "checks {checks}, atomic writes for other ranks {remote}, for homes themselves {own}, flushed {flushed}, partial diffs withheld {withheld}, counters checked against floors {floors}"
    );
}

#[test]
fn a_page_is_brought_up_to_date_only_when_every_unseen_notice_of_it_comes_with_disjoint_bytes() {
    // Rank 0 acquires what ranks 1 and 2 wrote; rank 1's interval 1 was a lock's (no updates), its
    // interval 2 and rank 2's interval 1 a barrier's.
    let notices = [
        WriteNotice {
            rank: Rank(1),
            interval: 1,
            runs: runs_of([key(7)]),
        },
        WriteNotice {
            rank: Rank(1),
            interval: 2,
            runs: runs_of([1, 2, 3, 4, 7].map(key)),
        },
        WriteNotice {
            rank: Rank(2),
            interval: 1,
            runs: runs_of([2, 3, 5].map(key)),
        },
    ];
    let updates = [
        update(1, 2, 1, &[8]),
        update(1, 2, 2, &[8, 9]),
        update(2, 1, 2, &[10]),
        update(1, 2, 3, &[8]),
        update(2, 1, 3, &[8]), // the same byte as rank 1's: the order would matter
        update(1, 2, 7, &[8]), // page 7 is named by interval 1 too, with no update
        update(2, 1, 6, &[8]), // page 6 is not named by rank 2's notice
        update(2, 1, 5, &[8]),
    ];
    let mut a = RcRank::new(Rank(0), 3);
    let acq = a.acquire(&notices, &Z, &updates, not_homed(|k| k.page == 5));
    let spared: Vec<(u64, Vec<usize>)> = acq
        .update
        .iter()
        .map(|u| (u.page.page, u.diffs.clone()))
        .collect();
    // Page 5 is homed here (neither dropped nor updated), page 6 named by no notice.
    assert_eq!(spared, vec![(1, vec![0]), (2, vec![1, 2])]);
    assert_eq!(pages_of(&acq.invalidate), [3, 4, 7].map(key).to_vec());

    // Notices seen already bring nothing, their updates included: the copies here hold their writes, and
    // rank 2's updates alone decide.
    let mut b = RcRank::new(Rank(0), 3);
    b.acquire(&notices[..2], &Z, &[], not_homed(|_| false));
    let acq = b.acquire(&notices, &Z, &updates, not_homed(|_| false));
    assert!(acq.invalidate.is_empty(), "{:?}", acq.invalidate);
    let spared: Vec<(u64, Vec<usize>)> = acq
        .update
        .iter()
        .map(|u| (u.page.page, u.diffs.clone()))
        .collect();
    assert_eq!(spared, vec![(2, vec![2]), (3, vec![4]), (5, vec![7])]);
    // The writer itself takes nothing from its own notices.
    let mut c = RcRank::new(Rank(1), 3);
    let acq = c.acquire(&notices[1..2], &Z, &updates, not_homed(|_| false));
    assert_eq!(acq, Acquire::default());
}

#[test]
fn randomized_jobs_that_hand_pages_over_selectively_never_read_stale_data() {
    let (mut checks, mut selective, mut diffs) = (0, 0, 0);
    let setup = |sim: &mut Sim| {
        sim.selective_odds = 8;
        sim.barrier_odds = 4;
    };
    sixty_jobs(9000, setup, |sim| {
        checks += sim.checks;
        selective += sim.selective_checks;
        diffs += sim.diffs_applied;
    });
    // Handoffs happen often, and between them the usual checks (locks, barriers) still hold.
    assert!(
        checks > 50_000 && selective > 1_000_000 && diffs > 1_000,
        "checks {checks}, bytes checked after selective acquires {selective}, diffs {diffs}"
    );
}

#[test]
fn randomized_jobs_whose_lock_homes_let_servers_go_never_read_stale_data() {
    // Lock servers let go after one critical section in three, and made again, with the horizon of what
    // they knew, at the lock's next use. Nothing else is forgotten (the default bound).
    let (mut checks, mut gone, mut full) = (0, 0, 0);
    let setup = |sim: &mut Sim| {
        sim.barrier_odds = 10;
        sim.let_go_odds = 3;
    };
    sixty_jobs(5000, setup, |sim| {
        checks += sim.checks;
        gone += sim.lock_servers_let_go;
        full += sim.full_invalidations;
    });
    assert!(
        checks > 50_000 && gone > 1_000 && full > 100,
        "checks {checks}, lock servers let go {gone}, acquires that dropped everything {full}"
    );
}

#[test]
fn randomized_jobs_that_forget_notices_all_the_time_never_read_stale_data() {
    // A bound of a few notices: ranks and the locks' home forget notices at most releases, and acquirers
    // behind the horizon drop every cached page. Long runs between barriers (barriers are rare here), so
    // that the lock path carries the forgetting.
    let (mut checks, mut full, mut targeted) = (0, 0, 0);
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let ranks = 2 + (seed % 3) as usize;
        let pages = 1 + (seed % 4) as usize;
        let memory = 2 * (NOTICE_BYTES + RUN_BYTES) * (1 + (seed % 3) as usize);
        let mut sim = Sim::new(ranks, pages, memory, &mut rng);
        sim.barrier_odds = 20;
        if seed % 2 == 0 {
            // Only the ranks forget: what reaches a lock's home without a notice must bring its horizon.
            sim.lock_memory = DEFAULT_NOTICE_MEMORY;
        }
        for step in 0..4000 {
            let r = rng.random_range(0..ranks);
            sim.step(r, &mut rng);
            if step % 500 == 0 {
                // Over the bound only by writers' latest notices, which are always kept.
                let bound = memory.max(ranks * (NOTICE_BYTES + pages * RUN_BYTES));
                for rc in &sim.rc {
                    assert!(
                        rc.known.bytes() <= bound && rc.own_bytes <= memory,
                        "{} keeps {} and {} bytes of notices over a bound of {bound}",
                        rc.me,
                        rc.known.bytes(),
                        rc.own_bytes
                    );
                }
            }
        }
        checks += sim.checks;
        full += sim.full_invalidations;
        targeted += sim.targeted_invalidations;
    }
    // Both paths are taken often: acquires behind a horizon, and acquires whose notices say what to drop.
    assert!(
        checks > 50_000 && full > 1_000 && targeted > 1_000,
        "checks {checks}, acquires that dropped everything {full}, that dropped what notices named {targeted}"
    );
}
