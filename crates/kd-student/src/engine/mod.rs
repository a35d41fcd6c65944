//! Two training engines for the same student and the same arithmetic.
//!
//! - **candle** ([`crate::train`]): candle autograd on [`kd_model::Student`]'s `Var`s. It runs
//!   every architecture the student loader reads, in device-generic code (`student-fit` runs
//!   it on the CPU), and is the reference the kernel engine is checked against.
//! - **kernels** ([`KernelStudent`]): a llama/Mistral student on the project's own CPU
//!   kernels (`kd_model::kernels`, AVX-512 or AVX2+FMA chosen at run time). All parameters
//!   live in one flat `f32` buffer, all gradients in a second and the AdamW moments in two
//!   more; activations, attention probabilities and the head's chunk buffers are sized once
//!   from `token_budget`, `max_len` and the model ([`Plan`]). Forward and backward are written
//!   per layer ([`ops`], [`attention`]): RMSNorm, half-split RoPE, grouped-query causal
//!   attention, SwiGLU, residuals, the embedding gather and its scatter-add. Every matrix
//!   product — `X·Wᵀ`, `dY·W` and `dYᵀ·X` — is one [`PackedF32`] product, packed from the
//!   row-major operand or its transpose.
//!
//! The output head and the loss are fused and chunked over positions in both engines: the
//! logits of `logits_chunk` positions, `kd_loss` on them, `∂L/∂z`, then `∂L/∂h` and the
//! head's gradient accumulated in place; `positions × vocabulary` logits never exist at once.
//!
//! ## What the kernel engine stores
//!
//! Per layer it keeps the layer input, both norms' outputs and reciprocal scales, the fused
//! `[q | k | v]` rows after RoPE, the attention probabilities, the attention output, the
//! gate/up rows and the SwiGLU output, and recomputes nothing. With 1024-token batches of
//! 512-token rows the 6-layer SmolLM2 student holds about 60 MB of these per layer, so
//! recomputation (which costs a second forward pass) would buy memory that is not the
//! bottleneck: the parameters, gradients and moments are 800 MB, the packed head 230 MB.
//!
//! ## Determinism
//!
//! Every sum runs in an order fixed by the shapes (products sum each output over the inner
//! dimension in order; norms' weight gradients sum fixed blocks of rows in order; attention
//! sums query heads of a key/value group in order), so a step's result does not depend on the
//! thread count, and a resumed run repeats an uninterrupted one bit for bit.

pub mod attention;
pub mod ops;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use kd_loss::{LossConfig, LossParts, Position};
use kd_model::kernels::PackedF32;
use kd_model::{LlamaConfig, Student};
use rayon::prelude::*;

use crate::data::Batch;
use crate::error::{Error, Result, error, refuse};
use crate::optim::{AdamWConfig, StepInfo, decays};
use crate::train::{BatchLoss, PositionTargets};
use ops::{dw_acc, linear_backward, rms_backward, rms_forward, xwt};

/// Vocabulary columns per slab of the head's transpose (see `Workspace::head_wt`).
const SLAB: usize = 2048;

/// Which training engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Candle,
    Kernels,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Candle => "candle",
            EngineKind::Kernels => "kernels",
        }
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "candle" => Ok(EngineKind::Candle),
            "kernels" => Ok(EngineKind::Kernels),
            _ => Err(format!("unknown engine `{s}` (candle or kernels)")),
        }
    }
}

/// Why the kernel engine cannot train this student here, if it cannot.
pub fn kernels_unsupported(cfg: &LlamaConfig, max_len: usize) -> Option<String> {
    if !kd_model::kernels::supported() {
        return Some("this CPU has neither AVX-512F nor AVX2 with FMA".into());
    }
    if cfg.arch.qkv_bias() || cfg.arch.qk_norm() {
        return Some(format!(
            "{} students (q/k/v biases or q/k norms) train on the candle engine",
            cfg.arch.name()
        ));
    }
    if let Some(w) = cfg.sliding_window
        && w < max_len
    {
        return Some(format!(
            "a sliding window of {w} tokens shorter than max_len = {max_len}"
        ));
    }
    if !cfg.head_dim().is_multiple_of(2) {
        return Some(format!("odd head_dim {}", cfg.head_dim()));
    }
    None
}

/// Picks the engine: the one asked for (an error if the kernels cannot run this student), or
/// the kernels where they can run, candle otherwise. Returns the engine and, for candle
/// chosen automatically, why.
pub fn choose(
    asked: Option<EngineKind>,
    cfg: &LlamaConfig,
    max_len: usize,
    device: &Device,
) -> Result<(EngineKind, Option<String>)> {
    let why_not = if device.is_cpu() {
        kernels_unsupported(cfg, max_len)
    } else {
        Some("the kernel engine runs on CPUs".into())
    };
    match (asked, why_not) {
        (Some(EngineKind::Kernels), Some(why)) => {
            refuse!(Setting, "--engine kernels cannot train this student: {why}")
        }
        (Some(k), _) => Ok((k, None)),
        (None, None) => Ok((EngineKind::Kernels, None)),
        (None, Some(why)) => Ok((EngineKind::Candle, Some(why))),
    }
}

/// One parameter tensor in the flat buffers.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    off: usize,
    len: usize,
    decays: bool,
}

#[derive(Clone, Copy, Debug)]
struct LayerOff {
    attn_norm: usize,
    /// q, k and v, contiguous: one `[q_dim + 2·kv_dim, hidden]` matrix.
    qkv: usize,
    o: usize,
    ffn_norm: usize,
    /// gate and up, contiguous: one `[2·intermediate, hidden]` matrix.
    gu: usize,
    down: usize,
}

