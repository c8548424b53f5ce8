"""Pass ``split``: Knowledge Evolution's fit and reset hypotheses (``docs/methods/ke.md``).

``conv/linear(x) => the same layer computing with weight * where(fit_mask, s_fit, s_reset)``

Knowledge Evolution (KE, CVPR 2021) retrains one network for several *generations*.
Every conv and linear weight is split once, by a fixed boolean mask, into a *fit
hypothesis* (kept from one generation to the next) and a *reset hypothesis* (re-drawn
with PyTorch's default layer init between generations). This module holds the pass that
attaches the masks and the training-time actions of the technique:

* :class:`Split` (pass ``split``) attaches the masks;
* :func:`set_hypothesis` / :func:`use_hypothesis` switch a split model between the dense
  network, the fit hypothesis alone and the reset hypothesis alone;
* :func:`reinitialize` re-draws the reset part between generations;
* :func:`extract_fit` builds the physically smaller fit network (KELS, "slim network");
* :func:`evolve` is a small generation driver around the user's own training function.

What the pass adds
------------------
Every targeted ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and their ``masks``-pass twins
``MaskedConv2d`` etc.) becomes its split twin (:class:`SplitConv2d`, :class:`SplitLinear`,
:class:`SplitMaskedConv2d`..., subclasses of the original class, traced as leaves) with
two buffers:

* ``<layer>.fit_mask`` (``torch.bool``, the weight's shape, persistent): True where the
  weight belongs to the fit hypothesis. It never changes after the pass.
* ``<layer>.split_scale`` (2 floats, *not* saved in the state dict): the factors applied
  to the fit and the reset weights. The layer computes with
  ``weight * torch.where(fit_mask, split_scale[0], split_scale[1])`` (after
  ``weight_mask`` when the layer was masked first). ``(1, 1)`` is the dense network
  (the default, so ``preserves_outputs`` holds exactly: the training forward is
  unchanged), ``(1, 0)`` the fit hypothesis, ``(0, 1)`` the reset hypothesis. The switch
  is tensor arithmetic on a buffer, so a model compiled with ``fullgraph=True`` switches
  without recompiling.

Each split layer also has a plain attribute ``split_mode`` (``"kels"`` or ``"wels"``).
Original state-dict keys are unchanged. The name ``fit_mask`` does not clash with the
``masks`` pass's ``weight_mask``: run ``masks`` *before* ``split`` to combine them
(a layer masked after splitting is left alone by ``masks``, which notes it).

Options
-------
``mode``
    ``"kels"`` (default; kernel level, conv-aware) or ``"wels"`` (weight level).
``rate``
    the split rate ``s``, ``0 < s < 1`` (default 0.5, the authors' default).
``seed``
    WELS only: the masks are drawn from it (KELS masks are deterministic).
``include`` / ``exclude``
    globs over qualified layer names, as in ``masks``.

KELS: the fit part is whole channels, chosen on the channel groups
-----------------------------------------------------------------
The paper's rule is ``mask[:ceil(s*C_out), :ceil(s*C_in)] = True`` per layer, with
exceptions for the first conv (all input channels), the classifier (all outputs), and
concatenations (the ceil rule per chunk). Here the rule is applied once per *channel
group* of :func:`rewriter.analysis.channels.channel_groups` (channels that residual
adds, multiplies, depthwise convs... tie together), so that the fit hypothesis is
exactly a slim network, and the paper's exceptions follow from the groups:

* the fit channels of a prunable group are its first ``ceil(s * size)`` group
  channels; when ``split``/``chunk``/slicing cuts the group into pieces, the rule is
  applied to each piece (every piece keeps at least one channel);
* a concatenated input reads one group per chunk, so the ceil rule applies per chunk;
* groups that are not prunable stay whole: the model input (the first conv keeps all
  its input channels), the network outputs (the classifier keeps all its outputs), and
  channels the analysis cannot cut (LayerNorm over channels, attention heads, opaque
  modules...; the pass notes them);
* a layer's mask is ``fit rows x fit columns``: its output channels in their groups,
  its input channels in theirs. A linear fed by ``flatten`` of a ``C x H x W`` map reads
  the ``H*W`` features of each fit channel (not the first ``ceil(s*in)`` features);
  a depthwise conv's filters follow their input channel (one group channel); a grouped
  conv keeps the same local input channels in every conv group;
* conv and linear layers that are not split (excluded by the filters, or user
  subclasses) count as entirely fit, so every channel they read is fit too.

``ceil`` is exact: ``rate`` is read as the nearest fraction with denominator at most
10**6, so that ``ceil(0.1 * 10) = 1`` despite floating point.

WELS: every weight independently belongs to the fit part with probability ``rate``,
from a generator seeded with ``seed`` and the layer's name (a layer's mask does not
depend on which other layers are split).

Contract
--------
``preserves_outputs = True``. Running the pass on a model that is already split is a
no-op when every targeted layer is already split, and a :class:`RewriterError`
when some are split and others not (split once, with the layers you want).
"""

