"""Sampling-consistent log-probs (issue 16): vLLM's top-k / top-p / min-p truncation, materialized in fp64.

The spec the fused ``sampling_top_k`` / ``sampling_top_p`` / ``sampling_min_p`` outputs of
``fused_entropy.linear_logprobs`` / ``logprobs_from_logits`` are tested against. It builds the full
``[..., V]`` logits on purpose, computes everything in fp64 with plain torch ops and lets autograd
give the gradients. Never edit this file to agree with a kernel.

Sources (vLLM, ``vllm-project/vllm``; read at commit 01fa3fe74b058bb604f236341ab2361c7cf3d25b for
``topk_topp_sampler.py`` and 3e342658b2e9c85a30a54d19e64e5ad77b8a26a6 for ``sampler.py``):

- ``vllm/v1/sample/sampler.py`` (``Sampler.sample``): temperature first, then the argmax-invariant
  logits processors (min-p), then top-k and/or top-p (``TopKTopPSampler``);
- ``vllm/v1/sample/logits_processor/builtin.py`` (``MinPLogitsProcessor.apply``): softmax of the
  full row, drop tokens with ``p_j < min_p * max_j p_j``;
- ``vllm/v1/sample/ops/topk_topp_sampler.py`` (``apply_top_k_top_p_pytorch``): sort ascending;
  top-k masks every logit strictly below the k-th largest (all ties at the boundary survive); top-p
  takes the softmax of the sorted (top-k masked) logits, its inclusive cumulative sum, drops the
  positions whose cumulative sum is ``<= 1 - p`` and always keeps the last (largest) position.

Order here: ``z = logits / temperature``; min-p as the logit threshold ``z_j >= max(z) + log(min_p)``
(the same set as vLLM's probability comparison up to rounding; ``min_p = 0`` keeps every finite
logit); top-k ``z_j >= z_(k)`` on the min-p
survivors; top-p on the softmax renormalized over the survivors of both.

Tie convention for top-p (vLLM sorts with an unstable sort, so which of several equal logits it
keeps is arbitrary): a group of equal logits is kept or dropped as a whole. The group at value ``v``
is kept iff the renormalized mass of the surviving tokens with ``z <= v`` is ``> 1 - p`` -- vLLM's
rule applied to the group's last member in ascending order, i.e. the mass strictly above ``v`` is
``< p``. The group holding the largest logit is always kept; ``p = 1`` keeps every finite logit
(vLLM's ``cumsum <= 0`` would also drop probabilities that underflow to exactly 0: no effect on
``q``, only on the log-prob of such a target).

Outputs (shape of ``targets``, fp64): ``truncated_logprobs`` ``log q_y`` with ``q`` the softmax over
the kept set (``-inf`` with zero gradient when ``y`` is not kept), ``log_kept_mass`` ``log S`` with
``S`` the full-softmax mass of the kept set, ``truncated_entropy`` the entropy of ``q``; all three 0
on rows whose target is ``ignore_index``. ``kept``: the bool ``[..., V]`` mask (computed without
gradient: the kept set is piecewise constant in the logits; a logit of ``-inf`` is never kept).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

Param = Union[None, int, float, torch.Tensor]


def _row_param(name: str, value: Param, targets: torch.Tensor, *, integer: bool) -> Optional[torch.Tensor]:
    """None, or the parameter as a ``targets.shape + (1,)`` tensor (fp64, or int64 for top-k)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or (integer and value.dtype.is_floating_point):
            raise ValueError(f"{name} must be {'an integer' if integer else 'a real'} tensor, got {value.dtype}")
        try:
            t = torch.broadcast_to(value, targets.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to targets {tuple(targets.shape)}")
        t = t.to(device=targets.device, dtype=torch.int64 if integer else torch.float64)
    else:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not isinstance(value, numbers.Integral)):
            raise ValueError(f"{name} must be {'an int' if integer else 'a float'}, got {value!r}")
        t = torch.full(targets.shape, value, dtype=torch.int64 if integer else torch.float64, device=targets.device)
    if not integer and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} must not be NaN")
    return t.unsqueeze(-1)


