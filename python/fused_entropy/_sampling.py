"""Sampling-consistent log-probs: vLLM's top-k / top-p / min-p truncation replayed without ``[N, V]`` logits.

vLLM returns ``processed_logprobs``: log-probs renormalized over the tokens that survive truncation.
A trainer that recomputes log-probs over the full vocabulary carries ``log S`` (S the kept mass) in
every importance ratio (MATH.md section 8). This module replays the truncation row chunk by row chunk
(bounded workspace, never ``[N, V]``) and returns, per token,

    truncated_logprobs = z_y - log sum_{v kept} e^{z_v}       (-inf when y is not kept)
    log_kept_mass      = log sum_{v kept} p_v                 (<= 0)
    truncated_entropy  = -sum_{v kept} q_v log q_v,           q = p restricted to the kept set, renormalized

next to the full-vocabulary log-prob and entropy of the same pass.

The kept set is one threshold per row, ``kept = {v : z_v >= t}``, because each rule keeps a top
segment of the sorted logits (vLLM v1, ``vllm/v1/sample/ops/topk_topp_sampler.py`` and the min-p
logits processor in ``vllm/v1/sample/logits_processor/builtin.py``), applied in vLLM's order:

1. min-p on the full softmax: keep ``p_v >= min_p * p_max``, i.e. ``z_v >= max z + log(min_p)``;
2. top-k: keep every logit ``>= `` the k-th largest (every tie at the boundary is kept, as in vLLM);
3. top-p on what is left: sorted ascending, drop the positions whose inclusive cumulative mass
   (renormalized over the kept set) is ``<= 1 - p``; the largest is always kept. vLLM's sort is
   not stable, so among equal logits its choice is arbitrary; here a group of equal logits is kept
   or dropped as a whole: kept iff the mass strictly above it is ``< p`` (vLLM's rule applied to the
   group's last member in ascending order).

``t`` is then the largest of the three thresholds (``-inf`` where no rule truncates: ``top_k >= V``,
``top_p = 1``, ``min_p = 0``). The top-k threshold comes from ``torch.topk`` of the k largest; the
top-p threshold from a mass-weighted search over the largest kept logits, doubling the candidate
count until their mass reaches ``p`` (exact: no logit below the candidates can be kept once they
hold mass ``p``). With a vocabulary split over ranks every threshold and sum is global (an
``all_reduce`` per sum, an ``all_gather`` of the per-rank candidates), so each rank gets the same
values.

Differentiation treats the kept set as fixed (the thresholds are piecewise constant in z)::

    d truncated_logprob / dz_v = [v = y] - kept_v q_v          (0 when y is not kept)
    d log_kept_mass / dz_v     = kept_v q_v - p_v
    d truncated_entropy / dz_v = -kept_v q_v (log q_v + H_t)

The matrix products run through torch (cuBLAS on CUDA) on either backend; the statistics use the
shifted, split log-sum-exp of ``RowStats`` (MATH.md section 2).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch

from ._common import zero_neg_inf
from ._distributed import all_reduce, gather_rows
from ._types import LogitTransform
from .backends.torch_chunked import (
    U_MIN,
    _chain_transform_,
    _rowdot,
    _softcap_factor,
    _Workspace,
    workspace_bytes,
)

# float blocks of one chunk: logits, probabilities, kept weights, softcap factor; the kept mask is a
# bool block (counted as one more float block, generously)
BLOCKS = 5
# first candidate count of the top-p search; multiplied by 4 while the candidates hold less than p
_TOP_P_FIRST = 64


class SamplingParams(NamedTuple):
    """Per-row truncation parameters, each ``[N]`` or None (rule off): ``top_k`` int64, ``top_p`` and
    ``min_p`` fp64."""

    top_k: Optional[torch.Tensor]
    top_p: Optional[torch.Tensor]
    min_p: Optional[torch.Tensor]

    def rows(self, sl: slice) -> "SamplingParams":
        return SamplingParams(*(None if t is None else t[sl] for t in self))


def _per_row(name: str, value, shape, device, integer: bool) -> torch.Tensor:
    """``value`` (a Python number or a tensor broadcastable to ``shape``) as a flat ``[N]`` tensor."""
    n = math.prod(shape)
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or (integer and (value.is_floating_point() or value.is_complex())) \
                or (not integer and not value.is_floating_point()):
            want = "an integer" if integer else "a floating-point"
            raise TypeError(f"{name} must be a Python {'int' if integer else 'float'} or {want} tensor, "
                            f"got a {value.dtype} tensor")
        if value.device != device and value.dim() > 0:
            raise ValueError(f"{name} must be on the targets' device {device}, got {value.device}")
        try:
            flat = torch.broadcast_to(value, tuple(shape))
        except RuntimeError:
            raise ValueError(f"{name} must be a scalar or broadcastable to targets.shape={tuple(shape)}, "
                             f"got shape {tuple(value.shape)}") from None
        return flat.reshape(n).to(device=device, dtype=torch.int64 if integer else torch.float64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be {'an int' if integer else 'a float'} or a tensor, got {value!r}")
    return torch.full((n,), int(value) if integer else float(value), device=device,
                      dtype=torch.int64 if integer else torch.float64)


def resolve(top_k, top_p, min_p, shape, device) -> Optional[SamplingParams]:
    """Check the ``sampling_*`` arguments and flatten them to ``[N]`` rows; None when all are None.

    Raises TypeError for a wrong type (bool, str, a float ``top_k``, a tensor of the wrong dtype) and
    ValueError for a value out of range (``top_k < 1``, ``top_p`` outside ``(0, 1]``, ``min_p``
    outside ``[0, 1]``, NaN) or a tensor that does not broadcast to ``targets.shape``; every message
    names the argument.
    """
    if top_k is None and top_p is None and min_p is None:
        return None
    if torch.device(device).type == "meta":
        raise ValueError("sampling_top_k/sampling_top_p/sampling_min_p need tensors with data: the replay's "
                         "threshold search reads the logits (meta tensors carry none)")
    k = p = mp = None
    if top_k is not None:
        k = _per_row("sampling_top_k", top_k, shape, device, integer=True)
        if k.numel() and bool((k < 1).any()):
            raise ValueError(f"sampling_top_k must be >= 1 (a value >= V keeps every token), got min {int(k.min())}")
    if top_p is not None:
        p = _per_row("sampling_top_p", top_p, shape, device, integer=False)
        if p.numel() and not bool(((p > 0) & (p <= 1)).all()):
            bad = p[~((p > 0) & (p <= 1))][0].item()
            raise ValueError(f"sampling_top_p must be in (0, 1] (1 keeps every token), got {bad}")
    if min_p is not None:
        mp = _per_row("sampling_min_p", min_p, shape, device, integer=False)
        if mp.numel() and not bool(((mp >= 0) & (mp <= 1)).all()):
            bad = mp[~((mp >= 0) & (mp <= 1))][0].item()
            raise ValueError(f"sampling_min_p must be in [0, 1] (0 keeps every token), got {bad}")
    return SamplingParams(k, p, mp)


# ---------------------------------------------------------------------------------------------
# collectives over a vocabulary split (identity without one)
# ---------------------------------------------------------------------------------------------


class Local:
    """Reductions over the vocabulary when this process holds all of it."""

    def max(self, t):
        return t

    def sum(self, t):
        return t

    def cat(self, t):
        return t


class Group(Local):
    """The same reductions over the shards of ``group`` (every rank calls them in the same order)."""

    def __init__(self, group):
        import torch.distributed as dist

        self.group, self.world = group, dist.get_world_size(group)

    def max(self, t):
        return all_reduce(t.contiguous(), self.group, "max")

    def sum(self, t):
        return all_reduce(t.contiguous(), self.group)

    def cat(self, t):
        """``[c, k]`` per rank -> ``[c, world * k]`` (rank order along the columns)."""
        return torch.cat(list(gather_rows(t, self.group, self.world)), dim=1)


# ---------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------


def _largest(z: torch.Tensor, k: int, red: Local) -> torch.Tensor:
    """The ``k`` largest logits of each row over the whole (possibly split) vocabulary, descending,
    padded with -inf where a row has fewer."""
    kl = min(k, z.shape[1])
    vals = torch.topk(z, kl, dim=1, sorted=True).values if kl > 0 else z.new_empty(z.shape[0], 0)
    if kl < k:
        vals = torch.cat([vals, vals.new_full((z.shape[0], k - kl), -torch.inf)], dim=1)
    if type(red) is Local:
        return vals
    return torch.topk(red.cat(vals), k, dim=1, sorted=True).values


def _top_p_threshold(z, t, shift, top_p, vocab: int, red: Local) -> torch.Tensor:
    """Smallest kept logit of the top-p rule over ``{z >= t}`` (see the module docstring), rows ``[c]``.

    Candidates: the ``c`` largest logits, those below ``t`` dropped. Their mass decides every row
    whose candidates hold at least ``p`` of the kept mass or the whole kept set; the others search
    again with more candidates (at least 4x, and as many as the mass seen so far says are needed, so
    a flat row goes to the whole vocabulary at the second step, not through every doubling)."""
    c = z.shape[0]
    out = t.clone()
    rows = torch.arange(c, device=z.device)
    k = min(_TOP_P_FIRST, vocab)
    goal = None  # keep a group iff the mass strictly above it is < goal = p * (mass of {z >= t})
    while rows.numel():
        # rows per step so the candidates' temporaries (~48 bytes each) stay within the workspace bound
        step = max(1, workspace_bytes() // (48 * k))
        undone, need = [], 0.0
        for r0 in range(0, rows.numel(), step):
            sub = rows[r0:r0 + step]
            vals = _largest(z if sub.numel() == c else z[sub], k, red)
            vals = torch.where(vals >= t[sub, None], vals, torch.full_like(vals, -torch.inf))
            e = torch.exp(vals.double() - shift[sub].double()[:, None])
            incl = torch.cumsum(e, dim=1)
            del e
            whole = (vals[:, -1] == -torch.inf) | (k >= vocab)  # every kept logit is a candidate
            if goal is None:
                if bool(whole.all()) and sub.numel() == c:
                    mass = incl[:, -1]
                else:  # one pass over the block for the kept mass (identical on every rank)
                    kept = torch.where(z >= t[:, None], torch.exp(z - shift[:, None]), torch.zeros_like(z))
                    mass = red.sum(kept.sum(-1, dtype=torch.float64))
                    del kept
                goal = top_p * mass
            g = goal[sub]
            excl = torch.cat([incl.new_zeros(incl.shape[0], 1), incl[:, :-1]], dim=1)
            start = torch.ones_like(vals, dtype=torch.bool)
            start[:, 1:] = vals[:, 1:] != vals[:, :-1]
            above = torch.cummax(torch.where(start, excl, torch.full_like(excl, -torch.inf)), dim=1).values
            del excl, start
            keep = (above < g[:, None]) & (vals > -torch.inf)
            last = (keep.sum(-1) - 1).clamp(min=0)
            done = (incl[:, -1] >= g) | whole
            out[sub[done]] = vals[done].gather(1, last[done, None]).squeeze(1)
            if not bool(done.all()):
                need = max(need, float((g[~done] / incl[~done, -1]).max()))
                undone.append(sub[~done])
        rows = torch.cat(undone) if undone else rows[:0]
        if rows.numel():
            k = min(vocab, max(4 * k, int(1.25 * k * need) + 1))
    return out


def _threshold(z, m, shift, live, prm: SamplingParams, vocab: int, red: Local) -> torch.Tensor:
    """``t [c]``: kept = ``z >= t``; -inf where nothing is truncated (and on rows of only -inf)."""
    t = torch.full_like(m, -torch.inf)
    if prm.min_p is not None:
        t_min = (shift.double() + torch.log(prm.min_p)).to(z.dtype)
        t = torch.where(live, torch.maximum(t, t_min), t)
    if prm.top_k is not None:
        cut = (prm.top_k < vocab) & live
        if bool(cut.any()):
            k = prm.top_k.clamp(max=vocab)
            kmax = int(k[cut].max())
            tau = _largest(z, kmax, red).gather(1, (k.clamp(max=kmax) - 1)[:, None]).squeeze(1)
            t = torch.where(cut, torch.maximum(t, tau), t)
    if prm.top_p is not None:
        cut = (prm.top_p < 1) & live
        if bool(cut.any()):
            idx = cut.nonzero().squeeze(1)
            t_p = _top_p_threshold(z[idx], t[idx], shift[idx], prm.top_p[idx], vocab, red)
            t = t.index_put((idx,), torch.maximum(t[idx], t_p))
    return t


# ---------------------------------------------------------------------------------------------
# one chunk of rows
# ---------------------------------------------------------------------------------------------


class ChunkStats(NamedTuple):
    """Per-row results of a chunk (and what backward needs): global values on every rank."""

    shift: torch.Tensor  # row max, 0 on a row of only -inf logits (and on a -inf + NaN row, NaN anyway)
    live: torch.Tensor  # False: every logit of the row is -inf
    t: torch.Tensor  # kept = z >= t
    log_s: torch.Tensor  # log sum_v e^(z_v - shift)
    log_s_kept: torch.Tensor  # log sum_{v kept} e^(z_v - shift)
    in_kept: torch.Tensor  # the target is kept
    logprobs: torch.Tensor
    entropy: torch.Tensor
    truncated_logprobs: torch.Tensor
    log_kept_mass: torch.Tensor
    truncated_entropy: torch.Tensor


def chunk_forward(z, ws, y_local, here, valid, prm: SamplingParams, vocab: int, red: Local) -> ChunkStats:
    """Statistics of a chunk ``z [c, V_r]`` (transformed logits, overwritten)."""
    c = z.shape[0]
    m = red.max(z.amax(-1))
    shift = zero_neg_inf(m)
    # no threshold search on a row of only -inf, or over a NaN or +inf max (its threshold stays -inf)
    t = _threshold(z, m, shift, torch.isfinite(m), prm, vocab, red)
    z_y = z.gather(1, torch.where(here, y_local, torch.zeros_like(y_local))[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    z_y = red.sum(torch.where(here, z_y, zero))
    kept = torch.ge(z, t[:, None], out=ws.get_bool("kept", c))
    u = z.sub_(shift[:, None]).clamp_(min=U_MIN)
    e = torch.exp(u, out=ws.get("p", c))
    ek = torch.mul(e, kept, out=ws.get("w", c))
    sums = red.sum(torch.stack([e.sum(-1), _rowdot(e, u), ek.sum(-1), _rowdot(ek, u)]))
    # Only -inf logits: every e is e^U_MIN = 0, so s = 0. A NaN or +inf logit makes s NaN, and the
    # row live (NaN throughout); its m alone cannot tell, as a MAX all-reduce may drop a NaN (gloo
    # keeps or drops it by operand order) while the SUM always carries it.
    live = sums[0] != 0
    one = torch.ones_like(m)
    s, s_k = torch.where(live, sums[0], one), torch.where(live, sums[2], one)
    log_s, log_s_k = torch.log(s), torch.log(s_k)
    ok = valid & live
    in_kept = z_y >= t
    inf = torch.full_like(m, -torch.inf)
    lp = torch.where(valid, torch.where(live, (z_y - shift) - log_s, inf), zero)
    # a NaN target logit is not ">= t": NaN there too rather than "dropped" (-inf)
    tlp = torch.where(valid, torch.where(live & (in_kept | torch.isnan(log_s)), (z_y - shift) - log_s_k, inf), zero)
    return ChunkStats(
        shift, live, t, log_s, log_s_k, in_kept & ok, lp,
        torch.where(ok, log_s - sums[1] / s, zero),
        tlp,
        torch.where(ok, log_s_k - log_s, zero),
        torch.where(ok, log_s_k - sums[3] / s_k, zero),
    )


def chunk_grad(z, ws, y_local, here, valid, st, g, tf: LogitTransform):
    """dL/d(h.W + b) of a chunk (a view of ``z``'s buffer) from the upstream gradients ``g`` (five ``[c]``
    tensors or None, zero on ignored rows): logprobs, entropy, truncated logprobs, log kept mass,
    truncated entropy."""
    c = z.shape[0]
    g_lp, g_ent, g_tlp, g_lkm, g_tent = g
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    live = st.live
    g_lp, g_ent, g_tlp, g_lkm, g_tent = (None if x is None else torch.where(live, x.to(z.dtype), zero)
                                         for x in (g_lp, g_ent, g_tlp, g_lkm, g_tent))
    if g_tlp is not None:
        g_tlp = torch.where(st.in_kept, g_tlp, zero)
    factor = _softcap_factor(z, tf, ws.get("f", c)) if tf.softcap is not None else None
    d_kept = None
    if g_tlp is not None or g_lkm is not None or g_tent is not None:
        kept = torch.ge(z, st.t[:, None], out=ws.get_bool("kept", c))
    u = z.sub_(st.shift[:, None]).clamp_(min=U_MIN)
    zeros = torch.zeros_like(st.shift)
    if g_tlp is not None or g_lkm is not None or g_tent is not None:
        # q (log q + H_t) terms: d = q * (-g_tent (log q + H_t) + g_lkm - g_tlp), log q = u - log s_kept
        q = torch.sub(u, st.log_s_kept[:, None], out=ws.get("w", c))
        tmp = torch.exp(q, out=ws.get("p", c)).mul_(kept)
        gt = zeros if g_tent is None else g_tent
        const = (zeros if g_lkm is None else g_lkm) - (zeros if g_tlp is None else g_tlp) \
            - gt * st.truncated_entropy
        q.mul_(-gt[:, None]).add_(const[:, None]).mul_(tmp)
        d_kept = q
    # p terms: d = p * (-g_ent (log p + H) - g_lp - g_lkm), log p = u - log s
    p = torch.sub(u, st.log_s[:, None], out=u)
    e = torch.exp(p, out=ws.get("p", c))
    ge = zeros if g_ent is None else g_ent
    const = -((zeros if g_lp is None else g_lp) + (zeros if g_lkm is None else g_lkm) + ge * st.entropy)
    p.mul_(-ge[:, None]).add_(const[:, None]).mul_(e)
    if d_kept is not None:
        p.add_(d_kept)
    onehot = (zeros if g_lp is None else g_lp) + (zeros if g_tlp is None else g_tlp)
    p.scatter_add_(1, torch.where(here, y_local, torch.zeros_like(y_local))[:, None],
                   torch.where(here, onehot, zero)[:, None])
    return _chain_transform_(p, factor, tf, valid)


class SamplingWorkspace(_Workspace):
    def get_bool(self, name: str, rows: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = torch.empty(self.shape, dtype=torch.bool, device=self.device)
        return buf[:rows]


def stack_rows(parts, n, device, dtype) -> ChunkStats:
    if not parts:
        z = torch.zeros(n, device=device, dtype=dtype)
        b = torch.zeros(n, device=device, dtype=torch.bool)
        return ChunkStats(z, b, z, z, z, b, z, z, z, z, z)
    return ChunkStats(*(torch.cat(col) for col in zip(*parts)))


def local_targets(targets, ignore_index: int, offset: int, vocab_local: int):
    valid = targets != ignore_index
    here = valid & (targets >= offset) & (targets < offset + vocab_local)
    return valid, here, torch.where(here, targets - offset, torch.zeros_like(targets))


_SAVED = ("shift", "live", "t", "log_s", "log_s_kept", "in_kept", "entropy", "truncated_entropy")


def saved_rows(st: ChunkStats):
    return [getattr(st, f) for f in _SAVED]


def restore_rows(saved) -> ChunkStats:
    d = dict(zip(_SAVED, saved))
    return ChunkStats(d["shift"], d["live"], d["t"], d["log_s"], d["log_s_kept"], d["in_kept"], None, d["entropy"],
                     None, None, d["truncated_entropy"])


def outputs(st: ChunkStats):
    return st.logprobs, st.entropy, st.truncated_logprobs, st.log_kept_mass, st.truncated_entropy


def masked_grads(grads, valid):
    zero = torch.zeros((), dtype=torch.float64, device=valid.device)
    return tuple(None if g is None else torch.where(valid, g, zero.to(g.dtype)) for g in grads)
