#!/usr/bin/env python3
"""Quantization error of a format-2 cache against a format-1 cache of the same dump.

Decodes the v2 log-probs with the formula of schemas/shard-v2.json, nothing else, and
compares them and each position's tail mass with the exact f32 values of v1, position by position (the two dumps must
hold the same rows: same teacher, prompts and settings, e.g. `teacher-dump --shard-format 1`
and the default). Prints the max and mean absolute error in nats. Needs pyarrow.

    python3 scripts/quantization_error.py out/quickstart-v1 out/quickstart
"""
import json
import math
import sys
from itertools import accumulate

import pyarrow.parquet as pq


def table(d):
    files = [s["file"] for s in json.load(open(f"{d}/manifest.json"))["shards"]]
    return [pq.read_table(f"{d}/{f}") for f in files]


def main():
    v1, v2 = sys.argv[1], sys.argv[2]
    n, total, worst, worst_tok, worst_tail_rel = 0, 0.0, 0.0, 0.0, 0.0
    for t1, t2 in zip(table(v1), table(v2)):
        md = {k.decode(): v.decode() for k, v in t2.schema.metadata.items()}
        k, s, tscale = int(md["kd.top_k"]), int(md["kd.logprob_scale"]), int(md["kd.tail_scale"])
        assert t1.column("id").to_pylist() == t2.column("id").to_pylist(), "different rows"
        assert t1.column("topk_ids").to_pylist() == t2.column("topk_ids").to_pylist(), "different ids"
        for exact, gaps, tails, texact, q in zip(
            t1.column("topk_logprobs").to_pylist(),
            t2.column("topk_logprob_gaps").to_pylist(),
            t2.column("tail_logmass_q").to_pylist(),
            t1.column("token_logprob").to_pylist(),
            t2.column("token_logprob_q").to_pylist(),
        ):
            for p, (j, tq) in enumerate(zip(range(0, len(gaps), k), tails)):
                lp = [-c / s for c in accumulate(gaps[j:j + k])]
                tail = 0.0 if tq == 4294967295 else math.exp(-tq / tscale)
                shift = math.log((1 - tail) / sum(math.exp(x) for x in lp))
                dec = [x + shift for x in lp]
                ex = exact[j:j + k]
                for a, b in zip(dec, ex):
                    e = abs(a - b)
                    worst = max(worst, e)
                    total += e
                    n += 1
                if p < len(q):
                    worst_tok = max(worst_tok, abs(-q[p] / s + shift - texact[p]))
                ex_tail = 1 - sum(math.exp(x) for x in ex)
                if ex_tail > 1e-9:
                    worst_tail_rel = max(worst_tail_rel, abs(tail - ex_tail) / ex_tail)
    print(json.dumps({
        "entries": n,
        "max_abs_error_nats": worst,
        "mean_abs_error_nats": total / max(n, 1),
        "token_logprob_max_abs_error_nats": worst_tok,
        "tail_mass_max_relative_error": worst_tail_rel,
        "bound_nats": 1 / 1024,
    }))


if __name__ == "__main__":
    main()
