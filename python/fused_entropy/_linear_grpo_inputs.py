"""``LinearGRPOLoss``'s arguments, checked once in the constructor (:func:`check_arguments`; what Liger
0.8.5 rejects only in forward: :func:`liger_config_error`), and its tensor inputs, checked once per
forward (:func:`check_batch`): shapes, dtypes and devices with the argument's name, the token ids
against the vocabulary, the targets each path scores and the reference log-probs of the KL term.

One function for both heads: the whole head on this rank, or the head split by vocabulary over a
``process_group`` (then a check that fails fails on every rank: this rank joins the agreement
collective the others are entering, then raises).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, NamedTuple, Optional

import torch

from . import _grpo as G
from . import _sampling
from . import _validate as V
from ._common import IGNORE_INDEX
from ._types import LogitTransform
from .backends import BACKENDS, get_backend
from .functional import check_head_dtypes, gather_dtensor_head, head_in_hidden_dtype, linear_logprobs


class LigerAssertionError(AssertionError, ValueError):
    """Where Liger 0.8.5 asserts (``AssertionError``) this package raises one that is also a
    ``ValueError`` (its own contract for bad arguments): ``except`` clauses of either kind catch it."""


def check_arguments(*, loss_type, importance_sampling_level, delta, sapo_temperature_pos, sapo_temperature_neg,
                    vespo_lambda_pos, vespo_lambda_neg, use_ref_model, temperature, softcap, logit_scale,
                    entropy_source, topk, clamp_p, entropy_controller, entropy_coef, generator, backend, single_pass,
                    rows_per_chunk, sampling_top_k, sampling_top_p, sampling_min_p, process_group) -> None:
    """``LinearGRPOLoss``'s constructor checks: everything knowable without tensors, with the argument's
    name, except what Liger 0.8.5 accepts there and rejects in forward (an unknown loss_type or
    importance_sampling_level, sequence level with cispo/sapo/vespo, dr_grpo without
    max_completion_length): those raise in forward (:func:`liger_config_error`), as Liger's, so code
    written against Liger catches them where it expects them. The loss options themselves are checked
    by ``GRPOOptions``."""
    row = G.LOSSES.get(loss_type)
    if importance_sampling_level == "sequence" and row is not None and not row.sequence:  # ours: fail early
        raise ValueError(
            f"importance_sampling_level='sequence' is not supported for loss_type={loss_type!r}; "
            "use importance_sampling_level='token'"
        )
    for name, value in (("delta", delta), ("sapo_temperature_pos", sapo_temperature_pos),
                        ("sapo_temperature_neg", sapo_temperature_neg)):
        # Liger's own constructor checks, with its words (a non-positive value, NaN aside)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    # vespo lambdas below 1e-4 act as 1e-4 (TRL/Liger clamp), so any finite value is accepted, as Liger
    for name, value in (("vespo_lambda_pos", vespo_lambda_pos), ("vespo_lambda_neg", vespo_lambda_neg)):
        G._check_number(name, value)
    G._check_bool("use_ref_model", use_ref_model)
    V.check_transform(temperature, softcap, logit_scale)
    G._check_choice("entropy_source", entropy_source, G.ENTROPY_SOURCES)
    V.resolve_k(topk, clamp_p, sys.maxsize)  # types and ranges; topk <= V is checked per call
    if entropy_source == "clamped" and topk is None and clamp_p is None:
        raise ValueError("entropy_source='clamped' needs topk or clamp_p (the size of the clamped set)")
    G._check_controller(entropy_controller, entropy_coef)
    G._check_generator(generator)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if single_pass is not None:
        G._check_bool("single_pass", single_pass)
    if rows_per_chunk is not None and (isinstance(rows_per_chunk, bool) or not isinstance(rows_per_chunk, int) or rows_per_chunk < 1):
        raise ValueError(f"rows_per_chunk must be a positive int or None, got {rows_per_chunk!r}")
    for name, value in (("sampling_top_k", sampling_top_k), ("sampling_top_p", sampling_top_p),
                        ("sampling_min_p", sampling_min_p)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a number or None here (per-request tensors: linear_logprobs), "
                            f"got a tensor")
    _sampling.resolve(sampling_top_k, sampling_top_p, sampling_min_p, (1,), torch.device("cpu"))
    if single_pass and process_group is not None:
        raise ValueError("single_pass=True is not possible with process_group: the vocabulary-parallel head "
                         "needs every rank's statistics before any gradient")


def liger_config_error(loss_type: str, level: str, max_completion_length) -> Optional[Exception]:
    """The configurations Liger 0.8.5's constructor accepts and its forward rejects, in the same
    order, with Liger's exception type and words (this package's after them)."""
    row = G.LOSSES.get(loss_type)
    if level == "sequence" and row is not None and row.sequence and not row.sequence_liger:
        return ValueError(
            f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
            f"Use importance_sampling_level='token' instead. ({loss_type} weights tokens, not sequences)"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        return LigerAssertionError(
            "max_completion_length must be provided for loss_type 'dr_grpo' (the normalizer "
            "B * max_completion_length)"
        )
    if level not in G.IMPORTANCE_SAMPLING_LEVELS:
        return ValueError(
            f"Unknown importance sampling level: {level}. Possible values are 'token' and 'sequence'. "
            f"(importance_sampling_level must be one of {G.IMPORTANCE_SAMPLING_LEVELS}, got {level!r})"
        )
    if loss_type not in G.LOSS_TYPES:
        return ValueError(f"Unknown loss type: {loss_type} (loss_type must be one of {G.LOSS_TYPES}, got {loss_type!r})")
    return None


class Batch(NamedTuple):
    """One forward's checked inputs. ``w``/``bias`` run in ``x``'s dtype (Liger: ``weight.to(_input.dtype)``;
    gradients keep each dtype) and a ``DTensor`` head is gathered, except under a ``process_group`` (this
    rank's shard as given). ``targets [B, T]``: the ids each row scores, ``IGNORE_INDEX`` on rows the
    backends skip; ``no_target [B, T]`` bool or None: rows scored with no target logit
    (:func:`no_target_logit`). ``k``: the clamped-set size on the whole head (None under a
    ``process_group``: ``linear_logprobs`` resolves the global one); ``be``: the backend module (None under
    a ``process_group``)."""

    x: torch.Tensor
    w: torch.Tensor
    bias: Optional[torch.Tensor]
    ref_weight: Optional[torch.Tensor]
    ref_bias: Optional[torch.Tensor]
    targets: torch.Tensor
    no_target: Optional[torch.Tensor]
    bsz: int
    seqlen: int
    vocab: int
    k: Optional[int]
    tf: LogitTransform
    be: Any


def no_target_logit(x, w, bias, rows, tf: LogitTransform, dtype) -> torch.Tensor:
    """``[B, T]``: the transformed logit ``z_0`` of vocabulary id 0 on ``rows`` (0 elsewhere), by autograd.

    A row scored with target 0 gives ``logp_0 = z_0 - lse``, so ``logp_0 - z_0 = -lse`` is the
    log-prob of a row with no target logit, with gradient ``-p`` (Liger's value for an id outside the
    vocabulary).
    """
    u = x[rows].to(dtype) @ w[0].to(dtype)
    if bias is not None:
        u = u + bias[0].to(dtype)
    u = u * tf.logit_scale
    if tf.softcap is not None:
        u = tf.softcap * torch.tanh(u / tf.softcap)
    z0 = u / tf.temperature
    return torch.zeros(rows.shape, dtype=dtype, device=x.device).masked_scatter(rows, z0)


def check_inputs(x, w, ids, mask, adv, bias, ref_lp, old_lp, isr):
    """Shapes, dtypes and devices of ``forward``'s tensors; returns ``(B, T, V)``."""
    V.check_tensor("_input", x, floating=True)
    V.check_tensor("lin_weight", w, floating=True)
    V.check_tensor("selected_token_ids", ids, integer=True)
    if x.dim() != 3:
        raise ValueError(f"_input must have shape [B, T, H], got {tuple(x.shape)}")
    if w.dim() != 2:
        raise ValueError(f"lin_weight must have shape [V, H], got {tuple(w.shape)}")
    bsz, seqlen, hidden = x.shape
    vocab = w.shape[0]
    if w.shape[1] != hidden:
        raise ValueError(f"lin_weight has H={w.shape[1]} (shape {tuple(w.shape)}) but _input has H={hidden} (shape {tuple(x.shape)})")
    if vocab == 0:
        raise ValueError("lin_weight must have at least one vocabulary row (V >= 1)")
    bt = (bsz, seqlen)
    check_head_dtypes(x, w, bias, names=("_input", "lin_weight", "bias"))
    if tuple(ids.shape) != bt:
        raise ValueError(f"selected_token_ids must have shape [B, T]={bt} (from _input {tuple(x.shape)}), got {tuple(ids.shape)}")
    V.check_mask("attention_mask", mask, bt, f" ([B, T] from _input {tuple(x.shape)})")
    V.check_tensor("advantages", adv, floating=True)
    if tuple(adv.shape) not in ((bsz,), (bsz, seqlen)):
        raise ValueError(f"advantages must have shape [B]=({bsz},) or [B, T]={bt}, got {tuple(adv.shape)}")
    if bias is not None:
        V.check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape [V]=({vocab},), got {tuple(bias.shape)}")
    for name, t in (("ref_per_token_logps", ref_lp), ("old_per_token_logps", old_lp)):
        if t is not None:
            V.check_tensor(name, t, floating=True)
            if tuple(t.shape) != bt:
                raise ValueError(f"{name} must have shape [B, T]={bt}, got {tuple(t.shape)}")
    if isr is not None:
        V.check_tensor("vllm_is_ratio", isr, floating=True)
        if tuple(isr.shape) not in ((bsz,), (bsz, 1), bt):
            raise ValueError(f"vllm_is_ratio must have shape [B, T]={bt}, [B, 1] or [B]=({bsz},), got {tuple(isr.shape)}")
    V.check_same_device(_input=x, lin_weight=w, selected_token_ids=ids, attention_mask=mask, advantages=adv,
                        bias=bias, ref_per_token_logps=ref_lp, old_per_token_logps=old_lp, vllm_is_ratio=isr)
    return bsz, seqlen, vocab


def check_ids(targets, valid, vocab) -> None:
    """Every target is a vocabulary id or ``IGNORE_INDEX``, and no row inside the mask is ignored."""
    if targets.numel() == 0 or not V.reads_values(targets):
        return
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
    bad = bad | (valid & (targets == IGNORE_INDEX))
    if bool(bad.any()):
        value = targets[bad][0].item()
        raise ValueError(f"selected_token_ids inside attention_mask must be in [0, {vocab}); found {value}")


def _targets(ids, valid, vocab, every_position: bool):
    """``(targets, no_target)`` of the whole head."""
    if not every_position:
        return torch.where(valid, ids, torch.full_like(ids, IGNORE_INDEX)), None
    # Liger scores a masked position whose id is not a vocabulary id (-100 padding) with no target
    # logit: logp = -lse, gradient -p. Here: target 0, then logp_0 - z_0 (no_target_logit).
    no_target = ~valid & ((ids < 0) | (ids >= vocab))
    targets = torch.where(no_target, torch.zeros_like(ids), ids)
    return targets, (no_target if bool(no_target.any()) else None)


def _shard_targets(ids, valid, every_position: bool):
    """The targets of a head split by vocabulary: global ids, whose range ``[0, V)`` ``linear_logprobs``
    checks on all ranks together."""
    inside = ids[valid]
    if inside.numel() and bool((inside < 0).any()):
        raise ValueError(f"selected_token_ids inside attention_mask must be global vocabulary ids; "
                         f"found {int(inside[inside < 0][0])}")
    keep = valid | (ids >= 0) if every_position else valid
    return torch.where(keep, ids, torch.full_like(ids, IGNORE_INDEX))


def check_batch(x, w, ids, mask, adv, bias, ref_lp, old_lp, isr, ref_weight, ref_bias, *, every_position: bool,
                temperature, softcap, logit_scale, topk, clamp_p, backend: str, process_group) -> Batch:
    """Check ``forward``'s tensors and build what both paths take (:class:`Batch`).

    ``every_position``: Liger's luspo, which weights every position of a row (masked or not), so every
    token is computed; elsewhere rows outside the mask are skipped by the backends.
    """
    if process_group is not None:
        from . import _distributed as D

        D.check_group(process_group)
        try:
            bsz, seqlen, vocab = check_inputs(x, w, ids, mask, adv, bias, ref_lp, old_lp, isr)
            targets = _shard_targets(ids.long(), mask.bool(), every_position)
            tf = V.logit_transform(temperature, softcap, logit_scale)
        except (TypeError, ValueError) as e:
            D.agree(process_group, e)
            raise
        return Batch(x, w, bias, ref_weight, ref_bias, targets, None, bsz, seqlen, vocab, None, tf, None)
    w, bias = gather_dtensor_head(w, bias)  # FSDP2: gathered, gradient to the shards
    ref_weight, ref_bias = gather_dtensor_head(ref_weight, ref_bias)
    bsz, seqlen, vocab = check_inputs(x, w, ids, mask, adv, bias, ref_lp, old_lp, isr)
    w, bias = head_in_hidden_dtype(x, w, bias)
    k = V.resolve_k(topk, clamp_p, vocab)
    tf = V.logit_transform(temperature, softcap, logit_scale)
    be = get_backend(backend, x.device)
    valid = mask.bool()
    targets, no_target = _targets(ids.long(), valid, vocab, every_position)
    check_ids(targets, valid, vocab)
    return Batch(x, w, bias, ref_weight, ref_bias, targets, no_target, bsz, seqlen, vocab, k, tf, be)


def reference_logprobs(ref_lp, ref_input, b: Batch, *, backend: str, process_group, sampling=None) -> torch.Tensor:
    """Reference log-probs ``[B, T]`` for the KL term (``use_ref_model`` with ``beta != 0``):
    ``ref_lp`` when given, else ``ref_input`` through ``b.ref_weight``/``b.ref_bias`` under ``no_grad``,
    under the same sampling truncation as the policy (``sampling``: the ``sampling_*`` keyword
    arguments, or None), so the KL compares like with like (as the TRL head does)."""
    ref_weight, ref_bias, bsz, seqlen, tf = b.ref_weight, b.ref_bias, b.bsz, b.seqlen, b.tf
    if ref_lp is not None:
        if ref_input is not None:
            warnings.warn("Both ref_per_token_logps and ref_input are provided. Using ref_per_token_logps.")
        return ref_lp
    if ref_input is None:
        raise LigerAssertionError(
            "If use_ref_model is True, ref_per_token_logps or ref_input must be provided (with beta != 0 "
            "the KL term needs the reference log-probs; ref_input with ref_weight)"
        )
    if ref_weight is None:
        raise ValueError("ref_input needs ref_weight (the reference model's LM head [V, H])")
    V.check_tensor("ref_input", ref_input, floating=True)
    if ref_input.dim() != 3 or tuple(ref_input.shape[:2]) != (bsz, seqlen):
        raise ValueError(f"ref_input must have shape [B, T, H]=({bsz}, {seqlen}, H), got {tuple(ref_input.shape)}")
    # the reference head scores the same ids: its vocabulary is the policy's (named here, not as
    # an out-of-range target further down)
    V.check_tensor("ref_weight", ref_weight, floating=True)
    want = (b.vocab, ref_input.shape[-1])
    if ref_weight.dim() != 2 or tuple(ref_weight.shape) != want:
        raise ValueError(f"ref_weight must have shape [V, H']={want} (V of lin_weight, H' of ref_input "
                         f"{tuple(ref_input.shape)}), got {tuple(ref_weight.shape)}")
    if ref_bias is not None:
        V.check_tensor("ref_bias", ref_bias, floating=True)
        if tuple(ref_bias.shape) != (want[0],):
            raise ValueError(f"ref_bias must have shape [V]=({want[0]},), got {tuple(ref_bias.shape)}")
    with torch.no_grad():
        stats = linear_logprobs(
            ref_input, ref_weight, b.targets, bias=ref_bias, temperature=tf.temperature, softcap=tf.softcap,
            logit_scale=tf.logit_scale, ignore_index=IGNORE_INDEX, entropy=False, backend=backend,
            process_group=process_group, **(sampling or {}),
        )
        logp = stats.policy_logprobs()
        if b.no_target is not None:
            return logp - no_target_logit(ref_input, ref_weight, ref_bias, b.no_target, tf, logp.dtype)
    return logp
