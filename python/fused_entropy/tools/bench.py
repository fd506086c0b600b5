"""``fused-entropy bench``: speed and working memory of this package next to the tools people use today.

Every row is one provider (see :mod:`fused_entropy.tools.bench_providers`) measured in its own process
(:mod:`fused_entropy.tools.bench_worker`, which documents how time and memory are taken). Rows are
grouped by what they compute; in each group every row's time is divided by

- the matrix-multiply floor measured in the same run (``xfloor``): the GEMMs the fused algorithm must
  do, alone, at the same chunking (4 for ``linear_logprobs``: forward, recompute, dX, dW; 3 for the
  single-pass GRPO loss),
- the eager materialized reference (``xeager``; for clamped entropy: the plain-entropy fused row),
- each peer library's row (``xTRL``, ``xLiger``...),

so that ratios, not absolute times, carry the result. Working memory is printed as a fraction of one
fp32 ``[N, V]`` buffer.

Presets: ``quick`` (default): one case (CPU: N=2048, H=512, V=32768, fp32; CUDA: N=8192, H=4096,
V=131072, bf16), the main rows, two timed runs per row on CPU (about 2 minutes on a quiet 2-core CPU). ``sweep``: N from 1k to 16k at the
default V, and V from 32k to 256k at the default N, every provider; rows that would not fit in free
memory are skipped. ``--out DIR`` writes ``bench_<preset>_<device>.csv`` and ``.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

from .bench_providers import FAMILIES, FAMILY_TITLES, PROVIDERS, Case, unavailable

H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16

QUICK = (
    "floor", "fused", "fused-torch", "fused-logp", "reference", "trl", "liger-ce",
    "fused-topk64", "fused-clamp0.3",
    "floor-grpo", "fused-grpo", "liger-grpo", "trl-grpo",
    "fused-logits", "reference-logits", "trl-logits",
)
SWEEP = tuple(PROVIDERS)

DEFAULT_CASE = {
    "cpu": Case(n=2048, h=512, v=32768, dtype="float32", seq_len=256),
    "cuda": Case(n=8192, h=4096, v=131072, dtype="bfloat16", seq_len=1024),
}
SWEEP_N = (1024, 2048, 4096, 8192, 16384)
SWEEP_V = (32768, 65536, 131072, 262144)

# the column each family divides by (xeager); the clamped rows are compared with plain entropy
BASELINE = {"linear_logprobs": ("reference", "eager"), "clamped_entropy": ("fused", "plain H"),
            "grpo": ("reference-grpo", "eager"), "logits": ("reference-logits", "eager")}
FLOOR = {"linear_logprobs": "floor", "clamped_entropy": "floor", "grpo": "floor-grpo", "logits": None}
PEER_SHORT = {"trl": "TRL", "liger-ce": "Liger", "liger-grpo": "Liger", "trl-grpo": "TRL", "trl-logits": "TRL"}


@dataclass
class Row:
    provider: str
    case: Case
    result: Dict = field(default_factory=dict)  # the worker's JSON
    skipped: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.error and "time_s" in self.result

    @property
    def time(self) -> float:
        return self.result["time_s"]

    @property
    def working(self) -> Optional[float]:
        w = self.result.get("working_bytes")
        return None if w is None else max(0, w) / self.case.nv_bytes


# ---------------------------------------------------------------------------------------------
# running the rows
# ---------------------------------------------------------------------------------------------


def _available_bytes(device) -> int:
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _needed_bytes(name: str, case: Case) -> int:
    p = PROVIDERS[name]
    elt = 2 if case.dtype in ("bfloat16", "float16") else 4 if case.dtype == "float32" else 8
    if p.family == "logits":
        inputs = case.n * case.v * elt
    else:
        inputs = (case.n + case.v) * case.h * elt
    return int(2 * inputs + p.mem_nv * case.nv_bytes)


def _row_from(name: str, case: Case, result: Optional[dict]) -> Row:
    if result is None:
        return Row(name, case, error="no result from the worker")
    if "error" in result:
        return Row(name, case, error=result["error"])
    return Row(name, case, result=result)


def run_spawned(name: str, case: Case, device, repeats: int, timeout: float, verbose: bool = False) -> Row:
    """One row in a new ``python -m fused_entropy.tools.bench_worker`` process."""
    cmd = [sys.executable, "-m", "fused_entropy.tools.bench_worker", "--provider", name,
           "--n", str(case.n), "--h", str(case.h), "--v", str(case.v), "--dtype", case.dtype,
           "--seq-len", str(case.seq_len), "--device", str(device), "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row(name, case, error=f"timed out after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return _row_from(name, case, json.loads(lines[-1]))
    if proc.returncode < 0:
        return Row(name, case, error=f"killed by signal {-proc.returncode} (out of memory?)")
    tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return Row(name, case, error=(tail[-1] if tail else f"exit status {proc.returncode}")[:200])


class ForkServer:
    """``bench_worker --serve``: imports the packages once and forks a fresh process per row (CPU)."""

    def __init__(self, names: Sequence[str], verbose: bool = False):
        mods = ["fused_entropy", "fused_entropy.modules"]
        for n in names:
            mods += [m for m in PROVIDERS[n].preload if m not in mods]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fused_entropy.tools.bench_worker", "--serve", "--preload", ",".join(mods)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None if verbose else subprocess.DEVNULL,
            text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("bench fork server did not start")

    def run(self, name: str, case: Case, device, repeats: int, timeout: float) -> Optional[Row]:
        """The row, or None when the server itself has gone (the caller then spawns)."""
        from .bench_worker import request

        try:
            self.proc.stdin.write(json.dumps(request(name, case, str(device), repeats, timeout)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            return None
        return _row_from(name, case, json.loads(line)) if line.strip() else None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def run_rows(names: Sequence[str], cases: Sequence[Case], device, repeats: int, timeout: float,
             spawn: bool = False, verbose: bool = False, log=sys.stderr) -> List[Row]:
    """Measure every (case, provider) in a process of its own: forked from a fork server on CPU,
    spawned (``python -m``) on CUDA (a CUDA context does not survive fork) or with ``spawn``."""
    rows: List[Row] = []
    todo = [(c, n) for c in cases for n in names]
    server = None
    if not spawn and getattr(device, "type", device) == "cpu" and hasattr(os, "fork"):
        server = ForkServer([n for n in names if unavailable(PROVIDERS[n], device) is None], verbose)
    for i, (case, name) in enumerate(todo, 1):
        tag = f"[{i:2d}/{len(todo)}] {name} N={case.n} V={case.v}"
        reason = unavailable(PROVIDERS[name], device)
        if reason is None:
            need, have = _needed_bytes(name, case), _available_bytes(device)
            if need > 0.85 * have:
                reason = f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"
        if reason is not None:
            rows.append(Row(name, case, skipped=reason))
            print(f"{tag}: skipped ({reason})", file=log, flush=True)
            continue
        t0 = time.perf_counter()
        row = server.run(name, case, device, repeats, timeout) if server is not None else None
        if row is None:
            if server is not None:
                print("bench fork server stopped; starting the remaining rows with python -m", file=log)
                server.close()
                server = None
            row = run_spawned(name, case, device, repeats, timeout, verbose)
        rows.append(row)
        if row.ok:
            mem = "" if row.working is None else f", {row.working:.3f} x [N,V]"
            print(f"{tag}: {row.time:.4g} s{mem} ({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
        else:
            print(f"{tag}: failed ({row.error})", file=log, flush=True)
    if server is not None:
        server.close()
    return rows


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------


def _find(rows: List[Row], name: Optional[str], case: Case) -> Optional[Row]:
    for r in rows:
        if r.provider == name and r.case == case and r.ok:
            return r
    return None


def _label(row: Row, device) -> str:
    p = PROVIDERS[row.provider]
    label = p.label
    if p.kind == "floor":
        from .bench_providers import grpo_floor_rows, linear_floor_rows

        import torch

        dev = torch.device(device)
        rows = (grpo_floor_rows if p.family == "grpo" else linear_floor_rows)(row.case, dev)
        label += f" @ {rows}-row chunks" if rows < row.case.n else " (unchunked)"
    elif p.name in ("fused", "fused-logp", "fused-topk64", "fused-clamp0.3", "fused-logits"):
        label += " [triton]" if getattr(device, "type", device) == "cuda" else " [torch]"
    return label


def _ratio(a: Optional[Row], b: Optional[Row]) -> str:
    if a is None or b is None:
        return "-"
    return f"{a.time / b.time:.2f}"


def _table(headers: List[str], body: List[List[str]], align: str) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]


# bench family -> the roofline workload of fused_entropy.tools.aot that bounds this package's rows
ROOFLINE_WORKLOAD = {"linear_logprobs": "linear", "clamped_entropy": "linear+clamped", "logits": "logits"}


def _roofline_bound(r: "Row", family: str, case: Case) -> Optional[float]:
    """Lower-bound seconds (on paper, H100 SXM) for a row of this package, None for peers/other rows."""
    workload = ROOFLINE_WORKLOAD.get(family)
    if workload is None or PROVIDERS[r.provider].kind == "peer" or r.provider.startswith(("floor", "reference")):
        return None
    from .aot import workload_bound

    if family == "logits" and "clamp" in r.provider:
        workload = "logits+clamped"
    dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(case.dtype, "bf16")
    try:
        return workload_bound(workload, case.n, case.h, case.v, dt)[1]
    except (KeyError, ValueError):
        return None


def family_table(rows: List[Row], family: str, case: Case, device) -> List[str]:
    """The printed block of one family on one case."""
    cuda = getattr(device, "type", device) == "cuda"
    mine = [r for r in rows if r.case == case and PROVIDERS[r.provider].family == family]
    if not mine:
        return []
    measured = [r for r in mine if r.ok]
    floor = _find(rows, FLOOR[family], case)
    base_name, base_tag = BASELINE[family]
    base = _find(rows, base_name, case)
    peers = [r for r in measured if PROVIDERS[r.provider].kind == "peer"]
    headers = ["provider", "GEMMs", "GFLOP", "time ms" if cuda else "time s", "spread",
               "TFLOP/s" if cuda else "GFLOP/s"]
    align = "lrrrrr"
    if cuda:
        # % of H100 bf16 peak, and bound/time: the fraction of the roofline lower bound reached
        headers += [f"%{H100_BF16_PEAK_TFLOPS:.0f}", "%bound"]
        align += "rr"
    # a ratio column only where its row was measured
    ratio_to = [r for r in (floor, base) if r is not None] + peers
    for ref in ratio_to:
        if ref is floor:
            headers.append("xfloor")
        elif ref is base:
            headers.append(f"x{base_tag}")
        else:
            headers.append("x" + PEER_SHORT.get(ref.provider, ref.provider))
        align += "r"
    headers += ["mem/[N,V]", "MiB"]
    align += "rr"
    body = []
    for r in measured:
        gemms = r.result["gemms"]
        flops = case.gemm_flops(gemms)
        t = r.time
        spread = (r.result["time_hi_s"] - r.result["time_lo_s"]) / 2 / t if t > 0 else 0.0
        rate = flops / t / (1e12 if cuda else 1e9) if gemms else None
        cells = [_label(r, device), str(gemms) if gemms else "-", f"{flops / 1e9:.1f}" if gemms else "-",
                 f"{t * 1e3:.2f}" if cuda else f"{t:.3f}", f"±{spread * 100:.0f}%",
                 "-" if rate is None else f"{rate:.1f}"]
        if cuda:
            cells.append("-" if rate is None else f"{100 * rate / H100_BF16_PEAK_TFLOPS:.1f}")
            bound = _roofline_bound(r, family, case)
            cells.append("-" if bound is None else f"{100 * bound / t:.1f}")
        cells += [_ratio(r, ref) for ref in ratio_to]
        w = r.working
        cells += ["-" if w is None else f"{w:.3f}", "-" if w is None else f"{w * case.nv_bytes / 2**20:.0f}"]
        body.append(cells)
    out = [FAMILY_TITLES[family]]
    if family == "clamped_entropy":
        out[0] += f" (x{base_tag}: time / the plain-entropy fused row)"
    if body:
        out += ["  " + ln for ln in _table(headers, body, align)]
    for r in mine:
        if not r.ok:
            why = f"skipped: {r.skipped}" if r.skipped else f"failed: {r.error}"
            out.append(f"  - {PROVIDERS[r.provider].label} ({r.provider}): {why}")
    return out


def _machine(device) -> str:
    import torch

    if getattr(device, "type", device) == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def report(rows: List[Row], cases: Sequence[Case], device, preset: str, repeats: int) -> List[str]:
    from .. import __version__

    cuda = getattr(device, "type", device) == "cuda"
    out = [f"fused-entropy {__version__} bench, preset {preset}: {_machine(device)}"]
    if cuda:
        out.append("time: triton.testing.do_bench, median and half the p20-p80 range; memory: "
                   "max_memory_allocated growth beyond inputs and their gradients")
    else:
        out.append(f"time: fwd+bwd, median of {repeats} runs, spread = half the min-max range; memory: "
                   "peak RSS growth beyond inputs and their gradients; one process per row")
    out.append("ratios divide this row's time by that row's; GFLOP counts the [N,H]x[H,V] products only")
    for case in cases:
        b, t = case.seq
        out.append("")
        out.append(f"== N={case.n} tokens, H={case.h}, V={case.v}, {case.dtype}; GRPO: {b} sequences x {t} "
                   f"tokens; one fp32 [N,V] buffer = {case.nv_bytes / 2**20:.4g} MiB ==")
        for fam in FAMILIES:
            block = family_table(rows, fam, case, device)
            if block:
                out.append("")
                out += block
    return out


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ["preset", "device", "family", "provider", "label", "kind", "n", "h", "v", "dtype", "seq_len",
              "gemms", "gflop", "time_s", "time_lo_s", "time_hi_s", "spread", "x_floor", "x_baseline",
              "working_bytes", "working_frac_nv", "peak_bytes", "baseline_bytes", "grad_bytes",
              "memory_method", "status"]


def write_csv(path: str, rows: List[Row], preset: str, device) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            p = PROVIDERS[r.provider]
            rec = {"preset": preset, "device": str(device), "family": p.family, "provider": r.provider,
                   "label": p.label, "kind": p.kind, "n": r.case.n, "h": r.case.h, "v": r.case.v,
                   "dtype": r.case.dtype, "seq_len": r.case.seq_len}
            if r.ok:
                floor = _find(rows, FLOOR[p.family], r.case)
                base = _find(rows, BASELINE[p.family][0], r.case)
                gemms = r.result["gemms"]
                rec.update({k: r.result.get(k) for k in ("time_s", "time_lo_s", "time_hi_s", "spread",
                                                        "working_bytes", "peak_bytes", "baseline_bytes",
                                                        "grad_bytes", "memory_method")})
                rec.update(gemms=gemms, gflop=r.case.gemm_flops(gemms) / 1e9,
                           x_floor=None if floor is None else r.time / floor.time,
                           x_baseline=None if base is None else r.time / base.time,
                           working_frac_nv=r.working, status="ok")
            else:
                rec["status"] = f"skipped: {r.skipped}" if r.skipped else f"failed: {r.error}"
            w.writerow(rec)


def write_plot(path: str, rows: List[Row], cases: Sequence[Case], sweep: bool, device, base: Case) -> bool:
    """Quick: time and memory bars per provider. Sweep: time and memory vs N (at the base V) and vs V
    (at the base N), one line per provider, one row of panels per family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fams = [f for f in FAMILIES if any(PROVIDERS[r.provider].family == f and r.ok for r in rows)]
    if not fams:
        return False
    unit = 1e3 if getattr(device, "type", device) == "cuda" else 1.0
    tunit = "ms" if unit == 1e3 else "s"
    if not sweep:
        case = cases[0]
        fig, axes = plt.subplots(len(fams), 2, figsize=(13, 2.2 + 0.45 * len(rows)), squeeze=False)
        for ax_row, fam in zip(axes, fams):
            rs = [r for r in rows if r.ok and PROVIDERS[r.provider].family == fam and r.case == case]
            if fam == "clamped_entropy":  # next to the plain-entropy row it is compared with
                rs = [r for r in [_find(rows, BASELINE[fam][0], case)] if r is not None] + rs
            ys = list(range(len(rs)))
            times = [r.time * unit for r in rs]
            ax_row[0].barh(ys, times, color="tab:blue")
            ax_row[0].set_xlabel(f"fwd+bwd time ({tunit})")
            mem = [(y, r.working) for y, r in zip(ys, rs) if r.working is not None]
            ax_row[1].barh([m[0] for m in mem], [m[1] for m in mem], color="tab:orange")
            ax_row[1].set_xlabel("working memory / one fp32 [N, V] buffer")
            for y, t in zip(ys, times):
                ax_row[0].text(t, y, f" {t:.3g}", va="center", fontsize=8)
            for y, m in mem:
                ax_row[1].text(m, y, f" {m:.2g}", va="center", fontsize=8)
            for y, r in zip(ys, rs):
                if r.working is None:
                    ax_row[1].text(0, y, " n/a", va="center", fontsize=8, color="gray")
            ax_row[0].set_yticks(ys, [_label(r, device) for r in rs])
            ax_row[1].set_yticks(ys, [""] * len(ys))
            ax_row[0].set_title(FAMILY_TITLES[fam].split(":")[0], loc="left", fontsize=10)
            for ax in ax_row:
                ax.set_ylim(len(ys) - 0.5, -0.5)
                ax.margins(x=0.15)
                ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"N={case.n}, H={case.h}, V={case.v}, {case.dtype}", fontsize=10)
    else:
        fig, axes = plt.subplots(len(fams), 4, figsize=(20, 3.6 * len(fams)), squeeze=False)
        for ax_row, fam in zip(axes, fams):
            names = [n for n in PROVIDERS if PROVIDERS[n].family == fam]
            for col, (axis, fixed) in enumerate((("n", "v"), ("v", "n"))):
                for idx, name in enumerate(names):
                    color = f"C{idx % 10}"  # one color per provider in both panels
                    pts = sorted((getattr(r.case, axis), r) for r in rows if r.ok and r.provider == name
                                 and getattr(r.case, fixed) == getattr(base, fixed))
                    if len(pts) < 1:
                        continue
                    xs = [x for x, _ in pts]
                    ax_row[2 * col].plot(xs, [r.time * unit for _, r in pts], "o-", color=color,
                                         label=_label(pts[0][1], device))
                    mem = [(x, r.working) for x, r in pts if r.working is not None]
                    if mem:
                        ax_row[2 * col + 1].plot([m[0] for m in mem], [max(m[1], 1e-4) for m in mem], "o-",
                                                 color=color)
                ax_row[2 * col].set_xlabel(f"{axis.upper()} ({fixed.upper()}={getattr(base, fixed)})")
                ax_row[2 * col + 1].set_xlabel(f"{axis.upper()} ({fixed.upper()}={getattr(base, fixed)})")
                ax_row[2 * col].set_ylabel(f"time ({tunit})")
                ax_row[2 * col + 1].set_ylabel("memory / fp32 [N,V]")
            for ax in ax_row:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(alpha=0.3)
            ax_row[0].set_title(FAMILY_TITLES[fam].split(":")[0], loc="left", fontsize=10)
            ax_row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _select(spec: Optional[str], preset: str) -> List[str]:
    if not spec:
        return list(QUICK if preset == "quick" else SWEEP)
    names: List[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            names += list(PROVIDERS)
        elif item in FAMILIES:
            names += [n for n in PROVIDERS if PROVIDERS[n].family == item]
        elif item in PROVIDERS:
            names.append(item)
        else:
            raise SystemExit(f"fused-entropy bench: unknown provider or family {item!r}; "
                             f"choose from {', '.join(FAMILIES + tuple(PROVIDERS))}")
    return list(dict.fromkeys(names))


def build_parser(prog: str = "fused-entropy bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="providers: " + ", ".join(PROVIDERS) + "\nfamilies: " + ", ".join(FAMILIES))
    ap.add_argument("--preset", choices=("quick", "sweep"), default="quick",
                    help="quick: one default case, main rows (default); sweep: N and V sweeps, every row")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when a GPU is visible, else cpu")
    ap.add_argument("--providers", help="comma-separated provider names or families, or 'all' "
                                        "(default: the preset's rows)")
    ap.add_argument("--n", type=int, help="tokens (overrides the preset's case)")
    ap.add_argument("--h", type=int, help="hidden size")
    ap.add_argument("--v", type=int, help="vocabulary size")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="input dtype")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence in the GRPO rows")
    ap.add_argument("--repeats", type=int,
                    help="timed fwd+bwd runs per row on CPU (default: 2 for quick, to stay under 2 minutes "
                         "on a 2-core CPU; 3 for sweep)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row before it is abandoned")
    ap.add_argument("--out", help="directory for bench_<preset>_<device>.csv and .png")
    ap.add_argument("--spawn", action="store_true",
                    help="start every CPU row with python -m instead of forking it from a server that "
                         "has imported the packages once (slower start, same measurement)")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr (tracebacks, warnings)")
    ap.add_argument("--list", action="store_true", help="list the providers and whether each can run here")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fused-entropy bench: --device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    if args.list:
        for name, p in PROVIDERS.items():
            why = unavailable(p, device)
            print(f"{name:20s} {p.family:16s} {p.label:48s} {'ok' if why is None else why}")
        return 0
    base = DEFAULT_CASE[device.type]
    over = {k: getattr(args, k) for k in ("n", "h", "v", "dtype") if getattr(args, k) is not None}
    if args.seq_len is not None:
        over["seq_len"] = args.seq_len
    base = replace(base, **over)
    if args.preset == "sweep":
        cases = list(dict.fromkeys([replace(base, n=n) for n in SWEEP_N] + [replace(base, v=v) for v in SWEEP_V]))
    else:
        cases = [base]
    names = _select(args.providers, args.preset)
    if args.repeats is None:
        args.repeats = 2 if args.preset == "quick" else 3
    if args.repeats < 1:
        raise SystemExit("fused-entropy bench: --repeats must be at least 1")
    t0 = time.perf_counter()
    rows = run_rows(names, cases, device, args.repeats, args.timeout, spawn=args.spawn, verbose=args.verbose)
    lines = report(rows, cases, device, args.preset, args.repeats)
    lines += ["", f"total wall time {time.perf_counter() - t0:.0f} s"]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"bench_{args.preset}_{device.type}")
        write_csv(stem + ".csv", rows, args.preset, device)
        lines.append(f"wrote {stem}.csv")
        if write_plot(stem + ".png", rows, cases, args.preset == "sweep", device, base):
            lines.append(f"wrote {stem}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
