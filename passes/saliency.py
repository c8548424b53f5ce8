"""Pass ``saliency_gates``: per-sample dynamic channel gates (ManiDP, CVPR 2021; FBS, ICLR 2019).

``act(bn(conv(x))) => gate(act(bn(conv(x))), x)``, the gate computing a per-sample,
per-channel saliency ``pi`` from the conv's *input* ``x`` and multiplying the channels
by ``pi * [pi >= threshold]``. The math, defaults and deviations from the authors' code
are written up in ``docs/methods/manidp_fbs.md``.

Placement (ManiDP on any residual network):

* one gate per targeted conv, after the conv's BatchNorm and, when one follows, its
  activation (``conv -> bn -> relu -> gate``; ``conv -> bn -> gate -> + shortcut`` in a
  residual branch); a conv without a norm is gated after itself (or its activation).
  The chain is followed only while each node has a single user;
* not gated: the **stem** (every conv upstream of the first residual block's input, as
  found by :func:`rewriter.analysis.blocks.residual_blocks`, plus every conv that no
  other conv or linear layer precedes, i.e. the first conv on each path from the
  input), the **shortcut / downsample** path of every residual block, and the
  **classifier** (a conv from which no other conv or linear layer is reachable; linear
  layers are never gated). On ``digits_cnn`` the two-conv ``stem`` is left alone, on
  MobileNetV2 every conv before the first inverted residual with an add;
* **transformer MLPs** (token inputs ``(N, ..., C)`` with channels last, 3 or more
  dims): ``down(act(up(x))) => down(gate(act(up(x)), x))``, and for SwiGLU
  ``down(act(gate(x)) * up(x)) => down(g(act(gate(x)) * up(x), x))``: one gate per MLP,
  on its hidden channels, between the activation (or the product) and the down
  projection, its saliency computed from the MLP's input ``x`` (the normed residual
  stream). An MLP is recognised structurally (:func:`mlp_input`): the down projection's
  input is made from linear layers that all read the same ``x`` by elementwise ops only
  (activations, GPT-2's tanh-GELU written out, the SwiGLU product, dropout). The gate
  is named after the down projection (``layers.0.mlp.down_proj`` ->
  ``layers_0_mlp_down_proj_gate``), which every form of MLP has exactly once. Nothing
  else of a transformer is gated: attention projections are not (a head is a unit of
  several layers' channels, and the paper's per-channel gate has no counterpart for
  it), nor the patch embedding (the stem). A two-dimensional MLP (a classifier head on
  pooled features) is not gated, as linear layers are not on CNNs.
  **Deviation** (token dimension): ``pi`` is computed per sample from ``x`` averaged
  over all tokens (the counterpart of the global average pool over the image), padded
  positions included (the attention mask is not read), and applied to every token of
  that sample; the paper gates conv channels per image and has no token dimension.
* ``include`` / ``exclude`` are globs over the conv's (an MLP's: its down projection's)
  qualified name, ``classes`` are class names among ``Conv1d``, ``Conv2d``, ``Conv3d``
  and ``Linear`` (the MLP gates; default: all four; transposed convs are never gated).

Gate architectures (each gate is a :class:`SaliencyGate`, named ``<conv>_gate`` with
dots as underscores: ``layer1.0.conv1`` -> ``layer1_0_conv1_gate``):

* ``style="manidp"`` (default, :class:`ManiDPGate`): global average pool of ``x`` ->
  ``fc1`` (C_in -> C_out/r', no bias) -> ReLU -> ``fc2`` (C_out/r' -> C_out, bias
  initialised to 1) -> ReLU -> clamp(max 1000), with the authors' bottleneck rule
  ``r' = reduction`` (2) when ``C_out >= 80`` and ``r' = reduction // 2`` below (so
  ``reduction=2`` means no reduction for narrow layers and ``reduction=4`` gives 2;
  ``reduction=1`` keeps 1 where the authors' code would divide by zero).
* ``style="fbs"`` (:class:`FBSGate`): one FC (C_in -> C_out, bias 1) on the
  per-channel mean of ``|x|``, ReLU, then winner-take-all per sample: the ``k =
  ceil(keep * C_out)`` largest saliencies are kept, the rest zeroed.
* ``init="identity"`` (default): the last FC's weight is 0 and its bias 1, so every
  ``pi`` is exactly 1 at insertion in training *and* eval mode whatever the input
  scale (``fc1`` gets the authors' ``kaiming_normal_``). **Deviation** from the
  authors, who draw both FC weights with ``kaiming_normal_`` (``init="paper"``): their
  ``pi`` then tracks the scale of the pooled input, which in a deep net in eval mode
  reaches the 1000 clamp and blows the outputs up (a ResNet-50's logits went from
  about 50 to 3e26). With the identity init the gates start transparent and learn to
  depart from 1; the first backward step moves only ``fc2`` (``fc1``'s gradient is
  ``fc2.weight = 0`` times something).
  FBS lets the saliency replace BatchNorm's gamma (``relu(pi * (x_hat + beta))``); we
  keep the BN untouched and multiply its output (after the ReLU, which is the same as
  before it because ``pi >= 0`` and ReLU is positively homogeneous), so the layer
  computes ``relu(pi * gamma * x_hat + pi * beta)``: FBS's formula with BN's gamma as an
  extra learnable per-channel factor (absorbable into the FC for gamma > 0), which
  keeps a trained model's BN intact. FBS gates are not thresholded
  (:func:`update_thresholds` leaves them alone) and get the plain L1 penalty only.

Contract: with ``init="identity"`` a ManiDP gate (and an FBS gate with ``keep=1``) is
exactly the identity at insertion, so ``preserves_outputs`` holds and the pass manager
checks it; with ``init="paper"``, or an FBS gate with ``keep < 1`` (which prunes to its
top-k from the start), it does not. Running the pass twice is a no-op (a conv whose chain already ends in a gate is
skipped). Everything is tensor arithmetic on buffers (no Python branching on values,
no hooks): the model compiles with ``torch.compile(fullgraph=True)`` in training and
eval modes.

Buffers of every gate: ``threshold`` (scalar, 0 at insertion: every channel passes),
``keep_rate`` (the scheduled keep rate of the current threshold), ``saliency_sum`` /
``saliency_count`` (per-channel sums of ``pi`` over the training forwards since the
last threshold update), ``ce_sum`` / ``ce_count`` (per-sample cross-entropies recorded
by the losses in training) and ``ce_reference`` (``C`` of the complexity weight: 0, meaning "weight 1 for every
sample", until :func:`init_ce_reference` or the first :func:`end_epoch` sets it). The CE buffers are replicated in every gate so that
each gate's ``aux_loss`` is self-contained; the library always writes them together.
Every forward also keeps, as plain attributes (not state), the last batch's
``last_saliency`` (``pi``, with its autograd graph in training), ``last_mask``
(``pi * [pi >= threshold]``) and ``last_pooled`` (the pooled, ungated layer output),
which the losses and :func:`dynamic_flops` read. They are dropped when the module is
copied or pickled.

Training-time functions (all take the rewritten GraphModule):

* :func:`aux_losses` ``(gm, per_sample_ce=...)``: ``lambda_lasso * L_sparse +
  lambda_graph * L_sim`` of the last forward (also :meth:`SaliencyGate.aux_loss`, the
  per-gate share, for a library-wide sum); in training mode it records the
  per-sample CE for the next epoch's complexity weight;
* :func:`init_ce_reference` ``(gm, batches)``: before training, ``C`` for the first
  epoch from the (pretrained) network's mean cross-entropy on the training set, as the
  authors do;
* :func:`end_epoch` ``(gm, epoch, epochs, target_keep)``: :func:`update_thresholds`
  plus the CE reference ``C = 0.5 x`` the epoch's mean training CE. As in the
  authors' code the thresholds are first set at the end of epoch 1 (``start_epoch=1``;
  the statistics of epoch 0 are discarded), for the keep rate of the next epoch;
* :func:`update_thresholds`, :func:`keep_rate`, :func:`gates`,
  :func:`active_channels`, :func:`dynamic_flops`; the tensor-level losses
  :func:`sparsity_loss`, :func:`similarity_loss`, :func:`complexity_weights`.

Loss choices: ``L_sparse`` is the *batch mean* of the weighted per-sample terms (ManiDP:
mean over channels, as the authors' code; FBS: ``fbs_l1="sum"`` over channels, the
paper's L1 norm, by default, ``"mean"`` optional); the complexity weight is 1 for every
sample while no CE reference exists (call :func:`init_ce_reference` before training to
follow the authors; without it the first epoch is a plain lasso), and the per-sample CE is detached
(it weights the loss, it is not optimised through it); ``L_sim`` is summed over gated
layers, with ``T`` from the pooled *ungated* layer output at the gate (the conv's
output after its BN / activation) and gradients flowing into both ``T`` and ``R``
(the formula as written; nothing is detached).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rewriter.analysis.blocks import ACTIVATION_MODULES, ACTIVATION_NAMES, residual_blocks
from rewriter.analysis.flops import FlopsReport, flops
from rewriter.analysis.view import graph
from rewriter.context import RewriteContext
from rewriter.errors import RewriterError
from rewriter.manager import evaluate
from rewriter.modules import RewriterModule
from rewriter.patterns import Match, P, Rule
from rewriter.registry import (
    Pass,
    anything,
    at_least,
    choices,
    nonnegative,
    option,
    register,
    unit_interval,
)
from rewriter.select import selected

__all__ = [
    "DynamicFlops",
    "EpochUpdate",
    "FBSGate",
    "ManiDPGate",
    "SaliencyGate",
    "SaliencyGates",
    "active_channels",
    "aux_losses",
    "complexity_weights",
    "dynamic_flops",
    "end_epoch",
    "gates",
    "init_ce_reference",
    "keep_rate",
    "similarity_loss",
    "sparsity_loss",
    "update_thresholds",
]

REDUCTION_MIN_CHANNELS = 80
"""ManiDP's rule: the bottleneck is ``reduction`` when ``C_out >= 80``, else ``reduction // 2``."""

