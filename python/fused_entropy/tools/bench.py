"""``fused-entropy bench``: speed and working memory of this package next to the tools people use today.

Method. For each case, every provider (see :mod:`fused_entropy.tools.bench_providers`) gets a warm
worker process of its own (:mod:`fused_entropy.tools.bench_worker`, which documents how time and
memory are taken); then the providers are timed in rounds, one step each per round (A B C, A B C,
... at least 6 rounds), so a change in the machine's load lands on every provider alike. A row's time
is the median over the rounds with its 95% confidence interval, the distribution-free interval of a
median from order statistics (``scipy.stats.quantile_test``; with 6-8 rounds it is the range of the
samples). Ratios divide medians; a ratio's interval runs from the lowest to the highest quotient of
the two intervals, and it is marked ``ns`` (not significant) when the two intervals overlap.

Rows are grouped by what they compute; in each group every row's time is divided by

- the matrix-multiply floor measured in the same rounds (``xfloor``): the GEMMs the fused algorithm
  must do, alone, at the fastest of several row chunkings (4 for ``linear_logprobs``: forward,
  recompute, dX, dW; 3 for the single-pass GRPO loss),
- the eager materialized reference (``xeager``; for clamped entropy: the plain-entropy fused row),
- each peer library's row (``xTRL``, ``xLiger``...).

Working memory is printed in MiB and as a fraction of one fp32 ``[N, V]`` buffer.

Presets (:data:`bench_providers.PRESETS`, the case list the pytest-benchmark suite uses too):
``quick`` (default): one case (CPU: N=2048, H=512, V=32768, fp32; CUDA: N=8192, H=4096, V=131072,
bf16), the main rows, 6 rounds (about 6 minutes on a quiet 2-core CPU). ``sweep``: N from 1k to 32k
at the base V and V from 32k to 256k at the base N (``--sweep-n``, ``--sweep-v`` to choose others),
every provider; rows that would not fit in free memory are skipped. ``small``: the suite's case.
``--out DIR`` writes ``bench_<preset>_<device>.csv``, ``.txt`` and ``.png``.

Exit status: 0 when every row that could run was measured, 1 when any row failed, 2 for invalid
arguments.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .bench_providers import FAMILIES, FAMILY_TITLES, PRESETS, PROVIDERS, Case, unavailable

H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
CONFIDENCE = 0.95
MIN_ROUNDS = 6  # the fewest samples whose median has a 95% distribution-free interval
DEFAULT_ROUNDS = 6

# the column each family divides by (xeager); the clamped rows are compared with plain entropy
BASELINE = {"linear_logprobs": ("reference", "eager"), "clamped_entropy": ("fused", "plain H"),
            "sampling": ("fused", "plain"),
            "grpo": ("reference-grpo", "eager"), "logits": ("reference-logits", "eager")}
FLOOR = {"linear_logprobs": "floor", "clamped_entropy": "floor", "sampling": "floor", "grpo": "floor-grpo", "logits": None}
PEER_SHORT = {"trl": "TRL", "liger-ce": "Liger", "liger-grpo": "Liger", "trl-grpo": "TRL", "trl-logits": "TRL"}


# ---------------------------------------------------------------------------------------------
# statistics: medians, their intervals, ratios
# ---------------------------------------------------------------------------------------------


def median_ci(times: Sequence[float], confidence: float = CONFIDENCE) -> Tuple[float, float, float]:
    """(median, low, high): the sample median and its distribution-free confidence interval
    (``scipy.stats.quantile_test(...).confidence_interval``, from order statistics)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(times, dtype=float)
    med = float(np.median(x))
    ci = stats.quantile_test(x, q=med, p=0.5).confidence_interval(confidence_level=confidence)
    return med, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Ratio:
    value: float
    low: float
    high: float
    significant: bool  # the two intervals do not overlap

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}-{self.high:.2f}]" + ("" if self.significant else " ns")


