//! Row-wise pieces of the kernel engine's forward and backward passes on plain `f32` buffers:
//! RMSNorm, half-split RoPE, SwiGLU, transposes, and the three shapes of a training step's
//! matrix products on [`PackedF32`] panels.
//!
//! Every reduction runs in an order fixed by the shapes alone (never by the thread count), so
//! a step gives the same bits on 2 threads and on 16.

use kd_model::kernels::PackedF32;
use rayon::prelude::*;

/// Rows per parallel task in row-wise operations (and per partial sum of a norm weight's
/// gradient: fixed, so the sums do not depend on the thread count).
pub const ROWS: usize = 32;

/// `y = x · Wᵀ` (or `y += …` with `acc`) for `W [out, inn]` row-major: a layer's forward
/// product.
#[allow(clippy::too_many_arguments)]
pub fn xwt(
    pk: &mut PackedF32,
    x: &[f32],
    n: usize,
    w: &[f32],
    out: usize,
    inn: usize,
    y: &mut [f32],
    acc: bool,
) {
    pk.pack(w, out, inn, false);
    pk.matmul_into(&x[..n * inn], n, &mut y[..n * out], acc);
}

/// `dx = dy · W` (or `dx += …`) for `W [out, inn]`: the gradient of a product's input.
#[allow(clippy::too_many_arguments)]
pub fn dyw(
    pk: &mut PackedF32,
    dy: &[f32],
    n: usize,
    w: &[f32],
    out: usize,
    inn: usize,
    dx: &mut [f32],
    acc: bool,
) {
    pk.pack(w, inn, out, true);
    pk.matmul_into(&dy[..n * out], n, &mut dx[..n * inn], acc);
}

/// `dw += dyᵀ · x` for `dy [n, out]`, `x [n, inn]`: the gradient of a product's weight.
/// `t` is scratch for `dyᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn dw_acc(
    pk: &mut PackedF32,
    t: &mut [f32],
    dy: &[f32],
    x: &[f32],
    n: usize,
    out: usize,
    inn: usize,
    dw: &mut [f32],
) {
    pk.pack(&x[..n * inn], inn, n, true);
    transpose(&dy[..n * out], n, out, &mut t[..n * out]);
    pk.matmul_into(&t[..n * out], out, &mut dw[..out * inn], true);
}

/// Backward of `y = x · Wᵀ` for `W [out, inn]`: `dw += dyᵀ · x` and `dx = dy · W`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    pk: &mut PackedF32,
    t: &mut [f32],
    dy: &[f32],
    x: &[f32],
    n: usize,
    (out, inn): (usize, usize),
    w: &[f32],
    dw: &mut [f32],
    dx: &mut [f32],
) {
    dw_acc(pk, t, dy, x, n, out, inn, dw);
    dyw(pk, dy, n, w, out, inn, dx, false);
}

/// `dst [cols, rows] = srcᵀ` for row-major `src [rows, cols]`.
///
/// Tile by tile: 64 source rows × 16 columns are read as runs of the source rows into a local
/// tile, then written as 16 runs of 64 destination values, instead of one value per
/// destination row at a time (rows 4 KB apart fall in one cache set, and such stores thrash
/// it: 3–4× slower on a training step's `[1024, 576…3072]` gradients).
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 16;
    const R: usize = 64;
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    dst[..rows * cols]
        .par_chunks_mut(B * rows.max(1))
        .enumerate()
        .for_each(|(cb, out)| {
            let c0 = cb * B;
            let nc = out.len() / rows.max(1);
            let mut tile = [[0f32; B]; R];
            for r0 in (0..rows).step_by(R) {
                let nr = R.min(rows - r0);
                for (r, t) in tile.iter_mut().enumerate().take(nr) {
                    t[..nc].copy_from_slice(&src[(r0 + r) * cols + c0..][..nc]);
                }
                for c in 0..nc {
                    for (r, o) in out[c * rows + r0..][..nr].iter_mut().enumerate() {
                        *o = tile[r][c];
                    }
                }
            }
        });
}

