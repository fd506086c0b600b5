"""Checks of the ``[B, T]`` tensors a GRPO loss call gets (shapes, dtypes, devices, mask values)."""
from __future__ import annotations

from .. import _validate as V


def _check_bt(name, t, shape, *, floating=True):
    if t is None:
        return
    V.check_tensor(name, t, floating=floating)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have the shape of logprobs {shape}, got {tuple(t.shape)}")


def _check_mask(mask, shape):
    V.check_mask("mask", mask, shape, " (the shape of logprobs)")


def _check_advantages(adv, shape):
    V.check_tensor("advantages", adv, floating=True)
    b, t = shape
    if tuple(adv.shape) not in ((b,), (b, 1), (b, t)):
        raise ValueError(
            f"advantages must have shape [B]=({b},) or [B, T]={shape} (logprobs is {shape}), got {tuple(adv.shape)}"
        )


def _check_is_ratio(isr, shape):
    if isr is None:
        return
    V.check_tensor("is_ratio", isr, floating=True)
    b, t = shape
    if tuple(isr.shape) not in ((b,), (b, 1), (b, t)):
        raise ValueError(f"is_ratio must have shape [B, T]={shape}, [B, 1] or [B]=({b},), got {tuple(isr.shape)}")


def check_inputs(logprobs, advantages, mask, old_logprobs, ref_logprobs, entropy, clamped_entropy, is_ratio) -> None:
    """Every tensor of a ``grpo_loss`` call, with its name in the message."""
    V.check_tensor("logprobs", logprobs, floating=True)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    _check_advantages(advantages, shape)
    _check_mask(mask, shape)
    _check_bt("old_logprobs", old_logprobs, shape)
    _check_bt("ref_logprobs", ref_logprobs, shape)
    _check_bt("entropy", entropy, shape)
    _check_bt("clamped_entropy", clamped_entropy, shape)
    _check_is_ratio(is_ratio, shape)
    V.check_same_device(logprobs=logprobs, advantages=advantages, mask=mask, old_logprobs=old_logprobs,
                        ref_logprobs=ref_logprobs, entropy=entropy, clamped_entropy=clamped_entropy,
                        is_ratio=is_ratio)
