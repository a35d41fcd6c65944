//! `student-fit`: flags, pipeline stages, and the reports printed at the end.

use std::io::Write;
use std::path::PathBuf;

use crate::cli::{human_bytes, run_main, set_threads};
use crate::pipeline::Pipeline;
use anyhow::Context;
use clap::{Parser, Subcommand};
use kd_loss::sampled::Estimator;
use kd_loss::{Divergence, TailPolicy};
use kd_student::data::TargetKind;
use kd_student::eval::{EvalOptions, run_eval};
use kd_student::fit::{FitConfig, FitSummary, Init, fit};
use kd_student::layers::LayerPick;
use kd_student::resolve::{FitSection, Overrides, Sections, StageChoice, resolve};

/// Train a student from teacher-logit shards: the losses of docs/design.md, AdamW, checkpoints
/// every N steps (atomic), exact resume, held-out evaluation, export to a Hugging Face
/// directory. Settings come from flags, over the pipeline's [fit] section, over the defaults
/// shown; without --pipeline, --shards, --out and an initialisation are needed, e.g.
/// `student-fit --shards out/quickstart --init-from-teacher T.gguf --keep-layers 0,6,12,18,24,29
/// --out out/s`. `--print-config` writes the resolved settings as a pipeline file.
///
/// A pipeline may add a [finetune] section: a second stage run after the first, whose keys
/// replace [fit]'s (except `mix`, which a stage with `train_on` does not inherit). Unless it
/// says otherwise it starts from the first stage's export
/// (`init = { from_student = { path = "<fit.out>/student" } }`) and writes to
/// `<fit.out>-finetune`. The usual second stage is hard cross-entropy (`alpha = 0`) on
/// scored real-data rows.
#[derive(Parser, Debug)]
#[command(name = "student-fit", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Pipeline file (TOML) with a [fit] section and optionally [finetune] (see pipelines/).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Shard directory to train on (`shards`).
    #[arg(long)]
    shards: Option<PathBuf>,
    /// A separate shard set to evaluate on, all its rows (`eval_shards`) [default: the
    /// held-out share of --shards].
    #[arg(long)]
    eval_shards: Option<PathBuf>,
    /// The divergence (`loss.divergence`) [default: forward-kl].
    #[arg(long, value_enum)]
    loss: Option<LossKind>,
    /// β of --loss jsd [default: 0.5].
    #[arg(long, requires = "loss")]
    beta: Option<f64>,
    /// λ of --loss skew-forward-kl or skew-reverse-kl [default: 0.1].
    #[arg(long, requires = "loss")]
    lambda: Option<f64>,
    /// Temperature τ of the divergence (`loss.temperature`) [default: 1]. (teacher-dump's
    /// --sampling-temperature is the responses' sampling temperature.)
    #[arg(long, conflicts_with = "temperature")]
    loss_temperature: Option<f64>,
    /// The former name of --loss-temperature, accepted (with a note) until the next release.
    #[arg(long, hide = true)]
    temperature: Option<f64>,
    /// Weight α of the divergence; 1 − α weighs hard cross-entropy on the stored tokens, α = 0
    /// is SFT on the teacher's responses (`loss.alpha`) [default: 1].
    #[arg(long)]
    alpha: Option<f64>,
    /// The mass outside the teacher's top-k: one extra class (`bucket`) or left out with both
    /// distributions renormalised (`renorm`) (`loss.tail`) [default: bucket].
    #[arg(long, value_enum)]
    tail: Option<TailArg>,
    /// Peak learning rate (`lr`) [default: 5e-4].
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the decay (`min_lr`) [default: 5e-5].
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warm-up steps (`warmup_steps`) [default: 50].
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Tokens per micro-batch, padding included (`token_budget`) [default: 8192].
    #[arg(long)]
    token_budget: Option<usize>,
    /// Rows are cut to this many tokens (`max_len`) [default: 2048].
    #[arg(long)]
    max_len: Option<usize>,
    /// Share of rows held out for evaluation by a hash of their id (`holdout_fraction`)
    /// [default: 0.1].
    #[arg(long)]
    holdout_fraction: Option<f64>,
    /// Seed of the shuffle (`seed`) [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every this many steps (`checkpoint_every`) [default: 250].
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Which of the cache's targets to train on (`targets`) [default: its top-k when it has
    /// one, else its draws].
    #[arg(long, value_enum)]
    targets: Option<TargetsArg>,
    /// How sampled targets enter the loss (`estimator`) [default: unbiased].
    #[arg(long, value_enum)]
    estimator: Option<EstimatorArg>,
    /// The dtype of the student's matrix products (`precision`): `f32`, or `bf16` (operands
    /// rounded to bf16; master weights, AdamW moments, norms, softmax and the loss stay f32).
    /// bf16 trains on the candle engine, meant for a GPU [default: f32].
    #[arg(long, value_parser = clap::value_parser!(kd_student::fit::TrainPrecision))]
    precision: Option<kd_student::fit::TrainPrecision>,
    /// Print the resolved settings of every stage as a pipeline file (TOML) and exit
    /// without training.
    #[arg(long)]
    print_config: bool,
    /// Which stage to run: `distill` ([fit]), `finetune` ([finetune]) or `all` (both, in
    /// order).
    #[arg(long, default_value = "all")]
    stage: Stage,
    /// Override the number of optimizer steps (of every stage run).
    #[arg(long, conflicts_with = "positions")]
    steps: Option<u64>,
    /// Train every stage run on at least this many distilled positions instead of a number
    /// of steps (`positions`): the steps its batches need, counted before training.
    #[arg(long)]
    positions: Option<u64>,
    /// Override the first stage's output folder (checkpoints/, metrics.jsonl, summary.json,
    /// student/); the second stage's default follows it.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override the first stage's initialisation: keep the layers `--keep-layers` (or all
    /// but `--drop-layers`) of this teacher (.gguf or Hugging Face directory), dequantized to
    /// f32.
    #[arg(
        long,
        requires = "teacher_layers",
        conflicts_with = "init_from_student"
    )]
    init_from_teacher: Option<PathBuf>,
    /// Teacher layers the student keeps, in order (with --init-from-teacher), e.g.
    /// 0,6,12,18,24,29; or `auto:N`: N layers chosen on the cache, by greedy removal of the
    /// layer whose removal raises the forward KL least (scores in summary.json).
    #[arg(long, group = "teacher_layers", requires = "init_from_teacher")]
    keep_layers: Option<LayerPick>,
    /// Teacher layers the student leaves out (with --init-from-teacher), e.g. 10,11,12; or
    /// `auto:M`: keep all but M, chosen as `--keep-layers auto:N` chooses.
    #[arg(long, group = "teacher_layers", requires = "init_from_teacher")]
    drop_layers: Option<LayerPick>,
    /// Distilled positions each candidate is scored on when layers are chosen (`auto:N`)
    /// [default: 1024].
    #[arg(long)]
    auto_layer_positions: Option<usize>,
    /// Override the first stage's initialisation: a Hugging Face directory (an export or a
    /// checkpoint).
    #[arg(long)]
    init_from_student: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output folder (refused if the shards or
    /// any setting differ).
    #[arg(long)]
    resume: bool,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Training engine: `kernels` (the project's CPU kernels: llama and Mistral students on
    /// AVX-512 or AVX2+FMA) or `candle` (candle autograd: every architecture and device).
    /// Default: kernels where they run, candle otherwise. The run prints which one it uses.
    #[arg(long)]
    engine: Option<Engine>,
    /// Where the student trains: `cpu` (the kernel engine where it runs), `cuda`, `cuda:N`
    /// (the candle engine on that GPU) or `auto` (CUDA when the binary was built with it and
    /// a device answers, else the CPU) [default: auto]. Printed at the start and recorded in
    /// summary.json.
    #[arg(long, value_parser = crate::cli::parse_device)]
    device: Option<kd_model::DeviceChoice>,
    /// Print the final summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LossKind {
    ForwardKl,
    ReverseKl,
    Jsd,
    SkewForwardKl,
    SkewReverseKl,
    LogitMse,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TailArg {
    Bucket,
    Renorm,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TargetsArg {
    TopK,
    Sampled,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EstimatorArg {
    Unbiased,
    PlugIn,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Kernels,
    Candle,
}

impl From<Engine> for kd_student::engine::EngineKind {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Kernels => kd_student::engine::EngineKind::Kernels,
            Engine::Candle => kd_student::engine::EngineKind::Candle,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Distill,
    Finetune,
    All,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate a student on a shard set: forward KL(teacher‖student) with the bucket tail,
    /// reverse KL, top-1 agreement with the teacher's argmax and the student's NLL of the
    /// stored tokens, per distilled token; plus greedy generations of the student beside
    /// the teacher's stored response.
    Eval(EvalArgs),
    /// Print the student's log-softmax over the vocabulary at every position of a token
    /// sequence, as JSON (for comparing with another implementation, e.g.
    /// `scripts/check_export.py DIR --ours FILE`).
    Logits(LogitsArgs),
    /// Write a student (an export or a checkpoint directory) as a GGUF file for llama.cpp,
    /// Ollama or LM Studio: llama metadata, the tokenizer and chat template, matrices as
    /// --type (norms and biases stay f32).
    Export(ExportArgs),
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    /// The student: an exported directory (OUT/student) or a checkpoint directory.
    #[arg(long)]
    student: PathBuf,
    /// The GGUF file to write (atomically).
    #[arg(long)]
    gguf: PathBuf,
    /// Matrix type: f32, f16, q8_0 or q4_0.
    #[arg(long = "type", default_value = "f16", value_parser = ["f32", "f16", "q8_0", "q4_0"])]
    ty: String,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// The student: an exported directory (OUT/student) or a checkpoint directory.
    #[arg(long)]
    student: PathBuf,
    /// Where the student runs: cpu, cuda, cuda:N or auto [default: auto].
    #[arg(long, value_parser = crate::cli::parse_device)]
    device: Option<kd_model::DeviceChoice>,
    /// The shard set to evaluate on.
    #[arg(long)]
    shards: PathBuf,
    /// Evaluate only the held-out share of the rows, as `student-fit` splits them with this
    /// `holdout_fraction`; without it every row is evaluated (a separate evaluation dump).
    #[arg(long)]
    holdout_fraction: Option<f64>,
    /// Evaluate at most this many rows.
    #[arg(long)]
    max_rows: Option<usize>,
    /// Rows are cut to this many tokens.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Positions whose full-vocabulary logits are held at once.
    #[arg(long, default_value_t = kd_student::fit::DEFAULT_LOGITS_CHUNK)]
    logits_chunk: usize,
    /// Greedy generations of the student, for the first this many rows.
    #[arg(long, default_value_t = 4)]
    generations: usize,
    /// Most tokens per generation.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Folder for eval.json and generations.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct LogitsArgs {
    /// The student: an exported directory or a checkpoint directory.
    #[arg(long)]
    student: PathBuf,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Where the student runs: `cpu` (the kernel engine's forward pass where it runs),
    /// `cuda`, `cuda:N` or `auto` [default: auto].
    #[arg(long, value_parser = crate::cli::parse_device, default_value = "auto")]
    device: kd_model::DeviceChoice,
}

/// The binary's body.
pub fn main() -> ! {
    let args = Args::parse();
    run_main(move || match args.command {
        Some(Command::Eval(e)) => eval(e),
        Some(Command::Logits(l)) => logits(l),
        Some(Command::Export(x)) => export_gguf(x),
        None => train(args.train),
    })
}

/// The settings the flags give, typed.
fn overrides(a: &TrainArgs) -> Overrides {
    let init = match (&a.init_from_teacher, &a.init_from_student) {
        (Some(p), _) => Some(Init::FromTeacher {
            path: p.clone(),
            keep_layers: a.keep_layers.clone(),
            drop_layers: a.drop_layers.clone(),
        }),
        (_, Some(p)) => Some(Init::FromStudent { path: p.clone() }),
        _ => None,
    };
    let divergence = a.loss.map(|kind| match kind {
        LossKind::ForwardKl => Divergence::ForwardKl,
        LossKind::ReverseKl => Divergence::ReverseKl,
        LossKind::Jsd => Divergence::Jsd {
            beta: a.beta.unwrap_or(0.5),
        },
        LossKind::SkewForwardKl => Divergence::SkewForwardKl {
            lambda: a.lambda.unwrap_or(0.1),
        },
        LossKind::SkewReverseKl => Divergence::SkewReverseKl {
            lambda: a.lambda.unwrap_or(0.1),
        },
        LossKind::LogitMse => Divergence::LogitMse,
    });
    Overrides {
        shards: a.shards.clone(),
        eval_shards: a.eval_shards.clone(),
        out: a.out.clone(),
        init,
        divergence,
        temperature: crate::cli::renamed(
            a.loss_temperature,
            a.temperature,
            "--temperature",
            "--loss-temperature",
        ),
        alpha: a.alpha,
        tail: a.tail.map(|t| match t {
            TailArg::Bucket => TailPolicy::Bucket,
            TailArg::Renorm => TailPolicy::Renorm,
        }),
        lr: a.lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        token_budget: a.token_budget,
        max_len: a.max_len,
        holdout_fraction: a.holdout_fraction,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        targets: a.targets.map(|t| match t {
            TargetsArg::TopK => TargetKind::TopK,
            TargetsArg::Sampled => TargetKind::Sampled,
        }),
        estimator: a.estimator.map(|e| match e {
            EstimatorArg::Unbiased => Estimator::Unbiased,
            EstimatorArg::PlugIn => Estimator::PlugIn,
        }),
        precision: a.precision,
        auto_layer_positions: a.auto_layer_positions,
        steps: a.steps,
        positions: a.positions,
    }
}

/// The stages the pipeline file (if any) and the flags describe, resolved to complete
/// configurations (`kd_student::resolve`).
fn stages(a: &TrainArgs) -> anyhow::Result<Vec<(&'static str, FitConfig)>> {
    let mut sections = Sections::default();
    if let Some(path) = &a.pipeline {
        let p = Pipeline::read(path)?;
        let parse = |t: toml::Table, section: &str| -> anyhow::Result<FitSection> {
            toml::Value::Table(t)
                .try_into()
                .with_context(|| format!("{}: invalid [{section}] section", path.display()))
        };
        sections.fit = p.fit.map(|t| parse(t, "fit")).transpose()?;
        sections.finetune = p.finetune.map(|t| parse(t, "finetune")).transpose()?;
        sections.origin = Some(path.clone());
    }
    let choice = match a.stage {
        Stage::All => StageChoice::All,
        Stage::Distill => StageChoice::Distill,
        Stage::Finetune => StageChoice::Finetune,
    };
    Ok(resolve(sections, &overrides(a), choice)?
        .into_iter()
        .map(|s| (s.name, s.config))
        .collect())
}

/// The resolved stages as a pipeline file: `[fit]`, and `[finetune]` for a second stage.
fn config_toml(stages: &[(&'static str, FitConfig)]) -> anyhow::Result<String> {
    let mut out = String::new();
    for (name, cfg) in stages {
        let section = if *name == "finetune" {
            "finetune"
        } else {
            "fit"
        };
        let mut t = toml::Table::new();
        t.insert(section.to_string(), toml::Value::try_from(cfg)?);
        out.push_str(&toml::to_string(&t)?);
        out.push('\n');
    }
    Ok(out)
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    set_threads(a.threads);
    let stages = stages(&a)?;
    if a.print_config {
        let mut out = std::io::stdout().lock();
        write!(out, "{}", config_toml(&stages)?)?;
        return Ok(());
    }
    // First Ctrl-C: checkpoint at the next step boundary and stop; second: stop now.
    ctrlc::set_handler(|| {
        static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if SEEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("interrupt: writing a checkpoint at the next step (Ctrl-C again to stop now)");
        kd_student::fit::request_stop();
    })
    .context("installing the Ctrl-C handler")?;
    let device = open_device(a.device, a.json)?;
    let mut summaries = Vec::new();
    for (name, cfg) in &stages {
        if !a.json {
            eprintln!(
                "student-fit [{name}]: shards {}{}, loss {}, {}, init {} -> {}",
                cfg.shards.display(),
                if cfg.extra_teachers.is_empty() {
                    String::new()
                } else {
                    format!(" + {} more teachers", cfg.extra_teachers.len())
                },
                serde_json::to_string(&cfg.loss)?,
                match cfg.positions {
                    Some(p) => format!("{p} distilled positions"),
                    None => format!("{} steps", cfg.steps),
                },
                serde_json::to_string(&cfg.init)?,
                cfg.out.display()
            );
        }
        let s = fit(cfg, a.resume, !a.json, a.engine.map(Into::into), &device)?;
        if !a.json {
            print_summary(name, &s)?;
        }
        summaries.push(serde_json::json!({"stage": name, "summary": s}));
    }
    if a.json {
        let mut out = std::io::stdout().lock();
        let v = if summaries.len() == 1 {
            summaries.pop().expect("one")["summary"].take()
        } else {
            serde_json::Value::Array(summaries)
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// Opens `--device` (default auto), printing which one runs unless the output is JSON.
fn open_device(
    choice: Option<kd_model::DeviceChoice>,
    json: bool,
) -> anyhow::Result<candle_core::Device> {
    let device = choice.unwrap_or_default().open()?;
    if !json {
        eprintln!("device: {}", kd_model::device_name(&device));
    }
    Ok(device)
}

fn print_summary(stage: &str, s: &FitSummary) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let row = |r: &kd_student::fit::EvalReport| {
        format!(
            "forward KL {:.4}, reverse KL {:.4}, top-1 agreement {:.3}, NLL {:.4}",
            r.forward_kl, r.reverse_kl, r.top1_agreement, r.nll
        )
    };
    writeln!(out, "[{stage}] held-out at start: {}", row(&s.initial))?;
    writeln!(out, "[{stage}] held-out at end:   {}", row(&s.final_eval))?;
    writeln!(
        out,
        "[{stage}] {} steps on the {} engine, {} positions, {:.0} positions/s, checkpoint {}, export {}, peak memory {}",
        s.steps,
        s.engine,
        s.train_positions,
        s.positions_per_s,
        s.checkpoint.display(),
        s.export.display(),
        kd_teacher::dump::peak_rss_bytes()
            .map(human_bytes)
            .unwrap_or_else(|| "unknown".into())
    )?;
    if let Some(secs) = &s.engine_seconds {
        let phases: Vec<(&str, f64)> = kd_student::engine::Timings::PHASES
            .iter()
            .filter_map(|k| secs.get(*k).map(|v| (*k, *v)))
            .collect();
        writeln!(
            out,
            "[{stage}] time in steps: {}",
            kd_student::engine::phase_shares(&phases)
        )?;
    }
    Ok(())
}

fn eval(e: EvalArgs) -> anyhow::Result<()> {
    set_threads(e.threads);
    let device = open_device(e.device, e.json)?;
    let r = run_eval(&EvalOptions {
        device,
        student: e.student,
        shards: e.shards,
        holdout_fraction: e.holdout_fraction,
        max_rows: e.max_rows,
        max_len: e.max_len,
        logits_chunk: e.logits_chunk,
        generations: e.generations,
        max_new_tokens: e.max_new_tokens,
        out: e.out.clone(),
    })?;
    let mut out = std::io::stdout().lock();
    if e.json {
        let mut v = serde_json::to_value(&r)?;
        v["generations"] = serde_json::to_value(&r.generations)?;
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let m = &r.report;
    writeln!(
        out,
        "{} on {} ({} rows, {} distilled positions)",
        r.student.display(),
        r.shards.display(),
        r.rows,
        m.positions
    )?;
    writeln!(out, "  {:<28} {:>10}", "metric (per token)", "value")?;
    for (name, v) in [
        ("forward KL(teacher‖student)", m.forward_kl),
        ("reverse KL(student‖teacher)", m.reverse_kl),
        ("top-1 agreement", m.top1_agreement),
        ("NLL of the stored tokens", m.nll),
    ] {
        writeln!(out, "  {name:<28} {v:>10.4}")?;
    }
    if let Some(a) = &r.answers {
        writeln!(
            out,
            "greedy answers to {} prompts: ROUGE-L F1 {:.3} against the teacher's, {:.0}% \
             non-empty and ended with end-of-turn, {:.1} tokens on average (teacher {:.1})",
            a.count,
            a.rouge_l_f1,
            100.0 * a.answered_share,
            a.mean_tokens,
            a.teacher_mean_tokens
        )?;
    }
    for g in &r.generations {
        writeln!(out, "\n## {}\nprompt:  {}", g.id, g.prompt.trim())?;
        writeln!(out, "teacher: {}", g.teacher)?;
        let ended = if g.scores.ended {
            "ended"
        } else {
            "no end-of-turn"
        };
        writeln!(
            out,
            "student: {}\n         (ROUGE-L F1 {:.3}, {} tokens, {ended})",
            g.student, g.scores.rouge_l_f1, g.scores.student_tokens
        )?;
    }
    if let Some(dir) = &e.out {
        writeln!(
            out,
            "\nwrote {} and {}",
            dir.join("eval.json").display(),
            dir.join("generations.jsonl").display()
        )?;
    }
    Ok(())
}

fn export_gguf(x: ExportArgs) -> anyhow::Result<()> {
    let dtype = kd_student::fit::GGUF_TYPES
        .iter()
        .find(|(n, _)| *n == x.ty)
        .map(|(_, t)| *t)
        .context("type")?;
    let bytes = kd_student::fit::export_gguf(&x.student, &x.gguf, dtype)?;
    writeln!(
        std::io::stdout().lock(),
        "wrote {} ({}, {})",
        x.gguf.display(),
        x.ty,
        human_bytes(bytes)
    )?;
    Ok(())
}

fn logits(l: LogitsArgs) -> anyhow::Result<()> {
    let device = l.device.open()?;
    let student =
        kd_model::trainable::Student::from_hf_dir(&l.student, candle_core::DType::F32, &device)?;
    let n = l.ids.len();
    // The kernel engine's forward pass where it runs (on the CPU), candle's otherwise.
    let kernels =
        device.is_cpu() && kd_student::engine::kernels_unsupported(&student.cfg, n).is_none();
    let z: Vec<Vec<f32>> = if kernels {
        let mut k = kd_student::engine::KernelStudent::for_inference(&student, n, n, n)?;
        let h = k.sequence_hidden(&l.ids)?;
        let mut z = Vec::new();
        k.logits_into(&h, n, &mut z);
        z.chunks(student.cfg.vocab_size)
            .map(|r| r.to_vec())
            .collect()
    } else {
        let ids = candle_core::Tensor::from_vec(l.ids.clone(), (1, n), &device)?;
        let hidden = student.forward(&ids, &[n])?;
        let d = hidden.dim(2)?;
        student
            .logits(&hidden.reshape((n, d))?)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2()?
    };
    let rows: Vec<Vec<f64>> = z.iter().map(|r| kd_model::log_softmax_f64(r)).collect();
    let mut out = std::io::stdout().lock();
    // Written as one string so that a closed pipe surfaces as an io error (quiet exit).
    let json = serde_json::to_string(&serde_json::json!({"ids": l.ids, "logprobs": rows}))?;
    writeln!(out, "{json}")?;
    Ok(())
}
