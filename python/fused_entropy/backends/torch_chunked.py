"""Pure-PyTorch backend: the same math as the Triton kernels, chunked over rows.

Each chunk of ``C`` rows materializes one ``[C, V]`` logit block (plus one scratch block of the same
size), never ``[N, V]``. ``C`` is chosen so that a block holds about ``CHUNK_ELEMENTS`` fp32 values
(8 MiB). The backward pass recomputes each block (4 matrix products in all: forward, recompute, dX,
dW). Matrix products run in the input dtype when it is fp32/fp64; bf16/fp16 inputs are upcast to
fp32 chunk by chunk (weight once), so logits are never rounded to 16 bits (MATH.md section 7).

Clamped entropy: the k-th largest logit ``tau`` of each row comes from ``torch.kthvalue`` on the
block, in the same pass; no extra matrix product.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._types import LogitTransform, RowStats

CHUNK_ELEMENTS = 1 << 21


def chunk_rows(n_rows: int, vocab: int, budget: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(n_rows, budget // max(vocab, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# per-block math shared by both entry points
# ---------------------------------------------------------------------------------------------


def _apply_transform_(a: torch.Tensor, tf: LogitTransform) -> torch.Tensor:
    """In place: a <- softcap(scale * a) / T."""
    if tf.logit_scale != 1.0:
        a.mul_(tf.logit_scale)
    if tf.softcap is not None:
        a.div_(tf.softcap).tanh_().mul_(tf.softcap)
    if tf.temperature != 1.0:
        a.mul_(tf.inv_temperature)
    return a


def _transform_grad_(dz: torch.Tensor, z: torch.Tensor, tf: LogitTransform) -> torch.Tensor:
    """In place: dz <- dz * dz/d(h.W + b), written in terms of the transformed logits z."""
    if tf.softcap is not None:
        # z = c tanh(a / c) / T  =>  dz/da = (1 - (z T / c)^2) / T
        t = z * (tf.temperature / tf.softcap)
        dz.mul_(1.0 - t * t)
    factor = tf.logit_scale * tf.inv_temperature
    if factor != 1.0:
        dz.mul_(factor)
    return dz


def _safe(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (rows whose logits are all -inf) replaced by 0, so z - lse never is NaN."""
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _topk_weights(z: torch.Tensor, k: int, tau: Optional[torch.Tensor] = None, frac=None):
    """Weight of each logit in the clamped set S: 1 above tau, ``frac`` at tau, 0 below."""
    if tau is None:
        vocab = z.shape[-1]
        tau = torch.kthvalue(z, vocab - k + 1, dim=-1).values
        n_gt = (z > tau[:, None]).sum(-1)
        n_eq = (z == tau[:, None]).sum(-1)
        frac = (k - n_gt).to(z.dtype) / n_eq.to(z.dtype)
    w = (z > tau[:, None]).to(z.dtype)
    w.add_((z == tau[:, None]).to(z.dtype) * frac[:, None])
    return w, tau, frac


def _block_stats(z, targets, valid, entropy: bool, k: Optional[int]):
    """Row statistics of one ``[C, V]`` block of transformed logits (z is overwritten)."""
    lse = torch.logsumexp(z, dim=-1)
    lse0 = _safe(lse)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    z_y = z.gather(1, safe_t[:, None]).squeeze(1)
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, z_y - lse0, zero)
    ent = tau = frac = lse_c = ent_c = None
    if k is not None:
        w, tau, frac = _topk_weights(z, k)
        m = z.max(-1).values
        m0 = _safe(m)
        e = torch.exp(z - m0[:, None]).mul_(w)
        s = e.sum(-1)
        lse_c = m0 + torch.log(s)
        zf = z.clamp(min=torch.finfo(z.dtype).min)
        ent_c = torch.where(valid, lse_c - (e * zf).sum(-1) / s, zero)
        del e, w, zf
    if entropy:
        z.sub_(lse0[:, None])  # z <- log p
        p = torch.exp(z)
        z.clamp_(min=torch.finfo(z.dtype).min)  # 0 * -inf would be NaN; 0 * -max is 0
        ent = torch.where(valid, -(p.mul_(z)).sum(-1), zero)
    return lse, logp, ent, tau, frac, lse_c, ent_c


