//! Ranks as threads of one process over the in-process transport: locks, barriers and round trips through
//! the same service loop and channels as multi-process jobs, over socket pairs and over in-memory
//! connections, with service loops on threads of their own or run by the transport's. (What a service
//! loop does with a peer's malformed frames is tested in the engine's own tests, with a fake peer on raw
//! sockets.)

use dsm::transport::local::{run_local_job_with, Links};
use dsm::{Dsm, DsmError, Placement, Rank};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job<F: Fn(Dsm) + Send + Sync + 'static>(ranks: usize, body: F) {
    run_local_job_with(Links::Sockets, ranks, 2, body);
}

#[test]
fn locks_exclude_and_barriers_separate_phases() {
    locks_and_barriers(Links::Sockets);
}

#[test]
fn locks_exclude_and_barriers_separate_phases_over_in_memory_connections() {
    locks_and_barriers(Links::Memory);
}

#[test]
fn locks_exclude_and_barriers_separate_phases_with_service_loops_run_by_the_transport() {
    locks_and_barriers(Links::Hosted);
}

fn locks_and_barriers(links: Links) {
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (i2, e2, a2) = (inside.clone(), entries.clone(), arrived.clone());
    run_local_job_with(links, 3, 2, move |dsm| {
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
    large_answers(Links::Sockets);
}

#[test]
fn service_answers_larger_than_a_connection_s_memory_arrive_over_in_memory_connections() {
    large_answers(Links::Memory);
}

#[test]
fn service_answers_larger_than_a_connection_s_memory_arrive_from_service_loops_run_by_the_transport(
) {
    large_answers(Links::Hosted);
}

fn large_answers(links: Links) {
    run_local_job_with(links, 2, 2, |dsm| {
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

#[test]
fn a_service_unregistered_is_refused_and_may_be_registered_again() {
    run_local_job_with(Links::Sockets, 2, 2, |dsm| {
        dsm.register_service(5, Arc::new(Echo)).unwrap();
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(0) {
            assert!(dsm.unregister_service(5).is_some());
            assert!(!dsm.service_registered(5));
            assert!(dsm.unregister_service(5).is_none());
        }
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(1) {
            let e = dsm.call(Rank(0), 5, &[&3u64.to_le_bytes()]).unwrap_err();
            assert!(
                matches!(
                    e,
                    DsmError::NoSuchService {
                        rank: Rank(0),
                        id: 5
                    }
                ),
                "{e}"
            );
        }
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(0) {
            dsm.register_service(5, Arc::new(Echo)).unwrap();
        }
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(1) {
            let answer = dsm.call(Rank(0), 5, &[&3u64.to_le_bytes()]).unwrap();
            assert_eq!(answer, vec![7u8; 3]);
        }
        dsm.barrier().unwrap();
    });
}

#[test]
fn ranks_at_their_final_barrier_are_seen_leaving() {
    job(3, |dsm| {
        dsm.barrier().unwrap();
        assert_eq!(dsm.finishing_ranks(), [], "nobody is leaving yet");
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(0) {
            // Ranks 1 and 2 wait at their final barrier for this rank, which sees them leaving.
            let limit = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while dsm.finishing_ranks() != [Rank(1), Rank(2)] {
                assert!(
                    std::time::Instant::now() < limit,
                    "{:?}",
                    dsm.finishing_ranks()
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        dsm.finish().unwrap();
    });
}

#[test]
fn a_call_that_gives_up_on_a_service_not_there_leaves_its_connection_clean() {
    // Rank 1 calls a service rank 0 has not registered, with a deadline already past: the request and
    // its cancellation go out, and only the request is answered (refused). Every later call, on every
    // channel, then gets its own answer, not a second refusal left behind.
    run_local_job_with(Links::Sockets, 2, 2, |dsm| {
        dsm.register_service(5, Arc::new(Echo)).unwrap();
        dsm.barrier().unwrap();
        if dsm.rank() == Rank(1) {
            for _ in 0..8 {
                let e = dsm
                    .call_waiting(Rank(0), 6, &[b"ask"], Some((Instant::now(), b"cancel")))
                    .unwrap_err();
                assert!(matches!(e, DsmError::NoSuchService { .. }), "{e}");
            }
            for n in 1..=16u64 {
                let answer = dsm.call(Rank(0), 5, &[&n.to_le_bytes()]).unwrap();
                assert_eq!(answer, vec![7u8; n as usize]);
            }
        }
        dsm.barrier().unwrap();
    });
}
