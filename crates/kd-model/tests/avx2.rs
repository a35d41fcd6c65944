//! The AVX2 kernels against the AVX-512 ones on a CPU that has both: weight products and the
//! exponential bit-identical, the rest within float rounding, and the model's per-sequence
//! guarantees (bit-identical alone, batched or decoded) kept. One test, because the choice
//! of kernels is process-wide.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kd_model::kernels::{
    Level, PanelMatrix, allow_amx, exp_in_place, level, log_sum_exp, max_value, prefer_avx2,
    silu_mul, top_k_logits,
};
use kd_model::testing::{Rng, random_weights, tiny_config, write_gguf};
use kd_model::{Kernels, Llama, Precision, load_with};
use kd_tokenizer::Tokenizer;

fn both(mut f: impl FnMut() -> Vec<f32>) -> (Vec<f32>, Vec<f32>) {
    // AMX products (BF16 panels) agree with the vector kernels within rounding only.
    allow_amx(false);
    prefer_avx2(false);
    assert_eq!(level(), Some(Level::Avx512));
    let wide = f();
    prefer_avx2(true);
    assert_eq!(level(), Some(Level::Avx2));
    let narrow = f();
    prefer_avx2(false);
    (wide, narrow)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn logits(m: &Llama, rows: &[&[u32]]) -> Vec<f32> {
    let (h, _) = m.prefill(rows, false).unwrap();
    let sel: Vec<(usize, usize)> = rows
        .iter()
        .enumerate()
        .flat_map(|(r, ids)| (0..ids.len()).map(move |t| (r, t)))
        .collect();
    m.logits_at_vec(&h, &sel).unwrap()
}

#[test]
fn avx2_kernels_match_the_avx512_ones() {
    #[cfg(target_arch = "x86_64")]
    let both_present = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let both_present = false;
    if !both_present {
        eprintln!("skipped: needs a CPU with both AVX-512F and AVX2+FMA");
        return;
    }
    let mut rng = Rng::new(17);

    // Weight products: bit-identical for every format, width and batch.
    for (rows, cols, dts) in [
        (
            70,
            96,
            &[
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
                GgmlDType::Q8_0,
                GgmlDType::F32,
            ][..],
        ),
        (33, 100, &[GgmlDType::F32][..]),
        (
            37,
            512,
            &[
                GgmlDType::F16,
                GgmlDType::BF16,
                GgmlDType::Q4K,
                GgmlDType::Q5K,
                GgmlDType::Q6K,
            ][..],
        ),
    ] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
        let wt = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        for &dt in dts {
            let p = if cols % 32 == 0 {
                PanelMatrix::from_qtensor(&QTensor::quantize(&wt, dt).unwrap()).unwrap()
            } else {
                PanelMatrix::from_f32(&w, rows, cols)
            };
            for n in [1, 3, 5, 8, 11, 40] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
                let (a, b) = both(|| p.matmul(&x, n));
                assert_eq!(bits(&a), bits(&b), "{dt:?} {rows}x{cols} n={n}");
            }
        }
    }

    // Element-wise: the exponential and SiLU bit-identical, sums within rounding.
    let v: Vec<f32> = (0..1000).map(|i| (i as f32 - 600.0) * 0.17).collect();
    let (a, b) = both(|| {
        let mut e = v.clone();
        let s = exp_in_place(&mut e, 2.5);
        e.push(s);
        e
    });
    assert_eq!(bits(&a[..1000]), bits(&b[..1000]));
    assert!((a[1000] - b[1000]).abs() <= 1e-6 * a[1000]);
    let (a, b) = both(|| {
        let mut o = vec![0f32; 999];
        silu_mul(&v[..999], &v[1..], &mut o);
        o
    });
    assert_eq!(bits(&a), bits(&b));
    let (a, b) = both(|| vec![log_sum_exp(&v) as f32, max_value(&v)]);
    assert!((a[0] - b[0]).abs() <= 1e-6 && a[1] == b[1]);
    let ties: Vec<f32> = (0..5000).map(|_| (rng.normal() * 3.0).round()).collect();
    let (a, b) = both(|| {
        top_k_logits(&ties, 40)
            .into_iter()
            .map(|(i, _)| i as f32)
            .collect()
    });
    assert_eq!(a, b);

    // The model: within rounding of the AVX-512 run, and under AVX2 a sequence is still
    // bit-identical alone, batched and decoded.
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let w = random_weights(&tiny_config(tok.vocab_size()), 8).unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &tok, &w, GgmlDType::Q4_1);
    let m = load_with(&path, Precision::Exact, &Device::Cpu, Kernels::Auto)
        .unwrap()
        .model;
    let a_ids: Vec<u32> = (5..40).collect();
    let b_ids: Vec<u32> = (60..71).collect();
    let (wide, narrow) = both(|| logits(&m, &[&a_ids, &b_ids]));
    let max = wide
        .iter()
        .zip(&narrow)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "AVX2 vs AVX-512 logits: {max}");
    prefer_avx2(true);
    let alone = logits(&m, &[&b_ids]);
    let v = m.vocab_size();
    assert_eq!(bits(&narrow[a_ids.len() * v..]), bits(&alone));
    let (_, c) = m.prefill(&[&b_ids[..8]], true).unwrap();
    let mut cache = c.unwrap();
    for t in 8..11 {
        let h = m.step(&mut cache, &[b_ids[t]]).unwrap();
        let l = m.logits_vec(&h).unwrap();
        assert_eq!(bits(&l), bits(&alone[t * v..(t + 1) * v]), "decode at {t}");
    }
    prefer_avx2(false);
}
