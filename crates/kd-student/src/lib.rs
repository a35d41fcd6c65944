//! # kd-student: phase two of distillation
//!
//! Phase two trains a student from the teacher-logit cache that `teacher-dump` wrote, with no
//! teacher in memory.
//!
//! - [`data`]: verified shard sets served from a memory-mapped cache, id-hash splits, and
//!   deterministic, resumable batches of distilled positions.
//! - [`engine`]: the two training engines: the project's CPU kernels (llama and Mistral
//!   students: flat buffers, hand-written backward per layer, fused chunked head and loss,
//!   fused AdamW; the default where it runs) and candle autograd (every architecture and
//!   device; the reference).
//! - [`train`]: the candle engine's step: the output head in chunks outside autograd with
//!   `kd_loss`'s exact gradients, one backward pass through the transformer.
//! - [`optim`]: AdamW with its state on disk, schedules, clipping.
//! - [`layers`]: which teacher layers a student cut from the teacher keeps (`auto:N`: chosen
//!   greedily by forward KL against the cache).
//! - [`fit`]: a whole run: checkpoints published atomically, exact resume, held-out
//!   evaluation, export to a Hugging Face directory (what `student-fit` calls).
//!
//! ## Example
//!
//! ```
//! use kd_shard::{MANIFEST_FILE, Manifest, write_manifest_atomic, write_shard};
//! use kd_student::data::{BatchConfig, Batcher, ShardSet, Split};
//! use serde_json::json;
//!
//! let dir = tempfile::tempdir()?;
//! let rows = kd_shard::synth::tiny_rows(20, 4);
//! let entry = write_shard(dir.path(), "shard-00000.parquet", 4, &rows)?;
//! let mut m = Manifest::new(
//!     "example",
//!     json!({"architecture": "toy", "vocab_size": 300}),
//!     json!({"fingerprint": "toy", "vocab_size": 300}),
//!     json!({"path": "in.jsonl", "sha256": "00", "rows": 20}),
//!     json!({"top_k": 4}),
//!     None,
//! );
//! m.push_shard(entry);
//! m.complete = true;
//! write_manifest_atomic(&dir.path().join(MANIFEST_FILE), &m)?;
//!
//! let set = ShardSet::open(dir.path())?;
//! let split = Split::by_id_hash(&set, 0.1)?;
//! let cfg = BatchConfig { token_budget: 256, max_len: 64, ..BatchConfig::default() };
//! let mut batcher = Batcher::new(&set, &split.train, cfg)?;
//! let batch = batcher.next_batch(&set).unwrap();
//! assert_eq!(batch.teachers[0].topk_ids.len(), batch.n_pos() * 4);
//! let resume_at = batcher.position(); // store in the checkpoint
//! # let _ = resume_at;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod answers;
pub mod data;
pub mod engine;
mod error;
pub mod eval;
pub mod fit;
pub mod layers;
pub mod optim;
pub mod plan;
pub mod resolve;
pub mod train;

pub use error::{Error, Result};
