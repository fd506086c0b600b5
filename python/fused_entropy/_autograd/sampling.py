"""The sampling-truncation autograd Functions (``sampling_top_k``/``top_p``/``min_p``; MATH.md section 8).

The math of one chunk of rows (thresholds, statistics, gradient) is ``_sampling.py``; these
Functions run it chunk by chunk over a bounded workspace (never ``[N, V]``), save ``O(N)`` row
statistics and recompute the logits in backward. With a vocabulary split (``group``) every threshold
and sum is global (``_sampling.Group``).
"""
from __future__ import annotations

import torch

from .._common import compute_dtype
from .._sampling import (
    BLOCKS,
    ChunkStats,
    Group,
    Local,
    SamplingParams,
    SamplingWorkspace,
    chunk_forward,
    chunk_grad,
    local_targets,
    masked_grads,
    outputs,
    restore_rows,
    saved_rows,
    stack_rows,
)
from .._types import LogitTransform
from ..backends.torch_chunked import HeadGrads, chunk_rows
from ..backends.torch_chunked import _logit_chunks as logit_chunks
from ..backends.torch_chunked import _logit_block as logit_block
from .common import once_differentiable

__all__ = ["SampledLinearFunction", "SampledLogitsFunction"]


class SampledLinearFunction(torch.autograd.Function):
    """``(x [N,H], W [V_r,H], b [V_r]|None, targets [N]) -> (logprobs, entropy, truncated_logprobs,
    log_kept_mass, truncated_entropy)`` ``[N]`` each; global values with a vocabulary split
    (``group``, this rank's ``offset`` and the global ``vocab``). Saves x, W, b, targets and ``O(N)``
    row statistics; backward recomputes the logits chunk by chunk (one product) and forms dX, dW, db
    (two more). ``full_hidden_grad``: all-reduce dX over ``group`` (else this rank's share)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, tf: LogitTransform, ignore_index: int, prm: SamplingParams,
                vocab: int, offset: int, group, full_hidden_grad: bool):
        n, vl = x.shape[0], weight.shape[0]
        cdt = compute_dtype(x.dtype)
        red = Local() if group is None else Group(group)
        step = chunk_rows(n, vl, BLOCKS, torch.empty((), dtype=cdt).element_size())
        ws = SamplingWorkspace(min(step, max(n, 1)), vl, cdt, x.device)
        w = weight.to(cdt)
        valid, here, y_local = local_targets(targets, ignore_index, offset, vl)
        parts = []
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            z = logit_block(x[sl], w, bias, tf, ws.get("z", sl.stop - sl.start))
            parts.append(chunk_forward(z, ws, y_local[sl], here[sl], valid[sl], prm.rows(sl), vocab, red))
        st = stack_rows(parts, n, x.device, cdt)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, targets, *saved_rows(st))
        ctx.meta = (tf, ignore_index, offset, group, full_hidden_grad, step)
        return outputs(st)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, weight, bias, targets, *saved = ctx.saved_tensors
        tf, ignore_index, offset, group, full, step = ctx.meta
        st = restore_rows(saved)
        n, vl = x.shape[0], weight.shape[0]
        cdt = compute_dtype(x.dtype)
        valid, here, y_local = local_targets(targets, ignore_index, offset, vl)
        grads = masked_grads(grads, valid)
        out = HeadGrads(x, weight, bias, cdt, ctx.needs_input_grad[:3])
        if any(g is not None for g in grads):
            ws = SamplingWorkspace(min(step, max(n, 1)), vl, cdt, x.device)
            w = weight.to(cdt)
            for start in range(0, n, step):
                sl = slice(start, min(start + step, n))
                x_c = x[sl].to(cdt)
                z = logit_block(x_c, w, bias, tf, ws.get("z", sl.stop - sl.start))
                rows = ChunkStats(*(None if f is None else f[sl] for f in st))
                dz = chunk_grad(z, ws, y_local[sl], here[sl], valid[sl], rows, tuple(None if g is None else g[sl] for g in grads), tf)
                out.add(sl, dz, x_c, w)
        if out.x is not None and group is not None and full and n > 0:
            out.x = Group(group).sum(out.x)
        return (*out.result(), None, None, None, None, None, None, None, None)


class SampledLogitsFunction(torch.autograd.Function):
    """``(logits [N,V], targets [N]) -> the five [N] outputs of SampledLinearFunction``; saves the logits
    and row statistics and writes the logits gradient directly."""

    @staticmethod
    def forward(ctx, logits, targets, tf: LogitTransform, ignore_index: int, prm: SamplingParams):
        n, vocab = logits.shape
        cdt = compute_dtype(logits.dtype)
        step = chunk_rows(n, vocab, BLOCKS, torch.empty((), dtype=cdt).element_size())
        ws = SamplingWorkspace(min(step, max(n, 1)), vocab, cdt, logits.device)
        valid, here, y_local = local_targets(targets, ignore_index, 0, vocab)
        red = Local()
        parts = []
        for sl, z in logit_chunks(logits, tf, step, ws):
            parts.append(chunk_forward(z, ws, y_local[sl], here[sl], valid[sl], prm.rows(sl), vocab, red))
        st = stack_rows(parts, n, logits.device, cdt)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, *saved_rows(st))
        ctx.meta = (tf, ignore_index, step)
        return outputs(st)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        logits, targets, *saved = ctx.saved_tensors
        tf, ignore_index, step = ctx.meta
        st = restore_rows(saved)
        n, vocab = logits.shape
        cdt = compute_dtype(logits.dtype)
        valid, here, y_local = local_targets(targets, ignore_index, 0, vocab)
        grads = masked_grads(grads, valid)
        out = torch.zeros_like(logits)
        if any(g is not None for g in grads):
            ws = SamplingWorkspace(min(step, max(n, 1)), vocab, cdt, logits.device)
            for sl, z in logit_chunks(logits, tf, step, ws):
                rows = ChunkStats(*(None if f is None else f[sl] for f in st))
                out[sl] = chunk_grad(z, ws, y_local[sl], here[sl], valid[sl], rows, tuple(None if g is None else g[sl] for g in grads), tf)
        return out, None, None, None, None
