#!/usr/bin/env python3
"""Quantization error of a format-2 cache against a format-1 cache of the same dump.

Decodes the v2 log-probs with the one-line formula of schemas/shard-v2.json, nothing else,
and compares them with the exact f32 values of v1, position by position (the two dumps must
hold the same rows: same teacher, prompts and settings, e.g. `teacher-dump --shard-format 1`
and the default). Prints the max and mean absolute error in nats. Needs pyarrow.

    python3 scripts/quantization_error.py out/quickstart-v1 out/quickstart
"""
import json
import sys
from itertools import accumulate

import pyarrow.parquet as pq


def table(d):
    files = [s["file"] for s in json.load(open(f"{d}/manifest.json"))["shards"]]
    return [pq.read_table(f"{d}/{f}") for f in files]


def main():
    v1, v2 = sys.argv[1], sys.argv[2]
    n, total, worst, worst_tok = 0, 0.0, 0.0, 0.0
    for t1, t2 in zip(table(v1), table(v2)):
        md = {k.decode(): v.decode() for k, v in t2.schema.metadata.items()}
        k, s = int(md["kd.top_k"]), int(md["kd.logprob_scale"])
        assert t1.column("id").to_pylist() == t2.column("id").to_pylist(), "different rows"
        assert t1.column("topk_ids").to_pylist() == t2.column("topk_ids").to_pylist(), "different ids"
        for exact, gaps, texact, q in zip(
            t1.column("topk_logprobs").to_pylist(),
            t2.column("topk_logprob_gaps").to_pylist(),
            t1.column("token_logprob").to_pylist(),
            t2.column("token_logprob_q").to_pylist(),
        ):
            dec = [-c / s for j in range(0, len(gaps), k) for c in accumulate(gaps[j:j + k])]
            for a, b in zip(dec, exact):
                e = abs(a - b)
                worst = max(worst, e)
                total += e
                n += 1
            for a, b in zip(q, texact):
                worst_tok = max(worst_tok, abs(-a / s - b))
    print(json.dumps({
        "entries": n,
        "max_abs_error_nats": worst,
        "mean_abs_error_nats": total / max(n, 1),
        "token_logprob_max_abs_error_nats": worst_tok,
        "bound_nats": 1 / 1024,
    }))


if __name__ == "__main__":
    main()