/// What one layer's forward pass keeps for the backward pass.
#[derive(Default)]
struct LayerActs {
    x: Vec<f32>,
    inv1: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    att: Vec<f32>,
    x2: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    gu: Vec<f32>,
    m: Vec<f32>,
}

impl LayerActs {
    fn bufs(&mut self) -> [&mut Vec<f32>; 11] {
        [
            &mut self.x,
            &mut self.inv1,
            &mut self.h1,
            &mut self.qkv,
            &mut self.probs,
            &mut self.att,
            &mut self.x2,
            &mut self.inv2,
            &mut self.h2,
            &mut self.gu,
            &mut self.m,
        ]
    }
}

/// Where the engine's time went since it was built: wall-clock time per phase of a step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// The layers' forward pass (embedding gather to the final norm).
    pub forward: Duration,
    /// Packing the head's weights (and their transpose) and its forward product (logits of
    /// each chunk).
    pub head_forward: Duration,
    /// `kd_loss` on the logits: the loss and `∂L/∂z`.
    pub loss: Duration,
    /// The head's backward products: `∂L/∂h` and the head's gradient.
    pub head_backward: Duration,
    /// The layers' backward pass.
    pub backward: Duration,
    /// AdamW with clipping.
    pub step: Duration,
}

impl Timings {
    pub fn total(&self) -> Duration {
        self.phases().iter().map(|p| p.1).sum()
    }

    /// The phases' names, in the order of a step (the keys of `summary.json`'s
    /// `engine_seconds`).
    pub const PHASES: [&'static str; 6] = [
        "forward",
        "head_forward",
        "loss",
        "head_backward",
        "backward",
        "optimizer",
    ];

