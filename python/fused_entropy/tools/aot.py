"""Ahead-of-time compile gate for the Triton kernels (sm_80, sm_90) without a GPU, and their roofline.

    python -m fused_entropy.tools.aot                      # the gate: compile, inspect, exit 1 on a failure
    python -m fused_entropy.tools.aot --level quick        # one build per kernel (smoke test of the machinery)
    python -m fused_entropy.tools.aot --list               # the builds the gate would compile, and coverage
    python -m fused_entropy.tools.aot --roofline           # FLOPs, HBM bytes and H100 lower bounds, on paper

The interpreter proves the math, not that a kernel compiles for a GPU, fits its registers and shared
memory, or reaches the tensor cores. This module checks those on a CPU-only machine:

1. **Which builds.** The launchers (``_launch.py`` through the backend interface, and
   ``_launch_objective.py``) are run on ``meta`` tensors, so nothing is allocated or computed, over
   every option that changes a kernel's specialization: input dtype (bf16, fp16, fp32 with "ieee" and
   with TF32 products, fp64), bias, softcap, entropy, top-k, every set of upstream gradients; for the
   GRPO objective every loss family, token and sequence level, every optional input, every block size
   (sequence lengths 16 ... 1024). Each launch is intercepted before it would run and bound exactly as
   Triton's JIT binds it on a GPU (``create_function_from_signature`` + ``JITFunction._pack_args``),
   giving the ``(signature, constexprs, attributes, num_warps, num_stages)`` the GPU would compile.
   Three problem shapes: "aligned" (every size a multiple of 16, the usual LLM case, where the JIT
   marks sizes and strides divisible by 16), "ragged" (N and V odd, the vocabulary split across
   programs) and "single" (one row, k = 1: the JIT turns integer arguments equal to 1 into
   constexprs, a specialization the interpreter never sees). The interpreter's bf16 upcast is off
   (the launcher turns it on only when interpreting).
2. **Coverage.** Every ``@triton.jit`` entry point of ``fused_entropy.kernels`` (a jit function that
   returns nothing and that no other jit function calls) must be launched by at least one scenario;
   a kernel without AOT coverage fails the gate.
3. **Compile and inspect.** ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   per build and architecture, then the ``cuobjdump`` bundled with Triton:
   ``-res-usage`` (REG, STACK, SHARED, LOCAL) and ``-sass`` (HGMMA = wgmma, HMMA/DMMA = mma.sync,
   STL/LDL = local-memory spill traffic).

A build fails the gate when

- it spills: STACK > 0 or LOCAL > 0. ptxas puts spilled registers in the per-thread *stack frame*;
  ``LOCAL`` only counts declared local arrays and reads 0 while a kernel spills hundreds of bytes;
- its shared memory (Triton's dynamic allocation + the cubin's static SHARED) exceeds the per-block
  limit: sm_80 163 KiB, sm_90 227 KiB;
- its registers x threads exceed the 64 K register file (the launch would fail);
- it has a ``tt.dot`` whose operands can use tensor cores (16-bit, TF32, fp64) and its SASS has no
  tensor-core instruction (HGMMA/HMMA/DMMA). fp32 "ieee" products run on FMA units by design and are
  exempt. On sm_90 a 16-bit GEMM that lowers to HMMA instead of HGMMA is reported as a warning;
- it does not compile.

Levels (``select_builds``): ``gate`` (default, what CI runs) compiles every kernel configuration
(dtype, block sizes, warps, stages) with the most optional terms switched on, the heaviest build per
kernel and dtype on the ragged shape, the lightest build per kernel, and then enough further builds
that every constexpr value the launchers produce (each flag on, each mode, radix digit, loss family,
dot precision, value-1 specialization) is compiled at least once: register use grows with the terms
switched on, so the heaviest build of a configuration bounds the lighter ones. ``full`` compiles every
build the scenarios produce (some 2,400 today, twenty times the gate); ``quick`` one build per
kernel. Compiles are cached by Triton (``TRITON_CACHE_DIR``); a cold cache is what CI pays.

A new launcher entry point or option needs a line in the scenarios (``_head_scenarios``,
``_objective_scenarios``): the coverage check catches a kernel that is never launched, not a new
specialization of a kernel that is.
"""
from __future__ import annotations

import argparse
import ast
import csv
import importlib
import inspect
import itertools
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

KERNEL_PACKAGE = "fused_entropy.kernels"


@dataclass(frozen=True)
class Arch:
    name: str
    smem_per_block: int  # bytes a block may opt into
    smem_per_sm: int
    max_threads_per_sm: int = 2048
    registers: int = 65536  # 32-bit registers per SM; also the most one block may use


