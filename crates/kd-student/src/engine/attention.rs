//! Grouped-query causal attention over packed sequences, forward and backward, on
//! [`PackedF32`] panels.
//!
//! The forward pass keeps the attention probabilities `P` of every (sequence, head): at most
//! `token_budget × max_len × heads` floats per layer (19 MB for a 1024-token batch of 512-token
//! rows with 9 heads), which costs less than recomputing `softmax(Q·Kᵀ)` in the backward pass
//! would in time. The products run by blocks of 64 query rows (or key rows), each against
//! only the keys (or queries) the causal mask lets it see.
//!
//! Work is split into one task per (sequence, key/value head): a task owns its output columns,
//! and the query heads sharing a key/value head are summed inside it, in order, so results do
//! not depend on the thread count.

use kd_model::kernels::{PackedF32, exp_in_place};
use rayon::prelude::*;

use super::ops::{Sabotage, sabotaged};

/// Shapes of one attention call.
#[derive(Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub hd: usize,
    /// Row width of the fused `[q | k | v]` buffer.
    pub qkv: usize,
    pub scale: f32,
}

impl Dims {
    /// First column of key/value head `g`'s keys in the `[q | k | v]` rows.
    fn k_col(&self, g: usize) -> usize {
        (self.heads + g) * self.hd
    }

    /// First column of key/value head `g`'s values.
    fn v_col(&self, g: usize) -> usize {
        (self.heads + self.kv_heads + g) * self.hd
    }
}

/// Per-worker scratch, sized for the longest sequence.
#[derive(Default)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    s: Vec<f32>,
    t: Vec<f32>,
    acc_k: Vec<f32>,
    acc_v: Vec<f32>,
    pk: PackedF32,
}

impl Scratch {
    /// Room for sequences of up to `len` tokens with heads of width `hd`.
    pub fn reserve(&mut self, len: usize, hd: usize) {
        for v in [
            &mut self.a,
            &mut self.b,
            &mut self.c,
            &mut self.acc_k,
            &mut self.acc_v,
        ] {
            v.resize(len * hd, 0.0);
        }
        self.s.resize(len * len, 0.0);
        self.t.resize(len * len, 0.0);
        self.pk.reserve(len.max(hd), len.max(hd));
    }

    pub fn bytes(&self) -> usize {
        4 * (self.a.capacity()
            + self.b.capacity()
            + self.c.capacity()
            + self.s.capacity()
            + self.t.capacity()
            + self.acc_k.capacity()
            + self.acc_v.capacity())
            + self.pk.capacity_bytes()
    }
}

#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: tasks write disjoint regions of the buffers these point to.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// Offsets of each sequence's probabilities: `Σ_{s' < s} len_{s'}² · heads`.
pub fn prob_offsets(segs: &[(usize, usize)], heads: usize) -> (Vec<usize>, usize) {
    let mut off = Vec::with_capacity(segs.len());
    let mut at = 0;
    for &(_, len) in segs {
        off.push(at);
        at += len * len * heads;
    }
    (off, at)
}

/// Copies `width` columns from `col` of rows `start..start+len` of `src` (row width `stride`)
/// into `dst [len, width]`.
fn gather(
    src: &[f32],
    stride: usize,
    start: usize,
    len: usize,
    col: usize,
    w: usize,
    dst: &mut [f32],
) {
    for t in 0..len {
        dst[t * w..(t + 1) * w].copy_from_slice(&src[(start + t) * stride + col..][..w]);
    }
}

/// Runs `f(task, scratch)` for every task, task `i` on worker `i % workers`.
fn run_tasks(scratch: &mut [Scratch], tasks: usize, f: impl Fn(usize, &mut Scratch) + Sync) {
    let workers = scratch.len().max(1);
    scratch.par_iter_mut().enumerate().for_each(|(w, sc)| {
        for task in (w..tasks).step_by(workers) {
            f(task, sc);
        }
    });
}

/// Query rows per block of the causal products: rows `q0..q1` attend to keys `0..q1` only, so
/// each block multiplies by a prefix of the keys and about 44% of a full square's products
/// are skipped at 512 tokens. Skipped terms are exact zeros, so the values equal the full
/// products'.
const QB: usize = 64;

