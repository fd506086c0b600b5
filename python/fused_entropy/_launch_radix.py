"""The radix select of the top-k threshold (``kernels/topk.py``): per digit, one counting pass over
the logit tiles (the caller's ``radix_pass``, launched by ``_launch``) and one
``radix_select_kernel`` launch that narrows every row's prefix; with a vocabulary split, the
histograms and the last pass's sums are summed over the ranks in between.
"""
from __future__ import annotations

import torch
import triton

from ._common import nan_clamped
from .kernels import configs
from .kernels.topk import radix_select_kernel


def _clamped(radix_pass, hist, m, k: int, split: int, n_pad: int, targets=None, ignore_index: int = 0,
             all_reduce=None, log_s=None):
    """Top-k threshold by radix select (kernels/topk.py); ``m`` [N] shifts the sums.

    ``radix_pass(prefix, above, shift, bits)`` launches one counting pass over the logit tiles
    (``prefix`` None: the first digit). One process (``all_reduce`` None): the first digit was
    counted by the forward; returns (tau, tie_frac, log_s_clamped, clamped_entropy), each [N], with
    ``m`` the row max (``log_s_clamped`` relative to it). Vocabulary parallel: ``all_reduce(t)`` sums
    a tensor over the ranks (in place, or returning the sum); the first digit gets a pass of its own,
    every histogram is summed before its select, and the last pass's sums too; ``m`` is the shift
    the caller chose (the global row max, 0 on rows of only -inf) and the result is
    (tau, tie_frac, s_S, t_S), the same on every rank.

    ``log_s`` [N] (one process): the rows' full log s; where it is NaN the clamped log s and
    entropy are NaN too (``_common.nan_clamped``).
    """
    n = m.shape[0]
    key_bits = 64 if m.dtype == torch.float64 else 32
    digits = configs.RADIX_DIGITS[key_bits]
    prefix = torch.zeros(n, device=m.device, dtype=torch.int64 if key_bits == 64 else torch.int32)
    k_rem = torch.empty(n, device=m.device, dtype=torch.int32)
    tau, frac, out_a, out_b = (torch.empty_like(m) for _ in range(4))
    sums = all_reduce is not None
    cfg = configs.get("radix_select", "fp64" if key_bits == 64 else "fp32")
    # bin of the first digit where the padded columns' -inf keys were counted
    neg_inf_key = (0x000FFFFFFFFFFFFF if key_bits == 64 else 0x007FFFFF)
    pad_digit = neg_inf_key >> (key_bits - digits[0])
    grid = (triton.cdiv(n, cfg.block_n),)

    def reduce(t):
        r = all_reduce(t)
        if r is not None and r is not t:
            t.copy_(r)
        return t

    def select(first, above, bits):
        last = above is not None
        fin = last and not sums
        radix_select_kernel[grid](
            hist, prefix, k_rem, m, above, targets if fin else None,
            tau if last else None, frac if last else None, out_a if fin else None, out_b if fin else None,
            out_a if last and sums else None, out_b if last and sums else None,
            n, k, ignore_index, above.shape[1] if last else 1, pad_digit, n_pad,
            FIRST=first, BITS=bits, NBINS=configs.RADIX_NBINS, BLOCK_R=cfg.block_n, num_warps=cfg.num_warps,
        )

    shift = key_bits - digits[0]
    if sums:
        radix_pass(None, None, shift, digits[0])
        # this rank's padded columns leave the -inf bin before the ranks' counts are added up
        hist[:n, pad_digit] -= n_pad
        n_pad = 0
        reduce(hist[:n])
    select(True, None, digits[0])
    for i, bits in enumerate(digits[1:], start=1):
        shift -= bits
        last = i == len(digits) - 1
        above = torch.empty(2, split, n, device=m.device, dtype=m.dtype) if last else None
        radix_pass(prefix, above, shift, bits)
        if sums:
            reduce(hist[:n])
            if last:
                # the ranks split the vocabulary differently: add this rank's splits, then the ranks
                above = reduce(above.sum(1, keepdim=True))
        select(False, above, bits)
    if log_s is not None:
        out_a, out_b = nan_clamped(log_s, out_a, out_b, targets != ignore_index)
    return tau, frac, out_a, out_b
