//! What write-protecting a page costs this machine, beside a plain system call measured in the same run.
//!
//! Under sequential consistency a home that holds a page writable write-protects it before it sends a
//! copy to a reader (`UFFDIO_WRITEPROTECT`), and lifts the protection when it takes the page back. Changing
//! a page's protection flushes it from the TLB of every CPU that may hold it: of every CPU running a
//! thread of the process. When another thread of the home runs at that moment (its computing thread, its
//! transport's thread), the flush is an inter-processor interrupt, which on a virtual machine is a VM exit
//! on both sides. This program times the ioctl on one page:
//! - with no other thread of the process running,
//! - with another thread of the process asleep (woken every millisecond),
//! - with another thread of the process computing (spinning on a counter),
//!
//! and, with a thread computing, a run of 64 pages in one ioctl (one flush for the run).
//!
//! Run: `target/release/protect-cost [--pages N] [--json]` (needs the right to use userfaultfd: root, or
//! `vm.unprivileged_userfaultfd = 1`).

use clap::Parser;
use dsm_benches::{quantile, report, Measurement};
use std::ffi::c_void;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder};

#[derive(Debug, Parser)]
struct Args {
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
    /// Pages timed in each case (each page once).
    #[arg(long, default_value_t = 4000, value_parser = dsm_benches::at_least_one::<usize>)]
    pages: usize,
}

const PAGE: usize = 4096;
/// Pages protected at once in the last case.
const RUN: usize = 64;

/// Anonymous private memory, unmapped on drop.
struct Mapping {
    at: NonNull<c_void>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> anyhow::Result<Mapping> {
        let size = NonZeroUsize::new(len).ok_or_else(|| anyhow::anyhow!("an empty mapping"))?;
        // SAFETY: a fresh anonymous mapping chosen by the kernel overlaps nothing of this process.
        let at = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(Mapping { at, len })
    }

    fn page(&self, i: usize) -> *mut c_void {
        self.at.as_ptr().wrapping_byte_add(i * PAGE)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Mapping::new` with this length, and nothing refers to it any
        // more (the userfaultfd registration ends with the mapping).
        let _ = unsafe { nix::sys::mman::munmap(self.at, self.len) };
    }
}

/// Another thread of the process while the pages are timed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Neighbour {
    None,
    Asleep,
    Computing,
}

/// Runs `f` with `neighbour` beside it.
fn beside<T>(neighbour: Neighbour, f: impl FnOnce() -> T) -> T {
    if neighbour == Neighbour::None {
        return f();
    }
    let stop = AtomicBool::new(false);
    let count = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match neighbour {
                    Neighbour::Asleep => std::thread::sleep(Duration::from_millis(1)),
                    _ => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        // Let the thread start, and a computing one spread to the other CPU.
        std::thread::sleep(Duration::from_millis(20));
        let out = f();
        stop.store(true, Ordering::Relaxed);
        out
    })
}

/// Times protecting pages `0..n`, then lifting the protection, each page on its own: the medians in us.
fn one_page_each(uffd: &Uffd, m: &Mapping, n: usize) -> anyhow::Result<(f64, f64)> {
    let (mut on, mut off) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t = Instant::now();
        uffd.write_protect(m.page(i), PAGE)?;
        on.push(t.elapsed().as_secs_f64() * 1e6);
    }
    for i in 0..n {
        let t = Instant::now();
        uffd.remove_write_protection(m.page(i), PAGE, false)?;
        off.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((quantile(&mut on, 0.5), quantile(&mut off, 0.5)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.pages >= RUN,
        "--pages must be at least {RUN} (got {})",
        args.pages
    );
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .user_mode_only(true)
        .require_features(FeatureFlags::PAGEFAULT_FLAG_WP)
        .create()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open a userfaultfd with write protection ({e}): run as root, or set \
                 vm.unprivileged_userfaultfd = 1, on Linux 5.7 or later"
            )
        })?;
    let m = Mapping::new(args.pages * PAGE)?;
    // Present and writable before registration: the kernel write-protects only pages that are there.
    // SAFETY: the mapping is `args.pages` pages of this process's memory, readable and writable, and
    // nothing else refers to it.
    unsafe { std::ptr::write_bytes(m.at.as_ptr().cast::<u8>(), 1, args.pages * PAGE) };
    let ioctls = uffd.register_with_mode(
        m.at.as_ptr(),
        args.pages * PAGE,
        RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
    )?;
    anyhow::ensure!(
        ioctls.contains(IoctlFlags::WRITE_PROTECT),
        "this kernel does not write-protect anonymous memory through userfaultfd"
    );

    // The floor: a system call that does nothing (getppid), the same way.
    let mut syscall: Vec<f64> = (0..args.pages)
        .map(|_| {
            let t = Instant::now();
            black_box(std::os::unix::process::parent_id());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let floor = quantile(&mut syscall, 0.5);
    let floor_name = "a system call (getppid)";

    let mut out = vec![Measurement::floor(
        "system call, median",
        floor,
        "us",
        floor_name,
    )];
    for (neighbour, label) in [
        (Neighbour::None, "no other thread running"),
        (Neighbour::Asleep, "another thread asleep"),
        (Neighbour::Computing, "another thread computing"),
    ] {
        let (on, off) = beside(neighbour, || one_page_each(&uffd, &m, args.pages))?;
        out.push(Measurement::new(
            &format!("write-protect one page, {label}, median"),
            on,
            "us",
            floor,
            floor_name,
            "",
        ));
        out.push(Measurement::new(
            &format!("lift write protection of one page, {label}, median"),
            off,
            "us",
            floor,
            floor_name,
            "",
        ));
    }
    let runs = args.pages / RUN;
    let mut run_us = beside(Neighbour::Computing, || -> anyhow::Result<Vec<f64>> {
        let mut us = Vec::with_capacity(runs);
        for r in 0..runs {
            let t = Instant::now();
            uffd.write_protect(m.page(r * RUN), RUN * PAGE)?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
            uffd.remove_write_protection(m.page(r * RUN), RUN * PAGE, false)?;
        }
        Ok(us)
    })?;
    out.push(Measurement::new(
        &format!("write-protect {RUN} pages in one call, another thread computing, per page"),
        quantile(&mut run_us, 0.5) / RUN as f64,
        "us",
        floor,
        floor_name,
        "",
    ));
    uffd.unregister(m.at.as_ptr(), args.pages * PAGE)?;
    report(&out, args.json);
    Ok(())
}
