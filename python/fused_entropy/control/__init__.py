"""Entropy control: controllers that adapt a coefficient to the policy entropy, and advantage shaping.

See :mod:`fused_entropy.control.controllers` for the shared protocol (``coef``, ``observe``, ``step``,
``state_dict``) and MATH.md sections 5-6 for the rules.
"""
from .advantages import entropy_advantages, repo_r_advantages
from .controllers import (
    AdaptiveClip,
    AdaptiveEntropyCoef,
    AEntCoef,
    EntropyController,
    REPOZeta,
    StaticEntropyCoef,
)

__all__ = [
    "EntropyController",
    "StaticEntropyCoef",
    "AdaptiveEntropyCoef",
    "AEntCoef",
    "REPOZeta",
    "AdaptiveClip",
    "repo_r_advantages",
    "entropy_advantages",
]
