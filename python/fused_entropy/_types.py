"""Small value types shared by every layer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class TokenStats(NamedTuple):
    """Per-token outputs, fp32, each with the shape of ``targets``.

    ``logprobs``: log pi(y | h).  ``entropy``: full entropy (None when not asked for).
    ``clamped_entropy``: top-k clamped entropy (None unless ``topk``/``clamp_p`` is given).
    """

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    clamped_entropy: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LogitTransform:
    """``z = softcap(logit_scale * (h.W + b)) / temperature`` (MATH.md section 1).

    Runtime scalars for the kernels: a new value never recompiles anything.
    """

    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None


class RowStats(NamedTuple):
    """What a backend's forward returns and its backward needs, per row (fp32, shape [N]).

    ``lse``: log-sum-exp of the transformed logits (``-inf`` for a row whose logits are all ``-inf``).
    ``logprobs``/``entropy``: outputs (0 on ignored rows).  Clamped entropy (top-k set S):
    ``tau`` the k-th largest logit, ``tie_frac`` the weight of each logit equal to ``tau``
    ((k - #{z > tau}) / #{z == tau}), ``lse_clamped`` = log sum over S, ``clamped_entropy``.
    Fields not asked for are None.
    """

    lse: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    tau: Optional[torch.Tensor] = None
    tie_frac: Optional[torch.Tensor] = None
    lse_clamped: Optional[torch.Tensor] = None
    clamped_entropy: Optional[torch.Tensor] = None


def clamp_p_to_k(clamp_p: float, vocab_size: int) -> int:
    """AEnt: drop the floor(p*V) lowest logits, so k = V - floor(p*V)."""
    return vocab_size - int(math.floor(clamp_p * vocab_size))
