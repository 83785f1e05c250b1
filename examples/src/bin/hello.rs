//! The smallest program that shares memory between processes: every rank writes its greeting number into
//! its own slot of a shared array, waits at a barrier, and prints what it sees in every slot.
//!
//! Run: `cargo run --release --bin dsmrun -- -n 4 target/release/hello`
#![forbid(unsafe_code)]

fn main() {
    dsm_examples::exit_on_error("hello", run());
}

fn run() -> anyhow::Result<()> {
    let rt = dsm_runtime::Runtime::init()?;
    let dsm = rt.dsm();
    let (me, n) = (rt.rank().0 as u64, rt.size());
    // One page per rank, so that the slots do not share a page.
    let slots = dsm.alloc_vec::<u64>(n * 512)?;
    slots.set(me as usize * 512, 1000 + me);
    dsm.barrier()?;
    let seen: Vec<u64> = (0..n).map(|r| slots.get(r * 512)).collect();
    dsm_examples::outln!("rank {me} of {n} sees {seen:?}")?;
    for (r, v) in seen.iter().enumerate() {
        anyhow::ensure!(
            *v == 1000 + r as u64,
            "rank {me} saw {v} in the slot of rank {r}"
        );
    }
    dsm.barrier()?;
    drop(slots);
    rt.finish()?;
    Ok(())
}
