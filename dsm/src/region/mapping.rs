//! Anonymous memory for regions and their metadata: the arena reserved at the same address in every rank,
//! fresh `MAP_NORESERVE` mappings that cost nothing until touched, and zero-initialized arrays of page
//! metadata. It maps and unmaps; what the memory holds is for the rest of `region`.

use crate::error::{DsmError, Result};
use crate::types::{GlobalAddr, Rank, PAGE_SIZE};
use crate::uffd;
use nix::errno::Errno;

/// An array of `T` in anonymous `MAP_NORESERVE` memory, zero-initialized by the kernel and backed only
/// where touched. `T` must be valid when all-zero (atomics are).
#[derive(Debug)]
pub(crate) struct ZeroedArray<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the array owns its mapping; `T` is only reachable through `&[T]`, so sharing it is as safe as
// sharing `&[T]`, which needs `T: Sync`.
unsafe impl<T: Sync> Sync for ZeroedArray<T> {}
// SAFETY: the mapping is not tied to a thread.
unsafe impl<T: Send> Send for ZeroedArray<T> {}

/// Maps `len` bytes of fresh private anonymous memory, readable and writable and empty until touched: at
/// `at`, replacing what is there, or where the kernel chooses. In a process that locked its future memory
/// (`mlockall` with `MCL_FUTURE`) an accessible new mapping is locked and filled in at once: a region's
/// pages with zeros before userfaultfd watches them, so that they would never be fetched from their homes,
/// and an array of twins with as many pages as its region. So the mapping is made inaccessible, unlocked
/// (nothing is filled in while it is inaccessible) and only then opened.
///
/// # Safety
/// With `at`, `[at, at + len)` must be memory of this process that nothing uses: it is replaced. Should
/// the call fail after replacing it, the range is left mapped inaccessible and empty.
pub(super) unsafe fn map_empty(at: Option<usize>, len: usize) -> Result<*mut libc::c_void, Errno> {
    let (addr, fixed) = match at {
        Some(a) => (a as *mut libc::c_void, libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    // SAFETY: a private anonymous mapping where the kernel chooses (it aliases nothing), or at `at`, which
    // the caller vouches nothing uses.
    let ptr = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | fixed,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    let opened = uffd::unlock(ptr as usize, len).and_then(|()| {
        // SAFETY: the mapping made just above, which holds nothing yet.
        let rc = unsafe { libc::mprotect(ptr, len, libc::PROT_READ | libc::PROT_WRITE) };
        Errno::result(rc).map(drop)
    });
    match opened {
        Ok(()) => Ok(ptr),
        Err(e) => {
            if at.is_none() {
                // SAFETY: the mapping made above, which nothing has seen.
                unsafe { libc::munmap(ptr, len) };
            }
            Err(e)
        }
    }
}

impl<T> ZeroedArray<T> {
    /// # Safety
    /// The all-zero bit pattern must be a valid `T`.
    pub(super) unsafe fn new(len: usize) -> Result<ZeroedArray<T>> {
        let bytes = (len.max(1) * std::mem::size_of::<T>()).next_multiple_of(PAGE_SIZE);
        // SAFETY: where the kernel chooses: nothing is replaced.
        let ptr = unsafe { map_empty(None, bytes) }
            .map_err(|e| DsmError::sys(format!("mapping {bytes} bytes of page metadata"), e))?;
        Ok(ZeroedArray {
            ptr: ptr.cast(),
            len,
        })
    }

    pub(super) fn as_slice(&self) -> &[T] {
        // SAFETY: `ptr` is a live mapping of at least `len` zero-initialized `T`s (valid per `new`'s contract),
        // page aligned, and only ever accessed through shared references.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> Drop for ZeroedArray<T> {
    fn drop(&mut self) {
        let bytes = (self.len.max(1) * std::mem::size_of::<T>()).next_multiple_of(PAGE_SIZE);
        // SAFETY: unmapping the mapping this value owns; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), bytes) };
    }
}

/// The shared arena: one reservation at the same address in every rank; regions are carved from it in
/// allocation order, so every rank computes the same addresses.
#[derive(Debug)]
pub(crate) struct Arena {
    pub(crate) base: usize,
    pub(crate) size: usize,
    pub(crate) next: usize,
}

impl Arena {
    /// Reserves `size` bytes, at `base` exactly when given (`MAP_FIXED_NOREPLACE`), else where the kernel
    /// chooses. Reserved memory is `PROT_NONE`: a stray access is a plain segmentation fault.
    pub(crate) fn reserve(me: Rank, base: Option<usize>, size: usize) -> Result<Arena> {
        // Address 0 would also be taken for no region at all (the registry's empty slots start at 0).
        if let Some(b) = base.filter(|b| *b == 0 || b % PAGE_SIZE != 0) {
            return Err(DsmError::Config(format!(
                "the arena's base {b:#x} must be a non-zero multiple of the {PAGE_SIZE}-byte page"
            )));
        }
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_NORESERVE
            | if base.is_some() {
                libc::MAP_FIXED_NOREPLACE
            } else {
                0
            };
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; without it the kernel picks a free
        // range. Either way no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                base.unwrap_or(0) as *mut libc::c_void,
                size,
                libc::PROT_NONE,
                flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED || base.is_some_and(|b| ptr as usize != b) {
            let errno = Errno::last();
            return Err(match base {
                Some(b) => DsmError::ArenaUnavailable {
                    rank: me,
                    addr: GlobalAddr(b),
                    size,
                    errno,
                },
                None => DsmError::ArenaTooLarge {
                    rank: me,
                    size,
                    errno,
                },
            });
        }
        Ok(Arena {
            base: ptr as usize,
            size,
            next: 0,
        })
    }

    /// Takes the next `len` bytes (a multiple of the page size).
    pub(crate) fn carve(&mut self, len: usize) -> Result<usize> {
        if len > self.size - self.next {
            return Err(DsmError::ArenaExhausted {
                requested: len,
                available: self.size - self.next,
                size: self.size,
            });
        }
        let addr = self.base + self.next;
        self.next += len;
        Ok(addr)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the arena's regions are gone (they borrow the Dsm that owns the arena); unmapping the
        // reservation affects no live memory.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_reservation_succeeds_and_carving_checks_space() {
        // Address space only, more of it than the machine has memory.
        let mut arena = Arena::reserve(Rank(0), None, 64 << 30).unwrap();
        let a = arena.carve(4 << 30).unwrap();
        assert_eq!(a, arena.base);
        let err = arena.carve(61 << 30).unwrap_err();
        assert!(matches!(err, DsmError::ArenaExhausted { .. }), "{err}");
        // Another reservation over the same range must be refused, with the address in the message.
        let err = Arena::reserve(Rank(1), Some(arena.base), 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains(&format!("{:#x}", arena.base)),
            "{err}"
        );
    }
}
