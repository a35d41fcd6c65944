//! The trainable student: it computes what the inference model computes (Hugging Face
//! directories and GGUF files, layer subsets), its checkpoints round-trip, and the gradient of
//! every parameter group equals central finite differences in f64.

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var};
use kd_model::testing::{Rng, random_weights, tiny_config, write_gguf, write_hf_dir};
use kd_model::trainable::{Student, log_softmax_last_dim};
use kd_model::{Error, LlamaConfig, Precision, load};
use kd_tokenizer::Tokenizer;

/// Two right-padded rows of different lengths inside the tiny test vocabulary.
fn rows() -> (Vec<u32>, Vec<u32>) {
    ((10..30).collect(), (40..52).collect())
}

/// Max |Δ logit| between the inference model and the student at every real position of a
/// right-padded two-row batch.
fn max_logit_diff(inf: &kd_model::Llama, s: &Student) -> f64 {
    let (a, b) = rows();
    let (h, _) = inf.prefill(&[&a, &b], false).unwrap();
    let sel: Vec<(usize, usize)> = (0..a.len())
        .map(|t| (0, t))
        .chain((0..b.len()).map(|t| (1, t)))
        .collect();
    let want: Vec<Vec<f32>> = inf.logits_at(&h, &sel).unwrap().to_vec2().unwrap();
    let got = student_logits(s, &[&a, &b], &sel);
    let mut max = 0f64;
    for (x, y) in got.iter().zip(&want) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - *q as f64).abs());
        }
    }
    max
}

fn student_logits(s: &Student, rows: &[&[u32]], sel: &[(usize, usize)]) -> Vec<Vec<f64>> {
    let (ids, lengths) = s.batch(rows).unwrap();
    let h = s.forward(&ids, &lengths).unwrap();
    let (_, l, d) = h.dims3().unwrap();
    let idx: Vec<u32> = sel.iter().map(|&(r, t)| (r * l + t) as u32).collect();
    let idx = Tensor::from_vec(idx, sel.len(), s.device()).unwrap();
    let rows = h.reshape(((), d)).unwrap().index_select(&idx, 0).unwrap();
    s.logits(&rows)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn untied_teacher(dir: &std::path::Path, seed: u64) -> LlamaConfig {
    let tok = Tokenizer::tiny_for_tests();
    let mut cfg = tiny_config(tok.vocab_size());
    cfg.tie_word_embeddings = false;
    let w = random_weights(&cfg, seed).unwrap();
    write_hf_dir(dir, &cfg, &w, &tok).unwrap();
    cfg
}

#[test]
fn student_from_hf_dir_equals_the_inference_model() {
    let dir = tempfile::tempdir().unwrap();
    let tied = dir.path().join("tied");
    let untied = dir.path().join("untied");
    kd_model::testing::write_tiny_teacher(&tied, 3).unwrap();
    untied_teacher(&untied, 4);
    for p in [&tied, &untied] {
        let inf = load(p, Precision::Exact, &Device::Cpu).unwrap();
        let s = Student::from_hf_dir(p, DType::F32, &Device::Cpu).unwrap();
        let max = max_logit_diff(&inf.model, &s);
        eprintln!(
            "{}: student vs inference max |Δ logit| {max:.2e}",
            p.display()
        );
        assert!(max < 1e-4, "{}: {max}", p.display());
        // from_teacher with every layer is the same model.
        let t = Student::from_teacher(p, &[0, 1], DType::F32, &Device::Cpu).unwrap();
        assert!(max_logit_diff(&inf.model, &t) < 1e-4);
    }
}

#[test]
fn student_from_gguf_teacher_equals_the_inference_model() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let cfg = tiny_config(tok.vocab_size());
    let w = random_weights(&cfg, 7).unwrap();
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        let real = write_gguf(&path, &tok, &w, dtype);
        let inf = load(&path, Precision::Exact, &Device::Cpu).unwrap();
        let s = Student::from_teacher(&path, &[0, 1], DType::F32, &Device::Cpu).unwrap();
        let max = max_logit_diff(&inf.model, &s);
        eprintln!("{dtype:?}: student from GGUF vs inference max |Δ logit| {max:.2e}");
        assert!(max < 1e-4, "{dtype:?}: {max}");
        // The student's weights are the dequantized weights in Hugging Face layout (q/k rows
        // un-permuted from GGUF's interleaved RoPE order), bit for bit.
        for (name, v) in s.named_vars() {
            let want = &real[&name];
            let d: f32 = (v.as_tensor() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "{dtype:?} {name}");
        }
        // A one-layer student from layer 1 of the GGUF equals one from the same weights as
        // a Hugging Face directory.
        let hf = dir.path().join(format!("hf-{dtype:?}"));
        write_hf_dir(&hf, &cfg, &real, &tok).unwrap();
        let g1 = Student::from_teacher(&path, &[1], DType::F32, &Device::Cpu).unwrap();
        let h1 = Student::from_teacher(&hf, &[1], DType::F32, &Device::Cpu).unwrap();
        let (a, b) = rows();
        let sel = [(0, 0), (0, 19), (1, 5), (1, 11)];
        let x = student_logits(&g1, &[&a, &b], &sel);
        let y = student_logits(&h1, &[&a, &b], &sel);
        assert_eq!(x, y, "{dtype:?}: layer subset from GGUF and from HF");
    }
}

