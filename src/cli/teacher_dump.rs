//! `teacher-dump`: flags, pipeline merge, and the report printed at the end.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use kd_model::Precision;
use kd_teacher::dump::{DumpSettings, Mode, RunOptions};

use crate::pipeline::{DumpSection, Pipeline};

/// Run a teacher LLM once over prompts and cache its top-k log-probabilities at every response
/// position, as Parquet shards with a manifest (see `shard-cat` to look inside).
///
/// Settings come from flags, over `--pipeline FILE` ([dump] section), over the defaults shown.
#[derive(Parser, Debug)]
#[command(name = "teacher-dump", version)]
pub struct Args {
    /// Pipeline file (TOML) whose [dump] section supplies settings; flags override it.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Teacher: a .gguf file or a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Input JSONL: one object per line with `id` and `prompt`, `messages` or `instruction`
    /// (plus `response` to score).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Output folder for shards and manifest.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Teacher-force existing responses (`response` field, or messages ending with the assistant
    /// turn) instead of generating.
    #[arg(long, conflicts_with = "mixed")]
    pub score: bool,
    /// Score the rows that have a response and generate the others, into one shard set (the
    /// two halves of a generated/scored data mix).
    #[arg(long)]
    pub mixed: bool,
    /// Log-probabilities kept per position [default: 32]. A larger k leaves less mass outside
    /// the top k and costs more bytes per position (measured for each k in
    /// docs/performance.md); the bucket tail policy of the losses accounts for the rest
    /// exactly. `shard-cat stats` prints a dump's mean tail mass and bytes per position.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// What to store per position: `top:K` (the K most likely tokens; the default is top:32),
    /// `sample:N` (N tokens drawn from the teacher's distribution at T=1, stored with their
    /// log-probs; forward KL and its gradient estimated from them are unbiased), or both,
    /// `top:K,sample:N`. Draws come from a stream seeded by (--seed, row id, position), so
    /// they do not depend on batching. Sampled targets need shard format 2.
    #[arg(
        long,
        conflicts_with = "top_k",
        value_name = "top:K|sample:N|top:K,sample:N"
    )]
    pub targets: Option<String>,
    /// Responses generated per prompt, each its own row `ID#i` with its own sampling stream
    /// (reproducible per (seed, ID, i) whatever the batch size); needs
    /// --sampling-temperature above 0 [default: 1].
    #[arg(long, conflicts_with = "samples")]
    pub responses_per_prompt: Option<usize>,
    /// The former name of --responses-per-prompt, accepted (with a note) until the next
    /// release.
    #[arg(long, hide = true)]
    pub samples: Option<usize>,
    /// Most tokens generated per prompt [default: 256].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Temperature of the responses' sampling; 0 is greedy [default: 0]. (The distillation
    /// loss has its own, student-fit's --loss-temperature.)
    #[arg(long, conflicts_with = "temperature")]
    pub sampling_temperature: Option<f64>,
    /// The former name of --sampling-temperature, accepted (with a note) until the next
    /// release.
    #[arg(long, hide = true)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability [default: 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the per-prompt sampling streams [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Feed prompts as raw text instead of rendering the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Prompts decoded together [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Prompts per shard file; also the unit of resume [default: 64].
    #[arg(long)]
    pub rows_per_shard: Option<usize>,
    /// Dump only the first N records of the input.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Continue an interrupted dump in --out (refused if teacher, tokenizer, input or settings
    /// differ).
    #[arg(long)]
    pub resume: bool,
    /// Dump only slice I of N equal slices of the input (e.g. 0/4) so N machines can share a
    /// job; combine with `shard-cat merge`.
    #[arg(long, value_name = "I/N")]
    pub part: Option<String>,
    /// Skip malformed input lines (reported) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Approximate path: candle's quantized kernels on the GGUF blocks. They quantize
    /// activations to 8 bits; on SmolLM2-135M Q4_1 this moved top-20 log-probs by about 0.1 nats
    /// on average against the exact f32 pass. Not for caches you train on. On a CPU with
    /// AVX-512 (or AVX2 with FMA) the exact default is faster too (measured 2x at batch 1).
    #[arg(long)]
    pub approx_quantized: bool,
    /// Shard format: 2 stores log-probs as integers (each within 1/1024 nats of the exact
    /// value) and each position's tail mass (to 1e-6 relative), 36% smaller at k=32; 1
    /// stores exact f32 log-probs. Every reader takes both; `shard-cat stats` prints the
    /// bytes per entry.
    #[arg(long, default_value_t = kd_shard::DEFAULT_FORMAT_VERSION, value_parser = clap::value_parser!(u32).range(1..=kd_shard::FORMAT_VERSION as i64))]
    pub shard_format: u32,
    /// CPU threads (0 = all cores) [default: 0].
    #[arg(long)]
    pub threads: Option<usize>,
    /// On a CPU with AMX tiles, multiply BF16 weights straight from the memory-mapped file
    /// instead of packing them: no copy (peak memory about the file's size), and the load is
    /// only the hashing of the file; the log-probs are bit-identical. Decoding is slower than
    /// from the packed panels (which sit on huge pages), by 5–40% on a 1.1B teacher
    /// depending on how the file's pages lie in memory, so the default packs.
    #[arg(long)]
    pub weights_in_place: bool,
    /// Where the teacher runs: `cpu` (the exact kernels), `cuda`, `cuda:N`, or `auto` (CUDA
    /// when the binary was built with it and a device answers, else the CPU) [default:
    /// auto]. Printed at the start and recorded in the manifest.
    #[arg(long, value_parser = crate::cli::parse_device)]
    pub device: Option<kd_model::DeviceChoice>,
    /// What the teacher's weights, activations and products are held in: `f32` (exact: the
    /// CPU kernels, or candle's f32 products on a GPU), `bf16` or `f16` (approximate; the
    /// weights as stored where the file holds that dtype, rounded once otherwise). Logits and
    /// log-probs are f32 in every case. [default: bf16 on CUDA, f32 on the CPU]. Recorded in
    /// the manifest's settings, so a half-precision cache never passes for an exact one; the
    /// measured error of each dtype is in docs/performance.md.
    #[arg(long, value_parser = crate::cli::parse_dtype)]
    pub dtype: Option<kd_model::Dtype>,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// Validated settings for one dump.