    /// The phases by name, in the order of a step.
    pub fn phases(&self) -> [(&'static str, Duration); 6] {
        let d = [
            self.forward,
            self.head_forward,
            self.loss,
            self.head_backward,
            self.backward,
            self.step,
        ];
        std::array::from_fn(|i| (Self::PHASES[i], d[i]))
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.phases().map(|(n, d)| (n, d.as_secs_f64()));
        f.write_str(&phase_shares(&secs))
    }
}

/// "forward 13%, head forward 14%, …": each phase's share of the seconds given.
pub fn phase_shares(secs: &[(&str, f64)]) -> String {
    let total = secs.iter().map(|p| p.1).sum::<f64>().max(1e-12);
    secs.iter()
        .map(|(n, s)| format!("{} {:.0}%", n.replace('_', " "), 100.0 * s / total))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Memory the engine reserves at start, by purpose.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Plan {
    /// Tokens per batch the activations are sized for (`token_budget`).
    pub tokens: usize,
    pub max_len: usize,
    pub chunk: usize,
    pub params_bytes: usize,
    pub grads_bytes: usize,
    pub moments_bytes: usize,
    pub activations_bytes: usize,
    pub backward_bytes: usize,
    pub head_bytes: usize,
    pub attention_scratch_bytes: usize,
}

impl Plan {
    pub fn total_bytes(&self) -> usize {
        self.params_bytes
            + self.grads_bytes
            + self.moments_bytes
            + self.activations_bytes
            + self.backward_bytes
            + self.head_bytes
            + self.attention_scratch_bytes
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |b: usize| b as f64 / 1e6;
        write!(
            f,
            "{:.0} MB for {} tokens (rows ≤ {}, head chunks of {}): parameters {:.0}, gradients {:.0}, AdamW moments {:.0}, activations {:.0}, backward {:.0}, head {:.0}, attention scratch {:.0}",
            mb(self.total_bytes()),
            self.tokens,
            self.max_len,
            self.chunk,
            mb(self.params_bytes),
            mb(self.grads_bytes),
            mb(self.moments_bytes),
            mb(self.activations_bytes),
            mb(self.backward_bytes),
            mb(self.head_bytes),
            mb(self.attention_scratch_bytes)
        )
    }
}

/// Buffers of the forward and backward passes, reused from step to step.
#[derive(Default)]
struct Workspace {
    acts: Vec<LayerActs>,
    /// Input of the final norm (the last layer's output), its scales and output.
    xf: Vec<f32>,
    invf: Vec<f32>,
    hf: Vec<f32>,
    /// `∂L/∂` of the final hidden states.
    dhf: Vec<f32>,
    g: Vec<f32>,
    dh: Vec<f32>,
    dm: Vec<f32>,
    dgu: Vec<f32>,
    datt: Vec<f32>,
    dqkv: Vec<f32>,
    t: Vec<f32>,
    partial: Vec<f32>,
    pk: PackedF32,
    head_w: PackedF32,
    /// The head's transpose `[hidden, vocab]` in slabs of [`SLAB`] vocabulary columns: `∂L/∂h`
    /// sums over the whole vocabulary, and a product whose inner dimension is 49152 long
    /// streams its inputs from memory; slab by slab they stay in cache.
    head_wt: Vec<PackedF32>,
    /// One slab of a chunk's `∂L/∂z`, `[chunk, SLAB]`.
    gs: Vec<f32>,
    /// Whether `head_w` holds the current head weights.
    head_w_fresh: bool,
    z: Vec<f32>,
    gz: Vec<f32>,
    gt: Vec<f32>,
    hc: Vec<f32>,
    dhc: Vec<f32>,
    scratch: Vec<attention::Scratch>,
    /// Longest row the attention scratch holds.
    scratch_len: usize,
}

impl Workspace {
    /// The backward pass's buffers, in [`backward_sizes`] order.
    fn backward_bufs(&mut self) -> [&mut Vec<f32>; 8] {
        [
            &mut self.g,
            &mut self.dh,
            &mut self.dm,
            &mut self.dgu,
            &mut self.datt,
            &mut self.dqkv,
            &mut self.t,
            &mut self.partial,
        ]
    }
}

/// Floats of each [`LayerActs`] buffer for `n` tokens and `probs` attention probabilities,
/// for widths `(hidden, q_dim, q_dim + 2·kv_dim, intermediate)`.
fn layer_sizes(
    (d, qd, qkvd, f): (usize, usize, usize, usize),
    n: usize,
    probs: usize,
) -> [usize; 11] {
    [
        n * d,
        n,
        n * d,
        n * qkvd,
        probs,
        n * qd,
        n * d,
        n,
        n * d,
        n * 2 * f,
        n * f,
    ]
}

/// Floats of each [`Workspace::backward_bufs`] buffer for `n` tokens.
fn backward_sizes((d, qd, qkvd, f): (usize, usize, usize, usize), n: usize) -> [usize; 8] {
    let wide = (2 * f).max(qkvd).max(d).max(qd);
    [
        n * d,
        n * d,
        n * f,
        n * 2 * f,
        n * qd,
        n * qkvd,
        n * wide,
        ops::rms_partial_len(n, d),
    ]
}

/// A batch in the engine's packed layout: the real tokens of every row, one after the other.
struct Packed {
    ids: Vec<u32>,
    pos: Vec<u32>,
    /// `(first token, length)` per row.
    segs: Vec<(usize, usize)>,
    /// Packed token index of every distilled position.
    rows: Vec<usize>,
}

impl Packed {
    fn of(batch: &Batch) -> Packed {
        let l = batch.seq_len;
        let mut p = Packed {
            ids: Vec::new(),
            pos: Vec::new(),
            segs: Vec::with_capacity(batch.lengths.len()),
            rows: Vec::with_capacity(batch.n_pos()),
        };
        for (r, &len) in batch.lengths.iter().enumerate() {
            let len = len as usize;
            p.segs.push((p.ids.len(), len));
            p.ids
                .extend_from_slice(&batch.input_ids[r * l..r * l + len]);
            p.pos.extend(0..len as u32);
        }
        for (&r, &t) in batch.pos_row.iter().zip(&batch.pos_t) {
            p.rows.push(p.segs[r as usize].0 + t as usize);
        }
        p
    }
}

/// Resizes `v` to `n` floats (reusing its allocation when it is large enough).
fn fit(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// The llama student on the project's kernels: flat parameters, gradients, AdamW moments.
pub struct KernelStudent {
    pub cfg: LlamaConfig,
    params: Vec<f32>,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    slots: Vec<Slot>,
    embed: usize,
    layers: Vec<LayerOff>,
    norm: usize,
    head: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    ws: Workspace,
    plan: Plan,
    timings: Timings,
    pub adam: AdamWConfig,
    /// Optimizer steps taken.
    pub step: u64,
    /// Distilled positions whose gradients (summed) are in `grads`, awaiting a step.
    pending: usize,
}

impl KernelStudent {
    /// Copies `student`'s parameters into flat buffers and reserves the buffers of batches of
    /// up to `tokens` tokens in rows of up to `max_len`, with head chunks of `chunk` positions.
    pub fn new(
        student: &Student,
        adam: AdamWConfig,
        tokens: usize,
        max_len: usize,
        chunk: usize,
    ) -> Result<Self> {
        Self::build(student, adam, tokens, max_len, chunk, true)
    }

    /// The forward pass and the head only (evaluation, logits): no gradients, moments or
    /// backward buffers.
    pub fn for_inference(
        student: &Student,
        tokens: usize,
        max_len: usize,
        chunk: usize,
    ) -> Result<Self> {
        Self::build(
            student,
            AdamWConfig::default(),
            tokens,
            max_len,
            chunk,
            false,
        )
    }

    fn build(
        student: &Student,
        adam: AdamWConfig,
        tokens: usize,
        max_len: usize,
        chunk: usize,
        training: bool,
    ) -> Result<Self> {
        let cfg = student.cfg.clone();
        if let Some(why) = kernels_unsupported(&cfg, max_len) {
            refuse!(
                Setting,
                "the kernel engine cannot train this student: {why}"
            );
        }
        let (d, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.num_key_value_heads * cfg.head_dim());
        let mut slots = Vec::new();
        let mut at = 0;
        let mut push = |name: String, shape: Vec<usize>| -> usize {
            let len = shape.iter().product();
            let off = at;
            at += len;
            slots.push(Slot {
                decays: decays(&name),
                name,
                shape,
                off,
                len,
            });
            off
        };
        let embed = push("model.embed_tokens.weight".into(), vec![v, d]);
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let n = |s: &str| format!("model.layers.{i}.{s}");
            let attn_norm = push(n("input_layernorm.weight"), vec![d]);
            let qkv = push(n("self_attn.q_proj.weight"), vec![qd, d]);
            push(n("self_attn.k_proj.weight"), vec![kvd, d]);
            push(n("self_attn.v_proj.weight"), vec![kvd, d]);
            let o = push(n("self_attn.o_proj.weight"), vec![d, qd]);
            let ffn_norm = push(n("post_attention_layernorm.weight"), vec![d]);
            let gu = push(n("mlp.gate_proj.weight"), vec![f, d]);
            push(n("mlp.up_proj.weight"), vec![f, d]);
            let down = push(n("mlp.down_proj.weight"), vec![d, f]);
            layers.push(LayerOff {
                attn_norm,
                qkv,
                o,
                ffn_norm,
                gu,
                down,
            });
        }
        let norm = push("model.norm.weight".into(), vec![d]);
        let head = if cfg.tie_word_embeddings {
            embed
        } else {
            push("lm_head.weight".into(), vec![v, d])
        };
        let total = at;
        let vars = student.named_vars();
        if vars.len() != slots.len() {
            refuse!(
                Setting,
                "the kernel engine lays out {} parameter tensors, the student has {}",
                slots.len(),
                vars.len()
            );
        }
        let hd = cfg.head_dim();
        let (inv, attn) = cfg.rope_frequencies();
        let npos = cfg.max_position_embeddings.max(max_len);
        let mut cos = Vec::with_capacity(npos * hd / 2);
        let mut sin = Vec::with_capacity(npos * hd / 2);
        for p in 0..npos {
            for &fr in &inv {
                let a = p as f64 * fr;
                cos.push((a.cos() * attn) as f32);
                sin.push((a.sin() * attn) as f32);
            }
        }
        let mut me = KernelStudent {
            cfg,
            params: vec![0.0; total],
            grads: vec![0.0; if training { total } else { 0 }],
            m: vec![0.0; if training { total } else { 0 }],
            v: vec![0.0; if training { total } else { 0 }],
            slots,
            embed,
            layers,
            norm,
            head,
            cos,
            sin,
            ws: Workspace::default(),
            plan: Plan::default(),
            timings: Timings::default(),
            adam,
            step: 0,
            pending: 0,
        };
        me.read_from(student)?;
        me.reserve(tokens, max_len, chunk, training);
        Ok(me)
    }

    /// The memory reserved at start.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Time spent per phase since the engine was built.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        let c = &self.cfg;
        let hd = c.head_dim();
        let (qd, kvd) = (c.q_dim(), c.num_key_value_heads * hd);
        (
            c.hidden_size,
            qd,
            kvd,
            qd + 2 * kvd,
            c.intermediate_size,
            c.vocab_size,
        )
    }

    /// Sizes every buffer for `tokens` tokens in rows of up to `max_len` (the worst case of
    /// the attention probabilities: `tokens · max_len` per head) and head chunks of `chunk`.
    fn reserve(&mut self, tokens: usize, max_len: usize, chunk: usize, training: bool) {
        let (d, qd, _, qkvd, f, v) = self.dims();
        let n = tokens.max(1);
        let len = max_len.min(n).max(1);
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.head_dim();
        let chunk = chunk.max(1);
        let ws = &mut self.ws;
        ws.acts
            .resize_with(self.cfg.num_hidden_layers, LayerActs::default);
        let mut act = 0;
        let sizes = layer_sizes((d, qd, qkvd, f), n, n * len * heads);
        for a in &mut ws.acts {
            for (b, s) in a.bufs().into_iter().zip(sizes) {
                b.reserve_exact(s);
                act += s;
            }
        }
        for (b, s) in [(&mut ws.xf, n * d), (&mut ws.invf, n), (&mut ws.hf, n * d)] {
            b.reserve_exact(s);
            act += s;
        }
        let wide = (2 * f).max(qkvd).max(d).max(qd);
        let mut back = 0;
        if training {
            back += n * d;
            ws.dhf.reserve_exact(n * d);
            let sizes = backward_sizes((d, qd, qkvd, f), n);
            for (b, s) in ws.backward_bufs().into_iter().zip(sizes) {
                b.reserve_exact(s);
                back += s;
            }
            // Backward products pack activations, `[width, tokens]`.
            ws.pk.reserve(n.max(wide), wide);
        }
        // The layer products pack the largest weight.
        ws.pk.reserve(wide, d.max(f));
        let mut head = 0;
        let train_only = if training { 1 } else { 0 };
        for (b, s) in [
            (&mut ws.z, chunk * v),
            (&mut ws.gz, train_only * chunk * v),
            (&mut ws.gt, train_only * chunk * v),
            (&mut ws.hc, chunk * d),
            (&mut ws.dhc, train_only * chunk * d),
        ] {
            b.reserve_exact(s);
            head += s;
        }
        ws.head_w.reserve(v, d);
        if training {
            ws.head_wt.resize_with(v.div_ceil(SLAB), PackedF32::new);
            for (i, pk) in ws.head_wt.iter_mut().enumerate() {
                pk.reserve(d, SLAB.min(v - i * SLAB));
            }
            ws.gs.reserve_exact(chunk * SLAB);
            head += chunk * SLAB;
        }
        let workers = rayon::current_num_threads().max(1);
        ws.scratch.resize_with(workers, attention::Scratch::default);
        for s in &mut ws.scratch {
            s.reserve(len, hd);
        }
        ws.scratch_len = len;
        let total = self.params.len() * 4;
        self.plan = Plan {
            tokens: n,
            max_len: len,
            chunk,
            params_bytes: total,
            grads_bytes: self.grads.len() * 4,
            moments_bytes: (self.m.len() + self.v.len()) * 4,
            activations_bytes: 4 * act,
            backward_bytes: 4 * back + ws.pk.capacity_bytes(),
            head_bytes: 4 * head
                + ws.head_w.capacity_bytes()
                + ws.head_wt.iter().map(|p| p.capacity_bytes()).sum::<usize>(),
            attention_scratch_bytes: ws.scratch.iter().map(|s| s.bytes()).sum(),
        };
    }

    fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Copies the parameters of `student` in.
    pub fn read_from(&mut self, student: &Student) -> Result<()> {
        for (name, var) in student.named_vars() {
            let s = self
                .slot(&name)
                .ok_or_else(|| error!(Input, "the kernel engine has no parameter `{name}`"))?
                .clone();
            if var.dims() != s.shape.as_slice() {
                refuse!(
                    Input,
                    "`{name}`: shape {:?}, expected {:?}",
                    var.dims(),
                    s.shape
                );
            }
            let t: Vec<f32> = var
                .as_tensor()
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            self.params[s.off..s.off + s.len].copy_from_slice(&t);
        }
        self.ws.head_w_fresh = false;
        Ok(())
    }

    /// Writes the parameters into `student` (to save, export or evaluate it).
    pub fn write_to(&self, student: &Student) -> Result<()> {
        for (name, var) in student.named_vars() {
            let s = self
                .slot(&name)
                .ok_or_else(|| error!(Input, "the kernel engine has no parameter `{name}`"))?;
            let t = Tensor::from_slice(
                &self.params[s.off..s.off + s.len],
                s.shape.as_slice(),
                &Device::Cpu,
            )?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The values of parameter `name` (e.g. to perturb one in a finite-difference check).
    pub fn param_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let s = self.slot(name)?.clone();
        self.ws.head_w_fresh = false;
        Some(&mut self.params[s.off..s.off + s.len])
    }

    /// Parameter names with their shapes, in the flat buffers' order.
    pub fn param_names(&self) -> Vec<(String, Vec<usize>)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.shape.clone()))
            .collect()
    }

    /// Loss of `batch` without gradients (the forward pass and the head only).
    pub fn loss(&mut self, batch: &Batch, cfg: &LossConfig, chunk: usize) -> Result<BatchLoss> {
        self.run(batch, cfg, chunk, false)
    }

    /// Gradients by parameter name (the mean over the positions accumulated since the last
    /// step), for tests.
    pub fn gradients(&self) -> Vec<(String, Vec<f32>)> {
        let k = 1.0 / self.pending.max(1) as f32;
        self.slots
            .iter()
            .map(|s| {
                let g = self.grads[s.off..s.off + s.len]
                    .iter()
                    .map(|x| x * k)
                    .collect();
                (s.name.clone(), g)
            })
            .collect()
    }

    fn attn_dims(&self) -> attention::Dims {
        let (.., qkvd, _, _) = self.dims();
        let hd = self.cfg.head_dim();
        attention::Dims {
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            hd,
            qkv: qkvd,
            scale: (1.0 / (hd as f64).sqrt()) as f32,
        }
    }

    /// Forward pass over `p`, keeping what the backward pass needs; the final hidden states
    /// end in `ws.hf`.
    fn forward(&mut self, p: &Packed) {
        let (d, qd, _, qkvd, f, _) = self.dims();
        let n = p.ids.len();
        let dims = self.attn_dims();
        let (heads, kv, hd, eps) = (dims.heads, dims.kv_heads, dims.hd, self.cfg.rms_norm_eps);
        let (_, prob_len) = attention::prob_offsets(&p.segs, heads);
        // A row longer than planned (evaluation may be) grows the attention scratch.
        let longest = p.segs.iter().map(|s| s.1).max().unwrap_or(0);
        if longest > self.ws.scratch_len {
            for s in &mut self.ws.scratch {
                s.reserve(longest, hd);
            }
            self.ws.scratch_len = longest;
        }
        let KernelStudent {
            params,
            ws,
            layers,
            cos,
            sin,
            embed,
            norm,
            ..
        } = self;
        let nl = layers.len();
        let sizes = layer_sizes((d, qd, qkvd, f), n, prob_len);
        for a in ws.acts.iter_mut() {
            for (b, s) in a.bufs().into_iter().zip(sizes) {
                fit(b, s);
            }
        }
        fit(&mut ws.xf, n * d);
        fit(&mut ws.invf, n);
        fit(&mut ws.hf, n * d);
        // Embedding gather.
        {
            let x = &mut ws.acts[0].x;
            for (i, &id) in p.ids.iter().enumerate() {
                let id = id as usize;
                x[i * d..(i + 1) * d].copy_from_slice(&params[*embed + id * d..][..d]);
            }
        }
        for li in 0..nl {
            let lo = layers[li];
            let w = |off: usize, len: usize| &params[off..off + len];
            let (cur, rest) = ws.acts.split_at_mut(li + 1);
            let a = &mut cur[li];
            rms_forward(&a.x, w(lo.attn_norm, d), eps, d, &mut a.h1, &mut a.inv1);
            xwt(
                &mut ws.pk,
                &a.h1,
                n,
                w(lo.qkv, qkvd * d),
                qkvd,
                d,
                &mut a.qkv,
                false,
            );
            ops::rope(&mut a.qkv, qkvd, 0, heads, hd, &p.pos, cos, sin, false);
            ops::rope(&mut a.qkv, qkvd, qd, kv, hd, &p.pos, cos, sin, false);
            attention::forward(
                &a.qkv,
                &p.segs,
                dims,
                &mut a.probs,
                &mut a.att,
                &mut ws.scratch,
            );
            a.x2.copy_from_slice(&a.x);
            xwt(
                &mut ws.pk,
                &a.att,
                n,
                w(lo.o, d * qd),
                d,
                qd,
                &mut a.x2,
                true,
            );
            rms_forward(&a.x2, w(lo.ffn_norm, d), eps, d, &mut a.h2, &mut a.inv2);
            xwt(
                &mut ws.pk,
                &a.h2,
                n,
                w(lo.gu, 2 * f * d),
                2 * f,
                d,
                &mut a.gu,
                false,
            );
            ops::swiglu_forward(&a.gu, f, &mut a.m);
            let out = if li + 1 < nl {
                &mut rest[0].x
            } else {
                &mut ws.xf
            };
            out.copy_from_slice(&a.x2);
            xwt(&mut ws.pk, &a.m, n, w(lo.down, d * f), d, f, out, true);
        }
        rms_forward(
            &ws.xf,
            &params[*norm..*norm + d],
            eps,
            d,
            &mut ws.hf,
            &mut ws.invf,
        );
    }

    /// Backward pass from `ws.dhf` (`∂L/∂` final hidden states), adding into `grads`.
    fn backward(&mut self, p: &Packed) {
        let (d, qd, _, qkvd, f, _) = self.dims();
        let n = p.ids.len();
        let dims = self.attn_dims();
        let (heads, kv, hd) = (dims.heads, dims.kv_heads, dims.hd);
        let KernelStudent {
            params,
            grads,
            ws,
            layers,
            cos,
            sin,
            embed,
            norm,
            ..
        } = self;
        let sizes = backward_sizes((d, qd, qkvd, f), n);
        for (b, s) in ws.backward_bufs().into_iter().zip(sizes) {
            fit(b, s);
        }
        ws.g.fill(0.0);
        {
            let (gn, _) = grads[*norm..].split_at_mut(d);
            rms_backward(
                &ws.xf,
                &ws.invf,
                &params[*norm..*norm + d],
                &ws.dhf,
                d,
                &mut ws.g,
                gn,
                &mut ws.partial,
            );
        }
        for li in (0..layers.len()).rev() {
            let lo = layers[li];
            let a = &ws.acts[li];
            let w = |off: usize, len: usize| &params[off..off + len];
            // x3 = x2 + m·Wdᵀ
            linear_backward(
                &mut ws.pk,
                &mut ws.t,
                &ws.g,
                &a.m,
                n,
                (d, f),
                w(lo.down, d * f),
                &mut grads[lo.down..lo.down + d * f],
                &mut ws.dm,
            );
            ops::swiglu_backward(&a.gu, &ws.dm, f, &mut ws.dgu);
            linear_backward(
                &mut ws.pk,
                &mut ws.t,
                &ws.dgu,
                &a.h2,
                n,
                (2 * f, d),
                w(lo.gu, 2 * f * d),
                &mut grads[lo.gu..lo.gu + 2 * f * d],
                &mut ws.dh,
            );
            rms_backward(
                &a.x2,
                &a.inv2,
                w(lo.ffn_norm, d),
                &ws.dh,
                d,
                &mut ws.g,
                &mut grads[lo.ffn_norm..lo.ffn_norm + d],
                &mut ws.partial,
            );
            // x2 = x + att·Woᵀ
            linear_backward(
                &mut ws.pk,
                &mut ws.t,
                &ws.g,
                &a.att,
                n,
                (d, qd),
                w(lo.o, d * qd),
                &mut grads[lo.o..lo.o + d * qd],
                &mut ws.datt,
            );
            attention::backward(
                &a.qkv,
                &a.probs,
                &ws.datt,
                &p.segs,
                dims,
                &mut ws.dqkv,
                &mut ws.scratch,
            );
            ops::rope(&mut ws.dqkv, qkvd, 0, heads, hd, &p.pos, cos, sin, true);
            ops::rope(&mut ws.dqkv, qkvd, qd, kv, hd, &p.pos, cos, sin, true);
            linear_backward(
                &mut ws.pk,
                &mut ws.t,
                &ws.dqkv,
                &a.h1,
                n,
                (qkvd, d),
                w(lo.qkv, qkvd * d),
                &mut grads[lo.qkv..lo.qkv + qkvd * d],
                &mut ws.dh,
            );
            rms_backward(
                &a.x,
                &a.inv1,
                w(lo.attn_norm, d),
                &ws.dh,
                d,
                &mut ws.g,
                &mut grads[lo.attn_norm..lo.attn_norm + d],
                &mut ws.partial,
            );
        }
        // Embedding scatter-add, in token order.
        for (i, &id) in p.ids.iter().enumerate() {
            let row = &mut grads[*embed + id as usize * d..][..d];
            for (a, b) in row.iter_mut().zip(&ws.g[i * d..(i + 1) * d]) {
                *a += b;
            }
        }
    }

    fn pack_head(&mut self, transposed_too: bool) {
        let (d, .., v) = self.dims();
        let w = &self.params[self.head..self.head + v * d];
        if !self.ws.head_w_fresh {
            self.ws.head_w.pack(w, v, d, false);
            self.ws.head_w_fresh = true;
        }
        if transposed_too {
            let slabs = v.div_ceil(SLAB);
            self.ws.head_wt.resize_with(slabs, PackedF32::new);
            for (i, pk) in self.ws.head_wt.iter_mut().enumerate() {
                let (a, b) = (i * SLAB, ((i + 1) * SLAB).min(v));
                pk.pack(&w[a * d..b * d], d, b - a, true);
            }
        }
    }

    /// The head and the loss over `p`'s distilled positions, chunk by chunk, after
    /// [`KernelStudent::forward`]. With `grads`, `∂L/∂h` goes to `ws.dhf` and the head's
    /// gradient into `grads`, both for the sum (not the mean) over positions.
    fn head_loss(
        &mut self,
        batch: &Batch,
        p: &Packed,
        cfg: &LossConfig,
        chunk: usize,
        grads: bool,
    ) -> Result<LossParts> {
        let (d, .., v) = self.dims();
        let n = p.ids.len();
        let npos = p.rows.len();
        let targets = PositionTargets::of(batch, v)?;
        let t0 = Instant::now();
        self.pack_head(grads);
        self.timings.head_forward += t0.elapsed();
        let KernelStudent {
            ws,
            grads: gbuf,
            head,
            timings,
            ..
        } = self;
        let chunk = chunk.max(1);
        if grads {
            fit(&mut ws.dhf, n * d);
            ws.dhf.fill(0.0);
        }
        let mut sums = LossParts {
            divergence: 0.0,
            hard_ce: 0.0,
            total: 0.0,
        };
        for s in (0..npos).step_by(chunk) {
            let len = chunk.min(npos - s);
            fit(&mut ws.hc, len * d);
            fit(&mut ws.z, len * v);
            for (i, &r) in p.rows[s..s + len].iter().enumerate() {
                ws.hc[i * d..(i + 1) * d].copy_from_slice(&ws.hf[r * d..(r + 1) * d]);
            }
            let t0 = Instant::now();
            ws.head_w.matmul_into(&ws.hc, len, &mut ws.z, false);
            let t1 = Instant::now();
            timings.head_forward += t1 - t0;
            let positions: Vec<Position<'_, f64, f32>> = (0..len)
                .map(|i| {
                    let (topk_ids, topk_logprobs) = targets.get(s + i);
                    Position {
                        topk_ids,
                        topk_logprobs,
                        student_logits: &ws.z[i * v..(i + 1) * v],
                        next_token: batch.next_token[s + i],
                    }
                })
                .collect();
            if grads {
                fit(&mut ws.gz, len * v);
            }
            let (means, _) =
                kd_loss::batch_loss(cfg, &positions, grads.then_some(ws.gz.as_mut_slice()));
            sums.divergence += means.divergence * len as f64;
            sums.hard_ce += means.hard_ce * len as f64;
            sums.total += means.total * len as f64;
            if !grads {
                timings.loss += t1.elapsed();
                continue;
            }
            let t2 = Instant::now();
            timings.loss += t2 - t1;
            fit(&mut ws.dhc, len * d);
            ws.dhc.fill(0.0);
            for (i, pk) in ws.head_wt.iter().enumerate() {
                let (a, b) = (i * SLAB, ((i + 1) * SLAB).min(v));
                fit(&mut ws.gs, len * (b - a));
                for (r, row) in ws.gs.chunks_exact_mut(b - a).enumerate() {
                    row.copy_from_slice(&ws.gz[r * v + a..r * v + b]);
                }
                pk.matmul_into(&ws.gs, len, &mut ws.dhc, true);
            }
            // kd_loss gives the chunk mean's gradient and the engine accumulates sums: the
            // factor `len` goes on the two small operands (`∂L/∂h` and `h`), not on `∂L/∂z`.
            let k = len as f32;
            for (i, &r) in p.rows[s..s + len].iter().enumerate() {
                for (a, &b) in ws.dhf[r * d..(r + 1) * d]
                    .iter_mut()
                    .zip(&ws.dhc[i * d..(i + 1) * d])
                {
                    *a = b * k;
                }
            }
            ws.hc.iter_mut().for_each(|x| *x *= k);
            fit(&mut ws.gt, len * v);
            dw_acc(
                &mut ws.pk,
                &mut ws.gt,
                &ws.gz,
                &ws.hc,
                len,
                v,
                d,
                &mut gbuf[*head..*head + v * d],
            );
            timings.head_backward += t2.elapsed();
        }
        Ok(sums)
    }

    /// Loss of `batch` and, added to the gradient buffers, its gradients (for the sum over
    /// its distilled positions; [`KernelStudent::step`] divides by all positions since the
    /// last step, so micro-batches average by positions).
    pub fn accumulate(
        &mut self,
        batch: &Batch,
        cfg: &LossConfig,
        chunk: usize,
    ) -> Result<BatchLoss> {
        self.run(batch, cfg, chunk, true)
    }

    fn run(
        &mut self,
        batch: &Batch,
        cfg: &LossConfig,
        chunk: usize,
        grads: bool,
    ) -> Result<BatchLoss> {
        if grads && self.grads.is_empty() {
            refuse!(Setting, "this kernel student was built for inference only");
        }
        let n = batch.n_pos();
        if n == 0 {
            return Ok(BatchLoss::default());
        }
        let p = Packed::of(batch);
        self.check_ids(&p)?;
        let t0 = Instant::now();
        self.forward(&p);
        self.timings.forward += t0.elapsed();
        let sums = self.head_loss(batch, &p, cfg, chunk, grads)?;
        if grads {
            let t0 = Instant::now();
            self.backward(&p);
            self.timings.backward += t0.elapsed();
            self.pending += n;
        }
        Ok(BatchLoss {
            divergence: sums.divergence / n as f64,
            hard_ce: sums.hard_ce / n as f64,
            total: sums.total / n as f64,
            positions: n,
        })
    }

    fn check_ids(&self, p: &Packed) -> Result<()> {
        let v = self.cfg.vocab_size;
        if let Some(&id) = p.ids.iter().find(|&&id| id as usize >= v) {
            refuse!(
                Input,
                "token id {id} is outside the student's vocabulary of {v}"
            );
        }
        if let Some(&(_, len)) = p
            .segs
            .iter()
            .find(|s| s.1 > self.cos.len() / (self.cfg.head_dim() / 2))
        {
            refuse!(
                Input,
                "a row of {len} tokens is longer than the student's context"
            );
        }
        Ok(())
    }

    /// Final hidden states of `batch`'s distilled positions, `[n_pos, hidden]` (evaluation).
    pub fn position_hidden(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        let p = Packed::of(batch);
        self.check_ids(&p)?;
        self.forward(&p);
        let d = self.cfg.hidden_size;
        let mut out = Vec::with_capacity(p.rows.len() * d);
        for &r in &p.rows {
            out.extend_from_slice(&self.ws.hf[r * d..(r + 1) * d]);
        }
        Ok(out)
    }

    /// Final hidden states `[len, hidden]` of every position of one token sequence.
    pub fn sequence_hidden(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let n = ids.len();
        let p = Packed {
            ids: ids.to_vec(),
            pos: (0..n as u32).collect(),
            segs: vec![(0, n)],
            rows: (0..n).collect(),
        };
        self.check_ids(&p)?;
        self.forward(&p);
        Ok(self.ws.hf[..n * self.cfg.hidden_size].to_vec())
    }

    /// Logits `[n, vocab]` of hidden rows `h` `[n, hidden]`.
    pub fn logits_into(&mut self, h: &[f32], n: usize, out: &mut Vec<f32>) {
        self.pack_head(false);
        fit(out, n * self.cfg.vocab_size);
        self.ws.head_w.matmul_into(h, n, out, false);
    }

    /// One AdamW update from the accumulated gradients (their mean over the positions since
    /// the last step), after clipping their global L2 norm to `max_grad_norm` (if positive);
    /// clears the gradients.
    pub fn step(&mut self, lr: f64, max_grad_norm: f64) -> StepInfo {
        const BLOCK: usize = 1 << 16;
        let t0 = Instant::now();
        // One pass for the norm and one for the update (which also clears the gradients):
        // the mean over positions and the clipping factor fold into one scale.
        let mean = 1.0 / self.pending.max(1) as f64;
        let sq: Vec<f64> = self
            .grads
            .par_chunks(BLOCK)
            .map(|c| c.iter().map(|&g| f64::from(g) * f64::from(g)).sum())
            .collect();
        let grad_norm = mean * sq.iter().sum::<f64>().sqrt();
        let clip = max_grad_norm > 0.0 && grad_norm > max_grad_norm;
        let scale = if clip {
            (mean * max_grad_norm / (grad_norm + 1e-6)) as f32
        } else {
            mean as f32
        };
        self.step += 1;
        let t = self.step as i32;
        let cfg = &self.adam;
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let bc1 = (1.0 - cfg.beta1.powi(t)) as f32;
        let bc2 = (1.0 - cfg.beta2.powi(t)) as f32;
        let eps = cfg.eps as f32;
        let lr32 = lr as f32;
        for s in &self.slots {
            let wd = if s.decays {
                cfg.weight_decay as f32
            } else {
                0.0
            };
            let keep = 1.0 - lr32 * wd;
            let r = s.off..s.off + s.len;
            self.params[r.clone()]
                .par_chunks_mut(BLOCK)
                .zip(self.grads[r.clone()].par_chunks_mut(BLOCK))
                .zip(self.m[r.clone()].par_chunks_mut(BLOCK))
                .zip(self.v[r].par_chunks_mut(BLOCK))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        let gi = g[i] * scale;
                        g[i] = 0.0;
                        m[i] = m[i] * b1 + gi * (1.0 - b1);
                        v[i] = v[i] * b2 + gi * gi * (1.0 - b2);
                        let u = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
                        p[i] = p[i] * keep - u * lr32;
                    }
                });
        }
        self.pending = 0;
        self.ws.head_w_fresh = false;
        self.timings.step += t0.elapsed();
        StepInfo {
            grad_norm,
            lr,
            clipped: clip,
        }
    }

    /// Writes the AdamW moments as [`crate::optim::AdamW::save_state`] does (`m.NAME`,
    /// `v.NAME`), so either engine resumes the other's checkpoints.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut map = std::collections::HashMap::new();
        for s in &self.slots {
            for (prefix, buf) in [("m", &self.m), ("v", &self.v)] {
                let t = Tensor::from_slice(
                    &buf[s.off..s.off + s.len],
                    s.shape.as_slice(),
                    &Device::Cpu,
                )?;
                map.insert(format!("{prefix}.{}", s.name), t);
            }
        }
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::from(e).context(format!("writing {}", path.display())))
    }

    /// Restores moments saved by either engine and the step count.
    pub fn load_state(&mut self, path: &Path, step: u64) -> Result<()> {
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::from(e).context(format!("reading {}", path.display())))?;
        for s in &self.slots {
            for (prefix, buf) in [("m", &mut self.m), ("v", &mut self.v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = map
                    .get(&key)
                    .ok_or_else(|| error!(Resume, "{}: missing `{key}`", path.display()))?;
                if t.dims() != s.shape.as_slice() {
                    refuse!(
                        Resume,
                        "{}: `{key}` has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        s.shape
                    );
                }
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                buf[s.off..s.off + s.len].copy_from_slice(&v);
            }
        }
        self.step = step;
        Ok(())
    }
}
