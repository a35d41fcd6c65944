//! A training run: initialise the student, read the shards, train with AdamW, log metrics,
//! write checkpoints atomically, resume exactly, evaluate on held-out rows, export.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use kd_loss::{Divergence, LossConfig, TailPolicy};
use kd_model::trainable::Student;
use serde::{Deserialize, Serialize};

use crate::data::{Batch, BatchConfig, Batcher, LoaderPosition, ShardSet, Split};
use crate::optim::{AdamW, AdamWConfig, Decay, Schedule};
use crate::train::loss_and_grads;

/// How the student starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Init {
    /// Keep these layers of the teacher (GGUF or Hugging Face dir), dequantized to f32.
    FromTeacher {
        path: PathBuf,
        keep_layers: Vec<usize>,
    },
    /// A Hugging Face directory (e.g. an exported student, for a second stage).
    FromStudent { path: PathBuf },
}

/// Every setting of a run; recorded in each checkpoint, and a resume must match it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitConfig {
    pub shards: PathBuf,
    pub out: PathBuf,
    pub init: Init,
    pub loss: LossConfig,
    pub steps: u64,
    pub token_budget: usize,
    pub max_len: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    #[serde(default)]
    pub adamw: AdamWConfig,
    pub max_grad_norm: f64,
    pub holdout_fraction: f64,
    pub seed: u64,
    pub log_every: u64,
    pub checkpoint_every: u64,
    pub logits_chunk: usize,
    /// Micro-batches per optimizer step; their gradients are averaged weighted by their
    /// distilled positions, so the step sees the token mean of all of them.
    #[serde(default = "one")]
    pub grad_accum: u64,
    /// Share of `generated` rows when mixing with `scored` rows (e.g. 0.7); none mixes nothing.
    #[serde(default)]
    pub mix: Option<f64>,
}

fn one() -> u64 {
    1
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

/// Evaluates `student` on `rows` of `set`.
pub fn evaluate(
    student: &Student,
    set: &ShardSet,
    rows: &[usize],
    max_len: usize,
    chunk: usize,
) -> kd_model::Result<EvalReport> {
    let fwd = LossConfig {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 1.0,
        tail: TailPolicy::Bucket,
    };
    let rev = LossConfig {
        divergence: Divergence::ReverseKl,
        ..fwd
    };
    let mut r = EvalReport::default();
    let (mut f, mut rv, mut agree, mut nll) = (0.0, 0.0, 0usize, 0.0);
    for group in rows.chunks(8) {
        let batch = Batch::collect(set, group, max_len, 0);
        let n = batch.pos_row.len();
        if n == 0 {
            continue;
        }
        let (lf, _) = loss_and_grads(student, &batch, &fwd, chunk, false)?;
        let (lr, _) = loss_and_grads(student, &batch, &rev, chunk, false)?;
        f += lf.divergence * n as f64;
        rv += lr.divergence * n as f64;
        nll += lf.hard_ce * n as f64;
        agree += top1_agreements(student, &batch, chunk)?;
        r.positions += n;
    }
    let n = r.positions.max(1) as f64;
    r.forward_kl = f / n;
    r.reverse_kl = rv / n;
    r.top1_agreement = agree as f64 / n;
    r.nll = nll / n;
    Ok(r)
}

fn top1_agreements(student: &Student, batch: &Batch, chunk: usize) -> kd_model::Result<usize> {
    let dev = student.device().clone();
    let (b, l) = (batch.batch_size(), batch.seq_len);
    let ids = candle_core::Tensor::from_vec(batch.input_ids.clone(), (b, l), &dev)?;
    let lengths: Vec<usize> = batch.lengths.iter().map(|&x| x as usize).collect();
    let hidden = student.forward(&ids, &lengths)?.detach();
    let d = hidden.dim(2)?;
    let flat = hidden.reshape((b * l, d))?;
    let k = batch.teachers[0].k;
    let mut agree = 0;
    let n = batch.pos_row.len();
    for s in (0..n).step_by(chunk.max(1)) {
        let len = chunk.max(1).min(n - s);
        let idx: Vec<u32> = (s..s + len)
            .map(|p| batch.pos_row[p] * l as u32 + batch.pos_t[p])
            .collect();
        let h = flat.index_select(&candle_core::Tensor::from_vec(idx, len, &dev)?, 0)?;
        let am: Vec<u32> = student.logits(&h)?.argmax(1)?.to_vec1()?;
        for (i, a) in am.iter().enumerate() {
            agree += usize::from(*a == batch.teachers[0].topk_ids[(s + i) * k]);
        }
    }
    Ok(agree)
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct FitSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub initial: EvalReport,
    pub last_train_loss: f64,
    pub final_eval: EvalReport,
    pub checkpoint: PathBuf,
    pub export: PathBuf,
    pub positions_per_s: f64,
    pub seconds: f64,
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    loader: LoaderPosition,
    config: FitConfig,
    shards_fingerprint: String,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}: {e}", path.display())
}

