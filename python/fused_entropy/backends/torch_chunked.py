"""Pure-PyTorch backend: the same math as the Triton kernels, chunked over rows.

Each chunk of ``C`` rows computes one ``[C, V]`` logit block into a workspace that is allocated
once per call and reused by every chunk, so working memory is a few ``[C, V]`` blocks, never
``[N, V]``, and the allocator never churns (per-chunk temporaries made glibc keep ~2x ``[N, V]``
of freed heap resident). Blocks in use: 2 (logits, probabilities), 3 with clamped entropy, +1 with
softcap.

Chunk policy: the workspace of one call (all its blocks together) is bounded in bytes, not in rows:
``C = bound // (blocks * V * itemsize)`` rows, at least 1, with ``blocks`` from
:func:`workspace_blocks` (3, or 4 with softcap). The bound is ``DEFAULT_WORKSPACE_MIB`` (64 MiB)
unless the environment variable ``FUSED_ENTROPY_WORKSPACE_MIB`` sets another (read at every call).
A fixed byte bound keeps working memory flat in N; at the bench's CPU case (V = 32768, fp32) it
gives 170-row chunks, whose products run at the speed of the best chunking there, where the old
32-row chunks were much slower (every chunk streams all of W through the logits and dX products and
reads and writes all of dW). The cost of a byte bound is at large V: 21 rows at V = 256k, where
each product streams W per few rows; raise the bound there if memory allows.

Matrix products: ``linear_forward`` 1, ``linear_backward`` 3 (recompute, dX, dW), and
``linear_forward_backward`` (single pass) 3. Products run in the input dtype when it is fp32/fp64;
bf16/fp16 inputs are upcast to fp32 chunk by chunk (the weight once), so logits are never rounded
to 16 bits (MATH.md section 7).

Entropy is accumulated from logits shifted by the row max, ``H = log s - sum(e u) / s`` with
``u = z - max``, so it does not cancel at large logits.

Clamped entropy: the k-th largest logit ``tau`` of each row comes from ``torch.kthvalue`` on the
block in the same pass (no extra matrix product); logits equal to ``tau`` share the remaining
weight ``(k - #{z > tau}) / #{z == tau}``, which gives the same value as any tie order.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._common import compute_dtype as _compute_dtype, zero_neg_inf
from .._types import LogitTransform, RowStats
from .torch_topk import radix_topk_stats

NAME = "torch"  # what backends.resolve_name gives for this module

DEFAULT_WORKSPACE_MIB = 64
WORKSPACE_ENV = "FUSED_ENTROPY_WORKSPACE_MIB"
# Overrides for tests that force many small chunks: a per-block element budget (None: derive it from
# the workspace bound) and a minimum row count.
CHUNK_ELEMENTS: Optional[int] = None
MIN_CHUNK_ROWS = 1


def workspace_bytes() -> int:
    """The workspace bound of one call: ``$FUSED_ENTROPY_WORKSPACE_MIB`` MiB, else ``DEFAULT_WORKSPACE_MIB``."""
    raw = os.environ.get(WORKSPACE_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKSPACE_MIB << 20
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not mib > 0 or mib == float("inf"):
        raise ValueError(f"{WORKSPACE_ENV} must be a positive number of MiB, got {raw!r}")
    return int(mib * 2**20)


def chunk_rows(n_rows: int, vocab: int, blocks: int = 3, itemsize: int = 4, budget: Optional[int] = None) -> int:
    """Rows per chunk so that ``blocks`` ``[C, vocab]`` blocks of ``itemsize`` bytes fit in ``budget``
    bytes (default :func:`workspace_bytes`); between 1 (or ``MIN_CHUNK_ROWS``) and ``n_rows``."""
    if CHUNK_ELEMENTS is not None:
        rows = CHUNK_ELEMENTS // max(vocab, 1)
    else:
        budget = workspace_bytes() if budget is None else budget
        rows = budget // max(1, blocks * vocab * itemsize)
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, rows)))


def workspace_blocks(tf: LogitTransform) -> int:
    """``[C, V]`` blocks a chunk is sized for: logits, probabilities, clamped weights, + the softcap
    factor. The clamped block is reserved even when a call has no top-k, so that every entry point
    (forward, backward, ``linear_logit_blocks``) cuts the same rows: a backward's recomputed logits
    must equal the forward's bit for bit (ties at the top-k threshold), and a GEMM's result may
    depend on its row count."""
    return 3 + (tf.softcap is not None)


def single_pass_rows(n: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk ``linear_forward_backward`` is given by ``LinearGRPOLoss`` by default: the
    workspace bound over the most blocks a single pass can hold (logits, probabilities, clamped
    weights, softcap factor), so the bound holds for any transform. (It took 56 rows before: every
    chunk streams W through two products and rewrites dW, about 3x the memory traffic of 128 rows.)"""
    return chunk_rows(n, vocab, blocks=4, itemsize=_compute_dtype(dtype).itemsize)


