//! The two implementations of the exact path compute the same function: the CPU
//! kernels (GGUF blocks multiplied in f32, per-sequence caches, no padding) against candle's
//! tensors (dense f32 GEMM on dequantized weights, padded batches with masks). The CPU
//! kernels also give each sequence bit-identical results whatever shares its batch, and
//! decoding token by token gives bit-identical values to a prefill of the whole sequence.

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use kd_model::testing::{
    batch_logits, max_logprob_diff, random_weights, tiny_config, write_gguf, write_gguf_with,
    write_hf_dir,
};
use kd_model::{Kernels, Precision, load_with};
use kd_tokenizer::Tokenizer;

fn rows() -> Vec<Vec<u32>> {
    vec![(5..40).collect(), (60..71).collect(), (100..123).collect()]
}

#[test]
fn cpu_kernels_and_candle_agree_on_every_weight_type() {
    if !kd_model::kernels::supported() {
        eprintln!(
            "skipped: this CPU has neither AVX-512F nor AVX2+FMA, so only candle's path exists"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let cfg = tiny_config(tok.vocab_size());
    let w = random_weights(&cfg, 21).unwrap();
    let hf = dir.path().join("hf");
    write_hf_dir(&hf, &cfg, &w, &tok).unwrap();
    let mut paths = vec![hf];
    // Hugging Face directories in bf16 and f16, as transformers saves most models.
    for dt in [candle_core::DType::BF16, candle_core::DType::F16] {
        let half: std::collections::HashMap<String, candle_core::Tensor> = w
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(dt).unwrap()))
            .collect();
        let p = dir.path().join(format!("hf-{dt:?}"));
        write_hf_dir(&p, &cfg, &half, &tok).unwrap();
        paths.push(p);
    }
    for dtype in [
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let p = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        write_gguf(&p, &tok, &w, dtype);
        paths.push(p);
    }
    // K-quants need rows of whole 256-column super-blocks: a wider model.
    let wide = kd_model::LlamaConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        ..cfg.clone()
    };
    let ww = random_weights(&wide, 22).unwrap();
    for dtype in [
        GgmlDType::F32,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let p = dir.path().join(format!("wide-{dtype:?}.gguf"));
        write_gguf_with(&p, &tok, &ww, dtype, &wide, &[]);
        paths.push(p);
    }
    let rows = rows();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    for path in &paths {
        // Two f32 summation orders differ by rounding that grows as √(width): 1e-4 nats at
        // the tiny models' 32, √8 times that at 256 (where F32 weights differ as much as
        // the K-quants, whose panels hold exactly the dequantized values).
        let width = if path.to_string_lossy().contains("wide-") {
            256.0
        } else {
            32.0
        };
        let tol = 1e-4 * (width / 32.0f64).sqrt();
        let ours = load_with(path, Precision::Exact, &Device::Cpu, Kernels::Auto).unwrap();
        let theirs = load_with(path, Precision::Exact, &Device::Cpu, Kernels::Candle).unwrap();
        assert_eq!(ours.model.backend_name(), "cpu-kernels");
        assert_eq!(theirs.model.backend_name(), "candle");
        let a = batch_logits(&ours.model, &refs);
        let b = batch_logits(&theirs.model, &refs);
        for (r, (x, y)) in a.iter().zip(&b).enumerate() {
            let max = max_logprob_diff(x, y);
            eprintln!("{}: row {r}: max |Δ log-prob| {max:.2e}", path.display());
            assert!(max < tol, "{} row {r}: {max}", path.display());
        }
        // Decoding: three rows start from their prefixes, step together, and one leaves.
        let prefixes: Vec<&[u32]> = rows.iter().map(|r| &r[..r.len() - 4]).collect();
        let mut caches: Vec<_> = [&ours.model, &theirs.model]
            .iter()
            .map(|m| m.prefill(&prefixes, true).unwrap().1.unwrap())
            .collect();
        for s in 0..4 {
            let mut got = Vec::new();
            for (m, c) in [&ours.model, &theirs.model].iter().zip(caches.iter_mut()) {
                let live = if s < 2 { 3 } else { 2 };
                if s == 2 {
                    c.retain_rows(&[0, 2]).unwrap();
                }
                let idx: &[usize] = if live == 3 { &[0, 1, 2] } else { &[0, 2] };
                let toks: Vec<u32> = idx
                    .iter()
                    .map(|&r| rows[r][rows[r].len() - 4 + s])
                    .collect();
                let h = m.step(c, &toks).unwrap();
                got.push(m.logits(&h).unwrap().to_vec2::<f32>().unwrap());
            }
            let max = max_logprob_diff(&got[0], &got[1]);
            assert!(max < tol, "{} step {s}: {max}", path.display());
        }
    }
}

