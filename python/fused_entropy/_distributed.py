"""Vocabulary-parallel LM head over ``torch.distributed`` (tensor parallelism of the head).

Each rank ``r`` of ``process_group`` holds a contiguous vocabulary shard ``W_r = W[o_r : o_r + V_r]``
(and ``b_r``), shards of any sizes, ``o_r = V_0 + ... + V_{r-1}``; hidden states and (global) target
ids are the same on every rank. A rank runs the backend's forward on its shard with *local* target
ids (a row whose target lies in another shard gets an id outside ``[0, V_r)``: it is computed in
full, its target logit counts as 0 and its gradient has no one-hot term), which gives per row

    m_r   = max_{v in r} z_v,   log s_r = log sum_{v in r} e^{z_v - m_r},
    H_r   = entropy of the softmax over the shard,
    d_r   = z_y - m_r (= logp_r + log s_r) on the shard that holds y.

Those ``[N]`` statistics are gathered and merged identically on every rank (MATH.md section 2),
keeping the log-sum-exp split as (max, log-sum) like every backend (``RowStats``; ``lse = m + log s``
rounded to fp32 loses ``log s`` at large ``|m|``)::

    m     = max_r m_r,   a_r = (m_r - m) + log s_r   (log of shard r's share of s)
    log s = log sum_r e^{a_r}
    pi_r  = e^{a_r - log s}                       (the probability mass of shard r)
    logp  = (d_r + (m_r - m)) - log s             (r: the shard that holds y)
    H     = sum_r pi_r (H_r - log pi_r)           (= lse - sum_v p_v z_v, with no cancellation)

Clamped entropy (MATH.md section 3) needs the k-th largest logit ``tau`` of the whole row. It is
found exactly by a radix select on order-preserving integer keys of the logits: per digit, every
rank counts the digits of its logits that share the prefix chosen so far into a per-row histogram
(``[N, 2^bits]`` int32: 11-bit digits, 10 for the last), the histograms are all-reduced, and every
rank picks the same bin. The
last digit's bins are single floats, so ``tau``, ``#{z > tau}`` and ``#{z == tau}`` are exact and
global, the tie weight is ``tie_frac = (k - #{z > tau}) / #{z == tau}`` over the whole vocabulary,
and the clamped sums (shifted by the global row max ``m``)::

    s_S = s_above + sum_{bins above tau} count_b e^{v_b - m} + (k - #{z > tau}) e^{tau - m}

(``s_above``: the logits above the last digit's range, summed in the last pass and all-reduced)
give ``log s_S`` (the clamped log-sum-exp is ``m + log s_S``) and ``H~ = log s_S - t_S / s_S``
(``t_S`` likewise with ``(z - m)``).

Backward: the backend's gradient formulas only need the row's global statistics (``m``, ``log s``,
``H``, ``tau``, ``tie_frac``, ``log s_S``, ``H~``), so each rank calls the backend's backward on its shard
with the global statistics substituted: that gives the exact gradient of its weight (and bias)
shard and its share of the hidden gradient, which is all-reduced into the full one in the compute
dtype (fp32; fp64 for fp64 inputs; for 16-bit inputs each rank's share is rounded to the input dtype
by the backend first, then summed in fp32).

Collectives per call (``process_group`` of any ``torch.distributed`` backend):

- 1 ``all_gather`` of a small int64 vector: shard sizes (offsets), and every check that must fail
  on all ranks together (H, N, options, targets equal on every rank and in the global vocabulary);
- forward: 1 ``all_gather`` of ``[4 or 5, N]`` row statistics; with clamped entropy also
  ``R`` ``all_reduce`` of the ``[N, 2048]`` int32 digit histograms and 1 of ``[2, N]`` sums
  (``R`` = 3 digits for fp32 logits, i.e. fp16/bf16/fp32 inputs; 6 for fp64);
- backward: 1 ``all_reduce`` of the ``[N, H]`` hidden gradient (none with ``hidden_grad="partial"``).

Local work with clamped entropy: the forward plus ``R`` passes that recompute the shard's logits
(one matrix product each). The torch backend goes through ``backend.linear_logit_blocks`` and
:func:`radix_topk_stats`; the Triton backend provides ``linear_topk_select``, which follows the same
protocol with its radix kernels (``kernels/topk.py``: a first-digit pass of its own because the
forward runs without top-k, each rank's padded columns taken out before the histograms are summed,
the last pass's sums shifted by the global row max) and makes the same collectives. No ``[N, V]``
buffer on any rank.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Sequence

import torch

from ._autograd import once_differentiable
from ._types import LogitTransform, RowStats, clamp_p_to_k

HIDDEN_GRADS = ("full", "partial")

# Radix digits (most significant first) of the order-preserving keys of fp32 / fp64 logits.
RADIX_DIGITS = {32: (11, 11, 10), 64: (11, 11, 11, 11, 10, 10)}

# Shifted logits below this give exp() = 0 in every format; clamping keeps (z - c) * e finite.
_U_MIN = -1e4

_DTYPE_CODE = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_BACKEND_CODE = {"torch": 1, "triton": 2}


def _dist():
    import torch.distributed as dist

    return dist


def check_group(process_group, arg: str = "process_group"):
    """``process_group`` must be a usable group this process belongs to; returns ``(rank, world)``.

    Raised locally: a process that is not set up for collectives cannot take part in one.
    """
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{arg} was given but torch.distributed is not initialized (call init_process_group first)")
    try:
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    except Exception as e:  # not a ProcessGroup, or a group this process is not part of
        raise ValueError(f"{arg} must be a torch.distributed process group this rank belongs to, got {process_group!r} ({e})") from e
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of {arg}")
    return rank, world


def _comm_device(group, device: torch.device) -> torch.device:
    """Where a collective's tensors go: the data's own device, except that CPU data moves to the current
    accelerator when the group has no CPU backend (NCCL and the like; gloo and MPI take CPU tensors)."""
    if device.type != "cpu":
        return device
    backend = str(_dist().get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return device
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.current_accelerator() is not None:
        kind = acc.current_accelerator().type
        return torch.device(kind, acc.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def _float_bits(x: Optional[float]) -> int:
    if x is None:
        return 0
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


# ---------------------------------------------------------------------------------------------
# the agreement step: one all_gather, every check that must fail on all ranks together
# ---------------------------------------------------------------------------------------------


class ShardLayout(NamedTuple):
    """Where this rank's shard sits: ``sizes[r]`` rows per rank, ``offset`` of this rank, ``vocab`` total,
    ``k`` the clamped-set size resolved against the global vocabulary (None without clamped entropy)."""

    rank: int
    world: int
    sizes: tuple
    offset: int
    vocab: int
    k: Optional[int]


_FIELDS = ("status", "vocab_local", "hidden", "rows", "dtype", "backend", "entropy", "k_kind", "k_value",
           "ignore_none", "ignore_index", "vocab_size", "temperature", "softcap", "logit_scale", "has_bias",
           "grad_x", "hidden_grad", "n_valid", "t_min", "t_max", "t_sum", "t_wsum")
# Fields that every rank must agree on, with the name the error message uses.
_SAME = (
    ("hidden", "hidden size H"), ("rows", "number of tokens N"), ("dtype", "dtype"), ("backend", "backend"),
    ("entropy", "entropy"), ("k_kind", "topk/clamp_p"), ("k_value", "topk/clamp_p"),
    ("ignore_none", "ignore_index"), ("ignore_index", "ignore_index"), ("vocab_size", "vocab_size"),
    ("temperature", "temperature"), ("softcap", "softcap"), ("logit_scale", "logit_scale"),
    ("has_bias", "bias (given or not)"), ("grad_x", "hidden.requires_grad"), ("hidden_grad", "hidden_grad"),
)


def _describe(name: str, col: Sequence[int]) -> str:
    if name in ("temperature", "softcap", "logit_scale"):
        return str([struct.unpack("<d", struct.pack("<q", v))[0] for v in col])
    if name == "dtype":
        inv = {v: k for k, v in _DTYPE_CODE.items()}
        return str([str(inv.get(v, "?")).replace("torch.", "") for v in col])
    if name == "backend":
        inv = {v: k for k, v in _BACKEND_CODE.items()}
        return str([inv.get(v, "?") for v in col])
    return str(list(col))


def agree(group, local_error: Optional[BaseException], *, weight=None, hidden=None, targets=None, bias=None,
          tf: Optional[LogitTransform] = None, ignore_index: Optional[int] = None, entropy: bool = True,
          topk=None, clamp_p=None, vocab_size=None, backend_name: str = "torch", hidden_grad: str = "full",
          grad_x: bool = False) -> ShardLayout:
    """All ranks exchange their shard size and a fingerprint of their inputs in ONE all_gather, then
    either all raise the same error or all return the same :class:`ShardLayout`.

    ``local_error``: an exception this rank's own checks raised (it is re-raised here, after the
    collective, on this rank; the others raise a ValueError naming this rank). The other arguments
    are only read when ``local_error`` is None.
    """
    dist = _dist()
    rank, world = check_group(group)
    row = dict.fromkeys(_FIELDS, 0)
    if local_error is None:
        t = targets.reshape(-1)
        valid = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
        tv = t[valid]
        n_valid = int(tv.numel())
        pos = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.long)
        k_kind, k_value = (1, int(topk)) if topk is not None else ((2, _float_bits(clamp_p)) if clamp_p is not None else (0, 0))
        row.update(
            vocab_local=weight.shape[0], hidden=hidden.shape[-1], rows=t.numel(), dtype=_DTYPE_CODE[hidden.dtype],
            backend=_BACKEND_CODE[backend_name], entropy=int(bool(entropy)), k_kind=k_kind, k_value=k_value,
            ignore_none=int(ignore_index is None), ignore_index=0 if ignore_index is None else int(ignore_index),
            vocab_size=-1 if vocab_size is None else int(vocab_size), temperature=_float_bits(tf.temperature),
            softcap=_float_bits(tf.softcap), logit_scale=_float_bits(tf.logit_scale), has_bias=int(bias is not None),
            grad_x=int(bool(grad_x)), hidden_grad=HIDDEN_GRADS.index(hidden_grad), n_valid=n_valid,
            t_min=int(tv.min()) if n_valid else 0, t_max=int(tv.max()) if n_valid else 0,
            t_sum=int(t.sum()) if t.numel() else 0, t_wsum=int((t * pos).sum()) if t.numel() else 0,
        )
    else:
        row["status"] = 1
    # CPU data for every rank alike (a rank that failed its checks may not know a device)
    dev = _comm_device(group, torch.device("cpu"))
    mine = torch.tensor([row[f] for f in _FIELDS], dtype=torch.int64, device=dev)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu().tolist()
    col = {f: [r[i] for r in table] for i, f in enumerate(_FIELDS)}

    failed = [r for r, s in enumerate(col["status"]) if s]
    if failed:
        if local_error is not None:
            raise local_error
        raise ValueError(f"linear_logprobs: rank(s) {failed} of process_group rejected their inputs (see the error "
                         f"raised there); every rank of the group stops here")
    for field, label in _SAME:
        if len(set(col[field])) != 1:
            raise ValueError(f"linear_logprobs with process_group: {label} must be the same on every rank, "
                             f"got {_describe(field, col[field])} on ranks 0..{world - 1}")
    if len(set(col["t_sum"])) != 1 or len(set(col["t_wsum"])) != 1 or len(set(col["n_valid"])) != 1:
        raise ValueError("linear_logprobs with process_group: targets differ across ranks; vocabulary "
                         "parallelism needs the same (global) target ids on every rank")
    sizes = tuple(col["vocab_local"])
    vocab = sum(sizes)
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"the vocabulary shards (weight.shape[0] per rank: {list(sizes)}) add up to {vocab}, "
                         f"but vocab_size={vocab_size}")
    if col["n_valid"][0]:
        lo, hi = col["t_min"][0], col["t_max"][0]
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
            raise ValueError(f"targets must be global ids in [0, {vocab}){allowed} (the shards {list(sizes)} add up "
                             f"to V={vocab}); found {bad}")
    k = None
    if topk is not None:
        if not 1 <= topk <= vocab:
            raise ValueError(f"topk must be in [1, V={vocab}] (the global vocabulary), got {topk}")
        k = int(topk)
    elif clamp_p is not None:
        k = clamp_p_to_k(float(clamp_p), vocab)
    return ShardLayout(rank, world, sizes, sum(sizes[:rank]), vocab, k)


# ---------------------------------------------------------------------------------------------
# merging per-rank row statistics
# ---------------------------------------------------------------------------------------------


def _gather_rows(stats: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[c, N]`` per rank -> ``[world, c, N]`` (rank order), on the device of ``stats``."""
    dist = _dist()
    dev = _comm_device(group, stats.device)
    mine = stats.to(dev).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).to(stats.device)


