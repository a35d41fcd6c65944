//! Publishing files and folders so that readers see them whole or not at all, for every
//! output of the pipeline (shards and manifests, checkpoints and exports, the student's data
//! cache, the study report):
//!
//! * [`write_atomic`] / [`write_bytes_atomic`]: a file written under a temporary name beside
//!   its final one, fsynced, renamed into place, the directory fsynced;
//! * [`publish_dir`]: the same for a whole directory;
//! * [`FolderLock`]: one writing process per output folder;
//! * [`crash_point`] and [`injected_fault`]: the fault injection the crash tests drive.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// An operating-system error on `path`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct IoError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl IoError {
    pub fn new(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        IoError {
            path: path.into(),
            source,
        }
    }
}

/// The closure that wraps an I/O error on `path`.
pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> IoError + '_ {
    move |source| IoError::new(path, source)
}

/// The temporary name a file is written under before it is renamed into place:
/// `<final>.tmp-<pid>`, in the same directory so that the rename cannot cross filesystems.
pub fn tmp_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(format!(".tmp-{}", std::process::id()));
    PathBuf::from(name)
}

/// Fault injection for crash tests: when the environment variable `KD_CRASH_AT` equals
/// `point`, the process aborts on the spot (no destructors, no cleanup: what a SIGKILL or a
/// power cut leaves). Points: `before-rename:<file name>` (a file fully written under its
/// temporary name, not yet published), `after-shard:<n>` (shard n published, manifest not yet
/// updated), `checkpoint-before-rename:<step>` and `before-update:<step>` (`student-fit`).
/// Unset, it costs one cached lookup.
pub fn crash_point(point: impl FnOnce() -> String) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(at) = env_matches(&AT, "KD_CRASH_AT", point) {
        eprintln!("KD_CRASH_AT={at}: aborting");
        std::process::abort();
    }
}

/// The value of `var` (read once into `cell`) when it equals `point()`; `point` is only
/// formatted when the variable is set.
fn env_matches(
    cell: &'static std::sync::OnceLock<Option<String>>,
    var: &str,
    point: impl FnOnce() -> String,
) -> Option<&'static str> {
    let at = cell.get_or_init(|| std::env::var(var).ok()).as_deref()?;
    (at == point()).then_some(at)
}

/// Fault injection for numeric tests: true when the environment variable `KD_FAULT` equals
/// `point` (`nan-loss:<step>` makes `student-fit`'s loss at that step NaN).
pub fn injected_fault(point: impl FnOnce() -> String) -> bool {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    env_matches(&AT, "KD_FAULT", point).is_some()
}

/// fsyncs a directory so that a rename inside it is durable. A no-op where directories
/// cannot be opened (non-Unix).
pub fn fsync_dir(dir: &Path) -> Result<(), IoError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory a file is published into (`.` for a bare name).
fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of each one created so that
/// the new directory entries survive a crash along with what is about to be renamed in.
pub fn create_dirs_durably(dir: &Path) -> Result<(), IoError> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.exists() {
        missing.push(cur);
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p,
            _ => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    for d in missing {
        fsync_dir(&parent_of(d))?;
    }
    Ok(())
}

