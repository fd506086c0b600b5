"""The custom op ``fused_entropy::grpo_objective``: the GRPO per-token objective through the Triton
kernel (``kernels/objective.py``, one launch per call), per-row sums and ``d loss / d logp``, opaque to
``torch.compile`` and with a fake (meta) implementation. Its namespace is ``_custom_ops._op_name``'s
(a Hub kernel build's generated one there).

:class:`_Cfg` is the objective's flat configuration (what the kernel and the op take, the op as
``loss_type``, ``flags``, ``floats`` and ``delta``); its properties read the loss-type table, so the
launcher applies the table's rules without a list of names of its own.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._autograd import once_differentiable
from .._custom_ops import _op_name
from .losses import LOSSES, VESPO_LAMBDA_MIN, VESPO_LOG_LOW
from .options import GRPOOptions


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

    @classmethod
    def of(cls, o: GRPOOptions) -> "_Cfg":
        return cls(o.loss_type, o.sequence, float(o.epsilon_low), float(o.epsilon_high),
                   None if o.delta is None else float(o.delta), float(o.beta), o.use_bias_correction_kl,
                   float(o.sapo_temperature_pos), float(o.sapo_temperature_neg), float(o.vespo_k_pos),
                   float(o.vespo_lambda_pos), float(o.vespo_k_neg), float(o.vespo_lambda_neg),
                   o.luspo_normalization == "liger", float(o.clip_cov_ratio), float(o.clip_cov_lb),
                   float(o.clip_cov_ub), float(o.kl_cov_ratio), float(o.ppo_kl_coef))

    @property
    def family(self) -> str:
        return LOSSES[self.loss_type].family

    @property
    def has_delta(self) -> bool:
        """``min(r, delta)`` is taken (a delta is given and the loss type applies it)."""
        return self.delta is not None and LOSSES[self.loss_type].delta

    @property
    def mask_weighted(self) -> bool:
        """``c[b, t]`` carries ``M[b, t]`` (every type but Liger's luspo, which weights every position)."""
        return not (LOSSES[self.loss_type].aggregation == "luspo" and self.luspo_liger)

    @property
    def vespo_lambdas(self) -> Tuple[float, float]:
        """``(lam_pos, lam_neg)`` as VESPO uses them: below ``VESPO_LAMBDA_MIN`` a rate acts as it (TRL/Liger)."""
        return max(self.lam_pos, VESPO_LAMBDA_MIN), max(self.lam_neg, VESPO_LAMBDA_MIN)

    @property
    def vespo_log_low(self) -> float:
        return VESPO_LOG_LOW


_CFG_FLAGS = ("sequence", "bias_corr", "luspo_liger")
_CFG_FLOATS = ("eps_low", "eps_high", "beta", "tau_pos", "tau_neg", "k_pos", "lam_pos", "k_neg", "lam_neg",
               "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")


def _cfg(loss_type: str, flags, floats, delta) -> _Cfg:
    values = dict(zip(_CFG_FLAGS, flags), **dict(zip(_CFG_FLOATS, floats)), loss_type=loss_type, delta=delta)
    return _Cfg(**values)


@torch.library.custom_op(_op_name("grpo_objective"), mutates_args=())
def grpo_objective_op(
    lp: Tensor, old: Optional[Tensor], ref: Optional[Tensor], adv: Tensor, valid: Tensor, emask: Optional[Tensor],
    isr: Optional[Tensor], row_scale: Tensor, loss_type: str, flags: List[bool], floats: List[float],
    delta: Optional[float], compute_grad: bool,
) -> List[Tensor]:
    """``[row_loss, row_kl, row_low, row_high]`` ``[B]`` and ``d loss / d logp`` ``[B, T]`` (``[0]`` when
    ``compute_grad`` is False); ``_Cfg`` flattened into ``loss_type``, ``flags``, ``floats``, ``delta``."""
    from .._launch_objective import launch_objective  # imports triton: only where the op runs

    out = launch_objective(lp, old, ref, adv, valid, emask, isr, row_scale, _cfg(loss_type, flags, floats, delta),
                           compute_grad=compute_grad)
    return [out.row_loss, out.row_kl, out.row_low, out.row_high, out.grad if out.grad is not None else lp.new_empty(0)]


@grpo_objective_op.register_fake
def _(lp, old, ref, adv, valid, emask, isr, row_scale, loss_type, flags, floats, delta, compute_grad):
    rows = [lp.new_empty(lp.shape[0]) for _ in range(4)]
    return rows + [lp.new_empty(lp.shape) if compute_grad else lp.new_empty(0)]


def _objective_setup(ctx, inputs, output):
    ctx.save_for_backward(output[4])
    ctx.mark_non_differentiable(*output[1:])


@once_differentiable
def _objective_backward(ctx, grads):
    (grad,) = ctx.saved_tensors
    g_loss = grads[0]
    if g_loss is None or grad.numel() == 0:
        return (None,) * 13
    return (grad * g_loss.unsqueeze(-1),) + (None,) * 12


grpo_objective_op.register_autograd(_objective_backward, setup_context=_objective_setup)


def grpo_objective(lp, old, ref, adv, valid, emask, isr, row_scale, cfg, compute_grad: bool):
    """``(loss, kl, low, high)`` 0-d sums, the objective kernel's launcher returns them."""
    out = grpo_objective_op(lp, old, ref, adv, valid, emask, isr, row_scale, cfg.loss_type,
                            [bool(getattr(cfg, f)) for f in _CFG_FLAGS], [float(getattr(cfg, f)) for f in _CFG_FLOATS],
                            cfg.delta, bool(compute_grad))
    return out[0].sum(), out[1].sum(), out[2].sum(), out[3].sum()