from __future__ import annotations

import copy
import math
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rewriter.context import RewriteContext
from rewriter.errors import RewriterError
from rewriter.manager import evaluate
from rewriter.modules import RewriterModule
from rewriter.patterns import Match, P
from rewriter.registry import Pass, anything, choices, integer, option, register, unit_interval
from rewriter.select import selected

if TYPE_CHECKING:
    from rewriter.analysis.channels import ChannelAnalysis

from .masks import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    _Masked,
    model_placement,
)

__all__ = [
    "FIT_MASK",
    "HYPOTHESES",
    "SCALE",
    "Evolution",
    "Generation",
    "Split",
    "SplitConv1d",
    "SplitConv2d",
    "SplitConv3d",
    "SplitLinear",
    "SplitMaskedConv1d",
    "SplitMaskedConv2d",
    "SplitMaskedConv3d",
    "SplitMaskedLinear",
    "current_hypothesis",
    "evolve",
    "extract_fit",
    "fit_count",
    "get_fit_masks",
    "kels_fit_channels",
    "kels_masks",
    "reinitialize",
    "set_hypothesis",
    "split_layers",
    "use_hypothesis",
    "wels_mask",
]

FIT_MASK = "fit_mask"
SCALE = "split_scale"

Hypothesis = Literal["dense", "fit", "reset"]
HYPOTHESES: dict[str, tuple[float, float]] = {
    "dense": (1.0, 1.0),  # the whole network (training)
    "fit": (1.0, 0.0),  # the fit hypothesis alone: reset weights zeroed
    "reset": (0.0, 1.0),  # the reset hypothesis alone: fit weights zeroed
}
"""``split_scale`` values: (factor of fit weights, factor of reset weights)."""


# --------------------------------------------------------------------------------------------
# Split layers
# --------------------------------------------------------------------------------------------


class _Split(RewriterModule):
    """Mixin: the layer computes with ``weight * where(fit_mask, split_scale[0], split_scale[1])``."""

    weight: Tensor
    fit_mask: Tensor
    split_scale: Tensor
    split_mode: str

    def _unsplit_weight(self) -> Tensor:
        return self.masked_weight() if isinstance(self, _Masked) else self.weight

    def split_weight(self) -> Tensor:
        """The weight the layer computes with under the current hypothesis."""
        scale = torch.where(self.fit_mask, self.split_scale[0], self.split_scale[1])
        return self._unsplit_weight() * scale

    def extra_repr(self) -> str:
        fit = int(self.fit_mask.sum())
        return (
            f"{super().extra_repr()}, split={self.split_mode} ({fit}/{self.fit_mask.numel()} fit)"
        )


class _SplitConv(_Split):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.split_weight(), self.bias)  # type: ignore[attr-defined]


class _SplitLinear(_Split):
    bias: Tensor | None

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.split_weight(), self.bias)


class SplitConv1d(_SplitConv, nn.Conv1d):
    """``nn.Conv1d`` split into fit and reset hypotheses."""


class SplitConv2d(_SplitConv, nn.Conv2d):
    """``nn.Conv2d`` split into fit and reset hypotheses."""


class SplitConv3d(_SplitConv, nn.Conv3d):
    """``nn.Conv3d`` split into fit and reset hypotheses."""


class SplitLinear(_SplitLinear, nn.Linear):
    """``nn.Linear`` split into fit and reset hypotheses."""


class SplitMaskedConv1d(_SplitConv, MaskedConv1d):
    """``MaskedConv1d`` split into fit and reset hypotheses (``weight_mask`` applies first)."""


class SplitMaskedConv2d(_SplitConv, MaskedConv2d):
    """``MaskedConv2d`` split into fit and reset hypotheses (``weight_mask`` applies first)."""


