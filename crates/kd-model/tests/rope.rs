//! RoPE in every form a model file gives it: `config.json` as `transformers` 4.x and 5.x write
//! it, GGUF metadata and `rope_freqs.weight`. Frequencies are compared with values
//! `transformers` computed (`tests/data/rope_reference.json`, from `scripts/rope_reference.py`);
//! the CPU kernels, candle's path and the trainable student are compared with each other on
//! every scaling type; and every setting the loader does not implement is refused naming the
//! file and the key.

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device};
use kd_model::loader::parse_hf_config;
use kd_model::testing::{random_weights, tiny_config, write_gguf_with, write_hf_dir};
use kd_model::{Kernels, Llama, LlamaConfig, Precision, RopeScaling, Student, load_with};
use kd_tokenizer::Tokenizer;
use serde_json::{Value, json};
use std::path::Path;

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rope_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every case of the reference file, in its 4.x or 5.x `config.json` form, gives the inverse
/// frequencies and attention factor `transformers` computed (f32 there: relative 1e-6).
#[test]
fn frequencies_match_transformers() {
    let doc = reference();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = parse_hf_config(&case["config"], Path::new(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (inv, attn) = cfg.rope_frequencies();
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(inv.len(), want.len(), "{name}");
        let mut max_rel = 0f64;
        for (a, b) in inv.iter().zip(&want) {
            max_rel = max_rel.max((a - b).abs() / b.abs());
        }
        let want_attn = case["attention_factor"].as_f64().unwrap();
        eprintln!(
            "{name}: {:?} max rel err {max_rel:.1e}, attention factor {attn}",
            cfg.rope_scaling
        );
        assert!(
            max_rel < 1e-6,
            "{name}: inverse frequencies off by {max_rel:.2e}"
        );
        assert!(
            (attn - want_attn).abs() < 1e-6,
            "{name}: attention factor {attn} vs {want_attn}"
        );
    }
}

/// The reference cases exercise every implemented scaling type, in both forms.
#[test]
fn reference_covers_every_type_and_form() {
    let doc = reference();
    let mut seen = std::collections::BTreeSet::new();
    for case in doc["cases"].as_array().unwrap() {
        let cfg = parse_hf_config(&case["config"], Path::new("x")).unwrap();
        let ty = match &cfg.rope_scaling {
            None => "default",
            Some(RopeScaling::Linear { .. }) => "linear",
            Some(RopeScaling::Dynamic { .. }) => "dynamic",
            Some(RopeScaling::Llama3 { .. }) => "llama3",
            Some(RopeScaling::Yarn { .. }) => "yarn",
            Some(RopeScaling::Freqs { .. }) => "freqs",
        };
        let form = if case["config"].get("rope_parameters").is_some() {
            "5x"
        } else {
            "4x"
        };
        seen.insert(ty);
        seen.insert(form);
    }
    for want in ["default", "linear", "dynamic", "llama3", "yarn", "4x", "5x"] {
        assert!(seen.contains(want), "no reference case for {want}");
    }
}

/// A tiny config with head_dim 16 and room for positions the scalings act on.
fn base_cfg(tok: &Tokenizer) -> LlamaConfig {
    let mut cfg = tiny_config(tok.vocab_size());
    cfg.num_attention_heads = 2;
    cfg.num_key_value_heads = 1;
    cfg.max_position_embeddings = 512;
    cfg
}

fn scalings() -> Vec<(&'static str, f64, Option<RopeScaling>)> {
    vec![
        ("default-500k", 500000.0, None),
        ("linear", 10000.0, Some(RopeScaling::Linear { factor: 4.0 })),
        (
            "dynamic",
            10000.0,
            Some(RopeScaling::Dynamic { factor: 2.0 }),
        ),
        (
            "llama3",
            500000.0,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64,
            }),
        ),
        (
            "yarn",
            10000.0,
            Some(RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 128,
                attention_factor: None,
                beta_fast: None,
                beta_slow: None,
                mscale: None,
                mscale_all_dim: None,
                truncate: None,
            }),
        ),
    ]
}

