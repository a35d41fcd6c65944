//! Checks that need a CUDA device; `scripts/gpu_check.sh` runs them on a GPU machine.
//!
//! In a build without the `cuda` feature they are ignored (cargo reports them so). In a
//! `cuda` build on a machine without a usable device they print `skipped: …` and return,
//! unless `KD_REQUIRE_GPU=1` (set by the GPU check), which makes that a failure.
//! With `KD_GPU_OUT` set, each writes its figures there as `<test>.json`.
//! `KD_GPU_ON_CPU=1` runs them with candle's CPU device standing in for the GPU (slowly, with
//! `KD_GPU_ROWS` rows for the speed figures): a check of the checks where no GPU is at hand.

mod util;

use std::time::Instant;

use candle_core::{DType, Device};
use kd_model::{Dtype, Kernels, LoadOptions, Precision};
use kd_teacher::engine::{Capture, Draws, Engine, Work};
use kd_teacher::sampler::SamplingConfig;
use serde_json::json;

/// CUDA device 0, or `None` (with a note) where there is none.
fn gpu() -> Option<Device> {
    if std::env::var("KD_GPU_ON_CPU").is_ok_and(|v| v == "1") {
        eprintln!("KD_GPU_ON_CPU=1: candle's CPU device stands in for the GPU");
        return Some(Device::Cpu);
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var("KD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("KD_REQUIRE_GPU=1 but no CUDA device answers: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Writes `figures` to `$KD_GPU_OUT/<name>.json` when the variable is set, and prints them.
fn report(name: &str, figures: serde_json::Value) {
    let text = serde_json::to_string_pretty(&figures).unwrap();
    eprintln!("{name}: {text}");
    if let Some(dir) = std::env::var_os("KD_GPU_OUT") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.json")), text).unwrap();
    }
}

/// The real teacher when present, else a tiny random one written into `tmp`.
fn teacher(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    match util::teacher_gguf() {
        Some(p) => p,
        None => {
            let dir = tmp.path().join("teacher");
            kd_model::testing::write_tiny_teacher(&dir, 7).unwrap();
            dir
        }
    }
}

/// The quickstart prompts, encoded with the teacher's chat template.
fn prompts(tok: &kd_tokenizer::Tokenizer) -> Vec<(String, Vec<u32>)> {
    let input =
        kd_teacher::input::read_jsonl(&util::root().join("data/prompts/quickstart.jsonl"), false)
            .unwrap();
    let opts = kd_teacher::input::EncodeOptions {
        chat_template: tok.chat_template().is_some(),
        score: false,
    };
    input
        .records
        .iter()
        .map(|r| {
            let e = kd_teacher::input::encode(r, tok, opts).unwrap();
            (r.id.clone(), e.prompt)
        })
        .collect()
}

fn engine(model: &kd_model::Llama, top_k: usize, max_new: usize, reduce: bool) -> Engine<'_> {
    Engine {
        model,
        top_k,
        draws: Draws::default(),
        stop_ids: vec![],
        max_new_tokens: max_new,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        logits_chunk: 256,
        on_rows_done: None,
        reduce_on_device: reduce,
    }
}

/// Max and mean absolute difference of two captures' log-probs (top-k and next token), and
/// the share of positions whose top-1 id agrees.
fn compare(a: &[Capture], b: &[Capture], k: usize) -> (f64, f64, f64) {
    let (mut max, mut sum, mut n) = (0f64, 0f64, 0usize);
    let (mut agree, mut positions) = (0usize, 0usize);
    for (x, y) in a.iter().zip(b) {
        let pairs = x
            .token_logprob
            .iter()
            .zip(&y.token_logprob)
            .chain(x.topk_logprobs.iter().zip(&y.topk_logprobs));
        for (p, q) in pairs {
            let d = (f64::from(*p) - f64::from(*q)).abs();
            max = max.max(d);
            sum += d;
            n += 1;
        }
        for (i, j) in x.topk_ids.chunks(k).zip(y.topk_ids.chunks(k)) {
            positions += 1;
            agree += usize::from(i[0] == j[0]);
        }
    }
    (
        max,
        sum / n.max(1) as f64,
        agree as f64 / positions.max(1) as f64,
    )
}

/// The teacher on the GPU scores the CPU kernels' greedy responses to the quickstart
/// prompts: f32 within 1e-3 nats of the exact CPU pass; bf16 and f16 reported (max, mean,
/// top-1 agreement). Then generation speed at batch 64 with top-32 capture, per dtype.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a CUDA build and device (scripts/gpu_check.sh)"
)]
fn the_teacher_on_the_gpu_against_the_cpu_kernels() {
    let Some(dev) = gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let path = teacher(&tmp);
    let k = 32;
    let cpu = kd_model::load(&path, Precision::Exact, &Device::Cpu).unwrap();
    let rows = prompts(&cpu.tokenizer);
    let refs: Vec<(&str, &[u32])> = rows
        .iter()
        .map(|(i, p)| (i.as_str(), p.as_slice()))
        .collect();
    let mut work = Work::default();
    let generated = engine(&cpu.model, k, 64, false)
        .generate(&refs, 16, &mut work)
        .unwrap();
    let scored: Vec<(&str, &[u32], &[u32])> = refs
        .iter()
        .zip(&generated)
        .map(|((i, p), g)| (*i, *p, g.response.as_slice()))
        .collect();
    let exact: Vec<Capture> = generated.iter().map(|g| g.capture.clone()).collect();
    let mut figures = serde_json::Map::new();
    figures.insert("teacher".into(), json!(path.display().to_string()));
    figures.insert(
        "positions".into(),
        json!(exact.iter().map(|c| c.token_logprob.len()).sum::<usize>()),
    );
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
        let opts = LoadOptions {
            precision: Precision::Exact,
            dtype,
            kernels: Kernels::Auto,
            ..Default::default()
        };
        let t0 = Instant::now();
        let m = kd_model::load_opts(&path, &opts, &dev).unwrap();
        let load_s = t0.elapsed().as_secs_f64();
        let caps = engine(&m.model, k, 0, true)
            .score(&scored, 16, &mut Work::default())
            .unwrap();
        let (max, mean, top1) = compare(&exact, &caps, k);
        // Generation speed: 256 rows (the prompts repeated) at batch 64, 128 new tokens.
        let n_rows = std::env::var("KD_GPU_ROWS").map_or(256, |v| v.parse().unwrap());
        let many: Vec<(&str, &[u32])> = refs.iter().cycle().take(n_rows).copied().collect();
        let mut w = Work::default();
        let t0 = Instant::now();
        engine(&m.model, k, 128, true)
            .generate(&many, 64, &mut w)
            .unwrap();
        let secs = t0.elapsed().as_secs_f64();
        figures.insert(
            dtype.to_string(),
            json!({
                "load_s": load_s,
                "max_abs_nats": max,
                "mean_abs_nats": mean,
                "top1_agreement": top1,
                "generated_tokens": w.generated_tokens,
                "generated_tokens_per_s": w.generated_tokens as f64 / secs,
            }),
        );
        if dtype == Dtype::F32 {
            assert!(
                max < 1e-3,
                "f32 on the GPU: {max} nats from the CPU kernels"
            );
        }
    }
    report("teacher", serde_json::Value::Object(figures));
}

