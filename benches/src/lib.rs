//! What the benchmarks share: starting themselves under the launcher, the raw transport floor (a plain
//! socket connection between the same two processes, of the kind the runtime connects them with, blocking
//! reads), percentiles, and output as a table or as one JSON object per result.
#![forbid(unsafe_code)]

use dsm::{Dsm, GlobalVec, Placement, Rank};
use dsm_runtime::launch::{launch, LaunchOptions};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// When run directly (not as a rank), launches this program as a job of `ranks` processes and exits with
/// the job's status. Returns when this process is a rank (of a `dsmrun` or an `mpirun` job).
pub fn run_as_job(ranks: usize) {
    run_as_job_of(ranks)
}

/// `run_as_job` for a size chosen on the command line.
pub fn run_as_job_of(ranks: usize) {
    // A rank already: started by dsmrun, or by mpirun (which `Runtime::init` joins through MPI).
    if dsm_runtime::started_as_rank() {
        return;
    }
    let me = std::env::current_exe().expect("the path of this benchmark");
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let opts = LaunchOptions {
        ranks,
        prefix: false,
        name: me.file_name().map_or_else(
            || me.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        ..LaunchOptions::default()
    };
    match launch(&opts, &me, &args) {
        Ok(o) => std::process::exit(o.code),
        Err(e) => {
            eprintln!("{}: {e}", me.display());
            std::process::exit(2);
        }
    }
}

/// One benchmark result beside the floor it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// What was measured.
    pub name: String,
    /// The result.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The floor measured in the same run, in the same unit.
    pub floor: f64,
    /// What the floor is.
    pub floor_name: String,
    /// value / floor.
    pub ratio: f64,
    /// The target, as a ratio to the floor or an absolute bound, when the issue states one.
    pub target: String,
}

impl Measurement {
    /// A result with its floor and target.
    pub fn new(
        name: &str,
        value: f64,
        unit: &'static str,
        floor: f64,
        floor_name: &str,
        target: &str,
    ) -> Measurement {
        Measurement {
            name: name.into(),
            value,
            unit,
            floor,
            floor_name: floor_name.into(),
            ratio: if floor > 0.0 { value / floor } else { f64::NAN },
            target: target.into(),
        }
    }

    /// The row of a floor itself: its value beside itself, marked as the floor.
    pub fn floor(name: &str, value: f64, unit: &'static str, floor_name: &str) -> Measurement {
        Measurement::new(name, value, unit, value, floor_name, "(floor)")
    }
}

/// The kind of socket the runtime connects ranks 0 and 1 with, and so the raw floor's: a Unix-domain
/// socket unless `DSM_UNIX_SOCKETS=off` or `DSM_TRANSPORT=mpi` (the ranks of a benchmark share a host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    Tcp,
    Unix,
}

impl Medium {
    /// The medium of this job's ranks, from their settings.
    pub fn of_job() -> Medium {
        let set = |var: &str, value: &str| std::env::var(var).is_ok_and(|v| v.trim() == value);
        if set("DSM_UNIX_SOCKETS", "off") || set("DSM_TRANSPORT", "mpi") {
            Medium::Tcp
        } else {
            Medium::Unix
        }
    }

    /// `raw <medium> <what>`, naming a raw measurement over this medium, such as `raw Unix-socket
    /// streaming`.
    pub fn label(self, what: &str) -> String {
        let medium = match self {
            Medium::Tcp => "TCP",
            Medium::Unix => "Unix-socket",
        };
        format!("raw {medium} {what}")
    }
}

/// [`Medium::label`] over this job's medium ([`Medium::of_job`]).
pub fn raw_label(what: &str) -> String {
    Medium::of_job().label(what)
}

/// What the benchmarks compare against: the raw round trip between ranks 0 and 1 over a socket of the
/// kind the runtime connects them with ([`Medium::of_job`]), 64 B request and 4 KiB reply with blocking
/// reads ([`RawLink::round_trips`]).
pub fn raw_round_trip() -> &'static str {
    raw_round_trip_over(Medium::of_job())
}

