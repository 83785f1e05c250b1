//! `dsmrun` as a user runs it: a job whose ranks start background processes, and a launcher that is sent
//! SIGTERM, SIGINT or SIGQUIT, must end promptly and leave no process behind; a Ctrl-Z stops the ranks
//! with the launcher.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DSMRUN: &str = env!("CARGO_BIN_EXE_dsmrun");

/// The `/proc` directories of the processes whose command line is exactly `words`.
fn processes(words: &[&str]) -> Vec<std::path::PathBuf> {
    let want: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::read(p.join("cmdline")).is_ok_and(|c| c == want))
        .collect()
}

/// Processes whose command line is exactly `words`.
fn running(words: &[&str]) -> usize {
    processes(words).len()
}

/// Waits up to ten seconds for `n` processes with this command line to run.
fn until_running(words: &[&str], n: usize) {
    let t = Instant::now();
    while running(words) < n && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to ten seconds for no process with this command line to be left.
fn gone(words: &[&str]) -> bool {
    let t = Instant::now();
    while running(words) > 0 {
        if t.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn background_processes_of_the_ranks_neither_hold_the_launcher_nor_outlive_the_job() {
    // Each rank starts a sleep that keeps the rank's output open; one rank then fails, the other succeeds.
    for (script, code) in [
        ("sleep 987001 & exit 3", 3),
        ("sleep 987002 & echo started", 0),
    ] {
        let t = Instant::now();
        // (Bounded: a launcher held by the background process would otherwise hang the test.)
        let out = Command::new("timeout")
            .args(["60", DSMRUN, "-n", "2", "/bin/sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{script}: took {:?}",
            t.elapsed()
        );
        assert_eq!(out.status.code(), Some(code), "{script}");
        let sleep = script.split(" &").next().unwrap();
        let words: Vec<&str> = sleep.split(' ').collect();
        assert!(
            gone(&words),
            "{script}: the background process outlived the job"
        );
    }
}

#[test]
fn a_launcher_sent_sigterm_or_sigint_ends_every_rank_says_so_and_dies_of_it() {
    use std::os::unix::process::ExitStatusExt;
    for (signal, name) in [
        (nix::sys::signal::Signal::SIGTERM, "SIGTERM"),
        (nix::sys::signal::Signal::SIGINT, "SIGINT"),
        (nix::sys::signal::Signal::SIGQUIT, "SIGQUIT"),
    ] {
        let words = ["sleep", "987003"];
        let mut cmd = Command::new(DSMRUN);
        // A launcher that dies of SIGQUIT leaves no core file behind.
        // SAFETY: setrlimit is async-signal-safe and the closure allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)?;
                Ok(())
            });
        }
        let child = cmd
            // (Bounded: a launcher that ignored the signal would otherwise hang the test.)
            .args([
                "--timeout",
                "60",
                "-n",
                "2",
                "/bin/sh",
                "-c",
                "sleep 987003",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        until_running(&words, 2);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name}: took {:?}",
            t.elapsed()
        );
        // As a program a Ctrl-C ended: a shell running it in a loop stops there too.
        assert_eq!(out.status.signal(), Some(signal as i32), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("interrupted by {name}")),
            "{name}: {err}"
        );
        assert!(gone(&words), "{name}: a rank outlived the launcher");
    }
}

/// The states (`/proc/PID/stat`: R, S, T, ...) of the processes whose command line is exactly `words`.
fn states(words: &[&str]) -> Vec<char> {
    processes(words)
        .iter()
        .filter_map(|p| state_in(p))
        .collect()
}

/// The state of process `pid`, if it is there.
fn state_of(pid: u32) -> Option<char> {
    state_in(std::path::Path::new(&format!("/proc/{pid}")))
}

