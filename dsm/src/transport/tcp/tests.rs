use super::handshake::*;
use super::mesh::*;
use super::stream::Stream;
use super::*;
use crate::transport::PROTOCOL_VERSION;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// A handshake from `from` to rank 0, of set `set` of two, made with `token` and a nonce of its own.
fn hello_to_0(from: Rank, set: usize, token: &Token) -> [u8; HELLO_LEN] {
    hello(
        from,
        Rank(0),
        2,
        set,
        token,
        [from.0 as u8 + 40 + set as u8; NONCE_LEN],
    )
}

#[test]
fn handshake_checks_magic_proof_version_ranks_channels_and_set() {
    let token = [7u8; 32];
    let good = hello(Rank(1), Rank(0), 4, 3, &token, [9u8; NONCE_LEN]);
    assert_eq!(check_hello(&good, &token, Rank(0), 2, 4), Ok((Rank(1), 3)));
    // The token itself never appears in a handshake: it is proved, not sent.
    assert!(!good.windows(token.len()).any(|w| w == token));
    let stranger = |r: std::result::Result<(Rank, usize), Refusal>, what: &str| matches!(&r, Err(Refusal::Stranger(why)) if why.contains(what));
    let member = |r: std::result::Result<(Rank, usize), Refusal>, what: &str| matches!(&r, Err(Refusal::Member(why)) if why.contains(what));
    assert!(stranger(
        check_hello(&good, &[8u8; 32], Rank(0), 2, 4),
        "wrong job token"
    ));
    let mut bad = good;
    bad[0] = b'X';
    assert!(stranger(check_hello(&bad, &token, Rank(0), 2, 4), "magic"));
    // A build before the proof sent the token itself: a rank of the job if it is the job's.
    let mut token_in_clear = [0u8; TOKEN_IN_CLEAR_LEN];
    token_in_clear[..4].copy_from_slice(TOKEN_IN_CLEAR);
    token_in_clear[4] = 14;
    token_in_clear[8..40].copy_from_slice(&token);
    assert!(
        matches!(check_token_in_clear(&token_in_clear, &token), Refusal::Member(why)
        if why.contains("protocol version 14, which sends the job's token itself") && why.contains("every rank must run the same build"))
    );
    assert!(
        matches!(check_token_in_clear(&token_in_clear, &[8u8; 32]), Refusal::Stranger(why)
        if why.contains("wrong job token"))
    );
    // Any byte changed, in the preamble or after it, breaks a MAC.
    for at in [
        8,
        45,
        PREAMBLE_LEN,
        PREAMBLE_LEN + 4,
        PREAMBLE_LEN + 12,
        HELLO_LEN - 1,
    ] {
        let mut changed = good;
        changed[at] ^= 1;
        let r = check_hello(&changed, &token, Rank(0), 2, 4);
        let shown = format!("{r:?}");
        assert!(
            stranger(r, "does not check out"),
            "byte {at} changed: {shown}"
        );
    }
    assert!(member(
        check_hello(&good, &token, Rank(0), 1, 4),
        "outside a job of 1"
    ));
    // Anyone who recorded a handshake on its way could send it to another rank: a stranger's refusal,
    // which does not end the job there.
    assert!(stranger(
        check_hello(&good, &token, Rank(2), 3, 4),
        "rank 1 meant to reach rank 0 and reached rank 2"
    ));
    assert!(member(
        check_hello(&good, &token, Rank(0), 2, 3),
        "rank 1 has 3 channels, this rank 2: give every rank the same DSM_CHANNELS"
    ));
    assert!(member(
        check_hello(
            &hello(Rank(1), Rank(0), 4, 4, &token, [9u8; NONCE_LEN]),
            &token,
            Rank(0),
            2,
            4
        ),
        "rank 1 opened connection 4 of 4"
    ));
    // Another build of this job is told why; one with the wrong token is a stranger.
    let mut other = good;
    other[..PREAMBLE_LEN].copy_from_slice(&preamble(99, &token, [9u8; NONCE_LEN]));
    assert!(member(
        check_hello(&other, &token, Rank(0), 2, 4),
        "protocol version 99"
    ));
    assert!(stranger(
        check_hello(&other, &[8u8; 32], Rank(0), 2, 4),
        "wrong job token"
    ));
    // The accepting rank's answer proves it knows the token, for this handshake only.
    assert!(welcomed(&good, &welcome(&good, &token), &token));
    assert!(!welcomed(&good, &welcome(&good, &[8u8; 32]), &token));
    let again = hello(Rank(1), Rank(0), 4, 3, &token, [10u8; NONCE_LEN]);
    assert!(!welcomed(&again, &welcome(&good, &token), &token));
}

