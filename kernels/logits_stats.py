"""Logits already in memory: row statistics (forward) and dL/dlogits (backward), streamed over V.

Forward grid ``(cdiv(N, BLOCK_N), SPLIT)``, the same partial-state layout as ``linear_stats.py``
(part [4, SPLIT, N], merged by ``_online.finish_stats_kernel``): a split grid keeps a GPU busy
when there are few rows (N = 1 at V = 256k is one row block). Backward grid
``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))`` writes ``grad_logits`` directly, tile by tile; nothing
else of size [N, V] is allocated. ``z = transform(logits)`` is recomputed in fp32 (fp64 for fp64).
"""
import triton
import triton.language as tl

from ._online import GRAD_HEURISTICS, merge_state, scalar_arg, tile_grad, tile_state, transform
from ._radix import radix_count


@triton.jit
def logits_tile(
    l_ptr, offs_n, offs_v, mask_n, mask_v, stride_l, logit_scale, softcap, inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
):
    """Transformed logits of one [BLOCK_N, BLOCK_V] tile in fp32 (fp64); -inf at padded columns."""
    mask = mask_n[:, None] & mask_v[None, :]
    a = tl.load(l_ptr + offs_n[:, None] * stride_l + offs_v[None, :], mask=mask, other=float("-inf"))
    if l_ptr.dtype.element_ty != tl.float64:
        a = a.to(tl.float32)
    z = transform(a, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    return tl.where(mask_v[None, :], z, float("-inf"))


@triton.heuristics(
    {
        "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
        "TOPK": lambda a: a["hist_ptr"] is not None,
    }
)
@triton.jit
def logits_stats_kernel(
    l_ptr, y_ptr, part_ptr, hist_ptr,
    N, V, stride_l, ignore_index, logit_scale, softcap, inv_temperature, scal_ptr, tiles_per_split,
    HAS_SOFTCAP: tl.constexpr, TOPK: tl.constexpr,
    RADIX_SHIFT: tl.constexpr, RADIX_BITS: tl.constexpr, NBINS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """logits [N, V], targets [N] -> part [4, SPLIT, N] (m, s, t, z_y per split)."""
    logit_scale = scalar_arg(scal_ptr, 0, logit_scale)
    softcap = scalar_arg(scal_ptr, 1, softcap)
    inv_temperature = scalar_arg(scal_ptr, 3, inv_temperature)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = y != ignore_index
    if l_ptr.dtype.element_ty == tl.float64:
        s = tl.zeros([BLOCK_N], dtype=tl.float64)
    else:
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
    m = s + float("-inf")
    t = s
    z_y = s
    v_start = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
    v_stop = tl.minimum(v_start + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logits_tile(l_ptr, offs_n, offs_v, mask_n, mask_v, stride_l, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        m_t, s_t, t_t = tile_state(z)
        m, s, t = merge_state(m, s, t, m_t, s_t, t_t)
        hit = (offs_v[None, :] == y[:, None]) & valid[:, None]
        z_y += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if TOPK:
            radix_count(z, mask_n[:, None] & mask_v[None, :], hist_ptr + pid_n.to(tl.int64) * BLOCK_N * NBINS,
                        0, RADIX_SHIFT, RADIX_BITS, NBINS, True)
    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = n_split.to(tl.int64) * N
    tl.store(out, m, mask=mask_n)
    tl.store(out + plane, s, mask=mask_n)
    tl.store(out + 2 * plane, t, mask=mask_n)
    tl.store(out + 3 * plane, z_y, mask=mask_n)


@triton.heuristics(GRAD_HEURISTICS)
@triton.jit
def logits_grad_kernel(
    l_ptr, y_ptr, m_ptr, log_s_ptr, ent_ptr, tau_ptr, frac_ptr, log_s_c_ptr, ent_c_ptr,
    g_lp_ptr, g_ent_ptr, g_cl_ptr, dl_ptr,
    N, V, stride_l, stride_dl, ignore_index, logit_scale, softcap, temperature, inv_temperature,
    scal_ptr,
    HAS_SOFTCAP: tl.constexpr, HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_CL: tl.constexpr,
    Z_IN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row statistics and upstream gradients [N] -> grad_logits [N, V] (``dl_ptr``'s dtype).

    ``Z_IN``: ``l_ptr`` holds the transformed logits z themselves (the fused head's row-chunk
    buffer, ``_launch.linear_forward_backward``): the transform is not applied again, its chain
    rule is, so the result is dL/d(h.W + b). ``dl_ptr`` may be ``l_ptr`` (same dtype and strides):
    each program reads its tile before it overwrites it, and no other program touches that tile.
    """
    logit_scale = scalar_arg(scal_ptr, 0, logit_scale)
    softcap = scalar_arg(scal_ptr, 1, softcap)
    temperature = scalar_arg(scal_ptr, 2, temperature)
    inv_temperature = scalar_arg(scal_ptr, 3, inv_temperature)
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    if Z_IN:
        z = logits_tile(l_ptr, offs_n, offs_v, mask_n, mask_v, stride_l, 1.0, 0.0, 1.0, False)
    else:
        z = logits_tile(l_ptr, offs_n, offs_v, mask_n, mask_v, stride_l, logit_scale, softcap, inv_temperature,
                        HAS_SOFTCAP)
    dz = tile_grad(
        z, offs_n, offs_v, mask_n, mask_v, y_ptr, m_ptr, log_s_ptr, ent_ptr, tau_ptr, frac_ptr, log_s_c_ptr,
        ent_c_ptr, g_lp_ptr, g_ent_ptr, g_cl_ptr, ignore_index,
        logit_scale, softcap, temperature, inv_temperature, HAS_SOFTCAP, HAS_G_LP, HAS_G_ENT, HAS_G_CL,
    )
    mask = mask_n[:, None] & mask_v[None, :]
    tl.store(dl_ptr + offs_n[:, None] * stride_dl + offs_v[None, :], dz.to(dl_ptr.dtype.element_ty), mask=mask)
