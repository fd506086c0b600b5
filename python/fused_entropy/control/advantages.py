"""Per-token advantage shaping from the sampled tokens' log-probs or entropies (MATH.md section 6).

Both functions return detached ``[B, T]`` advantages for a GRPO-family loss that accepts per-token
advantages. Values at padded positions are computed like any other and are meant to be masked by the
loss.
"""
from __future__ import annotations

import math

import torch

from .._validate import check_tensor

#: REPO-R clamps the log-prob at this floor so that near-impossible tokens cannot blow up the shaping.
REPO_LOGP_FLOOR = -20.0


def _broadcast_advantages(advantages: torch.Tensor, other: torch.Tensor, other_name: str) -> torch.Tensor:
    check_tensor("advantages", advantages, floating=True)
    check_tensor(other_name, other, floating=True)
    if other.dim() != 2:
        raise ValueError(f"{other_name} must have shape [B, T], got {tuple(other.shape)}")
    b, t = other.shape
    if advantages.dim() == 1:
        if advantages.shape[0] != b:
            raise ValueError(f"advantages of shape [B] must have B={b} ({other_name} is {tuple(other.shape)}), "
                             f"got {tuple(advantages.shape)}")
        advantages = advantages[:, None]
    elif advantages.dim() == 2:
        if tuple(advantages.shape) != (b, t):
            raise ValueError(f"advantages of shape [B, T] must match {other_name} {tuple(other.shape)}, "
                             f"got {tuple(advantages.shape)}")
    else:
        raise ValueError(f"advantages must have shape [B] or [B, T], got {tuple(advantages.shape)}")
    if advantages.device != other.device:
        raise ValueError(f"advantages is on {advantages.device} but {other_name} is on {other.device}")
    return advantages.detach()


def _scalar(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def repo_r_advantages(advantages: torch.Tensor, logprobs: torch.Tensor, zeta) -> torch.Tensor:
    """REPO-R advantage shaping (Petrenko et al., arXiv 2603.11682).

    With ``lp = max(sg(logprobs), -20)``::

        A > 0:  A' = max(A * (1 - zeta * lp), 0)
        A < 0:  A' = min(A * (1 + zeta * lp), 0)
        A = 0:  A' = 0

    Since ``lp <= 0``, positive advantages of unlikely tokens grow and negative advantages of unlikely
    tokens shrink toward 0: both push probability mass toward rare tokens, raising entropy. The sign
    of ``A`` never flips.

    Args:
        advantages: ``[B]`` (per sequence) or ``[B, T]``.
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current (or behaviour) policy.
        zeta: strength >= 0 (float or 0-d tensor), e.g. :attr:`REPOZeta.zeta`.

    Returns:
        ``[B, T]`` detached advantages, dtype of ``advantages`` promoted with ``logprobs``.
    """
    adv = _broadcast_advantages(advantages, logprobs, "logprobs")
    zeta = _scalar("zeta", zeta)
    lp = logprobs.detach().clamp(min=REPO_LOGP_FLOOR)
    pos = (adv * (1.0 - zeta * lp)).clamp(min=0.0)
    neg = (adv * (1.0 + zeta * lp)).clamp(max=0.0)
    adv = adv.expand_as(lp)
    return torch.where(adv > 0, pos, torch.where(adv < 0, neg, torch.zeros_like(pos)))


def entropy_advantages(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float = 0.4,
                       kappa: float = 2.0) -> torch.Tensor:
    """Entropy-based advantage shaping (Cheng et al., "Reasoning with Exploration", arXiv 2506.14758)::

        A' = A + min(alpha * sg(H), |A| / kappa)

    The entropy term is clipped at ``|A| / kappa`` so that with ``kappa > 1`` it never flips the sign
    of a negative advantage, and it vanishes where ``A = 0``. Paper defaults for GRPO: ``alpha=0.4``,
    ``kappa=2``.

    Args:
        advantages: ``[B]`` or ``[B, T]``.
        entropy: ``[B, T]`` per-token entropy (detached inside).
        alpha: >= 0.  kappa: > 0.

    Returns:
        ``[B, T]`` detached advantages.
    """
    adv = _broadcast_advantages(advantages, entropy, "entropy")
    alpha = _scalar("alpha", alpha)
    kappa = _scalar("kappa", kappa, positive=True)
    bonus = torch.minimum(alpha * entropy.detach(), adv.abs() / kappa)
    return adv + bonus
