"""``torch.library`` custom ops: the entry points as opaque, traceable operators.

``torch.ops.fused_entropy.linear_logprobs`` / ``logprobs_from_logits`` (and their ``*_backward``; in a
Hub kernel build the namespace is the generated ``_ops.add_op_namespace_prefix``, so the Hub copy and
the installed package load side by side) take
only tensors and scalars (the ``LogitTransform`` flattened into floats, the backend by name) and
return the row statistics of ``RowStats`` as 8 tensors, ``[0]``-sized where a field is not computed
(no entropy, no clamped entropy). Each has a fake (meta) implementation that gives shapes and dtypes,
so ``torch.compile(fullgraph=True)`` traces through them with dynamic shapes and meta tensors
propagate shapes; the backward is a second custom op, so dynamo never looks inside either pass.

The impls call the backend functions (``backends/torch_chunked.py``, ``backends/triton.py``) directly;
their autograd (``register_autograd``) masks the upstream gradients and calls the backward op. The Triton launchers stay
plain Python inside the op (not ``triton_op``/``wrap_triton``): they allocate per row chunk and pick
kernels from host-side sizes, so inductor gains nothing from seeing the individual launches.

Layering: functional, _grpo -> this module -> _autograd (once_differentiable) -> backends, launchers.
The vocabulary-parallel path (``process_group``) stays on
``_autograd.VocabParallelLinearLogprobsFunction``: its collectives are not compiled.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._autograd import masked_grad, once_differentiable
from ._common import compute_dtype
from ._types import LogitTransform, RowStats

try:  # a Hub build (kernel-builder, scripts/build_hub_kernel.py) generates _ops.py with a unique namespace
    from ._ops import add_op_namespace_prefix as _op_name
except ImportError:
    def _op_name(name: str) -> str:
        return f"fused_entropy::{name}"

_STATS = len(RowStats._fields)  # 8: m, log_s, logprobs, entropy, tau, tie_frac, log_s_clamped, clamped_entropy


def _backend(name: str, device: torch.device):
    from .backends import get_backend

    return get_backend(name, device)


def backend_name(be) -> str:
    """The name ``get_backend`` resolved to (``"torch"`` or ``"triton"``) for the op's ``backend`` argument."""
    return be.NAME


def _pack(stats: RowStats, like: Tensor) -> Tuple[Tensor, ...]:
    dt = compute_dtype(like.dtype)
    # A fresh [0] tensor per absent field: custom op outputs may not alias each other.
    return tuple(like.new_empty(0, dtype=dt) if t is None else t for t in stats)


def _unpack(saved, entropy: bool, has_k: bool) -> RowStats:
    m, log_s, logp, ent, tau, tie, lsc, cl = saved
    ent = ent if entropy else None
    if not has_k:
        return RowStats(m, log_s, logp, ent)
    return RowStats(m, log_s, logp, ent, tau, tie, lsc, cl)


def _fake_stats(like: Tensor, n, entropy: bool, has_k: bool) -> Tuple[Tensor, ...]:
    dt = compute_dtype(like.dtype)
    rows = lambda on: like.new_empty(n if on else 0, dtype=dt)  # noqa: E731
    return (rows(True), rows(True), rows(True), rows(entropy)) + tuple(rows(has_k) for _ in range(4))


def _tf(temperature: float, softcap: Optional[float], logit_scale: float) -> LogitTransform:
    return LogitTransform(temperature, softcap, logit_scale)


def _grad_or_empty(g: Optional[Tensor], like: Optional[Tensor], need: bool) -> Tensor:
    if need and g is not None:
        return g
    ref = like if like is not None else torch.empty(0)
    return ref.new_empty(0)


# ---------------------------------------------------------------------------------------------
# linear_logprobs: x [N, H], weight [V, H], bias [V]?, targets [N] int64
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(_op_name("linear_logprobs"), mutates_args=())
def linear_logprobs_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
    softcap: Optional[float], logit_scale: float, ignore_index: int, entropy: bool, k: Optional[int],
    backend: str,
) -> List[Tensor]:
    """RowStats of ``z = softcap(logit_scale * (x W^T + b)) / temperature`` as 8 tensors ``[N]`` (or ``[0]``)."""
    be = _backend(backend, x.device)
    stats = be.linear_forward(x, weight, bias, targets, _tf(temperature, softcap, logit_scale), ignore_index,
                              entropy, k)
    return list(_pack(stats, x))


@linear_logprobs_op.register_fake
def _(x, weight, bias, targets, temperature, softcap, logit_scale, ignore_index, entropy, k, backend):
    return list(_fake_stats(x, x.shape[0], entropy, k is not None))


@torch.library.custom_op(_op_name("linear_logprobs_backward"), mutates_args=())
def linear_logprobs_backward_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, stats: List[Tensor],
    grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], grad_clamped: Optional[Tensor],
    temperature: float, softcap: Optional[float], logit_scale: float, ignore_index: int, entropy: bool,
    k: Optional[int], backend: str, need_x: bool, need_weight: bool, need_bias: bool,
) -> List[Tensor]:
    """``[grad_x, grad_weight, grad_bias]``, each ``[0]``-sized where not needed (or no bias).

    ``grad_*`` are already zero on ignored rows (the backend contract)."""
    be = _backend(backend, x.device)
    gx, gw, gb = be.linear_backward(x, weight, bias, targets, _tf(temperature, softcap, logit_scale), ignore_index,
                                    _unpack(stats, entropy, k is not None), grad_logprobs, grad_entropy,
                                    grad_clamped, k, needs=(need_x, need_weight, need_bias and bias is not None))
    return [_grad_or_empty(gx, x, need_x), _grad_or_empty(gw, weight, need_weight),
            _grad_or_empty(gb, bias, need_bias and bias is not None)]