/// The state of the process whose `/proc` directory is `dir`.
fn state_in(dir: &std::path::Path) -> Option<char> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Continues a process when dropped: a failed check leaves no stopped job behind (continued, a job of
/// these tests ends within seconds).
struct ContinueOnDrop(nix::unistd::Pid);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Starts `cmd`, a launcher to be stopped, and returns it, its pid, and what continues it when dropped.
fn stoppable(cmd: &mut Command) -> (std::process::Child, nix::unistd::Pid, ContinueOnDrop) {
    let child = cmd.spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    (child, pid, ContinueOnDrop(pid))
}

#[test]
fn ctrl_z_stops_every_rank_with_the_launcher_and_fg_continues_them() {
    use nix::sys::signal::{kill, Signal};
    // Each rank sleeps for about a second: stopped for longer, the sleeps are still there.
    let words = ["sleep", "1.987"];
    // The launcher leads a process group whose parent, this test, is in another group of the session,
    // as a job a shell starts is: its group is not orphaned, however the tests were started.
    let (child, launcher, _continue) = stoppable(
        Command::new(DSMRUN)
            .args(["--timeout", "60", "-n", "2", "/bin/sh", "-c"])
            .arg("sleep 1.987 && echo finished")
            .process_group(0)
            .stdout(Stdio::piped()),
    );
    until_running(&words, 2);
    kill(launcher, Signal::SIGTSTP).unwrap();
    let t = Instant::now();
    while states(&words) != ['T', 'T'] && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(states(&words), ['T', 'T'], "the ranks' sleeps stopped");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        states(&words),
        ['T', 'T'],
        "the ranks stayed stopped past their sleep"
    );
    assert_eq!(state_of(child.id()), Some('T'), "the launcher stopped");
    kill(launcher, Signal::SIGCONT).unwrap();
    ends_with_both_ranks_finished(child);
}

/// Waits for the launcher `child` of a two-rank job whose ranks print "finished", and checks that the job
/// ended well with both.
fn ends_with_both_ranks_finished(child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("finished").count(), 2, "{text}");
}

#[test]
fn a_ctrl_z_to_a_launcher_no_shell_would_continue_is_dropped_as_the_kernel_drops_it() {
    use nix::sys::signal::{kill, Signal};
    // A session of its own (`setsid`, which runs the launcher in place): its group is orphaned, as a job
    // whose shell has gone is. Stopped, nothing would continue it.
    let words = ["sleep", "1.986"];
    let (child, launcher, _continue) = stoppable(
        Command::new("setsid")
            .args([DSMRUN, "--timeout", "60", "-n", "2", "/bin/sh", "-c"])
            .arg("sleep 1.986 && echo finished")
            .stdout(Stdio::piped()),
    );
    until_running(&words, 2);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{launcher}/comm"))
            .unwrap()
            .trim(),
        "dsmrun",
        "setsid ran the launcher in its own process"
    );
    kill(launcher, Signal::SIGTSTP).unwrap();
    // Time for the signal thread to take it and stop everything, as it does within milliseconds when
    // the group is not orphaned.
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(state_of(child.id()), Some('T'), "the launcher stopped");
    assert!(
        !states(&words).contains(&'T'),
        "a rank stopped: {:?}",
        states(&words)
    );
    ends_with_both_ranks_finished(child);
}