@torch.no_grad()
def sampling_kept_mask(z: torch.Tensor, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """The kept set of vLLM's min-p -> top-k -> top-p on transformed logits ``z [..., V]`` (fp64).

    ``top_k``/``top_p``/``min_p``: None or tensors of shape ``z.shape[:-1] + (1,)``.
    """
    z = z.detach().to(torch.float64)
    vocab = z.shape[-1]
    keep = z > -math.inf
    neg_inf = torch.full_like(z, -math.inf)
    if min_p is not None:
        # vLLM: p_j < min_p * max p  is dropped; as a logit threshold: z_j >= max z + log(min_p)
        zmax = z.amax(-1, keepdim=True)
        keep &= (z >= zmax + torch.log(min_p)) | (min_p <= 0)
    if top_k is not None:
        zm = torch.where(keep, z, neg_inf)
        desc = zm.sort(dim=-1, descending=True).values
        kth = desc.gather(-1, (top_k.clamp(1, vocab) - 1))
        keep &= zm >= kth  # every logit equal to the k-th largest survives
    if top_p is not None:
        zm = torch.where(keep, z, neg_inf)
        lead = zm.shape[:-1]
        flat = zm.reshape(-1, vocab)
        asc, idx = flat.sort(dim=-1, stable=True)  # vLLM: logits.sort(dim=-1, descending=False)
        probs = asc.softmax(dim=-1)  # renormalized over the min-p / top-k survivors
        cum = probs.cumsum(dim=-1)
        # tie groups: every member takes the cumulative sum at the group's last (largest) position
        last = torch.searchsorted(asc.contiguous(), asc.contiguous(), right=True) - 1
        group_cum = cum.gather(-1, last)
        p = top_p.reshape(-1, 1)
        drop = (group_cum <= 1 - p) & (p < 1)  # p = 1 keeps everything (also probabilities that underflow to 0)
        drop &= asc != asc[:, -1:]  # "at least one": the group of the largest logit is always kept
        keep_p = torch.empty_like(drop).scatter_(-1, idx, ~drop)
        keep &= keep_p.reshape(*lead, vocab)
    return keep


def sampling_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Param = None,
    top_p: Param = None,
    min_p: Param = None,
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(truncated_logprobs, log_kept_mass, truncated_entropy, kept)`` for logits ``[..., V]``.

    ``top_k`` (int >= 1), ``top_p`` (in (0, 1]) and ``min_p`` (in [0, 1]) are each None, a Python
    scalar or a tensor broadcastable to ``targets.shape`` (per-row values). Differentiable w.r.t.
    ``logits`` with the kept set held fixed. See the module docstring for the semantics.
    """
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError("logits must be a floating tensor")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    k = _row_param("top_k", top_k, targets, integer=True)
    p = _row_param("top_p", top_p, targets, integer=False)
    mp = _row_param("min_p", min_p, targets, integer=False)
    if k is not None and bool((k < 1).any()):
        raise ValueError("top_k must be >= 1")
    if p is not None and bool(((p <= 0) | (p > 1)).any()):
        raise ValueError("top_p must be in (0, 1]")
    if mp is not None and bool(((mp < 0) | (mp > 1)).any()):
        raise ValueError("min_p must be in [0, 1]")

    z = logits.to(torch.float64) / temperature
    kept = sampling_kept_mask(z, k, p, mp)
    neg_inf = torch.full_like(z, -math.inf)
    zk = torch.where(kept, z, neg_inf)

    lse_full = torch.logsumexp(z, dim=-1)
    lse_kept = torch.logsumexp(zk, dim=-1)
    log_kept_mass = lse_kept - lse_full

    q = torch.softmax(zk, dim=-1)
    z_kept_finite = torch.where(kept, z, torch.zeros_like(z))
    truncated_entropy = lse_kept - (q * z_kept_finite).sum(-1)

    valid = targets != ignore_index
    y = torch.where(valid, targets, torch.zeros_like(targets)).long()
    y_kept = kept.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    # a target outside the kept set reads a kept token's value (finite), then is replaced by -inf:
    # its gradient is 0, never NaN
    any_kept = kept.long().argmax(-1)
    y_safe = torch.where(y_kept, y, any_kept)
    lp = z.gather(-1, y_safe.unsqueeze(-1)).squeeze(-1) - lse_kept
    truncated_logprobs = torch.where(y_kept, lp, torch.full_like(lp, -math.inf))

    zero = torch.zeros_like(lp)
    return (
        torch.where(valid, truncated_logprobs, zero),
        torch.where(valid, log_kept_mass, zero),
        torch.where(valid, truncated_entropy, zero),
        kept,
    )
