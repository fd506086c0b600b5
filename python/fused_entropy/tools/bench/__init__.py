"""``fused-entropy bench``: speed and working memory of this package next to the tools people use today.

Method. For each case, every provider (see :mod:`.providers`) gets a warm worker process of its own
(:mod:`.worker`, which documents how time and memory are taken); then the providers are timed in
rounds, one step each per round (A B C, A B C, ... at least 6 rounds), so a change in the machine's
load lands on every provider alike. A row's time is the median over the rounds with its 95%
confidence interval, the distribution-free interval of a median from order statistics
(``scipy.stats.quantile_test``; with 6-8 rounds it is the range of the samples). Ratios divide medians; a ratio's interval runs from the lowest to the highest quotient of
the two intervals, and it is marked ``ns`` (not significant) when the two intervals overlap.

Rows are grouped by what they compute; in each group every row's time is divided by

- the matrix-multiply floor measured in the same rounds (``xfloor``): the GEMMs the fused algorithm
  must do, alone, at the fastest of several row chunkings (4 for ``linear_logprobs``: forward,
  recompute, dX, dW; 3 for the single-pass GRPO loss),
- the eager materialized reference (``xeager``; for clamped entropy: the plain-entropy fused row),
- each peer library's row (``xTRL``, ``xLiger``...).

Working memory is printed in MiB and as a fraction of one fp32 ``[N, V]`` buffer.

Presets (:data:`providers.PRESETS`, the case list the pytest-benchmark suite uses too):
``quick`` (default): one case (CPU: N=2048, H=512, V=32768, fp32; CUDA: N=8192, H=4096, V=131072,
bf16), the main rows, 6 rounds (about 6 minutes on a quiet 2-core CPU). ``sweep``: N from 1k to 32k
at the base V and V from 32k to 256k at the base N (``--sweep-n``, ``--sweep-v`` to choose others),
every provider; rows that would not fit in free memory are skipped. ``small``: the suite's case.
``--out DIR`` writes ``bench_<preset>_<device>.csv``, ``.txt`` and ``.png``.

Exit status: 0 when every row that could run was measured, 1 when any row failed, 2 for invalid
arguments.

Layout: :mod:`.providers` (what a row computes; the presets), :mod:`.worker` (one provider's process),
:mod:`.runner` (the workers and the interleaved rounds), :mod:`.stats` (medians, intervals, ratios,
:class:`Row`), :mod:`.report` (tables, CSV, plot; roofline fractions from
:mod:`fused_entropy.tools.roofline`), this module (the command line).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from .providers import FAMILIES, PRESETS, PROVIDERS, Case, unavailable  # noqa: F401
from .report import CSV_FIELDS, family_table, report, write_csv, write_plot  # noqa: F401
from .runner import ForkServer, Worker, _load, run_rows  # noqa: F401
from .stats import CONFIDENCE, DEFAULT_ROUNDS, MIN_ROUNDS, Ratio, Row, median_ci, ratio  # noqa: F401

# main() calls run_rows through this module's namespace (tests replace it here)

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