/// Sets up a job of one rank per entry of `channels` (each with that many channels), each on a thread
/// of its own; returns how each rank's setting up ended, and how long they all took.
fn establish_all(channels: &[usize]) -> (Vec<Result<Mesh>>, Duration) {
    let listeners: Vec<TcpListener> = channels
        .iter()
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let started = Instant::now();
    let size = channels.len();
    let ranks: Vec<_> = listeners
        .into_iter()
        .zip(channels.iter().copied())
        .enumerate()
        .map(|(me, (listener, channels))| {
            let t = Box::new(TcpTransport::new(
                listener,
                peers.clone(),
                [3u8; 32],
                Duration::from_secs(25),
            ));
            std::thread::spawn(move || t.establish(Rank(me as u32), size, channels))
        })
        .collect();
    let ended = ranks.into_iter().map(|r| r.join().unwrap()).collect();
    (ended, started.elapsed())
}

#[test]
fn each_rank_s_service_loop_connection_is_marked_as_such_at_the_other_end() {
    let sets = 3;
    let meshes: Vec<Mesh> = establish_all(&[sets, sets])
        .0
        .into_iter()
        .map(|m| m.unwrap())
        .collect();
    super::super::assert_service_loop_connections_marked(&meshes, sets);
}

/// Rank 1 of a job of two, setting up on a thread of its own.
type Rank1 = std::thread::JoinHandle<Result<Mesh>>;

/// Rank 0 of a job of two on loopback with two channels, listening on `mine` (its transport, to be set
/// up, 20 s for it), and rank 1, setting up on a thread of its own. A rank's connections to itself are in
/// memory, so the handshakes rank 0 reads are rank 1's (and those of whatever else connected to `mine`).
fn two_ranks(mine: TcpListener, token: Token) -> (Box<TcpTransport>, Rank1) {
    let theirs = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![mine.local_addr().unwrap(), theirs.local_addr().unwrap()];
    let t = Duration::from_secs(20);
    let one = Box::new(TcpTransport::new(theirs, peers.clone(), token, t));
    let other = std::thread::spawn(move || one.establish(Rank(1), 2, 2));
    (Box::new(TcpTransport::new(mine, peers, token, t)), other)
}

/// [`two_ranks`], with a connection to rank 0's listener that came before any of rank 1's and sent
/// `first`.
fn rank_0_of_two_after(first: &[u8], token: Token) -> (Box<TcpTransport>, TcpStream, Rank1) {
    let mine = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut s = TcpStream::connect(mine.local_addr().unwrap()).unwrap();
    s.write_all(first).unwrap();
    let (t, other) = two_ranks(mine, token);
    (t, s, other)
}

/// The next connection to `listener`, and the handshake it sent.
fn take_hello(listener: &TcpListener) -> (Stream, [u8; HELLO_LEN]) {
    let mut s = Stream::from(listener.accept().unwrap().0);
    let mut h = [0u8; HELLO_LEN];
    s.read_exact(&mut h).unwrap();
    (s, h)
}

