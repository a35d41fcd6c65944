"""The reference for a teacher dump: transformers' LlamaForCausalLM in float64 on the same
weights, dequantized independently of the project (safetensors through transformers; GGUF
through llama.cpp's gguf-py, with q/k rows un-permuted as its converter permuted them), scored
on the cache's rows. Prints the largest |Δ| between every stored top-k log-prob and the
reference's log-softmax at that position, and the positions whose stored top-1 is not the
reference's argmax (where the reference's two best are more than 1e-6 apart).

    python3 python/tests/transformers_logprobs.py CONFIG_DIR WEIGHTS CACHE_DIR

CONFIG_DIR holds the model's config.json; WEIGHTS is a Hugging Face directory or a .gguf file.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import kd_cache


def gguf_state_dict(path, cfg):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def unpermute(w, heads):
        rows = w.shape[0]
        return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for t in GGUFReader(path).tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        w = w.reshape([int(x) for x in reversed(t.shape.tolist())])
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            key = "model.norm.weight"
        elif t.name == "output.weight":
            key = "lm_head.weight"
        elif parts[0] == "blk":
            key = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = unpermute(w, cfg.num_attention_heads)
            elif parts[2] == "attn_k":
                w = unpermute(w, cfg.num_key_value_heads)
        else:
            continue
        sd[key] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.float64)
    return sd


def main():
    config_dir, weights, cache_dir = sys.argv[1:4]
    dtype = torch.float32 if "--float32" in sys.argv else torch.float64
    cfg = AutoConfig.from_pretrained(config_dir)
    if weights.endswith(".gguf"):
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
        missing, unexpected = model.load_state_dict(gguf_state_dict(weights, cfg), strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            sys.exit(f"{weights}: missing {missing}, unexpected {unexpected}")
        if cfg.tie_word_embeddings:
            model.tie_weights()
    else:
        model = AutoModelForCausalLM.from_pretrained(weights).to(dtype)
    model.eval()
    worst, flips, positions = 0.0, 0, 0
    for row in kd_cache.Cache(cache_dir).rows():
        ids = torch.tensor(row["input_ids"]).view(1, -1)
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1).numpy()
        pl = row["prompt_len"]
        for j in range(len(row["input_ids"]) - pl):
            ref = lp[pl - 1 + j]
            got_ids, got = row["topk_ids"][j], row["topk_logprobs"][j]
            worst = max(worst, float(np.abs(ref[got_ids] - got).max()))
            best = np.sort(ref)[-2:]
            if got_ids[0] != int(ref.argmax()) and best[1] - best[0] > 1e-6:
                flips += 1
            positions += 1
    print(json.dumps({"max_abs_diff": worst, "top1_flips": flips, "positions": positions}))


if __name__ == "__main__":
    main()
