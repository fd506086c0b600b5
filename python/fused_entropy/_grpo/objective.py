"""The per-token GRPO objective: policy + KL part of the loss and the clip-flag sums, in torch
(autograd-friendly ops) or through the Triton kernel (``kernels/objective.py``, one launch per call, as
the custom op ``fused_entropy::grpo_objective`` of ``objective_op``, whose flat configuration ``_Cfg`` both
take).
"""
from __future__ import annotations

from typing import Dict

import torch

from .cov import _LOCAL, _clip_cov_selection, _CovScope, _kl_cov_selection
from .losses import LOSSES, VESPO_LOG_HIGH, VESPO_LOG_LOW, VESPO_LOG_RATIO_CLAMP
from .normalizers import GRPONormalizers
from .objective_op import _Cfg, grpo_objective  # noqa: F401 (_Cfg re-exported)


def _token_weight(valid_f: torch.Tensor, cfg: _Cfg, norms: GRPONormalizers) -> torch.Tensor:
    """``c[b, t]`` of the ``_grpo`` docstring, ``[B, T]``."""
    n_row = valid_f.sum(-1, keepdim=True)
    if LOSSES[cfg.loss_type].aggregation == "row_mean":
        return valid_f / (n_row.clamp(min=1.0) * norms.policy_denom)
    if not cfg.mask_weighted:
        return (n_row / norms.policy_denom).expand_as(valid_f)
    return valid_f / norms.policy_denom


def _row_scale(valid_f: torch.Tensor, cfg: _Cfg, norms: GRPONormalizers) -> torch.Tensor:
    """Per-row factor of ``c`` (``[B]``): ``c[b, t] = row_scale[b] * (M[b, t], or 1 for luspo-liger)``."""
    n_row = valid_f.sum(-1)
    if LOSSES[cfg.loss_type].aggregation == "row_mean":
        return 1.0 / (n_row.clamp(min=1.0) * norms.policy_denom)
    if not cfg.mask_weighted:
        return n_row / norms.policy_denom
    return (1.0 / norms.policy_denom).expand_as(n_row).contiguous()


def _pick(cond: torch.Tensor, a: float, b: float, like: torch.Tensor) -> torch.Tensor:
    """``where(cond, a, b)`` in the dtype of ``like`` (two Python floats would give fp32)."""
    full = lambda v: torch.full((), v, dtype=like.dtype, device=like.device)  # noqa: E731
    return torch.where(cond, full(a), full(b))


def _vespo_phi(log_r, valid_f, adv, isr, cfg: _Cfg) -> torch.Tensor:
    """Detached VESPO weight ``phi`` (``[B, 1]`` or ``[B, T]`` for per-token advantages)."""
    with torch.no_grad():
        seq = (log_r.clamp(-VESPO_LOG_RATIO_CLAMP, VESPO_LOG_RATIO_CLAMP) * valid_f).sum(-1, keepdim=True)
        if isr is not None:
            # Liger/TRL sum log(is) over every position of the row, masked or not.
            seq = seq + torch.log(isr).clamp(VESPO_LOG_LOW, VESPO_LOG_HIGH).sum(-1, keepdim=True)
        log_w = seq.clamp(VESPO_LOG_LOW, VESPO_LOG_HIGH)
        w = torch.exp(log_w)
        nonneg = adv >= 0
        lam_pos, lam_neg = cfg.vespo_lambdas
        k = _pick(nonneg, cfg.k_pos, cfg.k_neg, log_w)
        lam = _pick(nonneg, lam_pos, lam_neg, log_w)
        phi = torch.exp(lam + k * log_w - lam * w)
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def _objective_torch(lp, old, ref, adv, valid, emask, isr, cfg: _Cfg, norms: GRPONormalizers, generator,
                     cov_scope: _CovScope = _LOCAL):
    """Policy + KL part of the loss and the per-row metric sums, by autograd-friendly torch ops.

    Returns ``(loss, sums)`` with ``sums`` a dict of 0-d tensors: kl, low, high, region (masked sums,
    not yet divided by ``metric_denom``) and, for the Cov types, ``selected``.
    """
    valid_f = valid.to(lp.dtype)
    old_ = lp.detach() if old is None else old
    log_r = lp - old_
    if cfg.sequence:
        w = (log_r * valid_f).sum(-1, keepdim=True) / valid_f.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        w = log_r
    coef_1 = torch.exp(w)
    zeros = torch.zeros_like(coef_1, dtype=torch.bool)
    low = high = zeros
    sums: Dict[str, torch.Tensor] = {}
    lt, row = cfg.loss_type, LOSSES[cfg.loss_type]
    if row.clip_metric != "none":
        upper = cfg.eps_high if row.family == "cispo" else 1.0 + cfg.eps_high  # cispo caps r at eps_high itself
        high = (coef_1 > upper) & (adv > 0)
    if row.clip_metric == "low_high":
        low = (coef_1 < 1.0 - cfg.eps_low) & (adv < 0)
    if row.family == "clipped":
        coef_2 = coef_1.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        c1 = coef_1.clamp(max=cfg.delta) if cfg.has_delta else coef_1
        ell = -torch.min(c1 * adv, coef_2 * adv)
        if lt == "clip_cov":
            clipped_by_ppo = ((-adv * coef_2) > (-adv * coef_1)) & valid
            sel = _clip_cov_selection(lp, adv, valid, clipped_by_ppo, cfg, generator, cov_scope)
            ell = torch.where(sel, torch.zeros_like(ell), ell)
            sums["selected"] = sel.sum().to(lp.dtype)
    elif row.family == "cispo":
        ell = -coef_1.clamp(max=cfg.eps_high).detach() * adv * lp
    elif row.family == "sapo":
        tau = _pick(adv > 0, cfg.tau_pos, cfg.tau_neg, coef_1)
        ell = -torch.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau * adv
    elif row.family == "vespo":
        ell = -_vespo_phi(log_r, valid_f, adv, isr, cfg) * adv * lp
    else:  # kl_cov
        sel = _kl_cov_selection(lp, adv, valid, cfg, cov_scope)
        ell = -adv * coef_1 + torch.where(sel, cfg.ppo_kl_coef * log_r.abs(), torch.zeros_like(log_r))
        sums["selected"] = sel.sum().to(lp.dtype)
    ell = ell.expand_as(lp)
    if emask is not None:
        ell = ell * emask.to(lp.dtype)
    if isr is not None and row.family != "vespo":  # vespo folds is into its weight
        ell = ell * isr
    if cfg.beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1.0
        if cfg.bias_corr:
            kl = kl * coef_1
        ell = ell + cfg.beta * kl
        sums["kl"] = (kl.detach() * valid_f).sum()
    loss = (ell * _token_weight(valid_f, cfg, norms)).sum()
    region = low | high
    for name, flag in (("low", low), ("high", high), ("region", region)):
        sums[name] = (flag.expand_as(lp).to(lp.dtype) * valid_f).sum()
    return loss, sums


def _objective_triton(lp, old, ref, adv, valid, emask, isr, cfg: _Cfg, norms: GRPONormalizers):
    """Same contract as :func:`_objective_torch`, computed by the Triton kernel."""
    row_scale = _row_scale(valid.to(lp.dtype), cfg, norms)
    compute_grad = torch.is_grad_enabled() and lp.requires_grad  # evaluation writes no gradient
    # a custom op: opaque to torch.compile
    loss, kl, low, high = grpo_objective(lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad)
    sums = {"low": low, "high": high, "region": low + high}  # low needs A < 0, high A > 0: disjoint
    if cfg.beta != 0.0:
        sums["kl"] = kl
    return loss, sums
