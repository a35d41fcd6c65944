//! Writes a random-weight Llama teacher of a real model's shape as a Hugging Face directory
//! in bf16 (what transformers saves), streaming one tensor at a time so that even the 8B
//! shape needs little memory:
//!
//!     cargo run --release -p kd-model --example random_teacher -- \
//!         tinyllama-1.1b OUT_DIR TOKENIZER_JSON
//!
//! Shapes: smollm2-135m, tinyllama-1.1b, llama-3.2-3b, llama-3.1-8b. The tokenizer (its
//! vocabulary must match the shape: 49152 for SmolLM2's, 32000 for TinyLlama's Llama 2
//! tokenizer, 128256 for Llama 3's) is copied beside the weights; given a `.gguf` file, its
//! tokenizer and chat template are written out as `tokenizer.json` and
//! `tokenizer_config.json`. Weights are N(0, 0.02²), norms 1, as transformers initialises them.

use std::io::Write;
use std::path::PathBuf;

use kd_model::LlamaConfig;
use kd_model::config::Arch;

fn shape(name: &str) -> Option<LlamaConfig> {
    let base = LlamaConfig {
        vocab_size: 32000,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_hidden_layers: 22,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        arch: Arch::Llama,
        head_dim: None,
        sliding_window: None,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(serde_json::json!(2)),
    };
    Some(match name {
        "smollm2-135m" => LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rope_theta: 100000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::json!(2)),
            ..base
        },
        "tinyllama-1.1b" => base,
        "llama-3.2-3b" => LlamaConfig {
            vocab_size: 128256,
            hidden_size: 3072,
            intermediate_size: 8192,
            num_hidden_layers: 28,
            num_attention_heads: 24,
            num_key_value_heads: 8,
            rope_theta: 500000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(128000),
            eos_token_id: Some(serde_json::json!(128001)),
            ..base
        },
        "llama-3.1-8b" => LlamaConfig {
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            rope_theta: 500000.0,
            max_position_embeddings: 8192,
            bos_token_id: Some(128000),
            eos_token_id: Some(serde_json::json!(128001)),
            ..base
        },
        _ => return None,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name, out, tokenizer] = &args[..] else {
        eprintln!("usage: random_teacher SHAPE OUT_DIR TOKENIZER_JSON");
        std::process::exit(2);
    };
    let cfg = shape(name).unwrap_or_else(|| {
        eprintln!(
            "unknown shape {name}: smollm2-135m, tinyllama-1.1b, llama-3.2-3b or llama-3.1-8b"
        );
        std::process::exit(2);
    });
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).unwrap();
    let (d, ff, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kvd = cfg.num_key_value_heads * cfg.head_dim();
    let mut tensors: Vec<(String, Vec<usize>, bool)> =
        vec![("model.embed_tokens.weight".into(), vec![v, d], false)];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![d], true));
        for (n, r, c) in [
            ("self_attn.q_proj", cfg.q_dim(), d),
            ("self_attn.k_proj", kvd, d),
            ("self_attn.v_proj", kvd, d),
            ("self_attn.o_proj", d, cfg.q_dim()),
            ("mlp.gate_proj", ff, d),
            ("mlp.up_proj", ff, d),
            ("mlp.down_proj", d, ff),
        ] {
            tensors.push((format!("{p}.{n}.weight"), vec![r, c], false));
        }
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            true,
        ));
    }
    tensors.push(("model.norm.weight".into(), vec![d], true));
    if !cfg.tie_word_embeddings {
        tensors.push(("lm_head.weight".into(), vec![v, d], false));
    }
    // The safetensors header: every tensor's dtype, shape and byte range, in order.
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (n, dims, _) in &tensors {
        let len = dims.iter().product::<usize>() * 2;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": "BF16", "shape": dims, "data_offsets": [at, at + len]}),
        );
        at += len;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let path = out.join("model.safetensors");
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut rng = kd_model::testing::Rng::new(7);
    for (n, dims, norm) in &tensors {
        let count: usize = dims.iter().product();
        let mut buf = Vec::with_capacity(count * 2);
        for _ in 0..count {
            let x = if *norm { 1.0 } else { 0.02 * rng.normal() };
            buf.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
        eprint!("\r{n}          ");
    }
    f.flush().unwrap();
    let config = cfg.to_hf_json().unwrap();
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    if tokenizer.ends_with(".gguf") {
        write_gguf_tokenizer(tokenizer.as_ref(), &out);
    } else {
        std::fs::copy(tokenizer, out.join("tokenizer.json")).unwrap();
        let cfg_src = PathBuf::from(tokenizer).with_file_name("tokenizer_config.json");
        if cfg_src.exists() {
            std::fs::copy(cfg_src, out.join("tokenizer_config.json")).unwrap();
        }
    }
    eprintln!(
        "\n{}: {} parameters, {at} bytes of bf16 weights",
        out.display(),
        cfg.n_params()
    );
}

/// A GGUF file's tokenizer as `tokenizer.json`, with its chat template and end-of-sequence
/// token in `tokenizer_config.json`.
fn write_gguf_tokenizer(gguf: &std::path::Path, out: &std::path::Path) {
    let content = kd_model::loader::read_gguf_header(gguf).unwrap();
    let tok = kd_tokenizer::Tokenizer::from_gguf(&content).unwrap();
    let json = serde_json::to_string(&tok.to_tokenizer_json()).unwrap();
    std::fs::write(out.join("tokenizer.json"), json).unwrap();
    let mut tc = serde_json::json!({});
    if let Some(t) = tok.chat_template() {
        tc["chat_template"] = t.source().into();
    }
    if let Some(e) = tok.eos_id() {
        tc["eos_token"] = tok.token_text(e).into();
    }
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc).unwrap(),
    )
    .unwrap();
}
