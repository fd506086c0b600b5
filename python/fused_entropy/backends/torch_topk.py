"""Exact top-k threshold over a vocabulary split across ranks, for the torch backend.

``radix_topk_stats`` finds the k-th largest logit ``tau`` of every row by a radix select on
order-preserving integer keys of the logits: per digit (11 bits, 10 for the last; ``RADIX_DIGITS``)
every rank counts the digits of its logits that share the prefix chosen so far into a per-row
histogram ``[N, 2^bits]`` int32, the histograms are summed over the ranks and every rank picks the
same bin. The last digit's bins are single floats, so ``tau``, ``#{z > tau}`` and ``#{z == tau}``
are exact and global, the tie weight is ``tie_frac = (k - #{z > tau}) / #{z == tau}`` over the
whole vocabulary, and the clamped sums (shifted by the global row max ``m``)::

    s_S = s_above + sum_{bins above tau} count_b e^{v_b - m} + (k - #{z > tau}) e^{tau - m}
    t_S likewise with (z - m) e^{z - m}

(``s_above``: the logits above the last digit's range, summed in the last pass and summed over the
ranks). The Triton backend's ``linear_topk_select`` (``_launch.linear_topk_select``) follows the same
protocol with its radix kernels.
"""
from __future__ import annotations

import torch

# Radix digits (most significant first) of the order-preserving keys of fp32 / fp64 logits.
RADIX_DIGITS = {32: (11, 11, 10), 64: (11, 11, 11, 11, 10, 10)}

# Shifted logits below this give exp() = 0 in every format; clamping keeps (z - c) * e finite.
_U_MIN = -1e4


def _summed(all_reduce, t: torch.Tensor) -> torch.Tensor:
    r = all_reduce(t)
    return t if r is None else r


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


def radix_topk_stats(blocks, n: int, k: int, shift: torch.Tensor, dtype: torch.dtype, all_reduce):
    """Global clamped-set statistics of every row from this rank's logit blocks.

    ``blocks()``: a fresh iterator of ``(rows slice, z [C, V_r])`` over this rank's shard (one pass
    each). ``shift`` ``[N]``: the global row max (0 on rows whose logits are all ``-inf``), so every
    ``e^{z - shift} <= 1``. ``all_reduce(t)`` sums a tensor over the ranks (in place, or returning
    the sum). Returns ``(tau, tie_frac, s_S, t_S)`` as in the module docstring; identical on every
    rank. Collectives: one all_reduce per digit, plus one of the ``[2, N]`` sums.
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
        hist = _summed(all_reduce, hist).to(torch.int64)
        at_or_above = hist.flip(1).cumsum(1).flip(1)  # sum over bins >= b
        b = (at_or_above >= k_rem[:, None]).sum(1) - 1  # the bin holding the k_rem-th largest key
        n_above = (at_or_above - hist).gather(1, b[:, None]).squeeze(1)
        k_rem -= n_above
        prefix = b - (nbins >> 1) if first else (prefix << d) | b
        if last:
            n_eq = hist.gather(1, b[:, None]).squeeze(1)
            sums = _summed(all_reduce, sums)
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
