//! `shard-cat derive`: a cache written from another cache, without the teacher: fewer top-k
//! entries, the other format, or a subset of the rows.
//!
//! A position's top k′ < k entries are its first k′ (they are sorted by log-prob), and the
//! writer recomputes the tail mass from them, `1 − Σ exp(top k′)`, which is the source's tail
//! plus the mass of the entries dropped. From a format-1 source (exact f32 log-probs) this is
//! what a dump at top-k′ computes, so the derived shards hold the rows such a dump writes, bit
//! for bit; from a format-2 source the values are the source's decoded ones (each within
//! 1/1024 nats of the teacher's), rounded again if written as format 2.

use std::collections::HashSet;
use std::path::Path;

use kd_fs::FolderLock;
use serde_json::json;

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_FILE, Manifest, Totals, read_manifest, write_manifest_atomic};
use crate::writer::{WriteOptions, write_shard_with};
use crate::{Row, hash_bytes, hash_file, read_shard};

/// The lock file [`derive`] holds in its destination while it works.
pub const DERIVE_LOCK_FILE: &str = ".shard-cat-derive.lock";

/// What to change; `None` keeps the source's.
#[derive(Clone, Debug, Default)]
pub struct DeriveOptions {
    /// Top-k entries per position, at most the source's.
    pub top_k: Option<usize>,
    /// Shard format of the new cache (1 or 2).
    pub format_version: Option<u32>,
    /// Keep only the rows with these ids.
    pub ids: Option<HashSet<String>>,
}

/// Writes the cache `dest` from the complete cache `src`: every source shard is checked
/// against its manifest hash, rewritten with `opts`, and the manifest written last and
/// atomically. Its identity is the one a dump of the new settings would have (a subset of
/// rows also changes `input`), and `derived_from` names the source. A destination that
/// already holds a manifest is refused.
pub fn derive(src: &Path, dest: &Path, opts: &DeriveOptions) -> Result<Manifest> {
    let source = read_manifest(&src.join(MANIFEST_FILE))?;
    let refuse = |path: &Path, what: String| Error::Refused {
        path: path.to_path_buf(),
        what,
    };
    if !source.complete {
        return Err(refuse(
            src,
            "is not complete (resume its dump first)".into(),
        ));
    }
    let k = opts.top_k.unwrap_or(source.top_k());
    let version = opts.format_version.unwrap_or(source.format_version);
    if k > source.top_k() || (k == 0 && source.samples() == 0) {
        return Err(refuse(
            src,
            format!(
                "holds top-{} entries: a derived cache may keep 1 to {} of them",
                source.top_k(),
                source.top_k()
            ),
        ));
    }
    if !(1..=crate::FORMAT_VERSION).contains(&version) {
        return Err(refuse(dest, format!("format {version} does not exist")));
    }
    if version < 2 && source.samples() > 0 {
        return Err(refuse(dest, "format 1 cannot hold sampled targets".into()));
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let _lock = FolderLock::take(dest, DERIVE_LOCK_FILE)?;
    if dest.join(MANIFEST_FILE).exists() {
        return Err(refuse(dest, "already holds a manifest".into()));
    }
    let write = WriteOptions::for_version_with_samples(version, source.samples());
    let mut m = derived_manifest(src, &source, k, version, opts);
    let mut kept_ids = Vec::new();
    for s in &source.shards {
        let path = src.join(&s.file);
        if hash_file(&path)? != s.sha256 {
            return Err(refuse(&path, "does not match its manifest's sha256".into()));
        }
        let rows: Vec<Row> = read_shard(&path)?
            .into_iter()
            .filter(|r| opts.ids.as_ref().is_none_or(|ids| ids.contains(&r.id)))
            .map(|r| r.with_top_k(source.top_k(), k))
            .collect();
        if rows.is_empty() {
            continue;
        }
        kept_ids.extend(rows.iter().map(|r| r.id.clone()));
        m.shards
            .push(write_shard_with(dest, &s.file, k, &rows, &write)?);
    }
    if opts.ids.is_some() {
        kept_ids.sort();
        m.input["selected_rows"] = json!(kept_ids.len());
        m.input["selected_ids_sha256"] = json!(hash_bytes(kept_ids.join("\n").as_bytes()));
    }
    for extra in crate::merge::EXTRA_FILES {
        let from = src.join(extra);
        if from.exists() {
            crate::merge::copy_atomic(&from, &dest.join(extra))?;
        }
    }
    m.totals = Totals::of(&m.shards);
    m.complete = true;
    m.fingerprint = m.compute_fingerprint();
    write_manifest_atomic(&dest.join(MANIFEST_FILE), &m)?;
    Ok(m)
}

/// The source's manifest with the new settings, no shards yet, and where it came from.
fn derived_manifest(
    src: &Path,
    source: &Manifest,
    k: usize,
    version: u32,
    opts: &DeriveOptions,
) -> Manifest {
    let mut m = source.clone();
    m.format_version = version;
    m.producer = format!("shard-cat derive {}", env!("CARGO_PKG_VERSION"));
    m.settings["top_k"] = json!(k);
    m.shards.clear();
    m.complete = false;
    m.derived_from = Some(json!({
        "path": src.display().to_string(),
        "fingerprint": source.fingerprint,
        "format_version": source.format_version,
        "top_k": source.top_k(),
        "rows": source.totals.rows,
        "ids_selected": opts.ids.is_some(),
    }));
    m
}

impl Row {
    /// The row with each position's first `k_new` of its `k` top-k entries.
    fn with_top_k(mut self, k: usize, k_new: usize) -> Row {
        fn first<T: Copy>(v: &[T], k: usize, k_new: usize) -> Vec<T> {
            v.chunks(k)
                .flat_map(|p| p[..k_new].iter().copied())
                .collect()
        }
        if k_new < k {
            self.topk_ids = first(&self.topk_ids, k, k_new);
            self.topk_logprobs = first(&self.topk_logprobs, k, k_new);
        }
        self
    }
}