/// [`raw_round_trip`] over `medium`.
pub fn raw_round_trip_over(medium: Medium) -> &'static str {
    match medium {
        Medium::Tcp => "raw TCP round trip 64 B / 4 KiB",
        Medium::Unix => "raw Unix-socket round trip 64 B / 4 KiB",
    }
}

/// The table row of the floor itself: its median, in microseconds.
pub fn floor_row(median_us: f64) -> Measurement {
    floor_row_over(Medium::of_job(), median_us)
}

/// [`floor_row`] of a floor measured over `medium`.
pub fn floor_row_over(medium: Medium, median_us: f64) -> Measurement {
    Measurement::floor(
        &medium.label("round trip, median"),
        median_us,
        "us",
        raw_round_trip_over(medium),
    )
}

/// Prints the results: a readable table, or with `json` one object per line.
pub fn report(results: &[Measurement], json: bool) {
    if json {
        for m in results {
            println!("{}", serde_json::to_string(m).expect("serializable"));
        }
        return;
    }
    println!(
        "{:<44} {:>12} {:<5} {:>12}  {:<34} {:>7}  target",
        "benchmark", "value", "unit", "floor", "floor is", "ratio"
    );
    for m in results {
        println!(
            "{:<44} {:>12.2} {:<5} {:>12.2}  {:<34} {:>7.2}  {}",
            m.name, m.value, m.unit, m.floor, m.floor_name, m.ratio, m.target
        );
    }
}

/// Runs `commands` at once (stdout and stderr captured) and returns their outputs in order, once every one
/// has ended: for runs side by side. If one cannot start, those already started are stopped and waited for,
/// so that none outlives the benchmark. Failed runs are the caller's to judge, from their status.
pub fn run_together(
    commands: &mut [std::process::Command],
) -> anyhow::Result<Vec<std::process::Output>> {
    use std::process::Stdio;
    let mut children = Vec::with_capacity(commands.len());
    for cmd in commands.iter_mut() {
        match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for mut child in children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(anyhow::Error::new(e).context(format!("starting {cmd:?}")));
            }
        }
    }
    // Every run is waited for before any error is returned.
    let outputs: Vec<_> = children.into_iter().map(|c| c.wait_with_output()).collect();
    outputs
        .into_iter()
        .map(|o| o.map_err(|e| anyhow::Error::new(e).context("waiting for a run")))
        .collect()
}

/// A count given on the command line, which must be at least 1 (`#[arg(value_parser = at_least_one::<usize>)]`).
pub fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    at_least(s, 1, "must be at least 1")
}

/// A number of ranks given on the command line, for a benchmark that needs at least two.
pub fn two_or_more_ranks(s: &str) -> Result<usize, String> {
    at_least(
        s,
        2,
        "this benchmark measures between ranks: give at least 2",
    )
}

/// A whole number given on the command line, refused with `why` below `min`.
fn at_least<T: std::str::FromStr + PartialOrd + From<u8>>(
    s: &str,
    min: u8,
    why: &str,
) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(min) => Ok(n),
        Ok(_) => Err(why.into()),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// The `q` quantile (0..=1) of `samples`, which it sorts; NaN when there are none.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}

/// Microseconds of a duration.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// MiB/s at which this process gets fresh 4 KiB pages from the kernel: `bytes` of newly mapped memory
/// touched once per page (a page fault and a zeroed page each; transparent huge pages are used here only
/// where a program asks for them). Every page a rank installs from another rank is such a fresh page, so
/// this rate, which on a virtual machine varies with the host, bounds how fast pages can arrive.
pub fn fresh_page_rate(bytes: usize) -> f64 {
    let t = Instant::now();
    // A zeroed allocation this large is a new anonymous mapping, not yet touched.
    let mut fresh = vec![0u8; bytes];
    for i in (0..bytes).step_by(dsm::PAGE_SIZE) {
        fresh[i] = 1;
    }
    std::hint::black_box(&fresh);
    let secs = t.elapsed().as_secs_f64();
    bytes as f64 / (1 << 20) as f64 / secs
}

/// A byte stream both ways: a TCP or a Unix-domain socket.
pub trait Duplex: Read + Write + std::fmt::Debug + Send {}

