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

Modules: ``losses`` (the loss-type table: every rule that depends on the type), ``options``
(:class:`GRPOOptions`, the scalar options and their checks), ``inputs`` (the tensor checks),
``normalizers`` (batch-wide denominators, the 80/20 mask, collectives), ``cov`` (Clip-Cov/KL-Cov
selection), ``objective`` (the per-token objective in torch and through the Triton kernel) and
``loss`` (:func:`grpo_loss`, :func:`grpo_loss_and_grads`).
"""
from __future__ import annotations

from .cov import _LOCAL, _clip_cov_selection, _cov, _CovScope, _kl_cov_selection
from .inputs import _check_advantages, _check_bt, _check_is_ratio, _check_mask, check_inputs
from .loss import GRPOInputs, _Call, _sanitize, check_call, compute, grpo_loss, grpo_loss_and_grads, loss_and_grads
from .losses import (BONUS_NORMALIZATIONS, CLIPPED, COV_STATISTICS, COV_TYPES, ENTROPY_SOURCES, GRPO_BACKENDS,
                     IMPORTANCE_SAMPLING_LEVELS, KERNEL_LOSS_TYPES, LOSS_TYPES, LOSSES, LUSPO_NORMALIZATIONS,
                     TOKEN_NORMALIZED, VESPO_LAMBDA_MIN, VESPO_LOG_HIGH, VESPO_LOG_LOW, VESPO_LOG_RATIO_CLAMP, LossType,
                     whole_sequences)
from .normalizers import (GRPONormalizers, _all_reduce_sum, _bonus_uses_policy_denom, _check_dp_group, _compute_dtype,
                          _dist, _gather_values, _gather_with_offset, _normalizers, _world_size, entropy_threshold,
                          grpo_normalizers, high_entropy_mask, quantile_threshold)
from .objective import (_Cfg, _objective_torch, _objective_triton, _pick, _row_scale,
                        _token_weight, _vespo_phi)
from .options import (OPTION_MAX, OPTION_NAMES, POSITIVE_MIN, GRPOOptions, _check_bool, _check_choice,
                      _check_controller,
                      _check_fraction, _check_generator, _check_max_completion_length, _check_num_items, _check_number,
                      _check_quantile, _resolve_backend)

__all__ = [
    "GRPOInputs", "GRPONormalizers", "GRPOOptions", "LossType", "LOSSES", "LOSS_TYPES",
    "grpo_loss", "grpo_loss_and_grads", "grpo_normalizers", "entropy_threshold", "high_entropy_mask",
    "quantile_threshold",
]
