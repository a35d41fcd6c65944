//! The decoder families beyond llama: Mistral (explicit head size, sliding window), Qwen2
//! (q/k/v biases) and Qwen3 (per-head q/k RMSNorm, explicit head size), tied and untied, from
//! Hugging Face directories and GGUF files. The CPU kernels and candle's path compute the same
//! function on each (within 1e-4 nats), a GGUF file the same as its directory, and each
//! family's own tensors change the result (they are not ignored).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use kd_model::testing::{
    Weights, batch_logits, max_logprob_diff, random_weights, tiny_config, write_gguf_with,
    write_hf_dir,
};
use kd_model::{Arch, Kernels, Llama, LlamaConfig, Precision, Student, load_with};
use kd_tokenizer::Tokenizer;

fn logits(m: &Llama, rows: &[&[u32]]) -> Vec<Vec<Vec<f32>>> {
    batch_logits(m, rows)
}

fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| max_logprob_diff(x, y))
        .fold(0.0, f64::max)
}

fn families(tok: &Tokenizer) -> Vec<(&'static str, LlamaConfig)> {
    let base = tiny_config(tok.vocab_size());
    let with = |f: &dyn Fn(&mut LlamaConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    vec![
        (
            "llama-head-dim",
            with(&|c| {
                c.head_dim = Some(16);
                c.tie_word_embeddings = false;
            }),
        ),
        (
            "mistral",
            with(&|c| {
                c.arch = Arch::Mistral;
                c.head_dim = Some(24);
                c.sliding_window = Some(64);
            }),
        ),
        ("qwen2", with(&|c| c.arch = Arch::Qwen2)),
        (
            "qwen2-untied",
            with(&|c| {
                c.arch = Arch::Qwen2;
                c.tie_word_embeddings = false;
                c.rope_theta = 1_000_000.0;
            }),
        ),
        (
            "qwen3",
            with(&|c| {
                c.arch = Arch::Qwen3;
                c.head_dim = Some(16);
            }),
        ),
        (
            "qwen3-untied",
            with(&|c| {
                c.arch = Arch::Qwen3;
                c.head_dim = Some(16);
                c.tie_word_embeddings = false;
            }),
        ),
    ]
}

fn rows() -> Vec<Vec<u32>> {
    vec![(5..60).collect(), (60..71).collect(), (100..123).collect()]
}

/// Each family: the CPU kernels against candle's path on the Hugging Face directory; a GGUF
/// (F32) against the directory; a Q8_0 GGUF on both paths; the config read back.
#[test]
fn every_family_agrees_across_engines_and_formats() {
    let tok = Tokenizer::tiny_for_tests();
    let rows = rows();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    for (name, cfg) in families(&tok) {
        let dir = tempfile::tempdir().unwrap();
        let w = random_weights(&cfg, 3).unwrap();
        let hf = dir.path().join("hf");
        write_hf_dir(&hf, &cfg, &w, &tok).unwrap();
        let candle = load_with(&hf, Precision::Exact, &Device::Cpu, Kernels::Candle).unwrap();
        assert_eq!(candle.model.config(), &cfg, "{name}: config read back");
        assert_eq!(candle.identity.architecture, cfg.arch.name());
        let want = logits(&candle.model, &refs);
        let mut report = vec![];
        if kd_model::kernels::supported() {
            let ours = load_with(&hf, Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
            assert_eq!(ours.model.backend_name(), "cpu-kernels");
            let d = max_diff(&logits(&ours.model, &refs), &want);
            report.push(format!("cpu-kernels {d:.1e}"));
            assert!(d < 1e-4, "{name}: cpu kernels off by {d}");
        }
        let gguf = dir.path().join("f32.gguf");
        write_gguf_with(&gguf, &tok, &w, GgmlDType::F32, &cfg, &[]);
        for k in [Kernels::Auto, Kernels::Candle] {
            let m = load_with(&gguf, Precision::Exact, &Device::Cpu, k).unwrap();
            let d = max_diff(&logits(&m.model, &refs), &want);
            report.push(format!("gguf {k:?} {d:.1e}"));
            assert!(d < 1e-4, "{name}: F32 GGUF ({k:?}) off by {d}");
        }
        let q8 = dir.path().join("q8.gguf");
        write_gguf_with(&q8, &tok, &w, GgmlDType::Q8_0, &cfg, &[]);
        let a = logits(
            &load_with(&q8, Precision::Exact, &Device::Cpu, Kernels::Auto)
                .unwrap()
                .model,
            &refs,
        );
        let b = logits(
            &load_with(&q8, Precision::Exact, &Device::Cpu, Kernels::Candle)
                .unwrap()
                .model,
            &refs,
        );
        let d = max_diff(&a, &b);
        report.push(format!("q8 engines {d:.1e}"));
        assert!(d < 1e-4, "{name}: Q8_0 engines differ by {d}");
        eprintln!("{name}: {}", report.join(", "));
    }
}

/// Changing a family's own tensors (Qwen2's biases, Qwen3's q/k norms) changes the log-probs
/// on both paths: they are applied, not dropped.
#[test]
fn family_tensors_are_used() {
    let tok = Tokenizer::tiny_for_tests();
    let rows = rows();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    for (name, cfg) in families(&tok) {
        let suffix = match cfg.arch {
            Arch::Qwen2 => ".bias",
            Arch::Qwen3 => "_norm.weight",
            _ => continue,
        };
        let dir = tempfile::tempdir().unwrap();
        let w = random_weights(&cfg, 4).unwrap();
        let mut w2: Weights = w.clone();
        let mut changed = 0;
        for (k, t) in w2.iter_mut() {
            if k.ends_with(suffix) {
                *t = (t.clone() * 1.5).unwrap();
                changed += 1;
            }
        }
        assert_eq!(
            changed,
            cfg.num_hidden_layers * if suffix == ".bias" { 3 } else { 2 }
        );
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_hf_dir(&a, &cfg, &w, &tok).unwrap();
        write_hf_dir(&b, &cfg, &w2, &tok).unwrap();
        for k in [Kernels::Auto, Kernels::Candle] {
            let la = logits(
                &load_with(&a, Precision::Exact, &Device::Cpu, k)
                    .unwrap()
                    .model,
                &refs,
            );
            let lb = logits(
                &load_with(&b, Precision::Exact, &Device::Cpu, k)
                    .unwrap()
                    .model,
                &refs,
            );
            let d = max_diff(&la, &lb);
            assert!(
                d > 1e-2,
                "{name} {k:?}: scaling the {suffix} tensors changed only {d}"
            );
        }
    }
}

/// A sequence longer than a sliding window is refused (within it the window changes
/// nothing); one that fits is accepted.
#[test]
fn sliding_window_bounds_the_sequence() {
    let tok = Tokenizer::tiny_for_tests();
    let (_, cfg) = families(&tok)
        .into_iter()
        .find(|(n, _)| *n == "mistral")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(&cfg, 5).unwrap();
    write_hf_dir(dir.path(), &cfg, &w, &tok).unwrap();
    let m = load_with(dir.path(), Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
    assert_eq!(m.model.max_len(), 64);
    let fits: Vec<u32> = (0..64).collect();
    assert!(m.model.prefill(&[&fits], false).is_ok());
    let long: Vec<u32> = (0..65).collect();
    let e = m.model.prefill(&[&long], false).err().unwrap().to_string();
    assert!(e.contains("65") && e.contains("64"), "{e}");
}

/// The trainable student of every family computes the teacher's function: built from the
/// Hugging Face directory and from the GGUF file (all layers), its log-probs equal the
/// inference model's within 1e-4 nats; its export reads back as the same family.
#[test]
fn student_matches_the_teacher_in_every_family() {
    let tok = Tokenizer::tiny_for_tests();
    let ids: Vec<u32> = (5..60).collect();
    for (name, cfg) in families(&tok) {
        let dir = tempfile::tempdir().unwrap();
        let w = random_weights(&cfg, 6).unwrap();
        let hf = dir.path().join("hf");
        write_hf_dir(&hf, &cfg, &w, &tok).unwrap();
        let teacher = load_with(&hf, Precision::Exact, &Device::Cpu, Kernels::Candle).unwrap();
        let want = &logits(&teacher.model, &[&ids])[0];
        let gguf = dir.path().join("m.gguf");
        write_gguf_with(&gguf, &tok, &w, GgmlDType::F32, &cfg, &[]);
        let all: Vec<usize> = (0..cfg.num_hidden_layers).collect();
        for (how, s) in [
            (
                "hf",
                Student::from_hf_dir(&hf, DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "gguf",
                Student::from_teacher(&gguf, &all, DType::F32, &Device::Cpu).unwrap(),
            ),
        ] {
            let (t, lengths) = s.batch(&[&ids]).unwrap();
            let h = s.forward(&t, &lengths).unwrap().squeeze(0).unwrap();
            let got: Vec<Vec<f32>> = s.logits(&h).unwrap().to_vec2().unwrap();
            let d = max_logprob_diff(&got, want);
            eprintln!("{name} student from {how}: {d:.1e}");
            assert!(d < 1e-4, "{name} student from {how}: {d}");
            assert_eq!(s.n_params(), cfg.n_params(), "{name}: parameter count");
        }
        let v = cfg.to_hf_json().unwrap();
        assert_eq!(v["model_type"], cfg.arch.name());
        assert_eq!(v["architectures"][0], cfg.arch.hf_class());
    }
}

/// A tokenizer the loader does not implement is refused naming the file and the component,
/// each once.
#[test]
fn unknown_tokenizer_component_is_refused_by_name() {
    let tok = Tokenizer::tiny_for_tests();
    let dir = tempfile::tempdir().unwrap();
    kd_model::testing::write_tiny_teacher(dir.path(), 1).unwrap();
    let p = dir.path().join("tokenizer.json");
    let mut tj = tok.to_tokenizer_json();
    tj["normalizer"] = serde_json::json!({"type": "NFKC"});
    std::fs::write(&p, tj.to_string()).unwrap();
    let e = match load_with(dir.path(), Precision::Exact, &Device::Cpu, Kernels::Auto) {
        Ok(_) => panic!("accepted an NFKC normalizer"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("NFKC"), "{e}");
    assert_eq!(e.matches(&p.display().to_string()).count(), 1, "{e}");
}
