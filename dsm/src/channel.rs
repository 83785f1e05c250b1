//! Channels: the requester side of every exchange. A channel holds one connection to each rank's service
//! loop and the buffers to receive into; a thread claims a channel, sends requests, reads the replies on
//! the same connections (so a reply wakes the waiting thread directly), and gives the channel back.
//!
//! Claiming is a `try_lock` over a small pool and the I/O is plain system calls into pre-allocated buffers:
//! the fault path uses channels from the SIGBUS handler. Never touch shared-region memory while holding a
//! channel.

use crate::keepawake::KeepAwake;
use crate::stats::Counters;
use crate::transport::memory::Shut;
use crate::transport::{Conn, Readiness};
use crate::types::{Rank, PAGE_SIZE};
use crate::uffd::futex;
use crate::wire::{self, FrameError, Reply, Request, MAX_HEADER, PREFIX};
use nix::errno::Errno;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// Why a receive failed.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The peer closed the connection.
    Eof,
    /// A system call failed.
    Sys(Errno),
    /// The frame is malformed.
    Frame(FrameError),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Eof => write!(f, "connection closed"),
            RecvError::Sys(e) => write!(f, "{e}"),
            RecvError::Frame(e) => write!(f, "{e}"),
        }
    }
}

/// Writes one frame: `msg`'s header, then the payload slices. Blocks until all is written.
pub(crate) fn write_frame<T: serde::Serialize>(
    conn: &Conn,
    msg: &T,
    payload: &[&[u8]],
    counters: &Counters,
) -> Result<(), Errno> {
    let mut head = [0u8; PREFIX + MAX_HEADER];
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    // A frame's length is 32 bits: a longer one would wrap and the receiver would parse payload bytes as
    // frames.
    if payload_len > u32::MAX as usize - 2 - MAX_HEADER {
        return Err(Errno::EMSGSIZE);
    }
    let n = wire::encode(msg, payload_len, &mut head);
    // Up to three payload slices go out without allocating (the fault path sends at most a page); more
    // take a vector.
    let mut slices = [IoSlice::new(&[]); 4];
    let mut many = Vec::new();
    let bufs: &mut [IoSlice<'_>] = if payload.len() < slices.len() {
        slices[0] = IoSlice::new(&head[..n]);
        for (s, p) in slices[1..].iter_mut().zip(payload) {
            *s = IoSlice::new(p);
        }
        &mut slices[..1 + payload.len()]
    } else {
        many.push(IoSlice::new(&head[..n]));
        many.extend(payload.iter().map(|p| IoSlice::new(p)));
        &mut many[..]
    };
    conn.write_all(bufs)?;
    Counters::add(&counters.messages_sent, 1);
    Counters::add(&counters.bytes_sent, (n + payload_len) as u64);
    Ok(())
}

/// Fills `buf` from `conn`, waiting for the bytes.
pub(crate) fn read_exact(conn: &Conn, buf: &mut [u8]) -> Result<(), RecvError> {
    let mut got = 0;
    while got < buf.len() {
        match conn.recv(&mut buf[got..], true) {
            Ok(Some(0)) => return Err(RecvError::Eof),
            Ok(Some(n)) => got += n,
            Ok(None) => continue,
            Err(e) => return Err(RecvError::Sys(e)),
        }
    }
    Ok(())
}

/// How a thread waiting for a reply polls for it before it blocks in `read`: a reply that arrives within
/// that time is taken without being woken (a wake-up across vCPUs costs tens of microseconds on a VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ReplyPoll {
    /// For how long, in nanoseconds (0: block at once).
    pub(crate) ns: u64,
    /// Whether to yield the CPU between looks, where a thread of the transport carries the reply (the MPI
    /// bridge): a spinning requester would keep that thread off the CPU.
    pub(crate) yielding: bool,
}

