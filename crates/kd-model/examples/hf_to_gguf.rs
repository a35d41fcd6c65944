//! Converts a Hugging Face llama directory into a GGUF file as llama.cpp's converter and
//! quantizer would (metadata and tokenizer from `kd_model::gguf_export`, q/k rows permuted),
//! one tensor at a time:
//!
//!     cargo run --release -p kd-model --example hf_to_gguf -- HF_DIR OUT.gguf q8_0|q4_k_m
//!
//! `q4_k_m` follows llama.cpp's Q4_K_M mix: Q6_K for the output head and for `attn_v` and
//! `ffn_down` in the first and last eighth of the layers and every third layer between,
//! Q4_K for every other matrix. `q8_0` makes every matrix Q8_0. Norms stay F32. The
//! tokenizer must be byte-level BPE (Llama 3, Qwen).

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use kd_model::loader::read_hf_config;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, out, kind] = &args[..] else {
        eprintln!("usage: hf_to_gguf HF_DIR OUT.gguf q8_0|q4_k_m");
        std::process::exit(2);
    };
    let dir = std::path::Path::new(dir);
    let cfg = read_hf_config(dir).unwrap();
    let tok = kd_tokenizer::Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap();
    let file_type = match kind.as_str() {
        "q8_0" => GgmlDType::Q8_0,
        "q4_k_m" => GgmlDType::Q4K,
        _ => panic!("type {kind}: q8_0 or q4_k_m"),
    };
    let (mut meta, _) =
        kd_model::gguf_export::gguf_metadata(dir, &cfg, &tok, file_type, &[]).unwrap();
    if kind == "q4_k_m" {
        // llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M.
        meta.retain(|(k, _)| k != "general.file_type");
        meta.push(("general.file_type".into(), gguf_file::Value::U32(15)));
    }
    let paths = kd_model::loader::safetensors_files(dir).unwrap();
    let maps: Vec<memmap2::Mmap> = paths
        .iter()
        // SAFETY: read-only maps of files nothing else writes while this runs.
        .map(|p| unsafe { memmap2::Mmap::map(&std::fs::File::open(p).unwrap()) }.unwrap())
        .collect();
    let sts: Vec<safetensors::SafeTensors> = maps
        .iter()
        .map(|m| safetensors::SafeTensors::deserialize(m).unwrap())
        .collect();
    let get = |name: &str| -> Tensor {
        for st in &sts {
            if let Ok(v) = st.tensor(name) {
                let dt = match v.dtype() {
                    safetensors::Dtype::BF16 => DType::BF16,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::F32 => DType::F32,
                    d => panic!("{name}: dtype {d:?}"),
                };
                return Tensor::from_raw_buffer(v.data(), dt, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
            }
        }
        panic!("missing tensor {name}")
    };
    let n = cfg.num_hidden_layers;
    let more_bits = |i: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
    let matrix_type = |gguf_name: &str, layer: Option<usize>| -> GgmlDType {
        if kind == "q8_0" {
            return GgmlDType::Q8_0;
        }
        match (gguf_name, layer) {
            ("output.weight", _) => GgmlDType::Q6K,
            (n, Some(i))
                if (n.ends_with("attn_v.weight") || n.ends_with("ffn_down.weight"))
                    && more_bits(i) =>
            {
                GgmlDType::Q6K
            }
            _ => GgmlDType::Q4K,
        }
    };
    let mut qs: Vec<(String, QTensor)> = Vec::new();
    let mut push = |name: String, t: Tensor, dt: GgmlDType| {
        eprint!("\r{name} {dt:?}          ");
        qs.push((name, QTensor::quantize(&t, dt).unwrap()));
    };
    let heads = (cfg.num_attention_heads, cfg.num_key_value_heads);
    push(
        "token_embd.weight".into(),
        get("model.embed_tokens.weight"),
        matrix_type("token_embd.weight", None),
    );
    push(
        "output_norm.weight".into(),
        get("model.norm.weight"),
        GgmlDType::F32,
    );
    if !cfg.tie_word_embeddings {
        push(
            "output.weight".into(),
            get("lm_head.weight"),
            matrix_type("output.weight", None),
        );
    }
    for i in 0..n {
        let h = |s: &str| get(&format!("model.layers.{i}.{s}.weight"));
        push(
            format!("blk.{i}.attn_norm.weight"),
            h("input_layernorm"),
            GgmlDType::F32,
        );
        push(
            format!("blk.{i}.ffn_norm.weight"),
            h("post_attention_layernorm"),
            GgmlDType::F32,
        );
        for (g, src, perm) in [
            ("attn_q", "self_attn.q_proj", Some(heads.0)),
            ("attn_k", "self_attn.k_proj", Some(heads.1)),
            ("attn_v", "self_attn.v_proj", None),
            ("attn_output", "self_attn.o_proj", None),
            ("ffn_gate", "mlp.gate_proj", None),
            ("ffn_up", "mlp.up_proj", None),
            ("ffn_down", "mlp.down_proj", None),
        ] {
            let t = h(src);
            let t = match perm {
                Some(heads) => kd_model::testing::permute(&t, heads),
                None => t,
            };
            let name = format!("blk.{i}.{g}.weight");
            let dt = matrix_type(&name, Some(i));
            push(name, t, dt);
        }
    }
    let meta_refs: Vec<(&str, &gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
    eprintln!("\nwrote {out}");
}
