"""Read kd-distill teacher caches: a folder of Parquet shards and ``manifest.json``.

Every format the project writes is read with the formulas its schema documents
(``schemas/shard-v1.json``, ``schemas/shard-v2.json``, ``docs/cache-format.md``):

- format 1: exact f32 top-k log-probs;
- format 2: integer log-probs (``-cumsum(gaps) / S``), shifted per position so that the top-k
  and the stored tail mass add up to 1; the next token's log-prob with the same shift;
- sampled targets: per position the next token's count (``sample_token_count``) and the other
  distinct drawn ids with counts (``sample_counts``) and log-prob gaps; in shards written
  before those columns, distinct ids ascending with ``sample_logprob_q``, or every draw with
  its repeats.

>>> cache = Cache("out/quickstart")            # checks the manifest and each shard's sha256
>>> for row in cache.rows():
...     row["topk_ids"].shape, row["topk_logprobs"].shape   # (n_pos, k) each

With torch installed: :mod:`kd_cache.torch_data` (a dataset that batches rows as
``student-fit`` does, sharded by rank and worker) and :mod:`kd_cache.losses` (the losses as
torch functions); ``examples/ddp_train.py`` trains a transformers model with them under
``torchrun``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow.parquet as pq

__all__ = ["Cache", "CacheError", "read_shard", "decode_row"]

NO_TAIL = 4294967295


class CacheError(Exception):
    """A cache that is not what its manifest says, naming the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _meta(pf: pq.ParquetFile) -> Dict[str, str]:
    kv = pf.metadata.metadata or {}
    return {k.decode(): v.decode() for k, v in kv.items() if k.decode().startswith("kd.")}


def decode_row(rec: dict, meta: Dict[str, str]) -> dict:
    """One shard row (as ``pyarrow`` gives it) decoded: ``input_ids``, ``prompt_len``,
    ``topk_ids`` and ``topk_logprobs`` of shape ``(n_pos, k)``, ``token_logprob`` (n_pos,),
    ``tail_mass`` (n_pos,), and with draws ``sample_ids`` / ``sample_logprobs`` of shape
    ``(n_pos, n)``, each id repeated by its count, ascending within a position."""
    version = int(meta["kd.format_version"])
    k = int(meta["kd.top_k"])
    ids = np.asarray(rec["input_ids"], dtype=np.int64)
    n_pos = len(ids) - int(rec["prompt_len"])
    out = {
        "id": rec["id"],
        "source": rec["source"],
        "input_ids": ids,
        "prompt_len": int(rec["prompt_len"]),
        "topk_ids": np.asarray(rec["topk_ids"], dtype=np.int64).reshape(n_pos, k),
    }
    if version < 2:
        lp = np.asarray(rec["topk_logprobs"], dtype=np.float64).reshape(n_pos, k)
        out["topk_logprobs"] = lp
        out["token_logprob"] = np.asarray(rec["token_logprob"], dtype=np.float64)
        out["tail_mass"] = np.clip(1.0 - np.exp(lp).sum(axis=1), 0.0, 1.0)
        return out
    S = float(meta["kd.logprob_scale"])
    T = float(meta["kd.tail_scale"])
    n = int(meta.get("kd.samples", "0"))
    gaps = np.asarray(rec["topk_logprob_gaps"], dtype=np.float64).reshape(n_pos, k)
    lp = -np.cumsum(gaps, axis=1) / S
    tq = np.asarray(rec["tail_logmass_q"], dtype=np.float64)
    tail = np.where(tq == NO_TAIL, 0.0, np.exp(-tq / T))
    if k > 0:
        mass = np.exp(lp).sum(axis=1)
        shift = np.where((mass > 0) & (tail < 1), np.log(np.maximum(1 - tail, 1e-300)) - np.log(np.maximum(mass, 1e-300)), 0.0)
    else:
        shift = np.zeros(n_pos)
    out["topk_logprobs"] = lp + shift[:, None]
    out["tail_mass"] = tail
    out["token_logprob"] = -np.asarray(rec["token_logprob_q"], dtype=np.float64) / S + shift
    if n > 0 and "sample_token_count" in rec:
        sid, sq = _token_first_draws(rec, ids, n_pos, n, S)
    elif n > 0:
        sid = np.asarray(rec["sample_ids"], dtype=np.int64)
        sq = -np.asarray(rec["sample_logprob_q"], dtype=np.float64) / S
        counts = rec.get("sample_counts")
        if counts is not None:
            c = np.asarray(counts, dtype=np.int64)
            if (c < 1).any() or len(c) != len(sid):
                raise CacheError(f"row {rec['id']}: sample_counts must be at least 1, one per id")
            sid, sq = np.repeat(sid, c), np.repeat(sq, c)
    if n > 0:
        if len(sid) != n_pos * n:
            raise CacheError(f"row {rec['id']}: {len(sid)} draws for {n_pos} positions of {n}")
        out["sample_ids"] = sid.reshape(n_pos, n)
        out["sample_logprobs"] = sq.reshape(n_pos, n)
    return out