/// Polls `conn` as `poll` says before the caller blocks in a read.
fn poll_until_readable(conn: &Conn, poll: ReplyPoll) {
    if poll.ns == 0 {
        return;
    }
    let t0 = Instant::now();
    loop {
        if conn.readiness() != Readiness::Waiting {
            return; // data, end of stream, or an error the read will report
        }
        if t0.elapsed().as_nanos() as u64 >= poll.ns {
            return;
        }
        if poll.yielding {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The connection to `rank`. Ranks can come from the wire (a grant names them), so an unknown one is an
/// error, never an out-of-bounds panic (this runs inside the SIGBUS handler).
fn conn_of(conns: &[Arc<Conn>], rank: Rank) -> Result<&Conn, Errno> {
    conns.get(rank.index()).map(|c| &**c).ok_or(Errno::EINVAL)
}

/// The length of the frame whose prefix is `len`. A frame longer than the buffer, or too short to hold a
/// header's length, is read and dropped (so that the connection stays aligned on frames for its next
/// user) and reported as an error.
fn body_len_or_skip(conn: &Conn, len: [u8; 4], buf: &mut [u8]) -> Result<usize, RecvError> {
    match wire::body_len(len, buf.len()) {
        Ok(n) => Ok(n),
        Err(FrameError::BadLength(n)) if n < 2 => skip_short(conn, n),
        Err(FrameError::BadLength(n)) if n > buf.len() => {
            let mut left = n;
            while left > 0 {
                let k = left.min(buf.len());
                read_exact(conn, &mut buf[..k])?;
                left -= k;
            }
            Err(RecvError::Frame(FrameError::BadLength(n)))
        }
        Err(e) => Err(RecvError::Frame(e)),
    }
}

/// Reads and drops the body of a frame of `n` (0 or 1) bytes, too short for a header's length; reports it.
fn skip_short<T>(conn: &Conn, n: usize) -> Result<T, RecvError> {
    let mut body = [0u8; 1];
    read_exact(conn, &mut body[..n.min(1)])?;
    Err(RecvError::Frame(FrameError::BadLength(n)))
}

/// A payload being read into a channel's receive buffer piece by piece (`Channel::payload`), while other
/// threads install the pieces already there (see `installer.rs`). The buffer is reached through a raw
/// pointer because the reader writes its tail while installers read its head.
#[derive(Debug)]
pub(crate) struct Payload<'c> {
    channel: &'c Channel,
    base: *mut u8,
    len: usize,
}

impl Payload<'_> {
    /// Where the payload starts in the receive buffer.
    pub(crate) fn base(&self) -> *const u8 {
        self.base
    }

    /// Reads more of the payload from `from`, of which `filled` bytes are there already: as much as has
    /// arrived, in one `recv`. Waits for at least one byte when `wait`, else returns `None` when nothing has
    /// arrived. Returns how many bytes are there now.
    pub(crate) fn recv_more(
        &self,
        from: Rank,
        filled: usize,
        wait: bool,
    ) -> Result<Option<usize>, RecvError> {
        assert!(filled < self.len);
        let conn = conn_of(&self.channel.conns, from).map_err(RecvError::Sys)?;
        // SAFETY: `base..base + len` is inside the channel's receive buffer, which the borrow of the
        // channel keeps alive and unmoved; nothing else reads or writes `filled..len` until this call
        // returns, as installers read only bytes that a returned `filled` covers.
        let tail =
            unsafe { std::slice::from_raw_parts_mut(self.base.add(filled), self.len - filled) };
        match conn.recv(tail, wait) {
            Ok(Some(0)) => Err(RecvError::Eof),
            Ok(Some(n)) => Ok(Some(filled + n)),
            Ok(None) => Ok(None),
            Err(e) => Err(RecvError::Sys(e)),
        }
    }
}

/// One channel's connections and buffers.
#[derive(Debug)]
pub(crate) struct Channel {
    conns: Vec<Arc<Conn>>,
    /// By rank: whether the reading side of every channel's connection to it was ended
    /// ([`Channels::stop_reading_from`]); shared by the channels.
    unread: Arc<[AtomicBool]>,
    poll: ReplyPoll,
    rx: Vec<u8>,
    /// Holds a page across receives (a grant's page while the owner's reply is read).
    pub(crate) page: Vec<u8>,
}

impl Channel {
    /// Sends `req` with `payload` to `to`.
    pub(crate) fn send(
        &self,
        counters: &Counters,
        to: Rank,
        req: &Request,
        payload: &[&[u8]],
    ) -> Result<(), Errno> {
        // A connection whose reading side was ended may still hold a late reply to a request that gave
        // up (ending it discards nothing that arrives): a new request would take that as its answer.
        if self
            .unread
            .get(to.index())
            .is_some_and(|u| u.load(Ordering::Acquire))
        {
            return Err(Errno::EPIPE);
        }
        write_frame(conn_of(&self.conns, to)?, req, payload, counters)
    }

    /// Receives the next reply from `from`. Returns the reply, its payload (borrowing the receive buffer)
    /// and the channel's page buffer, so that a caller can keep a page across further receives.
    pub(crate) fn recv(
        &mut self,
        counters: &Counters,
        from: Rank,
    ) -> Result<(Reply, &[u8], &mut [u8]), RecvError> {
        let conn = conn_of(&self.conns, from).map_err(RecvError::Sys)?;
        poll_until_readable(conn, self.poll);
        let mut len = [0u8; 4];
        read_exact(conn, &mut len)?;
        let n = body_len_or_skip(conn, len, &mut self.rx)?;
        read_exact(conn, &mut self.rx[..n])?;
        Counters::add(&counters.messages_received, 1);
        Counters::add(&counters.bytes_received, 4 + n as u64);
        let (reply, payload) = wire::decode(&self.rx[..n]).map_err(RecvError::Frame)?;
        Ok((reply, payload, &mut self.page))
    }

    /// Receives the header of the next reply from `from` and leaves its payload unread, so that a large
    /// payload can be taken in pieces (`recv_payload`). Returns the reply and the payload's length.
    pub(crate) fn recv_head(
        &mut self,
        counters: &Counters,
        from: Rank,
    ) -> Result<(Reply, usize), RecvError> {
        let conn = conn_of(&self.conns, from).map_err(RecvError::Sys)?;
        poll_until_readable(conn, self.poll);
        let mut len = [0u8; 4];
        read_exact(conn, &mut len)?;
        // Only the header must fit the buffer: the caller takes the payload in pieces.
        let n = match wire::body_len(len, u32::MAX as usize) {
            Ok(n) => n,
            Err(FrameError::BadLength(n)) if n < 2 => return skip_short(conn, n),
            Err(e) => return Err(RecvError::Frame(e)),
        };
        read_exact(conn, &mut self.rx[..2])?;
        let header_len = u16::from_le_bytes([self.rx[0], self.rx[1]]) as usize;
        // A frame that is refused is still read to its end, so that the connection stays aligned on
        // frames for the channel's next user.
        if header_len > MAX_HEADER || 2 + header_len > n {
            self.skip_payload(from, n - 2)?;
            return Err(RecvError::Frame(FrameError::BadLength(header_len)));
        }
        read_exact(conn, &mut self.rx[2..2 + header_len])?;
        Counters::add(&counters.messages_received, 1);
        Counters::add(&counters.bytes_received, 4 + n as u64);
        match wire::decode::<Reply>(&self.rx[..2 + header_len]) {
            Ok((reply, _)) => Ok((reply, n - 2 - header_len)),
            Err(e) => {
                self.skip_payload(from, n - 2 - header_len)?;
                Err(RecvError::Frame(e))
            }
        }
    }

    /// Receives the next reply from `from` with its payload, of any length, into a vector of its own
    /// (taken in pieces through the receive buffer): for replies that may outgrow the buffer, such as the
    /// write notices a barrier or a lock grant brings.
    pub(crate) fn recv_owned(
        &mut self,
        counters: &Counters,
        from: Rank,
    ) -> Result<(Reply, Vec<u8>), RecvError> {
        let (reply, len) = self.recv_head(counters, from)?;
        let mut payload = Vec::with_capacity(len.min(self.rx.len()));
        while payload.len() < len {
            let piece = (len - payload.len()).min(self.rx.len());
            payload.extend_from_slice(self.recv_payload(from, piece)?);
        }
        Ok((reply, payload))
    }

    /// Reads the next `len` payload bytes of the reply from `from` whose header `recv_head` returned.
    pub(crate) fn recv_payload(&mut self, from: Rank, len: usize) -> Result<&[u8], RecvError> {
        if len > self.rx.len() {
            return Err(RecvError::Frame(FrameError::BadLength(len)));
        }
        read_exact(
            conn_of(&self.conns, from).map_err(RecvError::Sys)?,
            &mut self.rx[..len],
        )?;
        Ok(&self.rx[..len])
    }

    /// Starts reading a payload of `len` bytes from the reply whose header `recv_head` returned, piece by
    /// piece (`Payload::recv_more`).
    pub(crate) fn payload(&mut self, len: usize) -> Result<Payload<'_>, RecvError> {
        if len > self.rx.len() {
            return Err(RecvError::Frame(FrameError::BadLength(len)));
        }
        let base = self.rx.as_mut_ptr();
        Ok(Payload {
            channel: self,
            base,
            len,
        })
    }

    /// Reads one page of payload from `from` into the channel's page buffer.
    pub(crate) fn recv_page(&mut self, from: Rank) -> Result<(), RecvError> {
        read_exact(
            conn_of(&self.conns, from).map_err(RecvError::Sys)?,
            &mut self.page,
        )
    }

    /// Reads and drops `len` payload bytes from `from`, keeping the stream aligned on frames.
    pub(crate) fn skip_payload(&mut self, from: Rank, mut len: usize) -> Result<(), RecvError> {
        while len > 0 {
            let n = len.min(self.rx.len());
            self.recv_payload(from, n)?;
            len -= n;
        }
        Ok(())
    }

    /// Waits until a reply from `from` can be read, or `deadline` passes (returns false).
    pub(crate) fn wait_readable(&self, from: Rank, deadline: Instant) -> Result<bool, RecvError> {
        conn_of(&self.conns, from)
            .map_err(RecvError::Sys)?
            .wait_readable(deadline)
            .map_err(RecvError::Sys)
    }

    /// Sends `req` to `to` and waits for its reply.
    pub(crate) fn call(
        &mut self,
        counters: &Counters,
        to: Rank,
        req: &Request,
    ) -> Result<(Reply, &[u8], &mut [u8]), RecvError> {
        self.send(counters, to, req, &[]).map_err(RecvError::Sys)?;
        self.recv(counters, to)
    }
}

