//! Fixtures: shard directories written in the test, each in its own temp dir.

use std::path::{Path, PathBuf};

use kd_shard::{MANIFEST_FILE, Manifest, Row, write_manifest_atomic, write_shard};
use serde_json::json;

/// Writes `rows` as `n_shards` shards (round-robin by chunk) plus a committed manifest into
/// `dir`, with top-k `k`, vocabulary 300 and tokenizer fingerprint `tok`.
pub fn write_set(dir: &Path, rows: &[Row], k: usize, n_shards: usize, tok: &str) -> PathBuf {
    let per = rows.len().div_ceil(n_shards.max(1)).max(1);
    let mut m = Manifest::new(
        "kd-student tests",
        json!({"architecture": "toy", "vocab_size": 300}),
        json!({"fingerprint": tok, "vocab_size": 300}),
        json!({"path": "in.jsonl", "sha256": "00", "rows": rows.len()}),
        json!({"top_k": k}),
        None,
    );
    for (i, chunk) in rows.chunks(per).enumerate() {
        let e = write_shard(dir, &format!("shard-{i:05}.parquet"), k, chunk).unwrap();
        m.push_shard(e);
    }
    m.complete = true;
    write_manifest_atomic(&dir.join(MANIFEST_FILE), &m).unwrap();
    dir.to_path_buf()
}

/// A shard set of `n` tiny rows with `k` entries per position in `n_shards` shards, and its
/// rows as a reader gets them back.
pub fn tiny_set(n: usize, k: usize, n_shards: usize) -> (tempfile::TempDir, Vec<Row>) {
    let d = tempfile::tempdir().unwrap();
    let rows = kd_shard::synth::tiny_rows(n, k);
    write_set(d.path(), &rows, k, n_shards, "toy-tok");
    // The rows as the shards hold them (format 2: log-probs within 1/1024 nats).
    let stored = if kd_shard::DEFAULT_FORMAT_VERSION >= 2 {
        rows.iter().map(|r| r.as_stored_v2(k)).collect()
    } else {
        rows
    };
    (d, stored)
}