def ratio(a: "Row", b: "Row") -> Ratio:
    (ma, la, ha), (mb, lb, hb) = a.stats, b.stats
    return Ratio(ma / mb, la / hb, ha / lb, ha < lb or hb < la)


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    provider: str
    case: Case
    result: Dict = field(default_factory=dict)  # the worker's close() JSON, times_s over the rounds
    skipped: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.error and bool(self.result.get("times_s"))

    @property
    def stats(self) -> Tuple[float, float, float]:
        if "_stats" not in self.result:
            self.result["_stats"] = median_ci(self.result["times_s"])
        return self.result["_stats"]

    @property
    def time(self) -> float:
        return self.stats[0]

    @property
    def working(self) -> Optional[float]:
        w = self.result.get("working_bytes")
        return None if w is None else max(0, w) / self.case.nv_bytes


# ---------------------------------------------------------------------------------------------
# workers
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


class _Lines:
    """A JSON-lines conversation with a process (the fork server, or one spawned worker)."""

    def __init__(self, cmd: List[str], verbose: bool):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None if verbose else subprocess.DEVNULL, text=True, bufsize=1)

    def ask(self, req: dict) -> Optional[dict]:
        """The reply, or None when the process has gone."""
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            return None
        return json.loads(line) if line.strip() else None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class ForkServer(_Lines):
    """``bench_worker --serve``: imports the packages once; forks and relays one worker per provider (CPU)."""

    def __init__(self, names: Sequence[str], verbose: bool = False):
        mods = ["fused_entropy", "fused_entropy.modules"]
        for n in names:
            mods += [m for m in PROVIDERS[n].preload if m not in mods]
        super().__init__([sys.executable, "-m", "fused_entropy.tools.bench_worker", "--serve",
                          "--preload", ",".join(mods)], verbose)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("bench fork server did not start")
        self.next_id = 0


class Worker:
    """One provider's warm process: through the fork server (CPU) or spawned (CUDA, ``--spawn``)."""

    def __init__(self, name: str, case: Case, device, timeout: float, server: Optional[ForkServer], verbose: bool):
        from .bench_worker import open_request

        self.server, self.spawned = server, None
        req = open_request(name, case, str(device), timeout)
        if server is not None:
            server.next_id += 1
            self.id = server.next_id
            req["id"] = self.id
            reply = server.ask(req)
        else:
            self.spawned = _Lines([sys.executable, "-m", "fused_entropy.tools.bench_worker", "--session"], verbose)
            reply = self.spawned.ask(req)
        self.error = _reply_error(reply)
        self.info = (reply or {}).get("info", {})
        self.closed = self.error is not None
        if self.closed and self.spawned is not None:
            self.spawned.close()

    def _ask(self, op: str) -> Optional[dict]:
        if self.server is not None:
            return self.server.ask({"op": op, "id": self.id})
        return self.spawned.ask({"op": op})

    def step(self) -> Tuple[Optional[float], Optional[str]]:
        reply = self._ask("step")
        err = _reply_error(reply)
        return (None, err) if err else (float(reply["time_s"]), None)

    def close(self) -> Tuple[dict, Optional[str]]:
        self.closed = True
        reply = self._ask("close")
        if self.spawned is not None:
            self.spawned.close()
        err = _reply_error(reply)
        return (reply or {}), err


