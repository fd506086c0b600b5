"""Backends: one interface, two implementations (``torch_chunked``, ``triton``), and the one place a
``backend=`` argument is resolved (:func:`resolve_name`, :func:`resolve`, :func:`get_backend`).

Every backend module has ``NAME`` (``"torch"`` or ``"triton"``) and exposes the functions below. Inputs are already validated and flattened by the
functional layer: ``x [N, H]`` and ``weight [V, H]`` contiguous, same dtype and device, ``bias [V]``
or None, ``targets [N]`` int64 (``ignore_index`` marks ignored rows), ``tf`` a ``LogitTransform``,
``k`` the top-k count for clamped entropy or None. Outputs are fp32 (fp64 for fp64 inputs).

    linear_forward(x, weight, bias, targets, tf, ignore_index, entropy: bool, k) -> RowStats
    linear_backward(x, weight, bias, targets, tf, ignore_index, stats, grad_logprobs,
                    grad_entropy, grad_clamped, k, *, needs=(True, True, True))
                    -> (grad_x, grad_weight, grad_bias)   (None where ``needs`` is False)
    logits_forward(logits, targets, tf, ignore_index, entropy, k) -> RowStats
    logits_backward(logits, targets, tf, ignore_index, stats, grad_logprobs, grad_entropy,
                    grad_clamped, k) -> grad_logits
    linear_forward_backward(x, weight, bias, targets, tf, ignore_index, entropy, k, grad_fn,
                            rows_per_chunk=None, *, needs=(True, True, True))
                    -> (RowStats, grad_x, grad_weight, grad_bias)      (the single pass)
    single_pass_rows(n, vocab, dtype) -> rows per chunk linear_forward_backward takes by default
    linear_topk_select(x, weight, bias, tf, k, shift, all_reduce) -> (tau, tie_frac, s_S, t_S)
                    (the clamped set of a vocabulary split across ranks; see torch_topk.py)

``grad_*`` are ``[N]`` tensors or None (None: that output gets no gradient and costs no work).
Gradients on ignored rows are already zero. A target outside ``[0, V)`` that is not
``ignore_index`` lies in another vocabulary shard (``process_group``): the row is computed in full,
its target logit counts as 0 (``logprobs = -lse``) and its gradient has no one-hot term; the
functional layer rejects such targets when there is no process group. ``grad_bias`` is None when ``bias`` is None.
Gradients come back in the dtype of the tensor they belong to.
"""
from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch

from .._common import interpreting  # noqa: F401 (re-exported: tests and tools import it from here)

BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it has wheels for Linux x86_64/aarch64 only;
    elsewhere the package installs without it and runs the torch backend)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def resolve_name(name: str, device: torch.device) -> str:
    """``backend=`` to ``"torch"`` or ``"triton"``, the one "auto" rule: triton on CUDA when the
    ``triton`` package is installed, torch otherwise. Raises ValueError for an unknown name and
    ImportError for ``"triton"`` without the ``triton`` package."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ImportError("backend='triton' needs the triton package (pip install triton; wheels exist for Linux "
                          "x86_64/aarch64); use backend='torch' (or 'auto') without it")
    return name


def resolve(name: str, device: torch.device) -> str:
    """:func:`resolve_name`, and the check that the resolved backend runs on ``device``: ValueError
    for ``"triton"`` with tensors off CUDA unless ``TRITON_INTERPRET=1``."""
    name = resolve_name(name, device)
    if name == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "to run the Triton kernels on CPU through the interpreter, or use backend='torch'"
        )
    return name


def get_backend(name: str, device: torch.device) -> ModuleType:
    """Resolve ``backend=`` to a module (see :func:`resolve`)."""
    if resolve(name, device) == "torch":
        from . import torch_chunked

        return torch_chunked
    from . import triton as triton_backend

    return triton_backend
