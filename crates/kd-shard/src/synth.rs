//! Deterministic synthetic teacher outputs, for tests and benchmarks here and in other crates.
//!
//! [`tiny_rows`] gives small valid rows over a 300-token vocabulary. [`realistic_rows`] mimics
//! a real teacher closely enough to measure storage: Zipf-like unigram logits over the
//! vocabulary, per-position noise, a few context-boosted tokens, an exact log-softmax at T=1,
//! the top-k by probability, and next tokens sampled from the full distribution.

use crate::{Row, Source};

/// Vocabulary size of [`tiny_rows`].
pub const TINY_VOCAB: u32 = 300;

/// SplitMix64: small, fast, deterministic, good enough for fixtures.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Top-k of a log-prob vector: `(ids, logprobs)` sorted by log-prob descending.
pub fn top_k(logprobs: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let k = k.min(idx.len());
    let by_desc = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]);
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, by_desc);
    }
    idx.truncate(k);
    idx.sort_by(by_desc);
    let lps = idx.iter().map(|&i| logprobs[i as usize]).collect();
    (idx, lps)
}

/// Log-softmax at T=1, computed in f64.
pub fn log_softmax(logits: &[f64]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    logits.iter().map(|l| (l - lse) as f32).collect()
}

/// `n_rows` small valid rows with `k` entries per position over [`TINY_VOCAB`] tokens;
/// lengths, prompt lengths and sources vary. Deterministic.
pub fn tiny_rows(n_rows: usize, k: usize) -> Vec<Row> {
    tiny_rows_with_samples(n_rows, k, 0)
}

/// [`tiny_rows`] (the same rows when `n` is 0) with `n` sampled targets per position drawn
/// from each position's distribution; `k` may be 0 when `n` is not. With draws, the rows are
/// a teacher's: at three positions in four the next token is one of the position's draws, and
/// every next token's log-prob is its position's value.
pub fn tiny_rows_with_samples(n_rows: usize, k: usize, n: usize) -> Vec<Row> {
    let mut rng = Rng::new(n_rows as u64 * 1000 + k as u64);
    let mut draws = Rng::new(0x5a5a_0000 + n as u64);
    (0..n_rows)
        .map(|i| {
            let len = 2 + (i * 7 + 3) % 23;
            let prompt_len = 1 + (i % 5).min(len - 1);
            let mut input_ids: Vec<u32> = (0..len)
                .map(|_| rng.below(u64::from(TINY_VOCAB)) as u32)
                .collect();
            let n_pos = len - prompt_len;
            let mut topk_ids = Vec::with_capacity(n_pos * k);
            let mut topk_logprobs = Vec::with_capacity(n_pos * k);
            let mut token_logprob = Vec::with_capacity(n_pos);
            let mut sample_ids = Vec::with_capacity(n_pos * n);
            let mut sample_logprobs = Vec::with_capacity(n_pos * n);
            for j in 0..n_pos {
                let logits: Vec<f64> = (0..TINY_VOCAB).map(|_| 3.0 * rng.normal()).collect();
                let lp = log_softmax(&logits);
                let (ids, lps) = top_k(&lp, k);
                topk_ids.extend(ids);
                topk_logprobs.extend(lps);
                token_logprob.push(lp[rng.below(u64::from(TINY_VOCAB)) as usize]);
                let mut us: Vec<f64> = (0..n).map(|_| draws.uniform()).collect();
                us.sort_by(f64::total_cmp);
                let (mut cum, mut id) = (0.0f64, 0usize);
                for u in us {
                    while id + 1 < lp.len() && cum + f64::from(lp[id]).exp() <= u {
                        cum += f64::from(lp[id]).exp();
                        id += 1;
                    }
                    sample_ids.push(id as u32);
                    sample_logprobs.push(lp[id]);
                }
                if n > 0 {
                    let next = &mut input_ids[prompt_len + j];
                    if j % 4 != 3 {
                        *next = sample_ids[j * n + (j * 5) % n];
                    }
                    token_logprob[j] = lp[*next as usize];
                }
            }
            Row {
                id: format!("tiny-{i:05}"),
                source: if i % 3 == 0 {
                    Source::Scored
                } else {
                    Source::Generated
                },
                input_ids,
                prompt_len: prompt_len as u32,
                topk_ids,
                topk_logprobs,
                token_logprob,
                sample_ids,
                sample_logprobs,
            }
        })
        .collect()
}

/// Shape of [`realistic_rows`]' output.
#[derive(Clone, Debug)]
pub struct RealisticConfig {
    /// Vocabulary size (SmolLM-style 49152 by default).
    pub vocab: u32,
    /// Entries per position.
    pub k: usize,
    /// Number of rows.
    pub rows: usize,
    /// Prompt tokens per row (at least 1).
    pub prompt_len: usize,
    /// Distilled positions per row.
    pub positions_per_row: usize,
    /// Seed.
    pub seed: u64,
}

