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
/// step. This one is branch-free, so it runs four lanes at a time where the CPU has AVX2 and
/// FMA (chosen at run time) and two elsewhere: `n = round(x·log₂e)`, `r = x − n·ln 2` in two
/// parts, a degree-13 Taylor polynomial on `|r| ≤ ln 2 / 2` (truncation below 2⁻⁵⁶), times
/// `2ⁿ` built in the exponent bits. Within 2 ulp of the correctly rounded value (a test
/// checks 1e-15 relative over the whole range); arguments below −708 give 0 instead of a
/// subnormal; NaN stays NaN.
pub fn exp_shifted(x: &[f64], shift: f64, scale: f64, out: &mut [f64]) {
    assert_eq!(x.len(), out.len(), "exp_shifted lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected at run time.
        unsafe { exp_shifted_avx2(x, shift, scale, out) };
        return;
    }
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
