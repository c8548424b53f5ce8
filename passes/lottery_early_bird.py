"""Early-Bird tickets (You et al., ICLR 2020): channel masks from BatchNorm gammas.

Train with an L1 penalty on every BN scale ``gamma`` (:func:`add_bn_l1_subgradient`,
``1e-4``, after ``backward()``); at the start of every epoch, draw the channel mask at
pruning ratio ``p`` (:func:`bn_channel_masks`: a channel is kept when its ``|gamma|`` is
above the global quantile over all BN channels) and give it to an :class:`EarlyBird`
detector, the first from the initial weights (:meth:`EarlyBird.start`), as the authors'
code does; then after every epoch (the start of the next one). The detector
keeps the last 5 epochs' masks (FIFO) and fires when the newest is within 0.1 (normalised
Hamming distance, :func:`mask_distance`) of all 4 older ones. Then
:func:`early_bird_ticket` builds the physically smaller network with
:func:`rewriter.slim.slim`, each BN's mask given to the conv or linear layer that produces
its input, and the ticket is retrained::

    detector = EarlyBird(ratio=0.5)
    detector.start(gm)                          # the mask of the initial weights
    for epoch in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(gm(x), y)
            loss.backward()
            add_bn_l1_subgradient(gm, 1e-4)
            optimizer.step(); optimizer.zero_grad()
        if detector.update(gm):                 # the mask at the start of epoch + 1
            ticket = early_bird_ticket(gm, (x,), detector.ticket_masks)
            break                               # detector.fired_epoch == epoch + 1

Without :meth:`EarlyBird.start` the window holds only masks drawn after training epochs:
the detector then sees one mask fewer and ``fired_epoch`` counts from the first update.

Slimming: the authors' ResNet code decides per block which channels to keep (each
block's inner convs by their own BN masks, the channels joined by residual adds
handled per block), while :func:`early_bird_ticket` hands every BN mask to
:func:`rewriter.slim.slim`, which prunes a channel of a coupled group (all the convs
joined by residual adds) only when *no* member keeps it: the union of the members'
choices, so a ticket may keep more channels than the ratio asks where masks disagree
across a group. Inside a residual branch (not coupled) the two agree.

Exactness: the mask prunes exactly ``round(p * n)`` of the ``n`` BN channels, the
smallest ``|gamma|`` (ties broken by position, in module order). The authors' code keeps
``|gamma| > sorted[int(p * n)]``, which also removes the channel at that index (one more)
and every channel tied with it. "Within 0.1" is ``<= 0.1``, as in the authors' check
(a distance above ``epsilon`` vetoes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from rewriter.errors import RewriterError


def bn_layers(gm: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm (1d/2d/3d, sync, subclasses such as RBN) with a scale, by name."""
    return {
        name: m
        for name, m in gm.named_modules()
        if isinstance(m, _BatchNorm) and m.affine and m.weight is not None
    }


def add_bn_l1_subgradient(gm: nn.Module, weight: float = 1e-4) -> None:
    """Add ``weight * sign(gamma)`` to every BN scale's gradient (after ``backward()``).

    This is the sub-gradient of ``weight * sum |gamma|`` (network slimming); a BN scale
    without a gradient yet gets exactly that term.
    """
    with torch.no_grad():
        for bn in bn_layers(gm).values():
            term = weight * torch.sign(bn.weight)
            if bn.weight.grad is None:
                bn.weight.grad = term
            else:
                bn.weight.grad.add_(term)


def bn_channel_masks(gm: nn.Module, ratio: float) -> dict[str, Tensor]:
    """Boolean keep-masks per BN: prune the ``round(ratio * n)`` smallest ``|gamma|`` of all.

    One global ranking over the ``n`` channels of every BN (module order, ties broken
    by position).
    """
    if not 0.0 <= ratio < 1.0:
        raise RewriterError(
            f"ratio must be in [0, 1) (the fraction of channels pruned), got {ratio}"
        )
    layers = bn_layers(gm)
    if not layers:
        raise RewriterError("the model has no BatchNorm layer with a scale (gamma) to rank")
    gammas = torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in layers.values()])
    n = gammas.numel()
    order = torch.sort(gammas, stable=True).indices
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[: round(ratio * n)]] = False
    out, offset = {}, 0
    for name, bn in layers.items():
        size = bn.weight.numel()
        out[name] = keep[offset : offset + size].clone()
        offset += size
    return out


def mask_distance(a: Mapping[str, Tensor] | Tensor, b: Mapping[str, Tensor] | Tensor) -> float:
    """Normalised Hamming distance: the fraction of channels on which two masks differ."""
    fa, fb = _flat(a), _flat(b)
    if fa.shape != fb.shape:
        raise RewriterError(f"masks cover different channel counts: {fa.numel()} vs {fb.numel()}")
    return float((fa != fb).sum()) / fa.numel()


