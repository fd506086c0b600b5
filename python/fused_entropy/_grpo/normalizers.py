"""Batch-wide denominators of the GRPO losses and the 80/20 entropy mask, with their collectives.

A chunk of whole sequences given the :class:`GRPONormalizers` of its batch gets its exact share of the
batch loss; the token count of the DAPO types is all-reduced and the 80/20 entropies are gathered over
the data-parallel group (nothing is reduced in a single process).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .. import _validate as V
from .._common import compute_dtype as _compute_dtype
from .inputs import _check_bt
from .losses import BONUS_NORMALIZATIONS, LOSS_TYPES, LOSSES, LUSPO_NORMALIZATIONS
from .options import _check_choice, _check_max_completion_length, _check_num_items, _check_quantile


class GRPONormalizers(NamedTuple):
    """Batch-wide denominators, so a chunk of whole sequences gives its exact share of the batch loss.

    ``policy_denom``: divides ``sum c * l`` (see the ``_grpo`` docstring; for grpo/sapo the per-row
    ``1 / max(n_b, 1)`` is applied on top, for luspo(liger) the per-row ``n_b``).
    ``metric_denom``: ``max(sum M, 1)`` for the masked-mean metrics (kl, clip ratios, entropies).
    ``bonus_denom``: ``max(sum M_eff, 1)`` for the entropy bonus (``N_items`` for the token-normalized
    types given ``num_items_in_batch``, see ``grpo_loss``).
    ``entropy_threshold``: the 80/20 threshold (a 0-d tensor) or None when ``top_entropy_quantile == 1``.
    All are 0-d fp32 tensors (fp64 when the batch is fp64) on the batch device.
    """

    policy_denom: torch.Tensor
    metric_denom: torch.Tensor
    bonus_denom: torch.Tensor
    entropy_threshold: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)
# ---------------------------------------------------------------------------------------------


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _world_size(group=None) -> int:
    d = _dist()
    return d.get_world_size(group) if d is not None else 1


def _check_dp_group(dp_group) -> None:
    if dp_group is not None and _dist() is None:
        raise ValueError("dp_group was given but torch.distributed is not initialized")


def _gather_values(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length over the ranks of ``group`` (rank order; None: the world)."""
    return _gather_with_offset(x, group)[0]


def _gather_with_offset(x: torch.Tensor, group=None):
    """``(concatenation over the ranks of group, where this rank's part starts in it)``."""
    d = _dist()
    if d is None or d.get_world_size(group) == 1:
        return x, 0
    n = torch.tensor([x.numel()], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(d.get_world_size(group))]
    d.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    width = max(sizes)
    padded = x.new_zeros(width)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    d.all_gather(parts, padded, group=group)
    offset = sum(sizes[: d.get_rank(group)])
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), offset


def _all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    d = _dist()
    if d is not None:
        d.all_reduce(t, group=group)
    return t