# Per-block opt-in shared memory and per-SM limits: CUDA C Programming Guide, "Technical Specifications
# per Compute Capability". Blackwell (sm_100) is left out: its tensor cores are not wgmma/mma.sync.
ARCHS = {
    80: Arch("sm_80 (A100)", smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
    86: Arch("sm_86 (RTX 30, A10)", smem_per_block=99 * 1024, smem_per_sm=100 * 1024, max_threads_per_sm=1536),
    89: Arch("sm_89 (L4, L40, RTX 40)", smem_per_block=99 * 1024, smem_per_sm=100 * 1024, max_threads_per_sm=1536),
    90: Arch("sm_90 (H100, H200)", smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
}

# Bool constexprs that pick one of a kernel's code paths (a mode or a phase) rather than switch an
# optional term on: every value of these is compiled at the gate level.
MODE_FLAGS = ("SEQUENCE", "FIRST", "LAST")

TENSOR_CORE_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _require_compiler():
    if _interpreting():
        raise RuntimeError("the AOT gate compiles kernels: run it without TRITON_INTERPRET "
                           "(main() re-runs itself without it)")


# ---------------------------------------------------------------------------------------------
# discovery: every jit entry point of fused_entropy.kernels
# ---------------------------------------------------------------------------------------------


def _jit_function(obj):
    """The JITFunction behind ``obj`` (``triton.heuristics``/``autotune`` wrap it in ``.fn``), or None."""
    from triton.runtime.jit import JITFunction

    for _ in range(8):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def kernel_id(fn) -> str:
    """``module.function``, e.g. ``linear_stats.linear_stats_kernel``."""
    return f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"


def jit_functions(package: str = KERNEL_PACKAGE) -> Dict[str, object]:
    """Every @triton.jit function defined in a module of ``package``, by ``kernel_id``."""
    _require_compiler()
    pkg = importlib.import_module(package)
    found = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{package}.{info.name}")
        for value in vars(mod).values():
            fn = _jit_function(value)
            if fn is not None and fn.fn.__module__ == mod.__name__:
                found[kernel_id(fn)] = fn
    return found


def _resolve(node, scope):
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        return getattr(base, node.attr, None) if base is not None else None
    return None


def entry_points(fns: Dict[str, object]) -> Dict[str, object]:
    """The kernels among ``fns``: jit functions that return no value and that no jit function calls."""
    called, returns = set(), set()
    for name, fn in fns.items():
        tree = fn.parse()
        for node in ast.walk(tree):
            if isinstance(node, ast.Return) and node.value is not None:
                returns.add(name)
            elif isinstance(node, ast.Call):
                callee = _jit_function(_resolve(node.func, fn.fn.__globals__))
                if callee is not None:
                    called.add(kernel_id(callee))
    return {name: fn for name, fn in fns.items() if name not in called and name not in returns}


def discover_kernels(package: str = KERNEL_PACKAGE) -> Dict[str, object]:
    return entry_points(jit_functions(package))


# ---------------------------------------------------------------------------------------------
# builds: what the launchers would compile, recorded from their calls on meta tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """One specialization of one kernel, as the JIT would compile it on a GPU."""

    kernel: str  # kernel_id
    signature: Tuple[Tuple[str, str], ...]
    constexprs: Tuple[Tuple[str, object], ...]  # by argument name
    attrs: Tuple[Tuple[Tuple[int, ...], Tuple], ...]
    options: Tuple[Tuple[str, object], ...]  # as the launcher passed them (num_warps, num_stages, ...)
    num_warps: int
    num_stages: int
    specialized: Tuple[str, ...] = ()  # runtime integers the JIT turned into constexprs (value 1)

    @property
    def flags(self) -> Dict[str, bool]:
        return {k: v for k, v in self.constexprs if isinstance(v, bool)}

    @property
    def dtype(self) -> str:
        for name, value in self.constexprs:
            if name == "DTYPE":
                return _short_dtype(str(value))
        for _, ty in self.signature:
            if ty.startswith("*") and ty[1:] in ("bf16", "fp16", "fp32", "fp64"):
                return ty[1:]
        return "-"

    def config(self) -> str:
        """Readable label: dtype, blocks and other values, warps/stages, flags that are on, ragged args."""
        parts = [self.dtype]
        values = []
        for name, value in self.constexprs:
            if value is None or isinstance(value, bool) or name == "DTYPE":
                continue
            short = name.replace("BLOCK_", "B").replace("DOT_PRECISION", "dot").replace("RADIX_", "R")
            values.append(f"{short}={_short_dtype(str(value))}")
        parts.append(",".join(values) if values else "-")
        parts.append(f"w{self.num_warps}s{self.num_stages}")
        on = [name for name, value in self.flags.items() if value]
        parts.append("+" + "+".join(on) if on else "(no flags)")
        return " ".join(parts)


def _short_dtype(text: str) -> str:
    return {"fp32": "fp32", "fp64": "fp64", "float32": "fp32", "float64": "fp64", "bfloat16": "bf16",
            "float16": "fp16"}.get(text, text)


class _Recorder:
    """Stands in for ``JITFunction.run``: binds a launch like the JIT does, records it, runs nothing."""

    def __init__(self, arch: int = 90):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.binders = {}
        self.builds: Dict[Build, List[str]] = {}
        self.scenario = ""

    def record(self, fn, args, kwargs):
        from triton.runtime.jit import create_function_from_signature

        binder = self.binders.get(fn)
        if binder is None:
            binder = self.binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(*args, **kwargs)
        parsed, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        names = fn.arg_names
        consts = {names[path[0]]: value for path, value in constexprs.items()}
        declared = {p.name for p in fn.params if p.is_constexpr}
        build = Build(
            kernel=kernel_id(fn),
            signature=tuple(signature.items()),
            constexprs=tuple((n, consts[n]) for n in names if n in consts),
            attrs=tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())),
            options=tuple(sorted((k, v) for k, v in kwargs.items() if k not in names)),
            num_warps=parsed.num_warps,
            num_stages=parsed.num_stages,
            specialized=tuple(n for n, v in consts.items()
                              if n not in declared and isinstance(v, int) and not isinstance(v, bool)),
        )
        self.builds.setdefault(build, []).append(self.scenario)


