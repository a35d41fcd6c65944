//! One distilled position: the loss and its exact gradient with respect to the student logits.
//!
//! # Notation
//!
//! S = teacher top-k ids (k of them) with T=1 log-probs l_i; r = 1 − Σ_S exp(l_i) (clamped
//! at 0); V = vocabulary size; z = student logits; u = z/τ; q = softmax(u) over V.
//! The compared support A is S ∪ {tail} (bucket, when k < V) or S (renorm, and bucket with
//! k = V). On A the teacher gives P and the student Q (see [`TailPolicy`]):
//!
//! * bucket: log P_i = l_i/τ − c, log P_tail = ln(V−k)·(1 − 1/τ) + ln(r)/τ − c, c the
//!   log-sum-exp of those entries; log Q_i = u_i − LSE_V(u), log Q_tail =
//!   LSE_{j∉S}(u_j) − LSE_V(u) (a log-sum-exp over the complement, never 1 − Σ).
//! * renorm: log P_i = l_i/τ − LSE_S(l/τ), log Q_i = u_i − LSE_S(u).
//!
//! # Gradient
//!
//! Each divergence is written as a function of the free coordinates y_a = log Q_a, giving
//! g_a = ∂D/∂y_a (table below), with G = Σ_a g_a. The chain rule through the log-softmax
//! (∂y_i/∂u_m = δ_im − q_m; ∂y_tail/∂u_m = [m∉S]·q_m/Q_tail − q_m) gives
//!
//! * bucket: ∂D/∂u_m = g_m − q_m·G for m ∈ S, and (q_m/Q_tail)·(g_tail − Q_tail·G) for
//!   m ∉ S, with q_m/Q_tail = exp(u_m − LSE_{j∉S} u_j) computed directly;
//! * renorm: ∂D/∂u_m = g_m − Q_m·G for m ∈ S, 0 otherwise;
//!
//! and ∂D/∂z = (1/τ)·∂D/∂u. With 0·log 0 = 0 and M the mixture of each divergence:
//!
//! | D | g_a = ∂D/∂log Q_a |
//! | --- | --- |
//! | KL(P‖Q) | −P_a |
//! | KL(Q‖P) | Q_a·(log Q_a − log P_a + 1) |
//! | JSD(β), M = βP + (1−β)Q | (1−β)·Q_a·(log Q_a − log M_a) |
//! | KL(P‖M), M = λP + (1−λ)Q | −P_a·(1−λ)·Q_a/M_a |
//! | KL(Q‖M), M = λQ + (1−λ)P | Q_a·(log Q_a − log M_a + 1 − λ·Q_a/M_a) |
//!
//! Logit MSE with d_i = (u_i − mean_S u) − (l_i/τ − mean_S l/τ) over the c ids of S with a
//! finite teacher log-prob: D = (1/c)·Σ d_i², ∂D/∂u_i = 2·d_i/c (the centring terms cancel
//! because Σ d_i = 0).
//!
//! Hard CE = LSE_V(z) − z_y at τ = 1, ∂CE/∂z_m = softmax(z)_m − [m = y].
//!
//! Total = α·τ²·D + (1−α)·CE, so ∂total/∂z = α·τ·∂D/∂u + (1−α)·∂CE/∂z.
//!
//! # Edge cases
//!
//! * k = V: no tail entry (Q_tail is an empty sum; r, ±1e-16 from rounding, is ignored).
//! * r = 0 with k < V (the stored top-k sums to ≥ 1, e.g. by rounding): the tail entry stays
//!   with P_tail = 0 and the student's Q_tail > 0, so Q is still a distribution and D ≥ 0.
//!   Forward KL, JSD, skew forward KL and skew reverse KL with λ > 0 stay finite; reverse KL
//!   (and skew reverse with λ = 0) is +inf, as it is for a `-inf` teacher log-prob in S.
//! * Logit MSE leaves out ids whose teacher log-prob is `-inf` (they carry no logit).
//! * The three log-sum-exps over V are shifted by the global maximum in one pass; the
//!   complement's sum falls back to its own maximum when its logits lie more than 600·τ
//!   below the global one (where the shared shift would underflow).

