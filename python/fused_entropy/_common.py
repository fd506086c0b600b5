"""Leaf definitions every layer may import (it imports nothing from the package).

``IGNORE_INDEX``: the target id of a skipped row that the backends get when the caller passed
``ignore_index=None`` (then every target is range-checked first) and that ``LinearGRPOLoss`` writes
for masked tokens. ``compute_dtype``: the dtype of row statistics, accumulators and the torch
backend's blocks. ``interpreting``: whether Triton runs kernels on CPU tensors (``TRITON_INTERPRET``).
``zero_neg_inf`` and ``nan_clamped``: the two rules for non-finite rows that several paths share
(docs/MATH.md section 2).
"""
from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, fp32 for every other (fp16, bf16, fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def zero_neg_inf(t: torch.Tensor) -> torch.Tensor:
    """``t`` with -inf (the max of a row whose logits are all -inf) replaced by 0, so that
    differences with it are never -inf - -inf; NaN and +inf are kept: such a row is NaN throughout,
    as in ``torch.log_softmax``."""
    return torch.where(t == -torch.inf, torch.zeros_like(t), t)


def nan_clamped(log_s: torch.Tensor, log_s_clamped: torch.Tensor, clamped_entropy: torch.Tensor,
                valid: torch.Tensor):
    """``(log_s_clamped, clamped_entropy)`` set to NaN on the rows whose full ``log_s`` is NaN (a NaN
    or +inf logit; the entropy only where ``valid``, ignored rows stay 0). The radix select alone
    cannot guarantee it: a NaN's key sorts above +inf or below -inf by its sign bit."""
    nan_rows = torch.isnan(log_s)
    return torch.where(nan_rows, log_s, log_s_clamped), torch.where(nan_rows & valid, log_s, clamped_entropy)