#[test]
fn from_teacher_keeps_the_listed_layers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = untied_teacher(dir.path(), 5);
    let teacher = Student::from_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let tv: HashMap<String, Var> = teacher.named_vars().into_iter().collect();
    let s = Student::from_teacher(dir.path(), &[1, 0, 1], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(s.cfg.num_hidden_layers, 3);
    let mut want_cfg = cfg.clone();
    want_cfg.num_hidden_layers = 3;
    assert_eq!(s.cfg, want_cfg);
    for (name, v) in s.named_vars() {
        let src = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (i, tail) = rest.split_once('.').unwrap();
                let old = [1, 0, 1][i.parse::<usize>().unwrap()];
                format!("model.layers.{old}.{tail}")
            }
            None => name.clone(),
        };
        let a: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = tv[&src]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{name} from {src}");
    }
    assert_eq!(s.n_params(), s.cfg.n_params());
}

#[test]
fn from_teacher_rejects_empty_and_out_of_range_layer_lists() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    kd_model::testing::write_tiny_teacher(&hf, 3).unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let w = random_weights(&tiny_config(tok.vocab_size()), 3).unwrap();
    let gguf = dir.path().join("t.gguf");
    write_gguf(&gguf, &tok, &w, GgmlDType::F32);
    for p in [&hf, &gguf] {
        let r = Student::from_teacher(p, &[], DType::F32, &Device::Cpu);
        assert!(matches!(r, Err(Error::EmptyLayerSelection)));
        let r = Student::from_teacher(p, &[0, 2], DType::F32, &Device::Cpu);
        assert!(matches!(
            r,
            Err(Error::LayerOutOfRange {
                index: 2,
                n_layers: 2
            })
        ));
    }
    let r = Student::from_teacher(
        &dir.path().join("nope.gguf"),
        &[0],
        DType::F32,
        &Device::Cpu,
    );
    assert!(matches!(r, Err(Error::Io { .. })));
}

#[test]
fn random_init_is_seeded_and_named_vars_are_sorted() {
    let cfg = tiny_config(300);
    let a = Student::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let b = Student::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let c = Student::random(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let flat = |s: &Student| -> Vec<f32> {
        s.named_vars()
            .iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(flat(&a), flat(&b));
    assert_ne!(flat(&a), flat(&c));
    let names: Vec<String> = a.named_vars().into_iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names.len(), 3 + 9 * 2 - 1, "tied: no lm_head.weight");
    assert!(!names.contains(&"lm_head.weight".to_string()));
    assert_eq!(a.n_params(), cfg.n_params());
    assert_eq!(a.vocab_size(), 300);
}

#[test]
fn safetensors_round_trip_and_mismatches_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(300);
    let a = Student::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let p = dir.path().join("a.safetensors");
    a.save_safetensors(&p).unwrap();
    let saved = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), a.named_vars().len());
    assert!(
        !saved.contains_key("lm_head.weight"),
        "tied embeddings saved once"
    );
    let mut b = Student::random(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    b.load_safetensors(&p).unwrap();
    let (x, y) = rows();
    let sel = [(0, 3), (1, 11)];
    assert_eq!(
        student_logits(&a, &[&x, &y], &sel),
        student_logits(&b, &[&x, &y], &sel)
    );
    // Into an f64 model: same values, converted.
    let mut c = Student::random(&cfg, 2, DType::F64, &Device::Cpu).unwrap();
    c.load_safetensors(&p).unwrap();
    assert_eq!(c.dtype(), DType::F64);
    // A tied file into an untied model misses the head; an untied file into a tied model has
    // a tensor too many.
    let mut ucfg = cfg.clone();
    ucfg.tie_word_embeddings = false;
    let mut u = Student::random(&ucfg, 3, DType::F32, &Device::Cpu).unwrap();
    let r = u.load_safetensors(&p);
    assert!(matches!(r, Err(Error::MissingTensor { ref name, .. }) if name == "lm_head.weight"));
    let pu = dir.path().join("u.safetensors");
    u.save_safetensors(&pu).unwrap();
    let r = b.load_safetensors(&pu);
    assert!(matches!(r, Err(Error::UnexpectedTensor { ref name, .. }) if name == "lm_head.weight"));
    // A wrong shape is caught before anything is overwritten.
    let mut small = cfg.clone();
    small.intermediate_size = 32;
    let s = Student::random(&small, 4, DType::F32, &Device::Cpu).unwrap();
    let ps = dir.path().join("s.safetensors");
    s.save_safetensors(&ps).unwrap();
    let before = student_logits(&b, &[&x, &y], &sel);
    assert!(matches!(
        b.load_safetensors(&ps),
        Err(Error::TensorShape { .. })
    ));
    assert_eq!(before, student_logits(&b, &[&x, &y], &sel));
}

