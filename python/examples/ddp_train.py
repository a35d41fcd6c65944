#!/usr/bin/env python3
"""Train any transformers causal LM on a kd-distill cache with PyTorch DDP: the supported path
for training runs that outgrow one machine, or that already live in PyTorch (accelerate and
DeepSpeed wrap the same model, dataset and loss).

    torchrun --standalone --nproc_per_node 2 python/examples/ddp_train.py \
        --student out/s0/student --cache out/quickstart --out out/ddp --steps 100

Each rank reads the cache with ``kd_cache.torch_data.KDDataset``, which forms the batches
``student-fit`` forms (same split, shuffle and token budget) and hands batch i to rank
i mod world_size, so the ranks train on disjoint rows that together cover each epoch. The loss
is ``kd_cache.losses.kd_loss`` (or the sampled estimator with ``--targets sampled``) on the
logits of the distilled positions, computed in float64; DDP averages the gradients (gloo on
CPUs, nccl on GPUs). Rank 0 saves the model with ``save_pretrained`` at the end; every rank
writes ``OUT/rank-R.json`` with its losses and the rows it saw.
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM

from kd_cache.losses import kd_loss, sampled_forward_kl
from kd_cache.torch_data import KDDataset


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="a Hugging Face directory (e.g. student-fit's export)")
    p.add_argument("--cache", required=True, help="the cache folder (teacher-dump's output)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--token-budget", type=int, default=8192, help="tokens per batch on each rank")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-fraction", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--tail", default="bucket")
    p.add_argument("--targets", choices=["topk", "sampled"], default="topk")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: torch's default)")
    a = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    model = AutoModelForCausalLM.from_pretrained(a.student).float().to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    data = KDDataset(a.cache, token_budget=a.token_budget, max_len=a.max_len, seed=a.seed,
                     holdout_fraction=a.holdout_fraction, epochs=None)
    if rank == 0:
        print(f"ddp_train: {world} ranks on {device.type}, {len(data.rows)} training rows", flush=True)

    log, t0, positions = [], time.time(), 0
    batches = iter(data)
    for step in range(1, a.steps + 1):
        b = {k: v.to(device) for k, v in next(batches).items()}
        out = ddp(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        z = out.logits[b["pos_row"], b["pos_t"]].double()
        if len(b["pos_row"]) == 0:
            # Nothing to distil (every row's prompt fills max_len): a zero loss, so that this
            # rank still joins the gradient all-reduce of the step.
            loss, parts = out.logits.sum() * 0.0, {"divergence": torch.zeros(())}
        elif a.targets == "sampled":
            loss, parts = sampled_forward_kl(z, b["sample_ids"], b["sample_logprobs"], b["next_token"], a.alpha)
        else:
            loss, parts = kd_loss(z, b["topk_ids"], b["topk_logprobs"], b["next_token"], a.divergence,
                                  a.temperature, a.alpha, a.tail)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        positions += len(b["pos_row"])
        entry = {"step": step, "batch": int(b["index"]), "loss": loss.item(),
                 "divergence": parts["divergence"].item(), "positions": len(b["pos_row"]),
                 "rows": b["rows"].tolist()}
        if "plug_in" in parts:
            # student-fit reports this value on sampled targets (same gradient).
            entry["plug_in_loss"] = parts["plug_in"].item()
        log.append(entry)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.5f} ({positions / (time.time() - t0):.0f} positions/s on rank 0)",
                  flush=True)

    # One epoch's assignment, for checking that the ranks' rows are disjoint and cover it.
    epoch = copy.copy(data)  # the same rows, read once
    epoch.epochs = 1
    epoch_rows = sorted(r for b in epoch for r in b["rows"].tolist())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "steps": log, "epoch_rows": epoch_rows,
         "training_rows": len(data.rows), "seconds": time.time() - t0}))
    dist.barrier()
    if rank == 0:
        model.save_pretrained(Path(a.out) / "student")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