class _recording:
    """Context manager: every ``kernel[grid](...)`` is recorded by ``recorder`` instead of launched."""

    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        rec = self.recorder
        self._saved = JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            rec.record(fn, args, kwargs)
            return None

        JITFunction.run = run
        return self.recorder

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._saved
        return False


# Problem shapes (N, H, V, top-k) for the LM head: every size a multiple of 16 with one vocabulary split
# per row block; odd sizes with the vocabulary split across programs (few rows); one row with k = 1,
# where the JIT turns the integers equal to 1 into constexprs. GRPO: B = 8 rows of T = BLOCK_T
# tokens, T = BLOCK_T - 3, and B = T = 1.
SHAPES = {
    "aligned": dict(n=8192, h=4096, v=151936, k=20),
    "ragged": dict(n=37, h=4096, v=50257, k=20),
    "single": dict(n=1, h=4096, v=50257, k=1),
}
OBJECTIVE_BLOCKS = (16, 32, 64, 128, 256, 512, 1024)


def _dtypes():
    import torch

    # (label, torch dtype, allow_tf32): fp32 is compiled with exact and with TF32 products
    return [("bf16", torch.bfloat16, False), ("fp16", torch.float16, False), ("fp32", torch.float32, False),
            ("fp32-tf32", torch.float32, True), ("fp64", torch.float64, False)]


def _nonempty_subsets(items):
    return [c for r in range(1, len(items) + 1) for c in itertools.combinations(items, r)]


def _head_scenarios(rec: _Recorder, shape: str, label: str, dtype):
    """The LM-head and logits entry points of the Triton backend, every option that specializes."""
    import torch

    from ..backends import triton as backend
    from .._types import LogitTransform
    from ..kernels import configs

    dims = SHAPES[shape]
    n, h, v, topk = dims["n"], dims["h"], dims["v"], dims["k"]
    meta = torch.device("meta")
    x = torch.empty(n, h, dtype=dtype, device=meta)
    w = torch.empty(v, h, dtype=dtype, device=meta)
    b = torch.empty(v, dtype=dtype, device=meta)
    logits = torch.empty(n, v, dtype=dtype, device=meta)
    y = torch.empty(n, dtype=torch.int64, device=meta)
    g = torch.empty(n, dtype=torch.float32, device=meta)
    # which of (x, weight, bias) want a gradient, where the backend supports choosing
    takes_needs = "needs" in inspect.signature(backend.linear_backward).parameters
    for bias, softcap, k, entropy in itertools.product((False, True), (None, 30.0), (None, topk), (False, True)):
        tf = LogitTransform(temperature=0.7, softcap=softcap)
        rec.scenario = f"{shape} {label} linear bias={bias} softcap={softcap} k={k} entropy={entropy}"
        stats = backend.linear_forward(x, w, b if bias else None, y, tf, -100, entropy, k)
        terms = ["lp"] + (["ent"] if entropy else []) + (["cl"] if k is not None else [])
        needs_sets = [(True, True, bias)]
        if takes_needs:
            needs_sets = [nd for nd in itertools.product((True, False), (True, False), (bias,)) if nd[0] or nd[1]]
        # both backward designs: chunked (the default) and atomic (opt-in, configs.backward_design)
        for design, grads, needs in itertools.product(configs.BACKWARDS, _nonempty_subsets(terms), needs_sets):
            gs = [g if t in grads else None for t in ("lp", "ent", "cl")]
            kw = {"needs": needs} if takes_needs else {}
            with configs.override(backward=design):
                backend.linear_backward(x, w, b if bias else None, y, tf, -100, stats, *gs, k, **kw)
        if entropy and hasattr(backend, "linear_forward_backward"):
            # the single pass (LinearGRPOLoss): z kept in the logits buffer, dz formed from it (Z_IN)
            for grads in (terms, ["lp"]):
                rec.scenario = (f"{shape} {label} linear_forward_backward bias={bias} softcap={softcap} k={k} "
                                f"grads={'+'.join(grads)}")
                gs = [g if t in grads else None for t in ("lp", "ent", "cl")]
                backend.linear_forward_backward(x, w, b if bias else None, y, tf, -100, True, k,
                                                lambda sl, *_: [None if t is None else t[sl] for t in gs],
                                                needs=(True, True, bias))
        if k is not None and entropy and hasattr(backend, "linear_topk_select"):
            # vocabulary-parallel clamped entropy (_distributed): every digit gets a pass, sums across ranks
            rec.scenario = f"{shape} {label} linear_topk_select bias={bias} softcap={softcap} k={k}"
            backend.linear_topk_select(x, w, b if bias else None, tf, k, g, lambda t: t)
        if bias:
            continue  # the logits entry point has no bias
        rec.scenario = f"{shape} {label} logits softcap={softcap} k={k} entropy={entropy}"
        stats = backend.logits_forward(logits, y, tf, -100, entropy, k)
        for grads in _nonempty_subsets(terms):
            gs = [g if t in grads else None for t in ("lp", "ent", "cl")]
            backend.logits_backward(logits, y, tf, -100, stats, *gs, k)


