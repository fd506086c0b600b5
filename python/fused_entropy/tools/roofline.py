"""Roofline on paper: FLOPs and compulsory HBM bytes of each kernel at (N, H, V) and the lower bounds
they imply on a GPU. ``fused-entropy aot --roofline`` prints the table; ``fused-entropy bench`` divides
its CUDA times by :func:`workload_bound`."""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

H100_SXM = dict(name="H100 SXM", tflops=989.0, tbs=3.35)  # dense bf16 tensor-core peak, HBM3 bandwidth
ROOFLINE_VOCABS = (32768, 131072, 151936)


def roofline(n: int, h: int, v: int, dtype: str = "bf16", gpu=H100_SXM) -> List[dict]:
    """Per-kernel FLOPs and HBM bytes of one fwd+bwd step at (N, H, V), and the implied lower bounds.

    GEMM FLOPs are 2 N V H per pass over the logits. Passes (from the kernels' docstrings and configs):
    the forward makes 1, with clamped entropy too: it stores each row chunk's fp32 logits in the
    logits buffer (``LOGITS_BUFFER_BYTES``) and the radix digits after the first are read from there
    (``configs.RADIX_DIGITS``; the vocabulary-parallel select, ``linear_radix_kernel``, still
    recomputes one GEMM pass per digit: listed, in no workload); the single pass of
    ``LinearGRPOLoss`` makes 3 (logits into the buffer, then dX and dW from dz in cuBLAS, with an fp32
    dW accumulator read and written once per row chunk); the backward makes 3 (recompute, dX, dW):
    ``linear_dz_kernel`` writes dz, cuBLAS reads it twice; ``GRAD_BUFFER_BYTES`` sets the chunks, each
    adding a read and write of the fp32 dX accumulator. Bytes are compulsory
    traffic: every input read once, every output written once, as if tiles were re-read from L2 and
    never from HBM. Two risks are counted beside the bound, from the shipped block sizes:
    ``tile_bytes``, the operand bytes the GEMM tiles load (a [BLOCK_N, BLOCK_H] x tile and a
    [BLOCK_V, BLOCK_H] W tile per step: 2 BN BV / ((BN + BV) e) FLOP per byte, far below H100's
    295 FLOP/byte ridge), served by L2 at best (``tile_hbm_ms`` if none were); and ``atomic_adds``,
    the int32 adds of the radix passes into the histogram (at most one per logit and pass), which
    cost a read and a write in HBM each whenever the histogram does not stay in L2
    (``atomic_hbm_ms``).
    """
    from ..kernels import configs

    e = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[dtype]
    acc = 8 if dtype == "fp64" else 4
    key_bits = 64 if dtype == "fp64" else 32
    digits = configs.RADIX_DIGITS[key_bits]
    nbins = configs.RADIX_NBINS
    gemm = 2.0 * n * v * h
    g = configs.get("linear_grad", dtype)
    f = configs.get("linear_stats", dtype)
    fwd_ai = lambda c: 2.0 * c.block_n * c.block_v / ((c.block_n + c.block_v) * e)  # FLOP per operand byte
    split = 1  # N = 8192 fills the GPU with row blocks; partial states are [4, split, N]
    rows = []

    def add(kernel, what, flops, nbytes, launches=1, atomic_adds=0, tile_bytes=None):
        rows.append(dict(kernel=kernel, what=what, launches=launches, flops=flops * launches,
                         bytes=nbytes * launches, atomic_adds=atomic_adds * launches,
                         tile_bytes=(nbytes if tile_bytes is None else tile_bytes) * launches))

    add("linear_stats_kernel", "forward GEMM + online lse/entropy (1 pass)", gemm,
        n * h * e + v * h * e + 8 * n + 4 * split * n * acc, tile_bytes=gemm / fwd_ai(f))
    add("finish_stats_kernel", "merge vocabulary splits", 0, 4 * split * n * acc + 8 * n + 4 * n * acc)
    add("linear_stats_kernel +TOPK", "clamped entropy: first radix digit counted in the forward, logits "
        "stored in the logits buffer", 0, n * nbins * 4 + n * v * acc, atomic_adds=n * v)
    add("logits_radix_kernel (buffer)", "clamped entropy: radix digit after the first, read from the logits "
        "buffer", 0, n * v * acc + 2 * n * acc + n * nbins * 4, launches=len(digits) - 1, atomic_adds=n * v)
    add("linear_radix_kernel", "vocabulary-parallel clamped entropy: recompute per radix digit (each rank, its "
        "shard)", gemm, n * h * e + v * h * e + 2 * n * acc + n * nbins * 4, launches=len(digits),
        atomic_adds=n * v, tile_bytes=gemm / fwd_ai(configs.get("linear_radix", dtype)))
    # the single pass of LinearGRPOLoss: row chunks of the logits buffer, z fp32 + dz in the input dtype
    zb = acc + (e if e != acc else 0)
    rows_c = max(f.block_n, configs.LOGITS_BUFFER_BYTES // (v * zb) // f.block_n * f.block_n)
    sp_chunks = max(1, math.ceil(n / rows_c))
    add("linear_stats_kernel +Z", f"single pass: logits stored in the logits buffer ({sp_chunks} row chunks "
        f"of {min(n, rows_c)})", 0, n * v * acc)
    add("logits_grad_kernel (Z_IN)", "single pass: dz from the buffer (read z, write dz)", 0,
        n * v * (acc + e) + 8 * n + 8 * n * acc)
    dw_bytes = v * h * e if sp_chunks == 1 else (2 * sp_chunks * v * h * acc + v * h * (acc + e))
    add("(cuBLAS) single pass dX, dW", "single pass: dX = dz W per chunk, dW += dz^T x (fp32 accumulator)",
        2 * gemm, 2 * n * v * e + n * h * e + v * h * e + n * h * e + dw_bytes + v * acc)
    add("radix_select_kernel", "clamped entropy: pick a digit per row (reads + zeroes the histogram)", 0,
        2 * n * nbins * 4 + 6 * n * acc, launches=len(digits))
    # the backward: dz [N, V] in chunks of at most GRAD_BUFFER_BYTES, no atomics
    chunks = max(1, math.ceil(n * v * e / configs.GRAD_BUFFER_BYTES))
    add("linear_dz_kernel", f"backward, chunked: recompute + store dz ({chunks} chunks, 1 pass)", gemm,
        n * h * e + v * h * e + 8 * n + 8 * n * acc + n * v * e + math.ceil(n / g.block_n) * v * acc,
        tile_bytes=gemm / fwd_ai(g) + n * v * e)
    add("(cuBLAS) dW, dX", "backward, chunked: dW = dz^T x, dX += dz W per chunk (2 passes)", 2 * gemm,
        2 * n * v * e + n * h * e + 2 * v * h * e + (2 * chunks - 1) * n * h * acc + n * h * (acc + e))
    add("logits_stats_kernel", "logits in memory: forward", 0, n * v * e + 8 * n + 4 * split * n * acc)
    add("logits_stats_kernel +TOPK", "logits in memory: first radix digit counted in the forward", 0,
        n * nbins * 4, atomic_adds=n * v)
    add("logits_radix_kernel", "logits in memory: radix digit after the first", 0,
        n * v * e + 2 * n * acc + n * nbins * 4, launches=len(digits) - 1, atomic_adds=n * v)
    add("logits_grad_kernel", "logits in memory: backward (read logits, write grad)", 0,
        2 * n * v * e + 8 * n + 8 * n * acc)
    t_len = 1024
    add("grpo_objective_kernel", f"GRPO objective, B={n // t_len} x T={t_len} tokens (fp32)", 0,
        n * (4 * 4 + 1 + 1 + 4 + 4) + (n // t_len) * 4 * 4)
    for r in rows:
        r["t_flop_ms"] = r["flops"] / (gpu["tflops"] * 1e12) * 1e3
        r["t_mem_ms"] = r["bytes"] / (gpu["tbs"] * 1e12) * 1e3
        r["bound_ms"] = max(r["t_flop_ms"], r["t_mem_ms"])
        r["atomic_hbm_ms"] = r["atomic_adds"] * 2 * acc / (gpu["tbs"] * 1e12) * 1e3
        r["tile_hbm_ms"] = r["tile_bytes"] / (gpu["tbs"] * 1e12) * 1e3
    return rows


# name -> (the kernels it runs, what it is)
_CHUNKED_BWD = ("linear_dz_kernel", "(cuBLAS) dW, dX")
WORKLOADS = {
    "linear": (("linear_stats_kernel", "finish_stats_kernel") + _CHUNKED_BWD,
               "linear_logprobs + entropy, fwd+bwd"),
    "linear+clamped": (("linear_stats_kernel", "finish_stats_kernel") + _CHUNKED_BWD +
                       ("linear_stats_kernel +TOPK", "logits_radix_kernel (buffer)", "radix_select_kernel"),
                       "the same with clamped (top-k) entropy"),
    "grpo-single": (("linear_stats_kernel", "finish_stats_kernel", "linear_stats_kernel +Z",
                     "logits_grad_kernel (Z_IN)", "(cuBLAS) single pass dX, dW"),
                    "LinearGRPOLoss single pass (Triton): logits buffer, dz, dX, dW"),
    "logits": (("logits_stats_kernel", "finish_stats_kernel", "logits_grad_kernel"),
               "logits entry point, fwd+bwd (logits already in memory)"),
    "logits+clamped": (("logits_stats_kernel", "finish_stats_kernel", "logits_grad_kernel",
                        "logits_stats_kernel +TOPK", "logits_radix_kernel", "radix_select_kernel"),
                       "the same with clamped (top-k) entropy"),
}


def lower_bound(rows: List[dict], kernels: Sequence[str]) -> Tuple[float, float]:
    """(FLOPs, seconds) of a sequence of kernels: the sum of each kernel's max(compute, memory) time."""
    picked = [r for r in rows if r["kernel"] in kernels]
    return sum(r["flops"] for r in picked), sum(r["bound_ms"] for r in picked) / 1e3


def workload_bound(workload: str, n: int, h: int, v: int, dtype: str = "bf16", gpu=H100_SXM) -> Tuple[float, float]:
    """(FLOPs, lower-bound seconds) of a ``WORKLOADS`` entry at (N, H, V): what a benchmark divides by
    to report achieved TFLOP/s and the fraction of the bound."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    return lower_bound(roofline(n, h, v, dtype, gpu), WORKLOADS[workload][0])


def format_roofline(n: int = 8192, h: int = 4096, vocabs: Sequence[int] = ROOFLINE_VOCABS, dtype: str = "bf16",
                    gpu=H100_SXM) -> str:
    """Markdown: one summary table (per vocabulary and workload), then every kernel."""
    out = [f"Roofline on paper, not measured: N={n}, H={h}, {dtype}, {gpu['name']} ({gpu['tflops']:g} TFLOP/s "
           f"dense, {gpu['tbs']:g} TB/s). Lower bounds until a GPU run confirms them.", "",
           "| V | workload | GEMM passes | TFLOP | HBM GB | lower bound ms | tile operands GB | "
           "tiles via HBM ms (risk) | atomics via HBM ms (risk) |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    gemm_flops = lambda v: 2.0 * n * v * h
    for v in vocabs:
        rows = roofline(n, h, v, dtype, gpu)
        for name, (ks, title) in WORKLOADS.items():
            flops, sec = lower_bound(rows, ks)
            mine = [r for r in rows if r["kernel"] in ks]
            atom = sum(r["atomic_hbm_ms"] for r in mine)
            nbytes = sum(r["bytes"] for r in mine)
            tiles = sum(r["tile_bytes"] for r in mine)
            out.append(f"| {v} | {title} | {flops / gemm_flops(v):g} | {flops / 1e12:.2f} | {nbytes / 1e9:.2f} | "
                       f"{sec * 1e3:.2f} | {tiles / 1e9:.0f} | {sum(r['tile_hbm_ms'] for r in mine):.0f} | "
                       f"{atom:.0f} |")
    out += ["", "| V | kernel | launches | GFLOP | HBM MB | compute ms | memory ms | bound ms | atomic adds (M) | "
            "atomics via HBM ms |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in vocabs:
        for r in roofline(n, h, v, dtype, gpu):
            out.append(f"| {v} | {r['kernel']} | {r['launches']} | {r['flops'] / 1e9:,.0f} | "
                       f"{r['bytes'] / 1e6:,.1f} | {r['t_flop_ms']:.3f} | {r['t_mem_ms']:.3f} | "
                       f"{r['bound_ms']:.3f} | {r['atomic_adds'] / 1e6:,.0f} | {r['atomic_hbm_ms']:.1f} |")
    return "\n".join(out)
