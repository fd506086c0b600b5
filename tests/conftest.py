"""Shared test switches and fixtures.

``FUSED_ENTROPY_TEST_DEVICE`` chooses where the device-following tests build their tensors:

- ``cpu``: the Triton kernels run through the interpreter (``TRITON_INTERPRET=1``, how CI runs);
- ``cuda``: compiled kernels on the GPU (``fused-entropy gpucheck`` runs the suite this way);
- unset: ``cuda`` when torch sees a GPU, else ``cpu``.

Asking for ``cuda`` on a machine without one stops the run with a clear message instead of
silently testing the CPU. Test modules read ``DEVICE`` (``from conftest import DEVICE``) or take the
``device`` fixture; ``TRITON_OK``/``TRITON_SKIP`` skip Triton tests where the kernels cannot run.

A test that checks the same thing on both backends takes the ``backend`` fixture ("torch", then
"triton", the latter skipped with ``TRITON_SKIP``'s reason where the kernels cannot run); one that
runs on a subset parametrizes ``backend`` itself with ``backend_params(...)``. Seeded input builders
shared by the test files live in ``tests/_inputs.py``.
"""
import os

import pytest
import torch

from fused_entropy.backends import interpreting


def _test_device() -> str:
    want = os.environ.get("FUSED_ENTROPY_TEST_DEVICE", "").strip().lower()
    if want in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda"):
        raise pytest.UsageError(f"FUSED_ENTROPY_TEST_DEVICE must be 'cpu', 'cuda' or unset, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("FUSED_ENTROPY_TEST_DEVICE=cuda, but torch sees no CUDA device")
    return want


DEVICE = _test_device()
# Triton kernels run on CUDA, or on CPU tensors through the interpreter
TRITON_OK = DEVICE == "cuda" or interpreting()
TRITON_SKIP = pytest.mark.skipif(not TRITON_OK, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
# tests that run ranks with _dist_utils.run_ranks and compare them with a reference on the test
# device: the ranks are CPU processes joined by gloo
needs_cpu_ranks = pytest.mark.skipif(not torch.distributed.is_available() or DEVICE != "cpu",
                                     reason="the ranks are CPU processes (gloo): needs torch.distributed and the CPU test device")


BACKENDS = ("torch", "triton")


def backend_params(*names: str) -> list:
    """``pytest.param`` per backend name (default: all), the Triton one carrying ``TRITON_SKIP``."""
    return [pytest.param(n, id=n, marks=TRITON_SKIP if n == "triton" else ()) for n in names or BACKENDS]


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    return request.param


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


def pytest_report_header(config):
    return f"fused-entropy test device: {DEVICE} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
