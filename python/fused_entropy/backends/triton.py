"""Triton backend: fused kernels (``fused_entropy.kernels``) behind the backend interface.

Same signatures and semantics as ``torch_chunked`` (see ``backends/__init__.py``). Forward: one GEMM
pass over (row block x vocabulary tile) with the row statistics in the epilogue. With a clamped
entropy it is still one GEMM pass: per chunk of rows the pass also stores the logits in the row-chunk
logits buffer (``[Nc, V]`` fp32, bounded by ``configs.logits_buffer_bytes()``, 1 GiB) and the top-k
radix digits after the first are selected from there (``kernels/topk.py``). Backward
(deterministic, no atomics): per vocabulary chunk a kernel recomputes the logit tiles and stores dL/dz,
and two cuBLAS GEMMs turn it into dW[chunk] and dX; the chunk's dz buffer is bounded by
``configs.grad_buffer_bytes()`` (256 MiB), never a full ``[N, V]`` buffer at large N x V.
(``kernels/linear_grad.py`` says why the older fp32-atomic backward was removed.) The logits entry point writes only the logits
gradient itself. fp16/bf16/fp32/fp64 inputs.

Beyond the interface, ``linear_forward_backward`` is the single pass of ``LinearGRPOLoss`` (as in
``torch_chunked``): statistics, upstream gradients and dz from the same logits buffer, then cuBLAS for
dX and dW, 3 GEMM passes instead of 4; ``single_pass_rows`` tells the module the chunk the buffer
holds. ``linear_topk_select`` is the vocabulary-parallel top-k select of the interface
(``torch_chunked`` has its own); it recomputes a GEMM pass per digit.
"""
from __future__ import annotations

import torch

from .. import _launch
from .._types import RowStats

NAME = "triton"  # what backends.resolve_name gives for this module


def _empty_stats(n_dtype: torch.dtype, device, entropy: bool, k) -> RowStats:
    dt = _launch.acc_dtype(n_dtype)
    e = lambda: torch.zeros(0, device=device, dtype=dt)
    if k is None:
        return RowStats(e(), e(), e(), e() if entropy else None)
    return RowStats(e(), e(), e(), e() if entropy else None, e(), e(), e(), e())


def linear_forward(x, weight, bias, targets, tf, ignore_index, entropy, k) -> RowStats:
    if x.shape[0] == 0:
        return _empty_stats(x.dtype, x.device, entropy, k)
    return _launch.linear_stats(x, weight, bias, targets, tf, ignore_index, entropy, k)


def linear_backward(x, weight, bias, targets, tf, ignore_index, stats: RowStats, g_lp, g_ent, g_cl, k,
                    *, needs=(True, True, True)):
    return _launch.linear_grad(x, weight, bias, targets, tf, ignore_index, stats, g_lp, g_ent, g_cl,
                               need_x=needs[0], need_weight=needs[1], need_bias=needs[2] and bias is not None)


def linear_topk_select(x, weight, bias, tf, k, shift, all_reduce):
    """(tau, tie_frac, s_S, t_S) [N] of a vocabulary split across ranks, from this rank's shard;
    the protocol of ``torch_topk.radix_topk_stats`` (see ``_launch.linear_topk_select``)."""
    return _launch.linear_topk_select(x, weight, bias, tf, k, shift, all_reduce)


def linear_forward_backward(x, weight, bias, targets, tf, ignore_index, entropy, k, grad_fn, rows_per_chunk=None,
                            *, needs=(True, True, True)):
    """Statistics and gradients in one sweep over row chunks: the contract of
    ``torch_chunked.linear_forward_backward`` (``_launch.linear_forward_backward``: one GEMM pass for
    the logits, kept in the bounded logits buffer, then dz from the buffer and cuBLAS for dX, dW)."""
    return _launch.linear_forward_backward(x, weight, bias, targets, tf, ignore_index, entropy, k, grad_fn,
                                           rows_per_chunk, needs=needs)


def single_pass_rows(n, vocab, dtype):
    """Rows per chunk ``linear_forward_backward`` takes by default: as many as the logits buffer
    (z, and dz for 16-bit inputs) holds within ``configs.logits_buffer_bytes()``."""
    return _launch.buffer_rows(n, vocab, dtype, with_dz=True)


def logits_forward(logits, targets, tf, ignore_index, entropy, k) -> RowStats:
    if logits.shape[0] == 0:
        return _empty_stats(logits.dtype, logits.device, entropy, k)
    return _launch.logits_stats(logits, targets, tf, ignore_index, entropy, k)


def logits_backward(logits, targets, tf, ignore_index, stats: RowStats, g_lp, g_ent, g_cl, k):
    return _launch.logits_grad(logits, targets, tf, ignore_index, stats, g_lp, g_ent, g_cl)
