//! Direct install on one host: the rank that sends pages installs them straight into the requester's
//! memory with the requester's own userfaultfd, instead of sending their bytes for the requester to read
//! from the socket and copy in.
//!
//! `UFFDIO_COPY` reads its source from the calling process and writes into the address space that
//! registered the descriptor, so a process holding another one's userfaultfd installs pages there with one
//! copy (CRIU's lazy restore works the same way). Regions sit at the same address in every rank, so a page
//! goes from its address here to the same address there. A rank introduces itself to every other rank when
//! it first maps the arena (`Request::Introduce`: its pid, the number of its userfaultfd descriptor, and the
//! host and PID namespace it runs in). A service loop on the same host takes the descriptor with
//! `pidfd_getfd`, which needs the permission ptrace needs (the same user, or root; Yama's `ptrace_scope`
//! 1 refuses it between sibling processes of an ordinary user), and checks that it is a userfaultfd. From
//! then on the service loop answers a request that allows it (`direct`) with `Reply::Installed` after
//! copying the pages itself; if that fails it sends the bytes as before. Why this is the default on one
//! host, measured: docs/ARCHITECTURE.md, "Direct install on one host".
//!
//! The kernel allocates an installed page on behalf of the process that copies it: on a machine with
//! several memory nodes the page follows the sender's memory policy (`DsmBuilder::direct_install`).

use crate::installer;
use crate::region::RegionShared;
use crate::types::PAGE_SIZE;
use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Which machine and PID namespace a process runs in: two ranks with equal hosts can name each other by pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Host {
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): different on every machine and every boot.
    pub(crate) boot: [u8; 16],
    /// The inode of `/proc/self/ns/pid`.
    pub(crate) pid_ns: u64,
}

impl Host {
    /// This process's host, or `None` when `/proc` does not tell (then no rank installs into this one).
    pub(crate) fn this() -> Option<Host> {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let boot = parse_boot_id(&text)?;
        let pid_ns = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
        Some(Host { boot, pid_ns })
    }
}

/// The 16 bytes of a boot id written as a UUID (`8-4-4-4-12` hex digits).
fn parse_boot_id(text: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = text
        .trim()
        .bytes()
        .filter(|b| *b != b'-')
        .map(|b| (b as char).to_digit(16).map(|d| d as u8))
        .collect::<Option<_>>()?;
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(digits.chunks(2)) {
        *o = pair[0] << 4 | pair[1];
    }
    Some(out)
}

/// Takes the userfaultfd of the peer that introduced itself as process `pid` with descriptor `uffd` on
/// `theirs`, when it runs on `mine`. `alive` tells whether the peer is still there (its connection open):
/// asked once the pid is pinned, so that a pid the peer left behind, reused by another process, is never
/// taken for the peer's. The error says why not, for the log.
pub(crate) fn take_peer_uffd(
    mine: Option<&Host>,
    theirs: &Host,
    pid: u32,
    uffd: i32,
    alive: impl FnOnce() -> bool,
) -> Result<OwnedFd, String> {
    match mine {
        None => return Err("this rank cannot tell which host it runs on".into()),
        Some(m) if m != theirs => return Err("it runs on another host".into()),
        Some(_) => {}
    }
    if pid == std::process::id() || pid == 0 || uffd < 0 {
        return Err(format!("it names process {pid}, descriptor {uffd}"));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(format!("pidfd_open({pid}): {}", Errno::last()));
    }
    // SAFETY: the descriptor was just returned by pidfd_open and nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // The pidfd names one process for good: if the peer is alive now, it is that process (a peer that
    // dies from here on makes pidfd_getfd fail).
    if !alive() {
        return Err(format!("it left before process {pid} could be looked at"));
    }
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process and flags, and returns a new
    // descriptor of this process (close-on-exec) or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), uffd, 0) };
    if fd < 0 {
        return Err(format!(
            "pidfd_getfd(process {pid}, descriptor {uffd}): {}",
            Errno::last()
        ));
    }
    // SAFETY: the descriptor was just returned by pidfd_getfd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The descriptor number the peer gave must be its userfaultfd.
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("reading what descriptor {uffd} of process {pid} is: {e}"))?;
    if kind.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(format!(
            "descriptor {uffd} of process {pid} is {}, not a userfaultfd",
            kind.display()
        ));
    }
    Ok(fd)
}

/// Installs pages into the peer whose userfaultfd is `peer`: page `pages[i]` of `region` gets the first
/// page of `sources[i]`, read-only unless `writable`. Pages that follow each other, with sources that
/// follow each other in memory, go in one copy. A long run of pages (evenly spaced, from one block of
/// memory) is shared with this rank's install helper when it is free (`installer.rs`): the copies of
/// different pages run on two cores at once.
///
/// Every source must be readable without faulting (a page present here, as for sending it, or a buffer)
/// and must not be written until this returns.
pub(crate) fn install(
    peer: BorrowedFd<'_>,
    region: &RegionShared,
    pages: &[u64],
    sources: &[&[u8]],
    writable: bool,
) -> Result<(), Errno> {
    assert_eq!(pages.len(), sources.len());
    if let Some((stride, source_step)) = one_block(pages, sources) {
        if pages.len() as u64 >= installer::HELP_MIN_PAGES {
            let incoming = installer::Incoming {
                region,
                source: sources[0].as_ptr(),
                source_step,
                first: pages[0],
                steps: crate::region::Steps::strided(stride),
                pages: pages.len() as u64,
                writable,
                target: Some(peer.as_raw_fd()),
            };
            return installer::install_all(&region.shared.installer, &incoming);
        }
    }
    let mut i = 0;
    while i < pages.len() {
        let mut n = 1;
        while i + n < pages.len()
            && pages[i + n] == pages[i] + n as u64
            && sources[i + n].as_ptr() == sources[i].as_ptr().wrapping_add(n * PAGE_SIZE)
        {
            n += 1;
        }
        assert!(sources[i..i + n].iter().all(|s| s.len() >= PAGE_SIZE));
        // SAFETY: the source is `n` pages of this process's memory: adjacent slices of at least a page each
        // (checked above), readable without faulting and not written meanwhile (this function's contract).
        unsafe {
            region.install_through(
                peer.as_raw_fd(),
                pages[i],
                n as u64,
                sources[i].as_ptr(),
                writable,
            )?
        };
        i += n;
    }
    Ok(())
}

