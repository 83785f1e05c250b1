//! A job's directories on disk: the output directory (a job's parts are written into a staging directory
//! beside it and committed by renames, with `_SUCCESS` last) and each rank's spill directory, both kept
//! alive by a lock file, so that a later job removes only what a job that is gone left behind.

use crate::master::Master;
use crate::MapReduceError;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::path::{Path, PathBuf};

/// Whether `name` is a part file being written (`.part-NNNNN.RANK.TASK.tmp`).
fn is_part_tmp(name: &str) -> bool {
    name.starts_with(".part-") && name.ends_with(".tmp")
}

/// Removes the temporary part files in `dir` (best effort: the job's output is complete without them).
pub(super) fn remove_part_tmps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if is_part_tmp(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The directories from `dir` up that do not exist, innermost first: those `create_dir_all(dir)` makes.
pub(super) fn missing_dirs(dir: &Path) -> Vec<PathBuf> {
    dir.ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .take_while(|a| std::fs::symlink_metadata(a).is_err())
        .map(Path::to_path_buf)
        .collect()
}

/// Removes the directories a failed job made (`dirs`, innermost first), each only if empty: a file of
/// anyone else's that appeared in one meanwhile stays, and so do the directories above it.
pub(super) fn remove_made_dirs(dirs: &[PathBuf]) {
    for d in dirs {
        if std::fs::remove_dir(d).is_err() {
            return;
        }
    }
}

/// How the names of jobs' staging directories begin.
pub(super) const STAGING: &str = ".dsm-job-";

/// Puts a finished job's part files in place: checks that every reducer's part is in the job's staging
/// directory, replaces the output's earlier part files with them, removes the staging directory (and any
/// that a job whose master died left; a running job's stays), and writes the success marker.
pub(super) fn commit(
    master: &Master,
    out: &Path,
    clearing: &mut bool,
    alive: Option<Flock<std::fs::File>>,
) -> Result<(), MapReduceError> {
    let staging = master.output();
    // Every reducer said it wrote its part: one missing here was written where this rank does not look
    // (an output directory that is not shared between hosts).
    for p in 0..master.reduces() {
        let part = staging.join(format!("part-{p:05}"));
        if !part.exists() {
            return Err(MapReduceError::TaskFailed(format!(
                "partition {p} was reduced, but {} is not there: every rank must see the output directory at the same path (a directory shared between hosts)",
                part.display()
            )));
        }
    }
    *clearing = true;
    // The new output stays where it is, and the error says how to finish the commit by hand.
    let kept = |e: MapReduceError, left: &str| {
        MapReduceError::TaskFailed(format!(
            "{e}; the job's output is kept in {}: {left}, move its part-* files into {} and create {SUCCESS} there",
            staging.display(),
            out.display()
        ))
    };
    remove_parts(out).map_err(|e| kept(e, "remove the old part-* files left beside it"))?;
    let err =
        |what: &Path, e| MapReduceError::io(format!("moving {} into place", what.display()), e);
    for p in 0..master.reduces() {
        let name = format!("part-{p:05}");
        let part = staging.join(&name);
        std::fs::rename(&part, out.join(&name)).map_err(|e| {
            kept(
                err(&part, e),
                "the old output is gone and some new parts are in place",
            )
        })?;
    }
    // The parts' names are on disk before the marker that says they are all there, and the marker's
    // after it (each part's bytes were synced by its reducer).
    // A directory that cannot be synced leaves its files in place: the error says what state they are in.
    let sync_out = |state: &str| {
        std::fs::File::open(out)
            .and_then(|d| d.sync_all())
            .map_err(|e| {
                MapReduceError::io(
                    format!(
                        "syncing the output directory {} ({state}; a crash of the machine now could lose some of it: check the file system)",
                        out.display()
                    ),
                    e,
                )
            })
    };
    sync_out(&format!(
        "every new part-* file is in place there, but not {SUCCESS}: the output is not marked complete; run the job again, allowing it to overwrite this output (JobConfig::overwrite, --overwrite)"
    ))?;
    drop(alive);
    let _ = std::fs::remove_dir_all(staging);
    remove_stale_staging_dirs(out, &spill_host());
    let marker = out.join(SUCCESS);
    std::fs::File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(|e| {
            MapReduceError::io(
                format!(
                    "writing {} (every new part-* file is in place, but the output is not marked complete; run the job again, allowing it to overwrite this output (JobConfig::overwrite, --overwrite))",
                    marker.display()
                ),
                e,
            )
        })?;
    sync_out(&format!(
        "the output is complete there, with its {SUCCESS} marker"
    ))
}

/// The empty file a job writes into its output directory once every part file is in place: its absence
/// says the output is incomplete (the job failed, or still runs).
pub const SUCCESS: &str = "_SUCCESS";

/// Whether `remove_parts` would remove whatever it should in `dir`: it removes files only.
pub(super) fn check_replaceable(dir: &Path) -> Result<(), MapReduceError> {
    let err = |e| MapReduceError::io(format!("reading {}", dir.display()), e);
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = name.starts_with("part-") || name == SUCCESS || is_part_tmp(&name);
        if ours && entry.file_type().map_err(err)?.is_dir() {
            return Err(MapReduceError::Config(format!(
                "{} is a directory, where the job would replace a file of the old output: move it out of {} first",
                entry.path().display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes the `part-*` files, the success marker and temporary files of earlier runs from an output
/// directory.
fn remove_parts(dir: &Path) -> Result<(), MapReduceError> {
    let err = |e| MapReduceError::io(format!("clearing {}", dir.display()), e);
    // The marker first: if a part cannot be removed below (or the process dies meanwhile), what is left
    // is not taken for a complete output.
    match std::fs::remove_file(dir.join(SUCCESS)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("part-") || name == SUCCESS || is_part_tmp(&name) {
            std::fs::remove_file(entry.path()).map_err(err)?;
        }
    }
    Ok(())
}

/// This host's name as it goes into spill directory names (characters other than letters, digits, `.` and
/// `_` become `_`, so the name has no `-` of its own).
pub(super) fn spill_host() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "host".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The file in a spill directory that its engine holds an exclusive `flock` on while it lives. Another
/// engine removes a spill directory only if it can take that lock: a process id says nothing about a
/// process in another PID namespace (containers sharing a spill directory and a host name), where the
/// same number may be running, or not, whatever runs here.
const ALIVE: &str = "alive.lock";

/// Makes a spill directory `NAME-NONCE` under `dir` (the nonce random, so that engines whose process ids,
/// ranks and host names match, in other PID namespaces, never take the same name), with its [`ALIVE`]
/// file locked: made under a hidden name and renamed into place, so that no other engine ever sees it
/// without its lock held. Returns its path and the lock (none on a file system without `flock`, where
/// others judge it by its process id, as they did before there was a lock).
pub(super) fn make_spill_dir(
    dir: &Path,
    name: &str,
) -> Result<(PathBuf, Option<Flock<std::fs::File>>), MapReduceError> {
    use std::hash::{BuildHasher, Hasher};
    let io = |what: &Path, e| MapReduceError::io(format!("creating {}", what.display()), e);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(MapReduceError::Config(format!(
            "the spill directory {} is not a directory: give a directory, or a path to make one at",
            dir.display()
        )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?
        }
        Err(e) => return Err(io(dir, e)),
    }
    let mut tries = 0;
    let (hidden, root) = loop {
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32;
        let full = format!("{name}-{nonce:08x}");
        let hidden = dir.join(format!(".{full}"));
        match std::fs::create_dir(&hidden) {
            Ok(()) => break (hidden, dir.join(full)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(io(&hidden, e)),
        }
    };
    let made = lock_alive(&hidden).and_then(|alive| {
        std::fs::rename(&hidden, &root)?;
        Ok(alive)
    });
    match made {
        Ok(alive) => Ok((root, alive)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&hidden);
            Err(io(&root, e))
        }
    }
}

/// Makes `dir`'s [`ALIVE`] file, locked for as long as the returned lock lives (`None` on a file system
/// without `flock`). Locked under another name first, then renamed to its own (the lock goes with the
/// file): whoever cleans up never finds the file unlocked while `dir` is being made.
pub(super) fn lock_alive(dir: &Path) -> std::io::Result<Option<Flock<std::fs::File>>> {
    let new = dir.join(format!("{ALIVE}.new"));
    let file = std::fs::File::create(&new)?;
    let alive = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(alive) => Some(alive),
        Err((_, Errno::ENOLCK | Errno::EOPNOTSUPP)) => None,
        Err((_, e)) => return Err(std::io::Error::from(e)),
    };
    std::fs::rename(&new, dir.join(ALIVE))?;
    Ok(alive)
}

/// What the [`ALIVE`] file of a directory says about the process that made it.
enum Alive {
    /// Its lock is held: the process lives.
    Held,
    /// Nobody held its lock, which is now taken (hold it while removing the directory).
    Free(Flock<std::fs::File>),
    /// No such file (from an older version, or being made), or no `flock` on this file system.
    Unknown,
}

fn alive(dir: &Path) -> Alive {
    // Open for writing too: NFS makes an exclusive `flock` a byte-range lock, which needs it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(ALIVE));
    match file {
        Ok(file) => match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(taken) => Alive::Free(taken),
            Err((_, Errno::EWOULDBLOCK)) => Alive::Held,
            Err(_) => Alive::Unknown,
        },
        Err(_) => Alive::Unknown,
    }
}

/// Removes the staging directories in the output directory `out` that jobs whose master died left
/// (`.dsm-job-ENGINE-JOB`), of masters of this host only: those whose [`ALIVE`] file nobody holds a lock
/// on, or, without one, whose engine name says a process that no longer runs. A running job's stays: it
/// writes its parts there, and takes the output over when it commits. (Another host's are left: on a file
/// system mounted without shared locks, as clusters often mount NFS or Lustre, a lock held there does not
/// show here, and leaving a dead job's directory beats removing a running job's parts.)
fn remove_stale_staging_dirs(out: &Path, host: &str) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    let here = format!("dsm-mapreduce-{host}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(STAGING)
            .and_then(|engine| engine.strip_prefix(&here))
        else {
            continue;
        };
        let (stale, taken) = match alive(&entry.path()) {
            Alive::Free(taken) => (true, Some(taken)),
            Alive::Held => (false, None),
            Alive::Unknown => {
                let pid = rest
                    .split('-')
                    .next()
                    .and_then(|pid| pid.parse::<u32>().ok());
                let gone = pid.is_some_and(|pid| {
                    Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
                });
                (gone, None)
            }
        };
        if stale {
            remove_locked_dir(&entry.path(), taken);
        }
    }
}

/// Removes the spill directories under `dir` that engines of processes of this host left behind when they
/// died (killed before they could remove them): `dsm-mapreduce-HOST-PID-RANK-SEQ-NONCE` whose [`ALIVE`]
/// file nobody holds a lock on, and the same hidden (`.dsm-...`, made by an engine that died before it
/// renamed it into place) with such a file; from older versions, or on a file system without `flock`,
/// those whose PID is not running here (older names have no nonce, and the oldest no sequence number).
/// Directories of other hosts (a spill directory shared across machines) are left alone.
pub(super) fn remove_stale_spill_dirs(dir: &Path, host: &str) {
    // Without /proc nothing says which processes run: leave everything.
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("dsm-mapreduce-{host}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (hidden, shown) = match name.strip_prefix('.') {
            Some(shown) => (true, shown),
            None => (false, name.as_str()),
        };
        let Some(rest) = shown.strip_prefix(&prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('-').collect();
        let (&[pid, rank] | &[pid, rank, _] | &[pid, rank, _, _]) = &parts[..] else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), rank.parse::<u32>()) else {
            continue;
        };
        // A lock taken means nobody holds it; it is held until the directory is gone.
        // A hidden one without its file is being made (or its engine died in that moment): left alone.
        let by_pid = || !hidden && !Path::new(&format!("/proc/{pid}")).exists();
        let (stale, taken) = match alive(&entry.path()) {
            Alive::Free(taken) => (true, Some(taken)),
            Alive::Held => (false, None),
            Alive::Unknown => (by_pid(), None),
        };
        if stale {
            remove_locked_dir(&entry.path(), taken);
        }
    }
}

/// Removes `dir`, whose [`ALIVE`] file is locked by `lock`: everything else first, with the lock held (no
/// other engine takes the directory for a dead one's meanwhile), then the lock let go, then the rest. On
/// NFS a file removed while open is only renamed (`.nfs*`) until it is closed, and the directory would
/// stay with it. (Another engine may take the lock in between and remove the rest too: both removals
/// end in the same place.)
pub(super) fn remove_locked_dir(dir: &Path, lock: Option<Flock<std::fs::File>>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name() == ALIVE {
                continue;
            }
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
        }
    }
    drop(lock);
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_job_leaves_no_temporary_part_files() {
        let dir = std::env::temp_dir().join(format!("dsm-mr-tmps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            ".part-00003.2.17.tmp",
            "part-00003",
            "notes.tmp",
            ".part-00001",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        remove_part_tmps(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".part-00001", "notes.tmp", "part-00003"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_spill_directory_is_made_when_missing_and_refused_when_a_file() {
        let parent = std::env::temp_dir().join(format!("dsm-mr-spill-at-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let (root, _lock) = make_spill_dir(&parent.join("a/b"), "engine").unwrap();
        assert!(root.is_dir() && root.starts_with(parent.join("a/b")));
        let file = parent.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = make_spill_dir(&file, "engine").unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "the spill directory {} is not a directory",
                file.display()
            )),
            "{e}"
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_locked_directory_is_removed_whole_and_its_lock_let_go() {
        let parent = std::env::temp_dir().join(format!("dsm-mr-locked-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let (root, lock) = make_spill_dir(&parent, "engine").unwrap();
        let lock = lock.expect("the temporary directory's file system has flock");
        std::fs::create_dir_all(root.join("job-1/runs")).unwrap();
        std::fs::write(root.join("job-1/runs/run-0"), b"x").unwrap();
        std::fs::write(root.join("part"), b"y").unwrap();
        // Another engine sees it alive while the lock is held.
        assert!(matches!(alive(&root), Alive::Held));
        let lock_file = std::fs::File::open(root.join(ALIVE)).unwrap();
        remove_locked_dir(&root, Some(lock));
        assert!(!root.exists(), "{} is gone", root.display());
        // The lock went with the engine: the file, still open here, can be locked again.
        assert!(Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).is_ok());
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
