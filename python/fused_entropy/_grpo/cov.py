"""Clip-Cov and KL-Cov token selection (Cui et al., verl's ``compute_policy_loss_clip_cov``/``kl_cov``).

Both pick tokens from statistics of the whole micro-batch (or of every rank's, ``cov_statistics=
"global"``), so these loss types take no chunks and run in torch on every device.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .normalizers import _all_reduce_sum, _dist, _gather_with_offset


class _CovScope(NamedTuple):
    """Clip-Cov/KL-Cov statistics over this micro-batch (``is_global`` False, verl's choice) or over
    the valid tokens of every rank of ``group`` (None: the world)."""

    is_global: bool = False
    group: Any = None


_LOCAL = _CovScope()


def _cov(lp, adv, valid, scope: _CovScope = _LOCAL):
    """Detached ``(A - mean A) * (logp - mean logp)`` over the valid tokens of the micro-batch (or of
    every rank of the group: one all_reduce of the three sums)."""
    with torch.no_grad():
        a = adv.expand_as(lp)
        vf = valid.to(lp.dtype)
        sums = torch.stack([vf.sum(), (a * vf).sum(), (lp * vf).sum()])
        if scope.is_global:
            sums = _all_reduce_sum(sums, scope.group)
        n = sums[0].clamp(min=1.0)
        mean_a = sums[1] / n
        mean_lp = sums[2] / n
        return (a - mean_a) * (lp - mean_lp), int(sums[0].item())


def _clip_cov_selection(lp, adv, valid, clipped_by_ppo, cfg, generator, scope: _CovScope = _LOCAL) -> torch.Tensor:
    """Bool ``[B, T]``: ``max(floor(ratio * N), 1)`` tokens drawn uniformly from the valid tokens with
    ``lb < Cov < ub`` that the PPO clip left alone (verl ``compute_policy_loss_clip_cov``).

    Global scope: ``N`` and the means are over every rank, and the draw is over the candidates of
    every rank in rank order, made by the group's first rank with its ``generator`` and broadcast
    (one all_gather of the candidate counts, one broadcast of the drawn indices).
    """
    cov, n_valid = _cov(lp, adv, valid, scope)
    cand = valid & ~clipped_by_ppo & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    want = max(int(cfg.clip_cov_ratio * n_valid), 1)
    idx = torch.nonzero(cand.reshape(-1)).squeeze(-1)
    sel = torch.zeros(lp.numel(), dtype=torch.bool, device=lp.device)
    gen_device = generator.device if generator is not None else "cpu"
    d = _dist()
    if scope.is_global and d is not None and d.get_world_size(scope.group) > 1:
        counts = [torch.zeros(1, dtype=torch.long, device=lp.device) for _ in range(d.get_world_size(scope.group))]
        d.all_gather(counts, torch.tensor([idx.numel()], dtype=torch.long, device=lp.device), group=scope.group)
        counts = [int(c.item()) for c in counts]
        total, offset = sum(counts), sum(counts[: d.get_rank(scope.group)])
        if total == 0:
            return sel.reshape(lp.shape)
        chosen = torch.empty(min(want, total), dtype=torch.long, device=lp.device)
        if d.get_rank(scope.group) == 0:
            chosen.copy_(torch.randperm(total, generator=generator, device=gen_device)[: chosen.numel()])
        src = 0 if scope.group is None else d.get_global_rank(scope.group, 0)
        d.broadcast(chosen, src=src, group=scope.group)
        mine = chosen[(chosen >= offset) & (chosen < offset + idx.numel())] - offset
        sel[idx[mine]] = True
        return sel.reshape(lp.shape)
    if idx.numel() > 0:
        perm = torch.randperm(idx.numel(), generator=generator, device=gen_device)
        sel[idx[perm[: min(want, idx.numel())].to(idx.device)]] = True
    return sel.reshape(lp.shape)


def _kl_cov_selection(lp, adv, valid, cfg, scope: _CovScope = _LOCAL) -> torch.Tensor:
    """Bool ``[B, T]``: the ``max(floor(ratio * N), 1)`` valid tokens of largest Cov (verl ``kl_cov``);
    global scope: of every rank's valid tokens (their Cov values are gathered: two all_gathers)."""
    cov, n_valid = _cov(lp, adv, valid, scope)
    cov = cov.reshape(-1)
    idx = torch.nonzero(valid.reshape(-1)).squeeze(-1)
    sel = torch.zeros(lp.numel(), dtype=torch.bool, device=lp.device)
    if scope.is_global:
        values, offset = _gather_with_offset(cov[idx], scope.group)
        if values.numel() > 0:
            top = torch.topk(values, max(1, int(n_valid * cfg.kl_cov_ratio)), largest=True).indices
            mine = top[(top >= offset) & (top < offset + idx.numel())] - offset
            sel[idx[mine]] = True
        return sel.reshape(lp.shape)
    if idx.numel() > 0:
        want = max(1, int(idx.numel() * cfg.kl_cov_ratio))
        top = torch.topk(cov[idx], want, largest=True).indices
        sel[idx[top]] = True
    return sel.reshape(lp.shape)