/// The spacing of `pages`, and that of their sources in bytes, when both are even, the sources at least a
/// page apart (what the install helper's board describes: a buffer of consecutive pages, or the pages of
/// a cyclic region where they are); `None` otherwise.
fn one_block(pages: &[u64], sources: &[&[u8]]) -> Option<(u64, usize)> {
    let (stride, step) = match (pages, sources) {
        ([], _) => return None,
        ([_], _) => (1, PAGE_SIZE),
        ([a, b, ..], [x, y, ..]) => (
            b.checked_sub(*a).filter(|s| *s > 0)?,
            (y.as_ptr() as usize)
                .checked_sub(x.as_ptr() as usize)
                .filter(|s| *s >= PAGE_SIZE)?,
        ),
        _ => return None,
    };
    let base = sources[0].as_ptr();
    let even = pages.iter().enumerate().all(|(i, p)| {
        *p == pages[0] + i as u64 * stride
            && sources[i].as_ptr() == base.wrapping_add(i * step)
            && sources[i].len() >= PAGE_SIZE
    });
    even.then_some((stride, step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_block_needs_evenly_spaced_pages_from_consecutive_memory() {
        let buf = vec![0u8; 4 * PAGE_SIZE];
        let pages: Vec<&[u8]> = buf.chunks(PAGE_SIZE).collect();
        assert_eq!(one_block(&[5, 6, 7, 8], &pages), Some((1, PAGE_SIZE)));
        assert_eq!(one_block(&[1, 4, 7, 10], &pages), Some((3, PAGE_SIZE)));
        assert_eq!(one_block(&[5, 6, 8, 9], &pages), None);
        assert_eq!(one_block(&[6, 5, 4, 3], &pages), None);
        let shuffled = [pages[0], pages[1], pages[3], pages[2]];
        assert_eq!(one_block(&[5, 6, 7, 8], &shuffled), None);
        assert_eq!(one_block(&[9], &pages[..1]), Some((1, PAGE_SIZE)));
        assert_eq!(one_block(&[], &[]), None);
        // The pages of a cyclic region where they are: every other page of the memory.
        let wide = vec![0u8; 8 * PAGE_SIZE];
        let every_other: Vec<&[u8]> = wide.chunks(PAGE_SIZE).step_by(2).collect();
        assert_eq!(
            one_block(&[1, 3, 5, 7], &every_other),
            Some((2, 2 * PAGE_SIZE))
        );
        let overlapping = [&wide[..PAGE_SIZE], &wide[8..PAGE_SIZE + 8]];
        assert_eq!(one_block(&[1, 2], &overlapping), None);
    }

    #[test]
    fn boot_ids_parse_as_uuids_and_nothing_else_does() {
        let id = parse_boot_id("0123abcd-4567-89ef-0123-456789abcdef\n").unwrap();
        assert_eq!(id[0], 0x01);
        assert_eq!(id[3], 0xcd);
        assert_eq!(id[15], 0xef);
        assert_eq!(parse_boot_id("0123abcd-4567-89ef-0123-456789abcde"), None);
        assert_eq!(parse_boot_id("0123abcd-4567-89ef-0123-456789abcdeg"), None);
        assert_eq!(parse_boot_id(""), None);
    }

    #[test]
    fn this_host_is_the_same_twice_and_differs_from_a_changed_one() {
        let a = Host::this().expect("/proc tells the boot id and PID namespace");
        assert_eq!(Host::this(), Some(a));
        let mut other = a;
        other.boot[0] ^= 1;
        assert_ne!(a, other);
    }

    #[test]
    fn a_peer_on_another_host_or_naming_this_process_is_refused() {
        let mine = Host::this().unwrap();
        let mut theirs = mine;
        theirs.pid_ns ^= 1;
        let e = take_peer_uffd(Some(&mine), &theirs, 1, 3, || true).unwrap_err();
        assert!(e.contains("another host"), "{e}");
        let e = take_peer_uffd(None, &mine, 1, 3, || true).unwrap_err();
        assert!(e.contains("cannot tell"), "{e}");
        let e = take_peer_uffd(Some(&mine), &mine, std::process::id(), 3, || true).unwrap_err();
        assert!(e.contains("names process"), "{e}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_userfaultfd_is_refused() {
        // A child process whose descriptor 0 is /dev/null: taken, looked at and refused.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mine = Host::this().unwrap();
        let result = take_peer_uffd(Some(&mine), &mine, child.id(), 0, || true);
        // A peer whose connection closed is not looked at, whatever its pid names now.
        let gone = take_peer_uffd(Some(&mine), &mine, child.id(), 0, || false);
        let _ = child.kill();
        let _ = child.wait();
        let e = result.unwrap_err();
        assert!(e.contains("not a userfaultfd"), "{e}");
        let e = gone.unwrap_err();
        assert!(e.contains("left before"), "{e}");
    }
}