impl Duplex for TcpStream {}

impl Duplex for UnixStream {}

/// A plain socket connection between rank 0 (client) and rank 1 (server), set up through shared memory:
/// the floor that the DSM's own costs are compared with.
#[derive(Debug)]
pub enum RawLink {
    /// Rank 0's end.
    Client(Box<dyn Duplex>),
    /// Rank 1's end.
    Server(Box<dyn Duplex>),
    /// Ranks other than 0 and 1.
    None,
}

/// Connects rank 0 and rank 1 with a socket of the kind the runtime connects them with
/// ([`Medium::of_job`]).
pub fn raw_link(dsm: &Dsm) -> anyhow::Result<RawLink> {
    raw_link_over(dsm, Medium::of_job())
}

/// Connects rank 0 and rank 1 over `medium`: loopback TCP (`TCP_NODELAY`), or a Unix-domain socket
/// with a random abstract name as the runtime binds its own (`dsm::transport::tcp::bind_unix`); the port
/// or the name goes through a region.
pub fn raw_link_over(dsm: &Dsm, medium: Medium) -> anyhow::Result<RawLink> {
    let me = dsm.rank();
    let mut ends = meet(dsm, medium, Rank(1), me == Rank(0), 1)?;
    Ok(match (me, ends.pop()) {
        (Rank(0), Some(end)) => RawLink::Client(end),
        (_, Some(end)) => RawLink::Server(end),
        _ => RawLink::None,
    })
}

/// Connects the ranks for which `connects` is true to rank `center`, which accepts `accepts`
/// connections, over `medium`; the listener's port or name goes through a region. Returns `center`'s
/// ends, a connecting rank's one end, or none.
fn meet(
    dsm: &Dsm,
    medium: Medium,
    center: Rank,
    connects: bool,
    accepts: usize,
) -> anyhow::Result<Vec<Box<dyn Duplex>>> {
    let address: GlobalVec<'_, u8> = dsm.alloc_vec_with(ADDRESS_BYTES, Placement::At(center))?;
    let listener = if dsm.rank() == center {
        Some(RawListener::bind(medium, &address)?)
    } else {
        None
    };
    dsm.barrier()?;
    let ends = match (listener, connects) {
        (Some(l), _) => (0..accepts)
            .map(|_| l.accept())
            .collect::<anyhow::Result<_>>()?,
        (None, true) => vec![raw_connect(medium, &address)?],
        (None, false) => Vec::new(),
    };
    dsm.barrier()?;
    Ok(ends)
}

/// A port, or a Unix socket name's 32 hex digits, as it goes through a region.
const ADDRESS_BYTES: usize = 32;

/// A listener of a raw link, whose address its rank wrote in a region.
enum RawListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl RawListener {
    fn bind(medium: Medium, address: &GlobalVec<'_, u8>) -> anyhow::Result<RawListener> {
        Ok(match medium {
            Medium::Tcp => {
                let l = TcpListener::bind("127.0.0.1:0")?;
                address.write_slice(0, &l.local_addr()?.port().to_le_bytes());
                RawListener::Tcp(l)
            }
            Medium::Unix => {
                let (l, name) = dsm::transport::tcp::bind_unix()?;
                address.write_slice(0, name.to_string().as_bytes());
                RawListener::Unix(l)
            }
        })
    }

    fn accept(&self) -> anyhow::Result<Box<dyn Duplex>> {
        Ok(match self {
            RawListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            RawListener::Unix(l) => Box::new(l.accept()?.0),
        })
    }
}

/// Connects to the listener whose address is in `address` (`RawListener::bind`).
fn raw_connect(medium: Medium, address: &GlobalVec<'_, u8>) -> anyhow::Result<Box<dyn Duplex>> {
    Ok(match medium {
        Medium::Tcp => {
            let port = u16::from_le_bytes([address.get(0), address.get(1)]);
            let s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Medium::Unix => {
            let mut hex = [0u8; ADDRESS_BYTES];
            address.read_slice(0, &mut hex);
            let name: dsm::transport::tcp::UnixName = std::str::from_utf8(&hex)?
                .parse()
                .map_err(|e: String| anyhow::anyhow!(e))?;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.socket_name())?;
            Box::new(UnixStream::connect_addr(&addr)?)
        }
    })
}

