//! The teacher's forward pass on plain buffers for CPUs with AVX-512 or AVX2: weight products by
//! [`PanelMatrix`] (exact f32 on the GGUF blocks), attention over a per-sequence KV cache, and
//! no padding anywhere. A batch is ragged: each sequence contributes its own new tokens, and
//! all of them go through each weight product together.
//!
//! Every operation on a token depends only on that token and on its own sequence's cache, in
//! a fixed order, so a sequence's hidden states are bit-identical whatever else shares its
//! batch, and decoding token by token gives the same values as a prefill of the whole
//! sequence.

use rayon::prelude::*;

use crate::config::LlamaConfig;
use crate::kernels::{PanelMatrix, PanelView, exp_in_place, scale_max, silu_mul};

pub struct CpuLayer {
    /// q, k and v biases concatenated `[q_dim + 2·kv_dim]` (Qwen2).
    pub qkv_bias: Option<Vec<f32>>,
    /// Per-head RMSNorm weights `[head_dim]` for q and for k (Qwen3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub attn_norm: Vec<f32>,
    /// q, k and v stacked: `[q_dim + 2·kv_dim, d]`.
    pub qkv: PanelMatrix,
    pub o: PanelMatrix,
    pub ffn_norm: Vec<f32>,
    /// gate and up stacked: `[2·ff, d]`.
    pub gate_up: PanelMatrix,
    pub down: PanelMatrix,
}

pub struct CpuLlama {
    pub cfg: LlamaConfig,
    /// `[vocab, hidden]` embedding table in its file's format; `None` when tied to
    /// `lm_head`, whose rows are then looked up.
    pub embed: Option<PanelMatrix>,
    pub layers: Vec<CpuLayer>,
    pub norm: Vec<f32>,
    pub lm_head: PanelMatrix,
    /// Interleaved (GGUF) or half-split (Hugging Face) RoPE pairs.
    pub rope_interleaved: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// One sequence's keys and values, per layer and kv head, in panel layout so that both
/// attention products run on the weight-product kernel.
#[derive(Clone, Debug, Default)]
pub struct SeqCache {
    /// `[layer * kv_heads + kv_head]`.
    heads: Vec<HeadKv>,
    len: usize,
}

/// Floats in one 16 × 32 panel block.
const BLOCK_F: usize = 16 * 32;

/// Keys and values of one kv head of one layer.
#[derive(Clone, Debug, Default)]
struct HeadKv {
    /// Keys as the rows of a `[len, head_dim]` f32 panel matrix: one panel per 16 keys, each
    /// `ceil(head_dim/32)` blocks.
    k: Vec<f32>,
    /// Values transposed, as the rows of a `[head_dim, len]` panel matrix: one panel per 16
    /// dimensions, each `cap_blocks` blocks of 32 keys (grown by doubling).
    v: Vec<f32>,
    cap_blocks: usize,
}

impl HeadKv {
    fn key_panel_floats(hd: usize) -> usize {
        hd.div_ceil(32) * BLOCK_F
    }

    /// Stores key and value number `j` (the next one).
    fn push(&mut self, j: usize, key: &[f32], val: &[f32]) {
        let hd = key.len();
        let kp = Self::key_panel_floats(hd);
        let (p, r) = (j / 16, j % 16);
        if self.k.len() < (p + 1) * kp {
            self.k.resize((p + 1) * kp, 0.0);
        }
        for (c, &x) in key.iter().enumerate() {
            self.k[p * kp + (c / 32) * BLOCK_F + (c % 32) * 16 + r] = x;
        }
        let groups = hd.div_ceil(16);
        let (bj, c) = (j / 32, j % 32);
        if bj >= self.cap_blocks {
            let cap = (self.cap_blocks * 2).max(bj + 1).max(4);
            let mut v = vec![0f32; groups * cap * BLOCK_F];
            let old = self.cap_blocks * BLOCK_F;
            for g in 0..groups {
                v[g * cap * BLOCK_F..g * cap * BLOCK_F + old]
                    .copy_from_slice(&self.v[g * old..(g + 1) * old]);
            }
            self.v = v;
            self.cap_blocks = cap;
        }
        for (d, &x) in val.iter().enumerate() {
            self.v[(d / 16) * self.cap_blocks * BLOCK_F + bj * BLOCK_F + c * 16 + d % 16] = x;
        }
    }
}

impl SeqCache {
    pub fn new(layers: usize, kv_heads: usize) -> Self {
        Self {
            heads: vec![HeadKv::default(); layers * kv_heads],
            len: 0,
        }
    }

