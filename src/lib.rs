//! Command-line front ends of the distillation pipeline: `teacher-dump`, `student-fit` and
//! `shard-cat`.
//!
//! Every binary does the same four things: parse its flags, resolve typed settings (flags
//! over a pipeline file, `--pipeline pipelines/NAME.toml`, over the defaults), make one
//! library call, and report: `kd_teacher` for the teacher pass, `kd_student` for training,
//! evaluation and export, `kd_shard` for the cache, `kd_model` and `kd_tokenizer` for the
//! model.

pub mod cli;
pub mod pipeline;
