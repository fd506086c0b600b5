"""Launcher of the GRPO per-token objective kernel (``kernels/objective.py``): allocation, grid, launch.

Inputs are validated and sanitized by ``_grpo``: ``[B, T]`` tensors in the compute dtype (fp32 or
fp64; masked positions finite), advantages and ``is_ratio`` as ``[B, 1]`` or ``[B, T]``, masks bool.
Every loss-type rule (the objective family, whether ``delta`` applies, the luspo weighting, the VESPO
clamps) comes with ``cfg`` (``_grpo.objective_op._Cfg``, whose properties read ``_grpo.losses``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .kernels import objective as K

FAMILY_CODES = {"clipped": K.CLIPPED.value, "cispo": K.CISPO.value, "sapo": K.SAPO.value, "vespo": K.VESPO.value}
MAX_BLOCK_T = 1024


class ObjectiveOut(NamedTuple):
    """Per-row sums ``[B]`` (loss share, masked kl, low and high clip counts) and ``d loss / d logp``
    (``[B, T]``, or None when not asked for)."""

    row_loss: torch.Tensor
    row_kl: torch.Tensor
    row_low: torch.Tensor
    row_high: torch.Tensor
    grad: Optional[torch.Tensor]


def block_t(seqlen: int) -> int:
    return max(16, min(MAX_BLOCK_T, triton.next_power_of_2(max(seqlen, 1))))


def _params(cfg, dtype, device) -> torch.Tensor:
    p = [0.0] * K.N_PARAMS.value
    p[K.P_EPS_LOW.value] = cfg.eps_low
    p[K.P_EPS_HIGH.value] = cfg.eps_high
    p[K.P_DELTA.value] = cfg.delta if cfg.delta is not None else 0.0
    p[K.P_BETA.value] = cfg.beta
    p[K.P_TAU_POS.value] = cfg.tau_pos
    p[K.P_TAU_NEG.value] = cfg.tau_neg
    p[K.P_K_POS.value] = cfg.k_pos
    p[K.P_K_NEG.value] = cfg.k_neg
    p[K.P_LAM_POS.value], p[K.P_LAM_NEG.value] = cfg.vespo_lambdas  # with Liger/TRL's lower bound
    p[K.P_VESPO_LOG_LOW.value] = cfg.vespo_log_low
    return torch.tensor(p, dtype=dtype, device=device)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def launch_objective(lp, old, ref, adv, valid, emask, isr, row_scale, cfg, *, compute_grad: bool) -> ObjectiveOut:
    """Run the kernel over the ``B`` rows. ``cfg`` is ``_grpo._Cfg`` (loss type, level, scalars)."""
    bsz, seqlen = lp.shape
    dt = lp.dtype
    dev = lp.device
    lp = _row_major(lp)
    old = None if old is None else _row_major(old)
    ref = None if ref is None else _row_major(ref)
    adv = _row_major(adv)
    isr = None if isr is None else _row_major(isr)
    mask_u8 = _row_major(valid).view(torch.uint8)
    emask_u8 = None if emask is None else _row_major(emask).view(torch.uint8)
    out = [torch.empty(bsz, dtype=dt, device=dev) for _ in range(4)]
    grad = torch.empty((bsz, seqlen), dtype=dt, device=dev) if compute_grad else None
    if bsz == 0:
        return ObjectiveOut(*out, grad)
    params = _params(cfg, dt, dev)
    row_scale = row_scale.to(dt).contiguous()
    dummy = lp  # never read: the matching HAS_* flag is off
    K.grpo_objective_kernel[(bsz,)](
        lp, old if old is not None else dummy, ref if ref is not None else dummy, adv, mask_u8,
        emask_u8 if emask_u8 is not None else mask_u8, isr if isr is not None else dummy, row_scale, params,
        grad if grad is not None else dummy, *out,
        seqlen,
        lp.stride(0), (old if old is not None else lp).stride(0), (ref if ref is not None else lp).stride(0),
        adv.stride(0), adv.stride(1) if adv.shape[1] != 1 else 0, mask_u8.stride(0),
        (emask_u8 if emask_u8 is not None else mask_u8).stride(0),
        isr.stride(0) if isr is not None else 0, (isr.stride(1) if isr.shape[1] != 1 else 0) if isr is not None else 0,
        grad.stride(0) if grad is not None else 0,
        LOSS=FAMILY_CODES[cfg.family],
        SEQUENCE=cfg.sequence,
        HAS_OLD=old is not None,
        HAS_KL=cfg.beta != 0.0,
        BIAS_CORR=cfg.bias_corr,
        HAS_DELTA=cfg.has_delta,
        HAS_ISR=isr is not None,
        HAS_EMASK=emask is not None,
        MASK_WEIGHTED=cfg.mask_weighted,
        COMPUTE_GRAD=compute_grad,
        DTYPE=tl.float64 if dt == torch.float64 else tl.float32,
        BLOCK_T=block_t(seqlen),
        num_warps=8 if block_t(seqlen) >= 1024 else (4 if block_t(seqlen) >= 256 else 2),
    )
    return ObjectiveOut(*out, grad)
