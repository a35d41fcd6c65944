//! The kernel engine against the candle autograd engine: the same loss and gradients for every
//! parameter group, on tiny students with awkward shapes and on the real 6-layer student's
//! shape; finite differences of the kernel engine's own loss; the same AdamW update; and the
//! same bits on any thread count.

#[path = "util/engine.rs"]
mod engine_util;

use candle_core::{DType, Device};
use engine_util::{candle_grads, rel_diff, synthetic_batch, worst_group};
use kd_loss::{Divergence, LossConfig, TailPolicy};
use kd_model::LlamaConfig;
use kd_model::testing::{Rng, tiny_config};
use kd_model::trainable::Student;
use kd_student::engine::KernelStudent;
use kd_student::optim::{AdamW, AdamWConfig};

/// Relative L2 difference allowed between the engines' gradients of one parameter group: the
/// two sum in different orders in f32.
const GRAD_TOL: f64 = 2e-4;

fn fkl(temperature: f64, alpha: f64) -> LossConfig {
    LossConfig {
        divergence: Divergence::ForwardKl,
        temperature,
        alpha,
        tail: TailPolicy::Bucket,
    }
}

/// Widths that are not multiples of the kernels' 16-row panels and 32-column blocks.
fn odd_config(vocab: usize, tied: bool) -> LlamaConfig {
    let mut c = tiny_config(vocab);
    c.hidden_size = 40;
    c.intermediate_size = 72;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = Some(12);
    c.num_hidden_layers = 2;
    c.tie_word_embeddings = tied;
    c
}

#[test]
fn gradients_equal_candle_autograd_on_tiny_students() {
    let losses = [
        fkl(1.0, 1.0),
        fkl(2.0, 0.7),
        LossConfig {
            divergence: Divergence::ReverseKl,
            ..fkl(1.0, 1.0)
        },
        LossConfig {
            divergence: Divergence::Jsd { beta: 0.5 },
            ..fkl(1.0, 0.5)
        },
    ];
    for (i, tied) in [true, false].into_iter().enumerate() {
        for cfg in [tiny_config(300), odd_config(301, tied)] {
            let mut cfg = cfg;
            cfg.tie_word_embeddings = tied;
            let batch = synthetic_batch(cfg.vocab_size, &[17, 9, 40], 3, 8, 7 + i as u64);
            for loss in &losses {
                // A chunk that does not divide the positions: the last chunk is partial.
                let (name, worst, lk, lc) = worst_group(&cfg, 3, &batch, loss, 13);
                eprintln!(
                    "hidden {} tied {tied} {:?}: loss {lk:.6} vs {lc:.6}, worst group {name} {worst:.2e}",
                    cfg.hidden_size, loss.divergence
                );
                assert!(((lk - lc) / lc).abs() < 1e-5, "loss {lk} vs {lc}");
                assert!(worst < GRAD_TOL, "{name}: relative difference {worst:.3e}");
            }
        }
    }
}

#[test]
fn gradients_equal_candle_autograd_on_the_real_student_shape() {
    // The 6-layer SmolLM2 student: hidden 576, 9 heads over 3 key/value heads of 64, MLP
    // 1536, tied 49152-token head.
    let cfg = kd_model::testing::smollm2_student_config();
    let batch = synthetic_batch(cfg.vocab_size, &[70, 45], 10, 32, 21);
    let (name, worst, lk, lc) = worst_group(&cfg, 5, &batch, &fkl(1.0, 1.0), 32);
    eprintln!("real shape: loss {lk:.6} vs {lc:.6}, worst group {name} {worst:.2e}");
    assert!(((lk - lc) / lc).abs() < 1e-5, "loss {lk} vs {lc}");
    assert!(worst < 1e-3, "{name}: relative difference {worst:.3e}");
}

