"""Former path of :mod:`fused_entropy.tools.bench.providers`, kept for code that imports it by that name.

The name is bound to the same module object, so attributes set through either path are seen by both.
"""
import sys

from .bench import providers as _providers

sys.modules[__name__] = _providers