class SplitMaskedConv3d(_SplitConv, MaskedConv3d):
    """``MaskedConv3d`` split into fit and reset hypotheses (``weight_mask`` applies first)."""


class SplitMaskedLinear(_SplitLinear, MaskedLinear):
    """``MaskedLinear`` split into fit and reset hypotheses (``weight_mask`` applies first)."""


SPLIT: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: SplitConv1d,
    nn.Conv2d: SplitConv2d,
    nn.Conv3d: SplitConv3d,
    nn.Linear: SplitLinear,
    MaskedConv1d: SplitMaskedConv1d,
    MaskedConv2d: SplitMaskedConv2d,
    MaskedConv3d: SplitMaskedConv3d,
    MaskedLinear: SplitMaskedLinear,
}
"""The layer classes the pass splits (exact classes), and their split twins."""

UNSPLIT: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in SPLIT.items()}


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class Split(Pass):
    """conv/linear(x) => same layer computing with weight * where(fit_mask, s_fit, s_reset).

    Adds buffers ``<layer>.fit_mask`` (bool) and ``<layer>.split_scale`` (not persistent)
    per split layer; dense at insertion. See the module docs for KELS/WELS.
    """

    name = "split"
    preserves_outputs = True

    mode: Literal["kels", "wels"] = option(
        "kels", "kels (whole kernels, slim fit network) or wels", choices("kels", "wels")
    )
    rate: float = option(
        0.5,
        "split rate s: fraction of channels (kels) or weights (wels) kept fit",
        unit_interval(low_open=True, high_open=True),
    )
    seed: int = option(0, "wels only: seed of the random masks", integer())
    include: tuple[str, ...] = option(
        (), "globs of qualified layer names to split (empty: all)", anything()
    )
    exclude: tuple[str, ...] = option(
        (), "globs of qualified layer names to leave whole", anything()
    )

    def __post_init__(self) -> None:
        if self.mode not in ("kels", "wels"):
            raise ValueError(f"mode must be 'kels' or 'wels', got {self.mode!r}")
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"rate must be strictly between 0 and 1, got {self.rate!r}")

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        targets = self.targets(gm, ctx)
        already = list(split_layers(gm))
        if already and targets:
            raise RewriterError(
                f"the model is already split ({', '.join(already[:3])}"
                f"{'...' if len(already) > 3 else ''}) but {', '.join(targets[:3])} is not; "
                "run 'split' once, with include/exclude naming every layer to split"
            )
        if not targets:
            if already:
                ctx.note(f"already split ({len(already)} layers): nothing to do")
            return
        if self.mode == "wels":
            masks = {
                name: wels_mask(gm.get_submodule(name).weight, self.rate, self.seed, name)
                for name in targets
            }
        else:
            masks = kels_masks(gm, targets, self.rate, ctx.note)
        rules = [
            (
                P.module(*SPLIT, name="layer"),
                self._split_builder(masks),
            ),  # layer(x) -> split layer(x)
        ]
        ctx.apply_rules(rules)

    def targets(self, gm: fx.GraphModule, ctx: RewriteContext | None = None) -> list[str]:
        """Qualified names of the layers this pass splits in ``gm``, in graph order."""
        out: list[str] = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            name = str(node.target)
            module = gm.get_submodule(name)
            if name in out or isinstance(module, _Split):
                continue
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            if not selected(name, module, include=self.include, exclude=self.exclude):
                continue
            if type(module) not in SPLIT:
                if ctx is not None:
                    ctx.note(
                        f"{name}: {type(module).__name__} is not a layer split can handle; left whole"
                    )
                continue
            out.append(name)
        return out

    def _split_builder(
        self, masks: Mapping[str, Tensor]
    ) -> Callable[[RewriteContext, Match], fx.Node | None]:
        def split_layer(ctx: RewriteContext, m: Match) -> fx.Node | None:
            node = m["layer"]
            name = str(node.target)
            module = ctx.module(node)
            if name not in masks or isinstance(module, _Split):
                return None
            weight = module.weight
            module.__class__ = SPLIT[type(module)]
            module.register_buffer(FIT_MASK, masks[name].to(weight.device).clone())
            scale = torch.tensor(HYPOTHESES["dense"], dtype=weight.dtype, device=weight.device)
            module.register_buffer(SCALE, scale, persistent=False)
            module.split_mode = self.mode
            return ctx.replace_module(node, module)

        return split_layer


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def fit_count(rate: float, n: int) -> int:
    """``ceil(rate * n)``, computed exactly (``rate`` as a fraction with denominator <= 10**6)."""
    return math.ceil(Fraction(rate).limit_denominator(10**6) * n)


