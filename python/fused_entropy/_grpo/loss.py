"""The public GRPO loss on per-token tensors: :func:`grpo_loss` and :func:`grpo_loss_and_grads`.

A call is checked in three parts, each once: the tensors (``inputs.check_inputs``), the scalar options
(:class:`GRPOOptions`) and what the call adds to them (:class:`_Call`: the bonus coefficient, the
controller, the normalizers, the resolved backend). :func:`compute` and :func:`loss_and_grads` take
the checked parts; the fused head calls them once per chunk without checking anything again.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from .cov import _CovScope
from .inputs import check_inputs
from .normalizers import GRPONormalizers, _check_dp_group, _compute_dtype, _normalizers, high_entropy_mask
from .objective import _Cfg, _objective_torch, _objective_triton
from .options import (OPTION_NAMES, GRPOOptions, _check_controller, _check_generator, _check_num_items, _check_number,
                      _resolve_backend)


class GRPOInputs(NamedTuple):
    """The tensors of one call: ``[B, T]`` (advantages and is_ratio also ``[B]``/``[B, 1]``)."""

    logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    clamped_entropy: Optional[torch.Tensor] = None
    is_ratio: Optional[torch.Tensor] = None

    def check(self) -> None:
        check_inputs(*self)

    def rows(self, b0: int, b1: int) -> "GRPOInputs":
        """Rows ``b0:b1`` of every tensor (a 0-d or absent one as it is)."""
        return GRPOInputs(*(t if t is None or t.dim() == 0 else t[b0:b1] for t in self))


class _Call(NamedTuple):
    """What one call adds to the options, checked: the bonus coefficient (the controller's when there is
    one), the controller, ``num_items_in_batch``, the Clip-Cov generator, the normalizers of a chunk,
    the data-parallel group and the backend resolved for the device."""

    coef: float
    controller: Any
    num_items_in_batch: Any
    generator: Optional[torch.Generator]
    normalizers: Optional[GRPONormalizers]
    dp_group: Any
    backend: str


def _bonus_entropy(options: GRPOOptions, inputs: GRPOInputs) -> Optional[torch.Tensor]:
    return inputs.entropy if options.entropy_source == "full" else inputs.clamped_entropy


def check_call(options: GRPOOptions, inputs: GRPOInputs, *, num_items_in_batch=None, entropy_controller=None,
               generator=None, normalizers=None, dp_group=None) -> _Call:
    """Check what a call adds to ``options`` (given checked ``inputs``) and resolve the backend."""
    _check_num_items(num_items_in_batch, values=normalizers is None)
    _check_generator(generator)
    if options.beta != 0.0 and inputs.ref_logprobs is None:
        raise ValueError(f"beta={options.beta} needs ref_logprobs (the KL term is to the reference policy)")
    _check_controller(entropy_controller, options.entropy_coef)
    if entropy_controller is not None:
        coef = entropy_controller.coef
        if isinstance(coef, torch.Tensor):
            coef = float(coef)
        _check_number("entropy_controller.coef", coef)
    else:
        coef = float(options.entropy_coef)
    q = options.top_entropy_quantile
    if _bonus_entropy(options, inputs) is None and (coef != 0.0 or entropy_controller is not None or q < 1.0):
        why = "top_entropy_quantile < 1" if q < 1.0 else "an entropy bonus"
        src_name = "entropy" if options.entropy_source == "full" else "clamped_entropy"
        raise ValueError(f"{why} with entropy_source={options.entropy_source!r} needs {src_name}=[B, T]")
    if normalizers is not None:
        if not isinstance(normalizers, GRPONormalizers):
            raise TypeError(f"normalizers must come from grpo_normalizers(), got {type(normalizers).__name__}")
        if options.row.whole_batch:
            raise ValueError(f"loss_type={options.loss_type!r} selects tokens from statistics of the whole "
                             "micro-batch; "
                             "call it on the whole batch (normalizers=None)")
        if (normalizers.entropy_threshold is None) != (q == 1.0):
            raise ValueError("normalizers were built with a different top_entropy_quantile")
    backend = _resolve_backend(options.backend, inputs.logprobs.device)
    _check_dp_group(dp_group)
    return _Call(coef, entropy_controller, num_items_in_batch, generator, normalizers, dp_group, backend)


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

    inputs = GRPOInputs(logprobs, advantages, mask, old_logprobs, ref_logprobs, entropy, clamped_entropy, is_ratio)
    inputs.check()
    options = GRPOOptions(
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, beta=beta,
        use_bias_correction_kl=use_bias_correction_kl, importance_sampling_level=importance_sampling_level,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg, max_completion_length=max_completion_length, entropy_coef=entropy_coef,
        top_entropy_quantile=top_entropy_quantile, entropy_source=entropy_source,
        luspo_normalization=luspo_normalization, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
        clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef, backend=backend,
        cov_statistics=cov_statistics, bonus_normalization=bonus_normalization,
    )
    call = check_call(options, inputs, num_items_in_batch=num_items_in_batch, entropy_controller=entropy_controller,
                      generator=generator, normalizers=normalizers, dp_group=dp_group)
    return compute(options, call, inputs, observe=torch.is_grad_enabled())


def _sanitize(x: Optional[torch.Tensor], keep: torch.Tensor, fill: float, cdt) -> Optional[torch.Tensor]:
    """Upcast, and replace the entries outside ``keep`` so that masked positions never make NaN."""
    if x is None:
        return None
    x = x.to(cdt)
    return torch.where(keep, x, torch.full((), fill, dtype=cdt, device=x.device))


def compute(options: GRPOOptions, call: _Call, inputs: GRPOInputs, *,
            observe: bool) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``grpo_loss`` on checked parts; ``observe``: the controller (if any) observes this call."""
    cfg = _Cfg.of(options)
    logprobs, advantages, mask, old, ref, entropy, clamped, isr = inputs
    bonus_entropy = _bonus_entropy(options, inputs)
    coef, controller, norms = call.coef, call.controller, call.normalizers
    cdt = _compute_dtype(logprobs.dtype)
    valid = mask.bool() if mask.dtype != torch.bool else mask
    # Masked positions are replaced by neutral values so that -inf/NaN there never reaches the loss.
    # Liger's luspo weights every position of a row, so there finite masked values are kept.
    keep_lp = valid
    if not cfg.mask_weighted:
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
        norms = _normalizers(valid, options.loss_type, options.max_completion_length, call.num_items_in_batch,
                             options.luspo_normalization, options.top_entropy_quantile, bonus_entropy, cdt,
                             call.dp_group, options.bonus_normalization)
    else:
        norms = GRPONormalizers(*(None if t is None else t.to(device=lp.device, dtype=cdt) for t in norms))
    emask = None
    if norms.entropy_threshold is not None:
        emask = high_entropy_mask(_sanitize(bonus_entropy, valid, 0.0, cdt), valid, norms.entropy_threshold)

    if call.backend == "triton" and not options.row.whole_batch:
        policy, sums = _objective_triton(lp, old_, ref_, adv, valid, emask, isr_, cfg, norms)
    else:
        policy, sums = _objective_torch(lp, old_, ref_, adv, valid, emask, isr_, cfg, norms, call.generator,
                                        _CovScope(options.cov_statistics == "global", call.dp_group))

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


