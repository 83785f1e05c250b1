use super::*;
use crate::tuple;

#[test]
fn homes_spread_over_ranks_and_depend_on_first_field_and_arity() {
    let mut seen = std::collections::HashSet::new();
    for i in 0..64i64 {
        let t = tuple!(i, "x");
        seen.insert(home_of(t.0.first(), t.arity(), 4));
    }
    assert_eq!(seen.len(), 4, "64 first fields reach every one of 4 ranks");
    let differ = (0..64i64)
        .any(|i| home_of(Some(&Value::I64(i)), 2, 4) != home_of(Some(&Value::I64(i)), 3, 4));
    assert!(differ, "arity takes part in the home");
    assert_eq!(home_of(None, 0, 1), Rank(0));
}

/// A home that answers every find with a tuple matching nothing asked for (leased when a lease was asked
/// for), and records the leases given back to it.
#[derive(Debug, Default)]
struct Liar {
    given_back: Mutex<Vec<u64>>,
}

impl dsm::Service for Liar {
    fn request(&self, _from: Rank, payload: Vec<u8>, reply: dsm::Responder) {
        let answer = match postcard::from_bytes::<Ask>(&payload) {
            Ok(Ask::Find { lease, .. }) => Answer::Found {
                tuple: tuple!("not", "asked", "for"),
                lease: lease.then_some(7),
            },
            Ok(Ask::GiveBack { leases }) => {
                self.given_back.lock().unwrap().extend(leases);
                Answer::Done
            }
            _ => Answer::Refused("not served by this test's home".into()),
        };
        let _ = reply.send(&[&postcard::to_allocvec(&answer).unwrap()]);
    }
}

/// `lease` and a lease of a tuple `(name, 1)` homed at rank 0, which this puts first; with the name
/// and the template `(name, ?i64)`.
fn and_one_homed_at_rank_0(space: &TupleSpace, lease: Lease) -> (String, Template, Vec<Lease>) {
    let name = (0..)
        .map(|i| format!("zero{i}"))
        .find(|n| space.home_of(Some(&Value::Str(n.clone())), 2) == Rank(0))
        .unwrap();
    let t = crate::template!(name.clone(), ?i64);
    space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
    let leases = vec![lease, space.in_leased(&t).unwrap()];
    (name, t, leases)
}

/// A first field beginning with `prefix` whose tuples of two fields are homed at rank 1.
fn homed_at_rank_1(space: &TupleSpace, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| space.home_of(Some(&Value::Str(n.clone())), 2) == Rank(1))
        .unwrap()
}