/// `out[t, j] = Σ_c a[t, c]·b[j, c]` for `j` below the end of `t`'s block (`a`, `b`
/// `[len, hd]`, `out` `[len, len]`); the other entries of `out` are left as they were.
fn causal_abt(
    pk: &mut PackedF32,
    tmp: &mut [f32],
    a: &[f32],
    b: &[f32],
    len: usize,
    hd: usize,
    out: &mut [f32],
) {
    for q0 in (0..len).step_by(QB) {
        let q1 = (q0 + QB).min(len);
        let rows = q1 - q0;
        pk.pack_serial(&b[..q1 * hd], q1, hd, false);
        pk.matmul_serial(&a[q0 * hd..q1 * hd], rows, &mut tmp[..rows * q1], false);
        for r in 0..rows {
            out[(q0 + r) * len..(q0 + r) * len + q1].copy_from_slice(&tmp[r * q1..(r + 1) * q1]);
        }
    }
}

/// `out = p · v` for `p` `[len, len]` zero above the diagonal and `v`, `out` `[len, hd]`.
fn causal_pv(
    pk: &mut PackedF32,
    tmp: &mut [f32],
    p: &[f32],
    v: &[f32],
    len: usize,
    hd: usize,
    out: &mut [f32],
) {
    for q0 in (0..len).step_by(QB) {
        let q1 = (q0 + QB).min(len);
        let rows = q1 - q0;
        for r in 0..rows {
            tmp[r * q1..(r + 1) * q1].copy_from_slice(&p[(q0 + r) * len..(q0 + r) * len + q1]);
        }
        pk.pack_serial(&v[..q1 * hd], hd, q1, true);
        pk.matmul_serial(&tmp[..rows * q1], rows, &mut out[q0 * hd..q1 * hd], false);
    }
}

/// `out += pᵀ · d` for `p` `[len, len]` zero above the diagonal and `d`, `out` `[len, hd]`:
/// key rows `k0..k1` of `out` take query rows `k0..len`.
fn causal_ptd(
    pk: &mut PackedF32,
    tmp: &mut [f32],
    p: &[f32],
    d: &[f32],
    len: usize,
    hd: usize,
    out: &mut [f32],
) {
    for k0 in (0..len).step_by(QB) {
        let k1 = (k0 + QB).min(len);
        let (rows, w) = (k1 - k0, len - k0);
        for r in 0..rows {
            let x = &mut tmp[r * w..(r + 1) * w];
            for (c, x) in x.iter_mut().enumerate() {
                *x = p[(k0 + c) * len + k0 + r];
            }
        }
        pk.pack_serial(&d[k0 * hd..len * hd], hd, w, true);
        pk.matmul_serial(&tmp[..rows * w], rows, &mut out[k0 * hd..k1 * hd], true);
    }
}

/// Forward: `att[:, h·hd..] = softmax(q_h k_gᵀ · scale + causal mask) v_g` for every head
/// `h` of group `g`; the probabilities go to `probs` at [`prob_offsets`].
pub fn forward(
    qkv: &[f32],
    segs: &[(usize, usize)],
    dims: Dims,
    probs: &mut [f32],
    att: &mut [f32],
    scratch: &mut [Scratch],
) {
    let Dims {
        heads,
        kv_heads,
        hd,
        qkv: stride,
        scale,
    } = dims;
    let rep = heads / kv_heads;
    let qd = heads * hd;
    let (poff, total) = prob_offsets(segs, heads);
    assert!(probs.len() >= total);
    let (pp, ap) = (Ptr(probs.as_mut_ptr()), Ptr(att.as_mut_ptr()));
    run_tasks(scratch, segs.len() * kv_heads, |task, sc| {
        let (s, g) = (task / kv_heads, task % kv_heads);
        let (start, len) = segs[s];
        // The whole wrappers, not their raw-pointer fields, are what the closure may share.
        #[allow(clippy::redundant_locals)]
        let (pp, ap) = (pp, ap);
        gather(qkv, stride, start, len, dims.k_col(g), hd, &mut sc.b); // k
        gather(qkv, stride, start, len, dims.v_col(g), hd, &mut sc.c); // v
        for h in g * rep..(g + 1) * rep {
            gather(qkv, stride, start, len, h * hd, hd, &mut sc.a); // q
            // SAFETY: (s, h) owns probs[poff[s] + h·len² ..][..len²]: heads of one sequence
            // and sequences do not overlap (`prob_offsets`), and only this task writes it.
            let p = unsafe {
                std::slice::from_raw_parts_mut(pp.0.add(poff[s] + h * len * len), len * len)
            };
            causal_abt(&mut sc.pk, &mut sc.t, &sc.a, &sc.b, len, hd, p);
            for t in 0..len {
                let row = &mut p[t * len..(t + 1) * len];
                let (live, masked) = row.split_at_mut(t + 1);
                let mut mx = f32::NEG_INFINITY;
                for x in live.iter_mut() {
                    *x *= scale;
                    mx = mx.max(*x);
                }
                let sum = exp_in_place(live, mx);
                let r = 1.0 / sum;
                for x in live.iter_mut() {
                    *x *= r;
                }
                masked.fill(0.0);
            }
            causal_pv(&mut sc.pk, &mut sc.t, p, &sc.c, len, hd, &mut sc.a);
            for t in 0..len {
                // SAFETY: columns h·hd..(h+1)·hd of this sequence's rows belong to head h,
                // which only this task computes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sc.a.as_ptr().add(t * hd),
                        ap.0.add((start + t) * qd + h * hd),
                        hd,
                    )
                };
            }
        }
    });
}