def wels_mask(weight: Tensor, rate: float, seed: int, layer: str) -> Tensor:
    """WELS: each weight is fit with probability ``rate``; reproducible from ``seed`` and ``layer``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(layer.encode()))
    return torch.rand(weight.shape, generator=gen) < rate


def kels_fit_channels(
    analysis: ChannelAnalysis, rate: float, whole: Collection[int] = ()
) -> dict[int, Tensor]:
    """KELS fit channels of every channel group: ``{group id: bool tensor over its channels}``.

    Groups that are not prunable, and the groups in ``whole``, are entirely fit. Any other
    group keeps its first ``ceil(rate * size)`` channels, per piece when a split, chunk or
    slice of the channel dim cuts it (see the module docs).
    """
    fit: dict[int, Tensor] = {}
    for group in analysis.groups:
        if not group.prunable or group.id in whole:
            fit[group.id] = torch.ones(group.size, dtype=torch.bool)
            continue
        keep = torch.zeros(group.size, dtype=torch.bool)
        for segment in _pieces(analysis, group.id, group.size):
            keep[segment[: fit_count(rate, len(segment))]] = True
        fit[group.id] = keep
    return fit


def _pieces(analysis: ChannelAnalysis, gid: int, size: int) -> list[list[int]]:
    """The group's channels cut by every split/chunk/slice piece that holds some of them."""
    segments = [list(range(size))]
    for record in analysis.slices:
        for lo, hi in record.bounds:
            inside = {p[1] for p in record.positions[lo:hi] if p is not None and p[0] == gid}
            if not inside:
                continue
            refined: list[list[int]] = []
            for seg in segments:
                parts = ([c for c in seg if c in inside], [c for c in seg if c not in inside])
                refined.extend(part for part in parts if part)
            segments = refined
    return segments


def kels_masks(
    gm: fx.GraphModule,
    layers: Sequence[str],
    rate: float,
    note: Callable[[str], None] = lambda message: None,
) -> dict[str, Tensor]:
    """KELS fit masks of ``layers``: fit rows x fit columns, from the channel groups of ``gm``.

    ``gm`` must carry recorded shapes (``node.meta["tensor_meta"]``), as every graph
    rewritten with example inputs does.
    """
    from rewriter.analysis.channels import channel_groups  # the channel layer imports passes

    try:
        analysis = channel_groups(gm, None)
    except RewriterError as exc:
        raise RewriterError(
            "split mode='kels' needs the channel structure of the model: give example "
            f"inputs to rewrite() ({exc})"
        ) from exc
    chosen = set(layers)
    whole: set[int] = set()
    for name, info in analysis.layers.items():
        if info.kind in ("conv", "linear") and name not in chosen and "in" in info.sizes:
            groups = analysis.groups_of(name, "in")
            if any(g.prunable for g in groups):
                note(f"{name}: not split, so every channel it reads is fit")
            whole.update(g.id for g in groups)
    fit = kels_fit_channels(analysis, rate, whole)
    standard = ("model input", "network output")
    odd = [g for g in analysis.groups if not g.prunable and g.reason not in standard]
    if odd:
        channels = sum(g.size for g in odd)
        reason = (odd[0].reason or "").split("; ")[0]
        note(f"{len(odd)} channel group(s) ({channels} channels) kept whole, e.g. {reason}")

    masks: dict[str, Tensor] = {}
    for name in layers:
        module = gm.get_submodule(name)
        try:
            rows = _fit_flags(analysis, fit, name, "out")
            cols = _fit_flags(analysis, fit, name, "in")
        except (KeyError, RewriterError):
            note(f"{name}: the channel analysis does not cover it; all of it is fit")
            masks[name] = torch.ones(module.weight.shape, dtype=torch.bool)
            continue
        masks[name] = _product_mask(module, rows, cols)
    return masks


def _fit_flags(
    analysis: ChannelAnalysis, fit: Mapping[int, Tensor], layer: str, role: str
) -> Tensor:
    """Per index of ``layer``'s ``role``: whether its group channel is fit."""
    return torch.tensor(
        [bool(fit[gid][ch]) for gid, ch in analysis.channel_map(layer, role)], dtype=torch.bool
    )


