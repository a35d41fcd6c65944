//! Deterministic, resumable batching by token budget.

use kd_shard::Source;
use serde::{Deserialize, Serialize};

use super::RowSource;
use super::error::{Error, Result};

/// SplitMix64 (Steele, Lea & Flood 2014): the loader's only randomness, so that the order is
/// a function of `(seed, epoch)` alone and does not change with a dependency's version.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n ≥ 1), by Lemire's multiply-shift (bias below 2^-32 for n < 2^32).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Settings of a [`Batcher`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most tokens per batch counted with padding: `rows × longest (truncated) row` stays
    /// within it, except that a batch always holds at least one row.
    pub token_budget: usize,
    /// Rows longer than this many tokens are cut from the right (see [`Batch`]).
    pub max_len: usize,
    /// Token id written into padding.
    pub pad_id: u32,
    /// Shuffle seed; the order of epoch `e` depends only on `(seed, e)` and the row set.
    pub seed: u64,
    /// `Some(share)`: interleave `generated` and `scored` rows so that a `share` of each
    /// epoch's rows are generated (0 < share < 1); an epoch then ends when the first of the
    /// two kinds runs out (the rest of the other kind is skipped that epoch; each epoch
    /// reshuffles, so different rows are skipped). `None`: one shuffle of all rows.
    pub mix: Option<f64>,
    /// Stop after this many epochs; `None` iterates forever.
    pub max_epochs: Option<u64>,
}

impl Default for BatchConfig {
    /// 8192 tokens per batch, rows cut at 2048, pad id 0, seed 0, no mix, no epoch limit.
    fn default() -> Self {
        BatchConfig {
            token_budget: 8192,
            max_len: 2048,
            pad_id: 0,
            seed: 0,
            mix: None,
            max_epochs: None,
        }
    }
}

/// Where a [`Batcher`] stands: the next batch starts at row `index` of epoch `epoch`'s order.
/// Save it in a checkpoint; [`Batcher::restore`] continues with exactly the same batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LoaderPosition {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Rows of this epoch's order already handed out.
    pub index: u64,
}

/// The teacher targets of a batch's distilled positions, for one teacher.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    /// This teacher's weight in the mixture (1 for a single teacher).
    pub weight: f64,
    /// Entries per position for this teacher.
    pub k: usize,
    /// `n_pos × k` top-k ids, in the order of [`Batch::pos_row`].
    pub topk_ids: Vec<u32>,
    /// `n_pos × k` log-probabilities at T=1, aligned with `topk_ids`.
    pub topk_logprobs: Vec<f32>,
    /// `n_pos` log-probabilities of the token that actually follows.
    pub token_logprob: Vec<f32>,
}

/// One batch as plain vectors: what a trainer needs to build its tensors.
///
/// Only distilled positions appear in `pos_*` (prompt and padding never do), so a token-mean
/// loss divides by [`Batch::n_pos`]. A row longer than `max_len` keeps its first `max_len`
/// tokens and the distilled positions `t ≤ max_len - 2` (those whose next token survived);
/// a row whose prompt fills `max_len` contributes no positions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// The rows, as indices into the source.
    pub rows: Vec<usize>,
    /// Longest (truncated) row: the padded width `l`.
    pub seq_len: usize,
    /// `[b, l]` row-major token ids, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// `b` (truncated) lengths.
    pub lengths: Vec<u32>,
    /// Per distilled position: its row in the batch (0..b).
    pub pos_row: Vec<u32>,
    /// Per distilled position: its column `t`; the student's logits at `[row, t]` predict…
    pub pos_t: Vec<u32>,
    /// …this token, `input_ids[row, t + 1]`.
    pub next_token: Vec<u32>,
    /// One entry per teacher (one for a single [`crate::data::ShardSet`]).
    pub teachers: Vec<Targets>,
}

impl Batch {
    /// Number of rows `b`.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Number of distilled positions.
    pub fn n_pos(&self) -> usize {
        self.pos_row.len()
    }

    /// Each distilled position's index into the padded `[b·l]` token grid (`row·l + t`).
    pub fn flat_positions(&self) -> Vec<u32> {
        let l = self.seq_len as u32;
        self.pos_row
            .iter()
            .zip(&self.pos_t)
            .map(|(&r, &t)| r * l + t)
            .collect()
    }

