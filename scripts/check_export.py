#!/usr/bin/env python3
"""Checks a student exported by `student-fit` (a Hugging Face directory) with standard tools:
config.json describes a LlamaForCausalLM; model.safetensors holds exactly the tensor names
`transformers` expects for that config, with the right shapes, in float32; tokenizer.json loads
with `tokenizers` (when installed). With torch and transformers installed it also loads the
model and runs it; given `--ours FILE` (the JSON of `student-fit logits`), it runs the same
token ids and compares transformers' log-softmax with ours at every position and vocabulary
entry (tolerance 1e-4 nats, both in float32). Exits 1 naming the first problem.

Usage:
  python3 scripts/check_export.py out/student-6l/student
  student-fit logits --student out/student-6l/student --ids 1,9690,198,... > ours.json
  python3 scripts/check_export.py out/student-6l/student --ours ours.json
"""
import json
import sys
from pathlib import Path


def fail(msg):
    print(f"check_export: {msg}", file=sys.stderr)
    sys.exit(1)


TOLERANCE = 1e-4


def main(d: Path, ours: Path = None):
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
        if ours is not None:
            fail("--ours needs torch and transformers installed")
        print(f"check_export: {len(want)} tensors ok (torch/transformers not installed: model not run)")
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model.eval()
    ref = json.loads(ours.read_text()) if ours is not None else {"ids": [1, 2, 3, 4]}
    with torch.no_grad():
        out = model(torch.tensor([ref["ids"]])).logits[0].double()
    if not torch.isfinite(out).all():
        fail("transformers gave non-finite logits")
    if ours is None:
        print(f"check_export: {len(want)} tensors ok; transformers loads it, logits shape {tuple(out.shape)}")
        return
    theirs = torch.log_softmax(out, dim=-1)
    mine = torch.tensor(ref["logprobs"], dtype=torch.float64)
    if mine.shape != theirs.shape:
        fail(f"{ours}: log-probs of shape {tuple(mine.shape)}, transformers gives {tuple(theirs.shape)}")
    diff = (mine - theirs).abs()
    top1 = (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"check_export: {len(ref['ids'])} positions x {v} tokens: max |Δ log-prob| {diff.max().item():.3e}, "
          f"mean {diff.mean().item():.3e}, top-1 agreement {top1:.3f} (tolerance {TOLERANCE})")
    if diff.max().item() > TOLERANCE:
        fail(f"log-probs differ from transformers by {diff.max().item():.3e} > {TOLERANCE}")


if __name__ == "__main__":
    args = sys.argv[1:]
    ours = None
    if len(args) == 3 and args[1] == "--ours":
        ours = Path(args[2])
        args = args[:1]
    if len(args) != 1:
        fail("usage: check_export.py EXPORT_DIR [--ours LOGITS_JSON]")
    main(Path(args[0]), ours)