def _safe(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def merge_row_stats(m_r: torch.Tensor, log_s_r: torch.Tensor, d_r: torch.Tensor, here_r: torch.Tensor,
                    ent_r: Optional[torch.Tensor]):
    """``[W, N]`` per-shard statistics -> global ``(m, log_s, z_y - m, entropy | None)``, each ``[N]``.

    ``m_r``/``log_s_r``: each shard's row max and log-sum (``-inf``/0 on a shard of only ``-inf``
    logits); ``d_r = z_y - m_r`` where ``here_r`` (the shard holds the target), else ignored.
    ``m = max_r m_r``, ``log s = log sum_r e^{a_r}`` with ``a_r = (m_r - m) + log s_r``,
    ``z_y - m = d_r + (m_r - m)`` on the target's shard, ``H = sum_r pi_r (H_r - log pi_r)`` with
    ``log pi_r = a_r - log s``. Never ``lse = m + log s`` as one number (see ``RowStats``). A row
    whose logits are all ``-inf`` gets ``m = -inf``, ``log_s = 0``, ``H = 0``.
    """
    m = m_r.amax(0)
    live = torch.isfinite(m)
    m0 = _safe(m)
    zero = torch.zeros((), dtype=m_r.dtype, device=m_r.device)
    a_r = (m_r - m0) + log_s_r  # -inf on a shard of only -inf logits
    s = torch.exp(a_r).sum(0)
    log_s = torch.where(live, torch.log(torch.where(live, s, torch.ones_like(s))), zero)
    dy = torch.where(here_r, d_r + (m_r - m0), zero).sum(0)
    ent = None
    if ent_r is not None:
        log_pi = a_r - log_s
        pi = torch.exp(log_pi)
        term = torch.where(pi > 0, pi * (ent_r - torch.where(pi > 0, log_pi, torch.zeros_like(log_pi))), torch.zeros_like(pi))
        ent = torch.where(live, term.sum(0), torch.zeros_like(m))
    return m, log_s, dy, ent


# ---------------------------------------------------------------------------------------------
# exact global top-k threshold: radix select with all-reduced digit histograms
# ---------------------------------------------------------------------------------------------


def _order_keys(z: torch.Tensor) -> torch.Tensor:
    """int64 keys with ``key(a) < key(b)`` iff ``a < b`` (-0.0 and +0.0 share one key)."""
    z = z + 0.0  # -0.0 + 0.0 = +0.0
    if z.dtype == torch.float64:
        s = z.view(torch.int64)
        return torch.where(s < 0, s ^ 0x7FFFFFFFFFFFFFFF, s)
    s = z.view(torch.int32).to(torch.int64)
    return torch.where(s < 0, s ^ 0x7FFFFFFF, s)


def _key_to_float(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float64:
        return torch.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).view(torch.float64)
    return torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32).view(torch.float32)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    dist = _dist()
    dev = _comm_device(group, t.device)
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device) if buf is not t else t