    /// Gathers rows `rows` of `src` into a batch (see the type's documentation for truncation).
    pub fn collect<S: RowSource + ?Sized>(
        src: &S,
        rows: &[usize],
        max_len: usize,
        pad_id: u32,
    ) -> Batch {
        let nt = src.n_teachers();
        let lens: Vec<usize> = rows.iter().map(|&r| src.row_len(r).min(max_len)).collect();
        let l = lens.iter().copied().max().unwrap_or(0);
        let mut b = Batch {
            rows: rows.to_vec(),
            seq_len: l,
            input_ids: vec![pad_id; rows.len() * l],
            lengths: lens.iter().map(|&n| n as u32).collect(),
            teachers: (0..nt)
                .map(|j| Targets {
                    weight: src.weight(j),
                    k: src.k(j),
                    ..Targets::default()
                })
                .collect(),
            ..Batch::default()
        };
        let total: usize = rows
            .iter()
            .zip(&lens)
            .map(|(&r, &n)| n.saturating_sub(src.view(0, r).prompt_len as usize))
            .sum();
        b.pos_row.reserve(total);
        b.pos_t.reserve(total);
        b.next_token.reserve(total);
        for (j, t) in b.teachers.iter_mut().enumerate() {
            t.topk_ids.reserve(total * src.k(j));
            t.topk_logprobs.reserve(total * src.k(j));
            t.token_logprob.reserve(total);
        }
        for (bi, (&r, &n)) in rows.iter().zip(&lens).enumerate() {
            let v = src.view(0, r);
            b.input_ids[bi * l..bi * l + n].copy_from_slice(&v.input_ids[..n]);
            let pl = v.prompt_len as usize;
            let np = n.saturating_sub(pl);
            for j in 0..np {
                b.pos_row.push(bi as u32);
                b.pos_t.push((pl - 1 + j) as u32);
            }
            b.next_token.extend_from_slice(&v.input_ids[pl..pl + np]);
            for (ti, t) in b.teachers.iter_mut().enumerate() {
                let tv = if ti == 0 { v } else { src.view(ti, r) };
                let k = t.k;
                t.topk_ids.extend_from_slice(&tv.topk_ids[..np * k]);
                t.topk_logprobs
                    .extend_from_slice(&tv.topk_logprobs[..np * k]);
                t.token_logprob.extend_from_slice(&tv.token_logprob[..np]);
            }
        }
        b
    }
}

/// Hands out batches of row indices over epochs: shuffled by `(seed, epoch)`, packed to a
/// token budget, resumable from a [`LoaderPosition`].
#[derive(Clone, Debug)]
pub struct Batcher {
    cfg: BatchConfig,
    /// The candidate rows (indices into the source), ascending.
    rows: Vec<usize>,
    /// Truncated length of each candidate row.
    lens: Vec<usize>,
    /// Whether each candidate row is `generated`.
    generated: Vec<bool>,
    epoch: u64,
    index: usize,
    /// The current epoch's order, as indices into `rows`.
    order: Vec<usize>,
}

impl Batcher {
    /// A batcher over `rows` of `src` (e.g. [`crate::data::Split::train`]), at epoch 0.
    ///
    /// [`Error::Config`] when `token_budget` or `max_len` is 0, a row index is out of range,
    /// or `mix` is not in (0, 1) or the rows lack either source.
    pub fn new<S: RowSource + ?Sized>(src: &S, rows: &[usize], cfg: BatchConfig) -> Result<Self> {
        if cfg.token_budget == 0 {
            return Err(Error::config("token_budget", "must be at least 1"));
        }
        if cfg.max_len < 2 {
            return Err(Error::config("max_len", "must be at least 2"));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= src.len()) {
            return Err(Error::config(
                "rows",
                format!("row {r} out of range (source has {})", src.len()),
            ));
        }
        let mut rows = rows.to_vec();
        rows.sort_unstable();
        rows.dedup();
        let lens = rows
            .iter()
            .map(|&r| src.row_len(r).min(cfg.max_len))
            .collect();
        let generated: Vec<bool> = rows
            .iter()
            .map(|&r| src.view(0, r).source == Source::Generated)
            .collect();
        if let Some(share) = cfg.mix {
            if !(share > 0.0 && share < 1.0) {
                return Err(Error::config("mix", format!("{share} is not in (0, 1)")));
            }
            let g = generated.iter().filter(|&&g| g).count();
            if g == 0 || g == generated.len() {
                return Err(Error::config(
                    "mix",
                    format!(
                        "needs both sources; rows have {g} generated of {}",
                        rows.len()
                    ),
                ));
            }
        }
        let mut b = Batcher {
            cfg,
            rows,
            lens,
            generated,
            epoch: 0,
            index: 0,
            order: Vec::new(),
        };
        b.order = b.epoch_order(0);
        Ok(b)
    }

    /// The settings.
    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// Rows in one epoch's order (fewer than the candidates under `mix`).
    pub fn epoch_len(&self) -> usize {
        self.order.len()
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut rng = SplitMix64(self.cfg.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        rng.next_u64();
        match self.cfg.mix {
            None => {
                let mut o: Vec<usize> = (0..self.rows.len()).collect();
                rng.shuffle(&mut o);
                o
            }
            Some(share) => {
                let (mut g, mut s): (Vec<usize>, Vec<usize>) =
                    (0..self.rows.len()).partition(|&i| self.generated[i]);
                rng.shuffle(&mut g);
                rng.shuffle(&mut s);
                let (mut gi, mut si) = (0usize, 0usize);
                let mut o = Vec::with_capacity(self.rows.len());
                loop {
                    // Take a generated row while the generated count is below share × rows.
                    let want_gen = (gi as f64) < share * ((gi + si + 1) as f64);
                    let next = if want_gen {
                        g.get(gi).inspect(|_| gi += 1)
                    } else {
                        s.get(si).inspect(|_| si += 1)
                    };
                    match next {
                        Some(&i) => o.push(i),
                        None => break o,
                    }
                }
            }
        }
    }

    /// Where the next batch starts.
    pub fn position(&self) -> LoaderPosition {
        LoaderPosition {
            epoch: self.epoch,
            index: self.index as u64,
        }
    }

    /// Moves to `pos` (from [`Batcher::position`] of a batcher with the same rows and
    /// settings): the following batches are exactly those that followed `pos` before.
    /// [`Error::Restore`] when `pos.index` exceeds the epoch's length.
    pub fn restore(&mut self, pos: LoaderPosition) -> Result<()> {
        let order = self.epoch_order(pos.epoch);
        if pos.index > order.len() as u64 {
            return Err(Error::Restore {
                what: format!(
                    "index {} beyond epoch {} of {} rows",
                    pos.index,
                    pos.epoch,
                    order.len()
                ),
            });
        }
        self.order = order;
        self.epoch = pos.epoch;
        self.index = pos.index as usize;
        Ok(())
    }

    /// The next batch's row indices, or `None` after `max_epochs` (or with no rows).
    /// Batches never span two epochs.
    pub fn next_rows(&mut self) -> Option<Vec<usize>> {
        if self.index >= self.order.len() {
            if self.order.is_empty() {
                return None;
            }
            self.epoch += 1;
            self.index = 0;
            self.order = self.epoch_order(self.epoch);
        }
        if self.cfg.max_epochs.is_some_and(|m| self.epoch >= m) {
            return None;
        }
        let mut out = Vec::new();
        let mut longest = 0usize;
        while let Some(&o) = self.order.get(self.index) {
            let l = longest.max(self.lens[o]);
            if !out.is_empty() && (out.len() + 1) * l > self.cfg.token_budget {
                break;
            }
            longest = l;
            out.push(self.rows[o]);
            self.index += 1;
        }
        Some(out)
    }

    /// The next batch gathered from `src` (the source this batcher was made for).
    pub fn next_batch<S: RowSource + ?Sized>(&mut self, src: &S) -> Option<Batch> {
        let rows = self.next_rows()?;
        Some(Batch::collect(
            src,
            &rows,
            self.cfg.max_len,
            self.cfg.pad_id,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Reference: Vigna's splitmix64.c seeded with 0.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn shuffle_is_a_permutation_and_below_stays_in_range() {
        let mut r = SplitMix64(5);
        let mut v: Vec<u32> = (0..1000).collect();
        r.shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort_unstable();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}
