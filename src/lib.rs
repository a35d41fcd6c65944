//! Command-line front ends of the distillation pipeline: `teacher-dump` and `shard-cat`.
//!
//! The binaries only parse flags, merge them over a pipeline file (`--pipeline
//! pipelines/NAME.toml`, flags win) and call the libraries: `kd_teacher` for the teacher pass,
//! `kd_shard` for the cache, `kd_model` and `kd_tokenizer` for the model.

pub mod cli;
pub mod pipeline;
