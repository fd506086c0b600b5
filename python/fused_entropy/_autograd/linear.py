"""The single pass of ``LinearGRPOLoss``: a loss whose input gradients were formed in the forward sweep.

The sweep itself (chunks, GRPO per-token gradients, the backend's ``linear_forward_backward``) is the
caller's (``_single_pass.py``); this Function only stores its gradients and scales them in backward.
"""
from __future__ import annotations

import torch

from .common import once_differentiable

__all__ = ["SinglePassFunction"]


class SinglePassFunction(torch.autograd.Function):
    """Loss whose input gradients were computed inside the forward sweep.

    ``sweep()`` returns ``(loss, grad_input, grad_weight, grad_bias)``; backward only multiplies the
    stored gradients by the upstream scalar (the same contract as Liger's fused linear losses).
    """

    @staticmethod
    def forward(ctx, _input, weight, bias, sweep):
        loss, gx, gw, gb = sweep()  # None for an input that needs no gradient (no product was spent)
        ctx.save_for_backward(gx, gw, gb)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors
        if not bool(grad_loss == 1):
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])), None)
