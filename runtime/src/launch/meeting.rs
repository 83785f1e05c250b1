//! The launcher's side of the rendezvous: it collects every rank's address and sends the full table to
//! each, and tells the ranks waiting there when one of them exited before it joined (the job cannot
//! start). Connections are read side by side, and strangers are bounded (`MAX_READING`).

use super::lock;
use super::output::say;
use super::ranks::describe;
use dsm::transport::tcp::PeerAddr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the launch loop and the rendezvous know of ranks that will never join.
#[derive(Default)]
pub(super) struct Meeting {
    /// Ranks that exited, as the launch loop saw them, and how.
    pub(super) exited: Vec<(usize, ExitStatus)>,
    /// The first rank the rendezvous found to have exited before it joined, and how it ended: the job
    /// cannot start, and that rank is the one to name.
    pub(super) never: Option<(usize, ExitStatus)>,
    /// When each rank joined at the rendezvous (sent its address), by rank.
    pub(super) joined: Vec<Option<Instant>>,
    /// Ranks that came to the rendezvous: joined, or were told the job cannot start.
    pub(super) came: Vec<bool>,
    /// Whether every rank joined and the table was sent out.
    pub(super) met: bool,
}

impl Meeting {
    /// The rank to blame when rank `failed` ended with an exit code (not a signal) at `ended`, having
    /// joined at the rendezvous at least `waited` before, while the others had not all come: the first
    /// rank that has neither joined nor exited (`done`), which the rank gave up waiting for
    /// (`DSM_CONNECT_TIMEOUT`). A rank that ended sooner after joining failed for a reason of its own.
    pub(super) fn never_came(
        &self,
        failed: (usize, ExitStatus),
        ended: Instant,
        waited: Duration,
        done: &[bool],
    ) -> Option<usize> {
        let (r, status) = failed;
        let joined = self.joined.get(r).copied().flatten();
        let gave_up = !self.met
            && status.code().is_some()
            && joined.is_some_and(|t| ended.saturating_duration_since(t) >= waited);
        gave_up
            .then(|| (0..done.len()).find(|&s| self.joined.get(s) == Some(&None) && !done[s]))
            .flatten()
    }
}

pub(super) type Exits = Arc<Mutex<Meeting>>;

/// What the launch loop sends the rendezvous to wake it (after noting an exit in `Exits`).
pub(super) const WAKE: &str = "wake";

/// How long a connection to the rendezvous may take to send its line.
const LINE_WITHIN: Duration = Duration::from_secs(5);