/// The pool of channels of one rank.
#[derive(Debug)]
pub(crate) struct Channels {
    slots: Box<[Mutex<Channel>]>,
    next: AtomicUsize,
    /// Bumped whenever a claimed channel is given back: threads waiting for any channel sleep on it.
    freed: AtomicU32,
    /// How many threads wait for a channel (a channel given back wakes them only when there are some).
    waiting: AtomicU32,
    /// The longest a waiting thread sleeps before it looks again ([`CLAIM_NAP`]; longer in a test that
    /// must see the wake-up do the work).
    nap: Duration,
    /// Told of every claim: a claim is a request about to go out.
    awake: Arc<KeepAwake>,
    /// `conns[channel][rank]`: the channels' connections, to end their reading side without claiming the
    /// channel ([`Channels::stop_reading_from`]).
    conns: Vec<Vec<Arc<Conn>>>,
    /// By rank: the reading side of its connections was ended, and no request goes to it any more.
    unread: Arc<[AtomicBool]>,
}

/// A claimed channel; given back (and a thread waiting for one woken) when dropped. Dropping it is
/// async-signal-safe: the fault path claims channels from the SIGBUS handler.
pub(crate) struct Claimed<'a> {
    guard: Option<MutexGuard<'a, Channel>>,
    pool: &'a Channels,
}

