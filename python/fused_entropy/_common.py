"""Leaf definitions every layer may import (it imports nothing from the package).

``IGNORE_INDEX``: the target id of a skipped row that the backends get when the caller passed
``ignore_index=None`` (then every target is range-checked first) and that ``LinearGRPOLoss`` writes
for masked tokens. ``compute_dtype``: the dtype of row statistics, accumulators and the torch
backend's blocks. ``interpreting``: whether Triton runs kernels on CPU tensors (``TRITON_INTERPRET``).
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
