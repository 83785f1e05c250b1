//! The service loop's tests: rank 0 of a job runs its real loop, and the test plays the other ranks over
//! raw sockets (`rank0_with_fakes`), so that each message's handling is checked on its own.

use super::*;
use crate::dsm::FailurePolicy;
use crate::protocol::swmr::{self, Access, Data};
use crate::region::{Placement, Region, RegionShared, READ_ONLY, READ_WRITE, STATE_MASK};
use crate::transport::{Mesh, Transport};
use crate::wire::Request;
use crate::Dsm;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A transport that hands over a mesh built by the test.
#[derive(Debug)]
struct Given(Mesh);

impl crate::transport::Transport for Given {
    fn establish(self: Box<Self>, _: Rank, _: usize, _: usize) -> crate::Result<Mesh> {
        Ok(self.0)
    }
    fn name(&self) -> &'static str {
        "given"
    }
}

/// Rank 0 of a 2-rank job that reports failures, whose rank 1 is played by the test through raw
/// sockets: the first of rank 1's two connections to rank 0's service loop, and the second.
fn rank0_with_fake_peer() -> (Dsm, UnixStream, UnixStream) {
    rank0_with_fake_peer_and_timeout(Some(crate::DEFAULT_PEER_TIMEOUT))
}

/// The same, with a peer timeout of the test's.
fn rank0_with_fake_peer_and_timeout(timeout: Option<Duration>) -> (Dsm, UnixStream, UnixStream) {
    let (dsm, fake, other, control) = rank0_with_fake_peer_listening(timeout);
    std::mem::forget(control);
    (dsm, fake, other)
}

/// The same, with rank 1's end of rank 0's service loop's own connection to it (heartbeats).
fn rank0_with_fake_peer_listening(
    timeout: Option<Duration>,
) -> (Dsm, UnixStream, UnixStream, UnixStream) {
    let (dsm, mut fakes) = rank0_with_fakes(2, timeout);
    let f = fakes.pop().expect("one fake rank");
    // Its ends of rank 0's channels stay open, unread, as a rank that lives keeps them.
    std::mem::forget(f.channels);
    (dsm, f.fake, f.other, f.control)
}

/// One rank played by the test: its two connections to rank 0's service loop (a channel's, and its
/// service loop's own, whose end says that it has left the job), and its end of rank 0's service loop's
/// own connection to it.
struct FakeRank {
    fake: UnixStream,
    other: UnixStream,
    control: UnixStream,
    /// Its ends of rank 0's channels' connections to it, by set: where rank 0's requests come.
    channels: Vec<UnixStream>,
}

/// Rank 0 of a job of `size` ranks that reports failures, whose ranks 1 and up are played by the test.
fn rank0_with_fakes(size: usize, timeout: Option<Duration>) -> (Dsm, Vec<FakeRank>) {
    let mut outgoing = Vec::new();
    let mut incoming = Vec::new();
    let mut controls: Vec<UnixStream> = Vec::new();
    let mut channel_ends: Vec<Vec<UnixStream>> = (1..size).map(|_| Vec::new()).collect();
    // Two channels and the service loop's own connections (the last set).
    for set in 0..3 {
        let (self_out, self_in) = UnixStream::pair().unwrap();
        let mut row = vec![socket(self_out)];
        for ends in channel_ends.iter_mut() {
            let (to_fake, fake_listens) = UnixStream::pair().unwrap();
            if set == 2 {
                controls.push(fake_listens);
            } else {
                ends.push(fake_listens);
            }
            row.push(socket(to_fake));
        }
        outgoing.push(row);
        incoming.push(Incoming {
            from: Rank(0),
            control: set == 2,
            conn: socket(self_in),
        });
    }
    let mut fakes = Vec::new();
    for ((r, control), channels) in (1..size as u32).zip(controls).zip(channel_ends) {
        let (fake, from_fake) = UnixStream::pair().unwrap();
        incoming.push(Incoming {
            from: Rank(r),
            control: false,
            conn: socket(from_fake),
        });
        let (other, from_fake) = UnixStream::pair().unwrap();
        incoming.push(Incoming {
            from: Rank(r),
            control: true,
            conn: socket(from_fake),
        });
        fakes.push(FakeRank {
            fake,
            other,
            control,
            channels,
        });
    }
    let given: Box<dyn Transport> = Box::new(Given(Mesh {
        outgoing,
        incoming,
        host: None,
    }));
    let dsm = Dsm::builder()
        .rank(Rank(0), size)
        .channels(2)
        .failure_policy(FailurePolicy::Report)
        .peer_timeout(timeout)
        .transport(given)
        .build()
        .unwrap();
    (dsm, fakes)
}

#[test]
fn a_transport_that_does_not_mark_one_service_loop_connection_per_rank_is_refused() {
    for marks in [0, 2] {
        let mut outgoing = Vec::new();
        let mut incoming = Vec::new();
        for set in 0..3 {
            let (out, inc) = UnixStream::pair().unwrap();
            outgoing.push(vec![socket(out)]);
            incoming.push(Incoming {
                from: Rank(0),
                control: set >= 3 - marks,
                conn: socket(inc),
            });
        }
        let given: Box<dyn Transport> = Box::new(Given(Mesh {
            outgoing,
            incoming,
            host: None,
        }));
        let e = Dsm::builder()
            .rank(Rank(0), 1)
            .channels(2)
            .transport(given)
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "marked {marks} connections from rank 0 as its service loop's, not one"
            )),
            "{e}"
        );
    }
}

#[test]
fn a_message_cut_off_by_a_reader_that_stopped_fails_that_reader_and_ends_its_connection() {
    let (dsm, fakes) = rank0_with_fakes(2, None);
    // The fake rank 1 reads nothing of its connection from rank 0's service loop: the messages fill
    // it until one goes out only in part, and its sending gives up after the second it may wait.
    let reason = vec![b'x'; 64 << 10];
    for _ in 0..64 {
        if !dsm.failed_ranks().is_empty() {
            break;
        }
        dsm.shared
            .tell_others(&Request::PeerLost { rank: 1 }, &reason, None);
    }
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    // What rank 1 reads, should it read on: whole messages, then at most the part of the last that
    // went out, and then the connection's end, not another message after the cut one (which it would
    // read from inside the cut one as a malformed frame, and take rank 0 for the failed rank).
    let mut control = &fakes[0].control;
    control
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    let read = control.read_to_end(&mut bytes);
    assert!(read.is_ok(), "the connection did not end: {read:?}");
    let mut at = 0;
    let mut whole = 0;
    while at + 4 <= bytes.len() {
        let header: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        let len = wire::body_len(header, usize::MAX >> 1).unwrap();
        if at + 4 + len > bytes.len() {
            break;
        }
        let (req, payload) = wire::decode::<Request>(&bytes[at + 4..at + 4 + len]).unwrap();
        assert!(
            matches!(req, Request::PeerLost { rank: 1 }) && payload == &reason[..],
            "{req:?}"
        );
        at += 4 + len;
        whole += 1;
    }
    assert!(whole > 0, "no whole message went out");
    assert!(
        bytes.len() - at < 4 + reason.len(),
        "more than one message's part after the last whole one"
    );
}

/// Whether rank 0 sees `rank` leave the job (`Shared::gone`) within 5 s.
fn gone_within(region: &RegionShared, rank: Rank) -> bool {
    let gone = &region.shared.gone[rank.index()];
    let t = Instant::now();
    while !gone.load(Ordering::Acquire) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    gone.load(Ordering::Acquire)
}

fn failed_within(dsm: &Dsm, limit: Duration) -> Vec<Rank> {
    let t = Instant::now();
    while dsm.failed_ranks().is_empty() && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(5));
    }
    dsm.failed_ranks()
}

/// The fake rank 1 sends `req` (a lock request carries a clock of its own).
fn fake_sends(fake: &UnixStream, req: Request) {
    let clock = crate::rc::encode_clock(&VectorClock::new(2));
    let payload: &[&[u8]] = match req {
        Request::LockAcquire { .. } => &[&clock],
        _ => &[],
    };
    write_frame(&dup(fake), &req, payload, &Counters::default()).unwrap();
}