/// The reduction on the GPU keeps what the CPU's keeps: the same top-k values (ids may
/// differ only among tied logits), the same log-sum-exp and the same draws, at the
/// quickstart's vocabulary and at Qwen's.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a CUDA build and device (scripts/gpu_check.sh)"
)]
fn the_reduction_on_the_gpu_equals_the_cpus() {
    let Some(dev) = gpu() else { return };
    let mut rng = kd_model::kernels::Rng::new(5);
    for (n, v, k) in [(64, 49_152, 32), (8, 151_936, 1024), (3, 1000, 1)] {
        let x: Vec<f32> = (0..n * v).map(|_| rng.normal() * 3.0).collect();
        let on = |d: &Device| {
            let t = candle_core::Tensor::from_slice(&x, (n, v), d).unwrap();
            kd_teacher::reduce::reduce(&t, k, None, None).unwrap()
        };
        let (c, g) = (on(&Device::Cpu), on(&dev));
        let vals = |r: &kd_teacher::reduce::Reduced| r.top.iter().map(|e| e.1).collect::<Vec<_>>();
        assert_eq!(vals(&c), vals(&g), "n {n} v {v} k {k}");
        let same_ids = c.top.iter().zip(&g.top).filter(|(a, b)| a.0 == b.0).count();
        assert!(same_ids as f64 >= 0.99 * c.top.len() as f64);
        for (a, b) in c.lse.iter().zip(&g.lse) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        // Sampled targets: the same draws (the CDFs may differ in their last bits only).
        let seeds: Vec<u64> = (0..n as u64).collect();
        let draws = |d: &Device| {
            let t = candle_core::Tensor::from_slice(&x, (n, v), d).unwrap();
            let req = kd_teacher::reduce::DrawRequest {
                seeds: &seeds,
                n: 12,
            };
            kd_teacher::reduce::reduce(&t, 1, None, Some(req))
                .unwrap()
                .draws
        };
        assert_eq!(draws(&Device::Cpu), draws(&dev), "draws, v {v}");
    }
}

