//! A whole dump: plan shards, take the folder lock, resume, run the engine, publish shards
//! and manifests atomically, report throughput.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kd_model::{Dtype, LoadedModel, Precision};
use kd_shard::{Manifest, PartInfo, Row, ShardEntry, Source, Totals};
use serde::{Deserialize, Serialize};

use crate::engine::{Engine, Work};
use crate::error::{Error, Result};
use crate::input::{EncodeOptions, Encoded, Input, encode};
use crate::sampler::SamplingConfig;

/// Generate responses, or teacher-force existing ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Generate,
    Score,
    /// Rows with a response (a `response` field, or messages ending with an assistant turn)
    /// are scored, the others generated: one shard set holding both halves of a data mix.
    Mixed,
}

/// Every setting that decides a dump's content. Recorded in the manifest; a resume must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DumpSettings {
    pub mode: Mode,
    /// Top-k entries per position; 0 with sampled targets only.
    pub top_k: usize,
    /// Sampled targets per position (`--targets sample:N`), drawn at T=1 from the stream of
    /// (seed, row id, position); 0 for none. Left out of the manifest when 0, so top-k
    /// dumps keep their identity.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub samples: usize,
    /// Responses generated per prompt (`teacher-dump --responses-per-prompt N`), each its own row with id
    /// `ID#i` (i from 0) and its own sampling stream (seed, `ID#i`), so every response is
    /// reproducible whatever the batch size. 1 (left out of the manifest) keeps ids as given.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub responses_per_prompt: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub chat_template: bool,
    pub rows_per_shard: usize,
    pub precision: Precision,
    /// What the teacher computed in (`teacher-dump --dtype`). Left out of the manifest when
    /// f32, so exact caches keep their identity; bf16 and f16 caches carry it.
    #[serde(default, skip_serializing_if = "Dtype::is_exact")]
    pub dtype: Dtype,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl DumpSettings {
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let bad = |field: &str, what: String| {
            Err(Error::Setting {
                field: field.into(),
                what,
            })
        };
        if self.samples > u32::MAX as usize {
            return bad("samples", format!("{} is too large", self.samples));
        }
        if self.responses_per_prompt == 0 {
            return bad("responses_per_prompt", "must be at least 1".into());
        }
        if self.responses_per_prompt > 1 {
            if self.mode != Mode::Generate {
                return bad(
                    "responses_per_prompt",
                    "several responses per prompt are generated, not scored: drop --score/--mixed"
                        .into(),
                );
            }
            if self.temperature == 0.0 {
                return bad(
                    "responses_per_prompt",
                    format!(
                        "{} greedy responses to one prompt would all be the same: set a temperature above 0",
                        self.responses_per_prompt
                    ),
                );
            }
        }
        if self.top_k == 0 && self.samples == 0 {
            return bad(
                "top_k",
                "0 with no sampled targets: the cache would hold no targets".into(),
            );
        }
        if self.top_k > vocab_size {
            return bad(
                "top_k",
                format!(
                    "{} is not in 1..={vocab_size} (the vocabulary size)",
                    self.top_k
                ),
            );
        }
        if self.mode != Mode::Score && self.max_new_tokens == 0 {
            return bad(
                "max_new_tokens",
                "must be at least 1 when generating".into(),
            );
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("{} must be ≥ 0 (0 = greedy)", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if self.rows_per_shard == 0 {
            return bad("rows_per_shard", "must be at least 1".into());
        }
        Ok(())
    }
}

/// How to run (does not change the content beyond float rounding, so not part of identity).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub batch_size: usize,
    pub resume: bool,
    /// `(index, count)`: dump only slice `index` of `count` equal slices of the input.
    pub part: Option<(usize, usize)>,
    pub progress: bool,
    /// Most positions whose full-vocabulary logits are held at once while scoring.
    pub logits_chunk: usize,
    /// Shard format to write: 2 (integer log-probs within 1/1024 nats; the default) or 1
    /// (f32 log-probs). Recorded in the manifest, so a resume must use the same.
    pub shard_format: u32,
}

/// What a dump did.
#[derive(Clone, Debug, Serialize)]
pub struct DumpSummary {
    pub out_dir: PathBuf,
    /// Where the teacher ran (`cpu`, `cuda:0`).
    pub device: String,
    /// What the teacher computed in.
    pub dtype: Dtype,
    pub rows: u64,
    pub shards_written: usize,
    pub shards_reused: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub scored_tokens: u64,
    pub positions: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub bytes_per_position: f64,
    pub skipped_lines: usize,
    pub peak_rss_bytes: Option<u64>,
}

