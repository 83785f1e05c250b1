//! What the example programs share.

/// Ends an example program whose body returned `result`: on an error, prints it as `program: what went
/// wrong: why` (the error and its causes on one line) and exits with status 1. Returned from `main`, an
/// error was printed with a stack backtrace whenever `RUST_BACKTRACE` was set, which says nothing to
/// someone who gave a wrong path.
pub fn exit_on_error(program: &str, result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("{program}: {e:#}");
        std::process::exit(1);
    }
}
