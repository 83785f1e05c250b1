//! Meeting the other ranks: each rank binds its listeners, tells the launcher's rendezvous server where it
//! listens (proving the job token), and receives where every rank does. The TCP transport takes it from
//! there.

use crate::RuntimeError;
use dsm::transport::tcp::{PeerAddr, TcpTransport};
use dsm::Rank;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Binds this rank's TCP listener on `bind`, and its Unix-domain one when `unix`
/// (`DSM_UNIX_SOCKETS`): the transport to set up, and where it listens.
pub(crate) fn listen(
    bind: IpAddr,
    unix: bool,
    token: [u8; 32],
    timeout: Duration,
) -> Result<(TcpTransport, PeerAddr), RuntimeError> {
    let listener = TcpListener::bind((bind, 0)).map_err(|e| RuntimeError::Io {
        context: format!(
            "binding this rank's listener on {bind} (set DSM_BIND to an address of this host)"
        ),
        error: e,
    })?;
    let tcp = listener.local_addr().map_err(|e| RuntimeError::Io {
        context: "listener address".into(),
        error: e,
    })?;
    // The addresses are filled in once every rank has said where it listens.
    let transport = TcpTransport::new(listener, Vec::<PeerAddr>::new(), token, timeout);
    if !unix {
        return Ok((transport, PeerAddr { tcp, unix: None }));
    }
    let (listener, name) = dsm::transport::tcp::bind_unix().map_err(|e| {
        RuntimeError::Rendezvous(format!(
            "{e} (set DSM_UNIX_SOCKETS=off to connect over TCP only)"
        ))
    })?;
    Ok((
        transport.with_unix(listener),
        PeerAddr {
            tcp,
            unix: Some(name),
        },
    ))
}

pub(crate) fn join(
    rank: Rank,
    size: usize,
    at: SocketAddr,
    bind: IpAddr,
    unix: bool,
    token: [u8; 32],
    timeout: Duration,
) -> Result<TcpTransport, RuntimeError> {
    let (transport, mine) = listen(bind, unix, token, timeout)?;
    let mut s = TcpStream::connect_timeout(&at, timeout)
        .map_err(|e| RuntimeError::Rendezvous(format!("cannot reach the launcher at {at}: {e}")))?;
    s.set_read_timeout(Some(timeout)).ok();
    writeln!(s, "{} {} {}", crate::env::token_hex(&token), rank.0, mine)
        .map_err(|e| RuntimeError::Rendezvous(format!("sending to the launcher: {e}")))?;
    let mut line = String::new();
    // At most every rank's address (an IPv6 one with its port, a Unix socket's name and a space: 81
    // bytes): an address that is not the launcher's, sending without end, must not fill this rank's
    // memory.
    let longest = size as u64 * 96 + 64;
    BufReader::new((&s).take(longest)).read_line(&mut line).map_err(|e| {
        RuntimeError::Rendezvous(match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "not every rank joined within {} s: a rank failed before joining (see its error), or the ranks take longer than that to start (raise DSM_CONNECT_TIMEOUT)",
                timeout.as_secs_f64()
            ),
            _ => format!("waiting for the other ranks: {e}"),
        })
    })?;
    if line.trim() == "refused" {
        return Err(RuntimeError::Rendezvous(format!(
            "the launcher at {at} refused rank {}: its DSM_TOKEN is not the job's, another process already joined as that rank, or its address {mine} did not parse (start ranks with dsmrun, which sets DSM_RANK and DSM_TOKEN; a dsmrun of an older build reads no Unix socket name in an address: use this build's, or set DSM_UNIX_SOCKETS=off)",
            rank.0
        )));
    }
    if line.trim() == "busy" {
        return Err(RuntimeError::Rendezvous(format!(
            "the launcher at {at} refused rank {}: it was reading as many connections as it takes at once (is something else connecting to it?)",
            rank.0
        )));
    }
    if let Some(why) = line.trim().strip_prefix("ended: ") {
        return Err(RuntimeError::Rendezvous(format!(
            "the job cannot start: {why} (see its output)"
        )));
    }
    if line.is_empty() {
        return Err(RuntimeError::Rendezvous(format!(
            "the launcher at {at} closed the connection before every rank had joined: it ended, or another rank failed first (see its error)"
        )));
    }
    let peers: Vec<PeerAddr> = line
        .split_whitespace()
        .filter_map(|a| a.parse().ok())
        .collect();
    if peers.len() != size {
        return Err(RuntimeError::Rendezvous(format!(
            "the launcher sent {} addresses for a job of {size} ranks (reply {line:?})",
            peers.len()
        )));
    }
    Ok(transport.with_peers(peers))
}

