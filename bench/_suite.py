"""Shared by the benchmark files: the timing of one provider (see conftest.py). The cases are the
presets of ``fused_entropy.tools.bench.providers.PRESETS``, the list ``fused-entropy bench`` uses."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fused_entropy.tools.bench.providers import PROVIDERS, Case

ROUNDS = {"cpu": 6, "cuda": 20}
# rows of another family shown in a family's group: clamped entropy next to plain entropy
COMPARE_WITH = {"clamped_entropy": ["floor", "fused"], "sampling": ["floor", "fused"]}


def run_benchmark(benchmark, name: str, case: Case, device: torch.device, family: str) -> None:
    """Time one provider's fwd+bwd with pytest-benchmark, in the group of ``family``."""
    p = PROVIDERS[name]
    missing = [m for m in p.needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"package '{missing[0]}' is not installed (pip install 'fused-entropy[bench]')")
    if p.check is not None:
        reason = p.check(device)
        if reason is not None:  # a part of this package that should be there
            pytest.fail(reason)
    run = p.build(case, device)
    cuda = device.type == "cuda"
    gemms = p.gemms(case, device)
    benchmark.group = f"{family} N={case.n} H={case.h} V={case.v} {case.dtype}"
    benchmark.extra_info.update(provider=p.label, gemms=gemms, gflop=case.gemm_flops(gemms) / 1e9)
    benchmark.extra_info.update({k: (v if not isinstance(v, dict) else {str(a): b for a, b in v.items()})
                                 for k, v in run.info.items()})  # a floor's chunking
    if p.full_warmup:
        run.step()
    if cuda and p.kind != "floor":
        run.reset()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run.step()
        torch.cuda.synchronize()
        working = torch.cuda.max_memory_allocated() - base - run.grad_bytes
        benchmark.extra_info["working_frac_nv"] = working / case.nv_bytes

    def target():
        run.step()
        if cuda:
            torch.cuda.synchronize()

    benchmark.pedantic(target, setup=run.reset, rounds=ROUNDS[device.type], warmup_rounds=1)