def radix_topk_stats(blocks, n: int, k: int, shift: torch.Tensor, dtype: torch.dtype, group):
    """Global clamped-set statistics of every row from this rank's logit blocks.

    ``blocks()``: a fresh iterator of ``(rows slice, z [C, V_r])`` over this rank's shard (one pass
    each). ``shift`` ``[N]``: the global row max (0 on rows whose logits are all ``-inf``), so every
    ``e^{z - shift} <= 1``. Returns ``(tau, tie_frac, s_S, t_S)`` as in the module docstring;
    identical on every rank. Collectives: one all_reduce per digit, plus one of the
    ``[2, N]`` sums.
    """
    bits = 64 if dtype == torch.float64 else 32
    digits = RADIX_DIGITS[bits]
    dev = shift.device
    k_rem = torch.full((n,), k, dtype=torch.int64, device=dev)
    prefix = torch.zeros(n, dtype=torch.int64, device=dev)
    low = bits
    sums = torch.zeros(2, n, dtype=dtype, device=dev)
    for i, d in enumerate(digits):
        low -= d
        first, last = i == 0, i == len(digits) - 1
        nbins = 1 << d
        hist = torch.zeros(n, nbins, dtype=torch.int32, device=dev)
        for sl, z in blocks():
            key = _order_keys(z)
            if first:
                # arithmetic shift of a signed key: the top digit is in [-2^(d-1), 2^(d-1))
                idx = (key >> low) + (nbins >> 1)
                hist[sl].scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))
                continue
            high = key >> (low + d)
            match = high == prefix[sl, None]
            idx = torch.where(match, (key >> low) & (nbins - 1), torch.zeros_like(key))
            hist[sl].scatter_add_(1, idx, match.to(torch.int32))
            if last:
                # every logit whose key is above the last digit's range is in S for sure
                above = high > prefix[sl, None]
                u = (z - shift[sl, None]).clamp_(min=_U_MIN)
                e = torch.where(above, torch.exp(u), torch.zeros((), dtype=u.dtype, device=dev))
                sums[0, sl] += e.sum(-1)
                sums[1, sl] += (e * u).sum(-1)
        hist = _all_reduce(hist, group).to(torch.int64)
        at_or_above = hist.flip(1).cumsum(1).flip(1)  # sum over bins >= b
        b = (at_or_above >= k_rem[:, None]).sum(1) - 1  # the bin holding the k_rem-th largest key
        n_above = (at_or_above - hist).gather(1, b[:, None]).squeeze(1)
        k_rem -= n_above
        prefix = b - (nbins >> 1) if first else (prefix << d) | b
        if last:
            n_eq = hist.gather(1, b[:, None]).squeeze(1)
            sums = _all_reduce(sums, group)
            # bins of the last digit above tau: one exact value each
            bin_keys = (prefix - b)[:, None] + torch.arange(nbins, device=dev)[None, :]
            vals = _key_to_float(bin_keys, dtype)
            take = (torch.arange(nbins, device=dev)[None, :] > b[:, None]) & (hist > 0)
            u = torch.where(take, vals - shift[:, None], torch.zeros((), dtype=dtype, device=dev)).clamp_(min=_U_MIN)
            e = torch.where(take, torch.exp(u) * hist.to(dtype), torch.zeros((), dtype=dtype, device=dev))
            tau = _key_to_float(prefix, dtype)
            u_tau = (tau - shift).clamp(min=_U_MIN)
            e_tau = torch.exp(u_tau) * k_rem.to(dtype)
            s_s = sums[0] + e.sum(-1) + e_tau
            t_s = sums[1] + (e * u).sum(-1) + e_tau * u_tau
            frac = k_rem.to(dtype) / n_eq.to(dtype)
            return tau, frac, s_s, t_s
    raise AssertionError("unreachable: the digit loop returns on its last digit")


