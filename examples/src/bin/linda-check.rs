//! Multi-process checks of the tuple space, run by the tests under `dsmrun`:
//!
//! - `exactly-once --tuples N`: every rank puts its share of N numbered tuples into four queues while every
//!   rank takes its share out of each; rank 0 gathers each rank's count, sum and sum of squares and checks
//!   that every tuple was taken exactly once.
//! - `home-dies`: rank 0 waits in `in` for a tuple homed at rank 1, and rank 1 dies; the `in` must return
//!   an error naming rank 1 (run with `dsmrun --keep-going`). Then, with every channel a waiting call may
//!   take held by other threads' `in`s at rank 2, one more `in` homed at rank 1 must fail too, instead of
//!   waiting for ever for a channel (run with 3 ranks and the default `DSM_CHANNELS`, 4).
//! - `farm --tasks N [--near] [--die-rank R --die-after K]`: a task farm with rank 0 as master; rank R dies
//!   while it holds its K-th task (after a pause in which the others run out of tasks and wait), and rank 0
//!   checks that every task's result came back exactly once. `--near` puts task i near rank i % ranks. Rank 0
//!   leaves only once every live worker has said it is done (a barrier cannot hold it while a rank is gone).
//! - `farm-deserted`: a task farm whose only worker, rank 1, stops at a task whose function panics and
//!   goes on to leave the job; rank 0, told of the failure, asks for the other results, and must be told
//!   that no worker is left instead of waiting for ever (run with 2 ranks).
//! - `eval-fails --how panic|bad-result`: rank 0 has an eval run at rank 1 whose function panics (or returns
//!   a tuple too large for the space) and waits in `in` for its result; the job must end with rank 1 failed,
//!   not wait for ever.

use clap::{Parser, Subcommand};
use dsm::Rank;
use dsm_runtime::{template, tuple, TaskFarm, TupleSpace};
use std::time::Duration;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    check: Check,
}

