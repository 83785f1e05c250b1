//! Word count on the MapReduce engine: words are maximal runs of ASCII letters and apostrophes, compared
//! case-insensitively (lower case in the output). Prints the most frequent words and, with `--output DIR`,
//! writes every word's count (`word<TAB>count`, one file per partition, keys sorted).
//!
//! Without inputs it counts a sample text that ships with the project (Ambrose Bierce's The Devil's
//! Dictionary, in the public domain). Runs as one rank, under `dsmrun -n N`, or spawns its own ranks with
//! `--procs N`.
//!
//! Run: `wordcount --procs 2 big.txt docs/ --output counts --top 20`

use anyhow::Context;
use clap::Parser;
use dsm_mapreduce::{Combiner, Counters, Emitter, Job, JobConfig, MapReduce, ProgressMode, Record};
use dsm_runtime::launch::{launch, LaunchOptions};
use dsm_runtime::{Runtime, TupleSpace};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The sample text counted when no input is given.
const SAMPLE: &[u8] = include_bytes!("../../data/devils-dictionary.txt");

#[derive(Debug, Parser)]
struct Args {
    /// Input files or directories (default: the sample text).
    inputs: Vec<PathBuf>,
    /// Write every word's count into this directory (it must not exist, unless --overwrite).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Replace the part files of an existing output directory.
    #[arg(long)]
    overwrite: bool,
    /// How many of the most frequent words to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Start this many ranks on this machine (instead of running under dsmrun or mpirun).
    #[arg(long)]
    procs: Option<usize>,
    /// With --procs: keep going when a worker rank dies (its tasks are done again by the others).
    #[arg(long)]
    keep_going: bool,
    /// Reduce partitions (output files); default one per task slot: ranks x threads.
    #[arg(long)]
    partitions: Option<usize>,
    /// Split size in bytes.
    #[arg(long, default_value_t = dsm_mapreduce::DEFAULT_SPLIT_SIZE)]
    split_size: u64,
    /// Memory a rank's map output may take before it is spilled to disk, in bytes.
    #[arg(long, default_value_t = dsm_mapreduce::DEFAULT_MEMORY_BUDGET)]
    memory_budget: u64,
    /// The most runs a reduce merges at once (more are merged in passes; lower it when open files are few).
    #[arg(long, default_value_t = dsm_mapreduce::DEFAULT_MERGE_FAN_IN)]
    merge_fan_in: usize,
    /// Threads per rank (default: the cores shared among the ranks).
    #[arg(long)]
    threads: Option<usize>,
    /// Where ranks keep map output (default: the system's temporary directory).
    #[arg(long)]
    spill_dir: Option<PathBuf>,
    /// Print no summary and no progress.
    #[arg(long)]
    quiet: bool,
    /// Every rank prints its peak resident memory at the end (for checking the memory budget).
    #[arg(long)]
    peak_memory: bool,
    /// For fault-tolerance tests: this rank kills itself (SIGKILL) after mapping --die-after lines, or
    /// after reducing --die-after-keys keys.
    #[arg(long, hide = true, requires = "dying")]
    die_rank: Option<u32>,
    /// See --die-rank.
    #[arg(long, hide = true, group = "dying")]
    die_after: Option<u64>,
    /// See --die-rank.
    #[arg(long, hide = true, group = "dying")]
    die_after_keys: Option<u64>,
}

/// The word alphabet: ASCII letters and the apostrophe.
const fn word_bytes() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphabetic() || b == b'\'' as usize;
        b += 1;
    }
    t
}
static WORD: [bool; 256] = word_bytes();

/// A word as a map key: up to 15 bytes held inline (all but about one word in 2000 of English text),
/// longer ones on the heap. Inline words compare and hash as two machine words, without following a
/// pointer or calling `memcmp`, which is what the map's hash table spends its time on; and a word is 24
/// bytes, so that a table entry (word and count) is 32 and never straddles two cache lines: against 23
/// bytes inline in three words (40-byte entries), the map phase of the 100 MB benchmark is about 8%
/// faster. The bytes are packed big-endian, zero-padded, with the length last, so comparing the words
/// orders the words' bytes lexicographically.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Word {
    Inline([u64; 2]),
    Long(Box<[u8]>),
}