    /// Tokens held (the RoPE position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: hands disjoint regions of one buffer to parallel tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Tokens per parallel task for element-wise work.
const ROWS_PER_TASK: usize = 16;

impl CpuLlama {
    pub fn new(
        cfg: LlamaConfig,
        embed: Option<PanelMatrix>,
        layers: Vec<CpuLayer>,
        norm: Vec<f32>,
        lm_head: PanelMatrix,
        rope_interleaved: bool,
    ) -> Self {
        let (cos, sin) = rope_tables(&cfg);
        Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope_interleaved,
            cos,
            sin,
        }
    }

    /// Bytes of the weights as held (panels, norms and biases).
    pub fn weight_bytes(&self) -> usize {
        let floats = |v: &[f32]| v.len() * 4;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.bytes()
                    + l.o.bytes()
                    + l.gate_up.bytes()
                    + l.down.bytes()
                    + floats(&l.attn_norm)
                    + floats(&l.ffn_norm)
                    + l.qkv_bias.as_deref().map_or(0, floats)
                    + l.qk_norm.as_ref().map_or(0, |(q, k)| floats(q) + floats(k))
            })
            .sum();
        layers
            + self.lm_head.bytes()
            + self.embed.as_ref().map_or(0, |e| e.bytes())
            + floats(&self.norm)
    }

    /// Bytes of the weights read in place from their files' maps (part of
    /// [`CpuLlama::weight_bytes`]).
    pub fn weight_bytes_in_place(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain(std::iter::once(&self.lm_head))
            .chain(self.embed.as_ref())
            .map(|m| m.bytes_in_place())
            .sum()
    }

    /// The panel formats the weights are held in, with their bytes.
    pub fn weight_formats(&self) -> Vec<(crate::kernels::PanelFormat, usize)> {
        let mut out: Vec<(crate::kernels::PanelFormat, usize)> = Vec::new();
        let mats = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain(std::iter::once(&self.lm_head))
            .chain(self.embed.as_ref());
        for m in mats {
            for (f, b) in m.format_bytes() {
                match out.iter_mut().find(|(g, _)| *g == f) {
                    Some(e) => e.1 += b,
                    None => out.push((f, b)),
                }
            }
        }
        out
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.layers.len(), self.cfg.num_key_value_heads)
    }

    /// Appends `tokens[s]` to sequence `s` for every `s`, and returns the final-norm hidden
    /// states of all the new tokens, sequence after sequence: `[Σ len, hidden]`. Token ids and
    /// lengths are checked by the caller. Without `keep`, each layer's keys and values are
    /// dropped once its attention is done (scoring needs no cache afterwards), so at most one
    /// layer's are held.
    pub fn forward(&self, seqs: &mut [&mut SeqCache], tokens: &[&[u32]], keep: bool) -> Vec<f32> {
        assert_eq!(seqs.len(), tokens.len(), "one token list per sequence");
        let mut x = self.embed(tokens);
        let lens: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        self.layers_inner(seqs, &lens, &mut x, 0..self.layers.len(), keep, |_, _| {});
        for (s, t) in seqs.iter_mut().zip(tokens) {
            s.len += t.len();
        }
        self.final_norm(&x)
    }

    /// The embeddings of `tokens`, sequence after sequence: `[Σ len, hidden]`.
    pub fn embed(&self, tokens: &[&[u32]]) -> Vec<f32> {
        let d = self.cfg.hidden_size;
        let n: usize = tokens.iter().map(|t| t.len()).sum();
        let mut x = vec![0f32; n * d];
        for (row, &id) in x
            .chunks_exact_mut(d)
            .zip(tokens.iter().flat_map(|t| t.iter()))
        {
            self.embed
                .as_ref()
                .unwrap_or(&self.lm_head)
                .row_into(id as usize, row);
        }
        x
    }

    /// Runs whole sequences of `lens[s]` tokens each (their residual streams `x`,
    /// `[Σ len, hidden]`, sequence after sequence, from position 0) through the layers
    /// `layers`, in that order, with no cache kept: the stream of a model cut to those layers.
    /// `each(i, x)` sees the stream after `layers[i]`.
    pub fn run_layers(
        &self,
        lens: &[usize],
        x: &mut [f32],
        layers: &[usize],
        each: impl FnMut(usize, &[f32]),
    ) {
        let mut caches: Vec<SeqCache> = lens.iter().map(|_| self.new_cache()).collect();
        let mut seqs: Vec<&mut SeqCache> = caches.iter_mut().collect();
        self.layers_inner(&mut seqs, lens, x, layers.iter().copied(), false, each);
    }

    /// The final RMS norm of residual streams `[n, hidden]`.
    pub fn final_norm(&self, x: &[f32]) -> Vec<f32> {
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps as f32, &mut h);
        h
    }

    /// The body of [`CpuLlama::forward`]: `lens[s]` new tokens of sequence `s` (their rows in
    /// `x`), through `layers`, appending to the sequences' caches (their lengths are left to
    /// the caller).
    fn layers_inner(
        &self,
        seqs: &mut [&mut SeqCache],
        lens: &[usize],
        x: &mut [f32],
        layers: impl Iterator<Item = usize>,
        keep: bool,
        mut each: impl FnMut(usize, &[f32]),
    ) {
        let cfg = &self.cfg;
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let nkv = cfg.num_key_value_heads;
        let kvd = nkv * hd;
        let ff = cfg.intermediate_size;
        let eps = cfg.rms_norm_eps as f32;
        let n: usize = lens.iter().sum();
        assert_eq!(x.len(), n * d, "one residual row per token");
        // Sequence s's new tokens are rows offs[s]..offs[s+1]; positions start at its length.
        let mut offs = vec![0usize];
        let mut pos = Vec::with_capacity(n);
        for (s, &len) in seqs.iter().zip(lens) {
            pos.extend((0..len).map(|i| s.len + i));
            offs.push(offs.last().unwrap() + len);
        }
        let qd = cfg.q_dim();
        let qkv_w = qd + 2 * kvd;
        let mut h = vec![0f32; n * d];
        let mut qkv = vec![0f32; n * qkv_w];
        let mut att = vec![0f32; n * qd];
        let mut proj = vec![0f32; n * d];
        let mut gu = vec![0f32; n * 2 * ff];
        let mut m = vec![0f32; n * ff];
        for (i, li) in layers.enumerate() {
            let layer = &self.layers[li];
            rms_norm(x, &layer.attn_norm, eps, &mut h);
            layer.qkv.matmul_into(&h, n, &mut qkv);
            qkv.par_chunks_mut(qkv_w * ROWS_PER_TASK)
                .zip(pos.par_chunks(ROWS_PER_TASK))
                .for_each(|(rows, ps)| {
                    for (row, &p) in rows.chunks_exact_mut(qkv_w).zip(ps) {
                        if let Some(b) = &layer.qkv_bias {
                            add_in_place(row, b);
                        }
                        if let Some((qn, kn)) = &layer.qk_norm {
                            let (q, k) = row[..qd + kvd].split_at_mut(qd);
                            for head in q.chunks_exact_mut(hd) {
                                rms_norm_row(head, qn, eps);
                            }
                            for head in k.chunks_exact_mut(hd) {
                                rms_norm_row(head, kn, eps);
                            }
                        }
                        self.rope(&mut row[..qd + kvd], p);
                    }
                });
            for (s, seq) in seqs.iter_mut().enumerate() {
                for (t, r) in (offs[s]..offs[s + 1]).enumerate() {
                    let row = &qkv[r * qkv_w..(r + 1) * qkv_w];
                    for kh in 0..nkv {
                        seq.heads[li * nkv + kh].push(
                            seq.len + t,
                            &row[qd + kh * hd..qd + (kh + 1) * hd],
                            &row[qd + kvd + kh * hd..qd + kvd + (kh + 1) * hd],
                        );
                    }
                }
            }
            self.attention(seqs, &offs, li, &qkv, &mut att);
            if !keep {
                for seq in seqs.iter_mut() {
                    for h in &mut seq.heads[li * nkv..(li + 1) * nkv] {
                        *h = HeadKv::default();
                    }
                }
            }
            layer.o.matmul_into(&att, n, &mut proj);
            add_in_place(x, &proj);
            rms_norm(x, &layer.ffn_norm, eps, &mut h);
            layer.gate_up.matmul_into(&h, n, &mut gu);
            m.par_chunks_mut(ff * ROWS_PER_TASK)
                .zip(gu.par_chunks(2 * ff * ROWS_PER_TASK))
                .for_each(|(mr, gr)| {
                    for (mrow, grow) in mr.chunks_exact_mut(ff).zip(gr.chunks_exact(2 * ff)) {
                        silu_mul(&grow[..ff], &grow[ff..], mrow);
                    }
                });
            layer.down.matmul_into(&m, n, &mut proj);
            add_in_place(x, &proj);
            each(i, x);
        }
    }

    /// Logits `[n, vocab]` for final-norm hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: &[f32], n: usize) -> Vec<f32> {
        self.lm_head.matmul(hidden, n)
    }

    fn rope(&self, qk: &mut [f32], p: usize) {
        let hd = self.cfg.head_dim();
        let half = hd / 2;
        let cos = &self.cos[p * half..(p + 1) * half];
        let sin = &self.sin[p * half..(p + 1) * half];
        for head in qk.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if self.rope_interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    /// Causal attention of every new token over its own sequence's cache (which already holds
    /// the new keys and values), in parallel over (sequence, kv head). The `rep` query heads
    /// sharing a kv head and up to [`Q_CHUNK`] tokens go through each product together:
    /// scores `Q·Kᵀ` and outputs `P·V` are panel products over the cache. A chunk's products
    /// run over the keys its last token sees; each row's softmax covers only its own visible
    /// keys and leaves exact zeros after them, so the values are those of decoding the tokens
    /// one by one.
    fn attention(
        &self,
        seqs: &[&mut SeqCache],
        offs: &[usize],
        li: usize,
        qkv: &[f32],
        out: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let rep = nh / nkv;
        // Rows of `out` are q_dim wide.
        let d = cfg.q_dim();
        let qkv_w = d + 2 * nkv * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let jobs: Vec<(usize, usize)> = (0..seqs.len())
            .filter(|&s| offs[s + 1] > offs[s])
            .flat_map(|s| (0..nkv).map(move |kh| (s, kh)))
            .collect();
        let dst = SendPtr(out.as_mut_ptr());
        jobs.into_par_iter().for_each(|(s, kh)| {
            let seq = &seqs[s];
            let cache = &seq.heads[li * nkv + kh];
            let new = offs[s + 1] - offs[s];
            // Position of this sequence's first new token (its length before this pass).
            let start = seq.len;
            let mut t0 = 0;
            while t0 < new {
                let t1 = (t0 + Q_CHUNK).min(new);
                let keys = start + t1;
                let nq = (t1 - t0) * rep;
                // Query rows ordered (token, head).
                let mut q = Vec::with_capacity(nq * hd);
                for t in t0..t1 {
                    let r = offs[s] + t;
                    for h in kh * rep..(kh + 1) * rep {
                        q.extend_from_slice(&qkv[r * qkv_w + h * hd..r * qkv_w + (h + 1) * hd]);
                    }
                }
                let mut sc = vec![0f32; nq * keys];
                PanelView::f32(&cache.k, keys, hd, HeadKv::key_panel_floats(hd))
                    .matmul_serial(&q, nq, &mut sc, false);
                let mut inv = Vec::with_capacity(nq);
                for (i, row) in sc.chunks_exact_mut(keys).enumerate() {
                    let visible = start + t0 + i / rep + 1;
                    let (seen, unseen) = row.split_at_mut(visible);
                    let max = scale_max(seen, scale);
                    inv.push(1.0 / exp_in_place(seen, max));
                    unseen.fill(0.0);
                }
                let mut o = vec![0f32; nq * hd];
                PanelView::f32(&cache.v, hd, keys, cache.cap_blocks * BLOCK_F)
                    .matmul_serial(&sc, nq, &mut o, false);
                for (i, (o, inv)) in o.chunks_exact(hd).zip(&inv).enumerate() {
                    let r = offs[s] + t0 + i / rep;
                    let h = kh * rep + i % rep;
                    // SAFETY: job (s, kh) alone writes the columns of heads kh*rep..(kh+1)*rep
                    // of its own sequence's rows.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dst.at(r * d + h * hd), hd) };
                    for (y, x) in dst.iter_mut().zip(o) {
                        *y = x * inv;
                    }
                }
                t0 = t1;
            }
        });
    }
}

