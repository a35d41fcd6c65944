//! Sampled targets: N tokens drawn from the teacher's distribution, and the forward-KL
//! estimator that is unbiased in expectation.
//!
//! # Targets
//!
//! At one position the teacher's T=1 distribution is p over the vocabulary V. Instead of its
//! top k, the cache may hold N independent draws from p, stored as the distinct ids drawn
//! with their counts c_j (Σ c_j = N) and the teacher's log-probs log p_j of those ids. The
//! empirical distribution p̂_j = c_j / N is an unbiased estimate of p: E[c_j] = N·p_j.
//! Draws come from a stream seeded by (seed, row id, position) ([`stream_seed`]), so a dump
//! is reproducible and independent of batching.
//!
//! # The estimator (forward KL at τ = 1)
//!
//! With q = softmax(z) over V, forward KL is KL(p‖q) = Σ_j p_j log p_j − Σ_j p_j log q_j and
//! its gradient is ∂KL/∂z_i = q_i − p_i. Both are linear in p, so replacing p by p̂ gives
//!
//! * D̂ = Σ_j p̂_j (log p_j − log q_j), with E[D̂] = KL(p‖q);
//! * ĝ_i = q_i − p̂_i, with E[ĝ] = q − p, the exact gradient;
//!
//! and the variance of each falls as 1/N (p̂ is a mean of N one-hot vectors:
//! Var[p̂_i] = p_i(1 − p_i)/N). ĝ is also the gradient of the plug-in KL(p̂‖q), which is what
//! [`plug_in_logprobs`] feeds to the top-k losses (bucket tail: the tail of p̂ is empty), so
//! the trainers need no other code; only the reported value differs by the constant
//! Σ p̂_j (log p_j − log p̂_j) ([`value_correction`]). The hard-label part is unchanged.
//!
//! # What does not hold
//!
//! Every other loss is non-linear in p, so its plug-in value and gradient are biased (they
//! are consistent: the bias vanishes as N grows):
//!
//! * τ ≠ 1: the target is p^(1/τ)/Z_τ; with draws from p the weights p^(1/τ−1)/Z_τ need
//!   Z_τ = Σ_V p^(1/τ), which N draws cannot give without bias (self-normalised importance
//!   sampling is biased).
//! * reverse KL, JSD, skew KLs: they weight log p_j by the student's q_j at tokens the draws
//!   may miss (log p̂_j = −∞ there), so the plug-in is biased and reverse KL is infinite.
//! * logit MSE needs teacher logits on a fixed support.
//!
//! [`check`] therefore refuses them unless the caller asks for the plug-in by name
//! ([`Estimator::PlugIn`]).

use serde::{Deserialize, Serialize};

use crate::{Divergence, LossConfig, LossParts, Real};

/// How sampled targets enter a loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// Forward KL at τ = 1 only: value and gradient unbiased in expectation.
    #[default]
    Unbiased,
    /// Any loss with p̂ = counts/N in place of the teacher: biased except for forward KL at
    /// τ = 1 (consistent as N grows).
    PlugIn,
}

/// Whether `cfg` may train on sampled targets with `estimator`: `Err` says why not.
///
/// With [`Estimator::Unbiased`], only forward KL at τ = 1 with the bucket tail policy is
/// accepted (the renorm policy compares the student on the drawn ids only, so its gradient
/// is not q − p̂). With [`Estimator::PlugIn`] any loss whose plug-in value is finite is
/// accepted: not reverse KL or skew reverse KL with λ = 0 (the student's mass on tokens
/// never drawn makes them +∞), nor logit MSE (it needs teacher logits on a fixed support).
pub fn check(cfg: &LossConfig, estimator: Estimator) -> Result<(), String> {
    match cfg.divergence {
        Divergence::ReverseKl | Divergence::SkewReverseKl { lambda: 0.0 } => {
            return Err(format!(
                "{} is infinite on sampled targets: the teacher's plug-in distribution is 0 \
                 on every token not drawn, where the student has mass; use forward KL, JSD or \
                 skew KL, or top-k targets",
                cfg.divergence
            ));
        }
        Divergence::LogitMse => {
            return Err(
                "logit_mse needs the teacher's logits on a fixed support; sampled targets \
                 carry counts, not logits: use top-k targets"
                    .to_string(),
            );
        }
        _ => {}
    }
    if estimator == Estimator::PlugIn {
        return Ok(());
    }
    if cfg.divergence != Divergence::ForwardKl {
        return Err(format!(
            "sampled targets give an unbiased estimate of forward KL only, not {}: its plug-in \
             estimate is biased (set the estimator to \"plug_in\" to accept that)",
            cfg.divergence
        ));
    }
    if cfg.temperature != 1.0 {
        return Err(format!(
            "sampled targets are draws at T=1: forward KL at temperature {} has no unbiased \
             estimate from them (use temperature 1, or the \"plug_in\" estimator to accept the bias)",
            cfg.temperature
        ));
    }
    if cfg.tail != crate::TailPolicy::Bucket {
        return Err(
            "sampled targets need the bucket tail policy for an unbiased gradient (renorm \
             compares the student on the drawn ids only); set tail = \"bucket\", or the \
             \"plug_in\" estimator to accept the bias"
                .to_string(),
        );
    }
    Ok(())
}

/// log p̂_j = ln(c_j / N) for counts `counts` summing to `n`: the plug-in teacher log-probs.
pub fn plug_in_logprobs(counts: &[u32], n: u32) -> Vec<f32> {
    let ln_n = f64::from(n.max(1)).ln();
    counts
        .iter()
        .map(|&c| (f64::from(c).ln() - ln_n) as f32)
        .collect()
}

