"""Functional API: per-token log-probs and entropies without materializing ``[N, V]`` logits.

Math (MATH.md sections 1-3), per token row with hidden state ``h`` and target ``y``::

    z_v   = softcap(logit_scale * (h . W_v + b_v)) / temperature
    lse   = log sum_v exp(z_v)
    logp  = z_y - lse
    H     = -sum_v p_v log p_v,                 p_v = exp(z_v - lse)
    H~    = -sum_{v in S} pi_v log pi_v,         S = the k largest z, pi = softmax over S

Rows whose target equals ``ignore_index`` give 0 and get no gradient.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from . import _validate as V
from . import _custom_ops as _ops
from ._common import IGNORE_INDEX
from ._types import TokenStats
from . import _distributed as D
from . import _sampling
from ._autograd import SampledLinearFunction, SampledLogitsFunction, VocabParallelLinearLogprobsFunction
from .backends import get_backend, resolve


def _finish(outs, lead_shape, entropy: bool, has_k: bool) -> TokenStats:
    logp, ent, clamped = outs
    return TokenStats(
        logp.reshape(lead_shape),
        ent.reshape(lead_shape) if entropy else None,
        clamped.reshape(lead_shape) if has_k else None,
    )


def _with_sampling(stats: TokenStats, sampled, lead_shape, entropy: bool) -> TokenStats:
    """``stats`` with the outputs of a sampling Function (``_autograd.sampling``): its full log-prob
    and entropy replace the kernels' (same pass), plus the three truncated fields."""
    lp, ent, tlp, lkm, tent = (t.reshape(lead_shape) for t in sampled)
    return stats._replace(logprobs=lp, entropy=ent if entropy else None, truncated_logprobs=tlp,
                          log_kept_mass=lkm, truncated_entropy=tent)


def _check_linear(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, entropy=True):
    """Checks of one rank's arguments that need no other rank; returns ``(V, H, LogitTransform)``."""
    V.check_tensor("hidden", hidden, floating=True)
    V.check_tensor("weight", weight, floating=True)
    V.check_tensor("targets", targets, integer=True)  # any integer dtype; the caller takes V.token_ids
    if bias is not None:
        V.check_tensor("bias", bias, floating=True)
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    vocab, h = weight.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden has H={hidden.shape[-1]} (shape {tuple(hidden.shape)}) but weight has H={h} (shape {tuple(weight.shape)})")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden.shape[:-1]), got {tuple(targets.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape [V]=({vocab},), got {tuple(bias.shape)}")
    check_head_dtypes(hidden, weight, bias)
    if vocab == 0:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    V.check_ignore_index(ignore_index)
    V.check_bool("entropy", entropy)
    V.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    return vocab, h, V.logit_transform(temperature, softcap, logit_scale)


_AMP_LOW = (torch.float16, torch.bfloat16)


def check_head_dtypes(hidden, weight, bias, names=("hidden", "weight", "bias")) -> None:
    """Same dtype, or the mixed-precision pair: fp32 ``weight``/``bias`` with fp16/bf16 ``hidden``."""
    h_name, w_name, b_name = names
    for name, t in ((w_name, weight), (b_name, bias)):
        if not isinstance(t, torch.Tensor) or t.dtype == hidden.dtype or (t.dtype == torch.float32 and hidden.dtype in _AMP_LOW):
            continue
        raise TypeError(f"{name} dtype {t.dtype} does not match {h_name} dtype {hidden.dtype} (accepted: the same "
                        f"dtype, or an fp32 {name} with fp16/bf16 {h_name}, the mixed-precision pair)")


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def gather_dtensor_head(weight, bias):
    """FSDP2 heads: a ``DTensor`` weight/bias is gathered with ``full_tensor()`` (as TRL's fused head
    does). The gather is differentiable, so the gradient goes back to the shards as a DTensor."""
    if _is_dtensor(weight):
        weight = weight.full_tensor()
    if _is_dtensor(bias):
        bias = bias.full_tensor()
    return weight, bias