fn socket(s: UnixStream) -> Conn {
    Conn::from(OwnedFd::from(s))
}

/// A connection on a copy of `s`'s descriptor, to write frames with: dropped, it closes only the copy.
fn dup(s: &UnixStream) -> Conn {
    socket(s.try_clone().unwrap())
}

/// A thread of rank 0 that takes lock 0 and says what came of it (the time it got the lock, or the
/// error). The thread is left to itself, so that a lock lost for good fails a test instead of hanging
/// it.
fn taker(dsm: &Arc<Dsm>) -> std::sync::mpsc::Receiver<crate::Result<Instant>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dsm = Arc::clone(dsm);
    std::thread::spawn(move || {
        let _ = tx.send(dsm.lock(0).map(|_g| Instant::now()));
    });
    rx
}

/// When another thread of rank 0 gets lock 0 (homed at rank 0), asking while `guard` is held for 200
/// ms, and when the guard went: `None` if it did not get it within 5 s.
fn next_taker_gets_it(dsm: &Arc<Dsm>, guard: crate::LockGuard<'_>) -> Option<(Instant, Instant)> {
    let rx = taker(dsm);
    std::thread::sleep(Duration::from_millis(200));
    let released = Instant::now();
    drop(guard);
    let got = rx.recv_timeout(Duration::from_secs(5)).ok()?.ok()?;
    Some((released, got))
}

#[test]
fn a_rank_is_failed_once_it_has_not_been_heard_from_for_the_peer_timeout() {
    let (dsm, fake, _other) = rank0_with_fake_peer_and_timeout(Some(Duration::from_secs(2)));
    // Heartbeats every 200 ms for 4.5 s keep it alive, past two timeouts.
    let t = Instant::now();
    let mut last = t;
    while t.elapsed() < Duration::from_millis(4500) {
        fake_sends(&fake, Request::Heartbeat);
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        dsm.failed_ranks().is_empty(),
        "rank 1 failed while it sent heartbeats"
    );
    // Silent since the last one: failed after the timeout (and a check interval), not before.
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), [Rank(1)]);
    let took = last.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "failed {took:?} after it fell silent"
    );
}

#[test]
fn heartbeats_go_out_at_least_once_a_second_even_without_a_timeout() {
    // Another rank may have a timeout, and must hear from this one.
    let (_dsm, _fake, _other, control) = rank0_with_fake_peer_listening(None);
    control
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut beats = Vec::new();
    let mut frame = [0u8; 64];
    while beats.len() < 3 {
        let mut len = [0u8; 4];
        (&control)
            .read_exact(&mut len)
            .expect("a heartbeat within 3 s");
        beats.push(Instant::now());
        let n = u32::from_le_bytes(len) as usize;
        (&control).read_exact(&mut frame[..n]).unwrap();
        let (req, _) = wire::decode::<Request>(&frame[..n]).unwrap();
        assert!(matches!(req, Request::Heartbeat), "{req:?}");
    }
    // Two intervals of at most a second, with room for a loaded machine; beats every two seconds
    // would take four.
    let two = beats[2] - beats[0];
    assert!(
        two < Duration::from_millis(3500),
        "{two:?} for two intervals"
    );
}

#[test]
fn a_thread_blocked_sending_to_a_rank_failed_for_its_silence_is_told() {
    // The fake rank 1 reads nothing: a request larger than the socket's buffer blocks its sender.
    let (dsm, _fake, _other) = rank0_with_fake_peer_and_timeout(Some(Duration::from_secs(2)));
    let dsm = Arc::new(dsm);
    let (tx, rx) = std::sync::mpsc::channel();
    let caller = Arc::clone(&dsm);
    std::thread::spawn(move || {
        let big = vec![7u8; 8 << 20];
        let _ = tx.send(caller.call(Rank(1), 0, &[&big]).map(|_| ()));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(crate::DsmError::PeerFailed { rank, .. })) => assert_eq!(rank, Rank(1)),
        Ok(other) => panic!("the call ended with {other:?}"),
        Err(_) => panic!("the sending thread still waits 10 s after its rank fell silent"),
    }
    assert_eq!(dsm.failed_ranks(), [Rank(1)]);
}

#[test]
fn without_a_peer_timeout_no_silence_is_too_long() {
    let t0 = Instant::now();
    let mut l = Liveness {
        timeout: None,
        heard: vec![t0; 3],
        left: vec![false; 3],
        beat: t0,
        looked: t0,
    };
    let hour = t0 + Duration::from_secs(3600);
    assert_eq!(l.late(hour, 0, |_| false), []);
    l.timeout = Some(Duration::from_secs(2));
    assert_eq!(l.late(hour, 0, |_| false), [Rank(1), Rank(2)]);
    assert_eq!(l.late(t0 + Duration::from_secs(1), 0, |_| false), []);
    // Neither a rank that left nor one already failed is failed again.
    l.left[2] = true;
    assert_eq!(l.late(hour, 0, |_| false), [Rank(1)]);
    assert_eq!(l.late(hour, 0, |r| r == 1), []);
}

#[test]
fn a_peer_timeout_under_two_seconds_is_refused() {
    let e = Dsm::builder()
        .peer_timeout(Some(Duration::from_millis(1500)))
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DSM_PEER_TIMEOUT") && e.contains("at least 2s"),
        "{e}"
    );
}

#[test]
fn a_malformed_frame_is_an_error_for_that_peer_not_a_panic() {
    let cases: [&[u8]; 3] = [
        &[0, 0, 0, 0],                               // a frame of length zero
        &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3],          // a length far over the limit
        &[6, 0, 0, 0, 4, 0, 0xee, 0xee, 0xee, 0xee], // a header that does not decode
    ];
    for bytes in cases {
        let (dsm, mut fake, mut other) = rank0_with_fake_peer();
        fake.write_all(bytes).unwrap();
        assert_eq!(
            failed_within(&dsm, Duration::from_secs(5)),
            vec![Rank(1)],
            "after {bytes:?}"
        );
        // The peer, should it live on, learns it too: both its connections end (it would otherwise wait
        // for ever for replies to what it sent on them).
        for conn in [&mut fake, &mut other] {
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut byte = [0u8; 1];
            assert_eq!(
                conn.read(&mut byte).unwrap(),
                0,
                "after {bytes:?}, a connection of the failed peer is still open"
            );
            // Its sends still go in: a send that fails would say this rank had left the job, and the
            // peer would take its copies of pages for gone with it.
            conn.write_all(&[0u8; 64]).unwrap();
        }
        // The rank still serves itself.
        dsm.ping(Rank(0), 64).unwrap();
    }
}

#[test]
fn a_call_waiting_at_a_rank_that_fails_but_lives_on_ends_with_an_error() {
    let (dsm, mut fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // A call that rank 1 holds (a blocked `in`, say): the fake rank 1 never answers.
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dsm.clone();
    std::thread::spawn(move || {
        let _ = tx.send(d.call_waiting(Rank(1), 3, &[b"wait"], None));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the call returned before rank 1 failed"
    );
    // Rank 1 sends a frame rank 0 cannot take, and lives on (its connections stay open).
    fake.write_all(&[0, 0, 0, 0]).unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(crate::DsmError::PeerFailed { rank, .. })) => assert_eq!(rank, Rank(1)),
        Ok(other) => panic!("the waiting call ended with {other:?}"),
        Err(_) => panic!("the waiting call still waits 5 s after its rank failed"),
    }
    // A later call to it fails at once, and the rank still serves itself.
    assert!(matches!(
        dsm.call_waiting(Rank(1), 3, &[b"again"], None),
        Err(crate::DsmError::PeerFailed { .. })
    ));
    dsm.ping(Rank(0), 64).unwrap();
}

