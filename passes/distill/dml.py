"""IE-DML: two students trained together, each the other's teacher (inheritance and exploration).

:class:`MutualIE` holds both students (traced, each returning its logits and its tapped
feature map), one auto-encoder per student trained *online* on that student's own
(detached) feature map, and, for each student, an inheritance and an exploration encoder
into the *peer's* code shape. A training step::

    pair = MutualIE(student_a, student_b, x_example)
    opt = torch.optim.SGD(pair.parameters(), lr=0.1)      # students, encoders, auto-encoders
    out_a, out_b = pair(x)
    loss = pair.loss(y)                                   # see loss()
    opt.zero_grad(); loss.backward(); opt.step()

The mutual terms of student A use B's code, detached (B is A's teacher for that term), and
the other way round, so each student receives gradients only from its own inheritance /
exploration terms (and its own CE); the auto-encoders receive gradients only from their
reconstruction loss. ``kl_weight`` adds Deep Mutual Learning's term
``KL(softmax(peer) || softmax(own))`` (batch mean, peer detached) for each student; set it to
0 for the IE terms alone. Our choices: the student's map is split like IE-KD's (first
``C // 2`` channels inherit), codes are resized to the peer's code size with
``adaptive_avg_pool2d``, the reconstruction loss is the MSE, and everything is summed with
the weights given. ``strip_a()`` / ``strip_b()`` return a plain copy of either student.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from rewriter.errors import RewriterError

from . import losses
from .ie import AutoEncoder, Encoder, latent_channels, match_size, split_channels
from .taps import tapped


class _Side(nn.Module):
    """One student with its auto-encoder and its two encoders into the peer's code."""

    def __init__(
        self, student: fx.GraphModule, channels: int, latent: int, peer_latent: int
    ) -> None:
        super().__init__()
        self.student = student
        self.autoencoder = AutoEncoder(channels, latent)
        self.split = split_channels(channels)
        if min(self.split) < 1:
            raise RewriterError(
                f"IE-DML splits a tapped map into halves; it has {channels} channel(s)"
            )
        self.inherit = Encoder(self.split[0], peer_latent)
        self.explore = Encoder(self.split[1], peer_latent)


class MutualIE(nn.Module):
    """Two students, each the other's teacher; ``forward(*inputs) -> (logits_a, logits_b)``."""

    def __init__(
        self,
        student_a: nn.Module,
        student_b: nn.Module,
        example_inputs: Tensor | tuple[Tensor, ...],
        *,
        tap_a: str = "",
        tap_b: str = "",
        latent_ratio: float = 0.5,
        inherit_weight: float = 1.0,
        explore_weight: float = 1.0,
        exploration: str = "neg_l1",
        kl_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
    ) -> None:
        super().__init__()
        inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
        gm_a, shape_a = tapped(student_a, tap_a, inputs)
        gm_b, shape_b = tapped(student_b, tap_b, inputs)
        latent_a = latent_channels(shape_a[1], latent_ratio)
        latent_b = latent_channels(shape_b[1], latent_ratio)
        self.a = _Side(gm_a, shape_a[1], latent_a, latent_b)
        self.b = _Side(gm_b, shape_b[1], latent_b, latent_a)
        self.a.train(student_a.training)
        self.b.train(student_b.training)
        self.inherit_weight = inherit_weight
        self.explore_weight = explore_weight
        self.exploration = exploration
        self.kl_weight = kl_weight
        self.reconstruction_weight = reconstruction_weight
        self._last: dict[str, Any] = {}

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        last: dict[str, Any] = {}
        for key, side in (("a", self.a), ("b", self.b)):
            out, feature = side.student(*inputs)
            logits = out[0] if isinstance(out, (tuple, list)) else out
            detached = feature.detach()
            code = side.autoencoder.encoder(detached)
            last[key] = {
                "logits": logits,
                "feature": feature,
                "code": code,
                "reconstruction": side.autoencoder.decoder(code),
                "target": detached,
            }
        for key, side, peer in (("a", self.a, "b"), ("b", self.b, "a")):
            teacher_code = last[peer]["code"].detach()
            inherit, explore = torch.split(last[key]["feature"], list(side.split), dim=1)
            last[key]["inherit"] = match_size(side.inherit(inherit), teacher_code)
            last[key]["explore"] = match_size(side.explore(explore), teacher_code)
            last[key]["teacher_code"] = teacher_code
        self._last = last
        return last["a"]["logits"], last["b"]["logits"]

    def _side(self, key: str) -> dict[str, Any]:
        if not self._last:
            raise RewriterError("MutualIE has not run a forward yet; call it on a batch first")
        return self._last[key]

    def mutual_loss(self) -> Tensor:
        """Both students' inheritance and exploration terms (peer codes detached), plus DML's KL."""
        total = torch.zeros(())
        for key, peer in (("a", "b"), ("b", "a")):
            s = self._side(key)
            total = total + self.inherit_weight * losses.normalized_l1(
                s["inherit"], s["teacher_code"]
            )
            total = total + self.explore_weight * losses.exploration_loss(
                s["explore"], s["teacher_code"], self.exploration
            )
            if self.kl_weight:
                target = F.softmax(self._side(peer)["logits"].detach(), dim=1)
                total = total + self.kl_weight * losses.kl_divergence(s["logits"], target)
        return total

    def reconstruction_loss(self) -> Tensor:
        """The online auto-encoders' MSE on their own student's (detached) feature map."""
        return sum(
            F.mse_loss(self._side(k)["reconstruction"], self._side(k)["target"]) for k in ("a", "b")
        )

    def loss(self, targets: Tensor) -> Tensor:
        """``CE_a + CE_b + mutual_loss() + reconstruction_weight * reconstruction_loss()``."""
        ce = sum(F.cross_entropy(self._side(k)["logits"], targets) for k in ("a", "b"))
        return ce + self.mutual_loss() + self.reconstruction_weight * self.reconstruction_loss()

    def strip_a(self) -> fx.GraphModule:
        return _plain(self.a.student)

    def strip_b(self) -> fx.GraphModule:
        return _plain(self.b.student)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last"] = {}
        return state


def _plain(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a tapped student that returns its original output only."""
    work = copy.deepcopy(gm)
    output = next(n for n in work.graph.nodes if n.op == "output")
    output.args = (output.args[0][0],)
    work.graph.eliminate_dead_code()
    work.recompile()
    return work
