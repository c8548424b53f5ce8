"""Pass ``masks``: weight masks on conv and linear layers, in buffers, no hooks.

``conv(x) -> conv(x) with weight * weight_mask``

Every targeted ``nn.Conv1d/2d/3d`` and ``nn.Linear`` becomes its masked twin
(``MaskedConv2d`` etc., a subclass of the original class, traced as a leaf)
whose forward computes the layer with ``weight * weight_mask``. The mask is a
buffer named ``<layer>.weight_mask`` with the weight's shape and dtype, all ones
at insertion, so ``preserves_outputs`` holds. Original state-dict keys are
unchanged. No forward hooks, no parametrizations: ``torch.compile(fullgraph=True)``
traces the product, and updating a mask in place (:func:`set_mask`) does not
trigger a recompile.

Only modules whose class is exactly one of the supported classes are masked;
a user subclass with its own forward is left alone and named in the report.
Running the pass twice is a no-op (already masked layers do not match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rewriter.context import RewriteContext
from rewriter.errors import RewriterError
from rewriter.modules import RewriterModule
from rewriter.patterns import Match, P
from rewriter.registry import Pass, anything, choices, option, register
from rewriter.select import selected

MASK = "weight_mask"


class _Masked(RewriterModule):
    """Mixin: the layer computes with ``weight * weight_mask``."""

    weight: Tensor
    weight_mask: Tensor

    def masked_weight(self) -> Tensor:
        return self.weight * self.weight_mask


class MaskedConv1d(_Masked, nn.Conv1d):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MaskedConv2d(_Masked, nn.Conv2d):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MaskedConv3d(_Masked, nn.Conv3d):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class MaskedLinear(_Masked, nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.masked_weight(), self.bias)


MASKED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
    nn.Conv3d: MaskedConv3d,
    nn.Linear: MaskedLinear,
}


@register
@dataclass(frozen=True)
class Masks(Pass):
    """conv/linear(x) => same layer computing with weight * weight_mask (mask of ones).

    Adds one buffer ``<layer>.weight_mask`` per targeted layer.
    """

    name = "masks"
    preserves_outputs = True

    include: tuple[str, ...] = option(
        (), "globs of qualified layer names to mask (empty: all)", anything()
    )
    exclude: tuple[str, ...] = option(
        (), "globs of qualified layer names to leave dense", anything()
    )
    classes: tuple[str, ...] = option(
        (),
        "class names to target, e.g. ['Conv2d'] (empty: Conv1d/2d/3d and Linear)",
        choices(*(c.__name__ for c in MASKED)),
    )

    def __post_init__(self) -> None:
        known = {c.__name__ for c in MASKED}
        unknown = sorted(set(self.classes) - known)
        if unknown:
            raise ValueError(f"classes {unknown} cannot be masked; supported: {sorted(known)}")

    def rules(self) -> list:
        return [(P.module(*MASKED, name="layer"), self.mask_layer)]  # layer(x) -> masked layer(x)

    def mask_layer(self, ctx: RewriteContext, m: Match) -> fx.Node | None:
        node = m["layer"]
        module = ctx.module(node)
        if isinstance(module, _Masked):
            return None  # already masked
        name = str(node.target)
        if not selected(name, module, include=self.include, exclude=self.exclude, classes=self.classes):
            return None
        if type(module) not in MASKED:
            ctx.note(f"{name}: {type(module).__name__} subclasses a supported layer; not masked")
            return None
        module.__class__ = MASKED[type(module)]
        module.register_buffer(MASK, torch.ones_like(module.weight, requires_grad=False))
        return ctx.replace_module(node, module)


def get_masks(gm: nn.Module) -> dict[str, Tensor]:
    """Every weight mask by qualified layer name (the live buffers, not copies)."""
    return {name: m.weight_mask for name, m in gm.named_modules() if isinstance(m, _Masked)}


def set_mask(gm: nn.Module, layer: str, mask: Tensor) -> None:
    """Copy ``mask`` into the mask of ``layer`` in place (no recompile of a compiled model).

    ``mask`` must have the weight's shape and be boolean or of the mask's dtype
    with values 0 and 1.
    """
    masks = get_masks(gm)
    if layer not in masks:
        raise RewriterError(
            f"no masked layer named {layer!r}; masked layers: {', '.join(masks) or 'none'} "
            "(run the 'masks' pass first)"
        )
    buf = masks[layer]
    if not isinstance(mask, Tensor):
        raise RewriterError(f"mask for {layer!r} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(buf.shape):
        raise RewriterError(
            f"mask for {layer!r} has shape {tuple(mask.shape)}, the weight has {tuple(buf.shape)}"
        )
    if mask.dtype != torch.bool and mask.dtype != buf.dtype:
        raise RewriterError(
            f"mask for {layer!r} has dtype {mask.dtype}; use torch.bool or {buf.dtype}"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise RewriterError(f"mask for {layer!r} must contain only 0 and 1")
    with torch.no_grad():
        buf.copy_(mask.to(device=buf.device, dtype=buf.dtype))


def sparsity(gm: nn.Module) -> dict[str, float]:
    """Fraction of masked-out weights per layer, and over all masked layers as ``"global"``."""
    masks = get_masks(gm)
    out = {name: float((m == 0).sum()) / m.numel() for name, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    zeros = sum(float((m == 0).sum()) for m in masks.values())
    out["global"] = zeros / total if total else 0.0
    return out


def model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """The device of ``model``'s first parameter or buffer and its first floating dtype.

    CPU and ``None`` for a model without tensors. Helpers that build tensors for a model
    (default example inputs, masks) create them there, so that a model on an
    accelerator, on the ``meta`` device or in float64 gets inputs it can run on.
    """
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), None)
    return device, dtype
