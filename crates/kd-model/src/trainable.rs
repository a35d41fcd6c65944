//! The trainable student: a llama decoder whose parameters are candle [`Var`]s, with a forward
//! pass in which every operation has a backward pass.
//!
//! The inference model ([`crate::Llama`]) uses candle-nn's fused `rms_norm`, `softmax_last_dim`
//! and `rope` kernels, which carry no gradient (they are `apply_op*_no_bwd`): a student built
//! on them would train nothing but the parameters after the last of them. Here the same
//! functions are written as compositions of differentiable tensor ops ([`rms_norm`],
//! [`softmax_last_dim`], [`rope_half_split`]), and the tests compare every parameter group's
//! gradient with central finite differences in f64.
//!
//! Parameters use Hugging Face names and the half-split RoPE layout, so a saved student is a
//! Hugging Face checkpoint. A student starts from random weights ([`Student::random`]), from a
//! Hugging Face directory ([`Student::from_hf_dir`]), or from a subset of a teacher's layers
//! ([`Student::from_teacher`], GGUF or Hugging Face, dequantized, GGUF q/k rows un-permuted).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use kd_model::trainable::Student;
//! let s = Student::from_teacher("data/models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(),
//!                               &[0, 6, 12, 18, 24, 29], DType::F32, &Device::Cpu).unwrap();
//! let (ids, lengths) = s.batch(&[&[1, 2, 3], &[4, 5]]).unwrap();
//! let hidden = s.forward(&ids, &lengths).unwrap();                  // [2, 3, 576]
//! let rows = hidden.reshape(((), 576)).unwrap().narrow(0, 0, 2).unwrap();
//! let logits = s.logits(&rows).unwrap();                            // [2, 49152]
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{D, DType, Device, Tensor, Var};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::kernels::Rng;
use crate::loader::{gguf_config, load_hf_tensors, load_hf_tensors_where, read_hf_config};

/// One decoder layer's parameters.
struct StudentLayer {
    attn_norm: Var,
    q: Var,
    k: Var,
    v: Var,
    o: Var,
    ffn_norm: Var,
    gate: Var,
    up: Var,
    down: Var,
    /// q, k and v biases (Qwen2).
    qkv_bias: Option<[Var; 3]>,
    /// Per-head q and k RMSNorm weights (Qwen3).
    qk_norm: Option<[Var; 2]>,
}

impl StudentLayer {
    /// The parameters in [`layer_shapes`] order.
    fn vars(&self) -> Vec<&Var> {
        let mut v = vec![
            &self.attn_norm,
            &self.q,
            &self.k,
            &self.v,
            &self.o,
            &self.ffn_norm,
            &self.gate,
            &self.up,
            &self.down,
        ];
        if let Some(b) = &self.qkv_bias {
            v.extend(b.iter());
        }
        if let Some(n) = &self.qk_norm {
            v.extend(n.iter());
        }
        v
    }
}

/// A llama decoder on [`Var`]s, differentiable end to end.
pub struct Student {
    pub cfg: LlamaConfig,
    embed: Var,
    layers: Vec<StudentLayer>,
    norm: Var,
    /// `None` when the head is tied to the embeddings.
    lm_head: Option<Var>,
    /// `[max_pos, head_dim]` (the half-frequency table repeated twice, half-split layout).
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    /// The dtype of the matrix products (forward and backward); the parameters, norms,
    /// softmax and everything else stay in `dtype`. Equal to `dtype` unless set.
    products: DType,
    device: Device,
    /// The teacher layers this student was cut from, in order (`kd_teacher_layers` in its
    /// `config.json`); none for a student not cut from a teacher.
    pub teacher_layers: Option<Vec<usize>>,
}

/// The `config.json` key naming the teacher layers a student was cut from.
pub const TEACHER_LAYERS_KEY: &str = "kd_teacher_layers";

/// Root-mean-square norm over the last axis, `x / sqrt(mean(x²) + eps) * w`, built from ops that
/// all have a backward pass (candle-nn's `ops::rms_norm` has none).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// Softmax over the last axis with a backward pass (candle-nn's `softmax_last_dim` has none).
/// The subtracted maximum is detached: softmax does not depend on it. Entries of `-inf` get
/// probability 0; a row must hold at least one finite entry.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Log-softmax over the last axis with a backward pass: `x - max - log Σ exp(x - max)`.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let c = x.broadcast_sub(&m)?;
    let lse = c.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(c.broadcast_sub(&lse)?)
}