def _flat(mask: Mapping[str, Tensor] | Tensor) -> Tensor:
    if isinstance(mask, Tensor):
        return mask.flatten().bool()
    return torch.cat([m.flatten().bool() for m in mask.values()])


class EarlyBird:
    """Early-Bird detector: fires when the newest mask is within ``threshold`` of the others.

    Keeps the last ``window`` masks (FIFO, 5 by default). After :meth:`update`,
    ``distances`` holds the distance of the newest mask to each older one in the window
    (oldest first; empty until the window is full).
    """

    def __init__(self, ratio: float = 0.5, window: int = 5, threshold: float = 0.1) -> None:
        if window < 2:
            raise RewriterError(f"window must be at least 2, got {window}")
        self.ratio = ratio
        self.window = window
        self.threshold = threshold
        self.masks: deque[dict[str, Tensor]] = deque(maxlen=window)
        self.distances: list[float] = []
        self.epochs = 0
        self.fired_at: int | None = None  # the first update (1-based) at which it fired
        self.started = False  # whether the first mask came from the initial weights

    def start(self, gm: nn.Module) -> None:
        """Record the mask of the initial weights, before training (the authors' first mask).

        Call once, before any :meth:`update`; every later :meth:`update` is the mask at
        the start of the next epoch.
        """
        if self.epochs:
            raise RewriterError("start() must come before the first update()")
        self.push(bn_channel_masks(gm, self.ratio))
        self.started = True

    @property
    def fired_epoch(self) -> int | None:
        """Training epochs completed when the detector first fired (the authors' epoch index).

        With :meth:`start`, the mask drawn after ``e`` epochs is the ``(e + 1)``-th; without
        it, the ``e``-th.
        """
        if self.fired_at is None:
            return None
        return self.fired_at - 1 if self.started else self.fired_at

    def update(self, gm: nn.Module) -> bool:
        """Draw this epoch's mask from ``gm``'s BN gammas; whether the ticket has emerged."""
        return self.push(bn_channel_masks(gm, self.ratio))

    def push(self, masks: dict[str, Tensor]) -> bool:
        """Add one epoch's masks (as from :func:`bn_channel_masks`); whether it fires."""
        self.masks.append({k: v.clone() for k, v in masks.items()})
        self.epochs += 1
        if len(self.masks) < self.window:
            self.distances = []
            return False
        newest = self.masks[-1]
        self.distances = [mask_distance(newest, old) for old in list(self.masks)[:-1]]
        fired = all(d <= self.threshold for d in self.distances)
        if fired and self.fired_at is None:
            self.fired_at = self.epochs
        return fired

    @property
    def ticket_masks(self) -> dict[str, Tensor]:
        """The newest channel masks (the ticket when the detector has fired)."""
        if not self.masks:
            raise RewriterError("no mask yet: call update(model) after each epoch")
        return self.masks[-1]


def bn_producers(gm: fx.GraphModule) -> dict[str, str]:
    """For each BN, the conv or linear layer whose output it normalises (when it is one)."""
    if not isinstance(gm, fx.GraphModule):
        raise RewriterError("bn_producers needs a GraphModule (rewriter.trace or rewrite)")
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), _BatchNorm):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(str(src.target)), (nn.modules.conv._ConvNd, nn.Linear))
        ):
            out[str(node.target)] = str(src.target)
    return out


def channel_masks_for_slim(gm: fx.GraphModule, bn_masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BN channel masks keyed by the layer producing each BN's input (for ``slim``).

    A BN whose input is not produced by a conv or linear layer keeps its own name
    (``slim`` accepts masks over a norm layer's channels too).
    """
    producers = bn_producers(gm)
    return {producers.get(bn, bn): mask for bn, mask in bn_masks.items()}


def early_bird_ticket(
    gm: fx.GraphModule,
    example_inputs: Sequence[Tensor],
    bn_masks: Mapping[str, Tensor],
    *,
    analysis: Any = None,
) -> nn.Module:
    """The physically smaller ticket: :func:`rewriter.slim.slim` with the BN masks.

    Each BN's mask is given to the layer producing its input (:func:`channel_masks_for_slim`);
    ``slim`` removes a channel from its whole channel group (e.g. the convs joined by
    residual adds) only when no member asks to keep it, so it keeps the union of the
    members' channels. ``gm`` itself is not changed. The slim report is
    ``ticket.meta["rewriter_slim"]``. ``analysis``: ``channel_groups(gm, ...)`` when the
    caller has it, reused by ``slim`` instead of analysing ``gm`` again.
    """
    from rewriter.slim import slim  # the channel-structure layer; imported when needed

    masks = channel_masks_for_slim(gm, bn_masks)
    return slim(gm, tuple(example_inputs), channel_masks=masks, analysis=analysis)
