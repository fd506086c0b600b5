"""Block sizes, warps and stages of every kernel: frozen defaults, test overrides, autotuning, AOT list.

Frozen defaults were chosen for H100 (sm_90) on paper and checked by compiling every build in
``aot_specs()`` for sm_90 and sm_80 (``triton.compile`` + ``cuobjdump -res-usage``): no spills
(no local memory), and the 16-bit GEMM tiles lower to wgmma (HGMMA) on sm_90.

- GEMM kernels (linear_stats, linear_radix, linear_grad), 16-bit inputs: 128 x 64 output tiles,
  8 warps (two warpgroups of wgmma m64n64k16 on sm_90, mma.sync m16n8k16 on sm_80),
  BLOCK_H = 32, 5 stages forward / 4 backward (12 KiB of operands per stage, <= 80 KiB of shared
  memory). Larger tiles were tried: 128 x 128 spills in the backward (z, dz and the softmax terms
  live at once when every gradient is on), and BLOCK_H = 64 spills 16 bytes in the sm_80 backward.
  fp32 inputs ("ieee" products run on FMA units, operands in registers): 64 x 64 x 16, 4 warps.
  fp64 (DMMA): 32 x 32 x 16, 4 warps.
  Forward, radix passes and backward share BLOCK_N/V/H and num_warps so the backward's
  recomputed logits are bitwise the forward's (the top-k tie test z == tau needs that).
- Logits kernels stream memory: 16 x 256 tiles (8 x 256 for fp64), 8 warps.

Backward design of the linear head (``backward_design()``, read at every call): "chunked" (default:
``linear_dz_kernel`` per vocabulary chunk + cuBLAS GEMMs, no atomics, deterministic) or "atomic"
(``linear_grad_kernel``, fp32 atomics). ``FUSED_ENTROPY_BACKWARD=atomic`` or
``override(backward="atomic")`` select the atomic one; the launcher ignores that request while
``torch.use_deterministic_algorithms(True)`` is on. The chunked design's dz buffer is bounded by
``grad_buffer_bytes()``: ``GRAD_BUFFER_BYTES`` (256 MiB), ``FUSED_ENTROPY_GRAD_BUFFER_MB`` or
``override(grad_buffer_bytes=...)``. See ``linear_grad.py`` for the costs of both.

Row-chunk logits buffer (``logits_buffer_bytes()``): the clamped-entropy forward and the Triton single
pass of ``LinearGRPOLoss`` keep one chunk of rows' logits ``[Nc, V]`` (fp32; plus dz in the input
dtype for the single pass) in memory: ``LOGITS_BUFFER_BYTES`` (1 GiB),
``FUSED_ENTROPY_LOGITS_BUFFER_MB`` or ``override(logits_buffer_bytes=...)``; ``Nc`` is a multiple of
the GEMM's BLOCK_N, at least one row block.

``FUSED_ENTROPY_AUTOTUNE=1`` lets the launcher tune the pipeline depth of the GEMM kernels and the
warps of the streaming kernels (never block sizes or GEMM warps, for the reason above), once per
key (kernel, dtype, H, V, N rounded up to a power of two, which outputs are formed).

This module imports triton only, never torch. ``aot_specs()`` lists every shipped build as an
``AotSpec`` (name, fn, signature, constexprs, attrs, num_warps, num_stages) for an ahead-of-time
compile gate.
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
    "bf16": Config(128, 64, 32, num_warps=8, num_stages=5),
    "fp16": Config(128, 64, 32, num_warps=8, num_stages=5),
    "fp32": Config(64, 64, 16, num_warps=4, num_stages=4),
    "fp64": Config(32, 32, 16, num_warps=4, num_stages=2),
}
# the backward holds more live tiles; fewer stages leave it more shared memory and registers
_GEMM_GRAD = {
    "bf16": replace(_GEMM["bf16"], num_stages=4),
    "fp16": replace(_GEMM["fp16"], num_stages=4),
    "fp32": replace(_GEMM["fp32"], num_stages=3),
    "fp64": _GEMM["fp64"],
}
_STREAM = {d: Config(8 if d == "fp64" else 16, 256, num_warps=8, num_stages=1) for d in DTYPES}

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

# Linear-head backward: "chunked" (default, deterministic) or "atomic" (see linear_grad.py)
BACKWARDS = ("chunked", "atomic")
# upper bound of the chunked backward's dz buffer [N, Vc] in bytes (at least one tile is used)
GRAD_BUFFER_BYTES = 256 * 2**20
# upper bound of the row-chunk logits buffer [Nc, V] (fp32 z, plus dz in the input dtype for the
# single pass) in bytes; at least one GEMM row block is used
LOGITS_BUFFER_BYTES = 2**30

_OVERRIDES: dict = {}
# override() keys that are not kernel configs
_SETTINGS = ("split", "backward", "grad_buffer_bytes", "logits_buffer_bytes")


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
    For linear kernels the stats, radix and grad configs must share block sizes (the chunked
    backward's ``linear_dz_kernel`` runs with the ``linear_grad`` config).

    Settings beside configs: ``split`` (vocabulary splits of the forward), ``backward``
    ("chunked" or "atomic"), ``grad_buffer_bytes`` (bound of the chunked backward's dz buffer),
    ``logits_buffer_bytes`` (bound of the row-chunk logits buffer).
    """
    unknown = set(configs) - set(DEFAULTS) - set(_SETTINGS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: {sorted(DEFAULTS)} and {list(_SETTINGS)}")
    if "backward" in configs and configs["backward"] not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {configs['backward']!r}")
    for name in ("grad_buffer_bytes", "logits_buffer_bytes"):
        if name in configs and not configs[name] > 0:
            raise ValueError(f"{name} must be positive, got {configs[name]!r}")
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


def backward_design() -> str:
    """The linear head's backward design asked for now: ``override(backward=...)``, else the env
    ``FUSED_ENTROPY_BACKWARD``, else "chunked". Read at every call, so one process can A/B both.
    (The launcher still takes "chunked" under torch's deterministic mode.)"""
    design = _OVERRIDES.get("backward") or os.environ.get("FUSED_ENTROPY_BACKWARD", "").strip().lower() or "chunked"
    if design not in BACKWARDS:
        raise ValueError(f"FUSED_ENTROPY_BACKWARD must be one of {BACKWARDS}, got {design!r}")
    return design


def _buffer_bytes(key: str, env_name: str, default: int) -> int:
    over = _OVERRIDES.get(key)
    if over is not None:
        return int(over)
    env = os.environ.get(env_name, "").strip()
    if env:
        try:
            mb = float(env)
        except ValueError:
            mb = 0.0
        if not mb > 0:
            raise ValueError(f"{env_name} must be a positive number of MiB, got {env!r}")
        return int(mb * 2**20)
    return default


def grad_buffer_bytes() -> int:
    """Bound in bytes of the chunked backward's dz buffer: ``override(grad_buffer_bytes=...)``, else the
    env ``FUSED_ENTROPY_GRAD_BUFFER_MB`` (MiB, may be fractional), else ``GRAD_BUFFER_BYTES``."""
    return _buffer_bytes("grad_buffer_bytes", "FUSED_ENTROPY_GRAD_BUFFER_MB", GRAD_BUFFER_BYTES)


def logits_buffer_bytes() -> int:
    """Bound in bytes of the row-chunk logits buffer (clamped-entropy forward, single pass):
    ``override(logits_buffer_bytes=...)``, else the env ``FUSED_ENTROPY_LOGITS_BUFFER_MB`` (MiB, may
    be fractional), else ``LOGITS_BUFFER_BYTES`` (1 GiB). One GEMM row block of rows is used even
    when it is larger (at V = 128k, 128 fp32 rows are 64 MiB)."""
    return _buffer_bytes("logits_buffer_bytes", "FUSED_ENTROPY_LOGITS_BUFFER_MB", LOGITS_BUFFER_BYTES)


def autotune_enabled() -> bool:
    return os.environ.get("FUSED_ENTROPY_AUTOTUNE", "0") not in ("", "0")


def autotune_candidates(kernel: str, dtype: str):
    """(num_warps, num_stages) pairs tried when autotuning. GEMM kernels vary only the pipeline
    depth: block sizes and warps fix the arithmetic of a logit tile, which forward and backward
    must share. Streaming kernels compute z elementwise and may vary their warps."""
    base = get(kernel, dtype)
    if base.block_h:
        return [(base.num_warps, s) for s in sorted({2, 3, 4, 5, base.num_stages})]
    return sorted({(4, 1), (8, 1), (16, 1), (base.num_warps, base.num_stages)})


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
_ALIGNED_INTS = ("H", "stride_x", "stride_w", "stride_l", "stride_dl", "stride_dz", "stride_z", "v_lo")


def _attrs(signature: dict) -> dict:
    return {
        (i,): [["tt.divisibility", 16]]
        for i, (arg, ty) in enumerate(signature.items())
        if ty.startswith("*") or arg in _ALIGNED_INTS
    }


def _scal_ty(dt: str) -> str:
    """Type of the kernels' ``scal_ptr``: fp64 launches pass their transform scalars at full precision
    through it (``_online.scalar_arg``); the others pass None, a constexpr, and compile exactly as
    with the fp32 scalar arguments alone."""
    return "*fp64" if dt == "fp64" else "constexpr"


def _scal_const(sig, const):
    return dict(const, scal_ptr=None) if sig.get("scal_ptr") == "constexpr" else const


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
        scal = _scal_ty(dt)
        for flags in (True, False):
            # --- linear_stats ------------------------------------------------------------
            c = get("linear_stats", dt)
            key_bits = 64 if dt == "fp64" else 32
            sig = {
                "x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr if flags else "constexpr", "y_ptr": "*i64",
                "part_ptr": pacc, "hist_ptr": "*i32" if flags else "constexpr", "z_ptr": pacc if flags else "constexpr",
                "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "stride_z": "i32",
                "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32", "scal_ptr": scal, "tiles_per_split": "i32",
            }
            const = {
                "HAS_BIAS": flags, "HAS_SOFTCAP": flags, "TOPK": flags, "STORE_Z": flags,
                "RADIX_SHIFT": key_bits - RADIX_DIGITS[key_bits][0], "RADIX_BITS": RADIX_DIGITS[key_bits][0],
                "NBINS": RADIX_NBINS, "BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h,
                "UPCAST": False, "DOT_PRECISION": _dot_precision(dt),
            }
            if not flags:
                const.update(b_ptr=None, hist_ptr=None, z_ptr=None)
            out.append(("linear_stats", linear_stats.linear_stats_kernel.fn, sig, const, c.num_warps, c.num_stages))
            # --- linear_grad -------------------------------------------------------------
            c = get("linear_grad", dt)
            opt = pacc if flags else "constexpr"
            sig = {
                "x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr if flags else "constexpr", "y_ptr": "*i64",
                "m_ptr": pacc, "log_s_ptr": pacc, "ent_ptr": opt, "tau_ptr": opt, "frac_ptr": opt, "log_s_c_ptr": opt,
                "ent_c_ptr": opt,
                "g_lp_ptr": pacc, "g_ent_ptr": opt, "g_cl_ptr": opt,
                "dx_ptr": pacc, "dw_ptr": pacc, "db_ptr": opt,
                "N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32", "inv_temperature": "fp32", "scal_ptr": scal,
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
            # --- linear_dz (chunked backward; the linear_grad config) ---------------------
            sig = {
                "x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr if flags else "constexpr", "y_ptr": "*i64",
                "m_ptr": pacc, "log_s_ptr": pacc, "ent_ptr": opt, "tau_ptr": opt, "frac_ptr": opt, "log_s_c_ptr": opt,
                "ent_c_ptr": opt,
                "g_lp_ptr": pacc, "g_ent_ptr": opt, "g_cl_ptr": opt,
                "dz_ptr": ptr, "db_ptr": opt,
                "N": "i32", "V": "i32", "H": "i32", "v_lo": "i32", "stride_x": "i32", "stride_w": "i32",
                "stride_dz": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32", "inv_temperature": "fp32", "scal_ptr": scal,
            }
            const = {
                "HAS_BIAS": flags, "HAS_SOFTCAP": flags, "HAS_G_LP": True, "HAS_G_ENT": flags, "HAS_G_CL": flags,
                "STORE_DZ": True, "COMPUTE_DB": flags,
                "BLOCK_N": c.block_n, "BLOCK_V": c.block_v, "BLOCK_H": c.block_h,
                "UPCAST": False, "DOT_PRECISION": _dot_precision(dt),
            }
            if not flags:
                const.update({k: None for k, v in sig.items() if v == "constexpr"})
            out.append(("linear_dz", linear_grad.linear_dz_kernel.fn, sig, const, c.num_warps, c.num_stages))
            # --- logits_stats ------------------------------------------------------------
            c = get("logits_stats", dt)
            sig = {
                "l_ptr": ptr, "y_ptr": "*i64", "part_ptr": pacc, "hist_ptr": "*i32" if flags else "constexpr",
                "N": "i32", "V": "i32", "stride_l": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "inv_temperature": "fp32", "scal_ptr": scal, "tiles_per_split": "i32",
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
                "l_ptr": ptr, "y_ptr": "*i64", "m_ptr": pacc, "log_s_ptr": pacc, "ent_ptr": opt, "tau_ptr": opt,
                "frac_ptr": opt, "log_s_c_ptr": opt, "ent_c_ptr": opt, "g_lp_ptr": pacc, "g_ent_ptr": opt, "g_cl_ptr": opt, "dl_ptr": ptr,
                "N": "i32", "V": "i32", "stride_l": "i32", "stride_dl": "i32", "ignore_index": "i32",
                "logit_scale": "fp32", "softcap": "fp32", "temperature": "fp32", "inv_temperature": "fp32", "scal_ptr": scal,
            }
            const = {
                "HAS_SOFTCAP": flags, "HAS_G_LP": True, "HAS_G_ENT": flags, "HAS_G_CL": flags,
                "Z_IN": flags, "BLOCK_N": c.block_n, "BLOCK_V": c.block_v,
            }
            if flags:
                # the single pass: dz from the fused head's fp32 logits buffer, in the input dtype
                sig.update(l_ptr=pacc)
            if not flags:
                const.update({k: None for k, v in sig.items() if v == "constexpr"})
            out.append(("logits_grad", logits_stats.logits_grad_kernel.fn, sig, const, c.num_warps, c.num_stages))
        # --- finish_stats (flags: entropy or not) ------------------------------------------
        c = get("finish_stats", dt)
        for flags in (True, False):
            opt = pacc if flags else "constexpr"
            sig = {"part_ptr": pacc, "y_ptr": "*i64", "m_ptr": pacc, "log_s_ptr": pacc, "logp_ptr": pacc,
                   "ent_ptr": opt, "N": "i32", "n_split": "i32", "ignore_index": "i32"}
            const = {"ENTROPY": flags, "BLOCK": c.block_n}
            if not flags:
                const.update(ent_ptr=None)
            out.append(("finish_stats", _online.finish_stats_kernel.fn, sig, const, c.num_warps, c.num_stages))
        out.extend(topk.aot_specs(dt, get))

    return [AotSpec(name, fn, sig, _scal_const(sig, const), _attrs(sig), nw, ns) for name, fn, sig, const, nw, ns in out]
