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
    /// Each position's sampled targets ([`draw`]; empty without them).
    pub draws: Vec<RowDraws>,
}

impl Reduced {
    /// Position `i`'s top entries.
    pub fn top(&self, i: usize) -> &[(u32, f32)] {
        &self.top[i * self.k..(i + 1) * self.k]
    }
}

/// Sampled targets to draw in [`reduce`]: `n` per row, row `i` from the stream `seeds[i]`.
#[derive(Clone, Copy, Debug)]
pub struct DrawRequest<'a> {
    pub seeds: &'a [u64],
    pub n: u32,
}

/// Reduces `logits` `[n, vocab]` (f32, on any device) to each row's top `k` (`1 ≤ k ≤`
/// [`MAX_K`], at most the vocabulary), its log-sum-exp, with `picks` (one id per row) the
/// logit of that id, and with `draws` the row's sampled targets ([`Reduced::draws`]).
pub fn reduce(
    logits: &Tensor,
    k: usize,
    picks: Option<&[u32]>,
    draws: Option<DrawRequest<'_>>,
) -> Result<Reduced> {
    let (n, v) = logits.dims2()?;
    assert!((1..=MAX_K.min(v)).contains(&k), "k = {k} out of range");
    let logits = logits.to_dtype(DType::F32)?.contiguous()?;
    let (vals, ids) = top_k(&logits, k)?;
    let x = logits.to_dtype(DType::F64)?;
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let lse = (sum.log()? + max)?;
    let picked = match picks {
        Some(p) => {
            assert_eq!(p.len(), n, "one pick per row");
            let idx = Tensor::from_slice(p, (n, 1), logits.device())?;
            logits.gather(&idx, 1)?.flatten_all()?.to_vec1()?
        }
        None => Vec::new(),
    };
    let draws = match draws {
        // The probabilities from the same exponentials as the log-sum-exp.
        Some(d) => draw(&e.broadcast_div(&sum)?, &logits, d)?,
        None => Vec::new(),
    };
    let vals: Vec<f32> = vals.flatten_all()?.to_vec1()?;
    let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    Ok(Reduced {
        k,
        top: ids.into_iter().zip(vals).collect(),
        lse: lse.flatten_all()?.to_vec1()?,
        picked,
        draws,
    })
}

/// Block of the two-level prefix sum of the draws: the CDF of a row is a product with a
/// `CDF_BLOCK`-square triangular matrix per block plus the blocks' offsets.
const CDF_BLOCK: usize = 256;

/// One row's draws: `(id, count, logit)`, ids ascending, counts summing to `n`.
pub type RowDraws = Vec<(u32, u32, f32)>;

/// `req.n` draws per row of the probabilities `p` `[m, vocab]` (f64), row `i` from the
/// stream `req.seeds[i]`, by [`kd_loss::sampled::draw`]'s inverse CDF: draw k takes the first
/// id whose cumulative probability exceeds the stream's k-th uniform, the last id whatever
/// rounding leaves over. The CDF is summed on the device in blocks, so it can differ from the
/// host's sequential sum in its last bits, which moves a draw only when a uniform falls
/// between the two (about 1e-16 of the time). Only the ids and their `logits` come back.
fn draw(p: &Tensor, logits: &Tensor, req: DrawRequest<'_>) -> Result<Vec<RowDraws>> {
    let (m, v) = p.dims2()?;
    assert_eq!(req.seeds.len(), m, "one seed per row");
    let n = req.n;
    let cdf = prefix_sum(p)?;
    let us: Vec<f64> = req
        .seeds
        .iter()
        .flat_map(|&s| kd_loss::sampled::uniforms(n, s))
        .collect();
    let us = Tensor::from_vec(us, (m, n as usize, 1), p.device())?;
    // For each uniform, the ids whose cumulative probability does not exceed it.
    let below = cdf
        .unsqueeze(1)?
        .broadcast_le(&us)?
        .to_dtype(DType::U32)?
        .sum(2)?
        .clamp(0u32, (v - 1) as u32)?;
    let picked = logits.gather(&below, 1)?;
    let ids: Vec<Vec<u32>> = below.to_vec2()?;
    let zs: Vec<Vec<f32>> = picked.to_vec2()?;
    Ok(ids
        .into_iter()
        .zip(zs)
        .map(|(ids, zs)| {
            // The uniforms ascend, so the ids do: repeats are adjacent.
            let mut out: RowDraws = Vec::new();
            for (id, z) in ids.into_iter().zip(zs) {
                match out.last_mut() {
                    Some(last) if last.0 == id => last.1 += 1,
                    _ => out.push((id, 1, z)),
                }
            }
            out
        })
        .collect())
}

/// Inclusive prefix sums along each row of `p` `[m, v]`: within blocks of [`CDF_BLOCK`]
/// columns by a product with an upper-triangular matrix of ones, plus each block's offset,
/// the exclusive prefix sum of the block totals (the same product over blocks).
fn prefix_sum(p: &Tensor) -> Result<Tensor> {
    let (m, v) = p.dims2()?;
    let dev = p.device();
    let b = CDF_BLOCK;
    let nb = v.div_ceil(b);
    let padded = if nb * b > v {
        Tensor::cat(&[p, &Tensor::zeros((m, nb * b - v), p.dtype(), dev)?], 1)?
    } else {
        p.clone()
    };
    let tri = |n: usize, strict: bool| -> Result<Tensor> {
        let mut t = vec![0f64; n * n];
        for i in 0..n {
            for j in i + usize::from(strict)..n {
                t[i * n + j] = 1.0;
            }
        }
        Ok(Tensor::from_vec(t, (n, n), dev)?)
    };
    let inner = padded.reshape((m * nb, b))?.matmul(&tri(b, false)?)?;
    let totals = inner.narrow(1, b - 1, 1)?.reshape((m, nb))?;
    let offsets = totals.matmul(&tri(nb, true)?)?;
    let cdf = inner
        .reshape((m, nb, b))?
        .broadcast_add(&offsets.unsqueeze(2)?)?
        .reshape((m, nb * b))?;
    Ok(cdf.narrow(1, 0, v)?)
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
    fn draws_on_the_device_are_the_hosts() {
        for (v, n) in [(1000, 12), (49_152, 64), (300, 1)] {
            let m = 4;
            let x: Vec<f32> = logits(m, v, v as u64 + 1).iter().map(|z| z * 0.5).collect();
            let t = Tensor::from_slice(&x, (m, v), &Device::Cpu).unwrap();
            let lse: Vec<f64> = x.chunks(v).map(log_sum_exp).collect();
            let seeds: Vec<u64> = (0..m as u64).map(|i| 977 * i + 3).collect();
            let req = DrawRequest { seeds: &seeds, n };
            let got = reduce(&t, 1, None, Some(req)).unwrap().draws;
            for i in 0..m {
                let row = &x[i * v..(i + 1) * v];
                let want = kd_loss::sampled::draw(row, lse[i], n, seeds[i]);
                let ours: Vec<(u32, u32)> = got[i].iter().map(|d| (d.0, d.1)).collect();
                assert_eq!(ours, want, "v {v} n {n} row {i}");
                for d in &got[i] {
                    assert_eq!(d.2, row[d.0 as usize]);
                }
            }
        }
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
            let r = reduce(&t, k, Some(&picks), None).unwrap();
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