#[test]
fn a_truncated_frame_then_a_closed_connection_is_a_peer_failure() {
    let (dsm, mut fake, _other) = rank0_with_fake_peer();
    fake.write_all(&[40, 0, 0, 0, 2, 0]).unwrap();
    drop(fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
}

#[test]
fn a_release_by_a_rank_that_does_not_hold_the_lock_is_refused() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    let guard = dsm.lock(0).unwrap();
    // Rank 1 releases lock 0, which rank 0 holds: a protocol error, and rank 1 is cut off.
    fake_sends(&fake, Request::LockRelease { lock: 0 });
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    // The lock is still rank 0's: another taker gets it only once the guard goes.
    let (released, got) = next_taker_gets_it(&dsm, guard).expect("the lock was lost");
    assert!(
        got >= released,
        "a second holder got the lock while the first held it"
    );
}

#[test]
fn a_barrier_arrival_carrying_another_ranks_notices_or_horizon_cuts_its_sender_off() {
    use crate::protocol::release::{PageRun, WriteNotice};
    let others_notice = WriteNotice {
        rank: Rank(0),
        interval: 1_000_000,
        runs: vec![PageRun {
            region: 1,
            first: 0,
            len: 1,
        }],
    };
    let own_notice = WriteNotice {
        rank: Rank(1),
        ..others_notice.clone()
    };
    let others_horizon = VectorClock(vec![1_000_000, 0]);
    for (notices, horizon, foreign) in [
        (vec![own_notice.clone()], VectorClock::new(2), false),
        (vec![own_notice, others_notice], VectorClock::new(2), true),
        (Vec::new(), others_horizon, true),
    ] {
        let (dsm, fake, _other) = rank0_with_fake_peer();
        let payload = crate::rc::encode_notices(&notices, &horizon);
        let request = Request::Barrier {
            epoch: 0,
            tag: 0,
            carried: 0,
        };
        write_frame(&dup(&fake), &request, &[&payload], &Counters::default()).unwrap();
        let failed = failed_within(&dsm, Duration::from_millis(500));
        let want = if foreign { vec![Rank(1)] } else { Vec::new() };
        assert_eq!(failed, want, "{notices:?} {horizon:?}");
    }
}

#[test]
fn those_waiting_for_a_lock_whose_holder_failed_are_told_and_later_takers_too() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // Rank 1 takes lock 0 (homed at rank 0), then a thread of rank 0 waits for it.
    fake_sends(&fake, Request::LockAcquire { lock: 0 });
    std::thread::sleep(Duration::from_millis(100));
    let rx = taker(&dsm);
    std::thread::sleep(Duration::from_millis(100));
    // Rank 1 fails holding it (a frame rank 0 cannot take: a reply where a request belongs).
    write_frame(&dup(&fake), &Reply::Ack, &[], &Counters::default()).unwrap();
    let told = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the waiter was left waiting");
    match told {
        Err(crate::DsmError::PeerFailed { rank, .. }) => assert_eq!(rank, Rank(1)),
        other => panic!("{other:?}"),
    }
    match dsm.lock(0).map(drop) {
        Err(crate::DsmError::PeerFailed { rank, .. }) => assert_eq!(rank, Rank(1)),
        other => panic!("a later taker: {other:?}"),
    }
}

#[test]
fn a_lock_being_granted_is_not_let_go_with_the_idle_ones() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // Idle lock servers (even ids are homed at rank 0), as many as the home keeps less one: a
    // release lets the idle ones go once there are more (servers are let go only at releases).
    for k in 0..(2 * sync::KEPT_LOCKS as u64 - 1) {
        drop(dsm.lock(1000 + 2 * k).unwrap());
    }
    // Rank 0 holds lock 0 and rank 1 waits for it; with one more lock held, rank 0's release of lock
    // 0 hands it to rank 1 while the home lets its idle servers go.
    let guard = dsm.lock(0).unwrap();
    fake_sends(&fake, Request::LockAcquire { lock: 0 });
    std::thread::sleep(Duration::from_millis(100));
    let other = dsm.lock(998).unwrap();
    drop(guard);
    // Rank 1 holds it now: rank 0 gets it again only after rank 1's release.
    let rx = taker(&dsm);
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "rank 0 got the lock while rank 1 held it"
    );
    let released = Instant::now();
    fake_sends(&fake, Request::LockRelease { lock: 0 });
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("rank 1's release did not hand the lock on")
        .unwrap();
    assert!(got >= released);
    assert!(dsm.failed_ranks().is_empty());
    drop(other);
    // Rank 1 leaves, so that rank 0's end of the job does not wait for it.
    drop(fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
}

#[test]
fn a_grant_that_cannot_be_sent_passes_the_lock_on() {
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    let guard = dsm.lock(0).unwrap();
    // Rank 1 waits for lock 0, then stops reading (as a rank that dies does, before its end of the
    // connection is seen): the grant to it fails when rank 0 releases.
    fake_sends(&fake, Request::LockAcquire { lock: 0 });
    // The wait is queued before rank 0's own next request (the loop serves in order of arrival).
    std::thread::sleep(Duration::from_millis(100));
    fake.shutdown(std::net::Shutdown::Read).unwrap();
    // Rank 0's next taker (queued behind rank 1) gets the lock after all.
    assert!(
        next_taker_gets_it(&dsm, guard).is_some(),
        "the lock stayed with a rank that never got it"
    );
    assert_eq!(dsm.failed_ranks(), vec![Rank(1)]);
}

/// The fake rank 1 reads the next frame rank 0 sends it on `fake`.
fn fake_reads(mut fake: &UnixStream) -> (Reply, Vec<u8>) {
    fake.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut header = [0u8; 4];
    fake.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; wire::body_len(header, usize::MAX >> 1).unwrap()];
    fake.read_exact(&mut body).unwrap();
    let (reply, payload) = wire::decode::<Reply>(&body).unwrap();
    (reply, payload.to_vec())
}

/// A fake rank's side of rank 0's first `alloc` (of `len` bytes at `placement`, of `model`, with direct
/// install off) in a job of `size` ranks: the barriers around the arena's reservation, then the
/// region's own two.
fn fake_allocates_first_with(
    fake: &UnixStream,
    size: usize,
    len: usize,
    placement: Placement,
    model: Consistency,
) {
    let tag = crate::dsm::alloc_tag(0, len, placement, model);
    let tags = [
        crate::dsm::ARENA_RESERVED,
        crate::dsm::ARENA_MAPPED + 1,
        tag,
        tag ^ 1,
    ];
    let notices = crate::rc::encode_notices(&[], &VectorClock::new(size));
    for (epoch, tag) in (0..).zip(tags) {
        let arrive = Request::Barrier {
            epoch,
            tag,
            carried: 0,
        };
        write_frame(&dup(fake), &arrive, &[&notices], &Counters::default()).unwrap();
        let (reply, _) = fake_reads(fake);
        assert!(matches!(reply, Reply::BarrierDone), "{reply:?}");
    }
}

/// The bytes rank 0 writes into its page in the tests below.
fn pattern() -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect()
}

/// Rank 0 and the `fakes` allocate a region of `pages` pages homed at rank 0, untouched.
fn homed_region<'d>(dsm: &'d Dsm, fakes: &[FakeRank], pages: usize) -> Region<'d> {
    homed_region_with(dsm, fakes, pages, Consistency::Sequential)
}

/// The same, of a region of `model`.
fn homed_region_with<'d>(
    dsm: &'d Dsm,
    fakes: &[FakeRank],
    pages: usize,
    model: Consistency,
) -> Region<'d> {
    region_at(dsm, fakes, pages, Placement::At(Rank(0)), model)
}

/// Rank 0 and the `fakes` allocate a region of one page, under sequential consistency, homed at rank 1
/// (a fake: the test plays its home).
fn page_at_rank1<'d>(dsm: &'d Dsm, fakes: &[FakeRank]) -> Region<'d> {
    region_at(
        dsm,
        fakes,
        1,
        Placement::At(Rank(1)),
        Consistency::Sequential,
    )
}

