"""Forward of the fused LM head: GEMM tiles of ``z = transform(x W^T + b)`` folded into row statistics.

Grid ``(group_rows, SPLIT, groups)`` from row block ``block0``, the grouped order of ``_grid.py``:
program ``(i, j)`` owns rows ``i*BLOCK_N ...`` and the ``j``-th contiguous run of ``tiles_per_split``
vocabulary tiles. For each tile it accumulates
``x[BLOCK_N, H] @ W[BLOCK_V, H]^T`` over H in ``BLOCK_H`` steps (tensor cores, fp32 accumulator),
applies the transform in the epilogue, sets padded columns ``v >= V`` to -inf (never 0: verl #2656),
and merges the tile into the online state (m, s, t) of ``_online.py``; the target logit ``z_y`` is
picked up from the tile that holds it. Each program writes its partial state to
``part[4, SPLIT, N]`` = (m, s, t, z_y); ``_online.finish_stats_kernel`` merges the splits.

With ``hist_ptr`` given, the same pass also counts the first radix digit of every logit for the
top-k threshold (``topk.py``), so clamped entropy costs no extra GEMM pass for its first digit.
With ``z_ptr`` given it also stores every transformed logit it folds into the statistics, fp32
(fp64 for fp64) at ``z[row, v]`` with row stride ``stride_z``: the row-chunk logits buffer from
which the remaining radix digits are selected in memory (``_launch.linear_stats``). These are the
very registers the statistics see, so the stored z is bitwise the z every other kernel recomputes
from the same tile (``linear_logit_tile``); the backward's tie test ``z == tau`` relies on that.

Cost: one GEMM pass, 2*N*V*H flops, reading W once per row block and x once per vocabulary tile;
with ``z_ptr`` also a write of N*V fp32 logits (4 bytes each; at N = 8192, V = 128k that is 4.3 GB
in all, in chunks of at most ``configs.logits_buffer_bytes()``).
"""
import triton
import triton.language as tl

from ._grid import grouped_program
from ._online import merge_state, scalar_arg, tile_state, transform
from ._radix import radix_count


@triton.jit
def linear_logit_tile(
    x_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, H, stride_x, stride_w,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Transformed logits of one [BLOCK_N, BLOCK_V] tile; -inf at padded columns.

    Every kernel that needs logits (forward, radix passes, backward) calls this with the same
    BLOCK_N/V/H, so the recomputed z is bitwise the forward's z; the top-k tie test (z == tau)
    in the backward depends on that. ``UPCAST`` (interpreter only) feeds tl.dot fp32 operands
    because the interpreter's bf16 dot is wrong; compiled code keeps bf16/fp16 operands.
    """
    # out_dtype is spelled out: Triton before 3.7 types every dot's result fp32 unless told, and
    # then rejects an fp64 accumulator
    if x_ptr.dtype.element_ty == tl.float64:
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    # Out-of-range rows/columns load row N-1 / V-1 instead of being masked: their results are
    # discarded, and unmasked full-width loads keep the pointer/predicate registers low enough
    # for 128 x 128 tiles not to spill. Only a ragged last H slice is masked.
    rows = tl.where(mask_n, offs_n, 0)
    cols = tl.where(mask_v, offs_v, 0)
    offs_h = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows[:, None] * stride_x + offs_h[None, :]
    w_ptrs = w_ptr + cols[:, None] * stride_w + offs_h[None, :]
    h_full = H - H % BLOCK_H
    for h0 in range(0, h_full, BLOCK_H):
        x = tl.load(x_ptrs)
        w = tl.load(w_ptrs)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if h_full < H:
        mask_h = offs_h < H - h_full
        x = tl.load(x_ptrs, mask=mask_h[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_h[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(acc.dtype)[None, :]
    z = transform(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    return tl.where(mask_v[None, :], z, float("-inf"))


@triton.heuristics(
    {
        "HAS_BIAS": lambda a: a["b_ptr"] is not None,
        "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
        "TOPK": lambda a: a["hist_ptr"] is not None,
        "STORE_Z": lambda a: a["z_ptr"] is not None,
    }
)
# one build whatever the first row block and the tiles per split (1 or a multiple of 16 would specialize)
@triton.jit(do_not_specialize=["tiles_per_split", "block0"])
def linear_stats_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, hist_ptr, z_ptr,
    N, V, H, stride_x, stride_w, stride_z, ignore_index,
    logit_scale, softcap, inv_temperature, scal_ptr, tiles_per_split, block0,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, TOPK: tl.constexpr, STORE_Z: tl.constexpr,
    RADIX_SHIFT: tl.constexpr, RADIX_BITS: tl.constexpr, NBINS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """x [N, H], W [V, H], b [V], targets [N] -> part [4, n_split, N] (m, s, t, z_y per split), and
    with ``z_ptr`` the transformed logits z (row stride ``stride_z``), stored tile by tile without a
    mask: the buffer must hold ``cdiv(N, BLOCK_N) * BLOCK_N`` rows of ``cdiv(V, BLOCK_V) * BLOCK_V``
    columns; padded columns get -inf, rows past N the logits of a clamped row (never read).

    ``softcap`` <= 0 means no softcap; scalars are runtime values (no recompilation per value).
    """
    logit_scale = scalar_arg(scal_ptr, 0, logit_scale)
    softcap = scalar_arg(scal_ptr, 1, softcap)
    inv_temperature = scalar_arg(scal_ptr, 3, inv_temperature)
    pid_n, pid_s = grouped_program(block0)
    n_split = tl.num_programs(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = y != ignore_index
    if x_ptr.dtype.element_ty == tl.float64:
        s = tl.zeros([BLOCK_N], dtype=tl.float64)
    else:
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
    m = s + float("-inf")
    t = s
    z_y = s
    if STORE_Z:
        z_rows = z_ptr + offs_n * stride_z
    if TOPK:
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
        # compare tile-local int32 columns: int64 [BLOCK_N, BLOCK_V] temporaries cost registers
        y_local = tl.where(valid, y - v0, -1).to(tl.int32)
        hit = tl.arange(0, BLOCK_V)[None, :] == y_local[:, None]
        z_y += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if STORE_Z:
            # unmasked: the buffer covers whole tiles (see the docstring); no mask or int64 offset
            # tile in registers, which the fp64 epilogue on sm_80 could not spare
            tl.store(z_rows[:, None] + v0 + tl.arange(0, BLOCK_V)[None, :], z)
        if TOPK:
            radix_count(z, mask_n[:, None] & mask_v[None, :], hist_block, 0, RADIX_SHIFT, RADIX_BITS, NBINS, True)
        # last use of z: the state update may overwrite it in place
        m_t, s_t, t_t = tile_state(z)
        m, s, t = merge_state(m, s, t, m_t, s_t, t_t)
    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = n_split.to(tl.int64) * N
    tl.store(out, m, mask=mask_n)
    tl.store(out + plane, s, mask=mask_n)
    tl.store(out + 2 * plane, t, mask=mask_n)
    tl.store(out + 3 * plane, z_y, mask=mask_n)
