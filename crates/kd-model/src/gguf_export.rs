//! Writing a model as GGUF, laid out as llama.cpp's converter writes one, so that llama.cpp,
//! Ollama, LM Studio and this project's own loader read it: `general.architecture` and the
//! `<arch>.*` hyperparameters, the tokenizer as `tokenizer.ggml.*` (byte-level BPE, the
//! `gpt2` model, with its pre-tokenizer preset, merges, special ids and chat template), and
//! the tensors under GGUF names (`token_embd`, `blk.N.attn_q`, …) with llama's q/k rows
//! permuted into llama.cpp's interleaved RoPE order. Matrices take the requested type (F32,
//! F16, Q8_0, Q4_0, …), except that below 8 bits the embedding and output matrices stay
//! Q8_0; norms, biases and RoPE factors stay F32, as llama.cpp keeps them.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use kd_tokenizer::{TokenKind, Tokenizer};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::rope::RopeScaling;

/// Tensors by their Hugging Face name.
pub type Weights = HashMap<String, Tensor>;

/// llama.cpp's `permute` for q/k rows: [heads, 2, hd/2, cols] -> [heads, hd/2, 2, cols]; its
/// inverse is [`crate::trainable::unpermute_qk`].
pub fn permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The metadata half of [`gguf_contents`]: architecture, shape, tokenizer, chat template and
/// RoPE keys (with `extra` added, replacing keys of the same name), and the per-frequency RoPE
/// divisors that go into the tensor `rope_freqs.weight` when the scaling needs them.
#[allow(clippy::type_complexity)]
pub fn gguf_metadata(
    path: &Path,
    cfg: &LlamaConfig,
    tok: &Tokenizer,
    dtype: GgmlDType,
    extra: &[(&str, gguf_file::Value)],
) -> Result<(Vec<(String, gguf_file::Value)>, Option<Vec<f32>>)> {
    // llama.cpp writes Mistral as llama; only llama's q/k rows are permuted.
    let arch = match cfg.arch {
        crate::config::Arch::Mistral => "llama",
        a => a.name(),
    };
    let mut meta = shape_metadata(arch, cfg, dtype);
    meta.extend(tokenizer_metadata(path, tok)?);
    let rope_factors = rope_metadata(path, arch, cfg, &mut meta)?;
    for (k, v) in extra {
        meta.retain(|(m, _)| m != k);
        meta.push((k.to_string(), v.clone()));
    }
    Ok((meta, rope_factors))
}

/// An error naming the exported file and the field it cannot write.
fn refuse(path: &Path, field: &str, what: String) -> Error {
    Error::BadField {
        path: path.to_path_buf(),
        field: field.to_string(),
        what,
    }
}

/// The architecture and shape keys (`<arch>.block_count`, …).
fn shape_metadata(
    arch: &str,
    cfg: &LlamaConfig,
    dtype: GgmlDType,
) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value as V;
    let key = |k: &str| -> String { format!("{arch}.{k}") };
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        ("general.file_type".into(), V::U32(file_type(dtype))),
        (key("block_count"), V::U32(cfg.num_hidden_layers as u32)),
        // GGUF's llama has no sliding window: a model with one is exported with its
        // context cut to the window, where the window changes nothing (this project's
        // loader bounds such a model's sequences the same way).
        (
            key("context_length"),
            V::U32(
                cfg.max_position_embeddings
                    .min(cfg.sliding_window.unwrap_or(usize::MAX)) as u32,
            ),
        ),
        (key("embedding_length"), V::U32(cfg.hidden_size as u32)),
        (
            key("feed_forward_length"),
            V::U32(cfg.intermediate_size as u32),
        ),
        (
            key("attention.head_count"),
            V::U32(cfg.num_attention_heads as u32),
        ),
        (
            key("attention.head_count_kv"),
            V::U32(cfg.num_key_value_heads as u32),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            V::F32(cfg.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), V::F32(cfg.rope_theta as f32)),
        (key("rope.dimension_count"), V::U32(cfg.head_dim() as u32)),
        (key("vocab_size"), V::U32(cfg.vocab_size as u32)),
    ];
    if cfg.head_dim.is_some() {
        meta.push((key("attention.key_length"), V::U32(cfg.head_dim() as u32)));
        meta.push((key("attention.value_length"), V::U32(cfg.head_dim() as u32)));
    }
    meta
}

