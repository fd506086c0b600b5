"""Checks at the public boundary. Kernels assume what these functions guarantee."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._types import LogitTransform, clamp_p_to_k

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, floating: bool = False, integer: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {t.dtype}")


def reads_values(*tensors) -> bool:
    """Whether a check may read tensor values (one reduction and a host sync): not while
    ``torch.compile`` traces (a data-dependent branch breaks ``fullgraph=True``), not on meta or fake
    tensors (no data). Such checks then do not run; the shape and dtype checks always do."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not any(t.device.type == "meta" or is_fake(t) for t in tensors)


def check_mask(name: str, mask, shape=None, what: str = "") -> None:
    """A loss/attention mask: bool, integer or floating, holding only 0 and 1 (one reduction).

    Liger 0.8.5 and TRL 1.16 multiply by the mask, so a value like 0.5 or 2 would silently weight a
    token there; the fused kernels take the mask as a set of rows, so any other value (NaN included)
    is rejected here rather than read as 1.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating tensor of 0/1, got {mask.dtype}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{what}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool or mask.numel() == 0 or not reads_values(mask):
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        value = mask[bad].reshape(-1)[0].item()
        raise ValueError(f"{name} must hold only 0 and 1 (a mask, not weights); found {value}")


def token_ids(name: str, t) -> torch.Tensor:
    """Check an integer tensor of token ids and return it as int64.

    Every integer dtype is accepted (int8 ... int64, uint8 ... uint64); ranges are compared in int64,
    so an id is never wrapped or truncated by its own dtype (int8 against V=200, uint16 where torch
    has no comparison kernel). A uint64 id above 2**63 - 1 reads as negative and is reported out of range.
    """
    check_tensor(name, t, integer=True)
    return t if t.dtype == torch.int64 else t.to(torch.int64)


def check_ignore_index(ignore_index, *, allow_none: bool = True) -> None:
    """``ignore_index`` is a Python int in the int64 range (or None where allowed); no bools, floats."""
    if ignore_index is None and allow_none:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        what = "an int or None" if allow_none else "an int"
        raise TypeError(f"ignore_index must be {what}, got {type(ignore_index).__name__} {ignore_index!r}")
    if not -(1 << 63) <= ignore_index < (1 << 63):
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def check_bool(name: str, value) -> None:
    """A real ``bool`` (``entropy="no"`` is truthy: a string must not switch an output on)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def is_finite(value) -> bool:
    """``math.isfinite`` for a Python number, written as comparisons: ``torch.compile(dynamic=True)``
    traces float arguments as symbolic floats, which comparisons guard on and ``math.isfinite`` breaks
    the graph on (NaN fails both comparisons)."""
    return -math.inf < value < math.inf


def check_positive_finite(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not is_finite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_finite(name: str, value) -> None:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not is_finite(value):
        raise ValueError(f"{name} must be finite, got {value}")


# Accepted magnitudes of the logit transform: every scalar, its reciprocal and the combined factor
# |logit_scale| / temperature stay normal fp32 numbers (the kernels take them as fp32 runtime scalars),
# so a logit never becomes inf or NaN from the transform alone (temperature 1e-39 made 1/T = inf).
TRANSFORM_MIN, TRANSFORM_MAX = 1e-30, 1e30


def check_transform(temperature, softcap, logit_scale, *, names=("temperature", "softcap", "logit_scale")) -> None:
    """``z = softcap(logit_scale * u) / temperature``: ranges that compute finitely.

    ``temperature`` and ``softcap`` in ``[1e-30, 1e30]``; ``logit_scale`` 0 or ``|logit_scale|`` in
    ``[1e-30, 1e30]`` (negative allowed); ``|logit_scale| / temperature <= 1e30``. Outside: ValueError
    naming the argument and the value.
    """
    t_name, c_name, s_name = names
    check_positive_finite(t_name, temperature)
    check_positive_finite(c_name, softcap, allow_none=True)
    check_finite(s_name, logit_scale)
    for name, value in ((t_name, temperature), (c_name, softcap)):
        if value is not None and not TRANSFORM_MIN <= value <= TRANSFORM_MAX:
            raise ValueError(f"{name} must be in [{TRANSFORM_MIN:g}, {TRANSFORM_MAX:g}] (fp32 kernel scalars, "
                             f"finite reciprocal), got {value}")
    if logit_scale != 0 and not TRANSFORM_MIN <= abs(logit_scale) <= TRANSFORM_MAX:
        raise ValueError(f"{s_name} must be 0 or have |{s_name}| in [{TRANSFORM_MIN:g}, {TRANSFORM_MAX:g}], got {logit_scale}")
    if abs(logit_scale) / temperature > TRANSFORM_MAX:
        raise ValueError(f"|{s_name}| / {t_name} must be <= {TRANSFORM_MAX:g} (the factor every logit is multiplied "
                         f"by), got {s_name}={logit_scale}, {t_name}={temperature}")


def logit_transform(temperature, softcap, logit_scale, *, names=("temperature", "softcap", "logit_scale")) -> LogitTransform:
    """:func:`check_transform`, then the checked scalars as the ``LogitTransform`` every layer below
    takes (checked and built once, at the public boundary)."""
    check_transform(temperature, softcap, logit_scale, names=names)
    return LogitTransform(float(temperature), None if softcap is None else float(softcap), float(logit_scale))


def check_targets_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every target is in [0, V) or equals ignore_index (one reduction, one sync)."""
    if targets.numel() == 0 or not reads_values(targets):
        return
    targets = targets.to(torch.int64)  # compare in int64, never in the ids' own (narrow) dtype
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        value = targets[bad][0].item()
        raise ValueError(
            f"targets must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; found {value}"
        )


def resolve_k(topk: Optional[int], clamp_p: Optional[float], vocab_size: int) -> Optional[int]:
    """Validate topk / clamp_p and return the size k of the clamped set (None when neither is given)."""
    if topk is not None and clamp_p is not None:
        raise ValueError(f"give at most one of topk and clamp_p, got topk={topk} and clamp_p={clamp_p}")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int):
            raise TypeError(f"topk must be an int, got {type(topk).__name__}")
        if not 1 <= topk <= vocab_size:
            raise ValueError(f"topk must be in [1, V={vocab_size}], got {topk}")
        return topk
    if clamp_p is not None:
        if isinstance(clamp_p, bool) or not isinstance(clamp_p, (int, float)):
            raise TypeError(f"clamp_p must be a float, got {type(clamp_p).__name__}")
        if not (0.0 <= clamp_p < 1.0):
            raise ValueError(f"clamp_p must be in [0, 1), got {clamp_p}")
        return clamp_p_to_k(float(clamp_p), vocab_size)
    return None
