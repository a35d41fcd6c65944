//! A training run: initialise the student, read the shards, train with AdamW, log metrics,
//! write checkpoints atomically, resume exactly, evaluate on held-out rows, export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use kd_loss::sampled::Estimator;
use kd_loss::{Divergence, LossConfig, TailPolicy};
use kd_model::trainable::Student;
use serde::{Deserialize, Serialize};

use crate::data::{
    Batch, BatchConfig, Batcher, LoaderPosition, RowSource, ShardSet, Split, TargetKind, Teachers,
};
use crate::engine::{EngineKind, KernelStudent};
use crate::error::{Error, Result, error, refuse};
use crate::layers::{LayerChoice, LayerPick};
use crate::optim::{AdamW, AdamWConfig, Decay, Schedule};
use crate::train::{PositionTargets, loss_and_grads};

/// How the student starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Init {
    /// Keep these layers of the teacher (GGUF or Hugging Face dir), dequantized to f32:
    /// `keep_layers` (a list in order, or `"auto:N"`: chosen on the cache, see
    /// [`crate::layers`]), or every layer but `drop_layers` (a list, or `"auto:M"`).
    FromTeacher {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep_layers: Option<LayerPick>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drop_layers: Option<LayerPick>,
    },
    /// A Hugging Face directory (e.g. an exported student, for a second stage).
    FromStudent { path: PathBuf },
    /// Random weights (seeded) of the architecture in a `config.json` (the file, or a
    /// directory holding it).
    Random { config: PathBuf, seed: u64 },
}

impl Init {
    /// Builds the student this initialisation describes, in f32 on `dev`.
    pub fn build(&self, dev: &Device) -> Result<Student> {
        let student = self.build_unchecked(dev)?;
        // Checkpoints and the export are Hugging Face directories: refuse a student whose
        // RoPE has no config.json form before training it.
        if let Err(e) = student.cfg.to_hf_json() {
            let path = match self {
                Init::FromTeacher { path, .. } | Init::FromStudent { path } => path,
                Init::Random { config, .. } => config,
            };
            refuse!(
                Setting,
                "{}: {e}; a student is saved as a Hugging Face directory, so start it from a \
                 Hugging Face teacher directory instead",
                path.display()
            );
        }
        Ok(student)
    }

    fn build_unchecked(&self, dev: &Device) -> Result<Student> {
        Ok(match self {
            Init::FromTeacher {
                path,
                keep_layers: Some(LayerPick::List(keep)),
                drop_layers: None,
            } => Student::from_teacher(path, keep, DType::F32, dev)?,
            Init::FromTeacher { path, .. } => refuse!(
                Setting,
                "{}: init.from_teacher needs its layers resolved to a list first ([`resolve_layers`])",
                path.display()
            ),
            Init::FromStudent { path } => Student::from_hf_dir(path, DType::F32, dev)?,
            Init::Random { config, seed } => {
                let dir = if config.is_file() {
                    if config.file_name().is_none_or(|n| n != "config.json") {
                        refuse!(
                            Setting,
                            "{}: init.random.config must be a file named config.json or a directory holding one",
                            config.display()
                        );
                    }
                    config.parent().unwrap_or(Path::new("."))
                } else {
                    config.as_path()
                };
                let cfg = kd_model::loader::read_hf_config(dir)?;
                Student::random(&cfg, *seed, DType::F32, dev)?
            }
        })
    }
}

/// Every setting of a run; recorded in each checkpoint, and a resume must match it.
///
/// Only `shards`, `out` and `init` are required; every other setting has the default given
/// on its field (the `DEFAULT_*` constants), so a pipeline's `[fit]` section, or
/// `student-fit`'s flags, name only what differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitConfig {
    pub shards: PathBuf,
    pub out: PathBuf,
    pub init: Init,
    /// Default: forward KL at τ = 1, α = 1, bucket tail.
    #[serde(default = "default_loss")]
    pub loss: LossConfig,
    /// Optimizer steps; default [`DEFAULT_STEPS`]. Ignored when `positions` is set.
    #[serde(default = "default_steps")]
    pub steps: u64,
    /// Train on at least this many distilled positions instead of a number of steps: the run
    /// takes as many steps as its batches need to reach it, counted before training over the
    /// same deterministic batches, and the learning-rate schedule spans those steps. Runs on
    /// the same shards with the same batching then train on exactly the same positions,
    /// whatever their loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<u64>,
    /// Tokens (padding included) per micro-batch; default [`DEFAULT_TOKEN_BUDGET`].
    #[serde(default = "default_token_budget")]
    pub token_budget: usize,
    /// Rows are cut to this many tokens; default [`DEFAULT_MAX_LEN`].
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// Peak learning rate; default [`DEFAULT_LR`].
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Final learning rate of the decay; default [`DEFAULT_MIN_LR`].
    #[serde(default = "default_min_lr")]
    pub min_lr: f64,
    /// Linear warm-up steps; default [`DEFAULT_WARMUP_STEPS`].
    #[serde(default = "default_warmup_steps")]
    pub warmup_steps: u64,
    /// Decay after warm-up; default cosine.
    #[serde(default = "default_decay")]
    pub decay: Decay,
    #[serde(default)]
    pub adamw: AdamWConfig,
    /// Gradients are clipped to this global norm; default 1.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Share of rows held out for evaluation, by a hash of their id; default
    /// [`DEFAULT_HOLDOUT_FRACTION`].
    #[serde(default = "default_holdout_fraction")]
    pub holdout_fraction: f64,
    /// Seed of the shuffle (and of a random initialisation's draws); default 0.
    #[serde(default)]
    pub seed: u64,
    /// Log every this many steps; default [`DEFAULT_LOG_EVERY`].
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Write a checkpoint every this many steps; default [`DEFAULT_CHECKPOINT_EVERY`].
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Positions whose full-vocabulary logits exist at once; default
    /// [`DEFAULT_LOGITS_CHUNK`].
    #[serde(default = "default_logits_chunk")]
    pub logits_chunk: usize,
    /// Distilled positions (training rows, in row order) each candidate cut is scored on
    /// when the teacher's layers are chosen (`keep_layers = "auto:N"`); default
    /// [`crate::layers::DEFAULT_AUTO_POSITIONS`].
    #[serde(
        default = "default_auto_layer_positions",
        skip_serializing_if = "is_default_auto_layer_positions"
    )]
    pub auto_layer_positions: usize,
    /// Micro-batches per optimizer step; their gradients are averaged weighted by their
    /// distilled positions, so the step sees the token mean of all of them.
    #[serde(default = "one")]
    pub grad_accum: u64,
    /// Share of `generated` rows when mixing with `scored` rows (e.g. 0.7); none mixes nothing.
    #[serde(default)]
    pub mix: Option<f64>,
    /// Further teachers' shard sets over the same rows (multi-teacher distillation). The
    /// teacher of `shards` gets weight `1 − Σ weights` of these.
    #[serde(default)]
    pub extra_teachers: Vec<TeacherShards>,
    /// A separate shard set to evaluate on (all its rows); without it, the held-out share of
    /// `shards` (`holdout_fraction`) is evaluated.
    #[serde(default)]
    pub eval_shards: Option<PathBuf>,
    /// Evaluate every this many steps (0: only at the start and the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Evaluate on at most this many rows (the first ones, in row order); none: all.
    #[serde(default)]
    pub eval_max_rows: Option<usize>,
    /// Train only on rows of this source (`generated` or `scored`), e.g. a second stage of
    /// hard cross-entropy on real data; none: every row.
    #[serde(default)]
    pub train_on: Option<kd_shard::Source>,
    /// Keep only the newest this many checkpoints (older ones are deleted once a newer one is
    /// published); none keeps every one. A checkpoint of a small student with its AdamW moments
    /// is hundreds of megabytes.
    #[serde(default)]
    pub keep_checkpoints: Option<usize>,
    /// Which of the cache's targets to train on: `"top_k"` or `"sampled"` (the draws of
    /// `teacher-dump --targets sample:N`); none: the cache's top-k when it has one, else its
    /// draws.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<TargetKind>,
    /// How sampled targets enter the loss: `"unbiased"` (forward KL at τ = 1, bucket tail:
    /// value and gradient unbiased in expectation; anything else is refused) or `"plug_in"`
    /// (any loss whose plug-in value is finite, accepting its bias). Ignored for top-k.
    #[serde(default, skip_serializing_if = "is_unbiased")]
    pub estimator: Estimator,
    /// The dtype of the matrix products (`student-fit --precision`): `f32` (default) or
    /// `bf16`, whose operands are rounded to bf16 with f32 master weights, AdamW moments,
    /// norms, softmax and loss. bf16 runs on the candle engine (a GPU, or `--engine candle`).
    #[serde(default, skip_serializing_if = "TrainPrecision::is_f32")]
    pub precision: TrainPrecision,
}

