//! Jobs whose ranks are threads of one process, over the in-process transport: the same service loops,
//! channels, tuple space and task farm as multi-process jobs, started in milliseconds. For tests of code
//! built on the runtime; a real job runs its ranks as processes (`dsmrun`, `mpirun`).

use crate::Runtime;

/// Runs `body` on every rank of an in-process job of `ranks` ranks with `channels` channels each, each
/// with its own `Runtime`, then leaves the job on every rank, and returns when all have. A rank whose body
/// panics (or that fails to leave the job) ends the process with status 101, saying why on the process's own
/// standard error: see [`dsm::transport::local::run_local_job`].
pub fn run_local_job<F>(ranks: usize, channels: usize, body: F)
where
    F: Fn(&Runtime) + Send + Sync + 'static,
{
    dsm::transport::local::run_local_job(ranks, channels, move |dsm| {
        let rt = Runtime::from_dsm(dsm);
        body(&rt);
        if let Err(e) = rt.finish() {
            panic!("leaving the job: {e}");
        }
    });
}