/// The first line `stream` sends (without its newline, at most `max` bytes, invalid UTF-8 replaced), all
/// of it within `within`; an error if none comes in time.
fn read_line_within(
    stream: &std::net::TcpStream,
    within: Duration,
    max: usize,
) -> std::io::Result<String> {
    let deadline = Instant::now() + within;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 512];
    while !bytes.contains(&b'\n') && bytes.len() < max {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let room = (max - bytes.len()).min(buf.len());
        match (&*stream).read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            // A read that waited out its timeout says so as `WouldBlock` here.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

/// The most connections to the rendezvous whose lines are awaited at once beyond one for each rank; more
/// are refused (told `busy`), so that strangers cannot make the launcher start threads without bound while
/// every rank of the job still has room.
const MAX_READING: usize = 64;

/// A connection to the rendezvous, with its first line (or why none came).
type Arrival = (std::net::TcpStream, SocketAddr, std::io::Result<String>);

/// Accepts connections to the rendezvous and reads their lines side by side, each on a thread of its own
/// (a connection that sends nothing holds up no other), sending each connection with its line on
/// `arrivals`. Ends once `stop` is set, at the next connection.
fn accept_lines(
    name: &str,
    listener: TcpListener,
    ranks: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    arrivals: std::sync::mpsc::Sender<Arrival>,
) {
    let reading = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = ranks + MAX_READING;
    while let Ok((stream, from)) = listener.accept() {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if reading.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= most {
            reading.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            say(
                name,
                &format!(
                "refused a rendezvous from {from}: {most} connections are sending theirs already"
            ),
            );
            // Told, so that a rank among them says why it cannot join (not written should the
            // connection take nothing: it is dropped either way).
            let _ = stream.set_nonblocking(true);
            let _ = (&stream).write_all(b"busy\n");
            continue;
        }
        let (count, arrivals) = (reading.clone(), arrivals.clone());
        let read = std::thread::Builder::new()
            .name("dsmrun-rendezvous-line".into())
            .spawn(move || {
                // A rank sends its line at once: a connection that sends nothing, or a byte now and then,
                // must not be waited for long, nor grow without bound.
                let line = read_line_within(&stream, LINE_WITHIN, 512);
                count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                let _ = arrivals.send((stream, from, line));
            });
        if read.is_err() {
            reading.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            say(
                name,
                &format!("refused a rendezvous from {from}: no thread to read it"),
            );
        }
    }
}

/// Serves the rendezvous: collects every rank's address, then sends the full table to each. Ends early
/// once `stop` is set (and a connection wakes it): the job ended before every rank joined. A rank that
/// exits before it joined (noted in `exits`) can never join: the ranks waiting, and any that come later,
/// are told so at once, instead of waiting out their connect timeout.
pub(super) fn rendezvous(
    name: String,
    listener: TcpListener,
    ranks: usize,
    token: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    exits: Exits,
) {
    let (arrived, arrivals) = std::sync::mpsc::channel::<Arrival>();
    let stop_accepting = stop.clone();
    let accepting = std::thread::Builder::new()
        .name("dsmrun-rendezvous-accept".into())
        .spawn({
            let name = name.clone();
            move || accept_lines(&name, listener, ranks, stop_accepting, arrived)
        });
    if let Err(e) = accepting {
        // The ranks give up waiting (their connect timeout) and the launcher names them.
        say(
            &name,
            &format!("the rendezvous could not start ({e}): the ranks cannot join"),
        );
        return;
    }
    let mut conns: Vec<Option<(std::net::TcpStream, PeerAddr)>> =
        (0..ranks).map(|_| None).collect();
    let mut have = 0;
    let mut never: Option<String> = None;
    while have < ranks {
        // Ends when the acceptor has stopped and no line is still being read.
        let Ok((mut stream, from, line)) = arrivals.recv() else {
            return;
        };
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if never.is_none() {
            let mut meeting = lock(&exits);
            meeting.never = meeting
                .exited
                .iter()
                .find(|(r, _)| conns[*r].is_none())
                .cloned();
            never = (meeting.never.as_ref()).map(|(r, status)| {
                format!(
                    "ended: rank {r} {} before it joined the job",
                    describe(*status).0
                )
            });
            if let Some(why) = &never {
                for (mut s, _) in conns.iter_mut().filter_map(Option::take) {
                    let _ = writeln!(s, "{why}");
                }
            }
        }
        let Ok(line) = line else {
            say(
                &name,
                &format!("rendezvous from {from}: no line received within {LINE_WITHIN:?}"),
            );
            continue;
        };
        if line.trim() == WAKE {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (t, r, a) = (parts.next(), parts.next(), parts.next());
        let rank = r.and_then(|r| r.parse::<usize>().ok());
        let addr = a.and_then(|a| a.parse::<PeerAddr>().ok());
        if let Some(why) = &never {
            if let (Some(t), Some(r)) = (t, rank) {
                if crate::env::same_token(t, &token) && r < ranks {
                    lock(&exits).came[r] = true;
                }
            }
            let _ = writeln!(stream, "{why}");
            continue;
        }
        match (t, rank, addr) {
            (Some(t), Some(r), Some(addr))
                if crate::env::same_token(t, &token) && r < ranks && conns[r].is_none() =>
            {
                conns[r] = Some((stream, addr));
                let mut meeting = lock(&exits);
                meeting.joined[r] = Some(Instant::now());
                meeting.came[r] = true;
                have += 1;
            }
            _ => {
                say(
                    &name,
                    &format!("refused a rendezvous from {from}: wrong token, rank or address"),
                );
                let _ = (&stream).write_all(b"refused\n");
            }
        }
    }
    lock(&exits).met = true;
    let table: Vec<String> = conns.iter().flatten().map(|(_, a)| a.to_string()).collect();
    let line = table.join(" ") + "\n";
    for (mut s, _) in conns.into_iter().flatten() {
        let _ = s.write_all(line.as_bytes());
    }
}

/// Ends the rendezvous thread when dropped: sets its `stop` and connects once, to wake its `accept`.
pub(super) struct EndRendezvous {
    pub(super) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(super) at: SocketAddr,
}

impl Drop for EndRendezvous {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = std::net::TcpStream::connect_timeout(&self.at, Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback and a connection to it from a thread that sends `bytes`, one every
    /// `every`, then stays connected for a second.
    fn trickle(bytes: &'static [u8], every: Duration) -> std::net::TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            for b in bytes {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
            std::thread::sleep(Duration::from_secs(1));
        });
        listener.accept().unwrap().0
    }

    #[test]
    fn silent_connections_leave_every_rank_room_and_past_that_are_told_busy() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (arrived, arrivals) = std::sync::mpsc::channel();
        let stopping = stop.clone();
        std::thread::spawn(move || accept_lines("dsmrun", listener, 1, stopping, arrived));
        let silent: Vec<_> = (0..MAX_READING)
            .map(|_| std::net::TcpStream::connect(at).unwrap())
            .collect();
        // The job's one rank still gets its line read.
        let mut rank = std::net::TcpStream::connect(at).unwrap();
        rank.write_all(b"a rank's line\n").unwrap();
        let (_, _, line) = arrivals.recv_timeout(Duration::from_secs(3)).unwrap();
        assert_eq!(line.unwrap(), "a rank's line");
        // The rank's reader is done; one more silent connection fills the room, and the next is told.
        let _more = std::net::TcpStream::connect(at).unwrap();
        let mut late = std::net::TcpStream::connect(at).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut told = String::new();
        std::io::Read::read_to_string(&mut late, &mut told).unwrap();
        assert_eq!(told, "busy\n");
        stop.store(true, std::sync::atomic::Ordering::Release);
        drop(std::net::TcpStream::connect(at));
        drop(silent);
    }

    #[test]
    fn a_line_must_come_whole_within_its_time() {
        let s = trickle(b"0 1 127.0.0.1:5\nafter", Duration::ZERO);
        let line = read_line_within(&s, Duration::from_secs(5), 512).unwrap();
        assert_eq!(line, "0 1 127.0.0.1:5");
        // A byte every 50 ms never ends its line within 300 ms, though each read gets a byte in time.
        let s = trickle(
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            Duration::from_millis(50),
        );
        let t = Instant::now();
        let e = read_line_within(&s, Duration::from_millis(300), 512).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        // A connection that sends nothing at all: the read itself waits out the time.
        let s = trickle(b"", Duration::ZERO);
        let e = read_line_within(&s, Duration::from_millis(200), 512).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        // A line without end stops at the limit.
        let s = trickle(&[b'x'; 64], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            read_line_within(&s, Duration::from_secs(5), 16)
                .unwrap()
                .len(),
            16
        );
    }
}
