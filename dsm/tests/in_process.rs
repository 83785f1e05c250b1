//! Ranks as threads of one process over the in-process transport: locks, barriers and round trips through
//! the same service loop and channels as multi-process jobs; and a service loop that receives malformed
//! frames from a peer treats that peer as failed without panicking.

use dsm::transport::local::run_local_job;
use dsm::transport::{Mesh, Transport};
use dsm::{Dsm, DsmError, FailurePolicy, Placement, Rank};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job<F: Fn(Dsm) + Send + Sync + 'static>(ranks: usize, body: F) {
    run_local_job(ranks, 2, body);
}

#[test]
fn locks_exclude_and_barriers_separate_phases() {
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (i2, e2, a2) = (inside.clone(), entries.clone(), arrived.clone());
    job(3, move |dsm| {
        for round in 0..20 {
            {
                let _g = dsm.lock(round % 2).unwrap();
                if round % 2 == 0 {
                    assert!(
                        !i2.swap(true, Ordering::SeqCst),
                        "two ranks inside lock 0 at once"
                    );
                    std::thread::sleep(Duration::from_micros(200));
                    i2.store(false, Ordering::SeqCst);
                }
                e2.fetch_add(1, Ordering::SeqCst);
            }
            a2.fetch_add(1, Ordering::SeqCst);
            dsm.barrier().unwrap();
            // After the barrier every rank has arrived for this round.
            assert!(a2.load(Ordering::SeqCst) >= 3 * (round as usize + 1));
            dsm.barrier().unwrap();
        }
        assert!(dsm.ping(Rank(0), 4096).unwrap() < Duration::from_secs(1));
        let s = dsm.stats();
        assert_eq!(s.lock_acquires, 20);
    });
    assert_eq!(entries.load(Ordering::SeqCst), 60);
}

#[test]
fn regions_need_one_process_per_rank() {
    job(2, |dsm| {
        let e = dsm.alloc(4096, Placement::Cyclic).unwrap_err();
        assert!(matches!(e, DsmError::RegionsNeedProcesses), "{e}");
    });
}

/// A transport that hands over a mesh built by the test.
#[derive(Debug)]
struct Given(Mesh);

impl Transport for Given {
    fn establish(self: Box<Self>, _: Rank, _: usize, _: usize) -> dsm::Result<Mesh> {
        Ok(self.0)
    }
    fn name(&self) -> &'static str {
        "given"
    }
}

/// Rank 0 of a 2-rank job whose rank 1 is played by the test through raw sockets: the first of rank 1's
/// two connections to rank 0, and the second.
fn rank0_with_fake_peer() -> (Dsm, UnixStream, UnixStream) {
    let mut outgoing = Vec::new();
    let mut incoming = Vec::new();
    for _channel in 0..2 {
        let (self_out, self_in) = UnixStream::pair().unwrap();
        let (to_fake, fake_listens) = UnixStream::pair().unwrap();
        std::mem::forget(fake_listens); // keep rank 0's outgoing connection to the fake rank open
        outgoing.push(vec![OwnedFd::from(self_out), OwnedFd::from(to_fake)]);
        incoming.push((Rank(0), OwnedFd::from(self_in)));
    }
    let (fake_out, from_fake) = UnixStream::pair().unwrap();
    incoming.push((Rank(1), OwnedFd::from(from_fake)));
    let (fake_other, from_fake) = UnixStream::pair().unwrap();
    incoming.push((Rank(1), OwnedFd::from(from_fake)));
    let mesh = Mesh { outgoing, incoming };
    let dsm = Dsm::builder()
        .rank(Rank(0), 2)
        .channels(2)
        .failure_policy(FailurePolicy::Report)
        .transport(Box::new(Given(mesh)))
        .build()
        .unwrap();
    (dsm, fake_out, fake_other)
}

fn wait_for_failure(dsm: &Dsm) -> Vec<Rank> {
    let t = Instant::now();
    while dsm.failed_ranks().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    dsm.failed_ranks()
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
        assert_eq!(wait_for_failure(&dsm), vec![Rank(1)], "after {bytes:?}");
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
fn a_truncated_frame_then_a_closed_connection_is_a_peer_failure() {
    let (dsm, mut fake, _other) = rank0_with_fake_peer();
    fake.write_all(&[40, 0, 0, 0, 2, 0]).unwrap();
    drop(fake);
    assert_eq!(wait_for_failure(&dsm), vec![Rank(1)]);
}

/// Answers every request with as many bytes as the request names (8 bytes, little endian).
#[derive(Debug)]
struct Echo;

impl dsm::Service for Echo {
    fn request(&self, _: Rank, payload: Vec<u8>, reply: dsm::Responder) {
        let n = payload
            .get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
        let _ = reply.send(&[&vec![7u8; n]]);
    }
}

#[test]
fn service_answers_larger_than_a_channel_buffer_arrive_and_oversized_requests_are_refused() {
    job(2, |dsm| {
        dsm.register_service(5, Arc::new(Echo)).unwrap();
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(1) {
            let big = 10usize << 20;
            let answer = dsm
                .call(Rank(0), 5, &[&(big as u64).to_le_bytes()])
                .unwrap();
            assert_eq!(answer.len(), big);
            assert!(answer.iter().all(|b| *b == 7));
            let huge = vec![0u8; dsm::MAX_SERVICE_REQUEST + 1];
            let e = dsm.call(Rank(0), 5, &[&huge]).unwrap_err();
            assert!(e.to_string().contains("at most"), "{e}");
            // The connection is untouched: the next call goes through.
            let answer = dsm.call(Rank(0), 5, &[&5u64.to_le_bytes()]).unwrap();
            assert_eq!(answer, vec![7u8; 5]);
        }
        dsm.barrier().unwrap();
    });
}
