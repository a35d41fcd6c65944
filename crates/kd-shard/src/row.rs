//! One cached sequence and its invariants.

use serde::{Deserialize, Serialize};

/// Where a row's response came from; stored as the utf8 strings `"generated"` / `"scored"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The teacher generated the response.
    Generated,
    /// Existing text was scored by the teacher (teacher forcing).
    Scored,
}

impl Source {
    /// The string stored in the `source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Generated => "generated",
            Source::Scored => "scored",
        }
    }

    /// Parses the stored string; `None` for anything else.
    pub fn parse(s: &str) -> Option<Source> {
        match s {
            "generated" => Some(Source::Generated),
            "scored" => Some(Source::Scored),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Slack allowed above 0 for a log-probability (rounding of a log-softmax).
pub const LOGPROB_SLACK: f32 = 1e-4;
/// Slack allowed above 1 for the probability mass of the top-k entries of one position.
pub const MASS_SLACK: f64 = 1e-3;

/// One sequence with the teacher's top-k distribution at every distilled position.
///
/// Position convention: distilled position `t` runs over `prompt_len-1 ..= len-2` and holds
/// the teacher's T=1 distribution for predicting `input_ids[t+1]`. Position `j` (0-based,
/// `j = t - (prompt_len-1)`) owns `topk_ids[j*k .. (j+1)*k]`, `topk_logprobs[j*k .. (j+1)*k]`
/// and `token_logprob[j]`, so `n_pos = len - prompt_len`.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Stable id of the prompt or document.
    pub id: String,
    /// Whether the response was generated or scored.
    pub source: Source,
    /// The whole sequence: prompt, then response.
    pub input_ids: Vec<u32>,
    /// Leading tokens that are not distilled (at least 1: the first token has no prediction).
    pub prompt_len: u32,
    /// `n_pos * k` token ids, position-major, each position sorted by log-prob descending.
    pub topk_ids: Vec<u32>,
    /// `n_pos * k` teacher log-probabilities at T=1, aligned with `topk_ids`.
    pub topk_logprobs: Vec<f32>,
    /// `n_pos` teacher log-probabilities of the token that actually follows (`input_ids[t+1]`).
    pub token_logprob: Vec<f32>,
    /// Sampled targets (format 2): `n_pos * n` ids drawn from the teacher's T=1
    /// distribution, `n` per position, sorted by id within a position with repeats kept (an
    /// id drawn c times appears c times). Empty when the cache holds no sampled targets.
    pub sample_ids: Vec<u32>,
    /// The teacher's T=1 log-probabilities of `sample_ids`, aligned with them.
    pub sample_logprobs: Vec<f32>,
}

impl Row {
    /// The row as a reader gets it back from a shard of format 2 with `k` entries per
    /// position: every top-k log-prob within 1/1024 nats of the exact value with the tail
    /// mass kept, and the next token's log-prob the same way (see the crate docs). The row
    /// must be valid.
    ///
    /// # Panics
    /// If a log-prob is below format 2's range (about −4.2 million nats).
    pub fn as_stored_v2(&self, k: usize) -> Row {
        let e = crate::v2::encode_row(self, k).expect("a row in format 2's range");
        let (topk_logprobs, token_logprob) = crate::v2::decode(
            &e.gaps,
            &e.token_q,
            &e.tail,
            k,
            crate::LOGPROB_SCALE,
            crate::TAIL_SCALE,
        );
        Row {
            topk_logprobs,
            token_logprob,
            sample_logprobs: {
                let (_, q) = crate::v2::expand_draws(&e.sample_ids, &e.sample_q, &e.sample_counts)
                    .expect("encoded draws expand");
                crate::v2::decode_samples(&q, crate::LOGPROB_SCALE)
            },
            ..self.clone()
        }
    }

    /// Number of distilled positions, `input_ids.len() - prompt_len` (0 if `prompt_len`
    /// is out of range; [`Row::validate`] rejects that).
    pub fn n_pos(&self) -> usize {
        self.input_ids
            .len()
            .saturating_sub(self.prompt_len as usize)
    }

    /// The tokens predicted at the distilled positions, `input_ids[prompt_len..]`.
    pub fn targets(&self) -> &[u32] {
        self.input_ids
            .get(self.prompt_len as usize..)
            .unwrap_or_default()
    }

    /// Checks every invariant of the format for this row, with `k` top-k entries per
    /// position, no sampled targets and ids below `vocab_size`; see [`Row::validate_targets`].
    pub fn validate(&self, k: usize, vocab_size: u32) -> Result<(), String> {
        self.validate_targets(k, 0, vocab_size)
    }

    /// Checks every invariant of the format for this row, with `k` top-k entries and `n`
    /// sampled targets per position (either may be 0, not both) and ids below `vocab_size`.
    /// Returns a message naming the first violation.
    ///
    /// Checked: `1 <= prompt_len <= len`; lengths `n_pos*k`, `n_pos*k`, `n_pos`, `n_pos*n`,
    /// `n_pos*n`; all ids below `vocab_size`; top-k ids distinct within a position; top-k
    /// log-probs finite, `<= 0` (slack [`LOGPROB_SLACK`]), sorted descending, with
    /// `Σ exp <= 1` (slack [`MASS_SLACK`]); `token_logprob` finite and `<= 0` (same slack);
    /// sampled ids non-decreasing within a position, their log-probs finite and `<= 0`, and
    /// equal for equal ids.
    pub fn validate_targets(&self, k: usize, n: usize, vocab_size: u32) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("empty id".into());
        }
        if k == 0 && n == 0 {
            return Err("k must be at least 1 when there are no sampled targets".into());
        }
        let len = self.input_ids.len();
        let pl = self.prompt_len as usize;
        if pl == 0 {
            return Err("prompt_len is 0; it must be at least 1".into());
        }
        if pl > len {
            return Err(format!("prompt_len {pl} exceeds sequence length {len}"));
        }
        let n_pos = len - pl;
        let want = n_pos
            .checked_mul(k)
            .ok_or_else(|| format!("n_pos {n_pos} * k {k} overflows"))?;
        if self.topk_ids.len() != want {
            return Err(format!(
                "topk_ids has {} entries, expected n_pos {n_pos} * k {k} = {want}",
                self.topk_ids.len()
            ));
        }
        if self.topk_logprobs.len() != want {
            return Err(format!(
                "topk_logprobs has {} entries, expected n_pos {n_pos} * k {k} = {want}",
                self.topk_logprobs.len()
            ));
        }
        if self.token_logprob.len() != n_pos {
            return Err(format!(
                "token_logprob has {} entries, expected n_pos {n_pos}",
                self.token_logprob.len()
            ));
        }
        if let Some((i, id)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, id)| **id >= vocab_size)
        {
            return Err(format!("input_ids[{i}] = {id} >= vocab_size {vocab_size}"));
        }
        let mut seen: Vec<u32> = Vec::with_capacity(k);
        for j in 0..n_pos {
            let ids = &self.topk_ids[j * k..(j + 1) * k];
            let lps = &self.topk_logprobs[j * k..(j + 1) * k];
            let mut mass = 0.0f64;
            for (r, (&id, &lp)) in ids.iter().zip(lps).enumerate() {
                if id >= vocab_size {
                    return Err(format!(
                        "position {j} rank {r}: id {id} >= vocab_size {vocab_size}"
                    ));
                }
                if !lp.is_finite() {
                    return Err(format!(
                        "position {j} rank {r}: log-prob {lp} is not finite"
                    ));
                }
                if lp > LOGPROB_SLACK {
                    return Err(format!("position {j} rank {r}: log-prob {lp} > 0"));
                }
                if r > 0 && lp > lps[r - 1] {
                    return Err(format!(
                        "position {j}: log-probs not sorted descending at rank {r} ({} then {lp})",
                        lps[r - 1]
                    ));
                }
                mass += f64::from(lp).exp();
            }
            if mass > 1.0 + MASS_SLACK {
                return Err(format!(
                    "position {j}: top-{k} probability mass {mass:.6} exceeds 1"
                ));
            }
            seen.clear();
            seen.extend_from_slice(ids);
            seen.sort_unstable();
            if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!(
                    "position {j}: id {} appears twice in top-{k}",
                    w[0]
                ));
            }
            let tl = self.token_logprob[j];
            if !tl.is_finite() {
                return Err(format!("position {j}: token_logprob {tl} is not finite"));
            }
            if tl > LOGPROB_SLACK {
                return Err(format!("position {j}: token_logprob {tl} > 0"));
            }
        }
        self.validate_samples(n, n_pos, vocab_size)
    }

    fn validate_samples(&self, n: usize, n_pos: usize, vocab_size: u32) -> Result<(), String> {
        let want = n_pos
            .checked_mul(n)
            .ok_or_else(|| format!("n_pos {n_pos} * n {n} overflows"))?;
        if self.sample_ids.len() != want {
            return Err(format!(
                "sample_ids has {} entries, expected n_pos {n_pos} * n {n} = {want}",
                self.sample_ids.len()
            ));
        }
        if self.sample_logprobs.len() != want {
            return Err(format!(
                "sample_logprobs has {} entries, expected n_pos {n_pos} * n {n} = {want}",
                self.sample_logprobs.len()
            ));
        }
        for j in 0..if n == 0 { 0 } else { n_pos } {
            let ids = &self.sample_ids[j * n..(j + 1) * n];
            let lps = &self.sample_logprobs[j * n..(j + 1) * n];
            for (r, (&id, &lp)) in ids.iter().zip(lps).enumerate() {
                if id >= vocab_size {
                    return Err(format!(
                        "position {j} draw {r}: id {id} >= vocab_size {vocab_size}"
                    ));
                }
                if !lp.is_finite() || lp > LOGPROB_SLACK {
                    return Err(format!(
                        "position {j} draw {r}: log-prob {lp} is not finite and <= 0"
                    ));
                }
                if r > 0 && id < ids[r - 1] {
                    return Err(format!(
                        "position {j}: sampled ids not sorted at draw {r} ({} then {id})",
                        ids[r - 1]
                    ));
                }
                if r > 0 && id == ids[r - 1] && lp != lps[r - 1] {
                    return Err(format!(
                        "position {j}: id {id} drawn with two log-probs ({} and {lp})",
                        lps[r - 1]
                    ));
                }
            }
        }
        Ok(())
    }

    /// The sampled targets of position `j` as distinct `(id, count, log-prob)` triples in id
    /// order, for `n` draws per position.
    pub fn sample_counts(&self, j: usize, n: usize) -> Vec<(u32, u32, f32)> {
        counts_of(
            &self.sample_ids[j * n..(j + 1) * n],
            &self.sample_logprobs[j * n..(j + 1) * n],
        )
    }
}

