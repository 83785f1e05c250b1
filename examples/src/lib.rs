//! What the example programs share.

/// Ends an example program whose body returned `result`: on an error, prints it as `program: what went
/// wrong: why` (the error and its causes on one line) and exits with status 1. Returned from `main`, an
/// error was printed with a stack backtrace whenever `RUST_BACKTRACE` was set, which says nothing to
/// someone who gave a wrong path.
///
/// The line goes out in one write: `eprintln!` writes it a piece at a time, and a rank ended by the
/// launcher (a SIGTERM as another rank's failure ends the job) could leave only its start.
pub fn exit_on_error(program: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        use std::io::Write;
        let line = format!("{program}: {e:#}\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        std::process::exit(1);
    }
}
