"""Measure one provider on one case in a process of its own; report the result as one JSON line.

Two ways to get that process, both driven by ``fused-entropy bench``:

- ``python -m fused_entropy.tools.bench_worker --provider NAME --n N --h H --v V ...`` measures one
  row and prints its JSON (used on CUDA, with ``--spawn``, and by hand).
- ``python -m fused_entropy.tools.bench_worker --serve --preload mod,...`` is a fork server for CPU
  runs: it imports torch and the peers' packages once (importing TRL and transformers alone takes
  ~8 s of CPU here, more than most rows), then for each request line on stdin forks a fresh child
  process that measures the row and writes one JSON line back. The server itself never runs a torch
  operation, so every child starts with the allocator, thread pools and peak of a just-imported
  process.

Time (forward + backward of one ``Run.step``, gradients reset to None before every step):

- CPU: ``time.perf_counter`` around each of ``repeats`` steps; median, min and max are reported.
- CUDA: ``triton.testing.do_bench`` (``grad_to_none`` = the inputs, quantiles 0.5/0.2/0.8).

Working memory = peak memory during the measured steps - memory before them - the gradients' bytes,
i.e. the growth beyond the inputs and their gradients (which any implementation must hold):

- CPU: resident set size from the OS. Before the full-size inputs exist, the provider runs once on a
  tiny case so that lazy imports, thread pools and kernel caches do not count. Then the inputs are
  built, ``baseline = VmRSS``, the high-water mark is reset by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux), and after the steps ``peak = VmHWM``. Where the mark cannot be
  reset, ``ru_maxrss`` (the lifetime peak) is used instead. The peak is taken over all repeats from
  one baseline, so memory the allocator keeps after a step is not hidden by a later baseline. This
  matters: glibc raises its mmap threshold after freeing a large block, so from the second step on,
  blocks of a few MiB that a step allocates and frees can stay resident on the heap. The steady
  state of a training loop is the second step, not the first; use ``repeats >= 2``.
  ``torch.compile`` rows warm up at full size (compilation specializes on shapes), so their baseline
  includes what the allocator kept from that first call.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step, for one step with the gradients reset.

Floors have no gradients; their memory is not reported.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import signal
import statistics
import sys
import time
import traceback

import torch

from .bench_providers import PROVIDERS, Case

TINY = Case(n=64, h=32, v=512, seq_len=16)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_cpu(run, repeats: int):
    gc.collect()
    run.reset()
    baseline = _status_kib("VmRSS") * 1024
    exact = _reset_hwm()
    times = []
    for _ in range(repeats):
        run.reset()
        t0 = time.perf_counter()
        run.step()
        times.append(time.perf_counter() - t0)
    if exact:
        peak = _status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    method = "VmHWM" if exact else "ru_maxrss"
    return (statistics.median(times), min(times), max(times)), times, baseline, peak, method


def measure_cuda(run, repeats: int):
    from triton.testing import do_bench

    run.reset()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    run.reset()
    med, lo, hi = do_bench(run.step, grad_to_none=run.leaves or None, quantiles=[0.5, 0.2, 0.8],
                           rep=max(100, 40 * repeats))
    # do_bench reports milliseconds; (p20, p80) is the spread
    return (med / 1e3, lo / 1e3, hi / 1e3), None, baseline, peak, "max_memory_allocated"


def measure(name: str, case: Case, device: torch.device, repeats: int) -> dict:
    p = PROVIDERS[name]
    torch.manual_seed(0)
    tiny = p.build(TINY, device)
    tiny.step()
    tiny.reset()
    del tiny
    run = p.build(case, device)
    if p.full_warmup or device.type == "cuda":  # compilation, autotuning; a GPU step is cheap
        run.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        (median, lo, hi), times, baseline, peak, method = measure_cuda(run, repeats)
    else:
        (median, lo, hi), times, baseline, peak, method = measure_cpu(run, repeats)
    working = None if p.kind == "floor" else peak - baseline - run.grad_bytes
    return {
        "provider": name,
        "time_s": median,
        "time_lo_s": lo,
        "time_hi_s": hi,
        "spread": "p20-p80" if device.type == "cuda" else "min-max",
        "times_s": times,
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "grad_bytes": run.grad_bytes,
        "working_bytes": working,
        "memory_method": method,
        "gemms": p.gemms(case, device),
    }


def request(name: str, case: Case, device: str, repeats: int, timeout: float = 0) -> dict:
    return {"provider": name, "case": [case.n, case.h, case.v, case.dtype, case.seq_len],
            "device": str(device), "repeats": repeats, "timeout": timeout}


def handle(req: dict) -> dict:
    """Measure one request; errors come back as ``{"error": ...}`` so the table can say why."""
    try:
        case = Case(*req["case"])
        return measure(req["provider"], case, torch.device(req["device"]), int(req["repeats"]))
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        return {"provider": req.get("provider"), "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def serve(preload) -> int:
    """Fork server: one request (JSON, see :func:`request`) per stdin line, one result line back."""
    for mod in preload:
        try:
            importlib.import_module(mod)
        except Exception:  # the row that needs it will fail with its own message
            pass
    out = sys.stdout
    print("ready", file=out, flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the measuring child
            os.close(r)
            os.dup2(2, 1)  # a stray print must not break the protocol
            if req.get("timeout"):
                signal.alarm(max(1, int(req["timeout"])))
            result = handle(req)
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        data = _read_all(r)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if data:
            result = json.loads(data)
        elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
            result = {"provider": req["provider"], "error": f"timed out after {req['timeout']:.0f} s"}
        elif os.WIFSIGNALED(status):
            result = {"provider": req["provider"],
                      "error": f"killed by signal {os.WTERMSIG(status)} (out of memory?)"}
        else:
            result = {"provider": req["provider"], "error": f"exit status {os.WEXITSTATUS(status)}"}
        print(json.dumps(result), file=out, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_entropy.tools.bench_worker")
    ap.add_argument("--serve", action="store_true", help="fork server: requests on stdin, results on stdout")
    ap.add_argument("--preload", default="", help="with --serve: comma-separated modules to import once")
    ap.add_argument("--provider", choices=sorted(PROVIDERS))
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=512)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.serve:
        return serve([m for m in args.preload.split(",") if m])
    if args.provider is None:
        ap.error("--provider is required (or --serve)")
    case = Case(args.n, args.h, args.v, args.dtype, args.seq_len)
    print(json.dumps(handle(request(args.provider, case, args.device, args.repeats))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