/// The same, of a region placed at `placement`.
fn region_at<'d>(
    dsm: &'d Dsm,
    fakes: &[FakeRank],
    pages: usize,
    placement: Placement,
    model: Consistency,
) -> Region<'d> {
    let size = fakes.len() + 1;
    let len = pages * PAGE_SIZE;
    let arriving: Vec<_> = fakes
        .iter()
        .map(|f| {
            let fake = f.fake.try_clone().unwrap();
            std::thread::spawn(move || {
                fake_allocates_first_with(&fake, size, len, placement, model)
            })
        })
        .collect();
    // The ranks played by the test take no descriptors.
    dsm.set_direct_install(false);
    let region = dsm.alloc_with(len, placement, model).unwrap();
    for a in arriving {
        a.join().unwrap();
    }
    region
}

/// Rank 0 and the `fakes` allocate a one-page region homed at rank 0, and rank 0 writes `pattern()`
/// into it (owning the only copy).
fn home_page<'d>(dsm: &'d Dsm, fakes: &[FakeRank]) -> Region<'d> {
    let region = homed_region(dsm, fakes, 1);
    // SAFETY: the region is one page long, and its test's only user of it.
    unsafe { std::ptr::copy_nonoverlapping(pattern().as_ptr(), region.as_ptr(), PAGE_SIZE) };
    region
}

/// The fake rank asks rank 0 for page 0 of `region`.
fn fake_faults(fake: &UnixStream, region: &RegionShared, access: Access) {
    fake_faults_ahead(fake, region, access, 1);
}

/// The fake rank asks rank 0 for page 0 of `region` and up to `count` pages from it.
fn fake_faults_ahead(fake: &UnixStream, region: &RegionShared, access: Access, count: u32) {
    let acquire = Request::Acquire {
        region: region.id,
        page: 0,
        access,
        count,
        direct: false,
    };
    fake_sends(fake, acquire);
}

/// The fake rank asks rank 0 for page 0 of `region`: rank 0's answer.
fn fake_asks(fake: &UnixStream, region: &RegionShared, access: Access) -> Reply {
    fake_faults(fake, region, access);
    fake_reads(fake).0
}

/// The fake rank writes page 0 of `region`, which its home (rank 0) hands over at once: the fake then
/// owns the page, and its copy is the only one.
fn fake_owns(fake: &UnixStream, region: &RegionShared) {
    let reply = fake_asks(fake, region, Access::Write);
    assert!(matches!(reply, Reply::Done { .. }), "{reply:?}");
}

/// The fake rank reads page 0 of `region`, which the home answers with its copy, `pattern()`.
fn fake_reads_the_home_page(fake: &UnixStream, region: &RegionShared) {
    fake_faults(fake, region, Access::Read);
    let (reply, payload) = fake_reads(fake);
    assert!(
        matches!(
            reply,
            Reply::Done {
                data: Data::Home,
                count: 1
            }
        ),
        "{reply:?}"
    );
    assert!(payload == pattern(), "the fake rank read another page");
}

/// The fake rank's batch of diffs setting byte `at` of each of `pages` of `region` to `value` (pages in
/// the order given).
fn fake_sends_diffs(fake: &UnixStream, region: &RegionShared, pages: &[u64], at: usize, value: u8) {
    let twin = vec![0u8; PAGE_SIZE];
    let mut page = twin.clone();
    page[at] = value;
    let mut batch = Vec::new();
    for &p in pages {
        crate::protocol::diff::push_entry(p, &twin, &page, &mut batch);
    }
    let req = Request::Diffs {
        region: region.id,
        count: pages.len() as u32,
        selective: false,
    };
    write_frame(&dup(fake), &req, &[&batch], &Counters::default()).unwrap();
}

#[test]
fn a_batch_of_diffs_waits_whole_for_a_page_a_fault_of_the_home_holds() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 3, Consistency::Release);
    let shared = &region.inner;
    // Rank 0 writes its pages: present and writable here.
    // SAFETY: the region is three pages long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 1, 3 * PAGE_SIZE) };
    // A fault of rank 0 holds page 1 (as the fault path does, with its BUSY bit).
    shared
        .state(1)
        .fetch_or(crate::region::BUSY, Ordering::AcqRel);
    fake_sends_diffs(&f.fake, shared, &[0, 1, 2], 100, 7);
    let mut fake = &f.fake;
    fake.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        fake.read(&mut byte).is_err(),
        "the batch was answered while a page of it was held"
    );
    let bytes = |page: usize| {
        // SAFETY: the pages are present here (written above); diffs write them only under their BUSY
        // bits, held by this test or checked free below.
        unsafe { *region.as_ptr().add(page * PAGE_SIZE + 100) }
    };
    assert_eq!(
        (bytes(0), bytes(2)),
        (1, 1),
        "a page of a waiting batch changed: the batch is applied whole or not at all"
    );
    crate::fault::release_busy(shared, 1);
    let (reply, _) = fake_reads(&f.fake);
    assert!(matches!(reply, Reply::Ack), "{reply:?}");
    assert_eq!((bytes(0), bytes(1), bytes(2)), (7, 7, 7));
    assert_eq!(dsm.stats().diffs_applied, 3);
    assert!(dsm.failed_ranks().is_empty());
}

#[test]
fn a_batch_of_diffs_parked_here_is_not_applied_once_its_sender_has_failed() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 1, Consistency::Release);
    let shared = &region.inner;
    // SAFETY: the region is one page long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 1, PAGE_SIZE) };
    // A fault of rank 0 holds the page: the batch is parked.
    shared
        .state(0)
        .fetch_or(crate::region::BUSY, Ordering::AcqRel);
    fake_sends_diffs(&f.fake, shared, &[0], 100, 7);
    let mut fake = &f.fake;
    fake.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        fake.read(&mut [0u8; 1]).is_err(),
        "the batch was answered while its page was held"
    );
    // Its sender fails (its connection breaks; it may live on), and then the page is let go.
    drop(f.fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    crate::fault::release_busy(shared, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dsm.stats().diffs_applied,
        0,
        "a failed rank's diffs were applied"
    );
    // SAFETY: the page is present here (written above); nothing writes it any more (no diffs are
    // applied, as the counter says, and this test's thread is the only other user).
    assert_eq!(unsafe { *region.as_ptr().add(100) }, 1);
}

/// A carry (`rc::carry`) numbered `seq` of one diff that writes `value` at byte `at` of page 0 of
/// `region`.
fn carry_of(region: &RegionShared, seq: u64, at: usize, value: u8) -> Vec<u8> {
    let twin = vec![0u8; PAGE_SIZE];
    let mut page = twin.clone();
    page[at] = value;
    let mut bytes = Vec::new();
    crate::protocol::diff::push_entry(0, &twin, &page, &mut bytes);
    let carry = crate::rc::carry::Carry {
        seq,
        batches: vec![crate::rc::carry::CarriedBatch {
            region: region.id,
            count: 1,
            bytes,
        }],
    };
    postcard::to_allocvec(&carry).unwrap()
}

/// The fake rank sends `carry` in a request of its own, as another thread's release does.
fn fake_sends_carry(fake: &UnixStream, carry: &[u8]) {
    write_frame(
        &dup(fake),
        &Request::Carried,
        &[carry],
        &Counters::default(),
    )
    .unwrap();
}