@linear_logprobs_backward_op.register_fake
def _(x, weight, bias, targets, stats, grad_logprobs, grad_entropy, grad_clamped, temperature, softcap, logit_scale,
      ignore_index, entropy, k, backend, need_x, need_weight, need_bias):
    has_b = need_bias and bias is not None
    return [torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if has_b else x.new_empty(0)]


def _mask_grads(grads, targets: Tensor, ignore_index: int, entropy: bool, has_k: bool):
    g_lp, g_ent, g_cl = grads
    valid = targets != ignore_index
    return tuple(masked_grad(g, valid) for g in (g_lp, g_ent if entropy else None, g_cl if has_k else None))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, targets, temperature, softcap, logit_scale, ignore_index, entropy, k, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, targets, *output)
    ctx.meta = (temperature, softcap, logit_scale, ignore_index, entropy, k, backend)


@once_differentiable
def _linear_backward(ctx, grads):
    x, weight, bias, targets, *stats = ctx.saved_tensors
    temperature, softcap, logit_scale, ignore_index, entropy, k, backend = ctx.meta
    none = (None,) * 11
    g_lp, g_ent, g_cl = grads[2], grads[3], grads[7]  # logprobs, entropy, clamped_entropy of the 8 stats
    if g_lp is None and g_ent is None and g_cl is None:
        return none
    g_lp, g_ent, g_cl = _mask_grads((g_lp, g_ent, g_cl), targets, ignore_index, entropy, k is not None)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]  # a frozen weight (reference model) costs no dW product
    need_b = need_b and bias is not None
    gx, gw, gb = linear_logprobs_backward_op(x, weight, bias, targets, stats, g_lp, g_ent, g_cl, temperature,
                                             softcap, logit_scale, ignore_index, entropy, k, backend,
                                             need_x, need_w, need_b)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None) + none[3:]


linear_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------------------------------------
# logprobs_from_logits: logits [N, V], targets [N] int64
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op(_op_name("logprobs_from_logits"), mutates_args=())
def logprobs_from_logits_op(
    logits: Tensor, targets: Tensor, temperature: float, ignore_index: int, entropy: bool, k: Optional[int],
    backend: str,
) -> List[Tensor]:
    """RowStats of ``z = logits / temperature`` as 8 tensors ``[N]`` (or ``[0]``)."""
    be = _backend(backend, logits.device)
    stats = be.logits_forward(logits, targets, _tf(temperature, None, 1.0), ignore_index, entropy, k)
    return list(_pack(stats, logits))


@logprobs_from_logits_op.register_fake
def _(logits, targets, temperature, ignore_index, entropy, k, backend):
    return list(_fake_stats(logits, logits.shape[0], entropy, k is not None))


@torch.library.custom_op(_op_name("logprobs_from_logits_backward"), mutates_args=())
def logprobs_from_logits_backward_op(
    logits: Tensor, targets: Tensor, stats: List[Tensor], grad_logprobs: Optional[Tensor],
    grad_entropy: Optional[Tensor], grad_clamped: Optional[Tensor], temperature: float, ignore_index: int,
    entropy: bool, k: Optional[int], backend: str,
) -> Tensor:
    """``grad_logits [N, V]``; ``grad_*`` already zero on ignored rows."""
    be = _backend(backend, logits.device)
    return be.logits_backward(logits, targets, _tf(temperature, None, 1.0), ignore_index,
                              _unpack(stats, entropy, k is not None), grad_logprobs, grad_entropy, grad_clamped, k)


@logprobs_from_logits_backward_op.register_fake
def _(logits, targets, stats, grad_logprobs, grad_entropy, grad_clamped, temperature, ignore_index, entropy, k,
      backend):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, entropy, k, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, *output)
    ctx.meta = (temperature, ignore_index, entropy, k, backend)


@once_differentiable
def _logits_backward(ctx, grads):
    logits, targets, *stats = ctx.saved_tensors
    temperature, ignore_index, entropy, k, backend = ctx.meta
    none = (None,) * 7
    g_lp, g_ent, g_cl = grads[2], grads[3], grads[7]
    if g_lp is None and g_ent is None and g_cl is None:
        return none
    g_lp, g_ent, g_cl = _mask_grads((g_lp, g_ent, g_cl), targets, ignore_index, entropy, k is not None)
    grad = logprobs_from_logits_backward_op(logits, targets, stats, g_lp, g_ent, g_cl, temperature, ignore_index,
                                            entropy, k, backend)
    return (grad,) + none[1:]


logprobs_from_logits_op.register_autograd(_logits_backward, setup_context=_logits_setup)


# ---------------------------------------------------------------------------------------------
# what functional.py calls: the same (logprobs, entropy | [0], clamped | [0]) as the old Functions
# ---------------------------------------------------------------------------------------------


def _outputs(stats, entropy: bool, has_k: bool):
    return stats[2], stats[3], stats[7]


def linear_logprobs(x, weight, bias, targets, tf: LogitTransform, ignore_index: int, entropy: bool, k, be):
    stats = linear_logprobs_op(x, weight, bias, targets, float(tf.temperature), tf.softcap, float(tf.logit_scale),
                               int(ignore_index), bool(entropy), k, backend_name(be))
    return _outputs(stats, entropy, k is not None)


def logprobs_from_logits(logits, targets, tf: LogitTransform, ignore_index: int, entropy: bool, k, be):
    stats = logprobs_from_logits_op(logits, targets, float(tf.temperature), int(ignore_index), bool(entropy), k,
                                    backend_name(be))
    return _outputs(stats, entropy, k is not None)
