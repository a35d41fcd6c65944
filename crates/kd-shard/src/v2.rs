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
    /// `sample_ids`: each position's distinct drawn ids, ascending.
    pub(crate) sample_ids: Vec<u32>,
    /// `sample_logprob_q`: `ceil(-lp · S)` of each distinct drawn id.
    pub(crate) sample_q: Vec<u32>,
    /// `sample_counts`: how many of the position's draws each distinct id is.
    pub(crate) sample_counts: Vec<u32>,
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
    let (sample_ids, sample_q, sample_counts) = distinct_draws(r)?;
    Ok(Encoded {
        gaps,
        token_q,
        tail,
        sample_ids,
        sample_q,
        sample_counts,
    })
}

/// A row's draws as distinct ids per position, with one quantized log-prob and a count each.
/// Within a position the draws are sorted by id (a valid row), so repeats are adjacent.
fn distinct_draws(r: &Row) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>), String> {
    let (mut ids, mut q, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    let positions = r.token_logprob.len();
    if r.sample_ids.is_empty() || positions == 0 {
        return Ok((ids, q, counts));
    }
    let n = r.sample_ids.len() / positions;
    for (pos_ids, pos_lps) in r.sample_ids.chunks(n).zip(r.sample_logprobs.chunks(n)) {
        let mut j = 0;
        while j < pos_ids.len() {
            let end = j + pos_ids[j..]
                .iter()
                .take_while(|&&id| id == pos_ids[j])
                .count();
            ids.push(pos_ids[j]);
            q.push(quantize(pos_lps[j]).ok_or_else(|| {
                format!("log-prob {} is below the range of format 2", pos_lps[j])
            })?);
            counts.push((end - j) as u32);
            j = end;
        }
    }
    Ok((ids, q, counts))
}

/// A row's draws in the columns of [`crate::schema::DrawLayout::TokenFirst`].
pub(crate) struct TokenFirst {
    /// `sample_token_count`: per position, how many draws are the next token.
    pub(crate) token_count: Vec<u32>,
    /// `sample_ids`: the other distinct ids of each position, by log-prob descending (ties by
    /// id ascending).
    pub(crate) ids: Vec<u32>,
    /// `sample_logprob_gaps`: their `ceil(-lp · S)` as gaps within a position (the first
    /// from 0).
    pub(crate) gaps: Vec<u32>,
    /// `sample_counts`: how many draws each of `ids` is.
    pub(crate) counts: Vec<u32>,
}

/// The distinct draws of `e` (one row with `n` draws per position and next tokens
/// `targets`) in the token-first columns. The next token's draws are counted apart when their
/// rounded log-prob is the next token's (`token_q`), as it is for every row a teacher writes;
/// otherwise they stay among the other ids, so the columns hold every row exactly.
pub(crate) fn token_first(e: &Encoded, targets: &[u32], n: usize) -> TokenFirst {
    let mut out = TokenFirst {
        token_count: Vec::with_capacity(e.token_q.len()),
        ids: Vec::new(),
        gaps: Vec::new(),
        counts: Vec::new(),
    };
    if n == 0 {
        return out;
    }
    let mut at = 0;
    let mut others: Vec<(u32, u32, u32)> = Vec::new();
    for (j, &tq) in e.token_q.iter().enumerate() {
        let next = targets.get(j).copied();
        let (mut total, mut token) = (0usize, 0u32);
        others.clear();
        while total < n && at < e.sample_ids.len() {
            let (id, q, c) = (e.sample_ids[at], e.sample_q[at], e.sample_counts[at]);
            if Some(id) == next && q == tq {
                token = c;
            } else {
                others.push((q, id, c));
            }
            total += c as usize;
            at += 1;
        }
        others.sort_unstable();
        out.token_count.push(token);
        let mut prev = 0;
        for &(q, id, c) in &others {
            out.ids.push(id);
            out.gaps.push(q - prev);
            out.counts.push(c);
            prev = q;
        }
    }
    out
}

/// The draws of token-first columns as the reader gives them back, `n` per position, sorted
/// by id with repeats: `(sample_ids, sample_q)`. `targets` and `token_q` are the positions'
/// next tokens and their `token_logprob_q`. `Err` names what is inconsistent.
pub(crate) fn expand_token_first(
    t: &TokenFirst,
    targets: &[u32],
    token_q: &[u32],
    n: usize,
) -> Result<(Vec<u32>, Vec<u32>), String> {
    let lens = [t.ids.len(), t.gaps.len(), t.counts.len()];
    if lens[1] != lens[0] || lens[2] != lens[0] {
        return Err(format!(
            "{} sampled ids, {} log-prob gaps and {} counts",
            lens[0], lens[1], lens[2]
        ));
    }
    if t.token_count.len() != token_q.len() || targets.len() != token_q.len() {
        return Err(format!(
            "{} next-token draw counts and {} next tokens for {} positions",
            t.token_count.len(),
            targets.len(),
            token_q.len()
        ));
    }
    let positions = token_q.len();
    let (mut ids, mut q) = (
        Vec::with_capacity(positions * n),
        Vec::with_capacity(positions * n),
    );
    let mut draws: Vec<(u32, u32, u32)> = Vec::new();
    let mut at = 0;
    for j in 0..positions {
        let token = t.token_count[j];
        if token as usize > n {
            return Err(format!(
                "position {j}: {token} draws of the next token, more than n = {n}"
            ));
        }
        draws.clear();
        if token > 0 {
            draws.push((targets[j], token_q[j], token));
        }
        let (mut total, mut acc) = (token as usize, 0u64);
        while total < n {
            let Some(&c) = t.counts.get(at) else {
                return Err(format!("position {j}: {total} of {n} draws stored"));
            };
            if c == 0 {
                return Err(format!("position {j}: a sampled id with count 0"));
            }
            acc += u64::from(t.gaps[at]);
            let lq = u32::try_from(acc)
                .map_err(|_| format!("position {j}: sampled log-prob gaps overflow"))?;
            draws.push((t.ids[at], lq, c));
            total += c as usize;
            at += 1;
        }
        if total != n {
            return Err(format!("position {j}: counts sum to {total}, not n = {n}"));
        }
        draws.sort_unstable_by_key(|d| d.0);
        if draws.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(format!("position {j}: a sampled id stored twice"));
        }
        for &(id, lq, c) in &draws {
            for _ in 0..c {
                ids.push(id);
                q.push(lq);
            }
        }
    }
    if at != t.ids.len() {
        return Err(format!(
            "{} sampled ids stored, {at} used by the positions' counts",
            t.ids.len()
        ));
    }
    Ok((ids, q))
}