fn logits(m: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let (h, _) = m.prefill(&[ids], false).unwrap();
    let sel: Vec<(usize, usize)> = (0..ids.len()).map(|t| (0, t)).collect();
    m.logits_at(&h, &sel).unwrap().to_vec2().unwrap()
}

fn student_logits(s: &Student, ids: &[u32]) -> Vec<Vec<f32>> {
    let (t, lengths) = s.batch(&[ids]).unwrap();
    let h = s.forward(&t, &lengths).unwrap();
    let h = h.squeeze(0).unwrap();
    s.logits(&h)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    kd_model::testing::max_logprob_diff(a, b)
}

/// Every scaling type, written to `config.json` and read back, gives the same log-probs on
/// the CPU kernels, candle's path and the trainable student (within 1e-4 nats), and log-probs
/// that differ from plain RoPE's: the setting is not ignored anywhere.
#[test]
fn every_scaling_agrees_across_engines_and_is_not_ignored() {
    let tok = Tokenizer::tiny_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..160u32).map(|i| 3 + (i * 7) % 250).collect();
    let plain_cfg = base_cfg(&tok);
    let w = random_weights(&plain_cfg, 5).unwrap();
    let plain_dir = dir.path().join("plain");
    write_hf_dir(&plain_dir, &plain_cfg, &w, &tok).unwrap();
    let plain = logits(
        &load_with(&plain_dir, Precision::Exact, &Device::Cpu, Kernels::Candle)
            .unwrap()
            .model,
        &ids,
    );
    for (name, theta, scaling) in scalings() {
        let mut cfg = plain_cfg.clone();
        cfg.rope_theta = theta;
        cfg.rope_scaling = scaling.clone();
        let p = dir.path().join(name);
        write_hf_dir(&p, &cfg, &w, &tok).unwrap();
        let candle = load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Candle).unwrap();
        assert_eq!(candle.model.config(), &cfg, "{name}: config read back");
        let want = logits(&candle.model, &ids);
        let ours = load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
        let d_cpu = max_diff(&logits(&ours.model, &ids), &want);
        let student = Student::from_hf_dir(&p, DType::F32, &Device::Cpu).unwrap();
        let d_student = max_diff(&student_logits(&student, &ids), &want);
        let d_plain = max_diff(&plain, &want);
        eprintln!(
            "{name}: cpu-kernels {d_cpu:.1e}, student {d_student:.1e}, vs plain RoPE {d_plain:.2}"
        );
        assert!(d_cpu < 1e-4, "{name}: cpu kernels off by {d_cpu}");
        assert!(d_student < 1e-4, "{name}: student off by {d_student}");
        if name == "dynamic" {
            // Dynamic NTK is plain RoPE within max_position_embeddings.
            assert!(d_plain < 1e-4, "{name}: {d_plain}");
        } else {
            assert!(
                d_plain > 1e-2,
                "{name}: the scaling changed nothing ({d_plain})"
            );
        }
    }
}

/// The row: a `transformers` 5.x `config.json` with `rope_parameters` and no top-level
/// `rope_theta` gives the same model as the 4.x form, not one at the default base.
#[test]
fn rope_parameters_is_read_like_top_level_rope_theta() {
    let tok = Tokenizer::tiny_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_cfg(&tok);
    cfg.rope_theta = 500000.0;
    let w = random_weights(&cfg, 9).unwrap();
    let p = dir.path().join("m");
    write_hf_dir(&p, &cfg, &w, &tok).unwrap();
    let path = p.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ids: Vec<u32> = (10..200).collect();
    let before = logits(
        &load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Auto)
            .unwrap()
            .model,
        &ids,
    );
    // 5.x form only.
    let m = v.as_object_mut().unwrap();
    m.remove("rope_theta");
    m.remove("rope_scaling");
    m.insert(
        "rope_parameters".into(),
        json!({"rope_theta": 500000.0, "rope_type": "default"}),
    );
    std::fs::write(&path, v.to_string()).unwrap();
    let loaded = load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
    assert_eq!(loaded.model.config().rope_theta, 500000.0);
    assert_eq!(max_diff(&logits(&loaded.model, &ids), &before), 0.0);
    // What ignoring it would give: a different model.
    v.as_object_mut().unwrap().remove("rope_parameters");
    std::fs::write(&path, v.to_string()).unwrap();
    let wrong = load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
    assert_eq!(wrong.model.config().rope_theta, 10000.0);
    assert!(max_diff(&logits(&wrong.model, &ids), &before) > 1e-2);
}