use crate::math::{GradElem, Real, log_add_exp, log_sum_exp, tail_mass};
use crate::{Divergence, LossConfig, LossError, TailPolicy};

/// One distilled position: the teacher's top-k (ids and T=1 log-probs), the student's logits
/// over the whole vocabulary (V = `student_logits.len()`), and the token that actually
/// follows. `L` and `Z` may be f32, f64, f16 or bf16; all math is done in f64.
#[derive(Debug, Clone, Copy)]
pub struct Position<'a, L = f32, Z = f32> {
    /// Teacher top-k token ids (distinct, each < V); order does not matter.
    pub topk_ids: &'a [u32],
    /// Teacher log-probabilities at T=1, aligned with `topk_ids`; `-inf` means probability 0.
    pub topk_logprobs: &'a [L],
    /// Student logits at T=1 over the whole vocabulary.
    pub student_logits: &'a [Z],
    /// The token that actually follows (target of the hard CE).
    pub next_token: u32,
}

impl<L: Real, Z: Real> Position<'_, L, Z> {
    /// The vocabulary size V (the length of `student_logits`).
    pub fn vocab_size(&self) -> usize {
        self.student_logits.len()
    }

    /// Checks what [`position_loss`] relies on: equal lengths, ids distinct and < V, every
    /// log-prob ≤ 0 or `-inf` (never NaN), at least one finite log-prob, `next_token` < V.
    pub fn validate(&self) -> Result<(), LossError> {
        self.support_mask().map(drop)
    }

    /// The membership mask of S over the vocabulary, after validation.
    fn support_mask(&self) -> Result<Vec<bool>, LossError> {
        let v = self.vocab_size();
        let mask = check_topk(self.topk_ids, self.topk_logprobs, v)?;
        if !self.topk_logprobs.iter().any(|l| l.to_f64().is_finite()) {
            return Err(LossError::NoFiniteLogprob);
        }
        if self.next_token as usize >= v {
            return Err(LossError::NextTokenOutOfRange {
                id: self.next_token,
                vocab_size: v,
            });
        }
        Ok(mask)
    }
}

/// Validates one top-k against a vocabulary of `v` tokens and returns the membership mask.
pub(crate) fn check_topk<L: Real>(
    ids: &[u32],
    logprobs: &[L],
    v: usize,
) -> Result<Vec<bool>, LossError> {
    if v == 0 {
        return Err(LossError::EmptyVocab);
    }
    if ids.len() != logprobs.len() {
        return Err(LossError::LengthMismatch {
            ids: ids.len(),
            logprobs: logprobs.len(),
        });
    }
    let mut mask = vec![false; v];
    for &id in ids {
        let slot = mask
            .get_mut(id as usize)
            .ok_or(LossError::IdOutOfRange { id, vocab_size: v })?;
        if *slot {
            return Err(LossError::DuplicateId { id });
        }
        *slot = true;
    }
    for (index, l) in logprobs.iter().enumerate() {
        let value = l.to_f64();
        if value.is_nan() || value > 0.0 {
            return Err(LossError::Logprob { index, value });
        }
    }
    Ok(mask)
}

/// The loss at one position (or the mean over a batch, from [`batch_loss`](crate::batch_loss)).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossParts {
    /// D(P, Q) before the τ² factor.
    pub divergence: f64,
    /// −log softmax(z)_y at τ = 1.
    pub hard_ce: f64,
    /// α·τ²·D + (1−α)·CE (a term whose weight is 0 is left out, so an infinite D with α = 0
    /// gives a finite total).
    pub total: f64,
}