def _block_grad(z, targets, valid, stats_rows, g_lp, g_ent, g_cl, k, tf):
    """dL/d(h.W + b) for one block; ``z`` holds the transformed logits and is reused as output."""
    lse, ent, tau, frac, lse_c, ent_c = stats_rows
    lse0 = _safe(lse)
    dz = torch.zeros_like(z)
    if g_cl is not None:
        w, _, _ = _topk_weights(z, k, tau, frac)
        lc0 = _safe(lse_c)
        pi = torch.exp(z - lc0[:, None]).mul_(w)
        zf = z.clamp(min=torch.finfo(z.dtype).min)
        # dHc/dz = -w pi (z - lse_S + Hc)
        dz.sub_(pi.mul_(zf - lc0[:, None] + ent_c[:, None]).mul_(g_cl[:, None]))
        del w, pi, zf
    if g_lp is not None or g_ent is not None:
        logp_all = (z - lse0[:, None]).clamp_(min=torch.finfo(z.dtype).min)
        p = torch.exp(logp_all)
        if g_ent is not None:
            # dH/dz = -p (log p + H)
            dz.sub_(p * (logp_all + ent[:, None]) * g_ent[:, None])
        if g_lp is not None:
            # dlogp/dz = onehot(y) - p
            dz.sub_(p.mul_(g_lp[:, None]))
            safe_t = torch.where(valid, targets, torch.zeros_like(targets))
            dz.scatter_add_(1, safe_t[:, None], torch.where(valid, g_lp, torch.zeros_like(g_lp))[:, None])
        del p, logp_all
    # rows that are ignored, or whose every logit is -inf, get no gradient
    dz.mul_((valid & torch.isfinite(lse)).to(dz.dtype)[:, None])
    return _transform_grad_(dz, z, tf)


def _rows(t: Optional[torch.Tensor], sl: slice):
    return None if t is None else t[sl]


def _to_stats(parts, n, device, dtype, entropy, k) -> RowStats:
    cat = lambda i: torch.cat([p[i] for p in parts]) if parts else torch.zeros(n, device=device, dtype=dtype)
    lse, logp = cat(0), cat(1)
    ent = cat(2) if entropy else None
    if k is None:
        return RowStats(lse, logp, ent)
    return RowStats(lse, logp, ent, cat(3), cat(4), cat(5), cat(6))


# ---------------------------------------------------------------------------------------------
# fused linear head
# ---------------------------------------------------------------------------------------------


def _logit_block(x_c, w_c, bias, tf, cdt):
    z = x_c.to(cdt) @ w_c.T
    if bias is not None:
        z.add_(bias.to(cdt))
    return _apply_transform_(z, tf)


def linear_forward(x, weight, bias, targets, tf, ignore_index, entropy, k) -> RowStats:
    n, vocab = x.shape[0], weight.shape[0]
    cdt = _compute_dtype(x.dtype)
    w_c = weight.to(cdt)
    step = chunk_rows(n, vocab)
    parts = []
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        z = _logit_block(x[sl], w_c, bias, tf, cdt)
        y = targets[sl]
        parts.append(_block_stats(z, y, y != ignore_index, entropy, k))
        del z
    return _to_stats(parts, n, x.device, cdt, entropy, k)


