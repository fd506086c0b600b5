"""Plain materialized-logits implementations: the specification the fused code is tested against."""
from .grpo import grpo_loss
from .logprobs import linear_logprobs, logprobs_from_logits, transform_logits
from .sampling import sampling_logprobs

__all__ = ["grpo_loss", "linear_logprobs", "logprobs_from_logits", "sampling_logprobs", "transform_logits"]