/// [`transpose`] on the calling thread.
pub fn transpose_serial(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    for r in 0..rows {
        for (c, &x) in src[r * cols..(r + 1) * cols].iter().enumerate() {
            dst[c * rows + r] = x;
        }
    }
}

/// Sum of squares in eight lanes (vectorisable; the order depends on the length only).
#[inline]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s = 0f32;
    for x in it.remainder() {
        s += x * x;
    }
    acc.iter().sum::<f32>() + s
}

/// `y = x / sqrt(mean(x²) + eps) ⊙ w` per row of width `d`; `inv` gets each row's
/// `1 / sqrt(mean(x²) + eps)`.
pub fn rms_forward(x: &[f32], w: &[f32], eps: f64, d: usize, y: &mut [f32], inv: &mut [f32]) {
    let n = inv.len();
    y[..n * d]
        .par_chunks_mut(ROWS * d)
        .zip(inv.par_chunks_mut(ROWS))
        .enumerate()
        .for_each(|(c, (yc, ic))| {
            for (r, (yr, iv)) in yc.chunks_exact_mut(d).zip(ic.iter_mut()).enumerate() {
                let xr = &x[(c * ROWS + r) * d..][..d];
                let s = 1.0 / ((sum_sq(xr) / d as f32) as f64 + eps).sqrt() as f32;
                *iv = s;
                for ((o, &a), &b) in yr.iter_mut().zip(xr).zip(w) {
                    *o = a * s * b;
                }
            }
        });
}

/// Backward of [`rms_forward`]: `dx += ∂L/∂x` and `dw += ∂L/∂w` for `dy = ∂L/∂y`.
///
/// With `s = inv`, `y_j = x_j s w_j` and `∂s/∂x_j = −s³ x_j / d`, so
/// `∂L/∂x_j = s w_j dy_j − x_j s³/d · Σ_k dy_k w_k x_k` and `∂L/∂w_j = Σ_rows dy_j x_j s`.
#[allow(clippy::too_many_arguments)]
pub fn rms_backward(
    x: &[f32],
    inv: &[f32],
    w: &[f32],
    dy: &[f32],
    d: usize,
    dx: &mut [f32],
    dw: &mut [f32],
    partial: &mut [f32],
) {
    let n = inv.len();
    let chunks = n.div_ceil(ROWS);
    let partial = &mut partial[..chunks * d];
    dx[..n * d]
        .par_chunks_mut(ROWS * d)
        .zip(partial.par_chunks_mut(d))
        .enumerate()
        .for_each(|(c, (dxc, pw))| {
            pw.fill(0.0);
            for (r, dxr) in dxc.chunks_exact_mut(d).enumerate() {
                let row = c * ROWS + r;
                let (xr, dyr, s) = (&x[row * d..][..d], &dy[row * d..][..d], inv[row]);
                let mut dot = 0f32;
                for j in 0..d {
                    dot += dyr[j] * w[j] * xr[j];
                }
                let k = if sabotaged(Sabotage::RmsNormScale) {
                    0.0
                } else {
                    s * s * s * dot / d as f32
                };
                for j in 0..d {
                    dxr[j] += s * w[j] * dyr[j] - xr[j] * k;
                    pw[j] += dyr[j] * xr[j] * s;
                }
            }
        });
    for pw in partial.chunks_exact(d) {
        for (a, b) in dw.iter_mut().zip(pw) {
            *a += b;
        }
    }
}

/// Scratch floats [`rms_backward`] needs for `n` rows of width `d`.
pub fn rms_partial_len(n: usize, d: usize) -> usize {
    n.div_ceil(ROWS) * d
}

