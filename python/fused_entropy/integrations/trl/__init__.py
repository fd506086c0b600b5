"""TRL adapter: ``GRPOTrainer`` whose policy log-probs, entropies and loss run through fused-entropy.

``FusedEntropyGRPOTrainer`` is TRL 1.16's ``GRPOTrainer`` with two parts replaced:

- **the LM head.** The model's forward gets a ``fused_entropy=`` mode (installed next to TRL's own
  ``fused_lm_head=`` mode, so DDP/FSDP wrappers still see a normal forward call): it runs the
  backbone, takes the last hidden states of the completion positions and applies
  :func:`fused_entropy.linear_logprobs` with the head's weight, TRL's temperature and the model's
  logit softcap/scale. No ``[B, T, V]`` logits are allocated; the ``lm_head`` module is never called.
  The reference model uses the same head, so the KL term compares like with like.
- **the loss.** :func:`fused_entropy.grpo_loss` with TRL's options (loss types, token/sequence
  importance sampling, ``delta``, ``beta`` and the bias-corrected KL, vLLM importance ratios, the
  off-policy sequence mask, ``top_entropy_quantile``) and TRL's normalization for gradient
  accumulation, so that with the entropy bonus off the loss and gradients equal stock TRL's.

Added on top (``FusedEntropyGRPOConfig`` fields):

- ``entropy_source="full"|"clamped"`` with ``topk`` or ``clamp_p``: the bonus (and the 80/20 mask)
  use the top-k clamped entropy of MATH.md section 3 (AEnt).
- ``entropy_controller="static"|"adaptive"|"aent"``: the bonus coefficient comes from
  :mod:`fused_entropy.control` (``None``: TRL's own fields decide, ``use_adaptive_entropy`` giving
  "adaptive", a non-zero ``entropy_coef`` giving "static"). AEnt's band uses ``entropy_low``,
  ``entropy_high``, ``entropy_coef_lr``, ``entropy_coef_min/max``, ``entropy_coef_warmup``.
- ``loss_type="clip_cov"|"kl_cov"`` (Cui et al., verl names and defaults).
- ``use_repo_r``: REPO-R advantage shaping with the REPO zeta controller.

Controller state (the entropy controller's and REPO's zeta) travels in each checkpoint's
``trainer_state.json``, under ``stateful_callbacks["ControllerStateCallback"]``: the trainer adds a
:class:`ControllerStateCallback` (a ``TrainerCallback`` and ``ExportableState``), which transformers'
``Trainer`` saves with every checkpoint; on resume the trainer reads it back whatever
``restore_callback_states_from_checkpoint`` says (it is training state, like the optimizer's). A
checkpoint without that entry, written by an earlier fused-entropy, is resumed from its side file
``fused_entropy_state.json``, and one of stock ``GRPOTrainer`` from TRL's ``entropy_ctrl_state.json``.
Both files are still written (the adaptive controller's TRL file only), so earlier fused-entropy
releases and stock ``GRPOTrainer`` can resume the run.

Layout: :mod:`.config` (the options and their checks), :mod:`.head` (the fused head installed on the
model's forward), :mod:`.trainer` (the trainer and its checkpoint callback).
"""
from __future__ import annotations

import warnings

try:
    import transformers  # noqa: F401
    import trl
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError("fused_entropy.integrations.trl needs TRL: pip install 'fused-entropy[trl]'") from e

#: The TRL releases this adapter is tested against (CI installs the extra's lower bound). It
#: overrides GRPOTrainer internals (_compute_loss, _get_per_token_logps_and_entropies, the metrics
#: dict), so another release may change the loss without an error. Other releases get a warning,
#: not a refusal: one that changed nothing the adapter touches stays usable.
SUPPORTED_TRL = ("1.16",)


def check_trl_version(version: str) -> None:
    """Warn (``UserWarning``) when ``version`` is a TRL release outside :data:`SUPPORTED_TRL`."""
    if ".".join(version.split(".")[:2]) not in SUPPORTED_TRL:
        warnings.warn(
            f"fused_entropy.integrations.trl is tested with TRL {', '.join(v + '.x' for v in SUPPORTED_TRL)}; found "
            f"trl {version}. FusedEntropyGRPOTrainer overrides GRPOTrainer internals, so check its loss against "
            "stock GRPOTrainer, or install 'fused-entropy[trl]'.",
            UserWarning, stacklevel=2,
        )


check_trl_version(trl.__version__)  # on import, before the submodules subclass TRL's classes

from .config import (  # noqa: E402
    CONTROLLERS, ENTROPY_SOURCES, FusedEntropyGRPOConfig, sampling_truncation, validate_options,
)
from .head import HeadRequest, install_fused_head, kernel_function, logit_transform_of  # noqa: E402
from .trainer import (  # noqa: E402
    STATE_FILE, TRAINER_STATE_FILE, TRL_STATE_FILE, ControllerStateCallback, FusedEntropyGRPOTrainer,
)

__all__ = ["ControllerStateCallback", "FusedEntropyGRPOConfig", "FusedEntropyGRPOTrainer", "install_fused_head"]
