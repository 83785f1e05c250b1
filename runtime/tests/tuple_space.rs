//! The tuple space with ranks as threads over the in-process transport: the same service loop, channels and
//! homes as multi-process jobs (those are tested in `examples/tests`), in milliseconds.

use dsm::Rank;
use dsm_runtime::{template, tuple, Runtime, RuntimeError, TaskFarm, TupleSpace};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs `body` on every rank of an in-process job of `ranks` ranks, each with its joined tuple space.
fn job<F>(ranks: usize, builder: fn() -> dsm_runtime::SpaceBuilder, body: F)
where
    F: Fn(&Runtime, &TupleSpace) + Send + Sync + 'static,
{
    dsm_runtime::local::run_local_job(ranks, 3, move |rt| {
        let space = builder().join(rt).unwrap();
        body(rt, &space);
    });
}

fn plain() -> dsm_runtime::SpaceBuilder {
    TupleSpace::builder()
}

#[test]
fn out_in_rd_and_count_across_ranks() {
    job(3, plain, |rt, space| {
        let me = rt.rank().0 as i64;
        // Every rank puts tuples with several first fields, so that they land on every home.
        for k in 0..6i64 {
            space.out(tuple!(format!("k{k}"), me, k * 10 + me)).unwrap();
        }
        rt.dsm().barrier().unwrap();
        for k in 0..6i64 {
            let t = template!(format!("k{k}"), ?i64, ?i64);
            assert_eq!(space.count(&t).unwrap(), 3, "three tuples k{k}");
        }
        rt.dsm().barrier().unwrap();
        // Each rank takes the tuples the next rank put: exactly those, from whichever home holds them.
        let from = (me + 1) % 3;
        for k in 0..6i64 {
            let t = space.in_(&template!(format!("k{k}"), from, ?i64)).unwrap();
            assert_eq!(t.get::<i64>(2).unwrap(), k * 10 + from);
            assert_eq!(
                space.inp(&template!(format!("k{k}"), from, ?i64)).unwrap(),
                None
            );
        }
        rt.dsm().barrier().unwrap();
        assert_eq!(space.count(&template!(?String, ?i64, ?i64)).unwrap(), 0);
        // rd copies, rdp finds, inp of a missing tuple does not wait.
        if me == 0 {
            space.out(tuple!("shared", 42u64)).unwrap();
        }
        assert_eq!(
            space.rd(&template!("shared", ?u64)).unwrap(),
            tuple!("shared", 42u64)
        );
        assert!(space.rdp(&template!("shared", ?u64)).unwrap().is_some());
        assert_eq!(space.inp(&template!("absent", ?u64)).unwrap(), None);
        rt.dsm().barrier().unwrap();
        if me == 0 {
            assert!(space.inp(&template!("shared", ?u64)).unwrap().is_some());
        }
    });
}

#[test]
fn every_tuple_is_taken_exactly_once_by_concurrent_takers() {
    const N: i64 = 20_000;
    let seen = Arc::new(Mutex::new(vec![0u8; N as usize]));
    let s = seen.clone();
    job(4, plain, move |rt, space| {
        let me = rt.rank().0 as i64;
        // Producers and takers run at once on every rank; four queues on (probably) different homes.
        let producer = {
            let space = space.clone();
            std::thread::spawn(move || {
                let mine: Vec<_> = (0..N)
                    .filter(|i| i % 4 == me)
                    .map(|i| tuple!(format!("q{}", i % 7 % 4), i))
                    .collect();
                for chunk in mine.chunks(500) {
                    space.out_many(chunk.to_vec()).unwrap();
                }
            })
        };
        let mut got = Vec::new();
        // Queue j holds the values i with i % 7 % 4 == j; each rank takes a quarter of every queue.
        for j in 0..4i64 {
            let in_queue = (0..N).filter(|i| i % 7 % 4 == j).count();
            let share = in_queue / 4 + usize::from((me as usize) < in_queue % 4);
            for _ in 0..share {
                let t = space.in_(&template!(format!("q{j}"), ?i64)).unwrap();
                got.push(t.get::<i64>(1).unwrap());
            }
        }
        producer.join().unwrap();
        let mut seen = s.lock().unwrap();
        for v in got {
            seen[v as usize] += 1;
        }
    });
    let seen = seen.lock().unwrap();
    let wrong: Vec<usize> = (0..N as usize).filter(|&i| seen[i] != 1).collect();
    assert!(
        wrong.is_empty(),
        "taken other than once: {:?}",
        &wrong[..wrong.len().min(10)]
    );
}