/// One training step's loss and gradients on the GPU against the CPU's candle engine
/// (f32 within 1e-4 relative per parameter), and the bf16 products' distance from them.
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a CUDA build and device (scripts/gpu_check.sh)"
)]
fn a_training_step_on_the_gpu_equals_the_cpus() {
    use kd_model::trainable::Student;
    let Some(dev) = gpu() else { return };
    let cfg = kd_model::testing::smollm2_student_config();
    let loss = kd_loss::LossConfig {
        divergence: kd_loss::Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 0.9,
        tail: kd_loss::TailPolicy::Bucket,
    };
    let batch = kd_student::data::synthetic_batch(cfg.vocab_size, &[256, 200], 8, 32, 3);
    let grads = |s: &Student| {
        let (l, g) = kd_student::train::loss_and_grads(s, &batch, &loss, 128, true).unwrap();
        let g = g.unwrap();
        let named: Vec<(String, Vec<f32>)> = s
            .named_vars()
            .into_iter()
            .map(|(n, v)| {
                let t = g.get(v.as_tensor()).expect("a gradient per parameter");
                (
                    n,
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            })
            .collect();
        (l.total, named)
    };
    let cpu = Student::random(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
    let mut on_gpu = Student::random(&cfg, 11, DType::F32, &dev).unwrap();
    let (lc, gc) = grads(&cpu);
    let (lg, gg) = grads(&on_gpu);
    let worst = |a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]| {
        a.iter()
            .zip(b)
            .map(|((n, x), (_, y))| (rel_diff(x, y), n.clone()))
            .fold((0f64, String::new()), |m, e| if e.0 > m.0 { e } else { m })
    };
    let (w32, n32) = worst(&gg, &gc);
    on_gpu.set_products(DType::BF16);
    let (lb, gb) = grads(&on_gpu);
    let (w16, n16) = worst(&gb, &gc);
    report(
        "training_step",
        json!({
            "loss_cpu": lc, "loss_gpu_f32": lg, "loss_gpu_bf16": lb,
            "worst_rel_grad_f32": w32, "worst_group_f32": n32,
            "worst_rel_grad_bf16": w16, "worst_group_bf16": n16,
        }),
    );
    assert!(((lg - lc) / lc).abs() < 1e-5, "loss {lg} vs {lc}");
    assert!(w32 < 1e-4, "{n32}: relative gradient difference {w32}");
}

/// `‖a − b‖ / ‖b‖`.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - f64::from(y)).powi(2);
        n += f64::from(y).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}
