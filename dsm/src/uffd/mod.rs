//! Fault handling on userfaultfd: the descriptor, registration of regions, and the raw operations that
//! resolve a fault (`UFFDIO_COPY` with or without write-protect, `UFFDIO_WRITEPROTECT`, `MADV_DONTNEED`).
//!
//! The operations here are plain system calls on pre-checked arguments: no allocation and no lock, so the
//! SIGBUS handler (`signal`) may call them. This folder and `region` are the only places with `unsafe` that
//! touches memory or the kernel; callers uphold one rule stated on each function: the address range is page
//! aligned and inside a registered region.

pub(crate) mod futex;
pub(crate) mod signal;

use crate::error::{DsmError, Result};
use nix::errno::Errno;
use std::os::fd::{AsRawFd, RawFd};
use userfaultfd::{FeatureFlags, RegisterMode, UffdBuilder};
use userfaultfd_sys as sys;

/// A userfaultfd in SIGBUS mode: faults are delivered as SIGBUS to the faulting thread, which resolves them
/// itself through the operations below.
#[derive(Debug)]
pub(crate) struct Uffd {
    inner: userfaultfd::Uffd,
}

impl Uffd {
    /// Opens a userfaultfd with `UFFD_FEATURE_SIGBUS`, failing with a message that says what to do.
    pub(crate) fn open() -> Result<Uffd> {
        match Self::open_with_builder() {
            // The crate prefers /dev/userfaultfd and does not fall back to the system call when the device
            // is there but not accessible; the system call in user-mode-only mode is what unprivileged
            // processes may use, so try it.
            Err(DsmError::Sys { call, .. }) if call.contains("/dev/userfaultfd") => {
                Self::open_by_syscall()
            }
            other => other,
        }
    }