SALIENCY_MAX = 1000.0
"""ManiDP clamps the saliency at this value."""

INITS = ("identity", "paper")
"""Gate initialisations: exact identity at insertion (default) or the authors' kaiming_normal_."""

CE_REFERENCE_FACTOR = 0.5
"""``C = CE_REFERENCE_FACTOR x`` the previous epoch's mean training cross-entropy."""

_CONV_CLASSES: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}
_SELECTABLE: dict[str, type[nn.Module]] = {**_CONV_CLASSES, "Linear": nn.Linear}
"""Class names ``classes`` accepts: the convs, and ``Linear`` for the MLP gates (down projection)."""
_POINTWISE = {
    "mul", "add", "sub", "div", "truediv", "neg", "pow", "tanh", "sigmoid", "erf", "exp",
    "clamp", "softplus", "dropout",
} | ACTIVATION_NAMES  # fmt: skip
"""Elementwise ops that may sit between an MLP's input projections and its down projection."""
_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
_NORM_NAMES = {"batch_norm", "group_norm", "instance_norm"}


# --------------------------------------------------------------------------------------------
# Gate modules
# --------------------------------------------------------------------------------------------


class SaliencyGate(RewriterModule):
    """Base of the gates: thresholding, statistics, application and the per-gate losses.

    ``forward(feature, source)`` returns ``feature * mask`` with ``mask = pi * [pi >=
    threshold]`` of shape (N, C_out) broadcast over the spatial dims, where ``pi`` is
    :meth:`saliency` of ``source`` (the conv's input). With ``channels_last`` (the gate of a
    token MLP) the channels are the last dim of ``feature`` and ``source`` (``(N, S, C)``),
    pooling is over the tokens and the mask is broadcast over them. Subclasses define
    ``saliency``, ``regulariser`` (what the sparsity loss penalises) and ``rewriter_macs``.
    """

    style: ClassVar[str] = ""
    adaptive: ClassVar[bool] = False  # complexity-adaptive sparsity weight and L_sim
    AUX_LOSS_KEYS: ClassVar[frozenset[str]] = frozenset({"per_sample_ce"})

    threshold: Tensor
    keep_rate: Tensor
    saliency_sum: Tensor
    saliency_count: Tensor
    ce_sum: Tensor
    ce_count: Tensor
    ce_reference: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        layer: str,
        target_keep: float,
        lambda_lasso: float,
        lambda_graph: float,
        gamma: float,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.layer = layer
        self.target_keep = target_keep
        self.lambda_lasso = lambda_lasso
        self.lambda_graph = lambda_graph
        self.gamma = gamma
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("keep_rate", torch.ones(()))
        self.register_buffer("saliency_sum", torch.zeros(out_channels))
        self.register_buffer("saliency_count", torch.zeros(()))
        self.register_buffer("ce_sum", torch.zeros(()))
        self.register_buffer("ce_count", torch.zeros(()))
        self.register_buffer("ce_reference", torch.zeros(()))
        self.last_saliency: Tensor | None = None
        self.last_mask: Tensor | None = None
        self.last_pooled: Tensor | None = None

    # -- computation -----------------------------------------------------------------------
    def pool(self, x: Tensor) -> Tensor:
        """(N, C) mean over every dim but the sample and channel dims (spatial or tokens)."""
        dims = tuple(range(1, x.dim() - 1)) if self.channels_last else tuple(range(2, x.dim()))
        return x.mean(dim=dims) if dims else x

    def broadcast(self, mask: Tensor, feature: Tensor) -> Tensor:
        """``mask`` (N, C) shaped to multiply ``feature`` (channels at dim 1, or last)."""
        ones = [1] * (feature.dim() - 2)
        if self.channels_last:
            return mask.reshape(mask.shape[0], *ones, mask.shape[1])
        return mask.reshape(*mask.shape, *ones)

    def saliency(self, source: Tensor) -> Tensor:
        """``pi`` of shape (N, C_out), ``>= 0``, from the conv's input ``source``."""
        raise NotImplementedError

    def regulariser(self) -> Tensor:
        """The (N, C_out) tensor the sparsity loss penalises (``pi`` by default)."""
        return self._last("last_saliency")

    def gate(self, saliency: Tensor) -> Tensor:
        """The applied mask: the saliency where it reaches the threshold, else 0."""
        return saliency * (saliency >= self.threshold).to(saliency.dtype)

    def forward(self, feature: Tensor, source: Tensor) -> Tensor:
        saliency = self.saliency(source)
        mask = self.gate(saliency)
        if self.training:
            with torch.no_grad():
                self.saliency_sum.add_(saliency.detach().sum(0).to(self.saliency_sum.dtype))
                self.saliency_count.add_(saliency.shape[0])
        self.last_saliency = saliency
        self.last_mask = mask
        self.last_pooled = self.pool(feature)
        return feature * self.broadcast(mask, feature)

    # -- losses (the library-wide protocol) ------------------------------------------------
    def aux_loss(self, **context: Any) -> Tensor:
        """This gate's share of the regulariser: ``lambda_lasso * L_sparse + lambda_graph * L_sim``.

        ``context`` may hold ``per_sample_ce`` (an (N,) tensor of the batch's per-sample
        cross-entropies; other keys are ignored). In training mode the CE is recorded
        for the next epoch's complexity weight. Summed over all gates this equals
        :func:`aux_losses`.
        """
        return self.loss(context.get("per_sample_ce"))

    def loss(
        self,
        per_sample_ce: Tensor | None = None,
        *,
        lambda_lasso: float | None = None,
        lambda_graph: float | None = None,
        gamma: float | None = None,
    ) -> Tensor:
        """:meth:`aux_loss` with explicit coefficients (``None``: the pass's options)."""
        lasso = self.lambda_lasso if lambda_lasso is None else lambda_lasso
        graph_weight = self.lambda_graph if lambda_graph is None else lambda_graph
        gamma = self.gamma if gamma is None else gamma
        if per_sample_ce is not None and self.training:
            self.record_ce(per_sample_ce)
        penalised = self.regulariser()
        if self.adaptive:
            total = lasso * sparsity_loss(
                [penalised], per_sample_ce, ce_reference=self.ce_reference, gamma=gamma
            )
            pooled = self._last("last_pooled")
            return total + graph_weight * similarity_loss([pooled], [self._last("last_saliency")])
        return lasso * sparsity_loss([penalised], channels=getattr(self, "l1", "mean"))

    def record_ce(self, per_sample_ce: Tensor) -> None:
        """Add a batch's per-sample cross-entropies to the epoch's CE statistics."""
        ce = per_sample_ce.detach().flatten()
        with torch.no_grad():
            self.ce_sum.add_(ce.sum().to(self.ce_sum))
            self.ce_count.add_(ce.numel())

    def _last(self, attr: str) -> Tensor:
        value = getattr(self, attr)
        if value is None:
            raise RewriterError(
                f"gate of {self.layer!r} has not run a forward yet; call the model on a batch "
                "before asking for its losses or FLOPs"
            )
        return value

    # -- housekeeping ----------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # last_* carry autograd graphs: neither copied nor pickled
        for attr in ("last_saliency", "last_mask", "last_pooled"):
            state[attr] = None
        return state

    def extra_repr(self) -> str:
        layout = ", channels_last=True" if self.channels_last else ""
        return (
            f"layer={self.layer!r}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, target_keep={self.target_keep}{layout}"
        )

    @staticmethod
    def _apply_macs(feature_shape: Sequence[int]) -> int:
        return math.prod(feature_shape)


