//! Tiny models that tests build themselves (nothing is downloaded): a seeded random llama with
//! the tiny test tokenizer of `kd_tokenizer`, written as a Hugging Face directory.

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use kd_tokenizer::Tokenizer;
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
        rope_scaling: None,
        arch: crate::config::Arch::Llama,
        head_dim: None,
        sliding_window: None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// The 6-layer SmolLM2 student's shape (hidden 576, MLP 1536, 9 heads over 3 key/value heads
/// of 64, tied 49152-token head, RoPE θ = 100000): what the engine tests and the training
/// benchmark run at full size.
pub fn smollm2_student_config() -> LlamaConfig {
    let mut c = tiny_config(49152);
    c.hidden_size = 576;
    c.intermediate_size = 1536;
    c.num_attention_heads = 9;
    c.num_key_value_heads = 3;
    c.num_hidden_layers = 6;
    c.max_position_embeddings = 8192;
    c.rope_theta = 100000.0;
    c
}

/// GFLOP/s of the packed f32 product `x [n, inn] · W [out, inn]ᵀ` (best of 7 calls; with
/// `pack`, each call packs `W` too, as a training step does).
pub fn packed_product_gflops(n: usize, out: usize, inn: usize, pack: bool) -> f64 {
    let x: Vec<f32> = (0..n * inn)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w: Vec<f32> = (0..out * inn)
        .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut y = vec![0f32; n * out];
    let mut pk = crate::kernels::PackedF32::new();
    pk.pack(&w, out, inn, false);
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = std::time::Instant::now();
        if pack {
            pk.pack(&w, out, inn, false);
        }
        pk.matmul_into(&x, n, &mut y, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * out * inn) as f64 / best / 1e9
}

pub use crate::kernels::Rng;

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
    let hd = cfg.head_dim();
    let qd = cfg.q_dim();
    let kvd = cfg.num_key_value_heads * hd;
    let ff = cfg.intermediate_size;
    let s = 1.0 / (d as f32).sqrt();
    mat("model.embed_tokens.weight".into(), cfg.vocab_size, d, 1.0)?;
    if !cfg.tie_word_embeddings {
        mat("lm_head.weight".into(), cfg.vocab_size, d, s)?;
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        mat(format!("{p}.self_attn.q_proj.weight"), qd, d, s * 2.0)?;
        mat(format!("{p}.self_attn.k_proj.weight"), kvd, d, s * 2.0)?;
        mat(format!("{p}.self_attn.v_proj.weight"), kvd, d, s)?;
        mat(
            format!("{p}.self_attn.o_proj.weight"),
            d,
            qd,
            1.0 / (qd as f32).sqrt(),
        )?;
        if cfg.arch.qkv_bias() {
            for (n, len) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
                mat(format!("{p}.self_attn.{n}.bias"), 1, len, 0.5)?;
            }
        }
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
    // Biases and per-head norms are vectors.
    let names: Vec<String> = w.keys().filter(|k| k.ends_with(".bias")).cloned().collect();
    for n in names {
        let t = w[&n].flatten_all()?;
        w.insert(n, t);
    }
    if cfg.arch.qk_norm() {
        for i in 0..cfg.num_hidden_layers {
            for n in ["q_norm", "k_norm"] {
                let v: Vec<f32> = (0..hd).map(|_| 1.0 + 0.3 * rng.normal()).collect();
                w.insert(
                    format!("model.layers.{i}.self_attn.{n}.weight"),
                    Tensor::from_vec(v, hd, &dev)?,
                );
            }
        }
    }
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
    let config = cfg.to_hf_json().map_err(|what| Error::BadField {
        path: dir.to_path_buf(),
        field: "config".into(),
        what,
    })?;
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

// GGUF fixtures: a tiny model written the way llama.cpp's converter writes one.

/// llama.cpp's `permute` for q/k rows ([`crate::gguf_export::permute`]).
pub fn permute(w: &Tensor, heads: usize) -> Tensor {
    crate::gguf_export::permute(w, heads).unwrap()
}

/// The inverse of [`permute`].
pub fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    crate::trainable::unpermute_qk(w, heads).unwrap()
}

pub type Weights = crate::gguf_export::Weights;

/// Writes `w` (Hugging Face layout) as a GGUF of `dtype` and returns the weights it really
/// holds, dequantized back to f32 in Hugging Face layout.
pub fn write_gguf(
    path: &std::path::Path,
    tok: &Tokenizer,
    w: &Weights,
    dtype: GgmlDType,
) -> Weights {
    write_gguf_with(path, tok, w, dtype, &tiny_config(tok.vocab_size()), &[])
}

/// [`write_gguf`] for the shape and RoPE of `cfg` (a linear scaling as
/// `llama.rope.scaling.*`, frequency factors as the tensor `rope_freqs.weight`, as llama.cpp's
/// converter writes them), with `extra` metadata added (replacing keys of the same name).
/// The fixtures add BOS/EOS as llama.cpp's converter does and never ask for a BOS token.
pub fn write_gguf_with(
    path: &std::path::Path,
    tok: &Tokenizer,
    w: &Weights,
    dtype: GgmlDType,
    cfg: &LlamaConfig,
    extra: &[(&str, gguf_file::Value)],
) -> Weights {
    let mut all: Vec<(&str, gguf_file::Value)> = vec![(
        "tokenizer.ggml.add_bos_token",
        gguf_file::Value::Bool(false),
    )];
    all.extend(extra.iter().cloned());
    let (meta, qs) = crate::gguf_export::gguf_contents(path, cfg, tok, w, dtype, &all).unwrap();
    let back = crate::gguf_export::dequantized_back(cfg, &qs).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
    back
}

pub fn batch_logits(m: &crate::Llama, rows: &[&[u32]]) -> Vec<Vec<Vec<f32>>> {
    let (h, _) = m.prefill(rows, false).unwrap();
    rows.iter()
        .enumerate()
        .map(|(r, ids)| {
            let sel: Vec<(usize, usize)> = (0..ids.len()).map(|t| (r, t)).collect();
            m.logits_at(&h, &sel).unwrap().to_vec2().unwrap()
        })
        .collect()
}

/// The largest difference between the log-softmax of corresponding logit rows.
pub fn max_logprob_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let mut max = 0f64;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in crate::log_softmax_f64(x)
            .iter()
            .zip(crate::log_softmax_f64(y))
        {
            max = max.max((p - q).abs());
        }
    }
    max
}
