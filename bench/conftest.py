"""pytest-benchmark suite: ``pytest bench --benchmark-only`` (``--bench-device cpu|cuda``,
``--bench-preset small|quick|sweep``).

One file per function family; each test is parametrized over the providers of its family (this
package, the materialized reference, torch.compile of it, TRL, Liger, and the GEMM floor), which
come from :mod:`fused_entropy.tools.bench.providers`, the same code ``fused-entropy bench`` runs.
A provider is skipped, with the reason, only when its package is not installed; rows that do not
run on the chosen device (Triton-only peers on CPU) are not generated. The cases and the providers
are those of a preset of ``providers.PRESETS``, the list the CLI uses: ``small`` by default
(a smaller case, every provider, a few minutes on a 2-core CPU), ``quick`` or ``sweep`` for the
CLI's (providers: the preset's, per family).

Times come from pytest-benchmark (``pedantic``: one warm-up round, gradients reset before every
round, CUDA synchronized inside the timed call), all rounds of one provider in a row and in this
process: the interleaved rounds, confidence intervals and per-process memory are the CLI's. Working memory needs one process per row and is
measured by ``fused-entropy bench``; on CUDA ``extra_info`` carries ``max_memory_allocated`` growth.
"""
from __future__ import annotations

import pytest
import torch

from _suite import COMPARE_WITH
from fused_entropy.tools.bench.providers import PRESETS, PROVIDERS, family_providers


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="device of the benchmark suite (auto: cuda when available)")
    parser.addoption("--bench-preset", default="small", choices=tuple(PRESETS),
                     help="cases and providers: a preset of fused-entropy bench (default small)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        family = metafunc.module.FAMILY
        dev = _device(metafunc.config).type
        preset = PRESETS[metafunc.config.getoption("--bench-preset")]
        names = COMPARE_WITH.get(family, []) + family_providers(family)
        names = [n for n in names if dev in PROVIDERS[n].devices and n in preset.providers]
        metafunc.parametrize("provider", names)
        cases = preset.cases(dev)
        metafunc.parametrize("bench_case", cases, ids=[f"N{c.n}-H{c.h}-V{c.v}-{c.dtype}" for c in cases])


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    dev = _device(request.config)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but torch sees no CUDA device")
    return dev

