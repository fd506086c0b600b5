"""GRPO-family policy losses on per-token tensors, with an entropy bonus (MATH.md sections 4-6).

Everything here works on ``[B, T]`` tensors that are already in memory (log-probs, entropies). The
fused LM-head path (``LinearGRPOLoss``) produces those tensors chunk by chunk and calls into this
module with global normalizers (:func:`grpo_normalizers`), so the math lives in one place.

Every loss type is a weighted sum of a per-token objective::

    loss_policy = sum_{b,t} c[b,t] * ( e[b,t] * is[b,t] * l[b,t] + beta * kl[b,t] )
    loss        = loss_policy - coef * sum(H * M_eff) / D_bonus

``D_bonus = max(sum M_eff, 1)``, except for the token-normalized types given ``num_items_in_batch``,
where it is ``N_items`` (the policy term's denominator: window-exact under gradient accumulation).

``l`` is the per-token policy loss of the loss type, ``e`` the 80/20 mask (1 when off), ``is`` the vLLM
importance ratio (1 when absent; vespo folds it into its weight instead), and the weight ``c`` carries
the aggregation:

    grpo, sapo       c = M / (max(n_b, 1) * B)               n_b = sum_t M[b, t]
    bnpo             c = M / max(sum M, 1)
    dr_grpo          c = M / (B * max_completion_length)
    dapo, cispo, vespo, clip_cov, kl_cov
                     c = M / N_items                          N_items = num_items_in_batch / world
                                                              or all-reduced sum M / world
    luspo  (liger)   c = n_b / (B * T)   on every position (Liger 0.8.5 does not mask per token)
    luspo  (trl)     c = M / B

On CUDA (``backend="auto"``) the per-token objective, its metrics and ``d loss / d logp`` come from one
Triton kernel launch (``kernels/objective.py``, one program per row), for every loss type at token and
sequence level, with KL, ``is_ratio`` and the 80/20 mask. The 80/20 threshold (two ``kthvalue``
selections) and the entropy bonus (one masked sum) are torch. Clip-Cov and KL-Cov run in torch on every
device: they pick tokens from statistics of the whole micro-batch (means, a random permutation, a top-k),
after which the per-token loss is a handful of elementwise ops.

Chunking (the fused head): call :func:`grpo_loss` (or :func:`grpo_loss_and_grads`) on chunks of whole
sequences with ``normalizers=grpo_normalizers(full_mask, ...)``; the chunk results add up to the batch
results. Clip-Cov/KL-Cov need the whole micro-batch in one call.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from . import _validate as V
from ._autograd import once_differentiable

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "clip_cov", "kl_cov")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ENTROPY_SOURCES = ("full", "clamped")
BONUS_NORMALIZATIONS = ("auto", "mean")
LUSPO_NORMALIZATIONS = ("liger", "trl")
COV_STATISTICS = ("local", "global")
GRPO_BACKENDS = ("auto", "torch", "triton")

# Loss types whose per-token objective is the PPO clipped surrogate.
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Loss types normalized by the token count of the batch (DAPO).
TOKEN_NORMALIZED = ("dapo", "cispo", "vespo", "clip_cov", "kl_cov")
COV_TYPES = ("clip_cov", "kl_cov")

# VESPO clamps, as in TRL/Liger get_gamma_weights.
VESPO_LOG_LOW = math.log(1e-8)
VESPO_LOG_HIGH = 20.0
VESPO_LOG_RATIO_CLAMP = 20.0
VESPO_LAMBDA_MIN = 1e-4


class GRPONormalizers(NamedTuple):
    """Batch-wide denominators, so a chunk of whole sequences gives its exact share of the batch loss.

    ``policy_denom``: divides ``sum c * l`` (see the module docstring; for grpo/sapo the per-row
    ``1 / max(n_b, 1)`` is applied on top, for luspo(liger) the per-row ``n_b``).
    ``metric_denom``: ``max(sum M, 1)`` for the masked-mean metrics (kl, clip ratios, entropies).
    ``bonus_denom``: ``max(sum M_eff, 1)`` for the entropy bonus (``N_items`` for the token-normalized
    types given ``num_items_in_batch``, see ``grpo_loss``).
    ``entropy_threshold``: the 80/20 threshold (a 0-d tensor) or None when ``top_entropy_quantile == 1``.
    All are 0-d fp32 tensors (fp64 when the batch is fp64) on the batch device.
    """

    policy_denom: torch.Tensor
    metric_denom: torch.Tensor
    bonus_denom: torch.Tensor
    entropy_threshold: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


# Loss options are fp32 scalars in the compute (fp32 max 3.4e38): magnitudes up to 1e30, and strictly
# positive ones (divisors: sapo temperatures, vespo lambdas, delta) down to 1e-30, compute finitely.
OPTION_MAX, POSITIVE_MIN = 1e30, 1e-30


def _check_number(name, value, *, positive=False, nonneg=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__} {value!r}")
    if not V.is_finite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if abs(value) > OPTION_MAX:
        raise ValueError(f"{name} must have |{name}| <= {OPTION_MAX:g} (an fp32 scalar in the loss), got {value}")
    if positive and value < POSITIVE_MIN:
        raise ValueError(f"{name} must be >= {POSITIVE_MIN:g} (it divides in the loss), got {value}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_quantile(value):
    """``top_entropy_quantile`` in [0, 1]: 1 keeps every token, 0 only the highest-entropy one(s) (TRL)."""
    _check_number("top_entropy_quantile", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {value}")


def _check_fraction(name, value):
    _check_number(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_bt(name, t, shape, *, floating=True):
    if t is None:
        return
    V.check_tensor(name, t, floating=floating)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have the shape of logprobs {shape}, got {tuple(t.shape)}")


def _check_mask(mask, shape):
    V.check_mask("mask", mask, shape, " (the shape of logprobs)")


def _check_advantages(adv, shape):
    V.check_tensor("advantages", adv, floating=True)
    b, t = shape
    if tuple(adv.shape) not in ((b,), (b, 1), (b, t)):
        raise ValueError(
            f"advantages must have shape [B]=({b},) or [B, T]={shape} (logprobs is {shape}), got {tuple(adv.shape)}"
        )


def _check_is_ratio(isr, shape):
    if isr is None:
        return
    V.check_tensor("is_ratio", isr, floating=True)
    b, t = shape
    if tuple(isr.shape) not in ((b,), (b, 1), (b, t)):
        raise ValueError(f"is_ratio must have shape [B, T]={shape}, [B, 1] or [B]=({b},), got {tuple(isr.shape)}")


def _check_num_items(num_items_in_batch, *, values: bool = True):
    """A Python number or a one-element real tensor, finite and >= 0 in both forms (a tensor costs one
    host sync to read; ``values=False`` skips it where the normalizers were already built from it)."""
    if num_items_in_batch is None:
        return
    if not isinstance(num_items_in_batch, torch.Tensor):
        _check_number("num_items_in_batch", num_items_in_batch, nonneg=True)
        return
    t = num_items_in_batch
    if t.numel() != 1:
        raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"num_items_in_batch must be a real number tensor, got {t.dtype}")
    if values and V.reads_values(t):
        v = float(t.reshape(()).item())
        if not math.isfinite(v) or v < 0 or v > OPTION_MAX:
            raise ValueError(f"num_items_in_batch must be finite, >= 0 and <= {OPTION_MAX:g}, got tensor({v})")


def _check_max_completion_length(loss_type, max_completion_length):
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the normalizer B * max_completion_length)")
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError(f"max_completion_length must be an int, got {type(max_completion_length).__name__}")
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")


# ---------------------------------------------------------------------------------------------
# distributed helpers (no-ops in a single process)
# ---------------------------------------------------------------------------------------------


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed
    return None


def _world_size(group=None) -> int:
    d = _dist()
    return d.get_world_size(group) if d is not None else 1


def _check_dp_group(dp_group) -> None:
    if dp_group is not None and _dist() is None:
        raise ValueError("dp_group was given but torch.distributed is not initialized")


def _gather_values(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length over the ranks of ``group`` (rank order; None: the world)."""
    return _gather_with_offset(x, group)[0]


