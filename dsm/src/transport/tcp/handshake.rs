//! The handshake that opens every socket connection of the mesh. Each side proves that it knows the
//! job's token without sending it: the connecting rank sends a fresh nonce and MACs (HMAC-SHA256 keyed
//! with the token) over all it sends; the accepting rank checks them and answers with a MAC of its own
//! over the whole handshake, or with a refusal and its reason. Whoever answers at an address, or records
//! a handshake on the network, learns nothing it could join the job with, and a handshake sent again is
//! refused. A read here is bounded in all, so that a peer sending a byte at a time holds no rank up.
//!
//! The data that follows the handshake is not encrypted: a job across hosts trusts the network between
//! them not to read or change it (docs/ARCHITECTURE.md, "Transports").

use super::stream::Stream;
use super::Token;
use crate::transport::{channels_in, PROTOCOL_VERSION};
use crate::types::Rank;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::time::{Duration, Instant};

/// The handshake's magic.
const MAGIC: &[u8; 4] = b"DSM\x02";

/// The magic of the builds before the proof (protocol 14 and older), which sent the token itself in a
/// handshake of [`TOKEN_IN_CLEAR_LEN`] bytes (magic, version, token, rank, channels, set). Such a
/// handshake is read whole and refused with the reason, so that the older rank is not left waiting.
pub(super) const TOKEN_IN_CLEAR: &[u8; 4] = b"DSM\x01";
pub(super) const TOKEN_IN_CLEAR_LEN: usize = 4 + 4 + 32 + 4 + 4 + 4;

/// A nonce, and a MAC's length (HMAC-SHA256).
pub(super) const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;

/// The preamble: magic, protocol version, the connecting rank's nonce, and its proof (a MAC over the
/// three). Its layout, and how the proof is made (HMAC-SHA256, the label `PROOF`), stay the same in
/// every version, and it is checked before the rest is read, so that a rank of another build, whose
/// handshake may be of another length, is still known for one of the job's (its proof checks out) and
/// told why it is refused, instead of being taken for a stranger.
pub(super) const PREAMBLE_LEN: usize = PROVED_LEN + MAC_LEN;

/// The bytes of the preamble that its proof covers: magic, version and nonce.
const PROVED_LEN: usize = 4 + 4 + NONCE_LEN;

/// A handshake: the preamble, then the rank it means to reach, the connecting rank, its connections
/// per rank (its channels and one more: `transport::connections`), which of them this one is (its set:
/// the service loop's own is the last), and a MAC over all of that and the preamble.
pub(super) const HELLO_LEN: usize = TAGGED_LEN + MAC_LEN;

/// The bytes of a handshake that its tag covers: the preamble and the four words after it.
const TAGGED_LEN: usize = PREAMBLE_LEN + 4 + 4 + 4 + 4;

/// What follows an `ACK_OK`: the accepting rank's MAC over the whole handshake it accepted.
pub(super) const WELCOME_LEN: usize = MAC_LEN;

const PROOF: &[u8] = b"dsm handshake: preamble\0";
const TAG: &[u8] = b"dsm handshake: connection\0";
const WELCOME: &[u8] = b"dsm handshake: welcome\0";

/// HMAC-SHA256 of `label` and then `bytes`, keyed with the job's token.
fn mac(token: &Token, label: &[u8], bytes: &[u8]) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(bytes);
    m
}

fn sign(token: &Token, label: &[u8], bytes: &[u8]) -> [u8; MAC_LEN] {
    mac(token, label, bytes).finalize().into_bytes().into()
}

/// Whether `tag` is the MAC of `label` and `bytes` under `token`, compared in constant time, so that
/// the time to refuse does not tell how much of a guess was right.
fn signed(token: &Token, label: &[u8], bytes: &[u8], tag: &[u8]) -> bool {
    mac(token, label, bytes).verify_slice(tag).is_ok()
}

/// The preamble of a handshake of protocol `version` made with `nonce`.
pub(super) fn preamble(version: u32, token: &Token, nonce: [u8; NONCE_LEN]) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(MAGIC);
    p[4..8].copy_from_slice(&version.to_le_bytes());
    p[8..PROVED_LEN].copy_from_slice(&nonce);
    let proof = sign(token, PROOF, &p[..PROVED_LEN]);
    p[PROVED_LEN..].copy_from_slice(&proof);
    p
}

/// The handshake of `from`'s connection of set `set` to `to`, made with a fresh `nonce`.
pub(super) fn hello(
    from: Rank,
    to: Rank,
    channels: usize,
    set: usize,
    token: &Token,
    nonce: [u8; NONCE_LEN],
) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..PREAMBLE_LEN].copy_from_slice(&preamble(PROTOCOL_VERSION, token, nonce));
    let rest = PREAMBLE_LEN;
    h[rest..rest + 4].copy_from_slice(&to.0.to_le_bytes());
    h[rest + 4..rest + 8].copy_from_slice(&from.0.to_le_bytes());
    h[rest + 8..rest + 12].copy_from_slice(&(channels as u32).to_le_bytes());
    h[rest + 12..rest + 16].copy_from_slice(&(set as u32).to_le_bytes());
    let tag = sign(token, TAG, &h[..TAGGED_LEN]);
    h[TAGGED_LEN..].copy_from_slice(&tag);
    h
}