fn is_unbiased(e: &Estimator) -> bool {
    *e == Estimator::Unbiased
}

/// What a student's matrix products compute in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    #[default]
    F32,
    Bf16,
}

impl TrainPrecision {
    fn is_f32(&self) -> bool {
        *self == TrainPrecision::F32
    }

    /// candle's dtype of the products.
    pub fn dtype(self) -> DType {
        match self {
            TrainPrecision::F32 => DType::F32,
            TrainPrecision::Bf16 => DType::BF16,
        }
    }
}

impl std::str::FromStr for TrainPrecision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(TrainPrecision::F32),
            "bf16" => Ok(TrainPrecision::Bf16),
            _ => Err(format!("--precision {s:?}: expected f32 or bf16")),
        }
    }
}

/// Deletes all but the newest `keep` published checkpoints under `out`.
fn prune_checkpoints(out: &Path, keep: usize) -> Result<()> {
    let dirs = checkpoint_dirs(out);
    let n = dirs.len().saturating_sub(keep.max(1));
    for d in &dirs[..n] {
        std::fs::remove_dir_all(d).map_err(io(d))?;
    }
    Ok(())
}

/// Another teacher's shard set and its weight in the mixture.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherShards {
    pub shards: PathBuf,
    pub weight: f64,
}

pub(crate) fn one() -> u64 {
    1
}

/// Default `steps`.
pub const DEFAULT_STEPS: u64 = 1000;
/// Default `token_budget`.
pub const DEFAULT_TOKEN_BUDGET: usize = 8192;
/// Default `max_len`.
pub const DEFAULT_MAX_LEN: usize = 2048;
/// Default `lr`.
pub const DEFAULT_LR: f64 = 5e-4;
/// Default `min_lr`.
pub const DEFAULT_MIN_LR: f64 = 5e-5;
/// Default `warmup_steps`.
pub const DEFAULT_WARMUP_STEPS: u64 = 50;
/// Default `holdout_fraction`.
pub const DEFAULT_HOLDOUT_FRACTION: f64 = 0.1;
/// The batcher's next batch that has a distilled position. A batch whose rows' prompts all
/// fill `max_len` has nothing to distil: it is skipped, deterministically, so a resume (and
/// [`steps_for_positions`]) sees the same sequence.
fn next_distilled_batch<S: RowSource + ?Sized>(
    batcher: &mut Batcher,
    src: &S,
    rows: usize,
    cfg: &FitConfig,
) -> Result<Batch> {
    let mut tries = 0;
    loop {
        let b = batcher
            .next_batch(src)
            .ok_or_else(|| error!(Training, "no training rows"))?;
        if b.n_pos() > 0 {
            return Ok(b);
        }
        tries += 1;
        if tries > rows {
            refuse!(
                Setting,
                "{}: no training row has a response position within max_len = {}",
                cfg.shards.display(),
                cfg.max_len
            );
        }
    }
}

/// Optimizer steps (of `grad_accum` micro-batches each) until the batches from `batcher`
/// hold at least `target` distilled positions: the batches the run will see.
fn steps_for_positions<S: RowSource + ?Sized>(
    mut batcher: Batcher,
    src: &S,
    rows: usize,
    cfg: &FitConfig,
    target: u64,
) -> Result<u64> {
    let (mut steps, mut positions) = (0u64, 0u64);
    while positions < target {
        for _ in 0..cfg.grad_accum.max(1) {
            positions += next_distilled_batch(&mut batcher, src, rows, cfg)?.n_pos() as u64;
        }
        steps += 1;
    }
    Ok(steps)
}

/// Default `log_every`.
pub const DEFAULT_LOG_EVERY: u64 = 10;
/// Default `checkpoint_every`.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 250;
/// Default `logits_chunk`.
pub const DEFAULT_LOGITS_CHUNK: usize = 256;

pub(crate) fn default_loss() -> LossConfig {
    LossConfig {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 1.0,
        tail: TailPolicy::Bucket,
    }
}
pub(crate) fn default_steps() -> u64 {
    DEFAULT_STEPS
}
pub(crate) fn default_token_budget() -> usize {
    DEFAULT_TOKEN_BUDGET
}
pub(crate) fn default_max_len() -> usize {
    DEFAULT_MAX_LEN
}
pub(crate) fn default_lr() -> f64 {
    DEFAULT_LR
}
pub(crate) fn default_min_lr() -> f64 {
    DEFAULT_MIN_LR
}
pub(crate) fn default_warmup_steps() -> u64 {
    DEFAULT_WARMUP_STEPS
}
pub(crate) fn default_decay() -> Decay {
    Decay::Cosine
}
pub(crate) fn default_max_grad_norm() -> f64 {
    1.0
}
pub(crate) fn default_holdout_fraction() -> f64 {
    DEFAULT_HOLDOUT_FRACTION
}
pub(crate) fn default_log_every() -> u64 {
    DEFAULT_LOG_EVERY
}
pub(crate) fn default_checkpoint_every() -> u64 {
    DEFAULT_CHECKPOINT_EVERY
}
pub(crate) fn default_logits_chunk() -> usize {
    DEFAULT_LOGITS_CHUNK
}
pub(crate) fn default_auto_layer_positions() -> usize {
    crate::layers::DEFAULT_AUTO_POSITIONS
}
fn is_default_auto_layer_positions(n: &usize) -> bool {
    *n == crate::layers::DEFAULT_AUTO_POSITIONS
}

