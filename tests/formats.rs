//! Every weight format the teacher reads, dumped by `teacher-dump` on its exact path and checked
//! against transformers' LlamaForCausalLM computing in float64 on the same weights, which
//! Python dequantizes on its own (safetensors through transformers, GGUF blocks through
//! llama.cpp's gguf-py): every stored top-k log-prob within 1e-4 nats on the tiny shape (width
//! 32; √8 times that at width 256, where f32 rounding alone reaches 1.2e-4), within twice the
//! error of unquantized f32 weights of the same shape, and every stored top-1 the reference's
//! argmax. Hugging Face directories in f32, bf16 and f16; GGUF F16, BF16, Q8_0,
//! Q4_0 and Q4_1 on the tiny shape, Q4_K, Q5_K and Q6_K on a 256-wide one (K-quant rows are
//! whole 256-column super-blocks). Skipped without torch, transformers and gguf, unless
//! `KD_REQUIRE_TORCH=1` (CI).

mod util;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use kd_model::testing::{random_weights, tiny_config, write_gguf_with, write_hf_dir};

fn has_reference_stack() -> bool {
    util::python_imports_torch("torch, transformers, gguf")
}

/// The reference's verdict on `cache`, dumped from `weights` (config in `config_dir`).
fn reference(config_dir: &Path, weights: &Path, cache: &Path) -> serde_json::Value {
    let o = util::python_torch()
        .arg(util::root().join("python/tests/transformers_logprobs.py"))
        .args([config_dir, weights, cache])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: {}",
        weights.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn every_weight_format_dumps_the_log_probs_transformers_computes() {
    if !has_reference_stack() {
        return;
    }
    let dir = util::tempdir();
    let tok = kd_tokenizer::Tokenizer::tiny_for_tests();
    let tiny = tiny_config(tok.vocab_size());
    let wide = kd_model::LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        ..tiny.clone()
    };
    let mut fixtures: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    for (shape, cfg, seed) in [("tiny", &tiny, 31), ("wide", &wide, 32)] {
        let w = random_weights(cfg, seed).unwrap();
        let hf = dir.path().join(format!("{shape}-hf"));
        write_hf_dir(&hf, cfg, &w, &tok).unwrap();
        let gguf_types: &[GgmlDType] = if shape == "tiny" {
            fixtures.push(("hf f32".into(), hf.clone(), hf.clone()));
            for dt in [candle_core::DType::BF16, candle_core::DType::F16] {
                let half: kd_model::testing::Weights = w
                    .iter()
                    .map(|(k, t)| (k.clone(), t.to_dtype(dt).unwrap()))
                    .collect();
                let p = dir.path().join(format!("tiny-hf-{dt:?}"));
                write_hf_dir(&p, cfg, &half, &tok).unwrap();
                fixtures.push((format!("hf {dt:?}"), hf.clone(), p));
            }
            &[
                GgmlDType::F16,
                GgmlDType::BF16,
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
            ]
        } else {
            fixtures.push(("wide hf f32".into(), hf.clone(), hf.clone()));
            &[GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K]
        };
        for &dt in gguf_types {
            let p = dir.path().join(format!("{shape}-{dt:?}.gguf"));
            write_gguf_with(&p, &tok, &w, dt, cfg, &[]);
            fixtures.push((format!("gguf {dt:?}"), hf.clone(), p));
        }
    }
    let rows: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({"id": format!("f{i}"), "prompt": format!("name {} and {}", i * 3 % 7, i + 2)}))
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let (mut tiny_f32, mut wide_f32): (Option<f64>, Option<f64>) = (None, None);
    for (name, config_dir, weights) in &fixtures {
        let cache = dir.path().join(format!("cache-{}", name.replace(' ', "-")));
        util::run_ok(
            "teacher-dump",
            &[
                "--teacher",
                weights.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--out",
                cache.to_str().unwrap(),
                "--top-k",
                "8",
                "--max-new-tokens",
                "10",
                "--shard-format",
                "1",
                "--no-progress",
            ],
        );
        let r = reference(config_dir, weights, &cache);
        eprintln!("{name}: {r}");
        assert!(r["positions"].as_u64().unwrap() >= 30, "{name}: {r}");
        let worst = r["max_abs_diff"].as_f64().unwrap();
        // f32 arithmetic against float64 differs by rounding that grows as √(width): 1e-4
        // nats at the tiny shape's 32, √8 times that at 256. A quantized format must also
        // stay within twice the error of the unquantized f32 weights of its shape: its blocks
        // are expanded to exactly the values gguf-py dequantizes, so they add no error.
        let wide_shape = ["Q4K", "Q5K", "Q6K", "wide"]
            .iter()
            .any(|w| name.contains(w));
        let tol = if wide_shape { 1e-4 * 8f64.sqrt() } else { 1e-4 };
        assert!(
            worst <= tol,
            "{name}: stored log-probs {worst} nats from transformers"
        );
        let floor = if wide_shape { wide_f32 } else { tiny_f32 };
        if let Some(floor) = floor.filter(|_| !name.ends_with("hf f32")) {
            assert!(
                worst <= 2.0 * floor.max(1e-5),
                "{name}: {worst} nats against {floor} for f32 weights of the same shape"
            );
        }
        if name == "hf f32" {
            tiny_f32 = Some(worst);
        } else if name == "wide hf f32" {
            wide_f32 = Some(worst);
        }
        assert_eq!(r["top1_flips"], 0, "{name}: {r}");
    }
}
