//! The progress line rank 0 shows on standard error while a long job runs: maps and reduces done, bytes read
//! and shuffled. Quiet when standard error is not a terminal, and for the first second. A line shown is
//! ended however the job ends (the line is ended as the `Progress` drops), so that what is printed next,
//! an error say, starts on a line of its own.

use crate::config::ProgressMode;
use crate::master::Totals;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const QUIET_START: Duration = Duration::from_secs(1);
const EVERY: Duration = Duration::from_millis(100);

pub(crate) struct Progress {
    /// Where the line goes: `None` when it is not shown.
    out: Option<Box<dyn Write>>,
    started: Instant,
    last: Option<Instant>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("shown", &self.out.is_some())
            .field("started", &self.started)
            .field("last", &self.last)
            .finish()
    }
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode, started: Instant) -> Progress {
        let shown = mode == ProgressMode::Auto && std::io::stderr().is_terminal();
        let out = shown.then(|| Box::new(std::io::stderr()) as Box<dyn Write>);
        Progress::to(out, started)
    }

    fn to(out: Option<Box<dyn Write>>, started: Instant) -> Progress {
        Progress {
            out,
            started,
            last: None,
        }
    }

    /// Shows the totals `totals` gives, when it is time to (they are only computed then).
    pub(crate) fn show(&mut self, totals: impl FnOnce() -> Totals, maps: usize, reduces: usize) {
        let now = Instant::now();
        let Some(out) = &mut self.out else {
            return;
        };
        if now - self.started < QUIET_START || self.last.is_some_and(|l| now - l < EVERY) {
            return;
        }
        self.last = Some(now);
        let t = totals();
        let _ = write!(
            out,
            "\rmapreduce: maps {}/{maps}  reduces {}/{reduces}  {:.1} MB read  {:.1} MB shuffled  {:.1} s ",
            t.maps_done,
            t.reduces_done,
            t.input_bytes as f64 / 1e6,
            t.shuffled_bytes as f64 / 1e6,
            (now - self.started).as_secs_f64()
        );
        let _ = out.flush();
    }

    /// Ends the line, if one was shown.
    pub(crate) fn finish(&mut self) {
        if let (Some(_), Some(out)) = (self.last.take(), &mut self.out) {
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test reads.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn totals() -> Totals {
        Totals {
            maps_done: 3,
            reduces_done: 1,
            input_bytes: 2_500_000,
            shuffled_bytes: 1_000_000,
            ..Totals::default()
        }
    }

    #[test]
    fn a_line_shown_is_ended_when_the_job_stops_early() {
        let seen = Shared::default();
        let long_ago = Instant::now() - Duration::from_secs(5);
        let mut p = Progress::to(Some(Box::new(seen.clone())), long_ago);
        p.show(totals, 8, 2);
        let line = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
        assert!(
            line.starts_with("\rmapreduce: maps 3/8  reduces 1/2  2.5 MB read  1.0 MB shuffled")
                && !line.ends_with('\n'),
            "{line:?}"
        );
        // A job that fails returns through `?` without `finish`: the drop ends the line, once.
        drop(p);
        let all = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
        assert_eq!(all, format!("{line}\n"));
    }

    #[test]
    fn nothing_is_shown_in_the_first_second_nor_ended() {
        let seen = Shared::default();
        let mut p = Progress::to(Some(Box::new(seen.clone())), Instant::now());
        p.show(totals, 8, 2);
        p.finish();
        drop(p);
        assert!(seen.0.lock().unwrap().is_empty());
    }
}
