"""verl adapter: a drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``.

verl's fused kernel takes the LM-head input and weight and returns, per token, the log-prob of the
label and the entropy of the temperature-scaled distribution::

    z_v      = (h . W_v) / temperature
    logprobs = z_y - logsumexp(z)            (log-probs, not their negatives)
    entropy  = logsumexp(z) - sum_v p_v z_v

Shapes follow verl: ``hidden [..., H]`` and ``labels [...]`` are flattened to ``N`` tokens, so
``logprobs`` is ``[N]`` (``reduction="none"``) or a scalar (``"sum"``, or ``"mean"`` = sum / N) and
``entropy`` is always ``[N]``. Both are fp32 (fp64 for fp64 inputs).

With ``dist_process_group`` (tensor parallelism over the vocabulary), each rank holds the slice
``W[r*V:(r+1)*V]`` of the head (verl's layout; slices of unequal sizes also work, each starting at the
sum of the lower ranks' sizes), labels are global ids in ``[0, world*V)``, and the outputs are the
global log-probs and entropies on every rank. Backward gives each rank the gradient for its own
weight slice and its PARTIAL ``d hidden`` (this slice's contribution; the sum over ranks is the full
gradient), as verl does: verl's Megatron models sum it over the tensor-parallel group themselves
(the region op in front of the LM head), so returning the full gradient would count it ``world``
times. This is ``linear_logprobs(..., process_group=g, hidden_grad="partial")``; the core's default
(``"full"``) all-reduces instead.

The work is done by :func:`fused_entropy.linear_logprobs` (with ``process_group`` under tensor
parallelism: its collectives, checks on every rank and exact merge); no ``[N, V]`` logits are
allocated.

``patch()`` installs it where verl's model forwards find verl's kernel, ``unpatch()`` puts verl's
back (read from verl 0.9.1 and verl main at b178a3cd):

- ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``, the definition. The FSDP
  (transformers) forwards, ``forward_with_triton_backend`` in ``verl.models.transformers.dense_common``,
  ``qwen2_vl``, ``qwen3_vl``, ``qwen3_5`` and ``glm4v``, import it from there inside the function, on
  every call, so rebinding the definition reaches all of them;
- ``verl.models.mcore.model_forward_fused`` and ``verl.models.mcore.model_forward_1f1b_overlap``, the
  Megatron forwards, which bind the name at import: rebound when already imported; imported later,
  they take the patched definition themselves.

    from fused_entropy.integrations import verl as fe_verl
    fe_verl.patch()     # before or after verl builds its models; use_fused_kernels=True in verl's config
    ...                 # verl training: logprobs and entropy now come from fused_entropy
    fe_verl.unpatch()
"""
from __future__ import annotations

import contextlib
import importlib
import math
import sys
import types
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _distributed
from .. import _validate as V
from ..functional import linear_logprobs

__all__ = ["linear_cross_entropy", "patch", "unpatch", "is_patched", "patched"]

REDUCTIONS = ("none", "sum", "mean")


def _check_args(hidden, weight, labels, temperature, reduction):
    V.check_tensor("hidden", hidden, floating=True)
    V.check_tensor("weight", weight, floating=True)
    V.check_tensor("labels", labels, integer=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape [..., H] with H={weight.shape[1]} (from weight {tuple(weight.shape)}), "
            f"got {tuple(hidden.shape)}"
        )
    n_tokens = math.prod(hidden.shape[:-1])
    if labels.numel() != n_tokens:
        raise ValueError(
            f"labels must hold one id per token of hidden ({n_tokens} tokens for hidden {tuple(hidden.shape)}), "
            f"got labels of shape {tuple(labels.shape)}"
        )
    if temperature is None:
        temperature = 1.0
    V.check_transform(temperature, None, 1.0)
    if reduction is None:
        reduction = "none"
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return n_tokens, float(temperature), reduction.lower()


def _check_labels(labels: torch.Tensor, vocab: int) -> None:
    # verl has no ignore index: every label must be a vocabulary id (-100 is an error, not a skipped row).
    labels = labels.to(torch.int64)  # compare in int64, never in the labels' own (narrow) dtype
    if labels.numel() and bool(((labels < 0) | (labels >= vocab)).any()):
        bad = labels[(labels < 0) | (labels >= vocab)][0].item()
        raise ValueError(f"labels must be in [0, {vocab}) (verl has no ignore index); found {bad}")


