//! A rank's connections: the transport's marks, frames cut off, truncated or malformed, heartbeats and
//! the peer timeout, calls waiting at a rank that fails, replies of many slices, and ranks that say they
//! are leaving.

use super::*;

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
        beat: t0,
        looked: t0,
    };
    let hour = t0 + Duration::from_secs(3600);
    assert_eq!(l.late(hour, 0, |_| false), []);
    l.timeout = Some(Duration::from_secs(2));
    assert_eq!(l.late(hour, 0, |_| false), [Rank(1), Rank(2)]);
    assert_eq!(l.late(t0 + Duration::from_secs(1), 0, |_| false), []);
    // A rank skipped (one that left, or one already failed) is not failed again.
    assert_eq!(l.late(hour, 0, |r| r == 2), [Rank(1)]);
    assert_eq!(l.late(hour, 0, |r| r >= 1), []);
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

#[test]
fn a_rank_that_said_goodbye_and_closed_has_left_though_a_send_to_it_then_fails() {
    let (dsm, mut fakes) = rank0_with_fakes(2, Some(crate::DEFAULT_PEER_TIMEOUT));
    let f = fakes.pop().unwrap();
    // Rank 1 leaves as a rank does, `Goodbye` on each of its connections to rank 0, and its process
    // ends: every end of its connections closes at once.
    fake_sends(&f.fake, Request::Goodbye);
    fake_sends(&f.other, Request::Goodbye);
    drop(f);
    // Rank 0's service loop then sends it a message: the send fails (a Unix socket whose other end has
    // closed refuses it at once), whether or not the loop has read the goodbye yet.
    dsm.shared.tell_others(&Request::Heartbeat, &[], None);
    assert_eq!(failed_within(&dsm, Duration::from_millis(300)), vec![]);
    // Rank 1 left without the final barrier that a rank's leaving waits for: rank 0 does not wait.
    dsm.abandon();
}

#[test]
fn a_rank_that_said_goodbye_is_sent_no_more_heartbeats_but_still_the_goodbye() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::DEFAULT_PEER_TIMEOUT));
    let (gone, stays) = (&fakes[0], &fakes[1]);
    // Rank 1 leaves, its end of rank 0's service loop's connection still open (its process lives on a
    // moment, its service loop reading until it stops).
    fake_sends(&gone.fake, Request::Goodbye);
    fake_sends(&gone.other, Request::Goodbye);
    let t = Instant::now();
    while dsm.finishing_ranks() != [Rank(1)] {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    // What rank 0 sent both before (heartbeats) is read: neither has a heartbeat unread.
    read_what_is_there(&gone.control);
    read_what_is_there(&stays.control);
    dsm.shared.tell_others(&Request::Heartbeat, &[], None);
    // Rank 2 hears it,
    let (req, _): (Request, _) = fake_reads_frame(&stays.control);
    assert!(matches!(req, Request::Heartbeat), "{req:?}");
    // and rank 1 does not,
    assert_eq!(read_what_is_there(&gone.control), 0);
    // but rank 0's own goodbye still reaches it: without it, rank 1 would take rank 0's end for a
    // failure.
    dsm.shared.tell_others(&Request::Goodbye, &[], None);
    let (req, _): (Request, _) = fake_reads_frame(&gone.control);
    assert!(matches!(req, Request::Goodbye), "{req:?}");
    assert_eq!(dsm.failed_ranks(), []);
    dsm.abandon();
}

/// Reads what has arrived on `s` without waiting for more; returns how many bytes.
fn read_what_is_there(mut s: &UnixStream) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut got = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading a fake rank's connection: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    got
}

#[test]
fn a_rank_that_said_goodbye_is_not_failed_for_its_silence() {
    let (dsm, fakes) = rank0_with_fakes(3, Some(crate::MIN_PEER_TIMEOUT));
    // Rank 1 leaves, its connections left open; rank 2 says nothing. Neither sends a heartbeat.
    fake_sends(&fakes[0].fake, Request::Goodbye);
    fake_sends(&fakes[0].other, Request::Goodbye);
    let t = Instant::now();
    while dsm.failed_ranks().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "rank 2 was never failed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Both were silent for as long when the timeout took rank 2.
    assert_eq!(dsm.failed_ranks(), [Rank(2)]);
    dsm.abandon();
}
