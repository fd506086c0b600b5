"""The scalar options of the GRPO-family losses, their defaults and every rule on them (GRPOOptions).

``grpo_loss`` builds one :class:`GRPOOptions` per call and ``LinearGRPOLoss`` one per forward; the
chunks of the fused head reuse it, so the options are checked once. The ``_check_*`` helpers are also
what the TRL adapter checks its config with.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .. import _validate as V
from ..backends import resolve
from .losses import (BONUS_NORMALIZATIONS, COV_STATISTICS, ENTROPY_SOURCES, GRPO_BACKENDS, IMPORTANCE_SAMPLING_LEVELS,
                     LOSS_TYPES, LOSSES, LUSPO_NORMALIZATIONS, LossType)

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


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_quantile(value):
    """``top_entropy_quantile`` in [0, 1]: 1 keeps every token, 0 only the highest-entropy one(s) (TRL)."""
    _check_number("top_entropy_quantile", value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {value}")


def _check_fraction(name, value):
    _check_number(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_max_completion_length(loss_type, max_completion_length):
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the normalizer B * max_completion_length)")
    if max_completion_length is not None:
        if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int):
            raise TypeError(f"max_completion_length must be an int, got {type(max_completion_length).__name__}")
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be > 0, got {max_completion_length}")


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


def _check_controller(entropy_controller, entropy_coef) -> None:
    if entropy_controller is None:
        return
    if entropy_coef != 0.0:
        raise ValueError(f"give entropy_coef or entropy_controller, not both (entropy_coef={entropy_coef})")
    if not hasattr(entropy_controller, "coef") or not callable(getattr(entropy_controller, "observe", None)):
        raise TypeError("entropy_controller must have a `coef` attribute and an "
                        "`observe(entropy_sum, token_count)` method")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device`` (``backends.resolve``: the one "auto" rule)."""
    _check_choice("backend", backend, GRPO_BACKENDS)
    return resolve(backend, device)


@dataclasses.dataclass(frozen=True)
class GRPOOptions:
    """Every scalar option of ``grpo_loss`` with its default (see its docstring for the meaning).

    Construction checks them all (types, ranges, choices, and the rules between them); a
    ``GRPOOptions`` that exists is valid, so code handed one (the chunks of the fused head) checks
    nothing again.
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: Optional[float] = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    importance_sampling_level: str = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    max_completion_length: Optional[int] = None
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    entropy_source: str = "full"
    luspo_normalization: str = "liger"
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    ppo_kl_coef: float = 1.0
    backend: str = "auto"
    cov_statistics: str = "local"
    bonus_normalization: str = "auto"

    def __post_init__(self):
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_choice("entropy_source", self.entropy_source, ENTROPY_SOURCES)
        _check_choice("luspo_normalization", self.luspo_normalization, LUSPO_NORMALIZATIONS)
        if self.sequence and not self.row.sequence:
            raise ValueError(f"loss_type={self.loss_type!r} is token-level (verl); "
                             "importance_sampling_level must be 'token'")
        _check_number("epsilon_low", self.epsilon_low, nonneg=True)
        _check_number("epsilon_high", self.epsilon_high, nonneg=True)
        _check_number("delta", self.delta, positive=True, allow_none=True)
        _check_number("beta", self.beta)
        _check_number("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        _check_number("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        _check_number("vespo_k_pos", self.vespo_k_pos)
        _check_number("vespo_k_neg", self.vespo_k_neg)
        _check_number("vespo_lambda_pos", self.vespo_lambda_pos, positive=True)
        _check_number("vespo_lambda_neg", self.vespo_lambda_neg, positive=True)
        _check_max_completion_length(self.loss_type, self.max_completion_length)
        _check_number("entropy_coef", self.entropy_coef)
        _check_quantile(self.top_entropy_quantile)
        _check_choice("bonus_normalization", self.bonus_normalization, BONUS_NORMALIZATIONS)
        _check_fraction("clip_cov_ratio", self.clip_cov_ratio)
        _check_fraction("kl_cov_ratio", self.kl_cov_ratio)
        _check_number("clip_cov_lb", self.clip_cov_lb)
        _check_number("clip_cov_ub", self.clip_cov_ub)
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={self.clip_cov_lb}, "
                             f"clip_cov_ub={self.clip_cov_ub}")
        _check_number("ppo_kl_coef", self.ppo_kl_coef, nonneg=True)
        _check_bool("use_bias_correction_kl", self.use_bias_correction_kl)
        _check_choice("backend", self.backend, GRPO_BACKENDS)
        _check_choice("cov_statistics", self.cov_statistics, COV_STATISTICS)

    @property
    def row(self) -> LossType:
        """This loss type's row of the table (``losses.LOSSES``)."""
        return LOSSES[self.loss_type]

    @property
    def sequence(self) -> bool:
        return self.importance_sampling_level == "sequence"

    def replace(self, **changes) -> "GRPOOptions":
        return dataclasses.replace(self, **changes)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GRPOOptions))