#[test]
fn rank_0_applies_each_carry_once_before_it_answers_the_barrier_that_carries_it() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    let region = homed_region_with(&dsm, std::slice::from_ref(&f), 1, Consistency::Release);
    let shared = &region.inner;
    // SAFETY: the region is one page long, and its test's only user of it.
    unsafe { std::ptr::write_bytes(region.as_ptr(), 1, PAGE_SIZE) };
    let byte = || {
        // SAFETY: the page is present here (written above); diffs write it only under its BUSY bit,
        // checked free or held by this test when this reads.
        unsafe { *region.as_ptr().add(100) }
    };
    let notices = crate::rc::encode_notices(&[], &VectorClock::new(2));
    // The fake's barriers follow the four of the allocation.
    let arrive = |epoch: u64, carry: &[u8]| {
        let request = Request::Barrier {
            epoch,
            tag: 0,
            carried: carry.len() as u32,
        };
        write_frame(
            &dup(&f.fake),
            &request,
            &[carry, &notices],
            &Counters::default(),
        )
        .unwrap();
    };
    let answered = || {
        let (reply, _) = fake_reads(&f.fake);
        assert!(matches!(reply, Reply::BarrierDone), "{reply:?}");
    };
    // Carry 1 sent on its own (as another thread's release sends it) is applied and acknowledged.
    let first = carry_of(shared, 1, 100, 7);
    fake_sends_carry(&f.fake, &first);
    assert!(matches!(fake_reads(&f.fake).0, Reply::Ack));
    assert_eq!(byte(), 7);
    // A later write of the same byte, synchronized after it, reaches the home as diffs.
    fake_sends_diffs(&f.fake, shared, &[0], 100, 9);
    assert!(matches!(fake_reads(&f.fake).0, Reply::Ack));
    assert_eq!(byte(), 9);
    // The barrier arrival that carried carry 1 too comes after: it is not applied again.
    std::thread::scope(|sc| {
        let rank0 = sc.spawn(|| dsm.barrier());
        arrive(4, &first);
        answered();
        rank0.join().unwrap().unwrap();
    });
    assert_eq!(byte(), 9, "a carry was applied twice, over a later write");
    assert_eq!(dsm.stats().diffs_applied, 2);
    // A new carry goes with the next arrival; while a fault of rank 0 holds the page, the arrival waits
    // and the barrier is not answered.
    shared
        .state(0)
        .fetch_or(crate::region::BUSY, Ordering::AcqRel);
    std::thread::scope(|sc| {
        let rank0 = sc.spawn(|| dsm.barrier());
        arrive(5, &carry_of(shared, 2, 100, 3));
        let mut fake = &f.fake;
        fake.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            fake.read(&mut [0u8; 1]).is_err(),
            "the barrier was answered before the diffs its arrival carried were applied"
        );
        assert_eq!(byte(), 9);
        crate::fault::release_busy(shared, 0);
        answered();
        rank0.join().unwrap().unwrap();
    });
    assert_eq!(byte(), 3);
    assert_eq!(dsm.stats().diffs_applied, 3);
    assert!(dsm.failed_ranks().is_empty());
}

#[test]
fn a_carry_of_diffs_for_another_rank_s_pages_fails_its_sender() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    // Page 0 of a region homed at rank 1.
    let placement = Placement::At(Rank(1));
    let region = region_at(
        &dsm,
        std::slice::from_ref(&f),
        1,
        placement,
        Consistency::Release,
    );
    fake_sends_carry(&f.fake, &carry_of(&region.inner, 1, 8, 5));
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    assert_eq!(dsm.stats().diffs_applied, 0);
}

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

#[test]
fn a_barrier_arrival_carrying_updates_of_another_rank_s_writes_fails_its_sender() {
    use crate::protocol::release::{PageKey, Update};
    let (dsm, fake, _other) = rank0_with_fake_peer();
    let dsm = Arc::new(dsm);
    // An arrival of rank 1 whose update names `writer` as the rank that wrote it.
    let arrive = |writer: u32, epoch: u64| {
        let twin = vec![0u8; PAGE_SIZE];
        let mut page = twin.clone();
        page[8] = 5;
        let mut diff = Vec::new();
        crate::protocol::diff::encode(&twin, &page, &mut diff);
        let update = Update {
            rank: Rank(writer),
            interval: 1,
            page: PageKey { region: 1, page: 0 },
            diff,
        };
        let notices =
            crate::rc::encode_notices_within(&[], &VectorClock::new(2), &[update], usize::MAX);
        let request = Request::Barrier {
            epoch,
            tag: 0,
            carried: 0,
        };
        write_frame(&dup(&fake), &request, &[&notices], &Counters::default()).unwrap();
    };
    // Its own writes' update goes through: the barrier ends, and hands it back.
    let d = Arc::clone(&dsm);
    let rank0 = std::thread::spawn(move || d.barrier());
    arrive(1, 0);
    let (reply, payload) = fake_reads(&fake);
    assert!(matches!(reply, Reply::BarrierDone), "{reply:?}");
    let (_, _, updates) = crate::rc::decode_exchange(&payload, Rank(0), 2).unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].rank, Rank(1));
    rank0.join().unwrap().unwrap();
    // One naming rank 0 as the writer fails rank 1, and rank 0's next barrier says so.
    arrive(0, 1);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    let e = dsm.barrier().unwrap_err().to_string();
    assert!(e.contains("rank 1"), "{e}");
}

#[test]
fn a_barrier_hands_every_rank_at_most_a_mebibyte_of_updates_in_all() {
    // Up to four ranks, four arrivals' worth each; past that, less, so that the total stays bounded.
    for size in 1..=4 {
        assert_eq!(
            sync::all_update_bytes(size),
            4 * crate::rc::UPDATE_BYTES,
            "{size}"
        );
    }
    for size in 1..=1024 {
        let each = sync::all_update_bytes(size);
        assert!(size * each <= 1 << 20, "{size} ranks, {each} bytes each");
        // More ranks never get more each.
        assert!(each <= sync::all_update_bytes(size.max(2) - 1), "{size}");
    }
    assert_eq!(sync::all_update_bytes(64), 16 << 10);
}

#[test]
fn a_malformed_batch_of_diffs_fails_its_sender_and_changes_nothing() {
    // Pages out of order, a page twice (it would be taken twice, and wait for itself), and a page past
    // the region's end (refused: the sender may have a stale view of the region).
    for (pages, sender_fails) in [(&[1u64, 0][..], true), (&[1, 1], true), (&[0, 3], false)] {
        let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
        let f = fakes.pop().unwrap();
        let region = homed_region_with(&dsm, std::slice::from_ref(&f), 2, Consistency::Release);
        // SAFETY: the region is two pages long, and its test's only user of it.
        unsafe { std::ptr::write_bytes(region.as_ptr(), 1, 2 * PAGE_SIZE) };
        fake_sends_diffs(&f.fake, &region.inner, pages, 5, 9);
        if sender_fails {
            assert_eq!(
                failed_within(&dsm, Duration::from_secs(5)),
                vec![Rank(1)],
                "{pages:?}"
            );
        } else {
            let (reply, _) = fake_reads(&f.fake);
            assert!(
                matches!(
                    reply,
                    Reply::Refused {
                        reason: RefusedReason::PageOutOfRange
                    }
                ),
                "{pages:?}: {reply:?}"
            );
        }
        for page in 0..2 {
            // SAFETY: the pages are present here (written above) and nothing writes them now.
            let b = unsafe { *region.as_ptr().add(page * PAGE_SIZE + 5) };
            assert_eq!(b, 1, "{pages:?}: page {page} changed");
        }
        assert_eq!(dsm.stats().diffs_applied, 0);
    }
}

/// Page `page`'s entry at its manager, read under the page's manager lock: once the request being
/// served is done with it.
fn entry_when_free(shared: &RegionShared, page: u64) -> swmr::Entry {
    let slot = shared.slot(page);
    crate::fault::lock_slot(&slot.lock);
    let entry = slot.load();
    crate::fault::unlock_slot(&slot.lock);
    entry
}

/// Once rank 1 is failed and the request it made is done with, rank 0 still holds the page as it was
/// (read-only: the copy was put back), with the manager's entry `expected`.
fn home_kept_it(dsm: &Dsm, region: &Region<'_>, expected: swmr::Entry) {
    assert_eq!(failed_within(dsm, Duration::from_secs(5)), vec![Rank(1)]);
    let shared = &region.inner;
    // The failure is recorded while the request is served, under the page's manager lock.
    let entry = entry_when_free(shared, 0);
    let state = || shared.state(0).load(Ordering::Acquire) & STATE_MASK;
    assert_eq!(
        state(),
        READ_ONLY,
        "the home's copy went with a rank that never got it"
    );
    assert_eq!(entry, expected);
    // SAFETY: the region is one page long, present here, so reading it does not fault.
    let now = unsafe { std::slice::from_raw_parts(region.as_ptr(), PAGE_SIZE) };
    assert!(now == &pattern()[..], "the page came back changed");
}

