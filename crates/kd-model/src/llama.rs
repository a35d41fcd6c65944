//! The inference-side llama decoder: full-sequence hidden states for scoring and prefill,
//! and a batched KV cache for decoding rows of different lengths without padding artefacts.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use crate::config::LlamaConfig;
use crate::cpu::{CpuLlama, SeqCache};
use crate::error::Result;

/// A linear map `y = x Wᵀ`: dense f32 (exact) or candle's quantized kernel (approximate:
/// activations are quantized to 8 bits inside its CPU dot products).
pub enum Linear {
    Dense(Tensor),
    Quant(QMatMul),
}

impl Linear {
    /// `x` is `[n, in]`, the result `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => x.matmul(&w.t()?)?,
            // candle's quantized products take f32 activations.
            Linear::Quant(q) => q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
        })
    }
}

pub struct Layer {
    /// q, k and v biases concatenated `[q_dim + 2·kv_dim]` (Qwen2).
    pub qkv_bias: Option<Tensor>,
    /// Per-head RMSNorm weights `[head_dim]` for q and for k (Qwen3).
    pub qk_norm: Option<(Tensor, Tensor)>,
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// A llama-family decoder ready for inference.
///
/// Two implementations sit behind one interface: on a CPU with AVX-512 (or AVX2 with FMA)
/// the exact path runs
/// [`CpuLlama`] (f32 products straight from the GGUF blocks, no padding, per-sequence KV
/// caches); elsewhere, and for [`crate::Precision::Quantized`], candle's tensors do the work.
/// Both compute the same function; see [`crate::load_with`] to choose.
pub struct Llama {
    pub cfg: LlamaConfig,
    /// Whether q/k use the interleaved (GGUF) or the half-split (Hugging Face) RoPE layout.
    pub rope_interleaved: bool,
    pub device: Device,
    backend: Backend,
}

enum Backend {
    Candle(CandleLlama),
    Cpu(Box<CpuLlama>),
}

struct CandleLlama {
    /// `[vocab, hidden]` f32 embedding table.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
}

/// Per-layer keys and values for a batch of rows being decoded together.
pub struct KvCache {
    inner: CacheInner,
}

enum CacheInner {
    Candle(CandleCache),
    /// One cache per sequence: rows join, leave and reorder without touching the others.
    Cpu(Vec<SeqCache>),
}

/// Rows of different lengths share one `[batch, kv_heads, len, head_dim]` tensor per layer:
/// a right-padded prefill leaves padding after a short prompt, and rows that join later
/// ([`KvCache::append`]) are padded to the common length. Each row records its padding slots,
/// which are masked out of attention, and its own next RoPE position, so a row's results do
/// not depend on which other rows share its batch.
struct CandleCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    rows: Vec<RowSlots>,
    len: usize,
}

#[derive(Clone, Debug)]
struct RowSlots {
    /// Half-open slot ranges this row must not attend to.
    masked: Vec<(usize, usize)>,
    next_pos: usize,
}

impl KvCache {
    pub fn batch_size(&self) -> usize {
        match &self.inner {
            CacheInner::Candle(c) => c.rows.len(),
            CacheInner::Cpu(s) => s.len(),
        }
    }

    /// Position (RoPE index) of the next token of row `b`.
    pub fn next_position(&self, b: usize) -> usize {
        match &self.inner {
            CacheInner::Candle(c) => c.rows[b].next_pos,
            CacheInner::Cpu(s) => s[b].len(),
        }
    }

    /// Keeps only the given rows (in that order), e.g. after some rows finished.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.len() == self.batch_size() && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        match &mut self.inner {
            CacheInner::Candle(c) => c.retain_rows(rows),
            CacheInner::Cpu(s) => {
                let mut old: Vec<Option<SeqCache>> = s.drain(..).map(Some).collect();
                *s = rows
                    .iter()
                    .map(|&r| old[r].take().expect("each row kept once"))
                    .collect();
                Ok(())
            }
        }
    }

    /// Adds the rows of `other` (a fresh prefill of the same model) after this cache's rows.
    pub fn append(&mut self, other: KvCache) -> Result<()> {
        match (&mut self.inner, other.inner) {
            (CacheInner::Candle(a), CacheInner::Candle(b)) => a.append(b),
            (CacheInner::Cpu(a), CacheInner::Cpu(b)) => {
                a.extend(b);
                Ok(())
            }
            _ => panic!("caches of different backends"),
        }
    }
}

