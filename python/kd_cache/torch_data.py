"""A PyTorch ``IterableDataset`` over a kd-distill cache that batches rows as ``student-fit``
does, so a PyTorch trainer sees the batches ``student-fit`` would train on:

- the same split: a row is held out when the leading 8 bytes of sha256(id), as a big-endian
  integer over 2^64, fall below ``holdout_fraction`` (``Split::by_id_hash``);
- the same order: each epoch's training rows shuffled by SplitMix64 seeded with
  ``seed ^ (epoch · 0xD1B54A32D192ED03)`` (one value skipped), Fisher–Yates from the end with
  Lemire's multiply-shift for the index;
- the same packing: rows in that order, truncated to ``max_len``, while ``rows × longest`` stays
  within ``token_budget`` (a batch holds at least one row and never spans two epochs).

Batch ``i`` of that sequence goes to consumer ``i mod (world_size · workers)`` (rank-major, then
``DataLoader`` worker), so the ranks and workers see disjoint batches that together cover every
epoch. Each item is one collated batch: ``input_ids`` ``[b, l]`` (right-padded with 0),
``attention_mask``, ``pos_row`` / ``pos_t`` (each distilled position's row and column: the
logits at ``[pos_row, pos_t]`` predict ``next_token``), ``topk_ids`` / ``topk_logprobs``
``[n, k]``, ``sample_ids`` / ``sample_logprobs`` ``[n, N]`` with draws, and ``rows`` (the row
indices) and ``index`` (the batch's place in the sequence).

Only one teacher and no ``mix``: caches of several teachers, and interleaving generated and
scored rows, are ``student-fit``'s alone.
"""

from __future__ import annotations

import hashlib
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from . import Cache

__all__ = ["KDDataset", "holdout_score", "epoch_order", "pack"]

MASK64 = (1 << 64) - 1


class SplitMix64:
    """SplitMix64 (Steele, Lea & Flood 2014), as the project's loader draws it."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return (self.next_u64() * n) >> 64

    def shuffle(self, v: list) -> None:
        for i in range(len(v) - 1, 0, -1):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]


def holdout_score(row_id: str) -> float:
    """The leading 8 bytes of sha256(id), big-endian, over 2^64."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") / 2.0**64


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """Epoch ``epoch``'s order of ``n`` candidate rows (indices into them)."""
    rng = SplitMix64(seed ^ ((epoch * 0xD1B54A32D192ED03) & MASK64))
    rng.next_u64()
    order = list(range(n))
    rng.shuffle(order)
    return order


def pack(lens: List[int], order: List[int], token_budget: int) -> List[List[int]]:
    """``order`` cut into batches whose ``rows × longest`` stays within ``token_budget``."""
    out, cur, longest = [], [], 0
    for o in order:
        w = max(longest, lens[o])
        if cur and (len(cur) + 1) * w > token_budget:
            out.append(cur)
            cur, longest = [], 0
            w = lens[o]
        cur.append(o)
        longest = w
    if cur:
        out.append(cur)
    return out


class KDDataset(torch.utils.data.IterableDataset):
    """Batches of a cache's training (or held-out) rows, as ``student-fit`` forms them.

    ``rank`` and ``world_size`` default to ``torch.distributed``'s when it is initialised
    (else 0 and 1). ``epochs`` is how many epochs to hand out (``None``: without end).
    """

    def __init__(
        self,
        cache,
        token_budget: int = 8192,
        max_len: int = 2048,
        seed: int = 0,
        holdout_fraction: float = 0.1,
        split: str = "train",
        epochs: Optional[int] = 1,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        super().__init__()
        if token_budget < 1 or max_len < 2:
            raise ValueError("token_budget must be at least 1 and max_len at least 2")
        if split not in ("train", "held_out"):
            raise ValueError(f"split: {split!r} is neither 'train' nor 'held_out'")
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.token_budget, self.max_len, self.seed, self.epochs = token_budget, max_len, seed, epochs
        self.all_rows = list(self.cache.rows())
        held = [holdout_score(r["id"]) < holdout_fraction for r in self.all_rows]
        self.rows = [i for i, h in enumerate(held) if h == (split == "held_out")]
        self.lens = [min(len(self.all_rows[i]["input_ids"]), max_len) for i in self.rows]
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if on else 0
            world_size = dist.get_world_size() if on else 1
        self.rank, self.world_size = rank, world_size

    def batches(self) -> Iterator[List[int]]:
        """Every batch's row indices in order, over the epochs (for every consumer)."""
        epoch = 0
        while self.rows and (self.epochs is None or epoch < self.epochs):
            order = epoch_order(len(self.rows), self.seed, epoch)
            for b in pack(self.lens, order, self.token_budget):
                yield [self.rows[o] for o in b]
            epoch += 1

    def collate(self, rows: List[int]) -> Dict[str, torch.Tensor]:
        """Rows as one batch (see the module's documentation for the fields)."""
        recs = [self.all_rows[r] for r in rows]
        lens = [min(len(r["input_ids"]), self.max_len) for r in recs]
        l = max(lens)
        ids = np.zeros((len(recs), l), dtype=np.int64)
        mask = np.zeros((len(recs), l), dtype=np.int64)
        pos_row, pos_t, nxt, tids, tlps, sids, slps = [], [], [], [], [], [], []
        for b, (r, n) in enumerate(zip(recs, lens)):
            ids[b, :n] = r["input_ids"][:n]
            mask[b, :n] = 1
            pl = r["prompt_len"]
            np_ = max(n - pl, 0)
            pos_row += [b] * np_
            pos_t += list(range(pl - 1, pl - 1 + np_))
            nxt.append(r["input_ids"][pl : pl + np_])
            tids.append(r["topk_ids"][:np_])
            tlps.append(r["topk_logprobs"][:np_])
            if "sample_ids" in r:
                sids.append(r["sample_ids"][:np_])
                slps.append(r["sample_logprobs"][:np_])
        out = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "pos_row": torch.tensor(pos_row, dtype=torch.int64),
            "pos_t": torch.tensor(pos_t, dtype=torch.int64),
            "next_token": torch.from_numpy(np.concatenate(nxt).astype(np.int64)),
            "topk_ids": torch.from_numpy(np.concatenate(tids).astype(np.int64)),
            "topk_logprobs": torch.from_numpy(np.concatenate(tlps).astype(np.float64)),
            "rows": torch.tensor(rows, dtype=torch.int64),
        }
        if sids:
            out["sample_ids"] = torch.from_numpy(np.concatenate(sids).astype(np.int64))
            out["sample_logprobs"] = torch.from_numpy(np.concatenate(slps).astype(np.float64))
        return out

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        consumers = self.world_size * workers
        me = self.rank * workers + worker
        for i, rows in enumerate(self.batches()):
            if i % consumers == me:
                batch = self.collate(rows)
                batch["index"] = torch.tensor(i)
                yield batch