#[test]
fn a_home_whose_page_cannot_reach_a_writer_keeps_it() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    let before = shared.slot(0).load();
    assert_eq!(before.owner, Some(Rank(0)));
    // Rank 1 asks to write the page, then stops reading, as a rank that dies does: the page the home
    // gives up for it cannot be sent.
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults(&fakes[0].fake, shared, Access::Write);
    home_kept_it(&dsm, &region, before);
    // And the home writes it again, an upgrade of the copy it holds.
    // SAFETY: the region is one page long, and this test's only user of it.
    unsafe { *region.as_ptr() = 0xAB };
    assert_eq!(
        shared.state(0).load(Ordering::Acquire) & STATE_MASK,
        READ_WRITE
    );
}

#[test]
fn a_home_whose_grant_cannot_reach_a_writer_keeps_its_copy() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 2 reads the page: the home keeps a copy beside it.
    fake_reads_the_home_page(&fakes[1].fake, shared);
    // Rank 1 asks to write it, and stops reading: the grant (the home's copy, and rank 2's to
    // invalidate) cannot reach it, and rank 2's copy stays valid.
    let mut readers = swmr::CopySet::EMPTY;
    readers.insert(Rank(2));
    let expected = swmr::Entry {
        owner: Some(Rank(0)),
        copyset: readers,
    };
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults(&fakes[0].fake, shared, Access::Write);
    home_kept_it(&dsm, &region, expected);
}

#[test]
fn a_home_whose_upgrade_cannot_reach_its_reader_keeps_its_copy() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 reads the page: the home keeps its copy, read-only, beside rank 1's.
    fake_reads_the_home_page(&fakes[0].fake, shared);
    let before = shared.slot(0).load();
    assert!(before.owner == Some(Rank(0)) && before.copyset.contains(Rank(1)));
    // Rank 1 asks to write the copy it holds, and stops reading: the home drops its copy for an
    // upgrade that cannot be sent, and rank 1's copy, the only other one, is with a failed rank.
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults(&fakes[0].fake, shared, Access::Write);
    home_kept_it(&dsm, &region, before);
}

/// The fake rank `writer` asks rank 0 for write access to page 0 of `shared`, which rank 0 holds: the
/// ranks whose copies it must invalidate (none: the home completes the write itself).
fn copies_a_writer_invalidates(writer: &UnixStream, shared: &RegionShared) -> swmr::CopySet {
    fake_faults(writer, shared, Access::Write);
    match fake_reads(writer) {
        (Reply::Granted { grant }, _) => grant.invalidate,
        (Reply::Done { .. }, _) => swmr::CopySet::EMPTY,
        (reply, _) => panic!("the write was answered with {reply:?}"),
    }
}

/// The next request rank 0 sends the fake on one of its channels (within ten seconds), and that
/// channel's end.
fn fake_takes_request(f: &FakeRank) -> (Request, &UnixStream) {
    use std::os::fd::AsFd;
    let mut fds: Vec<nix::poll::PollFd> = f
        .channels
        .iter()
        .map(|c| nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN))
        .collect();
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
    let ready = fds
        .iter()
        .position(|p| p.revents().is_some_and(|r| !r.is_empty()))
        .expect("rank 0 sent no request within ten seconds");
    let mut end = &f.channels[ready];
    let mut header = [0u8; 4];
    end.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; wire::body_len(header, usize::MAX >> 1).unwrap()];
    end.read_exact(&mut body).unwrap();
    (wire::decode::<Request>(&body).unwrap().0, end)
}

/// The fake home's answer on `end` to rank 0's request for its page: granted, with `home_action`, and
/// the page (`pattern()`) from the home.
fn fake_grants_with_page(end: &UnixStream, home_action: swmr::HomeAction) {
    let grant = swmr::Grant {
        home_action,
        data_from_home: true,
        fetch_from: None,
        invalidate: swmr::CopySet::EMPTY,
    };
    write_frame(
        &dup(end),
        &Reply::Granted { grant },
        &[&pattern()],
        &Counters::default(),
    )
    .unwrap();
}

#[test]
fn a_fault_whose_home_leaves_before_its_unlock_keeps_the_page_and_the_rank_lives_on() {
    let (dsm, fakes) = rank0_with_fakes(2, None);
    let region = page_at_rank1(&dsm, &fakes);
    let page = region.as_ptr() as usize;
    // SAFETY: the region is one page long and outlives the thread (joined below).
    let writer = std::thread::spawn(move || unsafe { (page as *mut u8).write_volatile(7) });
    let f = &fakes[0];
    let (request, end) = fake_takes_request(f);
    assert!(
        matches!(
            request,
            Request::Acquire {
                access: Access::Write,
                ..
            }
        ),
        "{request:?}"
    );
    // The home reads nothing more on the channel, answers with the page, and leaves the job (its
    // service-loop connection ends cleanly): rank 0's Unlock, after its install, finds the
    // connection closed.
    end.shutdown(std::net::Shutdown::Read).unwrap();
    fake_grants_with_page(end, swmr::HomeAction::Invalidate);
    f.other.shutdown(std::net::Shutdown::Both).unwrap();
    writer.join().unwrap();
    // SAFETY: the page is installed (the write above returned) and nothing else uses it.
    let (first, second) = unsafe { (*region.as_ptr(), *region.as_ptr().add(1)) };
    assert_eq!((first, second), (7, pattern()[1]));
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
}

#[test]
fn a_grant_naming_an_owner_that_left_is_abandoned_and_asked_for_again() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    // Page 0 homed at rank 1, whose only copy rank 2 owned when it left the job.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = region.inner.clone();
    let mut fakes = fakes.into_iter();
    let (home, owner) = (fakes.next().unwrap(), fakes.next().unwrap());
    drop(owner);
    assert!(
        gone_within(&shared, Rank(2)),
        "rank 2 was not seen to leave"
    );
    let reading = shared.clone();
    let reader = std::thread::spawn(move || crate::fault::resolve(&reading, 0, false));
    // The home has not yet seen rank 2 leave: it grants a fetch from it.
    let (request, end) = fake_takes_request(&home);
    assert!(
        matches!(
            request,
            Request::Acquire {
                page: 0,
                access: Access::Read,
                ..
            }
        ),
        "{request:?}"
    );
    let grant = swmr::Grant {
        home_action: swmr::HomeAction::None,
        data_from_home: false,
        fetch_from: Some(Rank(2)),
        invalidate: swmr::CopySet::EMPTY,
    };
    write_frame(
        &dup(end),
        &Reply::Granted { grant },
        &[],
        &Counters::default(),
    )
    .unwrap();
    // Rank 0 finds rank 2 gone, abandons the grant, and asks again (perhaps on another channel, so the
    // two may be read in either order); the home, having seen rank 2 leave by then, says the page is
    // lost with it.
    let mut abandoned = false;
    let mut asked_again = None;
    for _ in 0..2 {
        let (request, end) = fake_takes_request(&home);
        match request {
            Request::Abandon {
                page: 0,
                access: Access::Read,
                ..
            } => abandoned = true,
            Request::Acquire {
                page: 0,
                access: Access::Read,
                ..
            } => asked_again = Some(end),
            other => panic!("unexpected request {other:?}"),
        }
    }
    assert!(abandoned, "rank 0 did not abandon the grant");
    let end = asked_again.expect("rank 0 did not ask again");
    let refused = Reply::Refused {
        reason: RefusedReason::DataLeftWith(Rank(2)),
    };
    write_frame(&dup(end), &refused, &[], &Counters::default()).unwrap();
    let read = reader.join().unwrap();
    assert!(
        matches!(read, Err(crate::fault::FaultError::Lost(Rank(2)))),
        "{read:?}"
    );
}

