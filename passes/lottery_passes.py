"""Passes ``magnitude``, ``random_prune``, ``snip``, ``grasp`` and ``synflow``.

``conv/linear(x) -> masked layer keeping the best density`` (see
:mod:`rewriter.passes.lottery_scores` for the criteria and the exact-density rule).

Each pass inserts masks with the ``masks`` pass (its ``include``/``exclude`` select the
layers; layers masked before keep their masks) and prunes the selected masked layers at
``density``. Options shared by all: ``density``, ``scope`` (``"global"``/``"layer"``),
``keep_classifier``, ``include``, ``exclude``; ``random_prune`` adds ``seed``, ``synflow``
``iterations``, ``grasp`` ``temperature``. The report counts ``mask_layer`` (masks
inserted) and ``prune_layer`` (layers whose mask changed) and notes the weights kept.
Pruning never revives a weight, so running a pass twice is a no-op. None preserves
outputs (except at density 1).

``snip`` and ``grasp`` need training batches, which options cannot hold: in Python, use
``Snip.with_data(batches, density=0.1)`` as the pass, or call :func:`lottery_scores.snip`
on a model rewritten with ``masks``. Used without data they raise an error saying so. A
saved pipeline records only the options, so ``rewriter.load`` cannot replay a
``with_data`` pass (it raises that error); the function route saves and loads normally
(the masks are buffers).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx

from rewriter.context import RewriteContext
from rewriter.errors import RewriterError
from rewriter.registry import (
    Pass,
    anything,
    at_least,
    choices,
    integer,
    make_pass,
    option,
    positive,
    register,
    unit_interval,
)
from rewriter.select import selected

from .lottery_scores import (
    Batch,
    LossFn,
    Scope,
    _batches,
    _prunable,
    grasp,
    magnitude,
    output_layers,
    random_prune,
    snip,
    synflow,
)
from .masks import Masks, get_masks


@dataclass(frozen=True)
class _PruningPass(Pass):
    """Shared options and behaviour: insert masks (the ``masks`` pass), then prune."""

    density: float = option(
        0.1, "fraction of the prunable weights kept (1.0 = dense)", unit_interval()
    )
    scope: Scope = option(
        "global",
        "'global': one ranking over all layers; 'layer': that density in every layer",
        choices("global", "layer"),
    )
    keep_classifier: bool = option(
        False, "leave the output layer(s) (the classifier) unpruned", anything()
    )
    include: tuple[str, ...] = option(
        (), "globs of layers to mask and prune (empty: all)", anything()
    )
    exclude: tuple[str, ...] = option((), "globs of layers to leave dense", anything())

    def __post_init__(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density must be in [0, 1] (the fraction kept), got {self.density}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        Masks(include=self.include, exclude=self.exclude).apply(gm, ctx)
        modules = dict(gm.named_modules())
        layers = [
            name
            for name in get_masks(gm)
            if selected(name, modules[name], include=self.include, exclude=self.exclude)
        ]
        skip = set(output_layers(gm)) if layers and self.keep_classifier else set()
        if not [name for name in layers if name not in skip]:
            ctx.note(
                "only the classifier is selected and keep_classifier=True: nothing pruned"
                if layers
                else "no layer selected: nothing pruned"
            )
            return
        before = {name: m.clone() for name, m in get_masks(gm).items()}
        self.prune(gm, layers)
        masks = get_masks(gm)
        changed = [n for n, m in masks.items() if not torch.equal(m, before[n])]
        if changed:
            ctx.matches["prune_layer"] += len(changed)
        pool = _prunable(gm, self.keep_classifier, layers)
        live = sum(int((masks[n] != 0).sum()) for n in pool)
        total = sum(masks[n].numel() for n in pool)
        ctx.note(f"kept {live:,} of {total:,} prunable weights ({live / total:.2%})")

    def prune(self, gm: fx.GraphModule, layers: list[str]) -> None:
        """Apply the criterion to the masked ``layers`` (each pass defines it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define prune()")

    def _common(self, layers: list[str]) -> dict[str, Any]:
        return {"scope": self.scope, "keep_classifier": self.keep_classifier, "layers": layers}


@register
@dataclass(frozen=True)
class Magnitude(_PruningPass):
    """conv/linear(x) => masked layer keeping the largest |w| at the given density.

    Inserts ``<layer>.weight_mask`` buffers like ``masks`` (existing masks are kept), then
    prunes globally by default. Does not preserve outputs unless ``density`` is 1.
    """

    name = "magnitude"

    def prune(self, gm: fx.GraphModule, layers: list[str]) -> None:
        magnitude(gm, self.density, **self._common(layers))


@register
@dataclass(frozen=True)
class RandomPrune(_PruningPass):
    """conv/linear(x) => masked layer keeping a seeded random subset of weights.

    Inserts ``<layer>.weight_mask`` buffers like ``masks`` (existing masks are kept).
    """

    name = "random_prune"

    seed: int = option(0, "seed of the random scores", integer())

    def prune(self, gm: fx.GraphModule, layers: list[str]) -> None:
        random_prune(gm, self.density, seed=self.seed, **self._common(layers))


@register
@dataclass(frozen=True)
class SynFlow(_PruningPass):
    """conv/linear(x) => masked layer keeping the weights iterative SynFlow scores highest.

    Data-free; needs the input shape (example inputs given to ``rewrite``). Inserts
    ``<layer>.weight_mask`` buffers like ``masks`` (existing masks are kept).
    """

    name = "synflow"

    iterations: int = option(
        100,
        "scoring rounds; kept fraction density**(k/iterations)",
        at_least(1, limit=10_000),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")

    def prune(self, gm: fx.GraphModule, layers: list[str]) -> None:
        synflow(gm, self.density, iterations=self.iterations, **self._common(layers))


@dataclass(frozen=True)
class _DataPass(_PruningPass):
    """A criterion that needs training batches, attached from Python with :meth:`with_data`."""

    mode: Literal["eval", "train"] = option(
        "eval",
        "BatchNorm while scoring: 'eval' running statistics (Synaptic-Flow, the default) or "
        "'train' batch statistics (GraSP's reference code)",
        choices("eval", "train"),
    )

    @classmethod
    def with_data(
        cls, data: Iterable[Batch], loss_fn: LossFn = F.cross_entropy, **options: Any
    ) -> _DataPass:
        """This pass with training batches attached, for a pipeline built in Python.

        A saved pipeline keeps the options, not the data, so ``rewriter.load`` (which
        replays the pipeline) cannot rebuild such a model and says why. For a model to
        save, rewrite with ``masks`` and call :func:`snip` / :func:`grasp`: the masks are
        buffers, saved and loaded with the weights.
        """
        the_pass = make_pass((cls.name, options))
        object.__setattr__(the_pass, "_data", _batches(data, cls.name))
        object.__setattr__(the_pass, "_loss_fn", loss_fn)
        return the_pass  # type: ignore[return-value]

    def _data_or_error(self) -> tuple[list[Batch], LossFn]:
        data = getattr(self, "_data", None)
        if data is None:
            cls = type(self).__name__
            raise RewriterError(
                f"the {self.name!r} pass needs training batches, which pass options cannot "
                f"hold: in Python use {cls}.with_data(batches, density=...) as the pass, or "
                f"call rewriter.passes.lottery.{self.name}(model, batches, density) on a "
                "model rewritten with 'masks'"
            )
        return data, self._loss_fn  # type: ignore[attr-defined]

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        self._data_or_error()  # fail before inserting any mask
        super().apply(gm, ctx)


@register
@dataclass(frozen=True)
class Snip(_DataPass):
    """conv/linear(x) => masked layer keeping the largest |g * w| (SNIP) at the given density.

    Needs batches from Python: ``Snip.with_data(batches, density=0.1)``.
    """

    name = "snip"

    def prune(self, gm: fx.GraphModule, layers: list[str]) -> None:
        data, loss_fn = self._data_or_error()
        snip(gm, data, self.density, loss_fn=loss_fn, mode=self.mode, **self._common(layers))


@register
@dataclass(frozen=True)
class GraSP(_DataPass):
    """conv/linear(x) => masked layer keeping the highest w * Hg (GraSP) at the given density.

    Needs batches from Python: ``GraSP.with_data(batches, density=0.1)``.
    """

    name = "grasp"

    temperature: float = option(200.0, "the logits are divided by this before the loss", positive())

    def prune(self, gm: fx.GraphModule, layers: list[str]) -> None:
        data, loss_fn = self._data_or_error()
        grasp(
            gm,
            data,
            self.density,
            loss_fn=loss_fn,
            temperature=self.temperature,
            mode=self.mode,
            **self._common(layers),
        )
