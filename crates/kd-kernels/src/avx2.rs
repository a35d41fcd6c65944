//! The kernels of [`super`] for CPUs with AVX2 and FMA but no AVX-512: a panel of 16 rows is
//! two 8-lane vectors, and a call covers at most 4 input rows and one panel (16 registers).
//! Each output element goes through the same sequence of multiply-adds on the same expanded
//! values as the AVX-512 kernel, so weight products are bit-identical to it; the exponential
//! runs the same operations lane by lane, and only the order of the final horizontal sums
//! differs.

use super::{Call, K_SUBS, PANEL, PanelFormat, QK, k_header, k_sub};
use std::arch::x86_64::*;

const MAX_B: usize = 4;

/// # Safety
/// As `simd::dispatch`, with AVX2, FMA and F16C present instead of AVX-512F.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dispatch(
    format: PanelFormat,
    blocks: usize,
    cols: usize,
    rows: usize,
    nb: usize,
    two: bool,
    c: &Call,
) {
    macro_rules! go {
        ($f:expr, $n:expr, $call:expr) => {
            unsafe {
                match $n {
                    4 => kernel::<4, { $f }>(blocks, cols, rows, $call),
                    3 => kernel::<3, { $f }>(blocks, cols, rows, $call),
                    2 => kernel::<2, { $f }>(blocks, cols, rows, $call),
                    _ => kernel::<1, { $f }>(blocks, cols, rows, $call),
                }
            }
        };
    }
    for g in 0..1 + usize::from(two) {
        let mut b = 0;
        while b < nb {
            let n = (nb - b).min(MAX_B);
            let sub = Call {
                w: c.w.wrapping_add(g * c.group_bytes),
                group_bytes: c.group_bytes,
                x: c.x.wrapping_add(b * cols),
                y: c.y.wrapping_add(b * rows + g * PANEL),
                rows_valid: [c.rows_valid[g], 0],
                acc: c.acc,
            };
            match format {
                PanelFormat::Q40 => go!(0, n, &sub),
                PanelFormat::Q41 => go!(1, n, &sub),
                PanelFormat::Q80 => go!(2, n, &sub),
                PanelFormat::F32 => go!(3, n, &sub),
                PanelFormat::F16 => go!(4, n, &sub),
                PanelFormat::BF16 => go!(5, n, &sub),
                PanelFormat::Q4K => go!(6, n, &sub),
                PanelFormat::Q5K => go!(7, n, &sub),
                PanelFormat::Q6K => go!(8, n, &sub),
            }
            b += n;
        }
    }
}

const fn format_of(f: u8) -> PanelFormat {
    PanelFormat::of_code(f)
}

type Col = [__m256; 2];

#[inline(always)]
unsafe fn bytes8(p: *const u8) -> __m128i {
    unsafe { _mm_loadl_epi64(p as *const __m128i) }
}

/// Eight bytes widened to eight u32 lanes.
#[inline(always)]
unsafe fn u8x8(p: *const u8) -> __m256i {
    unsafe { _mm256_cvtepu8_epi32(bytes8(p)) }
}