impl std::ops::Deref for Claimed<'_> {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        self.guard
            .as_ref()
            .expect("a claimed channel is held until dropped")
    }
}

impl std::ops::DerefMut for Claimed<'_> {
    fn deref_mut(&mut self) -> &mut Channel {
        self.guard
            .as_mut()
            .expect("a claimed channel is held until dropped")
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.pool.freed.fetch_add(1, Ordering::SeqCst);
        if self.pool.waiting.load(Ordering::SeqCst) > 0 {
            futex::wake_all(&self.pool.freed);
        }
    }
}

/// The longest a thread waiting for a channel sleeps before it looks again (a wake-up is never needed
/// for correctness, only for speed).
const CLAIM_NAP: Duration = Duration::from_millis(10);

impl Channels {
    /// Builds the pool from `outgoing[channel][rank]`; each channel can receive up to `max_pages` pages.
    /// Replies are polled for as `poll` says before blocking.
    pub(crate) fn new(
        outgoing: Vec<Vec<Conn>>,
        max_pages: usize,
        poll: ReplyPoll,
        awake: Arc<KeepAwake>,
    ) -> Channels {
        let rx_len = 2 + MAX_HEADER + max_pages * PAGE_SIZE;
        let conns: Vec<Vec<Arc<Conn>>> = outgoing
            .into_iter()
            .map(|set| set.into_iter().map(Arc::new).collect())
            .collect();
        let ranks = conns.first().map_or(0, Vec::len);
        let unread: Arc<[AtomicBool]> = (0..ranks).map(|_| AtomicBool::new(false)).collect();
        Channels {
            slots: conns
                .iter()
                .map(|set| {
                    Mutex::new(Channel {
                        conns: set.clone(),
                        unread: unread.clone(),
                        poll,
                        rx: vec![0; rx_len],
                        page: vec![0; PAGE_SIZE],
                    })
                })
                .collect(),
            conns,
            unread,
            next: AtomicUsize::new(0),
            freed: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            nap: CLAIM_NAP,
            awake,
        }
    }