/// Opens the training teachers of `cfg`: `shards` alone, or joined with `extra_teachers` by
/// row id (refused when ids, tokens or tokenizers differ).
pub fn open_teachers(cfg: &FitConfig) -> Result<Teachers> {
    let first = ShardSet::open_targets(&cfg.shards, cfg.targets)?;
    if first.targets() == TargetKind::Sampled {
        if !cfg.extra_teachers.is_empty() {
            refuse!(
                Setting,
                "extra_teachers: {} holds sampled targets; several teachers need top-k targets",
                cfg.shards.display()
            );
        }
        kd_loss::sampled::check(&cfg.loss, cfg.estimator).map_err(|e| {
            error!(
                Setting,
                "loss on the sampled targets of {}: {e}",
                cfg.shards.display()
            )
        })?;
    }
    let mut sets = vec![first];
    let extra: f64 = cfg.extra_teachers.iter().map(|t| t.weight).sum();
    let valid = extra > 0.0 && extra < 1.0;
    if !cfg.extra_teachers.is_empty() && !valid {
        refuse!(
            Setting,
            "extra_teachers: the weights sum to {extra}; they must sum to less than 1 (the teacher of `shards` gets the rest)"
        );
    }
    let mut weights = vec![1.0 - extra];
    for t in &cfg.extra_teachers {
        sets.push(ShardSet::open_targets(&t.shards, Some(TargetKind::TopK))?);
        weights.push(t.weight);
    }
    Ok(ShardSet::zip(sets, weights)?)
}

/// The rows a run evaluates on: a separate shard set, or the held-out rows of the training
/// teachers.
pub enum EvalRows<'a> {
    Separate(Teachers, Vec<usize>),
    HeldOut(&'a Teachers, Vec<usize>),
}

impl EvalRows<'_> {
    /// Evaluates `model` on these rows.
    pub fn evaluate(
        &self,
        model: &mut EvalModel<'_>,
        max_len: usize,
        chunk: usize,
    ) -> Result<EvalReport> {
        match self {
            EvalRows::Separate(t, rows) => evaluate(model, t, rows, max_len, chunk),
            EvalRows::HeldOut(t, rows) => evaluate(model, *t, rows, max_len, chunk),
        }
    }
}

/// The forward pass an evaluation runs: candle's on the student, or the kernel engine's.
pub enum EvalModel<'a> {
    Candle(&'a Student),
    Kernels(&'a mut KernelStudent),
}

impl EvalModel<'_> {
    fn vocab_size(&self) -> usize {
        match self {
            EvalModel::Candle(s) => s.vocab_size(),
            EvalModel::Kernels(k) => k.cfg.vocab_size,
        }
    }

    /// Final hidden states of `batch`'s distilled positions, `[n_pos, hidden]`.
    fn position_hidden(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        match self {
            EvalModel::Kernels(k) => k.position_hidden(batch),
            EvalModel::Candle(student) => {
                let dev = student.device().clone();
                let (b, l) = (batch.batch_size(), batch.seq_len);
                let ids = candle_core::Tensor::from_vec(batch.input_ids.clone(), (b, l), &dev)?;
                let lengths: Vec<usize> = batch.lengths.iter().map(|&x| x as usize).collect();
                let hidden = student.forward(&ids, &lengths)?.detach();
                let d = hidden.dim(2)?;
                let idx = batch.flat_positions();
                let n = idx.len();
                let h = hidden
                    .reshape((b * l, d))?
                    .index_select(&candle_core::Tensor::from_vec(idx, n, &dev)?, 0)?;
                Ok(h.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
            }
        }
    }

    /// Logits `[n, vocab]` of hidden rows `h` `[n, hidden]`.
    fn logits(&mut self, h: &[f32], n: usize, out: &mut Vec<f32>) -> Result<()> {
        match self {
            EvalModel::Kernels(k) => k.logits_into(h, n, out),
            EvalModel::Candle(student) => {
                let d = h.len() / n.max(1);
                let t = candle_core::Tensor::from_slice(h, (n, d), student.device())?
                    .to_dtype(student.dtype())?;
                *out = student
                    .logits(&t)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
            }
        }
        Ok(())
    }
}

/// Rows in order, grouped so that a group's padded tokens stay within [`EVAL_TOKENS`]: a
/// forward pass keeps every intermediate of a group alive, so this bounds its memory.
pub(crate) fn eval_groups<'r, S: RowSource + ?Sized>(
    src: &S,
    rows: &'r [usize],
    max_len: usize,
) -> Vec<&'r [usize]> {
    let mut groups: Vec<&[usize]> = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, &r) in rows.iter().enumerate() {
        let len = src.row_len(r).min(max_len);
        let wide = longest.max(len);
        if i > start && wide * (i + 1 - start) > EVAL_TOKENS {
            groups.push(&rows[start..i]);
            (start, longest) = (i, len);
        } else {
            longest = wide;
        }
    }
    if start < rows.len() {
        groups.push(&rows[start..]);
    }
    groups
}

/// Per-token metrics on held-out rows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalReport {
    pub positions: usize,
    /// KL(teacher‖student) with the bucket tail, τ = 1.
    pub forward_kl: f64,
    /// KL(student‖teacher), bucket tail, τ = 1.
    pub reverse_kl: f64,
    /// Share of positions where the student's argmax is the teacher's top-1.
    pub top1_agreement: f64,
    /// Student NLL of the token that follows (the teacher's token for generated rows).
    pub nll: f64,
}

/// Most padded tokens per evaluation forward pass.
pub const EVAL_TOKENS: usize = 1024;

/// The forward KL evaluations report: bucket tail, τ = 1, no hard-label term.
pub const EVAL_FORWARD_KL: LossConfig = LossConfig {
    divergence: Divergence::ForwardKl,
    temperature: 1.0,
    alpha: 1.0,
    tail: TailPolicy::Bucket,
};

