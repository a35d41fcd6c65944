//! Shared helpers for the integration tests: the reference file, a seeded RNG, small
//! constructors.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kd_loss::{Divergence, LossConfig, TailPolicy};

/// The float64 numpy oracle: `$KD_LOSS_CASES`, else `<workspace>/tests/reference/loss-cases.json`
/// (made by `tests/reference/loss_cases.py`).
pub fn loss_cases_path() -> PathBuf {
    match std::env::var_os("KD_LOSS_CASES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/loss-cases.json"),
    }
}

/// The parsed reference file.
pub fn loss_cases() -> serde_json::Value {
    let path = loss_cases_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reference file {} is required: {e}", path.display()));
    serde_json::from_str(&text).expect("loss-cases.json is JSON")
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("number array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| u32::try_from(x.as_u64().expect("id")).expect("id fits u32"))
        .collect()
}

pub fn tail_of(name: &str) -> TailPolicy {
    match name {
        "bucket" => TailPolicy::Bucket,
        "renorm" => TailPolicy::Renorm,
        other => panic!("unknown tail policy {other}"),
    }
}

/// Every divergence, with the given JSD β and skew λ.
pub fn all_divergences(beta: f64, lambda: f64) -> [Divergence; 6] {
    [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta },
        Divergence::SkewForwardKl { lambda },
        Divergence::SkewReverseKl { lambda },
        Divergence::LogitMse,
    ]
}

pub fn config(
    divergence: Divergence,
    temperature: f64,
    alpha: f64,
    tail: TailPolicy,
) -> LossConfig {
    LossConfig {
        divergence,
        temperature,
        alpha,
        tail,
    }
}

/// SplitMix64: deterministic, no dependencies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// `k` distinct ids below `v`, in random order.
    pub fn distinct(&mut self, v: usize, k: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (0..v as u32).collect();
        for i in 0..k {
            let j = i + self.below(v - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

/// A random teacher at one position: a full log-softmax over `v` logits of spread `scale`,
/// restricted to its `k` most likely ids (sorted by log-prob descending, as in a shard).
pub fn random_teacher(rng: &mut Rng, v: usize, k: usize, scale: f64) -> (Vec<u32>, Vec<f64>) {
    let logits: Vec<f64> = (0..v).map(|_| scale * rng.normal()).collect();
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logits.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    let mut order: Vec<u32> = (0..v as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    order.truncate(k);
    let lp = order.iter().map(|&i| logits[i as usize] - lse).collect();
    (order, lp)
}

pub fn random_logits(rng: &mut Rng, v: usize, scale: f64) -> Vec<f64> {
    (0..v).map(|_| scale * rng.normal()).collect()
}