/// The loss at one position and, if `grad` is given (length V), its exact gradient
/// ∂total/∂z, overwriting `grad`. Computed analytically in f64 (module docs give the formulas)
/// and rounded once to f32.
///
/// Non-finite cases are explicit, never NaN from the teacher side: where the teacher gives
/// probability 0 (a `-inf` log-prob, or the bucket tail with r = 0) to support the student
/// holds, reverse KL and skew reverse KL with λ = 0 are `+inf`. When D is not finite, the
/// divergence part of the gradient is left out (only the CE part is written).
///
/// # Panics
/// If `cfg` fails [`LossConfig::validate`], `p` fails [`Position::validate`], or `grad` is
/// not V long.
pub fn position_loss<L: Real, Z: Real>(
    cfg: &LossConfig,
    p: &Position<'_, L, Z>,
    grad: Option<&mut [f32]>,
) -> LossParts {
    loss_into(cfg, p, grad, 1.0)
}

/// [`position_loss`] with the gradient written in f64 (no rounding), for checks and for
/// callers that accumulate in f64.
///
/// # Panics
/// As [`position_loss`].
pub fn position_loss_f64<L: Real, Z: Real>(
    cfg: &LossConfig,
    p: &Position<'_, L, Z>,
    grad: Option<&mut [f64]>,
) -> LossParts {
    loss_into(cfg, p, grad, 1.0)
}

/// The shared implementation; the written gradient is multiplied by `scale`
/// (1/n for a batch mean) before rounding.
pub(crate) fn loss_into<L: Real, Z: Real, G: GradElem>(
    cfg: &LossConfig,
    p: &Position<'_, L, Z>,
    grad: Option<&mut [G]>,
    scale: f64,
) -> LossParts {
    let in_s = checked_support(cfg, p, grad.as_ref().map(|g| g.len()));
    let v = p.vocab_size();
    let tau = cfg.temperature;
    let alpha = cfg.alpha;
    let ids = p.topk_ids;
    let k = ids.len();
    let l: Vec<f64> = p.topk_logprobs.iter().map(|x| x.to_f64()).collect();
    let is_mse = matches!(cfg.divergence, Divergence::LogitMse);
    // The full-vocabulary tempered softmax is needed only for the bucket policy.
    let bucket = cfg.tail == TailPolicy::Bucket && !is_mse;
    let has_tail = bucket && k < v;
    let sums = StudentSums::new(p.student_logits, &in_s, tau, bucket, has_tail);
    let z = |j: usize| sums.zs[j];
    let hard_ce = sums.lse1 - z(p.next_token as usize);

    // Divergence and g = ∂D/∂(log Q) on the support (or ∂D/∂u on S for logit MSE).
    let (divergence, g, lq) = if is_mse {
        let (d, g) = logit_mse(&l, ids, &z, tau);
        (d, g, Vec::new())
    } else {
        let (lp, lq) = support_logs(
            &l, ids, &z, tau, v, bucket, has_tail, sums.lse_t, sums.lse_c,
        );
        let (d, g) = divergence_terms(cfg.divergence, &lp, &lq);
        (d, g, lq)
    };

    let total = if alpha > 0.0 {
        alpha * tau * tau * divergence
    } else {
        0.0
    } + if alpha < 1.0 {
        (1.0 - alpha) * hard_ce
    } else {
        0.0
    };

    if let Some(grad) = grad {
        // α·τ²·∂D/∂z = α·τ·∂D/∂u; the divergence part is dropped when D is not finite.
        let wd = if alpha > 0.0 && divergence.is_finite() {
            alpha * tau * scale
        } else {
            0.0
        };
        let terms = GradTerms {
            wd,
            wc: (1.0 - alpha) * scale,
            y: p.next_token as usize,
            ids,
            in_s: &in_s,
            g: &g,
            lq: &lq,
            tau,
            is_mse,
            has_tail,
        };
        terms.write(&sums, grad);
    }

    LossParts {
        divergence,
        hard_ce,
        total,
    }
}