/// The tokenizer keys (`tokenizer.ggml.*`, the chat template). Only byte-level BPE
/// tokenizers have a GGUF form here.
fn tokenizer_metadata(path: &Path, tok: &Tokenizer) -> Result<Vec<(String, gguf_file::Value)>> {
    use gguf_file::Value as V;
    if !tok.is_byte_level() {
        return Err(refuse(
            path,
            "tokenizer",
            "GGUF export writes byte-level BPE tokenizers (the `gpt2` model); this one is SentencePiece-style".into(),
        ));
    }
    let tj = tok.to_tokenizer_json();
    let merges: Vec<V> = tj["model"]["merges"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(V::String(s.clone())),
            serde_json::Value::Array(p) => Ok(V::String(format!(
                "{} {}",
                p.first().and_then(|x| x.as_str()).unwrap_or_default(),
                p.get(1).and_then(|x| x.as_str()).unwrap_or_default()
            ))),
            other => Err(refuse(
                path,
                "tokenizer.merges",
                format!("unexpected merge {other}"),
            )),
        })
        .collect::<Result<_>>()?;
    let n = tok.vocab_size() as u32;
    let tokens: Vec<V> = (0..n)
        .map(|i| V::String(tok.vocab_string(i).unwrap_or_default().to_string()))
        .collect();
    let types: Vec<V> = (0..n)
        .map(|i| {
            V::I32(match tok.token_kind(i) {
                Some(TokenKind::Control) => 3,
                Some(TokenKind::UserDefined) => 4,
                _ => 1,
            })
        })
        .collect();
    let mut meta: Vec<(String, V)> = vec![
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            V::String(tok.pre_tokenizer().to_string()),
        ),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
        (
            "tokenizer.ggml.add_bos_token".into(),
            V::Bool(tok.add_bos_token()),
        ),
    ];
    for (k, id) in [
        ("tokenizer.ggml.bos_token_id", tok.bos_id()),
        ("tokenizer.ggml.eos_token_id", tok.eos_id()),
        ("tokenizer.ggml.padding_token_id", tok.pad_id()),
    ] {
        if let Some(id) = id {
            meta.push((k.into(), V::U32(id)));
        }
    }
    if let Some(t) = tok.chat_template() {
        meta.push((
            "tokenizer.chat_template".into(),
            V::String(t.source().to_string()),
        ));
    }
    Ok(meta)
}

/// The RoPE scaling keys, pushed onto `meta`; returns the per-frequency divisors of the
/// `rope_freqs.weight` tensor when the scaling is written that way (Llama 3.1's is, as
/// llama.cpp's converter writes it).
fn rope_metadata(
    path: &Path,
    arch: &str,
    cfg: &LlamaConfig,
    meta: &mut Vec<(String, gguf_file::Value)>,
) -> Result<Option<Vec<f32>>> {
    use gguf_file::Value as V;
    let key = |k: &str| -> String { format!("{arch}.{k}") };
    Ok(match &cfg.rope_scaling {
        None => None,
        Some(RopeScaling::Linear { factor }) => {
            meta.push((key("rope.scaling.type"), V::String("linear".into())));
            meta.push((key("rope.scaling.factor"), V::F32(*factor as f32)));
            None
        }
        Some(RopeScaling::Freqs { factors }) => Some(factors.clone()),
        Some(s @ RopeScaling::Llama3 { .. }) => {
            let (plain, _) = crate::rope::frequencies(cfg.rope_theta, cfg.head_dim(), None);
            let (scaled, _) = crate::rope::frequencies(cfg.rope_theta, cfg.head_dim(), Some(s));
            Some(
                plain
                    .iter()
                    .zip(&scaled)
                    .map(|(p, s)| (p / s) as f32)
                    .collect(),
            )
        }
        Some(other) => {
            return Err(refuse(
                path,
                "rope_scaling",
                format!("{other:?} has no GGUF form this exporter writes"),
            ));
        }
    })
}

