"""Materialized-logits implementations of MATH.md sections 1-3 in plain torch: the spec.

These build the full ``[N, V]`` logits on purpose. They compute in the dtype of their inputs
for the matrix product (pass fp64 tensors for a gold result; pass bf16 tensors to get what plain
torch does at that precision) and in at least fp32 for everything after it. Autograd gives the
gradients. Never edit this file to agree with a kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._types import TokenStats, clamp_p_to_k


def transform_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """``softcap(logit_scale * logits) / temperature`` in at least fp32."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _entropy_of(z: torch.Tensor) -> torch.Tensor:
    """-sum p log p along the last dim, = lse - sum p z; entries at -inf have p = 0."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    z_finite = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return lse.squeeze(-1) - (p * z_finite).sum(-1)


def _clamped_entropy_of(z: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the softmax renormalised over the k largest entries (MATH.md section 3)."""
    top = torch.topk(z, k, dim=-1).values
    return _entropy_of(top)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = True,
    topk: Optional[int] = None,
    clamp_p: Optional[float] = None,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
) -> TokenStats:
    """Reference for ``fused_entropy.logprobs_from_logits`` (logits ``[..., V]``)."""
    z = transform_logits(logits, temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(logp)
    out_logp = torch.where(valid, logp, zero)
    out_ent = torch.where(valid, _entropy_of(z), zero) if entropy else None
    k = topk
    if clamp_p is not None:
        k = clamp_p_to_k(clamp_p, z.shape[-1])
    out_clamped = torch.where(valid, _clamped_entropy_of(z, k), zero) if k is not None else None
    return TokenStats(out_logp, out_ent, out_clamped)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = True,
    topk: Optional[int] = None,
    clamp_p: Optional[float] = None,
) -> TokenStats:
    """Reference for ``fused_entropy.linear_logprobs``: materializes ``hidden @ weight.T``."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits(
        logits,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        entropy=entropy,
        topk=topk,
        clamp_p=clamp_p,
        softcap=softcap,
        logit_scale=logit_scale,
    )
