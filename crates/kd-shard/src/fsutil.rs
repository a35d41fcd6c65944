//! Streaming hashes and safe shard paths; atomic publication is kd-fs's.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

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
        let r: Result<()> = kd_fs::write_atomic(&p, |mut w| {
            w.write_all(b"partial").unwrap();
            Err(Error::corrupt(&p, "boom"))
        });
        assert!(matches!(r, Err(Error::Corrupt { .. })));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