class _Workspace:
    """``[C, V]`` blocks allocated on first use and reused by every chunk of one call."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, vocab), dtype, device
        self._bufs: dict = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return buf[:rows]


# Shifted logits (z - max, or (z - max) - log s) are clamped here: exp(-1e4) is 0 in every float format, so
# such entries have p = 0 and contribute nothing, while u * g stays finite (-inf * g would not).
U_MIN = -1e4


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[r, v] * b[r, v] as a batched GEMV (linalg.vecdot would allocate a [C, V] product)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).reshape(a.shape[0])


# ---------------------------------------------------------------------------------------------
# per-block math shared by every entry point
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


def _softcap_factor(z: torch.Tensor, tf: LogitTransform, out: torch.Tensor) -> torch.Tensor:
    """out <- (1 - (z T / c)^2): d softcap / d its input, in terms of the transformed logit z."""
    torch.mul(z, tf.temperature / tf.softcap, out=out)
    return out.square_().neg_().add_(1.0)


def _chain_transform_(dz: torch.Tensor, factor: Optional[torch.Tensor], tf: LogitTransform,
                      valid: torch.Tensor) -> torch.Tensor:
    """In place: dL/dz -> dL/d(h.W + b), 0 on the rows that are not ``valid`` (ignored).

    Their upstream gradients are 0 already, but a NaN or +inf logit in such a row makes its p and
    softcap factor NaN, and 0 * NaN is NaN: the row is zeroed explicitly (one pass over the block),
    as the Triton kernels do in registers."""
    if factor is not None:
        dz.mul_(factor)
    scale = tf.logit_scale * tf.inv_temperature
    if scale != 1.0:
        dz.mul_(scale)
    return dz.masked_fill_(~valid[:, None], 0.0)


def _in_block(y: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rows whose target is a column of this block (not ignored, and in [0, V))."""
    return valid & (y >= 0) & (y < vocab)


def _threshold(z: torch.Tensor, k: int):
    """tau = k-th largest entry of each row (the tie weight comes with the weights, below)."""
    # Row by row: kthvalue copies its input (values + int64 indices); on a whole block those
    # 12-byte-per-logit temporaries made resident memory grow with the number of chunks.
    c = z.shape[0]
    tau = torch.empty(c, dtype=z.dtype, device=z.device)
    idx = torch.empty(c, dtype=torch.long, device=z.device)
    for r in range(c):
        torch.kthvalue(z[r], z.shape[-1] - k + 1, out=(tau[r], idx[r]))
    return tau


def _weights_into(z, tau, out, scratch, *, k=None, frac=None):
    """out <- 1 where z > tau, frac where z == tau, 0 below: membership of the clamped set.

    With ``k`` the tie weight is computed here, ``frac = (k - #{z > tau}) / #{z == tau}``; counts
    are float sums of 0/1 blocks (exact below 2^24 columns) so no bool or int64 block is allocated.
    Returns ``(out, frac)``; ``scratch`` is a free block of the same shape.
    """
    gt = torch.gt(z, tau[:, None], out=scratch)
    eq = torch.eq(z, tau[:, None], out=out)
    if frac is None:
        frac = (k - gt.sum(-1)) / eq.sum(-1)
    return eq.mul_(frac[:, None]).add_(gt), frac