def linear_backward(x, weight, bias, targets, tf, ignore_index, stats: RowStats, g_lp, g_ent, g_cl, k):
    n, vocab = x.shape[0], weight.shape[0]
    cdt = _compute_dtype(x.dtype)
    w_c = weight.to(cdt)
    grad_x = torch.empty(x.shape, device=x.device, dtype=cdt)
    grad_w = torch.zeros(w_c.shape, device=x.device, dtype=cdt)
    grad_b = torch.zeros(vocab, device=x.device, dtype=cdt) if bias is not None else None
    step = chunk_rows(n, vocab)
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        x_c = x[sl].to(cdt)
        z = _logit_block(x_c, w_c, bias, tf, cdt)
        y = targets[sl]
        rows = tuple(_rows(t, sl) for t in (stats.lse, stats.entropy, stats.tau, stats.tie_frac,
                                            stats.lse_clamped, stats.clamped_entropy))
        dz = _block_grad(z, y, y != ignore_index, rows, _rows(g_lp, sl), _rows(g_ent, sl), _rows(g_cl, sl), k, tf)
        del z
        torch.mm(dz, w_c, out=grad_x[sl])
        grad_w.addmm_(dz.T, x_c)
        if grad_b is not None:
            grad_b.add_(dz.sum(0))
        del dz
    return (
        grad_x.to(x.dtype),
        grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


# ---------------------------------------------------------------------------------------------
# logits already in memory
# ---------------------------------------------------------------------------------------------


def logits_forward(logits, targets, tf, ignore_index, entropy, k) -> RowStats:
    n, vocab = logits.shape
    cdt = _compute_dtype(logits.dtype)
    step = chunk_rows(n, vocab)
    parts = []
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        z = _apply_transform_(logits[sl].to(cdt, copy=True), tf)
        y = targets[sl]
        parts.append(_block_stats(z, y, y != ignore_index, entropy, k))
        del z
    return _to_stats(parts, n, logits.device, cdt, entropy, k)


def logits_backward(logits, targets, tf, ignore_index, stats: RowStats, g_lp, g_ent, g_cl, k):
    n, vocab = logits.shape
    cdt = _compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    step = chunk_rows(n, vocab)
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        z = _apply_transform_(logits[sl].to(cdt, copy=True), tf)
        y = targets[sl]
        rows = tuple(_rows(t, sl) for t in (stats.lse, stats.entropy, stats.tau, stats.tie_frac,
                                            stats.lse_clamped, stats.clamped_entropy))
        grad[sl] = _block_grad(z, y, y != ignore_index, rows, _rows(g_lp, sl), _rows(g_ent, sl), _rows(g_cl, sl), k, tf)
        del z
    return grad


# ---------------------------------------------------------------------------------------------
# single pass: gradients inside the forward (3 matrix products instead of 4)
# ---------------------------------------------------------------------------------------------


def _block_logp_(z):
    """In place: z <- log p (clamped to the dtype's lowest finite value), returns (p, lse, lse0)."""
    m0 = _safe(z.amax(-1))
    z.sub_(m0[:, None])
    p = torch.exp(z)
    s = p.sum(-1)
    log_s = torch.log(s)
    lse = m0 + log_s  # -inf for a row of -inf logits (s = 0)
    lse0 = _safe(lse)
    z.sub_(_safe(log_s)[:, None]).clamp_(min=torch.finfo(z.dtype).min)
    p.div_(torch.where(s > 0, s, torch.ones_like(s))[:, None])
    return p, lse, lse0


def linear_forward_backward(x, weight, bias, targets, tf, ignore_index, entropy, k, grad_fn, rows_per_chunk=None):
    """Forward statistics and gradients in one sweep over row chunks.

    For each chunk of rows ``sl`` the block's statistics are computed, then
    ``grad_fn(sl, logprobs_c, entropy_c, clamped_c) -> (g_logprobs, g_entropy, g_clamped)`` (each
    ``[C]`` or None) gives the upstream gradients of those rows, and dX, dW, db are accumulated from
    the same block. Valid whenever a row's upstream gradient depends only on statistics of rows in
    its own chunk plus constants known beforehand (token-level objectives with fixed normalizers).
    Three matrix products in all (logits, dX, dW); two ``[C, V]`` buffers per chunk.

    Returns ``(RowStats, grad_x, grad_weight, grad_bias)``.
    """
    n, vocab = x.shape[0], weight.shape[0]
    cdt = _compute_dtype(x.dtype)
    w_c = weight.to(cdt)
    grad_x = torch.empty(x.shape, device=x.device, dtype=cdt)
    grad_w = torch.zeros(w_c.shape, device=x.device, dtype=cdt)
    grad_b = torch.zeros(vocab, device=x.device, dtype=cdt) if bias is not None else None
    step = rows_per_chunk or chunk_rows(n, vocab)
    zero = torch.zeros((), dtype=cdt, device=x.device)
    parts = []
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        x_c = x[sl].to(cdt)
        y = targets[sl]
        valid = y != ignore_index
        safe_t = torch.where(valid, y, torch.zeros_like(y))
        z = _logit_block(x_c, w_c, bias, tf, cdt)
        tau = frac = lse_c = ent_c = None
        if k is not None:
            # the clamped statistics read the transformed logits before they are overwritten
            _, _, _, tau, frac, lse_c, ent_c = _block_stats(z.clone(), y, valid, False, k)
            cl_rows = (tau, frac, lse_c, ent_c)
        z_soft = z.clone() if tf.softcap is not None else None  # the softcap chain rule needs z
        if k is not None:
            g_cl_block = z.clone()  # clamped-entropy gradient is formed from the logits as well
        p, lse, lse0 = _block_logp_(z)  # z now holds log p
        logp = torch.where(valid, z.gather(1, safe_t[:, None]).squeeze(1), zero)
        ent = None
        if entropy:
            ent = torch.where(valid, -torch.linalg.vecdot(p, z), zero)
        parts.append((lse, logp, ent, tau, frac, lse_c, ent_c))
        g_lp, g_ent, g_cl = grad_fn(sl, logp, ent, ent_c)
        live = valid & torch.isfinite(lse)
        g_lp, g_ent, g_cl = (None if g is None else torch.where(live, g.to(cdt), zero) for g in (g_lp, g_ent, g_cl))
        # dL/dz = p * (-g_ent (log p + H) - g_lp) + onehot(y) g_lp, formed in place in z
        if g_ent is not None:
            z.add_(ent[:, None]).mul_(-g_ent[:, None])
        else:
            z.zero_()
        if g_lp is not None:
            z.sub_(g_lp[:, None])
        z.mul_(p)
        del p
        if g_lp is not None:
            z.scatter_add_(1, safe_t[:, None], g_lp[:, None])
        if k is not None and g_cl is not None:
            z.add_(_block_grad(g_cl_block, y, valid, (lse, ent, *cl_rows), None, None, g_cl, k, LogitTransform()))
        if k is not None:
            del g_cl_block
        dz = _transform_grad_(z, z_soft, tf) if z_soft is not None else _transform_grad_(z, None, tf)
        torch.mm(dz, w_c, out=grad_x[sl])
        grad_w.addmm_(dz.T, x_c)
        if grad_b is not None:
            grad_b.add_(dz.sum(0))
        del z, dz, z_soft
    stats = _to_stats(parts, n, x.device, cdt, entropy, k)
    return (
        stats,
        grad_x.to(x.dtype),
        grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )
