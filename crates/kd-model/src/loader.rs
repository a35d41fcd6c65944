//! Loading a llama-family model from a GGUF file or a Hugging Face directory.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, gguf_file};
use candle_core::{Device, Tensor};
use kd_tokenizer::Tokenizer;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{Arch, LlamaConfig};
use crate::cpu::{CpuLayer, CpuLlama};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernels::PanelMatrix;
use crate::llama::{Layer, Linear, Llama};
use crate::weights::{RawTensor, WeightFiles};

/// How the teacher computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 arithmetic on dequantized weights: the teacher's real distribution (default).
    Exact,
    /// candle's quantized kernels on the GGUF blocks. Faster, but activations are quantized to
    /// 8 bits inside each dot product, which moves log-probs (measured error: docs/performance.md).
    Quantized,
}

/// What identifies a loaded model: recorded in manifests so a cache names its teacher.
#[derive(Clone, Debug, Serialize)]
pub struct ModelIdentity {
    pub architecture: String,
    pub format: String,
    pub path: String,
    pub weights_sha256: String,
    pub file_type: Option<String>,
    pub n_params: usize,
    pub config: LlamaConfig,
    pub precision: Precision,
    /// What the products are computed in (`f32` exact).
    pub dtype: Dtype,
}

pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub identity: ModelIdentity,
}

/// Which implementation computes an exact model on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The kernels of [`crate::cpu`] where the CPU has AVX-512 or AVX2 with FMA, otherwise
    /// candle.
    Auto,
    /// candle's tensor operations (f32 GEMM on dequantized weights).
    Candle,
}

/// Loads a model from a `.gguf` file or a directory with `config.json`, `*.safetensors` and
/// `tokenizer.json`.
pub fn load(path: &Path, precision: Precision, device: &Device) -> Result<LoadedModel> {
    load_with(path, precision, device, Kernels::Auto)
}

/// [`load`] with a choice of implementation (both compute the same function; tests and the
/// benchmark compare them).
pub fn load_with(
    path: &Path,
    precision: Precision,
    device: &Device,
    kernels: Kernels,
) -> Result<LoadedModel> {
    let opts = LoadOptions {
        precision,
        kernels,
        ..LoadOptions::default()
    };
    load_opts(path, &opts, device)
}

/// How [`load_opts`] builds a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub precision: Precision,
    /// The dtype of weights, activations and products. Anything but f32 runs candle's path
    /// (on the CPU too, where it is slow and serves to measure a GPU dtype's error).
    pub dtype: Dtype,
    pub kernels: Kernels,
    /// On the CPU kernels with AMX tiles, BF16 matrices are read in place from the weight
    /// files' maps instead of being packed into panels: no copy of them is made, the load is
    /// the hashing of the files, and the products give the same bits. Decoding then streams
    /// the weights from the page cache, as the files' pages happen to lie in memory, which
    /// is slower than from packed panels on huge pages (see docs/performance.md).
    pub weights_in_place: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            precision: Precision::Exact,
            dtype: Dtype::F32,
            kernels: Kernels::Auto,
            weights_in_place: false,
        }
    }
}

/// [`load`] with every option.
pub fn load_opts(path: &Path, opts: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    if path.is_dir() {
        load_hf_dir(path, opts, device)
    } else if path.exists() {
        load_gguf(path, opts, device)
    } else {
        Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        })
    }
}