def _check_init(init: str) -> None:
    if init not in INITS:
        raise RewriterError(f"gate init must be one of {list(INITS)}, got {init!r}")


def _init_last_fc(fc: nn.Linear, init: str) -> None:
    """Bias 1; weight 0 (``identity``: ``pi`` is exactly 1) or ``kaiming_normal_`` (``paper``)."""
    with torch.no_grad():
        if init == "identity":
            fc.weight.zero_()
        else:
            nn.init.kaiming_normal_(fc.weight)
        fc.bias.fill_(1.0)


def bottleneck(out_channels: int, reduction: int) -> int:
    """Width of ManiDP's hidden FC layer by the authors' rule (see the module docs)."""
    ratio = reduction if out_channels >= REDUCTION_MIN_CHANNELS else max(1, reduction // 2)
    return max(1, out_channels // ratio)


class ManiDPGate(SaliencyGate):
    """ManiDP: GAP -> fc1 (no bias) -> ReLU -> fc2 (bias 1) -> ReLU -> clamp(max 1000)."""

    style = "manidp"
    adaptive = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        reduction: int,
        init: str = "identity",
        **kw: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, **kw)
        _check_init(init)
        self.reduction = reduction  # kept for the constructor config (rewriter.modules)
        self.hidden = bottleneck(out_channels, reduction)
        self.fc1 = nn.Linear(in_channels, self.hidden, bias=False)
        self.fc2 = nn.Linear(self.hidden, out_channels)
        with torch.no_grad():
            nn.init.kaiming_normal_(self.fc1.weight)
        _init_last_fc(self.fc2, init)

    def saliency(self, source: Tensor) -> Tensor:
        pooled = self.pool(source)
        return F.relu(self.fc2(F.relu(self.fc1(pooled)))).clamp(max=SALIENCY_MAX)

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """Pooling, the two FCs and their activations, thresholding, applying the mask."""
        feature, source = input_shapes[0], input_shapes[1]
        n = feature[0]
        fcs = n * (self.in_channels * self.hidden + self.hidden * self.out_channels)
        pointwise = n * (self.hidden + 5 * self.out_channels)  # relu, bias, relu, clamp, >=, *
        return math.prod(source) + fcs + pointwise + self._apply_macs(feature)


class FBSGate(SaliencyGate):
    """FBS: FC on per-channel mean |x| -> ReLU -> top-k winner-take-all per sample.

    ``l1="sum"`` (default, the paper's L1 norm) penalises the sum of the saliencies over
    the channels, ``"mean"`` their mean (``C_out`` times weaker).
    """

    style = "fbs"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        init: str = "identity",
        l1: str = "sum",
        **kw: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, **kw)
        _check_init(init)
        if l1 not in ("sum", "mean"):
            raise RewriterError(f"FBS l1 must be 'sum' or 'mean', got {l1!r}")
        self.l1 = l1
        self.k = min(out_channels, max(1, _ceil(self.target_keep * out_channels)))
        self.fc = nn.Linear(in_channels, out_channels)
        _init_last_fc(self.fc, init)
        self.last_scores: Tensor | None = None

    def saliency(self, source: Tensor) -> Tensor:
        scores = F.relu(self.fc(self.pool(source.abs())))
        self.last_scores = scores
        winners = torch.zeros_like(scores).scatter(1, scores.topk(self.k, dim=1).indices, 1.0)
        return scores * winners

    def regulariser(self) -> Tensor:
        """FBS's L1 penalty is on the predicted saliencies before the winner-take-all."""
        return self._last("last_scores")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["last_scores"] = None
        return state

    def rewriter_macs(self, input_shapes: list[Any], output_shape: Any) -> int:
        """abs + pooling, the FC, ReLU, top-k selection, thresholding, applying the mask."""
        feature, source = input_shapes[0], input_shapes[1]
        n = feature[0]
        fc = n * (self.in_channels * self.out_channels + self.out_channels)
        pointwise = n * 5 * self.out_channels  # relu, top-k compare, winner product, >=, *
        return 2 * math.prod(source) + fc + pointwise + self._apply_macs(feature)


