"""integrations.liger: patch()/unpatch() round trip; the patched class is a working drop-in."""
import sys
import types

import pytest
import torch

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
import liger_kernel.chunked_loss.grpo_loss as liger_grpo  # noqa: E402

from fused_entropy import LinearGRPOLoss  # noqa: E402
from fused_entropy.integrations import liger  # noqa: E402

ORIGINAL = liger_grpo.LigerFusedLinearGRPOLoss


@pytest.fixture(autouse=True)
def _restore():
    yield
    liger.unpatch()
    assert liger_chunked.LigerFusedLinearGRPOLoss is ORIGINAL


def _inputs(seed=0, b=3, t=5, h=8, v=19):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    return x, w, ids, mask, adv, old


def _run(loss_module, x, w, ids, mask, adv, old):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, metrics = loss_module(xg, wg, ids, mask, adv, old_per_token_logps=old)
    loss.backward()
    return loss.detach(), metrics, xg.grad, wg.grad


def test_round_trip_rebinds_and_restores_every_name():
    assert not liger.is_patched()
    cls = liger.patch()
    assert cls is LinearGRPOLoss and liger.is_patched()
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as Imported

    assert Imported is LinearGRPOLoss
    assert liger_grpo.LigerFusedLinearGRPOLoss is LinearGRPOLoss
    liger.unpatch()
    assert not liger.is_patched()
    assert liger_chunked.LigerFusedLinearGRPOLoss is ORIGINAL
    assert liger_grpo.LigerFusedLinearGRPOLoss is ORIGINAL
    liger.unpatch()  # idempotent


def test_patched_class_is_a_drop_in_for_liger():
    """What code built against Liger gets after the patch computes Liger's loss, metrics and gradients."""
    data = _inputs()
    args = dict(beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_high=0.28, temperature=0.9)
    expect = _run(liger_chunked.LigerFusedLinearGRPOLoss(compiled=False, **args), *(t.float() if t.is_floating_point() else t for t in data))
    liger.patch()
    module = liger_chunked.LigerFusedLinearGRPOLoss(compiled=False, **args)
    assert isinstance(module, LinearGRPOLoss)
    got = _run(module, *data)  # fp64 here; Liger computes in fp32, so compare at fp32 accuracy
    close = lambda a, b: torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)  # noqa: E731
    close(got[0], expect[0])
    assert len(got[1]) == len(expect[1])  # Liger's metrics layout: (clip_ratio,) without beta
    for a, b in zip(got[1], expect[1]):
        close(a, b)
    close(got[2], expect[2])
    close(got[3], expect[3])
    assert expect[1][0] > 0  # some tokens were clipped: the comparison covers the clipped branch


def test_patch_defaults_add_the_bonus_and_callers_win():
    data = _inputs(1)
    liger.patch()
    plain = liger_chunked.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
    base = _run(plain, *data)
    entropy = plain.last_metrics["entropy"]
    cls = liger.patch(entropy_coef=0.1)
    assert liger_chunked.LigerFusedLinearGRPOLoss is cls and issubclass(cls, LinearGRPOLoss)
    # positional Liger arguments still bind by position; the default fills the new argument
    bonus = liger_chunked.LigerFusedLinearGRPOLoss(0.0, False, False)
    assert bonus.entropy_coef == 0.1 and bonus.beta == 0.0 and bonus.use_ref_model is False
    got = _run(bonus, *data)
    torch.testing.assert_close(got[0], base[0] - 0.1 * entropy.to(got[0].dtype), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got[3], base[3])
    assert liger_chunked.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, entropy_coef=0.0).entropy_coef == 0.0


def test_patch_extra_module_and_trl():
    user = types.ModuleType("user_code_with_liger_import")
    user.LigerFusedLinearGRPOLoss = ORIGINAL  # as after `from liger_kernel.chunked_loss import ...`
    sys.modules[user.__name__] = user
    try:
        liger.patch(modules=[user.__name__])
        assert user.LigerFusedLinearGRPOLoss is LinearGRPOLoss
        liger.unpatch()
        assert user.LigerFusedLinearGRPOLoss is ORIGINAL
    finally:
        del sys.modules[user.__name__]
    trl_mod = sys.modules.get("trl.trainer.grpo_trainer")
    liger.patch()
    if trl_mod is not None:  # TRL 1.16 does not import Liger's GRPO loss: nothing is added there
        assert getattr(trl_mod, "LigerFusedLinearGRPOLoss", ORIGINAL) is ORIGINAL