/// Columns `i` and `i + 16` of block `j` of the panel at `panel` (rows 0–7 and 8–15 of
/// each), with the AVX-512 kernel's operations lane by lane.
#[inline(always)]
unsafe fn expand<const F: u8>(panel: *const u8, j: usize, i: usize) -> (Col, Col) {
    unsafe {
        let blk = panel.add(j * format_of(F).block_bytes());
        let f = blk as *const f32;
        match format_of(F) {
            PanelFormat::F16 => {
                let half = |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let (p, q) = (blk.add(2 * i * PANEL), blk.add(2 * (i + QK / 2) * PANEL));
                ([half(p), half(p.add(16))], [half(q), half(q.add(16))])
            }
            // Column c is the even or odd half of rows' pairs (c & !1, c | 1); see the
            // AVX-512 kernel.
            PanelFormat::BF16 => {
                let col = |c: usize, h: usize| {
                    let v = _mm256_loadu_si256(blk.add(4 * (c / 2) * PANEL + 32 * h) as *const _);
                    _mm256_castsi256_ps(if c % 2 == 0 {
                        _mm256_slli_epi32(v, 16)
                    } else {
                        _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000u32 as i32))
                    })
                };
                let (p, q) = (i, i + QK / 2);
                ([col(p, 0), col(p, 1)], [col(q, 0), col(q, 1)])
            }
            PanelFormat::Q4K | PanelFormat::Q5K => {
                let fm = format_of(F);
                let sb = panel.add((j / K_SUBS) * fm.superblock_bytes());
                let sub = sb.add(k_header(fm) + (j % K_SUBS) * k_sub(fm));
                let mut lo = [_mm256_setzero_ps(); 2];
                let mut hi = [_mm256_setzero_ps(); 2];
                for h in 0..2 {
                    let d = _mm256_loadu_ps((sb as *const f32).add(8 * h));
                    let dmin = _mm256_loadu_ps((sb as *const f32).add(PANEL + 8 * h));
                    let d1 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(u8x8(sub.add(8 * h))));
                    let m1 = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(u8x8(sub.add(PANEL + 8 * h))));
                    let q = u8x8(sub.add(2 * PANEL + i * PANEL + 8 * h));
                    let mut l = _mm256_and_si256(q, _mm256_set1_epi32(0x0F));
                    let mut u = _mm256_srli_epi32(q, 4);
                    if fm == PanelFormat::Q5K {
                        let hb =
                            u8x8(sub.add(2 * PANEL + PANEL * QK / 2 + (i % 4) * PANEL + 8 * h));
                        let hb = _mm256_srlv_epi32(hb, _mm256_set1_epi32(2 * (i / 4) as i32));
                        let one = _mm256_set1_epi32(1);
                        l = _mm256_or_si256(l, _mm256_slli_epi32(_mm256_and_si256(hb, one), 4));
                        u = _mm256_or_si256(
                            u,
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 1), one), 4),
                        );
                    }
                    lo[h] = _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(l)), m1);
                    hi[h] = _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(u)), m1);
                }
                (lo, hi)
            }
            PanelFormat::Q6K => {
                let fm = PanelFormat::Q6K;
                let sb = panel.add((j / K_SUBS) * fm.superblock_bytes());
                let sub = sb.add(k_header(fm) + (j % K_SUBS) * k_sub(fm));
                let mut lo = [_mm256_setzero_ps(); 2];
                let mut hi = [_mm256_setzero_ps(); 2];
                let sc = |p: *const u8| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8(p)));
                let three = _mm256_set1_epi32(3);
                let m32 = _mm256_set1_epi32(32);
                for h in 0..2 {
                    let d = _mm256_loadu_ps((sb as *const f32).add(8 * h));
                    let dl = _mm256_mul_ps(d, sc(sub.add(8 * h)));
                    let dh = _mm256_mul_ps(d, sc(sub.add(PANEL + 8 * h)));
                    let q = u8x8(sub.add(2 * PANEL + i * PANEL + 8 * h));
                    let hb = u8x8(sub.add(2 * PANEL + PANEL * QK / 2 + (i % 8) * PANEL + 8 * h));
                    let hb = _mm256_srlv_epi32(hb, _mm256_set1_epi32(4 * (i / 8) as i32));
                    let l = _mm256_or_si256(
                        _mm256_and_si256(q, _mm256_set1_epi32(0x0F)),
                        _mm256_slli_epi32(_mm256_and_si256(hb, three), 4),
                    );
                    let u = _mm256_or_si256(
                        _mm256_srli_epi32(q, 4),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2), three), 4),
                    );
                    lo[h] = _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_sub_epi32(l, m32)));
                    hi[h] = _mm256_mul_ps(dh, _mm256_cvtepi32_ps(_mm256_sub_epi32(u, m32)));
                }
                (lo, hi)
            }
            PanelFormat::Q41 => {
                let mut lo = [_mm256_setzero_ps(); 2];
                let mut hi = [_mm256_setzero_ps(); 2];
                for h in 0..2 {
                    let d = _mm256_loadu_ps(f.add(8 * h));
                    let m = _mm256_loadu_ps(f.add(PANEL + 8 * h));
                    let q = _mm256_cvtepu8_epi32(bytes8(blk.add(8 * PANEL + i * PANEL + 8 * h)));
                    let l = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0x0F)));
                    let u = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
                    lo[h] = _mm256_add_ps(_mm256_mul_ps(l, d), m);
                    hi[h] = _mm256_add_ps(_mm256_mul_ps(u, d), m);
                }
                (lo, hi)
            }
            PanelFormat::Q40 => {
                let mut lo = [_mm256_setzero_ps(); 2];
                let mut hi = [_mm256_setzero_ps(); 2];
                let eight = _mm256_set1_epi32(8);
                for h in 0..2 {
                    let d = _mm256_loadu_ps(f.add(8 * h));
                    let q = _mm256_cvtepu8_epi32(bytes8(blk.add(4 * PANEL + i * PANEL + 8 * h)));
                    let l = _mm256_cvtepi32_ps(_mm256_sub_epi32(
                        _mm256_and_si256(q, _mm256_set1_epi32(0x0F)),
                        eight,
                    ));
                    let u = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(q, 4), eight));
                    lo[h] = _mm256_mul_ps(l, d);
                    hi[h] = _mm256_mul_ps(u, d);
                }
                (lo, hi)
            }
            PanelFormat::Q80 => {
                let mut lo = [_mm256_setzero_ps(); 2];
                let mut hi = [_mm256_setzero_ps(); 2];
                let p = blk.add(4 * PANEL);
                for h in 0..2 {
                    let d = _mm256_loadu_ps(f.add(8 * h));
                    let l = _mm256_cvtepi8_epi32(bytes8(p.add(i * PANEL + 8 * h)));
                    let u = _mm256_cvtepi8_epi32(bytes8(p.add((i + QK / 2) * PANEL + 8 * h)));
                    lo[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(l), d);
                    hi[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(u), d);
                }
                (lo, hi)
            }
            PanelFormat::F32 => (
                [
                    _mm256_loadu_ps(f.add(i * PANEL)),
                    _mm256_loadu_ps(f.add(i * PANEL + 8)),
                ],
                [
                    _mm256_loadu_ps(f.add((i + QK / 2) * PANEL)),
                    _mm256_loadu_ps(f.add((i + QK / 2) * PANEL + 8)),
                ],
            ),
        }
    }
}

