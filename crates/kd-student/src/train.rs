//! One training step's arithmetic: the student's loss on a batch of distilled positions and
//! the gradients of every parameter.
//!
//! The output head is where memory goes (`positions × vocabulary` logits), so it is handled
//! outside autograd: logits are computed in chunks on detached hidden states, `kd_loss` gives
//! the exact loss and `∂L/∂z` in f64, and the head's two products are done by hand
//! (`∂L/∂h = G·W`, `∂L/∂W = Gᵀ·h`). Autograd then runs once through the transformer from the
//! surrogate `Σ h ⊙ stop_grad(∂L/∂h)`, whose gradient is exactly `∂L/∂h`.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use kd_loss::{LossConfig, LossParts, Position};
use kd_model::trainable::Student;

use crate::data::Batch;
use crate::error::{Result, error};

/// Loss means over the batch's distilled positions (token mean; prompt and padding excluded).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BatchLoss {
    pub divergence: f64,
    pub hard_ce: f64,
    pub total: f64,
    pub positions: usize,
}

/// The head weight the student multiplies hidden states by (the embedding when tied).
fn head_var(student: &Student) -> Var {
    let vars = student.named_vars();
    let find = |n: &str| {
        vars.iter()
            .find(|(name, _)| name == n)
            .map(|(_, v)| v.clone())
    };
    find("lm_head.weight")
        .or_else(|| find("model.embed_tokens.weight"))
        .expect("a student has an embedding")
}

/// The distribution each distilled position is pulled towards: the single teacher's top-k,
/// or with several teachers their weighted mixture over the union of their top-k sets
/// (docs/design.md, "Multi-teacher"; each teacher's tail mass is spread uniformly and added).
#[derive(Clone, Debug, Default)]
pub struct PositionTargets {
    start: Vec<usize>,
    ids: Vec<u32>,
    logprobs: Vec<f64>,
}

impl PositionTargets {
    /// The targets of every position of `batch` for a vocabulary of `vocab` tokens.
    pub fn of(batch: &Batch, vocab: usize) -> Result<PositionTargets> {
        let n = batch.n_pos();
        let mut t = PositionTargets {
            start: Vec::with_capacity(n + 1),
            ..Default::default()
        };
        t.start.push(0);
        if let [one] = batch.teachers.as_slice() {
            t.ids.extend_from_slice(&one.topk_ids);
            t.logprobs
                .extend(one.topk_logprobs.iter().map(|&x| f64::from(x)));
            t.start.extend((1..=n).map(|p| p * one.k));
            return Ok(t);
        }
        for p in 0..n {
            let parts: Vec<(&[u32], &[f32], f64)> = batch
                .teachers
                .iter()
                .map(|x| {
                    (
                        &x.topk_ids[p * x.k..(p + 1) * x.k],
                        &x.topk_logprobs[p * x.k..(p + 1) * x.k],
                        x.weight,
                    )
                })
                .collect();
            let (ids, lps) = kd_loss::combine_teachers(&parts, vocab)
                .map_err(|e| error!(Setting, "combining the teachers: {e}"))?;
            t.ids.extend_from_slice(&ids);
            t.logprobs.extend_from_slice(&lps);
            t.start.push(t.ids.len());
        }
        Ok(t)
    }

    /// Ids and log-probabilities of position `p`.
    pub fn get(&self, p: usize) -> (&[u32], &[f64]) {
        let r = self.start[p]..self.start[p + 1];
        (&self.ids[r.clone()], &self.logprobs[r])
    }

    /// Positions `s..s + n` of `batch` as the loss takes them, with the student's logits
    /// `z` (`[n, vocab]`, one row per position).
    pub fn positions<'a>(
        &'a self,
        batch: &Batch,
        s: usize,
        z: &'a [f32],
        vocab: usize,
    ) -> Vec<kd_loss::Position<'a, f64, f32>> {
        (0..z.len() / vocab.max(1))
            .map(|i| {
                let (topk_ids, topk_logprobs) = self.get(s + i);
                kd_loss::Position {
                    topk_ids,
                    topk_logprobs,
                    student_logits: &z[i * vocab..(i + 1) * vocab],
                    next_token: batch.next_token[s + i],
                }
            })
            .collect()
    }

    /// The teacher's most probable token at position `p`.
    pub fn argmax(&self, p: usize) -> u32 {
        let (ids, lps) = self.get(p);
        let mut best = 0;
        for i in 1..ids.len() {
            if lps[i] > lps[best] {
                best = i;
            }
        }
        ids[best]
    }
}

