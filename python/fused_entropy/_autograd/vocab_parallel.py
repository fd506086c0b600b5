"""The vocabulary-parallel autograd Function (``linear_logprobs(process_group=...)``).

Each rank runs its backend on its vocabulary shard; the row statistics are merged over the group
(``_distributed``: the math, the agreement step and the collectives), the clamped set comes from the
backend's ``linear_topk_select``. Backward: the backends' gradient formulas only need the row's
global statistics (``m``, ``log s``, ``H``, ``tau``, ``tie_frac``, ``log s_S``, ``H~``), so each rank
calls its backend's backward on its shard with the global statistics substituted: that gives the
exact gradient of its weight (and bias) shard and its share of the hidden gradient, which is
all-reduced into the full one in the compute dtype.
"""
from __future__ import annotations

import torch

from .. import _distributed as D
from .._common import nan_clamped, zero_neg_inf
from .._distributed import ShardLayout
from .._types import LogitTransform, RowStats
from .common import once_differentiable, stats_tensors

__all__ = ["VocabParallelLinearLogprobsFunction"]


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
        local = torch.where(here, targets - layout.offset, torch.full_like(targets, D.other_shard_id(ignore_index)))
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
            g = D.gather_rows(torch.stack(rows), group, layout.world)
            m, log_s, dy, ent = D.merge_row_stats(g[:, 0], g[:, 1], g[:, 2], g[:, 3] > 0, g[:, 4] if need_ent else None)
            live = m != -torch.inf  # NaN and +inf rows stay live: their statistics are NaN
            logp = torch.where(valid, dy - log_s, zero)
            if ent is not None:
                ent = torch.where(valid, ent, zero)
            stats = RowStats(m, log_s, logp, ent)
            if k is not None:
                shift = zero_neg_inf(m)  # the global row max, 0 on rows of only -inf
                tau, frac, s_s, t_s = backend.linear_topk_select(x, weight, bias, tf, k, shift,
                                                                 lambda t: D.all_reduce(t, group))
                s_safe = torch.where(live, s_s, torch.ones_like(s_s))
                log_s_c = torch.log(s_safe)  # relative to m, like log_s; 0 on rows of only -inf
                ent_c = torch.where(valid & live, log_s_c - t_s / s_safe, zero)
                log_s_c, ent_c = nan_clamped(log_s, log_s_c, ent_c, valid)
                stats = RowStats(m, log_s, logp, ent, tau, frac, log_s_c, ent_c)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, local, *stats_tensors(stats))
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
            gx = D.all_reduce(part, group).to(x.dtype)
        return (
            gx if need_x else None,
            gw if ctx.needs_input_grad[1] else None,
            gb if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None, None,
        )
