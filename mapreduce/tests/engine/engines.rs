//! Engines themselves: one per rank, made again once every rank dropped theirs, and the spill
//! directories they leave or remove.

use super::*;

#[test]
fn spill_directories_left_by_dead_processes_are_removed() {
    let scratch = Scratch::new("stale");
    let dir = scratch.path();
    let (rt, space) = one_rank();
    let host = this_host();
    let dead = dead_pid();
    let stale = dir.join(format!("dsm-mapreduce-{host}-{dead}-0"));
    let other_host = dir.join(format!("dsm-mapreduce-elsewhere-{dead}-0"));
    let alive = dir.join(format!("dsm-mapreduce-{host}-{}-7", std::process::id()));
    // With the lock file engines hold for their life: one whose number names no process here, but
    // whose lock is held (an engine in another PID namespace), and one whose number names a process
    // here but whose lock nobody holds (the engine died and its number was used again).
    let locked_elsewhere = dir.join(format!("dsm-mapreduce-{host}-{dead}-1-0"));
    let number_reused = dir.join(format!("dsm-mapreduce-{host}-{}-9-0", std::process::id()));
    for d in [
        &stale,
        &other_host,
        &alive,
        &locked_elsewhere,
        &number_reused,
    ] {
        std::fs::create_dir_all(d.join("job-0")).unwrap();
        std::fs::write(d.join("job-0").join("t0-p0-r0"), b"old run").unwrap();
    }
    // Hidden ones: one whose engine died before renaming it into place (its lock file there, nobody
    // holding it), and one being made (no lock file yet).
    let died_hidden = dir.join(format!(".dsm-mapreduce-{host}-{dead}-2-0-0000abcd"));
    let being_made = dir.join(format!(".dsm-mapreduce-{host}-{dead}-3-0-0000abce"));
    std::fs::create_dir_all(&died_hidden).unwrap();
    std::fs::create_dir_all(&being_made).unwrap();
    std::fs::File::create(died_hidden.join("alive.lock")).unwrap();
    std::fs::File::create(number_reused.join("alive.lock")).unwrap();
    let held = std::fs::File::create(locked_elsewhere.join("alive.lock")).unwrap();
    let held = Flock::lock(held, FlockArg::LockExclusiveNonblock).unwrap();
    let engine = MapReduce::with_spill_dir(&space, &dir).unwrap();
    assert!(!stale.exists(), "a dead process's directory is removed");
    assert!(other_host.exists(), "another host's directory stays");
    assert!(alive.exists(), "a running process's directory stays");
    assert!(
        locked_elsewhere.exists(),
        "a directory whose lock is held stays"
    );
    assert!(
        !number_reused.exists(),
        "a directory whose lock nobody holds is removed"
    );
    assert!(!died_hidden.exists(), "so is a hidden one");
    assert!(
        being_made.exists(),
        "a hidden one without its lock file stays"
    );
    let _ = std::fs::remove_dir_all(&being_made);
    drop(held);
    let prefix = format!("dsm-mapreduce-{host}-{}-0-", std::process::id());
    let ours = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .expect("the engine's own directory is named HOST-PID-RANK-SEQ-NONCE");
    assert!(ours.is_dir());
    // Its lock is held: another engine would leave it alone.
    let lock = std::fs::File::open(ours.join("alive.lock")).unwrap();
    assert!(Flock::lock(lock, FlockArg::LockExclusiveNonblock).is_err());
    drop(engine);
    assert!(!ours.exists(), "and removed with the engine");
    drop(space);
    rt.finish().unwrap();
}

#[test]
fn one_engine_per_rank() {
    let (rt, space) = one_rank();
    let first = MapReduce::new(&space).unwrap();
    let e = MapReduce::new(&space).unwrap_err();
    assert!(e.to_string().contains("one per rank"), "{e}");
    drop(first);
    drop(space);
    rt.finish().unwrap();
}

#[test]
fn an_engine_dropped_on_every_rank_makes_way_for_a_new_one() {
    let scratch = Scratch::new("again");
    let dir = scratch.path();
    let files = write_inputs(&dir, 2, 200, 500);
    let expect = expected_words(&files);
    dsm_runtime::local::run_local_job(2, 3, move |rt| {
        let space = TupleSpace::join(rt).unwrap();
        for k in 0..2 {
            let mr = MapReduce::new(&space).unwrap();
            let out = dir.join(format!("out-{k}"));
            let config = JobConfig::new(&out)
                .inputs(&files)
                .split_size(4 << 10)
                .partitions(2)
                .progress(ProgressMode::Never);
            mr.run(&Words, &config).unwrap();
            if rt.rank() == Rank(0) {
                assert_eq!(read_output(&out, 2), expect, "engine {k}");
            }
        }
    });
}

#[test]
fn an_engine_whose_barrier_fails_leaves_no_spill_directory() {
    let scratch = Scratch::new("failed-barrier");
    let dir = scratch.path();
    let under = dir.clone();
    dsm::transport::local::run_local_job(2, 3, move |dsm| {
        let rt = Runtime::from_dsm(dsm);
        let space = TupleSpace::join(&rt).unwrap();
        if rt.rank() == Rank(1) {
            // Leaves the job instead of creating its engine: rank 0's barrier cannot end.
            drop(space);
            let _ = rt.finish();
            return;
        }
        let e = MapReduce::with_spill_dir(&space, &under).err();
        assert!(e.is_some(), "an engine was made without rank 1");
        let left: Vec<_> = std::fs::read_dir(&under)
            .unwrap()
            .map(|d| d.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        drop(space);
        let _ = rt.finish();
    });
}