def _reply_error(reply: Optional[dict]) -> Optional[str]:
    if reply is None:
        return "the worker process has gone (out of memory?)"
    return reply.get("error")


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def run_rows(names: Sequence[str], cases: Sequence[Case], device, rounds: int, timeout: float,
             spawn: bool = False, verbose: bool = False, log=sys.stderr) -> List[Row]:
    """Measure every (case, provider): per case, one warm worker per provider, then ``rounds`` rounds
    of one timed step per provider in turn. Workers are forked from a fork server on CPU, spawned
    (``python -m``) on CUDA (a CUDA context does not survive fork) or with ``spawn``."""
    rows: List[Row] = []
    cpu = getattr(device, "type", device) == "cpu"
    server = None
    if not spawn and cpu and hasattr(os, "fork"):
        server = ForkServer([n for n in names if unavailable(PROVIDERS[n], device) is None], verbose)
    try:
        for ci, case in enumerate(cases, 1):
            head = f"[case {ci}/{len(cases)}: N={case.n} H={case.h} V={case.v} {case.dtype}]"
            print(f"{head} load average {_load()}", file=log, flush=True)
            workers: Dict[str, Worker] = {}
            case_rows: Dict[str, Row] = {}
            for name in names:
                reason = unavailable(PROVIDERS[name], device)
                if reason is None:
                    need, have = _needed_bytes(name, case), _available_bytes(device)
                    if need > 0.85 * have:
                        reason = f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free"
                if reason is not None:
                    case_rows[name] = Row(name, case, skipped=reason)
                    print(f"{head} {name}: skipped ({reason})", file=log, flush=True)
                    continue
                t0 = time.perf_counter()
                w = Worker(name, case, device, timeout, server, verbose)
                if w.error:
                    case_rows[name] = Row(name, case, error=w.error)
                    print(f"{head} {name}: failed to start ({w.error})", file=log, flush=True)
                    continue
                workers[name] = w
                case_rows[name] = Row(name, case, result={"times_s": []})
                print(f"{head} {name}: ready ({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
            for r in range(1, rounds + 1):
                got = []
                for name, w in workers.items():
                    if w.closed:
                        continue
                    t, err = w.step()
                    if err:
                        case_rows[name].error = f"round {r}: {err}"
                        w.close()
                        got.append(f"{name} failed")
                        continue
                    case_rows[name].result["times_s"].append(t)
                    got.append(f"{name} {t:.3g}")
                print(f"{head} round {r}/{rounds}: " + ", ".join(got), file=log, flush=True)
            for name, w in workers.items():
                if w.closed:
                    continue
                res, err = w.close()
                row = case_rows[name]
                if err:
                    row.error = f"close: {err}"
                else:
                    res["times_s"] = row.result["times_s"]
                    row.result = res
            rows += [case_rows[n] for n in names]
    finally:
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
    cuda = getattr(device, "type", device) == "cuda"
    if p.kind == "floor":
        chunk = (row.result.get("info") or {}).get("chunk_rows")
        if chunk is not None:
            label += f", best chunking: {chunk} rows" if chunk < row.case.n else ", best: unchunked"
    elif p.name in ("fused", "fused-logp", "fused-topk64", "fused-clamp0.3", "fused-logits"):
        label += " [triton]" if cuda else " [torch]"
    if p.cpu_note and not cuda:
        label += " (CPU fallback)"
    return label


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
    unit, uname = (1e3, "ms") if cuda else (1.0, "s")
    headers = ["provider", "GEMMs", "GFLOP", f"median {uname}", "95% CI", "TFLOP/s" if cuda else "GFLOP/s"]
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
    headers += ["MiB", "mem/[N,V]"]
    align += "rr"
    body = []
    for r in measured:
        gemms = r.result["gemms"]
        flops = case.gemm_flops(gemms)
        t, lo, hi = r.stats
        rate = flops / t / (1e12 if cuda else 1e9) if gemms else None
        cells = [_label(r, device), str(gemms) if gemms else "-", f"{flops / 1e9:.1f}" if gemms else "-",
                 f"{t * unit:.4g}", f"{lo * unit:.4g}-{hi * unit:.4g}", "-" if rate is None else f"{rate:.1f}"]
        if cuda:
            cells.append("-" if rate is None else f"{100 * rate / H100_BF16_PEAK_TFLOPS:.1f}")
            bound = _roofline_bound(r, family, case)
            cells.append("-" if bound is None else f"{100 * bound / t:.1f}")
        cells += ["1" if ref is r else str(ratio(r, ref)) for ref in ratio_to]
        w = r.working
        cells += ["-" if w is None else f"{w * case.nv_bytes / 2**20:.0f}", "-" if w is None else f"{w:.3f}"]
        body.append(cells)
    out = [FAMILY_TITLES[family]]
    if family in ("clamped_entropy", "sampling"):
        out[0] += f" (x{base_tag}: time / the plain-entropy fused row)"
    if body:
        out += ["  " + ln for ln in _table(headers, body, align)]
    notes = {PROVIDERS[r.provider].cpu_note for r in measured if PROVIDERS[r.provider].cpu_note and not cuda}
    out += [f"  note: {n}" for n in sorted(notes)]
    for r in mine:
        if not r.ok:
            why = f"skipped: {r.skipped}" if r.skipped else f"FAILED: {r.error}"
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


def report(rows: List[Row], cases: Sequence[Case], device, preset: str, rounds: int,
           context: Sequence[str] = ()) -> List[str]:
    from .. import __version__

    cuda = getattr(device, "type", device) == "cuda"
    out = [f"fused-entropy {__version__} bench, preset {preset}: {_machine(device)}"]
    out += list(context)
    step = ("one triton.testing.do_bench median per provider per round" if cuda
            else "one fwd+bwd step per provider per round")
    out.append(f"time: {rounds} interleaved rounds (A B C, A B C, ...; {step}), each provider in a warm "
               f"process of its own; median over the rounds and its {CONFIDENCE:.0%} distribution-free interval "
               "(scipy.stats.quantile_test)")
    out.append("ratios: this row's median / that row's, [lowest-highest quotient of the two intervals]; "
               "ns = not significant (the two intervals overlap)")
    if cuda:
        out.append("memory: max_memory_allocated growth beyond inputs and their gradients, one step")
    else:
        out.append("memory: peak RSS growth beyond inputs and their gradients, over every round")
    out.append("GFLOP counts the [N,H]x[H,V] products only")
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
              "gemms", "gflop", "rounds", "time_s", "time_ci_lo_s", "time_ci_hi_s", "times_s",
              "x_floor", "x_floor_lo", "x_floor_hi", "x_floor_significant",
              "x_baseline", "x_baseline_lo", "x_baseline_hi", "x_baseline_significant",
              "working_bytes", "working_frac_nv", "peak_bytes", "baseline_bytes", "grad_bytes",
              "memory_method", "info", "status"]