/// Checks the loss settings, the position and the gradient's length (the panics of
/// [`position_loss`]) and returns the top-k membership of every token.
fn checked_support<L: Real, Z: Real>(
    cfg: &LossConfig,
    p: &Position<'_, L, Z>,
    grad_len: Option<usize>,
) -> Vec<bool> {
    if let Err(e) = cfg.validate() {
        panic!("kd-loss: invalid LossConfig: {e}");
    }
    let in_s = p
        .support_mask()
        .unwrap_or_else(|e| panic!("kd-loss: invalid Position: {e}"));
    let v = p.vocab_size();
    if let Some(len) = grad_len
        && len != v
    {
        let e = LossError::GradLength {
            expected: v,
            got: len,
        };
        panic!("kd-loss: {e}");
    }
    in_s
}

/// The student's log-sum-exps over V, over V tempered and over the complement of S, with
/// the exponentials kept so that the gradient divides instead of exponentiating again.
struct StudentSums {
    /// The logits in f64.
    zs: Vec<f64>,
    /// exp(z_j − max z).
    e1s: Vec<f64>,
    s1: f64,
    /// exp((z_j − max z)/τ) when τ ≠ 1 and the bucket tail is used (else empty: `e1s`).
    ets: Vec<f64>,
    /// Σ over the complement of S of the tempered terms.
    sc: f64,
    lse1: f64,
    lse_t: f64,
    lse_c: f64,
    /// Whether `lse_c` shares the global shift (and `sc` is usable).
    shared_tail: bool,
}

impl StudentSums {
    fn new<Z: Real>(logits: &[Z], in_s: &[bool], tau: f64, bucket: bool, has_tail: bool) -> Self {
        let v = logits.len();
        // Pass 1: the maximum over V (in lanes; NaN logits are skipped as `f64::max` skips
        // them).
        let zs: Vec<f64> = logits.iter().map(|x| x.to_f64()).collect();
        let zmax = crate::math::max_of(&zs);
        // Pass 2: shifted sums for LSE_V(z), LSE_V(u) and LSE_{j∉S}(u), all shifted by the
        // global maximum, and the maximum over the complement of S: one exponential per
        // token at τ = 1, two otherwise, batched (`exp_shifted`), and every sum in lanes
        // (`sum_of`: one order per length, whatever the CPU).
        let same = tau == 1.0;
        let mut e1s = vec![0.0f64; v];
        crate::math::exp_shifted(&zs, zmax, 1.0, &mut e1s);
        let s1 = crate::math::sum_of(&e1s);
        let mut ets: Vec<f64> = Vec::new();
        let (mut st, mut sc, mut zmax_c) = (0.0f64, 0.0f64, f64::NEG_INFINITY);
        if bucket {
            if !same {
                ets = vec![0.0f64; v];
                crate::math::exp_shifted(&zs, zmax, 1.0 / tau, &mut ets);
            }
            let et: &[f64] = if same { &e1s } else { &ets };
            // At τ = 1 the tempered terms are the plain ones, already summed.
            st = if same { s1 } else { crate::math::sum_of(et) };
            (sc, zmax_c) = crate::math::complement_sum_max(et, in_s, &zs);
        }
        let lse1 = zmax + s1.ln();
        let lse_t = zmax / tau + st.ln();
        // LSE_{j∉S}(u) shifted by the global maximum is exact unless the complement's
        // largest term underflows (its logits more than ~600·τ below the maximum): then
        // shift by the complement's own maximum.
        let shared_tail = has_tail && sc > 0.0 && (zmax - zmax_c) / tau < 600.0;
        let lse_c = if !has_tail {
            f64::NEG_INFINITY
        } else if shared_tail {
            zmax / tau + sc.ln()
        } else {
            let own = in_s
                .iter()
                .enumerate()
                .filter(|(_, m)| !**m)
                .map(|(j, _)| ((zs[j] - zmax_c) / tau).exp())
                .sum::<f64>();
            zmax_c / tau + own.ln()
        };
        StudentSums {
            zs,
            e1s,
            s1,
            ets,
            sc,
            lse1,
            lse_t,
            lse_c,
            shared_tail,
        }
    }

    /// The tempered terms: `ets`, or `e1s` at τ = 1.
    fn tempered(&self) -> &[f64] {
        if self.ets.is_empty() {
            &self.e1s
        } else {
            &self.ets
        }
    }
}