const LOCK_FILE: &str = ".teacher-dump.lock";

/// Peak resident memory of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The slice of `n` records that part `index` of `count` takes.
pub fn part_range(n: usize, index: usize, count: usize) -> std::ops::Range<usize> {
    (index * n / count)..((index + 1) * n / count)
}

fn shard_name(part: Option<(usize, usize)>, j: usize) -> String {
    match part {
        Some((i, n)) => format!("shard-p{i:03}of{n:03}-{j:05}.parquet"),
        None => format!("shard-{j:05}.parquet"),
    }
}

/// The identity half of the manifest (teacher, tokenizer, input, settings).
pub fn identity_manifest(
    model: &LoadedModel,
    input: &Input,
    settings: &DumpSettings,
    part: Option<(usize, usize)>,
    format_version: u32,
) -> Manifest {
    let id = &model.identity;
    let teacher = serde_json::json!({
        "architecture": id.architecture,
        "format": id.format,
        "file": Path::new(&id.path).file_name().map(|f| f.to_string_lossy().into_owned()),
        "weights_sha256": id.weights_sha256,
        "file_type": id.file_type,
        "n_params": id.n_params,
        "vocab_size": id.config.vocab_size,
        "config": id.config,
    });
    let tokenizer = serde_json::json!({
        "fingerprint": model.tokenizer.fingerprint(),
        "vocab_size": model.tokenizer.vocab_size(),
        "stop_ids": model.tokenizer.stop_ids(),
        "chat_template_sha256": model.tokenizer.chat_template().map(|t| kd_shard::hash_bytes(t.source().as_bytes())),
    });
    let input = serde_json::json!({
        "file": input.path.file_name().map(|f| f.to_string_lossy().into_owned()),
        "sha256": input.sha256,
        "rows": input.records.len(),
        "skipped_lines": input.skipped.len(),
    });
    let mut m = Manifest {
        format: kd_shard::FORMAT_NAME.to_string(),
        format_version,
        producer: format!("teacher-dump {}", env!("CARGO_PKG_VERSION")),
        device: Some(kd_model::device_name(&model.model.device())),
        teacher,
        tokenizer,
        input,
        settings: serde_json::to_value(settings).expect("settings serialize"),
        part: part.map(|(index, count)| PartInfo {
            index: index as u32,
            count: count as u32,
        }),
        fingerprint: String::new(),
        complete: false,
        shards: Vec::new(),
        totals: Totals::default(),
        derived_from: None,
    };
    m.fingerprint = m.compute_fingerprint();
    m
}