pub struct Resolved {
    pub teacher: PathBuf,
    pub input: PathBuf,
    pub out: PathBuf,
    pub settings: DumpSettings,
    pub run: RunOptions,
    pub limit: Option<usize>,
    pub skip_bad_lines: bool,
    pub threads: usize,
    pub weights_in_place: bool,
    pub device: kd_model::DeviceChoice,
    /// `--dtype` as given; none takes the device's default ([`Resolved::dtype_on`]).
    pub dtype: Option<kd_model::Dtype>,
}

impl Resolved {
    /// The dtype on an opened device: as given, else bf16 on CUDA and f32 (exact) elsewhere.
    pub fn dtype_on(&self, device: &candle_core::Device) -> kd_model::Dtype {
        match self.dtype {
            Some(d) => d,
            None if device.is_cuda() => kd_model::Dtype::Bf16,
            None => kd_model::Dtype::F32,
        }
    }
}

/// `top:K`, `sample:N` or both (comma-separated, either order): `(top_k, samples)`, with 0
/// for the kind that is absent.
pub fn parse_targets(s: &str) -> anyhow::Result<(usize, usize)> {
    let (mut top, mut sample) = (None, None);
    for part in s.split(',') {
        let (kind, n) = part.trim().split_once(':').with_context(|| {
            format!("--targets `{s}`: expected top:K, sample:N or top:K,sample:N")
        })?;
        let n: usize = n
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("--targets `{s}`: `{n}` is not a positive integer"))?;
        let slot = match kind.trim() {
            "top" => &mut top,
            "sample" => &mut sample,
            other => bail!("--targets `{s}`: unknown kind `{other}` (top or sample)"),
        };
        if slot.replace(n).is_some() {
            bail!("--targets `{s}`: `{}` given twice", kind.trim());
        }
    }
    Ok((top.unwrap_or(0), sample.unwrap_or(0)))
}

fn parse_part(s: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s
        .split_once('/')
        .with_context(|| format!("--part `{s}`: expected I/N, e.g. 0/4"))?;
    let i: usize = a
        .trim()
        .parse()
        .with_context(|| format!("--part `{s}`: bad index"))?;
    let n: usize = b
        .trim()
        .parse()
        .with_context(|| format!("--part `{s}`: bad count"))?;
    if n == 0 || i >= n {
        bail!(
            "--part `{s}`: the index must be below the count (0/{n} … {}/{n})",
            n.max(1) - 1
        );
    }
    Ok((i, n))
}

