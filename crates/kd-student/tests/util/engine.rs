//! Shared by the engine tests: synthetic batches with teacher targets, and the comparison of
//! the kernel engine's gradients with candle autograd's.

use candle_core::{DType, Device};
use kd_loss::LossConfig;
use kd_model::LlamaConfig;
use kd_model::trainable::Student;
use kd_student::data::Batch;
pub use kd_student::data::synthetic_batch;
use kd_student::engine::KernelStudent;
use kd_student::optim::AdamWConfig;
use kd_student::train::loss_and_grads;

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
