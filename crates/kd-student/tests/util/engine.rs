//! Shared by the engine tests: synthetic batches with teacher targets, and the comparison of
//! the kernel engine's gradients with candle autograd's.

use candle_core::{DType, Device};
use kd_loss::LossConfig;
use kd_model::LlamaConfig;
use kd_model::testing::Rng;
use kd_model::trainable::Student;
use kd_student::data::{Batch, Targets};
use kd_student::engine::KernelStudent;
use kd_student::optim::AdamWConfig;
use kd_student::train::loss_and_grads;

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

/// Relative L2 difference `‖a − b‖ / max(‖b‖, tiny)`.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - f64::from(y)).powi(2);
        n += f64::from(y).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

/// Candle autograd's gradients of `batch` by parameter name (f32).
pub fn candle_grads(
    student: &Student,
    batch: &Batch,
    loss: &LossConfig,
    chunk: usize,
) -> (f64, Vec<(String, Vec<f32>)>) {
    let (l, g) = loss_and_grads(student, batch, loss, chunk, true).unwrap();
    let g = g.unwrap();
    let out = student
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let t = g
                .get(v.as_tensor())
                .expect("every parameter has a gradient");
            let t: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (n, t)
        })
        .collect();
    (l.total, out)
}

/// The largest relative difference over parameter groups between the kernel engine's
/// gradients and candle's on `batch`, with the group's name; and the two losses.
pub fn worst_group(
    cfg: &LlamaConfig,
    seed: u64,
    batch: &Batch,
    loss: &LossConfig,
    chunk: usize,
) -> (String, f64, f64, f64) {
    let student = Student::random(cfg, seed, DType::F32, &Device::Cpu).unwrap();
    let (lc, gc) = candle_grads(&student, batch, loss, chunk);
    let mut k = KernelStudent::new(&student, AdamWConfig::default(), 256, 64, chunk).unwrap();
    let lk = k.accumulate(batch, loss, chunk).unwrap().total;
    let gk = k.gradients();
    let mut worst = (String::new(), 0.0);
    for (name, g) in &gc {
        let mine = &gk.iter().find(|(n, _)| n == name).expect("same names").1;
        let r = rel_diff(mine, g);
        if r > worst.1 {
            worst = (name.clone(), r);
        }
    }
    (worst.0, worst.1, lk, lc)
}
