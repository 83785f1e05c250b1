//! Jobs whose ranks are threads of one process, over the in-process transport: the same service loops,
//! channels, tuple space and task farm as multi-process jobs, started in milliseconds. For tests of code
//! built on the runtime; a real job runs its ranks as processes (`dsmrun`, `mpirun`).

use crate::Runtime;
use dsm::transport::local::local_cluster;
use dsm::{Dsm, Rank};
use std::io::Write;
use std::sync::Arc;

/// Runs `body` on every rank of an in-process job of `ranks` ranks with `channels` channels each, then
/// leaves the job on every rank, and returns when all have. A rank whose body panics would leave the others
/// waiting for ever at their next collective operation, so the panic's message goes to the process's own
/// standard error (a test harness capturing output would lose it) and the process exits with status 101.
pub fn run_local_job<F>(ranks: usize, channels: usize, body: F)
where
    F: Fn(&Runtime) + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let transports = match local_cluster(ranks, channels) {
        Ok(t) => t,
        Err(e) => fail(&format!("making an in-process job of {ranks} ranks: {e}")),
    };
    let threads: Vec<_> = transports
        .into_iter()
        .enumerate()
        .map(|(r, t)| {
            let body = body.clone();
            std::thread::spawn(move || {
                let dsm = Dsm::builder()
                    .rank(Rank(r as u32), ranks)
                    .channels(channels)
                    .transport(Box::new(t))
                    .build()
                    .unwrap_or_else(|e| fail(&format!("rank {r}: joining: {e}")));
                let rt = Runtime::from_dsm(dsm);
                let run = std::panic::AssertUnwindSafe(|| body(&rt));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    fail(&format!("rank {r} panicked: {why}"));
                }
                if let Err(e) = rt.finish() {
                    fail(&format!("rank {r}: leaving the job: {e}"));
                }
            })
        })
        .collect();
    for t in threads {
        if t.join().is_err() {
            fail("a rank's thread panicked");
        }
    }
}

fn fail(why: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "in-process job: {why}");
    std::process::exit(101)
}