/// Runs a dump of `input` through `model` into `out_dir`, in phases: check the settings,
/// encode every row (a bad row stops the dump before any work), take the folder, find what an
/// interrupted dump already published, dump the missing shards one by one (each published
/// with the partial manifest), then publish the manifest.
pub fn dump(
    model: &LoadedModel,
    input: &Input,
    settings: &DumpSettings,
    opts: &RunOptions,
    out_dir: &Path,
) -> Result<DumpSummary> {
    let start = Instant::now();
    check_settings(model, settings, opts)?;
    let (records, encoded) = encode_rows(model, input, settings, opts)?;
    let lock = take_folder(out_dir)?;
    let mut manifest = identity_manifest(model, input, settings, opts.part, opts.shard_format);
    let n_shards = encoded.len().div_ceil(settings.rows_per_shard);
    let mut done = published_shards(out_dir, &manifest, n_shards, opts)?;
    write_tokenizer_files(model, out_dir)?;

    let bar = progress_bar(opts.progress, encoded.len() as u64);
    let work_start = Instant::now();
    let on_rows_done = |n: usize, tokens: u64| {
        bar.inc(n as u64);
        let secs = work_start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{tokens} tokens, {:.1} tok/s",
            tokens as f64 / secs
        ));
    };
    let engine = Engine {
        model: &model.model,
        top_k: settings.top_k,
        draws: crate::engine::Draws {
            n: settings.samples as u32,
            seed: settings.seed,
        },
        stop_ids: model.tokenizer.stop_ids(),
        max_new_tokens: settings.max_new_tokens,
        sampling: SamplingConfig {
            temperature: settings.temperature,
            top_p: settings.top_p,
            seed: settings.seed,
        },
        logits_chunk: opts.logits_chunk,
        on_rows_done: Some(&on_rows_done),
        reduce_on_device: !model.model.device().is_cpu(),
    };
    let partial_path = out_dir.join(kd_shard::PARTIAL_MANIFEST_FILE);
    let reused = done.iter().filter(|d| d.is_some()).count();
    let mut work = Work::default();
    let mut written = 0;
    for j in 0..n_shards {
        let lo = j * settings.rows_per_shard;
        let hi = (lo + settings.rows_per_shard).min(encoded.len());
        if done[j].is_some() {
            bar.inc((hi - lo) as u64);
            continue;
        }
        let rows = dump_rows(
            &engine,
            &records[lo..hi],
            &encoded[lo..hi],
            opts.batch_size,
            &mut work,
        )?;
        let write =
            kd_shard::WriteOptions::for_version_with_samples(opts.shard_format, settings.samples);
        let entry = kd_shard::write_shard_with(
            out_dir,
            &shard_name(opts.part, j),
            settings.top_k,
            &rows,
            &write,
        )?;
        kd_fs::crash_point(|| format!("after-shard:{j}"));
        done[j] = Some(entry);
        written += 1;
        manifest.shards = done.iter().flatten().cloned().collect();
        manifest.totals = Totals::of(&manifest.shards);
        kd_shard::write_manifest_atomic(&partial_path, &manifest)?;
    }
    bar.finish_and_clear();
    publish_manifest(out_dir, &mut manifest, done)?;
    drop(lock);
    let secs = work_start.elapsed().as_secs_f64();
    let toks = work.generated_tokens + work.scored_tokens;
    let t = &manifest.totals;
    Ok(DumpSummary {
        out_dir: out_dir.to_path_buf(),
        device: kd_model::device_name(&model.model.device()),
        dtype: settings.dtype,
        rows: t.rows,
        shards_written: written,
        shards_reused: reused,
        prompt_tokens: work.prefill_tokens - work.scored_tokens,
        generated_tokens: work.generated_tokens,
        scored_tokens: work.scored_tokens,
        positions: t.positions,
        bytes: t.bytes,
        seconds: start.elapsed().as_secs_f64(),
        tokens_per_s: if secs > 0.0 { toks as f64 / secs } else { 0.0 },
        bytes_per_position: if t.positions > 0 {
            t.bytes as f64 / t.positions as f64
        } else {
            0.0
        },
        skipped_lines: input.skipped.len(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Refuses settings that cannot run together with this model, naming the field.
fn check_settings(model: &LoadedModel, settings: &DumpSettings, opts: &RunOptions) -> Result<()> {
    settings.validate(model.model.vocab_size())?;
    let refuse = |field: &str, what: String| {
        Err(Error::Setting {
            field: field.into(),
            what,
        })
    };
    if settings.samples > 0 && opts.shard_format < 2 {
        return refuse(
            "shard_format",
            format!(
                "format {} cannot hold sampled targets; use format 2",
                opts.shard_format
            ),
        );
    }
    if opts.batch_size == 0 {
        return refuse("batch_size", "must be at least 1".into());
    }
    if settings.dtype != model.identity.dtype {
        return refuse(
            "dtype",
            format!(
                "the settings say {} but the teacher was loaded in {}",
                settings.dtype, model.identity.dtype
            ),
        );
    }
    if let Some((i, n)) = opts.part
        && (n == 0 || i >= n)
    {
        return refuse(
            "part",
            format!("{i}/{n}: the index must be below the count"),
        );
    }
    if model.tokenizer.vocab_size() != model.model.vocab_size() {
        return refuse(
            "tokenizer",
            format!(
                "the tokenizer has {} tokens but the model's vocabulary has {}",
                model.tokenizer.vocab_size(),
                model.model.vocab_size()
            ),
        );
    }
    Ok(())
}

/// The rows of this dump (several per prompt with `responses_per_prompt`, each `ID#i`, in
/// input order; then this part's slice) and their tokens. Every row is encoded up front, so
/// a bad row is refused, naming its file, id and line, before any work.
fn encode_rows<'a>(
    model: &LoadedModel,
    input: &'a Input,
    settings: &DumpSettings,
    opts: &RunOptions,
) -> Result<(Cow<'a, [crate::input::Record]>, Vec<Encoded>)> {
    let n_resp = settings.responses_per_prompt;
    let all: Cow<'a, [crate::input::Record]> = if n_resp > 1 {
        Cow::Owned(
            input
                .records
                .iter()
                .flat_map(|r| {
                    (0..n_resp).map(move |i| crate::input::Record {
                        id: format!("{}#{i}", r.id),
                        ..r.clone()
                    })
                })
                .collect(),
        )
    } else {
        Cow::Borrowed(&input.records)
    };
    let range = match opts.part {
        Some((i, n)) => part_range(all.len(), i, n),
        None => 0..all.len(),
    };
    let records = match all {
        Cow::Borrowed(all) => Cow::Borrowed(&all[range]),
        Cow::Owned(mut all) => {
            all.truncate(range.end);
            all.drain(..range.start);
            Cow::Owned(all)
        }
    };
    let enc_opts = EncodeOptions {
        chat_template: settings.chat_template,
        score: settings.mode == Mode::Score,
    };
    let max_len = model.model.max_len();
    let mut encoded: Vec<Encoded> = Vec::with_capacity(records.len());
    for rec in records.iter() {
        let row_err = |what: String| Error::Row {
            path: input.path.clone(),
            id: rec.id.clone(),
            line: rec.line,
            what,
        };
        let opts = match settings.mode {
            Mode::Mixed => EncodeOptions {
                score: rec.has_response(),
                ..enc_opts
            },
            _ => enc_opts,
        };
        let e = encode(rec, &model.tokenizer, opts).map_err(row_err)?;
        if e.prompt.is_empty() {
            return Err(row_err("the prompt encodes to no tokens".into()));
        }
        let total = e.prompt.len() + e.response.as_ref().map_or(1, |r| r.len());
        if total > max_len {
            return Err(row_err(format!(
                "{} tokens do not fit the teacher's context of {max_len} (prompt {} tokens); shorten it",
                total,
                e.prompt.len()
            )));
        }
        if let Some(r) = &e.response
            && r.is_empty()
        {
            return Err(row_err("the response to score is empty".into()));
        }
        encoded.push(e);
    }
    Ok((records, encoded))
}

/// Creates `out_dir` and holds it for this process, removing what a killed run left
/// half-written.
fn take_folder(out_dir: &Path) -> Result<kd_fs::FolderLock> {
    std::fs::create_dir_all(out_dir).map_err(|source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let lock = kd_fs::FolderLock::take(out_dir, LOCK_FILE).map_err(|e| match e {
        kd_fs::LockError::Locked { dir, lock } => Error::Locked { dir, lock },
        kd_fs::LockError::Io { path, source } => Error::Io { path, source },
    })?;
    remove_stray_tmp_files(out_dir)?;
    Ok(lock)
}

/// The shards an interrupted dump already published intact, by index. A folder that holds a
/// manifest or shards is refused without `--resume`; with it, a previous manifest that
/// describes another job is refused, naming the field that differs.
fn published_shards(
    out_dir: &Path,
    manifest: &Manifest,
    n_shards: usize,
    opts: &RunOptions,
) -> Result<Vec<Option<ShardEntry>>> {
    let final_path = out_dir.join(kd_shard::MANIFEST_FILE);
    let partial_path = out_dir.join(kd_shard::PARTIAL_MANIFEST_FILE);
    let mut done: Vec<Option<ShardEntry>> = vec![None; n_shards];
    let previous = if final_path.exists() {
        Some(kd_shard::read_manifest(&final_path)?)
    } else if partial_path.exists() {
        Some(kd_shard::read_manifest(&partial_path)?)
    } else {
        None
    };
    let has_shards = std::fs::read_dir(out_dir)
        .map_err(|source| Error::Io {
            path: out_dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
    if (previous.is_some() || has_shards) && !opts.resume {
        return Err(Error::Exists {
            dir: out_dir.to_path_buf(),
        });
    }
    let Some(prev) = &previous else {
        return Ok(done);
    };
    if let Some(what) = prev.diff_identity(manifest) {
        let field = what.split(':').next().unwrap_or("settings").to_string();
        return Err(Error::ResumeMismatch {
            dir: out_dir.to_path_buf(),
            field,
            what,
        });
    }
    if prev.part != manifest.part {
        return Err(Error::ResumeMismatch {
            dir: out_dir.to_path_buf(),
            field: "part".into(),
            what: format!("{:?} vs {:?}", prev.part, manifest.part),
        });
    }
    for e in &prev.shards {
        if let Some(j) = (0..n_shards).find(|&j| shard_name(opts.part, j) == e.file) {
            let p = out_dir.join(&e.file);
            if p.exists() && kd_shard::hash_file(&p)? == e.sha256 {
                done[j] = Some(e.clone());
            }
        }
    }
    Ok(done)
}

/// The rows of one shard, in order: the engine generates the rows without a response
/// (continuous batching) and scores the others (batches of similar length).
fn dump_rows(
    engine: &Engine,
    records: &[crate::input::Record],
    encoded: &[Encoded],
    batch_size: usize,
    work: &mut Work,
) -> Result<Vec<Row>> {
    let (gen_idx, score_idx): (Vec<usize>, Vec<usize>) =
        (0..encoded.len()).partition(|&i| encoded[i].response.is_none());
    let mut by_index: Vec<Option<Row>> = (0..encoded.len()).map(|_| None).collect();
    if !gen_idx.is_empty() {
        let batch: Vec<(&str, &[u32])> = gen_idx
            .iter()
            .map(|&i| (records[i].id.as_str(), encoded[i].prompt.as_slice()))
            .collect();
        let gens = engine.generate(&batch, batch_size, work)?;
        for (&i, g) in gen_idx.iter().zip(gens) {
            let p = &encoded[i].prompt;
            by_index[i] = Some(Row {
                id: records[i].id.clone(),
                source: Source::Generated,
                input_ids: [p.as_slice(), &g.response].concat(),
                prompt_len: p.len() as u32,
                topk_ids: g.capture.topk_ids,
                topk_logprobs: g.capture.topk_logprobs,
                token_logprob: g.capture.token_logprob,
                sample_ids: g.capture.sample_ids,
                sample_logprobs: g.capture.sample_logprobs,
            });
        }
    }
    if !score_idx.is_empty() {
        let batch: Vec<(&str, &[u32], &[u32])> = score_idx
            .iter()
            .map(|&i| {
                (
                    records[i].id.as_str(),
                    encoded[i].prompt.as_slice(),
                    encoded[i].response.as_deref().expect("partitioned"),
                )
            })
            .collect();
        let caps = engine.score(&batch, batch_size, work)?;
        for (&i, c) in score_idx.iter().zip(caps) {
            let p = &encoded[i].prompt;
            let r = encoded[i].response.as_deref().expect("partitioned");
            by_index[i] = Some(Row {
                id: records[i].id.clone(),
                source: Source::Scored,
                input_ids: [p.as_slice(), r].concat(),
                prompt_len: p.len() as u32,
                topk_ids: c.topk_ids,
                topk_logprobs: c.topk_logprobs,
                token_logprob: c.token_logprob,
                sample_ids: c.sample_ids,
                sample_logprobs: c.sample_logprobs,
            });
        }
    }
    Ok(by_index
        .into_iter()
        .map(|r| r.expect("every row done"))
        .collect())
}

/// Writes the complete manifest (the commit point of the cache) and removes the partial one.
fn publish_manifest(
    out_dir: &Path,
    manifest: &mut Manifest,
    done: Vec<Option<ShardEntry>>,
) -> Result<()> {
    manifest.shards = done
        .into_iter()
        .map(|d| d.expect("every shard done"))
        .collect();
    manifest.totals = Totals::of(&manifest.shards);
    manifest.complete = true;
    kd_shard::write_manifest_atomic(&out_dir.join(kd_shard::MANIFEST_FILE), manifest)?;
    let partial_path = out_dir.join(kd_shard::PARTIAL_MANIFEST_FILE);
    if partial_path.exists() {
        std::fs::remove_file(&partial_path).map_err(|source| Error::Io {
            path: partial_path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} prompts  {msg}  eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Removes temporary files a killed writer left behind (never a published name).
fn remove_stray_tmp_files(dir: &Path) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|source| Error::Io { path: p, source })?;
        }
    }
    Ok(())
}

/// Puts the teacher's tokenizer beside the shards (`tokenizer.json`, and the chat template in
/// `tokenizer_config.json`), so the cache can be decoded and a student exported without the
/// teacher. Its fingerprint is in the manifest.
fn write_tokenizer_files(model: &LoadedModel, dir: &Path) -> Result<()> {
    let tok = &model.tokenizer;
    let json = serde_json::to_vec(&tok.to_tokenizer_json()).expect("tokenizer serializes");
    kd_fs::write_bytes_atomic(&dir.join("tokenizer.json"), &json)?;
    let mut cfg = serde_json::json!({});
    if let Some(t) = tok.chat_template() {
        cfg["chat_template"] = t.source().into();
    }
    if let Some(id) = tok.eos_id() {
        cfg["eos_token"] = tok.token_text(id).into();
    }
    if let Some(id) = tok.bos_id() {
        cfg["bos_token"] = tok.token_text(id).into();
    }
    cfg["add_bos_token"] = tok.add_bos_token().into();
    let cfg = serde_json::to_vec_pretty(&cfg).expect("config serializes");
    Ok(kd_fs::write_bytes_atomic(
        &dir.join("tokenizer_config.json"),
        &cfg,
    )?)
}
