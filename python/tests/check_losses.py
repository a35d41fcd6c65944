"""Checks kd_cache.losses against the float64 loss oracle (tests/reference/loss-cases.json):
every divergence, the hard CE and the total of every case within 1e-9, and the identity cases
at 0. Prints the worst error; exits non-zero on a miss.

    python3 python/tests/check_losses.py tests/reference/loss-cases.json
"""
import json
import sys

import torch

from kd_cache.losses import DIVERGENCES, divergence_per_position, hard_ce, kd_loss

cases = json.load(open(sys.argv[1]))
worst, misses = 0.0, []


def check(what, got, want):
    global worst
    err = abs(got - want)
    worst = max(worst, err / max(1.0, abs(want)))
    if not err <= 1e-9 * max(1.0, abs(want)):
        misses.append(f"{what}: {got} against {want}")


for n, c in enumerate(cases["cases"]):
    z = torch.tensor([c["student_logits"]], dtype=torch.float64)
    ids = torch.tensor([c["topk_ids"]], dtype=torch.int64)
    lp = torch.tensor([c["topk_logprobs"]], dtype=torch.float64)
    y = torch.tensor([c["next_token"]])
    e = c["expected"]
    check(f"case {n} hard_ce", hard_ce(z, y).item(), e["hard_ce"])
    for d in DIVERGENCES:
        got = divergence_per_position(z, ids, lp, d, c["temperature"], c["tail_policy"],
                                      c["jsd_beta"], c["skew_lambda"]).item()
        check(f"case {n} {d}", got, e["divergence"][d])
        total, _ = kd_loss(z, ids, lp, y, d, c["temperature"], c["alpha"], c["tail_policy"],
                           c["jsd_beta"], c["skew_lambda"])
        check(f"case {n} total {d}", total.item(), e["total"][d])
for n, c in enumerate(cases["identity_cases"]):
    z = torch.tensor([c["student_logits"]], dtype=torch.float64)
    ids = torch.tensor([c["topk_ids"]], dtype=torch.int64)
    lp = torch.tensor([c["topk_logprobs"]], dtype=torch.float64)
    for d, want in c["expected_all_zero"].items():
        got = divergence_per_position(z, ids, lp, d, c["temperature"], c["tail_policy"]).item()
        check(f"identity case {n} {d}", got, want)
print(json.dumps({"cases": len(cases["cases"]) + len(cases["identity_cases"]), "worst_relative_error": worst, "misses": misses[:10]}))
sys.exit(1 if misses else 0)
