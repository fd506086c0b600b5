"""What the launchers (``_launch.py``) decide before a launch: dtype keys, the precision of the
products, the fp64 scalar tensor, the vocabulary split, tuning, and the sizes of the row-chunk
logits buffer, the radix histogram and the backward's dz chunks; plus the cuBLAS helpers of the
backward. No kernel is launched here (tests replace the kernels in ``_launch``'s namespace).

Precision choices:
- bf16/fp16 GEMM operands stay 16-bit on the GPU (tensor cores), accumulation fp32. Under the
  interpreter bf16 ``tl.dot`` is wrong, so bf16 operands are upcast there (``UPCAST``); they are
  exactly representable in fp32, so the products are the same.
- fp32 inputs: ``input_precision="ieee"`` (exact fp32 products, like the torch backend) unless the
  caller opted into TF32 with ``torch.backends.cuda.matmul.allow_tf32 = True``, then "tf32".
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import triton

from ._common import compute_dtype, interpreting
from ._types import LogitTransform, RowStats
from .kernels import configs


_DTYPE_KEY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_key(dtype: torch.dtype) -> str:
    return _DTYPE_KEY[dtype]


acc_dtype = compute_dtype  # the row statistics' and accumulators' dtype


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=64)
def _fp64_scalars_on(logit_scale: float, softcap: float, temperature: float, device: torch.device) -> torch.Tensor:
    # cached per value and device: one small host-to-device copy per new value, not per launch
    return torch.tensor([logit_scale, softcap, temperature, 1.0 / temperature], dtype=torch.float64, device=device)


def _fp64_scalars(tf: LogitTransform, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """The kernels' ``scal_ptr``: for fp64 inputs the transform's scalars as an fp64 tensor
    [logit_scale, softcap, temperature, inv_temperature], read in place of the scalar arguments,
    which Triton types fp32 and so rounds on a GPU (``kernels/_online.scalar_arg``); None for every
    other dtype, a constexpr, so those builds are unchanged. Never mutated (it may be shared)."""
    if dtype != torch.float64:
        return None
    return _fp64_scalars_on(float(tf.logit_scale), float(tf.softcap or 0.0), float(tf.temperature), torch.device(device))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs are enough to exercise the split path


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting()


@functools.lru_cache(maxsize=16)
def _sm_limits(device: torch.device) -> dict:
    """Per-SM limits of a CUDA device for ``configs.programs_per_sm`` (torch's device properties; the
    sm_80/sm_90 figures where this torch does not report one)."""
    props = torch.cuda.get_device_properties(device)
    shared = 228 * 1024 if props.major >= 9 else 164 * 1024
    return dict(
        regs_per_sm=int(getattr(props, "regs_per_multiprocessor", 65536)),
        shared_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", shared)),
        threads_per_sm=int(getattr(props, "max_threads_per_multi_processor", 2048)),
    )


def _l2_bytes(device: torch.device) -> int:
    if _on_gpu(device):
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        if size > 0:
            return size
    return configs.L2_BYTES


def group_rows(n_row_blocks: int, panel_bytes: int, device: torch.device) -> int:
    """Row blocks per group of the GEMM kernels' launch order (``kernels/_grid.py``): as many as keep
    their rows of x (``panel_bytes`` each: BLOCK_N x H x itemsize) within ``configs.L2_SHARE`` of the
    L2 cache, at least 1, at most ``n_row_blocks`` (one group: the plain order); of those, the largest
    that divides ``n_row_blocks`` if one is at least half the most, so that one launch covers the
    batch. At H = 4096 in bf16 a panel is 1 MiB: at most 25 row blocks per group on a 50 MiB L2, and 16
    for 64 row blocks. ``override(group_rows=...)`` forces it."""
    least = triton.cdiv(max(n_row_blocks, 1), MAX_GROUPS)  # the groups are grid z
    forced = configs.forced_group_rows()
    if forced is not None:
        return max(least, min(forced, n_row_blocks))
    most = max(1, min(n_row_blocks, int(configs.L2_SHARE * _l2_bytes(device)) // max(1, panel_bytes)))
    most = max(most, least)
    # a group size that divides the row blocks needs no second launch (grouped_launches)
    for g in range(most, max((most + 1) // 2, least) - 1, -1):
        if n_row_blocks % g == 0:
            return g
    return most


MAX_GROUPS = 65535  # CUDA's limit on grid z


def grouped_launches(n_row_blocks: int, group: int):
    """The launches that cover ``n_row_blocks`` row blocks in groups of ``group`` (``kernels/_grid.py``):
    ``(group, full groups, 0)`` and, when ``group`` does not divide them, ``(rest, 1, first row block
    of the rest)``; each is ``(grid x, grid z, block0)``."""
    full, rest = divmod(n_row_blocks, group)
    launches = [(group, full, 0)] if full else []
    if rest:
        launches.append((rest, 1, full * group))
    return launches


_OCCUPANCY: dict = {}
_OCCUPANCY_WARNED: set = set()


def programs_per_sm(key, device: torch.device, compile_kernel) -> int:
    """Programs of one kernel build that fit on an SM at once. On CUDA from the compiled kernel:
    ``compile_kernel()`` returns Triton's ``CompiledKernel`` for the build (``JITFunction.warmup``:
    compiled, or taken from Triton's cache, and not launched, from stand-in arguments of fixed shapes
    so that the answer does not depend on which call asked first); its registers, shared memory and
    warps go through ``configs.programs_per_sm`` with the device's limits. Cached per ``key`` (the
    build: kernel, dtype, config, flags) and device; a failure of the API (AttributeError, TypeError)
    is cached too, any other is asked again at the next call. Elsewhere (the interpreter), or when the compiled
    kernel cannot be asked (Triton before 3.6, whose ``triton.heuristics`` wrapper has no ``warmup``,
    or a ``CompiledKernel`` without these fields), the assumed
    ``configs.PROGRAMS_PER_SM``, with a warning on CUDA. ``occupancy_report()`` lists the answers."""
    if not _on_gpu(device):
        return configs.PROGRAMS_PER_SM
    cache_key = (key, device.index)
    hit = _OCCUPANCY.get(cache_key)
    if hit is None:
        try:
            compiled = compile_kernel()
            compiled._init_handles()  # loads the module: fills n_regs (Triton reads it from the driver)
            meta = compiled.metadata
            occ = configs.programs_per_sm(int(compiled.n_regs), int(meta.shared), int(meta.num_warps),
                                          **_sm_limits(device))
            hit = (max(1, occ), f"compiled: {compiled.n_regs} registers, {meta.shared} B shared, "
                                f"{meta.num_warps} warps")
        except Exception as e:  # noqa: BLE001 (any failure to ask falls back, and says so)
            hit = (configs.PROGRAMS_PER_SM, f"assumed: {type(e).__name__}: {e}")
            if key[0] not in _OCCUPANCY_WARNED:
                _OCCUPANCY_WARNED.add(key[0])
                warnings.warn(f"fused_entropy: could not read the occupancy of the compiled {key[0]} "
                              f"({type(e).__name__}: {e}); splitting the vocabulary for "
                              f"{configs.PROGRAMS_PER_SM} programs per SM", RuntimeWarning, stacklevel=3)
            if not isinstance(e, (AttributeError, TypeError)):
                # possibly transient (out of memory while compiling): ask again next time
                return hit[0]
        _OCCUPANCY[cache_key] = hit
    return hit[0]


def occupancy_report() -> list:
    """(build key, device index, programs per SM, where the number came from) for every build asked
    so far in this process (``gpucheck`` prints it)."""
    return [(k, dev, occ, src) for (k, dev), (occ, src) in _OCCUPANCY.items()]


def _split(n_row_blocks: int, n_vtiles: int, device: torch.device, programs_per_sm: Optional[int] = None,
           group: Optional[int] = None):
    """(SPLIT, tiles_per_split) of a forward or radix pass over ``n_row_blocks`` x ``n_vtiles`` tiles:
    ``whole_waves`` for ``programs_per_sm`` (``configs.PROGRAMS_PER_SM`` if None) times the SMs, with
    launch-order groups of ``group`` row blocks (None: no groups); ``override(split=...)`` forces it."""
    forced = configs.forced_split()
    if forced is not None:
        per = triton.cdiv(n_vtiles, max(1, min(forced, n_vtiles)))
        return triton.cdiv(n_vtiles, per), per
    slots = (programs_per_sm or configs.PROGRAMS_PER_SM) * _num_sms(device)
    return whole_waves(n_row_blocks, n_vtiles, slots, group or n_row_blocks)


@functools.lru_cache(maxsize=4096)
def whole_waves(n_row_blocks: int, n_vtiles: int, slots: int, group: int):
    """(SPLIT, tiles_per_split): the vocabulary split that fills whole waves of ``slots`` programs.

    Each of the ``n_row_blocks * SPLIT`` programs folds ``tiles_per_split`` tiles (the last split of
    a row may fold fewer). The run takes about ``waves * tiles_per_split`` tile-times with
    ``waves = cdiv(n_row_blocks * SPLIT, slots)`` (summed over the ``grouped_launches``, which run one
    after the other), so the share of the GPU doing work is

        efficiency = n_row_blocks * n_vtiles / (waves * tiles_per_split * slots)

    and the split is the smallest with an efficiency within 1% of the best of those searched (up to
    ``max(4 lo, 4 cdiv(slots, n_row_blocks), 64)``, ``lo`` the least allowed). With launch-order groups
    smaller than the batch (``group < n_row_blocks``), SPLIT is at least ``cdiv(slots, group)``, so
    that the programs running at once span at most about one group of row blocks (the x that L2
    holds; ``kernels/_grid.py``). Examples (132 SMs): 64 row blocks, 2048 tiles, 264 slots, groups of
    16: SPLIT = 33 (8 whole waves, 98.5%); with 132 slots (1 program per SM) also 33 (16 waves).
    """
    if n_row_blocks <= 0:  # no rows: nothing is launched
        return 1, n_vtiles
    launches = grouped_launches(n_row_blocks, min(group, n_row_blocks))
    lo = 1 if group >= n_row_blocks else min(n_vtiles, triton.cdiv(slots, group))
    hi = min(n_vtiles, max(4 * lo, 4 * triton.cdiv(slots, n_row_blocks), 64))  # splits searched
    work = n_row_blocks * n_vtiles
    scored = []
    for split in range(lo, n_vtiles + 1):
        if split > hi and scored:
            break
        per = triton.cdiv(n_vtiles, split)
        real = triton.cdiv(n_vtiles, per)  # splits of `per` tiles that cover the vocabulary
        if real < lo:
            continue
        # the launches run one after the other: each fills its own waves
        waves = sum(triton.cdiv(rows * groups * real, slots) for rows, groups, _ in launches)
        scored.append((work / (waves * per * slots), real, per))
    best = max(e for e, _, _ in scored)
    split, per = min((r, p) for e, r, p in scored if e >= best - 0.01)
    return split, per


_TUNED: dict = {}


def _run(name: str, dt: str, shape_key, cfg: configs.Config, launch, reset=None):
    """Launch with the frozen (num_warps, num_stages), or with the tuned pair when
    FUSED_ENTROPY_AUTOTUNE=1 on CUDA (tuned once per bucketed key; ``reset`` undoes a trial's
    side effects on accumulating outputs before the real launch)."""
    if not (configs.autotune_enabled() and not interpreting() and torch.cuda.is_available()):
        launch(cfg.num_warps, cfg.num_stages)
        return
    key = (name, dt, shape_key)
    best = _TUNED.get(key)
    if best is None:
        from triton.testing import do_bench

        trials = {}
        for w, s in configs.autotune_candidates(name, dt):
            try:
                trials[(w, s)] = do_bench(lambda: launch(w, s), warmup=5, rep=20)
            except Exception:  # a candidate that does not fit (shared memory) is skipped
                continue
        best = min(trials, key=trials.get) if trials else (cfg.num_warps, cfg.num_stages)
        _TUNED[key] = best
        if reset is not None:
            reset()
    launch(*best)


def _new_hist(rows: int, device) -> torch.Tensor:
    """[rows, NBINS] int32 radix histogram; ``rows`` covers the last row block in full because the
    fused first pass counts unmasked tiles (see ``kernels/_radix.radix_count``)."""
    return torch.zeros(rows, configs.RADIX_NBINS, device=device, dtype=torch.int32)


def _radix_first(k: Optional[int], dtype: torch.dtype):
    bits = 64 if dtype == torch.float64 else 32
    first = configs.RADIX_DIGITS[bits][0]
    return bits - first, first


def _n_pad(vocab: int, block_v: int) -> int:
    """Padded columns per row that the fused first radix pass counts (all in the last tile)."""
    return triton.cdiv(vocab, block_v) * block_v - vocab


def radix_gemm_passes(dtype: torch.dtype) -> int:
    """GEMM passes of the linear forward with clamped entropy: 1, as without. The forward pass stores
    each row chunk's logits in the logits buffer and counts the first radix digit; the further
    digits (``radix_buffer_passes``) are read from the buffer. (The vocabulary-parallel select,
    ``linear_topk_select``, still recomputes: one GEMM pass per digit.)"""
    return 1


def radix_buffer_passes(dtype: torch.dtype) -> int:
    """Reads of the logits buffer by the linear forward with clamped entropy: one per radix digit
    after the first (2 for fp16/bf16/fp32, 5 for fp64), besides the one write of every logit."""
    return len(configs.RADIX_DIGITS[64 if dtype == torch.float64 else 32]) - 1


def _z_stride(vocab: int, block_v: int) -> int:
    """Row stride (elements) of the logits buffer: V rounded up to whole GEMM tiles (the forward stores
    whole tiles, unmasked) and to 16, so every row starts aligned."""
    return triton.cdiv(vocab, max(block_v, 16)) * max(block_v, 16)


def logits_buffer_rows(n: int, row_bytes: int, block_n: int) -> int:
    """Rows per chunk of the row-chunk logits buffer: the largest multiple of ``block_n`` (the GEMM
    row block, so a chunk's tiles are the whole-batch tiles: bitwise the same z) whose buffers,
    ``row_bytes`` per row, fit ``configs.logits_buffer_bytes()``; at least one row block, at most
    ``n`` (then one chunk)."""
    blocks = max(1, configs.logits_buffer_bytes() // (max(row_bytes, 1) * block_n))
    return max(1, min(n, blocks * block_n))


def buffer_rows(n: int, vocab: int, dtype: torch.dtype, with_dz: bool = False) -> int:
    """Rows per chunk of the logits buffer for inputs of ``dtype``: z in fp32 (fp64), plus dz in the
    input dtype when ``with_dz`` and that is 16-bit (``_LogitsBuffer``); see ``logits_buffer_rows``."""
    acc = acc_dtype(dtype)
    cfg = configs.get("linear_stats", dtype_key(dtype))
    item = lambda d: torch.empty(0, dtype=d).element_size()  # noqa: E731
    row_bytes = _z_stride(vocab, cfg.block_v) * (item(acc) + (item(dtype) if with_dz and dtype != acc else 0))
    return logits_buffer_rows(n, row_bytes, cfg.block_n)


class _LogitsBuffer:
    """The row-chunk logits buffer of the linear head: ``[Nc, V]`` fp32 (fp64 for fp64) for the logits
    z of one chunk of rows, and, for the single pass on 16-bit inputs, ``[Nc, V]`` in the input dtype
    for dz (fp32/fp64 inputs form dz in place over z). ``Nc`` from ``logits_buffer_rows``: both
    buffers together stay within ``configs.logits_buffer_bytes()`` (1 GiB unless overridden), unless
    ``rows`` is forced. Plus the radix histogram of the chunk (8 KiB a row) with top-k."""

    def __init__(self, x, vocab: int, k: Optional[int], with_dz: bool = False, rows: Optional[int] = None):
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        cfg = configs.get("linear_stats", dtype_key(x.dtype))
        self.ld = _z_stride(vocab, cfg.block_v)
        self.vocab = vocab
        self.rows = max(1, min(n, rows)) if rows else buffer_rows(n, vocab, x.dtype, with_dz)
        # the forward stores whole tiles: the last row block in full, the padded columns too
        alloc = triton.cdiv(self.rows, cfg.block_n) * cfg.block_n
        self.z = torch.empty(alloc, self.ld, device=x.device, dtype=acc)
        self.dz = None
        if with_dz:
            # fp32/fp64 inputs: dz in place over z (logits_grad_kernel reads a tile before writing it)
            in_place = x.dtype == acc
            self.dz = self.z if in_place else torch.empty(self.rows, self.ld, device=x.device, dtype=x.dtype)
        self.hist = None
        if k is not None:
            # the GEMM's first pass counts whole row blocks; the buffer passes count their own blocks
            stream = configs.get("logits_radix", dtype_key(acc)).block_n
            self.hist = _new_hist(max(triton.cdiv(self.rows, b) * b for b in (cfg.block_n, stream)), x.device)

    def chunks(self, n: int):
        for r0 in range(0, n, self.rows):
            yield r0, min(n, r0 + self.rows)


def _new_stats(n: int, device, dtype: torch.dtype, entropy: bool, k: Optional[int]) -> RowStats:
    e = lambda: torch.empty(n, device=device, dtype=dtype)  # noqa: E731
    if k is None:
        return RowStats(e(), e(), e(), e() if entropy else None)
    return RowStats(e(), e(), e(), e() if entropy else None, e(), e(), e(), e())


def _stats_rows(stats: RowStats, r0: int, r1: int) -> RowStats:
    return RowStats(*(None if t is None else t[r0:r1] for t in stats))


def _grad_stats(stats: RowStats, g_ent, g_cl):
    """The row statistics every gradient kernel takes (``tile_grad``), in kernel argument order:
    (m, log s, entropy, tau, tie_frac, log s_S, clamped entropy); a term without an upstream
    gradient passes None for its statistics."""
    ent, cl = g_ent is not None, g_cl is not None
    return (stats.m, stats.log_s, stats.entropy if ent else None, stats.tau if cl else None,
            stats.tie_frac if cl else None, stats.log_s_clamped if cl else None,
            stats.clamped_entropy if cl else None)


def _row(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype).contiguous()


def _no_grads(x, weight, bias, need_x, need_weight, need_bias):
    """The gradients when nothing flows back (N = 0, or no upstream gradient): zeros."""
    return (
        torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else None,
        torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None,
        torch.zeros_like(bias) if (need_bias and bias is not None) else None,
    )


def grad_chunk(n: int, vocab: int, itemsize: int, block_v: int) -> int:
    """Vocabulary columns per chunk of the chunked backward: the largest multiple of ``block_v``
    whose dz buffer ``[n, Vc]`` of ``itemsize``-byte elements fits ``configs.grad_buffer_bytes()``,
    at least one tile; ``vocab`` itself when that covers the whole vocabulary (one chunk)."""
    tiles = max(1, configs.grad_buffer_bytes() // (max(n, 1) * itemsize * block_v))
    return vocab if tiles * block_v >= vocab else tiles * block_v


_HALF = (torch.bfloat16, torch.float16)


def _mm_into(out, a, b):
    """out = a @ b with fp32 accumulation, rounded once to out's dtype. cuBLAS accumulates 16-bit
    products in fp32; off CUDA (interpreter tests, meta tensors) 16-bit operands are upcast."""
    if a.dtype in _HALF and a.device.type != "cuda":
        out.copy_(torch.mm(a.float(), b.float()))
    else:
        torch.mm(a, b, out=out)


_ADDMM_OUT_DTYPE: dict = {}


def _addmm_out_dtype(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` works for 16-bit a, b on this
    device (aten::addmm.dtype_out: recent torch, CUDA only). Probed once per device, result checked."""
    ok = _ADDMM_OUT_DTYPE.get(device)
    if ok is None:
        try:
            a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
            acc = torch.ones(16, 16, device=device, dtype=torch.float32)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            ok = bool((acc == 17).all())
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _ADDMM_OUT_DTYPE[device] = ok
    return ok


def _addmm_acc(acc, a, b):
    """acc += a @ b, acc fp32 (fp64 for fp64 operands). 16-bit operands on CUDA: cuBLAS with an fp32
    output when torch has that overload, else a 16-bit product added in fp32 (one extra rounding
    per chunk); elsewhere upcast."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda":
        if _addmm_out_dtype(a.device):
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:
            acc += torch.mm(a, b)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
