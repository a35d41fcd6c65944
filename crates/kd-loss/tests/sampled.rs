//! Sampled targets: the estimator is unbiased (the mean over seeds equals the exact
//! full-vocabulary gradient within sampling error), converges at the 1/√N rate, and equals
//! the gradient of the plug-in top-k loss the trainers use.

use kd_loss::sampled::{
    Estimator, SampledPosition, check, draw, plug_in_logprobs, sampled_forward_kl, stream_seed,
    value_correction,
};
use kd_loss::{Divergence, LossConfig, Position, TailPolicy, position_loss_f64};

const V: usize = 48;

/// Deterministic logits: a few likely tokens over a long tail.
fn logits(seed: u64, spread: f64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..V)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            (spread * (u - 0.5) * 4.0 - 0.05 * i as f64) as f32
        })
        .collect()
}

fn lse(z: &[f32]) -> f64 {
    let m = z
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| a.max(f64::from(b)));
    m + z
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln()
}

fn forward_kl(alpha: f64) -> LossConfig {
    LossConfig {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha,
        tail: TailPolicy::Bucket,
    }
}

/// The exact loss and gradient: the teacher's whole distribution as the "top-k" (k = V).
fn exact(teacher: &[f32], student: &[f32], alpha: f64, y: u32) -> (f64, Vec<f64>) {
    let t = lse(teacher);
    let ids: Vec<u32> = (0..V as u32).collect();
    let lp: Vec<f64> = teacher.iter().map(|&x| f64::from(x) - t).collect();
    let mut g = vec![0f64; V];
    let parts = position_loss_f64(
        &forward_kl(alpha),
        &Position {
            topk_ids: &ids,
            topk_logprobs: &lp,
            student_logits: student,
            next_token: y,
        },
        Some(&mut g),
    );
    (parts.divergence, g)
}

/// `n` draws from softmax(`teacher`) with stream `seed`: ids, counts and teacher log-probs.
fn sample(teacher: &[f32], n: u32, seed: u64) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    let t = lse(teacher);
    let drawn = draw(teacher, t, n, seed);
    let ids: Vec<u32> = drawn.iter().map(|d| d.0).collect();
    let counts = drawn.iter().map(|d| d.1).collect();
    let lps = ids
        .iter()
        .map(|&i| (f64::from(teacher[i as usize]) - t) as f32)
        .collect();
    (ids, counts, lps)
}

/// One sampled estimate of (value, gradient) with `n` draws from stream `seed`.
fn estimate(
    teacher: &[f32],
    student: &[f32],
    alpha: f64,
    y: u32,
    n: u32,
    seed: u64,
) -> (f64, Vec<f64>) {
    let (ids, counts, lps) = sample(teacher, n, seed);
    let mut g = vec![0f32; V];
    let parts = sampled_forward_kl(
        alpha,
        &SampledPosition {
            ids: &ids,
            counts: &counts,
            teacher_logprobs: &lps,
            n,
            student_logits: student,
            next_token: y,
        },
        Some(&mut g),
    );
    (parts.divergence, g.iter().map(|&x| f64::from(x)).collect())
}

#[test]
fn draws_are_reproducible_and_follow_the_distribution() {
    let teacher = logits(1, 1.5);
    let t = lse(&teacher);
    let a = draw(&teacher, t, 12, stream_seed(0, "row-1", 5));
    assert_eq!(a, draw(&teacher, t, 12, stream_seed(0, "row-1", 5)));
    assert_ne!(a, draw(&teacher, t, 12, stream_seed(0, "row-1", 6)));
    assert_ne!(a, draw(&teacher, t, 12, stream_seed(1, "row-1", 5)));
    assert_eq!(a.iter().map(|d| d.1).sum::<u32>(), 12);
    assert!(
        a.windows(2).all(|w| w[0].0 < w[1].0),
        "sorted, distinct ids"
    );
    // 200 000 draws: every frequency within 5 standard errors of p.
    let n = 200_000u32;
    let d = draw(&teacher, t, n, 7);
    let mut freq = vec![0u32; V];
    for (i, c) in d {
        freq[i as usize] = c;
    }
    for (j, &c) in freq.iter().enumerate() {
        let p = (f64::from(teacher[j]) - t).exp();
        let se = (p * (1.0 - p) / f64::from(n)).sqrt();
        let f = f64::from(c) / f64::from(n);
        assert!((f - p).abs() <= 5.0 * se + 1e-9, "token {j}: {f} vs {p}");
    }
}

