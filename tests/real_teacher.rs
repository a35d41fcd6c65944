//! Checks against the real teacher (SmolLM2-135M-Instruct Q4_1) and the independent references
//! in `tests/reference/smollm2-135m-instruct-q4_1/` (Python transformers, f32
//! dequantized weights, log-softmax in float64).

mod util;

use candle_core::Device;
use kd_model::{Kernels, Precision, load, load_with, log_softmax_f64};
use kd_teacher::engine::{Engine, Work};
use kd_teacher::sampler::SamplingConfig;

/// Largest allowed |ours − reference| for any top-20 log-prob, in nats.
const LOGPROB_TOL: f64 = 1e-3;

fn case_dir() -> std::path::PathBuf {
    util::reference_dir().join("smollm2-135m-instruct-q4_1")
}

/// Deviation of a model from the reference top-20 log-probs (and next-token log-probs).
struct Deviation {
    max: f64,
    mean: f64,
    values: usize,
    top1_same: usize,
    positions: usize,
}

fn deviation_from_reference(m: &kd_model::Llama) -> Deviation {
    let cases = util::read_jsonl(&case_dir().join("teacher-logprobs.jsonl"));
    let mut d = Deviation {
        max: 0.0,
        mean: 0.0,
        values: 0,
        top1_same: 0,
        positions: 0,
    };
    let mut sum = 0.0;
    for case in &cases {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let (hidden, _) = m.prefill(&[&ids], false).unwrap();
        for pos in case["positions"].as_array().unwrap() {
            let t = pos["t"].as_u64().unwrap() as usize;
            let logits: Vec<f32> = m
                .logits_at(&hidden, &[(0, t)])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let lp = log_softmax_f64(&logits);
            let top_ids: Vec<u32> = serde_json::from_value(pos["top_ids"].clone()).unwrap();
            let top_lp: Vec<f64> = serde_json::from_value(pos["top_logprobs"].clone()).unwrap();
            for (&id, &want) in top_ids.iter().zip(&top_lp) {
                let err = (lp[id as usize] - want).abs();
                d.max = d.max.max(err);
                sum += err;
                d.values += 1;
            }
            let next = pos["next"].as_u64().unwrap() as usize;
            d.max = d
                .max
                .max((lp[next] - pos["next_logprob"].as_f64().unwrap()).abs());
            d.top1_same +=
                usize::from(kd_model::kernels::top_k_logits(&logits, 1)[0].0 == top_ids[0]);
            d.positions += 1;
        }
    }
    d.mean = sum / d.values as f64;
    d
}

#[test]
fn exact_path_reproduces_transformers_top20_logprobs() {
    let Some(gguf) = util::teacher_gguf() else {
        return;
    };
    // Both implementations of the exact path: the CPU kernels (the default where the CPU has
    // AVX-512 or AVX2) and candle's tensors (GPUs and other CPUs).
    for kernels in [Kernels::Auto, Kernels::Candle] {
        let m = load_with(&gguf, Precision::Exact, &Device::Cpu, kernels).expect("teacher loads");
        let d = deviation_from_reference(&m.model);
        eprintln!(
            "{}: top-20 log-probs vs transformers f32: {} values, mean |err| {:.2e}, max {:.2e} nats; top-1 agrees at {}/{}",
            m.model.backend_name(),
            d.values,
            d.mean,
            d.max,
            d.top1_same,
            d.positions
        );
        assert!(
            d.max < LOGPROB_TOL,
            "{}: max error {} nats exceeds {LOGPROB_TOL}",
            m.model.backend_name(),
            d.max
        );
        assert_eq!(d.top1_same, d.positions);
    }
}

#[test]
fn greedy_generation_reproduces_reference_continuations() {
    let Some(gguf) = util::teacher_gguf() else {
        return;
    };
    let m = load(&gguf, Precision::Exact, &Device::Cpu).expect("teacher loads");
    let cases = util::read_jsonl(&case_dir().join("greedy-cases.jsonl"));
    let engine = Engine {
        model: &m.model,
        top_k: 20,
        draws: kd_teacher::engine::Draws::default(),
        stop_ids: m.tokenizer.stop_ids(),
        max_new_tokens: 32,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        logits_chunk: 64,
        on_rows_done: None,
        reduce_on_device: false,
    };
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| serde_json::from_value(c["prompt_ids"].clone()).unwrap())
        .collect();
    let rows: Vec<(&str, &[u32])> = prompts.iter().map(|p| ("x", p.as_slice())).collect();
    let mut work = Work::default();
    // All four in one batch: rows of different lengths share the KV cache.
    let out = engine.generate(&rows, 4, &mut work).unwrap();
    for (c, g) in cases.iter().zip(&out) {
        let want: Vec<u32> = serde_json::from_value(c["greedy_ids"].clone()).unwrap();
        assert_eq!(g.response, want, "greedy continuation of {}", c["messages"]);
        assert_eq!(
            m.tokenizer.decode(&g.response, false),
            c["text"].as_str().unwrap()
        );
    }
}

#[test]
fn approximate_quantized_path_is_close_but_not_exact() {
    // Measures the error of the opt-in fast path, so the number in --help stays honest.
    let Some(gguf) = util::teacher_gguf() else {
        return;
    };
    let q = load(&gguf, Precision::Quantized, &Device::Cpu).unwrap();
    let d = deviation_from_reference(&q.model);
    eprintln!(
        "approx-quantized: mean |err| of top-20 log-probs {:.3} nats over {} values",
        d.mean, d.values
    );
    assert!(
        d.mean > LOGPROB_TOL && d.mean < 0.5,
        "mean error {}",
        d.mean
    );
}

#[test]
fn quickstart_prompts_get_fluent_answers_from_the_binary() {
    // The README's promise on a small slice of the quickstart: asked for the capital of
    // France, the greedy teacher names Paris, and the cache verifies.
    let Some(gguf) = util::teacher_gguf() else {
        return;
    };
    let dir = util::tempdir();
    let out = dir.path().join("qs");
    let input = util::root().join("data/prompts/quickstart.jsonl");
    util::run_ok(
        "teacher-dump",
        &[
            "--teacher",
            gguf.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--limit",
            "4",
            "--max-new-tokens",
            "24",
            "--rows-per-shard",
            "2",
            "--no-progress",
        ],
    );
    util::run_ok("shard-cat", &["verify", out.to_str().unwrap()]);
    let shown = util::run_ok(
        "shard-cat",
        &["show", out.to_str().unwrap(), "capital-france", "--json"],
    );
    let row: serde_json::Value = serde_json::from_str(shown.trim()).unwrap();
    let response = row["response"].as_str().unwrap();
    assert!(response.contains("Paris"), "response: {response}");
    let m = kd_shard::read_manifest(&out.join("manifest.json")).unwrap();
    assert_eq!(m.totals.rows, 4);
    assert!(m.complete);
}
