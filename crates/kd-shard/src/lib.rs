//! # kd-shard: the teacher-logit cache format
//!
//! A cache is a directory of Parquet shards plus a `manifest.json`. The teacher writes it once
//! (`teacher-dump`), people inspect it (`shard-cat`), the student reads it many times
//! (`student-fit`). This crate owns the format: the schema, the atomic writer, the manifest,
//! the reader, verification and statistics. Any Parquet reader (pyarrow, DuckDB, polars) can
//! read a shard without this crate.
//!
//! ## Shard format v1
//!
//! One Parquet file per shard, zstd-compressed, one row per sequence, seven non-null columns:
//!
//! | column | type | meaning |
//! | --- | --- | --- |
//! | `id` | utf8 | stable id of the prompt/document |
//! | `source` | utf8 | `generated` (teacher response) or `scored` (existing text) |
//! | `input_ids` | `list<uint32>` | whole sequence: prompt then response |
//! | `prompt_len` | uint32 | leading tokens not distilled (≥ 1) |
//! | `topk_ids` | `list<uint32>` | `n_pos × k` ids, position-major, sorted by log-prob desc |
//! | `topk_logprobs` | `list<float32>` | `n_pos × k` teacher log-probabilities at T=1 |
//! | `token_logprob` | `list<float32>` | `n_pos` log-probs of the token that actually follows |
//!
//! The Parquet key-value metadata holds `kd.format_version` and `kd.top_k`, so a shard alone
//! is self-describing. [`schema_json`] (= `schemas/shard-v1.json`) describes all of this for
//! machines; `schemas/manifest-v1.schema.json` is the JSON Schema of the manifest.
//!
//! ## Shard format v2 (written by default)
//!
//! The v1 columns with the two log-prob columns as integers, plus each position's tail mass:
//!
//! | column | type | meaning |
//! | --- | --- | --- |
//! | `topk_logprob_gaps` | `list<uint32>` | within a position, `ceil(-lp[r]·S) - ceil(-lp[r-1]·S)` (gap 0: `ceil(-lp[0]·S)`) |
//! | `token_logprob_q` | `list<uint32>` | `ceil(-lp·S)` of the token that actually follows |
//! | `tail_logmass_q` | `list<uint32>` | per position `round(-ln(r)·T)`, r = 1 − Σ exp(top-k), [`NO_TAIL`] when r ≤ 0 |
//! | `sample_ids` | `list<uint32>` | sampled targets: per position, the distinct ids among its `n` draws at T=1 other than the next token, by log-prob descending (ties by id), positions in order |
//! | `sample_logprob_gaps` | `list<uint32>` | their `ceil(-lp·S)` as gaps within a position (the first from 0) |
//! | `sample_counts` | `list<uint32>` | how many of its position's draws each id is (≥ 1) |
//! | `sample_token_count` | `list<uint32>` | per position, how many draws are the next token `input_ids[t+1]`, whose log-prob is `ceil(-lp·S)` = `token_logprob_q` |
//!
//! Position j's draws: `sample_token_count[j]` of the next token and the entries after
//! position j−1's whose counts make `n − sample_token_count[j]`. A next token drawn with a
//! rounded log-prob other than `token_logprob_q` (never from a teacher) stays among the other
//! ids. The draws' columns are written only where there are draws: a top-k cache ends at
//! `sample_ids` and `sample_logprob_q`, with empty lists. The reader also takes the layouts of
//! earlier shards ([`DRAW_COLUMNS_BY_ID`]: each distinct id ascending with `sample_logprob_q`
//! and `sample_counts`; [`DRAW_COLUMNS_REPEATS`]: every draw with its repeats) and gives back the
//! same rows from all three: every draw, sorted by id, repeats included.
//!
//! `kd.samples` (= `n`, 0 for a top-k cache) in the metadata says how many draws each
//! position holds; `kd.top_k` may then be 0 (a cache of draws only). With c draws of an id
//! among n, `c/n` is an unbiased estimate of the teacher's probability, which is what makes
//! forward KL trained on them unbiased (`kd_loss::sampled`).
//!
//! with `S` = `kd.logprob_scale` = [`LOGPROB_SCALE`] = 1024 and `T` = `kd.tail_scale` =
//! [`TAIL_SCALE`] = 2^20 in the key-value metadata. Decoding (numpy): `lp = -np.cumsum(
//! np.reshape(gaps, (-1, k)), axis=1) / S`, each within 1/1024 nats of the exact value; then
//! per position `lp += log((1 - tail) / sum(exp(lp)))` with `tail = exp(-q_tail / T)`, which
//! restores the teacher's tail mass (to 1e-6 relative) and keeps each entry within the bound
//! (the shift is a weighted mean of the rounding errors). Without the tail column, rounding
//! alone can inflate a tail of 1e-5 to ~5e-4 or erase it, and reverse KL and JSD, which weigh
//! the tail's logarithm, would see a different teacher. `token_logprob = -q / S` plus its
//! position's shift (so a next token in the top k decodes to its top-k value). The rank order is kept (gaps are ≥ 0). Gaps are small
//! integers whose high bytes are zero, so with BYTE_STREAM_SPLIT zstd stores the top-k
//! log-probs in about a third of the bytes of v1's floats; the top-k ids use
//! BYTE_STREAM_SPLIT too (integer BYTE_STREAM_SPLIT needs a reader of Parquet 2.11 or later,
//! e.g. pyarrow ≥ 17; format 1, `teacher-dump --shard-format 1`, keeps exact floats and
//! dictionary ids for older readers).
//! Readers take both versions; [`schema_json_of`]`(2)` = `schemas/shard-v2.json`.
//!
//! ## Position convention
//!
//! Distilled position `t` runs over `prompt_len-1 ..= len-2` and holds the teacher's
//! distribution for predicting `input_ids[t+1]`; hence `n_pos = len - prompt_len`. Position
//! `j = t - (prompt_len-1)` owns `topk_*[j*k .. (j+1)*k]` and `token_logprob[j]`. Values are
//! log-softmax at T=1, never tempered, so the tail mass `1 - Σ exp(topk_logprobs)` is exact
//! and any temperature can be applied later.
//!
//! ## Atomicity and resumption
//!
//! * [`write_shard`] writes `<final>.tmp-<pid>` in the shard's directory, fsyncs it, renames it
//!   over the final name and fsyncs the directory: a shard is absent or complete, never a
//!   prefix. [`write_manifest_atomic`] does the same for manifests.
//! * During a dump the producer rewrites [`PARTIAL_MANIFEST_FILE`] after each shard;
//!   [`MANIFEST_FILE`] is written last and is the commit point: a directory without it holds
//!   no published cache.
//! * [`Manifest::fingerprint`] hashes the identity (format version, teacher, tokenizer, input,
//!   settings); a resume continues only when [`Manifest::diff_identity`] finds no difference,
//!   and names the changed field otherwise.
//! * Published shards are never rewritten in place, which is what makes the reader's
//!   memory map sound.
//!
//! Writing is deterministic: the same rows give byte-identical files (fixed `created_by`, no
//! timestamps).
//!
//! ## Storage (measured)
//!
//! Format 2 against format 1 at k = 32: `cargo run -p kd-shard --release --example encodings
//! out/quickstart` (the quickstart's 3680 positions, one file) and `... encodings 20000`
//! (synthetic); the figures are in docs/performance.md. The tables below are format 1's
//! encodings.
//!
//! Bytes per distilled position at k=32 on [`synth::realistic_rows`] (49152 vocabulary, 2000
//! positions, zstd level 3), measured with
//! `cargo run -p kd-shard --release --example encodings`:
//!
//! Synthetic data: mean top-1 probability 0.80, mean tail mass 0.032, mean token
//! log-prob -1.51 nats; raw values are 260 B/position (32 ids + 32 floats + 1 float).
//!
//! | value encoding (floats / ids) | B/pos, 2000 pos | B/pos, 20000 pos |
//! | --- | ---: | ---: |
//! | dictionary / dictionary (parquet default) | 224.38 | 190.90 |
//! | plain / plain | 162.92 | 160.81 |
//! | **BYTE_STREAM_SPLIT / dictionary (default)** | **138.15** | **138.04** |
//! | BYTE_STREAM_SPLIT / plain | 142.02 | 139.70 |
//! | BYTE_STREAM_SPLIT / DELTA_BINARY_PACKED | 163.85 | 162.86 |
//! | BYTE_STREAM_SPLIT / BYTE_STREAM_SPLIT | 131.61 | 129.89 |
//! | dictionary / DELTA_BINARY_PACKED | 250.08 | 215.72 |
//! | BYTE_STREAM_SPLIT / dictionary, zstd 9 | 136.60 | 134.69 |
//!
//! Top-k ids are ordered by probability, not by value, so delta encoding of ids loses.
//! BYTE_STREAM_SPLIT on the ids saves another ~5%, but integer BYTE_STREAM_SPLIT is recent
//! (Parquet 2.11; Arrow C++ 17) and older readers reject it, so ids stay dictionary-encoded;
//! floats use BYTE_STREAM_SPLIT, which every maintained reader supports.
//!
//! ## Example
//!
//! ```
//! use kd_shard::{Manifest, MANIFEST_FILE, read_shard, verify_dir, write_manifest_atomic, write_shard};
//! use serde_json::json;
//!
//! let dir = tempfile::tempdir()?;
//! let rows = kd_shard::synth::tiny_rows(10, 4);
//! let entry = write_shard(dir.path(), "shard-00000.parquet", 4, &rows)?;
//! // Format 2 keeps log-probs within 1/1024 nats and the tail mass.
//! let stored: Vec<_> = rows.iter().map(|r| r.as_stored_v2(4)).collect();
//! assert_eq!(read_shard(&dir.path().join(&entry.file))?, stored);
//!
//! let mut m = Manifest::new(
//!     "example 0.1.0",
//!     json!({"architecture": "toy", "vocab_size": 300}),
//!     json!({"fingerprint": "toy", "vocab_size": 300}),
//!     json!({"path": "in.jsonl", "sha256": "00", "rows": 10}),
//!     json!({"top_k": 4}),
//!     None,
//! );
//! m.push_shard(entry);
//! m.complete = true;
//! write_manifest_atomic(&dir.path().join(MANIFEST_FILE), &m)?;
//! assert!(verify_dir(dir.path(), true)?.is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod derive;
mod error;
mod fsutil;
mod manifest;
mod merge;
mod reader;
mod row;
mod schema;
mod stats;
pub mod synth;
mod v2;
mod verify;
mod writer;