# ---------------------------------------------------------------------------------------------
# the 80/20 mask
# ---------------------------------------------------------------------------------------------


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for a 1-D tensor of any length.

    ``torch.quantile`` refuses inputs above 2^24 elements (TRL's 80/20 mask fails there), so this
    selects the two order statistics with ``kthvalue`` and interpolates between them. ``values`` must
    be non-empty.
    """
    n = values.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v = values.reshape(-1)
    v_lo = torch.kthvalue(v, lo + 1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = torch.kthvalue(v, hi + 1).values
    return torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=v.dtype, device=v.device))


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float,
                      dp_group=None) -> torch.Tensor:
    """The ``(1 - q)`` quantile of the entropies of the valid tokens, gathered over the ranks of
    ``dp_group`` (None: every rank, when ``torch.distributed`` is initialized).

    Returns a 0-d tensor; ``+inf`` when no rank has a valid token (then the 80/20 mask is empty).
    """
    _check_quantile(top_entropy_quantile)
    _check_dp_group(dp_group)
    valid = entropy.detach()[mask.bool()]
    valid = valid.to(_compute_dtype(entropy.dtype))
    gathered = _gather_values(valid, dp_group)
    if gathered.numel() == 0:
        return torch.full((), math.inf, dtype=valid.dtype, device=entropy.device)
    return quantile_threshold(gathered, 1.0 - top_entropy_quantile)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: valid tokens whose entropy is at or above ``threshold``."""
    return (entropy.detach().to(threshold.dtype) >= threshold) & mask.bool()



def grpo_normalizers(
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    luspo_normalization: str = "liger",
    top_entropy_quantile: float = 1.0,
    entropy: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    dp_group=None,
    bonus_normalization: str = "auto",
) -> GRPONormalizers:
    """Denominators of the whole batch, for calling :func:`grpo_loss` on chunks of whole sequences.

    Args:
        mask: ``[B, T]`` loss mask of the whole (micro-)batch.
        loss_type, max_completion_length, num_items_in_batch, luspo_normalization: as in ``grpo_loss``.
        top_entropy_quantile: when < 1, ``entropy`` (``[B, T]``, the entropy the 80/20 mask is built from,
            i.e. the bonus entropy) of the whole batch is needed for the threshold and ``sum M_eff``.
        dtype: fp32 or fp64 (the compute dtype of the loss).
        dp_group: the data-parallel ``torch.distributed`` group the DAPO token count is all-reduced
            and the 80/20 entropies are gathered over (None: every rank, when initialized).
        bonus_normalization: as in ``grpo_loss`` (the denominator of the entropy bonus).

    Returns:
        :class:`GRPONormalizers`. ``grpo_loss(chunk..., normalizers=n)`` over the chunks of the batch
        sums to ``grpo_loss(batch...)`` (loss and every metric except ``entropy_coef``).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("luspo_normalization", luspo_normalization, LUSPO_NORMALIZATIONS)
    _check_max_completion_length(loss_type, max_completion_length)
    _check_num_items(num_items_in_batch)
    _check_quantile(top_entropy_quantile)
    _check_choice("bonus_normalization", bonus_normalization, BONUS_NORMALIZATIONS)
    V.check_mask("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {tuple(mask.shape)}")
    if top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the entropy of the whole batch (entropy=...)")
        _check_bt("entropy", entropy, tuple(mask.shape))
    _check_dp_group(dp_group)
    return _normalizers(mask.bool(), loss_type, max_completion_length, num_items_in_batch, luspo_normalization,
                        top_entropy_quantile, entropy, _compute_dtype(dtype), dp_group, bonus_normalization)


def _bonus_uses_policy_denom(loss_type, num_items_in_batch, bonus_normalization) -> bool:
    """The window-exact rule: a token-normalized loss given ``num_items_in_batch`` divides the bonus
    by the policy term's ``N_items`` (so micro-batches of an accumulation window add up)."""
    return (bonus_normalization == "auto" and LOSSES[loss_type].aggregation == "items"
            and num_items_in_batch is not None)


def _normalizers(valid, loss_type, max_completion_length, num_items_in_batch, luspo_normalization,
                 top_entropy_quantile, entropy, cdt, group=None, bonus_normalization="auto") -> GRPONormalizers:
    dev = valid.device
    bsz, seqlen = valid.shape
    n_valid = valid.sum().to(cdt)
    one = torch.ones((), dtype=cdt, device=dev)
    aggregation = LOSSES[loss_type].aggregation
    if aggregation == "row_mean":
        policy = one * max(bsz, 1)
    elif aggregation == "token_mean":
        policy = n_valid.clamp(min=1.0)
    elif aggregation == "max_length":
        policy = one * max(bsz * max_completion_length, 1)
    elif aggregation == "items":
        world = _world_size(group)
        if num_items_in_batch is not None:
            items = torch.as_tensor(num_items_in_batch, device=dev).reshape(()).to(cdt)
        else:
            items = _all_reduce_sum(n_valid.clone(), group)
        policy = (items / world).clamp(min=1.0)
    elif luspo_normalization == "liger":
        policy = one * max(bsz * seqlen, 1)
    else:
        policy = one * max(bsz, 1)
    metric = n_valid.clamp(min=1.0)
    threshold = None
    bonus = metric
    if top_entropy_quantile < 1.0:
        threshold = entropy_threshold(entropy, valid, top_entropy_quantile, group).to(cdt)
        bonus = high_entropy_mask(entropy, valid, threshold).sum().to(cdt).clamp(min=1.0)
    if _bonus_uses_policy_denom(loss_type, num_items_in_batch, bonus_normalization):
        bonus = policy
    return GRPONormalizers(policy, metric, bonus, threshold)