class _Fwd:
    """Forward statistics of one block, leaving what a gradient pass can reuse.

    After construction: ``u = z - m`` (in the z buffer), ``e = exp(u)`` (buffer p), and with k the
    clamped weights times ``e`` (buffer w). Row vectors: m (0 on a row of only -inf logits),
    s = sum e, log s, and the outputs. The log-sum-exp stays split as (m, log s), never rounded
    into ``lse = m + log s`` (see ``RowStats``): log p = (z - m) - log s. ``normalized``: False
    here; a recompute from saved statistics (``_recompute``) shifts by m and log s at once, so
    there ``u = log p`` and ``e = p``.
    """

    def __init__(self, z, ws, y, valid, entropy, k):
        c = z.shape[0]
        # A target outside [0, V) that is not ignore_index lies in another vocabulary shard: the row
        # is computed in full and its target logit counts as 0 (as in the Triton kernels).
        here = _in_block(y, valid, z.shape[1])
        z_y = z.gather(1, torch.where(here, y, torch.zeros_like(y))[:, None]).squeeze(1)
        z_y = torch.where(here, z_y, torch.zeros((), dtype=z.dtype, device=z.device))
        m = z.amax(-1)
        # False: every logit of the row is -inf. A NaN or +inf max keeps the row live, so its
        # statistics come out NaN (z - m is NaN somewhere), never a silent -inf or 0
        self.live = m != -torch.inf
        self.tau = self.frac = self.w = None
        if k is not None:
            self.tau = _threshold(z, k)
            # the p block is free until exp(u) is written into it below
            self.w, self.frac = _weights_into(z, self.tau, ws.get("w", c), ws.get("p", c), k=k)
        self.row_max = m  # -inf on a row of only -inf logits, as RowStats keeps it
        self.m = zero_neg_inf(m)
        z.sub_(self.m[:, None]).clamp_(min=U_MIN)
        self.u = z
        self.e = torch.exp(z, out=ws.get("p", c))
        self.normalized = False
        s = self.e.sum(-1)
        self.s = torch.where(self.live, s, torch.ones_like(s))
        self.log_s = torch.log(self.s)
        zero = torch.zeros_like(m)
        logp = (z_y - self.m) - self.log_s
        self.logprobs = torch.where(valid, torch.where(self.live, logp, torch.full_like(m, -torch.inf)), zero)
        self.entropy = None
        if entropy:
            h = self.log_s - _rowdot(self.e, z) / self.s
            self.entropy = torch.where(valid & self.live, h, zero)
        self.log_s_c = self.clamped_entropy = None
        if k is not None:
            self.w.mul_(self.e)
            s_c = self.w.sum(-1)
            self.s_c = torch.where(self.live, s_c, torch.ones_like(s_c))
            self.log_s_c = torch.log(self.s_c)
            hc = self.log_s_c - _rowdot(self.w, z) / self.s_c
            self.clamped_entropy = torch.where(valid & self.live, hc, zero)

    def stats(self):
        return (self.row_max, self.log_s, self.logprobs, self.entropy, self.tau, self.frac, self.log_s_c,
                self.clamped_entropy)


