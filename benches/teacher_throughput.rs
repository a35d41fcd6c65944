//! End-to-end teacher throughput on the real teacher (SmolLM2-135M-Instruct Q4_1), with a
//! baseline measured in the same invocation: candle-transformers' `quantized_llama` (8-bit
//! activations, last-position logits only) on the same GGUF and the same threads.
//!
//! Run: `cargo bench --bench teacher_throughput` (after `scripts/setup.sh`).
//! Environment: `KD_BENCH_NEW_TOKENS` (default 64) tokens generated per prompt,
//! `KD_TEACHER_GGUF` the teacher file. Prints a table and writes
//! `target/bench/teacher_throughput.json`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kd_model::{Kernels, Llama, Precision, load, load_with};
use kd_teacher::engine::{Engine, Work};
use kd_teacher::input::{EncodeOptions, encode, read_jsonl};
use kd_teacher::sampler::SamplingConfig;

type Row = (String, u64, f64, &'static str);

/// Generation at each batch size over the same 8 prompts (and, with `sampled`, at batch 8
/// with T=0.7, top-p 0.9), then scoring at batch 8, with one engine: stop tokens are disabled
/// so every row decodes `new_tokens` and the batch stays full; scoring ignores
/// `max_new_tokens`.
#[allow(clippy::too_many_arguments)]
fn measure(
    model: &Llama,
    label: &str,
    batches: &[usize],
    sampled: bool,
    prompts: &[(String, Vec<u32>)],
    score: &[kd_teacher::input::Encoded],
    new_tokens: usize,
    rows: &mut Vec<Row>,
) {
    let engine = Engine {
        model,
        top_k: 32,
        draws: kd_teacher::engine::Draws::default(),
        stop_ids: vec![],
        max_new_tokens: new_tokens,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        logits_chunk: 256,
        on_rows_done: None,
        reduce_on_device: false,
    };
    let batch: Vec<(&str, &[u32])> = prompts
        .iter()
        .map(|(id, p)| (id.as_str(), p.as_slice()))
        .collect();
    for &bs in batches {
        let mut work = Work::default();
        let t = Instant::now();
        engine.generate(&batch, bs, &mut work).expect("generates");
        let s = t.elapsed().as_secs_f64();
        rows.push((
            format!("teacher-dump {label}, generate, batch {bs}"),
            work.generated_tokens,
            s,
            "generated tokens/s incl. prefill + top-32 capture",
        ));
        rows.push((
            format!("teacher-dump {label}, decode only, batch {bs}"),
            work.generated_tokens,
            s - work.prefill_seconds,
            "generated tokens/s, decode steps + capture",
        ));
    }
    if sampled {
        // The sampler weighs the whole vocabulary at every position.
        let sampler = Engine {
            sampling: SamplingConfig {
                temperature: 0.7,
                top_p: 0.9,
                seed: 3,
            },
            stop_ids: vec![],
            ..engine
        };
        let mut work = Work::default();
        let t = Instant::now();
        sampler.generate(&batch, 8, &mut work).expect("generates");
        rows.push((
            format!("teacher-dump {label}, sampled, batch 8"),
            work.generated_tokens,
            t.elapsed().as_secs_f64(),
            "generated tokens/s incl. prefill + top-32 capture",
        ));
    }
    let mut work = Work::default();
    let t = Instant::now();
    let pairs: Vec<(&str, &[u32], &[u32])> = score
        .iter()
        .map(|e| ("bench", e.prompt.as_slice(), e.response.as_deref().unwrap()))
        .collect();
    engine.score(&pairs, 8, &mut work).expect("scores");
    let s = t.elapsed().as_secs_f64();
    rows.push((
        format!("teacher-dump {label}, score, batch 8"),
        work.prefill_tokens,
        s,
        "tokens/s (prompt + response) incl. top-32 capture",
    ));
    rows.push((
        format!("teacher-dump {label}, score, batch 8"),
        work.scored_tokens,
        s,
        "scored response tokens/s",
    ));
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let gguf = std::env::var_os("KD_TEACHER_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !gguf.exists() {
        eprintln!(
            "teacher not found at {} (run scripts/setup.sh)",
            gguf.display()
        );
        std::process::exit(1);
    }
    let new_tokens: usize = std::env::var("KD_BENCH_NEW_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let threads = candle_core::utils::get_num_threads();
    let m = load(&gguf, Precision::Exact, &Device::Cpu).expect("teacher loads");
    let input = read_jsonl(&root.join("data/prompts/quickstart.jsonl"), false).expect("prompts");
    let gen_opts = EncodeOptions {
        chat_template: true,
        score: false,
    };
    let prompts: Vec<(String, Vec<u32>)> = input.records[..8]
        .iter()
        .map(|r| {
            (
                r.id.clone(),
                encode(r, &m.tokenizer, gen_opts).expect("encodes").prompt,
            )
        })
        .collect();
    let score_in =
        read_jsonl(&root.join("data/prompts/quickstart-score.jsonl"), false).expect("score input");
    let sc_opts = EncodeOptions {
        chat_template: true,
        score: true,
    };
    let enc: Vec<_> = score_in
        .records
        .iter()
        .map(|r| encode(r, &m.tokenizer, sc_opts).expect("encodes"))
        .collect();
    let mut rows: Vec<Row> = Vec::new();

    // Ours (the CPU kernels), then the same engine on candle's exact f32 path (dense GEMM on
    // dequantized weights), at batch 8.
    measure(
        &m.model,
        "exact f32",
        &[1, 4, 8],
        true,
        &prompts,
        &enc,
        new_tokens,
        &mut rows,
    );
    if kd_model::kernels::level() == Some(kd_model::kernels::Level::Avx512) {
        // What a CPU with AVX2 but no AVX-512 runs (same values), measured on this one.
        kd_model::kernels::prefer_avx2(true);
        measure(
            &m.model,
            "exact f32 AVX2",
            &[8],
            false,
            &prompts,
            &enc,
            new_tokens,
            &mut rows,
        );
        kd_model::kernels::prefer_avx2(false);
    }
    let candle =
        load_with(&gguf, Precision::Exact, &Device::Cpu, Kernels::Candle).expect("teacher loads");
    measure(
        &candle.model,
        "exact f32 on candle",
        &[8],
        false,
        &prompts,
        &enc,
        new_tokens,
        &mut rows,
    );
    drop(candle);

    // Baseline: candle-transformers quantized_llama, batch 1, greedy, same prompts.
    let mut f = std::fs::File::open(&gguf).expect("gguf");
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).expect("gguf header");
    let mut q = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .expect("baseline loads");
    let (mut pre_tok, mut pre_s, mut dec_tok, mut dec_s) = (0u64, 0f64, 0u64, 0f64);
    for (_, p) in &prompts {
        let t = Instant::now();
        let x = Tensor::new(p.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut logits = q.forward(&x, 0).unwrap();
        pre_s += t.elapsed().as_secs_f64();
        pre_tok += p.len() as u64;
        let t = Instant::now();
        for i in 0..new_tokens {
            let next = logits
                .squeeze(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            let x = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            logits = q.forward(&x, p.len() + i).unwrap();
        }
        dec_s += t.elapsed().as_secs_f64();
        dec_tok += new_tokens as u64;
    }
    rows.push((
        "baseline candle quantized_llama, prefill, batch 1".into(),
        pre_tok,
        pre_s,
        "prompt tokens/s",
    ));
    rows.push((
        "baseline candle quantized_llama, decode, batch 1".into(),
        dec_tok,
        dec_s,
        "generated tokens/s",
    ));

    println!(
        "teacher throughput on {} ({} threads, {} new tokens per prompt, 8 prompts)",
        gguf.display(),
        threads,
        new_tokens
    );
    println!(
        "{:<52} {:>8} {:>8} {:>10}  unit",
        "what", "tokens", "seconds", "tokens/s"
    );
    let mut json = Vec::new();
    for (what, toks, s, unit) in &rows {
        let rate = *toks as f64 / s;
        println!("{what:<52} {toks:>8} {s:>8.2} {rate:>10.1}  {unit}");
        json.push(serde_json::json!({"what": what, "tokens": toks, "seconds": s, "tokens_per_s": rate, "unit": unit}));
    }
    let rate = |what: &str, unit: &str| {
        rows.iter()
            .find(|r| r.0 == what && r.3.starts_with(unit))
            .map(|r| r.1 as f64 / r.2)
            .expect("measured")
    };
    let base = rate(
        "baseline candle quantized_llama, decode, batch 1",
        "generated",
    );
    let base_prefill = rate(
        "baseline candle quantized_llama, prefill, batch 1",
        "prompt",
    );
    for bs in [1, 4, 8] {
        let what = format!("teacher-dump exact f32, generate, batch {bs}");
        println!(
            "{what}: {:.2}x the baseline's batch-1 decode",
            rate(&what, "generated") / base
        );
    }
    let against_candle = |what: &str, unit: &str| {
        rate(&format!("teacher-dump exact f32, {what}"), unit)
            / rate(&format!("teacher-dump exact f32 on candle, {what}"), unit)
    };
    println!(
        "generate, batch 8: {:.2}x the same engine on candle's exact path",
        against_candle("generate, batch 8", "generated")
    );
    println!(
        "score, batch 8: {:.2}x the same engine on candle's exact path, {:.2}x the baseline's prefill",
        against_candle("score, batch 8", "tokens/s (prompt"),
        rate("teacher-dump exact f32, score, batch 8", "tokens/s (prompt") / base_prefill
    );
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("teacher_throughput.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
