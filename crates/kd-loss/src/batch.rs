//! The batch loss: a token mean over distilled positions, parallel over positions.

use rayon::prelude::*;

use crate::math::Real;
use crate::position::loss_into;
use crate::{LossConfig, LossError, LossParts, Position};

/// Mean [`LossParts`] over `positions` (a token mean: each distilled position counts once;
/// prompt and padding positions are simply not passed) and the number of positions.
///
/// If `grads` is given it must be `n_positions × V` (position-major, all positions sharing
/// one V); row i receives ∂(mean total)/∂z_i = (1/n)·∂total_i/∂z_i. Positions run in
/// parallel with rayon; the means are summed in position order, so the result does not
/// depend on the thread count. An empty batch gives zeros and 0.
///
/// # Panics
/// As [`position_loss`](crate::position_loss), and if the positions' vocabularies differ or
/// `grads` has the wrong length.
pub fn batch_loss<L: Real, Z: Real>(
    cfg: &LossConfig,
    positions: &[Position<'_, L, Z>],
    grads: Option<&mut [f32]>,
) -> (LossParts, usize) {
    let n = positions.len();
    if n == 0 {
        return (LossParts::default(), 0);
    }
    let scale = 1.0 / n as f64;
    let parts: Vec<LossParts> = match grads {
        Some(grads) => {
            let v = positions[0].vocab_size();
            if v == 0 {
                panic!("kd-loss: {}", LossError::EmptyVocab);
            }
            if let Some((index, p)) = positions
                .iter()
                .enumerate()
                .find(|(_, p)| p.vocab_size() != v)
            {
                let e = LossError::VocabMismatch {
                    index,
                    expected: v,
                    got: p.vocab_size(),
                };
                panic!("kd-loss: {e}");
            }
            if grads.len() != n * v {
                let e = LossError::GradLength {
                    expected: n * v,
                    got: grads.len(),
                };
                panic!("kd-loss: {e}");
            }
            positions
                .par_iter()
                .zip(grads.par_chunks_mut(v))
                .map(|(p, g)| loss_into(cfg, p, Some(g), scale))
                .collect()
        }
        None => positions
            .par_iter()
            .map(|p| loss_into::<_, _, f32>(cfg, p, None, scale))
            .collect(),
    };
    let mut sum = LossParts::default();
    for p in &parts {
        sum.divergence += p.divergence;
        sum.hard_ce += p.hard_ce;
        sum.total += p.total;
    }
    let mean = LossParts {
        divergence: sum.divergence * scale,
        hard_ce: sum.hard_ce * scale,
        total: sum.total * scale,
    };
    (mean, n)
}
