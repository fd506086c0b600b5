"""autograd Functions: they save inputs and per-row statistics, never logits.

- ``common``: ``once_differentiable`` (every Function here, and the custom ops' registered autograd
  in ``_custom_ops.py`` and ``_grpo/objective_op.py``, differentiates once; a second differentiation raises
  :data:`DOUBLE_BACKWARD_MESSAGE`), the masking of upstream gradients;
- ``linear``: ``SinglePassFunction`` (``LinearGRPOLoss``'s single pass: gradients formed in forward);
- ``vocab_parallel``: ``VocabParallelLinearLogprobsFunction`` (``process_group``);
- ``sampling``: ``SampledLinearFunction``, ``SampledLogitsFunction`` (the sampling-truncation replay).

The plain linear head and logits entry points are the custom ops of ``_custom_ops.py``, the GRPO
objective kernel the op of ``_grpo/objective_op.py`` (their autograd is registered there, so
``torch.compile`` traces them). Layering: ``functional``/``_grpo`` above,
``_sampling``, ``_distributed`` and ``backends`` below; nothing below imports this package.
"""
from .common import DOUBLE_BACKWARD_MESSAGE, masked_grad, once_differentiable, stats_tensors
from .linear import SinglePassFunction
from .sampling import SampledLinearFunction, SampledLogitsFunction
from .vocab_parallel import VocabParallelLinearLogprobsFunction

__all__ = [
    "DOUBLE_BACKWARD_MESSAGE", "once_differentiable", "masked_grad", "stats_tensors",
    "SinglePassFunction", "SampledLinearFunction", "SampledLogitsFunction", "VocabParallelLinearLogprobsFunction",
]
