//! Services registered on the service loop: late answers, a request before the answer to the one
//! before, and cancellations.

use super::*;

/// A service that keeps each request's responder, to answer later.
#[derive(Debug, Default)]
struct Keeper(std::sync::Mutex<Option<crate::service::Responder>>);

impl crate::service::Service for Keeper {
    fn request(&self, _: Rank, _: Vec<u8>, reply: crate::service::Responder) {
        *self.0.lock().unwrap() = Some(reply);
    }
}

/// Registers a [`Keeper`] as service 1 of rank 0, has the fake rank 1 send it `request`, and returns
/// the responder the service kept.
fn kept_responder(dsm: &Dsm, fake: &UnixStream, request: Request) -> crate::service::Responder {
    let keeper = Arc::new(Keeper::default());
    dsm.register_service(1, keeper.clone()).unwrap();
    kept_next(&keeper, fake, request)
}

/// Has the fake rank 1 send `request` to `keeper`, and returns the responder it kept.
fn kept_next(keeper: &Keeper, fake: &UnixStream, request: Request) -> crate::service::Responder {
    write_frame(&dup(fake), &request, &[b"ask"], &Counters::default()).unwrap();
    let t = Instant::now();
    loop {
        if let Some(r) = keeper.0.lock().unwrap().take() {
            return r;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{request:?} never came"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_rank_that_a_service_s_late_answer_cannot_reach_is_failed() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let reply = kept_responder(&dsm, &fake, Request::Service { id: 1 });
    // Rank 1 stops reading, as a rank that dies does: the answer cannot go.
    fake.shutdown(std::net::Shutdown::Read).unwrap();
    match reply.send(&[&[7u8; 64]]) {
        Err(crate::DsmError::PeerFailed { rank, .. }) => assert_eq!(rank, Rank(1)),
        other => panic!("the answer ended with {other:?}"),
    }
    // And the rank is failed (what it held given back by the services), not left to a peer timeout
    // that its heartbeats, were it alive, would never let run out.
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
}

#[test]
fn a_service_request_before_the_answer_to_the_one_before_cuts_its_sender_off() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let keeper = Arc::new(Keeper::default());
    dsm.register_service(1, keeper.clone()).unwrap();
    // A request, its cancellation, the answer, then the next request: the protocol as requesters
    // follow it, served throughout.
    let first = kept_next(&keeper, &fake, Request::Service { id: 1 });
    let cancel = kept_next(&keeper, &fake, Request::ServiceCancel { id: 1 });
    assert!(cancel.cancels() && !first.cancels());
    drop(cancel);
    first.send(&[b"one"]).unwrap();
    assert!(matches!(fake_reads(&fake).0, Reply::Service));
    let _second = kept_next(&keeper, &fake, Request::Service { id: 1 });
    assert!(dsm.failed_ranks().is_empty());
    // One more before `_second` is answered breaks it.
    write_frame(
        &dup(&fake),
        &Request::Service { id: 1 },
        &[b"more"],
        &Counters::default(),
    )
    .unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    assert!(keeper.0.lock().unwrap().is_none());
}

#[test]
fn a_service_never_answers_a_cancellation() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let reply = kept_responder(&dsm, &fake, Request::ServiceCancel { id: 1 });
    assert!(reply.cancels());
    reply.send(&[b"an answer that must not go"]).unwrap();
    // The next frame rank 1 reads is the answer to its next request (to a service not registered),
    // not one to the cancellation.
    write_frame(
        &dup(&fake),
        &Request::Service { id: 2 },
        &[],
        &Counters::default(),
    )
    .unwrap();
    let (reply, _) = fake_reads(&fake);
    assert!(
        matches!(
            reply,
            Reply::Refused {
                reason: RefusedReason::UnknownService
            }
        ),
        "{reply:?}"
    );
    assert!(dsm.failed_ranks().is_empty());
}
