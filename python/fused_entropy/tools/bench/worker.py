"""A warm worker: one provider on one case in a process of its own, timed one step per request.

``fused-entropy bench`` measures in rounds: it opens one worker per provider, then asks each for one
timed step in turn (A B C A B C ...), so that a change in the machine's load lands on every provider
alike instead of on whichever rows ran during it. Every worker is a process of its own:

- CPU: ``python -m fused_entropy.tools.bench.worker --serve --preload mod,...`` is a fork server.
  It imports torch and the peers' packages once (importing TRL and transformers alone takes ~8 s of
  CPU here), never runs a torch operation itself, and forks one child per ``open`` request; it relays
  the ``step`` and ``close`` requests of that child by ``id``. Every child starts with the allocator,
  thread pools and peak of a just-imported process.
- CUDA (a CUDA context does not survive fork), or ``bench --spawn``: ``python -m
  fused_entropy.tools.bench.worker --session`` is one worker speaking the same protocol on stdin/stdout.

Protocol: one JSON object per line each way. ``{"op": "open", "provider", "case": [n, h, v, dtype,
seq_len], "device", "timeout"}`` -> ``{"ok": true, "info": {...}}``; ``{"op": "step"}`` ->
``{"time_s": t}``; ``{"op": "close"}`` -> the memory result (below), after which the worker exits.
Any failure comes back as ``{"error": "..."}``. ``timeout`` (seconds) bounds each request: the worker
is killed by ``SIGALRM`` when one runs longer.

Time of one step (forward + backward of ``Run.step``, gradients reset to None before it):

- CPU: ``time.perf_counter`` around one step.
- CUDA: the median of ``triton.testing.do_bench`` (``grad_to_none`` = the inputs) over a short run.

Working memory = peak memory - memory before the timed steps - the gradients' bytes, i.e. the
growth beyond the inputs and their gradients (which any implementation must hold):

- CPU: resident set size from the OS. Before the full-size inputs exist, the provider runs once on a
  tiny case so that lazy imports, thread pools and kernel caches do not count. Then the inputs are
  built, ``baseline = VmRSS``, the high-water mark is reset by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux), and at ``close`` ``peak = VmHWM``: the peak over every timed step
  of every round, from one baseline, so memory the allocator keeps after a step is not hidden by a
  later baseline. (glibc raises its mmap threshold after freeing a large block, so from the second
  step on, blocks of a few MiB that a step allocates and frees can stay resident: the steady state of
  a training loop is the second step, not the first.) Where the mark cannot be reset, ``ru_maxrss``
  (the lifetime peak) is used instead. ``torch.compile`` rows warm up at full size (compilation
  specializes on shapes), so their baseline includes what the allocator kept from that first call.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before, for one step with the gradients reset (before the timed steps:
  ``do_bench`` allocates its own cache-flush buffer).

Floors have no gradients; their memory is not reported. ``python -m fused_entropy.tools.bench.worker
--provider NAME --n N ... --repeats R`` measures one provider alone (R steps, one JSON line), by hand.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback

import torch

from .providers import PROVIDERS, Case

TINY = Case(n=64, h=32, v=512, seq_len=16)
CUDA_REP_MS = 200  # do_bench's timed window per step request


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


class Session:
    """One provider on one case: built and warmed at construction, then :meth:`step` and :meth:`finish`."""

    def __init__(self, name: str, case: Case, device: torch.device):
        self.p, self.case, self.device = PROVIDERS[name], case, device
        self.cuda = device.type == "cuda"
        torch.manual_seed(0)
        tiny = self.p.build(TINY, device)
        tiny.step()
        tiny.reset()
        del tiny
        self.run = self.p.build(case, device)
        if self.p.full_warmup or self.cuda:  # compilation, autotuning; a GPU step is cheap
            self.run.step()
        self.times = []
        gc.collect()
        self.run.reset()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.run.step()
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.run.reset()
            self.method = "max_memory_allocated"
        else:
            self.baseline = _status_kib("VmRSS") * 1024
            self.exact = _reset_hwm()
            self.method = "VmHWM" if self.exact else "ru_maxrss"

    def step(self) -> float:
        if self.cuda:
            from triton.testing import do_bench

            t = do_bench(self.run.step, grad_to_none=self.run.leaves or None, quantiles=[0.5], rep=CUDA_REP_MS) / 1e3
        else:
            self.run.reset()
            t0 = time.perf_counter()
            self.run.step()
            t = time.perf_counter() - t0
        self.times.append(t)
        return t

    def finish(self) -> dict:
        if not self.cuda:
            if self.exact:
                self.peak = _status_kib("VmHWM") * 1024
            else:
                self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        grad = self.run.grad_bytes
        return {
            "provider": self.p.name,
            "times_s": self.times,
            "baseline_bytes": self.baseline,
            "peak_bytes": self.peak,
            "grad_bytes": grad,
            "working_bytes": None if self.p.kind == "floor" else self.peak - self.baseline - grad,
            "memory_method": self.method,
            "gemms": self.p.gemms(self.case, self.device),
            "info": self.run.info,
        }


def open_request(name: str, case: Case, device: str, timeout: float = 0) -> dict:
    return {"op": "open", "provider": name, "case": [case.n, case.h, case.v, case.dtype, case.seq_len],
            "device": str(device), "timeout": timeout}


def _error(e: BaseException) -> dict:
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}


def session_loop(rfile, wfile) -> int:
    """Serve one session: ``open``, then ``step`` requests, then ``close`` (or end of input)."""
    session = None
    timeout = 0
    for line in rfile:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.get("op")
        if op == "open" and session is None:
            timeout = int(req.get("timeout") or 0)
            signal.alarm(max(1, timeout) if timeout else 0)
            try:
                session = Session(req["provider"], Case(*req["case"]), torch.device(req["device"]))
                reply = {"ok": True, "info": session.run.info}
            except Exception as e:
                reply = _error(e)
        elif op == "step" and session is not None:
            signal.alarm(max(1, timeout) if timeout else 0)
            try:
                reply = {"time_s": session.step()}
            except Exception as e:
                reply = _error(e)
        elif op == "close" and session is not None:
            try:
                reply = session.finish()
            except Exception as e:
                reply = _error(e)
            wfile.write(json.dumps(reply) + "\n")
            wfile.flush()
            return 0
        else:
            reply = {"error": f"unexpected request {op!r}"}
        signal.alarm(0)
        wfile.write(json.dumps(reply) + "\n")
        wfile.flush()
        if "error" in reply and op == "open":
            return 1
    return 0


def _child_error(status: int, timeout) -> str:
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return f"timed out after {timeout:.0f} s"
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)} (out of memory?)"
    return f"worker exited with status {os.WEXITSTATUS(status)}"


def serve(preload) -> int:
    """Fork server: requests with an ``id`` on stdin; ``open`` forks a child, the rest are relayed."""
    for mod in preload:
        try:
            importlib.import_module(mod)
        except Exception:  # the row that needs it will fail with its own message
            pass
    out = sys.stdout
    print("ready", file=out, flush=True)
    children = {}  # id -> (pid, to_child, from_child, timeout)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        wid = req.get("id")
        if req.get("op") == "open":
            down_r, down_w = os.pipe()
            up_r, up_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the measuring child
                for fd in (down_w, up_r):
                    os.close(fd)
                for other in children.values():
                    other[1].close()
                    other[2].close()
                os.dup2(2, 1)  # a stray print must not break the protocol
                code = 1
                try:
                    with os.fdopen(down_r) as rf, os.fdopen(up_w, "w") as wf:
                        rf_lines = iter([json.dumps(req) + "\n"])
                        code = session_loop(_chain(rf_lines, rf), wf)
                finally:
                    os._exit(code)
            os.close(down_r)
            os.close(up_w)
            children[wid] = (pid, os.fdopen(down_w, "w"), os.fdopen(up_r), float(req.get("timeout") or 0))
            reply = _relay(children, wid, None)
        elif wid in children:
            reply = _relay(children, wid, req)
        else:
            reply = {"error": f"no worker {wid!r}"}
        print(json.dumps(reply), file=out, flush=True)
    for wid in list(children):
        _reap(children, wid)
    return 0


def _chain(first, rest):
    yield from first
    yield from rest


def _relay(children, wid, req):
    """Send ``req`` (None: only read, the reply to ``open``) to child ``wid`` and return its reply;
    the child is reaped when it has exited (after ``close``, a failed ``open``, or a crash)."""
    pid, to_child, from_child, timeout = children[wid]
    try:
        if req is not None:
            to_child.write(json.dumps(req) + "\n")
            to_child.flush()
        line = from_child.readline()
    except OSError:
        line = ""
    if not line.strip():
        return {"error": _child_error(_reap(children, wid), timeout)}
    reply = json.loads(line)
    if (req is None and "error" in reply) or (req is not None and req.get("op") == "close"):
        _reap(children, wid)
    return reply


def _reap(children, wid) -> int:
    pid, to_child, from_child, _ = children.pop(wid)
    for f in (to_child, from_child):
        try:
            f.close()
        except OSError:
            pass
    return os.waitpid(pid, 0)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_entropy.tools.bench.worker")
    ap.add_argument("--serve", action="store_true", help="fork server: requests on stdin, results on stdout")
    ap.add_argument("--session", action="store_true", help="one worker: open/step/close requests on stdin")
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
    if args.session:
        proto = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)  # a stray print must not break the protocol
        return session_loop(sys.stdin, proto)
    if args.provider is None:
        ap.error("--provider is required (or --serve, --session)")
    case = Case(args.n, args.h, args.v, args.dtype, args.seq_len)
    try:
        s = Session(args.provider, case, torch.device(args.device))
        for _ in range(args.repeats):
            s.step()
        result = s.finish()
    except Exception as e:
        result = dict(_error(e), provider=args.provider)
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