/// Rank 0 of a job of two, whose listener first takes a connection that sends `first`, the handshake of
/// a rank of this job of another build: both ranks stop at once saying why, and that connection is told
/// `why`.
fn another_build_is_told_why_at_once(first: &[u8], token: Token, why: &str) {
    let (t, mut s, other) = rank_0_of_two_after(first, token);
    let started = Instant::now();
    let e = t.establish(Rank(0), 2, 2).unwrap_err().to_string();
    assert!(e.contains("every rank must run the same build"), "{e}");
    assert!(started.elapsed() < HELLO_TIME, "{:?}", started.elapsed());
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[0], ACK_REFUSED);
    let reason = read_reason(&mut Stream::from(s));
    assert!(reason.contains(why), "{reason}");
    assert!(other.join().unwrap().is_err());
}

#[test]
fn a_rank_of_another_build_with_a_shorter_handshake_is_told_why_at_once() {
    let token = [4u8; 32];
    // A build whose handshake is shorter than this one's (the preamble, then 4 bytes): it waits for
    // the answer, which must come without the bytes this build would read after the preamble.
    let mut old = preamble(PROTOCOL_VERSION - 1, &token, [1u8; NONCE_LEN]).to_vec();
    old.extend_from_slice(&[0u8; 4]);
    another_build_is_told_why_at_once(&old, token, "protocol version");
}

#[test]
fn a_rank_of_a_build_that_sent_the_token_itself_is_told_why_at_once() {
    let token = [4u8; 32];
    // Protocol 14's handshake, 52 bytes, shorter than this build's preamble: magic, version, the token
    // itself, rank 1, 2 connections per rank, set 0. That build then waits for the answer.
    let mut old = Vec::new();
    old.extend_from_slice(TOKEN_IN_CLEAR);
    old.extend_from_slice(&14u32.to_le_bytes());
    old.extend_from_slice(&token);
    for w in [1u32, 2, 0] {
        old.extend_from_slice(&w.to_le_bytes());
    }
    assert_eq!(old.len(), TOKEN_IN_CLEAR_LEN);
    another_build_is_told_why_at_once(&old, token, "which sends the job's token itself");
}

#[test]
fn a_handshake_sent_again_is_refused_and_the_mesh_still_forms() {
    let token = [6u8; 32];
    let mine = TcpListener::bind("127.0.0.1:0").unwrap();
    let theirs = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![mine.local_addr().unwrap(), theirs.local_addr().unwrap()];
    let at = peers[0];
    let t = Box::new(TcpTransport::new(
        mine,
        peers,
        token,
        Duration::from_secs(20),
    ));
    let rank_0 = std::thread::spawn(move || t.establish(Rank(0), 2, 2));
    // Rank 1, played by hand: it answers rank 0's two connections...
    let answering = std::thread::spawn(move || {
        (0..2)
            .map(|_| {
                let (mut s, h) = take_hello(&theirs);
                assert!(matches!(
                    check_hello(&h, &token, Rank(1), 2, 2),
                    Ok((Rank(0), _))
                ));
                s.write_all(&[ACK_OK]).unwrap();
                s.write_all(&welcome(&h, &token)).unwrap();
                s
            })
            .collect::<Vec<Stream>>()
    });
    // ...and opens its own, the first of them twice, as whoever recorded it on its way could.
    let open = |h: &[u8; HELLO_LEN]| {
        let mut s = TcpStream::connect(at).unwrap();
        s.write_all(h).unwrap();
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).unwrap();
        (s, ack[0])
    };
    let first = hello(Rank(1), Rank(0), 2, 0, &token, [1u8; NONCE_LEN]);
    let (set_0, ack) = open(&first);
    assert_eq!(ack, ACK_OK);
    let (again, ack) = open(&first);
    assert_eq!(ack, ACK_REFUSED);
    let reason = read_reason(&mut Stream::from(again));
    assert!(reason.contains("already taken, sent again"), "{reason}");
    let (set_1, ack) = open(&hello(Rank(1), Rank(0), 2, 1, &token, [2u8; NONCE_LEN]));
    assert_eq!(ack, ACK_OK);
    let mesh = rank_0.join().unwrap().unwrap();
    // Two from rank 1, and two from rank 0 itself (in memory).
    assert_eq!(mesh.incoming.len(), 4);
    drop((set_0, set_1, answering.join().unwrap()));
}