/// Half-split ("Hugging Face") rotary embedding with a backward pass:
/// `x * cos + rotate_half(x) * sin`, `rotate_half([x1, x2]) = [-x2, x1]`.
/// `x` is `[b, heads, l, head_dim]`, `cos`/`sin` are `[l, head_dim]`.
pub fn rope_half_split(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
}

/// Inverse of llama.cpp's q/k `permute`: GGUF's interleaved RoPE rows
/// (`[heads, hd/2, 2, cols]`) back to the half-split layout (`[heads, 2, hd/2, cols]`).
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Hugging Face names (within a layer) of one layer's parameters with their shapes, in a
/// fixed order: the llama block's nine, then the family's own (Qwen2's q/k/v biases, Qwen3's
/// q/k norms).
fn layer_shapes(cfg: &LlamaConfig) -> Vec<(&'static str, Vec<usize>)> {
    let d = cfg.hidden_size;
    let hd = cfg.head_dim();
    let qd = cfg.q_dim();
    let kvd = cfg.num_key_value_heads * hd;
    let ff = cfg.intermediate_size;
    let mut v = vec![
        ("input_layernorm.weight", vec![d]),
        ("self_attn.q_proj.weight", vec![qd, d]),
        ("self_attn.k_proj.weight", vec![kvd, d]),
        ("self_attn.v_proj.weight", vec![kvd, d]),
        ("self_attn.o_proj.weight", vec![d, qd]),
        ("post_attention_layernorm.weight", vec![d]),
        ("mlp.gate_proj.weight", vec![ff, d]),
        ("mlp.up_proj.weight", vec![ff, d]),
        ("mlp.down_proj.weight", vec![d, ff]),
    ];
    if cfg.arch.qkv_bias() {
        v.push(("self_attn.q_proj.bias", vec![qd]));
        v.push(("self_attn.k_proj.bias", vec![kvd]));
        v.push(("self_attn.v_proj.bias", vec![kvd]));
    }
    if cfg.arch.qk_norm() {
        v.push(("self_attn.q_norm.weight", vec![hd]));
        v.push(("self_attn.k_norm.weight", vec![hd]));
    }
    v
}

fn layer_name(i: usize, n: &str) -> String {
    format!("model.layers.{i}.{n}")
}