/// llama.cpp stores Llama 3.x's scaling as per-frequency divisors in `rope_freqs.weight`;
/// a GGUF with them gives the log-probs of the Hugging Face directory with the `llama3`
/// scaling they were computed from (and the student built from either agrees).
#[test]
fn gguf_rope_freqs_equal_the_llama3_config() {
    let tok = Tokenizer::tiny_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_cfg(&tok);
    cfg.rope_theta = 500000.0;
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    cfg.rope_scaling = Some(llama3.clone());
    let w = random_weights(&cfg, 13).unwrap();
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &cfg, &w, &tok).unwrap();
    // The divisors as llama.cpp's converter computes them (`generate_extra_tensors`).
    let (plain, _) = kd_model::rope::frequencies(cfg.rope_theta, cfg.head_dim(), None);
    let (scaled, _) = cfg.rope_frequencies();
    let factors: Vec<f32> = plain
        .iter()
        .zip(&scaled)
        .map(|(p, s)| (p / s) as f32)
        .collect();
    assert!(
        factors.iter().any(|&f| f > 1.5),
        "the scaling must act on this head size"
    );
    let mut gcfg = cfg.clone();
    gcfg.rope_scaling = Some(RopeScaling::Freqs { factors });
    let gguf = dir.path().join("m.gguf");
    let back = write_gguf_with(&gguf, &tok, &w, GgmlDType::F32, &gcfg, &[]);
    let _ = back;
    let ids: Vec<u32> = (0..160u32).map(|i| 3 + (i * 11) % 250).collect();
    let want = logits(
        &load_with(&hf, Precision::Exact, &Device::Cpu, Kernels::Candle)
            .unwrap()
            .model,
        &ids,
    );
    for k in [Kernels::Auto, Kernels::Candle] {
        let m = load_with(&gguf, Precision::Exact, &Device::Cpu, k).unwrap();
        assert!(matches!(
            m.model.config().rope_scaling,
            Some(RopeScaling::Freqs { .. })
        ));
        let d = max_diff(&logits(&m.model, &ids), &want);
        eprintln!("{k:?}: GGUF rope_freqs vs llama3 config: {d:.1e}");
        assert!(d < 1e-4, "{k:?}: {d}");
    }
    let s = Student::from_teacher(&gguf, &[0, 1], DType::F32, &Device::Cpu).unwrap();
    let d = max_diff(&student_logits(&s, &ids), &want);
    assert!(d < 1e-4, "student from GGUF: {d}");
    // Such a student has no config.json form: its export is refused by name.
    let e = s.cfg.to_hf_json().unwrap_err();
    assert!(e.contains("rope_freqs.weight"), "{e}");
}

/// A GGUF with linear scaling gives the log-probs of the same `config.json` scaling.
#[test]
fn gguf_linear_scaling_equals_the_config() {
    let tok = Tokenizer::tiny_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base_cfg(&tok);
    cfg.rope_scaling = Some(RopeScaling::Linear { factor: 4.0 });
    let w = random_weights(&cfg, 17).unwrap();
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &cfg, &w, &tok).unwrap();
    let gguf = dir.path().join("m.gguf");
    write_gguf_with(&gguf, &tok, &w, GgmlDType::F32, &cfg, &[]);
    let ids: Vec<u32> = (0..200u32).map(|i| 3 + (i * 13) % 250).collect();
    let want = logits(
        &load_with(&hf, Precision::Exact, &Device::Cpu, Kernels::Candle)
            .unwrap()
            .model,
        &ids,
    );
    let m = load_with(&gguf, Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
    assert_eq!(
        m.model.config().rope_scaling,
        Some(RopeScaling::Linear { factor: 4.0 })
    );
    let d = max_diff(&logits(&m.model, &ids), &want);
    assert!(d < 1e-4, "{d}");
}

