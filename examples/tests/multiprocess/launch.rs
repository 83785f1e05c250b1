//! Starting and joining a job: the launcher, the rendezvous, settings and their errors, arenas, namespaces,
//! running without userfaultfd or without root, and ranks whose launcher is killed.

use super::*;

#[test]
fn hello_at_2_3_and_4_ranks() {
    passes_at(&[2, 3, 4], env!("CARGO_BIN_EXE_hello"), &[]);
}

#[test]
fn ranks_started_through_a_wrapper_program_join() {
    // `sh -c 'hello; true'` does not exec hello: the shell stays between the launcher and the rank, which
    // must still join (it once took the shell for a sign that the launcher was gone).
    let line = format!("{}; true", env!("CARGO_BIN_EXE_hello"));
    let (o, out) = job("/bin/sh", 2, &["-c", &line]);
    assert_eq!(o.code, 0, "{out}");
    assert!(out.contains("of 2 sees"), "{out}");
}

#[test]
fn a_rank_with_the_wrong_token_is_refused_and_the_job_ends() {
    // Rank 1 presents another job's token: the launcher refuses it, it ends with an error saying so, and
    // the job ends instead of waiting for it.
    let t = std::time::Instant::now();
    let (o, out) = hello_where_rank1_first(2, &format!("DSM_TOKEN={}", "ab".repeat(32)), &[]);
    assert_ne!(o.code, 0, "{out}");
    assert!(
        out.contains("[1]") && out.contains("refused rank 1") && out.contains("DSM_TOKEN"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn a_rank_that_exits_before_joining_ends_the_job_at_once_naming_it() {
    // Rank 1 exits with status 0 without joining: the others, waiting at the rendezvous, are told at
    // once (they waited out the 30 s connect timeout), and the launcher names rank 1, not a rank that
    // failed because of it.
    let t = std::time::Instant::now();
    let (o, out) = hello_where_rank1_first(3, "exit 0", &[]);
    assert_ne!(o.code, 0, "{out}");
    assert_eq!(o.failed_rank, Some(1), "{out}");
    assert!(o.reason.contains("before it joined the job"), "{o:?}");
    assert!(
        out.contains("the job cannot start: rank 1 exited with status 0 before it joined the job"),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn ranks_that_could_not_hold_their_connections_say_so_before_connecting() {
    // 12 ranks take about 184 descriptors each; each rank here may open 100. Out of them midway, a rank
    // dropped the others' connections, and they failed with resets that said nothing of why.
    let line = format!("ulimit -n 100 && exec {}", env!("CARGO_BIN_EXE_hello"));
    let (o, out) = job("/bin/bash", 12, &["-c", &line]);
    assert_eq!(o.code, 1, "{out}");
    assert!(
        out.contains("needs about 184 open files at each rank")
            && out.contains("may have at most 100")
            && !out.contains("reset by peer"),
        "{out}"
    );
}

#[test]
fn a_rank_whose_peer_is_gone_before_connecting_ends_as_for_a_peer_failure() {
    // The test plays the launcher of a job of two, and the table it hands out gives rank 1 an address
    // nobody listens at: rank 1 gone between the rendezvous and the connections. Rank 0 ends with the
    // status that tells a launcher it is not the cause (with status 1 it could be blamed for rank 1).
    use std::io::{BufRead, BufReader, Write};
    let rendezvous = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone_at = gone.local_addr().unwrap();
    drop(gone);
    let rank0 = std::process::Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("DSM_RANK", "0")
        .env("DSM_SIZE", "2")
        .env(
            "DSM_RENDEZVOUS",
            rendezvous.local_addr().unwrap().to_string(),
        )
        .env("DSM_TOKEN", "ab".repeat(32))
        .env("DSM_BIND", "127.0.0.1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (s, _) = rendezvous.accept().unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let mine = line
        .split_whitespace()
        .nth(2)
        .expect("token, rank, address");
    writeln!(&s, "{mine} {gone_at}").unwrap();
    let out = rank0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(dsm::EXIT_PEER_FAILED), "{err}");
    assert!(
        err.contains(&format!(
            "dsm: rank 0: rank 1 failed: rank 0 could not connect to it at {gone_at}"
        )),
        "{err}"
    );
}

#[test]
fn connections_to_the_rendezvous_that_send_nothing_hold_up_no_rank() {
    // Rank 1 first opens three connections to the rendezvous that send nothing and stay open. Read one
    // after the other, each for up to 5 s, they held rank 1's line past the ranks' 8 s connect timeout.
    let idle = r#"for i in 1 2 3; do bash -c 'exec 3<>/dev/tcp/${DSM_RENDEZVOUS%:*}/${DSM_RENDEZVOUS##*:}; sleep 30' & done; sleep 0.3"#;
    let (o, out) = hello_where_rank1_first(2, idle, &[("DSM_CONNECT_TIMEOUT", "8")]);
    assert_eq!(o.code, 0, "{out}");
    assert!(out.contains("of 2 sees"), "{out}");
}

#[test]
fn a_rank_that_never_comes_to_the_rendezvous_is_named() {
    // Rank 1 is still busy before it joins when the others give up waiting for it: the launcher names
    // rank 1, not rank 0, whose error (the connect timeout) comes first.
    let t = std::time::Instant::now();
    let (o, out) = hello_where_rank1_first(3, "sleep 30", &[("DSM_CONNECT_TIMEOUT", "2")]);
    assert_ne!(o.code, 0, "{out}");
    assert_eq!(o.failed_rank, Some(1), "{out}");
    assert!(o.reason.contains("never joined the job"), "{o:?}");
    assert!(
        o.reason
            .contains("gave up waiting for it at the rendezvous"),
        "{o:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn under_keep_going_a_rank_that_exits_before_joining_is_not_said_to_leave_the_job_going() {
    let dsmrun = Path::new(CHECK).with_file_name("dsmrun");
    let line = format!(
        "if [ \"$DSM_RANK\" = 1 ]; then exit 3; fi; exec {}",
        env!("CARGO_BIN_EXE_hello")
    );
    let out = std::process::Command::new(dsmrun)
        .args(["-n", "3", "--keep-going", "--timeout", "60", "--"])
        .args(["/bin/sh", "-c", &line])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "dsmrun: rank 1 exited with status 3 before it joined the job; the others cannot start"
        ),
        "{err}"
    );
    assert!(!err.contains("the job goes on"), "{err}");
}

#[test]
fn ranks_with_different_channel_counts_stop_at_once_saying_why() {
    // A wrapper gives rank 1 another DSM_CHANNELS: its mesh cannot match rank 0's. Both must say so
    // at the handshake, instead of waiting out the connect timeout (30 s) for connections that never come.
    let t = std::time::Instant::now();
    let (o, out) = hello_where_rank1_first(2, "export DSM_CHANNELS=3", &[]);
    assert_ne!(o.code, 0, "{out}");
    assert!(
        out.contains("rank 1 has 3 channels, this rank 4: give every rank the same DSM_CHANNELS")
            || out.contains(
                "rank 0 has 4 channels, this rank 3: give every rank the same DSM_CHANNELS"
            ),
        "{out}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_connect_timeout_out_of_range_is_a_clear_error() {
    // Said by the launcher, once, before any rank starts (each rank would say it too: a job of one rank
    // started by hand, in `a_job_of_one_rank_refuses_the_meeting_settings_a_larger_one_would`).
    let opts = LaunchOptions {
        ranks: 2,
        capture: Some(Default::default()),
        env: vec![("DSM_CONNECT_TIMEOUT".into(), "18446744073709551615".into())],
        ..LaunchOptions::default()
    };
    let e = launch(&opts, Path::new(env!("CARGO_BIN_EXE_hello")), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DSM_CONNECT_TIMEOUT") && e.contains("1 to 86400"),
        "{e}"
    );
}

#[test]
fn hello_checks_what_it_sees() {
    let (outcome, out) = job(env!("CARGO_BIN_EXE_hello"), 3, &[]);
    assert_eq!(outcome.code, 0, "{out}");
    for r in 0..3 {
        assert!(
            out.contains(&format!("[{r}] rank {r} of 3 sees [1000, 1001, 1002]")),
            "{out}"
        );
    }
}

#[test]
fn configuration_errors_are_clear() {
    let hello = env!("CARGO_BIN_EXE_hello");
    // A malformed variable is refused, naming the variable, the value and what it takes.
    for (var, value, expected) in [
        ("DSM_READAHEAD", "lots", "1 to 1024"),
        ("DSM_INSTALL_HELPER", "yes", "on or off"),
        ("DSM_DIRECT_INSTALL", "maybe", "on or off"),
        ("DSM_STATS", "yes", "1 or 0"),
        ("DSM_PEER_TIMEOUT", "2.5", "whole seconds"),
        // Out of range, not only malformed.
        ("DSM_PEER_TIMEOUT", "100000", "0 (never) or 2 to 86400"),
        ("DSM_PEER_TIMEOUT", "1", "0 (never) or 2 to 86400"),
        ("DSM_READAHEAD", "0", "1 to 1024"),
        ("DSM_CHANNELS", "100", "2 to 64"),
        ("DSM_SPIN_US", "99999999999", "0 to 1000000"),
        ("DSM_NOTICE_MEMORY", "1K", "at least 4K"),
        ("DSM_TWIN_MEMORY", "32Q", "a size such as 32M, or 0"),
        ("DSM_ARENA_SIZE", "1000", "multiple of the 4 KiB page"),
        ("DSM_TRANSPORT", "tpc", "tcp or mpi"),
    ] {
        let out = std::process::Command::new(hello)
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(var) && err.contains(value) && err.contains(expected),
            "{err}"
        );
    }

    // A rank of a dsmrun job (as dsmrun starts it) with a rank outside the job, or asking for the MPI
    // transport, which only mpirun's jobs have: refused before it looks for the others. And half of
    // dsmrun's settings: refused, not run as a job of one rank that ignores the others.
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("DSM_RANK", "2"),
                ("DSM_SIZE", "2"),
                ("DSM_TRANSPORT", "tcp"),
            ],
            "DSM_RANK=\"2\" is not valid: expected a rank below DSM_SIZE",
        ),
        (
            &[
                ("DSM_RANK", "0"),
                ("DSM_SIZE", "2"),
                ("DSM_TRANSPORT", "mpi"),
            ],
            "DSM_TRANSPORT=\"mpi\" is not valid: expected tcp",
        ),
        (&[("DSM_SIZE", "2")], "DSM_RANK is not set"),
    ];
    for (vars, expected) in cases {
        let out = std::process::Command::new(hello)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(expected), "{err}");
    }

    let out = std::process::Command::new(hello)
        .env("PMI_RANK", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("mpirun") && err.contains("dsmrun"), "{err}");
    assert!(
        err.contains("rebuild it with dsm-runtime's `mpi` feature"),
        "{err}"
    );

    // One of several srun tasks without PMI: refused, not run as a job of one rank.
    let out = std::process::Command::new(hello)
        .env("SLURM_NTASKS", "4")
        .env("SLURM_STEP_NUM_TASKS", "4")
        .env("SLURM_PROCID", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("srun --mpi=pmi2"), "{err}");

    // A batch script of a 4-task allocation (sbatch sets SLURM_NTASKS and SLURM_PROCID=0, srun's step
    // variables are absent): a program run in it directly is a job of one rank.
    let out = std::process::Command::new(hello)
        .env("SLURM_NTASKS", "4")
        .env("SLURM_PROCID", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rank 0 of 1 sees [1000]"));

    // Run directly, hello is a job of one rank.
    let out = std::process::Command::new(hello).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rank 0 of 1 sees [1000]"));
}

#[test]
fn a_job_of_one_rank_refuses_the_meeting_settings_a_larger_one_would() {
    // A job of one rank meets no one, but a mistyped setting is said there, not first at two ranks.
    let hello = env!("CARGO_BIN_EXE_hello");
    for (var, value) in [
        ("DSM_CONNECT_TIMEOUT", "ten"),
        ("DSM_BIND", "localhost:80"),
        ("DSM_TOKEN", "abc"),
        ("DSM_RENDEZVOUS", "127.0.0.1"),
    ] {
        for rank in [None, Some("0")] {
            let mut cmd = std::process::Command::new(hello);
            cmd.env(var, value);
            if let Some(r) = rank {
                cmd.env("DSM_RANK", r).env("DSM_SIZE", "1");
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{var} {rank:?}: {err}");
            assert!(
                err.contains(&format!("{var}={value:?} is not valid: expected")),
                "{var} {rank:?}: {err}"
            );
        }
    }
}

/// Runs `hello` as a job of one rank with `var=value` in its environment: its status and its standard
/// error.
fn hello_alone_with(var: &str, value: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hello"))
        .env(var, value)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_arena_that_cannot_be_mapped_is_a_clear_error() {
    // Beyond the 47-bit user address space.
    let (code, err) = hello_alone_with("DSM_ARENA_BASE", "0x800000000000");
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("cannot map the shared arena at 0x800000000000")
            && err.contains("DSM_ARENA_BASE"),
        "{err}"
    );
}

#[test]
fn an_arena_too_large_for_the_address_space_says_the_size_is_the_problem() {
    // 200 TiB fits nowhere in the 128 TiB of user address space: the default base is refused, and so is
    // any range the kernel could choose. The error once named address 0x0 and told to move the base.
    let (code, err) = hello_alone_with("DSM_ARENA_SIZE", "200T");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot reserve a shared arena of 219902325555200 bytes anywhere")
            && err.contains("set a smaller DSM_ARENA_SIZE")
            && !err.contains("DSM_ARENA_BASE"),
        "{err}"
    );
}

#[test]
fn an_arena_base_of_zero_or_off_a_page_is_refused() {
    // Address 0 mapped (root may map it) once made every fault on the arena a plain SIGBUS, unexplained.
    for base in ["0", "0x1001"] {
        let (code, err) = hello_alone_with("DSM_ARENA_BASE", base);
        assert_eq!(code, Some(1), "{base}: {err}");
        assert!(
            err.contains("DSM_ARENA_BASE") && err.contains("non-zero hexadecimal address"),
            "{base}: {err}"
        );
    }
}

/// Ranks in PID namespaces of their own (started through `unshare --pid`, with their own `/proc`), where
/// the launcher's pid names no process, or another one: they run, instead of taking the launcher for gone
/// and ending at once. Needs root, to make the namespaces.
#[test]
fn ranks_in_pid_namespaces_of_their_own_run() {
    let line = format!(
        "exec unshare --pid --fork --mount-proc {}",
        env!("CARGO_BIN_EXE_hello")
    );
    let (o, out) = job_with_env("/bin/sh", 2, &["-c", &line], &[]);
    assert!(
        !out.contains("unshare failed") && !out.contains("Operation not permitted"),
        "this test needs root, to make a PID namespace: {out}"
    );
    assert_eq!(o.code, 0, "{out}");
    for r in 0..2 {
        assert!(
            out.contains(&format!("[{r}] rank {r} of 2 sees [1000, 1001]")),
            "{out}"
        );
    }
}

#[test]
fn an_arena_another_rank_cannot_map_is_a_clear_error_on_every_rank() {
    // Rank 1 may have only 4 GB of address space (`ulimit -v`), so it cannot map the 1 TiB arena rank 0
    // reserved: it says why and what to set, rank 0 names it, and the job ends.
    let (o, out) = hello_where_rank1_first(2, "ulimit -v 4000000", &[("RUST_BACKTRACE", "0")]);
    assert_ne!(o.code, 0, "{out}");
    assert!(
        out.contains("[1] hello: rank 1 cannot map the shared arena at")
            && out.contains("DSM_ARENA_BASE"),
        "{out}"
    );
    // Rank 0 names rank 1 either way: its allocation's error, or (when rank 1's connections close
    // before rank 0's main thread has printed that, as on a loaded machine) its service loop's word on the
    // failed rank, which ends the process first.
    assert!(
        (out.contains("[0] hello:")
            && out.contains("rank 1 cannot map the shared arena at the address rank 0 chose"))
            || out.contains("[0] dsm: rank 0: rank 1 failed"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

/// Denies this process (and what it executes) userfaultfd: the system call and the `/dev/userfaultfd`
/// ioctl that makes one fail with EPERM, as a container's seccomp policy can make them. For a child
/// between fork and exec: it makes only the two `prctl` calls.
fn deny_userfaultfd() -> std::io::Result<()> {
    const USERFAULTFD_IOC_NEW: u32 = 0xAA00; // _IO(0xAA, 0x00)
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0), // the system call's number
        jump(libc::SYS_userfaultfd as u32, 0, 1),
        stmt(libc::BPF_RET | libc::BPF_K, deny),
        jump(libc::SYS_ioctl as u32, 0, 3),
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 24), // the low half of its second argument
        jump(USERFAULTFD_IOC_NEW, 0, 1),
        stmt(libc::BPF_RET | libc::BPF_K, deny),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: PR_SET_SECCOMP reads the filter program, which lives across the call.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn without_userfaultfd_a_program_says_what_to_do() {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hello"));
    cmd.env("RUST_BACKTRACE", "0");
    // SAFETY: the hook runs in the child between fork and exec and only builds a filter on its stack and
    // calls prctl.
    unsafe { cmd.pre_exec(deny_userfaultfd) };
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("userfaultfd is not permitted") && err.contains("vm.unprivileged_userfaultfd"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// userfaultfd in user-mode-only mode needs no privilege: a job runs as an ordinary user (here `nobody`,
/// entered with setpriv, which takes root: the tests run as root, as CI does).
#[test]
fn a_job_runs_without_root() {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n";
    assert!(
        root && Path::new("/usr/bin/setpriv").exists(),
        "this test needs root and /usr/bin/setpriv (util-linux), to run a job as another user"
    );
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_hello"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rank 0 of 1 sees [1000]"), "{stdout}");
}

/// Processes whose command line is exactly `words`.
fn running(words: &[&str]) -> usize {
    let want: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .count()
}

#[test]
fn ranks_behind_a_wrapper_end_when_the_launcher_is_killed() {
    // `dsmrun -n 2 sh -c 'dsm-check ...; true'`: the ranks' parent is the shell, which does not die with the
    // launcher, so the parent-death signal cannot end them; they must notice the launcher is gone.
    let dsmrun = Path::new(CHECK).with_file_name("dsmrun");
    assert!(
        dsmrun.exists(),
        "{} is missing: build the workspace's binaries (cargo test --workspace does)",
        dsmrun.display()
    );
    let words = [CHECK, "idle", "--rounds", "600000"];
    let mut launcher = std::process::Command::new(&dsmrun)
        .args([
            "-n",
            "2",
            "/bin/sh",
            "-c",
            &format!("{}; true", words.join(" ")),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while running(&words) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both have joined once a rank computes; give the other a moment past the rendezvous too.
    std::thread::sleep(Duration::from_millis(300));
    // Killed and not collected yet: a zombie, which counts as gone.
    let pid = nix::unistd::Pid::from_raw(launcher.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    while running(&words) > 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the ranks outlived their launcher"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    launcher.wait().unwrap();
}

/// The examples' output to a reader that goes away (`wordcount | head -1`) ends them quietly with
/// SIGPIPE's status, and output that cannot be written (a full disk) is an error that says so: neither is
/// a panic.
#[test]
fn examples_end_quietly_when_their_reader_goes_and_say_when_their_output_fails() {
    let shell = |line: String| {
        let out = std::process::Command::new("bash")
            .args(["-c", &line])
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let wordcount = env!("CARGO_BIN_EXE_wordcount");
    // Thousands of lines, of which `head` takes one: the later writes find the pipe closed.
    let (stdout, stderr) = shell(format!(
        "{wordcount} --top 5000 | head -1; echo status ${{PIPESTATUS[0]}}"
    ));
    assert!(stdout.ends_with("status 141\n"), "{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let hello = env!("CARGO_BIN_EXE_hello");
    let (stdout, stderr) = shell(format!("{hello} > /dev/full; echo status $?"));
    assert_eq!(stdout, "status 1\n", "{stderr}");
    assert!(
        stderr.contains("hello: writing to standard output: No space left on device"),
        "{stderr}"
    );
}