/// Rank 0 of a job of two on loopback (two channels, 20 s to set up, `token`), where a stand-in listens
/// at rank 1's address: it takes rank 0's first connection, reads its handshake, `answer`s it, and holds
/// the connection open until rank 0 has gone. Returns how rank 0's setting up failed, how long it took,
/// and the handshake the stand-in read.
fn rank_0_failing_at_a_stand_in(
    token: Token,
    answer: impl FnOnce(&mut Stream, &[u8; HELLO_LEN]) + Send + 'static,
) -> (String, Duration, [u8; HELLO_LEN]) {
    let mine = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let peers = vec![mine.local_addr().unwrap(), other.local_addr().unwrap()];
    let stand_in = std::thread::spawn(move || {
        let (mut s, h) = take_hello(&other);
        answer(&mut s, &h);
        let _ = s.read(&mut [0u8; 1]);
        h
    });
    let t = Box::new(TcpTransport::new(
        mine,
        peers,
        token,
        Duration::from_secs(20),
    ));
    let started = Instant::now();
    let e = t.establish(Rank(0), 2, 2).unwrap_err().to_string();
    let took = started.elapsed();
    (e, took, stand_in.join().unwrap())
}

#[test]
fn what_answers_at_a_ranks_address_without_the_token_learns_nothing_and_is_not_taken_for_it() {
    let token = [0x5au8; 32];
    // Where rank 1 said it listens, another program: it says yes, with what it can make without the
    // token.
    let (e, took, h) = rank_0_failing_at_a_stand_in(token, |s, h| {
        s.write_all(&[ACK_OK]).unwrap();
        s.write_all(&welcome(h, &[0u8; 32])).unwrap();
    });
    assert!(
        e.contains("does not know the job's token: it is not rank 1"),
        "{e}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!h.windows(token.len()).any(|w| w == token));
}

#[test]
fn a_connection_opened_twice_is_refused() {
    let token = [6u8; 32];
    // Rank 0's sets to itself are in memory; a connection first in its backlog says it is rank 0's
    // set 0, which only another process taking rank 0 would send.
    let (t, _s, other) = rank_0_of_two_after(&hello_to_0(Rank(0), 0, &token), token);
    let e = t.establish(Rank(0), 2, 2).unwrap_err().to_string();
    assert!(e.contains("rank 0 opened its connection 0 twice"), "{e}");
    assert!(other.join().unwrap().is_err());
}

#[test]
fn ranks_with_different_channel_counts_both_fail_at_once_saying_why() {
    let (ended, took) = establish_all(&[4, 3]);
    for rank in ended {
        let e = rank.unwrap_err().to_string();
        assert!(e.contains("give every rank the same DSM_CHANNELS"), "{e}");
    }
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_rank_of_other_channels_among_three_stops_all_three_at_once() {
    // Rank 2 has another number of channels. Ranks 0 and 1 may not hear it from rank 2 itself (a
    // rank that refused it closes its listener): the one left must stop at the closed listener too,
    // not retry until the timeout.
    let (ended, took) = establish_all(&[2, 2, 3]);
    for rank in ended {
        assert!(rank.is_err());
    }
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_rank_refused_by_another_stops_waiting_for_connections_and_says_why() {
    // Rank 1 here is a stand-in that refuses rank 0's handshake and never connects: rank 0's accepting
    // side must stop with its connecting side, not wait out the timeout for rank 1's connections.
    let (e, took, _) =
        rank_0_failing_at_a_stand_in([5u8; 32], |s, _| refuse(s, "rank 1 is of another mind"));
    assert!(
        e.contains("refused this rank's handshake: rank 1 is of another mind"),
        "{e}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_rank_that_stopped_setting_up_is_taken_for_failed() {
    // Rank 1 gone before rank 0 connects (its listener closed), or gone during the handshake (it
    // read rank 0's and closed): rank 0's error is rank 1's failure, not one of its own.
    let gone = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = gone.local_addr().unwrap();
    drop(gone);
    let closing = TcpListener::bind("127.0.0.1:0").unwrap();
    let closes = closing.local_addr().unwrap();
    let stand_in = std::thread::spawn(move || {
        // Read, then closed.
        drop(take_hello(&closing));
    });
    for (at, what) in [
        (closed, "could not connect to it"),
        (closes, "waiting for the handshake reply from it"),
    ] {
        let mine = TcpListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![mine.local_addr().unwrap(), at];
        let t = Box::new(TcpTransport::new(
            mine,
            peers,
            [3u8; 32],
            Duration::from_secs(20),
        ));
        let started = Instant::now();
        match t.establish(Rank(0), 2, 2) {
            Err(e @ DsmError::PeerFailed { rank: Rank(1), .. }) => {
                let e = e.to_string();
                assert!(e.starts_with("rank 1 failed: rank 0"), "{e}");
                assert!(e.contains(&format!("{what} at {at}")), "{e}");
            }
            other => panic!("rank 1 at {at} ({what}): {:?}", other.map(|_| ())),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    stand_in.join().unwrap();
}

#[test]
fn a_stranger_sending_its_handshake_a_byte_at_a_time_does_not_hold_the_mesh_up() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let token = [1u8; 32];
    // Connected first (the backlog is FIFO), it sends a byte every half second: its whole handshake
    // would take 24 s, and each read alone stays well within any per-read timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    let stranger = std::thread::spawn(move || {
        for b in hello_to_0(Rank(1), 0, &[2u8; 32]) {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    // Its handshake is read beside the rank's own connections, which do not wait for it.
    drop(at_once(listener, token));
    stranger.join().unwrap();
}

/// Sets up rank 0 of a job of two (two channels) on `listener`, which must take less than half a
/// handshake's time whatever else connected to it; returns its mesh.
fn at_once(listener: TcpListener, token: Token) -> Mesh {
    let (t, other) = two_ranks(listener, token);
    let started = Instant::now();
    let mesh = t.establish(Rank(0), 2, 2).unwrap();
    assert!(
        started.elapsed() < HELLO_TIME / 2,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mesh.outgoing.len(), 2);
    // Two from rank 1, and two from rank 0 itself (in memory).
    assert_eq!(mesh.incoming.len(), 4);
    other.join().unwrap().unwrap();
    mesh
}

#[test]
fn many_silent_strangers_do_not_hold_the_mesh_up() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let token = [1u8; 32];
    // Connected first (the backlog is FIFO) and silent: read one after another, they held the mesh
    // up for a handshake's time each, 40 s in all. Past the room for them, the oldest are dropped.
    let silent: Vec<TcpStream> = (0..MAX_GREETING + 8)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    drop(at_once(listener, token));
    drop(silent);
}

#[test]
fn strangers_and_handshakes_meant_for_another_rank_are_refused_and_the_mesh_still_forms() {
    let token = [1u8; 32];
    // Each connects first (the backlog is FIFO): one with the wrong token, and one sending a handshake
    // of this job that rank 0 made for rank 1, as whoever recorded it on its way could. Each must be
    // refused and not counted among the mesh's connections, and rank 0's mesh must form.
    let meant_for_1 = hello(Rank(0), Rank(1), 2, 0, &token, [3u8; NONCE_LEN]);
    for (first, why) in [
        (hello_to_0(Rank(1), 0, &[2u8; 32]), "wrong job token"),
        (
            meant_for_1,
            "rank 0 meant to reach rank 1 and reached rank 0",
        ),
    ] {
        let (t, s, other) = rank_0_of_two_after(&first, token);
        let intruder = std::thread::spawn(move || {
            let mut s = Stream::from(s);
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).unwrap();
            (ack[0], read_reason(&mut s))
        });
        let mesh = t.establish(Rank(0), 2, 2).unwrap();
        let (ack, reason) = intruder.join().unwrap();
        assert_eq!(ack, ACK_REFUSED);
        assert!(reason.contains(why), "{reason}");
        assert_eq!(mesh.outgoing.len(), 2);
        assert_eq!(mesh.incoming.len(), 4);
        other.join().unwrap().unwrap();
    }
}

#[test]
fn a_rank_s_connections_to_itself_are_in_memory_and_carry_bytes() {
    // A job of one rank connects to nothing: it forms at once even where its listener is never looked
    // at, and its connections, all to itself, are in memory.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = TcpTransport::new(listener, vec![addr], [1u8; 32], Duration::from_secs(20));
    let alone = Box::new(t).establish(Rank(0), 1, 2).unwrap();
    assert!(alone
        .outgoing
        .iter()
        .flatten()
        .all(|c| c.memory().is_some()));
    assert!(alone.incoming.iter().all(|i| i.conn.memory().is_some()));
    // In a job of two, the connections to the other rank are sockets, and each set's connection to
    // itself reaches the incoming connection of the same set.
    let meshes: Vec<Mesh> = establish_all(&[2, 2])
        .0
        .into_iter()
        .map(|m| m.unwrap())
        .collect();
    for (me, mesh) in meshes.iter().enumerate() {
        for (set, row) in mesh.outgoing.iter().enumerate() {
            let other = 1 - me;
            assert!(row[other].socket().is_some());
            row[me]
                .write_all(&mut [std::io::IoSlice::new(&[set as u8 + 10])])
                .unwrap();
        }
        let own: Vec<&Incoming> = mesh
            .incoming
            .iter()
            .filter(|i| i.from == Rank(me as u32))
            .collect();
        assert_eq!(own.len(), 2);
        for (set, i) in own.iter().enumerate() {
            assert!(i.conn.memory().is_some());
            let mut got = [0u8; 1];
            assert_eq!(i.conn.recv(&mut got, true), Ok(Some(1)));
            assert_eq!(got[0], set as u8 + 10, "rank {me}, set {set}");
        }
        assert_eq!(
            mesh.incoming
                .iter()
                .filter(|i| i.conn.socket().is_some())
                .count(),
            2
        );
    }
}

#[test]
fn silent_and_truncated_handshakes_are_dropped_and_the_mesh_still_forms() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let token = [1u8; 32];
    // A connection that sends nothing is read beside the others and dropped after its handshake's time;
    // one that sends half a handshake and closes is refused at once. Neither counts among the mesh's
    // connections, nor holds it up.
    let silent = TcpStream::connect(addr).unwrap();
    let mut truncated = TcpStream::connect(addr).unwrap();
    truncated
        .write_all(&hello_to_0(Rank(1), 0, &token)[..HELLO_LEN / 2])
        .unwrap();
    drop(truncated);
    drop(at_once(listener, token));
    drop(silent);
}

/// The address family of a socket connection.
fn family(c: &Conn) -> nix::sys::socket::AddressFamily {
    use nix::sys::socket::{getsockname, SockaddrLike, SockaddrStorage};
    let fd = c.socket().expect("a socket connection");
    getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .unwrap()
        .family()
        .unwrap()
}

#[test]
fn ranks_on_one_host_connect_through_unix_sockets_and_others_over_tcp() {
    use nix::sys::socket::AddressFamily::{Inet, Unix};
    // Ranks 0 and 1 listen on Unix sockets too. Rank 2 stands for a rank on another host: the name it
    // advertises is not on this one (nothing listens there), and it has no Unix listener of its own.
    let tcp: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut unix: Vec<(std::os::unix::net::UnixListener, UnixName)> =
        (0..3).map(|_| bind_unix().unwrap()).collect();
    let elsewhere = unix.pop().unwrap();
    let peers: Vec<PeerAddr> = tcp
        .iter()
        .zip([unix[0].1, unix[1].1, elsewhere.1])
        .map(|(l, name)| PeerAddr {
            tcp: l.local_addr().unwrap(),
            unix: Some(name),
        })
        .collect();
    drop(elsewhere);
    let mut unix = unix.into_iter().map(|(l, _)| Some(l)).chain([None]);
    let ranks: Vec<_> = tcp
        .into_iter()
        .enumerate()
        .map(|(me, listener)| {
            let mut t =
                TcpTransport::new(listener, peers.clone(), [9u8; 32], Duration::from_secs(20));
            if let Some(l) = unix.next().unwrap() {
                t = t.with_unix(l);
            }
            std::thread::spawn(move || Box::new(t).establish(Rank(me as u32), 3, 2))
        })
        .collect();
    let meshes: Vec<Mesh> = ranks
        .into_iter()
        .map(|r| r.join().unwrap().unwrap())
        .collect();
    let local = |a: usize, b: usize| a < 2 && b < 2;
    for (me, mesh) in meshes.iter().enumerate() {
        for (set, row) in mesh.outgoing.iter().enumerate() {
            for (to, c) in row.iter().enumerate().filter(|&(to, _)| to != me) {
                let want = if local(me, to) { Unix } else { Inet };
                assert_eq!(family(c), want, "{me} to {to}, set {set}");
                c.write_all(&mut [std::io::IoSlice::new(&[(10 * me + to) as u8])])
                    .unwrap();
            }
        }
    }
    for (me, mesh) in meshes.iter().enumerate() {
        for i in mesh.incoming.iter().filter(|i| i.from.index() != me) {
            let from = i.from.index();
            let want = if local(me, from) { Unix } else { Inet };
            assert_eq!(family(&i.conn), want, "{me} from {from}");
            let mut got = [0u8; 1];
            assert_eq!(i.conn.recv(&mut got, true), Ok(Some(1)));
            assert_eq!(got[0], (10 * from + me) as u8, "{me} from {from}");
        }
    }
}

#[test]
fn a_peer_address_reads_back_as_written_and_a_bad_one_says_why() {
    let (_l, name) = bind_unix().unwrap();
    for text in [
        "127.0.0.1:4000".to_string(),
        format!("127.0.0.1:4000/{name}"),
        format!("[::1]:5/{name}"),
    ] {
        let a: PeerAddr = text.parse().unwrap();
        assert_eq!(a.to_string(), text);
    }
    let a: PeerAddr = format!("10.0.0.2:7/{name}").parse().unwrap();
    assert_eq!(a.unix, Some(name));
    for (bad, why) in [
        ("127.0.0.1", "not an address and port"),
        ("127.0.0.1:4000/", "not a Unix socket name"),
        ("127.0.0.1:4000/0123", "not a Unix socket name"),
        (
            "127.0.0.1:4000/0123456789abcdef0123456789abcdeg",
            "32 hex digits",
        ),
        (
            "127.0.0.1:4000/+123456789abcdef0123456789abcdef",
            "32 hex digits",
        ),
        (
            "127.0.0.1:4000/é123456789abcdef0123456789abcde",
            "32 hex digits",
        ),
    ] {
        let e = bad.parse::<PeerAddr>().unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn a_socket_says_whether_its_peer_has_read_what_it_sent() {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let a = Conn::from(std::os::fd::OwnedFd::from(a));
    assert!(!a.unread_by_peer());
    a.write_all(&mut [std::io::IoSlice::new(&[7])]).unwrap();
    assert!(a.unread_by_peer());
    let mut got = [0u8; 1];
    b.read_exact(&mut got).unwrap();
    assert!(!a.unread_by_peer());
    let (memory, _other) = crate::transport::memory::pair(64);
    assert!(!Conn::from(memory).unread_by_peer());
}
