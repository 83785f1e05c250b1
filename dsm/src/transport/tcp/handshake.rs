//! The handshake that opens every connection of the mesh: what the connecting rank sends (magic, protocol
//! version, the job's token, its rank, channels and connection set), how the accepting rank checks it, and
//! the one-byte acknowledgement or the refusal with its reason that answers it. A read here is bounded in
//! all, so that a peer sending a byte at a time holds no rank up.

use super::stream::Stream;
use super::Token;
use crate::transport::{channels_in, PROTOCOL_VERSION};
use crate::types::Rank;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"DSM\x01";

/// A handshake: magic, protocol version, job token, rank, connections per rank (its channels and one
/// more: `transport::connections`), and which of them this one is (its set: the service loop's own is
/// the last). The first 40 bytes (magic, version and token: the preamble) keep this layout in every
/// version, and are read and checked before the rest, so that a rank of another build, whose handshake
/// may be of another length, is still known for one of the job's (its token is right) and told why it is
/// refused, instead of being taken for a stranger.
pub(super) const HELLO_LEN: usize = PREAMBLE_LEN + 4 + 4 + 4;

pub(super) const PREAMBLE_LEN: usize = 4 + 4 + 32;

pub(super) fn hello(me: Rank, channels: usize, set: usize, token: &Token) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[8..40].copy_from_slice(token);
    h[40..44].copy_from_slice(&me.0.to_le_bytes());
    h[44..48].copy_from_slice(&(channels as u32).to_le_bytes());
    h[48..52].copy_from_slice(&(set as u32).to_le_bytes());
    h
}

/// Constant-time comparison, so that the time to refuse does not reveal how much of a token was right.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a handshake is refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not a rank of this job (bad magic, wrong token): refused, and the mesh goes on forming.
    Stranger(String),
    /// A rank of this job that cannot be part of the mesh (another build, another number of channels, a
    /// rank outside the job): the job cannot start, and every rank says why at once.
    Member(String),
}

fn word(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks a handshake's preamble (its first [`PREAMBLE_LEN`] bytes): a connection of this job (magic and
/// token), of this build (protocol version).
pub(super) fn check_preamble(h: &[u8], token: &Token) -> std::result::Result<(), Refusal> {
    if &h[..4] != MAGIC {
        return Err(Refusal::Stranger("not a dsm connection (bad magic)".into()));
    }
    if !same_token(&h[8..40], token) {
        return Err(Refusal::Stranger("wrong job token".into()));
    }
    let version = word(h, 4);
    if version != PROTOCOL_VERSION {
        return Err(Refusal::Member(format!(
            "a rank speaks protocol version {version}, this rank {PROTOCOL_VERSION}: every rank must run the same build"
        )));
    }
    Ok(())
}

/// Checks a handshake from a rank that means to join a job of `size` ranks with `channels` connections to
/// each rank (its channels and one more); returns the peer's rank and the connection's set, or why it is
/// refused.
pub(super) fn check_hello(
    h: &[u8; HELLO_LEN],
    token: &Token,
    size: usize,
    channels: usize,
) -> std::result::Result<(Rank, usize), Refusal> {
    check_preamble(h, token)?;
    let (rank, theirs, set) = (word(h, 40), word(h, 44), word(h, 48));
    if rank as usize >= size {
        return Err(Refusal::Member(format!(
            "rank {rank} is outside a job of {size}"
        )));
    }
    if theirs as usize != channels {
        return Err(Refusal::Member(format!(
            "rank {rank} has {} channels, this rank {}: give every rank the same DSM_CHANNELS",
            channels_in(theirs as usize),
            channels_in(channels)
        )));
    }
    if set >= theirs {
        return Err(Refusal::Member(format!(
            "rank {rank} opened connection {set} of {theirs}: every rank must run the same build"
        )));
    }
    Ok((Rank(rank), set as usize))
}

pub(super) const ACK_OK: u8 = 0;

/// Followed by the reason: its length (u16, little-endian) and its bytes.
pub(super) const ACK_REFUSED: u8 = 1;

const MAX_REASON: usize = 1024;

pub(super) fn refuse(stream: &mut Stream, reason: &str) {
    let mut reply = vec![ACK_REFUSED];
    let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
    reply.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    reply.extend_from_slice(reason);
    let _ = stream.write_all(&reply);
    // Ended before it is dropped: a handshake not read in full (a build of another length) would otherwise
    // make the close a reset, which may come before the refusal is read.
    let _ = stream.shutdown_write();
}

/// The reason that follows a refusal, as far as it can be read within a second.
pub(super) fn read_reason(stream: &mut Stream) -> String {
    let until = Instant::now() + Duration::from_secs(1);
    let mut len = [0u8; 2];
    if read_by(stream, &mut len, until, &|| false).is_err() {
        return "no reason given".into();
    }
    let mut reason = vec![0u8; (u16::from_le_bytes(len) as usize).min(MAX_REASON)];
    match read_by(stream, &mut reason, until, &|| false) {
        Ok(()) => String::from_utf8_lossy(&reason).into_owned(),
        Err(_) => "no reason given".into(),
    }
}

/// Reads `buf` in full by `until` (a bound on the whole, not on each read: a peer that sends a byte at a
/// time holds the reader no longer), or gives up as soon as `give_up` says so.
pub(super) fn read_by(
    stream: &mut Stream,
    buf: &mut [u8],
    until: Instant,
    give_up: &dyn Fn() -> bool,
) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let mut got = 0;
    while got < buf.len() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        if give_up() {
            return Err(std::io::Error::other(
                "this rank stopped setting up the job",
            ));
        }
        stream.set_read_timeout(Some(left.min(ABORT_CHECK)))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long the accept loop sleeps, at most, before it looks whether the rank's own connecting gave up.
pub(super) const ABORT_CHECK: Duration = Duration::from_millis(50);
