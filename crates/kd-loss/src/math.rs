//! Small numerically careful helpers in f64.

/// Input element types the losses accept; every value is widened to f64 before any math.
pub trait Real: Copy + Send + Sync {
    /// The value as f64 (exact for every implementor).
    fn to_f64(self) -> f64;
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Real for half::f16 {
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
}

impl Real for half::bf16 {
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
}

/// Gradient element types written by the losses (rounded once from f64).
pub(crate) trait GradElem: Copy + Send {
    fn from_f64(x: f64) -> Self;
}

impl GradElem for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
}

impl GradElem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

/// log Σ exp(x_i), shifted by the maximum; `-inf` for an empty input or all `-inf`.
pub(crate) fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if m.is_infinite() {
        return m;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// log(exp(a) + exp(b)) without overflow; `-inf` when both are `-inf`.
pub(crate) fn log_add_exp(a: f64, b: f64) -> f64 {
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + (-(a - b).abs()).exp().ln_1p()
}

/// Teacher tail mass r = 1 − Σ exp(l_i) from T=1 log-probs, clamped at 0
/// (rounding, e.g. f16 storage, can push Σ exp(l_i) above 1).
pub(crate) fn tail_mass(logprobs: impl Iterator<Item = f64> + Clone) -> f64 {
    (-log_sum_exp(logprobs).exp_m1()).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_handles_infinities_and_large_values() {
        let ninf = f64::NEG_INFINITY;
        assert_eq!(log_sum_exp([].into_iter()), ninf);
        assert_eq!(log_sum_exp([ninf, ninf].into_iter()), ninf);
        assert_eq!(log_sum_exp([ninf, 0.0].into_iter()), 0.0);
        let big = log_sum_exp([1000.0, 1000.0].into_iter());
        assert!((big - (1000.0 + 2f64.ln())).abs() < 1e-12);
    }

    #[test]
    fn log_add_exp_matches_direct_formula() {
        assert_eq!(
            log_add_exp(f64::NEG_INFINITY, f64::NEG_INFINITY),
            f64::NEG_INFINITY
        );
        assert_eq!(log_add_exp(f64::NEG_INFINITY, -3.0), -3.0);
        let (a, b) = (-1.25f64, -0.5f64);
        assert!((log_add_exp(a, b) - (a.exp() + b.exp()).ln()).abs() < 1e-15);
    }

    #[test]
    fn tail_mass_is_clamped_at_zero() {
        assert_eq!(tail_mass([0.0, -40.0].into_iter()), 0.0);
        let r = tail_mass([0.5f64.ln(), 0.25f64.ln()].into_iter());
        assert!((r - 0.25).abs() < 1e-15);
    }
}

/// `out[i] = exp((x[i] − shift) · scale)` for every element, in f64.
///
/// The full-vocabulary softmax takes one exponential per vocabulary entry and position (49152
/// per position for SmolLM2), and the C library's scalar `exp` made it a quarter of a training
/// step. This one is branch-free, so it runs eight lanes at a time where the CPU has AVX-512,
/// four with AVX2 and FMA (chosen at run time) and two elsewhere, with the same bits at every
/// width (no fused multiply-add is formed): `n = round(x·log₂e)`, `r = x − n·ln 2` in two
/// parts, a degree-13 Taylor polynomial on `|r| ≤ ln 2 / 2` (truncation below 2⁻⁵⁶), times
/// `2ⁿ` built in the exponent bits. Within 2 ulp of the correctly rounded value (a test
/// checks 1e-15 relative over the whole range); arguments below −708 give 0 instead of a
/// subnormal; NaN stays NaN.
pub fn exp_shifted(x: &[f64], shift: f64, scale: f64, out: &mut [f64]) {
    assert_eq!(x.len(), out.len(), "exp_shifted lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected at run time.
        unsafe { exp_shifted_avx512(x, shift, scale, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        unsafe { exp_shifted_avx2(x, shift, scale, out) };
        return;
    }
    exp_shifted_body(x, shift, scale, out);
}

/// Eight lanes; the same operations, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(x: &[f64], shift: f64, scale: f64, out: &mut [f64]) {
    exp_shifted_body(x, shift, scale, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(x: &[f64], shift: f64, scale: f64, out: &mut [f64]) {
    exp_shifted_body(x, shift, scale, out);
}

#[inline(always)]
fn exp_shifted_body(x: &[f64], shift: f64, scale: f64, out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = exp_poly((v - shift) * scale);
    }
}

#[inline(always)]
fn exp_poly(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2¹¹.
    const LN2_HI: f64 = 6.931_471_803_691_238_2e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    // Adding 1.5·2⁵² rounds to an integer, which then sits in the low mantissa bits.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let xc = if x < -708.0 { -708.0 } else { x };
    let xc = if xc > 709.0 { 709.0 } else { xc };
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 6_227_020_800.0; // 1/13!
    for c in [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    let k = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    let two_n = f64::from_bits(((k + 1023) as u64) << 52);
    let e = p * two_n;
    if x < -708.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

#[cfg(test)]
mod exp_tests {
    use super::exp_shifted;

    #[test]
    fn exp_shifted_is_within_2_ulp_of_libm() {
        let xs: Vec<f64> = (0..200_001)
            .map(|i| -708.0 + 717.0 * i as f64 / 200_000.0)
            .chain([0.0, -0.0, 1e-300, -1e-300, 0.5 * std::f64::consts::LN_2])
            .collect();
        let mut out = vec![0.0; xs.len()];
        exp_shifted(&xs, 0.0, 1.0, &mut out);
        let mut worst = 0f64;
        for (&x, &e) in xs.iter().zip(&out) {
            let want = x.exp();
            worst = worst.max(((e - want) / want).abs());
        }
        assert!(worst < 1e-15, "relative error {worst:e}");
        let mut o = [0.0; 4];
        exp_shifted(&[-800.0, f64::NAN, -708.5, 2.0], 1.0, 2.0, &mut o);
        assert_eq!(o[0], 0.0);
        assert!(o[1].is_nan());
        assert_eq!(o[2], 0.0);
        assert!(((o[3] - 2f64.exp()) / 2f64.exp()).abs() < 1e-15);
    }
}

/// Lanes of the full-vocabulary reductions: eight partial results, combined in a fixed order,
/// so every reduction's result depends on the length alone (never on the CPU) and runs
/// vectorised instead of as one chain of dependent additions.
const LANES: usize = 8;

/// Runs `body` compiled for AVX2 where the CPU has it: the same operations, wider.
macro_rules! on_avx2 {
    ($body:ident($($arg:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            unsafe fn wide($($arg: $ty),*) -> $ret {
                $body($($arg),*)
            }
            // SAFETY: the feature was detected at run time.
            return unsafe { wide($($arg),*) };
        }
        $body($($arg),*)
    }};
}

/// The largest element (NaN skipped; `-inf` when there is none): the same value as a fold in
/// any order.
pub(crate) fn max_of(x: &[f64]) -> f64 {
    #[inline(always)]
    fn body(x: &[f64]) -> f64 {
        let mut acc = [f64::NEG_INFINITY; LANES];
        let mut it = x.chunks_exact(LANES);
        for c in &mut it {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let m = acc
            .iter()
            .fold(f64::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        it.remainder()
            .iter()
            .fold(m, |a, &b| if b > a { b } else { a })
    }
    on_avx2!(body(x: &[f64]) -> f64)
}

/// Σ x in [`LANES`] partial sums: lane `i` adds the elements at `i`, `i + 8`, …; the lanes
/// are then added in order, then the remainder.
pub(crate) fn sum_of(x: &[f64]) -> f64 {
    #[inline(always)]
    fn body(x: &[f64]) -> f64 {
        let mut acc = [0.0f64; LANES];
        let mut it = x.chunks_exact(LANES);
        for c in &mut it {
            for i in 0..LANES {
                acc[i] += c[i];
            }
        }
        let s = acc.iter().sum::<f64>();
        it.remainder().iter().fold(s, |a, &b| a + b)
    }
    on_avx2!(body(x: &[f64]) -> f64)
}

/// Over the entries outside the support (`member` false): Σ e (in lanes, as [`sum_of`]) and
/// the largest z (as [`max_of`]).
pub(crate) fn complement_sum_max(e: &[f64], member: &[bool], z: &[f64]) -> (f64, f64) {
    #[inline(always)]
    fn body(e: &[f64], member: &[bool], z: &[f64]) -> (f64, f64) {
        let n = e.len().min(member.len()).min(z.len());
        let (e, member, z) = (&e[..n], &member[..n], &z[..n]);
        let mut sum = [0.0f64; LANES];
        let mut max = [f64::NEG_INFINITY; LANES];
        let full = n / LANES * LANES;
        for ((ec, mc), zc) in e[..full]
            .chunks_exact(LANES)
            .zip(member[..full].chunks_exact(LANES))
            .zip(z[..full].chunks_exact(LANES))
        {
            for i in 0..LANES {
                // Adding 0 leaves a sum of non-negative terms unchanged; -inf never wins.
                let (ev, zv) = if mc[i] {
                    (0.0, f64::NEG_INFINITY)
                } else {
                    (ec[i], zc[i])
                };
                sum[i] += ev;
                max[i] = if zv > max[i] { zv } else { max[i] };
            }
        }
        let mut s = sum.iter().sum::<f64>();
        let mut m = max
            .iter()
            .fold(f64::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for j in full..n {
            if !member[j] {
                s += e[j];
                m = if z[j] > m { z[j] } else { m };
            }
        }
        (s, m)
    }
    on_avx2!(body(e: &[f64], member: &[bool], z: &[f64]) -> (f64, f64))
}

#[cfg(test)]
mod lane_tests {
    use super::*;

    /// Values with NaN, infinities and both signs, of every length up to 40.
    fn inputs() -> Vec<Vec<f64>> {
        (0..=40)
            .map(|n| {
                (0..n)
                    .map(|i| match (i * 7 + n) % 11 {
                        0 => f64::NAN,
                        1 => f64::NEG_INFINITY,
                        k => (k as f64 - 5.5) * 1.37f64.powi(i as i32 % 9),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn lane_reductions_equal_the_sequential_ones() {
        for x in inputs() {
            let fold = x
                .iter()
                .fold(f64::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            assert_eq!(max_of(&x).to_bits(), fold.to_bits(), "{x:?}");
            let finite: Vec<f64> = x
                .iter()
                .map(|v| if v.is_finite() { v.abs() } else { 0.5 })
                .collect();
            let seq: f64 = finite.iter().sum();
            let lanes = sum_of(&finite);
            assert!(
                (lanes - seq).abs() <= 1e-15 * seq.max(1.0),
                "{lanes} vs {seq}"
            );
            // The lanes' order: lane i sums elements i, i+8, …, lanes added in order.
            if finite.len() >= 16 {
                let mut acc = [0.0f64; 8];
                for (i, v) in finite[..finite.len() / 8 * 8].iter().enumerate() {
                    acc[i % 8] += v;
                }
                let by_hand = finite[finite.len() / 8 * 8..]
                    .iter()
                    .fold(acc.iter().sum::<f64>(), |a, b| a + b);
                assert_eq!(lanes.to_bits(), by_hand.to_bits());
            }
            let member: Vec<bool> = (0..x.len()).map(|i| i % 3 == 1).collect();
            let (s, m) = complement_sum_max(&finite, &member, &x);
            let (mut s0, mut m0) = (0.0f64, f64::NEG_INFINITY);
            for j in 0..x.len() {
                if !member[j] {
                    s0 += finite[j];
                    m0 = m0.max(x[j]);
                }
            }
            assert_eq!(m.to_bits(), m0.to_bits(), "{x:?}");
            assert!((s - s0).abs() <= 1e-15 * s0.max(1.0), "{s} vs {s0}");
        }
    }
}
