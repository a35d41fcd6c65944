#!/usr/bin/env python3
"""The PyTorch eager baseline for `student-fit`: the same student (a Hugging Face directory,
e.g. the export of a `student-fit` run), the same shards, the same loss (forward KL at T=1
with the bucket tail of docs/design.md, over distilled positions only, token mean), AdamW with
global-norm clipping, on the CPU. Prints distilled positions/s (steps after the first) and
peak resident memory, to set beside `student-fit`'s own figures from the same machine.

Needs torch, transformers and pyarrow (run by hand; torch is not in CI):

    python3 scripts/torch_fit_baseline.py --student out/s/student --shards out/quickstart \
        --steps 20 --token-budget 1024 --max-len 512 --threads 2
"""
import argparse
import glob
import json
import os
import random
import resource
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM


def rows(shards, max_len):
    out = []
    for f in sorted(glob.glob(os.path.join(shards, "*.parquet"))):
        t = pq.read_table(f, columns=["input_ids", "prompt_len", "topk_ids", "topk_logprobs"])
        for r in t.to_pylist():
            ids, p = r["input_ids"], r["prompt_len"]
            n_pos = len(ids) - p
            k = len(r["topk_ids"]) // max(n_pos, 1)
            if len(ids) > max_len:
                # Keep the first max_len tokens and the positions inside them.
                keep = max(0, max_len - p)
                ids = ids[:max_len]
                r["topk_ids"] = r["topk_ids"][: keep * k]
                r["topk_logprobs"] = r["topk_logprobs"][: keep * k]
                n_pos = keep
            if n_pos > 0:
                out.append((ids, p, n_pos, k, r["topk_ids"], r["topk_logprobs"]))
    return out


def batches(data, budget, seed):
    rng = random.Random(seed)
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        cur, longest = [], 0
        for i in order:
            n = len(data[i][0])
            if cur and max(longest, n) * (len(cur) + 1) > budget:
                yield cur
                cur, longest = [], 0
            cur.append(data[i])
            longest = max(longest, n)
        if cur:
            yield cur


def step_loss(model, batch, vocab):
    b, t = len(batch), max(len(r[0]) for r in batch)
    ids = torch.zeros((b, t), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    sel_rows, sel_t, top_ids, top_lp = [], [], [], []
    for i, (x, p, n_pos, k, tid, tlp) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        sel_rows += [i] * n_pos
        sel_t += list(range(p - 1, p - 1 + n_pos))
        top_ids.append(torch.tensor(tid, dtype=torch.long).view(n_pos, k))
        top_lp.append(torch.tensor(tlp, dtype=torch.float32).view(n_pos, k))
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    h = hidden[torch.tensor(sel_rows), torch.tensor(sel_t)]
    z = model.lm_head(h)
    logq = torch.log_softmax(z, dim=-1)
    top_ids = torch.cat(top_ids)
    top_lp = torch.cat(top_lp)
    p_top = top_lp.exp()
    r = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    logq_top = logq.gather(1, top_ids)
    tail = logq.scatter(1, top_ids, float("-inf")).logsumexp(-1)
    kl = (p_top * (top_lp - logq_top)).sum(-1)
    kl = kl + torch.where(r > 0, r * (r.clamp_min(1e-30).log() - tail), torch.zeros_like(r))
    return kl.mean(), h.shape[0]


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--student", required=True)
    a.add_argument("--shards", required=True)
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--token-budget", type=int, default=1024)
    a.add_argument("--max-len", type=int, default=512)
    a.add_argument("--lr", type=float, default=5e-4)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    model.train()
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = rows(args.shards, args.max_len)
    it = batches(data, args.token_budget, args.seed)
    positions, t0 = 0, None
    for s in range(args.steps):
        if s == 1:
            t0, positions = time.perf_counter(), 0
        loss, n = step_loss(model, next(it), vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        positions += n
        print(f"step {s + 1} loss {loss.item():.4f} positions {n}", flush=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "engine": "pytorch-eager", "torch": torch.__version__, "threads": args.threads,
        "steps_timed": args.steps - 1, "positions": positions, "seconds": secs,
        "positions_per_s": positions / secs, "peak_rss_bytes": peak,
    }))


if __name__ == "__main__":
    main()
