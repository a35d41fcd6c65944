//! What a dump keeps of a position, reduced where the logits are: the top-k `(id, logit)`,
//! the log-sum-exp and the logit of a chosen token, so that a GPU sends back `k + 2` numbers
//! per position instead of a vocabulary row.
//!
//! Built from candle's operations only, so the same code runs on every device; on the CPU it
//! gives [`kd_model::kernels::top_k_logits`]'s order exactly (largest logit first, smallest
//! id on ties: candle's CPU sort is stable). candle's CUDA sort is a bitonic sort in shared
//! memory, which holds at most a few thousand columns and is not stable, so rows are first
//! cut into blocks that each keep their own top k, and on a GPU tied logits may come back in
//! another order.

use candle_core::{D, DType, Tensor};
use kd_model::Result;

/// Most columns one sort takes (32 KiB of indices in shared memory on CUDA).
const MAX_SORT: usize = 8192;

/// The largest `k` [`reduce`] serves; beyond it a dump copies whole rows.
pub const MAX_K: usize = MAX_SORT / 2;

/// The reduced positions of one `[n, vocab]` block of logits.
#[derive(Clone, Debug, PartialEq)]
pub struct Reduced {
    /// Entries per position.
    pub k: usize,
    /// `n·k` `(id, logit)`, each position's best first.
    pub top: Vec<(u32, f32)>,
    /// Log-sum-exp of each position's logits, computed in f64.
    pub lse: Vec<f64>,
    /// The logit of each position's `pick` (empty without picks).
    pub picked: Vec<f32>,
}

impl Reduced {
    /// Position `i`'s top entries.
    pub fn top(&self, i: usize) -> &[(u32, f32)] {
        &self.top[i * self.k..(i + 1) * self.k]
    }
}

/// Reduces `logits` `[n, vocab]` (f32, on any device) to each row's top `k` (`1 ≤ k ≤`
/// [`MAX_K`], at most the vocabulary), its log-sum-exp, and with `picks` (one id per row)
/// the logit of that id.
pub fn reduce(logits: &Tensor, k: usize, picks: Option<&[u32]>) -> Result<Reduced> {
    let (n, v) = logits.dims2()?;
    assert!((1..=MAX_K.min(v)).contains(&k), "k = {k} out of range");
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (vals, ids) = top_k(&logits, k)?;
    let x = logits.to_dtype(DType::F64)?;
    let max = x.max_keepdim(D::Minus1)?;
    let lse = (x
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max)?;
    let picked = match picks {
        Some(p) => {
            assert_eq!(p.len(), n, "one pick per row");
            let idx = Tensor::from_slice(p, (n, 1), logits.device())?;
            logits.gather(&idx, 1)?.flatten_all()?.to_vec1()?
        }
        None => Vec::new(),
    };
    let vals: Vec<f32> = vals.flatten_all()?.to_vec1()?;
    let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    Ok(Reduced {
        k,
        top: ids.into_iter().zip(vals).collect(),
        lse: lse.flatten_all()?.to_vec1()?,
        picked,
    })
}

/// Each row's `k` largest values and their column ids, best first.
fn top_k(x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let dev = x.device();
    let (n, v) = x.dims2()?;
    // Blocks hold at least twice k, so each pass shrinks a row at least by half.
    let block = (2 * k).next_power_of_two().clamp(1024, MAX_SORT);
    let mut vals = x.clone();
    let mut ids: Option<Tensor> = None;
    let mut cols = v;
    while cols > MAX_SORT {
        let nb = cols.div_ceil(block);
        let pad = nb * block - cols;
        if pad > 0 {
            let fill = Tensor::full(f32::NEG_INFINITY, (n, pad), dev)?;
            vals = Tensor::cat(&[&vals, &fill], 1)?;
            // Padding never wins against a finite logit, so its ids are never read.
            ids = match ids {
                Some(i) => Some(Tensor::cat(
                    &[&i, &Tensor::zeros((n, pad), DType::U32, dev)?],
                    1,
                )?),
                None => None,
            };
        }
        let blocks = vals.reshape((n * nb, block))?;
        let order = blocks
            .arg_sort_last_dim(false)?
            .narrow(1, 0, k)?
            .contiguous()?;
        let kept = blocks.gather(&order, 1)?;
        let kept_ids = match &ids {
            Some(i) => i.reshape((n * nb, block))?.gather(&order, 1)?,
            None => {
                let offsets = (Tensor::arange(0u32, nb as u32, dev)?.affine(block as f64, 0.0)?)
                    .repeat(n)?
                    .reshape((n * nb, 1))?;
                order.broadcast_add(&offsets)?
            }
        };
        vals = kept.reshape((n, nb * k))?;
        ids = Some(kept_ids.reshape((n, nb * k))?);
        cols = nb * k;
    }
    let order = vals
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let top = vals.gather(&order, 1)?;
    let top_ids = match ids {
        Some(i) => i.gather(&order, 1)?,
        None => order,
    };
    Ok((top, top_ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use kd_model::kernels::{log_sum_exp, top_k_logits};

    fn logits(n: usize, v: usize, seed: u64) -> Vec<f32> {
        let mut rng = kd_model::kernels::Rng::new(seed);
        // Coarse values, so that ties are common and the tie order is tested.
        (0..n * v)
            .map(|_| (rng.normal() * 4.0 * 8.0).round() / 8.0)
            .collect()
    }

    #[test]
    fn equals_the_host_path_on_the_cpu_ties_included() {
        // One width under a single sort, and widths that need one and two block passes.
        for (v, k) in [
            (1000, 7),
            (49_152, 32),
            (70_001, 1),
            (20_000, 1024),
            (151_936, 20),
        ] {
            let n = 3;
            let x = logits(n, v, v as u64);
            let t = Tensor::from_slice(&x, (n, v), &Device::Cpu).unwrap();
            let picks: Vec<u32> = (0..n as u32).map(|i| i * 5 % v as u32).collect();
            let r = reduce(&t, k, Some(&picks)).unwrap();
            for i in 0..n {
                let row = &x[i * v..(i + 1) * v];
                assert_eq!(
                    r.top(i),
                    top_k_logits(row, k).as_slice(),
                    "v {v} k {k} row {i}"
                );
                let want = log_sum_exp(row);
                assert!(
                    (r.lse[i] - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "{} {want}",
                    r.lse[i]
                );
                assert_eq!(r.picked[i], row[picks[i] as usize]);
            }
        }
    }
}
