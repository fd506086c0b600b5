"""What the bench writes: the per-family tables with their ratios and roofline fractions, the CSV
and the plot."""
from __future__ import annotations

import csv
import json
import os
import platform
from typing import List, Optional, Sequence

from .providers import FAMILIES, FAMILY_TITLES, PROVIDERS, Case

from ..roofline import H100_SXM, workload_bound
from .stats import CONFIDENCE, Row, ratio

H100_BF16_PEAK_TFLOPS = H100_SXM["tflops"]  # dense bf16, the roofline's peak

# the column each family divides by (xeager); the clamped rows are compared with plain entropy
BASELINE = {"linear_logprobs": ("reference", "eager"), "clamped_entropy": ("fused", "plain H"),
            "sampling": ("fused", "plain"),
            "grpo": ("reference-grpo", "eager"), "logits": ("reference-logits", "eager")}
FLOOR = {"linear_logprobs": "floor", "clamped_entropy": "floor", "sampling": "floor", "grpo": "floor-grpo", "logits": None}
PEER_SHORT = {"trl": "TRL", "liger-ce": "Liger", "liger-grpo": "Liger", "trl-grpo": "TRL", "trl-logits": "TRL"}


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


# bench family -> the roofline workload (fused_entropy.tools.roofline) that bounds this package's rows
ROOFLINE_WORKLOAD = {"linear_logprobs": "linear", "clamped_entropy": "linear+clamped", "logits": "logits"}


def _roofline_bound(r: "Row", family: str, case: Case) -> Optional[float]:
    """Lower-bound seconds (on paper, H100 SXM) for a row of this package, None for peers/other rows."""
    workload = ROOFLINE_WORKLOAD.get(family)
    if workload is None or PROVIDERS[r.provider].kind == "peer" or r.provider.startswith(("floor", "reference")):
        return None
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
    from ... import __version__

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
