"""Pass ``tas``: TAS differentiable width and depth search to a MACs target (``docs/methods/tas.md``).

Before => after, for every searchable channel group (from
:func:`rewriter.analysis.channels.channel_groups`) and every stage of residual blocks
(from :func:`rewriter.analysis.blocks.residual_blocks`)::

    bn(conv(x))          =>  tas_norm(conv(x), index, weight)       (the BN, per candidate)
    conv(x)              =>  tas_mix(conv(x), index, weight)        (producer without a BN)
    stage output b_L(x)  =>  sum_d p_d * b_d(x)  over candidate depths d   (``<block>_depth``)

with ``index, weight, depth = tas_arch()`` computed once at the top of the graph.

Width: group ``g`` of ``C`` channels has the candidate widths ``c_1 < ... < c_K``, the sorted
unique ``max(1, int(C * r))`` for the pass's ``ratios`` (default 0.3, 0.4, ..., 1.0), and
learnable logits. Per forward (training mode) two candidates ``a, b`` are drawn without
replacement from the Gumbel-softmax probabilities ``softmax((log_softmax(logits) + G) / tau)``
and weighted by the softmax of their two perturbed logits (the authors' ``select2withP``;
the draw uses the Gumbel-top-2 trick so that it stays a tensor op). Candidate ``j`` keeps the
first ``c_j`` channels of the producer's output and has its own BatchNorm affine parameters
and running statistics where the producer is followed by a BatchNorm; channel-wise
interpolation (CWI: adaptive average pooling along the channel axis, the authors'
``ChannelWiseInterV2``) stretches both candidates to ``max(c_a, c_b)`` channels before the
weighted sum, and the channels above that are zero. The whole mix is one ``C x C`` channel
matrix and one bias built from tensors, so the sampled widths never change a shape and
``torch.compile(fullgraph=True)`` compiles the training step once. In eval mode each group
uses its argmax candidate (ties go to the widest) alone: the search model then computes
exactly what :func:`derive` builds, up to float rounding.

Depth: a *stage* is a chain of residual blocks in which every block after the first is an
identity block of unchanged shape reading the previous block's output (and read by nothing
else but the next block). A stage of ``L >= 2`` blocks has the
candidate depths of the authors' CIFAR ResNet search model (``1..L`` for ``L <= 3``, else
``1, 3, 5, ...`` and ``L``); the stage output becomes the sum of the block outputs at the candidate depths
weighted by Gumbel-softmax probabilities (training) or by the one-hot argmax (eval; ties
go to the deepest). ``depth=false`` searches widths only.

Cost: :func:`expected_flops` is the expected MACs per sample of the searched architecture,
differentiable in every logit. It is built at rewrite time from
:func:`rewriter.analysis.flops.flops` of the original graph: every node's MACs scale with the
expected number of its kept channels (softmax-weighted candidate widths, through the channel
positions the channel analysis assigns to every tensor; a conv or linear with the product of
its input and output fractions, its bias with the output fraction) and with the probability
that its block is executed (plain softmax of the depth logits). With one-hot probabilities it
is the exact MAC count of that architecture, which :func:`derive` builds. The cost loss (in
:func:`rewriter.aux_losses`) is ``cost_weight * log(E[F] / F_dense)`` while the argmax
architecture's MACs exceed ``flops_ratio * F_dense``, ``-cost_weight * log(E[F] / F_dense)``
while they are below ``(flops_ratio - tolerance) * F_dense``, else 0; ``cost_weight`` 2.

Names added: ``tas_arch`` (:class:`TASArch`; parameters ``tas_arch.width_logits`` (all groups'
logits, concatenated) and ``tas_arch.depth_logits``, buffer ``tas_arch.temperature`` and the
cost tables); every BatchNorm that follows a searched producer becomes a :class:`TASNorm`
under the *same name* whose ``weight``, ``bias``, ``running_mean`` and ``running_var`` have
one row per candidate (all rows start as the original BatchNorm's); ``<layer>_tas``
(:class:`TASWidth`) after a producer without BatchNorm; ``<block>_depth`` (:class:`TASDepth`)
after the last block of each searched stage.

Contract: the logits start at zero, so in eval mode every group takes its widest candidate and
every stage its full depth: outputs are preserved (``preserves_outputs``; the BatchNorm is
computed as ``scale * x + shift``, equal up to rounding). Running ``tas`` on a graph that
already has TAS modules is a :class:`rewriter.RewriterError`.

Which groups are searched: prunable groups with at least two candidate widths whose channels
are produced only by convs / linears holding all their output channels in this group, in
order, whose per-channel layers are BatchNorms (with affine parameters, running statistics and
a momentum) directly after a producer, or PReLUs, that no split or slice cuts, and on which no
op turns zeros into nonzeros. Other groups keep their width; the report notes why.

Deviations from the paper and the authors' code:

* one width choice per *channel group*, not per conv: convs whose channels are added together
  (a residual stage, a block and its projection shortcut) share one choice, so the derived
  network is slimmed by :func:`rewriter.slim` without zero-padding in the adds (the authors
  pad the narrower operand with zeros);
* the mix keeps full-width tensors (zeros above the larger candidate) instead of changing the
  tensor width every step, so compiled training does not recompile;
* the logits start at zero (the authors draw them from ``N(0, 0.01)``), so that the rewritten
  model starts as the original network in eval mode;
* the cost is MACs per sample as :func:`rewriter.analysis.flops.flops` counts them (every
  node, not only convs and the classifier), and the tolerance is a fraction of the dense MACs.

Training-time functions (all take the rewritten GraphModule): :func:`arch_parameters` /
:func:`weight_parameters` (for the two optimizers the paper alternates),
:func:`temperature_schedule` and :func:`set_temperature`, :func:`expected_flops`,
:func:`cost_loss`, :func:`in_target_band`, :func:`architecture` (the argmax widths and depths)
and :func:`derive`, the
physically slim network of the argmax architecture.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from rewriter.analysis.blocks import ResidualBlock, residual_blocks
from rewriter.context import RewriteContext
from rewriter.errors import RewriterError
from rewriter.modules import RewriterModule
from rewriter.registry import (
    Pass,
    anything,
    nonnegative,
    option,
    positive,
    register,
    unit_interval,
)

__all__ = [
    "RATIOS",
    "Architecture",
    "Tas",
    "TASArch",
    "TASDepth",
    "TASNorm",
    "TASWidth",
    "arch_parameters",
    "architecture",
    "candidate_widths",
    "cost_loss",
    "depth_choices",
    "derive",
    "expected_flops",
    "in_target_band",
    "kd_student",
    "set_temperature",
    "tas_arch",
    "temperature_schedule",
    "weight_parameters",
]

RATIOS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Default width ratios of the candidates (``docs/methods/tas.md``)."""

_SEARCHABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def candidate_widths(channels: int, ratios: Sequence[float] = RATIOS) -> list[int]:
    """The sorted unique ``max(1, int(channels * r))`` for ``r`` in ``ratios``."""
    return sorted({max(1, int(channels * r)) for r in ratios})


def depth_choices(blocks: int) -> list[int]:
    """Candidate depths of a stage of ``blocks`` blocks.

    As the authors' CIFAR ResNet search model (``get_depth_choices`` of their
    ``SearchCifarResNet.py``): ``1..blocks`` for up to 3 blocks, else ``1, 3, 5, ...`` and
    ``blocks``; a single block has no choice (``[1]``).
    """
    if blocks < 1:
        raise ValueError(f"a stage has at least one block, got {blocks}")
    if blocks <= 3:
        return list(range(1, blocks + 1))
    choices = list(range(1, blocks + 1, 2))
    return choices if choices[-1] == blocks else [*choices, blocks]


def _gumbel(like: Tensor) -> Tensor:
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(torch.rand_like(like).clamp_min(tiny)))


def _padded_index(sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """For ragged rows of ``sizes``: an index into ``cat([flat, pad])`` of shape (rows, max),
    and each flat entry's position in the padded layout."""
    width = max(sizes, default=1)
    total = sum(sizes)
    index = torch.full((len(sizes), width), total, dtype=torch.long)
    positions = []
    start = 0
    for row, size in enumerate(sizes):
        index[row, :size] = torch.arange(start, start + size)
        positions.extend(row * width + j for j in range(size))
        start += size
    return index, torch.tensor(positions, dtype=torch.long)


def _argmax_last(logits: Tensor) -> Tensor:
    """Row-wise argmax; ties go to the last (widest / deepest) candidate."""
    width = logits.shape[-1]
    return width - 1 - logits.flip(-1).argmax(-1)


class TASArch(RewriterModule):
    """The architecture logits, their sampling, and the differentiable cost.

    ``forward()`` takes no input and returns ``(index, weight, depth)``: ``index`` ``(G, 2)``
    the two candidates of every searched group, ``weight`` ``(G, 2)`` their mixing weights,
    ``depth`` ``(S, D)`` the weights of every stage's candidate depths (see the module docs
    for training and eval mode).
    """

    AUX_LOSS_KEYS: frozenset[str] = frozenset()  # aux_loss reads no context

    def __init__(
        self,
        group_widths: Sequence[Sequence[int]],
        stage_depths: Sequence[Sequence[int]] = (),
        group_labels: Sequence[str] = (),
        stage_labels: Sequence[str] = (),
        group_layers: Sequence[Sequence[str]] = (),
        num_terms: int = 0,
        temperature: float = 10.0,
        flops_ratio: float = 0.5,
        tolerance: float = 0.05,
        cost_weight: float = 2.0,
        dense_macs: float = 1.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.group_widths = [[int(c) for c in w] for w in group_widths]
        self.stage_depths = [[int(d) for d in ds] for ds in stage_depths]
        self.group_labels = list(group_labels) or [f"group{i}" for i in range(len(group_widths))]
        self.stage_labels = list(stage_labels) or [f"stage{i}" for i in range(len(stage_depths))]
        self.group_layers = [list(layers) for layers in group_layers]
        self.num_terms = int(num_terms)
        self.flops_ratio = float(flops_ratio)
        self.tolerance = float(tolerance)
        self.cost_weight = float(cost_weight)
        self.dense_macs = float(dense_macs)
        kw = sum(len(w) for w in self.group_widths)
        kd = sum(len(d) for d in self.stage_depths)
        self.width_logits = nn.Parameter(torch.zeros(kw, device=device))
        self.depth_logits: nn.Parameter | None
        if self.stage_depths:
            self.depth_logits = nn.Parameter(torch.zeros(kd, device=device))
        else:
            self.register_parameter("depth_logits", None)
        w_index, w_pos = _padded_index([len(w) for w in self.group_widths])
        d_index, d_pos = _padded_index([len(d) for d in self.stage_depths])
        self.register_buffer("width_index", w_index.to(device))
        self.register_buffer("width_pos", w_pos.to(device))
        self.register_buffer("depth_index", d_index.to(device))
        self.register_buffer("depth_pos", d_pos.to(device))
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        f64 = {"dtype": torch.float64, "device": device}
        t = self.num_terms
        self.register_buffer("cost_coef", torch.zeros(t, **f64))
        self.register_buffer("cost_denom", torch.ones(t, **f64))
        self.register_buffer("cost_a_const", torch.zeros(t, **f64))
        self.register_buffer("cost_a", torch.zeros(t, kw, **f64))
        self.register_buffer("cost_b_const", torch.ones(t, **f64))
        self.register_buffer("cost_b", torch.zeros(t, kw, **f64))
        self.register_buffer("cost_d_const", torch.ones(t, **f64))
        self.register_buffer("cost_d", torch.zeros(t, kd, **f64))

    # -- logits -------------------------------------------------------------------------------
    @staticmethod
    def _pad(flat: Tensor, index: Tensor) -> Tensor:
        pad = torch.full((1,), float("-inf"), dtype=flat.dtype, device=flat.device)
        return torch.cat([flat, pad])[index]

    def width_logits_padded(self) -> Tensor:
        """``(G, K_max)`` logits, ``-inf`` where a group has fewer candidates."""
        return self._pad(self.width_logits, self.width_index)

    def depth_logits_padded(self) -> Tensor:
        """``(S, D_max)`` logits, ``-inf`` where a stage has fewer candidates."""
        if self.depth_logits is None:
            return torch.zeros(0, 1, device=self.width_logits.device)
        return self._pad(self.depth_logits, self.depth_index)

    def forward(self) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.width_logits_padded()
        tau = self.temperature.to(logits.dtype)
        if not self.group_widths:
            index = torch.zeros(0, 2, dtype=torch.long, device=logits.device)
            weight = torch.zeros(0, 2, dtype=logits.dtype, device=logits.device)
        elif self.training:
            perturbed = (logits.log_softmax(-1) + _gumbel(logits)) / tau
            # two candidates without replacement from softmax(perturbed): Gumbel-top-2
            index = (perturbed.log_softmax(-1) + _gumbel(logits)).topk(2, dim=-1).indices
            weight = perturbed.gather(-1, index).softmax(-1)
        else:
            best = _argmax_last(logits)
            index = torch.stack([best, best], dim=-1)
            weight = torch.zeros_like(logits[:, :2])
            weight[:, 0] = 1.0
        depth_logits = self.depth_logits_padded()
        if self.depth_logits is None:
            depth = depth_logits
        elif self.training:
            depth = ((depth_logits.log_softmax(-1) + _gumbel(depth_logits)) / tau).softmax(-1)
        else:
            depth = nn.functional.one_hot(_argmax_last(depth_logits), depth_logits.shape[-1]).to(
                depth_logits.dtype
            )
        return index, weight, depth

    # -- cost ---------------------------------------------------------------------------------
    def width_probs(self) -> Tensor:
        """``(G, K_max)``: ``softmax(logits)`` per group (zeros past each group's candidates)."""
        return self.width_logits_padded().softmax(-1)

    def depth_probs(self) -> Tensor:
        """``(S, D_max)``: ``softmax(logits)`` per stage."""
        return self.depth_logits_padded().softmax(-1)

    def argmax_probs(self) -> tuple[Tensor, Tensor]:
        """One-hot width and depth probabilities of the argmax architecture (ties: widest, deepest)."""
        w = self.width_logits_padded().detach()
        d = self.depth_logits_padded().detach()
        width = nn.functional.one_hot(_argmax_last(w), w.shape[-1]).to(w.dtype)
        depth = nn.functional.one_hot(_argmax_last(d), d.shape[-1]).to(d.dtype)
        return width, depth

    def expected_flops(
        self, width_probs: Tensor | None = None, depth_probs: Tensor | None = None
    ) -> Tensor:
        """Expected MACs per sample (float64 scalar) under the given or the softmax probabilities."""
        width = self.width_probs() if width_probs is None else width_probs
        pi = width.reshape(-1)[self.width_pos].to(torch.float64)
        a = self.cost_a_const + self.cost_a @ pi
        b = self.cost_b_const + self.cost_b @ pi
        if self.depth_logits is None:
            d = self.cost_d_const
        else:
            depth = self.depth_probs() if depth_probs is None else depth_probs
            p = depth.reshape(-1)[self.depth_pos].to(torch.float64)
            d = self.cost_d_const + self.cost_d @ p
        return (self.cost_coef * a * b * d / self.cost_denom).sum()

    def argmax_flops(self) -> Tensor:
        """Exact MACs per sample of the argmax architecture (what :func:`derive` builds)."""
        return self.expected_flops(*self.argmax_probs()).detach()

    def cost_loss(self) -> Tensor:
        """TAS's cost loss (see the module docs), times ``cost_weight``."""
        ratio = self.expected_flops() / self.dense_macs
        current = self.argmax_flops() / self.dense_macs
        log = torch.log(ratio)
        zero = torch.zeros_like(log)
        low = self.flops_ratio - self.tolerance
        loss = torch.where(current > self.flops_ratio, log, torch.where(current < low, -log, zero))
        return (self.cost_weight * loss).to(self.width_logits.dtype)

    def aux_loss(self, **context: Any) -> Tensor:
        """:meth:`cost_loss`; context is ignored."""
        return self.cost_loss()

    def extra_repr(self) -> str:
        return (
            f"groups={len(self.group_widths)}, stages={len(self.stage_depths)}, "
            f"flops_ratio={self.flops_ratio}"
        )

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """Negligible: sampling a few small vectors per forward."""
        return 0


def _interpolation(widths: Tensor, target: Tensor, channels: int) -> Tensor:
    """CWI matrices ``(len(widths), channels, channels)``: adaptive average pooling along the
    channel axis from the first ``widths[k]`` channels to the first ``target`` channels."""
    dev = widths.device
    o = torch.arange(channels, device=dev).view(1, channels, 1)
    i = torch.arange(channels, device=dev).view(1, 1, channels)
    c = widths.view(-1, 1, 1)
    m = target.view(-1, 1, 1) if target.dim() else target.view(1, 1, 1)
    start = torch.div(o * c, m, rounding_mode="floor")
    end = torch.div((o + 1) * c + m - 1, m, rounding_mode="floor")
    inside = (i >= start) & (i < end) & (o < m)
    return inside.to(torch.float32) / (end - start).clamp_min(1).to(torch.float32)


def _channel_mix(x: Tensor, matrix: Tensor, bias: Tensor, dim: int) -> Tensor:
    """``y[c] = sum_j matrix[c, j] * x[j] + bias[c]`` along dimension ``dim``."""
    moved = x.movedim(dim, -1)
    return (moved @ matrix.t() + bias).movedim(-1, dim)


class TASWidth(RewriterModule):
    """The width mix of one producer of group ``group``: two candidates, CWI, weighted sum.

    ``forward(x, index, weight)`` with ``index``/``weight`` from :class:`TASArch`; ``x`` has
    ``channels`` channels along ``dim``. Without a norm the candidates are the first ``c_j``
    channels of ``x`` as they are.
    """

    def __init__(self, group: int, widths: Sequence[int], channels: int, dim: int = 1) -> None:
        super().__init__()
        self.group = int(group)
        self.widths = [int(c) for c in widths]
        self.channels = int(channels)
        self.dim = int(dim)
        self.register_buffer("candidates", torch.tensor(self.widths, dtype=torch.long))

    def scale_shift(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The input to mix and each selected candidate's per-channel scale and shift."""
        ones = torch.ones(index.shape[0], self.channels, dtype=x.dtype, device=x.device)
        return x, ones, torch.zeros_like(ones)

    def forward(self, x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        pick = index[self.group]
        p = weight[self.group].to(x.dtype)
        x, scale, shift = self.scale_shift(x, pick)
        widths = self.candidates[pick]
        interp = _interpolation(widths, widths.max(), self.channels).to(x.dtype)
        matrix = torch.einsum("k,kop,kp->op", p, interp, scale)
        bias = torch.einsum("k,kop,kp->o", p, interp, shift)
        return _channel_mix(x, matrix, bias, self.dim)

    def extra_repr(self) -> str:
        return f"group={self.group}, widths={self.widths}"

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """One ``channels``-wide channel mix per output element (a 1x1 conv's worth)."""
        return math.prod(int(s) for s in output_shape or ()) * self.channels


class TASNorm(TASWidth):
    """A BatchNorm with one set of affine parameters and running statistics per candidate.

    Replaces a BatchNorm that follows a searched producer, under the BatchNorm's name.
    Training mode normalises with the batch statistics (the same for every candidate, since
    the candidates are prefixes of one tensor), applies each selected candidate's affine,
    and updates the running statistics of the two selected candidates only. Eval mode uses
    the argmax candidate's running statistics.
    """

    def __init__(
        self,
        group: int,
        widths: Sequence[int],
        channels: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        norm: str = "BatchNorm2d",
    ) -> None:
        super().__init__(group, widths, channels, dim=1)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.norm = norm
        k = len(self.widths)
        self.weight = nn.Parameter(torch.ones(k, self.channels))
        self.bias = nn.Parameter(torch.zeros(k, self.channels))
        self.register_buffer("running_mean", torch.zeros(k, self.channels))
        self.register_buffer("running_var", torch.ones(k, self.channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_norm(cls, group: int, widths: Sequence[int], bn: nn.Module) -> TASNorm:
        """Every candidate starts as a copy of ``bn``'s parameters and statistics."""
        module = cls(group, widths, bn.num_features, bn.eps, bn.momentum, type(bn).__name__)
        k = len(module.widths)
        with torch.no_grad():
            module.weight.copy_(bn.weight.detach().expand(k, -1))
            module.bias.copy_(bn.bias.detach().expand(k, -1))
            module.running_mean.copy_(bn.running_mean.expand(k, -1))
            module.running_var.copy_(bn.running_var.expand(k, -1))
            module.num_batches_tracked.copy_(bn.num_batches_tracked)
        return module.to(bn.weight.device)

    def to_norm(self, candidate: int) -> nn.Module:
        """A plain BatchNorm with candidate ``candidate``'s parameters and statistics."""
        bn = getattr(nn, self.norm)(self.channels, eps=self.eps, momentum=self.momentum)
        bn = bn.to(self.weight.device)
        with torch.no_grad():
            bn.weight.copy_(self.weight[candidate])
            bn.bias.copy_(self.bias[candidate])
            bn.running_mean.copy_(self.running_mean[candidate])
            bn.running_var.copy_(self.running_var[candidate])
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn

    def scale_shift(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.training:
            inv = torch.rsqrt(self.running_var[index] + self.eps)
            scale = self.weight[index] * inv
            return x, scale, self.bias[index] - self.running_mean[index] * scale
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            chosen = torch.zeros(len(self.widths), 1, dtype=x.dtype, device=x.device)
            chosen = chosen.index_fill(0, index, self.momentum)
            unbiased = var * (count / max(count - 1, 1))
            self.running_mean.add_(chosen * (mean - self.running_mean))
            self.running_var.add_(chosen * (unbiased - self.running_var))
            self.num_batches_tracked.add_(1)
        shape = [1, -1] + [1] * (x.dim() - 2)
        normed = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        return normed, self.weight[index], self.bias[index]

    def extra_repr(self) -> str:
        return f"{self.norm}, group={self.group}, widths={self.widths}"

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """A norm (two MACs per element) plus the channel mix."""
        return super().rewriter_macs(input_shapes, output_shape) + 2 * math.prod(
            int(s) for s in output_shape or ()
        )


class TASDepth(RewriterModule):
    """``sum_d depth[stage, d] * end_d``: the stage output over its candidate depths.

    ``forward(*ends, depth)``: ``ends`` are the outputs of the blocks at the candidate
    depths, ``depth`` the ``(S, D)`` weights from :class:`TASArch`.
    """

    def __init__(self, stage: int, depths: Sequence[int], blocks: Sequence[str] = ()) -> None:
        super().__init__()
        self.stage = int(stage)
        self.depths = [int(d) for d in depths]
        self.blocks = list(blocks)

    def forward(self, *args: Tensor) -> Tensor:
        *ends, depth = args
        p = depth[self.stage].to(ends[0].dtype)
        out = ends[0] * p[0]
        for j in range(1, len(ends)):
            out = out + ends[j] * p[j]
        return out

    def extra_repr(self) -> str:
        return f"stage={self.stage}, depths={self.depths}"

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """One multiply-add per element and candidate."""
        return math.prod(int(s) for s in output_shape or ()) * len(self.depths)


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Producer:
    node: fx.Node
    norm: fx.Node | None
    dim: int


@dataclass(frozen=True)
class _SearchGroup:
    gid: int
    label: str
    widths: list[int]
    channels: int
    producers: list[_Producer]
    layers: list[str]


@dataclass(frozen=True)
class _Stage:
    label: str
    blocks: list[ResidualBlock]
    depths: list[int]
    block_labels: list[str]


@register
@dataclass(frozen=True)
class Tas(Pass):
    """bn(conv(x)) => per-candidate bn + CWI mix of two sampled widths; stage => mix of depths."""

    name = "tas"
    preserves_outputs = True

    ratios: tuple[float, ...] = option(
        RATIOS, "width ratios r of the candidates int(C * r)", unit_interval(low_open=True)
    )
    depth: bool = option(
        True, "also search the depth of every stage of residual blocks", anything()
    )
    flops_ratio: float = option(
        0.5, "target MACs as a fraction of the dense model's MACs", unit_interval(low_open=True)
    )
    tolerance: float = option(
        0.05,
        "no cost loss within [flops_ratio - tolerance, flops_ratio] (fraction of dense MACs)",
        unit_interval(high_open=True),
    )
    cost_weight: float = option(2.0, "weight of the cost loss in aux_losses", nonnegative())
    temperature: float = option(10.0, "initial Gumbel-softmax temperature (tau_max)", positive())

    def __post_init__(self) -> None:
        if not self.ratios or not all(0 < r <= 1 for r in self.ratios):
            raise ValueError(f"ratios must be a non-empty list in (0, 1], got {list(self.ratios)}")
        if not 0 < self.flops_ratio <= 1:
            raise ValueError(f"flops_ratio must be in (0, 1], got {self.flops_ratio}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if not (self.cost_weight >= 0 and math.isfinite(self.cost_weight)):
            raise ValueError(f"cost_weight must be a finite number >= 0, got {self.cost_weight}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        present = [n for n, m in gm.named_modules() if isinstance(m, (TASArch, TASWidth, TASDepth))]
        if present:
            raise RewriterError(
                f"the graph already has TAS modules ({', '.join(present[:3])}); run tas once per "
                "model (rewrite the original model to change its options)"
            )
        inputs = _recorded_inputs(gm)
        plan = _plan(gm, inputs, self, ctx)
        groups, stages, table, dense = plan
        if not groups and not stages:
            ctx.note("no searchable channel group or stage: nothing inserted")
            return
        ref = next(iter(gm.parameters()), None)
        device = None if ref is None else ref.device
        arch = TASArch(
            [g.widths for g in groups],
            [s.depths for s in stages],
            group_labels=[g.label for g in groups],
            stage_labels=[s.label for s in stages],
            group_layers=[g.layers for g in groups],
            num_terms=len(table),
            temperature=self.temperature,
            flops_ratio=self.flops_ratio,
            tolerance=self.tolerance,
            cost_weight=self.cost_weight,
            dense_macs=dense,
            device=device,
        )
        _fill_cost(arch, table, groups, stages)
        graph = gm.graph
        arch_name = ctx.add_module("tas", "arch", arch)
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            arch_node = ctx.call_module(arch_name, ())
            index = graph.call_function(operator.getitem, (arch_node, 0))
            weight = graph.call_function(operator.getitem, (arch_node, 1))
            depth = graph.call_function(operator.getitem, (arch_node, 2)) if stages else None

        for number, group in enumerate(groups):
            ctx.matches["channel group -> width choice"] += 1
            for prod in group.producers:
                ctx.current_node = prod.node.name
                if prod.norm is not None:
                    bn = ctx.module(prod.norm)
                    ctx.replace_module(prod.norm, TASNorm.from_norm(number, group.widths, bn))
                    prod.norm.args = (prod.node, index, weight)
                    ctx.matches["batch norm -> per-candidate norm + width mix"] += 1
                    continue
                module = TASWidth(number, group.widths, group.channels, prod.dim)
                name = ctx.add_module(prod.node, "tas", module)
                with graph.inserting_after(prod.node):
                    mix = ctx.call_module(name, (prod.node, index, weight))
                prod.node.replace_all_uses_with(
                    mix, delete_user_cb=lambda user, mix=mix: user is not mix
                )
                ctx.matches["layer output -> width mix"] += 1

        nodes = {n.name: n for n in graph.nodes}
        for number, stage in enumerate(stages):
            last = nodes[stage.blocks[-1].output]
            ctx.current_node = last.name
            ends = tuple(nodes[stage.blocks[d - 1].output] for d in stage.depths)
            module = TASDepth(number, stage.depths, stage.block_labels)
            name = ctx.add_module(stage.block_labels[-1].replace("/", "_"), "depth", module)
            with graph.inserting_after(last):
                mix = ctx.call_module(name, (*ends, depth))
            last.replace_all_uses_with(mix, delete_user_cb=lambda user, mix=mix: user is not mix)
            ctx.matches["stage -> depth choice"] += 1
        ctx.current_node = None


def _label(block: ResidualBlock) -> str:
    return block.scope if block.scope is not None else block.add


def _recorded_inputs(gm: fx.GraphModule) -> tuple[Tensor, ...]:
    """Zero tensors of the example inputs' recorded shapes."""
    inputs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise RewriterError(
                f"tas needs the model's shapes: input {node.name!r} has no recorded shape; give "
                "example inputs to rewrite() (rewriter.rewrite(model, ['tas'], example_inputs))"
            )
        inputs.append(torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return tuple(inputs)


# -- planning -----------------------------------------------------------------------------------

# A cost term: MACs per sample, then the kept-channel counts of up to two tensors, and the node.
_Counts = tuple[float, dict[tuple[int, int], float]]  # (constant, {(group, candidate): count})


@dataclass(frozen=True)
class _Term:
    macs: int
    a: _Counts
    b: _Counts
    denom: float
    node: str


def _plan(gm: fx.GraphModule, inputs: tuple[Tensor, ...], opts: Tas, ctx: RewriteContext):
    from rewriter.analysis.channels import channel_groups  # the analysis layer imports passes
    from rewriter.analysis.coupling import Coupler, Tracked
    from rewriter.analysis.flops import flops
    from rewriter.analysis.rules_channels import lookup
    from rewriter.tracing import opaque_modules

    analysis = channel_groups(gm, inputs)
    coupler = Coupler(gm, lookup, opaque_modules(gm))
    coupler.run()
    report = flops(gm, inputs)
    batch = report.batch

    # atom -> (group id, group channel). Every channel position of a tensor the analysis
    # follows carries the atom of the layer that made it (ops pass atoms through), so the
    # layers' own atoms are enough; a position without one counts as always kept.
    where: dict[int, tuple[int, int]] = {}
    for group in analysis.groups:
        for member in group.members:
            atoms = coupler.members[(member.layer, member.role)]
            for ch in range(group.size):
                for index in member.layer_indices(ch):
                    where[int(atoms[index])] = (group.id, ch)

    nodes = {n.name: n for n in gm.graph.nodes}
    groups = _search_groups(gm, analysis, coupler, opts.ratios, ctx)
    search_index = {g.gid: i for i, g in enumerate(groups)}

    def counts(node: Any) -> tuple[_Counts, int]:
        value = coupler.values.get(node) if isinstance(node, fx.Node) else None
        if not isinstance(value, Tracked) or not value.atoms:
            return (1.0, {}), 1
        const = 0.0
        per: dict[tuple[int, int], float] = {}
        for atom in value.atoms:
            owner = where.get(int(atom))
            number = search_index.get(owner[0]) if owner is not None else None
            if number is None:
                const += 1
                continue
            for j, width in enumerate(groups[number].widths):
                if owner[1] < width:
                    per[(number, j)] = per.get((number, j), 0.0) + 1
        return (const, per), len(value.atoms)

    one: _Counts = (1.0, {})
    table: list[_Term] = []
    modules = dict(gm.named_modules())
    for row in report.rows:
        if row.macs == 0:
            continue
        node = nodes[row.name]
        macs = row.macs // batch
        out, out_total = counts(node)
        first = next((a for a in node.args if isinstance(a, fx.Node)), None)
        if row.kind in ("conv", "linear") and first is not None:
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            depthwise = (
                module is not None
                and getattr(module, "groups", 1) > 1
                and module.groups == getattr(module, "in_channels", 0)
            )
            has_bias = (
                getattr(module, "bias", None) is not None
                if module is not None
                else (len(node.args) > 2 and node.args[2] is not None)
            )
            bias = math.prod(row.shape or ()) // batch if has_bias and row.shape else 0
            if depthwise:
                table.append(_Term(macs, out, one, out_total, row.name))
                continue
            inp, in_total = counts(first)
            table.append(_Term(macs - bias, inp, out, in_total * out_total, row.name))
            if bias:
                table.append(_Term(bias, out, one, out_total, row.name))
        elif row.kind == "reduce" and first is not None:
            inp, in_total = counts(first)
            table.append(_Term(macs, inp, one, in_total, row.name))
        else:
            table.append(_Term(macs, out, one, out_total, row.name))

    stages = _stages(gm, opts, ctx) if opts.depth else []
    dense = report.total_macs / batch
    _check_dense(table, dense, groups)
    return groups, stages, table, dense


def _check_dense(table: list[_Term], dense: float, groups: list[_SearchGroup]) -> None:
    """The table at full width reproduces the dense MACs (an internal consistency check)."""

    def full(c: _Counts) -> float:
        return c[0] + sum(v for (g, j), v in c[1].items() if j == len(groups[g].widths) - 1)

    total = sum(t.macs * full(t.a) * full(t.b) / t.denom for t in table)
    if abs(total - dense) > 1e-6 * max(dense, 1.0):
        raise RewriterError(
            f"internal error: the TAS cost table gives {total:,.0f} MACs at full width, flops() "
            f"gives {dense:,.0f}; please report it with the model"
        )


def _search_groups(gm, analysis, coupler, ratios, ctx) -> list[_SearchGroup]:
    """The channel groups that get a width choice, with their producers (see the module docs)."""
    from rewriter.analysis.coupling import Tracked

    sliced = {p[0] for s in analysis.slices for p in s.positions if p is not None}
    modules = dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    out: list[_SearchGroup] = []
    for group in analysis.prunable():
        widths = candidate_widths(group.size, ratios)
        if len(widths) < 2:
            continue
        why = None
        identity = tuple(range(group.size))
        producers: list[_Producer] = []
        norms: set[str] = set()
        layers: list[str] = []
        if group.id in sliced:
            why = "a split or slice cuts it"
        elif group.nonzero_ops:
            why = f"{', '.join(group.nonzero_ops)} turns zeros into nonzeros"
        for m in group.members if why is None else ():
            info = analysis.layers[m.layer]
            if m.role == "in" or info.kind == "prelu":
                continue
            if m.indices != identity or m.span != 1:
                why = f"{m.layer} holds its channels out of order"
            elif m.role == "out":
                if info.kind not in ("conv", "linear") or len(analysis.groups_of(m.layer)) != 1:
                    why = f"{m.layer} produces channels of several groups"
                else:
                    layers.append(m.layer)
            else:
                bn = modules.get(m.layer)
                if not (
                    type(bn) in _SEARCHABLE_NORMS
                    and bn.affine
                    and bn.track_running_stats
                    and bn.momentum is not None
                    and len(calls.get(m.layer, ())) == 1
                ):
                    why = f"{m.layer} is not a BatchNorm with affine parameters and statistics"
                else:
                    norms.add(m.layer)
            if why is not None:
                break
        if why is None:
            paired: set[str] = set()
            for layer in layers:
                for node in calls.get(layer, ()):
                    value = coupler.values.get(node)
                    dim = value.dim if isinstance(value, Tracked) else 1
                    users = list(node.users)
                    norm = None
                    if (
                        len(users) == 1
                        and users[0].op == "call_module"
                        and str(users[0].target) in norms
                        and users[0].args[0] is node
                        and dim == 1
                    ):
                        norm = users[0]
                        paired.add(str(norm.target))
                    producers.append(_Producer(node, norm, dim))
            if paired != norms:
                why = f"{', '.join(sorted(norms - paired))} does not directly follow its producer"
        if why is not None:
            ctx.note(f"channel group {group.id} ({group.size} channels) not searched: {why}")
            continue
        label = layers[0] if len(layers) == 1 else f"{layers[0]} (+{len(layers) - 1})"
        out.append(_SearchGroup(group.id, label, widths, group.size, producers, layers))
    return out


def _stages(gm: fx.GraphModule, opts: Tas, ctx: RewriteContext) -> list[_Stage]:
    """Chains of residual blocks whose later blocks are identity blocks (see the module docs)."""
    blocks = residual_blocks(gm)
    top = [b for b in blocks if not any(b.add in other.nodes for other in blocks if other != b)]
    by_input: dict[str, list[ResidualBlock]] = {}
    for b in top:
        by_input.setdefault(b.input, []).append(b)
    nodes = {n.name: n for n in gm.graph.nodes}

    def follower(block: ResidualBlock) -> ResidualBlock | None:
        after = [b for b in by_input.get(block.output, ()) if b.kind == "identity"]
        if len(after) != 1:
            return None
        nxt = after[0]
        if (
            _shape_of(nodes[nxt.input]) != _shape_of(nodes[nxt.output])
            or _shape_of(nodes[nxt.output]) is None
        ):
            return None  # a pooled shortcut: the block changes the shape and cannot be dropped
        inside = set(nxt.nodes)
        if not all(u.name in inside for u in nodes[block.output].users):
            return None  # the block output is read outside the next block
        return nxt

    followed = {id(f) for b in top if (f := follower(b)) is not None}
    scopes = Counter(_label(b) for b in top)  # blocks written in one forward share a scope
    labels = {b.add: _label(b) if scopes[_label(b)] == 1 else f"{_label(b)}/{b.add}" for b in top}
    stages: list[_Stage] = []
    for start in top:
        if id(start) in followed:
            continue
        chain = [start]
        while (nxt := follower(chain[-1])) is not None:
            chain.append(nxt)
        if len(chain) < 2:
            continue
        first, last = labels[chain[0].add], labels[chain[-1].add]
        names = [labels[b.add] for b in chain]
        stages.append(_Stage(f"{first}..{last}", chain, depth_choices(len(chain)), names))
    return stages


def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _fill_cost(
    arch: TASArch, table: list[_Term], groups: list[_SearchGroup], stages: list[_Stage]
) -> None:
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + len(g.widths))
    d_offsets = [0]
    for s in stages:
        d_offsets.append(d_offsets[-1] + len(s.depths))
    # node -> (stage, position in stage) for blocks that may be dropped
    droppable: dict[str, tuple[int, int]] = {}
    for si, stage in enumerate(stages):
        for position, block in enumerate(stage.blocks[1:], start=1):
            for name in block.nodes:
                droppable[name] = (si, position)
    with torch.no_grad():
        for t, term in enumerate(table):
            arch.cost_coef[t] = float(term.macs)
            arch.cost_denom[t] = float(term.denom)
            arch.cost_a_const[t] = term.a[0]
            arch.cost_b_const[t] = term.b[0]
            for (g, j), v in term.a[1].items():
                arch.cost_a[t, offsets[g] + j] = v
            for (g, j), v in term.b[1].items():
                arch.cost_b[t, offsets[g] + j] = v
            if term.node in droppable:
                si, position = droppable[term.node]
                arch.cost_d_const[t] = 0.0
                for j, d in enumerate(stages[si].depths):
                    if d > position:
                        arch.cost_d[t, d_offsets[si] + j] = 1.0


# --------------------------------------------------------------------------------------------
# Training-time functions
# --------------------------------------------------------------------------------------------


def tas_arch(gm: nn.Module) -> TASArch:
    """The :class:`TASArch` module of a graph rewritten by ``tas``."""
    found = [m for m in gm.modules() if isinstance(m, TASArch)]
    if len(found) != 1:
        what = "no tas_arch module" if not found else f"{len(found)} tas_arch modules"
        raise RewriterError(
            f"expected one TAS architecture, found {what}; apply the tas pass first"
        )
    return found[0]


def arch_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The architecture logits (width, and depth when searched), for the architecture optimizer."""
    arch = tas_arch(gm)
    return [p for p in (arch.width_logits, arch.depth_logits) if p is not None]


def weight_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """Every other parameter of ``gm`` (weights, per-candidate norms), for the weight optimizer."""
    arch = {id(p) for p in arch_parameters(gm)}
    return [p for p in gm.parameters() if id(p) not in arch]


def temperature_schedule(
    epoch: int,
    epochs: int,
    tau_max: float = 10.0,
    tau_min: float = 0.1,
    mode: str = "cosine",
) -> float:
    """The Gumbel-softmax temperature of ``epoch`` (0-based) of ``epochs``.

    ``"cosine"`` (default, the authors' ``set_tau``): ``tau_min + (tau_max - tau_min) *
    (1 + cos(pi * t)) / 2`` with ``t = epoch / (epochs - 1)``; ``"linear"``: from ``tau_max``
    straight down to ``tau_min``. Both give ``tau_max`` at the first epoch and ``tau_min`` at
    the last.
    """
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"need 0 <= epoch < epochs, got epoch {epoch} of {epochs}")
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max, got {tau_min} and {tau_max}")
    t = epoch / max(epochs - 1, 1)
    if mode == "cosine":
        return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * t)) / 2
    if mode == "linear":
        return tau_max - (tau_max - tau_min) * t
    raise ValueError(f"mode must be 'cosine' or 'linear', got {mode!r}")


def set_temperature(gm: nn.Module, tau: float) -> None:
    """Set the Gumbel-softmax temperature in place (a buffer: no recompile)."""
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"temperature must be a finite number > 0, got {tau}")
    tas_arch(gm).temperature.fill_(float(tau))


def expected_flops(gm: nn.Module) -> Tensor:
    """Expected MACs per sample under the softmax of the logits (differentiable, float64)."""
    return tas_arch(gm).expected_flops()


def in_target_band(gm: nn.Module) -> bool:
    """Whether the argmax architecture's MACs lie in ``[flops_ratio - tolerance, flops_ratio]``
    of the dense MACs (where the cost loss is zero)."""
    arch = tas_arch(gm)
    ratio = float(arch.argmax_flops()) / arch.dense_macs
    return arch.flops_ratio - arch.tolerance <= ratio <= arch.flops_ratio


def cost_loss(gm: nn.Module) -> Tensor:
    """The weighted cost loss (what :func:`rewriter.aux_losses` adds for TAS)."""
    return tas_arch(gm).cost_loss()


@dataclass(frozen=True)
class Architecture:
    """The argmax architecture: per searched group its width, per stage its depth, its MACs."""

    widths: dict[str, tuple[int, int]]  # group label -> (chosen, channels)
    layer_widths: dict[str, tuple[int, int]]  # producer layer -> (chosen, channels), graph order
    depths: dict[str, tuple[int, int]]  # stage label -> (chosen, blocks)
    removed: tuple[str, ...]  # blocks the argmax depths drop
    macs: float  # per sample

    def kept(self, layer: str) -> bool:
        """Whether ``layer`` survives the argmax depths (it is not inside a removed block)."""
        return not any(layer == b or layer.startswith(b + ".") for b in self.removed)

    def table(self) -> str:
        lines = [f"{'layer':<28} {'width':>11}"]
        lines += [
            f"{k:<28} {c:>5} / {n:<5}" + ("" if self.kept(k) else " (block removed)")
            for k, (c, n) in self.layer_widths.items()
        ]
        lines += [f"{'stage ' + k:<28} {c:>5} / {n:<5}" for k, (c, n) in self.depths.items()]
        lines.append(f"MACs per sample: {self.macs:,.0f}")
        return "\n".join(lines)


def _choices(arch: TASArch) -> tuple[list[int], list[int]]:
    width, depth = arch.argmax_probs()
    return width.argmax(-1).tolist(), depth.argmax(-1).tolist()


def architecture(gm: nn.Module) -> Architecture:
    """The argmax widths and depths (ties: widest, deepest) and their exact MACs per sample."""
    arch = tas_arch(gm)
    w, d = _choices(arch)
    widths, layers = {}, {}
    for g, label in enumerate(arch.group_labels):
        chosen, full = arch.group_widths[g][w[g]], arch.group_widths[g][-1]
        widths[label] = (chosen, full)
        for layer in arch.group_layers[g] if arch.group_layers else ():
            layers[layer] = (chosen, full)
    depths = {
        label: (arch.stage_depths[s][d[s]], arch.stage_depths[s][-1])
        for s, label in enumerate(arch.stage_labels)
    }
    removed: list[str] = []
    for module in gm.modules():
        if isinstance(module, TASDepth):
            removed.extend(module.blocks[module.depths[d[module.stage]] :])
    order = {name: i for i, name in enumerate(dict(gm.named_modules()))}
    layers = dict(sorted(layers.items(), key=lambda item: order.get(item[0], len(order))))
    return Architecture(widths, layers, depths, tuple(removed), float(arch.argmax_flops()))


def derive(gm: fx.GraphModule, example_inputs: Sequence[Tensor] | Tensor) -> fx.GraphModule:
    """The argmax architecture as a physically slim GraphModule (``gm`` is not changed).

    Every searched BatchNorm becomes a plain BatchNorm with its argmax candidate's parameters
    and statistics, the width mixes and ``tas_arch`` go, every stage keeps its first ``d``
    blocks (the later blocks are removed from the graph), and :func:`rewriter.slim` keeps the
    first ``c`` channels of every searched group. Its MACs (``rewriter.analysis.flops``) are
    :func:`architecture`'s ``macs`` times the batch.
    """
    from rewriter.slim import slim

    from .skip import _erase_dead

    arch = tas_arch(gm)
    w, d = _choices(arch)
    work = copy.deepcopy(gm)
    graph = work.graph
    modules = dict(work.named_modules())
    mixes: list[fx.Node] = []
    archs: list[fx.Node] = []
    for node in list(graph.nodes):
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, TASNorm):
            parent, _, attr = str(node.target).rpartition(".")
            owner = work.get_submodule(parent) if parent else work
            setattr(owner, attr, module.to_norm(w[module.group]))
            node.args = (node.args[0],)
        elif isinstance(module, TASWidth):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif isinstance(module, TASDepth):
            node.replace_all_uses_with(node.args[d[module.stage]])
            mixes.append(node)  # erased below, with the blocks only it read
        elif isinstance(module, TASArch):
            archs.append(node)
    _erase_dead(graph, mixes)
    for node in archs:
        _erase_dead(graph, [*node.users, node])
    graph.lint()
    work.recompile()
    work.delete_all_unused_submodules()

    present = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    masks: dict[str, Tensor] = {}
    for g, layers in enumerate(arch.group_layers):
        width = arch.group_widths[g][w[g]]
        for layer in layers:
            if layer in present:
                size = arch.group_widths[g][-1]
                mask = torch.zeros(size, dtype=torch.bool)
                mask[:width] = True
                masks[layer] = mask
    return slim(work, example_inputs, masks)


def kd_student(
    derived: fx.GraphModule,
    teacher: nn.Module,
    example_inputs: Sequence[Tensor] | Tensor,
    *,
    from_scratch: bool = True,
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> fx.GraphModule:
    """TAS's retraining setup: ``derived`` with Hinton KD from ``teacher`` (the unpruned network).

    Returns ``rewrite(derived, [Distill.with_teacher(teacher, method="hinton", alpha=0.9,
    temperature=4)])`` on a copy whose parameters are re-initialised first (``from_scratch``:
    every layer's ``reset_parameters()``, BatchNorm statistics included), as TAS trains the
    searched network from scratch. Train it with
    ``F.cross_entropy(out, y) + rewriter.aux_losses(gm, targets=y)`` and keep
    :func:`rewriter.passes.distill.strip` of it.
    """
    from rewriter.api import rewrite

    from .distill import Distill

    student = copy.deepcopy(derived)
    if from_scratch:
        for module in student.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not student:
                reset()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    kd = Distill.with_teacher(teacher, method="hinton", alpha=alpha, temperature=temperature)
    return rewrite(student, [kd], example_inputs)
