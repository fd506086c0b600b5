"""Block sizes, warps and stages of every kernel: frozen defaults, test overrides, autotuning.

Frozen defaults were chosen for H100 (sm_90) on paper and checked by compiling every shipped build
(``python -m fused_entropy.tools.aot``) for sm_90 and sm_80 (``triton.compile`` + ``cuobjdump -res-usage``): no spills
(no local memory), and the 16-bit GEMM tiles lower to wgmma (HGMMA) on sm_90.

- GEMM kernels (linear_stats, linear_radix, linear_grad), 16-bit inputs: 128 x 64 output tiles,
  8 warps (two warpgroups of wgmma m64n64k16 on sm_90, mma.sync m16n8k16 on sm_80),
  BLOCK_H = 32, 5 stages forward / 4 backward (12 KiB of operands per stage, <= 80 KiB of shared
  memory). Larger tiles were tried (docs/PERFORMANCE.md, "Tiles"): 128 x 256 x 64 spills in every
  16-bit build, 128 x 128 x 64 in the clamped-entropy backward and radix passes (z, dz and the
  softmax terms live at once when every gradient is on).
  fp32 inputs ("ieee" products run on FMA units, operands in registers): 64 x 32 x 16, 4 warps,
  3 stages.
  fp64 (DMMA): 32 x 32 x 16, 4 warps.
  Forward, radix passes and backward share BLOCK_N/V/H and num_warps so the backward's
  recomputed logits are bitwise the forward's (the top-k tie test z == tau needs that).
- Logits kernels stream memory: 16 x 256 tiles (4 x 256 for fp64), 8 warps.

The gate (``fused-entropy aot``) is run with two Triton releases, the newest and the lent H200's
(3.6.0): register allocation differs between them (the plain bf16 forward takes 127 registers on
sm_90 with 3.9 and 192 with 3.6, 2 programs per SM against 1), and a default must not spill with either.

The linear head's backward (``linear_grad.py``) forms dz per vocabulary chunk, no atomics; its dz
buffer is bounded by ``grad_buffer_bytes()``: ``GRAD_BUFFER_BYTES`` (256 MiB),
``FUSED_ENTROPY_GRAD_BUFFER_MB`` or ``override(grad_buffer_bytes=...)``.

Row-chunk logits buffer (``logits_buffer_bytes()``): the clamped-entropy forward and the Triton single
pass of ``LinearGRPOLoss`` keep one chunk of rows' logits ``[Nc, V]`` (fp32; plus dz in the input
dtype for the single pass) in memory: ``LOGITS_BUFFER_BYTES`` (1 GiB),
``FUSED_ENTROPY_LOGITS_BUFFER_MB`` or ``override(logits_buffer_bytes=...)``; ``Nc`` is a multiple of
the GEMM's BLOCK_N, at least one row block.

``FUSED_ENTROPY_AUTOTUNE=1`` lets the launcher tune the pipeline depth of the GEMM kernels and the
warps of the streaming kernels (never block sizes or GEMM warps, for the reason above), once per
key (kernel, dtype, H, V, N rounded up to a power of two, which outputs are formed).

This module imports neither triton nor torch.
"""
import contextlib
import os
import warnings
from dataclasses import dataclass, replace


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
    # 64 x 32: at 64 x 64 the ragged every-gradient backward spills on sm_90 with Triton 3.6 (the GPU
    # machine's), 8 B at 3 stages and 16 B at 2 (bench/results/aot/2026-11-30-triton-releases.md);
    # 3 stages: with 4, the top-k + logits-buffer build spills 8 B on sm_90 with Triton 3.9
    "fp32": Config(64, 32, 16, num_warps=4, num_stages=3),
    "fp64": Config(32, 32, 16, num_warps=4, num_stages=2),
}
# the backward holds more live tiles; fewer stages leave it more shared memory and registers
_GEMM_GRAD = {
    "bf16": replace(_GEMM["bf16"], num_stages=4),
    "fp16": replace(_GEMM["fp16"], num_stages=4),
    "fp32": _GEMM["fp32"],  # already 3 stages
    "fp64": _GEMM["fp64"],
}
# fp64 4 rows: at 8 the one-row build of the last radix pass spills 8 B on sm_90 with Triton 3.6
_STREAM = {d: Config(4 if d == "fp64" else 16, 256, num_warps=8, num_stages=1) for d in DTYPES}

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

