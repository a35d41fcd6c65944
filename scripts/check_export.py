#!/usr/bin/env python3
"""Checks a student exported by `student-fit` (a Hugging Face directory) with standard tools:
config.json describes a LlamaForCausalLM; model.safetensors holds exactly the tensor names
`transformers` expects for that config, with the right shapes, in float32; tokenizer.json loads
with `tokenizers` (when installed). With torch and transformers installed it also loads the
model and runs it. Exits 1 naming the first problem.

Usage: python3 scripts/check_export.py out/student-6l/student
"""
import json
import sys
from pathlib import Path


def fail(msg):
    print(f"check_export: {msg}", file=sys.stderr)
    sys.exit(1)


def main(d: Path):
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("architectures") != ["LlamaForCausalLM"] or cfg.get("model_type") != "llama":
        fail(f"{d}/config.json: not a LlamaForCausalLM config")
    h, ff, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    want = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        want["lm_head.weight"] = (v, h)
    for i in range(n):
        p = f"model.layers.{i}."
        want.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        if names != set(want):
            fail(f"{d}/model.safetensors: missing {sorted(set(want) - names)[:5]}, unexpected {sorted(names - set(want))[:5]}")
        for k, shape in want.items():
            t = f.get_tensor(k)
            if tuple(t.shape) != shape or str(t.dtype) != "float32":
                fail(f"{d}/model.safetensors: {k} is {t.dtype}{tuple(t.shape)}, expected float32{shape}")
    try:
        import tokenizers
        tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        if tok.get_vocab_size(with_added_tokens=True) != v:
            fail(f"{d}/tokenizer.json: {tok.get_vocab_size(with_added_tokens=True)} tokens, config says {v}")
    except ImportError:
        print("check_export: tokenizers not installed; tokenizer.json not loaded")
    try:
        import torch
        import transformers
    except ImportError:
        print(f"check_export: {len(want)} tensors ok (torch/transformers not installed: model not run)")
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32)
    out = model(torch.tensor([[1, 2, 3, 4]])).logits
    if not torch.isfinite(out).all():
        fail("transformers gave non-finite logits")
    print(f"check_export: {len(want)} tensors ok; transformers loads it, logits shape {tuple(out.shape)}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: check_export.py EXPORT_DIR")
    main(Path(sys.argv[1]))
