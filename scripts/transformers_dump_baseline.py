#!/usr/bin/env python3
"""The baseline a user would pick instead of teacher-dump: transformers generating greedily
from the same prompts (read from a teacher-dump cache, so the token ids are identical), with
top-k log-prob capture at every generated position, at a given dtype and thread count.
Prints load seconds, generated tokens/s and peak memory as one JSON line.

    python3 scripts/transformers_dump_baseline.py --model DIR --shards DUMP_DIR \\
        --dtype bfloat16 --threads 2 --max-new-tokens 32 --top-k 32

Needs torch, transformers and pyarrow.
"""
import argparse
import glob
import json
import os
import resource
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", required=True, help="a teacher-dump output folder (its prompts are used)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    prompts = []
    for f in sorted(glob.glob(os.path.join(a.shards, "*.parquet"))):
        t = pq.read_table(f, columns=["input_ids", "prompt_len"]).to_pylist()
        prompts += [r["input_ids"][: r["prompt_len"]] for r in t]
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=getattr(torch, a.dtype))
    model.eval()
    load_s = time.time() - t0
    # Left padding, one batch, as teacher-dump's batch of the same rows.
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.time()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=a.max_new_tokens,
            min_new_tokens=a.max_new_tokens,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
        )
        captured = [torch.log_softmax(s.float(), dim=-1).topk(a.top_k, dim=-1) for s in out.scores]
    gen_s = time.time() - t0
    generated = len(prompts) * len(captured)
    print(json.dumps({
        "tool": f"transformers {a.dtype}",
        "load_s": round(load_s, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / gen_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
