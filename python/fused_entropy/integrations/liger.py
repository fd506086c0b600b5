"""Liger adapter: make code that builds ``LigerFusedLinearGRPOLoss`` get :class:`fused_entropy.LinearGRPOLoss`.

``LinearGRPOLoss`` takes Liger 0.8.5's constructor arguments and ``forward`` signature and returns
the same ``(loss, metrics)`` layout, so swapping the class is enough for code written against Liger;
it also computes the entropy in the same sweep and can add an entropy bonus. ``patch()`` rebinds the
name where such code looks it up:

- ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` (the public import path) and
  ``liger_kernel.chunked_loss.grpo_loss.LigerFusedLinearGRPOLoss`` (the defining module), when
  liger-kernel is installed;
- ``trl.losses.FusedLinearGRPOLoss`` and ``trl.losses.grpo_loss.FusedLinearGRPOLoss``, when the
  installed TRL has ``trl.losses`` (TRL's copy of Liger's chunked losses, same constructor and
  ``forward``; TRL 1.16 has none);
- ``trl.trainer.grpo_trainer.LigerFusedLinearGRPOLoss`` / ``.FusedLinearGRPOLoss`` when TRL is
  already imported and its GRPO trainer imported one of those names itself (TRL < 1.16 imported
  Liger's at module level; 1.16 uses neither);
- any further modules passed as ``modules=`` (code that ran ``from liger_kernel.chunked_loss import
  LigerFusedLinearGRPOLoss`` before the patch holds its own reference).

At least one of liger-kernel and ``trl.losses`` must be installed. Keyword arguments to ``patch()``
become defaults for every construction (for example ``patch(entropy_coef=0.01)`` gives code that
never heard of entropy bonuses one); arguments passed by the constructing code win. ``unpatch()``
restores every name it changed.

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
from typing import Dict, Iterable, List, Optional, Tuple, Union

from .._grpo import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from ..modules import LinearGRPOLoss

__all__ = ["patch", "unpatch", "is_patched", "patched", "LIGER_NAME", "TRL_NAME"]

LIGER_NAME = "LigerFusedLinearGRPOLoss"
TRL_NAME = "FusedLinearGRPOLoss"
# (defining module first, then the modules that re-export it) per source of the class
_SOURCES = (
    (LIGER_NAME, ("liger_kernel.chunked_loss.grpo_loss", "liger_kernel.chunked_loss")),
    (TRL_NAME, ("trl.losses.grpo_loss", "trl.losses")),
)
_IMPORTED_ONLY = ("trl.trainer.grpo_trainer",)

# (module, attribute) -> (module object, original object) for every binding patch() replaced.
_replaced: Dict[Tuple[str, str], Tuple[types.ModuleType, object]] = {}


def _optional_module(name: str) -> Optional[types.ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:  # the package, or this module of it (trl.losses before TRL had it), is absent
        return None


def _originals() -> Dict[str, object]:
    """``{attribute name: class}`` of each installed source (Liger's class, TRL's copy)."""
    found = {}
    for name, (defining, _) in _SOURCES:
        if (defining, name) in _replaced:  # patched now: the original is the one recorded
            found[name] = _replaced[(defining, name)][1]
            continue
        mod = _optional_module(defining)
        if mod is not None and hasattr(mod, name):
            found[name] = getattr(mod, name)
    if not found:
        raise ImportError("fused_entropy.integrations.liger needs liger-kernel (or a TRL with trl.losses): "
                          "pip install 'fused-entropy[liger]'")
    return found


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
    """Rebind ``LigerFusedLinearGRPOLoss`` (and TRL's ``FusedLinearGRPOLoss``) to ``LinearGRPOLoss``
    (see the module docstring).

    Args:
        modules: extra modules (objects or dotted names) whose ``LigerFusedLinearGRPOLoss`` (or
            ``FusedLinearGRPOLoss``) attribute is replaced too; each must hold the original class.
        **defaults: ``LinearGRPOLoss`` constructor arguments applied to every construction unless the
            caller passes them (e.g. ``entropy_coef``, ``entropy_source``, ``clamp_p``,
            ``entropy_controller``; a controller object given here is shared by every instance).

    Returns:
        The class now bound to the names. Calling ``patch()`` again replaces the earlier patch.
    """
    originals = _originals()
    cls = _with_defaults(defaults)
    extra = [_resolve(m) for m in modules]
    for mod in extra:
        if not _names_held(mod, originals, patched_ok=True):
            found = {n: getattr(mod, n, None) for n in (LIGER_NAME, TRL_NAME)}
            raise ValueError(f"module {mod.__name__} has no {LIGER_NAME} from liger_kernel (or {TRL_NAME} from "
                             f"trl.losses) to replace (found {found})")
    unpatch()
    targets: List[Tuple[types.ModuleType, str]] = []
    for name, module_names in _SOURCES:
        if name in originals:
            targets += [(importlib.import_module(m), name) for m in module_names]
    for m in _IMPORTED_ONLY:
        if m in sys.modules:
            targets += [(sys.modules[m], n) for n in _names_held(sys.modules[m], originals)]
    for mod in extra:
        targets += [(mod, n) for n in _names_held(mod, originals)]
    for mod, name in targets:
        if (mod.__name__, name) not in _replaced:
            _replaced[(mod.__name__, name)] = (mod, getattr(mod, name))
            setattr(mod, name, cls)
    return cls


def _names_held(mod: types.ModuleType, originals: Dict[str, object], patched_ok: bool = False) -> List[str]:
    """The attribute names under which ``mod`` holds an original class (or, with ``patched_ok``, ours)."""
    return [n for n, orig in originals.items()
            if getattr(mod, n, None) is orig or (patched_ok and _is_ours(getattr(mod, n, None)))]


def _is_ours(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, LinearGRPOLoss)


def unpatch() -> None:
    """Restore every binding ``patch()`` replaced (a no-op when nothing is patched)."""
    while _replaced:
        (_, name), (mod, original) = _replaced.popitem()
        setattr(mod, name, original)


def is_patched() -> bool:
    """Whether ``patch()`` is in effect (some binding is currently ``LinearGRPOLoss``)."""
    return bool(_replaced)


@contextlib.contextmanager
def patched(*, modules=(), **defaults):
    """``with patched(entropy_coef=0.01): ...``: patch for the block, restore after (even on error)."""
    cls = patch(modules=modules, **defaults)
    try:
        yield cls
    finally:
        unpatch()
