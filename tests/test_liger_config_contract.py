"""Where LinearGRPOLoss rejects a configuration, compared with liger-kernel 0.8.5's own class.

Every configuration Liger's ``LigerFusedLinearGRPOLoss`` checks, at construction or in forward, is
run through both classes: the same phase (constructor or forward), the same exception type and a
message that contains Liger's. Where Liger accepts a configuration and computes a finite result,
LinearGRPOLoss must accept it too and give the same loss. The configurations Liger accepts but
cannot compute (a NaN or inf loss, a ZeroDivisionError deep in its forward) are rejected here at
construction on purpose; ``DELIBERATE`` lists them with Liger's outcome, so a Liger release that
starts accepting one of them shows up here.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

from fused_entropy import LinearGRPOLoss  # noqa: E402
from fused_entropy.modules import LigerAssertionError  # noqa: E402

B, T, H, VOCAB = 2, 4, 8, 16


def _batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(VOCAB, H, generator=g) * 0.5
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3] = 0
    adv = torch.tensor([0.8, -0.6])
    return x, w, ids, mask, adv


def _outcome(cls, ctor: dict, fwd: dict):
    """("ctor" | "forward", exception) or ("ok", loss, grad of _input)."""
    ctor = dict(dict(beta=0.0, use_ref_model=False, compiled=False), **ctor)
    try:
        module = cls(**ctor)
    except Exception as e:  # noqa: BLE001 - the exception is the result
        return "ctor", e
    x, w, ids, mask, adv = _batch()
    x.requires_grad_(True)
    old = torch.log_softmax(x.detach() @ w.T * 0.9, -1).gather(-1, ids[..., None]).squeeze(-1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss, _ = module(x, w, ids, mask, adv, old_per_token_logps=old, **fwd)
        loss.backward()
    except Exception as e:  # noqa: BLE001
        return "forward", e
    return "ok", loss.detach(), x.grad


# configuration -> what Liger 0.8.5 does with it (checked against Liger itself below)
SAME = {
    # Liger's forward rejects these; so does ours, in forward, with Liger's type and words
    "sequence-cispo": (dict(loss_type="cispo", importance_sampling_level="sequence"), {}),
    "sequence-sapo": (dict(loss_type="sapo", importance_sampling_level="sequence"), {}),
    "sequence-vespo": (dict(loss_type="vespo", importance_sampling_level="sequence"), {}),
    "unknown-loss-type": (dict(loss_type="ppo"), {}),
    "unknown-level": (dict(importance_sampling_level="batch"), {}),
    "unknown-level-and-loss-type": (dict(importance_sampling_level="batch", loss_type="ppo"), {}),
    "dr_grpo-without-max_completion_length": (dict(loss_type="dr_grpo"), {}),
    "use_ref_model-without-reference": (dict(beta=0.04, use_ref_model=True), {}),
    # Liger's constructor rejects these; so does ours, with Liger's type and words
    "delta-0": (dict(delta=0.0), {}),
    "delta-negative": (dict(delta=-1.0), {}),
    "sapo_temperature_pos-0": (dict(sapo_temperature_pos=0.0), {}),
    "sapo_temperature_neg-negative": (dict(sapo_temperature_neg=-1.0), {}),
    # Liger accepts these and computes a finite loss; so does ours, with the same loss
    "max_completion_length-unused-0": (dict(loss_type="dapo", max_completion_length=0), {}),
    "max_completion_length-unused-str": (dict(loss_type="grpo", max_completion_length="4096"), {}),
    "dr_grpo-with-max_completion_length": (dict(loss_type="dr_grpo", max_completion_length=8), {}),
    "chunk_size-negative": (dict(chunk_size=-1), {}),
    "sequence-grpo": (dict(loss_type="grpo", importance_sampling_level="sequence"), {}),
    "token-vespo": (dict(loss_type="vespo"), {}),
    # vespo lambdas below 1e-4 act as 1e-4 in Liger (and TRL): 0 and negative values are accepted
    "vespo-lambda-0-and-negative": (dict(loss_type="vespo", vespo_lambda_pos=0.0, vespo_lambda_neg=-1.0), {}),
}

# Liger accepts these at construction and then produces no usable loss (NaN or inf, or a
# ZeroDivisionError in its forward): rejected here at construction, naming the argument.
DELIBERATE = {
    "temperature-0": (dict(temperature=0.0), ZeroDivisionError, "temperature"),
    "temperature-nan": (dict(temperature=math.nan), "nonfinite", "temperature"),
    "delta-nan": (dict(delta=math.nan), "nonfinite", "delta"),
    "sapo_temperature-nan": (dict(loss_type="sapo", sapo_temperature_pos=math.nan), "nonfinite", "sapo_temperature_pos"),
    "beta-nan": (dict(beta=math.nan), "nonfinite", "beta"),
    "dr_grpo-max_completion_length-0": (dict(loss_type="dr_grpo", max_completion_length=0), "nonfinite",
                                        "max_completion_length"),
}


@pytest.mark.parametrize("case", list(SAME))
def test_same_phase_type_and_words_as_liger(case):
    ctor, fwd = SAME[case]
    theirs = _outcome(liger_grpo.LigerFusedLinearGRPOLoss, ctor, fwd)
    ours = _outcome(LinearGRPOLoss, ctor, fwd)
    assert ours[0] == theirs[0], f"Liger: {theirs}, ours: {ours}"
    if theirs[0] == "ok":
        assert torch.isfinite(theirs[1])
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-6)
        return
    e_theirs, e_ours = theirs[1], ours[1]
    assert isinstance(e_ours, type(e_theirs)), f"Liger raised {type(e_theirs).__name__}, ours {type(e_ours).__name__}"
    # Liger's words first (a trailing period of Liger's may be where ours continues)
    words = str(e_theirs).rstrip(".")
    assert str(e_ours).startswith(words), f"Liger: {e_theirs!s}\nours:  {e_ours!s}"


def test_liger_assertions_are_value_errors_too():
    """Where Liger asserts, ours is an AssertionError (Liger's type) and a ValueError (ours)."""
    for ctor in (dict(loss_type="dr_grpo"), dict(beta=0.04, use_ref_model=True)):
        phase, e = _outcome(LinearGRPOLoss, ctor, {})
        assert phase == "forward" and isinstance(e, LigerAssertionError)
        assert isinstance(e, AssertionError) and isinstance(e, ValueError)


@pytest.mark.parametrize("case", list(DELIBERATE))
def test_deliberately_earlier_than_liger(case):
    ctor, liger_result, name = DELIBERATE[case]
    theirs = _outcome(liger_grpo.LigerFusedLinearGRPOLoss, ctor, {})
    if isinstance(liger_result, type):
        assert theirs[0] == "forward" and isinstance(theirs[1], liger_result), theirs
    else:
        assert theirs[0] == "ok" and not torch.isfinite(theirs[1]), theirs
    with pytest.raises(ValueError, match=re.escape(name)):
        LinearGRPOLoss(**dict(dict(beta=0.0, use_ref_model=False), **ctor))


def test_our_own_loss_types_and_options_still_fail_at_construction():
    with pytest.raises(ValueError, match="not supported for loss_type='clip_cov'"):
        LinearGRPOLoss(loss_type="clip_cov", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="topk or clamp_p"):
        LinearGRPOLoss(loss_type="ppo", entropy_source="clamped")