/// Writes a checkpoint directory atomically: a temporary directory is filled and fsynced, then
/// renamed to `step-NNNNNNNN`; a checkpoint is complete or absent.
fn save_checkpoint(
    dir: &Path,
    student: &Student,
    opt: &AdamW,
    state: &CheckpointState,
) -> anyhow::Result<PathBuf> {
    let root = dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let final_dir = root.join(format!("step-{:08}", state.step));
    let tmp = root.join(format!(
        ".tmp-step-{:08}-{}",
        state.step,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    student.save_safetensors(&tmp.join("model.safetensors"))?;
    opt.save_state(&tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_vec_pretty(state)?;
    std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::File::open(tmp.join(f))
            .and_then(|h| h.sync_all())
            .map_err(io(&tmp))?;
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    std::fs::File::open(&root)
        .and_then(|h| h.sync_all())
        .map_err(io(&root))?;
    Ok(final_dir)
}

/// Removes half-written checkpoint directories a killed run left behind (never a published
/// `step-*` one).
fn remove_stray_checkpoint_dirs(out: &Path) -> anyhow::Result<()> {
    let root = out.join("checkpoints");
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for e in rd.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(".tmp-step-") {
            std::fs::remove_dir_all(e.path()).map_err(io(&root))?;
        }
    }
    Ok(())
}

/// The newest complete checkpoint under `out`, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    let root = out.join("checkpoints");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join("state.json").exists()
        })
        .collect();
    dirs.sort();
    dirs.pop()
}

/// Writes a Hugging Face directory `transformers` loads as `LlamaForCausalLM`.
pub fn export(student: &Student, shards: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).map_err(io(dest))?;
    let mut cfg = serde_json::to_value(&student.cfg)?;
    cfg["model_type"] = "llama".into();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    cfg["hidden_act"] = "silu".into();
    cfg["torch_dtype"] = "float32".into();
    cfg["head_dim"] = student.cfg.head_dim().into();
    std::fs::write(dest.join("config.json"), serde_json::to_vec_pretty(&cfg)?).map_err(io(dest))?;
    student.save_safetensors(&dest.join("model.safetensors"))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = shards.join(f);
        if src.exists() {
            std::fs::copy(&src, dest.join(f)).map_err(io(&src))?;
        }
    }
    let generation = serde_json::json!({"bos_token_id": student.cfg.bos_token_id, "eos_token_id": student.cfg.eos_token_id, "do_sample": false});
    std::fs::write(
        dest.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation)?,
    )
    .map_err(io(dest))?;
    Ok(())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running [`fit`] to write a checkpoint and stop (called from a Ctrl-C handler).
