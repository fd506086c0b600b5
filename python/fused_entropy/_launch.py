"""Launchers: one per kernel family. Allocation, grid, configuration, launch; no math of their own.

Inputs are validated by the functional layer (shapes, dtypes, devices, target range); these
functions only assume it. Row statistics are fp32 (fp64 for fp64 inputs). Sizes, buffers, the
precision choices and tuning are ``_launch_plan.py``; every kernel is launched from here.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ._launch_plan import (
    _addmm_acc, _dot_precision, _fp64_scalars, _grad_stats, _LogitsBuffer, _mm_into, _n_pad, _new_hist,
    _new_stats, _no_grads, _radix_first, _row, _run, _split, _stats_rows, _upcast, acc_dtype, dtype_key,
    grad_chunk, group_rows, grouped_launches, programs_per_sm,
)
from ._launch_plan import (  # noqa: F401 (re-exported: tests and tools read them here)
    _z_stride, buffer_rows, logits_buffer_rows, radix_buffer_passes, radix_gemm_passes,
)
from ._launch_radix import _clamped
from ._types import LogitTransform, RowStats
from .kernels import configs
from .kernels._online import finish_stats_kernel
from .kernels.linear_grad import linear_dz_kernel
from .kernels.linear_stats import linear_stats_kernel
from .kernels.logits_stats import logits_grad_kernel, logits_stats_kernel
from .kernels.topk import linear_radix_kernel, logits_radix_kernel


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


def _finish(part, targets, ignore_index: int, entropy: bool, out=None):
    """part [4, SPLIT, N] -> (row max m, log s, logprobs, entropy | None); into ``out``, a tuple of
    [N] views of that layout, when given (a row chunk's share of the whole batch's outputs)."""
    n = targets.shape[0]
    if out is not None:
        m, log_s, logp, ent = out
    else:
        m = torch.empty(n, device=part.device, dtype=part.dtype)
        log_s = torch.empty_like(m)
        logp = torch.empty_like(m)
        ent = torch.empty_like(m) if entropy else None
    cfg = configs.get("finish_stats", "fp64" if part.dtype == torch.float64 else "fp32")
    finish_stats_kernel[(triton.cdiv(n, cfg.block_n),)](
        part, targets, m, log_s, logp, ent, n, part.shape[1], ignore_index,
        BLOCK=cfg.block_n, num_warps=cfg.num_warps,
    )
    return m, log_s, logp, ent


def _grouped(kernel, n_blocks: int, group: int, n_cols: int, warm: bool, *args, **kwargs):
    """Launch a GEMM kernel over ``n_blocks`` row blocks x ``n_cols`` columns in the grouped order
    (``kernels/_grid.py``): one launch per entry of ``grouped_launches``, each with its first row block
    appended to ``args`` as the kernel's last runtime argument ``block0``. With ``warm``, compile the
    first (or take it from Triton's cache) and return its ``CompiledKernel`` without launching
    (``programs_per_sm`` reads its resources)."""
    for rows, groups, block0 in grouped_launches(n_blocks, group):
        if warm:
            return kernel.warmup(*args, block0, grid=(rows, n_cols, groups), **kwargs)
        kernel[(rows, n_cols, groups)](*args, block0, **kwargs)


# Rows and columns of the stand-in tensors of an occupancy build (``_stand_in``): a multiple of 16
_STAND_IN = 32


def _stand_in(t: Optional[torch.Tensor], *shape: int) -> Optional[torch.Tensor]:
    """A small tensor of ``t``'s dtype and device (None for None) for a warmup-only compile: sizes and
    strides multiples of 16 and an aligned pointer, so that the build whose occupancy is read is the
    same whatever the shapes of the call that asked first, and with it the split of every later call
    (the split changes the merge order, hence the bits)."""
    return None if t is None else torch.empty(*shape, device=t.device, dtype=t.dtype)


def _linear_radix_pass(x, weight, bias, tf: LogitTransform, m, hist, cfg: configs.Config, n_blocks: int):
    """(radix_pass, SPLIT): the ``radix_pass`` of ``_clamped`` for the linear head (one
    ``linear_radix_kernel`` launch per digit, in the grouped launch order) and the vocabulary split
    that every pass uses, chosen for the occupancy of the heaviest pass (the last digit's)."""
    h = x.shape[1]
    group = group_rows(n_blocks, cfg.block_n * h * x.element_size(), x.device)
    scal = _fp64_scalars(tf, x.dtype, x.device)

    def call(tensors, prefix, above, shift, bits, split, per, warm=False):
        xx, ww, bb, mm, hh = tensors
        return _grouped(
            linear_radix_kernel, triton.cdiv(xx.shape[0], cfg.block_n), group, split, warm,
            xx, ww, bb, prefix, mm, hh, above,
            xx.shape[0], ww.shape[0], xx.shape[1], xx.stride(0), ww.stride(0),
            tf.logit_scale, tf.softcap or 0.0, tf.inv_temperature, scal, per,
            SHIFT=shift, BITS=bits, NBINS=configs.RADIX_NBINS,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            UPCAST=_upcast(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def compile_last():
        c = _STAND_IN
        digits = configs.RADIX_DIGITS[64 if x.dtype == torch.float64 else 32]
        key_dtype = torch.int64 if x.dtype == torch.float64 else torch.int32
        tensors = (_stand_in(x, c, c), _stand_in(weight, c, c), _stand_in(bias, c), _stand_in(m, c),
                   _stand_in(hist, c, configs.RADIX_NBINS))
        prefix = torch.empty(c, device=x.device, dtype=key_dtype)
        return call(tensors, prefix, torch.empty(2, 2, c, device=x.device, dtype=m.dtype), 0, digits[-1], 2, 2,
                    warm=True)

    key = ("linear_radix", dtype_key(x.dtype), cfg, bias is not None, bool(tf.softcap), _dot_precision(x.dtype))
    occ = programs_per_sm(key, x.device, compile_last)
    split, per = _split(n_blocks, triton.cdiv(weight.shape[0], cfg.block_v), x.device, occ, group)
    tensors = (x, weight, bias, m, hist)
    return (lambda prefix, above, shift, bits: call(tensors, prefix, above, shift, bits, split, per)), split


def _linear_stats_pass(x, weight, bias, targets, tf: LogitTransform, ignore_index: int, hist, z):
    """One ``linear_stats_kernel`` launch over the rows of ``x``: part [4, SPLIT, N]. ``hist``: count
    the first radix digit; ``z`` ([N, V] view of the logits buffer): store the logits there too.
    Grouped launch order (``kernels/_grid.py``); the split fills whole waves of the compiled kernel's
    programs per SM (``_launch_plan.whole_waves``)."""
    n, h = x.shape
    vocab = weight.shape[0]
    dt = dtype_key(x.dtype)
    cfg = configs.get("linear_stats", dt)
    n_blocks = triton.cdiv(n, cfg.block_n)
    group = group_rows(n_blocks, cfg.block_n * h * x.element_size(), x.device)
    shift, bits = _radix_first(None, x.dtype)
    scal = _fp64_scalars(tf, x.dtype, x.device)

    def call(tensors, split, per, num_warps, num_stages, warm=False):
        xx, ww, bb, yy, part, hh, zz = tensors
        return _grouped(
            linear_stats_kernel, triton.cdiv(xx.shape[0], cfg.block_n), group, split, warm,
            xx, ww, bb, yy, part, hh, zz,
            xx.shape[0], ww.shape[0], xx.shape[1], xx.stride(0), ww.stride(0), 0 if zz is None else zz.stride(0),
            ignore_index, tf.logit_scale, tf.softcap or 0.0, tf.inv_temperature, scal, per,
            RADIX_SHIFT=shift, RADIX_BITS=bits, NBINS=configs.RADIX_NBINS,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            UPCAST=_upcast(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=num_warps, num_stages=num_stages,
        )

    def compile_it():
        c = _STAND_IN
        tensors = (_stand_in(x, c, c), _stand_in(weight, c, c), _stand_in(bias, c), _stand_in(targets, c),
                   torch.empty(4, 2, c, device=x.device, dtype=acc_dtype(x.dtype)),
                   _stand_in(hist, c, configs.RADIX_NBINS), _stand_in(z, c, c))
        return call(tensors, 2, 2, cfg.num_warps, cfg.num_stages, warm=True)

    key = ("linear_stats", dt, cfg, bias is not None, bool(tf.softcap), hist is not None, z is not None,
           _dot_precision(x.dtype))
    occ = programs_per_sm(key, x.device, compile_it)
    split, per = _split(n_blocks, triton.cdiv(vocab, cfg.block_v), x.device, occ, group)
    part = torch.empty(4, split, n, device=x.device, dtype=acc_dtype(x.dtype))
    tensors = (x, weight, bias, targets, part, hist, z)
    _run("linear_stats", dt, (h, vocab, configs.bucket(n), hist is not None, z is not None), cfg,
         lambda num_warps, num_stages: call(tensors, split, per, num_warps, num_stages),
         reset=None if hist is None else hist.zero_)
    return part


def _buffer_select(z, m, log_s, hist, targets, k: int, ignore_index: int, n_pad: int):
    """The radix digits after the first, read from the logits buffer ``z`` [N, V] (``logits_radix_kernel``
    with the identity transform: the buffer already holds z); the first digit is in ``hist``.
    Returns (tau, tie_frac, log_s_clamped, clamped_entropy) [N]."""
    n, vocab = z.shape
    cfg = configs.get("logits_radix", dtype_key(z.dtype))
    n_blocks = triton.cdiv(n, cfg.block_n)
    split, per = _split(n_blocks, triton.cdiv(vocab, cfg.block_v), z.device)

    scal = _fp64_scalars(LogitTransform(), z.dtype, z.device)  # the identity: z is in the buffer
    def radix_pass(prefix, above, shift, bits):
        logits_radix_kernel[(n_blocks, split)](
            z, prefix, m, hist, above, n, vocab, z.stride(0), 1.0, 0.0, 1.0, scal, per,
            SHIFT=shift, BITS=bits, NBINS=configs.RADIX_NBINS,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    return _clamped(radix_pass, hist, m, k, split, n_pad, targets, ignore_index, log_s=log_s)


def _chunk_stats(x_c, weight, bias, y_c, tf: LogitTransform, ignore_index: int, entropy: bool, k: Optional[int],
                 buf: _LogitsBuffer, out: RowStats) -> None:
    """Row statistics of one row chunk into ``out`` (views of the whole batch's outputs): one GEMM
    pass storing the chunk's logits in ``buf.z`` (and counting the first radix digit), then with
    top-k the further digits over the buffer, in memory."""
    n = x_c.shape[0]
    z = buf.z[:n, : buf.vocab]
    part = _linear_stats_pass(x_c, weight, bias, y_c, tf, ignore_index, buf.hist, z)
    _finish(part, y_c, ignore_index, entropy, out=(out.m, out.log_s, out.logprobs, out.entropy))
    if k is not None:
        n_pad = _n_pad(buf.vocab, configs.get("linear_stats", dtype_key(x_c.dtype)).block_v)
        clamped = _buffer_select(z, out.m, out.log_s, buf.hist, y_c, k, ignore_index, n_pad)
        for dst, src in zip((out.tau, out.tie_frac, out.log_s_clamped, out.clamped_entropy), clamped):
            dst.copy_(src)


def linear_stats(x, weight, bias, targets, tf: LogitTransform, ignore_index: int, entropy: bool,
                 k: Optional[int]) -> RowStats:
    """x [N, H], weight [V, H], bias [V] | None, targets [N] int64 -> RowStats (see _types).

    Without top-k: one ``linear_stats_kernel`` pass, no buffer. With top-k (clamped entropy): per
    row chunk (``_LogitsBuffer``), the same pass also stores the chunk's logits z in the bounded
    logits buffer and counts their first radix digit, and the further digits are selected from the
    buffer (``logits_radix_kernel``): one GEMM pass in all, plus a write of every logit and
    ``radix_buffer_passes`` reads of it. The stored z are the forward's own (same tiles: chunks are
    whole row blocks), so the backward's recomputed z meets ``tau`` exactly at ties.
    """
    n = x.shape[0]
    if k is None:
        part = _linear_stats_pass(x, weight, bias, targets, tf, ignore_index, None, None)
        return RowStats(*_finish(part, targets, ignore_index, entropy))
    buf = _LogitsBuffer(x, weight.shape[0], k)
    out = _new_stats(n, x.device, acc_dtype(x.dtype), entropy, k)
    for r0, r1 in buf.chunks(n):
        _chunk_stats(x[r0:r1], weight, bias, targets[r0:r1], tf, ignore_index, entropy, k, buf,
                     _stats_rows(out, r0, r1))
    return out


def linear_topk_select(x, weight, bias, tf: LogitTransform, k: int, shift, all_reduce):
    """Clamped-set statistics over a vocabulary split across ranks, from this rank's shard.

    x [N, H], weight/bias this rank's shard [V_r, H] / [V_r] | None, ``k`` the global clamped-set
    size, ``shift`` [N] a finite per-row shift of the sums (``_distributed`` gives the global row
    max, 0 on rows of only -inf logits), ``all_reduce(t)`` sums an int32 or float tensor over the
    ranks (in place, or returning the sum). Returns
    ``(tau, tie_frac, s_S, t_S)`` [N], the same on every rank, as ``backends/torch_topk.py``
    defines them: ``s_S = sum_{v in S} e^(z_v - shift)``, ``t_S = sum_{v in S} (z_v - shift) e^(z_v - shift)``.
    The logit tiles are those of ``linear_stats``/``linear_grad`` (same blocks), so the backward's
    ``z == tau`` sees the keys selected here. Cost: one GEMM pass per radix digit (3; 6 for fp64)
    and as many ``all_reduce`` of the ``[N, 2048]`` int32 histogram, plus one of ``[2, 1, N]`` sums.
    """
    n, h = x.shape
    vocab = weight.shape[0]
    cfg = configs.get("linear_stats", dtype_key(x.dtype))
    n_blocks = triton.cdiv(n, cfg.block_n)
    hist = _new_hist(n_blocks * cfg.block_n, x.device)
    m = shift.to(acc_dtype(x.dtype)).contiguous()
    radix_pass, split = _linear_radix_pass(x, weight, bias, tf, m, hist, cfg, n_blocks)
    return _clamped(radix_pass, hist, m, k, split, _n_pad(vocab, cfg.block_v), all_reduce=all_reduce)


def logits_stats(logits, targets, tf: LogitTransform, ignore_index: int, entropy: bool,
                 k: Optional[int]) -> RowStats:
    """logits [N, V], targets [N] int64 -> RowStats."""
    n, vocab = logits.shape
    dt = dtype_key(logits.dtype)
    cfg = configs.get("logits_stats", dt)
    n_blocks = triton.cdiv(n, cfg.block_n)
    split, per = _split(n_blocks, triton.cdiv(vocab, cfg.block_v), logits.device)
    part = torch.empty(4, split, n, device=logits.device, dtype=acc_dtype(logits.dtype))
    hist = _new_hist(n_blocks * cfg.block_n, logits.device) if k is not None else None
    shift, bits = _radix_first(k, logits.dtype)

    scal = _fp64_scalars(tf, logits.dtype, logits.device)

    def launch(num_warps, num_stages):
        logits_stats_kernel[(n_blocks, split)](
            logits, targets, part, hist, n, vocab, logits.stride(0), ignore_index,
            tf.logit_scale, tf.softcap or 0.0, tf.inv_temperature, scal, per,
            RADIX_SHIFT=shift, RADIX_BITS=bits, NBINS=configs.RADIX_NBINS,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=num_warps, num_stages=num_stages,
        )

    _run("logits_stats", dt, (vocab, configs.bucket(n), k is not None), cfg, launch,
         reset=None if hist is None else hist.zero_)
    m, log_s, logp, ent = _finish(part, targets, ignore_index, entropy)
    if k is None:
        return RowStats(m, log_s, logp, ent)

    def radix_pass(prefix, above, shift, bits):
        logits_radix_kernel[(n_blocks, split)](
            logits, prefix, m, hist, above, n, vocab, logits.stride(0),
            tf.logit_scale, tf.softcap or 0.0, tf.inv_temperature, scal, per,
            SHIFT=shift, BITS=bits, NBINS=configs.RADIX_NBINS,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    clamped = _clamped(radix_pass, hist, m, k, split, _n_pad(vocab, cfg.block_v), targets, ignore_index,
                       log_s=log_s)
    return RowStats(m, log_s, logp, ent, *clamped)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def linear_grad(x, weight, bias, targets, tf: LogitTransform, ignore_index: int, stats: RowStats,
                g_lp, g_ent, g_cl, *, need_x: bool = True, need_weight: bool = True, need_bias: bool = True):
    """Gradients (x [N, H], weight [V, H], bias [V] | None) in the inputs' dtypes; None where not
    needed. g_* are [N] upstream gradients or None (that term is not formed at all).

    Deterministic, no atomics (``kernels/linear_grad.py``): per vocabulary chunk ``[v_lo, v_lo + Vc)``,
    ``linear_dz_kernel`` writes ``dz [N, Vc]`` (input dtype) and per-row-block column sums, then

        dW[chunk] = dz^T @ x        dX += dz @ W[chunk]  (fp32 accumulator)        db[chunk] = sum of the sums

    ``Vc`` from ``grad_chunk`` (the buffer bound ``configs.grad_buffer_bytes()``). With one chunk dX
    is written by its GEMM directly. A gradient that is not needed skips its GEMM; with neither dX
    nor dW needed, dz is not stored.

    Bitwise reproducible run to run on one GPU: no atomics, and cuBLAS picks the same algorithm for
    the same shapes (under ``torch.use_deterministic_algorithms(True)`` torch asks for
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` to guarantee it). Chunks change the dX summation order, so
    results depend on the buffer bound (not on the run).
    """
    n, h = x.shape
    vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    g_lp, g_ent, g_cl = (_row(g, acc_dtype(x.dtype)) for g in (g_lp, g_ent, g_cl))
    if n == 0 or (g_lp is None and g_ent is None and g_cl is None):
        return _no_grads(x, weight, bias, need_x, need_weight, need_bias)
    dt = dtype_key(x.dtype)
    acc = acc_dtype(x.dtype)
    cfg = configs.get("linear_grad", dt)
    cl = g_cl is not None
    n_blocks = triton.cdiv(n, cfg.block_n)
    vc = grad_chunk(n, vocab, x.element_size(), cfg.block_v)
    single = vc == vocab
    dz = torch.empty(n, vc, device=x.device, dtype=x.dtype) if (need_x or need_weight) else None
    db_part = torch.empty(n_blocks, vc, device=x.device, dtype=acc) if need_bias else None
    dx = torch.empty(n, h, device=x.device, dtype=x.dtype) if need_x else None
    dx_acc = torch.zeros(n, h, device=x.device, dtype=acc) if (need_x and not single) else None
    dw = torch.empty(vocab, h, device=x.device, dtype=weight.dtype) if need_weight else None
    db = torch.empty(vocab, device=x.device, dtype=bias.dtype) if need_bias else None
    scal = _fp64_scalars(tf, x.dtype, x.device)
    group = group_rows(n_blocks, cfg.block_n * h * x.element_size(), x.device)
    for v_lo in range(0, vocab, vc):
        v_hi = min(vocab, v_lo + vc)
        n_vt = triton.cdiv(v_hi - v_lo, cfg.block_v)

        def launch(num_warps, num_stages):
            _grouped(
                linear_dz_kernel, n_blocks, group, n_vt, False,
                x, weight, bias, targets,
                *_grad_stats(stats, g_ent, g_cl), g_lp, g_ent, g_cl, dz, db_part,
                n, vocab, h, v_lo, x.stride(0), weight.stride(0), vc, ignore_index,
                tf.logit_scale, tf.softcap or 0.0, tf.temperature, tf.inv_temperature, scal,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
                UPCAST=_upcast(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
                num_warps=num_warps, num_stages=num_stages,
            )

        _run("linear_grad", dt, ("dz", h, vc, configs.bucket(n), g_lp is not None, g_ent is not None, cl,
                                 dz is not None, db_part is not None), cfg, launch)
        if dz is not None:
            dz_c = dz[:, : v_hi - v_lo]
            if need_weight:
                _mm_into(dw[v_lo:v_hi], dz_c.t(), x)
            if need_x:
                if single:
                    _mm_into(dx, dz_c, weight)
                else:
                    _addmm_acc(dx_acc, dz_c, weight[v_lo:v_hi])
        if need_bias:
            db[v_lo:v_hi] = db_part[:, : v_hi - v_lo].sum(0)
    if dx_acc is not None:
        dx.copy_(dx_acc)
    return dx, dw, db


def _logits_grad_launch(logits, targets, tf: LogitTransform, ignore_index: int, stats: RowStats, g_lp, g_ent, g_cl,
                        out, z_in: bool, in_place: bool = False):
    """One ``logits_grad_kernel`` launch: ``out`` [N, V] <- dL/d(logits) (``z_in``: ``logits`` holds
    the transformed z, the chain rule of the transform is still applied; ``in_place``: ``out`` is
    ``logits``). g_* already in the acc dtype."""
    n, vocab = logits.shape
    dt = dtype_key(logits.dtype)
    cfg = configs.get("logits_grad", dt)
    cl = g_cl is not None
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(vocab, cfg.block_v))

    scal = _fp64_scalars(tf, logits.dtype, logits.device)

    def launch(num_warps, num_stages):
        logits_grad_kernel[grid](
            logits, targets, *_grad_stats(stats, g_ent, g_cl), g_lp, g_ent, g_cl, out,
            n, vocab, logits.stride(0), out.stride(0), ignore_index,
            tf.logit_scale, tf.softcap or 0.0, tf.temperature, tf.inv_temperature, scal,
            Z_IN=z_in, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, num_warps=num_warps, num_stages=num_stages,
        )

    # in place (out is logits) a tuning trial would read its own output: no tuning then
    key = (vocab, configs.bucket(n), g_lp is not None, g_ent is not None, cl, z_in, out.dtype)
    if in_place:
        launch(cfg.num_warps, cfg.num_stages)
    else:
        _run("logits_grad", dt, key, cfg, launch)


def logits_grad(logits, targets, tf: LogitTransform, ignore_index: int, stats: RowStats, g_lp, g_ent, g_cl):
    """grad_logits [N, V] in the logits' dtype, written tile by tile."""
    acc = acc_dtype(logits.dtype)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    g_lp, g_ent, g_cl = (_row(g, acc) for g in (g_lp, g_ent, g_cl))
    if logits.shape[0] == 0:
        return grad
    if g_lp is None and g_ent is None and g_cl is None:
        return grad.zero_()
    _logits_grad_launch(logits, targets, tf, ignore_index, stats, g_lp, g_ent, g_cl, grad, False)
    return grad


# ---------------------------------------------------------------------------------------------
# single pass: forward statistics and gradients in one sweep over row chunks
# ---------------------------------------------------------------------------------------------


def linear_forward_backward(x, weight, bias, targets, tf: LogitTransform, ignore_index: int, entropy: bool,
                            k: Optional[int], grad_fn, rows_per_chunk: Optional[int] = None, *,
                            needs=(True, True, True)):
    """Row statistics and the gradients of a loss over them in one GEMM pass over the logits (plus
    the two gradient GEMMs): the single pass of ``LinearGRPOLoss`` (``backends/torch_chunked.py``
    has the same contract). Per chunk of rows ``[r0, r1)`` (``_LogitsBuffer``):

    1. ``linear_stats_kernel`` stores the chunk's logits z in the logits buffer and folds them into
       the row statistics; with top-k the further radix digits are read from the buffer;
    2. ``grad_fn(slice(r0, r1), logprobs, entropy, clamped_entropy)`` -> the rows' upstream gradients
       (g_logprobs, g_entropy, g_clamped), each [C] or None;
    3. ``logits_grad_kernel`` (``Z_IN``) turns z into dz = dL/d(h.W + b), with the transform's chain
       rule, in the input dtype: over z in place for fp32/fp64, else into the buffer's dz half;
    4. cuBLAS: ``dX[r0:r1] = dz @ W`` (written once), ``dW += dz^T @ x[r0:r1]`` (fp32 accumulator
       [V, H] across chunks; with one chunk written directly), ``db += sum_rows dz`` (fp32).

    GEMM passes: 3 (logits, dX, dW) instead of the two-pass path's 4. Memory: the logits buffer
    (``configs.logits_buffer_bytes()``, or ``rows_per_chunk`` rows when given: the caller's chunks of
    whole sequences) and, with several chunks, the fp32 dW accumulator (V H 4 bytes). Deterministic:
    no atomics beyond the integer radix histogram, fixed chunks. Returns
    ``(RowStats, grad_x, grad_weight, grad_bias)``; a gradient whose ``needs`` entry is False is None.
    """
    n, h = x.shape
    vocab = weight.shape[0]
    acc = acc_dtype(x.dtype)
    need_x, need_w, need_b = needs[0], needs[1], needs[2] and bias is not None
    out = _new_stats(n, x.device, acc, entropy, k)
    dx = torch.empty(n, h, device=x.device, dtype=x.dtype) if need_x else None
    dw = torch.empty(vocab, h, device=x.device, dtype=weight.dtype) if need_w else None
    db_acc = torch.zeros(vocab, device=x.device, dtype=acc) if need_b else None
    if n == 0:
        if need_w:
            dw.zero_()
        return out, dx, dw, None if db_acc is None else db_acc.to(bias.dtype)
    buf = _LogitsBuffer(x, vocab, k, with_dz=need_x or need_w or need_b, rows=rows_per_chunk)
    single = buf.rows >= n
    dw_acc = torch.zeros(vocab, h, device=x.device, dtype=acc) if (need_w and not single) else None
    for r0, r1 in buf.chunks(n):
        x_c, y_c = x[r0:r1], targets[r0:r1]
        rows = _stats_rows(out, r0, r1)
        _chunk_stats(x_c, weight, bias, y_c, tf, ignore_index, entropy, k, buf, rows)
        g_lp, g_ent, g_cl = (_row(g, acc) for g in grad_fn(slice(r0, r1), rows.logprobs, rows.entropy,
                                                            rows.clamped_entropy))
        if buf.dz is None:
            continue
        dz = buf.dz[: r1 - r0, :vocab]
        if g_lp is None and g_ent is None and g_cl is None:
            dz.zero_()
        else:
            _logits_grad_launch(buf.z[: r1 - r0, :vocab], y_c, tf, ignore_index, rows, g_lp, g_ent, g_cl, dz,
                                True, in_place=buf.dz is buf.z)
        if need_x:
            _mm_into(dx[r0:r1], dz, weight)
        if need_w:
            if single:
                _mm_into(dw, dz.t(), x_c)
            else:
                _addmm_acc(dw_acc, dz.t(), x_c)
        if need_b:
            db_acc += dz.sum(0, dtype=acc)
    if dw_acc is not None:
        dw.copy_(dw_acc)
    return out, dx, dw, None if db_acc is None else db_acc.to(bias.dtype)
