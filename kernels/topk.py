"""Exact top-k threshold and clamped entropy (MATH.md section 3) by radix select over logit tiles.

For each row, ``tau`` is the k-th largest transformed logit, found digit by digit (most significant
first) on order-preserving integer keys (``_radix.py``); digits for fp32 keys are 11 + 11 + 10 bits
(fp64: 11 x 4 + 10 x 2). Pass 1 is fused into the forward stats kernel (``linear_stats.py`` /
``logits_stats.py`` with ``hist_ptr``): it counts the first digit of every logit into a per-row
``[N, 2048]`` int32 histogram. After each pass ``radix_select_kernel`` picks, per row, the digit
bin that holds the k-th largest key and narrows the prefix; the next pass counts the next digit of
the logits that share the prefix, reading them from memory (``logits_radix_kernel``: the logits
entry point, and the fused head's row-chunk logits buffer) or recomputing their GEMM tiles
(``linear_radix_kernel``: the vocabulary-parallel head). The last pass also sums, relative to the row max m,

    s_above = sum_{z above the final bin range} e^(z - m),  t_above = sum (z - m) e^(z - m)

and the last select resolves every bin of the final digit to one exact float, so

    tau          = the k-th largest z                  (exact; -0.0 and +0.0 are one value)
    tie_frac     = (k - #{z > tau}) / #{z == tau}
    s_S          = s_above + sum_{bins above tau} count e^(v - m) + (k - #{z > tau}) e^(tau - m)
    log_s_clamped = log s_S,   H~ = log s_S - t_S / s_S     (t_S likewise, shifted by m)

exactly as the torch backend defines them, for every k in [1, V], any ties, and -inf logits. The
clamped log-sum-exp stays split as (m, log s_S) like the full one (``_online.py``).

Cost (linear head, ``_launch.linear_stats``): one GEMM pass, as for plain entropy. Per chunk of
rows the forward kernel also stores the chunk's logits z in the row-chunk logits buffer
(``[Nc, V]`` fp32, bounded by ``configs.logits_buffer_bytes()``, 1 GiB) and counts their first
digit; the further digits are counted by ``logits_radix_kernel`` reading that buffer with the
identity transform (2 reads of every logit; 5 for fp64). The backward is unchanged (4 GEMM passes
in all with its recompute); the tie weights come from (tau, tie_frac), and the stored z are the
forward's own tiles, so the recompute meets tau exactly. Memory: the buffer, the histogram (8 KiB
per row of a chunk), O(N) row state. The logits entry point reads the logits 3 times instead of
once. ``linear_radix_kernel`` (a GEMM recompute per digit) remains for the vocabulary-parallel select
only.

Vocabulary parallelism (``_distributed.py``, ``_launch.linear_topk_select``): the same kernels on
each rank's shard, with the first digit counted by ``linear_radix_kernel`` itself (``FIRST``: the
forward there runs without top-k), each histogram summed over the ranks before every select, the
sums shifted by the global row max instead of the local one (``m``), and the last select writing the
sums s_S, t_S (``SUMS``) for the caller to finish once they are summed over the ranks too.
"""
import triton
import triton.language as tl

from ._grid import grouped_program
from ._online import div_rn, scalar_arg
from ._radix import key_to_float, radix_count
from .linear_stats import linear_logit_tile
from .logits_stats import logits_tile


@triton.jit
def radix_tile(z, mask, hist_block, prefix, m0, s_a, t_a,
               SHIFT: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr, FIRST: tl.constexpr,
               LAST: tl.constexpr):
    """One tile of a radix pass (FIRST: the first digit of every logit, padded columns included,
    as ``radix_count`` counts it); on the last pass also the sums over logits whose key is above
    the prefix range (they are in S for sure), shifted by ``m0``."""
    key = radix_count(z, mask, hist_block, prefix, SHIFT, BITS, NBINS, FIRST)
    if LAST:
        above = mask & ((key >> BITS) > prefix[:, None])
        d = z - m0[:, None]
        e = tl.where(above, tl.exp(d), 0.0)
        s_a += tl.sum(e, axis=1)
        t_a += tl.sum(tl.where(e > 0.0, d * e, 0.0), axis=1)
    return s_a, t_a