/// Streaming sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads only the GGUF header (metadata and tensor index), after [`crate::gguf_check::check`]
/// has bounded every count in it.
pub fn read_gguf_header(path: &Path) -> Result<gguf_file::Content> {
    crate::gguf_check::check(path)?;
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_file::Content::read(&mut f).map_err(|source| Error::Gguf {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

fn meta<'a>(c: &'a gguf_file::Content, path: &Path, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata.get(key).ok_or_else(|| Error::MissingField {
        path: path.to_path_buf(),
        field: key.to_string(),
    })
}

fn meta_usize(c: &gguf_file::Content, path: &Path, key: &str) -> Result<usize> {
    let v = meta(c, path, key)?;
    v.to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .map(|x| x as usize)
        .map_err(|e| Error::BadField {
            path: path.to_path_buf(),
            field: key.to_string(),
            what: e.to_string(),
        })
}

fn meta_f64(c: &gguf_file::Content, path: &Path, key: &str) -> Result<f64> {
    let v = meta(c, path, key)?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|e| Error::BadField {
            path: path.to_path_buf(),
            field: key.to_string(),
            what: e.to_string(),
        })
}

/// The llama hyperparameters stored in a GGUF header (`reader` reads the file's
/// `rope_freqs.weight` tensor when it has one).
pub fn gguf_config<R: std::io::Read + std::io::Seek>(
    c: &gguf_file::Content,
    reader: &mut R,
    path: &Path,
) -> Result<LlamaConfig> {
    let arch = meta(c, path, "general.architecture")?
        .to_string()
        .map_err(|e| Error::BadField {
            path: path.to_path_buf(),
            field: "general.architecture".into(),
            what: e.to_string(),
        })?
        .clone();
    // llama.cpp writes Mistral models as `llama`.
    let family = match Arch::from_name(&arch) {
        Some(a @ (Arch::Llama | Arch::Qwen2 | Arch::Qwen3)) => a,
        _ => {
            return Err(Error::Architecture {
                path: path.to_path_buf(),
                arch,
            });
        }
    };
    let p = format!("{arch}.");
    let p = p.as_str();
    let refuse = |field: String, what: &str| Error::BadField {
        path: path.to_path_buf(),
        field,
        what: what.into(),
    };
    if c.metadata
        .contains_key(&format!("{p}attention.sliding_window"))
    {
        return Err(refuse(
            format!("{p}attention.sliding_window"),
            "a sliding window is not implemented for GGUF files",
        ));
    }
    let key_length = meta_usize(c, path, &format!("{p}attention.key_length")).ok();
    let value_length = meta_usize(c, path, &format!("{p}attention.value_length")).ok();
    if value_length.is_some() && value_length != key_length {
        return Err(refuse(
            format!("{p}attention.value_length"),
            "values of another width than keys are not implemented",
        ));
    }
    let vocab_size = match meta_usize(c, path, &format!("{p}vocab_size")) {
        Ok(v) => v,
        Err(_) => meta(c, path, "tokenizer.ggml.tokens")?
            .to_vec()
            .map(|v| v.len())
            .unwrap_or(0),
    };
    let hidden = meta_usize(c, path, &format!("{p}embedding_length"))?;
    let heads = meta_usize(c, path, &format!("{p}attention.head_count"))?;
    let cfg = LlamaConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, path, &format!("{p}feed_forward_length"))?,
        num_hidden_layers: meta_usize(c, path, &format!("{p}block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: meta_usize(c, path, &format!("{p}attention.head_count_kv"))
            .unwrap_or(heads),
        rms_norm_eps: meta_f64(c, path, &format!("{p}attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: 10000.0,
        rope_scaling: None,
        arch: family,
        head_dim: key_length.filter(|&h| heads == 0 || h * heads != hidden),
        sliding_window: None,
        max_position_embeddings: meta_usize(c, path, &format!("{p}context_length")).unwrap_or(2048),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        bos_token_id: meta_usize(c, path, "tokenizer.ggml.bos_token_id")
            .ok()
            .map(|x| x as u32),
        eos_token_id: meta_usize(c, path, "tokenizer.ggml.eos_token_id")
            .ok()
            .map(|x| serde_json::json!(x)),
    };
    cfg.validate().map_err(|what| Error::BadField {
        path: path.to_path_buf(),
        field: format!("{p}*"),
        what,
    })?;
    let mut cfg = cfg;
    let freqs = if c.tensor_infos.contains_key("rope_freqs.weight") {
        let t = c
            .tensor(reader, "rope_freqs.weight", &Device::Cpu)
            .and_then(|t| t.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|source| Error::Gguf {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        Some(t)
    } else {
        None
    };
    let keys: Vec<&str> = c.metadata.keys().map(String::as_str).collect();
    let number = |k: &str| {
        c.metadata.get(k).map(|v| {
            v.to_f64()
                .or_else(|_| v.to_f32().map(f64::from))
                .or_else(|_| v.to_u32().map(f64::from))
                .or_else(|_| v.to_u64().map(|x| x as f64))
                .or_else(|_| v.to_i32().map(f64::from))
                .map_err(|_| format!("expected a number, found {:?}", v.value_type()))
        })
    };
    let string = |k: &str| c.metadata.get(k).and_then(|v| v.to_string().ok().cloned());
    let (theta, scaling) =
        crate::rope::parse_gguf(&arch, &keys, &number, &string, cfg.head_dim(), freqs).map_err(
            |r| Error::BadField {
                path: path.to_path_buf(),
                field: r.key,
                what: r.what,
            },
        )?;
    cfg.rope_theta = theta;
    cfg.rope_scaling = scaling;
    Ok(cfg)
}

fn load_gguf(path: &Path, opts: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    // candle trusts the header's counts; refuse a header the file cannot hold first.
    crate::gguf_check::check(path)?;
    let mut f = std::fs::File::open(path).map_err(io)?;
    let content = gguf_file::Content::read(&mut f).map_err(|source| Error::Gguf {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let cfg = gguf_config(&content, &mut f, path)?;
    let tokenizer = Tokenizer::from_gguf(&content).map_err(|source| Error::Tokenizer {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let files = WeightFiles::open(&[path.to_path_buf()])?;
    let file = files.bytes(0);
    let get = |name: &str, expected: &[usize]| -> Result<RawTensor<'_>> {
        let Some(info) = content.tensor_infos.get(name) else {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                name: name.to_string(),
            });
        };
        let found = info.shape.dims().to_vec();
        if found != expected {
            return Err(Error::TensorShape {
                path: path.to_path_buf(),
                name: name.to_string(),
                found,
                expected: expected.to_vec(),
            });
        }
        let dt = info.ggml_dtype;
        let len = info.shape.elem_count() / dt.block_size() * dt.type_size();
        let start = content.tensor_data_offset as usize + info.offset as usize;
        let bytes = file.get(start..start + len).ok_or_else(|| Error::BadGguf {
            path: path.to_path_buf(),
            what: format!("tensor {name} ({len} bytes at {start}) lies past the end of the file"),
        })?;
        Ok(RawTensor {
            name: name.to_string(),
            dtype: dt,
            dims: found,
            bytes,
        })
    };
    let d = cfg.hidden_size;
    let hd = cfg.head_dim();
    let qd = cfg.q_dim();
    let kvd = cfg.num_key_value_heads * hd;
    let ff = cfg.intermediate_size;
    let v = cfg.vocab_size;
    let embed = get("token_embd.weight", &[v, d])?;
    // Not `with_capacity(num_hidden_layers)`: the count comes from the file, and a missing
    // layer's tensors end the loop with an error long before a huge count would.
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let qkv_bias = if cfg.arch.qkv_bias() {
            let b = |s: &str, len: usize| get(&format!("blk.{i}.{s}.bias"), &[len]);
            Some([b("attn_q", qd)?, b("attn_k", kvd)?, b("attn_v", kvd)?])
        } else {
            None
        };
        let qk_norm = if cfg.arch.qk_norm() {
            Some((
                get(&n("attn_q_norm"), &[hd])?,
                get(&n("attn_k_norm"), &[hd])?,
            ))
        } else {
            None
        };
        layers.push(RawLayer {
            qkv_bias,
            qk_norm,
            attn_norm: get(&n("attn_norm"), &[d])?,
            q: get(&n("attn_q"), &[qd, d])?,
            k: get(&n("attn_k"), &[kvd, d])?,
            v: get(&n("attn_v"), &[kvd, d])?,
            o: get(&n("attn_output"), &[d, qd])?,
            ffn_norm: get(&n("ffn_norm"), &[d])?,
            gate: get(&n("ffn_gate"), &[ff, d])?,
            up: get(&n("ffn_up"), &[ff, d])?,
            down: get(&n("ffn_down"), &[d, ff])?,
        });
    }
    let norm = get("output_norm.weight", &[d])?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(get("output.weight", &[v, d])?)
    };
    let raw = RawModel {
        cfg: cfg.clone(),
        embed,
        layers,
        norm,
        lm_head,
        // llama.cpp permutes q/k rows into interleaved pairs for llama only; Qwen files keep
        // the half-split layout (its NEOX RoPE).
        rope_interleaved: cfg.arch == Arch::Llama,
    };
    let file_type = content
        .metadata
        .get("general.file_type")
        .and_then(|v| v.to_u32().ok())
        .map(file_type_name);
    let (model, hashes) = raw.build_hashing(&files, opts, device)?;
    let identity = ModelIdentity {
        architecture: cfg.arch.name().into(),
        format: "gguf".into(),
        path: path.display().to_string(),
        weights_sha256: hashes[0].clone(),
        file_type,
        n_params: cfg.n_params(),
        config: cfg.clone(),
        precision: opts.precision,
        dtype: opts.dtype,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        identity,
    })
}

fn file_type_name(t: u32) -> String {
    match t {
        0 => "F32".into(),
        1 => "F16".into(),
        2 => "Q4_0".into(),
        3 => "Q4_1".into(),
        7 => "Q8_0".into(),
        8 => "Q5_0".into(),
        9 => "Q5_1".into(),
        other => format!("type-{other}"),
    }
}

/// The safetensors files of a Hugging Face directory, sorted by name.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// The model's hyperparameters, from a `.gguf` file's header or a Hugging Face directory's
/// `config.json`, without reading any weights.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    if path.is_dir() {
        return read_hf_config(path);
    }
    let header = read_gguf_header(path)?;
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_config(&header, &mut f, path)
}

/// Reads `config.json` of a Hugging Face directory.
pub fn read_hf_config(dir: &Path) -> Result<LlamaConfig> {
    Ok(read_hf_config_json(dir)?.0)
}

/// [`read_hf_config`], with the file's JSON (for keys of its own beside the model's).
pub fn read_hf_config_json(dir: &Path) -> Result<(LlamaConfig, serde_json::Value)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    Ok((parse_hf_config(&v, &path)?, v))
}