/// A 2-rank job in which rank 0 leases a tuple `(name, 1)` homed at rank 1 and runs `body` with the
/// runtime, the space, the name, the template `(name, ?i64)` and the lease; then both ranks meet.
fn with_a_lease_homed_at_rank_1(
    prefix: &'static str,
    body: impl Fn(&Runtime, &TupleSpace, &str, &Template, Lease) + Send + Sync + 'static,
) {
    crate::local::run_local_job(2, 3, move |rt| {
        let space = TupleSpace::join(rt).unwrap();
        let name = homed_at_rank_1(&space, prefix);
        let t = crate::template!(name.clone(), ?i64);
        if rt.rank() == Rank(0) {
            space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
            let lease = space.in_leased(&t).unwrap();
            body(rt, &space, &name, &t, lease);
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_completion_whose_next_request_is_refused_leaves_its_leases_held() {
    with_a_lease_homed_at_rank_1("c", |rt, space, _, t, lease| {
        // A completion asking for the next tuple with no template (the client refuses to send
        // one; a peer of another mind might).
        let ask = encode(&Ask::Complete {
            leases: vec![lease.id],
            results: Vec::new(),
            next: Some((Vec::new(), 1)),
            more: 0,
        });
        let answer = rt.dsm().call(Rank(1), SERVICE, &[&ask]).unwrap();
        let answer = decode(Rank(1), &answer).unwrap();
        assert!(matches!(answer, Answer::Refused(_)), "{answer:?}");
        // The lease was not ended: completing it now goes through.
        space.complete(lease, Vec::new()).unwrap();
        assert_eq!(space.count(t).unwrap(), 0);
    });
}

#[test]
fn leases_that_ended_before_the_wait_for_the_next_tuple_broke_off_are_marked_ended() {
    dsm::transport::local::run_local_job(2, 3, |dsm| {
        let rt = Runtime::from_dsm(dsm);
        let space = TupleSpace::join(&rt).unwrap();
        let name = homed_at_rank_1(&space, "broke");
        let t = crate::template!(name.clone(), ?i64);
        if rt.rank() == Rank(0) {
            space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
            let mut leases = vec![space.in_leased(&t).unwrap()];
            // Homed at rank 1 too (the same first field and arity), and nothing will match it: the
            // completion goes in, then its wait for the next tuple breaks off as rank 1 leaves.
            let next = crate::template!(name.clone(), ?String);
            let result = crate::tuple!(name.clone(), 2i64);
            let e = space
                .complete_and_lease_many(&mut leases, vec![result], &[next], 0)
                .unwrap_err();
            assert!(e.to_string().contains("rank 1"), "{e}");
            // Rank 1 ended the lease: it is not this rank's to give back (a worker giving it back
            // was told the home refused it, as if its task were not done).
            assert!(
                leases[0].space.is_none(),
                "the lease is still taken as held"
            );
        } else {
            // The result is in (the lease ended with it); a waiting ask gives its channel up every
            // 20 ms and is told so, by which its sender learns that the completion went through.
            while space.count(&t).unwrap() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        // Both leave without the final barrier: rank 1 as a failed rank, rank 0 once it saw that.
        drop(space);
        drop(rt);
    });
}

#[test]
fn leases_that_ended_are_not_given_back() {
    with_a_lease_homed_at_rank_1("g", |_, space, name, t, lease| {
        // Completed in place (as a worker's held leases are): giving them back afterwards (a worker
        // whose next find failed, dropping what it holds) asks nothing of their home, which would
        // refuse leases it no longer holds.
        let mut leases = vec![lease];
        space
            .complete_many(&mut leases, vec![crate::tuple!(name, 2i64)])
            .unwrap();
        space.give_back(leases).unwrap();
        assert_eq!(
            space.count(t).unwrap(),
            1,
            "the result, not the leased tuple"
        );
        assert_eq!(space.in_(t).unwrap(), crate::tuple!(name, 2i64));
    });
}

#[test]
fn leases_of_another_home_stay_held_when_the_completion_with_the_results_fails() {
    with_a_lease_homed_at_rank_1("mixed", |_, space, name, t, lease| {
        // A second lease, homed at rank 0, after the first: its end comes with no result.
        let (_, mine_t, mut leases) = and_one_homed_at_rank_0(space, lease);
        // The results (homed at rank 1, where the first lease is) are more than a request carries:
        // the completion is refused.
        let results = (0..=dsm::MAX_SERVICE_REQUEST >> 20)
            .map(|_| crate::tuple!(name, vec![0u8; 1 << 20]))
            .collect();
        let e = space.complete_many(&mut leases, results).unwrap_err();
        assert!(e.to_string().contains("a request carries at most"), "{e}");
        // Both are still held (the one at rank 0 used to be ended first, its tuple taken for good
        // with no result put): given back, both tuples are in the space again.
        space.give_back(leases).unwrap();
        assert_eq!(space.count(t).unwrap(), 1);
        assert_eq!(space.count(&mine_t).unwrap(), 1, "a lease's tuple was lost");
    });
}

#[test]
fn leases_of_two_homes_that_end_are_marked_so_when_a_later_one_fails() {
    with_a_lease_homed_at_rank_1("marked", |rt, space, name, t, lease| {
        let (_, mine_t, mut leases) = and_one_homed_at_rank_0(space, lease);
        // The lease at rank 0 is given back behind its holder's back: ending it will be refused.
        let ask = encode(&Ask::GiveBack {
            leases: vec![leases[1].id],
        });
        let answer = rt.dsm().call(Rank(0), SERVICE, &[&ask]).unwrap();
        assert!(matches!(decode(Rank(0), &answer), Ok(Answer::Done)));
        let result = crate::tuple!(name, 5i64);
        assert!(space.complete_many(&mut leases, vec![result]).is_err());
        // The first ended, with its result put; the second did not end (its home refused it).
        let ended: Vec<bool> = leases.iter().map(|l| l.space.is_none()).collect();
        assert_eq!(ended, vec![true, false]);
        assert_eq!(space.in_(t).unwrap(), crate::tuple!(name, 5i64));
        assert_eq!(space.count(&mine_t).unwrap(), 1);
        // (Its home, which has it back already, refuses to take it back again.)
        let _ = space.give_back(leases);
    });
}

#[test]
fn leases_of_two_homes_complete_with_their_results() {
    with_a_lease_homed_at_rank_1("both", |_, space, name, t, lease| {
        let (mine, mine_t, mut leases) = and_one_homed_at_rank_0(space, lease);
        let results = vec![crate::tuple!(name, 5i64), crate::tuple!(mine.clone(), 6i64)];
        space.complete_many(&mut leases, results).unwrap();
        space.give_back(leases).unwrap();
        assert_eq!(space.in_(t).unwrap(), crate::tuple!(name, 5i64));
        assert_eq!(space.in_(&mine_t).unwrap(), crate::tuple!(mine, 6i64));
        assert_eq!(space.count(t).unwrap() + space.count(&mine_t).unwrap(), 0);
    });
}

#[test]
fn results_more_than_a_request_carries_are_refused_with_nothing_put_and_the_tuple_back() {
    with_a_lease_homed_at_rank_1("big", |_, space, name, t, lease| {
        // Each result is within the limits; all together, homed where the lease is, are more than
        // one request carries.
        let results = (0..=dsm::MAX_SERVICE_REQUEST >> 20)
            .map(|_| crate::tuple!(name, vec![0u8; 1 << 20]))
            .collect();
        let e = space.complete(lease, results).unwrap_err();
        assert!(e.to_string().contains("a request carries at most"), "{e}");
        // Nothing was put, and the leased tuple is back.
        assert_eq!(space.count(t).unwrap(), 1);
        assert_eq!(space.count(&crate::template!(name, ?Vec<u8>)).unwrap(), 0);
    });
}

#[test]
fn a_second_waiting_request_under_one_ticket_is_refused() {
    crate::local::run_local_job(2, 3, |rt| {
        let space = TupleSpace::join(rt).unwrap();
        let name = homed_at_rank_1(&space, "w");
        let t = crate::template!(name.clone(), ?i64);
        if rt.rank() == Rank(0) {
            // Two waiting finds under one ticket (the client never reuses one; a peer of another mind
            // might): whichever comes second is refused, so a cancel always finds the one it names.
            let find = encode(&Ask::Find {
                template: t.clone(),
                take: true,
                wait: true,
                lease: false,
                ticket: 7,
            });
            let dsm = rt.shared_dsm();
            let answers: Vec<Answer> = std::thread::scope(|s| {
                let asks: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| decode(Rank(1), &dsm.call(Rank(1), SERVICE, &[&find]).unwrap()))
                    })
                    .collect();
                // Two tuples, so that without the refusal both finds are served and the test ends.
                let served = |a: &Answer| matches!(a, Answer::Found { .. });
                // The refusal comes back at once; without it, both wait until the tuples come.
                let give_up = Instant::now() + Duration::from_secs(2);
                while !asks.iter().any(|a| a.is_finished()) && Instant::now() < give_up {
                    std::thread::sleep(Duration::from_millis(10));
                }
                space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
                space.out(crate::tuple!(name.clone(), 2i64)).unwrap();
                let answers: Vec<Answer> = asks
                    .into_iter()
                    .map(|a| a.join().unwrap().unwrap())
                    .collect();
                assert_eq!(
                    answers.iter().filter(|a| served(a)).count(),
                    1,
                    "{answers:?}"
                );
                answers
            });
            let refused = answers.iter().find_map(|a| match a {
                Answer::Refused(why) => Some(why.clone()),
                _ => None,
            });
            let why = refused.expect("the second request is refused");
            assert!(why.contains("ticket 7"), "{why}");
            assert_eq!(space.count(&t).unwrap(), 1, "one tuple taken, one left");
            space.in_(&t).unwrap();
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_completion_leases_the_tuple_of_no_field_at_its_home_on_another_rank() {
    crate::local::run_local_job(2, 3, |rt| {
        let space = TupleSpace::join(rt).unwrap();
        // The rank that is not the home of the tuple of no field completes a lease homed there.
        let home = space.home_of(None, 0);
        if rt.rank() != home {
            let name = (0..)
                .map(|i| format!("e{i}"))
                .find(|n| space.home_of(Some(&Value::Str(n.clone())), 2) == home)
                .unwrap();
            space.out(crate::tuple!(name.clone(), 1i64)).unwrap();
            let lease = space.in_leased(&crate::template!(name, ?i64)).unwrap();
            space.out(crate::tuple!()).unwrap();
            let next = space
                .complete_and_lease(lease, Vec::new(), &crate::template!())
                .unwrap();
            assert_eq!(next.tuple, crate::tuple!());
            space.complete(next, Vec::new()).unwrap();
            assert_eq!(space.count(&crate::template!()).unwrap(), 0);
        }
        rt.dsm().barrier().unwrap();
    });
}

/// A home that answers a waiting find with "not found", which only a deadline allows.
#[derive(Debug)]
struct Empty;

impl dsm::Service for Empty {
    fn request(&self, _from: Rank, _payload: Vec<u8>, reply: dsm::Responder) {
        let _ = reply.send(&[&postcard::to_allocvec(&Answer::TimedOut).unwrap()]);
    }
}

#[test]
fn a_home_answering_a_wait_without_a_deadline_with_nothing_is_named() {
    crate::local::run_local_job(2, 3, |rt| {
        if rt.rank() == Rank(1) {
            let dsm = rt.shared_dsm();
            dsm.register_service(SERVICE, Arc::new(Empty)).unwrap();
            dsm.barrier().unwrap(); // the barrier that ends rank 0's join
        } else {
            let space = TupleSpace::join(rt).unwrap();
            let t = crate::template!(homed_at_rank_1(&space, "n"), ?i64);
            // With a deadline, nothing is an answer; without one, it is the home's error.
            assert_eq!(space.rd_timeout(&t, Duration::from_secs(5)).unwrap(), None);
            match space.in_(&t) {
                Err(RuntimeError::Dsm(dsm::DsmError::Protocol { rank, what })) => {
                    assert_eq!(rank, Rank(1));
                    assert!(what.contains("TimedOut"), "{what}");
                }
                other => panic!("an empty answer to a wait without a deadline: {other:?}"),
            }
        }
        rt.dsm().barrier().unwrap();
    });
}

#[test]
fn a_found_tuple_that_does_not_match_its_template_is_an_error_and_its_lease_goes_back() {
    let liar = Arc::new(Liar::default());
    let seen = liar.clone();
    crate::local::run_local_job(2, 3, move |rt| {
        if rt.rank() == Rank(1) {
            let dsm = rt.shared_dsm();
            dsm.register_service(SERVICE, liar.clone()).unwrap();
            dsm.barrier().unwrap(); // the barrier that ends rank 0's join
        } else {
            let space = TupleSpace::join(rt).unwrap();
            let name = homed_at_rank_1(&space, "t");
            let t = crate::template!(name, ?i64);
            let results = [
                space.inp(&t).map(|_| ()),
                space.in_(&t).map(|_| ()),
                space.rd_timeout(&t, Duration::from_secs(5)).map(|_| ()),
                space.in_leased(&t).map(|_| ()),
            ];
            for result in results {
                match result {
                    Err(RuntimeError::Dsm(dsm::DsmError::Protocol { rank, what })) => {
                        assert_eq!(rank, Rank(1));
                        assert!(what.contains("\"not\""), "the tuple is named: {what}");
                    }
                    other => panic!("a tuple that does not match was taken: {other:?}"),
                }
            }
        }
        rt.dsm().barrier().unwrap();
    });
    assert_eq!(
        *seen.given_back.lock().unwrap(),
        vec![7],
        "the lease went back"
    );
}
