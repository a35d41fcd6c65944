"""The distillation losses of kd-distill as torch functions, with the definitions of
``docs/design.md`` ("Loss definitions"), computed in the dtype of the logits (pass float64
logits for the exact values; the project's tests compare them with ``kd-loss`` at 1e-9).

At each distilled position: the teacher's top-k ids ``S`` with log-probs ``l`` (T = 1), the
student's logits ``z`` over the vocabulary ``V``, temperature ``tau``. With the ``bucket`` tail
the support is ``S ∪ {tail}``: the teacher's tail mass ``r = 1 − Σ exp(l)`` is spread over the
``V − k`` other tokens and tempered with them; the student's tail is ``Σ_{j∉S} q_j``. With
``renorm`` both sides are renormalised over ``S``. The total per position is
``alpha·tau²·D + (1 − alpha)·CE`` (CE at τ = 1 on the token that follows), and a batch's loss
is the mean over its distilled positions.

>>> total, parts = kd_loss(logits, topk_ids, topk_logprobs, next_token,
...                        divergence="forward_kl", temperature=2.0, alpha=0.7)
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

__all__ = ["kd_loss", "divergence_per_position", "hard_ce", "sampled_forward_kl"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "logit_mse")


def _xlogy_diff(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last axis, with 0·log 0 = 0."""
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(dim=-1)


def _supports(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tau: float, tail: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log P and log Q on the compared support, ``[n, k]`` or ``[n, k + 1]`` (bucket)."""
    dt = logits.dtype
    l = topk_logprobs.to(dt)
    z = logits / tau
    zs = z.gather(1, topk_ids)
    if tail == "renorm":
        ls = l / tau
        return ls - torch.logsumexp(ls, 1, keepdim=True), zs - torch.logsumexp(zs, 1, keepdim=True)
    if tail != "bucket":
        raise ValueError(f"tail: {tail!r} is neither 'bucket' nor 'renorm'")
    v, k = logits.shape[1], topk_ids.shape[1]
    lse = torch.logsumexp(z, 1, keepdim=True)
    log_q = zs - lse
    # The student's tail: log Σ_{j∉S} exp(z_j/τ) − lse, by a log-sum-exp over the masked row.
    outside = z.scatter(1, topk_ids, float("-inf"))
    log_q_tail = torch.logsumexp(outside, 1, keepdim=True) - lse
    # The teacher's tail mass r and its tempered weight (V − k)·(r/(V − k))^(1/τ).
    r = (1.0 - torch.exp(l).sum(1, keepdim=True)).clamp(min=0.0)
    ls = l / tau
    if k < v:
        per = torch.log(r / (v - k)) / tau
        tail_logw = torch.where(
            r > 0, torch.log(torch.tensor(float(v - k), dtype=dt)) + per, torch.full_like(r, float("-inf"))
        )
    else:
        tail_logw = torch.full_like(r, float("-inf"))
    both = torch.cat([ls, tail_logw], 1)
    log_p = both - torch.logsumexp(both, 1, keepdim=True)
    if k >= v:
        log_q_tail = torch.full_like(log_q_tail, float("-inf"))
    return log_p, torch.cat([log_q, log_q_tail], 1)


def divergence_per_position(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    tail: str = "bucket",
    beta: float = 0.5,
    lam: float = 0.1,
) -> torch.Tensor:
    """D at each position, ``[n]`` (before the τ² factor)."""
    tau = float(temperature)
    if divergence == "logit_mse":
        z = logits.gather(1, topk_ids) / tau
        l = topk_logprobs.to(logits.dtype) / tau
        dz = (z - z.mean(1, keepdim=True)) - (l - l.mean(1, keepdim=True))
        return (dz * dz).mean(1)
    log_p, log_q = _supports(logits, topk_ids, topk_logprobs, tau, tail)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return _xlogy_diff(p, log_p, log_q)
    if divergence == "reverse_kl":
        return _xlogy_diff(q, log_q, log_p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        log_m = torch.log(m)
        return beta * _xlogy_diff(p, log_p, log_m) + (1 - beta) * _xlogy_diff(q, log_q, log_m)
    if divergence == "skew_forward_kl":
        return _xlogy_diff(p, log_p, torch.log(lam * p + (1 - lam) * q))
    if divergence == "skew_reverse_kl":
        return _xlogy_diff(q, log_q, torch.log(lam * q + (1 - lam) * p))
    raise ValueError(f"divergence: {divergence!r} is not one of {', '.join(DIVERGENCES)}")


def hard_ce(logits: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
    """−log softmax(z)[y] at τ = 1, ``[n]``."""
    return torch.logsumexp(logits, 1) - logits.gather(1, next_token.view(-1, 1)).squeeze(1)


def kd_loss(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    next_token: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    tail: str = "bucket",
    beta: float = 0.5,
    lam: float = 0.1,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The batch loss (mean over positions of ``alpha·tau²·D + (1 − alpha)·CE``) and its parts
    (``divergence`` and ``hard_ce`` means). ``logits`` ``[n, V]``; ``topk_ids`` ``[n, k]``;
    ``topk_logprobs`` ``[n, k]``; ``next_token`` ``[n]``."""
    d = divergence_per_position(logits, topk_ids, topk_logprobs, divergence, temperature, tail, beta, lam)
    ce = hard_ce(logits, next_token)
    t2 = float(temperature) ** 2
    total = alpha * t2 * d + (1 - alpha) * ce
    return total.mean(), {"divergence": d.mean(), "hard_ce": ce.mean()}


def sampled_forward_kl(
    logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_logprobs: torch.Tensor,
    next_token: torch.Tensor,
    alpha: float = 1.0,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The unbiased forward-KL estimator on N draws per position (τ = 1): ``D̂ = (1/N) Σ_draws
    (log p − log q)``, each distinct id counted as often as it was drawn (``sample_ids`` and
    ``sample_logprobs`` ``[n, N]`` as ``Cache`` decodes them, repeats included). Its gradient
    ``q − p̂`` has the expectation of the exact one. ``parts["plug_in"]`` is the plug-in
    ``KL(p̂‖q)`` (``p̂ = counts / N``), which has the same gradient and is the value
    ``student-fit`` reports on sampled targets; the two differ by ``Σ p̂ (log p − log p̂)``,
    which does not depend on the student."""
    log_q = logits.gather(1, sample_ids) - torch.logsumexp(logits, 1, keepdim=True)
    d = (sample_logprobs.to(logits.dtype) - log_q).mean(1)
    n = sample_ids.shape[1]
    counts = (sample_ids.unsqueeze(2) == sample_ids.unsqueeze(1)).sum(2).to(logits.dtype)
    plug_in = (torch.log(counts / n) - log_q).mean(1)
    ce = hard_ce(logits, next_token)
    total = alpha * d + (1 - alpha) * ce
    return total.mean(), {
        "divergence": d.mean(),
        "plug_in": (alpha * plug_in + (1 - alpha) * ce).mean(),
        "hard_ce": ce.mean(),
    }
