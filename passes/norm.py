"""Pass ``rbn``: BatchNorm2d replaced by Representative BatchNorm (Gao et al., CVPR 2021).

``bn(x) -> rbn(x)`` with running statistics, gamma, beta, eps, momentum and
``track_running_stats`` carried over. Follows the paper (``docs/methods/rbn.md``):

1. centering calibration ``X' = X + w_m * mean_hw(X)`` (not in place);
2. batch normalisation of ``X'`` without affine (batch statistics in training,
   running statistics, which are those of ``X'``, in eval);
3. scaling calibration ``Xs = Xhat * sigmoid(w_v * mean_hw(Xhat) + w_b)``
   (the per-instance *mean* of the normalised map);
4. affine ``Y = gamma * Xs + beta``.

New parameters, each of shape (1, C, 1, 1): ``<bn>.center_weight`` (w_m),
``<bn>.scale_weight`` (w_v) and ``<bn>.scale_bias`` (w_b).

Inits: ``"preserve"`` (default) sets w_m = 0, w_v = 0, w_b = 1 and divides gamma
by sigmoid(1), so the module computes exactly what the BN did
(``preserves_outputs`` holds, checked by the pass manager). A BN without affine
parameters has no gamma to divide, so under ``"preserve"`` it is left unchanged
and named in the report. ``"paper"`` is the authors' init (gamma kept), giving
``RBN = 0.7311 x BN`` at insertion; the pass then does not preserve outputs.
Every ``nn.BatchNorm2d`` is replaced, downsample BNs included. Running the pass
twice is a no-op. Like ``nn.BatchNorm2d`` itself, a BN with ``momentum=None``
(cumulative average) reads its batch count as a Python number in training, so
it does not compile with ``fullgraph=True``; the default momentum does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rewriter.context import RewriteContext
from rewriter.modules import RewriterModule
from rewriter.patterns import Match, P
from rewriter.registry import Pass, anything, choices, option, register
from rewriter.select import selected


class RepresentativeBatchNorm2d(RewriterModule, nn.BatchNorm2d):
    """BatchNorm2d with RBN's centering and scaling calibrations (see module docs)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        shape = (1, num_features, 1, 1)
        kw = {"device": device, "dtype": dtype}
        self.center_weight = nn.Parameter(torch.zeros(shape, **kw))  # w_m
        self.scale_weight = nn.Parameter(torch.zeros(shape, **kw))  # w_v
        self.scale_bias = nn.Parameter(torch.ones(shape, **kw))  # w_b

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        centered = input + self.center_weight * input.mean(dim=(2, 3), keepdim=True)

        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        normed = F.batch_norm(
            centered,
            self.running_mean if track else None,
            self.running_var if track else None,
            None,
            None,
            use_batch_stats,
            factor,
            self.eps,
        )
        scale = torch.sigmoid(self.scale_weight * normed.mean(dim=(2, 3), keepdim=True) + self.scale_bias)
        out = normed * scale
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, init: str = "preserve") -> RepresentativeBatchNorm2d:
        """An RBN computing like ``bn`` (``init="preserve"``) or with the authors' init."""
        ref = next(iter(bn.parameters()), None)
        if ref is None and bn.running_mean is not None:
            ref = bn.running_mean
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        rbn = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **kw)
        rbn.load_state_dict(bn.state_dict(), strict=False)
        rbn.train(bn.training)
        if init == "preserve" and bn.affine:
            with torch.no_grad():
                rbn.weight.div_(torch.sigmoid(rbn.scale_bias.flatten()))
        return rbn


SIGMOID_ONE = 1.0 / (1.0 + math.exp(-1.0))  # 0.7311: RBN / BN at the paper's init


@register
@dataclass(frozen=True)
class RBN(Pass):
    """bn(x) => rbn(x): BatchNorm2d becomes Representative BatchNorm, stats and affine kept."""

    name = "rbn"

    init: Literal["preserve", "paper"] = option(
        "preserve",
        "'preserve': exact function at insertion; 'paper': w_b=1 with gamma kept",
        choices("preserve", "paper"),
    )
    include: tuple[str, ...] = option(
        (), "globs of qualified BN names to replace (empty: all)", anything()
    )
    exclude: tuple[str, ...] = option((), "globs of qualified BN names to keep", anything())

    def __post_init__(self) -> None:
        if self.init not in ("preserve", "paper"):
            raise ValueError(f"init must be 'preserve' or 'paper', got {self.init!r}")

    @property
    def preserves_outputs(self) -> bool:  # type: ignore[override]
        return self.init == "preserve"

    def rules(self) -> list:
        return [(P.module(nn.BatchNorm2d, name="bn"), self.to_rbn)]  # bn(x) -> rbn(x)

    def to_rbn(self, ctx: RewriteContext, m: Match) -> fx.Node | None:
        node = m["bn"]
        bn = ctx.module(node)
        if type(bn) is not nn.BatchNorm2d:
            return None  # already RBN, or a user subclass with its own forward
        name = str(node.target)
        if not selected(name, bn, include=self.include, exclude=self.exclude):
            return None
        if self.init == "preserve" and not bn.affine:
            ctx.note(f"{name}: BatchNorm2d without affine cannot be preserved exactly; kept as BN")
            return None
        return ctx.replace_module(node, RepresentativeBatchNorm2d.from_batchnorm(bn, self.init))