def _objective_scenarios(rec: _Recorder, shape: str):
    """``launch_objective`` for every loss family, level and optional input, at every block size."""
    import torch

    from .. import _grpo
    from .._launch_objective import LOSS_CODES, launch_objective

    meta = torch.device("meta")
    base = {f: 0.0 for f in _grpo._Cfg._fields}
    base.update(eps_low=0.2, eps_high=0.28, beta=0.0, delta=None, bias_corr=False, luspo_liger=False,
                tau_pos=1.0, tau_neg=1.05, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0)
    bsz = 1 if shape == "single" else 8
    blocks = OBJECTIVE_BLOCKS[:1] if shape == "single" else OBJECTIVE_BLOCKS
    for dtype, block, loss, sequence, rich in itertools.product(
            (torch.float32, torch.float64), blocks, sorted(LOSS_CODES), (False, True), (False, True)):
        seqlen = {"aligned": block, "ragged": block - 3, "single": 1}[shape]
        cfg = dict(base, loss_type=loss, sequence=sequence)
        if rich:
            cfg.update(beta=0.04, bias_corr=True, delta=2.0)
        if loss == "luspo":
            cfg.update(luspo_liger=not rich)
        cfg = _grpo._Cfg(**cfg)
        t = lambda *shp, dt=dtype: torch.empty(*shp, dtype=dt, device=meta)
        lp = t(bsz, seqlen)
        valid = t(bsz, seqlen, dt=torch.bool)
        rec.scenario = f"{shape} objective {dtype} T={seqlen} {loss} sequence={sequence} rich={rich}"
        launch_objective(
            lp, t(bsz, seqlen) if rich else None, t(bsz, seqlen) if rich else None,
            t(bsz, seqlen) if rich else t(bsz, 1), valid, t(bsz, seqlen, dt=torch.bool) if rich else None,
            t(bsz, seqlen) if rich else None, t(bsz), cfg, compute_grad=rich,
        )


def record_builds(errors: Optional[List[str]] = None) -> Dict[Build, List[str]]:
    """Every build the launchers make over the scenarios, with the scenarios that made it.

    A scenario that raises (a launcher that breaks on some option) is an error: appended to
    ``errors`` when a list is given (the gate reports it and goes on), raised otherwise.
    """
    _require_compiler()
    import torch

    rec = _Recorder()
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    groups = [(shape, label, dtype, tf32) for shape in SHAPES for label, dtype, tf32 in _dtypes()]
    groups += [(shape, "objective", None, False) for shape in SHAPES]
    try:
        with _recording(rec):
            for shape, label, dtype, tf32 in groups:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                try:
                    if dtype is None:
                        _objective_scenarios(rec, shape)
                    else:
                        _head_scenarios(rec, shape, label, dtype)
                except Exception as e:
                    if errors is None:
                        raise
                    errors.append(f"scenario '{rec.scenario}' raised {type(e).__name__}: {e}"[:400])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return rec.builds


@dataclass(frozen=True)
class Selected:
    """A build chosen for compiling, with the problem shape it came from."""

    build: Build
    shape: str  # "aligned" or "ragged"

    def config(self) -> str:
        return self.build.config() + ("" if self.shape == "aligned" else f" [{self.shape}]")


def _shape(scenarios: Sequence[str]) -> str:
    for shape in SHAPES:
        if any(s.startswith(shape) for s in scenarios):
            return shape
    raise ValueError(f"unknown scenarios {scenarios}")


def _configuration(b: Build):
    """What the kernel's configuration is: dtype, block sizes, warps, stages."""
    blocks = tuple((k, v) for k, v in b.constexprs if k.startswith("BLOCK"))
    return (b.kernel, b.dtype, blocks, b.options, b.num_warps, b.num_stages)


def _weight(b: Build):
    """Optional work switched on: flags that are on (modes excluded), then pointer arguments given."""
    on = sum(1 for k, v in b.flags.items() if v and k not in MODE_FLAGS)
    given = sum(1 for _, ty in b.signature if ty.startswith("*"))
    return (on, given)


def _features(b: Build) -> frozenset:
    """The flags that are on and the pointer arguments that are given."""
    return frozenset([k for k, v in b.flags.items() if v] + [k for k, ty in b.signature if ty.startswith("*")])