def _product_mask(module: nn.Module, rows: Tensor, cols: Tensor) -> Tensor:
    """``mask[r, c] = rows[r] and cols[input index of (r, c)]``, broadcast over the kernel."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        return rows[:, None] & cols[None, :]
    groups = module.groups
    per_out, per_in = module.out_channels // groups, module.in_channels // groups
    conv_group = torch.arange(module.out_channels) // per_out
    index = conv_group[:, None] * per_in + torch.arange(per_in)[None, :]  # input channel of (r, c)
    mask = rows[:, None] & cols[index]
    return mask.reshape(*mask.shape, *[1] * (weight.dim() - 2)).expand(weight.shape).clone()


# --------------------------------------------------------------------------------------------
# Training-time actions
# --------------------------------------------------------------------------------------------


def split_layers(gm: nn.Module) -> dict[str, nn.Module]:
    """Every split layer of ``gm`` by qualified name."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, _Split)}


def get_fit_masks(gm: nn.Module) -> dict[str, Tensor]:
    """Every fit mask by qualified layer name (the live boolean buffers, not copies)."""
    return {name: m.fit_mask for name, m in split_layers(gm).items()}


def _require_split(gm: nn.Module, what: str) -> dict[str, nn.Module]:
    layers = split_layers(gm)
    if not layers:
        raise RewriterError(f"{what}: the model has no split layers (run the 'split' pass first)")
    return layers


def set_hypothesis(gm: nn.Module, hypothesis: Hypothesis) -> str:
    """Make every split layer compute the ``dense`` network, the ``fit`` or the ``reset`` hypothesis.

    Writes the ``split_scale`` buffers in place (a compiled model does not recompile) and
    returns the previous hypothesis. ``fit`` zeroes the reset weights: with KELS masks, in
    eval mode, its outputs are those of :func:`extract_fit`'s slim network.
    """
    if hypothesis not in HYPOTHESES:
        raise RewriterError(
            f"unknown hypothesis {hypothesis!r}; use one of {', '.join(HYPOTHESES)}"
        )
    layers = _require_split(gm, "set_hypothesis")
    previous = current_hypothesis(gm)
    with torch.no_grad():
        for m in layers.values():
            m.split_scale.copy_(torch.tensor(HYPOTHESES[hypothesis]))
    return previous


def current_hypothesis(gm: nn.Module) -> str:
    """The hypothesis the split layers compute (``mixed`` if they disagree)."""
    layers = _require_split(gm, "current_hypothesis")
    found = {tuple(m.split_scale.tolist()) for m in layers.values()}
    names = [name for name, value in HYPOTHESES.items() if {value} == found]
    return names[0] if names else "mixed"


@contextmanager
def use_hypothesis(gm: nn.Module, hypothesis: Hypothesis) -> Iterator[nn.Module]:
    """``with use_hypothesis(gm, "fit"): ...`` evaluates one hypothesis, then restores the previous."""
    saved = {
        name: m.split_scale.clone() for name, m in _require_split(gm, "use_hypothesis").items()
    }
    set_hypothesis(gm, hypothesis)
    try:
        yield gm
    finally:
        with torch.no_grad():
            for name, m in split_layers(gm).items():
                m.split_scale.copy_(saved[name])


def reinitialize(gm: nn.Module, generator: torch.Generator | None = None) -> int:
    """Re-draw the reset part of every split weight; return how many weights were re-drawn.

    Each split weight gets a fresh tensor of its shape drawn with PyTorch's default layer
    init, ``kaiming_uniform_(a=sqrt(5))`` (the fan-in of the layer, groups included), and
    takes its values where ``fit_mask`` is False. Fit weights stay bit-identical; biases,
    norm parameters, running statistics and masks are untouched. Works in place, so
    optimizers and compiled models keep their references; build a fresh optimizer for
    the next generation (momentum of the old weights is stale). ``generator`` (on the
    weights' device or the CPU) makes the draw reproducible.
    """
    count = 0
    with torch.no_grad():
        for m in _require_split(gm, "reinitialize").values():
            weight = m.weight
            device = generator.device if generator is not None else weight.device
            fresh = torch.empty(weight.shape, dtype=weight.dtype, device=device)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            weight.copy_(torch.where(m.fit_mask, weight, fresh.to(weight.device)))
            count += int((~m.fit_mask).sum())
    return count


# --------------------------------------------------------------------------------------------
# The slim fit network
# --------------------------------------------------------------------------------------------