/// What the gradient over V is made of: the weights of the divergence (`wd` = α·τ·scale)
/// and of the hard CE (`wc` = (1 − α)·scale), and ∂D/∂(log Q) on the support.
struct GradTerms<'a> {
    wd: f64,
    wc: f64,
    y: usize,
    ids: &'a [u32],
    in_s: &'a [bool],
    g: &'a [f64],
    lq: &'a [f64],
    tau: f64,
    is_mse: bool,
    has_tail: bool,
}

impl GradTerms<'_> {
    /// Writes the gradient with respect to the logits into `grad`.
    fn write<G: GradElem>(&self, s: &StudentSums, grad: &mut [G]) {
        let (wd, wc, y, g, lq) = (self.wd, self.wc, self.y, self.g, self.lq);
        let k = self.ids.len();
        let same = s.ets.is_empty();
        // softmax(z)_j − [j = y], weighted; softmax(z)_j = e1_j / s1.
        let ce = |j: usize| {
            if wc == 0.0 {
                0.0
            } else {
                wc * (s.e1s[j] / s.s1 - if j == y { 1.0 } else { 0.0 })
            }
        };
        let ets = s.tempered();
        let g_sum: f64 = if wd != 0.0 && !self.is_mse {
            g.iter().sum()
        } else {
            0.0
        };
        // Outside S: only the bucket tail term of D, and CE.
        let tail_coef = if self.has_tail && wd != 0.0 {
            wd * (g[k] - lq[k].exp() * g_sum)
        } else {
            0.0
        };
        // Outside S the gradient is c_ce·e1_j + c_tail·et_j (less wc at the label), with
        // one vectorised pass over V when the tail shares the global shift; S is written
        // after it.
        let c_ce = if wc == 0.0 { 0.0 } else { wc / s.s1 };
        if tail_coef == 0.0 || s.shared_tail {
            let c_tail = if tail_coef == 0.0 {
                0.0
            } else {
                tail_coef / s.sc
            };
            if same || c_tail == 0.0 {
                let c = c_ce + c_tail;
                for (g, &e) in grad.iter_mut().zip(&s.e1s) {
                    *g = G::from_f64(c * e);
                }
            } else {
                for ((g, &e), &t) in grad.iter_mut().zip(&s.e1s).zip(ets) {
                    *g = G::from_f64(c_ce * e + c_tail * t);
                }
            }
            if !self.in_s[y] && wc != 0.0 {
                let t = if c_tail == 0.0 { 0.0 } else { c_tail * ets[y] };
                grad[y] = G::from_f64(c_ce * s.e1s[y] - wc + t);
            }
        } else {
            for (j, &member) in self.in_s.iter().enumerate() {
                if member {
                    continue;
                }
                let mut val = ce(j);
                // q_j / Q_tail = exp(u_j − LSE_{i∉S} u_i).
                val += tail_coef * (s.zs[j] / self.tau - s.lse_c).exp();
                grad[j] = G::from_f64(val);
            }
        }
        // On S: g_a − Q_a·G (q_a = Q_a in bucket, the renormalised Q_a in renorm), or 2d/c.
        for (a, &id) in self.ids.iter().enumerate() {
            let j = id as usize;
            let mut val = ce(j);
            if wd != 0.0 {
                val += wd
                    * if self.is_mse {
                        g[a]
                    } else {
                        g[a] - lq[a].exp() * g_sum
                    };
            }
            grad[j] = G::from_f64(val);
        }
    }
}

