//! Phase one of the pipeline: run the teacher once over prompts and cache what it thinks.
//!
//! [`input::read_jsonl`] reads prompts (`prompt`, `messages` or `instruction` records, with an
//! optional `response` to score); [`engine::Engine`] generates responses in KV-cached batches
//! (greedy or seeded sampling, reproducible per prompt whatever the batch) or teacher-forces
//! existing ones, and captures the teacher's top-k log-probabilities at T=1 at every response
//! position; [`dump::dump`] writes them as Parquet shards with a manifest, publishing every file
//! atomically, so an interrupted dump resumes where it stopped with the same content.
//!
//! ```no_run
//! # use kd_teacher::*;
//! let model = kd_model::load("teacher.gguf".as_ref(), kd_model::Precision::Exact,
//!                            &candle_core::Device::Cpu).unwrap();
//! let input = input::read_jsonl("prompts.jsonl".as_ref(), false).unwrap();
//! let settings = dump::DumpSettings { mode: dump::Mode::Generate, top_k: 32, samples: 0, responses_per_prompt: 1,
//!     max_new_tokens: 128, temperature: 0.0, top_p: 1.0, seed: 0, chat_template: true,
//!     rows_per_shard: 64, precision: kd_model::Precision::Exact,
//!     dtype: kd_model::Dtype::F32 };
//! let opts = dump::RunOptions { batch_size: 8, resume: false, part: None, progress: true,
//!     logits_chunk: 256, shard_format: kd_shard::DEFAULT_FORMAT_VERSION };
//! let summary = dump::dump(&model, &input, &settings, &opts, "out/shards".as_ref()).unwrap();
//! println!("{:.1} tokens/s", summary.tokens_per_s);
//! ```

pub mod dump;
pub mod error;
pub mod input;

/// Generation and scoring, shared with phase two ([`kd_generate`]).
pub use kd_generate::{engine, reduce, sampler};

pub use error::{Error, Result};