GATES: dict[str, type[SaliencyGate]] = {"manidp": ManiDPGate, "fbs": FBSGate}


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class SaliencyGates(Pass):
    """act(bn(conv(x))) => gate(act(bn(conv(x))), x): per-sample channel gates (ManiDP/FBS).

    Adds one gate module ``<conv>_gate`` per targeted conv (see the module docs).
    """

    name = "saliency_gates"

    style: Literal["manidp", "fbs"] = option(
        "manidp",
        "'manidp': two-FC gate with thresholds; 'fbs': one FC with per-sample top-k",
        choices("manidp", "fbs"),
    )
    init: Literal["identity", "paper"] = option(
        "identity",
        "'identity': last FC weight 0, bias 1, pi == 1 at insertion (outputs preserved); "
        "'paper': the authors' kaiming_normal_ on the FC weights",
        choices("identity", "paper"),
    )
    reduction: int = option(
        2,
        "ManiDP gate bottleneck C_out/r; r // 2 when C_out < 80 (the authors' rule)",
        at_least(1),
    )
    fbs_l1: Literal["sum", "mean"] = option(
        "sum",
        "FBS sparsity penalty over channels: 'sum' (the paper's L1 norm) or 'mean'",
        choices("sum", "mean"),
    )
    keep: float = option(
        0.6,
        "target keep rate (ManiDP: end of the threshold schedule; FBS: top-k fraction d)",
        unit_interval(low_open=True),
    )
    lambda_lasso: float = option(0.1, "weight of the sparsity loss in aux_losses", nonnegative())
    lambda_graph: float = option(
        0.1, "weight of the manifold similarity loss in aux_losses", nonnegative()
    )
    gamma: float = option(1.0, "exponent of the complexity-adaptive sparsity weight", nonnegative())
    include: tuple[str, ...] = option(
        (), "globs of qualified conv names to gate (empty: all)", anything()
    )
    exclude: tuple[str, ...] = option(
        (), "globs of qualified conv names to leave ungated", anything()
    )
    classes: tuple[str, ...] = option(
        (),
        "class names to gate, e.g. ['Conv2d'], or ['Linear'] for token MLPs only "
        "(empty: Conv1d/2d/3d and token MLPs)",
        choices(*_SELECTABLE),
    )

    def __post_init__(self) -> None:
        if self.style not in GATES:
            raise ValueError(f"style must be one of {sorted(GATES)}, got {self.style!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.fbs_l1 not in ("sum", "mean"):
            raise ValueError(f"fbs_l1 must be 'sum' or 'mean', got {self.fbs_l1!r}")
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {self.keep}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        unknown = sorted(set(self.classes) - set(_SELECTABLE))
        if unknown:
            raise ValueError(f"classes {unknown} cannot be gated; supported: {sorted(_SELECTABLE)}")

    @property
    def preserves_outputs(self) -> bool:  # type: ignore[override]
        """Identity init: ManiDP gates are exactly 1; FBS only when its top-k keeps all."""
        return self.init == "identity" and (self.style == "manidp" or self.keep == 1.0)

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        targets = self.targets(gm, ctx)
        mlps = self.mlp_targets(gm, ctx)

        def gate_conv(ctx: RewriteContext, m: Match) -> fx.Node | None:
            # conv(x) .. anchor -> gate(anchor, x); the conv node itself is unchanged
            return self.insert_gate(ctx, m["conv"]) if m["conv"].name in targets else None

        def gate_mlp(ctx: RewriteContext, m: Match) -> fx.Node | None:
            # down(act(up(x))) -> down(gate(act(up(x)), x)); the same for act(gate(x)) * up(x)
            down = m["down"]
            return self.insert_mlp_gate(ctx, down, mlps[down.name]) if down.name in mlps else None

        ctx.apply_rules(
            [
                Rule(P.module(*_CONV_CLASSES.values(), name="conv"), gate_conv, "gate_conv"),
                Rule(P.module(nn.Linear, name="down"), gate_mlp, "gate_mlp"),
            ]
        )

    def mlp_targets(self, gm: fx.GraphModule, ctx: RewriteContext) -> dict[str, fx.Node]:
        """Down projections of the token MLPs to gate, by node name, with each MLP's input."""
        modules = dict(gm.named_modules())
        out: dict[str, fx.Node] = {}
        unknown: list[str] = []
        for node in gm.graph.nodes:
            if node.op != "call_module" or not isinstance(modules[str(node.target)], nn.Linear):
                continue
            name = str(node.target)
            if not selected(
                name, modules[name], include=self.include, exclude=self.exclude,
                classes=self.classes or tuple(_SELECTABLE),
            ):  # fmt: skip
                continue
            found = mlp_input(modules, node)
            if found is None:
                continue
            meta = found.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                unknown.append(name)
            elif len(meta.shape) >= 3:  # tokens (N, ..., C): a 2-D MLP is a classifier head
                out[node.name] = found
        if unknown:
            ctx.note(
                f"not gated (input shape unknown; give example inputs): {', '.join(unknown)}"
            )
        return out

    def insert_mlp_gate(self, ctx: RewriteContext, down: fx.Node, source: fx.Node) -> fx.Node | None:
        hidden = down.args[0]
        if not isinstance(hidden, fx.Node) or (
            hidden.op == "call_module" and isinstance(ctx.module(hidden), SaliencyGate)
        ):
            return None  # already gated
        module = ctx.module(down)
        ref = module.weight
        gate = self.make_gate(
            source.meta["tensor_meta"].shape[-1], module.in_features, str(down.target), True
        ).to(device=ref.device, dtype=ref.dtype)
        name = ctx.add_module(down, "gate", gate)
        with ctx.graph.inserting_before(down):
            node = ctx.call_module(name, (hidden, source))
        stack = _containers(down)
        if stack is not None:  # the gate belongs to the MLP its down projection is in
            node.meta["nn_module_stack"] = {**stack, name: (name, type(gate))}
        down.replace_input_with(hidden, node)
        return down

    def make_gate(
        self, in_channels: int, out_channels: int, layer: str, channels_last: bool = False
    ) -> SaliencyGate:
        """A fresh gate of this pass's style and options."""
        return GATES[self.style](
            in_channels,
            out_channels,
            layer=layer,
            target_keep=self.keep,
            lambda_lasso=self.lambda_lasso,
            lambda_graph=self.lambda_graph,
            gamma=self.gamma,
            init=self.init,
            channels_last=channels_last,
            **({"reduction": self.reduction} if self.style == "manidp" else {"l1": self.fbs_l1}),
        )

    def targets(self, gm: fx.GraphModule, ctx: RewriteContext) -> set[str]:
        """Names of the conv nodes to gate; the excluded ones are named in the report."""
        modules = dict(gm.named_modules())
        convs = [n for n in gm.graph.nodes if _is_conv(modules, n)]
        stem, shortcut, classifier = _excluded(gm, modules)
        targets: set[str] = set()
        skipped: dict[str, list[str]] = {"stem": [], "shortcut": [], "classifier": []}
        for node in convs:
            name = str(node.target)
            if not selected(
                name,
                modules[name],
                include=self.include,
                exclude=self.exclude,
                classes=self.classes or tuple(_CONV_CLASSES),
            ):
                continue
            reason = (
                "stem" if node.name in stem
                else "shortcut" if node.name in shortcut
                else "classifier" if node.name in classifier
                else None
            )  # fmt: skip
            if reason is None:
                targets.add(node.name)
            else:
                skipped[reason].append(name)
        for reason, names in skipped.items():
            if names:
                ctx.note(f"not gated ({reason}): {', '.join(names)}")
        return targets

    def insert_gate(self, ctx: RewriteContext, conv: fx.Node) -> fx.Node | None:
        anchor = _anchor(ctx.gm, conv)
        after = _only_user(anchor)
        if (
            after is not None
            and after.op == "call_module"
            and isinstance(ctx.module(after), SaliencyGate)
        ):
            return None  # already gated
        if not conv.args or not isinstance(conv.args[0], fx.Node):
            ctx.note(f"{conv.target}: input not passed positionally; not gated")
            return None
        module = ctx.module(conv)
        ref = module.weight
        gate = self.make_gate(module.in_channels, module.out_channels, str(conv.target)).to(
            device=ref.device, dtype=ref.dtype
        )
        name = ctx.add_module(conv, "gate", gate)
        with ctx.graph.inserting_after(anchor):
            node = ctx.call_module(name, (anchor, conv.args[0]))
        stack = _containers(anchor)
        if stack is not None:  # the gate belongs to the block its anchor is in
            node.meta["nn_module_stack"] = {**stack, name: (name, type(gate))}
        anchor.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        return conv


def _containers(node: fx.Node) -> dict[str, Any] | None:
    """``node``'s ``nn_module_stack`` without the entry of the module it calls."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    return {
        key: value
        for key, value in stack.items()
        if not (node.op == "call_module" and _path(value) == node.target)
    }


def _path(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)


def _ceil(value: float) -> int:
    """``ceil`` that ignores float noise (``0.6 * 10`` is 6, not 7)."""
    return math.ceil(value - 1e-9)


def _is_conv(modules: Mapping[str, nn.Module], node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = modules[str(node.target)]
    return isinstance(module, tuple(_CONV_CLASSES.values())) and not module.transposed


def _is_layer(modules: Mapping[str, nn.Module], node: fx.Node) -> bool:
    """A conv or linear layer (module or functional): what stem and classifier count."""
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], (nn.modules.conv._ConvNd, nn.Linear))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name in {"conv1d", "conv2d", "conv3d", "linear", "matmul", "mm", "bmm"}
    return False


def _excluded(
    gm: fx.GraphModule, modules: Mapping[str, nn.Module]
) -> tuple[set[str], set[str], set[str]]:
    """Conv node names of the stem, the shortcuts and the classifier (see the module docs)."""
    view = graph(gm)
    blocks = residual_blocks(gm)
    layers = {n.name for n in gm.graph.nodes if _is_layer(modules, n)}
    convs = {n.name for n in gm.graph.nodes if _is_conv(modules, n)}
    stem = {c for c in convs if not (nx.ancestors(view, c) & layers)}
    if blocks:
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        first = min(blocks, key=lambda b: order[b.input]).input
        stem |= (nx.ancestors(view, first) | {first}) & convs
    shortcut = {n for b in blocks for n in b.shortcut} & convs
    classifier = {c for c in convs if not (nx.descendants(view, c) & layers)}
    return stem, shortcut, classifier


def _op_name(gm_modules: Mapping[str, nn.Module], node: fx.Node) -> str | None:
    """``node``'s elementwise op name (``mul``, ``gelu``...), or None when it is not one."""
    if node.op == "call_module":
        module = gm_modules[str(node.target)]
        if isinstance(module, ACTIVATION_MODULES):
            return "activation"
        return "dropout" if isinstance(module, (nn.Dropout, nn.Identity)) else None
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.split(".")[0].rstrip("_")  # aten.pow.Tensor_Scalar -> pow
    return None


def mlp_input(modules: Mapping[str, nn.Module], down: fx.Node) -> fx.Node | None:
    """The input ``x`` of the MLP whose down projection is ``down``, else None.

    An MLP here: ``down``'s input is computed from the outputs of one or more linear
    layers (``up``; SwiGLU's ``gate`` and ``up``) by elementwise ops only (activations,
    GPT-2's tanh-GELU formula, SwiGLU's product, dropout), every such linear layer reads
    the same ``x`` and has ``down.in_features`` outputs.
    """
    width = modules[str(down.target)].in_features
    start = down.args[0] if down.args else None
    if not isinstance(start, fx.Node):
        return None
    producers: list[fx.Node] = []
    pending, seen = [start], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Linear):
            producers.append(node)
            continue
        if _op_name(modules, node) not in _POINTWISE | {"activation"}:
            return None
        pending.extend(a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node))
    sources = {p.args[0] if p.args else None for p in producers}
    if not producers or len(sources) != 1:
        return None
    if any(modules[str(p.target)].out_features != width for p in producers):
        return None
    source = sources.pop()
    return source if isinstance(source, fx.Node) else None


