"""Runs the rows: a warm worker process per provider (:mod:`.worker`; on CPU forked from one server
that imported the packages once), timed in interleaved rounds (A B C, A B C, ...)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .providers import PROVIDERS, Case, unavailable

from .stats import Row

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
    """``worker --serve``: imports the packages once; forks and relays one worker per provider (CPU)."""

    def __init__(self, names: Sequence[str], verbose: bool = False):
        mods = ["fused_entropy", "fused_entropy.modules"]
        for n in names:
            mods += [m for m in PROVIDERS[n].preload if m not in mods]
        super().__init__([sys.executable, "-m", "fused_entropy.tools.bench.worker", "--serve",
                          "--preload", ",".join(mods)], verbose)
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("bench fork server did not start")
        self.next_id = 0


class Worker:
    """One provider's warm process: through the fork server (CPU) or spawned (CUDA, ``--spawn``)."""

    def __init__(self, name: str, case: Case, device, timeout: float, server: Optional[ForkServer], verbose: bool):
        from .worker import open_request

        self.server, self.spawned = server, None
        req = open_request(name, case, str(device), timeout)
        if server is not None:
            server.next_id += 1
            self.id = server.next_id
            req["id"] = self.id
            reply = server.ask(req)
        else:
            self.spawned = _Lines([sys.executable, "-m", "fused_entropy.tools.bench.worker", "--session"], verbose)
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