/// Keys of a llama `config.json` that change the function and have one implemented value
/// (`None`: any value but `false`/`null` is refused).
const LLAMA_FIXED: &[(&str, Option<&str>)] = &[
    ("hidden_act", Some("silu")),
    ("attention_bias", None),
    ("mlp_bias", None),
];

/// A `config.json` value as a [`LlamaConfig`] (`path` names the file in errors): `model_type`
/// `llama`, `mistral`, `qwen2` or `qwen3`. Every key their `transformers` classes read is
/// either implemented or refused by name: RoPE in both its 4.x and 5.x forms
/// ([`crate::rope::parse_hf`]), `hidden_act` (silu), `attention_bias` and `mlp_bias` (false;
/// Qwen2's q/k/v biases are part of the family), an explicit `head_dim`, a sliding window (a
/// limit on sequence length, within which it changes nothing), and quantized weights
/// (`quantization_config`, refused).
pub fn parse_hf_config(v: &serde_json::Value, path: &Path) -> Result<LlamaConfig> {
    let bad = |field: &str, what: String| Error::BadField {
        path: path.to_path_buf(),
        field: field.to_string(),
        what,
    };
    let obj = v
        .as_object()
        .ok_or_else(|| bad("config", "expected a JSON object".into()))?;
    let arch = match obj.get("model_type") {
        None | Some(serde_json::Value::Null) => Arch::Llama,
        Some(v) => v
            .as_str()
            .and_then(Arch::from_name)
            .ok_or_else(|| Error::Architecture {
                path: path.to_path_buf(),
                arch: v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            })?,
    };
    for &(key, want) in LLAMA_FIXED {
        let ok = match (obj.get(key), want) {
            (None | Some(serde_json::Value::Null), _) => true,
            (Some(v), Some(w)) => v.as_str() == Some(w),
            (Some(v), None) => v == &serde_json::Value::Bool(false),
        };
        if !ok {
            let what = match want {
                Some(w) => format!("{} is not implemented (only {w:?})", obj[key]),
                None => format!("{} is not implemented (only false)", obj[key]),
            };
            return Err(bad(key, what));
        }
    }
    if obj.get("quantization_config").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "quantization_config",
            "quantized safetensors are not implemented (use full-precision weights or a GGUF file)"
                .into(),
        ));
    }
    let mut rest = obj.clone();
    for k in [
        "model_type",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "head_dim",
        "sliding_window",
    ] {
        rest.remove(k);
    }
    let mut cfg: LlamaConfig =
        serde_json::from_value(serde_json::Value::Object(rest)).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    cfg.arch = arch;
    let size = |key: &str| -> Result<Option<usize>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0 && n <= 1 << 40)
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad(key, format!("expected a positive integer, found {v}"))),
        }
    };
    // Kept only when it differs from what it implies.
    cfg.head_dim = size("head_dim")?.filter(|&h| {
        cfg.num_attention_heads == 0
            || h.checked_mul(cfg.num_attention_heads) != Some(cfg.hidden_size)
    });
    // Mistral's window applies to every layer; Qwen's only with `use_sliding_window` (then to
    // the layers from `max_window_layers` on, which `layer_types` spells out in 5.x). Llama
    // has none. Within the window every layer attends to all earlier tokens.
    let window = size("sliding_window")?;
    let sliding_layers = obj
        .get("layer_types")
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().any(|t| t.as_str() == Some("sliding_attention")));
    cfg.sliding_window = match arch {
        Arch::Llama => None,
        Arch::Mistral => window,
        Arch::Qwen2 | Arch::Qwen3 => {
            let on = obj.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true);
            if on || sliding_layers { window } else { None }
        }
    }
    .filter(|&w| w < cfg.max_position_embeddings);
    cfg.validate().map_err(|what| bad("config", what))?;
    let (theta, scaling) =
        crate::rope::parse_hf(obj, cfg.max_position_embeddings).map_err(|r| bad(&r.key, r.what))?;
    cfg.rope_theta = theta;
    cfg.rope_scaling = scaling;
    Ok(cfg)
}

