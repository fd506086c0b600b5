"""Functional API: per-token log-probs and entropies without materializing ``[N, V]`` logits.

Math (MATH.md sections 1-3), per token row with hidden state ``h`` and target ``y``::

    z_v   = softcap(logit_scale * (h . W_v + b_v)) / temperature
    lse   = log sum_v exp(z_v)
    logp  = z_y - lse
    H     = -sum_v p_v log p_v,                 p_v = exp(z_v - lse)
    H~    = -sum_{v in S} pi_v log pi_v,         S = the k largest z, pi = softmax over S

Rows whose target equals ``ignore_index`` give 0 and get no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _validate as V
from ._autograd import LinearLogprobsFunction, LogprobsFromLogitsFunction
from ._types import LogitTransform, TokenStats
from .backends import get_backend


def _finish(outs, lead_shape, entropy: bool, has_k: bool) -> TokenStats:
    logp, ent, clamped = outs
    return TokenStats(
        logp.reshape(lead_shape),
        ent.reshape(lead_shape) if entropy else None,
        clamped.reshape(lead_shape) if has_k else None,
    )


def _check_transform(temperature, softcap, logit_scale) -> LogitTransform:
    V.check_positive_finite("temperature", temperature)
    V.check_positive_finite("softcap", softcap, allow_none=True)
    V.check_finite("logit_scale", logit_scale)
    return LogitTransform(float(temperature), None if softcap is None else float(softcap), float(logit_scale))


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
    backend: str = "auto",
) -> TokenStats:
    """Fused LM head + log-softmax: per-token log-prob, entropy and clamped entropy.

    Args:
        hidden: ``[..., H]`` hidden states (fp16, bf16, fp32 or fp64).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature, softcap, logit_scale: the logit transform above (runtime scalars).
        entropy: also return the full entropy ``H``.
        topk / clamp_p: also return the clamped entropy over the ``topk`` largest logits, or over
            all but the ``floor(clamp_p * V)`` lowest (AEnt). At most one of them.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.

    Returns:
        ``TokenStats(logprobs, entropy, clamped_entropy)``: fp32 (fp64 for fp64 inputs) tensors of
        shape ``targets.shape``, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
        Working memory is ``O(N)`` statistics plus bounded tiles; no ``[N, V]`` buffer.
    """
    V.check_tensor("hidden", hidden, floating=True)
    V.check_tensor("weight", weight, floating=True)
    V.check_tensor("targets", targets, integer=True)
    if bias is not None:
        V.check_tensor("bias", bias, floating=True)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    vocab, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden has H={hidden.shape[-1]} (shape {tuple(hidden.shape)}) but weight has H={h} (shape {tuple(weight.shape)})")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape [V]=({vocab},), got {tuple(bias.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
    if vocab == 0:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    V.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    tf = _check_transform(temperature, softcap, logit_scale)
    k = V.resolve_k(topk, clamp_p, vocab)
    be = get_backend(backend, hidden.device)
    V.check_targets_range(targets, vocab, ignore_index)

    lead = targets.shape
    x = hidden.reshape(-1, h).contiguous()
    y = targets.reshape(-1).long().contiguous()
    outs = LinearLogprobsFunction.apply(
        x, weight.contiguous(), None if bias is None else bias.contiguous(), y, tf, int(ignore_index), bool(entropy), k, be
    )
    return _finish(outs, lead, bool(entropy), k is not None)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    entropy: bool = True,
    topk: Optional[int] = None,
    clamp_p: Optional[float] = None,
    backend: str = "auto",
) -> TokenStats:
    """Per-token log-prob, entropy and clamped entropy from logits ``[..., V]`` already in memory.

    ``z = logits / temperature``; same outputs and options as :func:`linear_logprobs`. The
    backward pass writes the logits gradient directly and allocates nothing else of size ``[N, V]``.
    """
    V.check_tensor("logits", logits, floating=True)
    V.check_tensor("targets", targets, integer=True)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V], got a 0-d tensor")
    vocab = logits.shape[-1]
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(targets.shape)}")
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension (V >= 1)")
    V.check_same_device(logits=logits, targets=targets)
    tf = _check_transform(temperature, None, 1.0)
    k = V.resolve_k(topk, clamp_p, vocab)
    be = get_backend(backend, logits.device)
    V.check_targets_range(targets, vocab, ignore_index)

    lead = targets.shape
    z = logits.reshape(-1, vocab).contiguous()
    y = targets.reshape(-1).long().contiguous()
    outs = LogprobsFromLogitsFunction.apply(z, y, tf, int(ignore_index), bool(entropy), k, be)
    return _finish(outs, lead, bool(entropy), k is not None)

# GRPO-family losses on per-token tensors (MATH.md sections 4-6); implementation in _grpo.py.
from ._grpo import GRPONormalizers, grpo_loss, grpo_loss_and_grads, grpo_normalizers  # noqa: E402