/// Ends this process when the launcher dies, so that no rank outlives its job.
///
/// When the launcher is this process's parent, the parent-death signal does it. When a program stands
/// between them (`dsmrun -n 2 /usr/bin/time prog`, a shell script), that program does not die with the
/// launcher if the launcher is killed outright, so a thread looks at the launcher every quarter second
/// instead. The launcher may have died before either was set up. It counts as gone when its process is
/// no more, is a zombie (dead, its parent has not collected it yet), or is another process that got its
/// pid (its start time differs).
///
/// A rank in a PID namespace other than the launcher's (`launcher_ns`, started through `unshare --pid`
/// or a container's runtime) cannot look at the launcher by its pid, which may even be another process's
/// there: the parent-death signal, and the launcher's watchdog, which ends each rank's process group if
/// the launcher is killed, are left to end it.
pub(crate) fn die_with_launcher(launcher: i32, launcher_ns: Option<&str>) {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if launcher_ns.is_some_and(|ns| pid_namespace().is_some_and(|mine| mine != ns)) {
        return;
    }
    let end = move || {
        // Not eprintln!: with the launcher gone, standard error is likely a pipe nobody reads, and
        // eprintln! panics when the write fails.
        let _ = writeln!(
            std::io::stderr(),
            "dsm: the launcher (pid {launcher}) is gone; ending"
        );
        std::process::exit(70);
    };
    let Some(started) = launcher_alive_since(launcher, None) else {
        end();
        return;
    };
    if nix::unistd::getppid() != nix::unistd::Pid::from_raw(launcher) {
        let watcher = std::thread::Builder::new()
            .name("dsm-launcher-watch".into())
            .stack_size(64 << 10)
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                if launcher_alive_since(launcher, Some(started)).is_none() {
                    end();
                }
            });
        if watcher.is_err() {
            let _ = writeln!(
                std::io::stderr(),
                "dsm: cannot watch the launcher (pid {launcher}); this rank may outlive it if it is killed"
            );
        }
    }
}

/// This process's PID namespace, as `/proc/self/ns/pid` names it (`pid:[4026531836]`), if it can be read.
pub(crate) fn pid_namespace() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    link.into_os_string().into_string().ok()
}

/// The start time of process `pid` (in clock ticks since boot, from `/proc/PID/stat`) if it is alive, not
/// a zombie, and (when `since` is given) started then.
fn launcher_alive_since(pid: i32, since: Option<u64>) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces and parentheses: the fields follow the last one.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // Fields 3 (state) and 22 (start time) of proc(5), counted from the first after the name.
    let state = fields.first()?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    let dead = *state == "Z" || *state == "X" || since.is_some_and(|s| s != start);
    (!dead).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendezvous_address_that_sends_without_end_is_refused_without_reading_it_all() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = server.local_addr().unwrap();
        // Not a launcher: a service that answers anything with bytes and no line's end, for ever.
        std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let chunk = [b'x'; 64 << 10];
            while s.write_all(&chunk).is_ok() {}
        });
        let joined = join(
            Rank(0),
            2,
            at,
            IpAddr::from([127, 0, 0, 1]),
            true,
            [0; 32],
            Duration::from_secs(10),
        );
        match joined {
            Err(RuntimeError::Rendezvous(why)) => {
                assert!(why.contains("0 addresses for a job of 2"), "{why}");
                assert!(why.len() < 1024, "{why}");
            }
            other => panic!("joined with {:?}", other.map(|_| ())),
        }
    }
}