pub use derive::{DERIVE_LOCK_FILE, DeriveOptions, derive};
pub use error::{Error, Result};
pub use fsutil::{hash_bytes, hash_file};
pub use manifest::{
    FORMAT_NAME, MANIFEST_FILE, Manifest, PARTIAL_MANIFEST_FILE, PartInfo, ShardEntry, Totals,
    canonical_json, merge_manifests, read_manifest, write_manifest_atomic,
};
pub use merge::{MERGE_LOCK_FILE, merge_parts};
pub use reader::{ShardMeta, ShardReader, read_shard, read_shard_meta};
pub use row::{LOGPROB_SLACK, MASS_SLACK, Row, Source, counts_of};
pub use schema::{
    COLUMNS, COLUMNS_V2, DRAW_COLUMNS_BY_ID, DRAW_COLUMNS_REPEATS, LOGPROB_SCALE,
    META_FORMAT_VERSION, META_LOGPROB_SCALE, META_SAMPLES, META_TAIL_SCALE, META_TOP_K,
    arrow_schema, arrow_schema_of, arrow_schema_v2, schema_json, schema_json_of,
};
pub use stats::{FILE_OVERHEAD, SourceStats, Stats, StatsBuilder, stats_dir};
pub use v2::{NO_TAIL, TAIL_SCALE};
pub use verify::{Problem, ProblemKind, VerifyReport, verify_dir};
pub use writer::{ValueEncoding, WriteOptions, created_by, write_shard, write_shard_with};

/// The newest shard and manifest format version this library reads and writes. Version 2
/// stores log-probs as integers (steps of 1/[`LOGPROB_SCALE`] nats) and each position's tail
/// mass; version 1 stores exact f32 log-probs.
pub const FORMAT_VERSION: u32 = 2;

/// The format written by default: 2. Format 1 (exact f32 log-probs) is written on request
/// ([`WriteOptions::v1`], `teacher-dump --shard-format 1`).
pub const DEFAULT_FORMAT_VERSION: u32 = 2;

#[cfg(test)]
mod tests;