/// Evaluates `student` on `rows` of `src`, against each position's [`PositionTargets`]
/// (the teachers' mixture when there are several). One forward pass per batch of rows; the
/// logits of `chunk` positions at a time give every metric.
pub fn evaluate<S: RowSource + ?Sized>(
    model: &mut EvalModel<'_>,
    src: &S,
    rows: &[usize],
    max_len: usize,
    chunk: usize,
) -> Result<EvalReport> {
    let fwd = EVAL_FORWARD_KL;
    let rev = LossConfig {
        divergence: Divergence::ReverseKl,
        ..fwd
    };
    let v = model.vocab_size();
    let chunk = chunk.max(1);
    let mut r = EvalReport::default();
    let (mut f, mut rv, mut agree, mut nll) = (0.0, 0.0, 0usize, 0.0);
    let mut z = Vec::new();
    for group in eval_groups(src, rows, max_len) {
        let batch = Batch::collect(src, group, max_len, 0);
        let n = batch.n_pos();
        if n == 0 {
            continue;
        }
        let targets = PositionTargets::of(&batch, v)?;
        let hidden = model.position_hidden(&batch)?;
        let d = hidden.len() / n;
        for s in (0..n).step_by(chunk) {
            let len = chunk.min(n - s);
            model.logits(&hidden[s * d..(s + len) * d], len, &mut z)?;
            let positions = targets.positions(&batch, s, &z[..len * v], v);
            let (mf, _) = kd_loss::batch_loss(&fwd, &positions, None);
            let (mr, _) = kd_loss::batch_loss(&rev, &positions, None);
            f += mf.divergence * len as f64;
            rv += mr.divergence * len as f64;
            nll += mf.hard_ce * len as f64;
            for i in 0..len {
                let row = &z[i * v..(i + 1) * v];
                let mut best = 0;
                for (j, &x) in row.iter().enumerate() {
                    if x > row[best] {
                        best = j;
                    }
                }
                agree += usize::from(best as u32 == targets.argmax(s + i));
            }
        }
        r.positions += n;
    }
    let n = r.positions.max(1) as f64;
    r.forward_kl = f / n;
    r.reverse_kl = rv / n;
    r.top1_agreement = agree as f64 / n;
    r.nll = nll / n;
    Ok(r)
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct FitSummary {
    pub steps: u64,
    /// Where the student trained (`cpu`, `cuda:0`).
    pub device: String,
    /// The training engine (`kernels` or `candle`).
    pub engine: String,
    /// The dtype of the matrix products (`f32` or `bf16`).
    pub precision: TrainPrecision,
    /// Memory planned at start: the kernel engine's, or the candle engine's on a GPU (none
    /// for candle on a CPU).
    pub planned_bytes: Option<usize>,
    /// The most device memory in use after a backward pass, on a GPU.
    pub peak_device_bytes: Option<usize>,
    /// Seconds the kernel engine spent per phase of its steps in this process (none on the
    /// candle engine).
    pub engine_seconds: Option<std::collections::BTreeMap<String, f64>>,
    pub resumed_from: Option<u64>,
    /// The teacher layers the student was cut from, in order (none when it was not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_layers: Option<Vec<usize>>,
    /// How `keep_layers = "auto:N"` chose them: every candidate's score at every step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_choice: Option<LayerChoice>,
    pub initial: EvalReport,
    pub last_train_loss: f64,
    pub final_eval: EvalReport,
    /// Distilled positions trained on, over the whole run (resumes included).
    pub train_positions: u64,
    pub checkpoint: PathBuf,
    pub export: PathBuf,
    pub positions_per_s: f64,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    /// Distilled positions trained on so far.
    #[serde(default)]
    train_positions: u64,
    loader: LoaderPosition,
    config: FitConfig,
    shards_fingerprint: String,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io(kd_fs::IoError::new(path, e))
}

/// Publishes a directory atomically ([`kd_fs::publish_dir`]): `dest` is complete (old or
/// new) or absent; `crash` names the crash point just before the rename.
fn publish_dir(
    dest: &Path,
    crash: impl FnOnce() -> String,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    kd_fs::publish_dir(dest, crash, fill)
        .map_err(|e| e.context(format!("writing {}", dest.display())))
}

/// The engine a run trains with, holding the optimizer state (and for the kernel engine the
/// parameters: the candle student is brought up to date before it is saved or exported).
enum Trainer {
    Candle(AdamW),
    Kernels(Box<KernelStudent>),
}

impl Trainer {
    /// A fresh optimizer state for `student` on the engine `kind`.
    fn new(kind: EngineKind, student: &Student, cfg: &FitConfig) -> Result<Trainer> {
        Ok(match kind {
            EngineKind::Candle => {
                Trainer::Candle(AdamW::new(student.named_vars(), cfg.adamw.clone())?)
            }
            EngineKind::Kernels => Trainer::Kernels(Box::new(KernelStudent::new(
                student,
                cfg.adamw.clone(),
                cfg.token_budget.max(EVAL_TOKENS),
                cfg.max_len,
                cfg.logits_chunk,
            )?)),
        })
    }

    fn steps(&self) -> u64 {
        match self {
            Trainer::Candle(o) => o.step,
            Trainer::Kernels(k) => k.step,
        }
    }

    fn timings(&self) -> Option<crate::engine::Timings> {
        match self {
            Trainer::Candle(_) => None,
            Trainer::Kernels(k) => Some(*k.timings()),
        }
    }

    fn sync(&self, student: &Student) -> Result<()> {
        if let Trainer::Kernels(k) = self {
            k.write_to(student)?;
        }
        Ok(())
    }

    fn save_state(&self, path: &Path) -> Result<()> {
        match self {
            Trainer::Candle(o) => Ok(o.save_state(path)?),
            Trainer::Kernels(k) => k.save_state(path),
        }
    }

    fn eval_model<'a>(&'a mut self, student: &'a Student) -> EvalModel<'a> {
        match self {
            Trainer::Candle(_) => EvalModel::Candle(student),
            Trainer::Kernels(k) => EvalModel::Kernels(k),
        }
    }
}

/// Writes checkpoint `checkpoints/step-NNNNNNNN` with [`publish_dir`]: the weights, config and
/// tokenizer (so a checkpoint is also a Hugging Face directory), AdamW moments and state.
fn save_checkpoint(
    dir: &Path,
    student: &Student,
    trainer: &Trainer,
    state: &CheckpointState,
) -> Result<PathBuf> {
    trainer.sync(student)?;
    let final_dir = dir
        .join("checkpoints")
        .join(format!("step-{:08}", state.step));
    publish_dir(
        &final_dir,
        || format!("checkpoint-before-rename:{}", state.step),
        |tmp| {
            export(student, &state.config.shards, tmp)?;
            trainer.save_state(&tmp.join("optimizer.safetensors"))?;
            let state_path = tmp.join("state.json");
            std::fs::write(&state_path, serde_json::to_vec_pretty(state)?)
                .map_err(io(&state_path))?;
            Ok(())
        },
    )?;
    Ok(final_dir)
}

/// Removes half-written checkpoint and export directories (`.tmp-*`) a killed run left behind
/// in `out` and `out/checkpoints` (never a published one).
fn remove_stray_checkpoint_dirs(out: &Path) -> Result<()> {
    for dir in [out.to_path_buf(), out.join("checkpoints")] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name()
                .to_string_lossy()
                .starts_with(kd_fs::DIR_TMP_PREFIX)
                && e.path().is_dir()
            {
                std::fs::remove_dir_all(e.path()).map_err(io(&dir))?;
            }
        }
    }
    Ok(())
}