def _maximal(cands: List["Selected"]) -> List["Selected"]:
    """The candidates whose feature sets no other candidate's contains (one per distinct set)."""
    feats = {}
    for c in sorted(cands, key=lambda c: (c.shape != "aligned", c.config())):
        feats.setdefault(_features(c.build), c)
    return [c for f, c in feats.items() if not any(f < o for o in feats)]


def _values(b: Build):
    """What the gate must see compiled at least once per kernel and dtype: every value of every
    non-flag constexpr (radix digit, loss family, dot precision), both values of a mode flag, and
    every optional flag switched on; a runtime integer specialized to 1 (``n_split=1``, ``N=1``)
    at least once per kernel."""
    return {(b.kernel, "*" if k in b.specialized else b.dtype, k, repr(v)) for k, v in b.constexprs
            if v is not None and (v is not False or k in MODE_FLAGS)}


def select_builds(recorded: Dict[Build, List[str]], level: str) -> List[Selected]:
    """The builds a level compiles, in a stable order.

    ``full``: every recorded build. ``quick``: per kernel, the lightest build of its first
    configuration. ``gate``: per kernel configuration (dtype, block sizes, warps, stages) the
    builds on the aligned shape whose set of flags on and pointers given no other build's set
    contains (the heaviest, or several where the launchers use exclusive options, e.g. the
    single-process and the vocabulary-parallel outputs of a select); per kernel and dtype the heaviest on
    the ragged shape; per kernel the lightest; then, until every value in ``_values`` that the launchers
    produce appears in some chosen build, the heaviest build with a missing value.
    """
    if level not in ("quick", "gate", "full"):
        raise ValueError(f"level must be quick, gate or full, got {level!r}")
    items = sorted((Selected(b, _shape(sc)) for b, sc in recorded.items()),
                   key=lambda s: (s.build.kernel, s.shape != "aligned", s.config()))
    if level == "full":
        return items
    heavy = lambda s: (_weight(s.build), s.shape == "aligned")
    chosen: List[Selected] = []

    def pick(candidates, key, pick_max=True):
        if candidates:
            best = (max if pick_max else min)(candidates, key=key)
            if best not in chosen:
                chosen.append(best)

    kernels = sorted({s.build.kernel for s in items})
    if level == "quick":
        for k in kernels:
            mine = [s for s in items if s.build.kernel == k and s.shape == "aligned"] or \
                   [s for s in items if s.build.kernel == k]
            first = _configuration(mine[0].build)
            pick([s for s in mine if _configuration(s.build) == first], lambda s: _weight(s.build), pick_max=False)
        return chosen
    for conf in sorted({_configuration(s.build) for s in items}, key=repr):
        mine = [s for s in items if _configuration(s.build) == conf]
        for s in _maximal([s for s in mine if s.shape == "aligned"] or mine):
            pick([s], heavy)
    for kernel, dtype in sorted({(s.build.kernel, s.build.dtype) for s in items}):
        pick([s for s in items if (s.build.kernel, s.build.dtype) == (kernel, dtype) and s.shape == "ragged"], heavy)
    for k in kernels:
        pick([s for s in items if s.build.kernel == k and s.shape == "aligned"], lambda s: _weight(s.build),
             pick_max=False)
    covered = set().union(*(_values(s.build) for s in chosen)) if chosen else set()
    for s in sorted(items, key=lambda s: (s.build.kernel, s.shape != "aligned", [-w for w in _weight(s.build)],
                                          s.config())):
        missing = _values(s.build) - covered
        if missing:
            chosen.append(s)
            covered |= _values(s.build)
    return sorted(chosen, key=lambda s: (s.build.kernel, s.shape != "aligned", s.config()))


def coverage_errors(kernels: Iterable[str], builds: Iterable[Build]) -> List[str]:
    """One message per kernel that no recorded launch compiles."""
    launched = {b.kernel for b in builds}
    return [f"{k}: no AOT coverage (no launcher scenario launches it; add one to tools/aot.py)"
            for k in sorted(set(kernels) - launched)]


# ---------------------------------------------------------------------------------------------
# compile and inspect (worker processes)
# ---------------------------------------------------------------------------------------------


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_DOT_TYPES = re.compile(r":\s*tensor<[0-9x]+x(\w+)>\s*\*\s*tensor<[0-9x]+x(\w+)>")
_DOT_PRECISION = re.compile(r"inputPrecision\s*=\s*(\w+)")


def parse_res_usage(text: str) -> Dict[str, int]:
    m = _RES.search(text)
    if not m:
        raise ValueError(f"no resource line in cuobjdump -res-usage output: {text[:300]!r}")
    return dict(zip(("regs", "stack", "static_smem", "local"), map(int, m.groups())))


