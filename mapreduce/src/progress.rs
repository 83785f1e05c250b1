//! The progress line rank 0 shows on standard error while a long job runs: maps and reduces done, bytes read
//! and shuffled. Quiet when standard error is not a terminal, and for the first second.

use crate::config::ProgressMode;
use crate::master::Totals;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const QUIET_START: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct Progress {
    enabled: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode, started: Instant) -> Progress {
        Progress {
            enabled: mode == ProgressMode::Auto && std::io::stderr().is_terminal(),
            started,
            last: None,
        }
    }

    /// Shows the totals `totals` gives, when it is time to (they are only computed then).
    pub(crate) fn show(&mut self, totals: impl FnOnce() -> Totals, maps: usize, reduces: usize) {
        let now = Instant::now();
        if !self.enabled
            || now - self.started < QUIET_START
            || self.last.is_some_and(|l| now - l < EVERY)
        {
            return;
        }
        self.last = Some(now);
        let t = totals();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\rmapreduce: maps {}/{maps}  reduces {}/{reduces}  {:.1} MB read  {:.1} MB shuffled  {:.1} s ",
            t.maps_done,
            t.reduces_done,
            t.input_bytes as f64 / 1e6,
            t.shuffled_bytes as f64 / 1e6,
            (now - self.started).as_secs_f64()
        );
        let _ = err.flush();
    }

    pub(crate) fn finish(&mut self) {
        if self.last.take().is_some() {
            eprintln!();
        }
    }
}
