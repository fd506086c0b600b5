"""Which builds the AOT gate compiles: the kernels' jit entry points, the launches the launchers would
make on ``meta`` tensors (recorded, bound as Triton's JIT binds them), and the selection per level.
See :mod:`fused_entropy.tools.aot` for the method."""
from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import os
import pkgutil
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

    from ...backends import triton as backend
    from ..._types import LogitTransform

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
        for grads, needs in itertools.product(_nonempty_subsets(terms), needs_sets):
            gs = [g if t in grads else None for t in ("lp", "ent", "cl")]
            kw = {"needs": needs} if takes_needs else {}
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

    from ... import _grpo
    from ..._launch_objective import launch_objective

    meta = torch.device("meta")
    base = {f: 0.0 for f in _grpo._Cfg._fields}
    base.update(eps_low=0.2, eps_high=0.28, beta=0.0, delta=None, bias_corr=False, luspo_liger=False,
                tau_pos=1.0, tau_neg=1.05, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0)
    bsz = 1 if shape == "single" else 8
    blocks = OBJECTIVE_BLOCKS[:1] if shape == "single" else OBJECTIVE_BLOCKS
    for dtype, block, loss, sequence, rich in itertools.product(
            (torch.float32, torch.float64), blocks, sorted(_grpo.KERNEL_LOSS_TYPES), (False, True), (False, True)):
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
    return [f"{k}: no AOT coverage (no launcher scenario launches it; add one to tools/aot/specs.py)"
            for k in sorted(set(kernels) - launched)]
