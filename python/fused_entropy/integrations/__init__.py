"""Adapters that put fused-entropy inside the trainers people already use. No math of their own.

Each adapter is its own module, imported on demand so that ``import fused_entropy`` never imports
TRL, Liger or verl:

- :mod:`fused_entropy.integrations.trl`: ``FusedEntropyGRPOConfig`` and ``FusedEntropyGRPOTrainer``
  (TRL 1.16 ``GRPOTrainer`` with the fused head, ``grpo_loss`` and the entropy controllers).
- :mod:`fused_entropy.integrations.liger`: ``patch()`` / ``unpatch()`` so code that builds
  ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` gets :class:`fused_entropy.LinearGRPOLoss`.
- :mod:`fused_entropy.integrations.verl`: ``linear_cross_entropy``, a drop-in for verl's fused kernel.
"""

__all__ = ["trl", "liger", "verl"]
