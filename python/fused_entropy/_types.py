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

    Under a sampling truncation (``sampling_top_k``/``sampling_top_p``/``sampling_min_p``; None
    otherwise; MATH.md section 8): ``truncated_logprobs`` the log-prob of the target under the
    truncated, renormalized distribution (``-inf`` when the target is not kept, with a zero
    gradient), ``log_kept_mass`` = log S, S the full distribution's mass on the kept tokens (<= 0),
    ``truncated_entropy`` the entropy of the truncated distribution. All in nats, 0 on ignored rows.
    """

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    clamped_entropy: Optional[torch.Tensor] = None
    truncated_logprobs: Optional[torch.Tensor] = None
    log_kept_mass: Optional[torch.Tensor] = None
    truncated_entropy: Optional[torch.Tensor] = None

    def policy_logprobs(self) -> torch.Tensor:
        """The log-probs an importance ratio against the sampler's processed log-probs uses: the
        truncated ones, and the full-vocabulary one where the truncation drops the target (the sampler
        kept every target it drew, so that is a numerical boundary case; a finite value with its own
        gradient stands in for ``-inf``). ``logprobs`` when no truncation was asked for."""
        t = self.truncated_logprobs
        return self.logprobs if t is None else torch.where(torch.isinf(t), self.logprobs, t)


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
    """What a backend's forward returns and its backward needs, per row (fp32/fp64, shape [N]).

    The log-sum-exp is kept as two numbers, never rounded into one (MATH.md section 2):
    ``m`` the row max of the transformed logits (``-inf`` on a row whose logits are all ``-inf``)
    and ``log_s = log sum_v e^(z_v - m)`` (0 on such a row), so that every consumer forms
    ``(z - m) - log_s``. ``lse = m + log_s`` rounded in fp32 loses ``log_s`` entirely once
    ``|m| >> 2^24 log_s`` (at ``m = 1e8`` the spacing of fp32 is 8) and ``z - lse`` is then wrong
    by O(1); ``z - m`` is exact for the logits that matter (Sterbenz) and ``log_s`` is small.
    ``logprobs``/``entropy``: outputs (0 on ignored rows).  Clamped entropy (top-k set S):
    ``tau`` the k-th largest logit, ``tie_frac`` the weight of each logit equal to ``tau``
    ((k - #{z > tau}) / #{z == tau}), ``log_s_clamped = log sum_{v in S} e^(z_v - m)`` (relative
    to the same ``m``: S holds the max), ``clamped_entropy``. Fields not asked for are None.
    ``lse`` and ``lse_clamped`` are available as properties (rounded: for display and tests, not
    for the math).
    """

    m: torch.Tensor
    log_s: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    tau: Optional[torch.Tensor] = None
    tie_frac: Optional[torch.Tensor] = None
    log_s_clamped: Optional[torch.Tensor] = None
    clamped_entropy: Optional[torch.Tensor] = None

    @property
    def lse(self) -> torch.Tensor:
        """log sum_v e^(z_v) = m + log_s (-inf on a row of only -inf logits)."""
        return self.m + self.log_s

    @property
    def lse_clamped(self) -> Optional[torch.Tensor]:
        """log sum_{v in S} e^(z_v) = m + log_s_clamped, or None without clamped entropy."""
        return None if self.log_s_clamped is None else self.m + self.log_s_clamped


def clamp_p_to_k(clamp_p: float, vocab_size: int) -> int:
    """AEnt: drop the floor(p*V) lowest logits, so k = V - floor(p*V)."""
    return vocab_size - int(math.floor(clamp_p * vocab_size))
