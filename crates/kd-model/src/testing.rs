//! Tiny models that tests build themselves (nothing is downloaded): a seeded random llama with
//! the tiny test tokenizer of `kd_tokenizer`, written as a Hugging Face directory.

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use kd_tokenizer::{TokenKind, Tokenizer};
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

/// llama.cpp's `permute` for q/k rows: [heads, 2, hd/2, cols] -> [heads, hd/2, 2, cols].
pub fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// The inverse of [`permute`].
pub fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, rows / heads / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

pub type Weights = std::collections::HashMap<String, Tensor>;

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
pub fn write_gguf_with(
    path: &std::path::Path,
    tok: &Tokenizer,
    w: &Weights,
    dtype: GgmlDType,
    cfg: &LlamaConfig,
    extra: &[(&str, gguf_file::Value)],
) -> Weights {
    use gguf_file::Value as V;
    let tj = tok.to_tokenizer_json();
    let merges: Vec<V> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => V::String(s.clone()),
            serde_json::Value::Array(p) => V::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            _ => panic!("merge form"),
        })
        .collect();
    let n = tok.vocab_size() as u32;
    let tokens: Vec<V> = (0..n)
        .map(|i| V::String(tok.vocab_string(i).unwrap().to_string()))
        .collect();
    let types: Vec<V> = (0..n)
        .map(|i| {
            V::I32(match tok.token_kind(i).unwrap() {
                TokenKind::Normal => 1,
                TokenKind::Control => 3,
                TokenKind::UserDefined => 4,
            })
        })
        .collect();
    // llama.cpp writes Mistral as llama; only llama's q/k rows are permuted.
    let arch = match cfg.arch {
        crate::config::Arch::Mistral => "llama",
        a => a.name(),
    };
    let interleave = arch == "llama";
    let key = |k: &str| -> String { format!("{arch}.{k}") };
    let keys: Vec<String> = [
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "rope.freq_base",
        "rope.dimension_count",
        "attention.key_length",
        "attention.value_length",
    ]
    .iter()
    .map(|k| key(k))
    .collect();
    let mut meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String(arch.into())),
        (&keys[0], V::U32(cfg.num_hidden_layers as u32)),
        (&keys[1], V::U32(cfg.max_position_embeddings as u32)),
        (&keys[2], V::U32(cfg.hidden_size as u32)),
        (&keys[3], V::U32(cfg.intermediate_size as u32)),
        (&keys[4], V::U32(cfg.num_attention_heads as u32)),
        (&keys[5], V::U32(cfg.num_key_value_heads as u32)),
        (&keys[6], V::F32(cfg.rms_norm_eps as f32)),
        (&keys[7], V::F32(cfg.rope_theta as f32)),
        (&keys[8], V::U32(cfg.head_dim() as u32)),
    ];
    if cfg.head_dim.is_some() {
        meta.push((&keys[9], V::U32(cfg.head_dim() as u32)));
        meta.push((&keys[10], V::U32(cfg.head_dim() as u32)));
    }
    meta.extend(vec![
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        (
            "tokenizer.ggml.pre",
            V::String(tok.pre_tokenizer().to_string()),
        ),
        ("tokenizer.ggml.tokens", V::Array(tokens)),
        ("tokenizer.ggml.token_type", V::Array(types)),
        ("tokenizer.ggml.merges", V::Array(merges)),
        ("tokenizer.ggml.bos_token_id", V::U32(tok.bos_id().unwrap())),
        ("tokenizer.ggml.eos_token_id", V::U32(tok.eos_id().unwrap())),
        ("tokenizer.ggml.add_bos_token", V::Bool(false)),
        (
            "tokenizer.chat_template",
            V::String(tok.chat_template().unwrap().source().to_string()),
        ),
    ]);
    let (scaling_type, scaling_factor) = (key("rope.scaling.type"), key("rope.scaling.factor"));
    if let Some(crate::rope::RopeScaling::Linear { factor }) = &cfg.rope_scaling {
        meta.push((&scaling_type, V::String("linear".into())));
        meta.push((&scaling_factor, V::F32(*factor as f32)));
    }
    for (k, v) in extra {
        meta.retain(|(m, _)| m != k);
        meta.push((k, v.clone()));
    }
    let mut names: Vec<(String, Tensor, bool)> = vec![
        (
            "token_embd.weight".into(),
            w["model.embed_tokens.weight"].clone(),
            true,
        ),
        (
            "output_norm.weight".into(),
            w["model.norm.weight"].clone(),
            false,
        ),
    ];
    for i in 0..cfg.num_hidden_layers {
        let h = |n: &str| w[&format!("model.layers.{i}.{n}.weight")].clone();
        names.push((
            format!("blk.{i}.attn_norm.weight"),
            h("input_layernorm"),
            false,
        ));
        names.push((
            format!("blk.{i}.ffn_norm.weight"),
            h("post_attention_layernorm"),
            false,
        ));
        let perm = |t: Tensor, heads: usize| if interleave { permute(&t, heads) } else { t };
        names.push((
            format!("blk.{i}.attn_q.weight"),
            perm(h("self_attn.q_proj"), cfg.num_attention_heads),
            true,
        ));
        names.push((
            format!("blk.{i}.attn_k.weight"),
            perm(h("self_attn.k_proj"), cfg.num_key_value_heads),
            true,
        ));
        if cfg.arch.qkv_bias() {
            for (g, n) in [
                ("attn_q", "q_proj"),
                ("attn_k", "k_proj"),
                ("attn_v", "v_proj"),
            ] {
                let b = w[&format!("model.layers.{i}.self_attn.{n}.bias")].clone();
                names.push((format!("blk.{i}.{g}.bias"), b, false));
            }
        }
        if cfg.arch.qk_norm() {
            for (g, n) in [("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")] {
                names.push((
                    format!("blk.{i}.{g}.weight"),
                    h(&format!("self_attn.{n}")),
                    false,
                ));
            }
        }
        names.push((
            format!("blk.{i}.attn_v.weight"),
            h("self_attn.v_proj"),
            true,
        ));
        names.push((
            format!("blk.{i}.attn_output.weight"),
            h("self_attn.o_proj"),
            true,
        ));
        names.push((format!("blk.{i}.ffn_gate.weight"), h("mlp.gate_proj"), true));
        names.push((format!("blk.{i}.ffn_up.weight"), h("mlp.up_proj"), true));
        names.push((format!("blk.{i}.ffn_down.weight"), h("mlp.down_proj"), true));
    }
    if let Some(crate::rope::RopeScaling::Freqs { factors }) = &cfg.rope_scaling {
        let t = Tensor::from_vec(factors.clone(), factors.len(), &Device::Cpu).unwrap();
        names.push(("rope_freqs.weight".into(), t, false));
    }
    if !cfg.tie_word_embeddings {
        names.push(("output.weight".into(), w["lm_head.weight"].clone(), true));
    }
    let qs: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|(n, t, mat)| {
            (
                n,
                QTensor::quantize(&t, if mat { dtype } else { GgmlDType::F32 }).unwrap(),
            )
        })
        .collect();
    let mut back = Weights::new();
    let deq = |name: &str| {
        qs.iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    back.insert("model.embed_tokens.weight".into(), deq("token_embd.weight"));
    back.insert("model.norm.weight".into(), deq("output_norm.weight"));
    if !cfg.tie_word_embeddings {
        back.insert("lm_head.weight".into(), deq("output.weight"));
    }
    for i in 0..cfg.num_hidden_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}.weight");
        let g = |n: &str| deq(&format!("blk.{i}.{n}.weight"));
        back.insert(hf("input_layernorm"), g("attn_norm"));
        back.insert(hf("post_attention_layernorm"), g("ffn_norm"));
        let unperm = |t: Tensor, heads: usize| if interleave { unpermute(&t, heads) } else { t };
        back.insert(
            hf("self_attn.q_proj"),
            unperm(g("attn_q"), cfg.num_attention_heads),
        );
        back.insert(
            hf("self_attn.k_proj"),
            unperm(g("attn_k"), cfg.num_key_value_heads),
        );
        if cfg.arch.qkv_bias() {
            for (gn, n) in [
                ("attn_q", "q_proj"),
                ("attn_k", "k_proj"),
                ("attn_v", "v_proj"),
            ] {
                back.insert(
                    format!("model.layers.{i}.self_attn.{n}.bias"),
                    deq(&format!("blk.{i}.{gn}.bias")),
                );
            }
        }
        if cfg.arch.qk_norm() {
            back.insert(hf("self_attn.q_norm"), g("attn_q_norm"));
            back.insert(hf("self_attn.k_norm"), g("attn_k_norm"));
        }
        back.insert(hf("self_attn.v_proj"), g("attn_v"));
        back.insert(hf("self_attn.o_proj"), g("attn_output"));
        back.insert(hf("mlp.gate_proj"), g("ffn_gate"));
        back.insert(hf("mlp.up_proj"), g("ffn_up"));
        back.insert(hf("mlp.down_proj"), g("ffn_down"));
    }
    let mut f = std::fs::File::create(path).unwrap();
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
    back
}

/// Logits `[len, vocab]` at every position of each row, prefilled together as one batch.
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
