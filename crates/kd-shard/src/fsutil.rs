//! Atomic publication of files and streaming hashes.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

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

/// Lower-case hex of a byte string.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Hex sha256 of the whole file, read in 1 MiB chunks (never the whole file in memory).
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Hex sha256 of a byte string.
pub fn hash_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A writer that hashes and counts what passes through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the hex sha256 and the byte count of everything written.
    pub(crate) fn finish(self) -> (W, String, u64) {
        (self.inner, hex(&self.hasher.finalize()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// fsync a directory so that a rename inside it is durable. A no-op where directories
/// cannot be opened (non-Unix).
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of each one created so that
/// the new directory entries survive a crash along with the file about to be renamed in.
fn create_dirs_durably(dir: &Path) -> Result<()> {
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
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for d in missing {
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => fsync_dir(p)?,
            _ => fsync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename, directory fsync): for
/// the small files published beside shards (tokenizer files, copied shards).
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |mut w| {
        std::io::Write::write_all(&mut w, bytes).map_err(|e| Error::io(path, e))?;
        Ok((w, ()))
    })
}

/// Writes `final_path` atomically: `fill` writes into `<final>.tmp-<pid>`, which is then
/// flushed, fsynced, renamed over `final_path`, and the directory fsynced. Readers see either
/// the old file (or none) or the complete new one. On error the temporary file is removed.
///
/// `fill` receives a buffered file; its error is returned as is.
pub(crate) fn write_atomic<T>(
    final_path: &Path,
    fill: impl FnOnce(BufWriter<File>) -> Result<(BufWriter<File>, T)>,
) -> Result<T> {
    let dir = match final_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    create_dirs_durably(&dir)?;
    let tmp = tmp_path(final_path);
    let result = (|| {
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let (w, out) = fill(BufWriter::with_capacity(1 << 20, f))?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        crash_point(|| {
            let name = final_path.file_name().unwrap_or_default();
            format!("before-rename:{}", name.to_string_lossy())
        });
        std::fs::rename(&tmp, final_path).map_err(|e| Error::io(final_path, e))?;
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

/// Checks that a shard's `file` is a plain relative path below the manifest directory
/// (no root, no `..`, no empty name) and returns it joined onto `dir`.
pub(crate) fn safe_join(dir: &Path, file: &str) -> Result<PathBuf> {
    let rel = Path::new(file);
    // Name the directory and quote `file`: `dir.join("/etc/x")` would drop the directory,
    // and the error must say which cache it concerns.
    let bad = |what: &str| Error::InvalidPath {
        path: dir.to_path_buf(),
        what: format!("{file:?}: {what}"),
    };
    if file.is_empty() {
        return Err(bad("empty file name"));
    }
    if file.contains('\\') {
        return Err(bad("use '/' as the separator"));
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) => {}
            Component::CurDir => return Err(bad("'.' component")),
            Component::ParentDir => return Err(bad("'..' component")),
            Component::RootDir | Component::Prefix(_) => return Err(bad("absolute path")),
        }
    }
    if file.ends_with('/') {
        return Err(bad("ends with '/'"));
    }
    Ok(dir.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_file_matches_known_vector() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            hash_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_bytes(b"abc"), hash_file(&p).unwrap());
        assert!(matches!(
            hash_file(&d.path().join("missing")),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn safe_join_rejects_escapes() {
        let d = Path::new("/data/cache");
        assert_eq!(
            safe_join(d, "part-0/shard-00000.parquet").unwrap(),
            d.join("part-0/shard-00000.parquet")
        );
        for bad in [
            "",
            "../x.parquet",
            "/etc/x.parquet",
            "a/../../x",
            "./x",
            "a/",
            "a\\b",
        ] {
            assert!(
                matches!(safe_join(d, bad), Err(Error::InvalidPath { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn write_atomic_removes_tmp_on_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        let r: Result<()> = write_atomic(&p, |mut w| {
            w.write_all(b"partial").unwrap();
            Err(Error::corrupt(&p, "boom"))
        });
        assert!(matches!(r, Err(Error::Corrupt { .. })));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}

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
        "{dir}: another process is writing here (it holds {lock}); wait for it to finish or \
         choose another output folder"
    )]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FolderLock {
    /// Locks `dir/name` (created if needed; `dir` must exist).
    pub fn take(dir: &Path, name: &str) -> std::result::Result<Self, LockError> {
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