def _gather_with_offset(x: torch.Tensor, group=None):
    """``(concatenation over the ranks of group, where this rank's part starts in it)``."""
    d = _dist()
    if d is None or d.get_world_size(group) == 1:
        return x, 0
    n = torch.tensor([x.numel()], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(d.get_world_size(group))]
    d.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    width = max(sizes)
    padded = x.new_zeros(width)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    d.all_gather(parts, padded, group=group)
    offset = sum(sizes[: d.get_rank(group)])
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), offset


def _all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    d = _dist()
    if d is not None:
        d.all_reduce(t, group=group)
    return t


# ---------------------------------------------------------------------------------------------
# normalizers and the 80/20 mask
# ---------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for a 1-D tensor of any length.

    ``torch.quantile`` refuses inputs above 2^24 elements (TRL's 80/20 mask fails there), so this
    selects the two order statistics with ``kthvalue`` and interpolates between them. ``values`` must
    be non-empty.
    """
    n = values.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    v = values.reshape(-1)
    v_lo = torch.kthvalue(v, lo + 1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = torch.kthvalue(v, hi + 1).values
    return torch.lerp(v_lo, v_hi, torch.tensor(pos - lo, dtype=v.dtype, device=v.device))


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float,
                      dp_group=None) -> torch.Tensor:
    """The ``(1 - q)`` quantile of the entropies of the valid tokens, gathered over the ranks of
    ``dp_group`` (None: every rank, when ``torch.distributed`` is initialized).

    Returns a 0-d tensor; ``+inf`` when no rank has a valid token (then the 80/20 mask is empty).
    """
    _check_quantile(top_entropy_quantile)
    _check_dp_group(dp_group)
    valid = entropy.detach()[mask.bool()]
    valid = valid.to(_compute_dtype(entropy.dtype))
    gathered = _gather_values(valid, dp_group)
    if gathered.numel() == 0:
        return torch.full((), math.inf, dtype=valid.dtype, device=entropy.device)
    return quantile_threshold(gathered, 1.0 - top_entropy_quantile)


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: valid tokens whose entropy is at or above ``threshold``."""
    return (entropy.detach().to(threshold.dtype) >= threshold) & mask.bool()


def grpo_normalizers(
    mask: torch.Tensor,
    *,
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    luspo_normalization: str = "liger",
    top_entropy_quantile: float = 1.0,
    entropy: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
    dp_group=None,
    bonus_normalization: str = "auto",
) -> GRPONormalizers:
    """Denominators of the whole batch, for calling :func:`grpo_loss` on chunks of whole sequences.

    Args:
        mask: ``[B, T]`` loss mask of the whole (micro-)batch.
        loss_type, max_completion_length, num_items_in_batch, luspo_normalization: as in ``grpo_loss``.
        top_entropy_quantile: when < 1, ``entropy`` (``[B, T]``, the entropy the 80/20 mask is built from,
            i.e. the bonus entropy) of the whole batch is needed for the threshold and ``sum M_eff``.
        dtype: fp32 or fp64 (the compute dtype of the loss).
        dp_group: the data-parallel ``torch.distributed`` group the DAPO token count is all-reduced
            and the 80/20 entropies are gathered over (None: every rank, when initialized).
        bonus_normalization: as in ``grpo_loss`` (the denominator of the entropy bonus).

    Returns:
        :class:`GRPONormalizers`. ``grpo_loss(chunk..., normalizers=n)`` over the chunks of the batch
        sums to ``grpo_loss(batch...)`` (loss and every metric except ``entropy_coef``).
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("luspo_normalization", luspo_normalization, LUSPO_NORMALIZATIONS)
    _check_max_completion_length(loss_type, max_completion_length)
    _check_num_items(num_items_in_batch)
    _check_quantile(top_entropy_quantile)
    _check_choice("bonus_normalization", bonus_normalization, BONUS_NORMALIZATIONS)
    V.check_mask("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got {tuple(mask.shape)}")
    if top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the entropy of the whole batch (entropy=...)")
        _check_bt("entropy", entropy, tuple(mask.shape))
    _check_dp_group(dp_group)
    return _normalizers(mask.bool(), loss_type, max_completion_length, num_items_in_batch, luspo_normalization,
                        top_entropy_quantile, entropy, _compute_dtype(dtype), dp_group, bonus_normalization)


def _bonus_uses_policy_denom(loss_type, num_items_in_batch, bonus_normalization) -> bool:
    """The window-exact rule: a token-normalized loss given ``num_items_in_batch`` divides the bonus
    by the policy term's ``N_items`` (so micro-batches of an accumulation window add up)."""
    return bonus_normalization == "auto" and loss_type in TOKEN_NORMALIZED and num_items_in_batch is not None


def _normalizers(valid, loss_type, max_completion_length, num_items_in_batch, luspo_normalization,
                 top_entropy_quantile, entropy, cdt, group=None, bonus_normalization="auto") -> GRPONormalizers:
    dev = valid.device
    bsz, seqlen = valid.shape
    n_valid = valid.sum().to(cdt)
    one = torch.ones((), dtype=cdt, device=dev)
    if loss_type in ("grpo", "sapo"):
        policy = one * max(bsz, 1)
    elif loss_type == "bnpo":
        policy = n_valid.clamp(min=1.0)
    elif loss_type == "dr_grpo":
        policy = one * max(bsz * max_completion_length, 1)
    elif loss_type in TOKEN_NORMALIZED:
        world = _world_size(group)
        if num_items_in_batch is not None:
            items = torch.as_tensor(num_items_in_batch, device=dev).reshape(()).to(cdt)
        else:
            items = _all_reduce_sum(n_valid.clone(), group)
        policy = (items / world).clamp(min=1.0)
    elif luspo_normalization == "liger":
        policy = one * max(bsz * seqlen, 1)
    else:
        policy = one * max(bsz, 1)
    metric = n_valid.clamp(min=1.0)
    threshold = None
    bonus = metric
    if top_entropy_quantile < 1.0:
        threshold = entropy_threshold(entropy, valid, top_entropy_quantile, group).to(cdt)
        bonus = high_entropy_mask(entropy, valid, threshold).sum().to(cdt).clamp(min=1.0)
    if _bonus_uses_policy_denom(loss_type, num_items_in_batch, bonus_normalization):
        bonus = policy
    return GRPONormalizers(policy, metric, bonus, threshold)


# ---------------------------------------------------------------------------------------------
# per-token objective in torch (the fallback path; the Triton kernel computes the same thing)
# ---------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    loss_type: str
    sequence: bool
    eps_low: float
    eps_high: float
    delta: Optional[float]
    beta: float
    bias_corr: bool
    tau_pos: float
    tau_neg: float
    k_pos: float
    lam_pos: float
    k_neg: float
    lam_neg: float
    luspo_liger: bool
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    kl_cov_ratio: float
    ppo_kl_coef: float


def _token_weight(valid_f: torch.Tensor, cfg: _Cfg, norms: GRPONormalizers) -> torch.Tensor:
    """``c[b, t]`` of the module docstring, ``[B, T]``."""
    n_row = valid_f.sum(-1, keepdim=True)
    if cfg.loss_type in ("grpo", "sapo"):
        return valid_f / (n_row.clamp(min=1.0) * norms.policy_denom)
    if cfg.loss_type == "luspo" and cfg.luspo_liger:
        return (n_row / norms.policy_denom).expand_as(valid_f)
    return valid_f / norms.policy_denom


def _row_scale(valid_f: torch.Tensor, cfg: _Cfg, norms: GRPONormalizers) -> torch.Tensor:
    """Per-row factor of ``c`` (``[B]``): ``c[b, t] = row_scale[b] * (M[b, t] or 1 for luspo-liger)``."""
    n_row = valid_f.sum(-1)
    if cfg.loss_type in ("grpo", "sapo"):
        return 1.0 / (n_row.clamp(min=1.0) * norms.policy_denom)
    if cfg.loss_type == "luspo" and cfg.luspo_liger:
        return n_row / norms.policy_denom
    return (1.0 / norms.policy_denom).expand_as(n_row).contiguous()


def _pick(cond: torch.Tensor, a: float, b: float, like: torch.Tensor) -> torch.Tensor:
    """``where(cond, a, b)`` in the dtype of ``like`` (two Python floats would give fp32)."""
    full = lambda v: torch.full((), v, dtype=like.dtype, device=like.device)  # noqa: E731
    return torch.where(cond, full(a), full(b))


def _vespo_phi(log_r, valid_f, adv, isr, cfg: _Cfg) -> torch.Tensor:
    """Detached VESPO weight ``phi`` (``[B, 1]`` or ``[B, T]`` for per-token advantages)."""
    with torch.no_grad():
        seq = (log_r.clamp(-VESPO_LOG_RATIO_CLAMP, VESPO_LOG_RATIO_CLAMP) * valid_f).sum(-1, keepdim=True)
        if isr is not None:
            # Liger/TRL sum log(is) over every position of the row, masked or not.
            seq = seq + torch.log(isr).clamp(VESPO_LOG_LOW, VESPO_LOG_HIGH).sum(-1, keepdim=True)
        log_w = seq.clamp(VESPO_LOG_LOW, VESPO_LOG_HIGH)
        w = torch.exp(log_w)
        nonneg = adv >= 0
        k = _pick(nonneg, cfg.k_pos, cfg.k_neg, log_w)
        lam = _pick(nonneg, cfg.lam_pos, cfg.lam_neg, log_w).clamp(min=VESPO_LAMBDA_MIN)
        phi = torch.exp(lam + k * log_w - lam * w)
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


class _CovScope(NamedTuple):
    """Clip-Cov/KL-Cov statistics over this micro-batch (``is_global`` False, verl's choice) or over
    the valid tokens of every rank of ``group`` (None: the world)."""

    is_global: bool = False
    group: Any = None


_LOCAL = _CovScope()


def _cov(lp, adv, valid, scope: _CovScope = _LOCAL):
    """Detached ``(A - mean A) * (logp - mean logp)`` over the valid tokens of the micro-batch (or of
    every rank of the group: one all_reduce of the three sums)."""
    with torch.no_grad():
        a = adv.expand_as(lp)
        vf = valid.to(lp.dtype)
        sums = torch.stack([vf.sum(), (a * vf).sum(), (lp * vf).sum()])
        if scope.is_global:
            sums = _all_reduce_sum(sums, scope.group)
        n = sums[0].clamp(min=1.0)
        mean_a = sums[1] / n
        mean_lp = sums[2] / n
        return (a - mean_a) * (lp - mean_lp), int(sums[0].item())


def _clip_cov_selection(lp, adv, valid, clipped_by_ppo, cfg: _Cfg, generator, scope: _CovScope = _LOCAL) -> torch.Tensor:
    """Bool ``[B, T]``: ``max(floor(ratio * N), 1)`` tokens drawn uniformly from the valid tokens with
    ``lb < Cov < ub`` that the PPO clip left alone (verl ``compute_policy_loss_clip_cov``).

    Global scope: ``N`` and the means are over every rank, and the draw is over the candidates of
    every rank in rank order, made by the group's first rank with its ``generator`` and broadcast
    (one all_gather of the candidate counts, one broadcast of the drawn indices).
    """
    cov, n_valid = _cov(lp, adv, valid, scope)
    cand = valid & ~clipped_by_ppo & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    want = max(int(cfg.clip_cov_ratio * n_valid), 1)
    idx = torch.nonzero(cand.reshape(-1)).squeeze(-1)
    sel = torch.zeros(lp.numel(), dtype=torch.bool, device=lp.device)
    gen_device = generator.device if generator is not None else "cpu"
    d = _dist()
    if scope.is_global and d is not None and d.get_world_size(scope.group) > 1:
        counts = [torch.zeros(1, dtype=torch.long, device=lp.device) for _ in range(d.get_world_size(scope.group))]
        d.all_gather(counts, torch.tensor([idx.numel()], dtype=torch.long, device=lp.device), group=scope.group)
        counts = [int(c.item()) for c in counts]
        total, offset = sum(counts), sum(counts[: d.get_rank(scope.group)])
        if total == 0:
            return sel.reshape(lp.shape)
        chosen = torch.empty(min(want, total), dtype=torch.long, device=lp.device)
        if d.get_rank(scope.group) == 0:
            chosen.copy_(torch.randperm(total, generator=generator, device=gen_device)[: chosen.numel()])
        src = 0 if scope.group is None else d.get_global_rank(scope.group, 0)
        d.broadcast(chosen, src=src, group=scope.group)
        mine = chosen[(chosen >= offset) & (chosen < offset + idx.numel())] - offset
        sel[idx[mine]] = True
        return sel.reshape(lp.shape)
    if idx.numel() > 0:
        perm = torch.randperm(idx.numel(), generator=generator, device=gen_device)
        sel[idx[perm[: min(want, idx.numel())].to(idx.device)]] = True
    return sel.reshape(lp.shape)


def _kl_cov_selection(lp, adv, valid, cfg: _Cfg, scope: _CovScope = _LOCAL) -> torch.Tensor:
    """Bool ``[B, T]``: the ``max(floor(ratio * N), 1)`` valid tokens of largest Cov (verl ``kl_cov``);
    global scope: of every rank's valid tokens (their Cov values are gathered: two all_gathers)."""
    cov, n_valid = _cov(lp, adv, valid, scope)
    cov = cov.reshape(-1)
    idx = torch.nonzero(valid.reshape(-1)).squeeze(-1)
    sel = torch.zeros(lp.numel(), dtype=torch.bool, device=lp.device)
    if scope.is_global:
        values, offset = _gather_with_offset(cov[idx], scope.group)
        if values.numel() > 0:
            top = torch.topk(values, max(1, int(n_valid * cfg.kl_cov_ratio)), largest=True).indices
            mine = top[(top >= offset) & (top < offset + idx.numel())] - offset
            sel[idx[mine]] = True
        return sel.reshape(lp.shape)
    if idx.numel() > 0:
        want = max(1, int(idx.numel() * cfg.kl_cov_ratio))
        top = torch.topk(cov[idx], want, largest=True).indices
        sel[idx[top]] = True
    return sel.reshape(lp.shape)


def _objective_torch(lp, old, ref, adv, valid, emask, isr, cfg: _Cfg, norms: GRPONormalizers, generator,
                     cov_scope: _CovScope = _LOCAL):
    """Policy + KL part of the loss and the per-row metric sums, by autograd-friendly torch ops.

    Returns ``(loss, sums)`` with ``sums`` a dict of 0-d tensors: kl, low, high, region (masked sums,
    not yet divided by ``metric_denom``) and, for the Cov types, ``selected``.
    """
    valid_f = valid.to(lp.dtype)
    old_ = lp.detach() if old is None else old
    log_r = lp - old_
    if cfg.sequence:
        w = (log_r * valid_f).sum(-1, keepdim=True) / valid_f.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        w = log_r
    coef_1 = torch.exp(w)
    zeros = torch.zeros_like(coef_1, dtype=torch.bool)
    low = high = zeros
    sums: Dict[str, torch.Tensor] = {}
    lt = cfg.loss_type
    if lt in CLIPPED or lt == "clip_cov":
        coef_2 = coef_1.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        low = (coef_1 < 1.0 - cfg.eps_low) & (adv < 0)
        high = (coef_1 > 1.0 + cfg.eps_high) & (adv > 0)
        c1 = coef_1.clamp(max=cfg.delta) if (cfg.delta is not None and lt != "clip_cov") else coef_1
        ell = -torch.min(c1 * adv, coef_2 * adv)
        if lt == "clip_cov":
            clipped_by_ppo = ((-adv * coef_2) > (-adv * coef_1)) & valid
            sel = _clip_cov_selection(lp, adv, valid, clipped_by_ppo, cfg, generator, cov_scope)
            ell = torch.where(sel, torch.zeros_like(ell), ell)
            sums["selected"] = sel.sum().to(lp.dtype)
    elif lt == "cispo":
        ell = -coef_1.clamp(max=cfg.eps_high).detach() * adv * lp
        high = (coef_1 > cfg.eps_high) & (adv > 0)
    elif lt == "sapo":
        tau = _pick(adv > 0, cfg.tau_pos, cfg.tau_neg, coef_1)
        ell = -torch.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau * adv
    elif lt == "vespo":
        ell = -_vespo_phi(log_r, valid_f, adv, isr, cfg) * adv * lp
    else:  # kl_cov
        sel = _kl_cov_selection(lp, adv, valid, cfg, cov_scope)
        ell = -adv * coef_1 + torch.where(sel, cfg.ppo_kl_coef * log_r.abs(), torch.zeros_like(log_r))
        sums["selected"] = sel.sum().to(lp.dtype)
    ell = ell.expand_as(lp)
    if emask is not None:
        ell = ell * emask.to(lp.dtype)
    if isr is not None and lt != "vespo":
        ell = ell * isr
    if cfg.beta != 0.0:
        kl = torch.exp(ref - lp) - (ref - lp) - 1.0
        if cfg.bias_corr:
            kl = kl * coef_1
        ell = ell + cfg.beta * kl
        sums["kl"] = (kl.detach() * valid_f).sum()
    loss = (ell * _token_weight(valid_f, cfg, norms)).sum()
    region = low | high
    for name, flag in (("low", low), ("high", high), ("region", region)):
        sums[name] = (flag.expand_as(lp).to(lp.dtype) * valid_f).sum()
    return loss, sums


# ---------------------------------------------------------------------------------------------
# the public entry point
# ---------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, device: torch.device) -> str:
    _check_choice("backend", backend, GRPO_BACKENDS)
    from .backends import resolve_name

    backend = resolve_name(backend, device)
    if backend == "triton" and device.type != "cuda":
        from .backends import interpreting

        if not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
                "to run the Triton kernel on CPU through the interpreter, or use backend='torch'"
            )
    return backend