/// Loads every tensor of a Hugging Face directory as f32.
pub fn load_hf_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_hf_tensors_where(dir, device, |_| true)
}

/// Loads the tensors of a Hugging Face directory whose names `wanted` accepts, as f32; the
/// others are never read (the files are mapped, and only the wanted tensors' bytes touched).
pub fn load_hf_tensors_where(
    dir: &Path,
    device: &Device,
    wanted: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let paths = safetensors_files(dir)?;
    if paths.is_empty() {
        return Err(Error::NotAModel {
            path: dir.to_path_buf(),
        });
    }
    let files = WeightFiles::open(&paths)?;
    let mut all = HashMap::new();
    for (name, t) in safetensors_index(&files)? {
        if wanted(&name) {
            all.insert(name, t.dense(device)?);
            files.release(t.bytes);
        }
    }
    Ok(all)
}

fn load_hf_dir(dir: &Path, opts: &LoadOptions, device: &Device) -> Result<LoadedModel> {
    let cfg = read_hf_config(dir)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_tokenizer_json(&tok_path).map_err(|source| Error::Tokenizer {
            path: tok_path.clone(),
            source: Box::new(source),
        })?;
    let paths = safetensors_files(dir)?;
    if paths.is_empty() {
        return Err(Error::NotAModel {
            path: dir.to_path_buf(),
        });
    }
    let files = WeightFiles::open(&paths)?;
    let index = safetensors_index(&files)?;
    let take = |name: &str, expected: &[usize]| -> Result<RawTensor<'_>> {
        let t = index.get(name).ok_or_else(|| Error::MissingTensor {
            path: dir.to_path_buf(),
            name: name.to_string(),
        })?;
        if t.dims != expected {
            return Err(Error::TensorShape {
                path: dir.to_path_buf(),
                name: name.to_string(),
                found: t.dims.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(t.clone())
    };
    let d = cfg.hidden_size;
    let hd = cfg.head_dim();
    let qd = cfg.q_dim();
    let kvd = cfg.num_key_value_heads * hd;
    let ff = cfg.intermediate_size;
    let v = cfg.vocab_size;
    let embed = take("model.embed_tokens.weight", &[v, d])?;
    // Not `with_capacity(num_hidden_layers)`: the count comes from the file, and a missing
    // layer's tensors end the loop with an error long before a huge count would.
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let qkv_bias = if cfg.arch.qkv_bias() {
            let b = |n: &str, len: usize| take(&format!("{p}.self_attn.{n}.bias"), &[len]);
            Some([b("q_proj", qd)?, b("k_proj", kvd)?, b("v_proj", kvd)?])
        } else {
            None
        };
        let qk_norm = if cfg.arch.qk_norm() {
            let n = |n: &str| take(&format!("{p}.self_attn.{n}.weight"), &[hd]);
            Some((n("q_norm")?, n("k_norm")?))
        } else {
            None
        };
        let t = |n: &str, shape: &[usize]| take(&format!("{p}.{n}.weight"), shape);
        layers.push(RawLayer {
            qkv_bias,
            qk_norm,
            attn_norm: t("input_layernorm", &[d])?,
            q: t("self_attn.q_proj", &[qd, d])?,
            k: t("self_attn.k_proj", &[kvd, d])?,
            v: t("self_attn.v_proj", &[kvd, d])?,
            o: t("self_attn.o_proj", &[d, qd])?,
            ffn_norm: t("post_attention_layernorm", &[d])?,
            gate: t("mlp.gate_proj", &[ff, d])?,
            up: t("mlp.up_proj", &[ff, d])?,
            down: t("mlp.down_proj", &[d, ff])?,
        });
    }
    let norm = take("model.norm.weight", &[d])?;
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(take("lm_head.weight", &[v, d])?)
    };
    let raw = RawModel {
        cfg: cfg.clone(),
        embed,
        layers,
        norm,
        lm_head,
        rope_interleaved: false,
    };
    let (model, hashes) = raw.build_hashing(&files, opts, device)?;
    // The directory's hash: sha256 over the files' hex hashes, in name order.
    let mut h = Sha256::new();
    for f in &hashes {
        h.update(f.as_bytes());
    }
    let identity = ModelIdentity {
        architecture: cfg.arch.name().into(),
        format: "safetensors".into(),
        path: dir.display().to_string(),
        weights_sha256: hex(&h.finalize()),
        file_type: None,
        n_params: cfg.n_params(),
        config: cfg.clone(),
        precision: opts.precision,
        dtype: opts.dtype,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        identity,
    })
}

