use super::*;

/// Held by a test whose threads wait for bytes: a connection that lost some would leave them waiting
/// for ever, so the test process ends, naming the test (its thread's name), if the test still holds
/// it after a minute. Dropping it ends the watch.
fn watchdog() -> std::sync::mpsc::Sender<()> {
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    let (held, watch) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            watch.recv_timeout(Duration::from_secs(60))
        {
            eprintln!("{test} still waits after a minute: the test process ends");
            std::process::exit(101);
        }
    });
    held
}

#[test]
fn bytes_arrive_in_order_across_the_ring_s_wrap_and_a_full_ring_waits_for_the_reader() {
    let _bounded = watchdog();
    let (a, b) = pair(64);
    let sent: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let got = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut got = Vec::new();
            let mut buf = [0u8; 37];
            loop {
                match b.recv(&mut buf, true).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        for piece in sent.chunks(100) {
            a.send_all(piece).unwrap();
        }
        a.shutdown(Shut::Write);
        reader.join().unwrap()
    });
    assert_eq!(got, sent);
}

#[test]
fn frames_of_writers_on_several_threads_never_interleave() {
    let _bounded = watchdog();
    let (a, b) = pair(64);
    let a = Arc::new(a);
    let writers: Vec<_> = (0..4u8)
        .map(|w| {
            let a = a.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    // A frame: its writer's number, then 50 copies of it, in two pieces.
                    a.send_all_of(&[&[w][..], &[w; 50][..]]).unwrap();
                }
            })
        })
        .collect();
    let mut got = Vec::new();
    let mut buf = [0u8; 97];
    while got.len() < 4 * 200 * 51 {
        let n = b.recv(&mut buf, true).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    for w in writers {
        w.join().unwrap();
    }
    for frame in got.chunks(51) {
        assert!(frame.iter().all(|&x| x == frame[0]), "{frame:?}");
    }
}

#[test]
fn a_read_without_waiting_says_nothing_has_come_and_ends_are_seen_after_the_last_bytes() {
    let (a, b) = pair(64);
    let mut buf = [0u8; 8];
    assert_eq!(b.recv(&mut buf, false), Err(Errno::EAGAIN));
    assert!(!b.readable());
    a.send_all(b"abc").unwrap();
    drop(a);
    assert!(b.readable() && !b.at_end());
    assert_eq!(b.recv(&mut buf, false), Ok(3));
    assert_eq!(&buf[..3], b"abc");
    assert!(b.at_end());
    assert_eq!(b.recv(&mut buf, true), Ok(0), "the end, not a wait");
    assert_eq!(b.send(b"x", true), Err(Errno::EPIPE), "its reader is gone");
}

#[test]
fn shutting_reading_wakes_a_blocked_reader_and_fails_the_writer() {
    let _bounded = watchdog();
    let (a, b) = pair(64);
    std::thread::scope(|s| {
        let reader = s.spawn(|| b.recv(&mut [0u8; 4], true));
        std::thread::sleep(Duration::from_millis(20));
        b.shutdown(Shut::Read);
        assert_eq!(reader.join().unwrap(), Ok(0));
    });
    assert_eq!(a.send(b"late", true), Err(Errno::EPIPE));
}

#[test]
fn a_writer_waiting_for_room_gives_up_at_its_timeout_and_an_end_wakes_it() {
    let _bounded = watchdog();
    let (a, b) = pair(64);
    a.send_all(&[1u8; 64]).unwrap();
    a.set_send_timeout(Duration::from_millis(30));
    let t0 = Instant::now();
    assert_eq!(a.send(b"more", true), Err(Errno::EAGAIN));
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(30), "{waited:?}");
    assert_eq!(a.send(b"more", false), Err(Errno::EAGAIN));
    a.set_send_timeout(Duration::ZERO);
    std::thread::scope(|s| {
        let writer = s.spawn(|| a.send(b"more", true));
        std::thread::sleep(Duration::from_millis(20));
        drop(b);
        assert_eq!(writer.join().unwrap(), Err(Errno::EPIPE));
    });
}

#[test]
fn a_reader_racing_a_writer_that_spills_takes_the_ring_first() {
    let _bounded = watchdog();
    // The writer puts pieces larger than the ring, each filling it and spilling the rest, while the
    // reader takes what is there: a reader that found the ring empty, and then the spill full, must
    // still take what the ring got in between first.
    let (a, b) = pair(64);
    a.never_wait_to_send();
    const PIECES: u32 = 300_000;
    let got = std::thread::scope(|s| {
        s.spawn(|| {
            let mut next = 0u32;
            for _ in 0..PIECES {
                let piece: Vec<u8> = (0..150)
                    .map(|_| {
                        next += 1;
                        (next % 251) as u8
                    })
                    .collect();
                a.send(&piece, false).unwrap();
            }
            a.shutdown(Shut::Write);
        });
        let mut got = 0u32;
        let mut buf = [0u8; 97];
        loop {
            match b.recv(&mut buf, false) {
                Ok(0) => return got,
                Ok(n) => {
                    for &x in &buf[..n] {
                        got += 1;
                        assert_eq!(x, (got % 251) as u8, "byte {got} out of order");
                    }
                }
                Err(Errno::EAGAIN) => std::hint::spin_loop(),
                Err(e) => panic!("{e}"),
            }
        }
    });
    assert_eq!(got, PIECES * 150);
}