#[derive(Debug, Subcommand)]
enum Check {
    ExactlyOnce {
        #[arg(long, default_value_t = 100_000)]
        tuples: u64,
    },
    HomeDies,
    EvalFails {
        #[arg(long, value_enum)]
        how: EvalFailure,
    },
    Farm {
        #[arg(long, default_value_t = 2000)]
        tasks: u64,
        #[arg(long)]
        die_rank: Option<u32>,
        #[arg(long, default_value_t = 10)]
        die_after: usize,
        #[arg(long)]
        near: bool,
    },
    FarmDeserted,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum EvalFailure {
    Panic,
    BadResult,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = dsm_runtime::Runtime::init()?;
    let space = TupleSpace::builder()
        // Puts (name, 2 k) for (name, k): the caller picks a name homed where it likes.
        .function("double", |t| {
            tuple!(
                t.get::<String>(0).unwrap_or_default(),
                t.get::<u64>(1).unwrap_or(0) * 2
            )
        })
        .function("boom", |_| panic!("boom: this eval fails on purpose"))
        // A result with more fields than a tuple may have.
        .function("too-wide", |_| {
            dsm_runtime::Tuple(
                (0..=dsm_runtime::tuple::MAX_FIELDS as u64)
                    .map(Into::into)
                    .collect(),
            )
        })
        .join(&rt)?;
    let (me, size) = (rt.rank().0 as u64, rt.size() as u64);
    match args.check {
        Check::ExactlyOnce { tuples } => exactly_once(&rt, &space, me, size, tuples)?,
        Check::EvalFails { how } => {
            if me == 0 {
                let function = match how {
                    EvalFailure::Panic => "boom",
                    EvalFailure::BadResult => "too-wide",
                };
                // With two ranks, rank 0's first eval runs at rank 1. Said before it is asked for: rank 1
                // may fail, and end this rank, before a line printed after it came out.
                println!("eval-fails: rank 0 asks rank 1 to run {function}");
                let at = space.eval(function, tuple!("args"))?;
                anyhow::ensure!(
                    at == Rank(1),
                    "eval-fails: the eval runs at {at}, not rank 1"
                );
                let got = space.in_(&template!("never", ?u64));
                anyhow::bail!("eval-fails: in returned {got:?}");
            }
            // Rank 1 waits for rank 0 (it runs the eval meanwhile).
            rt.dsm().barrier()?;
        }
        Check::HomeDies => {
            // A first field homed at rank 1.
            let name = (0..)
                .map(|k| format!("at1-{k}"))
                .find(|n| space.home_of(Some(&n.as_str().into()), 2) == Rank(1))
                .expect("some name is homed at rank 1");
            rt.dsm().barrier()?;
            match me {
                0 => {
                    match space.in_(&template!(name.as_str(), ?u64)) {
                        Err(e) => println!("home-dies: in returned an error: {e}"),
                        Ok(t) => anyhow::bail!("in returned {t:?} although its home died"),
                    }
                    let at2 = (0..)
                        .map(|k| format!("at2-{k}"))
                        .find(|n| space.home_of(Some(&n.as_str().into()), 2) == Rank(2))
                        .expect("some name is homed at rank 2");
                    // Three threads wait at rank 2, holding the three channels a waiting call may take
                    // (the fourth is kept for faults), until this thread puts what they wait for.
                    std::thread::scope(|s| -> anyhow::Result<()> {
                        let waiters: Vec<_> = (0..3)
                            .map(|_| s.spawn(|| space.in_(&template!(at2.as_str(), ?u64))))
                            .collect();
                        std::thread::sleep(Duration::from_millis(300));
                        match space.in_(&template!(name.as_str(), ?u64)) {
                            Err(e) => println!(
                                "home-dies: with every channel held, in returned an error: {e}"
                            ),
                            Ok(t) => anyhow::bail!("in returned {t:?} although its home died"),
                        }
                        for k in 0..3u64 {
                            space.out(tuple!(at2.as_str(), k))?;
                        }
                        for w in waiters {
                            w.join()
                                .map_err(|_| anyhow::anyhow!("a waiter panicked"))??;
                        }
                        Ok(())
                    })?;
                }
                1 => {
                    std::thread::sleep(Duration::from_millis(200));
                    std::process::abort();
                }
                _ => {
                    // Searches of every rank's share go on while rank 1 dies: each passes over it, known
                    // to have failed when asked or failing while asked.
                    let t = std::time::Instant::now();
                    let mut searches = 0u64;
                    while !rt.dsm().failed_ranks().contains(&Rank(1))
                        && t.elapsed() < Duration::from_secs(10)
                    {
                        space.count(&template!(?String, ?u64))?;
                        space.rdp(&template!(?String, ?u64))?;
                        searches += 1;
                    }
                    println!(
                        "home-dies: {searches} searches of every rank went on while rank 1 died"
                    );
                }
            }
            // Leave only once rank 1's failure is known here, so that leaving skips the final barrier.
            let t = std::time::Instant::now();
            while rt.dsm().failed_ranks() != [Rank(1)] {
                anyhow::ensure!(
                    t.elapsed() < Duration::from_secs(10),
                    "rank 1's failure was not seen"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // The live ranks go on: evals run on them (never on the dead rank), and a template whose
            // first field is formal searches the live ranks' shares. Rank 2 runs evals until rank 0 says
            // it is done, and says it heard.
            let homed_at_0 = |prefix: &str, arity: usize| {
                (0..)
                    .map(|k| format!("{prefix}{k}"))
                    .find(|n| space.home_of(Some(&n.as_str().into()), arity) == Rank(0))
                    .expect("some name is homed at rank 0")
            };
            let (here, done) = (homed_at_0("at0-", 2), homed_at_0("done-", 1));
            let heard = homed_at_0("heard-", 1);
            if me == 2 {
                space.in_(&template!(done.as_str()))?;
                space.out(tuple!(heard.as_str()))?;
            }
            if me == 0 {
                for k in 0..6u64 {
                    let at = space.eval("double", tuple!(here.as_str(), k))?;
                    anyhow::ensure!(at != Rank(1), "an eval went to the dead rank");
                    let t = space.in_(&template!(here.as_str(), ?u64))?;
                    anyhow::ensure!(t.get::<u64>(1)? == 2 * k, "an eval's result is wrong");
                }
                space.out(tuple!("left", 5u64))?;
                let n = space.count(&template!(?String, ?u64))?;
                let found = space.inp(&template!(?String, 5u64))?;
                anyhow::ensure!(
                    n == 1 && found.is_some(),
                    "the live ranks' tuples: {n}, {found:?}"
                );
                println!("home-dies: evals and searches went on without the dead rank");
                // Rank 0 leaves once rank 2 has its word (the other way, the word could reach a rank
                // that has left). Both words are homed here, so neither waits on a rank that may have
                // left: rank 2's `out` returns once the word is here.
                space.out(tuple!(done.as_str()))?;
                space.in_(&template!(heard.as_str()))?;
            }
        }
        Check::FarmDeserted => {
            let farm = TaskFarm::new(&space, "deserted", Rank(0))?;
            if me == 0 {
                farm.put((0..10u64).map(|i| (i, i)))?;
                match farm.results::<u64>(10) {
                    Err(dsm_runtime::RuntimeError::TaskFailed { rank: Rank(1), .. }) => {}
                    other => anyhow::bail!("farm-deserted: the first results: {other:?}"),
                }
                match farm.results::<u64>(9) {
                    Err(e @ dsm_runtime::RuntimeError::NoWorkers { missing: 9 }) => {
                        println!("farm-deserted: the master was told: {e}")
                    }
                    other => anyhow::bail!("farm-deserted: the other results: {other:?}"),
                }
                farm.stop()?;
            } else {
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    farm.serve(|_, _: u64| -> u64 { panic!("farm-deserted: this task fails") })
                }));
                anyhow::ensure!(served.is_err(), "farm-deserted: serve returned {served:?}");
                println!("farm-deserted: rank 1 stopped serving and leaves the job");
            }
            // Straight to the final barrier: a barrier of the program's own would wait for the master.
            drop(farm);
            drop(space);
            rt.finish()?;
            return Ok(());
        }
        Check::Farm {
            tasks,
            die_rank,
            die_after,
            near,
        } => {
            let farm = TaskFarm::new(&space, "check", Rank(0))?;
            if me == 0 {
                if near {
                    farm.put_near((0..tasks).map(|i| (i, Rank((i % size) as u32), i)))?;
                } else {
                    farm.put((0..tasks).map(|i| (i, i)))?;
                }
                let mut results: Vec<(u64, (u64, u64))> = farm.results(tasks as usize)?;
                farm.stop()?;
                results.sort();
                let ids: Vec<u64> = results.iter().map(|r| r.0).collect();
                anyhow::ensure!(
                    ids == (0..tasks).collect::<Vec<_>>(),
                    "results are missing or repeated"
                );
                anyhow::ensure!(
                    results.iter().all(|(i, (sq, _))| *sq == i * i),
                    "a result is wrong"
                );
                let mut per_rank = vec![0; size as usize];
                for (_, (_, r)) in &results {
                    per_rank[*r as usize] += 1;
                }
                println!("farm: {tasks} tasks done once each; results per rank {per_rank:?}");
                // Under --keep-going the final barrier cannot hold rank 0 back (a rank is gone), and a
                // worker may still be passing the stop mark on, which needs the bag: wait for every live
                // worker to say it is done.
                let done = template!(done_key(&space).as_str(), ?u64);
                let limit = std::time::Instant::now() + Duration::from_secs(30);
                let mut waiting: Vec<u64> = (1..size).collect();
                loop {
                    let failed = rt.dsm().failed_ranks();
                    waiting.retain(|r| !failed.contains(&Rank(*r as u32)));
                    if waiting.is_empty() {
                        break;
                    }
                    anyhow::ensure!(
                        std::time::Instant::now() < limit,
                        "workers {waiting:?} neither finished nor failed"
                    );
                    if let Some(t) = space.in_timeout(&done, Duration::from_millis(50))? {
                        let r = t.get::<u64>(1)?;
                        waiting.retain(|w| *w != r);
                    }
                }
            } else {
                let mut taken = 0;
                let done = farm.serve(|_, x: u64| {
                    taken += 1;
                    if die_rank == Some(me as u32) && taken == die_after {
                        // Dies holding this task, once the others have had time to run out of tasks
                        // and wait: its lease must bring it back and wake one of them.
                        std::thread::sleep(Duration::from_millis(500));
                        std::process::abort();
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    (x * x, me)
                })?;
                println!("farm: rank {me} did {done} tasks");
                space.out(tuple!(done_key(&space).as_str(), me))?;
            }
        }
    }
    // Under --keep-going a rank lost during the check (the farm checks kill one) fails this barrier, also
    // when its death is only noticed here: that is the check going as planned, not an error of this rank.
    if rt.dsm().failed_ranks().is_empty() {
        match rt.dsm().barrier() {
            Err(dsm::DsmError::PeerFailed { .. }) => {}
            other => other?,
        }
    }
    drop(space);
    rt.finish()?;
    Ok(())
}

/// The first field of the workers' "done" tuples: one whose tuples are homed at rank 0, which waits for
/// them (a rank that dies must not take them along).
fn done_key(space: &TupleSpace) -> String {
    (0u64..)
        .map(|k| format!("farm-done#{k}"))
        .find(|k| space.home_of(Some(&k.as_str().into()), 2) == Rank(0))
        .expect("some suffix hashes to rank 0")
}

fn exactly_once(
    rt: &dsm_runtime::Runtime,
    space: &TupleSpace,
    me: u64,
    size: u64,
    n: u64,
) -> anyhow::Result<()> {
    let queue = |i: u64| i % 7 % 4;
    let producer = {
        let space = space.clone();
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mine: Vec<_> = (0..n)
                .filter(|i| i % size == me)
                .map(|i| tuple!(format!("q{}", queue(i)), i))
                .collect();
            for chunk in mine.chunks(1000) {
                space.out_many(chunk.to_vec())?;
            }
            Ok(())
        })
    };
    let (mut count, mut sum, mut squares) = (0u64, 0u128, 0u128);
    for j in 0..4 {
        let in_queue = (0..n).filter(|&i| queue(i) == j).count() as u64;
        let share = in_queue / size + u64::from(me < in_queue % size);
        for _ in 0..share {
            let v = space
                .in_(&template!(format!("q{j}"), ?u64))?
                .get::<u64>(1)?;
            count += 1;
            sum += u128::from(v);
            squares += u128::from(v) * u128::from(v);
        }
    }
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer panicked"))??;
    space.out(tuple!(
        "taken",
        me,
        count,
        sum.to_le_bytes().to_vec(),
        squares.to_le_bytes().to_vec()
    ))?;
    if me == 0 {
        let (mut c, mut s, mut q) = (0u64, 0u128, 0u128);
        for _ in 0..size {
            let t = space.in_(&template!("taken", ?u64, ?u64, ?Vec<u8>, ?Vec<u8>))?;
            c += t.get::<u64>(2)?;
            s += u128::from_le_bytes(t.get::<Vec<u8>>(3)?.try_into().unwrap_or_default());
            q += u128::from_le_bytes(t.get::<Vec<u8>>(4)?.try_into().unwrap_or_default());
        }
        let want_s: u128 = (0..u128::from(n)).sum();
        let want_q: u128 = (0..u128::from(n)).map(|i| i * i).sum();
        anyhow::ensure!(
            (c, s, q) == (n, want_s, want_q),
            "taken {c} tuples (sum {s}, squares {q}); expected {n} (sum {want_s}, squares {want_q})"
        );
        let left = space.count(&template!(?String, ?u64))?;
        anyhow::ensure!(left == 0, "{left} tuples were left in the queues");
        println!("exactly-once: {n} tuples taken once each by {size} ranks");
    }
    let _ = rt;
    Ok(())
}