def write_csv(path: str, rows: List[Row], preset: str, device) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            p = PROVIDERS[r.provider]
            rec = {"preset": preset, "device": str(device), "family": p.family, "provider": r.provider,
                   "label": _label(r, device), "kind": p.kind, "n": r.case.n, "h": r.case.h, "v": r.case.v,
                   "dtype": r.case.dtype, "seq_len": r.case.seq_len}
            if r.ok:
                t, lo, hi = r.stats
                gemms = r.result["gemms"]
                rec.update({k: r.result.get(k) for k in ("working_bytes", "peak_bytes", "baseline_bytes",
                                                        "grad_bytes", "memory_method")})
                rec.update(gemms=gemms, gflop=r.case.gemm_flops(gemms) / 1e9, rounds=len(r.result["times_s"]),
                           time_s=t, time_ci_lo_s=lo, time_ci_hi_s=hi, times_s=json.dumps(r.result["times_s"]),
                           working_frac_nv=r.working, info=json.dumps(r.result.get("info") or {}), status="ok")
                for key, ref in (("x_floor", _find(rows, FLOOR[p.family], r.case)),
                                 ("x_baseline", _find(rows, BASELINE[p.family][0], r.case))):
                    if ref is not None:
                        q = ratio(r, ref)
                        rec.update({key: q.value, f"{key}_lo": q.low, f"{key}_hi": q.high,
                                    f"{key}_significant": q.significant})
            else:
                rec["status"] = f"skipped: {r.skipped}" if r.skipped else f"failed: {r.error}"
            w.writerow(rec)


