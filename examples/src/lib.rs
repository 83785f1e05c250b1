//! What the example programs share.

/// Ends an example program whose body returned `result`: on an error, prints it as `program: what went
/// wrong: why` (the error and its causes on one line) and exits with status 1. Returned from `main`, an
/// error was printed with a stack backtrace whenever `RUST_BACKTRACE` was set, which says nothing to
/// someone who gave a wrong path.
///
/// The line goes out in one write: `eprintln!` writes it a piece at a time, and a rank ended by the
/// launcher (a SIGTERM as another rank's failure ends the job) could leave only its start.
///
/// An error that is a closed standard output ([`outln!`] to a reader that went away: `wordcount | head`)
/// ends the program quietly with status 141, as the default action of SIGPIPE (which Rust programs
/// ignore) would have: the reader took what it wanted.
pub fn exit_on_error(program: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        use std::io::Write;
        if e.chain().any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(128 + 13);
        }
        let line = format!("{program}: {e:#}\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        std::process::exit(1);
    }
}

/// Writes a line to standard output in one write, as `println!` does, but returns a failure (a reader that
/// went away, a full disk) as an error instead of panicking: `outln!("{x}")?`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let line = ::std::format!("{}\n", ::std::format_args!($($arg)*));
        let mut out = ::std::io::stdout().lock();
        out.write_all(line.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| ::anyhow::Error::new(e).context("writing to standard output"))
    }};
}

/// Fails, saying what to change (`fix`), when `what` needs more than the `bytes` of memory this machine has
/// available now (`MemAvailable` in `/proc/meminfo`; nothing is checked where it cannot be read): a clear
/// error up front instead of an allocation that aborts, or the out-of-memory killer, midway.
pub fn ensure_memory(what: &str, bytes: u128, fix: &str) -> anyhow::Result<()> {
    let Some(available) = available_memory() else {
        return Ok(());
    };
    let gib = |b: u128| b as f64 / f64::from(1u32 << 30);
    anyhow::ensure!(
        bytes <= available,
        "{what} needs {:.1} GiB of memory, and this machine has {:.1} GiB available: {fix}",
        gib(bytes),
        gib(available)
    );
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u128>()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_memory_than_the_machine_has_is_refused_saying_what_to_change() {
        let available = available_memory().expect("/proc/meminfo has MemAvailable");
        assert!(available > 0);
        ensure_memory("a small job", 1 << 20, "give less").unwrap();
        let e = ensure_memory("a huge job", available * 2, "give a smaller --n").unwrap_err();
        let e = e.to_string();
        assert!(
            e.starts_with("a huge job needs") && e.ends_with("give a smaller --n"),
            "{e}"
        );
    }
}
