"""One call for every regulariser the inserted modules define.

Any module a pass inserts (a :class:`~rewriter.modules.RewriterModule`) may define
``aux_loss(**context) -> Tensor``; :func:`aux_losses` sums them, so a training step reads::

    ce = F.cross_entropy(out, y, reduction="none")
    loss = ce.mean() + rewriter.aux_losses(gm, per_sample_ce=ce)

The library's modules read ``per_sample_ce`` (ManiDP/FBS gates) and ``targets`` (the
labels: ``distill``, whose term makes ``F.cross_entropy(out, y) + aux_losses(gm,
targets=y)`` the distillation loss). Modules ignore context keys they do not use. A class
may declare ``AUX_LOSS_KEYS`` (a frozenset of the keys it reads); a key that no module
declares is rejected as a typo.
Call it once per training step: some modules record statistics (e.g. ManiDP's mean
cross-entropy of the epoch) when called in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .errors import RewriterError
from .modules import RewriterModule


def aux_losses(gm: nn.Module, **context: Any) -> Tensor:
    """Sum of ``module.aux_loss(**context)`` over every inserted module that defines one."""
    modules = [
        m
        for m in gm.modules()
        if isinstance(m, RewriterModule) and callable(getattr(m, "aux_loss", None))
    ]
    if not modules:
        raise RewriterError(
            "no inserted module defines aux_loss; run a pass with losses first "
            "(e.g. saliency_gates, skip_gates or distill)"
        )
    # A module without a declaration may read anything, so only check when all declare.
    checked = all(getattr(type(m), "AUX_LOSS_KEYS", None) is not None for m in modules)
    declared = set().union(*(getattr(type(m), "AUX_LOSS_KEYS", ()) or () for m in modules))
    unknown = sorted(set(context) - declared) if checked else []
    if unknown:
        raise RewriterError(
            f"aux_losses got unknown context {unknown}; the inserted modules read "
            f"{sorted(declared)}"
        )
    terms = [m.aux_loss(**context) for m in modules]
    return torch.stack([t.reshape(()) for t in terms]).sum()
