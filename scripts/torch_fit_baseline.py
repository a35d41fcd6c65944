#!/usr/bin/env python3
"""The PyTorch eager baseline for `student-fit`: the same student (a Hugging Face directory,
e.g. the export of a `student-fit` run), the same shards, the same loss (forward KL at T=1
with the bucket tail of docs/design.md, over distilled positions only, token mean), AdamW with
global-norm clipping, on the CPU. Prints distilled positions/s (steps after the first) and
peak resident memory, to set beside `student-fit`'s own figures from the same machine.

Needs torch, transformers, and for shards the repository's `kd_cache` package (`pip install
./python`; pyarrow and numpy). Run by hand:

    python3 scripts/torch_fit_baseline.py --student out/s/student --shards out/quickstart \
        --steps 20 --token-budget 1024 --max-len 512 --threads 2

`--synthetic` needs neither a student nor shards: the 6-layer SmolLM2 student shape (hidden
576, 9 heads over 3 key/value heads, MLP 1536, tied 49,152-token head) with random weights,
and the batches of `cargo bench --bench training`: two 512-token rows per step, 51 prompt
tokens, every one of the other 461 positions distilled against random top-32 targets, AdamW
at lr 1e-4; the rate is timed over the steps after `--warmup` (default 2) steps:

    python3 scripts/torch_fit_baseline.py --synthetic --steps 22 --threads 2

`--fit-metrics out/s/metrics.jsonl` also prints `student-fit`'s rate over the same steps as
the timed ones here (after `--warmup`), from that run's `metrics.jsonl` (its lines carry the
positions so far and the rate since the first step, so any two logged steps give the rate
between them; `--warmup` must be a logged step):

    python3 scripts/torch_fit_baseline.py --student out/student-6l-long/student \
        --shards out/long-scored --steps 22 --warmup 5 --fit-metrics out/student-6l-long/metrics.jsonl
"""
import argparse
import glob
import json
import os
import random
import resource
import time

import torch
from transformers import AutoModelForCausalLM


def rows(shards, max_len):
    """The cache's rows (format 1 or 2, decoded by the repository's `kd_cache` package,
    `pip install ./python`), cut to `max_len` tokens."""
    from kd_cache import read_shard

    out = []
    for f in sorted(glob.glob(os.path.join(shards, "*.parquet"))):
        for r in read_shard(f):
            ids, p = r["input_ids"].tolist(), r["prompt_len"]
            tid, tlp = r["topk_ids"], r["topk_logprobs"]
            n_pos, k = tid.shape
            if len(ids) > max_len:
                # Keep the first max_len tokens and the positions inside them.
                n_pos = max(0, max_len - p)
                ids = ids[:max_len]
                tid, tlp = tid[:n_pos], tlp[:n_pos]
            if n_pos > 0:
                out.append((ids, p, n_pos, k, tid.flatten().tolist(), tlp.flatten().tolist()))
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


def fit_rate(path, warmup):
    """student-fit's distilled positions/s over the steps after `warmup`, up to its last logged
    step, from its `metrics.jsonl`: each training line has `step`, `train_positions` and
    `positions_per_s` (since the first step), so its time since the first step is their ratio."""
    lines = [json.loads(x) for x in open(path) if x.strip()]
    at = {x["step"]: x for x in lines if "positions_per_s" in x and "train_positions" in x}
    if warmup not in at:
        raise SystemExit(f"{path}: no training line at step {warmup} (logged: {sorted(at)})")
    last = at[max(at)]
    secs = lambda x: x["train_positions"] / x["positions_per_s"]
    return ((last["train_positions"] - at[warmup]["train_positions"])
            / (secs(last) - secs(at[warmup])), max(at))


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


def synthetic_student():
    """The 6-layer SmolLM2 student shape with random weights (transformers' initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def synthetic_batches(vocab, seed, rows=(512, 512), prompt=51, k=32):
    """Batches shaped as `kd_student::data::synthetic_batch`'s: random tokens, and at every
    response position k distinct random ids with the log-probs of a random distribution over
    them that leaves some mass to the tail."""
    g = torch.Generator().manual_seed(seed)
    while True:
        batch = []
        for n in rows:
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            n_pos = n - prompt
            top = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n_pos)])
            lp = torch.log_softmax(torch.randn(n_pos, k + 1, generator=g), -1)[:, :k]
            batch.append((ids, prompt, n_pos, k, top.flatten().tolist(), lp.flatten().tolist()))
        yield batch


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--student")
    a.add_argument("--shards")
    a.add_argument("--synthetic", action="store_true")
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--warmup", type=int, default=None,
                   help="untimed first steps (default: 1 on shards, 2 with --synthetic)")
    a.add_argument("--token-budget", type=int, default=1024)
    a.add_argument("--max-len", type=int, default=512)
    a.add_argument("--lr", type=float, default=None,
                   help="default: 5e-4 on shards, 1e-4 with --synthetic")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--fit-metrics", help="a student-fit run's metrics.jsonl, to print its rate "
                   "over the same steps")
    args = a.parse_args()
    if not args.synthetic and not (args.student and args.shards):
        a.error("give --student and --shards, or --synthetic")
    warmup = args.warmup if args.warmup is not None else (2 if args.synthetic else 1)
    lr = args.lr if args.lr is not None else (1e-4 if args.synthetic else 5e-4)
    if args.steps <= warmup:
        a.error(f"--steps must exceed the {warmup} warm-up steps")
    # Read before the run, so that a wrong path fails at once.
    fit = fit_rate(args.fit_metrics, warmup) if args.fit_metrics else None
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.synthetic:
        model = synthetic_student()
        it = synthetic_batches(model.config.vocab_size, args.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
        it = batches(rows(args.shards, args.max_len), args.token_budget, args.seed)
    model.train()
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    positions, t0 = 0, None
    for s in range(args.steps):
        if s == warmup:
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
        "synthetic": args.synthetic, "lr": lr,
        "steps_timed": args.steps - warmup, "positions": positions, "seconds": secs,
        "positions_per_s": positions / secs, "peak_rss_bytes": peak,
    }))
    if fit:
        rate, last = fit
        print(json.dumps({
            "engine": "student-fit", "metrics": args.fit_metrics,
            "steps_timed": f"{warmup + 1}-{last}", "positions_per_s": rate,
            "ratio_to_pytorch": rate / (positions / secs),
        }))


if __name__ == "__main__":
    main()