def _grad_from_fwd(f: _Fwd, y, valid, ent, ent_c, g_lp, g_ent, g_cl, ws, factor, tf):
    """dL/d(h.W + b) for a block whose forward state ``f`` is live; returns a view of the z buffer.

    dlogp/dz = onehot(y) - p,  dH/dz = -p (log p + H),  dHc/dz = -w pi (log pi + Hc),
    log p = (z - m) - log s,  log pi = (z - m) - log s_S.
    """
    u, e = f.u, f.e
    live = valid & f.live
    zero = torch.zeros((), dtype=u.dtype, device=u.device)
    g_lp, g_ent, g_cl = (None if g is None else torch.where(live, g.to(u.dtype), zero) for g in (g_lp, g_ent, g_cl))
    d_cl = None
    if g_cl is not None:
        # w holds weight * e. Shifted by the max (u = z - m): pi = w e / s_S and log pi = u - log s_S;
        # normalized (u = log p, e = p): pi = w p s / s_S and log pi = u + log s - log s_S.
        # The scratch log pi + Hc goes through the p buffer, then e is rebuilt.
        if f.normalized:
            scale, off = -g_cl * torch.exp(f.log_s - f.log_s_c), f.log_s - f.log_s_c + ent_c
        else:
            scale, off = -g_cl / f.s_c, ent_c - f.log_s_c
        d_cl = f.w.mul_(scale[:, None])
        torch.add(u, off[:, None], out=e)
        d_cl.mul_(e)
        torch.exp(u, out=e)
    if not f.normalized:
        e.div_(f.s[:, None])  # p = e^(z - m) / s
        u.sub_(f.log_s[:, None])  # log p = (z - m) - log s
    # dz = p * (-g_ent (log p + H) - g_lp), in as few passes over the block as possible
    if g_ent is not None:
        const = -(g_ent * ent) if g_lp is None else -(g_ent * ent + g_lp)
        u.mul_(-g_ent[:, None]).add_(const[:, None]).mul_(e)
    elif g_lp is not None:
        torch.mul(e, -g_lp[:, None], out=u)
    else:
        u.zero_()
    if g_lp is not None:
        here = _in_block(y, valid, u.shape[1])  # no one-hot term for a target in another shard
        u.scatter_add_(1, torch.where(here, y, torch.zeros_like(y))[:, None], torch.where(here, g_lp, zero)[:, None])
    if d_cl is not None:
        u.add_(d_cl)
    return _chain_transform_(u, factor, tf, valid)


def _rows(t: Optional[torch.Tensor], sl: slice):
    return None if t is None else t[sl]


def _to_stats(parts, n, device, dtype, entropy, k) -> RowStats:
    def cat(i):
        return torch.cat([p[i] for p in parts]) if parts else torch.zeros(n, device=device, dtype=dtype)

    m, log_s, logp = cat(0), cat(1), cat(2)
    ent = cat(3) if entropy else None
    if k is None:
        return RowStats(m, log_s, logp, ent)
    return RowStats(m, log_s, logp, ent, cat(4), cat(5), cat(6), cat(7))


def _logit_block(x_c, w_c, bias, tf, out):
    torch.mm(x_c.to(out.dtype), w_c.T, out=out)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return _apply_transform_(out, tf)


class HeadGrads:
    """dX, dW, db of a linear head accumulated chunk by chunk in the compute dtype (each None where not
    needed): the rows of dX written per chunk, dW and db summed over chunks; ``result()`` casts each
    back to the dtype of the tensor it belongs to."""

    def __init__(self, x, weight, bias, cdt: torch.dtype, needs=(True, True, True)):
        kw = dict(device=x.device, dtype=cdt)
        self.x = torch.zeros(x.shape, **kw) if needs[0] else None
        self.w = torch.zeros(weight.shape, **kw) if needs[1] else None
        self.b = torch.zeros(weight.shape[0], **kw) if needs[2] and bias is not None else None
        self._dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)

    def add(self, sl: slice, dz: torch.Tensor, x_c: torch.Tensor, w: torch.Tensor) -> None:
        """The chunk of rows ``sl``: ``dz [C, V]`` (dL/d(h.W + b)), its inputs ``x_c [C, H]``, ``w [V, H]``."""
        if self.x is not None:
            torch.mm(dz, w, out=self.x[sl])
        if self.w is not None:
            self.w.addmm_(dz.T, x_c)
        if self.b is not None:
            self.b.add_(dz.sum(0))

    def result(self):
        return tuple(None if g is None else g.to(dt) for g, dt in zip((self.x, self.w, self.b), self._dtypes))


class _Plan:
    """Chunking, compute dtype, upcast weight and workspace of one call."""

    def __init__(self, x, weight, rows_per_chunk=None, blocks=3):
        self.n, self.vocab = x.shape[0], weight.shape[0]
        self.cdt = _compute_dtype(x.dtype)
        self.w = weight.to(self.cdt)
        itemsize = torch.empty((), dtype=self.cdt).element_size()
        self.step = rows_per_chunk or chunk_rows(self.n, self.vocab, blocks, itemsize)
        self.ws = _Workspace(min(self.step, max(self.n, 1)), self.vocab, self.cdt, x.device)

    def chunks(self):
        for start in range(0, self.n, self.step):
            yield slice(start, min(start + self.step, self.n))