#[test]
fn a_sequence_gets_bit_identical_values_alone_in_a_batch_or_decoded() {
    if !kd_model::kernels::supported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let w = random_weights(&tiny_config(tok.vocab_size()), 4).unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tok, &w, GgmlDType::Q4_1);
    let m = load_with(&path, Precision::Exact, &Device::Cpu, Kernels::Auto)
        .unwrap()
        .model;
    let rows = rows();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let together = batch_logits(&m, &refs);
    for (r, ids) in refs.iter().enumerate() {
        assert_eq!(batch_logits(&m, &[ids])[0], together[r], "row {r} alone");
    }
    // Row 1 decodes its last 6 tokens; row 0 joins half-way (continuous batching) and its
    // first step's logits are those of its prefill.
    let (_, c) = m.prefill(&[&rows[1][..5]], true).unwrap();
    let mut cache = c.unwrap();
    for t in 5..8 {
        let h = m.step(&mut cache, &[rows[1][t]]).unwrap();
        assert_eq!(
            m.logits(&h).unwrap().to_vec2::<f32>().unwrap()[0],
            together[1][t]
        );
    }
    let (_, joined) = m.prefill(&[&rows[0][..20]], true).unwrap();
    cache.append(joined.unwrap()).unwrap();
    for s in 0..3 {
        let h = m
            .step(&mut cache, &[rows[1][8 + s], rows[0][20 + s]])
            .unwrap();
        let l = m.logits(&h).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(l[0], together[1][8 + s], "row 1 step {s}");
        assert_eq!(l[1], together[0][20 + s], "row 0 step {s}");
    }
}

/// BF16 weights read in place from their files (`weights_in_place`, where AMX runs) give the
/// logits of the same weights packed into panels, bit for bit, in a prefill and in decoding steps; a safetensors
/// directory and a GGUF file alike.
#[test]
fn bf16_weights_read_in_place_give_the_packed_logits() {
    if !kd_model::kernels::supported() {
        eprintln!("skipped: this CPU has neither AVX-512F nor AVX2+FMA");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let cfg = tiny_config(tok.vocab_size());
    let w = random_weights(&cfg, 23).unwrap();
    let half: std::collections::HashMap<String, candle_core::Tensor> = w
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(candle_core::DType::BF16).unwrap()))
        .collect();
    let hf = dir.path().join("hf-bf16");
    write_hf_dir(&hf, &cfg, &half, &tok).unwrap();
    let gguf = dir.path().join("tiny-bf16.gguf");
    write_gguf(&gguf, &tok, &w, GgmlDType::BF16);
    let rows = rows();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let bits = |v: &[Vec<Vec<f32>>]| -> Vec<u32> {
        v.iter().flatten().flatten().map(|x| x.to_bits()).collect()
    };
    for path in [&hf, &gguf] {
        let load = |in_place: bool| {
            let opts = kd_model::LoadOptions {
                weights_in_place: in_place,
                ..Default::default()
            };
            kd_model::load_opts(path, &opts, &Device::Cpu)
                .unwrap()
                .model
        };
        let (in_place, packed) = (load(true), load(false));
        assert_eq!(packed.weight_bytes_in_place(), 0);
        let amx = kd_model::kernels::amx();
        assert_eq!(
            in_place.weight_bytes_in_place() > 0,
            amx,
            "{}",
            path.display()
        );
        if !amx {
            eprintln!("note: no AMX tiles here, so nothing is read in place");
        }
        assert_eq!(
            bits(&batch_logits(&in_place, &refs)),
            bits(&batch_logits(&packed, &refs)),
            "{}",
            path.display()
        );
        let prefixes: Vec<&[u32]> = rows.iter().map(|r| &r[..r.len() - 3]).collect();
        let mut caches: Vec<_> = [&in_place, &packed]
            .iter()
            .map(|m| m.prefill(&prefixes, true).unwrap().1.unwrap())
            .collect();
        for s in 0..3 {
            let toks: Vec<u32> = rows.iter().map(|r| r[r.len() - 3 + s]).collect();
            let got: Vec<Vec<u32>> = [&in_place, &packed]
                .iter()
                .zip(caches.iter_mut())
                .map(|(m, c)| {
                    let h = m.step(c, &toks).unwrap();
                    let l = m.logits(&h).unwrap().to_vec2::<f32>().unwrap();
                    l.iter().flatten().map(|x| x.to_bits()).collect()
                })
                .collect();
            assert_eq!(got[0], got[1], "{} step {s}", path.display());
        }
    }
}
