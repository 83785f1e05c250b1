use super::*;
use crate::tuple;

/// A home of no functions, whose eval queue no one reads.
fn home() -> Home {
    Home::new(HashMap::new(), crossbeam::channel::bounded(1).0)
}

#[test]
fn a_completion_leases_with_at_most_so_many_templates_each_with_its_first_field_given() {
    let many = |n| Some((vec![crate::template!("task", ?i64); n], 1));
    assert_eq!(next_refused(many(MAX_NEXT_TEMPLATES).as_ref()), None);
    let e = next_refused(many(MAX_NEXT_TEMPLATES + 1).as_ref()).unwrap();
    assert!(e.contains("at most 1024"), "{e}");
    assert!(next_refused(many(0).as_ref()).is_some());
    let formal = Some((
        vec![
            crate::template!("task", ?i64),
            crate::template!(?String, ?i64),
        ],
        1,
    ));
    let e = next_refused(formal.as_ref()).unwrap();
    assert!(e.contains("first field is formal"), "{e}");
}

#[test]
fn evals_waiting_to_run_are_bounded_by_their_bytes_and_room_comes_back_as_they_run() {
    let (tx, rx) = crossbeam::channel::bounded(MAX_QUEUED_EVALS);
    let f: Function = Arc::new(|t: &Tuple| t.clone());
    let home = Home::new(HashMap::from([("f".to_string(), f)]), tx);
    let args = tuple!(vec![7u8; 1 << 20]);
    let accepted = (0..MAX_QUEUED_EVALS)
        .take_while(|_| home.eval("f".into(), args.clone()).is_ok())
        .count();
    assert!(
        accepted >= 32 && accepted << 20 <= MAX_QUEUED_EVAL_BYTES,
        "{accepted} evals of 1 MiB accepted"
    );
    let e = home.eval("f".into(), args.clone()).unwrap_err();
    assert!(e.contains("bytes of arguments already"), "{e}");
    // The evaluator takes (and runs, and drops) them: the room is there again.
    assert_eq!(rx.try_iter().count(), accepted);
    home.eval("f".into(), args).unwrap();
}

#[test]
fn a_tuple_taken_for_a_waiter_that_is_gone_goes_back() {
    let home = home();
    let jobs = crate::template!("job", ?i64);
    let (take, taker) = crossbeam::channel::unbounded();
    let (read, reader) = crossbeam::channel::unbounded();
    home.state()
        .wait(
            Rank(0),
            jobs.clone(),
            Mode::Read,
            false,
            Waiter::Local(read),
        )
        .unwrap();
    home.state()
        .wait(
            Rank(0),
            jobs.clone(),
            Mode::Take,
            false,
            Waiter::Local(take),
        )
        .unwrap();
    // Both waiting threads are gone (a panic, say) without withdrawing their requests.
    drop((taker, reader));
    home.out(vec![tuple!("job", 7i64)]).unwrap();
    let s = home.state();
    assert_eq!(
        s.count(&jobs),
        1,
        "the tuple is in the space once: read in place, taken, and put back"
    );
    assert_eq!(s.waiting().0, 0, "no request waits any more");
}

#[test]
fn a_worker_waiting_when_every_ranks_tasks_come_at_once_takes_its_own() {
    let mut s = State::default();
    let mut outbox = Outbox::default();
    let (tx, rx) = crossbeam::channel::unbounded();
    let own = crate::template!("near 1", ?i64);
    let others = crate::template!("near 0", ?i64);
    s.wait_any(
        Rank(1),
        &[own.clone(), others.clone()],
        true,
        Waiter::Local(tx),
    )
    .unwrap();
    // The master's batch holds rank 0's tasks first.
    s.out_many(
        vec![
            tuple!("near 0", 1i64),
            tuple!("near 0", 2i64),
            tuple!("near 1", 3i64),
        ],
        &mut outbox,
    )
    .unwrap();
    outbox.send(&home());
    let found = rx.try_recv().expect("the waiting worker got a task");
    assert_eq!(found.tuple, tuple!("near 1", 3i64));
    assert!(found.lease.is_some(), "taken under a lease");
    assert!(rx.try_recv().is_err(), "one task for one request");
    assert_eq!(s.count(&others), 2, "rank 0's tasks stay for rank 0");
    assert!(s.waiting() == (0, 0), "the request waits no more");
}

#[test]
fn a_lease_for_a_local_waiter_that_is_gone_ends_with_it() {
    let home = home();
    let (tx, rx) = crossbeam::channel::unbounded();
    let jobs = crate::template!("job", ?i64);
    home.state()
        .wait(Rank(0), jobs.clone(), Mode::Take, true, Waiter::Local(tx))
        .unwrap();
    drop(rx);
    home.out(vec![tuple!("job", 7i64)]).unwrap();
    let s = home.state();
    assert_eq!(s.count(&jobs), 1, "the tuple is back");
    assert!(s.leases().is_empty(), "and no lease holds it");
}

#[test]
fn a_batch_of_leases_stops_at_the_data_one_answer_carries() {
    let mut s = State::default();
    let mut outbox = Outbox::default();
    let mb = || vec![7u8; 1 << 20];
    // Three tuples of 5 MiB each: two make more than MAX_TUPLE_BYTES (8 MiB).
    let big = || tuple!("big", mb(), mb(), mb(), mb(), mb());
    s.out_many(vec![big(), big(), big()], &mut outbox).unwrap();
    let template = crate::template!("big", ?Vec<u8>, ?Vec<u8>, ?Vec<u8>, ?Vec<u8>, ?Vec<u8>);
    let taken = s
        .lease_first(Rank(1), std::slice::from_ref(&template), 10)
        .unwrap();
    assert_eq!(taken.len(), 2);
    assert_eq!(s.count(&template), 1);
    // Small ones go by the count asked for.
    let small: Vec<Tuple> = (0..20i64).map(|i| tuple!("small", i)).collect();
    s.out_many(small, &mut outbox).unwrap();
    let taken = s
        .lease_first(Rank(1), &[crate::template!("small", ?i64)], 10)
        .unwrap();
    assert_eq!(taken.len(), 10);
}

#[test]
fn leases_given_back_go_back_even_beside_one_not_held() {
    let mut s = State::default();
    let mut outbox = Outbox::default();
    let a = s.grant(Rank(1), tuple!("task", 1i64), true).lease.unwrap();
    let b = s.grant(Rank(1), tuple!("task", 2i64), true).lease.unwrap();
    let theirs = s.grant(Rank(2), tuple!("task", 3i64), true).lease.unwrap();
    let e = s
        .give_back(Rank(1), &[a, theirs, 99, b], &mut outbox)
        .unwrap_err();
    assert!(e.contains(&format!("[{theirs}, 99]")), "{e}");
    let template = crate::template!("task", ?i64);
    assert_eq!(s.count(&template), 2, "both of rank 1's tasks are back");
    assert!(
        s.leases().contains_key(&theirs),
        "rank 2 still holds its own"
    );
    assert!(
        s.give_back(Rank(1), &[a], &mut outbox).is_err(),
        "given back twice"
    );
}