#[test]
fn a_thread_that_faults_on_a_page_being_fetched_waits_for_that_fetch() {
    use crate::region::WAITERS;
    let (dsm, fakes) = rank0_with_fakes(2, None);
    // Page 0 homed at rank 1, which the test plays.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = region.inner.clone();
    let before = dsm.stats();
    // Each reading thread says how its fault ended; a thread that asked the home again would wait for
    // an answer that never comes, and the test fails on its silence instead of hanging.
    let (done, ended) = std::sync::mpsc::channel();
    let read = |shared: &Arc<RegionShared>| {
        let (shared, done) = (shared.clone(), done.clone());
        std::thread::spawn(move || {
            let _ = done.send(crate::fault::resolve(&shared, 0, false));
        });
    };
    read(&shared);
    let (request, end) = fake_takes_request(&fakes[0]);
    assert!(
        matches!(
            request,
            Request::Acquire {
                page: 0,
                access: Access::Read,
                ..
            }
        ),
        "{request:?}"
    );
    // While the first thread's fetch is out, a second thread faults on the page: it marks the page's
    // word as waited for and sleeps, instead of asking the home again.
    read(&shared);
    let word = shared.state(0);
    let t = Instant::now();
    while word.load(Ordering::Acquire) & WAITERS == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the second thread never waited for the first one's fetch"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    fake_grants_with_page(end, swmr::HomeAction::None);
    for _ in 0..2 {
        let ended = ended
            .recv_timeout(Duration::from_secs(10))
            .expect("a reading thread's fault never ended");
        assert!(ended.is_ok(), "{ended:?}");
    }
    let after = dsm.stats();
    assert_eq!(after.read_faults - before.read_faults, 1);
    assert_eq!(after.faults_coalesced - before.faults_coalesced, 1);
    assert_eq!(after.pages_fetched - before.pages_fetched, 1);
    // SAFETY: the page is installed (both faults ended) and nothing writes it.
    let got = unsafe { std::slice::from_raw_parts(region.as_ptr(), PAGE_SIZE) };
    assert_eq!(got, &pattern()[..]);
}

/// The next frame rank 0 sends the fake on `fake`, if one comes within `wait`.
fn fake_reads_within(fake: &UnixStream, wait: Duration) -> Option<Reply> {
    use std::os::fd::AsRawFd;
    let mut peek = [0u8; 1];
    fake.set_read_timeout(Some(wait)).unwrap();
    let peeked = nix::sys::socket::recv(
        fake.as_raw_fd(),
        &mut peek,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    );
    match peeked {
        Ok(1) => Some(fake_reads(fake).0),
        _ => None,
    }
}

#[test]
fn an_invalidation_that_finds_a_grant_running_revokes_it_and_data_requests_wait() {
    use crate::region::{BUSY, GRANTED, REVOKED};
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    // Page 0 homed at rank 1; rank 2 plays a writer the home granted.
    let region = page_at_rank1(&dsm, &fakes);
    let shared = &region.inner;
    let word = shared.state(0);
    let writer = &fakes[1].fake;
    let invalidate = |send_data| Request::Invalidate {
        region: shared.id,
        page: 0,
        send_data,
    };
    let end = |page| crate::fault::end_grant(shared, page, Rank(1));
    // A fault of rank 0 runs a grant for the page: the invalidation is answered at once and the
    // transaction revoked, so that the fault installs nothing.
    word.fetch_or(BUSY | GRANTED, Ordering::AcqRel);
    fake_sends(writer, invalidate(false));
    assert!(matches!(fake_reads(writer).0, Reply::Ack));
    assert_ne!(word.load(Ordering::Acquire) & REVOKED, 0);
    assert!(end(0).is_err(), "a revoked grant was installed");
    crate::fault::release_busy(shared, 0);
    assert_eq!(word.load(Ordering::Acquire), 0);
    // Deferred while the fault has no grant yet (its home's answer may be on its way), and answered
    // once the grant is marked.
    word.fetch_or(BUSY, Ordering::AcqRel);
    fake_sends(writer, invalidate(false));
    assert!(fake_reads_within(writer, Duration::from_millis(300)).is_none());
    crate::fault::mark_granted(shared, 0);
    assert!(matches!(fake_reads(writer).0, Reply::Ack));
    assert!(end(0).is_err());
    crate::fault::release_busy(shared, 0);
    // Requests that need this rank's copy wait for the fault, grant or not, and a grant that nothing
    // revoked ends well.
    word.fetch_or(BUSY | GRANTED, Ordering::AcqRel);
    fake_sends(writer, invalidate(true));
    fake_sends(
        writer,
        Request::Fetch {
            region: shared.id,
            page: 0,
        },
    );
    assert!(fake_reads_within(writer, Duration::from_millis(300)).is_none());
    assert!(end(0).is_ok());
    assert_eq!(word.load(Ordering::Acquire) & (GRANTED | REVOKED), 0);
    // (No copy was installed: both are refused once the fault is over.)
    crate::fault::release_busy(shared, 0);
    for _ in 0..2 {
        let (reply, _) = fake_reads(writer);
        assert!(
            matches!(
                reply,
                Reply::Refused {
                    reason: RefusedReason::NoCopyHere
                }
            ),
            "{reply:?}"
        );
    }
}

#[test]
fn a_rank_that_cuts_this_one_off_lives_on_with_its_copies() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    fake_reads_the_home_page(&fakes[0].fake, shared);
    // Rank 1 takes rank 0 for failed (its silence, say) and cuts it off, as `Channels::cut_off`
    // does: its channels' connections end both ways. Its service loop's own stays: it lives on.
    fakes[0].fake.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    // Its copy is still there, and a writer must have it invalidated (which fails while rank 1 is cut
    // off) rather than leave it readable and stale.
    let invalidate = copies_a_writer_invalidates(&fakes[1].fake, shared);
    assert!(
        invalidate.contains(Rank(1)),
        "the home forgot the copy of a rank that lives on: {invalidate:?}"
    );
}

#[test]
fn a_rank_that_leaves_holding_a_grant_does_not_keep_its_page_locked() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 2 takes the page to write; rank 1 then asks to write it, and the home grants it (rank 1 is
    // to fetch it from rank 2), holding the page locked until rank 1's Unlock.
    fake_owns(&fakes[1].fake, shared);
    let reply = fake_asks(&fakes[0].fake, shared, Access::Write);
    assert!(matches!(reply, Reply::Granted { .. }), "{reply:?}");
    // Rank 1 leaves the job cleanly, without its Unlock: goodbye on each of its connections to rank 0.
    let mut fakes = fakes.into_iter();
    let (rank1, _rank2) = (fakes.next().unwrap(), fakes.next().unwrap());
    for c in [&rank1.fake, &rank1.other] {
        fake_sends(c, Request::Goodbye);
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    drop(rank1);
    // The page is not left locked: the transaction ended as granted, rank 1 owning the page.
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = region.inner.clone();
    // (A thread of its own, so that a page left locked fails the test instead of hanging it.)
    std::thread::spawn(move || {
        let _ = tx.send(entry_when_free(&shared, 0));
    });
    let entry = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the page stays locked for a rank that has left");
    assert_eq!(entry.owner, Some(Rank(1)));
    assert_eq!(failed_within(&dsm, Duration::from_millis(200)), vec![]);
}

#[test]
fn an_owner_that_fails_reading_its_own_page_stays_its_owner_and_out_of_its_copies() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page (the home's copy goes to it), then asks to read it, as a rank whose copy
    // was dropped under it would: the home answers that it holds the page, and waits for its Unlock.
    let fake = &fakes[0].fake;
    fake_owns(fake, shared);
    let reply = fake_asks(fake, shared, Access::Read);
    let held = matches!(
        reply,
        Reply::Done {
            data: Data::None,
            ..
        }
    );
    assert!(held, "{reply:?}");
    // It fails before its Unlock: the transaction ends as it was decided, rank 1 owning the page.
    fake.shutdown(std::net::Shutdown::Both).unwrap();
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    let entry = entry_when_free(shared, 0);
    assert_eq!(entry.owner, Some(Rank(1)));
    assert!(
        !entry.copyset.contains(Rank(1)),
        "the owner is listed among its own page's readers: {entry:?}"
    );
}

#[test]
fn a_page_whose_only_copy_left_with_its_owner_is_refused_naming_it() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page: the home's copy goes to it, and its copy is the only one.
    fake_owns(&fakes[0].fake, shared);
    // Rank 1 dies, its service loop's connection ending too: it has left the job with the page.
    let mut fakes = fakes.into_iter();
    let (rank1, rank2) = (fakes.next().unwrap(), fakes.next().unwrap());
    drop(rank1);
    assert!(gone_within(shared, Rank(1)), "rank 1 was not seen to leave");
    // Rank 2's faults are refused naming rank 1 (they were granted, to fetch the page from it, and
    // failed to reach it), and leave the page unlocked for the next.
    for access in [Access::Read, Access::Write, Access::Read] {
        let reply = fake_asks(&rank2.fake, shared, access);
        let refused = matches!(
            reply,
            Reply::Refused {
                reason: RefusedReason::DataLeftWith(Rank(1))
            }
        );
        assert!(refused, "{access:?}: {reply:?}");
    }
    assert_eq!(entry_when_free(shared, 0).owner, Some(Rank(1)));
}