/// The student's export writes RoPE so that our loader reads back the same function, from
/// both forms together or either alone. (`scripts/rope_reference.py --check-export` loads the
/// configs this test leaves under `target/tmp/rope-export/` with `transformers`.)
#[test]
fn export_config_reads_back_identically() {
    let tok = Tokenizer::tiny_for_tests();
    for (name, theta, scaling) in scalings() {
        let mut cfg = base_cfg(&tok);
        cfg.rope_theta = theta;
        cfg.rope_scaling = scaling;
        let v = cfg.to_hf_json().unwrap();
        assert_eq!(v["rope_theta"], json!(theta), "{name}");
        assert_eq!(v["rope_parameters"]["rope_theta"], json!(theta), "{name}");
        let back = parse_hf_config(&v, Path::new("config.json")).unwrap();
        assert_eq!(back, cfg, "{name}");
        // For `scripts/rope_reference.py --check-export`, which loads each with transformers.
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("rope-export")
            .join(name);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("config.json"), v.to_string()).unwrap();
        let (inv, attn) = cfg.rope_frequencies();
        let expected = json!({"inv_freq": inv, "attention_factor": attn});
        std::fs::write(out.join("expected.json"), expected.to_string()).unwrap();
        // Each form alone reads the same.
        let mut only4 = v.clone();
        only4.as_object_mut().unwrap().remove("rope_parameters");
        assert_eq!(
            parse_hf_config(&only4, Path::new("c")).unwrap(),
            cfg,
            "{name} 4.x"
        );
        let mut only5 = v.clone();
        only5.as_object_mut().unwrap().remove("rope_theta");
        only5.as_object_mut().unwrap().remove("rope_scaling");
        assert_eq!(
            parse_hf_config(&only5, Path::new("c")).unwrap(),
            cfg,
            "{name} 5.x"
        );
    }
}

fn hf_error(edit: impl Fn(&mut serde_json::Map<String, Value>)) -> String {
    let tok = Tokenizer::tiny_for_tests();
    let cfg = base_cfg(&tok);
    let mut v = cfg.to_hf_json().unwrap();
    edit(v.as_object_mut().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(&cfg, 1).unwrap();
    write_hf_dir(dir.path(), &cfg, &w, &tok).unwrap();
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let e = match load_with(dir.path(), Precision::Exact, &Device::Cpu, Kernels::Auto) {
        Ok(_) => panic!("accepted {v}"),
        Err(e) => e.to_string(),
    };
    let s = match Student::from_hf_dir(dir.path(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("student accepted {v}"),
        Err(e) => e.to_string(),
    };
    assert_eq!(e, s, "teacher and student refuse alike");
    let file = dir.path().join("config.json").display().to_string();
    assert!(e.contains(&file), "error does not name the file: {e}");
    assert_eq!(
        e.matches(&file).count(),
        1,
        "file named more than once: {e}"
    );
    e
}

/// Settings that change the function and are not implemented are refused naming the file
/// and the key, never defaulted.
#[test]
fn unimplemented_settings_are_refused_by_name() {
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Map<String, Value>)>)> = vec![
        (
            "rope_parameters.rope_type",
            Box::new(|m| {
                m.remove("rope_scaling");
                m.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "longrope", "rope_theta": 1e4,
                "short_factor": [1.0], "long_factor": [1.0]}),
                );
            }),
        ),
        (
            "rope_scaling.rope_type",
            Box::new(|m| {
                m.insert("rope_scaling".into(), json!({"type": "su", "factor": 2.0}));
            }),
        ),
        (
            "rope_parameters",
            Box::new(|m| {
                m.remove("rope_scaling");
                m.insert(
                    "rope_parameters".into(),
                    json!({
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                );
            }),
        ),
        (
            "rope_parameters.low_freq_factor",
            Box::new(|m| {
                m.remove("rope_scaling");
                m.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "linear", "factor": 2.0,
                "rope_theta": 1e4, "low_freq_factor": 1.0}),
                );
            }),
        ),
        (
            "rope_scaling.factor",
            Box::new(|m| {
                m.insert("rope_scaling".into(), json!({"rope_type": "linear"}));
            }),
        ),
        (
            "rope_parameters.partial_rotary_factor",
            Box::new(|m| {
                m.remove("rope_scaling");
                m.insert(
                    "rope_parameters".into(),
                    json!({"rope_type": "default", "rope_theta": 1e4,
                "partial_rotary_factor": 0.5}),
                );
            }),
        ),
        (
            "partial_rotary_factor",
            Box::new(|m| {
                m.insert("partial_rotary_factor".into(), json!(0.25));
            }),
        ),
        (
            "rope_theta",
            Box::new(|m| {
                m.remove("rope_parameters");
                m.insert("rope_theta".into(), json!("big"));
            }),
        ),
        (
            "attention_bias",
            Box::new(|m| {
                m.insert("attention_bias".into(), json!(true));
            }),
        ),
        (
            "mlp_bias",
            Box::new(|m| {
                m.insert("mlp_bias".into(), json!(true));
            }),
        ),
        (
            "hidden_act",
            Box::new(|m| {
                m.insert("hidden_act".into(), json!("gelu"));
            }),
        ),
        (
            "quantization_config",
            Box::new(|m| {
                m.insert(
                    "quantization_config".into(),
                    json!({"quant_method": "gptq"}),
                );
            }),
        ),
    ];
    for (key, edit) in cases {
        let e = hf_error(edit);
        eprintln!("{key}: {e}");
        assert!(
            e.contains(&format!("`{key}`")),
            "error does not name `{key}`: {e}"
        );
    }
}

