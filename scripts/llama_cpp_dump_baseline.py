#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) on the same GGUF and prompts as a teacher-dump run: greedy
generation of a fixed number of tokens per prompt, with or without top-k log-probs at every
generated position (`logits_all`, then a top-k over each row, as teacher-dump captures).
Prints load seconds, generated tokens/s and peak memory as one JSON line.

    python3 scripts/llama_cpp_dump_baseline.py --model FILE.gguf --shards DUMP_DIR \\
        --threads 2 --max-new-tokens 32 [--top-k 32]

llama.cpp decodes one sequence at a time here (llama-cpp-python has no batched
generation); its products quantize activations to 8 bits, so its log-probs are not the
exact teacher's. Needs llama-cpp-python, numpy and pyarrow.
"""
import argparse
import glob
import json
import os
import resource
import time

import numpy as np
import pyarrow.parquet as pq
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=0, help="0: no log-probs")
    a = ap.parse_args()
    prompts = []
    for f in sorted(glob.glob(os.path.join(a.shards, "*.parquet"))):
        t = pq.read_table(f, columns=["input_ids", "prompt_len"]).to_pylist()
        prompts += [r["input_ids"][: r["prompt_len"]] for r in t]
    t0 = time.time()
    llm = Llama(a.model, n_ctx=1024, n_threads=a.threads, n_batch=512,
                logits_all=a.top_k > 0, verbose=False)
    load_s = time.time() - t0
    t0 = time.time()
    generated = 0
    for p in prompts:
        llm.reset()
        llm.eval(p)
        for _ in range(a.max_new_tokens):
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            if a.top_k:
                m = row.max()
                lp = row - (m + np.log(np.exp(row - m).sum()))
                np.argpartition(-lp, a.top_k)[: a.top_k]
            tok = int(row.argmax())
            llm.eval([tok])
            generated += 1
    gen_s = time.time() - t0
    print(json.dumps({
        "tool": "llama.cpp" + (f" top-{a.top_k}" if a.top_k else ""),
        "load_s": round(load_s, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / gen_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