def _token_first_draws(rec: dict, ids: np.ndarray, n_pos: int, n: int, S: float):
    """The draws of a row stored token first: position j has ``sample_token_count[j]`` draws
    of the next token (log-prob ``-token_logprob_q[j] / S``), then the other distinct ids
    while their counts make ``n``, their log-probs ``-cumsum(gaps) / S`` within the position.
    Returns every draw, ``n`` per position, sorted by id within a position."""
    tc = rec["sample_token_count"]
    sid, gaps, counts = rec["sample_ids"], rec["sample_logprob_gaps"], rec["sample_counts"]
    tq = rec["token_logprob_q"]
    targets = ids[int(rec["prompt_len"]):]
    if len(tc) != n_pos or len(gaps) != len(sid) or len(counts) != len(sid):
        raise CacheError(f"row {rec['id']}: sampled columns of unequal lengths")
    out_ids, out_q, at = [], [], 0
    for j in range(n_pos):
        draws = [(int(targets[j]), tq[j], tc[j])] if tc[j] > 0 else []
        total, acc = tc[j], 0
        while total < n and at < len(sid):
            acc += gaps[at]
            draws.append((sid[at], acc, counts[at]))
            total += counts[at]
            at += 1
        if total != n or any(c < 1 for _, _, c in draws):
            raise CacheError(f"row {rec['id']}: position {j} holds {total} draws, not {n}")
        for i, q, c in sorted(draws):
            out_ids += [i] * c
            out_q += [q] * c
    if at != len(sid):
        raise CacheError(f"row {rec['id']}: {len(sid) - at} sampled ids beyond the positions' counts")
    return np.asarray(out_ids, dtype=np.int64), -np.asarray(out_q, dtype=np.float64) / S


def read_shard(path) -> List[dict]:
    """Every row of one shard, decoded (see :func:`decode_row`)."""
    pf = pq.ParquetFile(path)
    meta = _meta(pf)
    if "kd.format_version" not in meta:
        raise CacheError(f"{path}: not a kd-shard file (no kd.format_version)")
    return [decode_row(r, meta) for r in pf.read().to_pylist()]


class Cache:
    """A finished cache folder. Opening it reads ``manifest.json``; with ``verify`` (the
    default) each shard's sha256 is checked against the manifest before it is read."""

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"{mpath}: {e}") from e
        if not self.manifest.get("complete"):
            raise CacheError(f"{mpath}: the dump is not complete")
        self.verify = verify

    @property
    def top_k(self) -> int:
        return int(self.manifest["settings"]["top_k"])

    @property
    def samples(self) -> int:
        return int(self.manifest["settings"].get("samples", 0))

    def shard_paths(self) -> List[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def rows(self, ids: Optional[set] = None) -> Iterator[dict]:
        """The rows in manifest order (only those whose id is in ``ids``, when given)."""
        for entry in self.manifest["shards"]:
            p = self.path / entry["file"]
            if self.verify and _sha256(p) != entry["sha256"]:
                raise CacheError(f"{p}: does not match the manifest's sha256")
            for r in read_shard(p):
                if ids is None or r["id"] in ids:
                    yield r
