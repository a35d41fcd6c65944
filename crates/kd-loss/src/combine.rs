//! Several teachers combined into one sparse target.

use std::collections::HashMap;

use crate::LossError;
use crate::math::{Real, log_sum_exp, tail_mass};
use crate::position::check_topk;

/// Combines teachers `(topk_ids, topk_logprobs at T=1, weight)` over a vocabulary of
/// `vocab_size` into one top set: the union U of their ids and the T=1 log-probs of the
/// weighted average, sorted by log-prob descending (ties by id).
///
/// Per docs/design.md, "Multi-teacher": each teacher j gives a token of U outside its own top set S_j its uniform
/// tail share r_j/(V − k_j), r_j = 1 − Σ_{S_j} exp(l); then P̄(i) = Σ_j w_j·P_j(i) for i ∈ U,
/// computed as a log-sum-exp of log w_j + log P_j(i). The rest, 1 − Σ_U P̄ ≥ 0, is the
/// combined tail, implied as for a single teacher, so the result feeds a [`Position`]
/// (`Position<f64, _>`) directly. Weights must be ≥ 0 and sum to 1 within 1e-6 (they are
/// divided by their sum); returned log-probs are ≤ 0.
///
/// [`Position`]: crate::Position
pub fn combine_teachers<L: Real>(
    teachers: &[(&[u32], &[L], f64)],
    vocab_size: usize,
) -> Result<(Vec<u32>, Vec<f64>), LossError> {
    if teachers.is_empty() {
        return Err(LossError::NoTeachers);
    }
    let mut wsum = 0.0;
    for (index, &(ids, logprobs, w)) in teachers.iter().enumerate() {
        if !(w.is_finite() && w >= 0.0) {
            return Err(LossError::TeacherWeight { index, value: w });
        }
        wsum += w;
        check_topk(ids, logprobs, vocab_size).map_err(|e| LossError::Teacher {
            index,
            source: Box::new(e),
        })?;
    }
    if (wsum - 1.0).abs() > 1e-6 {
        return Err(LossError::WeightSum { sum: wsum });
    }

    struct Teacher {
        log_w: f64,
        /// log of the uniform tail share r/(V−k); `-inf` when r = 0 or k = V.
        log_share: f64,
        lookup: HashMap<u32, f64>,
    }
    let mut union: Vec<u32> = Vec::new();
    let prepared: Vec<Teacher> = teachers
        .iter()
        .map(|&(ids, logprobs, w)| {
            let l: Vec<f64> = logprobs.iter().map(|x| x.to_f64()).collect();
            let k = ids.len();
            let r = tail_mass(l.iter().copied());
            let log_share = if k < vocab_size && r > 0.0 {
                r.ln() - ((vocab_size - k) as f64).ln()
            } else {
                f64::NEG_INFINITY
            };
            union.extend_from_slice(ids);
            Teacher {
                log_w: (w / wsum).ln(),
                log_share,
                lookup: ids.iter().copied().zip(l).collect(),
            }
        })
        .collect();
    union.sort_unstable();
    union.dedup();

    let mut out: Vec<(u32, f64)> = union
        .into_iter()
        .map(|id| {
            let terms = prepared
                .iter()
                .map(|t| t.log_w + t.lookup.get(&id).copied().unwrap_or(t.log_share));
            (id, log_sum_exp(terms).min(0.0))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(out.into_iter().unzip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_weights_and_malformed_teachers() {
        let ids: &[u32] = &[0, 1];
        let lp: &[f32] = &[-0.5, -1.5];
        let none: &[(&[u32], &[f32], f64)] = &[];
        assert!(matches!(
            combine_teachers(none, 4),
            Err(LossError::NoTeachers)
        ));
        let r = combine_teachers(&[(ids, lp, 0.5)], 4);
        assert!(matches!(r, Err(LossError::WeightSum { .. })));
        let r = combine_teachers(&[(ids, lp, 1.5), (ids, lp, -0.5)], 4);
        assert!(matches!(r, Err(LossError::TeacherWeight { index: 1, .. })));
        let r = combine_teachers(&[(ids, lp, 0.5), (&[0, 9][..], lp, 0.5)], 4);
        assert!(matches!(r, Err(LossError::Teacher { index: 1, .. })));
    }
}