/// The sample mean over 4000 streams of N = 12 draws equals the exact value and gradient
/// within 5 standard errors, component by component (hard-label mix included).
#[test]
fn the_mean_over_seeds_is_the_exact_gradient() {
    let teacher = logits(2, 1.5);
    let student = logits(3, 1.0);
    let (alpha, y, n, seeds) = (0.7, 4u32, 12u32, 4000u64);
    let (kl, g) = exact(&teacher, &student, alpha, y);
    let mut sum = vec![0f64; V];
    let mut sq = vec![0f64; V];
    let (mut vs, mut vq) = (0f64, 0f64);
    for s in 0..seeds {
        let (d, e) = estimate(&teacher, &student, alpha, y, n, stream_seed(9, "r", s));
        vs += d;
        vq += d * d;
        for i in 0..V {
            sum[i] += e[i];
            sq[i] += e[i] * e[i];
        }
    }
    let k = seeds as f64;
    let se = |s: f64, q: f64| ((q / k - (s / k).powi(2)).max(0.0) / k).sqrt();
    for i in 0..V {
        let mean = sum[i] / k;
        assert!(
            (mean - g[i]).abs() <= 5.0 * se(sum[i], sq[i]) + 1e-7,
            "component {i}: mean {mean} vs exact {} (se {})",
            g[i],
            se(sum[i], sq[i])
        );
    }
    assert!(
        (vs / k - kl).abs() <= 5.0 * se(vs, vq),
        "value: mean {} vs exact {kl}",
        vs / k
    );
}

/// The gradient's RMS error against the exact one falls as 1/√N: each 16× more draws divide
/// it by about 4 (between 2.5 and 6.5 here), from N = 16 to 65 536.
#[test]
fn the_error_falls_as_one_over_root_n() {
    let teacher = logits(4, 1.5);
    let student = logits(5, 1.0);
    let (_, g) = exact(&teacher, &student, 1.0, 0);
    let mut errs = Vec::new();
    for n in [16u32, 256, 4096, 65536] {
        let mut ms = 0.0;
        let reps = 64u64;
        for s in 0..reps {
            let (_, e) = estimate(&teacher, &student, 1.0, 0, n, stream_seed(3, "conv", s));
            ms += e.iter().zip(&g).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        }
        errs.push((n, (ms / reps as f64).sqrt()));
    }
    eprintln!("RMS gradient error by N: {errs:?}");
    for w in errs.windows(2) {
        let ratio = w[0].1 / w[1].1;
        assert!(
            (2.5..=6.5).contains(&ratio),
            "N {} → {}: error ratio {ratio}",
            w[0].0,
            w[1].0
        );
    }
}

/// The trainers feed ln(c/N) to the top-k forward KL with the bucket tail: its gradient is
/// the estimator's, and its value plus `value_correction` is the estimator's value.
#[test]
fn the_plug_in_top_k_loss_has_the_estimators_gradient() {
    let teacher = logits(6, 1.5);
    let student = logits(7, 1.0);
    for (n, alpha) in [(12u32, 1.0), (64, 0.5)] {
        let (ids, counts, lps) = sample(&teacher, n, 11);
        let (est, g1) = estimate(&teacher, &student, alpha, 2, n, 11);
        let plug = plug_in_logprobs(&counts, n);
        let mut g2 = vec![0f64; V];
        let parts = position_loss_f64(
            &forward_kl(alpha),
            &Position {
                topk_ids: &ids,
                topk_logprobs: &plug,
                student_logits: &student,
                next_token: 2,
            },
            Some(&mut g2),
        );
        for (a, b) in g1.iter().zip(&g2) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let value = parts.divergence + value_correction(&counts, n, &lps);
        assert!((value - est).abs() < 1e-5, "{value} vs {est}");
    }
}

#[test]
fn biased_combinations_are_refused_unless_asked_for_by_name() {
    assert!(check(&forward_kl(0.5), Estimator::Unbiased).is_ok());
    let hot = LossConfig {
        temperature: 2.0,
        ..forward_kl(1.0)
    };
    let e = check(&hot, Estimator::Unbiased).unwrap_err();
    assert!(e.contains("temperature 2"), "{e}");
    assert!(check(&hot, Estimator::PlugIn).is_ok());
    let renorm = LossConfig {
        tail: kd_loss::TailPolicy::Renorm,
        ..forward_kl(1.0)
    };
    let e = check(&renorm, Estimator::Unbiased).unwrap_err();
    assert!(e.contains("bucket"), "{e}");
    for d in [
        Divergence::Jsd { beta: 0.5 },
        Divergence::SkewForwardKl { lambda: 0.1 },
        Divergence::SkewReverseKl { lambda: 0.1 },
    ] {
        let cfg = LossConfig {
            divergence: d,
            ..forward_kl(1.0)
        };
        let e = check(&cfg, Estimator::Unbiased).unwrap_err();
        assert!(e.contains("plug_in"), "{e}");
        assert!(check(&cfg, Estimator::PlugIn).is_ok());
    }
    // Infinite or meaningless on draws whatever the estimator.
    for d in [
        Divergence::ReverseKl,
        Divergence::SkewReverseKl { lambda: 0.0 },
        Divergence::LogitMse,
    ] {
        let cfg = LossConfig {
            divergence: d,
            ..forward_kl(1.0)
        };
        for est in [Estimator::Unbiased, Estimator::PlugIn] {
            let e = check(&cfg, est).unwrap_err();
            assert!(e.contains("top-k"), "{e}");
        }
    }
}