def head_in_hidden_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The head runs in ``hidden``'s dtype: an fp32 ``weight``/``bias`` with bf16/fp16 ``hidden`` is cast.

    Mixed precision (``torch.autocast`` with an fp32 master weight and a bf16/fp16 hidden state): like
    Liger 0.8.5 (``weight.to(hidden.dtype)``) and autocast's own matmul, the GEMM runs in the low
    precision; log-sum-exp, log-probs and entropies are fp32. The cast is differentiable, so the weight
    gradient comes back fp32. Autocast itself changes nothing inside (fp32 inputs run in fp32).
    """
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return weight, bias


def _check_vocab_size(vocab_size) -> None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")


def _check_hidden_grad(hidden_grad) -> None:
    if hidden_grad not in D.HIDDEN_GRADS:
        raise ValueError(f"hidden_grad must be one of {D.HIDDEN_GRADS}, got {hidden_grad!r}")


# Stands in for ignore_index=None inside the backends: every target is then checked to be in [0, V).
_NO_IGNORE = IGNORE_INDEX


def _resolve_ignore(targets: torch.Tensor, vocab: int, ignore_index) -> int:
    """Range-check int64 ``targets``; return the ignore index the backends get (``_NO_IGNORE`` for None)."""
    if ignore_index is None:
        if targets.numel() and V.reads_values(targets) and bool(((targets < 0) | (targets >= vocab)).any()):
            bad = targets[(targets < 0) | (targets >= vocab)].reshape(-1)[0].item()
            raise ValueError(f"targets must be in [0, {vocab}) (ignore_index=None: no row is skipped); found {bad}")
        return _NO_IGNORE
    V.check_targets_range(targets, vocab, ignore_index)
    return int(ignore_index)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    ignore_index: Optional[int] = -100,
    entropy: bool = True,
    topk: Optional[int] = None,
    clamp_p: Optional[float] = None,
    backend: str = "auto",
    process_group=None,
    vocab_size: Optional[int] = None,
    hidden_grad: str = "full",
    sampling_top_k=None,
    sampling_top_p=None,
    sampling_min_p=None,
) -> TokenStats:
    """Fused LM head + log-softmax: per-token log-prob, entropy and clamped entropy.

    Args:
        hidden: ``[..., H]`` hidden states (fp16, bf16, fp32 or fp64).
        weight: ``[V, H]`` LM-head weight on the device of ``hidden``, of ``hidden``'s dtype, or fp32
            with a bf16/fp16 ``hidden`` (mixed precision: the head runs in ``hidden``'s dtype, as in
            Liger and autocast; the weight gradient is fp32); a ``DTensor`` (FSDP2) is gathered with
            ``full_tensor()``, its gradient returned to the shards; with
            ``process_group``, this rank's contiguous vocabulary shard ``[V_r, H]``.
        targets: ``[...]`` integer token ids in ``[0, V)`` or ``ignore_index`` (global ids with
            ``process_group``).
        bias: optional ``[V]`` (``[V_r]``, this rank's shard, with ``process_group``).
        temperature, softcap, logit_scale: the logit transform above (runtime scalars).
        ignore_index: target value of rows to skip; None: no row is skipped (every target must be
            a vocabulary id).
        entropy: also return the full entropy ``H``.
        topk / clamp_p: also return the clamped entropy over the ``topk`` largest logits, or over
            all but the ``floor(clamp_p * V)`` lowest (AEnt). At most one of them. ``V`` is the
            global vocabulary with ``process_group``.
        backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        process_group: a ``torch.distributed`` group over which the vocabulary is split (tensor
            parallelism of the LM head), or None. Every rank of the group calls this function with
            the same ``hidden`` and ``targets`` and its own shard; rank ``r`` holds vocabulary rows
            ``[o_r, o_r + V_r)`` with ``o_r`` the sum of the lower ranks' ``V_r`` (shards may differ
            in size). The outputs are the exact global values on every rank. In backward each
            rank gets the gradient of its own weight (and bias) shard and, with
            ``hidden_grad="full"``, the FULL hidden gradient (all-reduced over the group inside the
            autograd function); ``hidden_grad="partial"`` returns only this rank's share (the sum
            over the group is the full gradient) for frameworks whose tensor-parallel region op
            already sums it (Megatron's ``copy_to_tensor_model_parallel_region``). Collectives per
            call: 1 small ``all_gather`` that checks the inputs on all ranks together (bad input
            raises on every rank), 1 ``all_gather`` of ``[2-3, N]`` row statistics, with clamped
            entropy 4 ``all_reduce`` (7 for fp64 inputs) of ``[N, 2048]`` digit histograms and
            ``[2, N]`` sums for the exact global top-k (see ``fused_entropy._distributed``), and in
            backward 1 ``all_reduce`` of ``[N, H]`` (0 with ``"partial"``), on either backend.
        vocab_size: the global vocabulary size, checked against ``V`` (the sum of the shard sizes
            with ``process_group``); None: not checked.
        hidden_grad: ``"full"`` or ``"partial"`` (only differs with ``process_group``).
        sampling_top_k, sampling_top_p, sampling_min_p: replay the sampler's truncation (vLLM's
            rule, MATH.md section 8): also return ``truncated_logprobs``, ``log_kept_mass`` and
            ``truncated_entropy`` of the distribution a vLLM sampler with these settings drew from,
            after ``temperature``. Each None (off), a Python number, or a tensor broadcastable to
            ``targets.shape`` (per-request values, e.g. ``[B, 1]``) on the targets' device.
            ``sampling_top_k``: int >= 1 (>= V keeps all); ``sampling_top_p``: in (0, 1];
            ``sampling_min_p``: in [0, 1]. Ties: every logit equal to the k-th largest is kept; at the
            top-p boundary a group of equal logits is kept or dropped as a whole. With any of them
            set, the call runs the chunked replay path (torch products: cuBLAS on CUDA, on either
            backend), one product forward and three backward, and ``logprobs``/``entropy`` come from
            the same pass; with ``topk``/``clamp_p`` too, the clamped entropy costs a second pass.
            With ``process_group`` the thresholds are global and every rank must pass the same values.

    Returns:
        ``TokenStats(logprobs, entropy, clamped_entropy, truncated_logprobs, log_kept_mass,
        truncated_entropy)``: fp32 (fp64 for fp64 inputs) tensors of shape ``targets.shape`` (None
        where not asked for), in nats, differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
        Working memory is ``O(N)`` statistics plus bounded tiles; no ``[N, V]`` buffer.

    Numeric guarantees and input rules: ``targets`` of any integer dtype (compared in int64);
    ``ignore_index`` an int or None; ``temperature`` and ``softcap`` in ``[1e-30, 1e30]``,
    ``logit_scale`` 0 or ``|logit_scale|`` in ``[1e-30, 1e30]``, ``|logit_scale| / temperature <= 1e30``
    (every value in these ranges gives finite outputs and gradients for finite inputs); ``entropy`` a
    bool. Anything else raises TypeError/ValueError naming the argument and the value. First
    derivatives only: differentiating a ``create_graph=True`` gradient raises a RuntimeError.
    """
    if _is_dtensor(hidden):
        raise TypeError("hidden must be a plain torch.Tensor, got a DTensor (only the LM head weight/bias may be "
                        "DTensors: they are gathered with full_tensor())")
    if process_group is not None:
        if _is_dtensor(weight) or _is_dtensor(bias):
            raise TypeError("weight must be this rank's plain tensor shard with process_group, got a DTensor")
        return _linear_logprobs_vocab_parallel(
            hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, entropy, topk,
            clamp_p, backend, process_group, vocab_size, hidden_grad, sampling_top_k, sampling_top_p, sampling_min_p,
        )
    weight, bias = gather_dtensor_head(weight, bias)
    vocab, h, tf = _check_linear(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, entropy)
    _check_vocab_size(vocab_size)
    _check_hidden_grad(hidden_grad)
    if vocab_size is not None and vocab_size != vocab:
        raise ValueError(f"vocab_size={vocab_size} but weight has V={vocab} rows (shape {tuple(weight.shape)})")
    k = V.resolve_k(topk, clamp_p, vocab)
    be = get_backend(backend, hidden.device)
    targets = V.token_ids("targets", targets)
    ignore_index = _resolve_ignore(targets, vocab, ignore_index)
    weight, bias = head_in_hidden_dtype(hidden, weight, bias)

    prm = _sampling.resolve(sampling_top_k, sampling_top_p, sampling_min_p, targets.shape, targets.device)

    lead = targets.shape
    x = hidden.reshape(-1, h).contiguous()
    y = targets.reshape(-1).long().contiguous()
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    if prm is None or k is not None:
        outs = _ops.linear_logprobs(x, w, b, y, tf, int(ignore_index), bool(entropy) and prm is None, k, be)
        stats = _finish(outs, lead, bool(entropy) and prm is None, k is not None)
    if prm is None:
        return stats
    if k is None:
        stats = TokenStats(None)
    sampled = SampledLinearFunction.apply(x, w, b, y, tf, int(ignore_index), prm, vocab, 0, None, True)
    return _with_sampling(stats, sampled, lead, bool(entropy))


def _linear_logprobs_vocab_parallel(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index,
                                    entropy, topk, clamp_p, backend, group, vocab_size, hidden_grad,
                                    sampling_top_k=None, sampling_top_p=None, sampling_min_p=None) -> TokenStats:
    """``linear_logprobs`` over a vocabulary split across ``group`` (see ``_distributed.py``).

    Every check whose failure could differ between ranks goes through one collective, so that either
    every rank raises or none does (a rank that raised alone would leave the others waiting).
    """
    D.check_group(group)
    err, tf, be, be_name, prm = None, None, None, "torch", None
    try:
        _, h, tf = _check_linear(hidden, weight, targets, bias, temperature, softcap, logit_scale, ignore_index, entropy)
        targets = V.token_ids("targets", targets)
        device = hidden.device
        V.resolve_k(topk, clamp_p, sys.maxsize)  # types and ranges; k <= V is checked against the global V
        _check_vocab_size(vocab_size)
        _check_hidden_grad(hidden_grad)
        be_name = resolve(backend, device)  # agreed on by name: every rank must resolve to the same one
        be = get_backend(be_name, device)
        prm = _sampling.resolve(sampling_top_k, sampling_top_p, sampling_min_p, targets.shape, device)
    except (TypeError, ValueError, ImportError) as e:  # ImportError: backend='triton' without triton
        err = e
    grad_x = torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad
    layout = D.agree(group, err, weight=weight, hidden=hidden, targets=targets, bias=bias, tf=tf,
                     ignore_index=ignore_index, entropy=entropy, topk=topk, clamp_p=clamp_p, vocab_size=vocab_size,
                     backend_name=be_name, hidden_grad=hidden_grad, grad_x=grad_x)
    weight, bias = head_in_hidden_dtype(hidden, weight, bias)
    lead = targets.shape
    x = hidden.reshape(-1, h).contiguous()
    y = targets.reshape(-1).long().contiguous()
    ig = _NO_IGNORE if ignore_index is None else int(ignore_index)
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    if prm is None or layout.k is not None:
        outs = VocabParallelLinearLogprobsFunction.apply(
            x, w, b, y, tf, ig, bool(entropy) and prm is None, layout, be, group, hidden_grad == "full",
        )
        stats = _finish(outs, lead, bool(entropy) and prm is None, layout.k is not None)
    if prm is None:
        return stats
    if layout.k is None:
        stats = TokenStats(None)
    sampled = SampledLinearFunction.apply(x, w, b, y, tf, ig, prm, layout.vocab, layout.offset, group,
                                          hidden_grad == "full")
    return _with_sampling(stats, sampled, lead, bool(entropy))


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: Optional[int] = -100,
    entropy: bool = True,
    topk: Optional[int] = None,
    clamp_p: Optional[float] = None,
    backend: str = "auto",
    sampling_top_k=None,
    sampling_top_p=None,
    sampling_min_p=None,
) -> TokenStats:
    """Per-token log-prob, entropy and clamped entropy from logits ``[..., V]`` already in memory.

    ``z = logits / temperature``; same outputs and options as :func:`linear_logprobs` (and the same
    input rules: any integer ``targets`` dtype, ``ignore_index`` an int or None, ``temperature`` in
    ``[1e-30, 1e30]``), including the ``sampling_*`` truncation replay (vLLM's rule, MATH.md
    section 8). The backward pass writes the logits gradient directly and allocates nothing else of
    size ``[N, V]``.
    """
    V.check_tensor("logits", logits, floating=True)
    targets = V.token_ids("targets", targets)
    V.check_ignore_index(ignore_index)
    V.check_bool("entropy", entropy)
    if logits.dim() < 1:
        raise ValueError("logits must have shape [..., V], got a 0-d tensor")
    vocab = logits.shape[-1]
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits.shape[:-1]), got {tuple(targets.shape)}")
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension (V >= 1)")
    V.check_same_device(logits=logits, targets=targets)
    tf = V.logit_transform(temperature, None, 1.0)
    k = V.resolve_k(topk, clamp_p, vocab)
    be = get_backend(backend, logits.device)
    ignore_index = _resolve_ignore(targets, vocab, ignore_index)

    prm = _sampling.resolve(sampling_top_k, sampling_top_p, sampling_min_p, targets.shape, targets.device)

    lead = targets.shape
    z = logits.reshape(-1, vocab).contiguous()
    y = targets.reshape(-1).contiguous()
    if prm is None or k is not None:
        outs = _ops.logprobs_from_logits(z, y, tf, ignore_index, bool(entropy) and prm is None, k, be)
        stats = _finish(outs, lead, bool(entropy) and prm is None, k is not None)
    if prm is None:
        return stats
    if k is None:
        stats = TokenStats(None)
    sampled = SampledLogitsFunction.apply(z, y.long(), tf, ignore_index, prm)
    return _with_sampling(stats, sampled, lead, bool(entropy))

# GRPO-family losses on per-token tensors (MATH.md sections 4-6); implementation in _grpo.py.
from ._grpo import GRPONormalizers, grpo_loss, grpo_loss_and_grads, grpo_normalizers  # noqa: E402,F401 (re-exported)