    fn open_by_syscall() -> Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY as i32;
        // SAFETY: userfaultfd(2) takes only a flags argument and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(match Errno::last() {
                e @ (Errno::EPERM | Errno::EACCES) => DsmError::UffdNotPermitted(e),
                Errno::ENOSYS => DsmError::UffdUnsupported {
                    what: "the userfaultfd system call",
                },
                e => DsmError::sys("userfaultfd(2)", e),
            });
        }
        // SAFETY: `fd` is a fresh descriptor returned above and owned by nobody else; the Uffd takes it.
        let inner =
            unsafe { <userfaultfd::Uffd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) };
        let mut api = sys::uffdio_api {
            api: sys::UFFD_API,
            features: sys::UFFD_FEATURE_SIGBUS,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API on the descriptor just opened, with a valid uffdio_api that lives across the call.
        let rc = unsafe { libc::ioctl(inner.as_raw_fd(), sys::UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(DsmError::UffdUnsupported {
                what: "UFFD_FEATURE_SIGBUS",
            });
        }
        Ok(Uffd { inner })
    }

    fn open_with_builder() -> Result<Uffd> {
        let inner = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(true)
            .require_features(FeatureFlags::SIGBUS)
            .create()
            .map_err(|e| match e {
                userfaultfd::Error::SystemError(errno) => match Errno::from_raw(errno as i32) {
                    Errno::EPERM | Errno::EACCES => {
                        DsmError::UffdNotPermitted(Errno::from_raw(errno as i32))
                    }
                    // The API handshake refuses features the kernel lacks with EINVAL.
                    Errno::EINVAL => DsmError::UffdUnsupported {
                        what: "UFFD_FEATURE_SIGBUS",
                    },
                    other => DsmError::sys("userfaultfd(2)", other),
                },
                userfaultfd::Error::OpenDevUserfaultfd(e) => DsmError::sys(
                    format!("opening /dev/userfaultfd ({e})"),
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                ),
                other => DsmError::sys(format!("userfaultfd(2): {other}"), Errno::EINVAL),
            })?;
        Ok(Uffd { inner })
    }

    /// Registers `[addr, addr + len)` for missing and write-protect faults.
    pub(crate) fn register(&self, addr: usize, len: usize) -> Result<()> {
        let ioctls = self
            .inner
            .register_with_mode(
                addr as *mut libc::c_void,
                len,
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            )
            .map_err(|e| match e {
                userfaultfd::Error::SystemError(errno) if errno as i32 == libc::EINVAL => {
                    DsmError::UffdUnsupported {
                        what: "write-protect registration of anonymous memory",
                    }
                }
                userfaultfd::Error::SystemError(errno) => DsmError::sys(
                    format!("UFFDIO_REGISTER of {addr:#x}+{len:#x}"),
                    Errno::from_raw(errno as i32),
                ),
                other => DsmError::sys(format!("UFFDIO_REGISTER: {other}"), Errno::EINVAL),
            })?;
        if !ioctls.contains(userfaultfd::IoctlFlags::WRITE_PROTECT) {
            return Err(DsmError::UffdUnsupported {
                what: "UFFDIO_WRITEPROTECT",
            });
        }
        Ok(())
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// Installs `len` bytes from `src` at `dst`, read-only when `write_protect`. Pages that are already present
/// (`EEXIST`: a concurrent install won) are skipped; `EAGAIN` (the mapping changed meanwhile) is retried.
///
/// `fd` may be another process's userfaultfd (a direct install, `direct.rs`): the pages then go into that
/// process, while `src` is always read from this one.
///
/// # Safety
/// `dst..dst+len` is page aligned and inside a range registered on `fd`; `src` is readable for `len` bytes
/// without faulting (an ordinary buffer, or pages of a region present here) and is not written meanwhile.
pub(crate) unsafe fn copy(
    fd: RawFd,
    dst: usize,
    src: *const u8,
    len: usize,
    write_protect: bool,
) -> Result<(), Errno> {
    let page = crate::types::PAGE_SIZE;
    let mut done = 0usize;
    while done < len {
        let mut arg = sys::uffdio_copy {
            dst: (dst + done) as u64,
            src: src as u64 + done as u64,
            len: (len - done) as u64,
            mode: if write_protect {
                sys::UFFDIO_COPY_MODE_WP
            } else {
                0
            },
            copy: 0,
        };
        // SAFETY: the caller guarantees that the destination is registered on `fd` and the source readable;
        // `arg` is a valid uffdio_copy that lives across the call.
        let rc = unsafe { libc::ioctl(fd, sys::UFFDIO_COPY as _, &mut arg) };
        if rc == 0 {
            return Ok(());
        }
        let errno = Errno::last();
        if arg.copy > 0 {
            done += arg.copy as usize;
            continue;
        }
        match errno {
            Errno::EEXIST => done += page,
            Errno::EAGAIN | Errno::EINTR => continue,
            e => return Err(e),
        }
    }
    Ok(())
}

/// Sets (`protect`) or clears write protection on `[addr, addr + len)`.
pub(crate) fn write_protect(
    fd: RawFd,
    addr: usize,
    len: usize,
    protect: bool,
) -> Result<(), Errno> {
    let mut arg = sys::uffdio_writeprotect {
        range: sys::uffdio_range {
            start: addr as u64,
            len: len as u64,
        },
        mode: if protect {
            sys::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    loop {
        // SAFETY: UFFDIO_WRITEPROTECT only changes page protection bits of a registered range; it neither
        // reads nor writes memory through `addr`, and `arg` is valid across the call.
        let rc = unsafe { libc::ioctl(fd, sys::UFFDIO_WRITEPROTECT as _, &mut arg) };
        if rc == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Drops the pages of `[addr, addr + len)`: the next access faults as missing.
pub(crate) fn discard(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: MADV_DONTNEED on a private anonymous range that this crate mapped; the content is either no
    // longer needed or was read out by the caller. No Rust reference into the range is held by this crate.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    Errno::result(rc).map(drop)
}

/// Unlocks the pages of `[addr, addr + len)` (`munlock`), which a program's `mlock` or `mlockall` may have
/// locked: the kernel will not drop locked pages (`discard` fails with `EINVAL`), and a shared region's
/// copies must be droppable.
pub(crate) fn unlock(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: munlock only clears the lock of the range's mappings (this crate's); no page or content
    // changes.
    let rc = unsafe { libc::munlock(addr as *const libc::c_void, len) };
    Errno::result(rc).map(drop)
}

/// Keeps the pages of `[addr, addr + len)` out of child processes (`MADV_DONTFORK`): a child forked by a
/// rank has no userfaultfd watching them, so it would read its parent's copies as they were and zeros for
/// the rest. Without the range, touching it there is a segmentation fault.
pub(crate) fn keep_from_children(addr: usize, len: usize) -> Result<(), Errno> {
    // SAFETY: MADV_DONTFORK changes only whether fork copies the range (this crate's mapping) into a child;
    // nothing in this process changes.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTFORK) };
    Errno::result(rc).map(drop)
}

/// The most untouched pages a first touch fills with zeros at once, and the most a home hands a first
/// writer at once (see `fault::claim_zero_fill` and write-ahead in `fault::remote_transaction`).
pub(crate) const ZERO_FILL_MAX: u64 = 64;

/// Zeros for installing untouched pages: up to [`ZERO_FILL_MAX`] at once. An immutable static, it is part
/// of the binary's read-only data (256 KiB), read from the page cache. It cannot be allocated when first
/// needed: in SIGBUS mode the fault path runs in a signal handler, where nothing may allocate.
pub(crate) static ZERO_PAGES: [u8; ZERO_FILL_MAX as usize * crate::types::PAGE_SIZE] =
    [0; ZERO_FILL_MAX as usize * crate::types::PAGE_SIZE];

/// One page of zeros.
pub(crate) static ZERO_PAGE: [u8; crate::types::PAGE_SIZE] = [0; crate::types::PAGE_SIZE];