/// Distinct `(id, count, log-prob)` of one position's draws (sorted by id, repeats adjacent).
pub fn counts_of(ids: &[u32], logprobs: &[f32]) -> Vec<(u32, u32, f32)> {
    let mut out: Vec<(u32, u32, f32)> = Vec::new();
    for (&id, &lp) in ids.iter().zip(logprobs) {
        match out.last_mut() {
            Some(last) if last.0 == id => last.1 += 1,
            _ => out.push((id, 1, lp)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Row {
        // len 5, prompt 2 -> positions t = 1, 2, 3 -> n_pos 3, k 2.
        Row {
            id: "a".into(),
            source: Source::Generated,
            input_ids: vec![1, 2, 3, 4, 5],
            prompt_len: 2,
            topk_ids: vec![3, 7, 4, 8, 5, 0],
            topk_logprobs: vec![-0.1, -2.5, -0.2, -1.9, -0.05, -4.0],
            token_logprob: vec![-0.1, -0.2, -0.05],
            sample_ids: Vec::new(),
            sample_logprobs: Vec::new(),
        }
    }

    #[test]
    fn good_row_passes() {
        let r = good();
        assert_eq!(r.n_pos(), 3);
        assert_eq!(r.targets(), &[3, 4, 5]);
        r.validate(2, 10).unwrap();
    }

    #[test]
    fn catches_unsorted() {
        let mut r = good();
        r.topk_logprobs.swap(0, 1);
        assert!(r.validate(2, 10).unwrap_err().contains("sorted"));
    }

    #[test]
    fn catches_non_finite() {
        for bad in [f32::NAN, f32::NEG_INFINITY, f32::INFINITY] {
            let mut r = good();
            r.topk_logprobs[3] = bad;
            assert!(r.validate(2, 10).is_err(), "{bad} accepted in topk");
            let mut r = good();
            r.token_logprob[1] = bad;
            assert!(
                r.validate(2, 10).is_err(),
                "{bad} accepted in token_logprob"
            );
        }
    }

    #[test]
    fn catches_out_of_range_ids() {
        let r = good();
        assert!(r.validate(2, 8).unwrap_err().contains("vocab_size"));
        let mut r = good();
        r.input_ids[0] = 10;
        assert!(r.validate(2, 10).unwrap_err().contains("input_ids"));
    }

    #[test]
    fn catches_positive_logprob_and_excess_mass() {
        let mut r = good();
        r.topk_logprobs[0] = 0.01;
        assert!(r.validate(2, 10).is_err());
        // Tiny rounding above 0 is allowed.
        let mut r = good();
        r.topk_logprobs[0] = 5e-5;
        r.topk_logprobs[1] = -20.0;
        r.validate(2, 10).unwrap();
        // Two entries of probability 0.6 each.
        let mut r = good();
        r.topk_logprobs[0] = 0.6f32.ln();
        r.topk_logprobs[1] = 0.6f32.ln();
        assert!(r.validate(2, 10).unwrap_err().contains("mass"));
        let mut r = good();
        r.token_logprob[2] = 0.5;
        assert!(r.validate(2, 10).is_err());
    }

    #[test]
    fn catches_shape_errors() {
        let mut r = good();
        r.topk_ids.pop();
        assert!(r.validate(2, 10).is_err());
        let mut r = good();
        r.token_logprob.push(-1.0);
        assert!(r.validate(2, 10).is_err());
        let mut r = good();
        r.prompt_len = 0;
        assert!(r.validate(2, 10).is_err());
        let mut r = good();
        r.prompt_len = 6;
        assert!(r.validate(2, 10).is_err());
        assert!(good().validate(3, 10).is_err());
        let mut r = good();
        r.topk_ids[1] = 3;
        assert!(r.validate(2, 10).unwrap_err().contains("twice"));
    }

    #[test]
    fn source_strings_round_trip() {
        for s in [Source::Generated, Source::Scored] {
            assert_eq!(Source::parse(s.as_str()), Some(s));
        }
        assert_eq!(Source::parse("other"), None);
    }
}