# ---------------------------------------------------------------------------------------------
# fused linear head
# ---------------------------------------------------------------------------------------------


def linear_forward(x, weight, bias, targets, tf, ignore_index, entropy, k) -> RowStats:
    plan = _Plan(x, weight, blocks=workspace_blocks(tf))
    parts = []
    for sl in plan.chunks():
        z = _logit_block(x[sl], plan.w, bias, tf, plan.ws.get("z", sl.stop - sl.start))
        y = targets[sl]
        parts.append(_Fwd(z, plan.ws, y, y != ignore_index, entropy, k).stats())
    return _to_stats(parts, plan.n, x.device, plan.cdt, entropy, k)


def linear_logit_blocks(x, weight, bias, tf):
    """Yield ``(rows, z)``: the transformed logits ``z [C, V]`` of each chunk of rows, computed exactly
    as ``linear_forward``/``linear_backward`` compute them (same chunks, same products, same dtype).

    For callers that reduce over the vocabulary themselves (``linear_topk_select``, the
    vocabulary-parallel top-k selection). ``z`` is a reused workspace: it is overwritten by the next block.
    """
    plan = _Plan(x, weight, blocks=workspace_blocks(tf))
    for sl in plan.chunks():
        yield sl, _logit_block(x[sl], plan.w, bias, tf, plan.ws.get("z", sl.stop - sl.start))


def linear_topk_select(x, weight, bias, tf, k, shift, all_reduce):
    """``(tau, tie_frac, s_S, t_S)`` [N] of a vocabulary split across ranks, from this rank's shard
    (``torch_topk.radix_topk_stats`` over ``linear_logit_blocks``: one product per radix digit);
    the same protocol as the Triton backend's ``linear_topk_select``."""
    blocks = lambda: linear_logit_blocks(x, weight, bias, tf)  # noqa: E731
    return radix_topk_stats(blocks, x.shape[0], k, shift, _compute_dtype(x.dtype), all_reduce)


def _recompute(z, ws, y, valid, stats_rows, k, tf):
    """Rebuild a block's forward state from the saved row statistics (no second kthvalue), shifted
    by the max and log s at once so that e = p directly: u = (z - m) - log s, two roundings as in
    the forward (never z - (m + log s): the sum loses log s at large |m|)."""
    c = z.shape[0]
    m, log_s, tau, frac, log_s_c = stats_rows
    factor = _softcap_factor(z, tf, ws.get("f", c)) if tf.softcap is not None else None
    f = _Fwd.__new__(_Fwd)
    f.live = m != -torch.inf
    f.w = _weights_into(z, tau, ws.get("w", c), ws.get("p", c), frac=frac)[0] if k is not None else None
    f.m = zero_neg_inf(m)
    f.log_s = log_s
    z.sub_(f.m[:, None]).sub_(log_s[:, None]).clamp_(min=U_MIN)
    f.u = z
    f.e = torch.exp(z, out=ws.get("p", c))
    f.normalized = True
    f.log_s_c = log_s_c
    if k is not None:
        f.w.mul_(f.e)
    return f, factor


def linear_backward(x, weight, bias, targets, tf, ignore_index, stats: RowStats, g_lp, g_ent, g_cl, k,
                    *, needs=(True, True, True)):
    plan = _Plan(x, weight, blocks=workspace_blocks(tf))
    grads = HeadGrads(x, weight, bias, plan.cdt, needs)
    for sl in plan.chunks():
        x_c = x[sl].to(plan.cdt)
        y = targets[sl]
        valid = y != ignore_index
        z = _logit_block(x_c, plan.w, bias, tf, plan.ws.get("z", sl.stop - sl.start))
        rows = [_rows(t, sl) for t in (stats.m, stats.log_s, stats.tau, stats.tie_frac, stats.log_s_clamped)]
        f, factor = _recompute(z, plan.ws, y, valid, rows, k if g_cl is not None else None, tf)
        dz = _grad_from_fwd(f, y, valid, _rows(stats.entropy, sl), _rows(stats.clamped_entropy, sl),
                            _rows(g_lp, sl), _rows(g_ent, sl), _rows(g_cl, sl), plan.ws, factor, tf)
        grads.add(sl, dz, x_c, plan.w)
    return grads.result()


