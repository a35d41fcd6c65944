//! GGUF loading: a tiny model written as GGUF (q/k permuted as llama.cpp's converter does, all
//! the quantizations candle writes) gives the logits of the same model loaded from a Hugging
//! Face directory, and its tokenizer metadata gives the same ids.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use kd_model::testing::{random_weights, tiny_config, write_gguf, write_hf_dir};
use kd_model::{Precision, load, log_softmax_f64};
use kd_tokenizer::Tokenizer;

fn logprobs(m: &kd_model::Llama, ids: &[u32]) -> Vec<Vec<f64>> {
    let (h, _) = m.prefill(&[ids], false).unwrap();
    let sel: Vec<(usize, usize)> = (0..ids.len()).map(|t| (0, t)).collect();
    let l: Vec<Vec<f32>> = m.logits_at(&h, &sel).unwrap().to_vec2().unwrap();
    l.iter().map(|r| log_softmax_f64(r)).collect()
}

#[test]
fn gguf_in_every_supported_type_matches_the_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let cfg = tiny_config(tok.vocab_size());
    let w = random_weights(&cfg, 7).unwrap();
    write_hf_dir(&dir.path().join("hf"), &cfg, &w, &tok).unwrap();
    let hf = load(&dir.path().join("hf"), Precision::Exact, &Device::Cpu).unwrap();
    let text = "<|im_start|>user\nhello there, 42 tokens<|im_end|>\n";
    let ids = hf.tokenizer.encode(text, true);
    // Every type, loaded exactly, must equal an f32 model holding the same dequantized
    // weights in Hugging Face layout (half-split RoPE instead of GGUF's interleaved q/k rows):
    // this checks the loader, the q/k permutation and the CPU kernels on every block type.
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        let real = write_gguf(&path, &tok, &w, dtype);
        let ref_dir = dir.path().join(format!("hf-{dtype:?}"));
        write_hf_dir(&ref_dir, &cfg, &real, &tok).unwrap();
        let r = load(&ref_dir, Precision::Exact, &Device::Cpu).unwrap();
        let g = load(&path, Precision::Exact, &Device::Cpu).unwrap();
        assert_eq!(
            g.tokenizer.encode(text, true),
            ids,
            "{dtype:?}: tokenizer from GGUF metadata"
        );
        assert_eq!(g.tokenizer.fingerprint(), hf.tokenizer.fingerprint());
        let want = logprobs(&r.model, &ids);
        let got = logprobs(&g.model, &ids);
        let max = max_diff(&got, &want);
        eprintln!("{dtype:?}: full pass, max |Δ log-prob| {max:.2e} nats");
        assert!(max < 1e-4, "{dtype:?}: {max}");
        // Decoding one token per step against the full pass.
        let (_, cache) = g.model.prefill(&[&ids[..ids.len() - 4]], true).unwrap();
        let mut cache = cache.unwrap();
        for t in ids.len() - 4..ids.len() {
            let h = g.model.step(&mut cache, &[ids[t]]).unwrap();
            let l: Vec<Vec<f32>> = g.model.logits(&h).unwrap().to_vec2().unwrap();
            let max = max_diff(&[log_softmax_f64(&l[0])], &want[t..t + 1]);
            assert!(max < 1e-4, "{dtype:?} decode at {t}: {max}");
        }
        if dtype == GgmlDType::F32 {
            assert!(max_diff(&got, &logprobs(&hf.model, &ids)) < 1e-4);
        }
        let q = load(&path, Precision::Quantized, &Device::Cpu).unwrap();
        let approx = max_diff(&logprobs(&q.model, &ids), &want);
        eprintln!("{dtype:?}: --approx-quantized max |Δ log-prob| {approx:.2e} nats");
        assert!(approx.is_finite());
    }
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let mut max = 0f64;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
        }
    }
    max
}

#[test]
fn decode_steps_equal_the_full_sequence_pass() {
    let dir = tempfile::tempdir().unwrap();
    kd_model::testing::write_tiny_teacher(dir.path(), 3).unwrap();
    let m = load(dir.path(), Precision::Exact, &Device::Cpu).unwrap();
    let a: Vec<u32> = (10..30).collect();
    let b: Vec<u32> = (40..52).collect();
    // Prefill both prompts minus their last 4 tokens, then feed those tokens one by one.
    let (_, cache) = m.model.prefill(&[&a[..16], &b[..8]], true).unwrap();
    let mut cache = cache.unwrap();
    let full_a = logprobs(&m.model, &a);
    let full_b = logprobs(&m.model, &b);
    for s in 0..4 {
        let h = m.model.step(&mut cache, &[a[16 + s], b[8 + s]]).unwrap();
        let l: Vec<Vec<f32>> = m.model.logits(&h).unwrap().to_vec2().unwrap();
        for (row, full, t) in [(0, &full_a, 16 + s), (1, &full_b, 8 + s)] {
            let lp = log_softmax_f64(&l[row]);
            let max = lp
                .iter()
                .zip(&full[t])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(max < 1e-4, "row {row} step {s}: {max}");
        }
    }
}