    /// Ends the reading side of every channel's connection to `rank`, which has failed: threads waiting
    /// for its replies (a blocked `in` at its home, say) wake with an error instead of waiting for ever
    /// on a rank that, failed here for a broken connection or a bad frame, may live on and never answer.
    /// Later requests to it fail the same way. The writing side stays open, as the service loop leaves
    /// the failed rank's connections to it: a send that fails would mean that it has left the job.
    pub(crate) fn stop_reading_from(&self, rank: Rank) {
        self.shut(rank, Shut::Read);
    }

    /// Ends both sides of every channel's connection to `rank`, which has failed for its silence (stopped,
    /// hung, or cut off): a thread blocked sending it a large request (its socket buffer full) wakes with
    /// an error too, and so does every later request to it: it can never take part again. Its copies of
    /// pages are not taken for gone (it may live on, and still read them): a fault that needs one
    /// dropped fails instead, until its service-loop connection ends (`Shared::gone`). The rank, if it
    /// lives on, sees these connections end and fails this one in turn, without taking it for gone.
    pub(crate) fn cut_off(&self, rank: Rank) {
        self.shut(rank, Shut::Both);
    }

    fn shut(&self, rank: Rank, how: Shut) {
        // Marked first: a request sent after it would read whatever late reply the connection holds.
        if let Some(u) = self.unread.get(rank.index()) {
            u.store(true, Ordering::Release);
        }
        for set in &self.conns {
            if let Some(conn) = set.get(rank.index()) {
                conn.shutdown(how);
            }
        }
    }