/// The nonce a handshake was made with.
pub(super) fn nonce_of(h: &[u8; HELLO_LEN]) -> [u8; NONCE_LEN] {
    h[8..PROVED_LEN].try_into().expect("32 bytes")
}

/// The accepting rank's answer to handshake `h`, which proves it knows the token.
pub(super) fn welcome(h: &[u8; HELLO_LEN], token: &Token) -> [u8; WELCOME_LEN] {
    sign(token, WELCOME, h)
}

/// Whether `w` is the answer to `h` of a rank that knows the token.
pub(super) fn welcomed(h: &[u8; HELLO_LEN], w: &[u8; WELCOME_LEN], token: &Token) -> bool {
    signed(token, WELCOME, h, w)
}

/// Why a handshake is refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Not a rank of this job (bad magic, a proof or tag that does not check out), or a handshake that
    /// anyone who recorded one could send (one sent again, or one meant for another rank): refused, and
    /// the mesh goes on forming. A rank that sent it is told why, and fails.
    Stranger(String),
    /// A rank of this job that cannot be part of the mesh (another build, another number of channels, a
    /// rank outside the job): the job cannot start, and every rank says why at once.
    Member(String),
}

fn word(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks the handshake of a build before the proof ([`TOKEN_IN_CLEAR_LEN`] bytes): always refused, as a
/// rank of this job when it holds the job's token (compared in constant time).
pub(super) fn check_token_in_clear(h: &[u8], token: &Token) -> Refusal {
    let same: bool = subtle::ConstantTimeEq::ct_eq(&h[8..40], &token[..]).into();
    let version = word(h, 4);
    match same {
        true => Refusal::Member(format!(
            "a rank speaks protocol version {version}, which sends the job's token itself, this rank {PROTOCOL_VERSION}: every rank must run the same build"
        )),
        false => Refusal::Stranger(format!(
            "a handshake of protocol version {version} with the wrong job token"
        )),
    }
}

/// Checks a handshake's preamble (its first [`PREAMBLE_LEN`] bytes): a connection of this job (magic and
/// a proof made with its token), of this build (protocol version).
pub(super) fn check_preamble(h: &[u8], token: &Token) -> std::result::Result<(), Refusal> {
    if &h[..4] != MAGIC {
        return Err(Refusal::Stranger("not a dsm connection (bad magic)".into()));
    }
    if !signed(token, PROOF, &h[..PROVED_LEN], &h[PROVED_LEN..PREAMBLE_LEN]) {
        return Err(Refusal::Stranger(
            "wrong job token (its handshake's proof does not check out)".into(),
        ));
    }
    let version = word(h, 4);
    if version != PROTOCOL_VERSION {
        return Err(Refusal::Member(format!(
            "a rank speaks protocol version {version}, this rank {PROTOCOL_VERSION}: every rank must run the same build"
        )));
    }
    Ok(())
}

/// Checks a handshake that reached rank `me` from a rank that means to join a job of `size` ranks with
/// `channels` connections to each rank (its channels and one more); returns the peer's rank and the
/// connection's set, or why it is refused.
pub(super) fn check_hello(
    h: &[u8; HELLO_LEN],
    token: &Token,
    me: Rank,
    size: usize,
    channels: usize,
) -> std::result::Result<(Rank, usize), Refusal> {
    check_preamble(h, token)?;
    let rest = PREAMBLE_LEN;
    if !signed(token, TAG, &h[..TAGGED_LEN], &h[TAGGED_LEN..]) {
        return Err(Refusal::Stranger(
            "its handshake was changed after it was made (the MAC over its ranks and set does not check out)"
                .into(),
        ));
    }
    let (to, rank, theirs, set) = (
        word(h, rest),
        word(h, rest + 4),
        word(h, rest + 8),
        word(h, rest + 12),
    );
    if rank as usize >= size {
        return Err(Refusal::Member(format!(
            "rank {rank} is outside a job of {size}"
        )));
    }
    // A stranger's refusal: a handshake recorded on its way to another rank and sent here must not end
    // the job. The rank that sent it, if it did, is told why and fails.
    if to != me.0 {
        return Err(Refusal::Stranger(format!(
            "rank {rank} meant to reach rank {to} and reached {me}: the ranks were told different addresses for one rank"
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
    use std::io::Write;
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
        // Whatever answered wrote it, unchecked: no control characters reach the rank's terminal.
        Ok(()) => String::from_utf8_lossy(&reason)
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect(),
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