impl Student {
    /// Builds a student from f32 tensors with Hugging Face names (removed from `ts`); `source`
    /// names the file or directory in errors. Extra tensors are ignored (a tied checkpoint may
    /// still hold `lm_head.weight`).
    fn from_tensors(
        cfg: LlamaConfig,
        ts: &mut HashMap<String, Tensor>,
        source: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate().map_err(|what| Error::BadField {
            path: source.to_path_buf(),
            field: "config".into(),
            what,
        })?;
        let mut take = |name: &str, expected: &[usize]| -> Result<Var> {
            let t = ts.remove(name).ok_or_else(|| Error::MissingTensor {
                path: source.to_path_buf(),
                name: name.to_string(),
            })?;
            if t.dims() != expected {
                return Err(Error::TensorShape {
                    path: source.to_path_buf(),
                    name: name.to_string(),
                    found: t.dims().to_vec(),
                    expected: expected.to_vec(),
                });
            }
            Ok(Var::from_tensor(
                &t.to_dtype(dtype)?.to_device(device)?.contiguous()?,
            )?)
        };
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = take("model.embed_tokens.weight", &[v, d])?;
        // Not `with_capacity(num_hidden_layers)`: the count comes from a file, and a missing
        // layer's tensors end the loop with an error long before a huge count would.
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let mut vars = Vec::with_capacity(14);
            for (n, shape) in layer_shapes(&cfg) {
                vars.push(take(&layer_name(i, n), &shape)?);
            }
            let mut it = vars.into_iter();
            let mut next = || it.next().expect("a parameter per layer_shapes entry");
            layers.push(StudentLayer {
                attn_norm: next(),
                q: next(),
                k: next(),
                v: next(),
                o: next(),
                ffn_norm: next(),
                gate: next(),
                up: next(),
                down: next(),
                qkv_bias: cfg.arch.qkv_bias().then(|| [next(), next(), next()]),
                qk_norm: cfg.arch.qk_norm().then(|| [next(), next()]),
            });
        }
        let norm = take("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight", &[v, d])?)
        };
        let (cos, sin) = rope_tables(&cfg, dtype, device)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            dtype,
            products: dtype,
            device: device.clone(),
            teacher_layers: None,
        })
    }

    /// Seeded random initialisation (deterministic for a given `seed`): every matrix is normal
    /// with standard deviation `1/sqrt(fan_in)` (the embeddings `1/sqrt(hidden)`, so tied logits
    /// start near unit scale), every norm weight is 1.
    pub fn random(cfg: &LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let mut ts = HashMap::new();
        let mut mat = |name: String, shape: &[usize]| -> Result<()> {
            let n: usize = shape.iter().product();
            let t = if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, &Device::Cpu)?
            } else if shape.len() == 1 {
                Tensor::ones(shape, DType::F32, &Device::Cpu)?
            } else {
                let s = 1.0 / (shape[1] as f32).sqrt();
                let v: Vec<f32> = (0..n).map(|_| rng.normal() * s).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            };
            ts.insert(name, t);
            Ok(())
        };
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        mat("model.embed_tokens.weight".into(), &[v, d])?;
        for i in 0..cfg.num_hidden_layers {
            for (n, shape) in layer_shapes(cfg) {
                mat(layer_name(i, n), &shape)?;
            }
        }
        mat("model.norm.weight".into(), &[d])?;
        if !cfg.tie_word_embeddings {
            mat("lm_head.weight".into(), &[v, d])?;
        }
        Self::from_tensors(cfg.clone(), &mut ts, Path::new("<random>"), dtype, device)
    }

    /// Loads a Hugging Face directory (`config.json` and `*.safetensors`) as a student.
    pub fn from_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let (cfg, json) = crate::loader::read_hf_config_json(dir)?;
        let mut ts = load_hf_tensors(dir, &Device::Cpu)?;
        let mut s = Self::from_tensors(cfg, &mut ts, dir, dtype, device)?;
        s.teacher_layers = json
            .get(TEACHER_LAYERS_KEY)
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        Ok(s)
    }

    /// A student made of the teacher's layers `keep_layers` (in that order, renumbered from 0),
    /// with the teacher's embeddings, final norm and head. `path` is a `.gguf` file (any type
    /// candle reads, dequantized; q/k rows converted to the half-split layout) or a Hugging
    /// Face directory.
    pub fn from_teacher(
        path: &Path,
        keep_layers: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if keep_layers.is_empty() {
            return Err(Error::EmptyLayerSelection);
        }
        let (mut cfg, mut ts) = if path.is_dir() {
            let cfg = read_hf_config(path)?;
            check_layers(keep_layers, cfg.num_hidden_layers)?;
            // Only the kept layers (and the embeddings, final norm and head) are expanded.
            let kept: Vec<String> = keep_layers
                .iter()
                .map(|i| format!("model.layers.{i}."))
                .collect();
            let ts = load_hf_tensors_where(path, &Device::Cpu, |name| {
                !name.starts_with("model.layers.") || kept.iter().any(|k| name.starts_with(k))
            })?;
            (cfg, ts)
        } else {
            read_gguf_as_hf(path, keep_layers)?
        };
        // Rename the kept layers 0..n (GGUF tensors are already renumbered).
        if path.is_dir() {
            let mut renamed = HashMap::new();
            for (n, _) in layer_shapes(&cfg) {
                for (new, &old) in keep_layers.iter().enumerate() {
                    let name = layer_name(old, n);
                    let t = ts.get(&name).cloned().ok_or_else(|| Error::MissingTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                    })?;
                    renamed.insert(layer_name(new, n), t);
                }
            }
            ts.retain(|k, _| !k.starts_with("model.layers."));
            ts.extend(renamed);
        }
        cfg.num_hidden_layers = keep_layers.len();
        let mut s = Self::from_tensors(cfg, &mut ts, path, dtype, device)?;
        s.teacher_layers = Some(keep_layers.to_vec());
        Ok(s)
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Computes the matrix products in `dtype` (`student-fit --precision bf16`): operands are
    /// rounded to it and the product comes back in the parameters' dtype, so the parameters
    /// (and AdamW's moments) stay f32 and their gradients arrive through the rounding.
    pub fn set_products(&mut self, dtype: DType) {
        self.products = dtype;
    }

    /// The dtype of the matrix products.
    pub fn products(&self) -> DType {
        self.products
    }

    /// `a · b` in the products' dtype, returned in the parameters' dtype.
    pub fn product(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if self.products == self.dtype {
            return Ok(a.matmul(b)?);
        }
        let p = self.products;
        Ok(a.to_dtype(p)?
            .matmul(&b.to_dtype(p)?)?
            .to_dtype(self.dtype)?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of scalar parameters (tied embeddings counted once); equals `cfg.n_params()`.
    pub fn n_params(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Every parameter with its Hugging Face name, sorted by name. The `Var`s share storage
    /// with the model: an optimizer updating them updates the model.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        for (i, l) in self.layers.iter().enumerate() {
            for ((n, _), v) in layer_shapes(&self.cfg).iter().zip(l.vars()) {
                out.push((layer_name(i, n), v.clone()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Writes every parameter as f32 with Hugging Face names (tied embeddings once, no
    /// `lm_head.weight`).
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let mut ts = HashMap::new();
        for (n, v) in self.named_vars() {
            ts.insert(
                n,
                v.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&ts, path).map_err(|source| Error::Safetensors {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// Overwrites every parameter from a file written by [`Student::save_safetensors`] (or any
    /// Hugging Face safetensors of the same shapes). Every parameter must be present with its
    /// shape, and a tensor that is not a parameter (e.g. `lm_head.weight` for a tied model) is
    /// an error rather than silently dropped. Nothing changes unless the whole file fits.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<()> {
        let mut ts = candle_core::safetensors::load(path, &Device::Cpu).map_err(|source| {
            Error::Safetensors {
                path: path.to_path_buf(),
                source: Box::new(source),
            }
        })?;
        let vars = self.named_vars();
        // Check everything before changing anything, so a failed load leaves the model intact.
        for (n, v) in &vars {
            let t = ts.get(n).ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: n.clone(),
            })?;
            if t.dims() != v.dims() {
                return Err(Error::TensorShape {
                    path: path.to_path_buf(),
                    name: n.clone(),
                    found: t.dims().to_vec(),
                    expected: v.dims().to_vec(),
                });
            }
        }
        if let Some(extra) = ts.keys().find(|k| !vars.iter().any(|(n, _)| n == *k)) {
            return Err(Error::UnexpectedTensor {
                path: path.to_path_buf(),
                name: extra.clone(),
            });
        }
        for (n, v) in vars {
            let t = ts.remove(&n).expect("checked above");
            v.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Right-pads `rows` with id 0 into a `[b, max_len]` u32 tensor and returns it with the
    /// row lengths, checking ids against the vocabulary and lengths against the context.
    pub fn batch(&self, rows: &[&[u32]]) -> Result<(Tensor, Vec<usize>)> {
        let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * l);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(0u32, l - r.len()));
        }
        let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        let ids = Tensor::from_vec(ids, (rows.len(), l), &self.device)?;
        self.check_batch(&ids, &lengths)?;
        Ok((ids, lengths))
    }

    fn check_batch(&self, ids: &Tensor, lengths: &[usize]) -> Result<()> {
        let (b, l) = ids.dims2()?;
        if lengths.len() != b {
            return Err(Error::InvalidBatch {
                what: format!("{} lengths for {b} rows", lengths.len()),
            });
        }
        if let Some(&n) = lengths.iter().find(|&&n| n == 0 || n > l) {
            return Err(Error::InvalidBatch {
                what: format!("row length {n} outside 1..={l}"),
            });
        }
        if l > self.cfg.max_len() {
            return Err(Error::TooLong {
                len: l,
                max: self.cfg.max_len(),
            });
        }
        let v: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        for (row, &n) in v.iter().zip(lengths) {
            if let Some(&id) = row[..n]
                .iter()
                .find(|&&id| id as usize >= self.cfg.vocab_size)
            {
                return Err(Error::TokenOutOfRange {
                    id,
                    vocab: self.cfg.vocab_size,
                });
            }
        }
        Ok(())
    }

    /// Hidden states after the final norm, `[b, l, hidden]`, for right-padded `ids` `[b, l]`
    /// (u32) whose row `i` holds `lengths[i]` real tokens. Attention is causal and never looks
    /// at padding, so a row's results do not depend on its batch. Positions past a row's length
    /// hold values that mean nothing (but are finite); padding ids must still be in the
    /// vocabulary (0 is).
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        self.check_batch(ids, lengths)?;
        let (b, l) = ids.dims2()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
        );
        let rep = nh / nkv;
        let eps = cfg.rms_norm_eps;
        let cos = self.cos.narrow(0, 0, l)?;
        let sin = self.sin.narrow(0, 0, l)?;
        let mut mask = vec![0f32; b * l * l];
        for (bi, &n) in lengths.iter().enumerate() {
            for t in 0..l {
                for j in 0..l {
                    if j > t || j >= n {
                        mask[(bi * l + t) * l + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        // Queries of the `rep` heads sharing one kv head are stacked along the row axis:
        // [b, 1, rep*l, l].
        let mask = Tensor::from_vec(mask, (b, 1, l, l), &self.device)?
            .to_dtype(self.dtype)?
            .repeat((1, 1, rep, 1))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let ids = ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed.index_select(&ids, 0)?; // [b*l, d]
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let mut q = self.product(&h, &layer.q.t()?)?;
            let mut k = self.product(&h, &layer.k.t()?)?;
            let mut v = self.product(&h, &layer.v.t()?)?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let mut q = q.reshape((b, l, nh, hd))?;
            let mut k = k.reshape((b, l, nkv, hd))?;
            if let Some([nq, nk]) = &layer.qk_norm {
                q = rms_norm(&q, nq, eps)?;
                k = rms_norm(&k, nk, eps)?;
            }
            let q = q.transpose(1, 2)?.contiguous()?;
            let k = k.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = rope_half_split(&q, &cos, &sin)?;
            let k = rope_half_split(&k, &cos, &sin)?;
            // [b, nkv, rep*l, hd] x [b, nkv, hd, l]
            let q = q.reshape((b, nkv, rep * l, hd))?;
            let att = (self.product(&q, &k.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = softmax_last_dim(&att)?;
            let y = self.product(&att, &v)?;
            let y = y
                .reshape((b, nh, l, hd))?
                .transpose(1, 2)?
                .reshape((b * l, nh * hd))?;
            x = (x + self.product(&y, &layer.o.t()?)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, eps)?;
            let g = self.product(&h, &layer.gate.t()?)?;
            let u = self.product(&h, &layer.up.t()?)?;
            let m = (g.silu()? * u)?;
            x = (x + self.product(&m, &layer.down.t()?)?)?;
        }
        let x = rms_norm(&x, &self.norm, eps)?;
        Ok(x.reshape((b, l, cfg.hidden_size))?)
    }

    /// Logits `[n, vocab]` (in the model's dtype) for hidden rows `[n, hidden]`: the head is
    /// applied only where the trainer needs it, in chunks of its choosing.
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.product(hidden_rows, &head.t()?)
    }
}

fn check_layers(keep: &[usize], n_layers: usize) -> Result<()> {
    if keep.is_empty() {
        return Err(Error::EmptyLayerSelection);
    }
    if let Some(&index) = keep.iter().find(|&&i| i >= n_layers) {
        return Err(Error::LayerOutOfRange { index, n_layers });
    }
    Ok(())
}

/// Cos/sin tables `[max_pos, head_dim]` for the half-split layout, computed in f64.
fn rope_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let max = cfg.max_position_embeddings;
    let (inv, attn) = cfg.rope_frequencies();
    let mut cos = Vec::with_capacity(max * hd);
    let mut sin = Vec::with_capacity(max * hd);
    for p in 0..max {
        for _ in 0..2 {
            for &f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() * attn);
                sin.push(a.sin() * attn);
            }
        }
    }
    let mk = |v: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, (max, hd), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    Ok((mk(cos)?, mk(sin)?))
}

/// Reads the listed layers (renumbered 0..n), embeddings, final norm and head of a GGUF file,
/// dequantized to f32, under Hugging Face names and in the half-split q/k layout.
fn read_gguf_as_hf(path: &Path, keep: &[usize]) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let gguf_err = |source| Error::Gguf {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    crate::gguf_check::check(path)?;
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut f).map_err(gguf_err)?;
    let cfg = gguf_config(&content, &mut f, path)?;
    check_layers(keep, cfg.num_hidden_layers)?;
    let mut get = |name: &str| -> Result<Tensor> {
        if !content.tensor_infos.contains_key(name) {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            });
        }
        let q = content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(gguf_err)?;
        Ok(q.dequantize(&Device::Cpu)?)
    };
    let mut ts = HashMap::new();
    ts.insert(
        "model.embed_tokens.weight".into(),
        get("token_embd.weight")?,
    );
    ts.insert("model.norm.weight".into(), get("output_norm.weight")?);
    if !cfg.tie_word_embeddings {
        ts.insert("lm_head.weight".into(), get("output.weight")?);
    }
    // llama.cpp interleaves q/k rows for llama only.
    let interleaved = cfg.arch == crate::config::Arch::Llama;
    for (new, &old) in keep.iter().enumerate() {
        let g = |n: &str| format!("blk.{old}.{n}");
        let mut pairs = vec![
            ("input_layernorm.weight", "attn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ];
        if cfg.arch.qkv_bias() {
            pairs.push(("self_attn.q_proj.bias", "attn_q.bias"));
            pairs.push(("self_attn.k_proj.bias", "attn_k.bias"));
            pairs.push(("self_attn.v_proj.bias", "attn_v.bias"));
        }
        if cfg.arch.qk_norm() {
            pairs.push(("self_attn.q_norm.weight", "attn_q_norm.weight"));
            pairs.push(("self_attn.k_norm.weight", "attn_k_norm.weight"));
        }
        for (hf, gg) in pairs {
            let mut t = get(&g(gg))?;
            let heads = match gg {
                "attn_q.weight" if interleaved => Some(cfg.num_attention_heads),
                "attn_k.weight" if interleaved => Some(cfg.num_key_value_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                // The shape comes from the file: check it before reshaping by heads (the
                // other tensors are checked with their Hugging Face names afterwards).
                let want = [heads * cfg.head_dim(), cfg.hidden_size];
                if t.dims() != want {
                    return Err(Error::TensorShape {
                        path: path.to_path_buf(),
                        name: g(gg),
                        found: t.dims().to_vec(),
                        expected: want.to_vec(),
                    });
                }
                t = unpermute_qk(&t, heads)?;
            }
            ts.insert(layer_name(new, hf), t);
        }
    }
    Ok((cfg, ts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Rng;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The differentiable compositions compute what candle-nn's fused (gradient-free) kernels
    /// compute, in f32.
    #[test]
    fn differentiable_ops_equal_candle_nn_fused_kernels() {
        let x = randn(&[5, 8], 1);
        let w = randn(&[8], 2);
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &want) < 1e-5);

        let mask = Tensor::from_vec(
            (0..40)
                .map(|i| {
                    if i % 8 > i / 8 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect::<Vec<_>>(),
            (5, 8),
            &Device::Cpu,
        )
        .unwrap();
        let z = (x.clone() * 3.0).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&z).unwrap();
        assert!(max_diff(&softmax_last_dim(&z).unwrap(), &want) < 1e-6);
        let want = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        assert!(max_diff(&log_softmax_last_dim(&x).unwrap(), &want) < 1e-5);

        let q = randn(&[2, 3, 5, 8], 3);
        let cos = randn(&[5, 4], 4);
        let sin = randn(&[5, 4], 5);
        let want = candle_nn::rotary_emb::rope(&q, &cos, &sin).unwrap();
        let full = |t: &Tensor| Tensor::cat(&[t, t], 1).unwrap();
        let got = rope_half_split(&q, &full(&cos), &full(&sin)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }

    /// `unpermute_qk` undoes llama.cpp's converter permutation
    /// (`[heads, 2, hd/2, cols] -> [heads, hd/2, 2, cols]`).
    #[test]
    fn unpermute_inverts_the_gguf_permutation() {
        let w = randn(&[12, 5], 6);
        let permuted = w
            .reshape((3, 2, 2, 5))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((12, 5))
            .unwrap();
        assert_eq!(max_diff(&unpermute_qk(&permuted, 3).unwrap(), &w), 0.0);
    }
}