class GRPOObjectiveFunction(torch.autograd.Function):
    """Policy + KL part of the loss through the Triton kernel: ``(logp [B, T], ...) -> (loss, kl, low, high)``.

    The kernel writes ``d loss / d logp`` in the same launch as the loss (the objective is elementwise
    given the row statistics), so forward saves that ``[B, T]`` gradient and backward only scales it.
    ``kl``, ``low``, ``high`` are masked sums for the metrics (not differentiable).
    """

    @staticmethod
    def forward(ctx, lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad: bool):
        from ._launch_objective import launch_objective

        out = launch_objective(lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad=compute_grad)
        ctx.save_for_backward(out.grad)
        kl, low, high = out.row_kl.sum(), out.row_low.sum(), out.row_high.sum()
        ctx.mark_non_differentiable(kl, low, high)
        return out.row_loss.sum(), kl, low, high

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, *_):
        (grad,) = ctx.saved_tensors
        if grad is None or g_loss is None:
            return (None,) * 10
        return (grad * g_loss,) + (None,) * 9


def _objective_triton(lp, old, ref, adv, valid, emask, isr, cfg: _Cfg, norms: GRPONormalizers):
    """Same contract as :func:`_objective_torch`, computed by the Triton kernel."""
    row_scale = _row_scale(valid.to(lp.dtype), cfg, norms)
    compute_grad = torch.is_grad_enabled() and lp.requires_grad  # evaluation writes no gradient
    from ._custom_ops import grpo_objective  # a custom op: opaque to torch.compile

    loss, kl, low, high = grpo_objective(lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad)
    sums = {"low": low, "high": high, "region": low + high}  # low needs A < 0, high A > 0: disjoint
    if cfg.beta != 0.0:
        sums["kl"] = kl
    return loss, sums


