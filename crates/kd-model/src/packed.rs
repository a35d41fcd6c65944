//! Small-batch matrix products straight from GGUF blocks, in exact f32.
//!
//! Decoding multiplies a handful of rows by every weight matrix, so it is bound by how many
//! bytes of weights are read per step. This kernel reads the 4- or 8-bit GGUF blocks, expands
//! each block to the very f32 values candle's `dequantize` produces (`q·d + m`, the same two
//! roundings), and accumulates in f32 with fused multiply-adds. No activation is quantized:
//! the result equals a product with the dequantized f32 matrix up to summation order
//! (~1e-7 relative), at a fifth to an eighth of the memory traffic.

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

const QK: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Q40,
    Q41,
    Q80,
}

impl Format {
    fn block_bytes(self) -> usize {
        match self {
            Format::Q40 => 18,
            Format::Q41 => 20,
            Format::Q80 => 34,
        }
    }
}

/// A `[rows, cols]` weight matrix kept as GGUF blocks, multiplied in f32.
pub struct PackedLinear {
    format: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// Rows of `x` handled together: each expanded block is reused this many times.
const GROUP: usize = 8;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// Whether this CPU runs the kernel (AVX-512F); elsewhere callers keep the dense path.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedLinear {
    /// `None` when the CPU lacks AVX-512F, or the tensor is not a 2-D Q4_0, Q4_1 or Q8_0
    /// matrix of whole blocks.
    pub fn from_qtensor(t: &QTensor) -> Option<Self> {
        if !supported() {
            return None;
        }
        let format = match t.dtype() {
            GgmlDType::Q4_0 => Format::Q40,
            GgmlDType::Q4_1 => Format::Q41,
            GgmlDType::Q8_0 => Format::Q80,
            _ => return None,
        };
        let &[rows, cols] = t.shape().dims() else {
            return None;
        };
        if cols % QK != 0 {
            return None;
        }
        let data = t.data().ok()?.into_owned();
        (data.len() == rows * cols / QK * format.block_bytes()).then_some(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` is `[n, cols]` row-major; returns `x · Wᵀ` as `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "input shape");
        let (rows, cols) = (self.rows, self.cols);
        let rb = cols / QK * self.format.block_bytes();
        // Transposed result [rows, n], filled in parallel by blocks of output rows.
        let mut yt = vec![0f32; rows * n];
        yt.par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(task, out)| {
                let r0 = task * ROWS_PER_TASK;
                let task_rows = out.len() / n;
                let mut i = 0;
                while i < task_rows {
                    // Two weight rows at a time share every load of x.
                    let pair = i + 1 < task_rows;
                    let w0 = &self.data[(r0 + i) * rb..(r0 + i + 1) * rb];
                    let w1 = if pair {
                        &self.data[(r0 + i + 1) * rb..(r0 + i + 2) * rb]
                    } else {
                        w0
                    };
                    let (o0, rest) = out[i * n..].split_at_mut(n);
                    let mut b0 = 0;
                    while b0 < n {
                        let g = (n - b0).min(GROUP);
                        let xs = &x[b0 * cols..(b0 + g) * cols];
                        let mut tmp = [0f32; GROUP];
                        let o1 = if pair {
                            &mut rest[b0..b0 + g]
                        } else {
                            &mut tmp[..g]
                        };
                        simd::rows_dot(self.format, w0, w1, xs, cols, &mut o0[b0..b0 + g], o1);
                        b0 += g;
                    }
                    i += if pair { 2 } else { 1 };
                }
            });
        let mut y = vec![0f32; n * rows];
        for r in 0..rows {
            for b in 0..n {
                y[b * rows + r] = yt[r * n + b];
            }
        }
        y
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Format, QK};
    use half::f16;
    use std::arch::x86_64::*;

    /// `out0[b] = Σ_c w0[c] · x[b, c]` and the same for `w1` into `out1`, for `out0.len()`
    /// (≤ 8) rows of `x`.
    pub(super) fn rows_dot(
        format: Format,
        w0: &[u8],
        w1: &[u8],
        x: &[f32],
        cols: usize,
        out0: &mut [f32],
        out1: &mut [f32],
    ) {
        let b = out0.len();
        let rb = cols / QK * format.block_bytes();
        assert!(b <= super::GROUP && out1.len() == b && x.len() == b * cols);
        assert!(w0.len() == rb && w1.len() == rb);
        // SAFETY: `PackedLinear` exists only when AVX-512F was detected at run time
        // (`supported()`), and the assertions above bound every load below: block j of a
        // weight row is `w[j*bytes..(j+1)*bytes]` and row r of x is `x[r*cols..(r+1)*cols]`.
        unsafe {
            match b {
                8 => kernel::<8>(format, w0, w1, x, cols, out0, out1),
                7 => kernel::<7>(format, w0, w1, x, cols, out0, out1),
                6 => kernel::<6>(format, w0, w1, x, cols, out0, out1),
                5 => kernel::<5>(format, w0, w1, x, cols, out0, out1),
                4 => kernel::<4>(format, w0, w1, x, cols, out0, out1),
                3 => kernel::<3>(format, w0, w1, x, cols, out0, out1),
                2 => kernel::<2>(format, w0, w1, x, cols, out0, out1),
                _ => kernel::<1>(format, w0, w1, x, cols, out0, out1),
            }
        }
    }

    #[inline(always)]
    fn half(b: &[u8], at: usize) -> f32 {
        f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    /// Expands one block to two 16-lane vectors holding exactly candle's dequantized values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn expand(format: Format, blk: &[u8]) -> (__m512, __m512) {
        unsafe {
            match format {
                Format::Q41 => {
                    let d = _mm512_set1_ps(half(blk, 0));
                    let m = _mm512_set1_ps(half(blk, 2));
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.as_ptr().add(4) as *const __m128i
                    ));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                    (
                        _mm512_add_ps(_mm512_mul_ps(lo, d), m),
                        _mm512_add_ps(_mm512_mul_ps(hi, d), m),
                    )
                }
                Format::Q40 => {
                    let d = _mm512_set1_ps(half(blk, 0));
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.as_ptr().add(2) as *const __m128i
                    ));
                    let eight = _mm512_set1_epi32(8);
                    let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(
                        _mm512_and_si512(q, _mm512_set1_epi32(0x0F)),
                        eight,
                    ));
                    let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight));
                    (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                }
                Format::Q80 => {
                    let d = _mm512_set1_ps(half(blk, 0));
                    let p = blk.as_ptr().add(2);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p as *const __m128i,
                    )));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.add(16) as *const __m128i
                    )));
                    (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const B: usize>(
        format: Format,
        w0: &[u8],
        w1: &[u8],
        x: &[f32],
        cols: usize,
        out0: &mut [f32],
        out1: &mut [f32],
    ) {
        unsafe {
            let bytes = format.block_bytes();
            let mut acc0 = [_mm512_setzero_ps(); B];
            let mut acc1 = [_mm512_setzero_ps(); B];
            let xp = x.as_ptr();
            for j in 0..cols / QK {
                let (lo0, hi0) = expand(format, &w0[j * bytes..(j + 1) * bytes]);
                let (lo1, hi1) = expand(format, &w1[j * bytes..(j + 1) * bytes]);
                for b in 0..B {
                    let p = xp.add(b * cols + j * QK);
                    let (xl, xh) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                    acc0[b] = _mm512_fmadd_ps(hi0, xh, _mm512_fmadd_ps(lo0, xl, acc0[b]));
                    acc1[b] = _mm512_fmadd_ps(hi1, xh, _mm512_fmadd_ps(lo1, xl, acc1[b]));
                }
            }
            for b in 0..B {
                out0[b] = _mm512_reduce_add_ps(acc0[b]);
                out1[b] = _mm512_reduce_add_ps(acc1[b]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub(super) fn rows_dot(
        _: super::Format,
        _: &[u8],
        _: &[u8],
        _: &[f32],
        _: usize,
        _: &mut [f32],
        _: &mut [f32],
    ) {
        unreachable!("PackedLinear is only built where supported() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_dense_product_on_dequantized_weights() {
        let dev = Device::Cpu;
        let mut rng = crate::testing::Rng::new(5);
        let (rows, cols) = (70, 96);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
        let wt = Tensor::from_vec(w, (rows, cols), &dev).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&wt, dt).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let Some(p) = PackedLinear::from_qtensor(&q) else {
                eprintln!("skipped: this CPU has no AVX-512F");
                return;
            };
            for n in [1, 3, 8, 11] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
                let xt = Tensor::from_vec(x.clone(), (n, cols), &dev).unwrap();
                let want: Vec<f32> = xt
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = p.matmul(&x, n);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{dt:?} n={n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
