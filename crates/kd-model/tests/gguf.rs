//! GGUF loading: a tiny model written as GGUF (q/k permuted as llama.cpp's converter does, all
//! the quantizations candle writes) gives the logits of the same model loaded from a Hugging
//! Face directory, and its tokenizer metadata gives the same ids.

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use kd_model::testing::{random_weights, tiny_config, write_hf_dir};
use kd_model::{Precision, load, log_softmax_f64};
use kd_tokenizer::{TokenKind, Tokenizer};

/// llama.cpp's `permute` for q/k rows: [heads, 2, hd/2, cols] -> [heads, hd/2, 2, cols].
fn permute(w: &Tensor, heads: usize) -> Tensor {
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
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
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

type Weights = std::collections::HashMap<String, Tensor>;

/// Writes `w` (Hugging Face layout) as a GGUF of `dtype` and returns the weights it really
/// holds, dequantized back to f32 in Hugging Face layout.
fn write_gguf(path: &std::path::Path, tok: &Tokenizer, w: &Weights, dtype: GgmlDType) -> Weights {
    use gguf_file::Value as V;
    let cfg = tiny_config(tok.vocab_size());
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
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(cfg.num_hidden_layers as u32)),
        (
            "llama.context_length",
            V::U32(cfg.max_position_embeddings as u32),
        ),
        ("llama.embedding_length", V::U32(cfg.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            V::U32(cfg.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            V::U32(cfg.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            V::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            V::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", V::F32(cfg.rope_theta as f32)),
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
    ];
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
        names.push((
            format!("blk.{i}.attn_q.weight"),
            permute(&h("self_attn.q_proj"), cfg.num_attention_heads),
            true,
        ));
        names.push((
            format!("blk.{i}.attn_k.weight"),
            permute(&h("self_attn.k_proj"), cfg.num_key_value_heads),
            true,
        ));
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
    for i in 0..cfg.num_hidden_layers {
        let hf = |n: &str| format!("model.layers.{i}.{n}.weight");
        let g = |n: &str| deq(&format!("blk.{i}.{n}.weight"));
        back.insert(hf("input_layernorm"), g("attn_norm"));
        back.insert(hf("post_attention_layernorm"), g("ffn_norm"));
        back.insert(
            hf("self_attn.q_proj"),
            unpermute(&g("attn_q"), cfg.num_attention_heads),
        );
        back.insert(
            hf("self_attn.k_proj"),
            unpermute(&g("attn_k"), cfg.num_key_value_heads),
        );
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

fn logprobs(m: &kd_model::Llama, ids: &[u32]) -> Vec<Vec<f64>> {
    let (h, _) = m.prefill(&[ids], false).unwrap();
    let sel: Vec<(usize, usize)> = (0..ids.len()).map(|t| (0, t)).collect();
    let l: Vec<Vec<f32>> = m.logits_at(&h, &sel).unwrap().to_vec2().unwrap();
    l.iter().map(|r| log_softmax_f64(r)).collect()
}

#[test]
fn gguf_in_every_supported_type_matches_the_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::tiny_for_tests();
    let cfg = tiny_config(tok.vocab_size());
    let w = random_weights(&cfg, 7).unwrap();
    write_hf_dir(&dir.path().join("hf"), &cfg, &w, &tok).unwrap();
    let hf = load(&dir.path().join("hf"), Precision::Exact, &Device::Cpu).unwrap();
    let text = "<|im_start|>user\nhello there, 42 tokens<|im_end|>\n";
    let ids = hf.tokenizer.encode(text, true);
    // Every type, loaded exactly, must equal an f32 model holding the same dequantized
    // weights in Hugging Face layout (half-split RoPE instead of GGUF's interleaved q/k rows):
    // this checks the loader, the q/k permutation, and the packed kernel used for decoding.
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ] {
        let path = dir.path().join(format!("tiny-{dtype:?}.gguf"));
        let real = write_gguf(&path, &tok, &w, dtype);
        let ref_dir = dir.path().join(format!("hf-{dtype:?}"));
        write_hf_dir(&ref_dir, &cfg, &real, &tok).unwrap();
        let r = load(&ref_dir, Precision::Exact, &Device::Cpu).unwrap();
        let g = load(&path, Precision::Exact, &Device::Cpu).unwrap();
        assert_eq!(
            g.tokenizer.encode(text, true),
            ids,
            "{dtype:?}: tokenizer from GGUF metadata"
        );
        assert_eq!(g.tokenizer.fingerprint(), hf.tokenizer.fingerprint());
        let want = logprobs(&r.model, &ids);
        let got = logprobs(&g.model, &ids);
        let max = max_diff(&got, &want);
        eprintln!("{dtype:?}: full pass, max |Δ log-prob| {max:.2e} nats");
        assert!(max < 1e-4, "{dtype:?}: {max}");
        // Decoding (one row per step: the packed kernel) against the full pass.
        let (_, cache) = g.model.prefill(&[&ids[..ids.len() - 4]], true).unwrap();
        let mut cache = cache.unwrap();
        for t in ids.len() - 4..ids.len() {
            let h = g.model.step(&mut cache, &[ids[t]]).unwrap();
            let l: Vec<Vec<f32>> = g.model.logits(&h).unwrap().to_vec2().unwrap();
            let max = max_diff(&[log_softmax_f64(&l[0])], &want[t..t + 1]);
            assert!(max < 1e-4, "{dtype:?} decode at {t}: {max}");
        }
        if dtype == GgmlDType::F32 {
            assert!(max_diff(&got, &logprobs(&hf.model, &ids)) < 1e-4);
        }
        let q = load(&path, Precision::Quantized, &Device::Cpu).unwrap();
        let approx = max_diff(&logprobs(&q.model, &ids), &want);
        eprintln!("{dtype:?}: --approx-quantized max |Δ log-prob| {approx:.2e} nats");
        assert!(approx.is_finite());
    }
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let mut max = 0f64;
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
        }
    }
    max
}

#[test]
fn decode_steps_equal_the_full_sequence_pass() {
    let dir = tempfile::tempdir().unwrap();
    kd_model::testing::write_tiny_teacher(dir.path(), 3).unwrap();
    let m = load(dir.path(), Precision::Exact, &Device::Cpu).unwrap();
    let a: Vec<u32> = (10..30).collect();
    let b: Vec<u32> = (40..52).collect();
    // Prefill both prompts minus their last 4 tokens, then feed those tokens one by one.
    let (_, cache) = m.model.prefill(&[&a[..16], &b[..8]], true).unwrap();
    let mut cache = cache.unwrap();
    let full_a = logprobs(&m.model, &a);
    let full_b = logprobs(&m.model, &b);
    for s in 0..4 {
        let h = m.model.step(&mut cache, &[a[16 + s], b[8 + s]]).unwrap();
        let l: Vec<Vec<f32>> = m.model.logits(&h).unwrap().to_vec2().unwrap();
        for (row, full, t) in [(0, &full_a, 16 + s), (1, &full_b, 8 + s)] {
            let lp = log_softmax_f64(&l[row]);
            let max = lp
                .iter()
                .zip(&full[t])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(max < 1e-4, "row {row} step {s}: {max}");
        }
    }
}
