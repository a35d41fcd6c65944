//! Llama-family models for the distillation pipeline.
//!
//! [`load`] opens a teacher from a GGUF file (F32, F16, Q4_0, Q4_1, Q8_0, … as candle reads
//! them) or from a Hugging Face directory (`config.json`, `*.safetensors`, `tokenizer.json`).
//! By default weights are dequantized and every product is computed in f32
//! ([`Precision::Exact`]): the cache must hold the teacher's real distribution, and candle's
//! quantized CPU kernels quantize activations to 8 bits. On a CPU with AVX-512 (or AVX2 and
//! FMA) the exact path
//! runs [`cpu::CpuLlama`] on [`kernels::PanelMatrix`] products (f32 straight from the GGUF
//! blocks); elsewhere candle's tensors compute the same function ([`load_with`] chooses).
//! [`Llama::prefill`] returns hidden
//! states at every position of a right-padded batch (scoring and prefill),
//! [`Llama::step`] decodes one token per row with a [`KvCache`], and [`Llama::logits_at`]
//! applies the output head only where logits are needed.
//! [`trainable::Student`] is the same decoder on candle `Var`s with a forward pass that is
//! differentiable end to end (phase two trains it), built at random, from a Hugging Face
//! directory, or from a subset of a teacher's layers.
//!
//! ```no_run
//! use kd_model::{load, Precision};
//! let m = load("data/models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), Precision::Exact,
//!              &candle_core::Device::Cpu).unwrap();
//! let ids = m.tokenizer.encode("The capital of France is", false);
//! let (hidden, _) = m.model.prefill(&[&ids], false).unwrap();
//! let logits = m.model.logits_at(&hidden, &[(0, ids.len() - 1)]).unwrap();
//! ```

pub mod config;
pub mod cpu;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gguf_check;
pub mod gguf_export;
pub mod llama;
pub mod loader;
pub mod rope;
pub mod testing;
pub mod trainable;
pub mod weights;

/// The CPU kernels ([`kd_kernels`]), under the name the model code uses.
pub use kd_kernels as kernels;

pub use config::{Arch, LlamaConfig};
pub use device::{DeviceChoice, DeviceError, device_name, memory_info};
pub use dtype::{Dtype, UnknownDtype};
pub use error::{Error, Result};
pub use llama::{KvCache, Layer, Linear, Llama, log_softmax_f64};
pub use loader::{
    Kernels, LoadOptions, LoadedModel, ModelIdentity, Precision, load, load_opts, load_with,
    sha256_file,
};
pub use rope::RopeScaling;
pub use trainable::Student;