/// New tokens of one sequence whose attention products run together.
const Q_CHUNK: usize = 16;

/// RoPE cos/sin tables `[positions, head_dim/2]`, computed as candle's path computes them
/// (angles and their cos/sin in f32, as `transformers` computes them; YaRN's attention factor
/// multiplies both).
pub(crate) fn rope_tables(cfg: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim() / 2;
    let max = cfg.max_position_embeddings;
    let (scaled, attn) = cfg.rope_frequencies();
    let inv: Vec<f32> = match cfg.rope_scaling {
        // Plain RoPE: the inverse taken in f32, as this table has always been built.
        None | Some(crate::rope::RopeScaling::Dynamic { .. }) => (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim() as f64) as f32)
            .collect(),
        _ => scaled.iter().map(|&f| f as f32).collect(),
    };
    let attn = attn as f32;
    let mut cos = Vec::with_capacity(max * half);
    let mut sin = Vec::with_capacity(max * half);
    for p in 0..max {
        for &f in &inv {
            let a = p as f32 * f;
            if attn == 1.0 {
                cos.push(a.cos());
                sin.push(a.sin());
            } else {
                cos.push(a.cos() * attn);
                sin.push(a.sin() * attn);
            }
        }
    }
    (cos, sin)
}

/// Row-wise RMS norm of `x` `[n, d]` into `out`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let ss = dot(x, x);
                let inv = 1.0 / (ss / d as f32 + eps).sqrt();
                for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * inv * w;
                }
            }
        });
}

/// RMS norm of one row in place (Qwen3's per-head q/k norm).
fn rms_norm_row(x: &mut [f32], w: &[f32], eps: f32) {
    let ss = dot(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for (x, &w) in x.iter_mut().zip(w) {
        *x = *x * inv * w;
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Dot product with 16 partial sums (vectorised by the compiler).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}
