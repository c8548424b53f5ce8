"""IE-KD's building blocks: the teacher's auto-encoder, the student's encoders, freezing.

``docs/methods/distill.md``: the teacher's tapped feature map is encoded by an auto-encoder of
3 conv-BN-LeakyReLU(0.1) layers each way (Factor Transfer's "paraphraser"), pretrained
with a reconstruction loss; the student's tapped map is split channel-wise into an
inheritance half and an exploration half, each with its own encoder (3 conv-BN-LeakyReLU
layers) into the teacher's code shape.

Choices where the paper leaves room (stated in the pass docstring too): 3x3 convs,
stride 1, padding 1, so the encoders keep the spatial size; the code has
``round(latent_ratio * C_teacher)`` channels (Factor Transfer's rate 0.5 by default);
the decoder mirrors the encoder with plain convs (stride 1, so a transposed conv is the
same layer); a student code whose spatial size differs from the teacher's is resized
with ``adaptive_avg_pool2d`` to the teacher code's size. The reconstruction loss is the
mean squared error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEGATIVE_SLOPE = 0.1


def conv_bn_lrelu(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(NEGATIVE_SLOPE),
    ]


class Encoder(nn.Sequential):
    """``cin -> cin -> cout -> cout`` channels: 3 conv-BN-LeakyReLU(0.1) layers."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            *conv_bn_lrelu(cin, cin), *conv_bn_lrelu(cin, cout), *conv_bn_lrelu(cout, cout)
        )


class AutoEncoder(nn.Module):
    """The teacher's auto-encoder: :class:`Encoder` ``C -> latent``, a mirrored decoder back to ``C``."""

    def __init__(self, channels: int, latent: int) -> None:
        super().__init__()
        self.encoder = Encoder(channels, latent)
        self.decoder = nn.Sequential(
            *conv_bn_lrelu(latent, latent),
            *conv_bn_lrelu(latent, channels),
            *conv_bn_lrelu(channels, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def latent_channels(teacher_channels: int, ratio: float) -> int:
    return max(1, round(teacher_channels * ratio))


def split_channels(channels: int) -> tuple[int, int]:
    """Inheritance and exploration widths: the first ``C // 2`` channels inherit, the rest explore."""
    return channels // 2, channels - channels // 2


def match_size(code: Tensor, like: Tensor) -> Tensor:
    """``code`` resized to ``like``'s spatial size (``adaptive_avg_pool2d``; unchanged if equal)."""
    if code.shape[-2:] == like.shape[-2:]:
        return code
    return F.adaptive_avg_pool2d(code, like.shape[-2:])


# -- frozen modules: parameters become buffers ----------------------------------------------

FROZEN_KEY = "_rewriter_frozen"


def freeze(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name, in place; eval mode.

    The module computes what it did, its ``state_dict`` keys are unchanged (buffers are
    saved like parameters), but ``parameters()`` no longer lists them: an optimizer built
    from the enclosing model's parameters never sees them and DDP does not treat them as
    parameters. :func:`thaw` undoes it on a copy.
    """
    for sub in module.modules():
        names = [n for n, p in sub._parameters.items() if p is not None]
        for name in names:
            value = sub._parameters.pop(name).detach()
            value.requires_grad_(False)
            sub.register_buffer(name, value)
        if names:
            setattr(sub, FROZEN_KEY, tuple(names) + tuple(getattr(sub, FROZEN_KEY, ())))
    module.eval()
    return module


def thaw(module: nn.Module) -> nn.Module:
    """A copy of a :func:`freeze`-d module whose frozen buffers are parameters again."""
    module = copy.deepcopy(module)
    for sub in module.modules():
        for name in getattr(sub, FROZEN_KEY, ()):
            value = sub._buffers.pop(name)
            sub.register_parameter(name, nn.Parameter(value.clone()))
        if hasattr(sub, FROZEN_KEY):
            delattr(sub, FROZEN_KEY)
    return module


def train_autoencoder(
    autoencoder: nn.Module,
    features: Iterable[Tensor],
    *,
    epochs: int,
    lr: float,
) -> list[float]:
    """Fit ``autoencoder`` (trainable) to reconstruct ``features`` (MSE, Adam); mean loss per epoch."""
    features = list(features)
    if not features:
        raise ValueError("no feature batches to train the auto-encoder on")
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr)
    autoencoder.train()
    history = []
    for _ in range(epochs):
        total = 0.0
        for feature in features:
            loss = F.mse_loss(autoencoder(feature), feature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        history.append(total / len(features))
    autoencoder.eval()
    return history


def batch_inputs(batch: Any) -> tuple[Tensor, ...]:
    """The model inputs of a batch: ``x``, ``(x, y)`` (inputs first, target last) or ``(x1, x2, y)``."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, Tensor) for t in batch):
        return tuple(batch[:-1]) if len(batch) > 1 else (batch[0],)
    raise TypeError(
        "a batch must be a tensor of inputs or a tuple (inputs..., targets) of tensors, "
        f"got {type(batch).__name__}"
    )
