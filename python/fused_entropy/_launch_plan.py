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


def _split(n_row_blocks: int, n_vtiles: int, device: torch.device):
    """(SPLIT, tiles_per_split): split the vocabulary when the row blocks alone cannot fill the GPU."""
    forced = configs.forced_split()
    if forced is not None:
        split = max(1, min(forced, n_vtiles))
    else:
        target = configs.PROGRAMS_PER_SM * _num_sms(device)
        split = 1 if n_row_blocks >= target else max(1, min(n_vtiles, triton.cdiv(target, n_row_blocks)))
    per = triton.cdiv(n_vtiles, split)
    return triton.cdiv(n_vtiles, per), per


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
