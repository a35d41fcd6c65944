//! Pipeline files: TOML recipes in `pipelines/` that supply settings for each phase.
//!
//! ```toml
//! [dump]
//! teacher = "data/models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! input = "data/prompts/sample.jsonl"
//! out = "out/quickstart"
//! top_k = 32
//! ```
//! Relative paths are taken from the directory the command runs in. Unknown keys are errors.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The `[dump]` section: every `teacher-dump` setting, all optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpSection {
    pub teacher: Option<PathBuf>,
    pub input: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub score: Option<bool>,
    pub mixed: Option<bool>,
    pub top_k: Option<usize>,
    /// `top:K`, `sample:N` or `top:K,sample:N` (see `teacher-dump --targets`).
    pub targets: Option<String>,
    /// Responses generated per prompt (see `teacher-dump --responses-per-prompt`).
    pub responses_per_prompt: Option<usize>,
    /// The former name of `responses_per_prompt`, accepted with a note until the next release.
    pub samples: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub chat_template: Option<bool>,
    pub batch_size: Option<usize>,
    pub rows_per_shard: Option<usize>,
    pub limit: Option<usize>,
    pub approx_quantized: Option<bool>,
    pub skip_bad_lines: Option<bool>,
    pub threads: Option<usize>,
    /// Read BF16 weights in place from the file (see `teacher-dump --weights-in-place`).
    pub weights_in_place: Option<bool>,
    /// `cpu`, `cuda`, `cuda:N` or `auto` (see `teacher-dump --device`).
    pub device: Option<String>,
    /// `f32`, `bf16` or `f16` (see `teacher-dump --dtype`).
    pub dtype: Option<String>,
}

/// A whole pipeline file. Sections for later phases are kept as raw tables here.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Free text describing the recipe.
    pub description: Option<String>,
    #[serde(default)]
    pub dump: DumpSection,
    /// `student-fit`'s first stage (distillation).
    pub fit: Option<toml::Table>,
    /// An optional second stage: keys that replace `[fit]`'s (see `student-fit --help`).
    pub finetune: Option<toml::Table>,
    pub eval: Option<toml::Table>,
}

impl Pipeline {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid pipeline file", path.display()))
    }
}