def loss_and_grads(options: GRPOOptions, call: _Call, inputs: GRPOInputs, *, observe: bool):
    """:func:`compute` plus ``d loss / d (logprobs, entropy, clamped_entropy)``, without a graph over the
    caller's tensors: ``(loss, metrics, grad_logprobs, grad_entropy, grad_clamped_entropy)`` (see
    :func:`grpo_loss_and_grads`)."""
    with torch.enable_grad():
        lp = inputs.logprobs.detach().requires_grad_(True)
        ent, cl = (None if t is None else t.detach().requires_grad_(True)
                   for t in (inputs.entropy, inputs.clamped_entropy))
        loss, metrics = compute(options, call, inputs._replace(logprobs=lp, entropy=ent, clamped_entropy=cl),
                                observe=observe)
        leaves = [t for t in (lp, ent, cl) if t is not None]
        grads = iter(torch.autograd.grad(loss, leaves, allow_unused=True))
    out = []
    for t in (lp, ent, cl):
        if t is None:
            out.append(None)
            continue
        g = next(grads)
        cdt = _compute_dtype(t.dtype)
        out.append(torch.zeros_like(t, dtype=cdt) if g is None else g.to(cdt))
    return (loss.detach(), metrics, *out)


def grpo_loss_and_grads(logprobs, advantages, mask, *, entropy=None, clamped_entropy=None, **kwargs):
    """``grpo_loss`` plus the per-token gradients, without building a graph over the caller's tensors.

    For fused heads that compute gradients inside their forward pass (one chunk of whole sequences at
    a time, with ``normalizers=grpo_normalizers(full_mask, ...)``). Returns
    ``(loss, metrics, grad_logprobs, grad_entropy, grad_clamped_entropy)``: detached loss, the metrics,
    and ``d loss / d input`` as ``[B, T]`` tensors in the compute dtype (None for an input not given).
    Masked positions get exactly zero. A controller observes once per call when grad mode is on.
    ``kwargs``: the keyword arguments of :func:`grpo_loss`.
    """
    inputs = GRPOInputs(logprobs, advantages, mask, kwargs.pop("old_logprobs", None), kwargs.pop("ref_logprobs", None),
                        entropy, clamped_entropy, kwargs.pop("is_ratio", None))
    inputs.check()
    options = GRPOOptions(**{name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs})
    call = check_call(options, inputs, **kwargs)
    return loss_and_grads(options, call, inputs, observe=torch.is_grad_enabled())