def _only_user(node: fx.Node) -> fx.Node | None:
    """The single user of ``node`` when it reads ``node`` as its first argument."""
    users = list(node.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        return users[0]
    return None


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _NORMS)
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _NORM_NAMES


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), ACTIVATION_MODULES)
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name in ACTIVATION_NAMES
    return False


def _anchor(gm: fx.GraphModule, conv: fx.Node) -> fx.Node:
    """The node the gate follows: conv, then its norm, then the activation, while single-use."""
    node = conv
    nxt = _only_user(node)
    if nxt is not None and _is_norm(gm, nxt):
        node, nxt = nxt, _only_user(nxt)
    if nxt is not None and _is_activation(gm, nxt):
        node = nxt
    return node


# --------------------------------------------------------------------------------------------
# Losses (tensor level)
# --------------------------------------------------------------------------------------------


def complexity_weights(
    per_sample_ce: Tensor, ce_reference: Tensor | float, gamma: float = 1.0
) -> Tensor:
    """ManiDP's per-sample weight ``lambda(x_i) / lambda' = [J_i < C] * ((C - J_i) / C)^gamma``.

    ``per_sample_ce`` holds ``J_i`` (detached here); ``ce_reference`` is ``C``. While
    ``C <= 0`` (no epoch recorded yet) every weight is 1.
    """
    ce = per_sample_ce.detach()
    c = torch.as_tensor(ce_reference, dtype=ce.dtype, device=ce.device)
    known = c > 0
    safe = torch.where(known, c, torch.ones_like(c))
    weight = ((safe - ce) / safe).clamp(min=0.0).pow(gamma) * (ce < safe).to(ce.dtype)
    return torch.where(known, weight, torch.ones_like(weight))


