"""What every autograd Function (and the custom ops' registered autograd) shares.

Every Function of the package is ``once_differentiable``: first derivatives are exact;
differentiating a gradient taken with ``create_graph=True`` raises a RuntimeError saying so (:data:`DOUBLE_BACKWARD_MESSAGE`) instead of
an internal ``mm(): functions with out=...`` error or a silently wrong second derivative.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .._types import RowStats

DOUBLE_BACKWARD_MESSAGE = (
    "fused_entropy computes first derivatives only: a gradient taken with create_graph=True through "
    "linear_logprobs, logprobs_from_logits, grpo_loss or LinearGRPOLoss cannot be differentiated again "
    "(their autograd Functions are once_differentiable)"
)


def once_differentiable(backward):
    """``torch.autograd.function.once_differentiable`` that always arms the error.

    torch's decorator only makes a second differentiation fail when an incoming gradient requires
    grad; for ``loss.sum()`` it does not, and the user then sees "element 0 of tensors does not
    require grad" (or, without any decorator, an internal ``mm(): functions with out=...`` error).
    Under ``create_graph=True`` (grad mode on inside backward) every returned gradient here is an
    alias whose own backward raises :data:`DOUBLE_BACKWARD_MESSAGE`.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *args):
        with torch.no_grad():
            outputs = backward(ctx, *args)
        if not torch.is_grad_enabled():
            return outputs
        single = not isinstance(outputs, tuple)
        outs = (outputs,) if single else outputs
        idx = [i for i, o in enumerate(outs) if isinstance(o, torch.Tensor)]
        if not idx:
            return outputs
        err = torch._C._functions.DelayedError(DOUBLE_BACKWARD_MESSAGE.encode(), len(idx))
        aliased = err(*[outs[i].detach().requires_grad_(True) for i in idx])
        aliased = aliased if isinstance(aliased, tuple) else (aliased,)
        outs = list(outs)
        for i, a in zip(idx, aliased):
            outs[i] = a
        return outs[0] if single else tuple(outs)

    return wrapper


def stats_tensors(stats: RowStats):
    """The fields of ``stats`` that are set, for ``save_for_backward``."""
    return [t for t in stats if t is not None]


def masked_grad(g: Optional[torch.Tensor], valid: torch.Tensor) -> Optional[torch.Tensor]:
    """An upstream ``[N]`` gradient in fp32 (fp64 kept), zero on the rows outside ``valid``; None stays None."""
    if g is None:
        return None
    return torch.where(valid, g.float() if g.dtype != torch.float64 else g, torch.zeros((), dtype=g.dtype, device=g.device))