/// Every tensor of mapped safetensors files, by name, in the files' own dtype.
fn safetensors_index(files: &WeightFiles) -> Result<HashMap<String, RawTensor<'_>>> {
    let mut all = HashMap::new();
    for i in 0..files.len() {
        let path = files.path(i);
        let bad = |what: String| Error::Safetensors {
            path: path.to_path_buf(),
            source: Box::new(candle_core::Error::Msg(what)),
        };
        let st = safetensors::SafeTensors::deserialize(files.bytes(i))
            .map_err(|e| bad(e.to_string()))?;
        for (name, view) in st.tensors() {
            let dtype = crate::weights::ggml_type_of(view.dtype()).ok_or_else(|| {
                bad(format!(
                    "tensor {name}: dtype {:?} is not F32, F16 or BF16",
                    view.dtype()
                ))
            })?;
            all.insert(
                name.clone(),
                RawTensor {
                    name,
                    dtype,
                    dims: view.shape().to_vec(),
                    bytes: view.data(),
                },
            );
        }
    }
    Ok(all)
}

impl RawTensor<'_> {
    fn candle_linear(
        &self,
        files: &WeightFiles,
        precision: Precision,
        dtype: Dtype,
        device: &Device,
    ) -> Result<Linear> {
        let linear = || -> candle_core::Result<Linear> {
            Ok(
                // candle's CPU dot products need an even number of blocks per row (they panic
                // otherwise), so narrower matrices stay dense.
                if precision == Precision::Quantized
                    && !matches!(
                        self.dtype,
                        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                    )
                    && self.dims.last().is_some_and(|c| c % 64 == 0)
                {
                    Linear::Quant(QMatMul::from_qtensor(self.qtensor(device)?)?)
                } else {
                    Linear::Dense(self.typed(dtype.candle(), device)?)
                },
            )
        };
        linear().map_err(|e| named(files, self, e))
    }
}