@triton.jit
def _load_prefix(prefix_ptr, offs_n, mask_n):
    p = tl.load(prefix_ptr + offs_n, mask=mask_n, other=0)
    if prefix_ptr.dtype.element_ty == tl.int64:
        p = p.to(tl.uint64, bitcast=True)
    else:
        p = p.to(tl.uint32, bitcast=True)
    return p


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
        "FIRST": lambda a: a["prefix_ptr"] is None,
        "LAST": lambda a: a["above_ptr"] is not None,
    }
)
# one build whatever the first row block and the tiles per split (1 or a multiple of 16 would specialize)
@triton.jit(do_not_specialize=["tiles_per_split", "block0"])
def linear_radix_kernel(
    x_ptr, w_ptr, b_ptr, prefix_ptr, m_ptr, hist_ptr, above_ptr,
    N, V, H, stride_x, stride_w, logit_scale, softcap, inv_temperature, scal_ptr, tiles_per_split, block0,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    SHIFT: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One radix pass over recomputed GEMM tiles: grid (group_rows, SPLIT, groups) from row block
    ``block0``, the forward's grouped order (``_grid.py``).

    prefix [N] (int32/int64 holding the key bits chosen so far; None: the first digit, for a
    forward that ran without top-k, i.e. the vocabulary-parallel one), m [N] the shift of the sums
    (the row max in one process, the global row max across a vocabulary split), hist [*, NBINS] int32
    (zeroed), above [2, SPLIT, N] (s_above, t_above) on the last pass.
    """
    logit_scale = scalar_arg(scal_ptr, 0, logit_scale)
    softcap = scalar_arg(scal_ptr, 1, softcap)
    inv_temperature = scalar_arg(scal_ptr, 3, inv_temperature)
    pid_n, pid_s = grouped_program(block0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if FIRST:
        prefix = 0
    else:
        prefix = _load_prefix(prefix_ptr, offs_n, mask_n)
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    s_a = tl.zeros_like(m0)
    t_a = tl.zeros_like(m0)
    hist_block = hist_ptr + pid_n.to(tl.int64) * BLOCK_N * NBINS
    v_start = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
    v_stop = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = linear_logit_tile(
            x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_x, stride_w,
            logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP,
            BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION,
        )
        s_a, t_a = radix_tile(z, mask_n[:, None] & mask_v[None, :], hist_block, prefix, m0, s_a, t_a,
                              SHIFT, BITS, NBINS, FIRST, LAST)
    if LAST:
        out = above_ptr + pid_s.to(tl.int64) * N + offs_n
        tl.store(out, s_a, mask=mask_n)
        tl.store(out + tl.num_programs(1).to(tl.int64) * N, t_a, mask=mask_n)


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
        "LAST": lambda a: a["above_ptr"] is not None,
    }
)
@triton.jit
def logits_radix_kernel(
    l_ptr, prefix_ptr, m_ptr, hist_ptr, above_ptr,
    N, V, stride_l, logit_scale, softcap, inv_temperature, scal_ptr, tiles_per_split,
    HAS_SOFTCAP: tl.constexpr, LAST: tl.constexpr,
    SHIFT: tl.constexpr, BITS: tl.constexpr, NBINS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``linear_radix_kernel`` for logits in memory."""
    logit_scale = scalar_arg(scal_ptr, 0, logit_scale)
    softcap = scalar_arg(scal_ptr, 1, softcap)
    inv_temperature = scalar_arg(scal_ptr, 3, inv_temperature)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    prefix = _load_prefix(prefix_ptr, offs_n, mask_n)
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    s_a = tl.zeros_like(m0)
    t_a = tl.zeros_like(m0)
    hist_block = hist_ptr + pid_n.to(tl.int64) * BLOCK_N * NBINS
    v_start = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
    v_stop = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logits_tile(l_ptr, offs_n, offs_v, mask_n, mask_v, stride_l, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        s_a, t_a = radix_tile(z, mask_n[:, None] & mask_v[None, :], hist_block, prefix, m0, s_a, t_a,
                              SHIFT, BITS, NBINS, False, LAST)
    if LAST:
        out = above_ptr + pid_s.to(tl.int64) * N + offs_n
        tl.store(out, s_a, mask=mask_n)
        tl.store(out + tl.num_programs(1).to(tl.int64) * N, t_a, mask=mask_n)


@triton.heuristics({"LAST": lambda a: a["above_ptr"] is not None, "SUMS": lambda a: a["s_ptr"] is not None})
@triton.jit
def radix_select_kernel(
    hist_ptr, prefix_ptr, krem_ptr, m_ptr, above_ptr, y_ptr,
    tau_ptr, frac_ptr, log_s_c_ptr, ent_c_ptr, s_ptr, t_ptr,
    N, k, ignore_index, n_split, pad_digit, n_pad,
    FIRST: tl.constexpr, LAST: tl.constexpr, SUMS: tl.constexpr,
    BITS: tl.constexpr, NBINS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """After a radix pass: per row, the bin of the k-th largest key among those sharing the prefix.

    With c_j the count of bin j and k' the rank still to find (k on the first pass), the chosen
    bin d satisfies sum_{j>d} c_j < k' <= sum_{j>=d} c_j; then prefix <- prefix * 2^BITS + d and
    k' <- k' - sum_{j>d} c_j. The histogram rows are zeroed for the next pass. On the first pass
    the ``n_pad`` padded columns counted in bin ``pad_digit`` (their key is -inf's) are removed.
    The last pass writes tau, tie_frac and either log s_S and the clamped entropy (0 on
    ignored rows) or, with ``SUMS`` (the vocabulary-parallel select, whose caller finishes the
    rows), the shifted sums s_S, t_S. Sums and results are relative to ``m`` (see the kernels above).
    """
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    bins = tl.arange(0, NBINS)
    used = bins < (1 << BITS)
    h_ptrs = hist_ptr + offs_r[:, None] * NBINS + bins[None, :]
    h_mask = mask_r[:, None] & used[None, :]
    hist = tl.load(h_ptrs, mask=h_mask, other=0)
    tl.store(h_ptrs, tl.zeros_like(hist), mask=h_mask)
    if FIRST:
        hist -= tl.where(bins[None, :] == pad_digit, n_pad, 0)
        k_rem = tl.zeros([BLOCK_R], dtype=tl.int32) + k
        if m_ptr.dtype.element_ty == tl.float64:
            prefix = tl.zeros([BLOCK_R], dtype=tl.uint64)
        else:
            prefix = tl.zeros([BLOCK_R], dtype=tl.uint32)
    else:
        k_rem = tl.load(krem_ptr + offs_r, mask=mask_r, other=1)
        prefix = _load_prefix(prefix_ptr, offs_r, mask_r)
    incl = tl.cumsum(hist, axis=1, reverse=True)  # count of keys in bins >= j
    d = tl.sum((incl >= k_rem[:, None]).to(tl.int32), axis=1) - 1
    at_d = bins[None, :] == d[:, None]
    above_d = tl.sum(tl.where(at_d, incl - hist, 0), axis=1)
    n_eq_d = tl.sum(tl.where(at_d, hist, 0), axis=1)
    old_prefix = prefix
    prefix = (prefix << BITS) | d.to(prefix.dtype)
    k_rem = k_rem - above_d
    if not LAST:
        tl.store(krem_ptr + offs_r, k_rem, mask=mask_r)
        tl.store(prefix_ptr + offs_r, prefix.to(prefix_ptr.dtype.element_ty, bitcast=True), mask=mask_r)
    else:
        tau = key_to_float(prefix)
        m = tl.load(m_ptr + offs_r, mask=mask_r, other=0.0)
        m0 = tl.where(m == float("-inf"), 0.0, m)
        s_c = tl.zeros_like(m0)
        t_c = tl.zeros_like(m0)
        p = above_ptr + offs_r
        # tl.cast, not .to: the JIT passes n_split = 1 (one split, or the ranks' summed sums) as a Python int
        plane = tl.cast(n_split, tl.int64) * N
        for _ in range(0, n_split):
            s_c += tl.load(p, mask=mask_r, other=0.0)
            t_c += tl.load(p + plane, mask=mask_r, other=0.0)
            p += N
        # bins of the final digit above d: each is one exact value v
        vals = key_to_float((old_prefix[:, None] << BITS) | bins[None, :].to(prefix.dtype))
        take = (bins[None, :] > d[:, None]) & (hist > 0)  # empty bins may decode to NaN patterns
        dv = tl.where(take, vals - m0[:, None], 0.0)
        e = tl.where(take, tl.exp(dv), 0.0)
        cnt = hist.to(m0.dtype)
        s_c += tl.sum(cnt * e, axis=1)
        t_c += tl.sum(tl.where(e > 0.0, cnt * dv * e, 0.0), axis=1)
        # the k - #{z > tau} members of S that equal tau
        n_tie = k_rem.to(m0.dtype)
        dt = tau - m0
        e_t = tl.exp(dt)
        s_c += n_tie * e_t
        t_c += tl.where(e_t > 0.0, n_tie * dt * e_t, 0.0)
        tl.store(tau_ptr + offs_r, tau, mask=mask_r)
        # correctly rounded: tie_frac equals the torch backend's bit for bit (a plain fp32 / is
        # approximate on NVIDIA GPUs)
        tl.store(frac_ptr + offs_r, div_rn(n_tie, n_eq_d.to(m0.dtype)), mask=mask_r)
        if SUMS:
            tl.store(s_ptr + offs_r, s_c, mask=mask_r)
            tl.store(t_ptr + offs_r, t_c, mask=mask_r)
        else:
            # log s_S, relative to the row max m like log s (never m + log s_S: see _online.py)
            log_s = tl.where(s_c == 0.0, 0.0, tl.log(s_c))  # NaN stays NaN (finish_state)
            ent_c = tl.where(s_c == 0.0, 0.0, log_s - t_c / s_c)
            y = tl.load(y_ptr + offs_r, mask=mask_r, other=ignore_index)
            tl.store(log_s_c_ptr + offs_r, log_s, mask=mask_r)
            tl.store(ent_c_ptr + offs_r, tl.where(y != ignore_index, ent_c, 0.0), mask=mask_r)

