"""Backward of the fused LM head: recompute logit tiles, form dL/dz, and turn it into dX, dW and db.

``linear_dz_kernel`` + two cuBLAS GEMMs, no atomics, bitwise deterministic. The vocabulary is cut
into chunks ``[v_lo, v_lo + Vc)`` with ``v_lo`` and ``Vc`` multiples of ``BLOCK_V``. Per chunk, grid
``(group_rows, cdiv(Vc, BLOCK_V), groups)``, the grouped order of ``_grid.py`` (a group of row
blocks keeps its x in L2 while the chunk's tiles go by): each program recomputes its tile of ``z``
with ``linear_logit_tile`` at the forward's tile origin and blocks (so z is bitwise the forward's
and the top-k tie test ``z == tau`` holds), forms ``dL/da`` in fp32 registers (``tile_grad``) and
stores it in the input dtype into ``dz[N, Vc]``, plus the tile's column sums into
``db_part[n_row_blocks, Vc]`` (fp32, fp64 for fp64). The launcher then runs ``dW[chunk] = dz^T @ x``
and ``dX += dz @ W[chunk]`` (cuBLAS, fp32 accumulation) and ``db[chunk] = db_part.sum(0)``. Every
output element is written by one fixed sequence of operations, so two runs give the same bits. dz
enters the GEMMs in the input dtype (bf16/fp16), like any bf16 matmul backward.

Cost: three GEMM passes, 6*N*V*H flops (recompute here, dW and dX in cuBLAS), plus the dz buffer in
HBM: written once and read twice, ``3 * N * V * e`` bytes in all (e = 2 for bf16; at N = 8192,
V = 128k that is 6.4 GB, about 2 ms at 3.35 TB/s beside 27 ms of GEMMs at H = 4096 on H100). Its
size is bounded by ``configs.grad_buffer_bytes()`` (256 MiB unless overridden): ``Vc`` is the largest
multiple of ``BLOCK_V`` with ``N * Vc * e`` under the bound, at least one tile.

An earlier design formed dX and dW in one kernel per (row block, vocabulary tile), adding partial
products into fp32 buffers with atomics (1.0e11 atomic adds at N = 8192, V = 128k, H = 4096). On an
H200 it measured 10.69 ms against this design's 2.99 ms at (4096, 2048, 32768) and 308 ms against
59 ms at (8192, 4096, 131072), backward only, and its results varied run to run
(``bench/results/gpu/h200-2026-11-30-1252581-backward-ab.md``), so it was removed.
"""
import triton
import triton.language as tl

from ._grid import grouped_program
from ._online import GRAD_HEURISTICS, scalar_arg, tile_grad
from .linear_stats import linear_logit_tile


@triton.heuristics(
    {
        **GRAD_HEURISTICS,
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "STORE_DZ": lambda a: a["dz_ptr"] is not None,
        "COMPUTE_DB": lambda a: a["db_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["block0"])  # one build whatever the first row block
def linear_dz_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    m_ptr, log_s_ptr, ent_ptr, tau_ptr, frac_ptr, log_s_c_ptr, ent_c_ptr,
    g_lp_ptr, g_ent_ptr, g_cl_ptr,
    dz_ptr, db_ptr,
    N, V, H, v_lo, stride_x, stride_w, stride_dz, ignore_index,
    logit_scale, softcap, temperature, inv_temperature, scal_ptr, block0,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_CL: tl.constexpr,
    STORE_DZ: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One vocabulary chunk starting at ``v_lo`` (a multiple of BLOCK_V), grid (group_rows, chunk tiles,
    groups) from row block ``block0`` (the grouped order of ``_grid.py``): row statistics and upstream
    gradients [N] -> dz [N, Vc] in the input dtype and db_part [cdiv(N, BLOCK_N), Vc] (fp32, fp64
    for fp64), both with row stride ``stride_dz``; column ``c`` of either is vocabulary entry
    ``v_lo + c``. Nothing is accumulated: every element is stored once.
    """
    logit_scale = scalar_arg(scal_ptr, 0, logit_scale)
    softcap = scalar_arg(scal_ptr, 1, softcap)
    temperature = scalar_arg(scal_ptr, 2, temperature)
    inv_temperature = scalar_arg(scal_ptr, 3, inv_temperature)
    pid_n, pid_v = grouped_program(block0)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # chunk-local columns; the global ones keep the forward's tile origins
    local_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = local_v + v_lo
    mask_n = offs_n < N
    mask_v = offs_v < V
    z = linear_logit_tile(
        x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_x, stride_w,
        logit_scale, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP,
        BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION,
    )
    dz = tile_grad(
        z, offs_n, offs_v, mask_n, mask_v, y_ptr,
        m_ptr, log_s_ptr, ent_ptr, tau_ptr, frac_ptr, log_s_c_ptr, ent_c_ptr,
        g_lp_ptr, g_ent_ptr, g_cl_ptr, ignore_index,
        logit_scale, softcap, temperature, inv_temperature,
        HAS_SOFTCAP, HAS_G_LP, HAS_G_ENT, HAS_G_CL,
    )
    if COMPUTE_DB:
        # column sums of the fp32 dz (before rounding to the input dtype), one row per row block
        tl.store(db_ptr + pid_n.to(tl.int64) * stride_dz + local_v, tl.sum(dz, axis=0), mask=mask_v)
    if STORE_DZ:
        tl.store(dz_ptr + offs_n[:, None] * stride_dz + local_v[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_v[None, :])
