//! The SIGBUS entry point. With `UFFD_FEATURE_SIGBUS` the kernel delivers missing and write-protect faults
//! on registered memory as SIGBUS to the faulting thread; the thread resolves its own fault (one wake-up
//! fewer each way than a handler thread). A SIGBUS whose address is not in a region of ours goes on to the
//! handler installed before ours, or to the default action.
//!
//! Everything reached from `on_sigbus` must be async-signal-safe: no allocation, no lock that the interrupted
//! code could hold. SIGBUS here is synchronous (raised by the faulting instruction: only access faults,
//! `BUS_ADRERR`, are taken as ours), and the crate never touches registered memory while it holds a lock,
//! so the locks the resolver takes are never held by the interrupted frame. Other signals stay deliverable
//! while a fault is resolved (a rank waiting for a peer can still be interrupted or terminated), so a
//! program's own signal handlers must not touch shared regions.

// The handler tells reads from writes by the x86-64 page-fault error code (`REG_ERR`); another
// architecture needs its own way (aarch64 keeps it in the ESR record of the signal frame).
#[cfg(not(target_arch = "x86_64"))]
compile_error!("dsm's SIGBUS handler reads the x86-64 page-fault error code: other architectures are not supported yet");

use crate::error::{DsmError, Result};
use nix::errno::Errno;
use std::sync::OnceLock;

/// Resolves a fault at `addr` (`write`: the access was a store). Returns false when the address is not ours.
pub(crate) type Resolver = fn(addr: usize, write: bool) -> bool;

static RESOLVER: OnceLock<Resolver> = OnceLock::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// How installing the handler went: tried once per process, and every later call says the same (a
/// failure is not taken for a handler in place).
static INSTALLED: OnceLock<std::result::Result<(), Errno>> = OnceLock::new();

/// Installs the SIGBUS handler once per process; later calls return how that went.
pub(crate) fn install(resolver: Resolver) -> Result<()> {
    INSTALLED
        .get_or_init(|| install_once(resolver))
        .map_err(|errno| DsmError::sys("sigaction(SIGBUS)", errno))
}

fn install_once(resolver: Resolver) -> std::result::Result<(), Errno> {
    // SAFETY: a zeroed sigaction is valid storage for the current action.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `previous`, a valid sigaction struct.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
        return Err(Errno::last());
    }
    // Both in place before the handler can run: it resolves through the one and passes on to the other.
    let _ = PREVIOUS.set(previous);
    let _ = RESOLVER.set(resolver);
    // SAFETY: a zeroed sigaction is a valid "no handler" value; we fill the fields sigaction(2) reads.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    // No SA_ONSTACK: the resolver needs more stack than a small alternate signal stack offers, and a fault
    // on registered memory is never a stack overflow, so the thread's own stack is the right one.
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `action.sa_mask` is a valid sigset_t to initialize.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is a valid sigaction struct; `on_sigbus` has the SA_SIGINFO signature. The old
    // action was read above.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        return Err(Errno::last());
    }
    Ok(())
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The resolver makes system calls; the interrupted code must find errno as it left it.
    // SAFETY: __errno_location returns the calling thread's errno slot, valid for the thread's lifetime.
    let errno = unsafe { *libc::__errno_location() };
    handle(sig, info, ctx);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn handle(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // Only an access fault (which is how userfaultfd reports ours) names an address to resolve. A SIGBUS
    // sent by kill(2) or tgkill(2), or a hardware memory error, is not a page of ours even if its fields
    // happen to look like one's address: it goes on as if dsm were not here.
    if code != libc::BUS_ADRERR {
        chain(sig, info, ctx);
        return;
    }
    // SAFETY: as above; si_addr is valid for a SIGBUS with an access-fault code.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: for an SA_SIGINFO handler on x86-64 Linux, `ctx` points to the interrupted ucontext_t. Bit 1 of
    // the page-fault error code (REG_ERR) is set for a write access.
    let write =
        unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_ERR as usize] }
            & 2
            != 0;
    if let Some(resolve) = RESOLVER.get() {
        if resolve(addr, write) {
            return;
        }
    }
    chain(sig, info, ctx);
}

/// Passes a SIGBUS that is not ours to the previous handler (a sent one that was ignored stays ignored), or
/// restores the default action so that returning re-raises it on the faulting instruction. A signal that was
/// sent (`si_code <= 0`) does not come back by itself: if the default action is in place afterwards (restored here, or by a previous handler
/// that expected a fault to come back, as Rust's stack-overflow handler does), it is raised again, to be
/// delivered when this handler returns.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // A sent SIGBUS that the program ignored before dsm took the signal stays ignored. (A fault cannot be
    // ignored: the kernel would force it on the program anyway, so it goes to the default action below.)
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let sent = unsafe { (*info).si_code } <= 0;
    if sent
        && PREVIOUS
            .get()
            .is_some_and(|p| p.sa_sigaction == libc::SIG_IGN)
    {
        return;
    }
    let previous = PREVIOUS
        .get()
        .filter(|p| p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN);
    match previous {
        Some(prev) if prev.sa_flags & libc::SA_SIGINFO != 0 => {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig, info, ctx);
        }
        Some(prev) => {
            // SAFETY: a handler installed without SA_SIGINFO takes the signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
            f(sig);
        }
        // SAFETY: resetting SIGBUS to its default disposition with a zeroed (empty-mask) sigaction.
        None => unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        },
    }
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    if unsafe { (*info).si_code } > 0 {
        return;
    }
    // SAFETY: a zeroed sigaction is valid storage for the current action, read with a null new one.
    let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reading the disposition of SIGBUS into valid storage; raise(3) is async-signal-safe.
    unsafe {
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut now) == 0
            && now.sa_sigaction == libc::SIG_DFL
        {
            libc::raise(sig);
        }
    }
}

/// Writes `msg` to stderr and ends the process: the way out of a fault that cannot be resolved (the memory
/// access cannot return an error). Async-signal-safe.
pub(crate) fn fatal(msg: &[u8]) -> ! {
    // SAFETY: write(2) of a valid buffer to fd 2 and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(crate::EXIT_INTERNAL)
    }
}