    /// Every channel, one after the other (for shutdown).
    pub(crate) fn all(&self) -> impl Iterator<Item = MutexGuard<'_, Channel>> {
        self.slots
            .iter()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn claimed<'a>(&'a self, guard: MutexGuard<'a, Channel>) -> Claimed<'a> {
        self.awake.touch();
        Claimed {
            guard: Some(guard),
            pool: self,
        }
    }

    /// Takes a free channel of `slots[first..]` if there is one, without waiting.
    fn try_claim_from(&self, first: usize) -> Option<Claimed<'_>> {
        let slots = &self.slots[first..];
        let n = slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).find_map(|i| match slots[(start + i) % n].try_lock() {
            Ok(g) => Some(self.claimed(g)),
            Err(TryLockError::Poisoned(p)) => Some(self.claimed(p.into_inner())),
            Err(TryLockError::WouldBlock) => None,
        })
    }

    /// Takes a free channel if there is one, without waiting.
    pub(crate) fn try_claim(&self) -> Option<Claimed<'_>> {
        self.try_claim_from(0)
    }

    /// Takes a free channel for an exchange that completes without waiting for this rank's application
    /// threads (a fault, a release, a ping), waiting for one when all are in use.
    pub(crate) fn claim(&self) -> Claimed<'_> {
        self.claim_from(0, None, || false)
            .expect("a claim without a deadline waits until it gets a channel")
    }

    /// Takes a channel for a call that may wait on other application threads (a lock, a barrier). Such calls
    /// never take channel 0: if they held every channel, the thread that holds the lock they wait for could
    /// not resolve a fault, and the rank would hang. Faults use any channel and finish without waiting on
    /// application threads, so channel 0 always comes free for them.
    ///
    /// The other channels may be held by calls that wait for ever (blocked `in`s of other threads), so
    /// the wait gives up (`None`) once `deadline` passes or, looked at between naps, once `give_up` says
    /// so: the rank the call is for failed, and the caller says so instead of waiting for ever.
    pub(crate) fn claim_for_wait(
        &self,
        deadline: Option<Instant>,
        give_up: impl Fn() -> bool,
    ) -> Option<Claimed<'_>> {
        self.claim_from(1.min(self.slots.len() - 1), deadline, give_up)
    }

    /// Takes the first channel of `slots[first..]` to come free, or gives up at `deadline` or when
    /// `give_up` says so.
    fn claim_from(
        &self,
        first: usize,
        deadline: Option<Instant>,
        give_up: impl Fn() -> bool,
    ) -> Option<Claimed<'_>> {
        loop {
            if let Some(c) = self.try_claim_from(first) {
                return Some(c);
            }
            // Counted as waiting before looking again, so that a channel given back after this look
            // wakes this thread (its `freed` no longer matches what was seen).
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let seen = self.freed.load(Ordering::SeqCst);
            let got = self.try_claim_from(first);
            if got.is_none() {
                let nap = match deadline {
                    Some(d) => d.saturating_duration_since(Instant::now()).min(self.nap),
                    None => self.nap,
                };
                if !nap.is_zero() {
                    futex::wait_for(&self.freed, seen, nap);
                }
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if got.is_some() {
                return got;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) || give_up() {
                return self.try_claim_from(first);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(n: usize) -> Channels {
        Channels::new(
            (0..n).map(|_| Vec::new()).collect(),
            1,
            ReplyPoll::default(),
            Arc::new(KeepAwake::new(Duration::ZERO)),
        )
    }

    #[test]
    fn a_refused_reply_is_read_to_its_end_and_the_next_one_arrives_whole() {
        use std::io::Write;
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Channels::new(
            vec![vec![Conn::from(std::os::fd::OwnedFd::from(ours))]],
            1,
            ReplyPoll::default(),
            Arc::new(KeepAwake::new(Duration::ZERO)),
        );
        let counters = Counters::default();
        // Frames too short for a header's length (1 byte, then none); a header longer than any header,
        // then one that does not decode, each with a payload; then a good reply.
        let mut bytes = vec![1, 0, 0, 0, 0xee, 0, 0, 0, 0];
        for (header_len, header, payload) in [
            (MAX_HEADER as u16 + 1, vec![7u8; 10], vec![]),
            (3, vec![0xff; 3], vec![9u8; 5]),
        ] {
            let n = (2 + header.len() + payload.len()) as u32;
            bytes.extend_from_slice(&n.to_le_bytes());
            bytes.extend_from_slice(&header_len.to_le_bytes());
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&payload);
        }
        theirs.write_all(&bytes).unwrap();
        let theirs = Conn::from(std::os::fd::OwnedFd::from(theirs));
        write_frame(&theirs, &Reply::Ack, &[b"xyz"], &counters).unwrap();
        let mut ch = p.claim();
        for _ in 0..4 {
            assert!(matches!(
                ch.recv_owned(&counters, Rank(0)),
                Err(RecvError::Frame(_))
            ));
        }
        let (reply, payload) = ch.recv_owned(&counters, Rank(0)).unwrap();
        assert!(matches!(reply, Reply::Ack), "{reply:?}");
        assert_eq!(payload, b"xyz");
    }

    #[test]
    fn a_late_reply_after_reading_stopped_is_never_taken_for_a_new_request_s() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Channels::new(
            vec![vec![Conn::from(std::os::fd::OwnedFd::from(ours))]],
            1,
            ReplyPoll::default(),
            Arc::new(KeepAwake::new(Duration::ZERO)),
        );
        let counters = Counters::default();
        let theirs = Conn::from(std::os::fd::OwnedFd::from(theirs));
        // A reply to a request that gave up waits unread when the rank is taken for failed (over TCP it
        // may also come after: ending the reading side does not stop the peer's writes there).
        write_frame(&theirs, &Reply::Ack, &[], &counters).unwrap();
        p.stop_reading_from(Rank(0));
        let ch = p.claim();
        assert_eq!(
            ch.send(&counters, Rank(0), &Request::Heartbeat, &[]),
            Err(Errno::EPIPE),
            "a request went out to read the late reply as its own"
        );
    }

    #[test]
    fn a_wait_for_a_channel_takes_whichever_comes_free_and_a_deadline_bounds_it() {
        let p = pool(4);
        // Channels 1-3 are held (by calls that wait for ever, say): a waiting claim with a deadline gives
        // up at it, and channel 0 stays for faults.
        let held: Vec<_> = (0..3)
            .map(|_| p.claim_for_wait(None, || false).unwrap())
            .collect();
        let t0 = Instant::now();
        assert!(p
            .claim_for_wait(Some(t0 + Duration::from_millis(30)), || false)
            .is_none());
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(30) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(p.try_claim().is_some(), "channel 0 is free for faults");
        // Without a deadline, the wait ends once `give_up` says so (the rank called failed), looked at
        // between naps.
        let failed = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                failed.store(true, Ordering::Release);
            });
            let t0 = Instant::now();
            assert!(p
                .claim_for_wait(None, || failed.load(Ordering::Acquire))
                .is_none());
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        });
        drop(held);
        // The last channel given back goes to a waiting thread at once: woken by the give-back, not by its
        // next look (naps are made long here so that only the wake-up can be in time), and not only once
        // the first channel of the range comes free, which here it never does.
        let mut p = p;
        p.nap = Duration::from_secs(10);
        let p = p;
        let mut held: Vec<_> = (0..3)
            .map(|_| p.claim_for_wait(None, || false).unwrap())
            .collect();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let c = p.claim_for_wait(Some(Instant::now() + Duration::from_secs(5)), || false);
                (Instant::now(), c.is_some())
            });
            std::thread::sleep(Duration::from_millis(50));
            let given = Instant::now();
            drop(held.pop());
            let (got_at, got) = waiter.join().unwrap();
            assert!(got, "the waiter got no channel");
            let after = got_at.saturating_duration_since(given);
            assert!(after < Duration::from_secs(1), "it took {after:?}");
        });
        drop(held);
    }
}
