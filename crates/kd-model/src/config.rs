use serde::{Deserialize, Serialize};

use crate::rope::RopeScaling;

/// The decoder families: one block shape (RMSNorm, RoPE, grouped-query attention, SwiGLU)
/// with these differences.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3.x, SmolLM2, TinyLlama.
    #[default]
    Llama,
    /// Llama's block (a sliding window is a context limit here, see
    /// [`LlamaConfig::sliding_window`]).
    Mistral,
    /// Biases on the q, k and v projections.
    Qwen2,
    /// An RMSNorm over each head of q and of k before RoPE.
    Qwen3,
}

impl Arch {
    /// The `model_type` of a `config.json` and `general.architecture` of a GGUF file.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    pub fn from_name(s: &str) -> Option<Arch> {
        [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3]
            .into_iter()
            .find(|a| a.name() == s)
    }

    /// The `transformers` class of a causal LM of this family.
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    pub fn is_llama(&self) -> bool {
        *self == Arch::Llama
    }

    /// Whether q, k and v carry biases.
    pub fn qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }

    /// Whether q and k are RMS-normalised per head before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Arch::Qwen3
    }
}

/// Hyperparameters of a llama-family decoder, named as in a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The family (`model_type`); absent means llama.
    #[serde(default, rename = "model_type", skip_serializing_if = "Arch::is_llama")]
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (`None`: plain RoPE). [`crate::loader::read_hf_config`] fills it from
    /// either `config.json` form, [`crate::loader::gguf_config`] from a GGUF header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// An explicit head size (`None`: `hidden_size / num_attention_heads`); the attention
    /// width is `num_attention_heads × head_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The attention window of models that use one (Mistral v0.1, Qwen with
    /// `use_sliding_window`). Within it a sliding window attends to every earlier token, so
    /// the model computes exactly that function by refusing longer sequences
    /// ([`LlamaConfig::max_len`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}

pub use crate::rope::MAX_POSITIONS;

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Width of the attention (q rows, o columns): `num_attention_heads × head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads.saturating_mul(self.head_dim())
    }

    /// The longest sequence the model computes exactly: `max_position_embeddings`, or the
    /// sliding window when that is shorter.
    pub fn max_len(&self) -> usize {
        match self.sliding_window {
            Some(w) => w.min(self.max_position_embeddings),
            None => self.max_position_embeddings,
        }
    }

    /// RoPE inverse frequencies `[head_dim/2]` (f64) and the factor cos and sin are scaled by.
    pub fn rope_frequencies(&self) -> (Vec<f64>, f64) {
        crate::rope::frequencies(self.rope_theta, self.head_dim(), self.rope_scaling.as_ref())
    }

    /// The `config.json` `transformers` 4.x and 5.x both load as this model
    /// (`LlamaForCausalLM` or the family's class, f32): RoPE as a top-level `rope_theta` and `rope_scaling`, and the
    /// same as `rope_parameters`. Refused when the RoPE has no `config.json` form (a GGUF
    /// file's `rope_freqs.weight` factors).
    pub fn to_hf_json(&self) -> Result<serde_json::Value, String> {
        let rope = crate::rope::hf_entries(self.rope_theta, self.rope_scaling.as_ref())
            .map_err(|r| format!("{}: {}", r.key, r.what))?;
        let mut v = serde_json::to_value(self).expect("config serializes");
        let m = v.as_object_mut().expect("config is an object");
        m.extend(rope);
        m.insert("model_type".into(), self.arch.name().into());
        m.insert(
            "architectures".into(),
            serde_json::json!([self.arch.hf_class()]),
        );
        if let Some(w) = self.sliding_window {
            m.insert("use_sliding_window".into(), true.into());
            m.insert("max_window_layers".into(), 0.into());
            m.insert("sliding_window".into(), w.into());
        } else {
            m.insert("sliding_window".into(), serde_json::Value::Null);
        }
        m.insert("hidden_act".into(), "silu".into());
        m.insert("torch_dtype".into(), "float32".into());
        m.insert("head_dim".into(), self.head_dim().into());
        Ok(v)
    }

    /// Number of parameters (embeddings counted once when tied).
    pub fn n_params(&self) -> usize {
        let d = self.hidden_size;
        let hd = self.head_dim();
        let kv = self.num_key_value_heads * hd;
        let q = self.q_dim();
        let mut per_layer = d * q * 2 + d * kv * 2 + 3 * d * self.intermediate_size + 2 * d;
        if self.arch.qkv_bias() {
            per_layer += q + 2 * kv;
        }
        if self.arch.qk_norm() {
            per_layer += 2 * hd;
        }
        let emb = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { emb };
        emb + head + d + per_layer * self.num_hidden_layers
    }

    /// Checks the shape rules the model relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0
            || (self.head_dim.is_none()
                && !self.hidden_size.is_multiple_of(self.num_attention_heads))
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == Some(0) || self.head_dim.is_some_and(|h| h > 1 << 16) {
            return Err(format!("head_dim {} is outside 1..=65536", self.head_dim()));
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be positive".into());
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.vocab_size == 0
            || self.num_hidden_layers == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
        {
            return Err(
                "vocab_size, hidden_size, intermediate_size and num_hidden_layers must be positive"
                    .into(),
            );
        }
        if let Some(RopeScaling::Freqs { factors }) = &self.rope_scaling
            && factors.len() != self.head_dim() / 2
        {
            return Err(format!(
                "{} RoPE frequency factors for head_dim {} (expected head_dim/2)",
                factors.len(),
                self.head_dim()
            ));
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > MAX_POSITIONS {
            return Err(format!(
                "max_position_embeddings {} is outside 1..={MAX_POSITIONS} (the RoPE tables \
                 are precomputed for every position)",
                self.max_position_embeddings
            ));
        }
        Ok(())
    }
}
