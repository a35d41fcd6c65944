//! Format 2's integer log-probs: the writer's rounding and the reader's decoding, shared so
//! that [`crate::Row::as_stored_v2`] is exactly what a reader gets back.
//!
//! Per position: `gaps` (k integers) with `-cumsum(gaps)/S` the top-k log-probs rounded down
//! to a multiple of 1/S (S = [`LOGPROB_SCALE`]), and `tail` = round(-ln r · T)
//! (T = [`TAIL_SCALE`]) for the exact tail mass r = 1 − Σ exp(top-k), or [`NO_TAIL`] when
//! r ≤ 0. The reader shifts the rounded top-k of a position by one constant,
//! ln((1 − r̂)/Σ exp(rounded)), so the decoded top-k sums to 1 − r̂ and the tail mass is the
//! teacher's (to 1e-6 relative). The rounding moved each entry down by e_i ∈ [0, 1/S) and
//! the shift is a weighted mean of those e_i, so every decoded entry stays within 1/S of the
//! exact value (up to the tail's own rounding, ~1e-6·r/(1 − r) nats). The next token's
//! log-prob, rounded the same way, gets its position's shift too, so it decodes to its top-k
//! value when it is in the top k.

use crate::Row;
use crate::schema::LOGPROB_SCALE;

/// Scale of the tail column: `-ln(tail mass)` in steps of 2^-20.
pub const TAIL_SCALE: u32 = 1 << 20;
/// The tail column's value for a position whose top-k holds all the mass (r ≤ 0).
pub const NO_TAIL: u32 = u32::MAX;

/// `ceil(-lp · S)`, at least 0; `None` beyond u32.
fn quantize(lp: f32) -> Option<u32> {
    let q = (-f64::from(lp) * f64::from(LOGPROB_SCALE)).ceil().max(0.0);
    (q <= f64::from(u32::MAX)).then_some(q as u32)
}

/// A row's v2 integers, one field per integer column.
pub(crate) struct Encoded {
    /// `topk_logprob_gaps`.
    pub(crate) gaps: Vec<u32>,
    /// `token_logprob_q`.
    pub(crate) token_q: Vec<u32>,
    /// `tail_logmass_q`.
    pub(crate) tail: Vec<u32>,
    /// `sample_logprob_q`: `ceil(-lp · S)` of each draw.
    pub(crate) sample_q: Vec<u32>,
}

/// A row's v2 integers. The row is valid (each position sorted by log-prob descending), so
/// the rounded-up values are non-decreasing within a position and the gaps non-negative.
pub(crate) fn encode_row(r: &Row, k: usize) -> Result<Encoded, String> {
    let range = |lp: f32| {
        quantize(lp).ok_or_else(|| format!("log-prob {lp} is below the range of format 2"))
    };
    let mut gaps = Vec::with_capacity(r.topk_logprobs.len());
    let mut tail = Vec::with_capacity(r.token_logprob.len());
    for j in 0..r.token_logprob.len() {
        let pos = r.topk_logprobs.get(j * k..(j + 1) * k).unwrap_or_default();
        let mut prev = 0u32;
        for &lp in pos {
            let q = range(lp)?.max(prev);
            gaps.push(q - prev);
            prev = q;
        }
        let mass: f64 = pos.iter().map(|&lp| f64::from(lp).exp()).sum();
        let r = 1.0 - mass;
        tail.push(if r > 0.0 {
            let t = (-r.ln() * f64::from(TAIL_SCALE)).round();
            if t < f64::from(NO_TAIL) {
                t as u32
            } else {
                NO_TAIL
            }
        } else {
            NO_TAIL
        });
    }
    let token_q = r
        .token_logprob
        .iter()
        .map(|&lp| range(lp))
        .collect::<Result<_, _>>()?;
    let sample_q = r
        .sample_logprobs
        .iter()
        .map(|&lp| range(lp))
        .collect::<Result<_, _>>()?;
    Ok(Encoded {
        gaps,
        token_q,
        tail,
        sample_q,
    })
}

/// The sampled targets' log-probs: `-q / scale` (each within 1/scale nats of the exact value).
pub(crate) fn decode_samples(q: &[u32], scale: u32) -> Vec<f32> {
    let inv = 1.0 / f64::from(scale);
    q.iter().map(|&q| (-f64::from(q) * inv) as f32).collect()
}

/// The log-probs of a v2 row: `(topk_logprobs, token_logprob)`. Top-k: `-cumsum(gaps per
/// position) / scale`, each position shifted so that its mass is 1 − tail (see the module
/// docs); the next token's: `-q / scale` with the same shift, so a next token that is in the
/// top k decodes to its top-k value. A position whose tail entry is missing (a ragged row,
/// which the reader refuses first) is left unshifted.
pub(crate) fn decode(
    gaps: &[u32],
    q: &[u32],
    tail: &[u32],
    k: usize,
    scale: u32,
    tail_scale: u32,
) -> (Vec<f32>, Vec<f32>) {
    let inv = 1.0 / f64::from(scale);
    let mut topk = Vec::with_capacity(gaps.len());
    let mut shifts = Vec::with_capacity(q.len());
    let mut vals: Vec<f64> = Vec::with_capacity(k);
    for (j, pos) in gaps.chunks(k.max(1)).enumerate() {
        vals.clear();
        let mut acc = 0u64;
        for &g in pos {
            acc += u64::from(g);
            vals.push(-(acc as f64) * inv);
        }
        let shift = match tail.get(j) {
            Some(&t) => {
                let r = if t == NO_TAIL {
                    0.0
                } else {
                    (-f64::from(t) / f64::from(tail_scale)).exp()
                };
                let mass = position_mass(pos, vals.first().copied().unwrap_or(0.0), scale);
                if mass > 0.0 && r < 1.0 {
                    (1.0 - r).ln() - mass.ln()
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        shifts.push(shift);
        topk.extend(vals.iter().map(|v| (v + shift) as f32));
    }
    let token = q
        .iter()
        .enumerate()
        .map(|(j, &q)| (-f64::from(q) * inv + shifts.get(j).copied().unwrap_or(0.0)) as f32)
        .collect();
    (topk, token)
}

/// Σ exp(lp) over one position from its gaps: exp(lp_0) once, then each next term is the
/// previous one times exp(−gap/scale), read from a table for gaps below 4096 (one
/// exponential per position instead of k; the products agree with direct exponentials to a
/// few ulp).
fn position_mass(gaps: &[u32], first: f64, scale: u32) -> f64 {
    const TABLE: usize = 4096;
    static STEPS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    let table = STEPS.get_or_init(|| {
        (0..TABLE)
            .map(|g| (-(g as f64) / f64::from(LOGPROB_SCALE)).exp())
            .collect()
    });
    let step = |g: u32| {
        if scale == LOGPROB_SCALE && (g as usize) < TABLE {
            table[g as usize]
        } else {
            (-f64::from(g) / f64::from(scale)).exp()
        }
    };
    let mut e = first.exp();
    let mut mass = e;
    for &g in gaps.iter().skip(1) {
        e *= step(g);
        mass += e;
    }
    mass
}