def sass_counts(sass: str) -> Dict[str, int]:
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.MULTILINE)
    counts = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def dot_operands(ttir: str) -> List[Tuple[str, str, str]]:
    """(a element type, b element type, input precision) of every ``tt.dot`` in a TTIR module; the
    printer leaves out the default precision, "ieee"."""
    out = []
    for line in ttir.splitlines():
        if "tt.dot " not in line:
            continue
        types = _DOT_TYPES.search(line)
        prec = _DOT_PRECISION.search(line)
        if types:
            out.append((types.group(1), types.group(2), prec.group(1) if prec else "ieee"))
    return out


def expects_tensor_cores(dots: Sequence[Tuple[str, str, str]]) -> bool:
    for a, _, prec in dots:
        if a in ("bf16", "f16", "f64") or a.startswith("f8"):
            return True
        if a == "f32" and prec.lower() != "ieee":
            return True
    return False


def _compile_job(job):
    sel, arch, keep_dir = job
    build = sel.build
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    row = {}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        module, name = build.kernel.rsplit(".", 1)
        fn = _jit_function(getattr(importlib.import_module(f"{KERNEL_PACKAGE}.{module}"), name))
        t0 = time.perf_counter()
        src = ASTSource(fn, dict(build.signature), dict(build.constexprs),
                        {k: [list(a) for a in v] for k, v in build.attrs})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(build.options))
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(keep_dir or tmp, f"{name}_{compiled.metadata.hash[:12]}_sm{arch}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            res = subprocess.run([cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True)
            sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True)
        row.update(parse_res_usage(res.stdout))
        counts = sass_counts(sass.stdout)
        row["dyn_smem"] = int(compiled.metadata.shared)
        row["hgmma"] = counts.get("HGMMA", 0)
        row["hmma"] = counts.get("HMMA", 0)
        row["dmma"] = counts.get("DMMA", 0)
        row["spill_ops"] = counts.get("STL", 0) + counts.get("LDL", 0)
        row["dots"] = dot_operands(compiled.asm["ttir"])
    except Exception as e:  # a build that does not compile fails the gate with its message
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        # Triton's CompilationError: "at LINE:COL:", the source, then the cause on the last line
        where = f" {lines[0]} ... {lines[-1]}" if len(lines) > 1 else (f" {lines[0]}" if lines else "")
        row["error"] = f"{type(e).__name__}:{where}"[:400]
    return sel, arch, row


def check(row: dict, build: Build, arch: int) -> Tuple[List[str], List[str]]:
    """(failures, warnings) of one compiled build."""
    if "error" in row:
        return [f"does not compile: {row['error']}"], []
    lim = ARCHS[arch]
    fails, warns = [], []
    if row["stack"] or row["local"]:
        fails.append(f"spills: {row['stack']} B stack frame, {row['local']} B local, "
                     f"{row['spill_ops']} STL/LDL instructions")
    smem = row["dyn_smem"] + row["static_smem"]
    if smem > lim.smem_per_block:
        fails.append(f"shared memory {smem} B > {lim.smem_per_block} B per block on sm_{arch}")
    threads = 32 * build.num_warps
    regs_alloc = 8 * math.ceil(row["regs"] / 8)
    if regs_alloc * threads > lim.registers:
        fails.append(f"{row['regs']} registers x {threads} threads > {lim.registers}: the launch fails")
    tc = row["hgmma"] + row["hmma"] + row["dmma"]
    if expects_tensor_cores(row["dots"]) and tc == 0:
        fails.append("tl.dot on tensor-core operands but no HGMMA/HMMA/DMMA in the SASS")
    if arch >= 90 and row["hmma"] and not row["hgmma"]:
        warns.append("mma.sync (HMMA) instead of wgmma (HGMMA) on sm_90")
    return fails, warns


