"""Base class of every module the library inserts into a graph.

Inserted modules are always leaves of our tracer: a pass sees them as one
``call_module`` node, never as their inner ops.
"""

from __future__ import annotations

from torch import nn


class RewriterModule(nn.Module):
    """Marker mixin for modules inserted by rewriter passes (traced as leaves)."""


def is_rewriter_module(module: nn.Module) -> bool:
    return isinstance(module, RewriterModule)