/// Matrices with the same number of columns stacked along the rows, in panel layout, packed
/// from the files' bytes (their pages are released once packed) or, with `in_place`, read in
/// place where the kernels can.
fn panels(files: &WeightFiles, parts: &[&RawTensor<'_>], in_place: bool) -> Result<PanelMatrix> {
    let raw: Vec<_> = parts.iter().map(|t| files.matrix(t, in_place)).collect();
    let p = PanelMatrix::stack_raw(&raw).map_err(|e| named(files, parts[0], e))?;
    for (t, m) in parts.iter().zip(&raw) {
        if !m.reads_in_place() {
            files.release(t.bytes);
        }
    }
    Ok(p)
}

/// A tensor's candle error, naming its file and the tensor.
fn named(files: &WeightFiles, t: &RawTensor<'_>, e: candle_core::Error) -> Error {
    Error::BadField {
        path: files.path_of(t.bytes).to_path_buf(),
        field: t.name.clone(),
        what: e.to_string(),
    }
}

struct RawLayer<'a> {
    /// q, k and v biases (Qwen2).
    qkv_bias: Option<[RawTensor<'a>; 3]>,
    /// Per-head q and k RMSNorm weights (Qwen3).
    qk_norm: Option<(RawTensor<'a>, RawTensor<'a>)>,
    attn_norm: RawTensor<'a>,
    q: RawTensor<'a>,
    k: RawTensor<'a>,
    v: RawTensor<'a>,
    o: RawTensor<'a>,
    ffn_norm: RawTensor<'a>,
    gate: RawTensor<'a>,
    up: RawTensor<'a>,
    down: RawTensor<'a>,
}

struct RawModel<'a> {
    cfg: LlamaConfig,
    embed: RawTensor<'a>,
    layers: Vec<RawLayer<'a>>,
    norm: RawTensor<'a>,
    /// `None` when tied to the embeddings.
    lm_head: Option<RawTensor<'a>>,
    rope_interleaved: bool,
}

