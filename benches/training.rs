//! Training throughput on the real student's shape: the 6-layer SmolLM2 student (hidden 576,
//! 9 heads over 3 key/value heads, MLP 1536, tied 49152-token head; 49.6 M parameters), two
//! 512-token rows per step (`token_budget = 1024`), 461 distilled positions per row, top-32
//! targets, forward KL with the bucket tail, AdamW with clipping — on the kernel engine and on
//! the candle engine, in the same invocation. Each engine runs in its own child process, so
//! that its peak resident memory (`VmHWM`) is its own.
//!
//! Also reports the physical ceiling: training FLOPs per position (6 × parameters in products
//! plus attention) divided by the rate of the kernels' f32 product measured here on a
//! training-sized product.
//!
//! The figures move with the machine (shared CPUs): compare the two engines of one run, and
//! run it twice.
//!
//! Where `python3` imports torch and transformers, PyTorch eager runs the same student shape
//! and batches too (`scripts/torch_fit_baseline.py --synthetic`, same thread count, two
//! untimed warm-up steps), the baseline the kernel engine is measured against.
//!
//! `-- --avx2` restricts both sides to AVX2 on an AVX-512 CPU (the kernels' AVX2 path;
//! PyTorch through `ATEN_CPU_CAPABILITY=avx2`, `MKL_ENABLE_INSTRUCTIONS=AVX2` and
//! `ONEDNN_MAX_CPU_ISA=AVX2`), to stand in for an AVX2 machine.
//!
//! Run: `cargo bench --bench training` (`-- --steps N` for more steps; `-- --engine NAME` for
//! one of kernels, candle, pytorch). Writes `target/bench/training.json` (or
//! `training-avx2.json`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use kd_loss::{Divergence, LossConfig, TailPolicy};
use kd_model::trainable::Student;
use kd_student::data::synthetic_batch;
use kd_student::engine::KernelStudent;
use kd_student::optim::{AdamW, AdamWConfig};

const ROWS: [usize; 2] = [512, 512];
const PROMPT: usize = 51;
const TOP_K: usize = 32;

/// One engine's run in this process: prints `positions/s peak_bytes` on stdout. The
/// allocator is set up as in the binaries (freed memory kept), as `student-fit` runs.
fn child(engine: &str, steps: usize, chunk: usize) {
    kd_distill::cli::keep_freed_memory();
    if std::env::var_os("KD_BENCH_AVX2").is_some() {
        kd_model::kernels::prefer_avx2(true);
    }
    let cfg = kd_model::testing::smollm2_student_config();
    let student = Student::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let loss = LossConfig {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 1.0,
        tail: TailPolicy::Bucket,
    };
    let batches: Vec<_> = (0..=steps as u64)
        .map(|s| synthetic_batch(cfg.vocab_size, &ROWS, PROMPT, TOP_K, 100 + s))
        .collect();
    let mut positions = 0;
    let mut start = Instant::now();
    match engine {
        "kernels" => {
            let mut k =
                KernelStudent::new(&student, AdamWConfig::default(), 1024, 512, chunk).unwrap();
            for (i, b) in batches.iter().enumerate() {
                if i == 1 {
                    start = Instant::now();
                }
                let l = k.accumulate(b, &loss, chunk).unwrap();
                k.step(1e-4, 1.0);
                if i > 0 {
                    positions += l.positions;
                }
            }
            eprintln!("kernel engine time: {}", k.timings());
        }
        _ => {
            let mut opt = AdamW::new(student.named_vars(), AdamWConfig::default()).unwrap();
            for (i, b) in batches.iter().enumerate() {
                if i == 1 {
                    start = Instant::now();
                }
                let (l, g) =
                    kd_student::train::loss_and_grads(&student, b, &loss, chunk, true).unwrap();
                opt.step(&g.unwrap(), 1e-4, 1.0).unwrap();
                if i > 0 {
                    positions += l.positions;
                }
            }
        }
    }
    let rate = positions as f64 / start.elapsed().as_secs_f64();
    println!("{rate} {}", kd_teacher::dump::peak_rss_bytes().unwrap_or(0));
}

/// PyTorch eager on the same shape and batches (`--synthetic` baseline), `steps` timed steps
/// after two warm-up steps; `None`, with a note, where torch is missing.
fn pytorch(steps: usize, avx2: bool) -> Option<(&'static str, f64, u64)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = std::process::Command::new("python3");
    if avx2 {
        cmd.env("ATEN_CPU_CAPABILITY", "avx2")
            .env("MKL_ENABLE_INSTRUCTIONS", "AVX2")
            .env("ONEDNN_MAX_CPU_ISA", "AVX2");
    }
    let out = cmd
        .arg(root.join("scripts/torch_fit_baseline.py"))
        .args(["--synthetic", "--steps", &(steps + 2).to_string()])
        .args(["--threads", &rayon::current_num_threads().to_string()])
        .stderr(std::process::Stdio::inherit())
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!(
                "note: no PyTorch baseline (python3 with torch and transformers did not run)"
            );
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last()?;
    let v: serde_json::Value = serde_json::from_str(last).ok()?;
    Some((
        "pytorch",
        v["positions_per_s"].as_f64()?,
        v["peak_rss_bytes"].as_u64()?,
    ))
}