/// An unknown architecture is refused naming the file and the architecture.
#[test]
fn unknown_architecture_is_refused() {
    let e = hf_error(|m| {
        m.insert("model_type".into(), json!("gemma2"));
    });
    assert!(e.contains("gemma2"), "{e}");
}

fn gguf_error(extra: &[(&str, gguf_file::Value)], cfg_edit: impl Fn(&mut LlamaConfig)) -> String {
    let tok = Tokenizer::tiny_for_tests();
    let mut cfg = base_cfg(&tok);
    let w = random_weights(&cfg, 1).unwrap();
    cfg_edit(&mut cfg);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_with(&p, &tok, &w, GgmlDType::F32, &cfg, extra);
    let e = match load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Auto) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let s = match Student::from_teacher(&p, &[0], DType::F32, &Device::Cpu) {
        Ok(_) => panic!("student accepted"),
        Err(e) => e.to_string(),
    };
    assert_eq!(e, s);
    assert!(e.contains(&p.display().to_string()), "{e}");
    e
}

#[test]
fn unimplemented_gguf_rope_is_refused_by_name() {
    use gguf_file::Value as V;
    let e = gguf_error(
        &[("llama.rope.scaling.type", V::String("yarn".into()))],
        |_| {},
    );
    assert!(
        e.contains("`llama.rope.scaling.type`") && e.contains("yarn"),
        "{e}"
    );
    let e = gguf_error(&[("llama.rope.scaling.attn_factor", V::F32(1.1))], |_| {});
    assert!(e.contains("`llama.rope.scaling.attn_factor`"), "{e}");
    let e = gguf_error(&[], |c| {
        c.rope_scaling = Some(RopeScaling::Freqs {
            factors: vec![1.0; 3],
        })
    });
    assert!(e.contains("`rope_freqs.weight`"), "{e}");
    let e = gguf_error(
        &[("llama.rope.scaling.type", V::String("linear".into()))],
        |_| {},
    );
    assert!(e.contains("`llama.rope.scaling.factor`"), "{e}");
}

/// `rope.dimension_count` other than the head size (partial rotary) is refused; the tiny
/// writer's own (equal) value is accepted by every other test here.
#[test]
fn gguf_partial_rotary_is_refused() {
    let tok = Tokenizer::tiny_for_tests();
    let cfg = base_cfg(&tok);
    let w = random_weights(&cfg, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    write_gguf_with(
        &p,
        &tok,
        &w,
        GgmlDType::F32,
        &cfg,
        &[("llama.rope.dimension_count", gguf_file::Value::U32(8))],
    );
    let r = load_with(&p, Precision::Exact, &Device::Cpu, Kernels::Auto);
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("`llama.rope.dimension_count`"), "{e}");
}
