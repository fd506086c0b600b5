"""fused-entropy: fused LM-head log-probs, entropy and GRPO-family losses without [N, V] logits."""
from ._types import TokenStats
from .functional import linear_logprobs, logprobs_from_logits
from . import control
from .functional import GRPONormalizers, grpo_loss, grpo_loss_and_grads, grpo_normalizers
from .modules import LinearGRPOLoss

__all__ = [
    "control", "LinearGRPOLoss",
    "GRPONormalizers", "grpo_loss", "grpo_loss_and_grads", "grpo_normalizers",
    "TokenStats", "linear_logprobs", "logprobs_from_logits"]
__version__ = "0.1.0"