/// Backward: from `datt` (`∂L/∂att`), writes `∂L/∂q`, `∂L/∂k`, `∂L/∂v` (after RoPE) into
/// `dqkv`, whose every column is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    qkv: &[f32],
    probs: &[f32],
    datt: &[f32],
    segs: &[(usize, usize)],
    dims: Dims,
    dqkv: &mut [f32],
    scratch: &mut [Scratch],
) {
    let Dims {
        heads,
        kv_heads,
        hd,
        qkv: stride,
        scale,
    } = dims;
    let rep = heads / kv_heads;
    let qd = heads * hd;
    let (poff, _) = prob_offsets(segs, heads);
    let dp = Ptr(dqkv.as_mut_ptr());
    run_tasks(scratch, segs.len() * kv_heads, |task, sc| {
        let (s, g) = (task / kv_heads, task % kv_heads);
        let (start, len) = segs[s];
        // The whole wrapper, not its raw-pointer field, is what the closure may share.
        #[allow(clippy::redundant_locals)]
        let dp = dp;
        let n = len * hd;
        sc.acc_k[..n].fill(0.0);
        sc.acc_v[..n].fill(0.0);
        for h in g * rep..(g + 1) * rep {
            let p = &probs[poff[s] + h * len * len..][..len * len];
            gather(datt, qd, start, len, h * hd, hd, &mut sc.a); // dO
            // dV += Pᵀ dO
            causal_ptd(&mut sc.pk, &mut sc.t, p, &sc.a, len, hd, &mut sc.acc_v);
            // dP = dO Vᵀ (where P is not masked)
            gather(qkv, stride, start, len, dims.v_col(g), hd, &mut sc.b); // v
            causal_abt(&mut sc.pk, &mut sc.t, &sc.a, &sc.b, len, hd, &mut sc.s);
            // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale (zero where masked)
            for t in 0..len {
                let pr = &p[t * len..(t + 1) * len];
                let dr = &mut sc.s[t * len..(t + 1) * len];
                let mut dot = 0f32;
                for j in 0..=t {
                    dot += pr[j] * dr[j];
                }
                if sabotaged(Sabotage::SoftmaxRowSum) {
                    dot = 0.0;
                }
                for j in 0..=t {
                    dr[j] = pr[j] * (dr[j] - dot) * scale;
                }
                dr[t + 1..].fill(0.0);
            }
            // dQ = dS K
            gather(qkv, stride, start, len, dims.k_col(g), hd, &mut sc.b); // k
            causal_pv(&mut sc.pk, &mut sc.t, &sc.s, &sc.b, len, hd, &mut sc.c);
            for t in 0..len {
                // SAFETY: the q columns of head h in this sequence's rows belong to this task.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sc.c.as_ptr().add(t * hd),
                        dp.0.add((start + t) * stride + h * hd),
                        hd,
                    )
                };
            }
            // dK += dSᵀ Q
            gather(qkv, stride, start, len, h * hd, hd, &mut sc.b); // q
            causal_ptd(&mut sc.pk, &mut sc.t, &sc.s, &sc.b, len, hd, &mut sc.acc_k);
        }
        for t in 0..len {
            // SAFETY: the k and v columns of group g in this sequence's rows belong to this
            // task.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sc.acc_k.as_ptr().add(t * hd),
                    dp.0.add((start + t) * stride + dims.k_col(g)),
                    hd,
                );
                std::ptr::copy_nonoverlapping(
                    sc.acc_v.as_ptr().add(t * hd),
                    dp.0.add((start + t) * stride + dims.v_col(g)),
                    hd,
                );
            }
        }
    });
}
