"""The GRPO per-token objective through the Triton kernel as an autograd Function.

``_grpo.objective._objective_triton`` goes through the custom op ``fused_entropy::grpo_objective``
(``_custom_ops.py``, opaque to ``torch.compile``); this Function is the same computation for callers
outside ``torch.library``. ``cfg`` is ``_grpo.objective._Cfg`` (it carries the loss-type rules).
"""
from __future__ import annotations

import torch

from .common import once_differentiable

__all__ = ["GRPOObjectiveFunction"]


class GRPOObjectiveFunction(torch.autograd.Function):
    """Policy + KL part of the loss through the Triton kernel: ``(logp [B, T], ...) -> (loss, kl, low, high)``.

    The kernel writes ``d loss / d logp`` in the same launch as the loss (the objective is elementwise
    given the row statistics), so forward saves that ``[B, T]`` gradient and backward only scales it.
    ``kl``, ``low``, ``high`` are masked sums for the metrics (not differentiable).
    """

    @staticmethod
    def forward(ctx, lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad: bool):
        from .._launch_objective import launch_objective  # imports triton: only when the kernel runs

        out = launch_objective(lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad=compute_grad)
        ctx.save_for_backward(out.grad)
        kl, low, high = out.row_kl.sum(), out.row_low.sum(), out.row_high.sum()
        ctx.mark_non_differentiable(kl, low, high)
        return out.row_loss.sum(), kl, low, high

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):
        (grad,) = ctx.saved_tensors
        if grad is None or g_loss is None:
            return (None,) * 10
        return (grad * g_loss,) + (None,) * 9
