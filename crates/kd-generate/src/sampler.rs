//! Choosing the next token: greedy or seeded sampling with temperature and top-p.
//!
//! Every row has its own random stream, seeded from the dump seed and the row id, so a row's
//! response does not depend on the batch size or on the order of the input.

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng as _, SeedableRng};
use sha2::{Digest, Sha256};

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// A per-row token chooser.
pub struct Sampler {
    cfg: SamplingConfig,
    rng: ChaCha20Rng,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig, row_id: &str) -> Self {
        let mut h = Sha256::new();
        h.update(cfg.seed.to_le_bytes());
        h.update(row_id.as_bytes());
        let seed: [u8; 32] = h.finalize().into();
        Self {
            cfg,
            rng: ChaCha20Rng::from_seed(seed),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.cfg.is_greedy()
    }

    /// Picks the next token from one position's logits (any shift of them gives the same
    /// choice).
    pub fn choose_logits(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.is_greedy() {
            return argmax(logits);
        }
        let inv_t = (1.0 / self.cfg.temperature) as f32;
        let max = logits[argmax(logits) as usize];
        // Tempered weights e^((l − max)/T), as e^(l/T − max/T) with the vectorised exp.
        let mut w: Vec<f32> = logits.iter().map(|&l| l * inv_t).collect();
        kd_model::kernels::exp_in_place(&mut w, max * inv_t);
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        // Candidates: all tokens, narrowed to the smallest set, largest logits first (ties by
        // id), whose tempered mass reaches top_p. The tokens weighing at least 1e-4 of the
        // total are the head of that order (weights grow with logits), so when their mass
        // reaches top_p the set lies among them and only they are sorted.
        let n = logits.len();
        let cmp = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut cands: Vec<u32> = Vec::new();
        if self.cfg.top_p < 1.0 {
            let heavy = (total * 1e-4) as f32;
            let mut head: Vec<u32> = (0..n as u32).filter(|&i| w[i as usize] >= heavy).collect();
            for full in [false, true] {
                if full {
                    head = (0..n as u32).collect();
                }
                head.sort_by(cmp);
                cands.clear();
                let mut acc = 0.0;
                for &i in &head {
                    cands.push(i);
                    acc += w[i as usize] as f64 / total;
                    if acc >= self.cfg.top_p {
                        break;
                    }
                }
                if acc >= self.cfg.top_p {
                    break;
                }
            }
        }
        let unit = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let pick = |ids: &mut dyn Iterator<Item = u32>, sum: f64, mut last: u32| {
            let mut u = unit * sum;
            for i in ids {
                let wi = w[i as usize] as f64;
                if u < wi {
                    return i;
                }
                u -= wi;
                last = i;
            }
            last
        };
        if cands.is_empty() {
            pick(&mut (0..n as u32), total, n as u32 - 1)
        } else {
            let sum: f64 = cands.iter().map(|&i| w[i as usize] as f64).sum();
            let last = *cands.last().expect("non-empty");
            pick(&mut cands.iter().copied(), sum, last)
        }
    }
}

/// Index of the largest value; the smallest index wins ties.
pub fn argmax<T: PartialOrd>(v: &[T]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logprobs() -> Vec<f64> {
        let raw: Vec<f64> = (0..50).map(|i| -(i as f64) * 0.3).collect();
        let lse = raw.iter().map(|x| x.exp()).sum::<f64>().ln();
        raw.iter().map(|x| x - lse).collect()
    }

    /// Log-probabilities as the logits the sampler takes.
    fn f32s(lp: &[f64]) -> Vec<f32> {
        lp.iter().map(|&l| l as f32).collect()
    }

    #[test]
    fn greedy_takes_argmax() {
        let cfg = SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(Sampler::new(cfg, "a").choose_logits(&f32s(&logprobs())), 0);
    }

    #[test]
    fn same_seed_and_id_repeat_different_ids_differ() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let lp = logprobs();
        let draw = |id: &str| {
            let mut s = Sampler::new(cfg, id);
            (0..64)
                .map(|_| s.choose_logits(&f32s(&lp)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw("x"), draw("x"));
        assert_ne!(draw("x"), draw("y"));
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        // With top_p = 0.3 only the first few tokens (mass 0.26 each, decreasing) can appear.
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 0.3,
            seed: 3,
        };
        let lp = logprobs();
        let mut s = Sampler::new(cfg, "r");
        let mut mass = 0.0;
        let mut allowed = 0;
        for l in &lp {
            allowed += 1;
            mass += l.exp();
            if mass >= 0.3 {
                break;
            }
        }
        for _ in 0..500 {
            assert!((s.choose_logits(&f32s(&lp)) as usize) < allowed);
        }
    }

    #[test]
    fn samples_stay_in_the_nucleus_of_peaked_and_flat_distributions() {
        // Peaked: few heavy tokens hold the nucleus. Flat: no token weighs 1e-4 of the total,
        // so the nucleus comes from sorting the whole vocabulary.
        let n = 20_000;
        let peaked: Vec<f32> = (0..n).map(|i| -((i * 7919 % n) as f32).sqrt()).collect();
        let flat: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 1e-3).collect();
        for (name, logits) in [("peaked", peaked), ("flat", flat)] {
            for top_p in [0.5, 0.9] {
                let t = 0.8;
                let mut order: Vec<u32> = (0..n as u32).collect();
                order.sort_by(|a, b| {
                    logits[*b as usize]
                        .total_cmp(&logits[*a as usize])
                        .then(a.cmp(b))
                });
                let w: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
                let total: f64 = w.iter().sum();
                let mut acc = 0.0;
                let mut nucleus = std::collections::HashSet::new();
                for &i in &order {
                    nucleus.insert(i);
                    acc += w[i as usize] / total;
                    if acc >= top_p {
                        break;
                    }
                }
                let cfg = SamplingConfig {
                    temperature: t,
                    top_p,
                    seed: 5,
                };
                let mut s = Sampler::new(cfg, name);
                for _ in 0..300 {
                    let c = s.choose_logits(&logits);
                    assert!(nucleus.contains(&c), "{name} top-p {top_p}: {c} outside");
                }
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let lp = vec![(0.7f64).ln(), (0.2f64).ln(), (0.1f64).ln()];
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            seed: 11,
        };
        let mut s = Sampler::new(cfg, "d");
        let n = 20000;
        let mut c = [0usize; 3];
        for _ in 0..n {
            c[s.choose_logits(&f32s(&lp)) as usize] += 1;
        }
        let f0 = c[0] as f64 / n as f64;
        assert!((f0 - 0.7).abs() < 0.02, "frequency of token 0 was {f0}");
    }
}
