"""Shared include/exclude filters for passes that target layers."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn


def selected(
    qualname: str,
    module: nn.Module,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    classes: Sequence[str] = (),
) -> bool:
    """Whether a layer is targeted.

    ``include``/``exclude`` are globs over the qualified name (``layer1.*``);
    an empty ``include`` selects everything. ``classes`` are class names
    (``"Conv2d"``) matched against the module's class and its bases; empty
    means "the pass's default classes", checked by the caller.
    """
    if include and not any(fnmatchcase(qualname, g) for g in include):
        return False
    if any(fnmatchcase(qualname, g) for g in exclude):
        return False
    if classes:
        names = {c.__name__ for c in type(module).__mro__}
        if not names & set(classes):
            return False
    return True