pub fn request_stop() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Runs (or, with `resume`, continues) a training run.
pub fn fit(cfg: &FitConfig, resume: bool, progress: bool) -> anyhow::Result<FitSummary> {
    cfg.loss
        .validate()
        .map_err(|e| anyhow::anyhow!("loss: {e}"))?;
    let set = ShardSet::open(&cfg.shards)?;
    let dev = Device::Cpu;
    let mut student = match &cfg.init {
        Init::FromTeacher { path, keep_layers } => {
            Student::from_teacher(path, keep_layers, DType::F32, &dev)?
        }
        Init::FromStudent { path } => Student::from_hf_dir(path, DType::F32, &dev)?,
    };
    if student.vocab_size() != set.vocab_size() as usize {
        anyhow::bail!(
            "the student's vocabulary ({} tokens) differs from the shards' ({} tokens, {}): a student must share the teacher's tokenizer",
            student.vocab_size(),
            set.vocab_size(),
            cfg.shards.display()
        );
    }
    let split = Split::by_id_hash(&set, cfg.holdout_fraction)?;
    let bcfg = BatchConfig {
        token_budget: cfg.token_budget,
        max_len: cfg.max_len,
        pad_id: 0,
        seed: cfg.seed,
        mix: cfg.mix,
        max_epochs: None,
    };
    let mut batcher = Batcher::new(&set, &split.train, bcfg)?;
    let mut opt = AdamW::new(student.named_vars(), cfg.adamw.clone())?;
    let mut resumed_from = None;
    if resume && let Some(ck) = latest_checkpoint(&cfg.out) {
        let state: CheckpointState =
            serde_json::from_slice(&std::fs::read(ck.join("state.json")).map_err(io(&ck))?)?;
        if state.shards_fingerprint != set.fingerprint() {
            anyhow::bail!(
                "{}: cannot resume: the shard set differs (fingerprint {} vs {})",
                ck.display(),
                state.shards_fingerprint,
                set.fingerprint()
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
            anyhow::bail!(
                "{}: cannot resume: config field `{field}` differs",
                ck.display()
            );
        }
        student.load_safetensors(&ck.join("model.safetensors"))?;
        opt = AdamW::new(student.named_vars(), cfg.adamw.clone())?;
        opt.load_state(&ck.join("optimizer.safetensors"), state.step)?;
        batcher.restore(state.loader)?;
        resumed_from = Some(state.step);
    }
    let sched = Schedule {
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: cfg.warmup_steps,
        total_steps: cfg.steps,
        decay: cfg.decay,
    };
    let initial = evaluate(
        &student,
        &set,
        &split.held_out,
        cfg.max_len,
        cfg.logits_chunk,
    )?;
    std::fs::create_dir_all(&cfg.out).map_err(io(&cfg.out))?;
    remove_stray_checkpoint_dirs(&cfg.out)?;
    let metrics_path = cfg.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(io(&metrics_path))?;
    let start = Instant::now();
    let (mut positions, mut last_loss) = (0usize, f64::NAN);
    let mut last_ck = latest_checkpoint(&cfg.out);
    while opt.step < cfg.steps {
        let step = opt.step;
        if interrupted() {
            let state = CheckpointState {
                step,
                loader: batcher.position(),
                config: cfg.clone(),
                shards_fingerprint: set.fingerprint().to_string(),
            };
            let ck = save_checkpoint(&cfg.out, &student, &opt, &state)?;
            anyhow::bail!(
                "interrupted at step {step}; checkpoint {} (continue with --resume)",
                ck.display()
            );
        }
        // One optimizer step over `grad_accum` micro-batches, weighted by their positions.
        let mut micro = Vec::new();
        for _ in 0..cfg.grad_accum.max(1) {
            let batch = batcher
                .next_batch(&set)
                .ok_or_else(|| anyhow::anyhow!("no training rows"))?;
            let (l, g) = loss_and_grads(&student, &batch, &cfg.loss, cfg.logits_chunk, true)?;
            if !l.total.is_finite() {
                anyhow::bail!(
                    "loss became {} at step {step}; stopped without applying it; last good checkpoint: {}",
                    l.total,
                    last_ck
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none".into())
                );
            }
            if let Some(g) = g {
                micro.push((l, g));
            }
        }
        let (loss, grads) = crate::train::combine_micro_batches(micro, opt.params())?;
        if loss.positions == 0 {
            anyhow::bail!("step {step}: the batch has no distilled positions");
        }
        let info = opt.step(&grads, sched.lr_at(step), cfg.max_grad_norm)?;
        positions += loss.positions;
        last_loss = loss.total;
        let done = opt.step;
        if done % cfg.log_every.max(1) == 0 || done == cfg.steps {
            let rate = positions as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let line = serde_json::json!({"step": done, "loss": loss.total, "divergence": loss.divergence, "hard_ce": loss.hard_ce,
                "lr": info.lr, "grad_norm": info.grad_norm, "clipped": info.clipped, "positions": loss.positions, "positions_per_s": rate});
            writeln!(metrics, "{line}").map_err(io(&metrics_path))?;
            if progress {
                eprintln!(
                    "step {done}/{}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} positions/s",
                    cfg.steps, loss.total, info.lr, info.grad_norm, rate
                );
            }
        }
        if done % cfg.checkpoint_every.max(1) == 0 || done == cfg.steps {
            let state = CheckpointState {
                step: done,
                loader: batcher.position(),
                config: cfg.clone(),
                shards_fingerprint: set.fingerprint().to_string(),
            };
            last_ck = Some(save_checkpoint(&cfg.out, &student, &opt, &state)?);
        }
    }
    let final_eval = evaluate(
        &student,
        &set,
        &split.held_out,
        cfg.max_len,
        cfg.logits_chunk,
    )?;
    let export_dir = cfg.out.join("student");
    export(&student, &cfg.shards, &export_dir)?;
    let secs = start.elapsed().as_secs_f64();
    Ok(FitSummary {
        steps: opt.step,
        resumed_from,
        initial,
        last_train_loss: last_loss,
        final_eval,
        checkpoint: last_ck.unwrap_or_default(),
        export: export_dir,
        positions_per_s: positions as f64 / secs.max(1e-9),
        seconds: secs,
    })
}