def write_plot(path: str, rows: List[Row], cases: Sequence[Case], sweep: bool, device, base: Case) -> bool:
    """Quick: time (median and interval) and memory bars per provider. Sweep: time and memory vs N (at
    the base V) and vs V (at the base N), one line per provider, one row of panels per family."""
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
        n_rows = sum(1 for r in rows if r.ok)
        fig, axes = plt.subplots(len(fams), 2, figsize=(13, 2.2 + 0.45 * n_rows), squeeze=False)
        for ax_row, fam in zip(axes, fams):
            rs = [r for r in rows if r.ok and PROVIDERS[r.provider].family == fam and r.case == case]
            if fam == "clamped_entropy":  # next to the plain-entropy row it is compared with
                rs = [r for r in [_find(rows, BASELINE[fam][0], case)] if r is not None] + rs
            ys = list(range(len(rs)))
            times = [r.time * unit for r in rs]
            err = [[(r.stats[0] - r.stats[1]) * unit for r in rs], [(r.stats[2] - r.stats[0]) * unit for r in rs]]
            ax_row[0].barh(ys, times, xerr=err, color="tab:blue", capsize=3)
            ax_row[0].set_xlabel(f"fwd+bwd time ({tunit}): median, {CONFIDENCE:.0%} interval")
            mem = [(y, r.working * r.case.nv_bytes / 2**20) for y, r in zip(ys, rs) if r.working is not None]
            ax_row[1].barh([m[0] for m in mem], [m[1] for m in mem], color="tab:orange")
            ax_row[1].set_xlabel("working memory (MiB)")
            for y, t in zip(ys, times):
                ax_row[0].text(t, y, f" {t:.3g}", va="bottom", fontsize=8)
            for y, m in mem:
                ax_row[1].text(m, y, f" {m:.0f}", va="center", fontsize=8)
            for y, r in zip(ys, rs):
                if r.working is None:
                    ax_row[1].text(0, y, " n/a", va="center", fontsize=8, color="gray")
            ax_row[0].set_yticks(ys, [_label(r, device) for r in rs])
            ax_row[1].set_yticks(ys, [""] * len(ys))
            ax_row[1].set_xscale("symlog", linthresh=10)
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
                    pts = sorted(((getattr(r.case, axis), r) for r in rows if r.ok and r.provider == name
                                  and getattr(r.case, fixed) == getattr(base, fixed)), key=lambda p: p[0])
                    if not pts:
                        continue
                    xs = [x for x, _ in pts]
                    med = [r.stats[0] * unit for _, r in pts]
                    err = [[(r.stats[0] - r.stats[1]) * unit for _, r in pts],
                           [(r.stats[2] - r.stats[0]) * unit for _, r in pts]]
                    ax_row[2 * col].errorbar(xs, med, yerr=err, fmt="o-", color=color, capsize=2,
                                             label=_label(pts[0][1], device).split(", best")[0])
                    mem = [(x, r.working * r.case.nv_bytes / 2**20) for x, r in pts if r.working is not None]
                    if mem:
                        ax_row[2 * col + 1].plot([m[0] for m in mem], [max(m[1], 0.1) for m in mem], "o-",
                                                 color=color)
                ax_row[2 * col].set_xlabel(f"{axis.upper()} ({fixed.upper()}={getattr(base, fixed)})")
                ax_row[2 * col + 1].set_xlabel(f"{axis.upper()} ({fixed.upper()}={getattr(base, fixed)})")
                ax_row[2 * col].set_ylabel(f"time ({tunit})")
                ax_row[2 * col + 1].set_ylabel("working memory (MiB)")
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