impl CandleCache {
    fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        let dev = match self.kv.iter().flatten().next() {
            Some((k, _)) => k.device().clone(),
            None => Device::Cpu,
        };
        let idx = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &dev,
        )?;
        for slot in self.kv.iter_mut().flatten() {
            slot.0 = slot.0.index_select(&idx, 0)?;
            slot.1 = slot.1.index_select(&idx, 0)?;
        }
        self.rows = rows.iter().map(|&r| self.rows[r].clone()).collect();
        Ok(())
    }

    /// Adds the rows of `other` after this cache's rows, padding whichever is shorter with
    /// masked slots.
    fn append(&mut self, mut other: CandleCache) -> Result<()> {
        let len = self.len.max(other.len);
        self.pad_to(len)?;
        other.pad_to(len)?;
        for (a, b) in self.kv.iter_mut().zip(other.kv) {
            *a = match (a.take(), b) {
                (Some((ak, av)), Some((bk, bv))) => {
                    Some((Tensor::cat(&[&ak, &bk], 0)?, Tensor::cat(&[&av, &bv], 0)?))
                }
                (x, None) | (None, x) => x,
            };
        }
        self.rows.extend(other.rows);
        Ok(())
    }

    fn pad_to(&mut self, len: usize) -> Result<()> {
        if len == self.len {
            return Ok(());
        }
        for slot in self.kv.iter_mut().flatten() {
            let pad = |t: &Tensor| -> Result<Tensor> {
                let (b, h, l, d) = t.dims4()?;
                let z = Tensor::zeros((b, h, len - l, d), t.dtype(), t.device())?;
                Ok(Tensor::cat(&[t, &z], 2)?)
            };
            *slot = (pad(&slot.0)?, pad(&slot.1)?);
        }
        for r in &mut self.rows {
            r.masked.push((self.len, len));
        }
        self.len = len;
        Ok(())
    }
}

impl Llama {
    /// A model computed by candle's tensor operations.
    pub fn new(
        cfg: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Linear,
        rope_interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        let half = cfg.head_dim() / 2;
        let max = cfg.max_position_embeddings;
        let (cos, sin) = crate::cpu::rope_tables(&cfg);
        let dt = embed.dtype();
        let cos = Tensor::from_vec(cos, (max, half), device)?.to_dtype(dt)?;
        let sin = Tensor::from_vec(sin, (max, half), device)?.to_dtype(dt)?;
        Ok(Self {
            cfg,
            rope_interleaved,
            device: device.clone(),
            backend: Backend::Candle(CandleLlama {
                embed,
                layers,
                norm,
                lm_head,
                cos,
                sin,
            }),
        })
    }

    /// A model computed by the CPU kernels of [`crate::kernels`].
    pub fn new_cpu(model: CpuLlama) -> Self {
        Self {
            cfg: model.cfg.clone(),
            rope_interleaved: model.rope_interleaved,
            device: Device::Cpu,
            backend: Backend::Cpu(Box::new(model)),
        }
    }

    /// The CPU kernels' model, when they compute this one.
    pub fn cpu(&self) -> Option<&CpuLlama> {
        match &self.backend {
            Backend::Cpu(m) => Some(m),
            Backend::Candle(_) => None,
        }
    }

    /// The device the model computes on.
    pub fn device(&self) -> candle_core::Device {
        match &self.backend {
            Backend::Candle(c) => c.embed.device().clone(),
            Backend::Cpu(_) => candle_core::Device::Cpu,
        }
    }

    /// Which implementation computes: `"cpu-kernels"` or `"candle"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Candle(_) => "candle",
            Backend::Cpu(_) => "cpu-kernels",
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// The weights as the CPU kernels hold them: total bytes, and bytes per panel format
    /// (`None` on candle's path, whose tensors are candle's).
    pub fn weight_memory(&self) -> Option<(usize, Vec<(crate::kernels::PanelFormat, usize)>)> {
        match &self.backend {
            Backend::Cpu(m) => Some((m.weight_bytes(), m.weight_formats())),
            Backend::Candle(_) => None,
        }
    }