/// Σ_j p̂_j (log p_j − log p̂_j): added to the plug-in KL(p̂‖q) it gives the unbiased D̂.
pub fn value_correction(counts: &[u32], n: u32, teacher_logprobs: &[f32]) -> f64 {
    let nf = f64::from(n.max(1));
    counts
        .iter()
        .zip(teacher_logprobs)
        .map(|(&c, &lp)| {
            let ph = f64::from(c) / nf;
            ph * (f64::from(lp) - ph.ln())
        })
        .sum()
}

/// The per-(seed, row, position) stream seed: FNV-1a of the row id, mixed with the seed and
/// the position (splitmix64).
pub fn stream_seed(seed: u64, row_id: &str, position: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in row_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(splitmix(h ^ seed.rotate_left(17)) ^ position)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The `n` uniforms of the stream `seed` that [`draw`] inverts, ascending: 53 random bits
/// each, in [0, 1). Draw k takes the first id whose cumulative probability exceeds `u_k`.
pub fn uniforms(n: u32, seed: u64) -> Vec<f64> {
    let mut state = seed;
    let mut us: Vec<f64> = (0..n)
        .map(|_| {
            state = splitmix(state);
            (state >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
        })
        .collect();
    us.sort_by(f64::total_cmp);
    us
}

/// N draws from softmax(`logits`) (with `lse` its log-sum-exp) using the stream `seed`:
/// `(id, count)` pairs sorted by id, counts summing to `n`. Inverse CDF over the
/// vocabulary with the N uniforms sorted: one pass over V.
pub fn draw<Z: Real>(logits: &[Z], lse: f64, n: u32, seed: u64) -> Vec<(u32, u32)> {
    let us = uniforms(n, seed);
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut cum = 0.0f64;
    let mut next = 0usize;
    let last = logits.len().saturating_sub(1);
    for (j, z) in logits.iter().enumerate() {
        cum += (z.to_f64() - lse).exp();
        let mut c = 0u32;
        // The last id takes whatever rounding left over, so every draw lands somewhere.
        while next < us.len() && (us[next] < cum || j == last) {
            c += 1;
            next += 1;
        }
        if c > 0 {
            out.push((j as u32, c));
        }
        if next == us.len() {
            break;
        }
    }
    out
}

/// One position with sampled targets.
#[derive(Debug, Clone, Copy)]
pub struct SampledPosition<'a, Z = f32> {
    /// Distinct ids drawn (each < V).
    pub ids: &'a [u32],
    /// Draws of each id; they sum to `n`.
    pub counts: &'a [u32],
    /// The teacher's T=1 log-probs of `ids` (for the reported value only).
    pub teacher_logprobs: &'a [f32],
    pub n: u32,
    /// Student logits at T=1 over the whole vocabulary.
    pub student_logits: &'a [Z],
    /// The token that actually follows (target of the hard CE).
    pub next_token: u32,
}

/// The unbiased estimator at one position: D̂ = Σ p̂_j (log p_j − log q_j), the hard CE, and
/// total = α·D̂ + (1 − α)·CE; with `grad`, ∂total/∂z = α·(q − p̂) + (1 − α)·(q − e_y),
/// overwritten. Computed in f64.
///
/// # Panics
/// If an id is out of range, the lengths differ or the counts do not sum to `n`.
pub fn sampled_forward_kl<Z: Real>(
    alpha: f64,
    p: &SampledPosition<'_, Z>,
    grad: Option<&mut [f32]>,
) -> LossParts {
    let v = p.student_logits.len();
    assert!(
        p.ids.len() == p.counts.len() && p.ids.len() == p.teacher_logprobs.len(),
        "sampled target lengths differ"
    );
    assert_eq!(
        p.counts.iter().map(|&c| u64::from(c)).sum::<u64>(),
        u64::from(p.n),
        "counts do not sum to n"
    );
    assert!(
        p.ids.iter().all(|&i| (i as usize) < v),
        "sampled id out of range"
    );
    let zs: Vec<f64> = p.student_logits.iter().map(|z| z.to_f64()).collect();
    let zmax = zs
        .iter()
        .fold(f64::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut es = vec![0.0f64; v];
    crate::math::exp_shifted(&zs, zmax, 1.0, &mut es);
    let s: f64 = es.iter().sum();
    let lse = zmax + s.ln();
    let nf = f64::from(p.n.max(1));
    let divergence: f64 = p
        .ids
        .iter()
        .zip(p.counts)
        .zip(p.teacher_logprobs)
        .map(|((&j, &c), &lp)| f64::from(c) / nf * (f64::from(lp) - (zs[j as usize] - lse)))
        .sum();
    let y = p.next_token as usize;
    let hard_ce = lse - zs[y];
    let total = alpha * divergence + (1.0 - alpha) * hard_ce;
    if let Some(g) = grad {
        assert_eq!(g.len(), v, "gradient length");
        let mut acc: Vec<f64> = es.iter().map(|&e| e / s).collect();
        for (&j, &c) in p.ids.iter().zip(p.counts) {
            acc[j as usize] -= alpha * f64::from(c) / nf;
        }
        acc[y] -= 1.0 - alpha;
        for (g, a) in g.iter_mut().zip(acc) {
            *g = a as f32;
        }
    }
    LossParts {
        divergence,
        hard_ce,
        total,
    }
}