/// The GGUF metadata and tensors of a model: `cfg`, tokenizer `tok`, weights `w` (Hugging
/// Face names and layout, any float dtype), matrices as `dtype`. `extra` metadata is added
/// last, replacing keys of the same name. `path` only names the file in errors.
///
/// Refused, naming the reason: a tokenizer that is not byte-level BPE (GGUF's `llama`
/// SentencePiece model needs scores this project does not keep), RoPE scalings llama.cpp
/// reads differently (YaRN, dynamic NTK), a matrix whose rows do not divide into `dtype`'s
/// blocks, a missing tensor.
pub fn gguf_contents(
    path: &Path,
    cfg: &LlamaConfig,
    tok: &Tokenizer,
    w: &Weights,
    dtype: GgmlDType,
    extra: &[(&str, gguf_file::Value)],
) -> Result<(Vec<(String, gguf_file::Value)>, Vec<(String, QTensor)>)> {
    let refuse = |field: &str, what: String| Error::BadField {
        path: path.to_path_buf(),
        field: field.to_string(),
        what,
    };
    let (meta, rope_factors) = gguf_metadata(path, cfg, tok, dtype, extra)?;
    // llama.cpp writes Mistral as llama; only llama's q/k rows are permuted.
    let interleave = matches!(
        cfg.arch,
        crate::config::Arch::Llama | crate::config::Arch::Mistral
    );
    let get = |name: &str| -> Result<Tensor> {
        w.get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            })
            .and_then(|t| Ok(t.to_dtype(candle_core::DType::F32)?))
    };
    let mut names: Vec<(String, Tensor, bool)> = vec![
        (
            "token_embd.weight".into(),
            get("model.embed_tokens.weight")?,
            true,
        ),
        (
            "output_norm.weight".into(),
            get("model.norm.weight")?,
            false,
        ),
    ];
    for i in 0..cfg.num_hidden_layers {
        let h = |n: &str| get(&format!("model.layers.{i}.{n}.weight"));
        let perm = |t: Tensor, heads: usize| -> Result<Tensor> {
            if interleave {
                permute(&t, heads)
            } else {
                Ok(t)
            }
        };
        names.push((
            format!("blk.{i}.attn_norm.weight"),
            h("input_layernorm")?,
            false,
        ));
        names.push((
            format!("blk.{i}.ffn_norm.weight"),
            h("post_attention_layernorm")?,
            false,
        ));
        names.push((
            format!("blk.{i}.attn_q.weight"),
            perm(h("self_attn.q_proj")?, cfg.num_attention_heads)?,
            true,
        ));
        names.push((
            format!("blk.{i}.attn_k.weight"),
            perm(h("self_attn.k_proj")?, cfg.num_key_value_heads)?,
            true,
        ));
        if cfg.arch.qkv_bias() {
            for (g, n) in [
                ("attn_q", "q_proj"),
                ("attn_k", "k_proj"),
                ("attn_v", "v_proj"),
            ] {
                let b = get(&format!("model.layers.{i}.self_attn.{n}.bias"))?;
                names.push((format!("blk.{i}.{g}.bias"), b, false));
            }
        }
        if cfg.arch.qk_norm() {
            for (g, n) in [("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")] {
                names.push((
                    format!("blk.{i}.{g}.weight"),
                    h(&format!("self_attn.{n}"))?,
                    false,
                ));
            }
        }
        names.push((
            format!("blk.{i}.attn_v.weight"),
            h("self_attn.v_proj")?,
            true,
        ));
        names.push((
            format!("blk.{i}.attn_output.weight"),
            h("self_attn.o_proj")?,
            true,
        ));
        names.push((
            format!("blk.{i}.ffn_gate.weight"),
            h("mlp.gate_proj")?,
            true,
        ));
        names.push((format!("blk.{i}.ffn_up.weight"), h("mlp.up_proj")?, true));
        names.push((
            format!("blk.{i}.ffn_down.weight"),
            h("mlp.down_proj")?,
            true,
        ));
    }
    if let Some(f) = rope_factors {
        let len = f.len();
        names.push((
            "rope_freqs.weight".into(),
            Tensor::from_vec(f, len, &Device::Cpu)?,
            false,
        ));
    }
    if !cfg.tie_word_embeddings {
        names.push(("output.weight".into(), get("lm_head.weight")?, true));
    }
    // Below 8 bits the embedding, which is also the output head when tied, stays Q8_0, as
    // llama.cpp keeps its output matrix at a higher precision than the rest.
    let low_bits = !matches!(
        dtype,
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_0
    );
    let mut qs = Vec::with_capacity(names.len());
    for (n, t, mat) in names {
        let head = n == "token_embd.weight" || n == "output.weight";
        let ty = match (mat, head && low_bits) {
            (false, _) => GgmlDType::F32,
            (true, true) => GgmlDType::Q8_0,
            (true, false) => dtype,
        };
        let block = ty.block_size();
        let cols = t.dims().last().copied().unwrap_or(0);
        if cols % block != 0 {
            return Err(refuse(
                &n,
                format!("rows of {cols} values do not divide into {ty:?} blocks of {block}"),
            ));
        }
        qs.push((n, QTensor::quantize(&t, ty)?));
    }
    Ok((meta, qs))
}

