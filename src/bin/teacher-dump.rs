//! `teacher-dump`: run the teacher once and cache its top-k log-probabilities.

use std::io::Write;

use anyhow::{Context, bail};
use clap::Parser;
use kd_distill::cli::{human_bytes, run_main, set_threads, teacher_dump::Args};

/// What the dump holds in memory: the weights as packed (or mapped), and the KV cache of one batch at the
/// response limit (plus its prompts, counted at 512 tokens each here).
fn memory_plan(m: &kd_model::Llama, r: &kd_distill::cli::teacher_dump::Resolved) -> String {
    let weights = match m.weight_memory() {
        Some((total, formats)) => {
            let mut parts: Vec<String> = formats
                .iter()
                .map(|(f, b)| format!("{f:?} {}", human_bytes(*b as u64)))
                .collect();
            let mapped = m.weight_bytes_in_place();
            if mapped > 0 {
                parts.push(format!(
                    "{} of them read in place from the file",
                    human_bytes(mapped as u64)
                ));
            }
            format!(
                "weights {} ({})",
                human_bytes(total as u64),
                parts.join(", ")
            )
        }
        None => format!(
            "weights {} ({} in candle tensors)",
            human_bytes(m.candle_weight_bytes().unwrap_or(0) as u64),
            kd_model::Dtype::from_candle(m.dtype())
        ),
    };
    let tokens = r.settings.max_new_tokens + 512;
    let kv = m.kv_bytes_per_token() * tokens * r.run.batch_size;
    // f32 logits of one batch, and on candle's path the copy in the products' dtype they
    // are cast from.
    let per = 4 + if m.weight_memory().is_some() {
        0
    } else {
        m.dtype().size_in_bytes()
    };
    let logits = per * m.vocab_size() * r.run.batch_size.max(r.run.logits_chunk);
    format!(
        "memory plan: {weights}, KV cache {} for a batch of {} at {tokens} tokens, {} of logits per step",
        human_bytes(kv as u64),
        r.run.batch_size,
        human_bytes(logits as u64)
    )
}

fn main() {
    let args = Args::parse();
    let json = args.json;
    run_main(move || {
        let mut r = args.resolve()?;
        set_threads(r.threads);
        let mut input = kd_teacher::input::read_jsonl(&r.input, r.skip_bad_lines)?;
        for (line, what) in &input.skipped {
            eprintln!("skipped {}:{line}: {what}", r.input.display());
        }
        if let Some(n) = r.limit {
            if n == 0 {
                bail!("--limit 0 leaves nothing to dump");
            }
            input.records.truncate(n);
        }
        let device = r.device.open()?;
        if !json {
            eprintln!("device: {}", kd_model::device_name(&device));
        }
        r.settings.dtype = r.dtype_on(&device);
        let opts = kd_model::LoadOptions {
            precision: r.settings.precision,
            dtype: r.settings.dtype,
            kernels: kd_model::Kernels::Auto,
            weights_in_place: r.weights_in_place,
        };
        let model = kd_model::load_opts(&r.teacher, &opts, &device)
            .with_context(|| format!("loading the teacher {}", r.teacher.display()))?;
        if !json {
            eprintln!(
                "teacher {} ({} parameters, {:?} {} on {}), {} prompts from {}, top-k {}, {}",
                r.teacher.display(),
                model.identity.n_params,
                r.settings.precision,
                r.settings.dtype,
                model.model.backend_name(),
                input.records.len(),
                r.input.display(),
                r.settings.top_k,
                if r.settings.temperature > 0.0 {
                    format!(
                        "sampling T={} top-p={} seed={}",
                        r.settings.temperature, r.settings.top_p, r.settings.seed
                    )
                } else {
                    "greedy".to_string()
                }
            );
        }
        if !json {
            eprintln!("{}", memory_plan(&model.model, &r));
        }
        if r.weights_in_place && model.model.weight_bytes_in_place() == 0 {
            eprintln!(
                "note: --weights-in-place read nothing in place (it takes BF16 weights on AMX \
                 tiles); the weights are packed as usual"
            );
        }
        let s = kd_teacher::dump::dump(&model, &input, &r.settings, &r.run, &r.out)?;
        // Written with `writeln!` so a closed pipe is an error (ended quietly), not a panic.
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        } else {
            writeln!(
                out,
                "{} prompts ({} shards written, {} reused) -> {}",
                s.rows,
                s.shards_written,
                s.shards_reused,
                s.out_dir.join("manifest.json").display()
            )?;
            let kinds = match (s.generated_tokens, s.scored_tokens) {
                (g, 0) => format!("generated tokens {g}"),
                (0, c) => format!("scored tokens {c}"),
                (g, c) => format!("generated tokens {g}, scored tokens {c}"),
            };
            writeln!(
                out,
                "prompt tokens {}, {kinds}, {:.1} tokens/s, {:.1} s",
                s.prompt_tokens, s.tokens_per_s, s.seconds
            )?;
            writeln!(
                out,
                "distilled positions {}, {} on disk, {:.1} bytes per position, peak memory {}",
                s.positions,
                human_bytes(s.bytes),
                s.bytes_per_position,
                s.peak_rss_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "unknown".into())
            )?;
        }
        Ok(())
    })
}