const INLINE: usize = 15;

impl Word {
    /// The word of `bytes`, as they are (a key read back from a run).
    fn new(bytes: &[u8]) -> Word {
        Word::pack(bytes, |b| b)
    }

    /// The word of `bytes` (letters and apostrophes) in lower case.
    fn lowercase(bytes: &[u8]) -> Word {
        Word::pack(bytes, |b| b.to_ascii_lowercase())
    }

    /// Packs `bytes`, each through `each`. An inline word's bytes go into its array one by one: a
    /// `copy_from_slice` of a few bytes is a call to `memmove`, which took 7% of a map's time.
    fn pack(bytes: &[u8], each: impl Fn(u8) -> u8) -> Word {
        if bytes.len() > INLINE {
            return Word::Long(bytes.iter().map(|&b| each(b)).collect());
        }
        let mut b = [0u8; 16];
        for (to, &from) in b.iter_mut().zip(bytes) {
            *to = each(from);
        }
        b[INLINE] = bytes.len() as u8;
        let word =
            |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Word::Inline([word(0), word(1)])
    }

    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Word::Inline(w) => {
                let mut b = [0u8; 16];
                for (i, x) in w.iter().enumerate() {
                    b[i * 8..i * 8 + 8].copy_from_slice(&x.to_be_bytes());
                }
                f(&b[..b[INLINE] as usize])
            }
            Word::Long(b) => f(b),
        }
    }
}

impl Ord for Word {
    /// Inline words compare as three machine words, in line in the sort and the merge that call this
    /// for every pair they move (a call per comparison took a third of a seal's sort).
    #[inline]
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Word::Inline(a), Word::Inline(b)) => a[0].cmp(&b[0]).then(a[1].cmp(&b[1])),
            _ => self.cmp_bytes(other),
        }
    }
}

impl Word {
    /// Compares by bytes: a long word with any word.
    #[cold]
    #[inline(never)]
    fn cmp_bytes(&self, other: &Word) -> std::cmp::Ordering {
        self.with_bytes(|a| other.with_bytes(|b| a.cmp(b)))
    }
}

impl PartialOrd for Word {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A word of the input is letters and apostrophes; one read back from elsewhere may be anything.
        self.with_bytes(|b| match std::str::from_utf8(b) {
            Ok(s) => f.write_str(s),
            Err(_) => f.write_str(&String::from_utf8_lossy(b)),
        })
    }
}

impl std::fmt::Debug for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with_bytes(|b| write!(f, "{:?}", String::from_utf8_lossy(b)))
    }
}

impl Serialize for Word {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.with_bytes(|b| s.serialize_bytes(b))
    }
}