/// `B` input rows against one panel, in the AVX-512 kernel's order.
#[allow(clippy::needless_range_loop)] // indices over registers read best as in the math
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel<const B: usize, const F: u8>(blocks: usize, cols: usize, rows: usize, c: &Call) {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; B];
        let full = cols / QK;
        for j in 0..blocks {
            for i in 0..QK / 2 {
                let (lo, hi) = expand::<F>(c.w, j, i);
                let (cl, ch) = (j * QK + i, j * QK + i + QK / 2);
                for b in 0..B {
                    let xp = c.x.add(b * cols);
                    if j < full || cl < cols {
                        let xl = _mm256_set1_ps(*xp.add(cl));
                        for h in 0..2 {
                            acc[b][h] = _mm256_fmadd_ps(lo[h], xl, acc[b][h]);
                        }
                    }
                    if j < full || ch < cols {
                        let xh = _mm256_set1_ps(*xp.add(ch));
                        for h in 0..2 {
                            acc[b][h] = _mm256_fmadd_ps(hi[h], xh, acc[b][h]);
                        }
                    }
                }
            }
        }
        let valid = c.rows_valid[0].min(PANEL);
        for b in 0..B {
            let mut out = [0f32; PANEL];
            _mm256_storeu_ps(out.as_mut_ptr(), acc[b][0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[b][1]);
            let y = c.y.add(b * rows);
            if c.acc {
                for (i, o) in out.iter().take(valid).enumerate() {
                    *y.add(i) += o;
                }
            } else {
                std::ptr::copy_nonoverlapping(out.as_ptr(), y, valid);
            }
        }
    }
}