/// Writes `final_path` atomically: `fill` writes into `<final>.tmp-<pid>`, which is then
/// flushed, fsynced, renamed over `final_path`, and the directory fsynced. Readers see either
/// the old file (or none) or the complete new one. On error the temporary file is removed.
/// The crash point `before-rename:<file name>` lies just before the rename.
///
/// `fill` receives a buffered file; its error is returned as is.
pub fn write_atomic<T, E: From<IoError>>(
    final_path: &Path,
    fill: impl FnOnce(BufWriter<File>) -> Result<(BufWriter<File>, T), E>,
) -> Result<T, E> {
    let dir = parent_of(final_path);
    create_dirs_durably(&dir)?;
    let tmp = tmp_path(final_path);
    let result = (|| {
        let f = File::create(&tmp).map_err(at(&tmp))?;
        let (w, out) = fill(BufWriter::with_capacity(1 << 20, f))?;
        let f = w
            .into_inner()
            .map_err(|e| IoError::new(&tmp, e.into_error()))?;
        f.sync_all().map_err(at(&tmp))?;
        drop(f);
        crash_point(|| {
            let name = final_path.file_name().unwrap_or_default();
            format!("before-rename:{}", name.to_string_lossy())
        });
        std::fs::rename(&tmp, final_path).map_err(at(final_path))?;
        Ok(out)
    })();
    match result {
        Ok(out) => {
            fsync_dir(&dir)?;
            Ok(out)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes `bytes` to `path` atomically, as [`write_atomic`] does.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    write_atomic(path, |mut w| {
        std::io::Write::write_all(&mut w, bytes).map_err(at(path))?;
        Ok((w, ()))
    })
}

/// Publishes a directory atomically: `fill` writes into a temporary sibling
/// `.tmp-<name>-<pid>` ([`DIR_TMP_PREFIX`]), every file in it is fsynced, then it replaces
/// `dest` and the parent is fsynced, so `dest` is complete (old or new) or absent. On error
/// the temporary directory is removed and what was published is untouched. `crash` names the
/// [`crash_point`] just before the rename.
pub fn publish_dir<E: From<IoError>>(
    dest: &Path,
    crash: impl FnOnce() -> String,
    fill: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let parent = parent_of(dest);
    std::fs::create_dir_all(&parent).map_err(at(&parent))?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!("{DIR_TMP_PREFIX}{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let filled = (|| -> Result<(), E> {
        std::fs::create_dir_all(&tmp).map_err(at(&tmp))?;
        fill(&tmp)?;
        for e in std::fs::read_dir(&tmp).map_err(at(&tmp))? {
            let p = e.map_err(at(&tmp))?.path();
            File::open(&p).and_then(|h| h.sync_all()).map_err(at(&p))?;
        }
        Ok(())
    })();
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    crash_point(crash);
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(at(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(at(dest))?;
    fsync_dir(&parent)?;
    Ok(())
}

/// The prefix of the temporary directories [`publish_dir`] fills; a folder left with this
/// prefix by a killed run is half-written and may be removed.
pub const DIR_TMP_PREFIX: &str = ".tmp-";

/// An output folder held by one process: an advisory lock (`flock`) on a file inside it. The
/// operating system releases it when the holder exits, however it exits, so a folder left by
/// a killed run is taken again at once (a resume works); a second live run is refused.
pub struct FolderLock {
    _file: File,
    path: PathBuf,
}

/// Why [`FolderLock::take`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{}: another process is writing here (it holds {}); wait for it to finish or \
         choose another output folder", dir.display(), lock.display()
    )]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FolderLock {
    /// Locks `dir/name` (created if needed; `dir` must exist).
    pub fn take(dir: &Path, name: &str) -> Result<Self, LockError> {
        use std::os::unix::fs::MetadataExt;
        let path = dir.join(name);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // A holder removes the file when it lets go, so the file we locked may no longer be
        // the one at `path`; lock again until the locked file is the one on disk.
        for _ in 0..16 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(LockError::Locked {
                        dir: dir.to_path_buf(),
                        lock: path,
                    });
                }
                Err(std::fs::TryLockError::Error(source)) => return Err(io(source)),
            }
            let held = file.metadata().map_err(io)?;
            match std::fs::metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(Self { _file: file, path });
                }
                _ => continue,
            }
        }
        Err(LockError::Locked {
            dir: dir.to_path_buf(),
            lock: path,
        })
    }
}

/// Removes the lock file when the holder lets go of the folder (a finished run, or an error
/// return after the lock was taken), so that a refused run leaves the folder as it found it.
/// A killed run leaves the file behind, unlocked; the next run takes it again.
impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/a.csv");
        write_bytes_atomic(&p, b"old").unwrap();
        write_bytes_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn write_atomic_removes_its_temporary_on_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        let r: Result<(), IoError> = write_atomic(&p, |mut w| {
            w.write_all(b"partial").unwrap();
            Err(IoError::new(&p, std::io::Error::other("boom")))
        });
        assert!(r.unwrap_err().to_string().contains("boom"));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn publish_dir_replaces_whole_or_leaves_the_old_one() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("checkpoint");
        publish_dir::<IoError>(&dest, String::new, |t| {
            std::fs::write(t.join("a"), b"1").map_err(at(t))
        })
        .unwrap();
        // A failing fill leaves the published folder as it was and no temporary beside it.
        let r = publish_dir::<IoError>(&dest, String::new, |t| {
            std::fs::write(t.join("a"), b"2").map_err(at(t))?;
            Err(IoError::new(t, std::io::Error::other("boom")))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"1");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        publish_dir::<IoError>(&dest, String::new, |t| {
            std::fs::write(t.join("b"), b"3").map_err(at(t))
        })
        .unwrap();
        assert!(!dest.join("a").exists());
        assert_eq!(std::fs::read(dest.join("b")).unwrap(), b"3");
    }

    #[test]
    fn a_held_folder_is_refused_and_taken_again_once_let_go() {
        let d = tempfile::tempdir().unwrap();
        let held = FolderLock::take(d.path(), ".lock").unwrap();
        let again = FolderLock::take(d.path(), ".lock");
        assert!(matches!(again, Err(LockError::Locked { .. })));
        drop(held);
        assert!(!d.path().join(".lock").exists());
        FolderLock::take(d.path(), ".lock").unwrap();
    }
}