impl Default for RealisticConfig {
    /// 49152 vocabulary, k=32, 8 rows of 64 prompt + 250 response tokens (2000 positions).
    fn default() -> Self {
        RealisticConfig {
            vocab: 49152,
            k: 32,
            rows: 8,
            prompt_len: 64,
            positions_per_row: 250,
            seed: 42,
        }
    }
}

/// Rows that look like a real teacher's output, for measuring storage and speed.
///
/// Token `v` has a unigram rank `r(v)`; ids correlate with rank as in BPE vocabularies
/// (frequent tokens have small ids, with jitter). Each position's logits are
/// `-ln(1 + r(v)) + 1.5·N(0,1)` plus a boost of 5–14 nats on 1–4 context tokens, giving a
/// mean top-1 probability near 0.6 and a few percent of mass outside the top 32.
/// Row sources alternate generated/scored; generated responses are sampled from the teacher's
/// distribution, scored ones partly from the unigram prior.
pub fn realistic_rows(cfg: &RealisticConfig) -> Vec<Row> {
    let v = cfg.vocab as usize;
    let mut rng = Rng::new(cfg.seed);
    // id -> rank: sort ids by rank * exp(jitter): frequent tokens mostly have small ids.
    let mut keyed: Vec<(f64, u32)> = (0..cfg.vocab)
        .map(|id| (f64::from(id + 1).ln() + 1.0 * rng.normal(), id))
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut prior = vec![0f64; v];
    for (rank, &(_, id)) in keyed.iter().enumerate() {
        prior[id as usize] = -((rank + 1) as f64).ln();
    }
    // Unigram sampling table.
    let prior_lp = log_softmax(&prior);
    let mut prior_cdf = Vec::with_capacity(v);
    let mut acc = 0f64;
    for lp in &prior_lp {
        acc += f64::from(*lp).exp();
        prior_cdf.push(acc);
    }
    let sample_prior = |rng: &mut Rng| -> u32 {
        let u = rng.uniform() * acc;
        prior_cdf.partition_point(|c| *c < u).min(v - 1) as u32
    };
    let mut logits = vec![0f64; v];
    let mut rows = Vec::with_capacity(cfg.rows);
    for i in 0..cfg.rows {
        let source = if i % 2 == 0 {
            Source::Generated
        } else {
            Source::Scored
        };
        let mut input_ids: Vec<u32> = (0..cfg.prompt_len.max(1))
            .map(|_| sample_prior(&mut rng))
            .collect();
        let mut topk_ids = Vec::with_capacity(cfg.positions_per_row * cfg.k);
        let mut topk_logprobs = Vec::with_capacity(cfg.positions_per_row * cfg.k);
        let mut token_logprob = Vec::with_capacity(cfg.positions_per_row);
        for _ in 0..cfg.positions_per_row {
            for (l, p) in logits.iter_mut().zip(&prior) {
                *l = 1.2 * p + 0.8 * rng.normal();
            }
            // A plausible set of 1..=24 context tokens with decaying boosts.
            let n_boost = 1 + rng.below(24).min(rng.below(24));
            let mut boost = 6.0 + 8.0 * rng.uniform();
            for _ in 0..n_boost {
                let t = sample_prior(&mut rng) as usize;
                logits[t] += boost;
                boost -= -0.7 * (1.0 - rng.uniform()).ln();
            }
            let lp = log_softmax(&logits);
            let (ids, lps) = top_k(&lp, cfg.k);
            let next = if source == Source::Scored && rng.uniform() < 0.1 {
                sample_prior(&mut rng)
            } else {
                let u = rng.uniform();
                let mut acc = 0f64;
                let mut pick = (v - 1) as u32;
                for (t, l) in lp.iter().enumerate() {
                    acc += f64::from(*l).exp();
                    if acc > u {
                        pick = t as u32;
                        break;
                    }
                }
                pick
            };
            token_logprob.push(lp[next as usize]);
            topk_ids.extend(ids);
            topk_logprobs.extend(lps);
            input_ids.push(next);
        }
        rows.push(Row {
            id: format!("doc-{:06}", cfg.seed * 1_000_000 + i as u64),
            source,
            input_ids,
            prompt_len: cfg.prompt_len.max(1) as u32,
            topk_ids,
            topk_logprobs,
            token_logprob,
            sample_ids: Vec::new(),
            sample_logprobs: Vec::new(),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_rows_are_valid_and_deterministic() {
        let rows = tiny_rows(20, 4);
        for r in &rows {
            r.validate(4, TINY_VOCAB).unwrap();
        }
        assert_eq!(rows, tiny_rows(20, 4));
        assert!(rows.iter().any(|r| r.source == Source::Scored));
    }

    #[test]
    fn realistic_rows_are_valid() {
        let cfg = RealisticConfig {
            vocab: 2000,
            k: 8,
            rows: 3,
            prompt_len: 5,
            positions_per_row: 20,
            seed: 1,
        };
        let rows = realistic_rows(&cfg);
        assert_eq!(rows.len(), 3);
        for r in &rows {
            assert_eq!(r.n_pos(), 20);
            r.validate(8, 2000).unwrap();
        }
    }
}
