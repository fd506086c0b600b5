"""Block sizes, warps and stages of every kernel: frozen defaults, test overrides, autotuning, AOT list.

Frozen defaults were chosen for H100 (sm_90) on paper and checked by compiling for sm_90/sm_80
(``triton.compile`` + ``cuobjdump -res-usage``: no spills; bf16 GEMM tiles lower to wgmma):

- GEMM kernels (linear_stats, linear_grad, topk linear_radix): 128 x 128 output tiles feed
  tensor cores (wgmma m64n128k16 per warpgroup, 2 warpgroups); the fp32 accumulator is 64
  registers per thread at 8 warps. BLOCK_H = 64 for 16-bit inputs: a stage holds two 16 KiB
  operand tiles, 4 stages = 128 KiB of shared memory, under the 227 KiB of sm_90 and the
  163 KiB of sm_80. fp32 inputs use BLOCK_H = 32 (same bytes per stage). fp64 runs on DMMA
  with 64 x 64 tiles. Forward and backward share BLOCK_N/V/H so the backward's recomputed
  logits are bitwise the forward's (the top-k tie test needs that); only warps/stages differ.
- Logits kernels stream memory: 16 x 512 tiles, 8 warps, 32 elements per thread.

``FUSED_ENTROPY_AUTOTUNE=1`` lets the launcher tune num_warps/num_stages (never block sizes, for
the reason above) once per key (kernel, dtype, H, V, N rounded up to a power of two).

This module imports triton only, never torch. ``aot_specs()`` lists every shipped
(kernel, signature, constexprs, num_warps, num_stages) for an ahead-of-time compile gate.
"""
import contextlib
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import triton.language as tl


@dataclass(frozen=True)
class Config:
    block_n: int
    block_v: int
    block_h: int = 0  # 0: kernel has no hidden dimension
    num_warps: int = 4
    num_stages: int = 2


DTYPES = ("bf16", "fp16", "fp32", "fp64")

_GEMM = {
    "bf16": Config(128, 128, 64, num_warps=8, num_stages=4),
    "fp16": Config(128, 128, 64, num_warps=8, num_stages=4),
    "fp32": Config(128, 128, 32, num_warps=8, num_stages=3),
    "fp64": Config(64, 64, 16, num_warps=4, num_stages=2),
}
_GEMM_GRAD = {k: replace(c, num_stages=min(c.num_stages, 3)) for k, c in _GEMM.items()}
_STREAM = {d: Config(16, 512, num_warps=8, num_stages=1) for d in DTYPES}

DEFAULTS = {
    "linear_stats": _GEMM,
    "linear_grad": _GEMM_GRAD,
    "linear_radix": _GEMM,
    "logits_stats": _STREAM,
    "logits_grad": _STREAM,
    "logits_radix": _STREAM,
    "finish_stats": {d: Config(1024, 0, num_warps=4, num_stages=1) for d in DTYPES},
    "radix_select": {d: Config(2, 0, num_warps=4, num_stages=1) for d in DTYPES},
}

# Radix digits of the top-k threshold, most significant first; they sum to the key width.
# 11-bit digits: 3 passes over fp32 keys with a [N, 2048] int32 histogram (8 KiB per row).
RADIX_DIGITS = {32: (11, 11, 10), 64: (11, 11, 11, 11, 10, 10)}
RADIX_NBINS = 2048

# the launcher splits the vocabulary until about this many programs per SM are running
PROGRAMS_PER_SM = 2

_OVERRIDES: dict = {}


def get(kernel: str, dtype: str) -> Config:
    """The configuration ``kernel`` runs with for inputs of ``dtype`` ("bf16", ..., "fp64")."""
    over = _OVERRIDES.get(kernel)
    if over is not None:
        return over
    return DEFAULTS[kernel][dtype]


