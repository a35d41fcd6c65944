//! Loss settings: which divergence, temperature, the KD/CE mix, and the tail policy.

use serde::{Deserialize, Serialize};

use crate::LossError;

/// The divergence D(P, Q) between the teacher P and the student Q on the compared support
/// (see [`TailPolicy`]). Every variant is ≥ 0 and is 0 when Q = P.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Divergence {
    /// KL(P‖Q) = Σ P (log P − log Q): mass-covering.
    ForwardKl,
    /// KL(Q‖P) = Σ Q (log Q − log P): mode-seeking. Not −Σ P log Q (that is cross-entropy).
    ReverseKl,
    /// Generalized JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q, 0 < β < 1.
    Jsd { beta: f64 },
    /// Skew forward KL(λ) = KL(P ‖ λP + (1−λ)Q), 0 ≤ λ < 1 (λ = 0 is forward KL).
    SkewForwardKl { lambda: f64 },
    /// Skew reverse KL(λ) = KL(Q ‖ λQ + (1−λ)P), 0 ≤ λ < 1 (λ = 0 is reverse KL).
    SkewReverseKl { lambda: f64 },
    /// Centred logit MSE over S:
    /// mean_S ((z_i/τ − mean_S z/τ) − (l_i/τ − mean_S l/τ))². Ignores the tail policy.
    LogitMse,
}

impl Divergence {
    /// The snake_case name used in configs, logs and the reference file
    /// (`forward_kl`, `reverse_kl`, `jsd`, `skew_forward_kl`, `skew_reverse_kl`, `logit_mse`).
    pub fn name(&self) -> &'static str {
        match self {
            Divergence::ForwardKl => "forward_kl",
            Divergence::ReverseKl => "reverse_kl",
            Divergence::Jsd { .. } => "jsd",
            Divergence::SkewForwardKl { .. } => "skew_forward_kl",
            Divergence::SkewReverseKl { .. } => "skew_reverse_kl",
            Divergence::LogitMse => "logit_mse",
        }
    }
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Divergence::Jsd { beta } => write!(f, "jsd(beta={beta})"),
            Divergence::SkewForwardKl { lambda } => write!(f, "skew_forward_kl(lambda={lambda})"),
            Divergence::SkewReverseKl { lambda } => write!(f, "skew_reverse_kl(lambda={lambda})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Which support teacher and student are compared on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TailPolicy {
    /// Support S ∪ {tail}: the teacher's tail mass r = 1 − Σ_S exp(l_i) is spread uniformly
    /// over the V − k other tokens before tempering; the student's tail is Σ_{j∉S} q_j.
    /// At τ = 1 this is the exact KL between the coarse-grained distributions.
    #[default]
    Bucket,
    /// Support S only, both sides renormalised (softmax over S). Ignores student mass
    /// outside S; for comparison with tools that renormalise the top-k.
    Renorm,
}

/// Everything that defines the per-position loss
/// `total = α·τ²·D(P, Q) + (1 − α)·CE`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// The divergence D.
    pub divergence: Divergence,
    /// Temperature τ > 0 applied to both teacher and student (z/τ, l/τ); default 1.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Weight α ∈ [0, 1] of the distillation term; 1 − α weighs the hard CE.
    /// α = 0 is plain SFT on the teacher's outputs; default 1.
    #[serde(default = "one")]
    pub alpha: f64,
    /// How mass outside the teacher's top-k is handled.
    #[serde(default)]
    pub tail: TailPolicy,
}

fn one() -> f64 {
    1.0
}

impl LossConfig {
    /// Checks the ranges: τ finite and > 0, 0 ≤ α ≤ 1, 0 < β < 1 (JSD), 0 ≤ λ < 1 (skew KL).
    /// The error names the field.
    pub fn validate(&self) -> Result<(), LossError> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(LossError::Temperature { value: t });
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(LossError::Alpha { value: self.alpha });
        }
        match self.divergence {
            Divergence::Jsd { beta } if !(beta > 0.0 && beta < 1.0) => {
                Err(LossError::JsdBeta { value: beta })
            }
            Divergence::SkewForwardKl { lambda } | Divergence::SkewReverseKl { lambda }
                if !(0.0..1.0).contains(&lambda) =>
            {
                Err(LossError::SkewLambda { value: lambda })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(divergence: Divergence, temperature: f64, alpha: f64) -> LossConfig {
        LossConfig {
            divergence,
            temperature,
            alpha,
            tail: TailPolicy::Bucket,
        }
    }

    #[test]
    fn validate_accepts_the_edges_of_each_range() {
        for d in [
            Divergence::ForwardKl,
            Divergence::Jsd { beta: 0.5 },
            Divergence::SkewForwardKl { lambda: 0.0 },
            Divergence::SkewReverseKl { lambda: 0.99 },
        ] {
            for alpha in [0.0, 0.5, 1.0] {
                assert_eq!(cfg(d, 1e-3, alpha).validate(), Ok(()));
            }
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        let ok = Divergence::ForwardKl;
        for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                cfg(ok, t, 0.5).validate(),
                Err(LossError::Temperature { .. })
            ));
        }
        for a in [-0.1, 1.1, f64::NAN] {
            assert!(matches!(
                cfg(ok, 1.0, a).validate(),
                Err(LossError::Alpha { .. })
            ));
        }
        for beta in [0.0, 1.0, f64::NAN, -0.5] {
            let r = cfg(Divergence::Jsd { beta }, 1.0, 0.5).validate();
            assert!(matches!(r, Err(LossError::JsdBeta { .. })));
        }
        for lambda in [1.0, -0.1, f64::NAN] {
            for d in [
                Divergence::SkewForwardKl { lambda },
                Divergence::SkewReverseKl { lambda },
            ] {
                let r = cfg(d, 1.0, 0.5).validate();
                assert!(matches!(r, Err(LossError::SkewLambda { .. })));
            }
        }
    }

    #[test]
    fn names_match_the_reference_file_keys() {
        let names: Vec<_> = [
            Divergence::ForwardKl,
            Divergence::ReverseKl,
            Divergence::Jsd { beta: 0.5 },
            Divergence::SkewForwardKl { lambda: 0.1 },
            Divergence::SkewReverseKl { lambda: 0.1 },
            Divergence::LogitMse,
        ]
        .iter()
        .map(Divergence::name)
        .collect();
        assert_eq!(
            names,
            [
                "forward_kl",
                "reverse_kl",
                "jsd",
                "skew_forward_kl",
                "skew_reverse_kl",
                "logit_mse"
            ]
        );
    }

    #[test]
    fn config_reads_from_json_with_the_default_tail() {
        let c: LossConfig = serde_json::from_str(
            r#"{"divergence": {"kind": "jsd", "beta": 0.25}, "temperature": 2.0, "alpha": 0.5}"#,
        )
        .unwrap();
        assert_eq!(c, cfg(Divergence::Jsd { beta: 0.25 }, 2.0, 0.5));
        let back: LossConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let unknown =
            r#"{"divergence": {"kind": "forward_kl"}, "temperature": 1.0, "alpha": 1.0, "tau": 2}"#;
        assert!(serde_json::from_str::<LossConfig>(unknown).is_err());
    }
}