impl<'de> Deserialize<'de> for Word {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Word, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Word;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the bytes of a word")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Word, E> {
                Ok(Word::new(v))
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

struct WordCount {
    /// Lines mapped by this rank, and the line count at which it dies (tests of fault tolerance).
    lines: AtomicU64,
    die_after: Option<u64>,
    /// Keys reduced by this rank, and the count at which it dies.
    keys: AtomicU64,
    die_after_keys: Option<u64>,
}

/// Ends this process as a crash would (tests of fault tolerance).
fn die_if_past(count: &AtomicU64, limit: Option<u64>) {
    if let Some(limit) = limit {
        if count.fetch_add(1, Ordering::Relaxed) >= limit {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Job for WordCount {
    type Key = Word;
    type Value = u64;
    type Output = u64;

    fn map(&self, record: &Record<'_>, emit: &mut Emitter<'_, Word, u64>) {
        die_if_past(&self.lines, self.die_after);
        let line = record.line;
        let mut words = 0;
        let mut i = 0;
        while i < line.len() {
            while i < line.len() && !WORD[line[i] as usize] {
                i += 1;
            }
            let start = i;
            while i < line.len() && WORD[line[i] as usize] {
                i += 1;
            }
            if i > start {
                emit.emit(Word::lowercase(&line[start..i]), 1);
                words += 1;
            }
        }
        emit.count("lines", 1);
        emit.count("words", words);
    }

    fn combiner(&self) -> Option<Combiner<u64>> {
        Some(|total, n| *total += n)
    }

    fn reduce(&self, _word: &Word, counts: Vec<u64>, counters: &mut Counters) -> Option<u64> {
        die_if_past(&self.keys, self.die_after_keys);
        counters.add("distinct words", 1);
        Some(counts.iter().sum())
    }
}

/// A new, empty directory for a job's counts under the temporary directory (`dsm-wordcount-PID-N`), made
/// here, so that removing it at the end removes nothing of anyone else's. Beside it, `dsm-wordcount-PID-N.lock`
/// is locked while this process lives: a run ended before it could remove its directory (interrupted, or
/// ended because another rank failed) leaves both, and the next run removes them.
#[derive(Debug)]
struct TemporaryOutput {
    dir: PathBuf,
    lock: PathBuf,
    _held: Flock<std::fs::File>,
}

impl TemporaryOutput {
    fn new() -> anyhow::Result<TemporaryOutput> {
        let base = std::env::temp_dir();
        remove_dead_runs_outputs(&base);
        for n in 0..1000 {
            let name = format!("dsm-wordcount-{}-{n}", std::process::id());
            let (dir, lock) = (base.join(&name), base.join(format!("{name}.lock")));
            // The lock first: a directory without one is another's being made, and is left alone.
            let file = match std::fs::File::create_new(&lock) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("making the file {}", lock.display()))
                }
            };
            let held = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| e)
                .with_context(|| format!("locking {}", lock.display()))?;
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    return Ok(TemporaryOutput {
                        dir,
                        lock,
                        _held: held,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let _ = std::fs::remove_file(&lock);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&lock);
                    return Err(e)
                        .with_context(|| format!("making the directory {}", dir.display()));
                }
            }
        }
        anyhow::bail!(
            "could not make a new directory for the counts under {}: give one with --output",
            base.display()
        )
    }
}