/// Plain sockets from every rank to rank 0, of the kind the runtime connects ranks with
/// ([`Medium::of_job`]): a central barrier with no runtime around it, which the runtime's barrier is
/// compared with. (Its reads block, as the raw round trip's do: where the runtime's waits poll first, at
/// no more ranks than cores, the runtime's barrier can be the faster.)
#[derive(Debug)]
pub enum RawStar {
    /// Rank 0's ends, one for each other rank.
    Center(Vec<Box<dyn Duplex>>),
    /// Another rank's end.
    Point(Box<dyn Duplex>),
}

/// Connects every rank to rank 0 ([`RawStar`]).
pub fn raw_star(dsm: &Dsm) -> anyhow::Result<RawStar> {
    let center = dsm.rank() == Rank(0);
    let mut ends = meet(dsm, Medium::of_job(), Rank(0), !center, dsm.size() - 1)?;
    if center {
        return Ok(RawStar::Center(ends));
    }
    let end = ends.pop().expect("a connecting rank has its one end");
    Ok(RawStar::Point(end))
}

impl RawStar {
    /// `n` barriers with nothing but the sockets: every other rank sends rank 0 a byte and waits for one;
    /// rank 0 reads a byte from each, then sends each one. Returns the mean time of a barrier in
    /// microseconds.
    pub fn barriers(&mut self, n: usize) -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut byte = [0u8; 1];
        for _ in 0..n {
            match self {
                RawStar::Center(points) => {
                    for p in points.iter_mut() {
                        p.read_exact(&mut byte)?;
                    }
                    for p in points.iter_mut() {
                        p.write_all(&byte)?;
                    }
                }
                RawStar::Point(center) => {
                    center.write_all(&byte)?;
                    center.read_exact(&mut byte)?;
                }
            }
        }
        Ok(us(t.elapsed()) / n as f64)
    }
}

/// Plain sockets between every two ranks, of the kind the runtime connects ranks with
/// ([`Medium::of_job`]), for a dissemination barrier with no runtime around it: the other way to meet,
/// beside the central one ([`RawStar`]). In round `r` each rank writes a byte to rank `me + 2^r` and reads
/// one from rank `me - 2^r` (mod the size), so every rank knows of every other's arrival after
/// `ceil(log2 size)` rounds, with no rank in the middle.
#[derive(Debug)]
pub struct RawMesh {
    /// The end to each other rank, by rank (none for this rank's own).
    ends: Vec<Option<Box<dyn Duplex>>>,
    me: usize,
}

/// Connects every two ranks ([`RawMesh`]): each rank in turn accepts a connection from every rank below
/// it, which names itself with its first byte.
pub fn raw_mesh(dsm: &Dsm) -> anyhow::Result<RawMesh> {
    let (me, n) = (dsm.rank().index(), dsm.size());
    // Each rank names itself to the ranks above it with one byte.
    let name = u8::try_from(me)
        .map_err(|_| anyhow::anyhow!("a mesh of bare sockets connects at most 256 ranks"))?;
    let mut ends: Vec<Option<Box<dyn Duplex>>> = (0..n).map(|_| None).collect();
    for center in 0..n {
        let got = meet(
            dsm,
            Medium::of_job(),
            Rank(center as u32),
            me < center,
            center,
        )?;
        if me == center {
            for mut end in got {
                let mut who = [0u8; 1];
                end.read_exact(&mut who)?;
                ends[usize::from(who[0])] = Some(end);
            }
        } else if let Some(mut end) = got.into_iter().next() {
            end.write_all(&[name])?;
            ends[center] = Some(end);
        }
    }
    dsm.barrier()?;
    Ok(RawMesh { ends, me })
}

impl RawMesh {
    /// The socket to rank `r`.
    fn end(&mut self, r: usize) -> anyhow::Result<&mut Box<dyn Duplex>> {
        self.ends[r]
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no socket to rank {r}"))
    }

