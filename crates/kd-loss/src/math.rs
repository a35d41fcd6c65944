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