/// The value after `--name` on the command line.
fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps = arg(&args, "--steps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(4usize);
    let chunk = arg(&args, "--chunk")
        .and_then(|v| v.parse().ok())
        .unwrap_or(kd_student::fit::DEFAULT_LOGITS_CHUNK);
    if let Ok(engine) = std::env::var("KD_BENCH_ENGINE") {
        child(&engine, steps, chunk);
        return;
    }
    if !kd_model::kernels::supported() {
        eprintln!(
            "this CPU has neither AVX-512F nor AVX2+FMA: the kernel engine does not run here"
        );
        return;
    }
    let avx2 = args.iter().any(|a| a == "--avx2");
    if avx2 {
        kd_model::kernels::prefer_avx2(true);
    }
    let level = match kd_model::kernels::level() {
        Some(kd_model::kernels::Level::Avx512) => "AVX-512",
        _ if avx2 => "AVX2 (an AVX-512 CPU restricted to AVX2)",
        _ => "AVX2",
    };
    let exe = std::env::current_exe().unwrap();
    let mut results = Vec::new();
    // `--engine kernels` (or `candle`) runs one engine only.
    let only = arg(&args, "--engine");
    for engine in ["kernels", "candle", "pytorch"] {
        if only.is_some_and(|o| o != engine) {
            continue;
        }
        if engine == "pytorch" {
            if let Some(r) = pytorch(steps, avx2) {
                results.push(r);
            }
            continue;
        }
        let mut cmd = std::process::Command::new(&exe);
        if avx2 {
            cmd.env("KD_BENCH_AVX2", "1");
        }
        let out = cmd
            .args(["--steps", &steps.to_string(), "--chunk", &chunk.to_string()])
            .env("KD_BENCH_ENGINE", engine)
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the {engine} engine's run failed: {}",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        let rate: f64 = it.next().unwrap().parse().unwrap();
        let peak: u64 = it.next().unwrap().parse().unwrap();
        results.push((engine, rate, peak));
    }
    let cfg = kd_model::testing::smollm2_student_config();
    // Products per position: every weight matrix (the tied head once) → 2 FLOPs forward,
    // 4 backward; attention: q·kᵀ and p·v over on average half a 512-token row, ×3 for the
    // backward.
    let d = cfg.hidden_size;
    let layer = d * cfg.q_dim()
        + 2 * d * cfg.num_key_value_heads * cfg.head_dim()
        + cfg.q_dim() * d
        + 3 * d * cfg.intermediate_size;
    let matmul_params = cfg.num_hidden_layers * layer + cfg.vocab_size * d;
    let attn = cfg.num_hidden_layers * 2 * 2 * 256 * cfg.q_dim();
    let flops = 6.0 * matmul_params as f64 + 3.0 * attn as f64;
    // The MLP's gate+up over a 1024-token batch, packing included.
    let rate = kd_model::testing::packed_product_gflops(1024, 3072, 576, true);
    let ceiling = rate * 1e9 / flops;
    println!(
        "instruction set: {level}, {} threads",
        rayon::current_num_threads()
    );
    println!(
        "{:<8} {:>12} {:>12}",
        "engine", "positions/s", "peak RSS MB"
    );
    for (e, r, p) in &results {
        println!("{e:<8} {r:>12.1} {:>12.0}", *p as f64 / 1e6);
    }
    let find = |name: &str| results.iter().find(|r| r.0 == name);
    if let Some((_, r0, p0)) = find("kernels") {
        for other in ["candle", "pytorch"] {
            if let Some((_, r1, p1)) = find(other) {
                println!(
                    "kernels / {other}: {:.2}× positions/s, {:.2}× peak memory",
                    r0 / r1,
                    *p0 as f64 / *p1 as f64
                );
            }
        }
    }
    println!(
        "ceiling: {:.1} GFLOP/s (packed f32 product, 1024×576 · 576×3072) / {:.0} MFLOP per position = {ceiling:.0} positions/s; kernels at {:.0}% of it",
        rate,
        flops / 1e6,
        100.0
            * results
                .iter()
                .find(|r| r.0 == "kernels")
                .map_or(0.0, |r| r.1)
            / ceiling
    );
    let json = serde_json::json!({
        "instruction_set": level,
        "steps": steps,
        "engines": results.iter().map(|(e, r, p)| serde_json::json!({"engine": e, "positions_per_s": r, "peak_rss_bytes": p})).collect::<Vec<_>>(),
        "pytorch_baseline": "scripts/torch_fit_baseline.py --synthetic (PyTorch eager, the same shape and batches)",
        "gemm_gflops": rate,
        "flops_per_position": flops,
        "ceiling_positions_per_s": ceiling,
    });
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join(if avx2 {
            "training-avx2.json"
        } else {
            "training.json"
        }),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}