/// The published checkpoints under `out`, oldest first.
fn checkpoint_dirs(out: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join("state.json").exists()
        })
        .collect();
    dirs.sort();
    dirs
}

/// The lock file `fit` holds in its output folder while it runs.
pub const LOCK_FILE: &str = ".student-fit.lock";

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    checkpoint_dirs(out).pop()
}

/// Writes a Hugging Face directory `transformers` loads as `LlamaForCausalLM` into `dest`
/// (created if needed; files are written in place: see [`publish_export`]).
/// The GGUF types a student is exported as (`student-fit export --type`).
pub const GGUF_TYPES: [(&str, candle_core::quantized::GgmlDType); 4] = [
    ("f32", candle_core::quantized::GgmlDType::F32),
    ("f16", candle_core::quantized::GgmlDType::F16),
    ("q8_0", candle_core::quantized::GgmlDType::Q8_0),
    ("q4_0", candle_core::quantized::GgmlDType::Q4_0),
];

/// Writes the student directory `student_dir` (an export or a checkpoint: config.json,
/// model.safetensors, tokenizer.json and tokenizer_config.json) as the GGUF file `dest` with
/// matrices of `dtype` ([`kd_model::gguf_export`]); returns its size in bytes.
pub fn export_gguf(
    student_dir: &Path,
    dest: &Path,
    dtype: candle_core::quantized::GgmlDType,
) -> Result<u64> {
    let student = Student::from_hf_dir(student_dir, DType::F32, &Device::Cpu)?;
    let tok_path = student_dir.join("tokenizer.json");
    let tok = kd_tokenizer::Tokenizer::from_tokenizer_json(&tok_path)
        .map_err(|e| error!(Setting, "{}: {e}", tok_path.display()))?;
    let weights: kd_model::gguf_export::Weights = student
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    Ok(kd_model::gguf_export::write_gguf(
        dest,
        &student.cfg,
        &tok,
        &weights,
        dtype,
    )?)
}

pub fn export(student: &Student, shards: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let cfg = student.cfg.to_hf_json().map_err(|e| {
        error!(
            Setting,
            "{}: cannot export the student: {e}",
            dest.display()
        )
    })?;
    let mut cfg = cfg;
    if let (Some(kept), Some(m)) = (&student.teacher_layers, cfg.as_object_mut()) {
        m.insert(
            kd_model::trainable::TEACHER_LAYERS_KEY.into(),
            serde_json::json!(kept),
        );
    }
    let config = dest.join("config.json");
    std::fs::write(&config, serde_json::to_vec_pretty(&cfg)?).map_err(io(&config))?;
    student.save_safetensors(&dest.join("model.safetensors"))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = shards.join(f);
        if src.exists() {
            let to = dest.join(f);
            std::fs::copy(&src, &to).map_err(io(&to))?;
        }
    }
    let generation = serde_json::json!({"bos_token_id": student.cfg.bos_token_id, "eos_token_id": student.cfg.eos_token_id, "do_sample": false});
    let gen_path = dest.join("generation_config.json");
    std::fs::write(&gen_path, serde_json::to_vec_pretty(&generation)?).map_err(io(&gen_path))?;
    Ok(())
}

