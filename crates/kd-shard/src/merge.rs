//! Combining the part folders of a `--part I/N` dump into one cache.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use kd_fs::{FolderLock, write_bytes_atomic};

use crate::fsutil::hash_file;
use crate::manifest::{
    MANIFEST_FILE, Manifest, merge_manifests, read_manifest, write_manifest_atomic,
};

/// The lock file [`merge_parts`] holds in its destination while it works.
pub const MERGE_LOCK_FILE: &str = ".shard-cat-merge.lock";

/// The files a part folder may hold beside its shards, carried into the merged folder.
pub(crate) const EXTRA_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// Combines complete part folders into `dest`: links (or, across file systems, copies
/// atomically) each part's shards and tokenizer files, then writes one manifest, last and
/// atomically, so `dest` is a cache only once everything is in it. One merge at a time holds
/// `dest` ([`MERGE_LOCK_FILE`]); a destination that already holds a manifest is refused, and
/// a shard already there is kept only when its hash is the manifest's. A merge stopped half
/// way is finished by running it again.
pub fn merge_parts(parts: &[PathBuf], dest: &Path) -> Result<Manifest> {
    let mut ms = Vec::new();
    for p in parts {
        let m = read_manifest(&p.join(MANIFEST_FILE))?;
        if !m.complete {
            return Err(Error::Refused {
                path: p.clone(),
                what: "part is not complete (resume its dump first)".into(),
            });
        }
        ms.push((m, p.clone()));
    }
    ms.sort_by_key(|(m, _)| m.part.map(|p| p.index));
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let _lock = FolderLock::take(dest, MERGE_LOCK_FILE)?;
    if dest.join(MANIFEST_FILE).exists() {
        return Err(Error::Refused {
            path: dest.to_path_buf(),
            what: "already holds a manifest".into(),
        });
    }
    let merged = merge_manifests(&ms.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>())?;
    for (m, dir) in &ms {
        for s in &m.shards {
            let (src, dst) = (dir.join(&s.file), dest.join(&s.file));
            if dst.exists() {
                if hash_file(&dst)? == s.sha256 {
                    continue;
                }
                return Err(Error::Refused {
                    path: dst,
                    what: "exists with different content".into(),
                });
            }
            if std::fs::hard_link(&src, &dst).is_err() {
                copy_atomic(&src, &dst)?;
            }
        }
        for extra in EXTRA_FILES {
            let (src, dst) = (dir.join(extra), dest.join(extra));
            if src.exists() && !dst.exists() {
                copy_atomic(&src, &dst)?;
            }
        }
    }
    write_manifest_atomic(&dest.join(MANIFEST_FILE), &merged)?;
    Ok(merged)
}

/// Copies `src` to `dst` so that `dst` is complete or absent.
pub(crate) fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    Ok(write_bytes_atomic(dst, &bytes)?)
}