#[test]
fn a_timeout_holds_when_other_threads_waits_hold_every_channel() {
    // Three channels, one kept for faults: two threads of rank 0 wait at rank 1's home for tuples that
    // come only at the end, holding both waiting channels. A third thread's timed `in` must still give up
    // at its deadline (it once waited for the first of those channels, for as long as its wait lasted),
    // and the waits must then end as usual.
    dsm_runtime::local::run_local_job(2, 3, |rt| {
        let space = TupleSpace::join(rt).unwrap();
        let name = (0..)
            .map(|k| format!("late{k}"))
            .find(|n| space.home_of(Some(&n.as_str().into()), 2) == Rank(1))
            .unwrap();
        if rt.rank() == Rank(0) {
            std::thread::scope(|s| {
                let waits: Vec<_> = (0..2u64)
                    .map(|k| {
                        let (space, name) = (&space, &name);
                        s.spawn(move || space.in_(&template!(name.as_str(), k)).unwrap())
                    })
                    .collect();
                std::thread::sleep(Duration::from_millis(100));
                let t0 = Instant::now();
                let none = space
                    .in_timeout(&template!(name.as_str(), 9u64), Duration::from_millis(50))
                    .unwrap();
                let waited = t0.elapsed();
                assert_eq!(none, None);
                assert!(
                    waited >= Duration::from_millis(50) && waited < Duration::from_secs(5),
                    "the timed in returned after {waited:?}"
                );
                for k in 0..2u64 {
                    space.out(tuple!(name.as_str(), k)).unwrap();
                }
                for w in waits {
                    w.join().unwrap();
                }
            });
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn blocked_takers_wake_and_timeouts_lose_nothing() {
    // The taker's timeouts, seen by the putter (ranks are threads of this process here).
    let timeouts = Arc::new(AtomicU64::new(0));
    // Set by the putter just before its `out` (ranks share this process's memory here).
    let put = Arc::new(AtomicBool::new(false));
    job(2, plain, move |rt, space| {
        let me = rt.rank().0;
        // A remote and a local waiter wake when the tuple comes.
        let waiting = template!("wake", ?u64);
        if me == 1 {
            let t = space.in_(&waiting).unwrap();
            assert_eq!(t.get::<u64>(1).unwrap(), 7);
            assert!(put.load(Ordering::Acquire), "it waited for the out");
        } else {
            std::thread::sleep(Duration::from_millis(50));
            put.store(true, Ordering::Release);
            space.out(tuple!("wake", 7u64)).unwrap();
        }
        rt.dsm().barrier().unwrap();
        // Nothing there: the timeout expires, and not early.
        let t0 = Instant::now();
        let none = space
            .in_timeout(&template!("never", ?u64), Duration::from_millis(80))
            .unwrap();
        assert_eq!(none, None);
        assert!(t0.elapsed() >= Duration::from_millis(80));
        rt.dsm().barrier().unwrap();
        // A timeout too long to add to the clock waits for ever: here until the tuple comes.
        if me == 1 {
            let t = space
                .in_timeout(&template!("forever", ?u64), Duration::MAX)
                .unwrap();
            assert_eq!(t.map(|t| t.get::<u64>(1).unwrap()), Some(3));
        } else {
            std::thread::sleep(Duration::from_millis(20));
            space.out(tuple!("forever", 3u64)).unwrap();
        }
        rt.dsm().barrier().unwrap();
        // Short timeouts racing with outs: every tuple is taken once, none lost to a timed-out request. The
        // taker (rank 1) waits at its own home (a local waiter) and then at rank 0's (a remote one).
        for home in [Rank(1), Rank(0)] {
            let name = (0..)
                .map(|k| format!("race{k}"))
                .find(|n| space.home_of(Some(&n.as_str().into()), 2) == home)
                .unwrap();
            race(rt, space, &name, &timeouts);
        }
    });
}

fn race(rt: &Runtime, space: &TupleSpace, name: &str, timeouts: &AtomicU64) {
    let me = rt.rank().0;
    const N: u64 = 300;
    let racing = template!(name, ?u64);
    let start = timeouts.load(Ordering::SeqCst);
    rt.dsm().barrier().unwrap();
    if me == 0 {
        for i in 0..N {
            space.out(tuple!(name, i)).unwrap();
            // In bursts of three: after each, wait until the taker has timed out again, then put the
            // next after a pause of a different length each time, so that outs land at every point of
            // the taker's next wait, some just as it expires.
            if i % 3 == 0 {
                let seen = timeouts.load(Ordering::SeqCst);
                let give_up = Instant::now() + Duration::from_secs(5);
                while timeouts.load(Ordering::SeqCst) == seen && Instant::now() < give_up {
                    std::thread::sleep(Duration::from_micros(20));
                }
                std::thread::sleep(Duration::from_micros(13 * (i % 11)));
            }
        }
    } else {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = 0u64;
        while got < N && Instant::now() < deadline {
            match space
                .in_timeout(&racing, Duration::from_micros(100))
                .unwrap()
            {
                Some(_) => got += 1,
                None => {
                    timeouts.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        assert_eq!(got, N, "every tuple reached the taker");
    }
    rt.dsm().barrier().unwrap();
    let raced = timeouts.load(Ordering::SeqCst) - start;
    assert!(
        raced >= N / 3,
        "a timeout expired between every burst of outs ({raced} timeouts)"
    );
    assert_eq!(space.count(&racing).unwrap(), 0, "none left behind");
}

#[test]
fn formal_first_templates_search_every_rank() {
    job(3, plain, |rt, space| {
        let me = rt.rank().0 as i64;
        space.out(tuple!(format!("from{me}"), me, true)).unwrap();
        rt.dsm().barrier().unwrap();
        let any = template!(?String, ?i64, true);
        assert_eq!(space.count(&any).unwrap(), 3);
        rt.dsm().barrier().unwrap();
        let t = space.in_(&any).unwrap();
        assert!(t.get::<i64>(1).unwrap() < 3);
        rt.dsm().barrier().unwrap();
        assert_eq!(
            space.count(&any).unwrap(),
            0,
            "three takers took three tuples"
        );
        // A blocking formal-first take waits for a tuple put later.
        if me == 0 {
            let t = space
                .in_timeout(&template!(?String, 99i64), Duration::from_secs(10))
                .unwrap();
            assert_eq!(t, Some(tuple!("late", 99i64)));
        } else if me == 2 {
            std::thread::sleep(Duration::from_millis(30));
            space.out(tuple!("late", 99i64)).unwrap();
        }
    });
}

fn with_square() -> dsm_runtime::SpaceBuilder {
    TupleSpace::builder().function("square", |args| {
        let x = args.get::<i64>(1).unwrap_or(0);
        tuple!("squared", x, x * x)
    })
}

#[test]
fn eval_runs_on_the_ranks_in_turn_and_puts_its_result() {
    job(3, with_square, |rt, space| {
        if rt.rank().0 == 0 {
            let mut ranks = Vec::new();
            for x in 0..6i64 {
                ranks.push(space.eval("square", tuple!("args", x)).unwrap());
            }
            ranks.sort();
            ranks.dedup();
            assert_eq!(ranks.len(), 3, "evals went to every rank");
            for x in 0..6i64 {
                let t = space.in_(&template!("squared", x, ?i64)).unwrap();
                assert_eq!(t.get::<i64>(2).unwrap(), x * x);
            }
            let unknown = space.eval("cube", tuple!(1i64));
            assert!(
                matches!(&unknown, Err(RuntimeError::Refused { reason, .. }) if reason.contains("cube")),
                "{unknown:?}"
            );
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn bad_tuples_and_templates_are_refused_with_errors() {
    job(2, plain, |rt, space| {
        let again = TupleSpace::join(rt);
        assert!(
            matches!(&again, Err(RuntimeError::Refused { reason, .. }) if reason.contains("join once")),
            "{again:?}"
        );
        let wide = dsm_runtime::Tuple((0..17i64).map(Into::into).collect());
        assert!(matches!(space.out(wide), Err(RuntimeError::Tuple(_))));
        let big = tuple!("big", vec![0u8; dsm_runtime::tuple::MAX_FIELD_BYTES + 1]);
        let e = space.out(big).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let wide = dsm_runtime::Template(
            (0..17i64)
                .map(|i| dsm_runtime::tuple::Field::Actual(i.into()))
                .collect(),
        );
        assert!(matches!(space.inp(&wide), Err(RuntimeError::Tuple(_))));
        let t = tuple!("x", 1i64);
        assert!(t.get::<String>(1).is_err());
    });
}

#[test]
fn a_task_farm_does_every_task_once() {
    job(3, plain, |rt, space| {
        let farm = TaskFarm::new(space, "squares", Rank(0)).unwrap();
        if rt.rank().0 == 0 {
            // Tiny tasks: workers take them many per trip (and the last trips find the bag short).
            farm.put((0..20_000u64).map(|i| (i, i))).unwrap();
            let mut results: Vec<(u64, u64)> = farm.results(20_000).unwrap();
            farm.stop().unwrap();
            results.sort();
            assert_eq!(
                results,
                (0..20_000u64).map(|i| (i, i * i)).collect::<Vec<_>>()
            );
        } else {
            let done = farm.serve(|_, x: u64| x * x).unwrap();
            assert!(done <= 20_000);
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn workers_take_tasks_near_them_first_and_the_rest_gets_done() {
    job(3, plain, |rt, space| {
        let farm = TaskFarm::new(space, "near", Rank(0)).unwrap();
        let me = rt.rank().0;
        if me == 0 {
            // 300 tasks near rank 1, 300 near rank 2 (which never serves), 300 for anyone.
            farm.put_near((0..600u64).map(|i| (i, Rank(1 + (i / 300) as u32), i)))
                .unwrap();
            farm.put((600..900u64).map(|i| (i, i))).unwrap();
            let mut results: Vec<(u64, u64)> = farm.results(900).unwrap();
            farm.stop().unwrap();
            results.sort();
            assert_eq!(results, (0..900u64).map(|i| (i, i)).collect::<Vec<_>>());
        } else if me == 1 {
            let mut order = Vec::new();
            let done = farm
                .serve(|_, x: u64| {
                    order.push(x);
                    x
                })
                .unwrap();
            assert_eq!(done, 900, "the only worker does every task, rank 2's too");
            let mut first: Vec<u64> = order[..300].to_vec();
            first.sort();
            assert_eq!(
                first,
                (0..300u64).collect::<Vec<_>>(),
                "its own tasks come first"
            );
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_rank_whose_workers_cannot_take_part_fails_the_masters_results() {
    job(2, plain, |rt, space| {
        let farm = TaskFarm::new(space, "unready", Rank(0)).unwrap();
        if rt.rank() == Rank(0) {
            farm.put((0..4u64).map(|i| (i, i))).unwrap();
            match farm.results::<u64>(4) {
                Err(e @ RuntimeError::WorkerFailed { rank, .. }) => {
                    assert_eq!(rank, Rank(1));
                    assert!(e.to_string().contains("no scratch space"), "{e}");
                }
                other => panic!("results ended with {other:?}"),
            }
            farm.stop().unwrap();
        } else {
            farm.cannot_serve("no scratch space").unwrap();
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_task_whose_function_panics_is_reported_failed_and_the_rest_of_its_batch_is_done() {
    job(3, plain, |rt, space| {
        let farm = TaskFarm::new(space, "fragile", Rank(0)).unwrap();
        match rt.rank().0 {
            0 => {
                farm.put((0..200u64).map(|i| (i, i))).unwrap();
                let (failed, rank, reason) = match farm.results::<u64>(200) {
                    Err(RuntimeError::TaskFailed { id, rank, reason }) => (id, rank, reason),
                    other => panic!("results ended with {other:?}"),
                };
                assert_eq!(rank, Rank(1));
                assert!(reason.contains("a task this worker cannot do"), "{reason}");
                // Reported once; every other task is done once (those of the failed one's batch that it
                // did not run too).
                let mut results: Vec<(u64, u64)> = farm.results(199).unwrap();
                farm.stop().unwrap();
                results.sort();
                let expected: Vec<(u64, u64)> = (0..200u64)
                    .filter(|i| *i != failed)
                    .map(|i| (i, i + 1))
                    .collect();
                assert_eq!(results, expected);
            }
            1 => {
                // Panics on its third task (its batch may hold more).
                let mut seen = 0;
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    farm.serve(|_, x: u64| {
                        seen += 1;
                        assert!(seen < 3, "a task this worker cannot do");
                        x + 1
                    })
                }));
                assert!(outcome.is_err(), "the panic comes out of serve");
            }
            _ => {
                std::thread::sleep(Duration::from_millis(20));
                farm.serve(|_, x: u64| x + 1).unwrap();
            }
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_lease_whose_completion_fails_is_given_back() {
    job(2, plain, |rt, space| {
        // A first field homed at rank 1, so that completing goes over the network.
        let key = (0..)
            .map(|k| format!("leased#{k}"))
            .find(|k| space.home_of(Some(&k.as_str().into()), 2) == Rank(1))
            .unwrap();
        let tpl = template!(key.as_str(), ?i64);
        if rt.rank().0 == 0 {
            space.out(tuple!(key.as_str(), 5)).unwrap();
            let too_many = dsm_runtime::tuple::Tuple(
                (0..17i64).map(dsm_runtime::tuple::Value::from).collect(),
            );
            let lease = space.in_leased(&tpl).unwrap();
            assert!(space.complete(lease, vec![too_many.clone()]).is_err());
            assert_eq!(space.count(&tpl).unwrap(), 1, "the tuple went back");
            let lease = space.in_leased(&tpl).unwrap();
            assert!(space
                .complete_and_lease(lease, vec![too_many], &tpl)
                .is_err());
            assert_eq!(space.count(&tpl).unwrap(), 1, "the tuple went back");
            let lease = space.in_leased(&tpl).unwrap();
            space.complete(lease, Vec::new()).unwrap();
            assert_eq!(space.count(&tpl).unwrap(), 0);
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_lease_dropped_unfinished_gives_its_tuple_back() {
    job(2, plain, |rt, space| {
        if rt.rank().0 == 0 {
            // Tuples homed at each rank: giving back is local for one, over the network for the other.
            for home in [Rank(0), Rank(1)] {
                let key = (0..)
                    .map(|k| format!("dropped#{k}"))
                    .find(|k| space.home_of(Some(&k.as_str().into()), 2) == home)
                    .unwrap();
                let tpl = template!(key.as_str(), ?i64);
                space.out(tuple!(key.as_str(), 5)).unwrap();
                drop(space.in_leased(&tpl).unwrap());
                assert_eq!(space.count(&tpl).unwrap(), 1, "dropped at {home}");
                // A holder that panics gives it back as it unwinds.
                let held = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let lease = space.in_leased(&tpl).unwrap();
                    panic!("the holder of {:?} failed", lease.tuple);
                }));
                assert!(held.is_err());
                assert_eq!(space.count(&tpl).unwrap(), 1, "panicked at {home}");
                // Completed, it stays taken (and its drop gives nothing back).
                space
                    .complete(space.in_leased(&tpl).unwrap(), Vec::new())
                    .unwrap();
                assert_eq!(space.count(&tpl).unwrap(), 0, "completed at {home}");
                space.out(tuple!(key.as_str(), 6)).unwrap();
                let given = space.in_leased(&tpl).unwrap();
                space.give_back(vec![given]).unwrap();
                assert_eq!(space.in_(&tpl).unwrap(), tuple!(key.as_str(), 6));
            }
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_lease_that_outlives_every_handle_on_its_space_still_gives_its_tuple_back() {
    dsm_runtime::local::run_local_job(2, 3, |rt| {
        let space = TupleSpace::join(rt).unwrap();
        // Homed at rank 1: the give-back goes over the network, after rank 0 dropped its handle.
        let key = (0..)
            .map(|k| format!("outlives#{k}"))
            .find(|k| space.home_of(Some(&k.as_str().into()), 2) == Rank(1))
            .unwrap();
        let tpl = template!(key.as_str(), ?i64);
        if rt.rank().0 == 0 {
            space.out(tuple!(key.as_str(), 7)).unwrap();
            let lease = space.in_leased(&tpl).unwrap();
            drop(space);
            drop(lease);
            rt.dsm().barrier().unwrap();
        } else {
            rt.dsm().barrier().unwrap();
            assert_eq!(space.inp(&tpl).unwrap(), Some(tuple!(key.as_str(), 7)));
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn results_that_do_not_decode_stay_in_the_space() {
    job(2, plain, |rt, space| {
        let farm = TaskFarm::new(space, "mistyped", Rank(0)).unwrap();
        if rt.rank().0 == 0 {
            farm.put((0..20u64).map(|i| (i, i))).unwrap();
            // Read as strings, the u64 results do not decode: an error, and none of them is lost.
            let e = farm.results::<String>(20).unwrap_err();
            assert!(e.to_string().contains("result"), "{e}");
            let mut results: Vec<(u64, u64)> = farm.results(20).unwrap();
            farm.stop().unwrap();
            results.sort();
            assert_eq!(results, (0..20u64).map(|i| (i, i * 2)).collect::<Vec<_>>());
        } else {
            farm.serve(|_, x: u64| x * 2).unwrap();
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_result_too_large_for_the_space_fails_its_task_and_its_worker() {
    job(3, plain, |rt, space| {
        let farm = TaskFarm::new(space, "oversized", Rank(0)).unwrap();
        match rt.rank().0 {
            0 => {
                // Task 7 is near rank 1, which takes it first; its result would be too large.
                farm.put_near([(7u64, Rank(1), 7u64)]).unwrap();
                farm.put((0..50u64).filter(|i| *i != 7).map(|i| (i, i)))
                    .unwrap();
                match farm.results::<Vec<u8>>(50) {
                    Err(RuntimeError::TaskFailed { id: 7, rank, .. }) => assert_eq!(rank, Rank(1)),
                    other => panic!("results ended with {other:?}"),
                }
                let mut results: Vec<(u64, Vec<u8>)> = farm.results(49).unwrap();
                farm.stop().unwrap();
                results.sort();
                let expected: Vec<(u64, Vec<u8>)> = (0..50u64)
                    .filter(|i| *i != 7)
                    .map(|i| (i, vec![i as u8]))
                    .collect();
                assert_eq!(results, expected);
            }
            1 => {
                let e = farm
                    .serve(|_, x: u64| {
                        if x == 7 {
                            vec![0u8; dsm_runtime::tuple::MAX_FIELD_BYTES + 1]
                        } else {
                            vec![x as u8]
                        }
                    })
                    .unwrap_err();
                assert!(matches!(e, RuntimeError::Tuple(_)), "{e}");
                space.out(tuple!("oversized: rank 1 is out")).unwrap();
            }
            _ => {
                // Starts once rank 1, the only worker until then, has taken task 7 and failed on it; then
                // does the rest (task 7 is not run again).
                space.rd(&template!("oversized: rank 1 is out")).unwrap();
                farm.serve(|_, x: u64| vec![x as u8]).unwrap();
            }
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn tasks_near_a_rank_that_is_not_in_the_job_are_refused() {
    job(2, plain, |rt, space| {
        let farm = TaskFarm::new(space, "far", Rank(0)).unwrap();
        if rt.rank().0 == 0 {
            let e = farm.put_near([(1u64, Rank(5), ())]).unwrap_err();
            assert!(e.to_string().contains("2 ranks"), "{e}");
            let e = farm.put([(u64::MAX, ())]).unwrap_err();
            assert!(e.to_string().contains("below"), "{e}");
            farm.stop().unwrap();
        } else {
            assert_eq!(farm.serve(|_, ()| ()).unwrap(), 0);
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn task_farm_names_too_long_or_holding_a_nul_are_refused() {
    job(1, plain, |_, space| {
        let longest = "f".repeat(dsm_runtime::task_farm::MAX_FARM_NAME);
        TaskFarm::new(space, &longest, Rank(0)).unwrap();
        let e = TaskFarm::new(space, &format!("{longest}f"), Rank(0)).unwrap_err();
        assert!(
            e.to_string().contains("at most 4096 bytes, not 4097"),
            "{e}"
        );
        let e = TaskFarm::new(space, "a\0results", Rank(0)).unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    });
}

#[test]
fn withdrawn_tasks_are_not_done() {
    job(2, plain, |rt, space| {
        let farm = TaskFarm::new(space, "withdrawn", Rank(0)).unwrap();
        if rt.rank().0 == 0 {
            farm.put((0..100u64).map(|i| (i, i))).unwrap();
            // Nobody serves yet: every task is still in the bag.
            assert_eq!(farm.withdraw().unwrap(), 100);
            assert_eq!(farm.withdraw().unwrap(), 0);
            farm.stop().unwrap();
            // Asked for after the stop, results are refused, not waited for (also through a clone).
            let e = farm.clone().results::<u64>(1).unwrap_err();
            assert!(
                e.to_string()
                    .contains("after stop() was called on the task farm"),
                "{e}"
            );
        }
        rt.dsm().barrier().unwrap();
        if rt.rank().0 == 1 {
            let done = farm.serve(|_, x: u64| x).unwrap();
            assert_eq!(done, 0, "only the stop mark was left");
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_rank_refuses_evals_past_its_queue_and_runs_those_it_took() {
    // The evaluator is held until the queue is full: the evals past it are refused with an error that
    // says why, and every eval taken runs and puts its result.
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let held = gate.clone();
    let builder = move || {
        let held = held.clone();
        TupleSpace::builder().function("held", move |t| {
            let (open, opened) = &*held;
            let mut o = open.lock().unwrap();
            while !*o {
                o = opened.wait(o).unwrap();
            }
            tuple!("ran", t.get::<u64>(0).unwrap())
        })
    };
    dsm_runtime::local::run_local_job(1, 3, move |rt| {
        let space = builder().join(rt).unwrap();
        let mut taken = 0u64;
        let refused = loop {
            match space.eval("held", tuple!(taken)) {
                Ok(_) => taken += 1,
                Err(e) => break e.to_string(),
            }
            assert!(taken < 100_000, "the queue has no bound");
        };
        assert!(refused.contains("evals waiting already"), "{refused}");
        assert!(taken >= 4096, "refused after {taken}");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        for _ in 0..taken {
            space.in_(&template!("ran", ?u64)).unwrap();
        }
        assert_eq!(space.inp(&template!("ran", ?u64)).unwrap(), None);
    });
}

#[test]
fn a_join_whose_barrier_fails_lets_go_of_the_rank() {
    dsm::transport::local::run_local_job(2, 2, |dsm| {
        if dsm.rank() == Rank(1) {
            // Leaves without joining the space: rank 0's join cannot end its barrier.
            drop(dsm);
            return;
        }
        let rt = Runtime::from_dsm(dsm);
        let joined = TupleSpace::join(&rt);
        assert!(joined.is_err(), "joined without rank 1");
        // The eval thread the join started has stopped again, so nothing else holds this rank's `Dsm`:
        // leaving the job finds it in use by no one (it may still fail, rank 1 having gone).
        if let Err(RuntimeError::InUse(n)) = rt.finish() {
            panic!("after a failed join, {n} other handles still hold the rank's Dsm");
        }
    });
}

/// Waits (up to 30 s) until `rt`'s rank has taken `rank` for failed.
fn until_failed(rt: &Runtime, rank: Rank) {
    let t0 = Instant::now();
    while !rt.dsm().failed_ranks().contains(&rank) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{rank}'s failure unseen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_waiter_at_a_home_that_leaves_hears_that_it_left() {
    // Ranks as threads take a failure as a report: rank 2 fails, then rank 0 leaves the job (with no final
    // barrier, a rank having failed) while rank 1 waits at rank 0's home for a tuple no one puts. Rank 0's
    // connections must close as it leaves, ending rank 1's wait with an error, instead of being kept open
    // by the answer its home still owed rank 1 for as long as rank 0's process lives.
    dsm::transport::local::run_local_job(3, 3, |dsm| {
        let rt = Runtime::from_dsm(dsm);
        let space = TupleSpace::join(&rt).unwrap();
        let name = (0..)
            .map(|k| format!("never{k}"))
            .find(|n| space.home_of(Some(&n.as_str().into()), 2) == Rank(0))
            .unwrap();
        match rt.rank() {
            Rank(2) => {
                // Dropped unfinished: the rank fails.
                drop(space);
                drop(rt);
            }
            Rank(1) => {
                let got = space.in_(&template!(name.as_str(), ?i64));
                assert!(got.is_err(), "took {got:?} from a home that left");
                drop(space);
                let _ = rt.finish();
            }
            _ => {
                until_failed(&rt, Rank(2));
                // Time for rank 1's request to be waiting here (if it came later, it finds this rank gone,
                // and fails all the same).
                std::thread::sleep(Duration::from_millis(200));
                drop(space);
                rt.finish().unwrap();
            }
        }
    });
}

#[test]
fn out_many_puts_what_it_can_when_a_home_has_failed() {
    dsm::transport::local::run_local_job(3, 3, |dsm| {
        let rt = Runtime::from_dsm(dsm);
        let space = TupleSpace::join(&rt).unwrap();
        let homed_at = |rank: u32, arity: usize| {
            (0..)
                .map(|k| format!("kind{k}"))
                .find(|n| space.home_of(Some(&n.as_str().into()), arity) == Rank(rank))
                .unwrap()
        };
        let (at1, at2, done) = (homed_at(1, 2), homed_at(2, 2), homed_at(1, 1));
        match rt.rank() {
            Rank(2) => {
                // Dropped unfinished: the rank fails.
                drop(space);
                drop(rt);
            }
            Rank(1) => {
                space.in_(&template!(done.as_str())).unwrap();
                assert_eq!(space.count(&template!(at1.as_str(), ?i64)).unwrap(), 10);
                drop(space);
                let _ = rt.finish();
            }
            _ => {
                until_failed(&rt, Rank(2));
                // Whichever home the call asks first, rank 1 gets its tuples.
                for round in 0..5i64 {
                    let batch = (0..2i64).flat_map(|k| {
                        [
                            tuple!(at1.as_str(), round * 2 + k),
                            tuple!(at2.as_str(), round * 2 + k),
                        ]
                    });
                    let e = space.out_many(batch).unwrap_err();
                    assert!(e.to_string().contains("rank 2"), "{e}");
                }
                space.out(tuple!(done.as_str())).unwrap();
                drop(space);
                let _ = rt.finish();
            }
        }
    });
}