/// Half-split RoPE in place on `heads` heads of width `hd` starting at column `col0` of rows
/// of width `stride`; row `i` is at position `pos[i]`. `cos`/`sin` are `[positions, hd/2]`
/// (the attention factor included). With `inverse`, applies the transpose (the backward).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    stride: usize,
    col0: usize,
    heads: usize,
    hd: usize,
    pos: &[u32],
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let h2 = hd / 2;
    x[..pos.len() * stride]
        .par_chunks_mut(ROWS * stride)
        .enumerate()
        .for_each(|(c, xc)| {
            for (r, row) in xc.chunks_exact_mut(stride).enumerate() {
                let p = pos[c * ROWS + r] as usize;
                let (cs, sn) = (&cos[p * h2..][..h2], &sin[p * h2..][..h2]);
                for h in 0..heads {
                    let v = &mut row[col0 + h * hd..col0 + (h + 1) * hd];
                    let (a, b) = v.split_at_mut(h2);
                    for i in 0..h2 {
                        let (x1, x2) = (a[i], b[i]);
                        if inverse {
                            a[i] = x1 * cs[i] + x2 * sn[i];
                            b[i] = x2 * cs[i] - x1 * sn[i];
                        } else {
                            a[i] = x1 * cs[i] - x2 * sn[i];
                            b[i] = x2 * cs[i] + x1 * sn[i];
                        }
                    }
                }
            }
        });
}

/// SwiGLU forward: rows of `gu` are `[gate (f) | up (f)]`; `m = silu(gate) ⊙ up`.
pub fn swiglu_forward(gu: &[f32], f: usize, m: &mut [f32]) {
    m.par_chunks_mut(ROWS * f).enumerate().for_each(|(c, mc)| {
        for (r, mr) in mc.chunks_exact_mut(f).enumerate() {
            let row = &gu[(c * ROWS + r) * 2 * f..][..2 * f];
            kd_model::kernels::silu_mul(&row[..f], &row[f..], mr);
        }
    });
}

/// SwiGLU backward: `dgu = [dm ⊙ up ⊙ silu'(gate) | dm ⊙ silu(gate)]`, with
/// `silu'(z) = σ(z)(1 + z(1 − σ(z)))`.
pub fn swiglu_backward(gu: &[f32], dm: &[f32], f: usize, dgu: &mut [f32]) {
    dgu.par_chunks_mut(ROWS * 2 * f)
        .enumerate()
        .for_each(|(c, dc)| {
            for (r, dr) in dc.chunks_exact_mut(2 * f).enumerate() {
                let row = c * ROWS + r;
                let g = &gu[row * 2 * f..][..f];
                let u = &gu[row * 2 * f + f..][..f];
                let dmr = &dm[row * f..][..f];
                let (dg, du) = dr.split_at_mut(f);
                for i in 0..f {
                    let s = 1.0 / (1.0 + (-g[i]).exp());
                    du[i] = dmr[i] * g[i] * s;
                    let ds = if sabotaged(Sabotage::SiluDerivative) {
                        s
                    } else {
                        s * (1.0 + g[i] * (1.0 - s))
                    };
                    dg[i] = dmr[i] * u[i] * ds;
                }
            }
        });
}

/// Backward terms a test can switch off, to show that the gradient checks catch a wrong
/// backward pass.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Sabotage {
    None = 0,
    /// Drop the RMSNorm gradient's term through the normalising scale.
    RmsNormScale = 1,
    /// Use `σ(z)` for SiLU's derivative.
    SiluDerivative = 2,
    /// Drop the softmax backward's row-sum term.
    SoftmaxRowSum = 3,
}

static SABOTAGE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Switches one backward term off for the whole process (tests only).
#[doc(hidden)]
pub fn sabotage(s: Sabotage) {
    SABOTAGE.store(s as u8, std::sync::atomic::Ordering::SeqCst);
}

#[inline]
pub(crate) fn sabotaged(s: Sabotage) -> bool {
    SABOTAGE.load(std::sync::atomic::Ordering::Relaxed) == s as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiled_transpose_is_the_plain_one() {
        for (rows, cols) in [(1, 1), (3, 70), (64, 16), (65, 17), (130, 33), (17, 200)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 7.0).collect();
            let (mut a, mut b) = (vec![f32::NAN; rows * cols], vec![0f32; rows * cols]);
            transpose(&src, rows, cols, &mut a);
            transpose_serial(&src, rows, cols, &mut b);
            assert_eq!(a, b, "{rows}x{cols}");
            for (r, c) in [(0, 0), (rows - 1, cols - 1), (rows / 2, cols / 3)] {
                assert_eq!(a[c * rows + r], src[r * cols + c]);
            }
        }
    }
}