#[test]
fn a_ctrl_z_while_the_job_ends_does_not_stop_the_launcher_after_it() {
    use nix::sys::signal::{kill, Signal};
    // The ranks ignore SIGTERM (inherited through exec by `sleep`), so the launcher ends them with
    // SIGKILL two seconds after a SIGTERM: the Ctrl-Z comes in between, after its signal thread ended.
    let words = ["sleep", "30.985"];
    let (mut child, launcher, _continue) = stoppable(
        Command::new(DSMRUN)
            .args(["-n", "2", "/bin/sh", "-c"])
            .arg("trap '' TERM; sleep 30.985")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    until_running(&words, 2);
    kill(launcher, Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(child.try_wait().unwrap(), None, "still ending the ranks");
    kill(launcher, Signal::SIGTSTP).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            state_of(child.id()) != Some('T') || t.elapsed() < Duration::from_millis(500),
            "the launcher stopped as the job ended"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the launcher did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal().or(status.code().map(|c| c - 128)),
        Some(Signal::SIGTERM as i32),
        "{status:?}"
    );
    assert!(gone(&words));
}

/// Threads of this process whose name begins with `prefix` (names are cut to 15 bytes).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

#[test]
fn a_launch_whose_ranks_never_join_leaves_no_rendezvous_thread_behind() {
    // Ranks that exit without joining (a program that is not a dsm program): the rendezvous thread, which
    // waited for them, ends with the launch instead of staying for the life of the program.
    let opts = dsm_runtime::launch::LaunchOptions {
        ranks: 2,
        capture: Some(Default::default()),
        ..Default::default()
    };
    for _ in 0..3 {
        let o = dsm_runtime::launch::launch(&opts, std::path::Path::new("/bin/true"), &[]).unwrap();
        assert_eq!(o.code, 0);
    }
    let t = Instant::now();
    while threads_named("dsmrun-rendezv") > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} rendezvous threads are left",
            threads_named("dsmrun-rendezv")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_dsm_bind_that_is_not_an_address_is_refused_naming_the_variable() {
    use std::os::unix::ffi::OsStrExt;
    let run = |bind: &std::ffi::OsStr, args: &[&str]| {
        let out = Command::new(DSMRUN)
            .env("DSM_BIND", bind)
            .args(args)
            .args(["-n", "1", "true"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Not UTF-8 (the argument parser said "invalid UTF-8 was detected in one or more arguments"), and
    // not an address.
    for bind in [&b"\xff"[..], b"localhost"] {
        let (code, err) = run(std::ffi::OsStr::from_bytes(bind), &[]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.starts_with("dsmrun: DSM_BIND=")
                && err.contains("is not valid: expected an IP address"),
            "{err}"
        );
    }
    // --bind wins over the variable; an address in the variable is taken.
    let bad = std::ffi::OsStr::from_bytes(b"\xff");
    assert_eq!(run(bad, &["--bind", "127.0.0.1"]).0, Some(0));
    assert_eq!(run(std::ffi::OsStr::new("127.0.0.1"), &[]).0, Some(0));
    let (code, err) = run(std::ffi::OsStr::new("127.0.0.1"), &["--bind", "nowhere"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not an IP address"), "{err}");
}

#[test]
fn ranks_start_with_no_signal_blocked_and_end_at_the_first_sigterm() {
    // The launcher blocks the signals it takes through a signalfd; its ranks must not inherit that.
    let out = Command::new(DSMRUN)
        .args(["-n", "1", "grep", "SigBlk", "/proc/self/status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    // `sleep` keeps the mask it is given: with SIGTERM blocked it waited out the two seconds the launcher
    // gives the ranks before SIGKILL, and the job took three seconds.
    let t = Instant::now();
    let out = Command::new(DSMRUN)
        .args(["--timeout", "1", "-n", "2", "sleep", "987003"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        t.elapsed()
    );
    assert!(gone(&["sleep", "987003"]));
}

#[test]
fn ranks_end_with_a_launcher_killed_before_they_join() {
    // These ranks never call Runtime::init (which also ties a rank to its launcher): they must go all the
    // same when the launcher is killed.
    let mut launcher = Command::new(DSMRUN)
        .args(["-n", "2", "sleep", "987004"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while running(&["sleep", "987004"]) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    assert!(gone(&["sleep", "987004"]), "ranks outlived their launcher");
}

#[test]
fn a_signal_the_launcher_ignores_stays_ignored() {
    // `nohup dsmrun ...` ignores SIGHUP: the hang-up of its terminal must not end the job.
    let words = ["sleep", "1.5"];
    let child = Command::new("nohup")
        .args([
            DSMRUN,
            "-n",
            "2",
            "/bin/sh",
            "-c",
            "sleep 1.5; echo finished",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until_running(&words, 2);
    // `nohup` has become dsmrun (it execs it).
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("finished")
            .count(),
        2,
        "{err}"
    );
}

#[test]
fn a_program_that_cannot_be_run_is_said_to_be_one_with_the_shell_s_status() {
    let plain = std::env::temp_dir().join(format!("dsmrun-not-a-program-{}", std::process::id()));
    std::fs::write(&plain, b"just text").unwrap();
    for (program, code) in [
        (std::path::PathBuf::from("/nonexistent/dsm-program"), 127),
        (plain.clone(), 126),
    ] {
        let out = Command::new(DSMRUN)
            .args(["-n", "2"])
            .arg(&program)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(
            err.contains("it cannot be run") && err.contains("executable file"),
            "{err}"
        );
        assert!(!err.contains("smaller -n"), "{err}");
    }
    std::fs::remove_file(&plain).unwrap();
}

#[test]
fn words_after_the_program_are_its_own_and_words_before_it_are_dsmrun_s() {
    let out = Command::new(DSMRUN)
        .args([
            "-n",
            "1",
            "--no-prefix",
            "/bin/echo",
            "--timeout",
            "5",
            "--keep-going",
        ])
        .args(["-h", "-n", "9", "--", "--version"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "--timeout 5 --keep-going -h -n 9 -- --version\n"
    );
    // dsmrun's own options still come before the program, and a missing program is still an error.
    let out = Command::new(DSMRUN).args(["-n", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("PROGRAM"), "{err}");
    // Before the program, an option is one: attached values are taken (`-n2`), and an unknown option is
    // an error of dsmrun's (status 2), not a program of that name that cannot be found (127).
    let out = Command::new(DSMRUN)
        .args(["-n2", "--no-prefix", "/bin/echo", "x"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x\nx\n");
    let out = Command::new(DSMRUN)
        .args(["--nope", "/bin/echo"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unexpected argument '--nope'"), "{err}");
}

#[test]
fn a_rank_that_fails_on_its_own_is_named_over_one_that_never_came_and_was_not_waited_for() {
    // Neither rank is a dsm program: rank 1 ends at once, before it could join; rank 0 never waits for
    // it, and fails with a status of its own.
    let out = Command::new(DSMRUN)
        .args(["-n", "2", "sh", "-c"])
        .arg(r#"[ "$DSM_RANK" = 1 ] && exit 0; sleep 0.5; exit 3"#)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("rank 0 exited with status 3"), "{err}");
}

#[test]
fn a_rank_ending_with_the_peer_failed_status_before_the_job_met_is_named_itself() {
    // Status 75 says a rank ended because another failed, which no rank can see before the job has met:
    // rank 1's is its own, and rank 0, still running, is not to be taken for a rank that hung.
    let out = Command::new(DSMRUN)
        .args(["--timeout", "60", "-n", "2", "sh", "-c"])
        .arg(r#"[ "$DSM_RANK" = 1 ] && exit 75; sleep 30"#)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(
        err.contains("rank 1 exited with status 75 before it joined the job"),
        "{err}"
    );
    assert!(!err.contains("rank 0"), "{err}");
}

#[test]
fn a_transport_the_ranks_would_refuse_is_refused_once_before_any_starts() {
    let out = Command::new(DSMRUN)
        .env("DSM_TRANSPORT", "mpi")
        .args(["-n", "2", "/bin/sh", "-c", "echo started"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("DSM_TRANSPORT=\"mpi\" is not valid: expected tcp"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("started"),
        "a rank started"
    );
}

#[test]
fn a_setting_every_rank_would_refuse_is_said_once_before_any_starts() {
    for (var, value) in [
        ("DSM_CHANNELS", "abc"),
        ("DSM_CONNECT_TIMEOUT", "0"),
        ("DSM_ARENA_SIZE", "12345"),
    ] {
        let out = Command::new(DSMRUN)
            .env(var, value)
            .args(["-n", "3", "/bin/sh", "-c", "echo started"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        // One line, the launcher's: no rank said it.
        assert_eq!(err.lines().count(), 1, "{var}: {err}");
        assert!(
            err.starts_with(&format!("dsmrun: {var}={value:?} is not valid: expected ")),
            "{var}: {err}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("started"),
            "{var}: a rank started"
        );
    }
    // What the ranks will see counts: the launcher's own DSM_ON_PEER_FAILURE is not theirs under
    // --keep-going, which sets it.
    let out = Command::new(DSMRUN)
        .env("DSM_ON_PEER_FAILURE", "sometimes")
        .args(["--keep-going", "-n", "2", "/bin/sh", "-c", "echo started"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn ranks_told_to_go_on_after_a_failure_are_refused_unless_the_launcher_goes_on_too() {
    let run = |extra: &[&str]| {
        Command::new(DSMRUN)
            .env("DSM_ON_PEER_FAILURE", "report")
            .args(extra)
            .args(["-n", "2", "/bin/sh", "-c", "echo started"])
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("DSM_ON_PEER_FAILURE=\"report\" is not valid") && err.contains("--keep-going"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("started"));
    let out = run(&["--keep-going"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("started")
            .count(),
        2
    );
}

/// Runs `script` under bash with `$DSMRUN` set, bounded by a minute; returns its output and how long it took.
fn bash(script: &str) -> (std::process::Output, Duration) {
    let t = Instant::now();
    let out = Command::new("timeout")
        .args(["60", "bash", "-c", script])
        .env("DSMRUN", DSMRUN)
        .output()
        .unwrap();
    (out, t.elapsed())
}

#[test]
fn a_reader_that_closes_its_end_ends_the_job_as_it_would_end_a_writer() {
    // `yes | head -1`: the ranks see their output closed (SIGPIPE) instead of running on for ever.
    let (out, took) = bash(r#"$DSMRUN -n 2 yes | head -1; echo "status ${PIPESTATUS[0]}" >&2"#);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(took < Duration::from_secs(30), "took {took:?}: {err}");
    assert!(stdout == "[0] y\n" || stdout == "[1] y\n", "{stdout:?}");
    assert!(err.contains("status 141"), "{err}");
    assert!(
        err.contains("was closed before rank"),
        "the launcher says its output was closed: {err}"
    );
}

#[test]
fn output_that_cannot_be_written_fails_the_job_and_says_so() {
    let (out, _) = bash(r#"$DSMRUN -n 1 echo hi > /dev/full; echo "status $?" >&2"#);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("status 1\n"), "{err}");
    assert!(
        err.contains("writing rank 0's standard output failed") && err.contains("lost"),
        "{err}"
    );
}

#[test]
fn a_signal_ends_the_wait_for_a_reader_that_takes_nothing() {
    // The reader opens the launcher's output and never reads it: the rank's output fills the pipes and
    // the launcher waits to write it, until a SIGTERM, which it dies of.
    let (out, took) = bash(
        r#"d=$(mktemp -d); mkfifo "$d/f"; sleep 40 < "$d/f" & s=$!
        $DSMRUN -n 1 sh -c 'head -c 300000 /dev/zero | tr "\0" x' > "$d/f" & l=$!
        sleep 1; kill -TERM $l; wait $l; echo "status $?" >&2; kill $s; rm -r "$d""#,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
    assert!(err.contains("status 143"), "{err}");
}

#[test]
fn a_slow_reader_gets_every_line() {
    // The rank's output (79 KB) fits in the pipes, so the rank ends at once; the reader then pauses
    // longer than the launcher waits for a stream that stays quiet while nothing is being written.
    let (out, _) = bash(r#"$DSMRUN -n 1 seq 15000 | (sleep 3; wc -l)"#);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "15000");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn output_goes_as_written_without_prefixes_and_long_lines_keep_one_prefix() {
    // No newline added without prefixes.
    let out = Command::new(DSMRUN)
        .args(["-n", "1", "--no-prefix", "printf", "abc"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"abc");
    // A line far longer than the launcher's chunk, then a line with no end: one prefix each.
    let out = Command::new(DSMRUN)
        .args(["-n", "1", "/bin/sh", "-c"])
        .arg("head -c 300000 /dev/zero | tr '\\0' a; echo; printf tail")
        .output()
        .unwrap();
    let want = [b"[0] ".as_slice(), &[b'a'; 300_000], b"\n[0] tail\n"].concat();
    assert!(out.stdout == want, "{} bytes", out.stdout.len());
}

#[test]
fn processes_the_ranks_started_end_with_a_launcher_killed_by_sigkill() {
    // SIGKILL gives the launcher no chance to end the ranks' process groups: the ranks die with it
    // (their death signal), and its watchdog ends what they started.
    let words = ["sleep", "987006"];
    let mut launcher = Command::new(DSMRUN)
        .args(["-n", "2", "/bin/sh", "-c", "sleep 987006 & wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until_running(&words, 2);
    assert_eq!(running(&words), 2, "both ranks started their sleep");
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    assert!(
        gone(&words),
        "a process a rank started outlived the launcher"
    );
}