#[test]
fn an_end_that_never_waits_to_send_keeps_what_has_no_room_in_order() {
    let _bounded = watchdog();
    let (a, b) = pair(64);
    a.never_wait_to_send();
    let bell = Doorbell::new();
    b.ring_on_input(&bell);
    let sent: Vec<u8> = (0..5_000u32).map(|i| (i * 13 % 253) as u8).collect();
    let mut got = Vec::new();
    let mut buf = [0u8; 41];
    // Rounds of writing far more than the ring holds with nobody reading, then reading part of it,
    // so that writes go to the ring, to the spill behind it, and to the ring again once it is read.
    for (round, piece) in sent.chunks(1_000).enumerate() {
        let rung = bell.seen();
        assert_eq!(a.send(piece, false), Ok(piece.len()), "never EAGAIN");
        assert_ne!(
            bell.seen(),
            rung,
            "what was spilled rang the reader's doorbell"
        );
        let want = got.len() + piece.len() - 100 * (round % 2);
        while got.len() < want {
            let n = b
                .recv(&mut buf[..(want - got.len()).min(41)], false)
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
    }
    a.send_all(b"!").unwrap();
    drop(a);
    assert!(b.readable() && !b.at_end(), "bytes wait before the end");
    loop {
        match b.recv(&mut buf, true).unwrap() {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
    assert_eq!(got.pop(), Some(b'!'));
    assert_eq!(got, sent);
    assert!(b.at_end());
    let (a, b) = pair(64);
    a.never_wait_to_send();
    drop(b);
    assert_eq!(
        a.send(&[0u8; 200], false),
        Err(Errno::EPIPE),
        "its reader is gone"
    );
}

#[test]
fn a_doorbell_wakes_its_sleeper_for_bytes_on_any_of_its_connections() {
    let bell = Doorbell::new();
    let ends: Vec<(End, End)> = (0..3).map(|_| pair(64)).collect();
    for (_, theirs) in &ends {
        assert!(theirs.ring_on_input(&bell));
        assert!(!theirs.ring_on_input(&Doorbell::new()), "one doorbell each");
    }
    std::thread::scope(|s| {
        let sleeper = s.spawn(|| {
            let t0 = Instant::now();
            loop {
                let seen = bell.seen();
                if ends[2].1.readable() {
                    return t0.elapsed();
                }
                bell.wait(seen, Duration::from_secs(10));
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        ends[2].0.send_all(b"x").unwrap();
        assert!(sleeper.join().unwrap() < Duration::from_secs(5));
    });
    let bell = Doorbell::with_eventfd().unwrap();
    let (a, b) = pair(64);
    b.ring_on_input(&bell);
    bell.drain();
    a.send_all(b"y").unwrap();
    let mut fds = [nix::poll::PollFd::new(
        bell.fd().unwrap(),
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(nix::poll::poll(&mut fds, 1000u16), Ok(1));
}

#[test]
fn a_writer_that_found_no_room_is_rung_when_the_reader_makes_some_and_only_then() {
    let bell = Doorbell::new();
    let (a, b) = pair(64);
    assert!(a.ring_on_room(&bell));
    assert!(!a.ring_on_room(&Doorbell::new()), "one doorbell each");
    let mut buf = [0u8; 16];
    // Reads while the writer wants nothing ring nothing.
    a.send_all(&[1; 16]).unwrap();
    let seen = bell.seen();
    assert_eq!(b.recv(&mut buf, false), Ok(16));
    assert_eq!(
        bell.seen(),
        seen,
        "a read rang though no writer wanted room"
    );
    // A write that would not wait fills the ring, and the next finds no room.
    assert_eq!(a.send(&[2; 100], false), Ok(64));
    assert_eq!(a.send(&[3; 10], false), Err(Errno::EAGAIN));
    let seen = bell.seen();
    // A thread sleeping on the doorbell, as the MPI bridge does, wakes when the reader reads.
    std::thread::scope(|s| {
        let sleeper = s.spawn(|| {
            let t0 = Instant::now();
            while bell.seen() == seen && t0.elapsed() < Duration::from_secs(10) {
                bell.wait(seen, Duration::from_secs(10));
            }
            t0.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.recv(&mut buf, false), Ok(16));
        assert!(sleeper.join().unwrap() < Duration::from_secs(5));
    });
    assert_eq!(a.send(&[3; 10], false), Ok(10), "room was made");
    // Rung once per wish: further reads ring nothing until a write finds no room again.
    let seen = bell.seen();
    assert_eq!(b.recv(&mut buf, false), Ok(16));
    assert_eq!(bell.seen(), seen);
    // The reader's end rings a writer that waits for room too.
    assert_eq!(
        a.send(&[4; 64], false),
        Ok(22),
        "the room left: 64 - (64 - 16 + 10 - 16)"
    );
    assert_eq!(a.send(&[4; 1], false), Err(Errno::EAGAIN));
    let seen = bell.seen();
    b.shutdown(Shut::Read);
    assert_ne!(bell.seen(), seen, "the reader's end rang nothing");
    assert_eq!(a.send(&[5; 1], false), Err(Errno::EPIPE));
}
