//! End-to-end checks of kd-loss against an independent oracle and against mathematics:
//! the float64 numpy reference values, D(P,P) = 0, D ≥ 0, central finite differences,
//! batch means, and the multi-teacher combination.

mod util;

use kd_loss::{
    Divergence, LossConfig, LossParts, Position, TailPolicy, batch_loss, combine_teachers,
    position_loss, position_loss_f64,
};
use util::*;

const BOTH_TAILS: [TailPolicy; 2] = [TailPolicy::Bucket, TailPolicy::Renorm];

fn position<'a>(ids: &'a [u32], lp: &'a [f64], z: &'a [f64], y: u32) -> Position<'a, f64, f64> {
    Position {
        topk_ids: ids,
        topk_logprobs: lp,
        student_logits: z,
        next_token: y,
    }
}

/// |got − want| ≤ 1e-9 + 1e-9·|want|.
fn close_1e9(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-9 * (1.0 + want.abs())
}

// ---------------------------------------------------------------------------------------
// 1. Reference values (float64 numpy oracle, tolerance 1e-9 relative + 1e-9 absolute)
// ---------------------------------------------------------------------------------------

#[test]
fn reference_cases_match_numpy_oracle_within_1e9_rel_plus_abs() {
    let data = loss_cases();
    let cases = data["cases"].as_array().expect("cases");
    assert_eq!(
        cases.len(),
        60,
        "tests/reference/loss-cases.json holds 60 cases"
    );
    let (mut max_abs, mut max_rel, mut checked) = (0.0f64, 0.0f64, 0usize);
    let mut failures = Vec::new();
    for (ci, c) in cases.iter().enumerate() {
        let v = c["vocab_size"].as_u64().unwrap() as usize;
        let ids = u32s(&c["topk_ids"]);
        let lp = f64s(&c["topk_logprobs"]);
        let z = f64s(&c["student_logits"]);
        assert_eq!(z.len(), v);
        let y = c["next_token"].as_u64().unwrap() as u32;
        let tau = c["temperature"].as_f64().unwrap();
        let alpha = c["alpha"].as_f64().unwrap();
        let tail = tail_of(c["tail_policy"].as_str().unwrap());
        let beta = c["jsd_beta"].as_f64().unwrap();
        let lambda = c["skew_lambda"].as_f64().unwrap();
        let exp = &c["expected"];
        let p = position(&ids, &lp, &z, y);
        for div in all_divergences(beta, lambda) {
            let parts = position_loss_f64(&config(div, tau, alpha, tail), &p, None);
            let name = div.name();
            for (what, got, want) in [
                (
                    "divergence",
                    parts.divergence,
                    exp["divergence"][name].as_f64().unwrap(),
                ),
                ("hard_ce", parts.hard_ce, exp["hard_ce"].as_f64().unwrap()),
                ("total", parts.total, exp["total"][name].as_f64().unwrap()),
            ] {
                checked += 1;
                let abs = (got - want).abs();
                max_abs = max_abs.max(abs);
                max_rel = max_rel.max(abs / want.abs().max(f64::MIN_POSITIVE));
                if !close_1e9(got, want) {
                    failures.push(format!("case {ci} {name} {what}: got {got}, want {want}"));
                }
            }
        }
    }
    eprintln!("oracle: {checked} values, max abs deviation {max_abs:.3e}, max rel {max_rel:.3e}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reference_identity_cases_give_zero_divergence_below_1e12() {
    let data = loss_cases();
    let cases = data["identity_cases"].as_array().expect("identity_cases");
    assert!(!cases.is_empty());
    for c in cases {
        let ids = u32s(&c["topk_ids"]);
        let lp = f64s(&c["topk_logprobs"]);
        let z = f64s(&c["student_logits"]);
        let tau = c["temperature"].as_f64().unwrap();
        let tail = tail_of(c["tail_policy"].as_str().unwrap());
        let p = position(&ids, &lp, &z, 0);
        // The file gives no β/λ: Q = P makes every divergence 0 for any of them.
        for (beta, lambda) in [(0.5, 0.1), (0.1, 0.0), (0.9, 0.9)] {
            for div in all_divergences(beta, lambda) {
                let d = position_loss_f64(&config(div, tau, 1.0, tail), &p, None).divergence;
                assert!(d.abs() < 1e-12, "{div}: {d}");
                let oracle = c["expected_all_zero"][div.name()].as_f64().unwrap();
                assert!(oracle.abs() < 1e-12);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Invariants: D(P,P) = 0 and D ≥ 0 on random inputs
// ---------------------------------------------------------------------------------------

/// Student logits that reproduce the teacher on the bucket support at τ = 1: l_i on S,
/// log(r/(V−k)) elsewhere. On renorm any τ works, and logit MSE is 0 too.
fn matching_student(ids: &[u32], lp: &[f64], v: usize) -> Vec<f64> {
    let r = 1.0 - lp.iter().map(|x| x.exp()).sum::<f64>();
    let share = (r / (v - ids.len()) as f64).ln();
    let mut z = vec![share; v];
    for (&i, &l) in ids.iter().zip(lp) {
        z[i as usize] = l;
    }
    z
}

#[test]
fn divergence_of_teacher_with_itself_is_zero_below_1e12_seeded() {
    let mut rng = Rng::new(7);
    for &(v, k) in &[(10, 3), (100, 20), (1000, 64)] {
        let (ids, lp) = random_teacher(&mut rng, v, k, 2.0);
        let z = matching_student(&ids, &lp, v);
        let p = position(&ids, &lp, &z, 0);
        for div in all_divergences(0.3, 0.2) {
            let d = position_loss_f64(&config(div, 1.0, 1.0, TailPolicy::Bucket), &p, None);
            assert!(
                d.divergence.abs() < 1e-12,
                "bucket {div} V={v}: {}",
                d.divergence
            );
            for tau in [0.5, 1.0, 3.0] {
                let d = position_loss_f64(&config(div, tau, 1.0, TailPolicy::Renorm), &p, None);
                assert!(
                    d.divergence.abs() < 1e-12,
                    "renorm {div} τ={tau}: {}",
                    d.divergence
                );
            }
        }
    }
}

#[test]
fn divergence_is_nonnegative_on_random_inputs_within_1e12_seeded() {
    let mut rng = Rng::new(42);
    let (mut n, mut n_inf) = (0, 0);
    for &v in &[2usize, 7, 50, 400, 3000] {
        for k in [1, v.div_ceil(3), v - 1, v] {
            if k == 0 {
                continue;
            }
            for tau in [0.3, 1.0, 2.5] {
                for trial in 0..4 {
                    let (ids, lp) = random_teacher(&mut rng, v, k, 0.5 + 2.0 * trial as f64);
                    let spread = 0.5 + 3.0 * rng.uniform();
                    let z = random_logits(&mut rng, v, spread);
                    let y = rng.below(v) as u32;
                    let p = position(&ids, &lp, &z, y);
                    let beta = 0.01 + 0.98 * rng.uniform();
                    let lambda = 0.99 * rng.uniform();
                    for div in all_divergences(beta, lambda) {
                        for tail in BOTH_TAILS {
                            let parts = position_loss_f64(&config(div, tau, 0.5, tail), &p, None);
                            n += 1;
                            let d = parts.divergence;
                            assert!(d >= -1e-12, "{div} {tail:?} V={v} k={k}: {d}");
                            if d.is_infinite() {
                                // Only where the teacher's tail r = 1 − Σ exp(l) rounds to 0
                                // with k < V (a top-k holding all but ~1e-16 of the mass), and
                                // only for the divergences with log P in the integrand.
                                let r = 1.0 - lp.iter().map(|x| x.exp()).sum::<f64>();
                                let reverse = matches!(
                                    div,
                                    Divergence::ReverseKl
                                        | Divergence::SkewReverseKl { lambda: 0.0 }
                                );
                                assert!(
                                    reverse && tail == TailPolicy::Bucket && k < v && r < 1e-15,
                                    "{div} {tail:?} V={v} k={k} r={r}: D = +inf"
                                );
                                n_inf += 1;
                            }
                            assert!(parts.hard_ce >= 0.0);
                        }
                    }
                }
            }
        }
    }
    eprintln!("D >= 0: {n} evaluations, {n_inf} with r rounding to 0 (reverse KL = +inf)");
    assert!(n > 1000);
}

// ---------------------------------------------------------------------------------------
// 3. Gradients vs central finite differences of `total` in f64
// ---------------------------------------------------------------------------------------

/// Checks ∂total/∂z against central differences (h = 1e-5) component-wise with
/// |g − fd| ≤ 1e-6·|fd| + 1e-9; returns the largest deviation.
fn check_gradient(cfg: &LossConfig, ids: &[u32], lp: &[f64], z: &[f64], y: u32) -> f64 {
    let v = z.len();
    let mut grad = vec![0.0f64; v];
    position_loss_f64(cfg, &position(ids, lp, z, y), Some(&mut grad));
    let h = 1e-5;
    let mut zz = z.to_vec();
    let mut worst = 0.0f64;
    for j in 0..v {
        zz[j] = z[j] + h;
        let up = position_loss_f64(cfg, &position(ids, lp, &zz, y), None).total;
        zz[j] = z[j] - h;
        let down = position_loss_f64(cfg, &position(ids, lp, &zz, y), None).total;
        zz[j] = z[j];
        let fd = (up - down) / (2.0 * h);
        let dev = (grad[j] - fd).abs();
        worst = worst.max(dev);
        assert!(
            dev <= 1e-6 * fd.abs() + 1e-9,
            "{} {:?} τ={} α={} j={j} (in S: {}): analytic {} vs fd {fd}",
            cfg.divergence,
            cfg.tail,
            cfg.temperature,
            cfg.alpha,
            ids.contains(&(j as u32)),
            grad[j]
        );
    }
    // Shift invariance of every term: the gradient sums to 0.
    assert!(grad.iter().sum::<f64>().abs() < 1e-12);
    worst
}

#[test]
fn gradient_matches_central_differences_1e6_rel_every_divergence_and_tail() {
    let mut rng = Rng::new(2024);
    let mut worst = 0.0f64;
    for &(v, k) in &[(20usize, 5usize), (50, 12), (30, 30)] {
        let (ids, lp) = random_teacher(&mut rng, v, k, 1.5);
        let z = random_logits(&mut rng, v, 1.5);
        let y = rng.below(v) as u32;
        for div in all_divergences(0.3, 0.25).into_iter().chain([
            Divergence::SkewForwardKl { lambda: 0.0 },
            Divergence::SkewReverseKl { lambda: 0.0 },
        ]) {
            for tail in BOTH_TAILS {
                for tau in [0.7, 2.0] {
                    for alpha in [0.0, 0.4, 1.0] {
                        let cfg = config(div, tau, alpha, tail);
                        worst = worst.max(check_gradient(&cfg, &ids, &lp, &z, y));
                    }
                }
            }
        }
    }
    eprintln!("gradient: max |analytic − central difference| = {worst:.3e}");
}

#[test]
fn gradient_matches_central_differences_with_zero_probability_teacher_entries() {
    // A -inf log-prob in S and a bucket tail with r = 0 (top-k mass 1 with k < V): the
    // divergences that stay finite must still have exact gradients.
    let v = 25;
    let ids = [3u32, 8, 1, 17];
    let lp = [0.6f64.ln(), 0.3f64.ln(), 0.1f64.ln(), f64::NEG_INFINITY];
    let mut rng = Rng::new(5);
    let z = random_logits(&mut rng, v, 1.0);
    for div in [
        Divergence::ForwardKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::SkewForwardKl { lambda: 0.3 },
        Divergence::SkewReverseKl { lambda: 0.3 },
        Divergence::LogitMse,
    ] {
        for tail in BOTH_TAILS {
            for tau in [0.7, 2.0] {
                check_gradient(&config(div, tau, 0.6, tail), &ids, &lp, &z, 8);
            }
        }
    }
}

#[test]
fn f32_gradient_is_the_f64_gradient_rounded_once() {
    let mut rng = Rng::new(9);
    let (ids, lp) = random_teacher(&mut rng, 40, 8, 1.0);
    let z = random_logits(&mut rng, 40, 2.0);
    let p = position(&ids, &lp, &z, 3);
    for div in all_divergences(0.5, 0.1) {
        let cfg = config(div, 1.5, 0.8, TailPolicy::Bucket);
        let (mut g64, mut g32) = (vec![0.0f64; 40], vec![0.0f32; 40]);
        let a = position_loss_f64(&cfg, &p, Some(&mut g64));
        let b = position_loss(&cfg, &p, Some(&mut g32));
        assert_eq!(a, b);
        for (x, y) in g64.iter().zip(&g32) {
            assert_eq!(*x as f32, *y);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Numerics: tails, infinities, input types
// ---------------------------------------------------------------------------------------

#[test]
fn student_tail_uses_log_sum_exp_not_one_minus_sum() {
    // Regression guard: with q_0 = 1 − 3.9e-22, 1 − Σ_S q underflows to 0 and forward KL
    // would be +inf; the log-sum-exp over the complement gives log Q_tail = ln 2 − 50 − ln(1 + 2e−50).
    let ids = [0u32];
    let lp = [0.5f64.ln()];
    let z = [50.0, 0.0, 0.0];
    let cfg = config(Divergence::ForwardKl, 1.0, 1.0, TailPolicy::Bucket);
    let d = position_loss_f64(&cfg, &position(&ids, &lp, &z, 0), None).divergence;
    let norm = (2.0 * (-50.0f64).exp()).ln_1p();
    let want = 0.5 * (0.5f64.ln() + norm) + 0.5 * (0.5f64.ln() - (2.0f64.ln() - 50.0 - norm));
    assert!((d - want).abs() < 1e-12, "{d} vs {want}");
}

#[test]
fn student_tail_far_below_the_maximum_falls_back_to_its_own_shift() {
    // The complement's logits are 700 below the top one (past the 600·τ guard), so the
    // global-shift sum would underflow; log Q_tail = ln 4 − 700 − ln(1 + 4e−700) and
    // ∂D/∂z_j = (q_j/Q_tail)·(g_tail − Q_tail·G) = ¼·(−P_tail + Q_tail) for j ∉ S (τ = α = 1).
    let ids = [0u32];
    let lp = [0.75f64.ln()];
    let z = [700.0, 0.0, 0.0, 0.0, 0.0];
    let cfg = config(Divergence::ForwardKl, 1.0, 1.0, TailPolicy::Bucket);
    let mut g = [0.0f64; 5];
    let d = position_loss_f64(&cfg, &position(&ids, &lp, &z, 0), Some(&mut g)).divergence;
    let log_q_tail = 4.0f64.ln() - 700.0;
    let want = 0.75 * 0.75f64.ln() + 0.25 * (0.25f64.ln() - log_q_tail);
    assert!((d - want).abs() < 1e-12 * want, "{d} vs {want}");
    assert!((g[0] - 0.25).abs() < 1e-15, "{}", g[0]);
    for gj in &g[1..] {
        assert!((gj + 0.0625).abs() < 1e-15, "{gj}");
    }
}

#[test]
fn zero_probability_teacher_support_is_infinite_for_reverse_kl_never_nan() {
    let v = 10;
    let z: Vec<f64> = (0..v).map(|j| j as f64 * 0.1).collect();
    // (a) a -inf log-prob in S; (b) bucket tail with r = 0 and k < V.
    let cases: [(&[u32], &[f64]); 2] = [
        (&[0, 1, 2], &[0.5f64.ln(), 0.3f64.ln(), f64::NEG_INFINITY]),
        (&[0, 1], &[0.5f64.ln(), 0.5f64.ln()]),
    ];
    for (ids, lp) in cases {
        let p = position(ids, lp, &z, 4);
        for div in all_divergences(0.5, 0.2)
            .into_iter()
            .chain([Divergence::SkewReverseKl { lambda: 0.0 }])
        {
            for tail in BOTH_TAILS {
                for alpha in [0.0, 0.5, 1.0] {
                    let mut g = vec![0.0f64; v];
                    let parts = position_loss_f64(&config(div, 1.3, alpha, tail), &p, Some(&mut g));
                    assert!(
                        !parts.divergence.is_nan() && !parts.total.is_nan(),
                        "{div} {tail:?}"
                    );
                    assert!(g.iter().all(|x| x.is_finite()), "{div} {tail:?}");
                    let reverse = matches!(
                        div,
                        Divergence::ReverseKl | Divergence::SkewReverseKl { lambda: 0.0 }
                    );
                    // Renorm drops the tail, so case (b) is finite there.
                    let support_has_zero =
                        lp.iter().any(|l| l.is_infinite()) || tail == TailPolicy::Bucket;
                    if reverse && support_has_zero {
                        assert_eq!(parts.divergence, f64::INFINITY, "{div} {tail:?}");
                        assert_eq!(parts.total.is_finite(), alpha == 0.0);
                    } else {
                        assert!(
                            parts.divergence.is_finite() && parts.divergence >= -1e-12,
                            "{div} {tail:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bucket_with_k_equal_v_has_no_tail_entry() {
    // k = V: bucket equals renorm at τ = 1 up to the student normalisation, which is over
    // S = V in both; the teacher tail (rounding: r may be ±1e-16) is dropped.
    let mut rng = Rng::new(11);
    let (ids, lp) = random_teacher(&mut rng, 16, 16, 1.0);
    let z = random_logits(&mut rng, 16, 1.0);
    let p = position(&ids, &lp, &z, 2);
    for div in all_divergences(0.4, 0.3) {
        for tau in [0.5, 1.0, 2.0] {
            let b = position_loss_f64(&config(div, tau, 0.5, TailPolicy::Bucket), &p, None);
            let r = position_loss_f64(&config(div, tau, 0.5, TailPolicy::Renorm), &p, None);
            assert!(close_1e9(b.total, r.total), "{div} τ={tau}: {b:?} vs {r:?}");
        }
    }
}

#[test]
fn half_and_f32_inputs_give_the_f64_result_of_the_same_values() {
    let ids = [2u32, 0, 5];
    let lp32 = [-0.25f32, -1.75, -3.0];
    let lp16: Vec<half::f16> = lp32.iter().map(|&x| half::f16::from_f32(x)).collect();
    let z32 = [0.5f32, -1.0, 2.0, 0.0, 0.25, -0.5, 1.0];
    let lp64: Vec<f64> = lp32.iter().map(|&x| f64::from(x)).collect();
    let z64: Vec<f64> = z32.iter().map(|&x| f64::from(x)).collect();
    let cfg = config(Divergence::Jsd { beta: 0.5 }, 2.0, 0.5, TailPolicy::Bucket);
    let want = position_loss_f64(&cfg, &position(&ids, &lp64, &z64, 1), None);
    let a = position_loss(
        &cfg,
        &Position {
            topk_ids: &ids,
            topk_logprobs: &lp32,
            student_logits: &z32,
            next_token: 1,
        },
        None,
    );
    let b = position_loss(
        &cfg,
        &Position {
            topk_ids: &ids,
            topk_logprobs: &lp16,
            student_logits: &z32,
            next_token: 1,
        },
        None,
    );
    assert_eq!(a, want);
    assert_eq!(b, want); // these values are exact in f16
}

#[test]
fn malformed_positions_are_rejected_by_validate() {
    use kd_loss::LossError;
    let z = [0.0f32; 4];
    let pos = |ids: &'static [u32], lp: &'static [f32], y: u32| Position {
        topk_ids: ids,
        topk_logprobs: lp,
        student_logits: &z,
        next_token: y,
    };
    assert!(pos(&[0, 1], &[-1.0, -2.0], 3).validate().is_ok());
    assert!(matches!(
        pos(&[0, 1], &[-1.0], 0).validate(),
        Err(LossError::LengthMismatch { .. })
    ));
    assert!(matches!(
        pos(&[0, 4], &[-1.0, -2.0], 0).validate(),
        Err(LossError::IdOutOfRange { id: 4, .. })
    ));
    assert!(matches!(
        pos(&[1, 1], &[-1.0, -2.0], 0).validate(),
        Err(LossError::DuplicateId { id: 1 })
    ));
    assert!(matches!(
        pos(&[0, 1], &[-1.0, f32::NAN], 0).validate(),
        Err(LossError::Logprob { index: 1, .. })
    ));
    assert!(matches!(
        pos(&[0, 1], &[0.5, -2.0], 0).validate(),
        Err(LossError::Logprob { index: 0, .. })
    ));
    assert!(matches!(
        pos(&[0], &[f32::NEG_INFINITY], 0).validate(),
        Err(LossError::NoFiniteLogprob)
    ));
    assert!(matches!(
        pos(&[], &[], 0).validate(),
        Err(LossError::NoFiniteLogprob)
    ));
    assert!(matches!(
        pos(&[0], &[-1.0], 4).validate(),
        Err(LossError::NextTokenOutOfRange { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// 5. Batch: token mean, gradient scaled by 1/n
// ---------------------------------------------------------------------------------------

#[test]
fn batch_is_the_token_mean_and_gradients_are_scaled_by_one_over_n() {
    let mut rng = Rng::new(3);
    let (v, n) = (64usize, 9usize);
    /// Owned inputs of one position: ids, teacher log-probs, student logits, next token.
    type Owned = (Vec<u32>, Vec<f64>, Vec<f64>, u32);
    let data: Vec<Owned> = (0..n)
        .map(|_| {
            let (ids, lp) = random_teacher(&mut rng, v, 10, 1.0);
            let z = random_logits(&mut rng, v, 1.0);
            (ids, lp, z, rng.below(v) as u32)
        })
        .collect();
    let positions: Vec<_> = data
        .iter()
        .map(|(i, l, z, y)| position(i, l, z, *y))
        .collect();
    for div in all_divergences(0.5, 0.1) {
        let cfg = config(div, 2.0, 0.7, TailPolicy::Bucket);
        let mut grads = vec![0.0f32; n * v];
        let (mean, count) = batch_loss(&cfg, &positions, Some(&mut grads));
        assert_eq!(count, n);
        let mut sum = LossParts::default();
        for (i, p) in positions.iter().enumerate() {
            let mut g = vec![0.0f64; v];
            let one = position_loss_f64(&cfg, p, Some(&mut g));
            sum.divergence += one.divergence;
            sum.hard_ce += one.hard_ce;
            sum.total += one.total;
            for (j, gj) in g.iter().enumerate() {
                assert_eq!(grads[i * v + j], (gj / n as f64) as f32);
            }
        }
        assert!(close_1e9(mean.total, sum.total / n as f64));
        assert!(close_1e9(mean.divergence, sum.divergence / n as f64));
        assert!(close_1e9(mean.hard_ce, sum.hard_ce / n as f64));
        let (again, _) = batch_loss(&cfg, &positions, None);
        assert_eq!(again, mean);
    }
    let empty: [Position<'_, f64, f64>; 0] = [];
    let cfg = config(Divergence::ForwardKl, 1.0, 1.0, TailPolicy::Bucket);
    assert_eq!(batch_loss(&cfg, &empty, None), (LossParts::default(), 0));
}

// ---------------------------------------------------------------------------------------
// 6. Multi-teacher combination
// ---------------------------------------------------------------------------------------

fn sorted_pairs(ids: &[u32], lp: &[f64]) -> Vec<(u32, f64)> {
    let mut v: Vec<_> = ids.iter().copied().zip(lp.iter().copied()).collect();
    v.sort_by_key(|p| p.0);
    v
}

#[test]
fn combine_one_teacher_returns_its_distribution_exactly() {
    let mut rng = Rng::new(21);
    let (ids, lp) = random_teacher(&mut rng, 300, 20, 2.0);
    let lp32: Vec<f32> = lp.iter().map(|&x| x as f32).collect();
    let (u, l) = combine_teachers(&[(&ids, &lp32, 1.0)], 300).unwrap();
    let want: Vec<f64> = lp32.iter().map(|&x| f64::from(x)).collect();
    assert_eq!(sorted_pairs(&u, &l), sorted_pairs(&ids, &want));
    assert!(
        l.windows(2).all(|w| w[0] >= w[1]),
        "sorted by log-prob descending"
    );
}

#[test]
fn combine_identical_teachers_returns_the_same_distribution_within_1e15() {
    let mut rng = Rng::new(22);
    let (ids, lp) = random_teacher(&mut rng, 500, 32, 1.5);
    let (u, l) = combine_teachers(&[(&ids, &lp, 0.3), (&ids, &lp, 0.7)], 500).unwrap();
    for ((a, x), (b, y)) in sorted_pairs(&u, &l).iter().zip(sorted_pairs(&ids, &lp)) {
        assert_eq!(*a, b);
        assert!((x - y).abs() < 1e-15, "{x} vs {y}");
    }
}

#[test]
fn combine_hand_checked_two_teachers() {
    // V = 10. A: {0: 0.5, 1: 0.3}, r = 0.2 → 0.025 per other token. B: {1: 0.6, 2: 0.2},
    // r = 0.2 → 0.025. Weights ½, ½: P̄(0) = 0.2625, P̄(1) = 0.45, P̄(2) = 0.1125, tail 0.175.
    let a_lp = [0.5f64.ln(), 0.3f64.ln()];
    let b_lp = [0.6f64.ln(), 0.2f64.ln()];
    let (u, l) = combine_teachers(&[(&[0, 1], &a_lp, 0.5), (&[1, 2], &b_lp, 0.5)], 10).unwrap();
    assert_eq!(u, [1, 0, 2]);
    for (got, want) in l.iter().zip([0.45f64, 0.2625, 0.1125]) {
        assert!((got.exp() - want).abs() < 1e-15, "{} vs {want}", got.exp());
    }
}

#[test]
fn combine_keeps_mass_at_most_one_and_feeds_position_loss_seeded() {
    let mut rng = Rng::new(23);
    for trial in 0..50 {
        let v = 20 + rng.below(200);
        let t = 1 + rng.below(4);
        let teachers: Vec<(Vec<u32>, Vec<f64>)> = (0..t)
            .map(|_| {
                let k = 1 + rng.below(v);
                let spread = 0.5 + 3.0 * rng.uniform();
                random_teacher(&mut rng, v, k, spread)
            })
            .collect();
        let raw: Vec<f64> = (0..t).map(|_| rng.uniform() + 0.01).collect();
        let s: f64 = raw.iter().sum();
        let list: Vec<(&[u32], &[f64], f64)> = teachers
            .iter()
            .zip(&raw)
            .map(|((i, l), w)| (i.as_slice(), l.as_slice(), w / s))
            .collect();
        let (u, l) = combine_teachers(&list, v).unwrap();
        let mass: f64 = l.iter().map(|x| x.exp()).sum();
        assert!(mass <= 1.0 + 1e-12, "trial {trial}: mass {mass}");
        assert!(l.iter().all(|&x| x <= 0.0));
        let z = random_logits(&mut rng, v, 1.0);
        let p = position(&u, &l, &z, 0);
        p.validate().unwrap();
        let d = position_loss_f64(
            &config(Divergence::ForwardKl, 1.0, 1.0, TailPolicy::Bucket),
            &p,
            None,
        );
        assert!(d.divergence >= -1e-12);
    }
}

/// Student logits from a half-precision forward pass: the largest finite f16/bf16 values are
/// handled exactly (every computation is in f64), and values that overflowed to ±inf or NaN
/// never yield a finite loss, so a training run's non-finite check stops it instead of the
/// damage spreading silently.
#[test]
fn overflowing_half_precision_logits_are_exact_or_non_finite_never_silent() {
    let ids = [2u32, 0, 5];
    let lp = [-0.25f32, -1.75, -3.0];
    let big = [
        half::f16::MAX,
        half::f16::from_f32(1.0),
        -half::f16::MAX,
        half::f16::ZERO,
        half::f16::from_f32(60000.0),
        half::f16::from_f32(-2.0),
        half::f16::from_f32(3.0),
    ];
    let z64: Vec<f64> = big.iter().map(|x| x.to_f64()).collect();
    let lp64: Vec<f64> = lp.iter().map(|&x| f64::from(x)).collect();
    for div in all_divergences(0.5, 0.2) {
        for tail in BOTH_TAILS {
            let cfg = config(div, 2.0, 0.7, tail);
            let got = position_loss(
                &cfg,
                &Position {
                    topk_ids: &ids,
                    topk_logprobs: &lp,
                    student_logits: &big,
                    next_token: 1,
                },
                None,
            );
            let want = position_loss_f64(&cfg, &position(&ids, &lp64, &z64, 1), None);
            assert_eq!(got, want, "{div} {tail:?}");
            assert!(got.total.is_finite(), "{div} {tail:?}: {got:?}");
        }
    }
    for bad in [half::f16::INFINITY, half::f16::NEG_INFINITY, half::f16::NAN] {
        let mut z = big;
        z[1] = bad;
        for div in all_divergences(0.5, 0.2) {
            for tail in BOTH_TAILS {
                let mut g = vec![0.0f32; z.len()];
                let p = [Position {
                    topk_ids: &ids,
                    topk_logprobs: &lp,
                    student_logits: &z,
                    next_token: 1,
                }];
                let (parts, _) =
                    kd_loss::batch_loss(&config(div, 1.0, 0.5, tail), &p, Some(&mut g));
                assert!(
                    !parts.total.is_finite(),
                    "{div} {tail:?} with a {bad} logit gave a finite loss {parts:?}"
                );
            }
        }
    }
}