# ---------------------------------------------------------------------------------------------
# the autograd function
# ---------------------------------------------------------------------------------------------


def _other_shard_id(ignore_index: int) -> int:
    """Local target id for a row whose target lies in another shard: negative (so it never names a
    column, padded ones included) and never equal to ``ignore_index``."""
    return -1 if ignore_index != -1 else -2


def _stats_tensors(stats: RowStats):
    return [t for t in stats if t is not None]


class VocabParallelLinearLogprobsFunction(torch.autograd.Function):
    """``(x [N,H], W_r [V_r,H], b_r [V_r]|None, targets [N] global) -> (logprobs, entropy, clamped) [N]``,
    global values on every rank. Saves x, W_r, b_r, local targets and O(N) global row statistics.
    Backward returns this rank's weight/bias shard gradient and the full hidden gradient (all-reduced
    here) or, with ``full_hidden_grad=False``, this rank's share of it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, tf: LogitTransform, ignore_index: int, entropy: bool,
                layout: ShardLayout, backend, group, full_hidden_grad: bool):
        k = layout.k
        valid = targets != ignore_index
        here = valid & (targets >= layout.offset) & (targets < layout.offset + weight.shape[0])
        local = torch.where(here, targets - layout.offset, torch.full_like(targets, _other_shard_id(ignore_index)))
        local = torch.where(valid, local, targets)
        need_ent = entropy
        st = backend.linear_forward(x, weight, bias, local, tf, ignore_index, need_ent, None)
        cdt = st.m.dtype
        zero = torch.zeros((), dtype=cdt, device=st.m.device)
        n = x.shape[0]
        if n == 0:  # every rank has N = 0 (agreed): nothing to exchange
            stats = RowStats(st.m, st.log_s, st.logprobs, st.entropy, *([st.m] * 4 if k is not None else []))
        else:
            # z_y - m_r on the shard that holds the target (logp_r = (z_y - m_r) - log s_r)
            d = torch.where(here, st.logprobs + st.log_s, zero)
            rows = [st.m, st.log_s, d, here.to(cdt)] + ([st.entropy] if need_ent else [])
            g = _gather_rows(torch.stack(rows), group, layout.world)
            m, log_s, dy, ent = merge_row_stats(g[:, 0], g[:, 1], g[:, 2], g[:, 3] > 0, g[:, 4] if need_ent else None)
            live = torch.isfinite(m)
            logp = torch.where(valid, dy - log_s, zero)
            if ent is not None:
                ent = torch.where(valid, ent, zero)
            stats = RowStats(m, log_s, logp, ent)
            if k is not None:
                shift = _safe(m)
                select = getattr(backend, "linear_topk_select", None)
                if select is not None:  # Triton: the same protocol over its fused radix passes
                    tau, frac, s_s, t_s = select(x, weight, bias, tf, k, shift, lambda t: _all_reduce(t, group))
                else:
                    tau, frac, s_s, t_s = radix_topk_stats(
                        lambda: backend.linear_logit_blocks(x, weight, bias, tf), n, k, shift, cdt, group)
                s_safe = torch.where(live, s_s, torch.ones_like(s_s))
                log_s_c = torch.log(s_safe)  # relative to m, like log_s; 0 on rows of only -inf
                ent_c = torch.where(valid & live, log_s_c - t_s / s_safe, zero)
                stats = RowStats(m, log_s, logp, ent, tau, frac, log_s_c, ent_c)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, local, *_stats_tensors(stats))
        ctx.meta = (tf, ignore_index, entropy, k, backend, group, full_hidden_grad)
        empty = stats.logprobs.new_empty(0)
        return (
            stats.logprobs,
            stats.entropy if entropy else empty,
            stats.clamped_entropy if k is not None else empty,
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent, g_cl):
        x, weight, bias, local, *saved = ctx.saved_tensors
        tf, ignore_index, entropy, k, backend, group, full = ctx.meta
        it = iter(saved)
        m, log_s, logp = next(it), next(it), next(it)
        ent = next(it) if entropy else None
        stats = RowStats(m, log_s, logp, ent, *(list(it) if k is not None else []))
        cdt = m.dtype
        valid = local != ignore_index
        g_ent = g_ent if entropy else None
        g_cl = g_cl if k is not None else None
        g_lp, g_ent, g_cl = (None if g is None else torch.where(valid, g.to(cdt), torch.zeros((), dtype=cdt, device=g.device))
                             for g in (g_lp, g_ent, g_cl))
        need_x = ctx.needs_input_grad[0]
        gx = gw = gb = None
        if g_lp is not None or g_ent is not None or g_cl is not None:
            gx, gw, gb = backend.linear_backward(x, weight, bias, local, tf, ignore_index, stats, g_lp, g_ent, g_cl, k,
                                                 needs=tuple(ctx.needs_input_grad[:3]))
        # The all-reduce runs on every rank whose hidden needs a gradient (agreed on in the forward),
        # even one whose upstream gradients are all None, so no rank waits on another.
        if need_x and full and x.shape[0] > 0:
            part = torch.zeros(x.shape, dtype=cdt, device=x.device) if gx is None else gx.to(cdt)
            gx = _all_reduce(part, group).to(x.dtype)
        return (
            gx if need_x else None,
            gw if ctx.needs_input_grad[1] else None,
            gb if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None, None,
        )
