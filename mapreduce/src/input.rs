//! Input: files and directories expanded to a list of files, files cut into splits at line boundaries, a
//! split read back and handed to `map` line by line. The master cuts; any rank reads (inputs must be at the
//! same path on every rank: one machine, or a shared file system).

use crate::MapReduceError;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A byte range of one file: one map task's input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// The file.
    pub file: PathBuf,
    /// The first byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Split {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What identifies the contents of an input file when the master cut it: its length and modification time
/// (in whole seconds). A map task compares the file it read with it, so that a file changed while the job
/// runs fails the job instead of counting parts of two versions. Only what every shared file system
/// reports alike to every host: device and inode numbers are the mount's own on FUSE file systems such as
/// sshfs (and the device on any network file system), and some keep times to the second or to 100 ns. So
/// a rewrite that keeps the length within the second the file was cut in is not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileVersion {
    len: u64,
    modified: i64,
}

impl FileVersion {
    pub(crate) fn of(meta: &std::fs::Metadata) -> FileVersion {
        use std::os::unix::fs::MetadataExt;
        FileVersion {
            len: meta.len(),
            modified: meta.mtime(),
        }
    }
}

/// One input record: a line, without its `\n` (a `\r` before it, from a CRLF file, stays).
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// The file it comes from.
    pub file: &'a Path,
    /// The byte offset of its first byte in the file.
    pub offset: u64,
    /// Its bytes (any bytes: input need not be UTF-8).
    pub line: &'a [u8],
}

/// The files named by `paths`: files as given, directories walked recursively in name order. Every file
/// is opened once here, so a missing or unreadable input is reported before any work starts.
///
/// Symbolic links are followed, and what a walk finds is taken once: a directory reached twice (a link to
/// a directory already walked, or a cycle of links) is walked only the first time, and a file reached
/// twice inside walked directories (a link beside its target) is read only the first time. Files named in
/// `paths` themselves are taken as given, every time they are named.
pub(crate) fn expand(paths: &[PathBuf]) -> Result<Vec<(PathBuf, u64)>, MapReduceError> {
    let mut walk = Walk::default();
    for p in paths {
        walk.visit(p, true)?;
    }
    Ok(walk.files)
}

/// A walk over the inputs: the files found, and the directories and files already taken (by device and
/// inode).
#[derive(Default)]
struct Walk {
    files: Vec<(PathBuf, u64)>,
    seen: std::collections::HashSet<(u64, u64)>,
}

/// Checks that the regular file `path` (with metadata `meta`) can be read, and that its size says how much
/// there is to read: a file of the kernel's (under /proc or /sys) says 0 and has content, which splits cut
/// by its size would silently leave out.
fn opened(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    let mut f = File::open(path)?;
    if meta.len() == 0 && f.read(&mut [0u8; 1])? > 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "its size is 0 but it has content (a file of the kernel's, under /proc or /sys?): copy it to an ordinary file and count that",
        ));
    }
    Ok(())
}

impl Walk {
    fn visit(&mut self, path: &Path, named: bool) -> Result<(), MapReduceError> {
        use std::os::unix::fs::MetadataExt;
        let err = |error| MapReduceError::Input {
            path: path.to_path_buf(),
            error,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        if named && meta.is_file() {
            // Taken as given, and not counted as seen: a walk that reaches it takes it too, whichever
            // comes first (the order of the inputs does not change what is read).
            opened(path, &meta).map_err(err)?;
            self.files.push((path.to_path_buf(), meta.len()));
            return Ok(());
        }
        let first = self.seen.insert((meta.dev(), meta.ino()));
        if meta.is_dir() {
            if !first {
                return Ok(());
            }
            let mut entries = std::fs::read_dir(path)
                .map_err(err)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            entries.sort();
            for e in entries {
                // Only regular files and directories: a FIFO or a device found in a directory could block
                // or never end.
                let kind = std::fs::metadata(&e).map(|m| m.file_type());
                if kind.as_ref().map_or(true, |k| k.is_file() || k.is_dir()) {
                    self.visit(&e, false)?;
                }
            }
        } else if meta.is_file() {
            if first {
                opened(path, &meta).map_err(err)?;
                self.files.push((path.to_path_buf(), meta.len()));
            }
        } else {
            // A FIFO or a device could block the master for ever, or never end.
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or a directory",
            )));
        }
        Ok(())
    }
}