/// [`export`] published atomically with [`publish_dir`]: `dest` is always a complete export
/// (old or new).
pub fn publish_export(student: &Student, shards: &Path, dest: &Path) -> Result<()> {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    publish_dir(
        dest,
        || format!("export-before-rename:{name}"),
        |tmp| export(student, shards, tmp),
    )
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running [`fit`] to write a checkpoint and stop (called from a Ctrl-C handler).
pub fn request_stop() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs (or, with `resume`, continues) a training run, in phases: prepare (teachers,
/// student, rows, engine), resume from the latest checkpoint, evaluate the start, train step
/// by step (logging, evaluating and checkpointing as configured), then publish the student
/// and the summary.
///
/// `engine` forces a training engine; none picks the kernel engine where it runs (a llama or
/// Mistral student on an AVX-512 or AVX2 CPU) and candle otherwise.
pub fn fit(
    cfg: &FitConfig,
    resume: bool,
    progress: bool,
    engine: Option<EngineKind>,
    device: &Device,
) -> Result<FitSummary> {
    cfg.loss
        .validate()
        .map_err(|e| error!(Setting, "loss: {e}"))?;
    // One run per output folder: a second one would interleave metrics.jsonl and race the
    // checkpoints. The lock goes with the process, so a killed run can be resumed at once.
    std::fs::create_dir_all(&cfg.out).map_err(io(&cfg.out))?;
    let _lock = kd_fs::FolderLock::take(&cfg.out, LOCK_FILE)?;
    let teachers = open_teachers(cfg)?;
    let dev = device.clone();
    let split = training_split(cfg, &teachers)?;
    let (init, layer_choice) = resolve_layers(&cfg.init, cfg, &teachers, &split.train, progress)?;
    let mut student = init.build(&dev)?;
    check_vocab(&student, &teachers.sets()[0])?;
    if progress {
        print_student(&student, &teachers);
    }
    let eval_rows = eval_rows(cfg, &teachers, &split)?;
    let mut batcher = Batcher::new(
        &teachers,
        &split.train,
        BatchConfig {
            token_budget: cfg.token_budget,
            max_len: cfg.max_len,
            pad_id: 0,
            seed: cfg.seed,
            mix: cfg.mix,
            max_epochs: None,
        },
    )?;
    let total_steps = match cfg.positions {
        Some(target) => {
            steps_for_positions(batcher.clone(), &teachers, split.train.len(), cfg, target)?
        }
        None => cfg.steps,
    };
    let (kind, why_candle) = choose_engine(cfg, engine, &student, &dev)?;
    student.set_products(cfg.precision.dtype());
    let mut trainer = Trainer::new(kind, &student, cfg)?;
    if progress {
        print_engine(&trainer, why_candle.as_deref());
    }
    let plan_bytes = planned_bytes(&trainer, &student, cfg, &dev, progress)?;
    let fingerprint = teachers_fingerprint(&teachers);
    let resumed = match resume {
        true => resume_latest(cfg, &fingerprint, &mut student, &mut trainer, &mut batcher)?,
        false => None,
    };
    remove_stray_checkpoint_dirs(&cfg.out)?;
    let mut metrics = Metrics::open(&cfg.out.join("metrics.jsonl"))?;
    let initial = eval_rows.evaluate(
        &mut trainer.eval_model(&student),
        cfg.max_len,
        cfg.logits_chunk,
    )?;
    if resumed.is_none() {
        metrics.eval(0, 0, &initial)?;
    }
    if progress {
        eprintln!(
            "held-out at step {}: forward KL {:.4}, top-1 agreement {:.3} ({} positions)",
            trainer.steps(),
            initial.forward_kl,
            initial.top1_agreement,
            initial.positions
        );
    }
    let mut run = Run {
        cfg,
        teachers: &teachers,
        n_train: split.train.len(),
        eval_rows: &eval_rows,
        student: &student,
        trainer: &mut trainer,
        batcher: &mut batcher,
        metrics: &mut metrics,
        fingerprint: &fingerprint,
        sched: Schedule {
            lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup_steps: cfg.warmup_steps,
            total_steps,
            decay: cfg.decay,
        },
        progress,
        train_positions: resumed.map_or(0, |(_, p)| p),
        positions: 0,
        last_loss: f64::NAN,
        last_checkpoint: latest_checkpoint(&cfg.out),
        final_eval: None,
    };
    let start = Instant::now();
    run.train()?;
    let secs = start.elapsed().as_secs_f64();
    let (positions, last_loss, train_positions) =
        (run.positions, run.last_loss, run.train_positions);
    let (last_ck, final_eval) = (run.last_checkpoint.take(), run.final_eval.take());
    let final_eval = match final_eval {
        Some(r) => r,
        None => eval_rows.evaluate(
            &mut trainer.eval_model(&student),
            cfg.max_len,
            cfg.logits_chunk,
        )?,
    };
    trainer.sync(&student)?;
    let export_dir = cfg.out.join("student");
    publish_export(&student, &cfg.shards, &export_dir)?;
    let summary = FitSummary {
        steps: trainer.steps(),
        device: kd_model::device_name(&dev),
        engine: kind.name().to_string(),
        precision: cfg.precision,
        peak_device_bytes: crate::plan::peak_device_memory(),
        planned_bytes: plan_bytes,
        engine_seconds: trainer.timings().map(|t| {
            t.phases()
                .iter()
                .map(|(k, d)| (k.to_string(), d.as_secs_f64()))
                .collect()
        }),
        resumed_from: resumed.map(|(step, _)| step),
        teacher_layers: student.teacher_layers.clone(),
        layer_choice,
        initial,
        last_train_loss: last_loss,
        final_eval,
        train_positions,
        checkpoint: last_ck.unwrap_or_default(),
        export: export_dir,
        positions_per_s: positions as f64 / secs.max(1e-9),
        seconds: secs,
    };
    kd_fs::write_bytes_atomic(
        &cfg.out.join("summary.json"),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// Where a run keeps the layers it chose (`auto:N`), for a later run with the same request.
pub const LAYER_CHOICE_FILE: &str = "layer_choice.json";

/// `init` with its teacher layers as a list: `drop_layers` turned into the layers kept, and
/// `auto:N` chosen on `rows` of the cache (the measurement returned beside it).
pub fn resolve_layers(
    init: &Init,
    cfg: &FitConfig,
    src: &Teachers,
    rows: &[usize],
    progress: bool,
) -> Result<(Init, Option<LayerChoice>)> {
    let Init::FromTeacher {
        path,
        keep_layers,
        drop_layers,
    } = init
    else {
        return Ok((init.clone(), None));
    };
    let (pick, drop) = match (keep_layers, drop_layers) {
        (Some(p), None) => (p, false),
        (None, Some(p)) => (p, true),
        _ => refuse!(
            Setting,
            "{}: init.from_teacher takes exactly one of keep_layers and drop_layers",
            path.display()
        ),
    };
    let list = |kept: Vec<usize>| Init::FromTeacher {
        path: path.clone(),
        keep_layers: Some(LayerPick::List(kept)),
        drop_layers: None,
    };
    if let (LayerPick::List(kept), false) = (pick, drop) {
        return Ok((list(kept.clone()), None));
    }
    let total = kd_model::loader::read_config(path)?.num_hidden_layers;
    let n = match crate::layers::keep_count(pick, drop, total, path)? {
        LayerPick::List(kept) => return Ok((list(kept), None)),
        LayerPick::Auto(n) => n,
    };
    let (sample, _) = crate::layers::sample(src, rows, cfg.auto_layer_positions, cfg.max_len);
    let request = crate::layers::ChoiceRequest {
        teacher: path.display().to_string(),
        keep: n,
        shards_fingerprint: teachers_fingerprint(src),
        positions: cfg.auto_layer_positions,
        max_len: cfg.max_len,
        rows_sha256: crate::layers::rows_sha256(&sample),
    };
    let saved_at = cfg.out.join(LAYER_CHOICE_FILE);
    if let Some(choice) = crate::layers::saved(&saved_at, &request) {
        if progress {
            eprintln!(
                "layers {:?}: chosen earlier for the same teacher, cache and sample ({})",
                choice.kept,
                saved_at.display()
            );
        }
        return Ok((list(choice.kept.clone()), Some(choice)));
    }
    let teacher = kd_model::load(path, kd_model::Precision::Exact, &Device::Cpu)?;
    let Some(model) = teacher.model.cpu() else {
        refuse!(
            Setting,
            "{}: keep_layers = \"auto:{n}\" runs the teacher on the CPU kernels, which need AVX-512 or AVX2 with FMA",
            path.display()
        );
    };
    let vocab = src.sets()[0].vocab_size() as usize;
    if model.cfg.vocab_size != vocab {
        refuse!(
            Setting,
            "{}: the teacher's vocabulary ({}) is not the cache's ({vocab})",
            path.display(),
            model.cfg.vocab_size
        );
    }
    let choice = crate::layers::choose(model, src, &sample, request, cfg.logits_chunk, progress)?;
    std::fs::create_dir_all(&cfg.out).map_err(io(&cfg.out))?;
    kd_fs::write_bytes_atomic(&saved_at, &serde_json::to_vec_pretty(&choice)?)?;
    if progress {
        eprintln!(
            "chose layers {:?} in {:.0} s: forward KL {:.4} on the sample (the whole teacher: {:.4})",
            choice.kept,
            choice.seconds,
            choice
                .removals
                .last()
                .map_or(choice.teacher_forward_kl, |r| r.forward_kl),
            choice.teacher_forward_kl
        );
    }
    Ok((list(choice.kept.clone()), Some(choice)))
}

/// Prints the student's shape and the rows it trains on.
fn print_student(student: &Student, teachers: &Teachers) {
    let c = &student.cfg;
    eprintln!(
        "student: {} layers, hidden {}, MLP {}, {} heads ({} key/value), vocabulary {}: {:.1} M parameters; {} rows from {} teacher(s)",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        student.n_params() as f64 / 1e6,
        teachers.len(),
        teachers.sets().len()
    );
}

/// Prints the training engine and, for the kernels, their memory plan.
/// The memory a run plans at start: the kernel engine's, or on a GPU the candle engine's
/// (printed, and refused when the device has too little free memory); none for candle on a
/// CPU.
fn planned_bytes(
    trainer: &Trainer,
    student: &Student,
    cfg: &FitConfig,
    dev: &Device,
    progress: bool,
) -> Result<Option<usize>> {
    Ok(match trainer {
        Trainer::Kernels(k) => Some(k.plan().total_bytes()),
        Trainer::Candle(_) if !dev.is_cpu() => {
            let plan = crate::plan::candle_plan(
                &student.cfg,
                student.n_params(),
                cfg.token_budget.max(EVAL_TOKENS),
                cfg.max_len,
                cfg.logits_chunk,
                cfg.precision == TrainPrecision::Bf16,
            );
            if progress {
                eprintln!("memory plan on {}: {plan}", kd_model::device_name(dev));
            }
            crate::plan::check_fits(&plan, dev)?;
            Some(plan.total_bytes())
        }
        Trainer::Candle(_) => None,
    })
}

/// The engine for `cfg`: bf16 products run on candle's engine, which is chosen for them
/// unless another engine was asked for.
fn choose_engine(
    cfg: &FitConfig,
    asked: Option<EngineKind>,
    student: &Student,
    dev: &Device,
) -> Result<(EngineKind, Option<String>)> {
    if cfg.precision == TrainPrecision::Bf16 {
        return match asked {
            Some(EngineKind::Kernels) => refuse!(
                Setting,
                "--precision bf16 runs on the candle engine; the kernel engine computes in f32"
            ),
            _ => Ok((
                EngineKind::Candle,
                Some("--precision bf16 runs on the candle engine".into()),
            )),
        };
    }
    crate::engine::choose(asked, &student.cfg, cfg.max_len, dev)
}

fn print_engine(trainer: &Trainer, why_candle: Option<&str>) {
    match trainer {
        Trainer::Kernels(k) => {
            let level = match kd_model::kernels::level() {
                Some(kd_model::kernels::Level::Avx512) => "AVX-512",
                _ => "AVX2",
            };
            eprintln!("engine: kernels ({level}); memory plan: {}", k.plan());
        }
        Trainer::Candle(_) => match why_candle {
            Some(why) => eprintln!("engine: candle ({why})"),
            None => eprintln!("engine: candle"),
        },
    }
}

/// The training and held-out rows (by id hash), the training rows narrowed to `train_on`.
fn training_split(cfg: &FitConfig, teachers: &Teachers) -> Result<Split> {
    let set = &teachers.sets()[0];
    let mut split = Split::by_id_hash(teachers, cfg.holdout_fraction)?;
    if let Some(src) = cfg.train_on {
        split.train.retain(|&r| set.row(r).source == src);
        if split.train.is_empty() {
            refuse!(
                Setting,
                "train_on = \"{}\": {} has no such training rows",
                src.as_str(),
                cfg.shards.display()
            );
        }
    }
    Ok(split)
}

/// The rows the student is evaluated on: `eval_shards`, or the held-out rows (against the
/// same cache's top-k when it trains on draws), at most `eval_max_rows`.
fn eval_rows<'t>(cfg: &FitConfig, teachers: &'t Teachers, split: &Split) -> Result<EvalRows<'t>> {
    let set = &teachers.sets()[0];
    let mut eval_rows = match &cfg.eval_shards {
        Some(dir) => {
            let e = ShardSet::open_targets(dir, Some(TargetKind::TopK))?;
            set.check_compatible(&e)?;
            let n = e.len();
            EvalRows::Separate(ShardSet::zip(vec![e], vec![1.0])?, (0..n).collect())
        }
        // Held-out rows of sampled targets are evaluated against the same cache's top-k
        // (a `top:K,sample:N` dump): the per-token metrics need the teacher's distribution.
        None if set.targets() == TargetKind::Sampled && !split.held_out.is_empty() => {
            if set.manifest().top_k() == 0 {
                refuse!(
                    Setting,
                    "{}: held-out evaluation needs the teacher's top-k, and this cache holds \
                     sampled targets only: dump with --targets top:K,sample:N, give eval_shards \
                     (a top-k dump), or set holdout_fraction = 0",
                    cfg.shards.display()
                );
            }
            let e = ShardSet::open_targets(&cfg.shards, Some(TargetKind::TopK))?;
            EvalRows::Separate(ShardSet::zip(vec![e], vec![1.0])?, split.held_out.clone())
        }
        None => EvalRows::HeldOut(teachers, split.held_out.clone()),
    };
    if let Some(m) = cfg.eval_max_rows {
        match &mut eval_rows {
            EvalRows::Separate(_, r) | EvalRows::HeldOut(_, r) => r.truncate(m),
        }
    }
    Ok(eval_rows)
}

/// Restores the student, the optimizer and the loader from the latest checkpoint in
/// `cfg.out`, if there is one, refusing one made from other shards or another config.
/// Returns the checkpoint's step and training positions.
fn resume_latest(
    cfg: &FitConfig,
    fingerprint: &str,
    student: &mut Student,
    trainer: &mut Trainer,
    batcher: &mut Batcher,
) -> Result<Option<(u64, u64)>> {
    let Some(ck) = latest_checkpoint(&cfg.out) else {
        return Ok(None);
    };
    let state: CheckpointState =
        serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(io(&ck))?)?;
    if state.shards_fingerprint != fingerprint {
        refuse!(
            Resume,
            "{}: cannot resume: the shard set differs (fingerprint {} vs {})",
            ck.display(),
            state.shards_fingerprint,
            fingerprint
        );
    }
    if state.config != *cfg {
        let a = serde_json::to_value(&state.config)?;
        let b = serde_json::to_value(cfg)?;
        let field = a
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        refuse!(
            Resume,
            "{}: cannot resume: config field `{field}` differs",
            ck.display()
        );
    }
    student.load_safetensors(&ck.join("model.safetensors"))?;
    let opt_path = ck.join("optimizer.safetensors");
    match trainer {
        Trainer::Candle(opt) => {
            *opt = AdamW::new(student.named_vars(), cfg.adamw.clone())?;
            opt.load_state(&opt_path, state.step)?;
        }
        Trainer::Kernels(k) => {
            k.read_from(student)?;
            k.load_state(&opt_path, state.step)?;
        }
    }
    batcher.restore(state.loader)?;
    Ok(Some((state.step, state.train_positions)))
}

/// `metrics.jsonl`, appended to: one JSON line per logged step and per evaluation.
struct Metrics {
    file: std::fs::File,
    path: PathBuf,
}

impl Metrics {
    /// Opens `path` for appending. A killed run may have left half a line: it is ended, so
    /// the next line stays readable.
    fn open(path: &Path) -> Result<Metrics> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            let mut r = std::fs::File::open(path).map_err(io(path))?;
            r.seek(SeekFrom::Start(len - 1))
                .and_then(|_| r.read_exact(&mut last))
                .map_err(io(path))?;
            if last[0] != b'\n' {
                writeln!(file).map_err(io(path))?;
            }
        }
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    fn line(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").map_err(io(&self.path))
    }

    fn eval(&mut self, step: u64, train_positions: u64, r: &EvalReport) -> Result<()> {
        self.line(&serde_json::json!({"step": step, "train_positions": train_positions, "eval": r}))
    }
}