def sparsity_loss(
    saliencies: Sequence[Tensor],
    per_sample_ce: Tensor | None = None,
    *,
    ce_reference: Tensor | float = 0.0,
    gamma: float = 1.0,
    channels: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """``mean_i w_i * sum_l mean_c pi_l[i, c]`` over the gated layers' (N, C_l) saliencies.

    ``w_i`` is :func:`complexity_weights` of ``per_sample_ce`` (all 1 without it).
    ``channels="sum"`` sums over the channels instead of averaging (FBS's L1 norm).
    """
    if not saliencies:
        raise RewriterError("sparsity_loss needs at least one (N, C) saliency tensor")
    if channels not in ("mean", "sum"):
        raise RewriterError(f"channels must be 'mean' or 'sum', got {channels!r}")
    reduce = (lambda s: s.mean(dim=1)) if channels == "mean" else (lambda s: s.sum(dim=1))
    per_sample = torch.stack([reduce(s) for s in saliencies]).sum(0)
    if per_sample_ce is None:
        return per_sample.mean()
    weights = complexity_weights(per_sample_ce, ce_reference, gamma).to(per_sample)
    return (weights * per_sample).mean()


def _cosine_gram(x: Tensor) -> Tensor:
    unit = F.normalize(x.flatten(1), dim=1, eps=1e-12)
    return unit @ unit.t()


def similarity_loss(features: Sequence[Tensor], saliencies: Sequence[Tensor]) -> Tensor:
    """``sum_l ||T_l - R_l||_F^2 / B^2`` with cosine Gram matrices (B x B).

    ``features[l]`` are the pooled layer outputs (B, C_l) giving ``T_l``,
    ``saliencies[l]`` the gate vectors (B, C_l) giving ``R_l``.
    """
    if len(features) != len(saliencies) or not features:
        raise RewriterError("similarity_loss needs one feature and one saliency tensor per layer")
    terms = []
    for feature, saliency in zip(features, saliencies, strict=True):
        b = feature.shape[0]
        terms.append((_cosine_gram(feature) - _cosine_gram(saliency)).square().sum() / (b * b))
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------
# Training-time functions (GraphModule level)
# --------------------------------------------------------------------------------------------


def gates(gm: nn.Module) -> dict[str, SaliencyGate]:
    """Every saliency gate of ``gm`` by qualified module name, in registration order."""
    return {name: m for name, m in gm.named_modules() if isinstance(m, SaliencyGate)}


def _gates(gm: nn.Module) -> dict[str, SaliencyGate]:
    found = gates(gm)
    if not found:
        raise RewriterError("this model has no saliency gates; run the 'saliency_gates' pass first")
    return found


def aux_losses(
    gm: nn.Module,
    per_sample_ce: Tensor | None = None,
    *,
    lambda_lasso: float | None = None,
    lambda_graph: float | None = None,
    gamma: float | None = None,
) -> Tensor:
    """``lambda_lasso * L_sparse + lambda_graph * L_sim`` of the gates' last forward.

    ``per_sample_ce`` is the batch's unreduced cross-entropy, shape (N,) (e.g.
    ``F.cross_entropy(logits, y, reduction="none")``); it sets ManiDP's per-sample
    sparsity weight and, in training mode, is recorded for the next epoch's reference
    ``C``. Coefficients default to the pass's options. A training step reads::

        ce = F.cross_entropy(gm(x), y, reduction="none")
        loss = ce.mean() + aux_losses(gm, per_sample_ce=ce)

    FBS gates contribute ``lambda_lasso`` times the plain L1 of their saliencies.
    """
    terms = [
        g.loss(per_sample_ce, lambda_lasso=lambda_lasso, lambda_graph=lambda_graph, gamma=gamma)
        for g in _gates(gm).values()
    ]
    return torch.stack(terms).sum()


def keep_rate(epoch: int, epochs: int, target_keep: float) -> float:
    """Cosine keep-rate schedule: 1 at epoch 0, ``target_keep`` from epoch ``epochs`` on.

    ``keep(e) = target + (1 - target) * (1 + cos(pi * min(e, epochs) / epochs)) / 2``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    progress = min(max(epoch, 0), epochs) / epochs
    return target_keep + (1.0 - target_keep) * 0.5 * (1.0 + math.cos(math.pi * progress))


def update_thresholds(
    gm: nn.Module,
    epoch: int,
    epochs: int,
    target_keep: float | None = None,
    *,
    start_epoch: int = 1,
) -> dict[str, float]:
    """Set every ManiDP gate's threshold for the epoch after ``epoch``; return them by layer.

    Call at the end of (0-based) training epoch ``epoch`` of a schedule of ``epochs``
    epochs: the keep rate is ``keep_rate(epoch + 1, epochs, target)`` (so the threshold
    after the last epoch is the target's; epochs past ``epochs`` keep the target), and
    ``thr_l`` is the ``k``-th largest per-channel mean of ``pi`` over the training
    samples seen since the previous update, ``k = ceil(keep * C_out)``. The statistics
    are then reset. ``target_keep`` defaults to the pass's ``keep`` option. FBS gates
    (top-k, no threshold) are left unchanged. :func:`end_epoch` also updates the CE
    reference of the sparsity weight.

    Before ``start_epoch`` (default 1, as in the authors' code, which first sets the
    thresholds at the end of epoch 1) the statistics are reset and the thresholds kept;
    nothing is returned for those gates. ``start_epoch=0`` updates from the first epoch.
    """
    out: dict[str, float] = {}
    for name, gate in _gates(gm).items():
        if not gate.adaptive:
            continue
        if epoch < start_epoch:
            with torch.no_grad():
                gate.saliency_sum.zero_()
                gate.saliency_count.zero_()
            continue
        count = float(gate.saliency_count)
        if count <= 0:
            raise RewriterError(
                f"gate {name!r} saw no training samples since the last threshold update; "
                "run training-mode forwards before update_thresholds()"
            )
        target = gate.target_keep if target_keep is None else target_keep
        if not 0.0 < target <= 1.0:
            raise RewriterError(f"target_keep must lie in (0, 1], got {target}")
        rate = keep_rate(epoch + 1, epochs, target)
        k = min(gate.out_channels, max(1, _ceil(rate * gate.out_channels)))
        with torch.no_grad():
            means = gate.saliency_sum / count
            value = means.topk(k).values[-1]
            gate.threshold.copy_(value)
            gate.keep_rate.fill_(rate)
            gate.saliency_sum.zero_()
            gate.saliency_count.zero_()
        out[name] = float(value)
    return out


@dataclass(frozen=True)
class EpochUpdate:
    """What :func:`end_epoch` set: the keep rate, thresholds by gate, and ``C``."""

    keep_rate: float
    thresholds: dict[str, float]
    ce_reference: float


def end_epoch(
    gm: nn.Module,
    epoch: int,
    epochs: int,
    target_keep: float | None = None,
    *,
    start_epoch: int = 1,
) -> EpochUpdate:
    """End of training epoch ``epoch``: :func:`update_thresholds` and the new CE reference.

    ``C = 0.5 x`` the mean of the per-sample CEs recorded by the losses during the
    epoch (unchanged when none were recorded); the CE statistics are then reset.
    ``start_epoch`` is :func:`update_thresholds`'s; the returned ``keep_rate`` is the
    one in force for the next epoch (1 while no threshold was set).
    """
    found = _gates(gm)
    thresholds = update_thresholds(gm, epoch, epochs, target_keep, start_epoch=start_epoch)
    first = next(iter(found.values()))
    reference = float(first.ce_reference)
    if float(first.ce_count) > 0:
        reference = CE_REFERENCE_FACTOR * float(first.ce_sum / first.ce_count)
    with torch.no_grad():
        for gate in found.values():
            gate.ce_reference.fill_(reference)
            gate.ce_sum.zero_()
            gate.ce_count.zero_()
    adaptive = [g for g in found.values() if g.adaptive]
    rate = float(adaptive[0].keep_rate) if adaptive else 1.0
    return EpochUpdate(rate, thresholds, reference)


def init_ce_reference(
    gm: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    model: nn.Module | None = None,
) -> float:
    """Before training: ``C = 0.5 x`` the mean cross-entropy of the pretrained net on the data.

    The authors compute the complexity threshold of the first epoch this way (every
    later epoch uses the CE recorded during the previous one, see :func:`end_epoch`).
    ``batches`` yields ``(inputs, targets)`` of the training set; ``model`` is the
    network to score (default: ``gm`` itself, which with ``init="identity"`` gates
    computes exactly what the pretrained net does). Runs in eval mode without gradients
    (modes restored), sets every gate's ``ce_reference`` and returns ``C``.
    """
    found = _gates(gm)
    net = gm if model is None else model
    total, count = 0.0, 0
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                ce = F.cross_entropy(net(inputs), targets, reduction="none")
                total += float(ce.double().sum())
                count += ce.numel()
    finally:
        for module, mode in modes:
            module.training = mode
    if count == 0:
        raise RewriterError("init_ce_reference got no batches; pass (inputs, targets) pairs")
    reference = CE_REFERENCE_FACTOR * total / count
    with torch.no_grad():
        for gate in found.values():
            gate.ce_reference.fill_(reference)
            gate.ce_sum.zero_()
            gate.ce_count.zero_()
    return reference


def active_channels(gm: nn.Module) -> Tensor:
    """Per sample of the last forward, the number of gated channels executed (N,)."""
    counts = [(g._last("last_mask") > 0).sum(1) for g in _gates(gm).values()]
    return torch.stack(counts).sum(0)


@dataclass(frozen=True)
class DynamicFlops:
    """Per-sample executed MACs under the gates (see :func:`dynamic_flops`).

    Attributes:
        per_sample: float64 (N,) MACs each sample executes, gate overhead included.
        dense: MACs per sample of the ungated model (the same graph without the gates).
        gate_macs: MACs per sample spent in the gates themselves.
        kept: per gated conv node, the (N,) fraction of its output channels executed.
        report: the underlying :class:`~rewriter.analysis.flops.FlopsReport`.
    """

    per_sample: Tensor
    dense: float
    gate_macs: float
    kept: dict[str, Tensor]
    report: FlopsReport

    @property
    def mean(self) -> float:
        """Mean executed MACs per sample."""
        return float(self.per_sample.mean())

    @property
    def reduction(self) -> float:
        """Mean fraction of the ungated model's MACs saved (gate overhead counted)."""
        return 1.0 - self.mean / self.dense if self.dense else 0.0


def dynamic_flops(gm: fx.GraphModule, example_inputs: Sequence[Tensor] | Tensor) -> DynamicFlops:
    """Each sample's executed MACs given its gates, and the mean reduction vs the ungated model.

    Runs ``gm`` once in eval mode (no grad; modes restored). A conv executes only the
    output channels its gate keeps for that sample (``pi >= threshold``), and the next
    conv only those input channels: the kept fraction is passed to
    :func:`rewriter.analysis.flops.flops` as ``channel_keep`` on the gated conv's node,
    from where it flows through its norm and activation. The gates' own MACs
    (``rewriter_macs``) are included; ``dense`` is the graph's cost without them.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    found = _gates(gm)
    evaluate(gm, inputs)
    modules = dict(gm.named_modules())
    keep: dict[str, Tensor] = {}
    gate_nodes: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) not in found:
            continue
        gate = found[str(node.target)]
        fraction = (gate._last("last_mask") > 0).to(torch.float64).mean(1)
        if gate.channels_last:  # an MLP gate: its input projections and the ops up to it
            for before in _mlp_region(modules, node):  # (the gate's own cost is not scaled)
                keep[before.name] = fraction
        else:
            keep[_gated_layer(gm, modules, node)] = fraction
        gate_nodes.add(node.name)
    report = flops(gm, inputs, channel_keep=keep)
    batch = report.batch
    gate_total = sum(r.macs for r in report.rows if r.name in gate_nodes)
    dense = (report.total_macs - gate_total) / batch
    return DynamicFlops(report.per_sample, dense, gate_total / batch, keep, report)


def _mlp_region(modules: Mapping[str, nn.Module], gate: fx.Node) -> list[fx.Node]:
    """What an MLP gate node gates: the linear layers feeding it (``up``; SwiGLU's two) and
    the elementwise ops between them and the gate (activation, product)."""
    found, pending, seen = [], [gate.args[0]], set()
    while pending:
        node = pending.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules[str(node.target)], nn.Linear):
            found.append(node)
        elif _op_name(modules, node) in _POINTWISE | {"activation"}:
            found.append(node)
            pending.extend((*node.args, *node.kwargs.values()))
    return found


def _gated_layer(gm: fx.GraphModule, modules: Mapping[str, nn.Module], gate: fx.Node) -> str:
    """The conv node a gate node follows (through its norm / activation), else the gate."""
    node = gate.args[0]
    while isinstance(node, fx.Node):
        if _is_conv(modules, node):
            return node.name
        if not (_is_norm(gm, node) or _is_activation(gm, node)) or not node.args:
            break
        node = node.args[0]
    return gate.name