/// The size of the split cut when `remaining` bytes of input are left for `workers` task slots: `size`,
/// until the rest no longer gives every slot two splits of that size; from there on smaller (down to
/// `size / 16`), so that the map phase ends with short tasks instead of one slot busy with a whole split
/// while the others wait (guided self-scheduling). A single slot has nobody to wait for it: its splits are
/// all `size` (smaller ones only add tasks, each with its own sorted runs to write and merge).
fn split_size_at(remaining: u64, size: u64, workers: usize) -> u64 {
    if workers <= 1 {
        return size.max(1);
    }
    let floor = (size / 16).max(1);
    (remaining / (2 * workers.max(1) as u64)).clamp(floor, size.max(floor))
}

/// Cuts each file into splits of about `size` bytes (smaller near the end of the input, see
/// [`split_size_at`]), each ending just after a newline (or at the end of the file), with the version of
/// the file it was cut from. Empty files give no split; a file whose length is no longer the one listed
/// is an error (it changed while the job started).
pub(crate) fn cut(
    files: &[(PathBuf, u64)],
    size: u64,
    workers: usize,
) -> Result<Vec<(Split, FileVersion)>, MapReduceError> {
    let mut splits = Vec::new();
    // Splits never span files: each file is a map task at least.
    let nonempty = files.iter().filter(|(_, len)| *len > 0).count();
    if nonempty > crate::config::MAX_MAPS {
        return Err(MapReduceError::Config(format!(
            "{nonempty} input files: a job has at most {} map tasks, and each non-empty file is one at least; concatenate small files into fewer",
            crate::config::MAX_MAPS
        )));
    }
    let too_many = |n: usize| {
        MapReduceError::Config(format!(
            "{n} splits or more: a job has at most {} map tasks (every reduce task lists them); use larger splits (the split size is {size} bytes)",
            crate::config::MAX_MAPS
        ))
    };
    let mut remaining: u64 = files.iter().map(|(_, len)| len).sum();
    for (path, len) in files {
        let err = |error| MapReduceError::Input {
            path: path.clone(),
            error,
        };
        let mut f = File::open(path).map_err(err)?;
        let version = FileVersion::of(&f.metadata().map_err(err)?);
        if version.len != *len {
            return Err(err(changed()));
        }
        let mut start = 0;
        while start < *len {
            let size = split_size_at(remaining, size, workers);
            let end = if len - start <= size {
                *len
            } else {
                line_end_after(&mut f, start + size - 1, *len).map_err(err)?
            };
            remaining = remaining.saturating_sub(end - start);
            // Stopped as soon as there are too many: cutting a large input into tiny splits would
            // otherwise read it all first.
            if splits.len() >= crate::config::MAX_MAPS {
                return Err(too_many(splits.len() + 1));
            }
            splits.push((
                Split {
                    file: path.clone(),
                    start,
                    end,
                },
                version,
            ));
            start = end;
        }
    }
    Ok(splits)
}

/// The offset just past the first newline at or after `from` (or `len`). Reads 4 KiB first and twice as
/// much each time up to 64 KiB: most lines are short, and an input cut into tiny splits looks for as many
/// line ends as it has splits.
fn line_end_after(f: &mut File, from: u64, len: u64) -> std::io::Result<u64> {
    f.seek(SeekFrom::Start(from))?;
    let mut buf = vec![0u8; 4 << 10];
    let mut at = from;
    while at < len {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            return Ok(at + i as u64 + 1);
        }
        at += n as u64;
        if buf.len() < 64 << 10 {
            buf.resize(buf.len() * 2, 0);
        }
    }
    Ok(len)
}

/// The most bytes a map task reads into memory for one split, whatever its budget: splits end at line
/// ends, so a file without newlines (or with one huge line) is one split of any size, which must be an
/// error rather than an allocation that kills the rank.
pub(crate) const MIN_SPLIT_LIMIT: u64 = 64 << 20;

/// Reads the bytes of `split` into `data` (replacing what it held), keeping its allocation: map tasks read
/// split after split into kept buffers instead of a fresh mapping of the split's size each time, whose
/// pages the kernel would have to zero and fault in again. A split longer than `limit` is an error (see
/// [`MIN_SPLIT_LIMIT`]), and so is a file that is no longer `version` (when given) after the read, or has
/// become shorter than the split.
pub(crate) fn read_split_into(
    split: &Split,
    version: Option<&FileVersion>,
    limit: u64,
    data: &mut Vec<u8>,
) -> Result<(), String> {
    if split.len() > limit {
        return Err(format!(
            "{} bytes {}..{}: a map task reads its split (whole lines) into memory, and this one is {} bytes, over the {limit}-byte limit (the larger of the per-task memory budget and 64 MiB): a line this long, or splits this large, need a larger memory budget",
            split.file.display(),
            split.start,
            split.end,
            split.len()
        ));
    }
    let what = |e: std::io::Error| {
        format!(
            "reading {} bytes {}..{}: {e}",
            split.file.display(),
            split.start,
            split.end
        )
    };
    let mut f = File::open(&split.file).map_err(what)?;
    f.seek(SeekFrom::Start(split.start)).map_err(what)?;
    data.clear();
    data.reserve_exact(split.len() as usize);
    // Into the buffer's spare room, without zeroing it first.
    let n = (&mut f).take(split.len()).read_to_end(data).map_err(what)?;
    if n as u64 != split.len() {
        return Err(what(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file ended after {n} bytes of the split: it changed while the job ran"),
        )));
    }
    // Looked at after the read, so that a change made while it read is seen too.
    if let Some(version) = version {
        if FileVersion::of(&f.metadata().map_err(what)?) != *version {
            return Err(what(changed()));
        }
    }
    Ok(())
}