def extract_fit(
    gm: fx.GraphModule,
    example_inputs: Sequence[Tensor] | Tensor | None = None,
    *,
    analysis: Any = None,
) -> fx.GraphModule:
    """The fit hypothesis of a KELS-split model as a physically smaller network (no fine-tuning).

    Every split layer keeps only its fit channels: :func:`rewriter.slim.slim` with
    ``channel_masks`` = the fit rows of every split layer; norms, biases and the other
    members of each channel group are cut along. The result is an ordinary GraphModule of
    plain (or ``masks``-masked) layers, with ``gm``'s training flags; in eval mode its
    outputs equal ``gm``'s under ``set_hypothesis(gm, "fit")``. ``gm`` is not modified.
    ``analysis``: ``channel_groups(gm, ...)`` when the caller has it (it stays valid for the
    unsplit copy that is slimmed), reused by ``slim`` instead of a new analysis.

    Why the two agree (up to floating-point summation order): a KELS mask is fit rows x
    fit columns of channel groups, so no fit output reads a reset channel through a conv
    or linear. Per-channel ops (norms, activations, pooling, residual adds and multiplies,
    which join operands into one group) keep reset channels among reset channels, so the
    constants that a norm makes of a zeroed reset channel (``beta - gamma * mean /
    sqrt(var + eps)``, or a bias) only ever reach reset columns, which the fit hypothesis
    zeroes and slimming removes. Ops that mix channels otherwise (LayerNorm or softmax
    over channels, attention reshapes, the network outputs) make their groups not
    prunable, hence entirely fit; layers left unsplit read only fit channels; split
    pieces get the ceil rule each, so slimming never keeps a reset channel to keep a
    piece non-empty.

    ``example_inputs`` default to random tensors of the shapes recorded on ``gm``'s graph.
    The result is checked: each slim layer must hold exactly the fit weights of its split
    layer, and the outputs on the example inputs must match the fit hypothesis.

    Raises :class:`RewriterError` for WELS masks (single weights, not channels: only KELS
    yields a slim network) and for masks that are not KELS masks of this graph.
    """
    from rewriter.slim import slim  # the channel layer imports passes: import when needed

    layers = _require_split(gm, "extract_fit")
    wels = [name for name, m in layers.items() if m.split_mode != "kels"]
    if wels:
        raise RewriterError(
            f"extract_fit needs KELS masks, but {', '.join(wels[:3])} "
            f"{'were' if len(wels) > 1 else 'was'} split with mode='wels'. WELS picks single "
            "weights at random, so its fit hypothesis is not made of whole channels and is no "
            "smaller network: only KELS yields a slim network. Evaluate the WELS fit "
            "hypothesis in place with set_hypothesis(gm, 'fit')."
        )
    inputs = _example_inputs(gm, example_inputs)
    work = copy.deepcopy(gm)
    set_hypothesis(work, "fit")
    expected = evaluate(work, inputs)
    masks = {name: m.fit_mask.clone() for name, m in split_layers(work).items()}
    weights = {name: m.weight.detach().clone() for name, m in split_layers(work).items()}
    for m in split_layers(work).values():
        _unsplit(m)
    rows = {name: mask.flatten(1).any(1) for name, mask in masks.items()}
    result = slim(work, inputs, channel_masks=rows, analysis=analysis)
    for name, mask in masks.items():
        got = result.get_submodule(name).weight.detach()
        if mask.sum() != got.numel() or not torch.equal(
            weights[name][mask].reshape(got.shape), got
        ):
            raise RewriterError(
                f"extract_fit: the slim layer {name!r} does not hold exactly its fit weights "
                f"({int(mask.sum())} fit weights, slim weight {tuple(got.shape)}); the fit masks "
                "are not KELS masks of this graph (were they edited?)"
            )
    try:
        torch.testing.assert_close(evaluate(result, inputs), expected, rtol=1e-4, atol=1e-5)
    except AssertionError as exc:
        raise RewriterError(
            f"internal error: the slim fit network differs from the fit hypothesis: {exc}; "
            "please report it with the model"
        ) from exc
    return result


def _unsplit(m: nn.Module) -> None:
    """Turn a split layer back into its original class, without its split buffers."""
    m.__class__ = UNSPLIT[type(m)]
    del m._buffers[FIT_MASK]
    del m._buffers[SCALE]
    del m.split_mode