#[test]
fn gradients_match_finite_differences_of_the_kernel_loss() {
    let cfg = odd_config(97, false);
    let batch = synthetic_batch(cfg.vocab_size, &[12, 7], 2, 6, 3);
    let loss = fkl(2.0, 0.6);
    let student = Student::random(&cfg, 8, DType::F32, &Device::Cpu).unwrap();
    let mut k = KernelStudent::new(&student, AdamWConfig::default(), 64, 16, 5).unwrap();
    k.accumulate(&batch, &loss, 5).unwrap();
    let grads = k.gradients();
    let mut rng = Rng::new(4);
    let eps = 2e-3f32;
    // One random direction per parameter group: the directional derivative g·u against the
    // central difference of the loss (f32 throughout, so a loose but meaningful bound).
    for (name, shape) in k.param_names() {
        let len: usize = shape.iter().product();
        let u: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
        let g = &grads.iter().find(|(n, _)| *n == name).unwrap().1;
        let analytic: f64 = g.iter().zip(&u).map(|(a, b)| f64::from(a * b)).sum();
        let orig = k.param_mut(&name).unwrap().to_vec();
        let at = |sign: f32, k: &mut KernelStudent| {
            let p = k.param_mut(&name).unwrap();
            for ((p, o), d) in p.iter_mut().zip(&orig).zip(&u) {
                *p = o + sign * eps * d;
            }
            k.loss(&batch, &loss, 5).unwrap().total
        };
        let plus = at(1.0, &mut k);
        let minus = at(-1.0, &mut k);
        k.param_mut(&name).unwrap().copy_from_slice(&orig);
        let numeric = (plus - minus) / (2.0 * f64::from(eps));
        let err = (numeric - analytic).abs() / analytic.abs().max(1e-2);
        eprintln!("{name}: analytic {analytic:.6}, numeric {numeric:.6}, error {err:.2e}");
        assert!(err < 2e-2, "{name}: analytic {analytic} numeric {numeric}");
    }
}

#[test]
fn adamw_updates_equal_the_candle_optimizer() {
    let cfg = odd_config(200, false);
    let loss = fkl(1.0, 0.8);
    let student = Student::random(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
    let mut k = KernelStudent::new(&student, AdamWConfig::default(), 128, 64, 16).unwrap();
    let mut opt = AdamW::new(student.named_vars(), AdamWConfig::default()).unwrap();
    for step in 0..3u64 {
        let batch = synthetic_batch(cfg.vocab_size, &[20, 33], 4, 5, 50 + step);
        let (_, g) = kd_student::train::loss_and_grads(&student, &batch, &loss, 16, true).unwrap();
        let info_c = opt.step(&g.unwrap(), 1e-2, 0.5).unwrap();
        k.accumulate(&batch, &loss, 16).unwrap();
        let info_k = k.step(1e-2, 0.5);
        assert!(
            (info_c.grad_norm - info_k.grad_norm).abs() < 1e-4 * info_c.grad_norm,
            "grad norm {} vs {}",
            info_c.grad_norm,
            info_k.grad_norm
        );
        assert_eq!(info_c.clipped, info_k.clipped);
    }
    // Parameters after three updates.
    let copy = Student::random(&cfg, 99, DType::F32, &Device::Cpu).unwrap();
    k.write_to(&copy).unwrap();
    for ((n, a), (_, b)) in student.named_vars().iter().zip(copy.named_vars()) {
        let a: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let r = rel_diff(&b, &a);
        assert!(r < 1e-4, "{n}: parameters differ by {r:.2e} after 3 steps");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let cfg = odd_config(150, true);
    let batch = synthetic_batch(cfg.vocab_size, &[30, 11, 25, 8], 2, 7, 9);
    let loss = fkl(1.5, 0.9);
    let student = Student::random(&cfg, 4, DType::F32, &Device::Cpu).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut k = KernelStudent::new(&student, AdamWConfig::default(), 128, 32, 9).unwrap();
            let l = k.accumulate(&batch, &loss, 9).unwrap();
            k.step(3e-3, 1.0);
            k.accumulate(&batch, &loss, 9).unwrap();
            (l.total.to_bits(), k.gradients())
        })
    };
    let (l1, g1) = run(1);
    let (l3, g3) = run(3);
    assert_eq!(l1, l3, "loss differs between 1 and 3 threads");
    for ((n, a), (_, b)) in g1.iter().zip(&g3) {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{n}: gradients differ between 1 and 3 threads");
    }
}

#[test]
fn candle_reference_has_gradients_for_every_group() {
    // The comparison above is only meaningful if candle's gradients are not zero.
    let cfg = odd_config(120, true);
    let batch = synthetic_batch(cfg.vocab_size, &[15, 10], 2, 4, 1);
    let student = Student::random(&cfg, 6, DType::F32, &Device::Cpu).unwrap();
    let (_, g) = candle_grads(&student, &batch, &fkl(1.0, 1.0), 8);
    for (n, v) in g {
        assert!(
            v.iter().any(|&x| x != 0.0),
            "{n}: candle gradient is all zero"
        );
    }
}