impl Args {
    /// Merges flags over the pipeline file over defaults.
    pub fn resolve(self) -> anyhow::Result<Resolved> {
        let p: DumpSection = match &self.pipeline {
            Some(path) => Pipeline::read(path)?.dump,
            None => DumpSection::default(),
        };
        let need = |v: Option<PathBuf>, flag: &str| {
            v.with_context(|| {
                format!("missing --{flag} (or `{flag}` in the pipeline's [dump] section)")
            })
        };
        let score = self.score || p.score.unwrap_or(false);
        let mixed = self.mixed || p.mixed.unwrap_or(false);
        if score && mixed {
            anyhow::bail!("`score` and `mixed` exclude each other: pick one");
        }
        let (top_k, samples) = match (self.targets.as_deref(), p.targets.as_deref()) {
            (Some(t), _) => parse_targets(t)?,
            (None, Some(t)) if self.top_k.is_none() => {
                if p.top_k.is_some() {
                    bail!(
                        "the pipeline's [dump] section sets both `top_k` and `targets`: keep one"
                    );
                }
                parse_targets(t)?
            }
            _ => (self.top_k.or(p.top_k).unwrap_or(32), 0),
        };
        let settings = DumpSettings {
            mode: if score {
                Mode::Score
            } else if mixed {
                Mode::Mixed
            } else {
                Mode::Generate
            },
            top_k,
            samples,
            responses_per_prompt: crate::cli::renamed(
                self.responses_per_prompt,
                self.samples,
                "--samples",
                "--responses-per-prompt",
            )
            .or_else(|| {
                crate::cli::renamed(
                    p.responses_per_prompt,
                    p.samples,
                    "`samples` in [dump]",
                    "`responses_per_prompt`",
                )
            })
            .unwrap_or(1),
            max_new_tokens: self.max_new_tokens.or(p.max_new_tokens).unwrap_or(256),
            temperature: crate::cli::renamed(
                self.sampling_temperature,
                self.temperature,
                "--temperature",
                "--sampling-temperature",
            )
            .or(p.temperature)
            .unwrap_or(0.0),
            top_p: self.top_p.or(p.top_p).unwrap_or(1.0),
            seed: self.seed.or(p.seed).unwrap_or(0),
            chat_template: !self.no_chat_template && p.chat_template.unwrap_or(true),
            rows_per_shard: self.rows_per_shard.or(p.rows_per_shard).unwrap_or(64),
            precision: if self.approx_quantized || p.approx_quantized.unwrap_or(false) {
                Precision::Quantized
            } else {
                Precision::Exact
            },
            // Set from the opened device (`Resolved::dtype_on`).
            dtype: kd_model::Dtype::F32,
        };
        let part = self.part.as_deref().map(parse_part).transpose()?;
        Ok(Resolved {
            teacher: need(self.teacher.or(p.teacher), "teacher")?,
            input: need(self.input.or(p.input), "input")?,
            out: need(self.out.or(p.out), "out")?,
            settings,
            run: RunOptions {
                batch_size: self.batch_size.or(p.batch_size).unwrap_or(8),
                resume: self.resume,
                part,
                progress: !self.no_progress && !self.json,
                logits_chunk: 256,
                shard_format: self.shard_format,
            },
            limit: self.limit.or(p.limit),
            skip_bad_lines: self.skip_bad_lines || p.skip_bad_lines.unwrap_or(false),
            threads: self.threads.or(p.threads).unwrap_or(0),
            weights_in_place: self.weights_in_place || p.weights_in_place.unwrap_or(false),
            device: match (self.device, p.device.as_deref()) {
                (Some(d), _) => d,
                (None, Some(d)) => d
                    .parse()
                    .map_err(|e: kd_model::DeviceError| anyhow::anyhow!("[dump] device: {e}"))?,
                (None, None) => kd_model::DeviceChoice::Auto,
            },
            dtype: match (self.dtype, p.dtype.as_deref()) {
                (Some(d), _) => Some(d),
                (None, Some(d)) => {
                    Some(d.parse().map_err(|e: kd_model::UnknownDtype| {
                        anyhow::anyhow!("[dump] dtype: {e}")
                    })?)
                }
                (None, None) => None,
            },
        })
    }
}