/// Teacher and student log-probabilities on the compared support (S in order, then the
/// tail entry if present).
#[allow(clippy::too_many_arguments)]
fn support_logs(
    l: &[f64],
    ids: &[u32],
    z: &impl Fn(usize) -> f64,
    tau: f64,
    v: usize,
    bucket: bool,
    has_tail: bool,
    lse_t: f64,
    lse_c: f64,
) -> (Vec<f64>, Vec<f64>) {
    let k = ids.len();
    let mut lp: Vec<f64> = l.iter().map(|x| x / tau).collect();
    let mut lq: Vec<f64> = ids.iter().map(|&i| z(i as usize) / tau).collect();
    if has_tail {
        // Uniform tail share log(r/(V−k)) per token, tempered, times V−k tokens.
        let r = tail_mass(l.iter().copied());
        let rest = ((v - k) as f64).ln();
        lp.push(if r > 0.0 {
            rest * (1.0 - 1.0 / tau) + r.ln() / tau
        } else {
            f64::NEG_INFINITY
        });
    }
    let c = log_sum_exp(lp.iter().copied());
    lp.iter_mut().for_each(|x| *x -= c);
    if bucket {
        lq.iter_mut().for_each(|x| *x -= lse_t);
        if has_tail {
            lq.push(lse_c - lse_t);
        }
    } else {
        let c = log_sum_exp(lq.iter().copied());
        lq.iter_mut().for_each(|x| *x -= c);
    }
    (lp, lq)
}

/// D(P, Q) and g_a = ∂D/∂log Q_a from log-probabilities (0·log 0 = 0; `+inf` where the
/// divergence is infinite).
fn divergence_terms(div: Divergence, lp: &[f64], lq: &[f64]) -> (f64, Vec<f64>) {
    let mut d = 0.0;
    let mut g = vec![0.0; lp.len()];
    for (a, (&lp, &lq)) in lp.iter().zip(lq).enumerate() {
        let (p, q) = (lp.exp(), lq.exp());
        match div {
            Divergence::ForwardKl => {
                if p > 0.0 {
                    d += p * (lp - lq);
                    g[a] = -p;
                }
            }
            Divergence::ReverseKl => {
                if q > 0.0 {
                    let t = lq - lp;
                    d += q * t;
                    g[a] = q * (t + 1.0);
                }
            }
            Divergence::Jsd { beta } => {
                let lm = log_add_exp(beta.ln() + lp, (1.0 - beta).ln() + lq);
                if p > 0.0 {
                    d += beta * p * (lp - lm);
                }
                if q > 0.0 {
                    let t = (1.0 - beta) * q * (lq - lm);
                    d += t;
                    g[a] = t;
                }
            }
            Divergence::SkewForwardKl { lambda } => {
                if p > 0.0 {
                    let lm = log_add_exp(lambda.ln() + lp, (1.0 - lambda).ln() + lq);
                    d += p * (lp - lm);
                    g[a] = -p * ((1.0 - lambda).ln() + lq - lm).exp();
                }
            }
            Divergence::SkewReverseKl { lambda } => {
                if q > 0.0 {
                    let lm = log_add_exp(lambda.ln() + lq, (1.0 - lambda).ln() + lp);
                    let t = lq - lm;
                    d += q * t;
                    let ratio = if lambda > 0.0 {
                        (lambda.ln() + lq - lm).exp()
                    } else {
                        0.0
                    };
                    g[a] = q * (t + 1.0 - ratio);
                }
            }
            Divergence::LogitMse => unreachable!("logit MSE is not a divergence of P and Q"),
        }
    }
    (d, g)
}

/// Centred logit MSE over the ids with a finite teacher log-prob, and ∂D/∂u on S.
fn logit_mse(l: &[f64], ids: &[u32], z: &impl Fn(usize) -> f64, tau: f64) -> (f64, Vec<f64>) {
    let keep: Vec<usize> = (0..l.len()).filter(|&a| l[a].is_finite()).collect();
    let c = keep.len() as f64;
    let mean_u = keep.iter().map(|&a| z(ids[a] as usize) / tau).sum::<f64>() / c;
    let mean_l = keep.iter().map(|&a| l[a] / tau).sum::<f64>() / c;
    let mut g = vec![0.0; l.len()];
    let mut d = 0.0;
    for &a in &keep {
        let diff = (z(ids[a] as usize) / tau - mean_u) - (l[a] / tau - mean_l);
        d += diff * diff;
        g[a] = 2.0 * diff / c;
    }
    (d / c, g)
}
