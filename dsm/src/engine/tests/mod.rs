//! The service loop's tests: rank 0 of a job runs its real loop, and the test plays the other ranks over
//! raw sockets (`rank0_with_fakes`), so that each message's handling is checked on its own.
//! The fakes and the helpers several subjects share are here; the tests, by subject, in the modules.

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

mod connections;
mod diffs;
mod leaving;
mod locks;
mod pages;
mod services;

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

/// The fake rank 1 reads the next frame rank 0 sends it on `fake`.
fn fake_reads(fake: &UnixStream) -> (Reply, Vec<u8>) {
    fake_reads_frame(fake)
}

/// A fake rank reads the next frame rank 0 sends it on `fake` (a `Reply` to a request, or a `Request` of
/// rank 0's service loop).
fn fake_reads_frame<T: serde::de::DeserializeOwned>(mut fake: &UnixStream) -> (T, Vec<u8>) {
    fake.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut header = [0u8; 4];
    fake.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; wire::body_len(header, usize::MAX >> 1).unwrap()];
    fake.read_exact(&mut body).unwrap();
    let (frame, payload) = wire::decode::<T>(&body).unwrap();
    (frame, payload.to_vec())
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

/// Page `page`'s entry at its manager, read under the page's manager lock: once the request being
/// served is done with it.
fn entry_when_free(shared: &RegionShared, page: u64) -> swmr::Entry {
    let slot = shared.slot(page);
    crate::fault::lock_slot(&slot.lock);
    let entry = slot.load();
    crate::fault::unlock_slot(&slot.lock);
    entry
}