def test_bad_patch_arguments():
    with pytest.raises(TypeError, match="entropy_cof"):
        liger.patch(entropy_cof=0.1)
    with pytest.raises(ValueError, match="needs topk or clamp_p"):
        liger.patch(entropy_source="clamped")
    # LinearGRPOLoss defers an unknown loss type to forward (as Liger); patch() defaults fail at once
    with pytest.raises(ValueError, match="loss_type must be one of"):
        liger.patch(loss_type="ppo")
    with pytest.raises(ValueError, match="has no LigerFusedLinearGRPOLoss"):
        liger.patch(modules=[types.ModuleType("empty")])
    with pytest.raises(TypeError, match="modules must hold"):
        liger.patch(modules=[3])
    assert not liger.is_patched()  # a failed patch leaves everything as it was


def test_patched_context_manager_restores_on_error():
    with pytest.raises(RuntimeError):
        with liger.patched(entropy_coef=0.05) as cls:
            assert liger_chunked.LigerFusedLinearGRPOLoss is cls
            raise RuntimeError("boom")
    assert liger_chunked.LigerFusedLinearGRPOLoss is ORIGINAL


class _TRLGRPOLoss(torch.nn.Module):
    """Stand-in for ``trl.losses.FusedLinearGRPOLoss`` (TRL's copy of Liger's class; the installed TRL
    has no ``trl.losses``). Read from huggingface/trl ``trl/losses/__init__.py`` at 4243e9db: a lazy
    module exporting ``FusedLinearGRPOLoss`` from ``trl/losses/grpo_loss.py``."""


@pytest.fixture
def trl_losses(monkeypatch):
    """``trl.losses`` and ``trl.losses.grpo_loss`` as TRL lays them out, registered in sys.modules."""
    defining = types.ModuleType("trl.losses.grpo_loss")
    defining.FusedLinearGRPOLoss = _TRLGRPOLoss
    package = types.ModuleType("trl.losses")
    package.FusedLinearGRPOLoss = _TRLGRPOLoss
    package.grpo_loss = defining
    monkeypatch.setitem(sys.modules, "trl.losses", package)
    monkeypatch.setitem(sys.modules, "trl.losses.grpo_loss", defining)
    return package, defining


def test_patch_covers_trl_losses_when_present(trl_losses):
    package, defining = trl_losses
    liger.patch()
    assert package.FusedLinearGRPOLoss is LinearGRPOLoss and defining.FusedLinearGRPOLoss is LinearGRPOLoss
    assert liger_chunked.LigerFusedLinearGRPOLoss is LinearGRPOLoss  # Liger's names too
    from trl.losses import FusedLinearGRPOLoss

    assert FusedLinearGRPOLoss is LinearGRPOLoss
    cls = liger.patch(entropy_coef=0.1)  # a second patch replaces the first, originals kept
    assert package.FusedLinearGRPOLoss is cls
    liger.unpatch()
    assert package.FusedLinearGRPOLoss is _TRLGRPOLoss and defining.FusedLinearGRPOLoss is _TRLGRPOLoss


def test_patch_with_trl_losses_only(trl_losses, monkeypatch):
    package, _ = trl_losses
    # liger-kernel not installed: only TRL's names are there to patch
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss.grpo_loss", None)
    liger.patch()
    assert package.FusedLinearGRPOLoss is LinearGRPOLoss
    assert liger_chunked.LigerFusedLinearGRPOLoss is ORIGINAL
    liger.unpatch()
    assert package.FusedLinearGRPOLoss is _TRLGRPOLoss


def test_patch_without_liger_or_trl_losses_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss.grpo_loss", None)
    monkeypatch.setitem(sys.modules, "trl.losses.grpo_loss", None)
    with pytest.raises(ImportError, match=r"fused-entropy\[liger\]"):
        liger.patch()


def test_patch_covers_names_the_grpo_trainer_imported(trl_losses, monkeypatch):
    """A TRL whose GRPO trainer imported Liger's class, or TRL's copy, at module level (TRL < 1.16 did
    ``from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss``)."""
    trainer = types.ModuleType("trl.trainer.grpo_trainer")
    trainer.LigerFusedLinearGRPOLoss = ORIGINAL
    trainer.FusedLinearGRPOLoss = _TRLGRPOLoss
    monkeypatch.setitem(sys.modules, "trl.trainer.grpo_trainer", trainer)
    liger.patch()
    assert trainer.LigerFusedLinearGRPOLoss is LinearGRPOLoss and trainer.FusedLinearGRPOLoss is LinearGRPOLoss
    liger.patch(entropy_coef=0.1)  # re-patching still recognises the originals there
    assert issubclass(trainer.FusedLinearGRPOLoss, LinearGRPOLoss) and trainer.FusedLinearGRPOLoss is not LinearGRPOLoss
    liger.unpatch()
    assert trainer.LigerFusedLinearGRPOLoss is ORIGINAL and trainer.FusedLinearGRPOLoss is _TRLGRPOLoss
