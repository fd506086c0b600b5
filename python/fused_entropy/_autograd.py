"""autograd.Function classes. They save inputs and per-row statistics, never logits.

Every Function here (and the single-pass, objective and vocabulary-parallel ones) is
``once_differentiable``: first derivatives are exact; differentiating a gradient taken with
``create_graph=True`` raises a RuntimeError saying so (:data:`DOUBLE_BACKWARD_MESSAGE`) instead of
an internal ``mm(): functions with out=...`` error or a silently wrong second derivative.
"""
from __future__ import annotations

from typing import Optional

import functools

import torch

from ._types import LogitTransform, RowStats

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


def _stats_tensors(stats: RowStats):
    return [t for t in stats if t is not None]


def _stats_from(saved, entropy: bool, has_k: bool) -> RowStats:
    it = iter(saved)
    m, log_s, logp = next(it), next(it), next(it)
    ent = next(it) if entropy else None
    if not has_k:
        return RowStats(m, log_s, logp, ent)
    return RowStats(m, log_s, logp, ent, next(it), next(it), next(it), next(it))


def _masked_grad(g: Optional[torch.Tensor], valid: torch.Tensor) -> Optional[torch.Tensor]:
    if g is None:
        return None
    return torch.where(valid, g.float() if g.dtype != torch.float64 else g, torch.zeros((), dtype=g.dtype, device=g.device))


def _outputs(stats: RowStats, entropy: bool, has_k: bool):
    empty = stats.logprobs.new_empty(0)
    return (
        stats.logprobs,
        stats.entropy if entropy else empty,
        stats.clamped_entropy if has_k else empty,
    )


class LinearLogprobsFunction(torch.autograd.Function):
    """(x [N,H], W [V,H], b [V]|None, targets [N]) -> (logprobs, entropy, clamped_entropy) [N] each.

    Unused outputs are returned as empty tensors. Saves x, W, b, targets and O(N) row statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, tf: LogitTransform, ignore_index: int, entropy: bool, k, backend):
        stats = backend.linear_forward(x, weight, bias, targets, tf, ignore_index, entropy, k)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, targets, *_stats_tensors(stats))
        ctx.meta = (tf, ignore_index, entropy, k, backend)
        return _outputs(stats, entropy, k is not None)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent, g_cl):
        x, weight, bias, targets, *saved = ctx.saved_tensors
        tf, ignore_index, entropy, k, backend = ctx.meta
        if g_lp is None and g_ent is None and g_cl is None:
            return (None,) * 9
        stats = _stats_from(saved, entropy, k is not None)
        valid = targets != ignore_index
        g_lp, g_ent, g_cl = (_masked_grad(g, valid) for g in (g_lp, g_ent if entropy else None, g_cl if k is not None else None))
        needs = tuple(ctx.needs_input_grad[:3])  # a frozen weight (reference model) costs no dW product
        gx, gw, gb = backend.linear_backward(x, weight, bias, targets, tf, ignore_index, stats, g_lp, g_ent, g_cl, k,
                                             needs=needs)
        return (
            gx,
            gw,
            gb if bias is not None else None,
            None, None, None, None, None, None,
        )


class LogprobsFromLogitsFunction(torch.autograd.Function):
    """(logits [N,V], targets [N]) -> (logprobs, entropy, clamped_entropy); saves logits and row stats."""

    @staticmethod
    def forward(ctx, logits, targets, tf: LogitTransform, ignore_index: int, entropy: bool, k, backend):
        stats = backend.logits_forward(logits, targets, tf, ignore_index, entropy, k)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, *_stats_tensors(stats))
        ctx.meta = (tf, ignore_index, entropy, k, backend)
        return _outputs(stats, entropy, k is not None)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent, g_cl):
        logits, targets, *saved = ctx.saved_tensors
        tf, ignore_index, entropy, k, backend = ctx.meta
        if g_lp is None and g_ent is None and g_cl is None:
            return (None,) * 7
        stats = _stats_from(saved, entropy, k is not None)
        valid = targets != ignore_index
        g_lp, g_ent, g_cl = (_masked_grad(g, valid) for g in (g_lp, g_ent if entropy else None, g_cl if k is not None else None))
        grad = backend.logits_backward(logits, targets, tf, ignore_index, stats, g_lp, g_ent, g_cl, k)
        return grad, None, None, None, None, None, None
