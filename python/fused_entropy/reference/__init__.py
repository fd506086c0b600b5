"""Plain materialized-logits implementations: the specification the fused code is tested against."""
from .logprobs import linear_logprobs, logprobs_from_logits, transform_logits

__all__ = ["linear_logprobs", "logprobs_from_logits", "transform_logits"]
