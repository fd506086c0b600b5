"""Run a function on several CPU processes joined by a gloo process group, with bounded time.

``run_ranks(fn, world, tmp_path, *args)`` forks ``world`` processes; rank ``r`` calls
``fn(rank, world, *args)`` inside an initialized gloo group and its return value (anything
``torch.save`` takes) comes back as ``results[r]``. An exception on a rank is re-raised here with
that rank's traceback; a rank still running after ``timeout_s`` fails the test instead of hanging.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, out_dir, timeout_s, args):
    torch.set_num_threads(1)  # the ranks share 2 cores with each other and the other tests
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        try:
            out = {"ok": fn(rank, world, *args)}
        except BaseException:  # reported to the parent, which fails the test with it
            out = {"error": traceback.format_exc()}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path, *args, timeout_s: float = TIMEOUT_S):
    out_dir = str(tmp_path)
    ctx = mp.start_processes(_entry, args=(fn, world, free_port(), out_dir, timeout_s, args), nprocs=world,
                             join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise AssertionError(f"{world} ranks did not finish within {timeout_s} s (a collective hangs?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = []
    for r in range(world):
        res = torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
        if "error" in res:
            raise AssertionError(f"rank {r} failed:\n{res['error']}")
        results.append(res["ok"])
    return results