#[test]
fn an_abandoned_grant_unlocks_its_page_as_it_was_and_only_its_holder_may_abandon_it() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 writes the page: it owns the only copy.
    fake_owns(&fakes[0].fake, shared);
    // Rank 2 asks to read it and is granted a fetch from rank 1, which (as rank 2 would find were rank
    // 1 gone) it abandons; asked again, the home grants the same, so the first grant ended unrecorded.
    // Had the Abandon left the page locked, the second request would wait, and its reply time out.
    let abandon = Request::Abandon {
        region: shared.id,
        page: 0,
        access: Access::Read,
    };
    for round in 0..2 {
        let reply = fake_asks(&fakes[1].fake, shared, Access::Read);
        let granted =
            matches!(reply, Reply::Granted { grant } if grant.fetch_from == Some(Rank(1)));
        assert!(granted, "round {round}: {reply:?}");
        fake_sends(&fakes[1].fake, abandon);
    }
    let entry = entry_when_free(shared, 0);
    assert_eq!(entry.owner, Some(Rank(1)));
    assert_eq!(entry.copyset, swmr::CopySet::EMPTY, "{entry:?}");
    assert_eq!(failed_within(&dsm, Duration::from_millis(200)), vec![]);
    // An Abandon of a transaction rank 2 does not hold is a protocol error: it could free a page lock
    // another transaction holds.
    fake_sends(&fakes[1].fake, abandon);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(2)]);
}

#[test]
fn a_grant_that_dropped_the_homes_copy_cannot_be_abandoned() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    // Rank 1 reads the home's page; rank 2 then asks to write it, and is granted with the home's copy,
    // which the home drops as it grants (rank 1's is for rank 2 to invalidate).
    fake_reads_the_home_page(&fakes[0].fake, shared);
    let reply = fake_asks(&fakes[1].fake, shared, Access::Write);
    let granted = matches!(
        reply,
        Reply::Granted { grant } if grant.home_action == swmr::HomeAction::Invalidate && grant.data_from_home
    );
    assert!(granted, "{reply:?}");
    // Abandoned, the entry would still list the home's copy, which is gone: refused as a protocol error.
    let abandon = Request::Abandon {
        region: shared.id,
        page: 0,
        access: Access::Write,
    };
    fake_sends(&fakes[1].fake, abandon);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(2)]);
}

#[test]
fn a_homes_fault_granted_before_it_saw_the_owner_leave_is_decided_again() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = region.inner.clone();
    // Rank 1 writes the page: the home's copy goes to it, and its copy is the only one.
    fake_owns(&fakes[0].fake, &shared);
    // Rank 1 dies in two steps: the ends of rank 0's channels to it close at once (the fetch of the
    // home's fault fails there), and its service loop's connection, whose end says that it has left the
    // job, 100 ms later. The fault is decided while rank 1 is failed at most, not gone: it is granted a
    // fetch from rank 1, which finds rank 1 gone once the home sees it leave.
    let mut fakes = fakes.into_iter();
    let rank1 = fakes.next().unwrap();
    for c in rank1.channels.iter().chain([&rank1.fake]) {
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    let leaves = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(rank1);
    });
    let read = crate::fault::resolve(&shared, 0, false);
    leaves.join().unwrap();
    // Decided again once it was seen to leave, the page's only copy is known lost with rank 1 (the
    // fault used to end saying that the owner left while it fetched, whether a copy lived on or not).
    assert!(
        matches!(read, Err(crate::fault::FaultError::Lost(Rank(1)))),
        "{read:?}"
    );
    assert!(gone_within(&shared, Rank(1)));
}

#[test]
fn a_failed_rank_whose_service_loop_connection_ends_has_left_with_its_copies() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let region = home_page(&dsm, &fakes);
    let shared = &region.inner;
    fake_reads_the_home_page(&fakes[0].fake, shared);
    // Rank 1 dies, and rank 0 sees its channel's connection end first: it is failed, and its service
    // loop's connection, ending later, still says that it has left the job.
    let mut fakes = fakes.into_iter();
    let (rank1, writer) = (fakes.next().unwrap(), fakes.next().unwrap());
    drop(rank1.fake);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    std::thread::sleep(Duration::from_millis(100));
    drop(rank1.other);
    gone_within(shared, Rank(1));
    // Its copy went with it: a writer has nothing of it to invalidate.
    let invalidate = copies_a_writer_invalidates(&writer.fake, shared);
    assert!(
        !invalidate.contains(Rank(1)),
        "the home keeps the copy of a rank that has left: {invalidate:?}"
    );
}

#[test]
fn untouched_pages_stay_untouched_when_their_first_reader_cannot_be_answered() {
    let (dsm, fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let pages = 4;
    let region = homed_region(&dsm, &fakes, pages);
    let shared = &region.inner;
    // Rank 1 reads the first page, with read-ahead over the others, and stops reading: each would be
    // its (zeros, as their first toucher), but the answer cannot be sent.
    fakes[0].fake.shutdown(std::net::Shutdown::Read).unwrap();
    fake_faults_ahead(&fakes[0].fake, shared, Access::Read, pages as u32);
    assert_eq!(failed_within(&dsm, Duration::from_secs(5)), vec![Rank(1)]);
    for p in 0..pages as u64 {
        assert_eq!(
            entry_when_free(shared, p),
            swmr::Entry::default(),
            "page {p} is recorded as the failed rank's"
        );
    }
    // So the home writes them as their first toucher, without asking the failed rank for them.
    for p in 0..pages {
        // SAFETY: the region is `pages` pages long, and this test's only user of it.
        unsafe { *region.as_ptr().add(p * PAGE_SIZE) = p as u8 + 1 };
    }
    for p in 0..pages as u64 {
        assert_eq!(entry_when_free(shared, p).owner, Some(Rank(0)), "page {p}");
    }
}

#[test]
fn a_reply_of_more_slices_than_one_sendmsg_takes_goes_out_whole() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let pages: Vec<[u8; 3]> = (0..crate::transport::IOV_MAX + 300)
        .map(|i| [i as u8, (i >> 8) as u8, 7])
        .collect();
    let slices: Vec<&[u8]> = pages.iter().map(|p| &p[..]).collect();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        b.read_to_end(&mut all).unwrap();
        all
    });
    let counters = Counters::default();
    let reply = Reply::Done {
        data: Data::Home,
        count: slices.len() as u32,
    };
    write_frame(&dup(&a), &reply, &slices, &counters).unwrap();
    drop(a);
    let all = reader.join().unwrap();
    let body = wire::body_len(all[..4].try_into().unwrap(), usize::MAX >> 1).unwrap();
    assert_eq!(body, all.len() - 4);
    let (r, payload) = wire::decode::<Reply>(&all[4..]).unwrap();
    assert!(matches!(r, Reply::Done { count, .. } if count as usize == pages.len()));
    assert_eq!(payload, pages.concat());
}

#[test]
fn a_rank_that_says_it_is_finishing_or_goodbye_is_seen_leaving_not_failed() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    assert_eq!(dsm.finishing_ranks(), []);
    // Rank 1 reaches its final barrier; rank 2 is past it (it says only goodbye).
    fake_sends(&fakes[0].other, Request::Finishing);
    fake_sends(&fakes[1].other, Request::Goodbye);
    let t = Instant::now();
    while dsm.finishing_ranks() != [Rank(1), Rank(2)] {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{:?}",
            dsm.finishing_ranks()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(failed_within(&dsm, Duration::from_millis(200)), vec![]);
}