impl Drop for TemporaryOutput {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // With the lock still held: nobody takes the directory for a dead run's meanwhile.
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Removes, under `base`, the counts directories of runs whose process has gone (its pid is not running
/// here) and whose lock nobody holds (a process in another PID namespace sharing the directory holds its
/// own).
fn remove_dead_runs_outputs(base: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(run) = name
            .strip_prefix("dsm-wordcount-")
            .and_then(|rest| rest.strip_suffix(".lock"))
        else {
            continue;
        };
        let Some(Ok(pid)) = run.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        if let Ok(_taken) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            let _ = std::fs::remove_dir_all(base.join(format!("dsm-wordcount-{run}")));
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The modification time of every copy of the sample text, whichever rank writes it. A job checks that
/// its inputs keep the length and modification time the master saw (`dsm_mapreduce::input`), and each
/// rank writes the sample where it reads it: ranks on other hosts have copies of their own, and on one
/// host a rank may replace the file after the master has cut it.
const SAMPLE_MODIFIED: std::time::Duration = std::time::Duration::from_secs(1_700_000_000);

/// The sample text at a path this rank can read (written once, atomically, with the same modification
/// time everywhere).
fn sample_path() -> anyhow::Result<PathBuf> {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("dsm-wordcount-sample-{}.txt", SAMPLE.len()));
    let modified = std::time::UNIX_EPOCH + SAMPLE_MODIFIED;
    let current = std::fs::metadata(&path).and_then(|m| m.modified()).ok() == Some(modified)
        && std::fs::read(&path).ok().as_deref() == Some(SAMPLE);
    if !current {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(SAMPLE)?;
            f.set_modified(modified)
        });
        written.with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(path)
}

/// The `top` most frequent words in the part files of `dir`: by count, then alphabetically. Keeps only
/// the best `top` seen so far (the worst of them on top of a heap), so that a word is copied only when it
/// enters them: sorting every distinct word took a tenth of the whole job on the 100 MB corpus.
fn top_words(dir: &Path, parts: &[PathBuf], top: usize) -> anyhow::Result<Vec<(u64, String)>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if top == 0 {
        return Ok(Vec::new());
    }
    // Ordered so that the greatest entry is the worst: the lowest count, then the latest word.
    // The heap grows with what it holds, not with `top` (which may be far above the words there are).
    let mut best: BinaryHeap<(Reverse<u64>, String)> = BinaryHeap::new();
    // Read a line at a time: a part file can be as large as the vocabulary, and this rank's memory
    // (reported with --peak-memory) is the job's, not the output's.
    let mut line = String::new();
    for p in parts {
        let reading = || format!("reading {} in {}", p.display(), dir.display());
        let mut file = std::io::BufReader::new(std::fs::File::open(p).with_context(reading)?);
        loop {
            line.clear();
            if std::io::BufRead::read_line(&mut file, &mut line).with_context(reading)? == 0 {
                break;
            }
            let (word, count) = line
                .trim_end_matches('\n')
                .split_once('\t')
                .with_context(|| format!("a line without a tab in {}", p.display()))?;
            let count: u64 = count
                .parse()
                .with_context(|| format!("a count that is not a number in {}", p.display()))?;
            let enters = match best.peek() {
                _ if best.len() < top => true,
                Some((Reverse(worst), worst_word)) => {
                    count > *worst || (count == *worst && word < worst_word.as_str())
                }
                None => true,
            };
            if enters {
                best.push((Reverse(count), word.to_string()));
                if best.len() > top {
                    best.pop();
                }
            }
        }
    }
    Ok(best
        .into_sorted_vec()
        .into_iter()
        .map(|(Reverse(count), word)| (count, word))
        .collect())
}

/// The peak resident memory of this process (VmHWM), in KiB.
fn peak_resident_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM line")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}

/// Runs this program again as `procs` ranks, without `--procs`.
fn spawn(procs: usize, keep_going: bool, config: &JobConfig) -> anyhow::Result<i32> {
    // A mistyped input or an output that exists is said here, once, instead of by every rank.
    config.validate()?;
    let args = rank_args(std::env::args_os().skip(1));
    let opts = LaunchOptions {
        ranks: procs,
        keep_going,
        name: "wordcount".into(),
        bind: LaunchOptions::bind_from_env()?,
        ..LaunchOptions::default()
    };
    let exe = std::env::current_exe().context("finding this program")?;
    // A job that failed has been said by the launcher ("wordcount: rank 1 ...").
    Ok(launch(&opts, &exe, &args)?.code)
}

/// The command line of a rank that `--procs` starts: this one's (`given`, without the program) without
/// `--procs N` and `--keep-going`, which are the launcher's. Past `--` every argument is an input, kept
/// whatever its name.
fn rank_args(mut given: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut args = Vec::new();
    while let Some(a) = given.next() {
        match a.to_str() {
            Some("--") => {
                args.push(a);
                args.extend(given.by_ref());
            }
            Some("--procs") => {
                given.next();
            }
            Some("--keep-going") => {}
            Some(s) if s.starts_with("--procs=") => {}
            _ => args.push(a),
        }
    }
    args
}

/// The inputs the command line names, or the sample text when it names none.
fn inputs(args: &Args) -> anyhow::Result<Vec<PathBuf>> {
    if args.inputs.is_empty() {
        Ok(vec![sample_path()?])
    } else {
        Ok(args.inputs.clone())
    }
}