/// The draws of a row as the reader gives them back, each id repeated by its count:
/// `(sample_ids, sample_q)` with one entry per draw. `None` when a count is 0 or the lists
/// differ in length.
pub(crate) fn expand_draws(ids: &[u32], q: &[u32], counts: &[u32]) -> Option<(Vec<u32>, Vec<u32>)> {
    if ids.len() != q.len() || ids.len() != counts.len() || counts.contains(&0) {
        return None;
    }
    let total: usize = counts.iter().map(|&c| c as usize).sum();
    let (mut out_ids, mut out_q) = (Vec::with_capacity(total), Vec::with_capacity(total));
    for ((&id, &lq), &c) in ids.iter().zip(q).zip(counts) {
        for _ in 0..c {
            out_ids.push(id);
            out_q.push(lq);
        }
    }
    Some((out_ids, out_q))
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
    let table = mass_table(scale);
    let inv_tail = 1.0 / f64::from(tail_scale);
    let mut topk = vec![0f32; gaps.len()];
    let mut shifts = vec![0f64; q.len()];
    let mut cum = vec![0i32; k];
    let k1 = k.max(1);
    for (j, (pos, out)) in gaps.chunks(k1).zip(topk.chunks_mut(k1)).enumerate() {
        // The cumulative integers; positions below 2^24 (16384 nats at S = 1024, every real
        // one) take a path in i32 and f32 that vectorises, where -c/S is exact.
        let cum = &mut cum[..pos.len()];
        let mut acc = 0u64;
        for (c, &g) in cum.iter_mut().zip(pos) {
            acc += u64::from(g);
            *c = acc as i32;
        }
        let Some(t) = table.filter(|_| acc < 1 << 24) else {
            let shift = decode_position_f64(pos, tail.get(j).copied(), inv, inv_tail, out);
            if let Some(s) = shifts.get_mut(j) {
                *s = shift;
            }
            continue;
        };
        // The mass as exp(lp_0) · Σ exp(−(c_r − c_0)/S), the sum from a table.
        let first = cum.first().copied().unwrap_or(0);
        let last = t.len() - 1;
        let rel: f64 = cum
            .iter()
            .map(|&c| t[((c - first) as usize).min(last)])
            .sum();
        let mass = (-f64::from(first) * inv).exp() * rel;
        let shift = position_shift(mass, tail.get(j).copied(), inv_tail);
        if let Some(s) = shifts.get_mut(j) {
            *s = shift;
        }
        let (inv32, shift32) = (-inv as f32, shift as f32);
        for (o, &c) in out.iter_mut().zip(cum.iter()) {
            *o = c as f32 * inv32 + shift32;
        }
    }
    let token = q
        .iter()
        .zip(&shifts)
        .map(|(&q, &s)| (-f64::from(q) * inv + s) as f32)
        .collect();
    (topk, token)
}

