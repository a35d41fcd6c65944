//! Where a model runs: `--device cpu|cuda|cuda:N|auto`.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, DeviceLocation};

/// A device as a user names it. `Auto` is CUDA device 0 when the binary was built with CUDA
/// and a device answers, the CPU otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

/// Why a device cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device {asked}: this binary was built without CUDA (build it with \
         `cargo build --release --features cuda`)"
    )]
    NotBuilt { asked: DeviceChoice },
    #[error("--device {asked}: no usable CUDA device: {why}")]
    Unavailable { asked: DeviceChoice, why: String },
    #[error("--device {given:?}: expected cpu, cuda, cuda:N or auto")]
    Unknown { given: String },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let unknown = || DeviceError::Unknown {
            given: s.to_string(),
        };
        Ok(match s.trim() {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(n) => DeviceChoice::Cuda(n.parse().map_err(|_| unknown())?),
                None => return Err(unknown()),
            },
        })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. `cuda` without CUDA in the binary, or without a device that answers,
    /// is an error naming what was asked; `auto` falls back to the CPU.
    pub fn open(self) -> Result<Device, DeviceError> {
        let built = candle_core::utils::cuda_is_available();
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(_) if !built => Err(DeviceError::NotBuilt { asked: self }),
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| DeviceError::Unavailable {
                asked: self,
                why: e.to_string(),
            }),
            DeviceChoice::Auto if built => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
            DeviceChoice::Auto => Ok(Device::Cpu),
        }
    }
}

/// Free and total bytes of a CUDA device's memory; `None` on other devices.
pub fn memory_info(d: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = d {
        return c.cuda_stream().context().mem_get_info().ok();
    }
    let _ = d;
    None
}

/// A device's name as `--device` takes it: `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        for bad in ["gpu", "cuda:", "cuda:x", ""] {
            assert!(
                matches!(
                    bad.parse::<DeviceChoice>(),
                    Err(DeviceError::Unknown { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_cpu_opens_and_cuda_without_it_is_refused_by_name() {
        assert_eq!(device_name(&DeviceChoice::Cpu.open().unwrap()), "cpu");
        if !candle_core::utils::cuda_is_available() {
            assert_eq!(device_name(&DeviceChoice::Auto.open().unwrap()), "cpu");
            let e = DeviceChoice::Cuda(1).open().unwrap_err().to_string();
            assert!(
                e.contains("--device cuda:1") && e.contains("built without CUDA"),
                "{e}"
            );
        }
    }
}
