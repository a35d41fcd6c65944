//! Tiny models that tests build themselves (nothing is downloaded): a seeded random llama with
//! the tiny test tokenizer of `kd_tokenizer`, written as a Hugging Face directory.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// A 2-layer model over the ~300-token test vocabulary.
pub fn tiny_config(vocab_size: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// Deterministic pseudo-random numbers (xorshift64*), roughly normal via a sum of uniforms.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.uniform()).sum::<f32>() * 1.732 - 3.464
    }
}

/// Random weights with Hugging Face names for `cfg`.
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let dev = Device::Cpu;
    let mut w = HashMap::new();
    let mut mat = |name: String, rows: usize, cols: usize, scale: f32| -> Result<()> {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * scale).collect();
        w.insert(name, Tensor::from_vec(v, (rows, cols), &dev)?);
        Ok(())
    };
    let d = cfg.hidden_size;
    let kvd = cfg.num_key_value_heads * cfg.head_dim();
    let ff = cfg.intermediate_size;
    let s = 1.0 / (d as f32).sqrt();
    mat("model.embed_tokens.weight".into(), cfg.vocab_size, d, 1.0)?;
    if !cfg.tie_word_embeddings {
        mat("lm_head.weight".into(), cfg.vocab_size, d, s)?;
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        mat(format!("{p}.self_attn.q_proj.weight"), d, d, s * 2.0)?;
        mat(format!("{p}.self_attn.k_proj.weight"), kvd, d, s * 2.0)?;
        mat(format!("{p}.self_attn.v_proj.weight"), kvd, d, s)?;
        mat(format!("{p}.self_attn.o_proj.weight"), d, d, s)?;
        mat(format!("{p}.mlp.gate_proj.weight"), ff, d, s)?;
        mat(format!("{p}.mlp.up_proj.weight"), ff, d, s)?;
        mat(
            format!("{p}.mlp.down_proj.weight"),
            d,
            ff,
            1.0 / (ff as f32).sqrt(),
        )?;
    }
    let mut ones = |name: String| -> Result<()> {
        let v: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.normal()).collect();
        w.insert(name, Tensor::from_vec(v, d, &dev)?);
        Ok(())
    };
    for i in 0..cfg.num_hidden_layers {
        ones(format!("model.layers.{i}.input_layernorm.weight"))?;
        ones(format!("model.layers.{i}.post_attention_layernorm.weight"))?;
    }
    ones("model.norm.weight".into())?;
    Ok(w)
}

/// Writes a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json) for a random tiny model using `tokenizer`.
pub fn write_hf_dir(
    dir: &Path,
    cfg: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: &kd_tokenizer::Tokenizer,
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut config = serde_json::to_value(cfg).expect("config serializes");
    config["model_type"] = "llama".into();
    config["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    config["hidden_act"] = "silu".into();
    config["torch_dtype"] = "float32".into();
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&config).expect("json")).map_err(io(&p))?;
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(weights, &p)?;
    let p = dir.join("tokenizer.json");
    let tj = tokenizer.to_tokenizer_json();
    std::fs::write(&p, serde_json::to_string(&tj).expect("json")).map_err(io(&p))?;
    let mut tc = serde_json::json!({});
    if let Some(t) = tokenizer.chat_template() {
        tc["chat_template"] = t.source().into();
    }
    if let Some(e) = tokenizer.eos_id() {
        tc["eos_token"] = tokenizer.token_text(e).into();
    }
    let p = dir.join("tokenizer_config.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tc).expect("json")).map_err(io(&p))?;
    Ok(())
}

/// A random tiny teacher directory with the test tokenizer: what end-to-end tests dump from.
pub fn write_tiny_teacher(dir: &Path, seed: u64) -> Result<LlamaConfig> {
    let tok = kd_tokenizer::Tokenizer::tiny_for_tests();
    let cfg = tiny_config(tok.vocab_size());
    let w = random_weights(&cfg, seed)?;
    write_hf_dir(dir, &cfg, &w, &tok)?;
    Ok(cfg)
}
