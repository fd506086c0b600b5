"""Liger adapter: make code that builds ``LigerFusedLinearGRPOLoss`` get :class:`fused_entropy.LinearGRPOLoss`.

``LinearGRPOLoss`` takes Liger 0.8.5's constructor arguments and ``forward`` signature and returns
the same ``(loss, metrics)`` layout, so swapping the class is enough for code written against Liger;
it also computes the entropy in the same sweep and can add an entropy bonus. ``patch()`` rebinds the
name where such code looks it up:

- ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (the public import path),
- ``liger_kernel.chunked_loss.grpo_loss.LigerFusedLinearGRPOLoss`` (the defining module),
- ``trl.trainer.grpo_trainer.LigerFusedLinearGRPOLoss`` when TRL is already imported and imported
  the name itself (TRL < 1.16 did; 1.16 does not use Liger's GRPO loss),
- any further modules passed as ``modules=`` (code that ran ``from liger_kernel.chunked_loss import
  LigerFusedLinearGRPOLoss`` before the patch holds its own reference).

Keyword arguments to ``patch()`` become defaults for every construction (for example
``patch(entropy_coef=0.01)`` gives code that never heard of entropy bonuses one); arguments passed
by the constructing code win. ``unpatch()`` restores every name it changed.

    from fused_entropy.integrations import liger
    liger.patch(entropy_coef=0.01, entropy_source="clamped", clamp_p=0.33)
    ...  # code that does LigerFusedLinearGRPOLoss(beta=0.04, loss_type="dapo", ...)
    liger.unpatch()
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from typing import Dict, Iterable, Tuple, Union

from .._grpo import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from ..modules import LinearGRPOLoss

__all__ = ["patch", "unpatch", "is_patched", "patched", "LIGER_NAME"]

LIGER_NAME = "LigerFusedLinearGRPOLoss"
_LIGER_MODULES = ("liger_kernel.chunked_loss", "liger_kernel.chunked_loss.grpo_loss")
_IMPORTED_ONLY = ("trl.trainer.grpo_trainer",)

# (module, original object) for every binding patch() replaced, in patch order.
_replaced: Dict[str, Tuple[types.ModuleType, object]] = {}


def _liger_class():
    try:
        mod = importlib.import_module("liger_kernel.chunked_loss.grpo_loss")
    except ImportError as e:
        raise ImportError("fused_entropy.integrations.liger needs liger-kernel: pip install 'fused-entropy[liger]'") from e
    return mod.LigerFusedLinearGRPOLoss


def _with_defaults(defaults: dict) -> type:
    """``LinearGRPOLoss`` itself, or a subclass whose constructor starts from ``defaults``."""
    if not defaults:
        return LinearGRPOLoss
    sig = inspect.signature(LinearGRPOLoss.__init__)
    unknown = sorted(set(defaults) - set(sig.parameters) - {"self"})
    if unknown:
        raise TypeError(f"patch() got arguments LinearGRPOLoss does not take: {unknown}")
    LinearGRPOLoss(**defaults)  # bad values fail here, at patch time, with LinearGRPOLoss's message
    # LinearGRPOLoss defers these to forward as Liger does; a default of patch() has no Liger caller to
    # match, so an unknown name fails now
    for name, choices in (("loss_type", LOSS_TYPES), ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
        if name in defaults and defaults[name] not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {defaults[name]!r}")
    frozen = dict(defaults)

    class PatchedLinearGRPOLoss(LinearGRPOLoss):
        __doc__ = f"LinearGRPOLoss with defaults {frozen} (installed by fused_entropy.integrations.liger.patch)."
        patch_defaults = frozen

        def __init__(self, *args, **kwargs):
            given = sig.bind_partial(self, *args, **kwargs).arguments
            given.pop("self")
            super().__init__(**{**frozen, **given})

    PatchedLinearGRPOLoss.__name__ = PatchedLinearGRPOLoss.__qualname__ = "LinearGRPOLoss"
    return PatchedLinearGRPOLoss


def _resolve(module: Union[str, types.ModuleType]) -> types.ModuleType:
    if isinstance(module, types.ModuleType):
        return module
    if isinstance(module, str):
        return importlib.import_module(module)
    raise TypeError(f"modules must hold module objects or dotted names, got {type(module).__name__}")


def patch(*, modules: Iterable[Union[str, types.ModuleType]] = (), **defaults) -> type:
    """Rebind ``LigerFusedLinearGRPOLoss`` to ``LinearGRPOLoss`` (see the module docstring).

    Args:
        modules: extra modules (objects or dotted names) whose ``LigerFusedLinearGRPOLoss`` attribute
            is replaced too; each must hold Liger's class under that name.
        **defaults: ``LinearGRPOLoss`` constructor arguments applied to every construction unless the
            caller passes them (e.g. ``entropy_coef``, ``entropy_source``, ``clamp_p``,
            ``entropy_controller``; a controller object given here is shared by every instance).

    Returns:
        The class now bound to the name. Calling ``patch()`` again replaces the earlier patch.
    """
    original = _liger_class()
    cls = _with_defaults(defaults)
    extra = [_resolve(m) for m in modules]
    for mod in extra:
        current = getattr(mod, LIGER_NAME, None)
        if current is not original and not _is_ours(current):
            raise ValueError(f"module {mod.__name__} has no {LIGER_NAME} from liger_kernel to replace (found {current!r})")
    unpatch()
    targets = [importlib.import_module(n) for n in _LIGER_MODULES]
    targets += [sys.modules[n] for n in _IMPORTED_ONLY if n in sys.modules and getattr(sys.modules[n], LIGER_NAME, None) is original]
    targets += extra
    for mod in targets:
        if mod.__name__ not in _replaced:
            _replaced[mod.__name__] = (mod, getattr(mod, LIGER_NAME))
            setattr(mod, LIGER_NAME, cls)
    return cls


def _is_ours(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, LinearGRPOLoss)


def unpatch() -> None:
    """Restore every binding ``patch()`` replaced (a no-op when nothing is patched)."""
    while _replaced:
        _, (mod, original) = _replaced.popitem()
        setattr(mod, LIGER_NAME, original)


def is_patched() -> bool:
    """Whether ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` is currently ``LinearGRPOLoss``."""
    return bool(_replaced)


@contextlib.contextmanager
def patched(*, modules=(), **defaults):
    """``with patched(entropy_coef=0.01): ...``: patch for the block, restore after (even on error)."""
    cls = patch(modules=modules, **defaults)
    try:
        yield cls
    finally:
        unpatch()
