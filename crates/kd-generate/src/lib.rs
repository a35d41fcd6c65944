//! Generation and scoring with a loaded model, shared by both phases of the pipeline.
//!
//! [`engine::Engine`] generates responses in KV-cached batches (greedy, or seeded sampling
//! that is reproducible per row whatever the batch: [`sampler`]) and teacher-forces existing
//! ones, capturing at every response position the model's top-k log-probabilities at T=1,
//! the log-prob of the token that follows and, when asked, tokens drawn from the model's
//! distribution. `teacher-dump` (kd-teacher) writes what it captures into shards;
//! `student-fit eval` (kd-student) uses it to let a student answer prompts.

pub mod engine;
pub mod reduce;
pub mod sampler;
