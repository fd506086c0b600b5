"""The loss-type table: one row per GRPO-family loss type, and every rule that depends on the type.

The rest of the package asks this table (never a literal list of names) which per-token objective a
type has, how it aggregates, which clip flags it reports, whether ``delta`` applies, whether it takes
sequence-level importance sampling and whether it needs the whole micro-batch in one call.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple


class LossType(NamedTuple):
    """One loss type (MATH.md section 4).

    family: the per-token objective ``l``: ``"clipped"`` (PPO surrogate), ``"cispo"``, ``"sapo"``,
        ``"vespo"`` or ``"kl_cov"``; clip_cov is the clipped surrogate with tokens dropped.
    aggregation: the weight ``c[b, t]`` (the ``_grpo`` package docstring): ``"row_mean"``
        ``M / (max(n_b, 1) * B)``, ``"token_mean"`` ``M / max(sum M, 1)``, ``"max_length"``
        ``M / (B * max_completion_length)``, ``"items"`` ``M / N_items``, ``"luspo"`` (Liger: ``n_b / (B*T)``
        on every position; TRL: ``M / B``).
    clip_metric: the flags counted by the ``clip_ratio/*`` metrics: ``"low_high"``, ``"high"`` or
        ``"none"`` (Liger's choice per type).
    delta: the two-sided ``delta`` clamp of ``r`` applies.
    sequence: ``importance_sampling_level="sequence"`` is accepted by ``grpo_loss``.
    sequence_liger: ... by ``LinearGRPOLoss`` (Liger 0.8.5's forward rejects cispo, sapo, vespo).
    whole_batch: picks tokens from statistics of the whole micro-batch (Clip-Cov/KL-Cov): no chunks,
        no single pass, and the torch objective on every device.
    whole_sequences: a token's gradient depends on its whole row even at token level (vespo's weight
        sums ``log r`` over the row), so chunks hold whole sequences.
    """

    family: str
    aggregation: str
    clip_metric: str
    delta: bool
    sequence: bool
    sequence_liger: bool
    whole_batch: bool
    whole_sequences: bool


#                    family      aggregation   clip_metric  delta  seq    seq_liger whole_b whole_seq
LOSSES: Dict[str, LossType] = {
    "grpo":     LossType("clipped", "row_mean",   "low_high", True,  True,  True,  False, False),
    "bnpo":     LossType("clipped", "token_mean", "low_high", True,  True,  True,  False, False),
    "dr_grpo":  LossType("clipped", "max_length", "low_high", True,  True,  True,  False, False),
    "dapo":     LossType("clipped", "items",      "low_high", True,  True,  True,  False, False),
    "cispo":    LossType("cispo",   "items",      "high",     False, True,  False, False, False),
    "sapo":     LossType("sapo",    "row_mean",   "none",     False, True,  False, False, False),
    "luspo":    LossType("clipped", "luspo",      "low_high", True,  True,  True,  False, False),
    "vespo":    LossType("vespo",   "items",      "none",     False, True,  False, False, True),
    "clip_cov": LossType("clipped", "items",      "low_high", False, False, False, True,  False),
    "kl_cov":   LossType("kl_cov",  "items",      "none",     False, False, False, True,  False),
}

LOSS_TYPES = tuple(LOSSES)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ENTROPY_SOURCES = ("full", "clamped")
BONUS_NORMALIZATIONS = ("auto", "mean")
LUSPO_NORMALIZATIONS = ("liger", "trl")
COV_STATISTICS = ("local", "global")
GRPO_BACKENDS = ("auto", "torch", "triton")

# Names other modules use, derived from the table.
CLIPPED = tuple(n for n, r in LOSSES.items() if r.delta)  # the PPO clipped surrogate with delta
TOKEN_NORMALIZED = tuple(n for n, r in LOSSES.items() if r.aggregation == "items")  # DAPO's N_items
COV_TYPES = tuple(n for n, r in LOSSES.items() if r.whole_batch)
KERNEL_LOSS_TYPES = tuple(n for n, r in LOSSES.items() if not r.whole_batch)  # the Triton objective's

# VESPO clamps, as in TRL/Liger get_gamma_weights.
VESPO_LOG_LOW = math.log(1e-8)
VESPO_LOG_HIGH = 20.0
VESPO_LOG_RATIO_CLAMP = 20.0
VESPO_LAMBDA_MIN = 1e-4


def whole_sequences(loss_type: str, importance_sampling_level: str) -> bool:
    """The sequence-level rule: chunks of the fused head must hold whole sequences (GSPO, vespo)."""
    return importance_sampling_level == "sequence" or LOSSES[loss_type].whole_sequences