def occupancy(row: dict, build: Build, arch: int) -> int:
    """Blocks that fit on one SM at once (registers, shared memory, threads)."""
    if "error" in row:
        return 0
    lim = ARCHS[arch]
    threads = 32 * build.num_warps
    by_regs = lim.registers // max(1, 8 * math.ceil(row["regs"] / 8) * threads)
    smem = row["dyn_smem"] + row["static_smem"]
    by_smem = lim.smem_per_sm // smem if smem else 32
    return max(0, min(by_regs, by_smem, lim.max_threads_per_sm // threads, 32))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ["kernel", "config", "arch", "status", "regs", "stack_bytes", "local_bytes", "spill_ops",
              "smem_bytes", "blocks_per_sm", "wgmma", "mma", "num_warps", "num_stages", "compile_s", "problems"]


def _report_rows(results) -> List[dict]:
    rows = []
    for sel, arch, row in results:
        build = sel.build
        fails, warns = check(row, build, arch)
        ok = "error" not in row
        rows.append({
            "kernel": build.kernel.split(".", 1)[1], "config": sel.config(), "arch": f"sm_{arch}",
            "status": "FAIL" if fails else ("warn" if warns else "ok"),
            "regs": row.get("regs", ""), "stack_bytes": row.get("stack", ""), "local_bytes": row.get("local", ""),
            "spill_ops": row.get("spill_ops", ""),
            "smem_bytes": row["dyn_smem"] + row["static_smem"] if ok else "",
            "blocks_per_sm": occupancy(row, build, arch) if ok else "",
            "wgmma": ("yes" if row["hgmma"] else "no") if ok else "",
            "mma": ("HMMA" if row["hmma"] else "DMMA" if row["dmma"] else "no") if ok else "",
            "num_warps": build.num_warps, "num_stages": build.num_stages,
            "compile_s": row.get("compile_s", ""), "problems": "; ".join(fails + warns),
        })
    return rows


def format_table(rows: List[dict]) -> str:
    cols = [("kernel", "kernel"), ("config", "config"), ("arch", "arch"), ("regs", "regs"),
            ("stack_bytes", "spill B"), ("smem_bytes", "smem B"), ("blocks_per_sm", "blk/SM"),
            ("wgmma", "wgmma"), ("mma", "mma"), ("status", "status")]
    width = {k: max(len(h), *(len(str(r[k])) for r in rows)) if rows else len(h) for k, h in cols}
    line = lambda vals: "  ".join(str(v).ljust(width[k]) for (k, _), v in zip(cols, vals)).rstrip()
    out = [line([h for _, h in cols]), line(["-" * width[k] for k, _ in cols])]
    out += [line([r[k] for k, _ in cols]) for r in rows]
    return "\n".join(out)


def _write_reports(rows: List[dict], out_dir: str) -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "aot_report.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    txt_path = os.path.join(out_dir, "aot_report.txt")
    with open(txt_path, "w") as f:
        f.write(format_table(rows) + "\n")
        problems = [r for r in rows if r["problems"]]
        if problems:
            f.write("\nproblems:\n")
            for r in problems:
                f.write(f"  [{r['status']}] {r['kernel']} {r['config']} {r['arch']}: {r['problems']}\n")
    return csv_path, txt_path


def run_gate(archs: Sequence[int], level: str = "gate", jobs: int = 1, out_dir: Optional[str] = None,
             kernels: Optional[Sequence[str]] = None, keep_cubins: bool = False, log=print) -> int:
    """Record, select, compile, inspect, report. Returns the exit code (0 pass, 1 failure)."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    t0 = time.perf_counter()
    discovered = discover_kernels()
    errors: List[str] = []
    recorded = record_builds(errors)
    errors += coverage_errors(discovered, recorded)
    builds = select_builds(recorded, level)
    if kernels:
        wanted = set(kernels)
        unknown = wanted - {k.split(".", 1)[1] for k in discovered}
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; known: "
                             f"{sorted(k.split('.', 1)[1] for k in discovered)}")
        builds = [s for s in builds if s.build.kernel.split(".", 1)[1] in wanted]
    log(f"aot: {len(discovered)} kernels, {len(recorded)} builds recorded from the launchers, "
        f"{len(builds)} at level {level!r} x {len(archs)} archs; recorded in {time.perf_counter() - t0:.1f} s")
    keep_dir = None
    if keep_cubins and out_dir:
        keep_dir = os.path.join(out_dir, "cubin")
        os.makedirs(keep_dir, exist_ok=True)
    jobs_list = [(b, a, keep_dir) for b in builds for a in archs]
    t1 = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_compile_job, jobs_list, chunksize=1))
    else:
        results = [_compile_job(j) for j in jobs_list]
    rows = _report_rows(results)
    log(format_table(rows))
    fails = [r for r in rows if r["status"] == "FAIL"]
    for r in rows:
        if r["problems"]:
            log(f"[{r['status']}] {r['kernel']} {r['config']} {r['arch']}: {r['problems']}")
    for e in errors:
        log(f"[FAIL] {e}")
    if out_dir:
        csv_path, txt_path = _write_reports(rows, out_dir)
        with open(txt_path, "a") as f:
            for e in errors:
                f.write(f"  [FAIL] {e}\n")
        log(f"aot: wrote {csv_path} and {txt_path}")
    log(f"aot: {len(rows)} compiles in {time.perf_counter() - t1:.1f} s with {jobs} job(s), "
        f"total {time.perf_counter() - t0:.1f} s; {len(fails)} failing, {len(errors)} coverage/scenario errors")
    return 1 if fails or errors else 0


# ---------------------------------------------------------------------------------------------
# roofline on paper
# ---------------------------------------------------------------------------------------------

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
    dW accumulator read and written once per row chunk); the backward makes 3 (recompute, dX, dW) in either design: chunked
    (default: ``linear_dz_kernel`` writes dz, cuBLAS reads it twice; ``GRAD_BUFFER_BYTES`` sets the
    chunks, each adding a read and write of the fp32 dX accumulator) or atomic (``linear_grad_kernel``). Bytes are compulsory
    traffic: every input read once, every output written once, as if tiles were re-read from L2 and
    never from HBM. Two risks are counted beside the bound, from the shipped block sizes:
    ``tile_bytes``, the operand bytes the GEMM tiles load (a [BLOCK_N, BLOCK_H] x tile and a
    [BLOCK_V, BLOCK_H] W tile per step: 2 BN BV / ((BN + BV) e) FLOP per byte, far below H100's
    295 FLOP/byte ridge), served by L2 at best (``tile_hbm_ms`` if none were); and ``atomic_adds``,
    the fp32 adds of the backward into dX and dW (``V/BLOCK_V`` per dX element, ``N/BLOCK_N`` per dW
    element) and of the radix passes into the histogram (at most one per logit and pass), which
    cost a read and a write in HBM each whenever the accumulator does not stay in L2
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
    add("linear_grad_kernel", "backward: recompute + dX + dW (3 passes)", 3 * gemm,
        n * h * e + v * h * e + 8 * n + 8 * n * acc + (n * h + v * h) * acc,
        atomic_adds=math.ceil(v / g.block_v) * n * h + math.ceil(n / g.block_n) * v * h,
        # recompute as the forward; dX = dz W streams W tiles (2 BN FLOP/e bytes), dW = dz^T x streams x tiles
        tile_bytes=gemm / fwd_ai(g) + gemm * e / (2 * g.block_n) + gemm * e / (2 * g.block_v))
    add("(launcher, torch)", "zero dX, dW; cast them to the input dtype", 0, (n * h + v * h) * (2 * acc + e))
    # the chunked backward (default): dz [N, V] in chunks of at most GRAD_BUFFER_BYTES, no atomics
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
_ATOMIC_BWD = ("linear_grad_kernel", "(launcher, torch)")
WORKLOADS = {
    "linear": (("linear_stats_kernel", "finish_stats_kernel") + _CHUNKED_BWD,
               "linear_logprobs + entropy, fwd+bwd"),
    "linear+clamped": (("linear_stats_kernel", "finish_stats_kernel") + _CHUNKED_BWD +
                       ("linear_stats_kernel +TOPK", "logits_radix_kernel (buffer)", "radix_select_kernel"),
                       "the same with clamped (top-k) entropy"),
    "grpo-single": (("linear_stats_kernel", "finish_stats_kernel", "linear_stats_kernel +Z",
                     "logits_grad_kernel (Z_IN)", "(cuBLAS) single pass dX, dW"),
                    "LinearGRPOLoss single pass (Triton): logits buffer, dz, dX, dW"),
    "linear-atomic": (("linear_stats_kernel", "finish_stats_kernel") + _ATOMIC_BWD,
                      "linear_logprobs + entropy, fwd+bwd, atomic backward (opt-in)"),
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


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _parse_archs(text: str) -> List[int]:
    archs = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        m = re.fullmatch(r"(?:sm_?)?(\d+)[a-z]?(?:-real|-virtual)?", part)
        value = int(m.group(1)) if m else None
        if value not in ARCHS:
            raise argparse.ArgumentTypeError(f"--arch: {part!r} not supported; choose from {sorted(ARCHS)}")
        archs.append(value)
    if not archs:
        raise argparse.ArgumentTypeError("--arch: no architecture given")
    return archs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fused-entropy aot", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=_parse_archs, default=[80, 90],
                    help="CUDA architectures, e.g. 80,90 or '80;90' (CMake's list) (default: 80,90)")
    ap.add_argument("--out", help="directory for aot_report.csv and aot_report.txt")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--level", choices=("quick", "gate", "full"), default="gate",
                    help="which builds: one per kernel, the gate (default), or every recorded build")
    ap.add_argument("--kernels", help="comma-separated kernel names to compile (default: all)")
    ap.add_argument("--keep-cubins", action="store_true", help="keep the cubins under OUT/cubin")
    ap.add_argument("--report-only", action="store_true",
                    help="exit 0 even when builds fail the gate (the report still says FAIL)")
    ap.add_argument("--list", action="store_true", help="list kernels, coverage and builds; compile nothing")
    ap.add_argument("--roofline", action="store_true", help="print the roofline table (on paper) and exit")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.roofline:
        print(format_roofline())
        return 0
    if _interpreting():
        # Under TRITON_INTERPRET=1 triton.jit makes interpreter objects that cannot be compiled.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "fused_entropy.tools.aot", *argv], env=env)
    if args.jobs < 1:
        print("--jobs must be at least 1", file=sys.stderr)
        return 2
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] if args.kernels else None
    if args.list:
        discovered = discover_kernels()
        errors: List[str] = []
        recorded = record_builds(errors)
        builds = select_builds(recorded, args.level)
        print(f"{len(discovered)} kernels: " + ", ".join(k.split(".", 1)[1] for k in discovered))
        for e in errors + coverage_errors(discovered, recorded):
            print(f"[FAIL] {e}")
        for s in builds:
            if not kernels or s.build.kernel.split(".", 1)[1] in kernels:
                print(f"{s.build.kernel.split('.', 1)[1]:24s} {s.config()}")
        print(f"{len(recorded)} builds recorded, {len(builds)} at level {args.level!r}")
        return 1 if errors or coverage_errors(discovered, recorded) else 0
    try:
        code = run_gate(args.arch, args.level, args.jobs, args.out, kernels, args.keep_cubins)
        return 0 if args.report_only else code
    except ValueError as e:
        print(f"aot: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