/// The error for an input file that is not what the job cut into splits.
fn changed() -> std::io::Error {
    std::io::Error::other(
        "it changed while the job ran (its length or modification time differ from when the job cut it into splits); run the job on input that does not change meanwhile",
    )
}

/// The lines of `data` (without newlines) with their offsets in `data`; a last line without a newline
/// counts, an empty tail does not.
pub(crate) fn lines(data: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let start = at;
        let end = memchr::memchr(b'\n', &data[at..]).map_or(data.len(), |i| at + i);
        at = end + 1;
        Some((start, &data[start..end]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_walk_takes_each_file_once_through_links_and_cycles() {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("dsm-mr-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/one.txt"), "one\n").unwrap();
        std::fs::write(dir.join("a/b/two.txt"), "two two\n").unwrap();
        symlink(&dir, dir.join("a/b/up")).unwrap(); // a cycle back to the top
        symlink(dir.join("a/b"), dir.join("also-b")).unwrap(); // a second way into b
        symlink(dir.join("a/one.txt"), dir.join("a/link-to-one.txt")).unwrap(); // beside its target

        let files = expand(std::slice::from_ref(&dir)).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|(p, _)| p.strip_prefix(&dir).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            [
                PathBuf::from("a/b/two.txt"),
                PathBuf::from("a/link-to-one.txt")
            ],
            "each file once, in name order (the link sorts before its target)"
        );
        assert_eq!(files[0].1, 8);

        // A file named twice is taken twice: what the caller names is taken as given.
        let one = dir.join("a/one.txt");
        let twice = expand(&[one.clone(), one.clone()]).unwrap();
        assert_eq!(twice, vec![(one.clone(), 4), (one.clone(), 4)]);
        // Named and walked: taken by name and by the walk, in either order.
        let a = dir.join("a");
        for inputs in [[one.clone(), a.clone()], [a.clone(), one.clone()]] {
            let files = expand(&inputs).unwrap();
            let target = std::fs::canonicalize(&one).unwrap();
            let ones = files
                .iter()
                .filter(|(p, _)| std::fs::canonicalize(p).unwrap() == target)
                .count();
            assert_eq!(ones, 2, "{inputs:?} gave {files:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn splits_end_after_newlines_and_cover_the_file() {
        let dir = std::env::temp_dir().join(format!("dsm-mr-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.txt");
        let text: String = (0..500)
            .map(|i| format!("line {i} {}\n", "x".repeat(i % 37)))
            .collect();
        File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let files = expand(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(files, vec![(path.clone(), text.len() as u64)]);
        for size in [1, 7, 100, 4096, 1 << 20] {
            let splits = cut(&files, size, 2).unwrap();
            let mut joined = Vec::new();
            let mut expect_start = 0;
            for (s, version) in &splits {
                assert_eq!(s.start, expect_start);
                expect_start = s.end;
                let mut data = Vec::new();
                read_split_into(s, Some(version), u64::MAX, &mut data).unwrap();
                assert_eq!(*data.last().unwrap(), b'\n', "split {s:?} ends mid-line");
                joined.extend_from_slice(&data);
            }
            assert_eq!(joined, text.as_bytes());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lines_cover_the_data() {
        let data = b"a\nbb\n\nccc\ndddd";
        let l: Vec<_> = lines(data).collect();
        assert_eq!(
            l,
            vec![
                (0, &b"a"[..]),
                (2, b"bb"),
                (5, b""),
                (6, b"ccc"),
                (10, b"dddd")
            ]
        );
    }

    #[test]
    fn splits_get_smaller_towards_the_end_of_the_input() {
        let mb = 1 << 20;
        assert_eq!(split_size_at(100 * mb, 4 * mb, 2), 4 * mb);
        assert_eq!(split_size_at(16 * mb, 4 * mb, 2), 4 * mb);
        assert_eq!(split_size_at(8 * mb, 4 * mb, 2), 2 * mb);
        assert_eq!(split_size_at(mb, 4 * mb, 2), mb / 4);
        assert_eq!(split_size_at(1, 4 * mb, 2), mb / 4, "never below a 16th");
        assert_eq!(split_size_at(0, 0, 0), 1);
        assert_eq!(
            split_size_at(mb, 4 * mb, 1),
            4 * mb,
            "one slot: no smaller splits"
        );
    }

    #[test]
    fn a_file_whose_size_hides_its_content_is_refused_and_an_empty_one_is_not() {
        // /proc files say 0 bytes and have content: counting them by their size would read nothing.
        let e = expand(&[PathBuf::from("/proc/self/status")]).unwrap_err();
        assert!(
            e.to_string().contains("/proc/self/status") && e.to_string().contains("copy it"),
            "{e}"
        );
        let empty = std::env::temp_dir().join(format!("dsm-mr-empty-{}", std::process::id()));
        std::fs::write(&empty, "").unwrap();
        assert_eq!(
            expand(std::slice::from_ref(&empty)).unwrap(),
            vec![(empty.clone(), 0)]
        );
        std::fs::remove_file(&empty).unwrap();
    }

    #[test]
    fn a_missing_input_is_named() {
        let e = expand(&[PathBuf::from("/no/such/input.txt")]).unwrap_err();
        assert!(e.to_string().contains("/no/such/input.txt"), "{e}");
    }

    #[test]
    fn a_split_of_a_file_cut_short_meanwhile_is_an_error_and_the_buffer_is_reused() {
        let path = std::env::temp_dir().join(format!("dsm-mr-short-{}.txt", std::process::id()));
        std::fs::write(&path, "one line\nanother line\n").unwrap();
        let files = expand(std::slice::from_ref(&path)).unwrap();
        let splits = cut(&files, 1 << 20, 1).unwrap();
        let mut data = Vec::with_capacity(1 << 16);
        read_split_into(&splits[0].0, None, u64::MAX, &mut data).unwrap();
        assert_eq!(data, b"one line\nanother line\n");
        assert_eq!(data.capacity(), 1 << 16, "the buffer's allocation is kept");
        std::fs::write(&path, "one line\n").unwrap();
        let e = read_split_into(&splits[0].0, None, u64::MAX, &mut data).unwrap_err();
        assert!(e.contains("changed while the job ran"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn more_files_than_map_tasks_are_refused_naming_the_files() {
        // Refused before any file is opened (these do not exist).
        let files: Vec<(PathBuf, u64)> = (0..=crate::config::MAX_MAPS)
            .map(|i| (PathBuf::from(format!("/nonexistent/f{i}")), 1))
            .collect();
        let e = cut(&files, 1 << 20, 1).unwrap_err().to_string();
        assert!(
            e.contains("131073 input files") && e.contains("concatenate"),
            "{e}"
        );
    }

    #[test]
    fn a_split_of_a_file_changed_or_replaced_meanwhile_is_an_error() {
        let dir = std::env::temp_dir().join(format!("dsm-mr-changed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.txt");
        let text = "one line\nanother line\n";
        let reads = |splits: &[(Split, FileVersion)]| {
            let mut data = Vec::new();
            read_split_into(&splits[0].0, Some(&splits[0].1), u64::MAX, &mut data).map(|_| data)
        };
        let fresh = || {
            std::fs::write(&path, text).unwrap();
            let files = expand(std::slice::from_ref(&path)).unwrap();
            cut(&files, 1 << 20, 1).unwrap()
        };
        let splits = fresh();
        assert_eq!(reads(&splits).unwrap(), text.as_bytes());
        // Rewritten with as many bytes (and a modification time of its own, whatever the clock's grain).
        std::fs::write(&path, text.to_uppercase()).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
            .unwrap();
        let e = reads(&splits).unwrap_err();
        assert!(e.contains("changed while the job ran"), "{e}");
        // Grown: the split's bytes are still there, but the file is not the one cut.
        let splits = fresh();
        File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more\n")
            .unwrap();
        assert!(reads(&splits)
            .unwrap_err()
            .contains("changed while the job ran"));
        // Replaced by another file of the same length (made at another time).
        let splits = fresh();
        let other = dir.join("other.txt");
        std::fs::write(&other, text).unwrap();
        File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(9))
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(reads(&splits)
            .unwrap_err()
            .contains("changed while the job ran"));
        // Untouched, it reads.
        let splits = fresh();
        assert_eq!(reads(&splits).unwrap(), text.as_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