def _sanitize(x: Optional[torch.Tensor], keep: torch.Tensor, fill: float, cdt) -> Optional[torch.Tensor]:
    """Upcast, and replace the entries outside ``keep`` so that masked positions never make NaN."""
    if x is None:
        return None
    x = x.to(cdt)
    return torch.where(keep, x, torch.full((), fill, dtype=cdt, device=x.device))


def grpo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: Optional[float] = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    is_ratio: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    clamped_entropy: Optional[torch.Tensor] = None,
    entropy_source: str = "full",
    entropy_controller: Any = None,
    luspo_normalization: str = "liger",
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
    generator: Optional[torch.Generator] = None,
    normalizers: Optional[GRPONormalizers] = None,
    backend: str = "auto",
    dp_group=None,
    cov_statistics: str = "local",
    bonus_normalization: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO-family loss with an entropy bonus, on per-token tensors (MATH.md sections 4-6).

    Per token (``logp`` = ``logprobs``, ``old`` defaults to ``logp.detach()``)::

        log_r = logp - old
        w     = log_r                                   importance_sampling_level="token"
              = sum_t log_r * M / max(sum_t M, 1)       "sequence" (GSPO), one value per row
        r     = exp(w)
        grpo, bnpo, dr_grpo, dapo, luspo:  l = -min(min(r, delta) * A, clip(r, 1-eps_low, 1+eps_high) * A)
        cispo:  l = -sg(min(r, eps_high)) * A * logp
        sapo:   l = -A * sigmoid(tau * (r - 1)) * 4 / tau,   tau = tau_pos if A > 0 else tau_neg
        vespo:  l = -sg(phi) * A * logp,  log phi = lam + k log w_seq - lam w_seq  (Liger/TRL)
        clip_cov: the clipped l, set to 0 on a random subset of high-covariance tokens (Cui et al.)
        kl_cov:   l = -A * r  (+ ppo_kl_coef * |log_r| on the top-covariance tokens)
        kl = exp(ref - logp) - (ref - logp) - 1    (* r with use_bias_correction_kl)
        l_tot = e * is * l + beta * kl             (is not applied for vespo; e = 80/20 mask)

    and ``loss = sum c * l_tot - coef * sum(H * M_eff) / D_bonus`` with the aggregation weights ``c``
    of the module docstring (they follow Liger 0.8.5; ``luspo_normalization="trl"`` gives TRL 1.16's
    ``mean_b sum_t l * M``).

    Entropy bonus under gradient accumulation (``bonus_normalization="auto"``): for the token-normalized
    types (dapo, cispo, vespo, clip_cov, kl_cov) given ``num_items_in_batch``, ``D_bonus = N_items``,
    the policy term's own denominator, so the losses of the micro-batches of a window add up to the
    one-batch bonus ``-coef * sum_window(H * M_eff) / N_items`` (window-exact, like the policy term).
    Otherwise (every other loss type, or no ``num_items_in_batch``) ``D_bonus = max(sum M_eff, 1)`` over
    this call's tokens: the masked mean entropy of the micro-batch; under accumulation divide the loss by
    the number of accumulation steps, as TRL 1.16 does for the bonus of every loss type.
    ``bonus_normalization="mean"`` always takes the micro-batch mean (the TRL adapter uses it).

    Numeric guarantees and input rules: the mask is a 0/1 weight (bool, integer or floating holding
    only 0 and 1; anything else, NaN included, raises ValueError naming ``mask``). Entries of every
    ``[B, T]`` input outside the mask (log-probs, old/ref log-probs, entropies, advantages, is_ratio)
    may hold anything, NaN and +-inf included: they never reach the loss, a metric or a gradient.
    ``num_items_in_batch`` (a number or a one-element tensor) must be finite and >= 0 in both forms.
    Compute is fp32 (fp64 for fp64 log-probs).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
        advantages: ``[B]`` or ``[B, T]`` (constant).
        mask: ``[B, T]`` loss mask (bool, or 0/1 integers or floats; other values raise). Entries of the
            other inputs outside the mask may hold anything, NaN and +-inf included: they never reach
            the loss or a gradient.
        old_logprobs, ref_logprobs: ``[B, T]`` constants. ``ref_logprobs`` is required when ``beta != 0``.
        entropy: ``[B, T]`` full entropy (differentiable); ``clamped_entropy``: ``[B, T]`` clamped
            entropy (differentiable). ``entropy_source`` picks the one used by the bonus and the 80/20 mask.
        is_ratio: ``[B, T]`` (or ``[B, 1]``/``[B]``) vLLM importance-sampling correction (constant).
        entropy_coef: the bonus coefficient; or ``entropy_controller`` (an object with a ``coef``
            attribute and ``observe(entropy_sum, token_count)``), not both. With a controller, every call
            made with grad enabled reports the masked sum of the bonus entropy and the token count.
        top_entropy_quantile: ``q`` in [0, 1]; below 1 only tokens whose bonus entropy is at or above the
            ``(1-q)`` quantile of the valid tokens (gathered over ranks) carry the policy term and bonus;
            0 keeps only the highest-entropy token (all tokens tied with it), as stock TRL.
        clip_cov_*, kl_cov_ratio, ppo_kl_coef, generator: Clip-Cov / KL-Cov (verl names and defaults).
        normalizers: batch-wide denominators from :func:`grpo_normalizers` when the inputs are a chunk
            of whole sequences of a larger batch; the loss and metrics are then that chunk's share
            (sums over chunks give the batch values). None: the inputs are the whole batch.
        backend: ``"auto"`` (Triton kernel on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        dp_group: the data-parallel ``torch.distributed`` group (ranks holding different tokens) over
            which the batch-wide statistics are taken: the DAPO token count (one all_reduce), the
            80/20 entropy threshold (two all_gathers) and, with ``cov_statistics="global"``, the
            Clip-Cov/KL-Cov statistics. None: every rank (the default group) when
            ``torch.distributed`` is initialized; nothing is reduced otherwise.
        cov_statistics: ``"local"`` (verl: Cov means, the token count ``N`` and the selection over
            this micro-batch) or ``"global"`` (over the valid tokens of every rank of ``dp_group``:
            one all_reduce of three sums, plus an all_gather of the candidate counts and a broadcast
            of the draw made by the group's first rank with its ``generator`` (Clip-Cov), or two
            all_gathers of the Cov values (KL-Cov)). A batch split over ranks then selects what one
            process selects on the whole batch.
        bonus_normalization: ``"auto"`` (the rule above) or ``"mean"`` (always the micro-batch mean).

    Returns:
        ``(loss, metrics)``: a 0-d loss (fp32; fp64 for fp64 log-probs) and a dict of detached 0-d
        tensors: ``policy_loss`` (the loss without the bonus), ``clip_ratio/low_mean``,
        ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` (masked means; Liger's choice of flags per
        loss type), ``entropy_coef``, and ``kl`` (beta != 0), ``entropy`` and ``clamped_entropy``
        (masked means, when given), ``cov/selected_mean`` (clip_cov/kl_cov).
    """
    return _grpo_loss_entry(torch.is_grad_enabled(), **locals())


def _grpo_loss_entry(
    observe: bool,
    logprobs,
    advantages,
    mask,
    *,
    old_logprobs,
    ref_logprobs,
    entropy,
    loss_type,
    epsilon_low,
    epsilon_high,
    delta,
    beta,
    use_bias_correction_kl,
    importance_sampling_level,
    sapo_temperature_pos,
    sapo_temperature_neg,
    vespo_k_pos,
    vespo_lambda_pos,
    vespo_k_neg,
    vespo_lambda_neg,
    max_completion_length,
    num_items_in_batch,
    is_ratio,
    entropy_coef,
    top_entropy_quantile,
    clamped_entropy,
    entropy_source,
    entropy_controller,
    luspo_normalization,
    clip_cov_ratio,
    clip_cov_lb,
    clip_cov_ub,
    kl_cov_ratio,
    ppo_kl_coef,
    generator,
    normalizers,
    backend,
    dp_group=None,
    cov_statistics="local",
    bonus_normalization="auto",
):
    """Validate the arguments of :func:`grpo_loss` and compute it; ``observe``: call the controller."""
    # ---- validation -----------------------------------------------------------------------
    V.check_tensor("logprobs", logprobs, floating=True)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must have shape [B, T], got {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    _check_advantages(advantages, shape)
    _check_mask(mask, shape)
    _check_bt("old_logprobs", old_logprobs, shape)
    _check_bt("ref_logprobs", ref_logprobs, shape)
    _check_bt("entropy", entropy, shape)
    _check_bt("clamped_entropy", clamped_entropy, shape)
    _check_is_ratio(is_ratio, shape)
    V.check_same_device(logprobs=logprobs, advantages=advantages, mask=mask, old_logprobs=old_logprobs,
                        ref_logprobs=ref_logprobs, entropy=entropy, clamped_entropy=clamped_entropy,
                        is_ratio=is_ratio)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    _check_choice("entropy_source", entropy_source, ENTROPY_SOURCES)
    _check_choice("luspo_normalization", luspo_normalization, LUSPO_NORMALIZATIONS)
    if importance_sampling_level == "sequence" and loss_type in COV_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is token-level (verl); importance_sampling_level must be 'token'")
    _check_number("epsilon_low", epsilon_low, nonneg=True)
    _check_number("epsilon_high", epsilon_high, nonneg=True)
    _check_number("delta", delta, positive=True, allow_none=True)
    _check_number("beta", beta)
    _check_number("sapo_temperature_pos", sapo_temperature_pos, positive=True)
    _check_number("sapo_temperature_neg", sapo_temperature_neg, positive=True)
    for name, value in (("vespo_k_pos", vespo_k_pos), ("vespo_k_neg", vespo_k_neg)):
        _check_number(name, value)
    for name, value in (("vespo_lambda_pos", vespo_lambda_pos), ("vespo_lambda_neg", vespo_lambda_neg)):
        _check_number(name, value, positive=True)
    _check_max_completion_length(loss_type, max_completion_length)
    _check_num_items(num_items_in_batch, values=normalizers is None)
    _check_number("entropy_coef", entropy_coef)
    _check_quantile(top_entropy_quantile)
    _check_choice("bonus_normalization", bonus_normalization, BONUS_NORMALIZATIONS)
    _check_fraction("clip_cov_ratio", clip_cov_ratio)
    _check_fraction("kl_cov_ratio", kl_cov_ratio)
    _check_number("clip_cov_lb", clip_cov_lb)
    _check_number("clip_cov_ub", clip_cov_ub)
    if clip_cov_lb >= clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={clip_cov_lb}, clip_cov_ub={clip_cov_ub}")
    _check_number("ppo_kl_coef", ppo_kl_coef, nonneg=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs (the KL term is to the reference policy)")
    if not isinstance(use_bias_correction_kl, bool):
        raise TypeError(f"use_bias_correction_kl must be a bool, got {type(use_bias_correction_kl).__name__}")
    if entropy_controller is not None:
        if entropy_coef != 0.0:
            raise ValueError(f"give entropy_coef or entropy_controller, not both (entropy_coef={entropy_coef})")
        if not hasattr(entropy_controller, "coef") or not callable(getattr(entropy_controller, "observe", None)):
            raise TypeError("entropy_controller must have a `coef` attribute and an `observe(entropy_sum, token_count)` method")
        coef = entropy_controller.coef
        if isinstance(coef, torch.Tensor):
            coef = float(coef)
        _check_number("entropy_controller.coef", coef)
    else:
        coef = float(entropy_coef)
    bonus_entropy = entropy if entropy_source == "full" else clamped_entropy
    src_name = "entropy" if entropy_source == "full" else "clamped_entropy"
    if bonus_entropy is None and (coef != 0.0 or entropy_controller is not None or top_entropy_quantile < 1.0):
        why = "top_entropy_quantile < 1" if top_entropy_quantile < 1.0 else "an entropy bonus"
        raise ValueError(f"{why} with entropy_source={entropy_source!r} needs {src_name}=[B, T]")
    if normalizers is not None:
        if not isinstance(normalizers, GRPONormalizers):
            raise TypeError(f"normalizers must come from grpo_normalizers(), got {type(normalizers).__name__}")
        if loss_type in COV_TYPES:
            raise ValueError(f"loss_type={loss_type!r} selects tokens from statistics of the whole micro-batch; "
                             "call it on the whole batch (normalizers=None)")
        if (normalizers.entropy_threshold is None) != (top_entropy_quantile == 1.0):
            raise ValueError("normalizers were built with a different top_entropy_quantile")
    be = _resolve_backend(backend, logprobs.device)
    _check_choice("cov_statistics", cov_statistics, COV_STATISTICS)
    _check_dp_group(dp_group)

    cfg = _Cfg(loss_type, importance_sampling_level == "sequence", float(epsilon_low), float(epsilon_high),
               None if delta is None else float(delta), float(beta), use_bias_correction_kl,
               float(sapo_temperature_pos), float(sapo_temperature_neg), float(vespo_k_pos),
               float(vespo_lambda_pos), float(vespo_k_neg), float(vespo_lambda_neg),
               luspo_normalization == "liger", float(clip_cov_ratio), float(clip_cov_lb), float(clip_cov_ub),
               float(kl_cov_ratio), float(ppo_kl_coef))
    return _grpo_loss_impl(logprobs, advantages, mask, old_logprobs, ref_logprobs, entropy, clamped_entropy,
                           bonus_entropy, is_ratio, cfg, coef, entropy_controller, top_entropy_quantile,
                           max_completion_length, num_items_in_batch, generator, normalizers, be,
                           observe=observe, dp_group=dp_group, cov_global=cov_statistics == "global",
                           bonus_normalization=bonus_normalization)


def _grpo_loss_impl(logprobs, advantages, mask, old, ref, entropy, clamped, bonus_entropy, isr, cfg: _Cfg,
                    coef, controller, q, max_completion_length, num_items_in_batch, generator, norms, backend,
                    observe: bool, dp_group=None, cov_global: bool = False, bonus_normalization: str = "auto"):
    cdt = _compute_dtype(logprobs.dtype)
    valid = mask.bool() if mask.dtype != torch.bool else mask
    # Masked positions are replaced by neutral values so that -inf/NaN there never reaches the loss.
    # Liger's luspo weights every position of a row, so there finite masked values are kept.
    keep_lp = valid
    if cfg.loss_type == "luspo" and cfg.luspo_liger:
        finite = torch.isfinite(logprobs)
        if old is not None:
            finite = finite & torch.isfinite(old)
        if ref is not None and cfg.beta != 0.0:
            finite = finite & torch.isfinite(ref)
        keep_lp = valid | finite
    lp = _sanitize(logprobs, keep_lp, 0.0, cdt)
    old_ = _sanitize(old, keep_lp, 0.0, cdt)
    ref_ = _sanitize(ref, keep_lp, 0.0, cdt) if cfg.beta != 0.0 else None
    adv = advantages.to(cdt)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    # Advantages outside the mask (a [B, T] entry, or a [B] entry of a row with no valid token) may be
    # NaN/inf: 0 there, so 0 * NaN never reaches a sum (Cov means, luspo rows, sequence weights).
    adv_keep = (valid | (keep_lp & torch.isfinite(adv))) if adv.shape[-1] != 1 else valid.any(-1, keepdim=True)
    adv = torch.where(adv_keep, adv, torch.zeros((), dtype=cdt, device=adv.device))
    isr_ = None
    if isr is not None:
        isr_ = isr.to(cdt)
        isr_ = isr_.unsqueeze(-1) if isr_.dim() == 1 else isr_
        if isr_.shape[-1] != 1:
            isr_ = torch.where(valid | torch.isfinite(isr_), isr_, torch.ones((), dtype=cdt, device=isr_.device))

    if norms is None:
        norms = _normalizers(valid, cfg.loss_type, max_completion_length, num_items_in_batch,
                             "liger" if cfg.luspo_liger else "trl", q, bonus_entropy, cdt, dp_group,
                             bonus_normalization)
    else:
        norms = GRPONormalizers(*(None if t is None else t.to(device=lp.device, dtype=cdt) for t in norms))
    emask = None
    if norms.entropy_threshold is not None:
        emask = high_entropy_mask(_sanitize(bonus_entropy, valid, 0.0, cdt), valid, norms.entropy_threshold)

    if backend == "triton" and cfg.loss_type not in COV_TYPES:
        policy, sums = _objective_triton(lp, old_, ref_, adv, valid, emask, isr_, cfg, norms)
    else:
        policy, sums = _objective_torch(lp, old_, ref_, adv, valid, emask, isr_, cfg, norms, generator,
                                        _CovScope(cov_global, dp_group))

    metrics: Dict[str, torch.Tensor] = {"policy_loss": policy.detach()}
    loss = policy
    if bonus_entropy is not None and (coef != 0.0 or controller is not None):
        m_eff = valid if emask is None else emask
        h = _sanitize(bonus_entropy, m_eff, 0.0, cdt)
        h_sum = h.sum()
        if coef != 0.0:
            loss = loss - coef * (h_sum / norms.bonus_denom)
        if controller is not None and observe:
            controller.observe(h_sum.detach(), m_eff.sum().to(cdt))
    if cfg.beta != 0.0:
        metrics["kl"] = sums["kl"] / norms.metric_denom
    metrics["clip_ratio/low_mean"] = sums["low"] / norms.metric_denom
    metrics["clip_ratio/high_mean"] = sums["high"] / norms.metric_denom
    metrics["clip_ratio/region_mean"] = sums["region"] / norms.metric_denom
    if "selected" in sums:
        metrics["cov/selected_mean"] = sums["selected"] / norms.metric_denom
    if entropy is not None:
        metrics["entropy"] = _sanitize(entropy.detach(), valid, 0.0, cdt).sum() / norms.metric_denom
    if clamped is not None:
        metrics["clamped_entropy"] = _sanitize(clamped.detach(), valid, 0.0, cdt).sum() / norms.metric_denom
    metrics["entropy_coef"] = torch.tensor(coef, dtype=cdt, device=lp.device)
    return loss, {k: v.detach() for k, v in metrics.items()}


_GRPO_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(grpo_loss).parameters.items()
    if p.kind == p.KEYWORD_ONLY and name not in ("entropy", "clamped_entropy")
}


def grpo_loss_and_grads(logprobs, advantages, mask, *, entropy=None, clamped_entropy=None, **kwargs):
    """``grpo_loss`` plus the per-token gradients, without building a graph over the caller's tensors.

    For fused heads that compute gradients inside their forward pass (one chunk of whole sequences at
    a time, with ``normalizers=grpo_normalizers(full_mask, ...)``). Returns
    ``(loss, metrics, grad_logprobs, grad_entropy, grad_clamped_entropy)``: detached loss, the metrics,
    and ``d loss / d input`` as ``[B, T]`` tensors in the compute dtype (None for an input not given).
    Masked positions get exactly zero. A controller observes once per call when grad mode is on.
    """
    observe = torch.is_grad_enabled()
    with torch.enable_grad():
        lp = logprobs.detach().requires_grad_(True)
        ent = None if entropy is None else entropy.detach().requires_grad_(True)
        cl = None if clamped_entropy is None else clamped_entropy.detach().requires_grad_(True)
        args = dict(_GRPO_DEFAULTS)
        args.update(kwargs)
        loss, metrics = _grpo_loss_entry(observe, lp, advantages, mask, entropy=ent, clamped_entropy=cl, **args)
        inputs = [t for t in (lp, ent, cl) if t is not None]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    it = iter(grads)
    out = []
    for t in (lp, ent, cl):
        if t is None:
            out.append(None)
            continue
        g = next(it)
        out.append(torch.zeros_like(t, dtype=_compute_dtype(t.dtype)) if g is None else g.to(_compute_dtype(t.dtype)))
    return (loss.detach(), metrics, *out)