/// Loss and gradients for `batch` (towards its [`PositionTargets`]). `chunk` bounds how many
/// positions' full-vocabulary logits exist at once. With `want_grads = false` only the loss is
/// computed (evaluation).
pub fn loss_and_grads(
    student: &Student,
    batch: &Batch,
    cfg: &LossConfig,
    chunk: usize,
    want_grads: bool,
) -> Result<(BatchLoss, Option<GradStore>)> {
    let n = batch.pos_row.len();
    if n == 0 {
        return Ok((BatchLoss::default(), None));
    }
    let dev = student.device().clone();
    let (b, l) = (batch.batch_size(), batch.seq_len);
    let ids = Tensor::from_vec(batch.input_ids.clone(), (b, l), &dev)?;
    let lengths: Vec<usize> = batch.lengths.iter().map(|&x| x as usize).collect();
    let hidden = student.forward(&ids, &lengths)?;
    let d = hidden.dim(2)?;
    let idx = batch.flat_positions();
    let sel = hidden
        .reshape((b * l, d))?
        .index_select(&Tensor::from_vec(idx, n, &dev)?, 0)?;
    let sel_d = sel.detach();
    let head = head_var(student);
    let w = head.as_tensor().detach();
    let v = student.vocab_size();
    let targets = PositionTargets::of(batch, v)?;
    let mut sums = LossParts {
        divergence: 0.0,
        hard_ce: 0.0,
        total: 0.0,
    };
    let mut dh_parts = Vec::new();
    let mut dw: Option<Tensor> = None;
    let chunk = chunk.max(1);
    for s in (0..n).step_by(chunk) {
        let len = chunk.min(n - s);
        let h_c = sel_d.narrow(0, s, len)?;
        let z = student
            .product(&h_c, &w.t()?)?
            .to_dtype(candle_core::DType::F32)?;
        let z: Vec<f32> = z.flatten_all()?.to_vec1()?;
        let positions: Vec<Position<'_, f64, f32>> = (0..len)
            .map(|i| {
                let p = s + i;
                let (topk_ids, topk_logprobs) = targets.get(p);
                Position {
                    topk_ids,
                    topk_logprobs,
                    student_logits: &z[i * v..(i + 1) * v],
                    next_token: batch.next_token[p],
                }
            })
            .collect();
        let mut g = if want_grads {
            vec![0f32; len * v]
        } else {
            Vec::new()
        };
        let (means, _) =
            kd_loss::batch_loss(cfg, &positions, want_grads.then_some(g.as_mut_slice()));
        sums.divergence += means.divergence * len as f64;
        sums.hard_ce += means.hard_ce * len as f64;
        sums.total += means.total * len as f64;
        if want_grads {
            // kd_loss scales by 1/len; the batch mean needs 1/n.
            let g = (Tensor::from_vec(g, (len, v), &dev)?.to_dtype(w.dtype())?
                * (len as f64 / n as f64))?;
            dh_parts.push(student.product(&g, &w)?);
            let gw = student.product(&g.t()?, &h_c)?;
            dw = Some(match dw {
                Some(acc) => (acc + gw)?,
                None => gw,
            });
        }
    }
    let loss = BatchLoss {
        divergence: sums.divergence / n as f64,
        hard_ce: sums.hard_ce / n as f64,
        total: sums.total / n as f64,
        positions: n,
    };
    if !want_grads {
        return Ok((loss, None));
    }
    let dh = Tensor::cat(&dh_parts, 0)?;
    let surrogate = (&sel * &dh)?.sum_all()?;
    let mut grads = surrogate.backward()?;
    // A GPU's memory is at its peak now (the CPU has none to sample).
    crate::plan::sample_device_memory(&dev);
    let dw = dw.expect("at least one chunk");
    let total_w = match grads.get(head.as_tensor()) {
        Some(g) => (g + dw)?,
        None => dw,
    };
    grads.insert(head.as_tensor(), total_w);
    Ok((loss, Some(grads)))
}

/// The loss of micro-batches taken as one step: their means weighted by distilled positions.
pub fn combine_losses(micro: &[BatchLoss]) -> BatchLoss {
    let n_pos: usize = micro.iter().map(|l| l.positions).sum();
    let mut loss = BatchLoss {
        positions: n_pos,
        ..Default::default()
    };
    for l in micro {
        let w = l.positions as f64 / n_pos.max(1) as f64;
        loss.divergence += w * l.divergence;
        loss.hard_ce += w * l.hard_ce;
        loss.total += w * l.total;
    }
    loss
}

/// Combines micro-batches into one step: the loss and every gradient are averaged weighted by
/// distilled positions, which equals the token mean over all of them (gradient accumulation).
pub fn combine_micro_batches(
    mut micro: Vec<(BatchLoss, GradStore)>,
    params: &[(String, Var)],
) -> kd_model::Result<(BatchLoss, GradStore)> {
    let n_pos: usize = micro.iter().map(|(l, _)| l.positions).sum();
    let losses: Vec<BatchLoss> = micro.iter().map(|(l, _)| *l).collect();
    let loss = combine_losses(&losses);
    let weights: Vec<f64> = micro
        .iter()
        .map(|(l, _)| l.positions as f64 / n_pos.max(1) as f64)
        .collect();
    if micro.len() == 1 {
        let (_, g) = micro.pop().expect("one micro-batch");
        return Ok((loss, g));
    }
    let mut sums = Vec::new();
    for (_, var) in params {
        let mut sum: Option<Tensor> = None;
        for ((_, g), w) in micro.iter().zip(&weights) {
            if let Some(t) = g.get(var.as_tensor()) {
                let t = (t * *w)?;
                sum = Some(match sum {
                    Some(s) => (s + t)?,
                    None => t,
                });
            }
        }
        sums.push((var.clone(), sum));
    }
    let Some(mut acc) = micro.into_iter().next().map(|(_, g)| g) else {
        // No micro-batch had a distilled position: an empty step the caller refuses.
        return Ok((loss, GradStore::default()));
    };
    for (var, sum) in sums {
        if let Some(s) = sum {
            acc.insert(var.as_tensor(), s);
        }
    }
    Ok((loss, acc))
}