def _reduce(logprobs: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return logprobs
    total = logprobs.sum()
    # verl divides by N; N = 0 would give 0/0, and an empty batch is legal input, so it gives 0.
    return total if reduction == "sum" else total / max(logprobs.numel(), 1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: Optional[float] = 1.0,
    reduction: Optional[str] = "none",
    dist_process_group: Optional["dist.ProcessGroup"] = None,
):
    """verl's ``linear_cross_entropy``: ``(logprobs, entropy)`` of ``softmax(hidden @ weight.T / T)``.

    Args:
        hidden: ``[..., H]`` (verl passes ``[N, H]`` or ``[1, N, H]``); fp16, bf16, fp32 or fp64.
        weight: ``[V, H]`` LM-head weight (this rank's vocabulary slice under tensor parallelism).
        labels: integer ids, one per token of ``hidden`` (any shape with ``N`` elements), in ``[0, V)``
            (``[0, world * V)`` under tensor parallelism). verl has no ignore index; neither does this.
        temperature: ``T > 0``; ``None`` means 1.
        reduction: ``"none"``, ``"sum"`` or ``"mean"`` (applied to ``logprobs`` only; ``None`` = ``"none"``).
        dist_process_group: the tensor-parallel group the vocabulary is split over, or None. Then
            ``hidden``/``labels`` must be the same on every rank, and ``d hidden`` is this rank's part.

    Returns:
        ``(logprobs, entropy)``: ``logprobs`` ``[N]`` or a 0-d tensor, ``entropy`` ``[N]``; fp32
        (fp64 for fp64 inputs). Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    if dist_process_group is None:
        n_tokens, temperature, reduction = _check_args(hidden, weight, labels, temperature, reduction)
        hidden2d, labels1d = hidden.reshape(n_tokens, hidden.shape[-1]), labels.reshape(n_tokens)
        _check_labels(labels1d, weight.shape[0])
        stats = linear_logprobs(hidden2d, weight, labels1d, temperature=temperature, entropy=True)
        logprobs, entropy = stats.logprobs, stats.entropy
    else:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("dist_process_group was given but torch.distributed is not initialized")
        try:
            n_tokens, temperature, reduction = _check_args(hidden, weight, labels, temperature, reduction)
        except (TypeError, ValueError) as e:
            # the other ranks are about to enter linear_logprobs' agreement collective: take part in it,
            # so that every rank raises here instead of waiting for this one
            _distributed.agree(dist_process_group, e)
            raise
        hidden2d, labels1d = hidden.reshape(n_tokens, hidden.shape[-1]), labels.reshape(n_tokens)
        # ignore_index=None: verl has no ignore index, and the label range is checked on all ranks together
        stats = linear_logprobs(hidden2d, weight, labels1d, temperature=temperature, entropy=True, ignore_index=None,
                                process_group=dist_process_group, hidden_grad="partial")
        logprobs, entropy = stats.logprobs, stats.entropy
    return _reduce(logprobs, reduction), entropy


# ---------------------------------------------------------------------------------------------
# patch(): install linear_cross_entropy into verl
# ---------------------------------------------------------------------------------------------

NAME = "linear_cross_entropy"
#: defines verl's kernel; the FSDP forwards import it from here at call time
KERNEL_MODULE = "verl.utils.kernel.linear_cross_entropy"
#: the Megatron forwards, which bind the name when imported
BOUND_MODULES = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")

# module name -> (module, what it held before patch()) for every binding patch() replaced
_replaced: Dict[str, Tuple[types.ModuleType, object]] = {}


def patch() -> None:
    """Make verl's FSDP and Megatron model forwards call :func:`linear_cross_entropy` (see the module
    docstring). Idempotent: a second call changes nothing. Needs verl installed."""
    try:
        kernel = importlib.import_module(KERNEL_MODULE)
    except ImportError as e:
        raise ImportError(f"fused_entropy.integrations.verl.patch() needs verl ({KERNEL_MODULE} did not import)") from e
    for mod in (kernel, *(sys.modules.get(name) for name in BOUND_MODULES)):
        # a None entry: not imported yet (it binds the patched definition when it is)
        if mod is not None and mod.__name__ not in _replaced and getattr(mod, NAME, None) is not linear_cross_entropy:
            _replaced[mod.__name__] = (mod, getattr(mod, NAME))
            setattr(mod, NAME, linear_cross_entropy)


def unpatch() -> None:
    """Give verl its own kernel back everywhere ``patch()`` put ours, including the Megatron modules
    imported while patched (a no-op when nothing is patched)."""
    if not _replaced:
        return
    kernel_original = _replaced[KERNEL_MODULE][1] if KERNEL_MODULE in _replaced else None
    while _replaced:
        _, (mod, original) = _replaced.popitem()
        setattr(mod, NAME, original)
    for name in BOUND_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and kernel_original is not None and getattr(mod, NAME, None) is linear_cross_entropy:
            setattr(mod, NAME, kernel_original)


def is_patched() -> bool:
    """Whether verl's kernel module currently holds :func:`linear_cross_entropy`."""
    kernel = sys.modules.get(KERNEL_MODULE)
    return kernel is not None and getattr(kernel, NAME, None) is linear_cross_entropy


@contextlib.contextmanager
def patched():
    """``with patched(): ...``: verl uses fused-entropy inside the block, its own kernel after."""
    patch()
    try:
        yield
    finally:
        unpatch()