def _example_inputs(
    gm: fx.GraphModule, given: Sequence[Tensor] | Tensor | None
) -> tuple[Tensor, ...]:
    if isinstance(given, Tensor):
        return (given,)
    if given is not None:
        return tuple(given)
    gen = torch.Generator().manual_seed(0)
    device, dtype = model_placement(gm)
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise RewriterError(
                f"extract_fit needs example inputs: input {node.name!r} has no recorded shape"
            )
        # float inputs follow the model (it may have moved or changed dtype since tracing)
        want = dtype if meta.dtype.is_floating_point and dtype is not None else meta.dtype
        value = torch.randn(tuple(meta.shape), generator=gen)  # drawn on the CPU: reproducible
        inputs.append(value.to(device=device, dtype=want))
    return tuple(inputs)



# --------------------------------------------------------------------------------------------
# The generation driver
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One generation of :func:`evolve`: ``eval_fn``'s result per hypothesis, and timing."""

    index: int
    scores: dict[str, float]
    train_result: Any
    seconds: float

    @property
    def dense(self) -> float | None:
        return self.scores.get("dense")

    @property
    def fit(self) -> float | None:
        return self.scores.get("fit")


@dataclass
class Evolution:
    """The result of :func:`evolve`: the trained split model and one record per generation."""

    gm: fx.GraphModule
    generations: list[Generation] = field(default_factory=list)

    def table(self) -> str:
        keys = list(dict.fromkeys(k for g in self.generations for k in g.scores))
        lines = ["generation  " + "  ".join(f"{k:>8}" for k in keys) + "  seconds"]
        for g in self.generations:
            cells = "  ".join(f"{g.scores[k]:8.2f}" if k in g.scores else " " * 8 for k in keys)
            lines.append(f"{g.index:>10}  {cells}  {g.seconds:7.1f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def evolve(
    model: nn.Module,
    train_fn: Callable[[fx.GraphModule, int], Any],
    generations: int,
    *,
    eval_fn: Callable[[fx.GraphModule], float] | None = None,
    hypotheses: Sequence[Hypothesis] = ("dense", "fit"),
    split: Mapping[str, Any] | None = None,
    example_inputs: Sequence[Tensor] | Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[Generation], None] | None = None,
) -> Evolution:
    """Knowledge Evolution's generation loop around the user's training function.

    ``model`` is split first with ``rewrite(model, [("split", split or {})],
    example_inputs)`` (a copy; KELS at rate 0.5 by default) unless it already has split
    layers, in which case it is trained in place. Then, for generation ``1..generations``:
    :func:`reinitialize` (from generation 2 on, with ``generator``), the dense hypothesis,
    ``train_fn(gm, generation)``, and ``eval_fn(gm)`` once per hypothesis in
    ``hypotheses`` (``"fit"`` is the slim network's accuracy in eval mode; ``eval_fn``
    sets the mode it wants). ``callback`` sees each :class:`Generation` record.

    ``train_fn`` must build a fresh optimizer and learning-rate schedule on each call,
    as the paper does each generation: the driver re-draws weights in place and cannot
    reset an optimizer it does not own. ``reinitialize``, ``set_hypothesis`` and
    ``extract_fit`` work without this driver in any training loop.
    """
    from rewriter.api import rewrite

    if generations < 1:
        raise ValueError(f"generations must be at least 1, got {generations}")
    unknown = [h for h in hypotheses if h not in HYPOTHESES]
    if unknown:
        raise ValueError(f"unknown hypotheses {unknown}; use {', '.join(HYPOTHESES)}")
    if split_layers(model):
        if split is not None:
            raise ValueError("the model is already split: leave out the split options")
        gm = model
    else:
        gm = rewrite(model, [("split", dict(split or {}))], example_inputs)
    history = Evolution(gm)  # type: ignore[arg-type]
    for index in range(1, generations + 1):
        start = time.perf_counter()
        if index > 1:
            reinitialize(gm, generator)
        set_hypothesis(gm, "dense")
        result = train_fn(gm, index)  # type: ignore[arg-type]
        scores: dict[str, float] = {}
        if eval_fn is not None:
            for h in hypotheses:
                with use_hypothesis(gm, h):
                    scores[h] = float(eval_fn(gm))  # type: ignore[arg-type]
        record = Generation(index, scores, result, time.perf_counter() - start)
        history.generations.append(record)
        if callback is not None:
            callback(record)
    return history
