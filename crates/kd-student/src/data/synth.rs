//! Synthetic batches for tests and benchmarks: random tokens with random teacher targets, of
//! chosen shapes, without shards.

use kd_model::testing::Rng;

use super::{Batch, Targets};

/// A batch of rows of the given lengths (right-padded), random ids below `vocab`, every
/// position from `prompt` on distilled, each towards a random top-`k` teacher distribution.
pub fn synthetic_batch(
    vocab: usize,
    lengths: &[usize],
    prompt: usize,
    k: usize,
    seed: u64,
) -> Batch {
    let mut rng = Rng::new(seed);
    let l = *lengths.iter().max().unwrap();
    let mut input_ids = vec![0u32; lengths.len() * l];
    for (r, &n) in lengths.iter().enumerate() {
        for t in 0..n {
            input_ids[r * l + t] = (rng.next_u64() % vocab as u64) as u32;
        }
    }
    let mut b = Batch {
        rows: (0..lengths.len()).collect(),
        seq_len: l,
        input_ids,
        lengths: lengths.iter().map(|&n| n as u32).collect(),
        pos_row: Vec::new(),
        pos_t: Vec::new(),
        next_token: Vec::new(),
        teachers: Vec::new(),
    };
    let mut t = Targets {
        weight: 1.0,
        k,
        topk_ids: Vec::new(),
        topk_logprobs: Vec::new(),
        token_logprob: Vec::new(),
    };
    for (r, &n) in lengths.iter().enumerate() {
        for pos in prompt.min(n - 1)..n - 1 {
            b.pos_row.push(r as u32);
            b.pos_t.push(pos as u32);
            let next = b.input_ids[r * l + pos + 1];
            b.next_token.push(next);
            // k distinct ids, the first the next token; log-probs of a random distribution
            // holding 90% of the mass.
            let mut ids = vec![next];
            while ids.len() < k {
                let id = (rng.next_u64() % vocab as u64) as u32;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let w: Vec<f64> = (0..k).map(|_| f64::from(rng.uniform()) + 0.05).collect();
            let sum: f64 = w.iter().sum();
            let lps: Vec<f32> = w.iter().map(|x| (0.9 * x / sum).ln() as f32).collect();
            t.token_logprob.push(lps[0]);
            t.topk_ids.extend(ids);
            t.topk_logprobs.extend(lps);
        }
    }
    b.teachers.push(t);
    b
}