#[test]
fn forward_rejects_bad_batches_and_ignores_padding() {
    let cfg = tiny_config(300);
    let s = Student::random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 2, 3, 4, 5, 6], (2, 3), &Device::Cpu).unwrap();
    assert!(matches!(
        s.forward(&ids, &[3]),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        s.forward(&ids, &[3, 0]),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        s.forward(&ids, &[3, 4]),
        Err(Error::InvalidBatch { .. })
    ));
    assert!(matches!(
        s.batch(&[&[1, 300]]),
        Err(Error::TokenOutOfRange {
            id: 300,
            vocab: 300
        })
    ));
    // A padded row gives what it gives alone, whatever the padding ids are.
    let (a, b) = rows();
    let sel_b: Vec<(usize, usize)> = (0..b.len()).map(|t| (1, t)).collect();
    let batched = student_logits(&s, &[&a, &b], &sel_b);
    let alone_sel: Vec<(usize, usize)> = (0..b.len()).map(|t| (0, t)).collect();
    let alone = student_logits(&s, &[&b], &alone_sel);
    let (ids, lengths) = s.batch(&[&a, &b]).unwrap();
    let mut v: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    for x in &mut v[1][b.len()..] {
        *x = 77;
    }
    let ids2 = Tensor::new(v, &Device::Cpu).unwrap();
    let h1 = s.forward(&ids, &lengths).unwrap();
    let h2 = s.forward(&ids2, &lengths).unwrap();
    let d: f32 = (h1.narrow(1, 0, b.len()).unwrap() - h2.narrow(1, 0, b.len()).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0, "padding ids leak into real positions");
    let mut max = 0f64;
    for (x, y) in batched.iter().zip(&alone) {
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
        }
    }
    assert!(max < 1e-5, "batched vs alone: {max}");
}

