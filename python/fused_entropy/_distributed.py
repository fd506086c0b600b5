"""Vocabulary-parallel LM head over ``torch.distributed`` (tensor parallelism of the head): the
agreement step, the merge of per-rank row statistics and the collectives. The autograd Function
that runs it is ``_autograd/vocab_parallel.py``.

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

Clamped entropy (MATH.md section 3) needs the k-th largest logit ``tau`` of the whole row: every
backend's ``linear_topk_select`` finds it exactly by a radix select whose per-digit histograms are
all-reduced (``backends/torch_topk.py`` states the protocol), and returns the clamped sums
``s_S``, ``t_S`` shifted by the global row max ``m``, which give ``log s_S`` (the clamped
log-sum-exp is ``m + log s_S``) and ``H~ = log s_S - t_S / s_S``.

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
(one matrix product each; the Triton backend's first-digit pass is its own because the forward runs
without top-k). No ``[N, V]`` buffer on any rank.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Sequence

import torch

from ._common import zero_neg_inf
from ._types import LogitTransform, clamp_p_to_k

HIDDEN_GRADS = ("full", "partial")

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


def comm_device(group, device: torch.device) -> torch.device:
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
    dev = comm_device(group, torch.device("cpu"))
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


def gather_rows(stats: torch.Tensor, group, world: int) -> torch.Tensor:
    """``[c, N]`` per rank -> ``[world, c, N]`` (rank order), on the device of ``stats``."""
    dist = _dist()
    dev = comm_device(group, stats.device)
    mine = stats.to(dev).contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).to(stats.device)


def merge_row_stats(m_r: torch.Tensor, log_s_r: torch.Tensor, d_r: torch.Tensor, here_r: torch.Tensor,
                    ent_r: Optional[torch.Tensor]):
    """``[W, N]`` per-shard statistics -> global ``(m, log_s, z_y - m, entropy | None)``, each ``[N]``.

    ``m_r``/``log_s_r``: each shard's row max and log-sum (``-inf``/0 on a shard of only ``-inf``
    logits); ``d_r = z_y - m_r`` where ``here_r`` (the shard holds the target), else ignored.
    ``m = max_r m_r``, ``log s = log sum_r e^{a_r}`` with ``a_r = (m_r - m) + log s_r``,
    ``z_y - m = d_r + (m_r - m)`` on the target's shard, ``H = sum_r pi_r (H_r - log pi_r)`` with
    ``log pi_r = a_r - log s``. Never ``lse = m + log s`` as one number (see ``RowStats``). A row
    whose logits are all ``-inf`` gets ``m = -inf``, ``log_s = 0``, ``H = 0``; one with a NaN or
    +inf logit on any shard (its ``log_s_r`` is NaN there) gets NaN ``log_s`` and ``H``.
    """
    m = m_r.amax(0)
    m0 = zero_neg_inf(m)
    zero = torch.zeros((), dtype=m_r.dtype, device=m_r.device)
    a_r = (m_r - m0) + log_s_r  # -inf on a shard of only -inf logits
    s = torch.exp(a_r).sum(0)
    # only -inf logits: s = 0 (a NaN s, from a NaN shard, stays: the guards test == 0, not > 0)
    live = s != 0
    log_s = torch.where(live, torch.log(torch.where(live, s, torch.ones_like(s))), zero)
    dy = torch.where(here_r, d_r + (m_r - m0), zero).sum(0)
    ent = None
    if ent_r is not None:
        log_pi = a_r - log_s
        pi = torch.exp(log_pi)
        gone = pi == 0  # a shard of only -inf logits: 0, never 0 * -inf
        term = torch.where(gone, torch.zeros_like(pi), pi * (ent_r - torch.where(gone, torch.zeros_like(log_pi), log_pi)))
        ent = torch.where(live, term.sum(0), torch.zeros_like(m))
    return m, log_s, dy, ent


# ---------------------------------------------------------------------------------------------
# collectives of the autograd Function
# ---------------------------------------------------------------------------------------------


def all_reduce(t: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over ``group`` by ``op`` (``"sum"`` or ``"max"``; a new tensor when the
    collective ran on another device)."""
    dist = _dist()
    dev = comm_device(group, t.device)
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return buf.to(t.device) if buf is not t else t


def other_shard_id(ignore_index: int) -> int:
    """Local target id for a row whose target lies in another shard: negative (so it never names a
    column, padded ones included) and never equal to ``ignore_index``."""
    return -1 if ignore_index != -1 else -2