@contextlib.contextmanager
def override(**configs: Config):
    """Temporarily run kernels with other configs (tests use tiny blocks), e.g.
    ``with override(linear_stats=Config(16, 16, 16), linear_grad=Config(16, 16, 16)): ...``.
    For linear kernels the stats, radix and grad configs must share block sizes.
    """
    unknown = set(configs) - set(DEFAULTS) - {"split"}
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: {sorted(DEFAULTS)} and 'split'")
    saved = dict(_OVERRIDES)
    _OVERRIDES.update(configs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(saved)


def forced_split():
    """Number of vocabulary splits forced by ``override(split=...)`` (tests), or None."""
    return _OVERRIDES.get("split")


def autotune_enabled() -> bool:
    return os.environ.get("FUSED_ENTROPY_AUTOTUNE", "0") not in ("", "0")


def autotune_candidates(kernel: str, dtype: str):
    """(num_warps, num_stages) pairs tried when autotuning; block sizes stay frozen."""
    base = get(kernel, dtype)
    if base.block_h:
        pairs = [(4, 3), (8, 3), (8, 4), (8, 5)] if dtype != "fp64" else [(4, 2), (4, 3), (8, 2)]
    else:
        pairs = [(4, 1), (8, 1), (16, 1)]
    if (base.num_warps, base.num_stages) not in pairs:
        pairs.insert(0, (base.num_warps, base.num_stages))
    return pairs


def bucket(n: int) -> int:
    """Autotuning key for a row count: the next power of two (at least 1)."""
    return 1 << max(0, int(n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile list
# ---------------------------------------------------------------------------------------------

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp64": "*fp64"}
_TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32, "fp64": tl.float64}


def _acc(dtype: str) -> str:
    return "fp64" if dtype == "fp64" else "fp32"


def _dot_precision(dtype: str) -> str:
    # fp32 inputs ship with exact fp32 products; "tf32" is compiled too (torch allow_tf32=True)
    return "ieee"


class AotSpec(NamedTuple):
    """One kernel build: ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
    target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))``."""

    name: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int


# what the JIT specializes at run time for the usual case: 16-byte aligned tensors, and row
# strides / H that are multiples of 16 (without these hints loads are scalar and nothing pipelines)
_ALIGNED_INTS = ("H", "stride_x", "stride_w", "stride_l", "stride_dl")


def _attrs(signature: dict) -> dict:
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (arg, ty) in enumerate(signature.items())
        if ty.startswith("*") or arg in _ALIGNED_INTS
    }


def aot_specs():
    """Every shipped kernel configuration as ``AotSpec`` records.

    For each kernel and input dtype two flag sets are listed: every optional input and gradient
    on (the largest kernel) and every one off (pointers passed as None become constexpr None).
    Attributes mark pointers 16-byte aligned and H / row strides divisible by 16, as the JIT
    specializes them at run time for ordinary tensors.
    """
    from . import _online, linear_grad, linear_stats, logits_stats, topk

    out = []
    for dt in DTYPES:
        acc = _acc(dt)
        ptr, pacc = _PTR[dt], "*" + acc
        for flags in (True, False):
            # --- linear_stats ------------------------------------------------------------
            c = get("linear_stats", dt)
            key_bits = 64 if dt == "fp64" else 32
            sig = {
                "x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr if flags else "constexpr", "y_ptr": "*i64",
                "part_ptr": pacc, "hist_ptr": "*i32" if flags else "constexpr",
                "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32", "tiles_per_split": "i32",
            }
            const = {
                "HAS_BIAS": flags, "HAS_SOFTCAP": flags, "TOPK": flags,
                "RADIX_SHIFT": key_bits - RADIX_DIGITS[key_bits][0], "RADIX_BITS": RADIX_DIGITS[key_bits][0],
                "NBINS": RADIX_NBINS, "BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h,
                "UPCAST": False, "DOT_PRECISION": _dot_precision(dt),
            }
            if not flags:
                const.update(b_ptr=None, hist_ptr=None)
            out.append(("linear_stats", linear_stats.linear_stats_kernel.fn, sig, const, c.num_warps, c.num_stages))
            # --- linear_grad -------------------------------------------------------------
            c = get("linear_grad", dt)
            opt = pacc if flags else "constexpr"
            sig = {
                "x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr if flags else "constexpr", "y_ptr": "*i64",
                "lse_ptr": pacc, "ent_ptr": opt, "tau_ptr": opt, "frac_ptr": opt, "lse_c_ptr": opt, "ent_c_ptr": opt,
                "g_lp_ptr": pacc, "g_ent_ptr": opt, "g_cl_ptr": opt,
                "dx_ptr": pacc, "dw_ptr": pacc, "db_ptr": opt,
                "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32", "inv_temperature": "fp32",
            }
            const = {
                "HAS_BIAS": flags, "HAS_SOFTCAP": flags, "HAS_G_LP": True, "HAS_G_ENT": flags, "HAS_G_CL": flags,
                "COMPUTE_DX": True, "COMPUTE_DW": True, "COMPUTE_DB": flags,
                "BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h,
                "UPCAST": False, "DOT_PRECISION": _dot_precision(dt),
            }
            if not flags:
                const.update({k: None for k, v in sig.items() if v == "constexpr"})
            out.append(("linear_grad", linear_grad.linear_grad_kernel.fn, sig, const, c.num_warps, c.num_stages))
            # --- logits_stats ------------------------------------------------------------
            c = get("logits_stats", dt)
            sig = {
                "l_ptr": ptr, "y_ptr": "*i64", "part_ptr": pacc, "hist_ptr": "*i32" if flags else "constexpr",
                "N": "i32", "V": "i32", "stride_l": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32", "tiles_per_split": "i32",
            }
            const = {
                "HAS_SOFTCAP": flags, "TOPK": flags,
                "RADIX_SHIFT": key_bits - RADIX_DIGITS[key_bits][0], "RADIX_BITS": RADIX_DIGITS[key_bits][0],
                "NBINS": RADIX_NBINS, "BLOCK_N": c.block_n, "BLOCK_V": c.block_v,
            }
            if not flags:
                const.update(hist_ptr=None)
            out.append(("logits_stats", logits_stats.logits_stats_kernel.fn, sig, const, c.num_warps, c.num_stages))
            # --- logits_grad -------------------------------------------------------------
            c = get("logits_grad", dt)
            sig = {
                "l_ptr": ptr, "y_ptr": "*i64", "lse_ptr": pacc, "ent_ptr": opt, "tau_ptr": opt, "frac_ptr": opt,
                "lse_c_ptr": opt, "ent_c_ptr": opt, "g_lp_ptr": pacc, "g_ent_ptr": opt, "g_cl_ptr": opt, "dl_ptr": ptr,
                "N": "i32", "V": "i32", "stride_l": "i32", "stride_dl": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32", "inv_temperature": "fp32",
            }
            const = {
                "HAS_SOFTCAP": flags, "HAS_G_LP": True, "HAS_G_ENT": flags, "HAS_G_CL": flags,
                "BLOCK_N": c.block_n, "BLOCK_V": c.block_v,
            }
            if not flags:
                const.update({k: None for k, v in sig.items() if v == "constexpr"})
            out.append(("logits_grad", logits_stats.logits_grad_kernel.fn, sig, const, c.num_warps, c.num_stages))
        # --- finish_stats (flags: entropy and row max kept or not) ---------------------------
        c = get("finish_stats", dt)
        for flags in (True, False):
            opt = pacc if flags else "constexpr"
            sig = {"part_ptr": pacc, "y_ptr": "*i64", "lse_ptr": pacc, "logp_ptr": pacc, "ent_ptr": opt,
                   "m_ptr": opt, "N": "i32", "n_split": "i32", "ignore_index": "i32"}
            const = {"ENTROPY": flags, "KEEP_MAX": flags, "BLOCK": c.block_n}
            if not flags:
                const.update(ent_ptr=None, m_ptr=None)
            out.append(("finish_stats", _online.finish_stats_kernel.fn, sig, const, c.num_warps, c.num_stages))
        out.extend(topk.aot_specs(dt, get))

    return [AotSpec(name, fn, sig, const, _attrs(sig), nw, ns) for name, fn, sig, const, nw, ns in out]