/// The gradient-check model: vocab 40, hidden 16, 2 layers, 4 heads over 2 kv heads.
fn grad_config(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 40,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        arch: kd_model::config::Arch::Llama,
        head_dim: None,
        sliding_window: None,
        max_position_embeddings: 32,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// L = Σ over distilled positions of Σ_v W[p, v] · log_softmax(z_p)[v], with fixed random W:
/// a smooth scalar of the logits that touches every parameter.
fn grad_loss(s: &Student, w: &Tensor) -> Tensor {
    let ids = Tensor::from_vec(
        vec![3u32, 17, 5, 29, 11, 38, 7, 22, 1, 30, 0, 0],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap();
    let lengths = [6, 4];
    let h = s.forward(&ids, &lengths).unwrap();
    // Distilled positions: row 0 at 1..=5, row 1 (length 4, then 2 padding) at 0..=3.
    let idx = Tensor::new(&[1u32, 2, 3, 4, 5, 6, 7, 8, 9], &Device::Cpu).unwrap();
    let rows = h.reshape(((), 16)).unwrap().index_select(&idx, 0).unwrap();
    let z = s.logits(&rows).unwrap();
    (log_softmax_last_dim(&z).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

#[test]
fn every_parameter_gradient_matches_central_finite_differences_in_f64() {
    // Every family's parameters (Qwen2's biases, Qwen3's per-head norms and wider heads)
    // included. Reference: central differences (L(θ+h) − L(θ−h)) / 2h, h = 1e-5, in f64 (truncation and
    // round-off both ~1e-10 here). Relative error |fd − g| / max(|fd|, |g|, 1e-3·max|G|) must
    // stay under 1e-5 for 4 random elements of every tensor (embedding elements drawn from
    // the rows of the tokens the batch uses).
    let mut qwen2 = grad_config(false);
    qwen2.arch = kd_model::config::Arch::Qwen2;
    let mut qwen3 = grad_config(true);
    qwen3.arch = kd_model::config::Arch::Qwen3;
    qwen3.head_dim = Some(6);
    let configs = [
        ("llama untied", grad_config(false)),
        ("llama tied", grad_config(true)),
        ("qwen2 (q/k/v biases)", qwen2),
        ("qwen3 (q/k norms, head_dim 6)", qwen3),
    ];
    for (tied, cfg) in configs {
        let s = Student::random(&cfg, 11, DType::F64, &Device::Cpu).unwrap();
        let mut rng = Rng::new(99);
        // Norm weights away from 1, so their gradients are generic.
        for (name, v) in s.named_vars() {
            if v.rank() == 1 {
                let n = v.elem_count();
                let x: Vec<f64> = (0..n).map(|_| 1.0 + 0.3 * rng.normal() as f64).collect();
                v.set(&Tensor::from_vec(x, n, &Device::Cpu).unwrap())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        let wv: Vec<f64> = (0..9 * 40).map(|_| rng.normal() as f64).collect();
        let w = Tensor::from_vec(wv, (9, 40), &Device::Cpu).unwrap();
        let loss = grad_loss(&s, &w);
        let grads = loss.backward().unwrap();
        let used_rows = [3usize, 17, 5, 29, 11, 38, 7, 22, 1, 30];
        let mut worst = 0f64;
        for (name, var) in s.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{tied}: {name}: no gradient"));
            let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let gmax = gv.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(gmax > 1e-8, "{tied}: {name}: gradient is zero");
            if name == "model.embed_tokens.weight" && !cfg.tie_word_embeddings {
                // Padding (id 0, used nowhere else) must not reach the loss.
                let pad = gv[..cfg.hidden_size]
                    .iter()
                    .fold(0f64, |m, x| m.max(x.abs()));
                assert_eq!(pad, 0.0, "padding embedding receives gradient");
            }
            let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let shape = var.dims().to_vec();
            let mut max_rel = 0f64;
            for _ in 0..4 {
                let i = if name == "model.embed_tokens.weight" {
                    let r = used_rows[rng.next_u64() as usize % used_rows.len()];
                    r * cfg.hidden_size + rng.next_u64() as usize % cfg.hidden_size
                } else {
                    rng.next_u64() as usize % orig.len()
                };
                let h = 1e-5;
                let at = |x: f64| -> f64 {
                    let mut v = orig.clone();
                    v[i] = x;
                    var.set(&Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).unwrap())
                        .unwrap();
                    scalar(&grad_loss(&s, &w))
                };
                let fd = (at(orig[i] + h) - at(orig[i] - h)) / (2.0 * h);
                var.set(&Tensor::from_vec(orig.clone(), shape.as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
                let rel = (fd - gv[i]).abs() / fd.abs().max(gv[i].abs()).max(1e-3 * gmax);
                max_rel = max_rel.max(rel);
                assert!(
                    rel < 1e-5,
                    "{tied}: {name}[{i}]: backward {} vs finite difference {fd} (rel {rel:.1e})",
                    gv[i]
                );
            }
            eprintln!("{tied}: {name}: max rel FD error {max_rel:.1e} (max |grad| {gmax:.1e})");
            worst = worst.max(max_rel);
        }
        eprintln!("{tied}: worst relative FD error {worst:.1e}");
        // The loss itself is unchanged after all the perturbations were undone.
        assert_eq!(scalar(&grad_loss(&s, &w)), scalar(&loss));
    }
}

/// Pins the trap this module exists to avoid: candle-nn's fused rms_norm carries no gradient,
/// so a student built on it would silently never train its norm weights.
#[test]
fn candle_nn_fused_rms_norm_has_no_gradient_but_ours_does() {
    let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
    let w = Var::new(&[1f32, 1., 1., 1.], &Device::Cpu).unwrap();
    let fused = candle_nn::ops::rms_norm(&x, &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(fused.backward().unwrap().get(w.as_tensor()).is_none());
    let ours = kd_model::trainable::rms_norm(&x, &w, 1e-5)
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(ours.backward().unwrap().get(w.as_tensor()).is_some());
}
