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

Layout: :mod:`.specs` (steps 1 and 2: discovery, recorded builds, selection, coverage),
:mod:`.compile` (step 3 and the checks), :mod:`.report` (table and CSV), this module (the gate and
its command line); the roofline is :mod:`fused_entropy.tools.roofline`, shared with the benchmark.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional, Sequence

from ..roofline import H100_SXM, ROOFLINE_VOCABS, WORKLOADS, format_roofline, lower_bound, roofline, workload_bound
from .compile import (
    TENSOR_CORE_OPS, _compile_job, check, cuobjdump, dot_operands, expects_tensor_cores, occupancy, parse_res_usage,
    sass_counts, toolchain,
)
from .report import CSV_FIELDS, _report_rows, _write_reports, format_table
from .specs import (  # noqa: F401 (_configuration: read through this module by the tests)
    ARCHS, KERNEL_PACKAGE, MODE_FLAGS, OBJECTIVE_BLOCKS, SHAPES, Arch, Build, Selected, _configuration, _interpreting,
    coverage_errors, discover_kernels, entry_points, jit_functions, kernel_id, record_builds, select_builds,
)

__all__ = [
    # which builds (specs)
    "ARCHS", "KERNEL_PACKAGE", "MODE_FLAGS", "OBJECTIVE_BLOCKS", "SHAPES", "Arch", "Build", "Selected",
    "coverage_errors", "discover_kernels", "entry_points", "jit_functions", "kernel_id", "record_builds",
    "select_builds",
    # compile and inspect
    "TENSOR_CORE_OPS", "check", "cuobjdump", "dot_operands", "expects_tensor_cores", "occupancy",
    "parse_res_usage", "sass_counts",
    # report and the gate
    "CSV_FIELDS", "format_table", "run_gate", "build_parser", "main",
    # the roofline (fused_entropy.tools.roofline, re-exported)
    "H100_SXM", "ROOFLINE_VOCABS", "WORKLOADS", "format_roofline", "lower_bound", "roofline", "workload_bound",
]

# ---------------------------------------------------------------------------------------------
# the gate: record, select, compile, inspect, report
# ---------------------------------------------------------------------------------------------


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
    tools = toolchain()
    log(f"aot: {tools}; {len(discovered)} kernels, {len(recorded)} builds recorded from the launchers, "
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
        csv_path, txt_path = _write_reports(rows, out_dir, tools)
        with open(txt_path, "a") as f:
            for e in errors:
                f.write(f"  [FAIL] {e}\n")
        log(f"aot: wrote {csv_path} and {txt_path}")
    log(f"aot: {len(rows)} compiles in {time.perf_counter() - t1:.1f} s with {jobs} job(s), "
        f"total {time.perf_counter() - t0:.1f} s; {len(fails)} failing, {len(errors)} coverage/scenario errors")
    return 1 if fails or errors else 0


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