/// The job the command line asks for, writing into `output`.
fn job_config(args: &Args, inputs: &[PathBuf], output: &Path, overwrite: bool) -> JobConfig {
    let mut config = JobConfig::new(output)
        .inputs(inputs)
        .overwrite(overwrite)
        .split_size(args.split_size)
        .memory_budget(args.memory_budget)
        .merge_fan_in(args.merge_fan_in)
        .progress(if args.quiet {
            ProgressMode::Never
        } else {
            ProgressMode::Auto
        });
    if let Some(p) = args.partitions {
        config = config.partitions(p);
    }
    if let Some(t) = args.threads {
        config = config.threads(t);
    }
    config
}

fn main() {
    dsm_examples::exit_on_error("wordcount", run());
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(procs) = args.procs {
        anyhow::ensure!(
            !dsm_runtime::started_as_rank(),
            "--procs starts ranks itself: leave it out under dsmrun or mpirun"
        );
        anyhow::ensure!(procs >= 1, "--procs must be at least 1");
        // Without --output, rank 0 makes a directory of its own: there is none to look at yet.
        let config = match &args.output {
            Some(o) => job_config(&args, &inputs(&args)?, o, args.overwrite),
            None => job_config(&args, &inputs(&args)?, &std::env::temp_dir(), true),
        };
        std::process::exit(spawn(procs, args.keep_going, &config)?);
    }
    anyhow::ensure!(
        !args.keep_going,
        "--keep-going goes with --procs (the ranks it starts); under dsmrun, give it to dsmrun instead: dsmrun --keep-going -n N wordcount ..."
    );
    let rt = Runtime::init()?;
    let space = TupleSpace::join(&rt)?;
    let mr = match &args.spill_dir {
        Some(d) => MapReduce::with_spill_dir(&space, d)?,
        None => MapReduce::new(&space)?,
    };
    let inputs = inputs(&args)?;
    // Without --output the counts go to a directory that rank 0 makes, new, and removes at the end (the
    // master's output directory is the job's: the other ranks' goes unused).
    let temporary = match &args.output {
        None if rt.rank().0 == 0 => Some(TemporaryOutput::new()?),
        _ => None,
    };
    let output = match (&args.output, &temporary) {
        (Some(o), _) => o.clone(),
        (None, Some(t)) => t.dir.clone(),
        (None, None) => std::env::temp_dir(),
    };
    let config = job_config(
        &args,
        &inputs,
        &output,
        args.overwrite || temporary.is_some(),
    );
    let dies = args.die_rank == Some(rt.rank().0);
    let job = WordCount {
        lines: AtomicU64::new(0),
        die_after: args.die_after.filter(|_| dies),
        keys: AtomicU64::new(0),
        die_after_keys: args.die_after_keys.filter(|_| dies),
    };
    let report = mr.run(&job, &config);
    let shown = report.map_err(anyhow::Error::from).and_then(|report| {
        let Some(report) = report else {
            return Ok(());
        };
        if args.top > 0 {
            for (count, word) in top_words(&output, &report.output_files, args.top)? {
                dsm_examples::outln!("{count:>10} {word}")?;
            }
        }
        if !args.quiet {
            dsm_examples::outln!("{report}")?;
        }
        Ok(())
    });
    drop(temporary);
    shown?;
    if args.peak_memory {
        dsm_examples::outln!(
            "{} peak resident memory: {} KiB",
            rt.rank(),
            peak_resident_kib().context("reading /proc/self/status")?
        )?;
    }
    drop(mr);
    drop(space);
    rt.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_inline_and_long_order_and_compare_as_their_bytes() {
        // Lengths on both sides of the inline limit, shared prefixes, bytes a run may hold (0, 255).
        let mut all: Vec<Vec<u8>> = vec![vec![], vec![0], vec![255], b"a\0".to_vec()];
        for len in [1, 7, 8, 9, 14, 15, 16, 17, 23, 24, 40] {
            for last in [b'a', b'z', b'\''] {
                let mut w = vec![b'm'; len];
                w[len - 1] = last;
                all.push(w.clone());
                w.insert(0, b'b');
                all.push(w);
            }
        }
        assert_eq!(std::mem::size_of::<(Word, u64)>(), 32);
        for a in &all {
            let wa = Word::new(a);
            assert_eq!(wa.with_bytes(<[u8]>::to_vec), *a);
            assert_eq!(
                format!("{wa:?}"),
                format!("{:?}", String::from_utf8_lossy(a))
            );
            for b in &all {
                let wb = Word::new(b);
                assert_eq!(wa.cmp(&wb), a.cmp(b), "{a:?} against {b:?}");
                assert_eq!(wa == wb, a == b, "{a:?} against {b:?}");
            }
        }
        assert_eq!(Word::lowercase(b"Don'T"), Word::new(b"don't"));
    }

    #[test]
    fn the_ranks_procs_starts_get_the_command_line_without_the_launchers_flags() {
        let given = |a: &[&str]| rank_args(a.iter().map(OsString::from));
        let want = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            given(&[
                "--procs",
                "2",
                "a.txt",
                "--keep-going",
                "--procs=3",
                "--top",
                "5"
            ]),
            want(&["a.txt", "--top", "5"])
        );
        // Past `--`, inputs whose names look like the launcher's flags are inputs.
        assert_eq!(
            given(&["--procs", "2", "--", "--procs", "--keep-going", "b"]),
            want(&["--", "--procs", "--keep-going", "b"])
        );
    }

    #[test]
    fn a_temporary_output_directory_is_always_a_new_one_and_goes_with_its_run() {
        // Another job's directory under the name this process would try first stays as it is.
        let theirs = std::env::temp_dir().join(format!("dsm-wordcount-{}-0", std::process::id()));
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join("part-00000"), "theirs\t1\n").unwrap();
        let mine = TemporaryOutput::new().unwrap();
        assert_ne!(mine.dir, theirs);
        assert_eq!(std::fs::read_dir(&mine.dir).unwrap().count(), 0, "made new");
        assert_eq!(
            std::fs::read_to_string(theirs.join("part-00000")).unwrap(),
            "theirs\t1\n"
        );
        let (dir, lock) = (mine.dir.clone(), mine.lock.clone());
        std::fs::write(dir.join("part-00000"), "a\t1\n").unwrap();
        drop(mine);
        assert!(!dir.exists() && !lock.exists());
        std::fs::remove_dir_all(&theirs).unwrap();
    }

    #[test]
    fn the_counts_of_a_run_that_died_are_removed_by_the_next_and_a_live_runs_are_kept() {
        let base = std::env::temp_dir().join(format!("dsm-wc-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        // A run that died: a process that has exited (its pid is gone), its lock free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_dir = base.join(format!("dsm-wordcount-{dead}-0"));
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("part-00000"), "a\t1\n").unwrap();
        std::fs::write(base.join(format!("dsm-wordcount-{dead}-0.lock")), "").unwrap();
        // A live run: this process, holding its lock.
        let live_dir = base.join(format!("dsm-wordcount-{}-0", std::process::id()));
        std::fs::create_dir(&live_dir).unwrap();
        let live_lock = base.join(format!("dsm-wordcount-{}-0.lock", std::process::id()));
        let held = Flock::lock(
            std::fs::File::create(&live_lock).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        // One whose lock is held, though its pid is not running here (another PID namespace's).
        let other_dir = base.join(format!("dsm-wordcount-{dead}-1"));
        std::fs::create_dir(&other_dir).unwrap();
        let other_lock = base.join(format!("dsm-wordcount-{dead}-1.lock"));
        let other = Flock::lock(
            std::fs::File::create(&other_lock).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        remove_dead_runs_outputs(&base);
        assert!(!dead_dir.exists(), "a dead run's counts stayed");
        assert!(!base.join(format!("dsm-wordcount-{dead}-0.lock")).exists());
        assert!(live_dir.exists() && live_lock.exists() && other_dir.exists());
        drop((held, other));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
