#!/usr/bin/env python3
"""Writes crates/kd-model/tests/data/rope_reference.json: RoPE inverse frequencies and
attention factors as `transformers` computes them, for every RoPE form and scaling type the
loader implements, each with the config.json it came from.

Needs torch and transformers (run by hand; the JSON is committed and the tests read it):

    pip install torch transformers
    python3 scripts/rope_reference.py

With `--check-export DIR` it instead loads every `DIR/*/config.json` (left by the test
`export_config_reads_back_identically` under target/tmp/rope-export/: the config.json a student
export writes) with the installed `transformers` and compares its frequencies with ours
(`expected.json` beside each); run it under transformers 4.x and 5.x.

Configs in the 5.x form are written by `save_pretrained` of the installed version; configs
in the 4.x form (top-level `rope_theta`, `rope_scaling`) are written by hand as 4.x wrote them
and loaded with `from_pretrained`, as a user's downloaded file is.
"""
import json
import os
import sys
import tempfile

import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

BASE = dict(
    vocab_size=64,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

# (name, form, max_position_embeddings, rope settings)
CASES = [
    ("default-5x", "5x", 8192, {"rope_type": "default", "rope_theta": 500000.0}),
    ("default-4x", "4x", 8192, {"rope_theta": 500000.0, "rope_scaling": None}),
    ("default-4x-no-theta", "4x", 2048, {}),
    ("linear-4x-type", "4x", 8192, {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    ("linear-5x", "5x", 8192, {"rope_type": "linear", "factor": 2.5, "rope_theta": 100000.0}),
    ("dynamic-4x", "4x", 4096, {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    (
        "llama3-4x",
        "4x",
        131072,
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
        },
    ),
    (
        "llama3-5x",
        "5x",
        131072,
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    (
        "yarn-4x",
        "4x",
        131072,
        {
            "rope_theta": 1000000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        },
    ),
    (
        "yarn-5x-mscale",
        "5x",
        163840,
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
    ),
    (
        "yarn-5x-untruncated",
        "5x",
        65536,
        {
            "rope_type": "yarn",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
    ),
    (
        "yarn-5x-attention-factor",
        "5x",
        32768,
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 16384,
            "attention_factor": 1.25,
        },
    ),
]


def config_json(form, max_pos, rope, d):
    """The config.json text a user would have for this case."""
    if form == "5x":
        cfg = LlamaConfig(**BASE, max_position_embeddings=max_pos, rope_parameters=dict(rope))
        cfg.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)
    raw = dict(BASE, max_position_embeddings=max_pos, model_type="llama",
               architectures=["LlamaForCausalLM"], hidden_act="silu",
               transformers_version="4.46.0", **rope)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    return raw


def check_export(root):
    bad = 0
    for d in sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p))):
        cfg = LlamaConfig.from_pretrained(os.path.join(root, d))
        emb = LlamaRotaryEmbedding(config=cfg)
        inv = emb.inv_freq.to(torch.float64)
        with open(os.path.join(root, d, "expected.json")) as f:
            want = json.load(f)
        rel = ((inv - torch.tensor(want["inv_freq"], dtype=torch.float64)).abs() / inv.abs()).max().item()
        attn = float(emb.attention_scaling)
        ok = rel < 1e-6 and abs(attn - want["attention_factor"]) < 1e-6
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {d}: max rel err {rel:.1e}, attention factor {attn} (ours {want['attention_factor']})")
    print(f"transformers {transformers.__version__}: {bad} failed")
    sys.exit(1 if bad else 0)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--check-export":
        return check_export(sys.argv[2])
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(__file__), "..", "crates", "kd-model", "tests", "data", "rope_reference.json")
    cases = []
    for name, form, max_pos, rope in CASES:
        with tempfile.TemporaryDirectory() as d:
            cfg_json = config_json(form, max_pos, rope, d)
            cfg = LlamaConfig.from_pretrained(d)
            emb = LlamaRotaryEmbedding(config=cfg)
            inv = emb.inv_freq.to(torch.float64).tolist()
            cases.append(dict(name=name, config=cfg_json, inv_freq=inv,
                              attention_factor=float(emb.attention_scaling)))
    doc = dict(
        generated_by="scripts/rope_reference.py",
        transformers=transformers.__version__,
        torch=torch.__version__,
        cases=cases,
    )
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