def linear_forward_backward(x, weight, bias, targets, tf, ignore_index, entropy, k, grad_fn, rows_per_chunk=None,
                            *, needs=(True, True, True)):
    """Forward statistics and gradients in one sweep over row chunks.

    For each chunk of rows ``sl`` the block's statistics are computed, then
    ``grad_fn(sl, logprobs_c, entropy_c, clamped_c) -> (g_logprobs, g_entropy, g_clamped)`` (each
    ``[C]`` or None) gives the upstream gradients of those rows, and dX, dW, db are accumulated from
    the same block. Valid whenever a row's upstream gradient depends only on statistics of rows in
    its own chunk plus constants known beforehand (token-level objectives with fixed normalizers).
    Three matrix products in all (logits, dX, dW).

    Returns ``(RowStats, grad_x, grad_weight, grad_bias)``; a gradient whose ``needs`` entry is
    False is None and costs no matrix product.
    """
    plan = _Plan(x, weight, rows_per_chunk, blocks=workspace_blocks(tf))
    grads = HeadGrads(x, weight, bias, plan.cdt, needs)
    parts = []
    for sl in plan.chunks():
        c = sl.stop - sl.start
        x_c = x[sl].to(plan.cdt)
        y = targets[sl]
        valid = y != ignore_index
        z = _logit_block(x_c, plan.w, bias, tf, plan.ws.get("z", c))
        factor = _softcap_factor(z, tf, plan.ws.get("f", c)) if tf.softcap is not None else None
        f = _Fwd(z, plan.ws, y, valid, entropy, k)
        parts.append(f.stats())
        g_lp, g_ent, g_cl = grad_fn(sl, f.logprobs, f.entropy, f.clamped_entropy)
        dz = _grad_from_fwd(f, y, valid, f.entropy, f.clamped_entropy, g_lp, g_ent, g_cl, plan.ws, factor, tf)
        grads.add(sl, dz, x_c, plan.w)
    stats = _to_stats(parts, plan.n, x.device, plan.cdt, entropy, k)
    return (stats, *grads.result())


# ---------------------------------------------------------------------------------------------
# logits already in memory
# ---------------------------------------------------------------------------------------------


def _logits_plan(logits, tf):
    n, vocab = logits.shape
    cdt = _compute_dtype(logits.dtype)
    step = chunk_rows(n, vocab, workspace_blocks(tf), torch.empty((), dtype=cdt).element_size())
    return n, cdt, step, _Workspace(min(step, max(n, 1)), vocab, cdt, logits.device)


def _logit_chunks(logits, tf, step: int, ws: _Workspace):
    """Yield ``(rows, z)``: each chunk of rows of ``logits`` transformed into the workspace's z block."""
    n = logits.shape[0]
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        z = ws.get("z", sl.stop - sl.start)
        yield sl, _apply_transform_(z.copy_(logits[sl]), tf)


def logits_forward(logits, targets, tf, ignore_index, entropy, k) -> RowStats:
    n, cdt, step, ws = _logits_plan(logits, tf)
    parts = []
    for sl, z in _logit_chunks(logits, tf, step, ws):
        y = targets[sl]
        parts.append(_Fwd(z, ws, y, y != ignore_index, entropy, k).stats())
    return _to_stats(parts, n, logits.device, cdt, entropy, k)


def logits_backward(logits, targets, tf, ignore_index, stats: RowStats, g_lp, g_ent, g_cl, k):
    n, cdt, step, ws = _logits_plan(logits, tf)
    grad = torch.empty_like(logits)
    for sl, z in _logit_chunks(logits, tf, step, ws):
        y = targets[sl]
        valid = y != ignore_index
        rows = [_rows(t, sl) for t in (stats.m, stats.log_s, stats.tau, stats.tie_frac, stats.log_s_clamped)]
        f, factor = _recompute(z, ws, y, valid, rows, k if g_cl is not None else None, tf)
        grad[sl] = _grad_from_fwd(f, y, valid, _rows(stats.entropy, sl), _rows(stats.clamped_entropy, sl),
                                  _rows(g_lp, sl), _rows(g_ent, sl), _rows(g_cl, sl), ws, factor, tf)
    return grad
