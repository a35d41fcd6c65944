//! The teacher pass: batched generation with a KV cache, teacher-forced scoring, and capture
//! of the top-k log-probabilities (and, when asked, sampled targets) at every response
//! position.

use kd_model::kernels::{log_sum_exp, top_k_logits};
use kd_model::{KvCache, Llama};
use rayon::prelude::*;

use crate::sampler::{Sampler, SamplingConfig};
use kd_model::Result;

/// The teacher's distribution at consecutive response positions, flattened position-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capture {
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f32>,
    /// Log-prob of the token that actually follows each position.
    pub token_logprob: Vec<f32>,
    /// Sampled targets: `n` ids per position drawn at T=1, sorted by id, repeats kept.
    pub sample_ids: Vec<u32>,
    /// The teacher's T=1 log-probs of `sample_ids`.
    pub sample_logprobs: Vec<f32>,
}

/// Sampled targets to draw at every position: `n` draws from the stream
/// [`kd_loss::sampled::stream_seed`]`(seed, row id, position)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Draws {
    /// Draws per position; 0 for none.
    pub n: u32,
    /// The dump's seed.
    pub seed: u64,
}

impl Capture {
    /// Appends one position from its full-vocabulary logits: the top-k, the next token's
    /// log-probability at T=1 (`logit − logsumexp`, in f64) and, with `draws.n > 0`, `n` ids
    /// drawn from softmax(logits) with the stream of (seed, `row_id`, `position`), where
    /// `position` counts the row's distilled positions from 0.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        logits: &[f32],
        lse: f64,
        top: &[(u32, f32)],
        next: u32,
        draws: Draws,
        row_id: &str,
        position: usize,
    ) {
        self.record_top(lse, top, logits[next as usize]);
        if draws.n > 0 {
            let seed = kd_loss::sampled::stream_seed(draws.seed, row_id, position as u64);
            let drawn: Vec<(u32, u32, f32)> = kd_loss::sampled::draw(logits, lse, draws.n, seed)
                .into_iter()
                .map(|(id, c)| (id, c, logits[id as usize]))
                .collect();
            self.record_draws(lse, &drawn);
        }
    }

    /// Appends one position's top-k and next-token log-prob from their logits and the
    /// position's log-sum-exp (what [`crate::reduce`] sends back).
    fn record_top(&mut self, lse: f64, top: &[(u32, f32)], next_logit: f32) {
        for &(id, l) in top {
            self.topk_ids.push(id);
            self.topk_logprobs.push((l as f64 - lse) as f32);
        }
        self.token_logprob.push((next_logit as f64 - lse) as f32);
    }

    /// Appends one position's draws (`(id, count, logit)`, ids ascending), each id `count`
    /// times.
    fn record_draws(&mut self, lse: f64, draws: &[(u32, u32, f32)]) {
        for &(id, c, z) in draws {
            let lp = (z as f64 - lse) as f32;
            for _ in 0..c {
                self.sample_ids.push(id);
                self.sample_logprobs.push(lp);
            }
        }
    }

    /// A position reduced on the device: its top-k, next-token log-prob and draws.
    fn record_reduced(
        &mut self,
        red: &crate::reduce::Reduced,
        j: usize,
        k: usize,
        next_logit: f32,
    ) {
        let top = red.top(j);
        self.record_top(red.lse[j], &top[..k.min(top.len())], next_logit);
        if let Some(d) = red.draws.get(j) {
            self.record_draws(red.lse[j], d);
        }
    }

    fn extend(&mut self, other: Capture) {
        self.topk_ids.extend(other.topk_ids);
        self.topk_logprobs.extend(other.topk_logprobs);
        self.token_logprob.extend(other.token_logprob);
        self.sample_ids.extend(other.sample_ids);
        self.sample_logprobs.extend(other.sample_logprobs);
    }
}

/// The logits of the positions in hand: whole rows `[n · vocab]` on the host, or reduced.
enum Logits {
    Rows(Vec<f32>),
    Reduced(crate::reduce::Reduced),
}

impl Logits {
    fn empty(reduced: bool, k: usize) -> Self {
        if reduced {
            Logits::Reduced(crate::reduce::Reduced {
                k,
                top: Vec::new(),
                lse: Vec::new(),
                picked: Vec::new(),
                draws: Vec::new(),
            })
        } else {
            Logits::Rows(Vec::new())
        }
    }

    /// Adds the positions of `other` after these (both of one kind).
    fn extend(&mut self, other: Logits) {
        match (self, other) {
            (Logits::Rows(a), Logits::Rows(b)) => a.extend(b),
            (Logits::Reduced(a), Logits::Reduced(b)) => {
                a.top.extend(b.top);
                a.lse.extend(b.lse);
                a.picked.extend(b.picked);
                a.draws.extend(b.draws);
            }
            _ => unreachable!("one engine reduces all its logits or none"),
        }
    }
}

/// Why a generated response ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// An end-of-sequence or end-of-turn token (included in the response).
    EndToken,
    MaxNewTokens,
    ContextFull,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    pub response: Vec<u32>,
    pub capture: Capture,
    pub stop: Stop,
}

/// Counters for throughput reporting.
#[derive(Clone, Copy, Debug, Default)]
pub struct Work {
    pub prefill_tokens: u64,
    pub generated_tokens: u64,
    pub scored_tokens: u64,
    /// Wall time spent prefilling prompts while generating (the rest is decoding).
    pub prefill_seconds: f64,
}

/// Runs the teacher for one dump.
pub struct Engine<'a> {
    pub model: &'a Llama,
    /// Top-k entries per position (0: sampled targets only).
    pub top_k: usize,
    /// Sampled targets per position.
    pub draws: Draws,
    pub stop_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Most positions whose full-vocabulary logits are held at once while scoring.
    pub logits_chunk: usize,
    /// Called with the number of rows just finished and the tokens generated or scored so far
    /// (progress reporting).
    pub on_rows_done: Option<&'a (dyn Fn(usize, u64) + Sync)>,
    /// Reduce the logits where they are ([`crate::reduce`]) and copy back only the top-k,
    /// the log-sum-exp, the next token's logit and the sampled targets, when nothing needs
    /// the whole row (greedy decoding or scoring, `top_k ≤` [`crate::reduce::MAX_K`]). The
    /// dump sets it on a GPU.
    pub reduce_on_device: bool,
}

impl Engine<'_> {
    /// Generates a response for each `(row id, prompt ids)` and captures the teacher's top-k
    /// at every response position. Up to `batch` rows decode together; when a row finishes,
    /// the next prompt is prefilled and joins the batch (continuous batching), so the batch
    /// stays full until the input runs out. Results come back in input order.
    pub fn generate(
        &self,
        rows: &[(&str, &[u32])],
        batch: usize,
        work: &mut Work,
    ) -> Result<Vec<Generated>> {
        let n = rows.len();
        let batch = batch.max(1);
        let model = self.model;
        let v = model.vocab_size();
        let k = self.top_k;
        let mut samplers: Vec<Sampler> = rows
            .iter()
            .map(|(id, _)| Sampler::new(self.sampling, id))
            .collect();
        let mut out: Vec<Generated> = (0..n)
            .map(|_| Generated {
                response: Vec::new(),
                capture: Capture::default(),
                stop: Stop::MaxNewTokens,
            })
            .collect();
        if self.max_new_tokens == 0 {
            return Ok(out);
        }
        let mut cache: Option<KvCache> = None;
        // `active[j]` is the input row in cache row j; `logits` holds one vocabulary row per
        // active row, in the same order. Prompts join shortest first, so rows prefilled
        // together have similar lengths (little padding); a row's result does not depend on
        // when it joins.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&r| rows[r].1.len());
        let mut active: Vec<usize> = Vec::new();
        let reduce = self.reduce_on_device
            && samplers.iter().all(|s| s.is_greedy())
            && k.max(1) <= crate::reduce::MAX_K.min(v);
        let mut logits = Logits::empty(reduce, k.max(1));
        let mut next_row = 0;
        loop {
            if active.len() < batch && next_row < n {
                let take = (batch - active.len()).min(n - next_row);
                let new: Vec<usize> = order[next_row..next_row + take].to_vec();
                next_row += take;
                let prompts: Vec<&[u32]> = new.iter().map(|&r| rows[r].1).collect();
                work.prefill_tokens += prompts.iter().map(|p| p.len() as u64).sum::<u64>();
                let t0 = std::time::Instant::now();
                let (hidden, fresh) = model.prefill(&prompts, true)?;
                let fresh = fresh.expect("prefill was asked for a cache");
                let sel: Vec<(usize, usize)> = prompts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i, p.len() - 1))
                    .collect();
                let seeds = || self.next_seeds(&new, rows, &out);
                let lg = self.position_logits(&hidden, Some(&sel), reduce, None, seeds)?;
                work.prefill_seconds += t0.elapsed().as_secs_f64();
                logits.extend(lg);
                active.extend(new);
                match cache.as_mut() {
                    Some(c) => c.append(fresh)?,
                    None => cache = Some(fresh),
                }
            }
            if active.is_empty() {
                break;
            }
            // One position per active row: capture and choose, in parallel over rows.
            let mut by_row: Vec<Option<(&mut Generated, &mut Sampler)>> =
                out.iter_mut().zip(samplers.iter_mut()).map(Some).collect();
            let slots: Vec<(usize, (&mut Generated, &mut Sampler))> = active
                .iter()
                .map(|&r| (r, by_row[r].take().expect("each row is active once")))
                .collect();
            let flat = &logits;
            let picks: Vec<(usize, u32)> = slots
                .into_par_iter()
                .enumerate()
                .map(|(j, (r, (g, s)))| {
                    let position = g.response.len();
                    let next = match flat {
                        Logits::Rows(all) => {
                            let row = &all[j * v..(j + 1) * v];
                            // Greedy picks the first of the top-k (largest logit, smallest id
                            // on ties); sampling weighs the whole vocabulary.
                            let top = top_k_logits(row, k.max(1));
                            let next = if s.is_greedy() {
                                top[0].0
                            } else {
                                s.choose_logits(row)
                            };
                            g.capture.record(
                                row,
                                log_sum_exp(row),
                                &top[..k.min(top.len())],
                                next,
                                self.draws,
                                rows[r].0,
                                position,
                            );
                            next
                        }
                        // Only greedy rows are reduced: the next token is the best one.
                        Logits::Reduced(red) => {
                            let best = red.top(j)[0];
                            g.capture.record_reduced(red, j, k, best.1);
                            best.0
                        }
                    };
                    g.response.push(next);
                    (r, next)
                })
                .collect();
            work.generated_tokens += picks.len() as u64;
            // Decide which rows go on.
            let mut keep = Vec::new();
            let mut next_tokens = Vec::new();
            for (j, &(r, tok)) in picks.iter().enumerate() {
                let g = &mut out[r];
                if self.stop_ids.contains(&tok) {
                    g.stop = Stop::EndToken;
                } else if g.response.len() >= self.max_new_tokens {
                    g.stop = Stop::MaxNewTokens;
                } else if rows[r].1.len() + g.response.len() >= model.max_len() {
                    g.stop = Stop::ContextFull;
                } else {
                    keep.push(j);
                    next_tokens.push(tok);
                }
            }
            if let Some(f) = self.on_rows_done
                && picks.len() > keep.len()
            {
                f(picks.len() - keep.len(), work.generated_tokens);
            }
            active = keep.iter().map(|&j| picks[j].0).collect();
            logits = Logits::empty(reduce, k.max(1));
            if keep.is_empty() {
                cache = None;
                continue;
            }
            let c = cache.as_mut().expect("active rows have a cache");
            c.retain_rows(&keep)?;
            let h = model.step(c, &next_tokens)?;
            let seeds = || self.next_seeds(&active, rows, &out);
            logits = self.position_logits(&h, None, reduce, None, seeds)?;
        }
        Ok(out)
    }

    /// Teacher-forces `(row id, prompt, response)` triples and captures the top-k at every
    /// response position (`prompt_len − 1 … len − 2`). Rows are batched `batch` at a time in
    /// order of length, so little work goes into padding; results come back in input order.
    pub fn score(
        &self,
        rows: &[(&str, &[u32], &[u32])],
        batch: usize,
        work: &mut Work,
    ) -> Result<Vec<Capture>> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].1.len() + rows[i].2.len());
        let mut caps: Vec<Capture> = vec![Capture::default(); rows.len()];
        for group in order.chunks(batch.max(1)) {
            let part: Vec<(&str, &[u32], &[u32])> = group.iter().map(|&i| rows[i]).collect();
            for (&i, c) in group.iter().zip(self.score_batch(&part, work)?) {
                caps[i] = c;
            }
            if let Some(f) = self.on_rows_done {
                f(group.len(), work.scored_tokens);
            }
        }
        Ok(caps)
    }

    /// `[n, vocab]` logits as the capture reads them: reduced where they are, or copied
    /// whole to the host.
    /// `sel` picks `(row, position)`s of a `[batch, len, hidden]` prefill output; without
    /// it `hidden` is `[n, hidden]`. `seeds` gives the positions' draw streams; it is only
    /// called for sampled targets reduced on the device.
    fn position_logits(
        &self,
        hidden: &candle_core::Tensor,
        sel: Option<&[(usize, usize)]>,
        reduce: bool,
        picks: Option<&[u32]>,
        seeds: impl FnOnce() -> Vec<u64>,
    ) -> Result<Logits> {
        let m = self.model;
        Ok(if reduce {
            let logits = match sel {
                Some(sel) => m.logits_at(hidden, sel)?,
                None => m.logits(hidden)?,
            };
            let seeds = (self.draws.n > 0).then(seeds);
            let draws = seeds.as_deref().map(|seeds| crate::reduce::DrawRequest {
                seeds,
                n: self.draws.n,
            });
            Logits::Reduced(crate::reduce::reduce(
                &logits,
                self.top_k.max(1),
                picks,
                draws,
            )?)
        } else {
            Logits::Rows(match sel {
                Some(sel) => m.logits_at_vec(hidden, sel)?,
                None => m.logits_vec(hidden)?,
            })
        })
    }

    /// The draw streams of the next positions of the input rows `active`.
    fn next_seeds(&self, active: &[usize], rows: &[(&str, &[u32])], out: &[Generated]) -> Vec<u64> {
        active
            .iter()
            .map(|&r| self.seed(rows[r].0, out[r].response.len()))
            .collect()
    }

    /// The draw stream of a row's distilled position.
    fn seed(&self, row_id: &str, position: usize) -> u64 {
        kd_loss::sampled::stream_seed(self.draws.seed, row_id, position as u64)
    }

    fn score_batch(
        &self,
        rows: &[(&str, &[u32], &[u32])],
        work: &mut Work,
    ) -> Result<Vec<Capture>> {
        let seqs: Vec<Vec<u32>> = rows.iter().map(|(_, p, r)| [*p, *r].concat()).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        work.prefill_tokens += refs.iter().map(|s| s.len() as u64).sum::<u64>();
        work.scored_tokens += rows.iter().map(|(_, _, r)| r.len() as u64).sum::<u64>();
        let (hidden, _) = self.model.prefill(&refs, false)?;
        let mut sel = Vec::new();
        for (i, (_, p, r)) in rows.iter().enumerate() {
            for t in p.len() - 1..p.len() + r.len() - 1 {
                sel.push((i, t));
            }
        }
        let v = self.model.vocab_size();
        let mut caps: Vec<Capture> = vec![Capture::default(); rows.len()];
        let reduce = self.reduce_on_device && self.top_k.max(1) <= crate::reduce::MAX_K.min(v);
        for chunk in sel.chunks(self.logits_chunk.max(1)) {
            let next: Vec<u32> = chunk.iter().map(|&(i, t)| seqs[i][t + 1]).collect();
            let seeds = || {
                chunk
                    .iter()
                    .map(|&(i, t)| self.seed(rows[i].0, t + 1 - rows[i].1.len()))
                    .collect()
            };
            let lg = self.position_logits(&hidden, Some(chunk), reduce, Some(&next), seeds)?;
            let per: Vec<(usize, Capture)> = match lg {
                Logits::Reduced(red) => chunk
                    .iter()
                    .enumerate()
                    .map(|(j, &(i, _))| {
                        let mut c = Capture::default();
                        c.record_reduced(&red, j, self.top_k, red.picked[j]);
                        (i, c)
                    })
                    .collect(),
                Logits::Rows(flat) => chunk
                    .par_iter()
                    .enumerate()
                    .map(|(j, &(i, t))| {
                        let mut c = Capture::default();
                        let row = &flat[j * v..(j + 1) * v];
                        let top = if self.top_k > 0 {
                            top_k_logits(row, self.top_k)
                        } else {
                            Vec::new()
                        };
                        let (id, prompt, _) = rows[i];
                        let position = t + 1 - prompt.len();
                        c.record(
                            row,
                            log_sum_exp(row),
                            &top,
                            next[j],
                            self.draws,
                            id,
                            position,
                        );
                        (i, c)
                    })
                    .collect(),
            };
            for (i, c) in per {
                caps[i].extend(c);
            }
        }
        Ok(caps)
    }
}