/// llama.cpp's `general.file_type` for a file whose matrices are `dtype`.
fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 12,
        GgmlDType::Q4K => 15,
        GgmlDType::Q5K => 17,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        _ => 0,
    }
}

/// Writes the model as the GGUF file `path` ([`gguf_contents`]), atomically: a temporary
/// file beside it, fsynced, then renamed over `path`. Returns the file's size in bytes.
pub fn write_gguf(
    path: &Path,
    cfg: &LlamaConfig,
    tok: &Tokenizer,
    w: &Weights,
    dtype: GgmlDType,
) -> Result<u64> {
    let (meta, qs) = gguf_contents(path, cfg, tok, w, dtype, &[])?;
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let tmp = path.with_file_name(format!(
        "{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model.gguf"),
        std::process::id()
    ));
    let result = (|| -> Result<u64> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let meta_refs: Vec<(&str, &gguf_file::Value)> =
            meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
        gguf_file::write(&mut f, &meta_refs, &t_refs)?;
        f.flush().map_err(io)?;
        let f = f.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        let bytes = f.metadata().map_err(io)?.len();
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Weights as a GGUF of `dtype` really holds them: each tensor of [`gguf_contents`]
/// dequantized back to f32, in Hugging Face names and layout.
pub fn dequantized_back(cfg: &LlamaConfig, qs: &[(String, QTensor)]) -> Result<Weights> {
    let arch_interleaves = matches!(
        cfg.arch,
        crate::config::Arch::Llama | crate::config::Arch::Mistral
    );
    let deq = |name: &str| -> Result<Tensor> {
        let q = qs
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::MissingTensor {
                path: "<gguf>".into(),
                name: name.to_string(),
            })?;
        Ok(q.1.dequantize(&Device::Cpu)?)
    };
    let mut back = Weights::new();
    back.insert(
        "model.embed_tokens.weight".into(),
        deq("token_embd.weight")?,
    );
    back.insert("model.norm.weight".into(), deq("output_norm.weight")?);
    if !cfg.tie_word_embeddings {
        back.insert("lm_head.weight".into(), deq("output.weight")?);
    }
    for i in 0..cfg.num_hidden_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}.weight");
        let g = |n: &str| deq(&format!("blk.{i}.{n}.weight"));
        let unperm = |t: Tensor, heads: usize| -> Result<Tensor> {
            if arch_interleaves {
                crate::trainable::unpermute_qk(&t, heads)
            } else {
                Ok(t)
            }
        };
        back.insert(hf("input_layernorm"), g("attn_norm")?);
        back.insert(hf("post_attention_layernorm"), g("ffn_norm")?);
        back.insert(
            hf("self_attn.q_proj"),
            unperm(g("attn_q")?, cfg.num_attention_heads)?,
        );
        back.insert(
            hf("self_attn.k_proj"),
            unperm(g("attn_k")?, cfg.num_key_value_heads)?,
        );
        if cfg.arch.qkv_bias() {
            for (gn, n) in [
                ("attn_q", "q_proj"),
                ("attn_k", "k_proj"),
                ("attn_v", "v_proj"),
            ] {
                back.insert(
                    format!("model.layers.{i}.self_attn.{n}.bias"),
                    deq(&format!("blk.{i}.{gn}.bias"))?,
                );
            }
        }
        if cfg.arch.qk_norm() {
            back.insert(hf("self_attn.q_norm"), g("attn_q_norm")?);
            back.insert(hf("self_attn.k_norm"), g("attn_k_norm")?);
        }
        back.insert(hf("self_attn.v_proj"), g("attn_v")?);
        back.insert(hf("self_attn.o_proj"), g("attn_output")?);
        back.insert(hf("mlp.gate_proj"), g("ffn_gate")?);
        back.insert(hf("mlp.up_proj"), g("ffn_up")?);
        back.insert(hf("mlp.down_proj"), g("ffn_down")?);
    }
    Ok(back)
}