# Launch order and split (``_grid.py``, ``_launch_plan._split``). The forward and radix passes split
# the vocabulary so that the grid fills whole waves of the programs that fit on the GPU at once: the
# programs per SM come from the compiled kernel (``programs_per_sm`` of its registers, shared memory
# and warps) on CUDA; this many where no compiled kernel can be asked (the interpreter), or when
# asking failed (``_launch_plan.occupancy_report`` says which).
PROGRAMS_PER_SM = 2
# A group of row blocks (``_grid.py``) may keep this share of the L2 cache busy with its rows of x;
# L2_BYTES is assumed where the device does not say (the interpreter): an H100's/H200's 50 MiB.
L2_SHARE = 0.5
L2_BYTES = 50 * 2**20

# upper bound of the backward's dz buffer [N, Vc] in bytes (at least one tile is used)
GRAD_BUFFER_BYTES = 256 * 2**20
# upper bound of the row-chunk logits buffer [Nc, V] (fp32 z, plus dz in the input dtype for the
# single pass) in bytes; at least one GEMM row block is used
LOGITS_BUFFER_BYTES = 2**30

if os.environ.get("FUSED_ENTROPY_BACKWARD", "").strip():
    warnings.warn("FUSED_ENTROPY_BACKWARD is no longer read: the fp32-atomic backward was removed (measured "
                  "slower and not reproducible); the backward is the chunked one, always", RuntimeWarning,
                  stacklevel=2)

_OVERRIDES: dict = {}
# override() keys that are not kernel configs
_SETTINGS = ("split", "group_rows", "grad_buffer_bytes", "logits_buffer_bytes")


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

    Settings beside configs: ``split`` (vocabulary splits of the forward), ``group_rows`` (row blocks
    per group of the GEMM kernels' launch order, ``kernels/_grid.py``), ``grad_buffer_bytes`` (bound
    of the backward's dz buffer),
    ``logits_buffer_bytes`` (bound of the row-chunk logits buffer).
    """
    unknown = set(configs) - set(DEFAULTS) - set(_SETTINGS)
    if "backward" in unknown:
        raise ValueError("override(backward=...) was removed with the fp32-atomic backward (measured slower and "
                         "not reproducible); the backward is the chunked one, always")
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; known: {sorted(DEFAULTS)} and {list(_SETTINGS)}")
    for name in ("split", "group_rows"):
        value = configs.get(name, 1)
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("grad_buffer_bytes", "logits_buffer_bytes"):
        value = configs.get(name, 1)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
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


def forced_group_rows():
    """Row blocks per launch-order group forced by ``override(group_rows=...)`` (tests), or None."""
    return _OVERRIDES.get("group_rows")


def programs_per_sm(regs: int, shared_bytes: int, num_warps: int, *, regs_per_sm: int = 65536,
                    shared_per_sm: int = 228 * 1024, threads_per_sm: int = 2048, max_blocks: int = 32,
                    reserved_shared: int = 1024) -> int:
    """Programs (thread blocks) of a compiled kernel that fit on one SM at once, as the CUDA occupancy
    calculator counts them: the fewest allowed by threads, registers (allocated per warp in units of
    256, i.e. ``regs`` rounded up to a multiple of 8 per thread) and shared memory (the kernel's plus
    ``reserved_shared`` per block that the CUDA runtime keeps, 1 KiB since sm_80). The defaults are an
    sm_90 SM (H100/H200); sm_80 has ``shared_per_sm = 164 KiB``. 0 when one block does not fit."""
    threads = 32 * num_warps
    by_threads = threads_per_sm // threads
    by_regs = regs_per_sm // (8 * -(-max(regs, 1) // 8) * threads)
    by_shared = shared_per_sm // (shared_bytes + reserved_shared)
    return max(0, min(by_threads, by_regs, by_shared, max_blocks))


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
    """Bound in bytes of the backward's dz buffer: ``override(grad_buffer_bytes=...)``, else the
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