/// # Safety
/// `src` points to `blocks` blocks of `format`, `dst` holds `blocks × 512` floats, and AVX2
/// and FMA are present.
pub(super) unsafe fn expand_panel(
    format: PanelFormat,
    src: *const u8,
    blocks: usize,
    dst: &mut [f32],
) {
    assert!(dst.len() >= blocks * QK * PANEL);
    unsafe {
        match format {
            PanelFormat::Q40 => expand_panel_f::<0>(src, blocks, dst),
            PanelFormat::Q41 => expand_panel_f::<1>(src, blocks, dst),
            PanelFormat::Q80 => expand_panel_f::<2>(src, blocks, dst),
            PanelFormat::F32 => expand_panel_f::<3>(src, blocks, dst),
            PanelFormat::F16 => expand_panel_f::<4>(src, blocks, dst),
            PanelFormat::BF16 => expand_panel_f::<5>(src, blocks, dst),
            PanelFormat::Q4K => expand_panel_f::<6>(src, blocks, dst),
            PanelFormat::Q5K => expand_panel_f::<7>(src, blocks, dst),
            PanelFormat::Q6K => expand_panel_f::<8>(src, blocks, dst),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn expand_panel_f<const F: u8>(src: *const u8, blocks: usize, dst: &mut [f32]) {
    unsafe {
        for j in 0..blocks {
            let out = dst.as_mut_ptr().add(j * QK * PANEL);
            for i in 0..QK / 2 {
                let (lo, hi) = expand::<F>(src, j, i);
                for h in 0..2 {
                    _mm256_storeu_ps(out.add(i * PANEL + 8 * h), lo[h]);
                    _mm256_storeu_ps(out.add((i + QK / 2) * PANEL + 8 * h), hi[h]);
                }
            }
        }
    }
}

/// `e^x` for 8 lanes: the operations of the AVX-512 `exp16`, with `p·2ⁿ` built from the
/// exponent bits (n ∈ [−126, 127] after clamping, so the power of two is exact).
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    unsafe {
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
        let x = _mm256_max_ps(_mm256_set1_ps(-87.3), x);
        let x = _mm256_min_ps(_mm256_set1_ps(88.3), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        _mm256_andnot_ps(tiny, _mm256_mul_ps(p, pow2))
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn exp_scalar(x: f32) -> f32 {
    unsafe { _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))) }
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

#[inline(always)]
unsafe fn hmax_ps(v: __m256) -> f32 {
    unsafe {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

/// `Σ e^(v_i − shift)` in f64 (each term in f32).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn sum_exp(v: &[f32], shift: f32) -> f64 {
    unsafe {
        let s = _mm256_set1_ps(shift);
        let mut acc = [_mm256_setzero_pd(); 2];
        let chunks = v.len() / 8;
        for k in 0..chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v.as_ptr().add(8 * k)), s));
            acc[0] = _mm256_add_pd(acc[0], _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            acc[1] = _mm256_add_pd(acc[1], _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        }
        let mut lanes = [0f64; 4];
        _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(acc[0], acc[1]));
        let mut total: f64 = lanes.iter().sum();
        for &x in &v[chunks * 8..] {
            total += exp_scalar(x - shift) as f64;
        }
        total
    }
}

/// `v_i ← e^(v_i − shift)` in place; returns their sum.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp_in_place(v: &mut [f32], shift: f32) -> f32 {
    unsafe {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let chunks = v.len() / 8;
        for k in 0..chunks {
            let p = v.as_mut_ptr().add(8 * k);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p), s));
            _mm256_storeu_ps(p, e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut total = hsum_ps(acc);
        for x in &mut v[chunks * 8..] {
            *x = exp_scalar(*x - shift);
            total += *x;
        }
        total
    }
}

/// `out_i = g_i / (1 + e^(−g_i)) · u_i`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    unsafe {
        let chunks = out.len() / 8;
        let one = _mm256_set1_ps(1.0);
        for k in 0..chunks {
            let gv = _mm256_loadu_ps(g.as_ptr().add(8 * k));
            let uv = _mm256_loadu_ps(u.as_ptr().add(8 * k));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), _mm256_mul_ps(s, uv));
        }
        for i in chunks * 8..out.len() {
            out[i] = g[i] / (1.0 + exp_scalar(-g[i])) * u[i];
        }
    }
}

/// `v_i ← v_i · scale`; returns the largest result, NaNs ignored (as `f32::max`).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn scale_max(v: &mut [f32], scale: f32) -> f32 {
    unsafe {
        let s = _mm256_set1_ps(scale);
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = v.len() / 8;
        for k in 0..chunks {
            let p = v.as_mut_ptr().add(8 * k);
            let x = _mm256_mul_ps(_mm256_loadu_ps(p), s);
            _mm256_storeu_ps(p, x);
            acc = _mm256_max_ps(x, acc);
        }
        let mut m = hmax_ps(acc);
        for x in &mut v[chunks * 8..] {
            *x *= scale;
            m = m.max(*x);
        }
        m
    }
}

/// The largest value, NaNs ignored (as `f32::max`).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn max_of(v: &[f32]) -> f32 {
    unsafe {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = v.len() / 8;
        for k in 0..chunks {
            acc = _mm256_max_ps(_mm256_loadu_ps(v.as_ptr().add(8 * k)), acc);
        }
        v[chunks * 8..].iter().fold(hmax_ps(acc), |m, &x| m.max(x))
    }
}

/// Bit mask of the lanes of `p[0..16]` greater than the value whose `f32::total_cmp` key
/// is `key`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn total_gt_mask(p: *const f32, key: i32) -> u16 {
    unsafe {
        let k = _mm256_set1_epi32(key);
        let mut mask = 0u16;
        for h in 0..2 {
            let b = _mm256_loadu_si256(p.add(8 * h) as *const __m256i);
            let flip = _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1);
            let gt = _mm256_cmpgt_epi32(_mm256_xor_si256(b, flip), k);
            mask |= (_mm256_movemask_ps(_mm256_castsi256_ps(gt)) as u16) << (8 * h);
        }
        mask
    }
}