/// A training run in progress: what one step reads and the counters it moves.
struct Run<'a> {
    cfg: &'a FitConfig,
    teachers: &'a Teachers,
    n_train: usize,
    eval_rows: &'a EvalRows<'a>,
    student: &'a Student,
    trainer: &'a mut Trainer,
    batcher: &'a mut Batcher,
    metrics: &'a mut Metrics,
    fingerprint: &'a str,
    sched: Schedule,
    progress: bool,
    /// Distilled positions trained on since the run began, resumes included.
    train_positions: u64,
    /// Distilled positions trained on by this process (its rate).
    positions: usize,
    last_loss: f64,
    last_checkpoint: Option<PathBuf>,
    final_eval: Option<EvalReport>,
}

impl Run<'_> {
    /// Steps until the schedule's last step, checkpointing on an interrupt.
    fn train(&mut self) -> Result<()> {
        let total_steps = self.sched.total_steps;
        let bar = if self.progress {
            let b = indicatif::ProgressBar::new(total_steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len}  {msg}  eta {eta}",
                )
                .expect("a valid template"),
            );
            b.set_position(self.trainer.steps());
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let start = Instant::now();
        while self.trainer.steps() < total_steps {
            let step = self.trainer.steps();
            if interrupted() {
                let ck = self.checkpoint(step)?;
                refuse!(
                    Training,
                    "interrupted at step {step}; checkpoint {} (continue with --resume)",
                    ck.display()
                );
            }
            let (loss, info) = self.step(step)?;
            self.positions += loss.positions;
            self.train_positions += loss.positions as u64;
            self.last_loss = loss.total;
            let done = self.trainer.steps();
            bar.set_position(done);
            if done % self.cfg.log_every.max(1) == 0 || done == total_steps {
                let rate = self.positions as f64 / start.elapsed().as_secs_f64().max(1e-9);
                self.metrics.line(&serde_json::json!({"step": done, "loss": loss.total, "divergence": loss.divergence, "hard_ce": loss.hard_ce,
                    "lr": info.lr, "grad_norm": info.grad_norm, "clipped": info.clipped, "positions": loss.positions,
                    "train_positions": self.train_positions, "positions_per_s": rate}))?;
                bar.set_message(format!("loss {:.4}  {rate:.0} positions/s", loss.total));
                // Without a terminal the bar is hidden: keep a plain line per log interval.
                if self.progress {
                    bar.println(format!(
                        "step {done}/{}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} positions/s",
                        total_steps, loss.total, info.lr, info.grad_norm, rate
                    ));
                }
            }
            let eval_every = self.cfg.eval_every;
            if done == total_steps || (eval_every > 0 && done % eval_every == 0) {
                let progress = self.progress;
                let r = self.evaluate(done)?;
                if progress {
                    bar.println(format!(
                        "held-out at step {done}: forward KL {:.4}, top-1 agreement {:.3}",
                        r.forward_kl, r.top1_agreement
                    ));
                }
            }
            if done % self.cfg.checkpoint_every.max(1) == 0 || done == total_steps {
                let ck = self.checkpoint(done)?;
                self.last_checkpoint = Some(ck);
                if let Some(keep) = self.cfg.keep_checkpoints {
                    prune_checkpoints(&self.cfg.out, keep)?;
                }
            }
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// One optimizer step over `grad_accum` micro-batches, weighted by their positions. A
    /// loss that is not finite stops the run before it is applied.
    fn step(&mut self, step: u64) -> Result<(crate::train::BatchLoss, crate::optim::StepInfo)> {
        let cfg = self.cfg;
        let (mut micro, mut micro_grads) = (Vec::new(), Vec::new());
        for _ in 0..cfg.grad_accum.max(1) {
            let batch = next_distilled_batch(self.batcher, self.teachers, self.n_train, cfg)?;
            let mut l = match &mut *self.trainer {
                Trainer::Candle(_) => {
                    let (l, g) =
                        loss_and_grads(self.student, &batch, &cfg.loss, cfg.logits_chunk, true)?;
                    micro_grads.extend(g);
                    l
                }
                Trainer::Kernels(k) => k.accumulate(&batch, &cfg.loss, cfg.logits_chunk)?,
            };
            if kd_fs::injected_fault(|| format!("nan-loss:{step}")) {
                l.total = f64::NAN;
            }
            if !l.total.is_finite() {
                refuse!(
                    Training,
                    "loss became {} at step {step}; stopped without applying it; last good checkpoint: {}",
                    l.total,
                    self.last_checkpoint
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none".into())
                );
            }
            micro.push(l);
        }
        let loss = crate::train::combine_losses(&micro);
        if loss.positions == 0 {
            refuse!(
                Training,
                "step {step}: the batch has no distilled positions"
            );
        }
        kd_fs::crash_point(|| format!("before-update:{step}"));
        let lr = self.sched.lr_at(step);
        let info = match &mut *self.trainer {
            Trainer::Candle(opt) => {
                let parts = micro.into_iter().zip(micro_grads).collect();
                let (_, grads) = crate::train::combine_micro_batches(parts, opt.params())?;
                opt.step(&grads, lr, cfg.max_grad_norm)?
            }
            Trainer::Kernels(k) => k.step(lr, cfg.max_grad_norm),
        };
        Ok((loss, info))
    }

    /// Evaluates the student after step `done` and logs the result.
    fn evaluate(&mut self, done: u64) -> Result<&EvalReport> {
        let r = self.eval_rows.evaluate(
            &mut self.trainer.eval_model(self.student),
            self.cfg.max_len,
            self.cfg.logits_chunk,
        )?;
        self.metrics.eval(done, self.train_positions, &r)?;
        Ok(self.final_eval.insert(r))
    }

    /// Publishes a checkpoint of the state after `step` steps.
    fn checkpoint(&mut self, step: u64) -> Result<PathBuf> {
        let state = CheckpointState {
            step,
            train_positions: self.train_positions,
            loader: self.batcher.position(),
            config: self.cfg.clone(),
            shards_fingerprint: self.fingerprint.to_string(),
        };
        save_checkpoint(&self.cfg.out, self.student, self.trainer, &state)
    }
}

/// Refuses a student whose vocabulary differs from the shards'.
pub fn check_vocab(student: &Student, set: &ShardSet) -> Result<()> {
    if student.vocab_size() != set.vocab_size() as usize {
        refuse!(
            Setting,
            "the student's vocabulary ({} tokens) differs from the shards' ({} tokens, {}): a student must share the teacher's tokenizer",
            student.vocab_size(),
            set.vocab_size(),
            set.dir().display()
        );
    }
    Ok(())
}

/// A single teacher keeps its shard set's fingerprint; several get the joint one.
fn teachers_fingerprint(t: &Teachers) -> String {
    match t.sets() {
        [one] => one.fingerprint().to_string(),
        _ => t.fingerprint(),
    }
}