    /// `n` dissemination barriers with nothing but the sockets (blocking reads, as [`RawStar`]'s). Returns
    /// the mean time of a barrier in microseconds.
    pub fn barriers(&mut self, n: usize) -> anyhow::Result<f64> {
        let size = self.ends.len();
        let mut byte = [0u8; 1];
        let t = Instant::now();
        for _ in 0..n {
            let mut step = 1;
            while step < size {
                let (to, from) = ((self.me + step) % size, (self.me + size - step) % size);
                self.end(to)?.write_all(&byte)?;
                self.end(from)?.read_exact(&mut byte)?;
                step *= 2;
            }
        }
        Ok(us(t.elapsed()) / n as f64)
    }
}

impl RawLink {
    /// `n` round trips of a `request`-byte request and a `reply`-byte reply with blocking reads; rank 0
    /// returns the round-trip times in microseconds.
    pub fn round_trips(
        &mut self,
        n: usize,
        request: usize,
        reply: usize,
    ) -> anyhow::Result<Vec<f64>> {
        let mut req = vec![1u8; request];
        let mut rep = vec![2u8; reply];
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            match self {
                RawLink::Client(s) => {
                    let t = Instant::now();
                    s.write_all(&req)?;
                    s.read_exact(&mut rep)?;
                    times.push(us(t.elapsed()));
                }
                RawLink::Server(s) => {
                    s.read_exact(&mut req)?;
                    s.write_all(&rep)?;
                }
                RawLink::None => {}
            }
        }
        Ok(times)
    }

    /// Streams `bytes` from rank 1 to rank 0 in 64 KiB writes; rank 0 returns MiB/s.
    pub fn stream(&mut self, bytes: usize) -> anyhow::Result<f64> {
        let mut buf = vec![3u8; 64 << 10];
        match self {
            RawLink::Client(s) => {
                let t = Instant::now();
                let mut got = 0;
                while got < bytes {
                    let n = s.read(&mut buf)?;
                    anyhow::ensure!(n > 0, "the raw stream ended early");
                    got += n;
                }
                s.write_all(&[0])?;
                Ok(bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
            }
            RawLink::Server(s) => {
                let mut sent = 0;
                while sent < bytes {
                    let n = buf.len().min(bytes - sent);
                    s.write_all(&buf[..n])?;
                    sent += n;
                }
                s.read_exact(&mut buf[..1])?;
                Ok(0.0)
            }
            RawLink::None => Ok(0.0),
        }
    }
}

/// Under `mpirun` (built with the `mpi` feature): `n` raw MPI round trips between ranks 0 and 1, a
/// `request`-byte message answered by a `reply`-byte one, timed on rank 0 in microseconds (rank 1 answers
/// and gets an empty list). `None` when the job was not started through MPI. Both ranks call it.
pub fn mpi_round_trips(n: usize, request: usize, reply: usize) -> Option<Vec<f64>> {
    #[cfg(feature = "mpi")]
    {
        use mpi::traits::{Communicator, Destination, Source};
        // A tag of its own: the MPI transport's messages (tags from 32000) must not be taken here.
        const TAG: i32 = 7;
        if !mpi::environment::is_initialized() {
            return None;
        }
        let world = mpi::topology::SimpleCommunicator::world();
        let (mut ask, mut answer) = (vec![0u8; request], vec![0u8; reply]);
        let mut samples = Vec::new();
        match world.rank() {
            0 => {
                let peer = world.process_at_rank(1);
                for _ in 0..n {
                    let t = Instant::now();
                    peer.send_with_tag(&ask[..], TAG);
                    peer.receive_into_with_tag(&mut answer[..], TAG);
                    samples.push(us(t.elapsed()));
                }
            }
            1 => {
                let peer = world.process_at_rank(0);
                for _ in 0..n {
                    peer.receive_into_with_tag(&mut ask[..], TAG);
                    peer.send_with_tag(&answer[..], TAG);
                }
            }
            _ => {}
        }
        Some(samples)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (n, request, reply);
        None
    }
}
