#!/usr/bin/env python3
"""The float64 oracle of the losses in docs/design.md ("Loss definitions"): recomputes every
expected value of loss-cases.json from the case's inputs with numpy, independently of the
Rust code.

    python3 tests/reference/loss_cases.py            # check: every value within 1e-12
    python3 tests/reference/loss_cases.py --write    # rewrite the expected values in place

Run by hand (needs numpy) when a definition changes; crates/kd-loss/tests/loss.rs reads the
JSON. The inputs (teacher top-k, student logits, τ, tail policy, β, λ, α) were drawn once at
random; this script keeps them and recomputes only `expected` and `expected_all_zero`.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(HERE, "loss-cases.json")


def log_softmax(x):
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def logsumexp(x):
    m = np.max(x)
    return m + np.log(np.sum(np.exp(x - m)))


def kl(p, q):
    """Σ p (log p − log q) with 0·log 0 = 0."""
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def supports(case):
    """Teacher P and student Q on the compared support (docs/design.md, tail policies)."""
    v = case["vocab_size"]
    ids = np.array(case["topk_ids"], dtype=np.int64)
    l = np.array(case["topk_logprobs"], dtype=np.float64)
    z = np.array(case["student_logits"], dtype=np.float64)
    tau = case["temperature"]
    k = len(ids)
    if case["tail_policy"] == "renorm":
        p = np.exp(log_softmax(l / tau))
        q = np.exp(log_softmax(z[ids] / tau))
        return p, q
    logq = log_softmax(z / tau)
    r = 1.0 - np.sum(np.exp(l))
    rest = np.setdiff1d(np.arange(v), ids)
    logits = list(l / tau)
    if k < v and r > 0:
        logits.append(np.log(v - k) + np.log(r / (v - k)) / tau)
        logp = log_softmax(np.array(logits))
        q_tail = np.exp(logsumexp(logq[rest]))
        q = np.append(np.exp(logq[ids]), q_tail)
    else:
        logp = log_softmax(np.array(logits))
        q = np.exp(logq[ids])
        if k < v:
            q = np.append(q, np.exp(logsumexp(logq[rest])))
            logp = np.append(logp, -np.inf)
    return np.exp(logp), q


def divergences(case, beta, lam):
    p, q = supports(case)
    ids = np.array(case["topk_ids"], dtype=np.int64)
    l = np.array(case["topk_logprobs"], dtype=np.float64)
    z = np.array(case["student_logits"], dtype=np.float64)
    tau = case["temperature"]
    m = beta * p + (1 - beta) * q
    zs, ls = z[ids] / tau, l / tau
    return {
        "forward_kl": kl(p, q),
        "reverse_kl": kl(q, p),
        "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
        "skew_forward_kl": kl(p, lam * p + (1 - lam) * q),
        "skew_reverse_kl": kl(q, lam * q + (1 - lam) * p),
        "logit_mse": float(np.mean(((zs - zs.mean()) - (ls - ls.mean())) ** 2)),
    }


def expected(case):
    d = divergences(case, case["jsd_beta"], case["skew_lambda"])
    z = np.array(case["student_logits"], dtype=np.float64)
    ce = float(-log_softmax(z)[case["next_token"]])
    a, tau = case["alpha"], case["temperature"]
    total = {name: a * tau * tau * value + (1 - a) * ce for name, value in d.items()}
    return {"divergence": d, "hard_ce": ce, "total": total}


def flatten(x, prefix=""):
    if isinstance(x, dict):
        for key, value in x.items():
            yield from flatten(value, f"{prefix}.{key}")
    else:
        yield prefix, x


def main():
    doc = json.load(open(PATH))
    fresh = [expected(c) for c in doc["cases"]]
    zeros = [divergences(c, 0.5, 0.1) for c in doc["identity_cases"]]
    if "--write" in sys.argv[1:]:
        for c, e in zip(doc["cases"], fresh):
            c["expected"] = e
        for c, e in zip(doc["identity_cases"], zeros):
            c["expected_all_zero"] = e
        with open(PATH, "w") as f:
            json.dump(doc, f)
        print(f"wrote {PATH}: {len(fresh)} cases, {len(zeros)} identity cases")
        return
    worst = 0.0
    for i, (c, e) in enumerate(zip(doc["cases"], fresh)):
        stored = dict(flatten(c["expected"]))
        for key, value in flatten(e):
            err = abs(value - stored[key]) / (1.0 + abs(stored[key]))
            worst = max(worst, err)
            if err > 1e-12:
                sys.exit(f"case {i}{key}: recomputed {value!r}, stored {stored[key]!r}")
    for i, e in enumerate(zeros):
        for key, value in e.items():
            if abs(value) > 1e-12:
                sys.exit(f"identity case {i}.{key}: {value!r} is not 0")
    print(f"ok: {len(fresh)} cases and {len(zeros)} identity cases agree "
          f"(worst relative difference {worst:.2e})")


if __name__ == "__main__":
    main()
