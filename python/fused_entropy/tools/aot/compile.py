"""Compile one build for one architecture (``triton.compile`` + the ``cuobjdump`` bundled with Triton) and
check what came out: spills, shared memory, the register file, tensor-core instructions."""
from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from typing import Dict, List, Sequence, Tuple

from ...kernels.configs import programs_per_sm
from .specs import ARCHS, KERNEL_PACKAGE, Build, _jit_function

TENSOR_CORE_OPS = ("HGMMA", "HMMA", "DMMA", "IMMA")


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


def toolchain() -> str:
    """The Triton and ptxas versions the gate compiles with, e.g. ``triton 3.6.0, ptxas 12.8``: register
    counts, and with them spills and occupancy, change from one Triton release to the next."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        ptxas = re.search(r"release ([\d.]+)", get_ptxas_version()).group(1)
    except Exception:  # noqa: BLE001 (a version string only; the compile itself reports real errors)
        ptxas = "?"
    return f"triton {triton.__version__}, ptxas {ptxas}"


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
    """Blocks that fit on one SM at once: ``configs.programs_per_sm`` (the launcher's own rule, which
    on a GPU reads the same three resources from the compiled kernel) with the arch's limits."""
    if "error" in row:
        return 0
    lim = ARCHS[arch]
    return programs_per_sm(row["regs"], row["dyn_smem"] + row["static_smem"], build.num_warps,
                           regs_per_sm=lim.registers, shared_per_sm=lim.smem_per_sm,
                           threads_per_sm=lim.max_threads_per_sm)
