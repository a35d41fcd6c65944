//! The dtype of a teacher's products: `--dtype f32|bf16|f16`.

use std::fmt;
use std::str::FromStr;

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// What the teacher's weights, activations and matrix products are held in. Logits and
/// log-probs are f32 (f64 for the log-sum-exp) whatever the dtype.
///
/// `F32` is exact: on the CPU it runs the project's kernels, elsewhere candle's f32 products.
/// `Bf16` and `F16` hold the weights in half precision (as stored where the file stores them
/// so, rounded once otherwise) and round every activation to it; they are approximate, and a
/// cache made with them records the dtype in its identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    /// candle's dtype for the tensors.
    pub fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }

    /// The dtype of candle's tensors of that dtype (f32 for anything else).
    pub fn from_candle(d: DType) -> Self {
        match d {
            DType::BF16 => Dtype::Bf16,
            DType::F16 => Dtype::F16,
            _ => Dtype::F32,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.candle().size_in_bytes()
    }

    pub fn is_exact(&self) -> bool {
        *self == Dtype::F32
    }
}

/// A dtype name `--dtype` does not know.
#[derive(Debug, thiserror::Error)]
#[error("--dtype {given:?}: expected f32, bf16 or f16")]
pub struct UnknownDtype {
    pub given: String,
}

impl FromStr for Dtype {
    type Err = UnknownDtype;

    fn from_str(s: &str) -> Result<Self, UnknownDtype> {
        match s.trim() {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            "f16" => Ok(Dtype::F16),
            other => Err(UnknownDtype {
                given: other.to_string(),
            }),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for d in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
            assert_eq!(d.to_string().parse::<Dtype>().unwrap(), d);
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
        }
        assert_eq!(Dtype::Bf16.size(), 2);
        let e = "fp8".parse::<Dtype>().unwrap_err().to_string();
        assert!(e.contains("--dtype \"fp8\""), "{e}");
    }
}