def _select(spec: Optional[str], preset: str, ap: argparse.ArgumentParser) -> List[str]:
    if not spec:
        return list(PRESETS[preset].providers)
    names: List[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            names += list(PROVIDERS)
        elif item in FAMILIES:
            names += [n for n in PROVIDERS if PROVIDERS[n].family == item]
        elif item in PROVIDERS:
            names.append(item)
        else:
            ap.error(f"unknown provider or family {item!r}; choose from {', '.join(FAMILIES + tuple(PROVIDERS))}")
    if not names:
        ap.error("--providers names no provider")
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_ints(text: str) -> Tuple[int, ...]:
    return tuple(_positive_int(t) for t in text.split(",") if t.strip())


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser(prog: str = "fused-entropy bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="providers: " + ", ".join(PROVIDERS) + "\nfamilies: " + ", ".join(FAMILIES))
    ap.add_argument("--preset", choices=tuple(PRESETS), default="quick",
                    help="; ".join(f"{p.name}: {p.about}" for p in PRESETS.values()) + " (default quick)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when a GPU is visible, else cpu")
    ap.add_argument("--providers", help="comma-separated provider names or families, or 'all' "
                                        "(default: the preset's rows)")
    ap.add_argument("--n", type=_positive_int, help="tokens (overrides the preset's base case)")
    ap.add_argument("--h", type=_positive_int, help="hidden size")
    ap.add_argument("--v", type=_positive_int, help="vocabulary size")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="input dtype")
    ap.add_argument("--seq-len", type=_positive_int, help="tokens per sequence in the GRPO rows")
    ap.add_argument("--sweep-n", type=_positive_ints, help="sweep: comma-separated N values (at the base V)")
    ap.add_argument("--sweep-v", type=_positive_ints, help="sweep: comma-separated V values (at the base N)")
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=_positive_int, default=DEFAULT_ROUNDS,
                    help=f"interleaved rounds, one timed step per provider each (default {DEFAULT_ROUNDS}, "
                         f"at least {MIN_ROUNDS})")
    ap.add_argument("--timeout", type=_positive_float, default=1800.0,
                    help="seconds a worker may take to start or to run one step before it is abandoned")
    ap.add_argument("--out", help="directory for bench_<preset>_<device>.csv, .txt and .png")
    ap.add_argument("--spawn", action="store_true",
                    help="start every CPU worker with python -m instead of forking it from a server that "
                         "has imported the packages once (slower start, same measurement)")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr (tracebacks, warnings)")
    ap.add_argument("--list", action="store_true", help="list the providers and whether each can run here")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        ap.error(f"--rounds must be at least {MIN_ROUNDS} (the fewest samples whose median has a "
                 f"{CONFIDENCE:.0%} distribution-free interval), got {args.rounds}")
    if (args.sweep_n or args.sweep_v) and args.preset != "sweep":
        ap.error("--sweep-n/--sweep-v need --preset sweep")
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        ap.error("the bench needs scipy for its confidence intervals: pip install 'fused-entropy[bench]'")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    names = _select(args.providers, args.preset, ap)
    if args.list:
        for name, p in PROVIDERS.items():
            why = unavailable(p, device)
            print(f"{name:20s} {p.family:16s} {p.label:48s} {'ok' if why is None else why}")
        return 0
    preset = PRESETS[args.preset]
    over = {k: getattr(args, k) for k in ("n", "h", "v", "dtype", "seq_len") if getattr(args, k) is not None}
    base = replace(preset.base[device.type], **over)
    cases = preset.cases(device.type, base, args.sweep_n, args.sweep_v)
    started = datetime.datetime.now().astimezone()
    load_before = _load()
    t0 = time.perf_counter()
    rows = run_rows(names, cases, device, args.rounds, args.timeout, spawn=args.spawn, verbose=args.verbose)
    wall = time.perf_counter() - t0
    context = [f"run {started:%Y-%m-%d %H:%M %Z}, {wall / 60:.1f} min; load average (1/5/15 min) "
               f"before {load_before}, after {_load()}"]
    if preset.sweep_n or preset.sweep_v:
        context.append("sweep grid: N " + ",".join(map(str, args.sweep_n or preset.sweep_n)) + f" at V={base.v}; V "
                       + ",".join(map(str, args.sweep_v or preset.sweep_v)) + f" at N={base.n}")
    context.append("command: fused-entropy bench " + " ".join(sys.argv[1:] if argv is None else argv))
    lines = report(rows, cases, device, args.preset, args.rounds, context)
    failed = [r for r in rows if r.error]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"bench_{args.preset}_{device.type}")
        write_csv(stem + ".csv", rows, args.preset, device)
        with open(stem + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
        lines.append(f"wrote {stem}.csv, {stem}.txt")
        if write_plot(stem + ".png", rows, cases, args.preset == "sweep", device, base):
            lines.append(f"wrote {stem}.png")
    print("\n".join(lines))
    if failed:
        print(f"fused-entropy bench: {len(failed)} row(s) failed: "
              + "; ".join(f"{r.provider} (N={r.case.n}, V={r.case.v}): {r.error}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