impl<'a> RawModel<'a> {
    /// Every weight matrix (the products' and the embeddings).
    fn matrices(&self) -> impl Iterator<Item = &RawTensor<'a>> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
            .chain(self.lm_head.as_ref())
            .chain(std::iter::once(&self.embed))
    }
}

/// Whether a model loaded with `opts` onto `device` runs on the CPU kernels.
fn on_cpu_kernels(opts: &LoadOptions, device: &Device) -> bool {
    opts.kernels == Kernels::Auto
        && opts.precision == Precision::Exact
        && opts.dtype == Dtype::F32
        && device.is_cpu()
        && crate::kernels::supported()
}

impl RawModel<'_> {
    /// [`RawModel::build`], with each weight file's sha256 computed on another thread over
    /// the same maps meanwhile. Where the kernels read the weights in place, hashing keeps
    /// their pages in memory for them.
    fn build_hashing(
        self,
        files: &WeightFiles,
        opts: &LoadOptions,
        device: &Device,
    ) -> Result<(Llama, Vec<String>)> {
        let in_place = on_cpu_kernels(opts, device)
            && self
                .matrices()
                .any(|t| files.matrix(t, opts.weights_in_place).reads_in_place());
        std::thread::scope(|s| {
            let hashing = s.spawn(|| files.sha256_each(in_place));
            let model = self.build(files, opts, device);
            let hashes = hashing.join().expect("hashing thread");
            Ok((model?, hashes))
        })
    }

    fn build(self, files: &WeightFiles, opts: &LoadOptions, device: &Device) -> Result<Llama> {
        let LoadOptions {
            precision, dtype, ..
        } = *opts;
        if on_cpu_kernels(opts, device) {
            return self.build_cpu(files, opts.weights_in_place);
        }
        // Norms, biases and the embeddings are held in the products' dtype too, as
        // transformers holds a bf16 model; the logits come back in f32.
        let dense = |t: &RawTensor| -> Result<Tensor> {
            t.typed(dtype.candle(), device)
                .map_err(|e| named(files, t, e))
        };
        let embed = dense(&self.embed)?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    qkv_bias: match &l.qkv_bias {
                        Some(b) => Some(Tensor::cat(
                            &[dense(&b[0])?, dense(&b[1])?, dense(&b[2])?],
                            0,
                        )?),
                        None => None,
                    },
                    qk_norm: match &l.qk_norm {
                        Some((q, k)) => Some((dense(q)?, dense(k)?)),
                        None => None,
                    },
                    attn_norm: dense(&l.attn_norm)?,
                    q: l.q.candle_linear(files, precision, dtype, device)?,
                    k: l.k.candle_linear(files, precision, dtype, device)?,
                    v: l.v.candle_linear(files, precision, dtype, device)?,
                    o: l.o.candle_linear(files, precision, dtype, device)?,
                    ffn_norm: dense(&l.ffn_norm)?,
                    gate: l.gate.candle_linear(files, precision, dtype, device)?,
                    up: l.up.candle_linear(files, precision, dtype, device)?,
                    down: l.down.candle_linear(files, precision, dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .candle_linear(files, precision, dtype, device)?;
        Llama::new(
            self.cfg,
            embed,
            layers,
            dense(&self.norm)?,
            lm_head,
            self.rope_interleaved,
            device,
        )
    }

    fn build_cpu(self, files: &WeightFiles, in_place: bool) -> Result<Llama> {
        let panels = |parts: &[&RawTensor<'_>]| panels(files, parts, in_place);
        let vec =
            |t: &RawTensor| -> Result<Vec<f32>> { t.f32_values().map_err(|e| named(files, t, e)) };
        let mut layers = Vec::new();
        for l in &self.layers {
            layers.push(CpuLayer {
                qkv_bias: match &l.qkv_bias {
                    Some(b) => Some([vec(&b[0])?, vec(&b[1])?, vec(&b[2])?].concat()),
                    None => None,
                },
                qk_norm: match &l.qk_norm {
                    Some((q, k)) => Some((vec(q)?, vec(k)?)),
                    None => None,
                },
                attn_norm: vec(&l.attn_norm)?,
                qkv: panels(&[&l.q, &l.k, &l.v])?,
                o: panels(&[&l.o])?,
                ffn_norm: vec(&l.ffn_norm)?,
                gate_up: panels(&[&l.gate, &l.up])?,
                down: panels(&[&l.down])?,
            });
        }
        // Tied embeddings are looked up in the output head's panels: one copy.
        let lm_head = panels(&[self.lm_head.as_ref().unwrap_or(&self.embed)])?;
        let embed = match &self.lm_head {
            Some(_) => Some(panels(&[&self.embed])?),
            None => None,
        };
        let model = CpuLlama::new(
            self.cfg,
            embed,
            layers,
            vec(&self.norm)?,
            lm_head,
            self.rope_interleaved,
        );
        Ok(Llama::new_cpu(model))
    }
}