    /// Bytes of the CPU kernels' weights read in place from the files' maps, not packed.
    pub fn weight_bytes_in_place(&self) -> usize {
        match &self.backend {
            Backend::Cpu(m) => m.weight_bytes_in_place(),
            Backend::Candle(_) => 0,
        }
    }

    /// Bytes of keys and values one token of one sequence adds to a KV cache (in the
    /// model's dtype).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_hidden_layers
            * self.cfg.num_key_value_heads
            * self.cfg.head_dim()
            * self.dtype().size_in_bytes()
    }

    /// The dtype of the weights and activations (f32 on the CPU kernels).
    pub fn dtype(&self) -> DType {
        match &self.backend {
            Backend::Candle(c) => c.embed.dtype(),
            Backend::Cpu(_) => DType::F32,
        }
    }

    /// Bytes the weights take in candle's tensors (`None` on the CPU kernels, see
    /// [`Llama::weight_memory`]).
    pub fn candle_weight_bytes(&self) -> Option<usize> {
        let Backend::Candle(c) = &self.backend else {
            return None;
        };
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &Linear| match l {
            Linear::Dense(w) => t(w),
            Linear::Quant(q) => match q {
                QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                QMatMul::Tensor(w) | QMatMul::TensorF16(w) => t(w),
            },
        };
        let mut n = t(&c.embed) + t(&c.norm) + lin(&c.lm_head);
        for l in &c.layers {
            n += t(&l.attn_norm) + t(&l.ffn_norm);
            n += [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                .into_iter()
                .map(lin)
                .sum::<usize>();
            n += l.qkv_bias.as_ref().map_or(0, t);
            n += l.qk_norm.as_ref().map_or(0, |(a, b)| t(a) + t(b));
        }
        Some(n)
    }

    /// The hyperparameters the model was built with.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn max_len(&self) -> usize {
        self.cfg.max_len()
    }

    fn check_ids(&self, rows: &[&[u32]]) -> Result<()> {
        for r in rows {
            if r.len() > self.max_len() {
                return Err(crate::Error::TooLong {
                    len: r.len(),
                    max: self.max_len(),
                });
            }
            if let Some(&id) = r.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(crate::Error::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// Runs a batch of whole sequences and returns the final-norm hidden states
    /// `[batch, max_len, hidden]` (rows shorter than the longest are right-padded; what the
    /// padding positions hold is unspecified). With `want_cache`, fills a new KV cache for
    /// decoding.
    pub fn prefill(&self, rows: &[&[u32]], want_cache: bool) -> Result<(Tensor, Option<KvCache>)> {
        self.check_ids(rows)?;
        let b = rows.len();
        let l = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let d = self.cfg.hidden_size;
        match &self.backend {
            Backend::Cpu(m) => {
                let mut seqs: Vec<SeqCache> = (0..b).map(|_| m.new_cache()).collect();
                let mut refs: Vec<&mut SeqCache> = seqs.iter_mut().collect();
                let h = rayon::scope(|_| m.forward(&mut refs, rows, want_cache));
                let mut padded = vec![0f32; b * l * d];
                let mut at = 0;
                for (i, r) in rows.iter().enumerate() {
                    let n = r.len() * d;
                    padded[i * l * d..i * l * d + n].copy_from_slice(&h[at..at + n]);
                    at += n;
                }
                let cache = want_cache.then(|| KvCache {
                    inner: CacheInner::Cpu(seqs),
                });
                Ok((Tensor::from_vec(padded, (b, l, d), &self.device)?, cache))
            }
            Backend::Candle(c) => self.candle_prefill(c, rows, want_cache),
        }
    }

    fn candle_prefill(
        &self,
        c: &CandleLlama,
        rows: &[&[u32]],
        want_cache: bool,
    ) -> Result<(Tensor, Option<KvCache>)> {
        let b = rows.len();
        let l = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(b * l);
        let mut pos = Vec::with_capacity(b * l);
        let mut mask = vec![0f32; b * l * l];
        for (bi, r) in rows.iter().enumerate() {
            for t in 0..l {
                ids.push(r.get(t).copied().unwrap_or(0));
                pos.push(t as u32);
                for j in 0..l {
                    if j > t || j >= r.len() {
                        mask[(bi * l + t) * l + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let ids = Tensor::from_vec(ids, (b, l), &self.device)?;
        let pos = Tensor::from_vec(pos, b * l, &self.device)?;
        let mask = Tensor::from_vec(mask, (b, 1, l, l), &self.device)?.to_dtype(c.embed.dtype())?;
        let mut cache = want_cache.then(|| CandleCache {
            kv: (0..c.layers.len()).map(|_| None).collect(),
            rows: rows
                .iter()
                .map(|r| RowSlots {
                    masked: if r.len() < l {
                        vec![(r.len(), l)]
                    } else {
                        vec![]
                    },
                    next_pos: r.len(),
                })
                .collect(),
            len: 0,
        });
        let h = c.forward(
            &self.cfg,
            self.rope_interleaved,
            &ids,
            &pos,
            &mask,
            cache.as_mut(),
        )?;
        if let Some(c) = cache.as_mut() {
            c.len = l;
        }
        Ok((
            h,
            cache.map(|c| KvCache {
                inner: CacheInner::Candle(c),
            }),
        ))
    }

    /// Decodes one token per row; returns the final-norm hidden states `[batch, hidden]`.
    pub fn step(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Tensor> {
        let b = tokens.len();
        assert_eq!(b, cache.batch_size(), "one token per cached row");
        if let Some(&id) = tokens
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            return Err(crate::Error::TokenOutOfRange {
                id,
                vocab: self.cfg.vocab_size,
            });
        }
        if let Some(p) = (0..b).map(|r| cache.next_position(r)).max()
            && p >= self.max_len()
        {
            return Err(crate::Error::TooLong {
                len: p + 1,
                max: self.max_len(),
            });
        }
        match (&self.backend, &mut cache.inner) {
            (Backend::Cpu(m), CacheInner::Cpu(seqs)) => {
                let mut refs: Vec<&mut SeqCache> = seqs.iter_mut().collect();
                let toks: Vec<&[u32]> = tokens.chunks(1).collect();
                let h = rayon::scope(|_| m.forward(&mut refs, &toks, true));
                Ok(Tensor::from_vec(
                    h,
                    (b, self.cfg.hidden_size),
                    &self.device,
                )?)
            }
            (Backend::Candle(c), CacheInner::Candle(cache)) => {
                let lk = cache.len + 1;
                let pos: Vec<u32> = cache.rows.iter().map(|r| r.next_pos as u32).collect();
                let mut mask = vec![0f32; b * lk];
                for (r, slots) in cache.rows.iter().enumerate() {
                    for &(a, e) in &slots.masked {
                        mask[r * lk + a..r * lk + e].fill(f32::NEG_INFINITY);
                    }
                }
                let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), &self.device)?;
                let pos = Tensor::from_vec(pos, b, &self.device)?;
                let mask = Tensor::from_vec(mask, (b, 1, 1, lk), &self.device)?
                    .to_dtype(c.embed.dtype())?;
                let h = c.forward(
                    &self.cfg,
                    self.rope_interleaved,
                    &ids,
                    &pos,
                    &mask,
                    Some(cache),
                )?;
                cache.len = lk;
                for r in &mut cache.rows {
                    r.next_pos += 1;
                }
                Ok(h.squeeze(1)?)
            }
            _ => panic!("a cache from another model"),
        }
    }

    /// Logits `[n, vocab]` (f32) for hidden states `[n, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu(_) => {
                let n = hidden.dim(0)?;
                let v = self.logits_vec(hidden)?;
                Ok(Tensor::from_vec(v, (n, self.cfg.vocab_size), &self.device)?)
            }
            Backend::Candle(c) => Ok(c.lm_head.forward(hidden)?.to_dtype(DType::F32)?),
        }
    }

    /// [`Llama::logits`] as a row-major `Vec` (no copy on the CPU-kernel path).
    pub fn logits_vec(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        match &self.backend {
            Backend::Cpu(m) => {
                let (n, _) = hidden.dims2()?;
                let h: Vec<f32> = hidden.flatten_all()?.to_vec1()?;
                Ok(rayon::scope(|_| m.logits(&h, n)))
            }
            Backend::Candle(_) => Ok(self.logits(hidden)?.flatten_all()?.to_vec1()?),
        }
    }

    /// Logits for selected positions: `sel` holds `(row, position)` pairs into a
    /// `[batch, len, hidden]` prefill output. Returns `[sel.len(), vocab]`.
    pub fn logits_at(&self, hidden: &Tensor, sel: &[(usize, usize)]) -> Result<Tensor> {
        self.logits(&self.select(hidden, sel)?)
    }

    /// [`Llama::logits_at`] as a row-major `Vec`.
    pub fn logits_at_vec(&self, hidden: &Tensor, sel: &[(usize, usize)]) -> Result<Vec<f32>> {
        self.logits_vec(&self.select(hidden, sel)?)
    }

    fn select(&self, hidden: &Tensor, sel: &[(usize, usize)]) -> Result<Tensor> {
        let (_, l, d) = hidden.dims3()?;
        let flat = hidden.reshape(((), d))?;
        let idx: Vec<u32> = sel.iter().map(|&(r, t)| (r * l + t) as u32).collect();
        let idx = Tensor::from_vec(idx, sel.len(), hidden.device())?;
        Ok(flat.index_select(&idx, 0)?)
    }
}

impl CandleLlama {
    /// `ids` `[b, l]`, `pos` `[b*l]` RoPE positions, `mask` `[b, 1, l, lk]` additive.
    fn forward(
        &self,
        cfg: &LlamaConfig,
        rope_interleaved: bool,
        ids: &Tensor,
        pos: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut CandleCache>,
    ) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let rep = nh / nkv;
        let eps = cfg.rms_norm_eps as f32;
        let cos = self.cos.index_select(pos, 0)?.reshape((b, l, hd / 2))?;
        let sin = self.sin.index_select(pos, 0)?.reshape((b, l, hd / 2))?;
        let lk = mask.dim(3)?;
        // Queries of the `rep` heads sharing one kv head are stacked along the row axis, so the
        // mask is repeated to match: [b, 1, rep*l, lk].
        let mask = if rep > 1 {
            mask.repeat((1, 1, rep, 1))?
        } else {
            mask.clone()
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?; // [b*l, d]
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut q = layer.q.forward(&h)?;
            let mut k = layer.k.forward(&h)?;
            let mut v = layer.v.forward(&h)?;
            if let Some(bias) = &layer.qkv_bias {
                let (qd, kvd) = (nh * hd, nkv * hd);
                q = q.broadcast_add(&bias.narrow(0, 0, qd)?)?;
                k = k.broadcast_add(&bias.narrow(0, qd, kvd)?)?;
                v = v.broadcast_add(&bias.narrow(0, qd + kvd, kvd)?)?;
            }
            let mut q = q.reshape((b, l, nh, hd))?;
            let mut k = k.reshape((b, l, nkv, hd))?;
            if let Some((qn, kn)) = &layer.qk_norm {
                q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?;
            }
            let q = q.transpose(1, 2)?.contiguous()?;
            let k = k.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let (q, k) = if rope_interleaved {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => {
                    let kv = match c.kv[li].take() {
                        Some((pk, pv)) => {
                            (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
                        }
                        None => (k, v),
                    };
                    c.kv[li] = Some(kv.clone());
                    kv
                }
                None => (k, v),
            };
            debug_assert_eq!(k.dim(2)?, lk);
            // [b, nkv, rep*l, hd] x [b, nkv, hd, lk]
            let q = q.reshape((b, nkv, rep * l, hd))?;
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?; // [b, nkv, rep*l, hd]
            let y = y
                .reshape((b, nh, l, hd))?
                .transpose(1, 2)?
                .reshape((b * l, nh * hd))?;
            x = (x + layer.o.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let g = layer.gate.forward(&h)?;
            let u = layer.up.forward(&h)?;
            let m = (candle_nn::ops::silu(&g)? * u)?;
            x = (x + layer.down.forward(&m)?)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(x.reshape((b, l, cfg.hidden_size))?)
    }
}

/// Log-softmax of one row of logits in f64 (the teacher's exact T=1 log-probabilities).
pub fn log_softmax_f64(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}