/// ln((1 − r)/mass) for the tail entry `tail` (r = exp(−tail/T), 0 for [`NO_TAIL`]); 0 when
/// the entry is missing or the mass is not positive.
fn position_shift(mass: f64, tail: Option<u32>, inv_tail: f64) -> f64 {
    let Some(t) = tail else {
        return 0.0;
    };
    let r = if t == NO_TAIL {
        0.0
    } else {
        (-f64::from(t) * inv_tail).exp()
    };
    if mass > 0.0 && r < 1.0 {
        (1.0 - r).ln() - mass.ln()
    } else {
        0.0
    }
}

/// One position decoded in f64 (totals beyond 2^24 or a non-standard scale): writes `out`,
/// returns the shift.
fn decode_position_f64(
    pos: &[u32],
    tail: Option<u32>,
    inv: f64,
    inv_tail: f64,
    out: &mut [f32],
) -> f64 {
    let mut acc = 0u64;
    let vals: Vec<f64> = pos
        .iter()
        .map(|&g| {
            acc += u64::from(g);
            -(acc as f64) * inv
        })
        .collect();
    let mass: f64 = vals.iter().map(|v| v.exp()).sum();
    let shift = position_shift(mass, tail, inv_tail);
    for (o, v) in out.iter_mut().zip(&vals) {
        *o = (v + shift) as f32;
    }
    shift
}

/// exp(−d / S) for d in 0..2^15 at the standard scale S = 1024, with a last entry of 0: an
/// entry more than 32 nats below a position's first weighs less than 1.3e-14 of it in the
/// position's mass. `None` for another scale (every term is then computed directly).
fn mass_table(scale: u32) -> Option<&'static [f64]> {
    const TABLE: usize = 1 << 15;
    static T: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    (scale == LOGPROB_SCALE).then(|| {
        T.get_or_init(|| {
            (0..TABLE)
                .map(|d| {
                    if d + 1 == TABLE {
                        0.0
                    } else {
                        (-(d as f64) / f64::from(LOGPROB_SCALE)).exp()
                    }
                })
                .collect()
        })
        .as_slice()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path (i32 sums, the mass from a table, f32 output) agrees with the f64
    /// reference path to a few f32 ulp on every entry, and so does the shift.
    #[test]
    fn fast_decoding_matches_the_f64_reference() {
        let mut rng = crate::synth::Rng::new(11);
        for k in [1usize, 3, 32, 64] {
            let n_pos = 50;
            let gaps: Vec<u32> = (0..n_pos * k)
                .map(|i| {
                    if i % k == 0 {
                        rng.below(4000) as u32
                    } else if rng.below(10) == 0 {
                        rng.below(40_000) as u32
                    } else {
                        rng.below(2000) as u32
                    }
                })
                .collect();
            let tail: Vec<u32> = (0..n_pos)
                .map(|j| match j % 3 {
                    0 => NO_TAIL,
                    _ => rng.below(20 << 20) as u32,
                })
                .collect();
            let q: Vec<u32> = (0..n_pos).map(|_| rng.below(9000) as u32).collect();
            let (fast, tok) = decode(&gaps, &q, &tail, k, LOGPROB_SCALE, TAIL_SCALE);
            let inv = 1.0 / f64::from(LOGPROB_SCALE);
            for j in 0..n_pos {
                let mut want = vec![0f32; k];
                let shift = decode_position_f64(
                    &gaps[j * k..(j + 1) * k],
                    Some(tail[j]),
                    inv,
                    1.0 / f64::from(TAIL_SCALE),
                    &mut want,
                );
                for (a, b) in fast[j * k..(j + 1) * k].iter().zip(&want) {
                    let ulp = f32::EPSILON * b.abs().max(1.0);
                    assert!((a - b).abs() <= 4.0 * ulp, "k {k} position {j}: {a} vs {b}");
                }
                let t = (-f64::from(q[j]) * inv + shift) as f32;
                assert!((tok[j] - t).abs() <= 4.0 * f32::EPSILON * t.abs().max(1.0));
            }
        }
    }
}
