"""A small zoo of reference models, written from scratch and traceable by ``torch.fx``.

Every model here is deliberately small so that CPU tests stay fast, and every ``forward`` is free
of data-dependent Python control flow, so :func:`torch.fx.symbolic_trace` unrolls it into a plain
graph. Shapes that a model needs at run time (token counts, head sizes, ...) are computed once in
``__init__`` and stored as integers.

Public API:

* :data:`MODELS` maps a model name to a :class:`ZooEntry`;
* :func:`names` lists the model names;
* :func:`create` builds a model from its name and options, and records how it was built in the
  model's ``rewriter_source`` attribute so it can be rebuilt later;
* :func:`input_shape` and :func:`example_inputs` give the matching input shape and a seeded random
  example batch.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RewriterError

__all__ = [
    "MODELS",
    "UnknownOptionError",
    "ZooEntry",
    "create",
    "example_inputs",
    "input_shape",
    "names",
]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """A bias-free convolution with ``kernel // 2`` padding followed by BatchNorm."""
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add.

    The shortcut is the identity, or a 1x1 conv + BN when the stride or the width changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1-3x3-1x1 convolutions with expansion 4."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class CifarResNetBackbone(nn.Module):
    """CIFAR-style ResNet trunk: conv3x3 stem and three stages of basic blocks.

    Produces pooled, flattened features of size ``4 * width``.
    """

    def __init__(self, depth: int, width: int, in_channels: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = width
        for index, out_ch in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for block in range(per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = in_ch

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


class ResNet(CifarResNetBackbone):
    """CIFAR-style ResNet classifier: the trunk's layers at the top level, then ``fc``.

    Layer names follow the usual convention (``stem.0``, ``layer1.0.conv1``, ``fc``).
    """

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int) -> None:
        super().__init__(depth, width, in_channels)
        self.fc = nn.Linear(self.out_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(super().forward(x))


class BottleneckResNet(nn.Module):
    """CIFAR-style ResNet built from bottleneck blocks, three stages."""

    def __init__(
        self, blocks: Sequence[int], width: int, num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        if len(blocks) != 3 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"blocks must be three positive block counts, got {tuple(blocks)}")
        self.stem = nn.Sequential(*_conv_bn(in_channels, width, 3), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = width
        for index, (planes, count) in enumerate(
            zip((width, 2 * width, 4 * width), blocks, strict=True)
        ):
            layers = []
            for block in range(int(count)):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(Bottleneck(in_ch, planes, stride))
                in_ch = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [*_conv_bn(in_ch, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers += _conv_bn(hidden, out_ch, 1)
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:  # a construction-time constant, not a tensor value
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), a CIFAR-sized MobileNetV2.
_MOBILENETV2_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
)


class MobileNetV2(nn.Module):
    """A CIFAR-sized MobileNetV2 (stride-1 stem, shortened stage list)."""

    def __init__(self, width_mult: float, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        stem_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(256 * max(1.0, width_mult))
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(in_channels, stem_ch, 3), nn.ReLU6())]
        in_ch = stem_ch
        for t, c, n, s in _MOBILENETV2_CONFIG:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(nn.Sequential(*_conv_bn(in_ch, last_ch, 1), nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class DenseLayer(nn.Module):
    """DenseNet layer: BN-ReLU-conv3x3 producing ``growth`` new channels."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_ch, growth, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.relu(self.bn(x)))


class DenseBlock(nn.Module):
    """A stack of dense layers; each appends its output to the running feature map."""

    def __init__(self, in_ch: int, growth: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_ch + i * growth, growth) for i in range(num_layers)
        )
        self.out_channels = in_ch + num_layers * growth

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class Transition(nn.Module):
    """DenseNet transition: BN-ReLU-1x1 conv-2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """A small DenseNet: conv stem, dense blocks separated by halving transitions."""

    def __init__(
        self, growth: int, layers: Sequence[int], num_classes: int, in_channels: int
    ) -> None:
        super().__init__()
        if not layers or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be positive layer counts, got {tuple(layers)}")
        ch = 2 * growth
        self.stem = nn.Conv2d(in_channels, ch, 3, 1, 1, bias=False)
        stages: list[nn.Module] = []
        for index, count in enumerate(layers):
            block = DenseBlock(ch, growth, int(count))
            stages.append(block)
            ch = block.out_channels
            if index < len(layers) - 1:
                stages.append(Transition(ch, ch // 2))
                ch //= 2
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention with explicit reshape/permute/matmul/softmax.

    The token count is fixed at construction so that reshapes only leave the batch as ``-1``.
    """

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim, self.heads, self.tokens = dim, heads, tokens
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x).reshape(-1, self.tokens, 3, self.heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, batch, heads, tokens, head_dim)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = torch.softmax(attn, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, tokens: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer with conv patch embedding and mean pooling over tokens."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        patch: int,
        image_size: int,
        num_classes: int,
        in_channels: int,
        mlp_ratio: int,
    ) -> None:
        super().__init__()
        if image_size % patch != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch ({patch})")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(
            *(TransformerBlock(dim, heads, tokens, mlp_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x).mean(dim=1))


class MultiTaskResNet(nn.Module):
    """A shared CIFAR-style ResNet trunk with one linear head per task.

    ``forward`` returns a tuple of per-task logits.
    """

    def __init__(
        self, classes_per_task: Sequence[int], depth: int, width: int, in_channels: int
    ) -> None:
        super().__init__()
        self.backbone = CifarResNetBackbone(depth, width, in_channels)
        self.heads = nn.ModuleList(
            nn.Linear(self.backbone.out_features, int(n)) for n in classes_per_task
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        features = self.backbone(x)
        return tuple(head(features) for head in self.heads)


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digit images: two conv-BN-ReLU, one residual block, GAP, linear."""

    def __init__(self, width: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn(in_channels, width, 3),
            nn.ReLU(),
            *_conv_bn(width, width, 3),
            nn.ReLU(),
        )
        self.block = BasicBlock(width, width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class MLP(nn.Module):
    """A plain multi-layer perceptron on flattened inputs."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, bias: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, int(size), bias=bias), nn.ReLU()]
            width = int(size)
        layers.append(nn.Linear(width, num_classes, bias=bias))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------
# Factories: keyword options with defaults; these signatures define the valid options.
# --------------------------------------------------------------------------------------------


def resnet20(
    depth: int = 20, width: int = 16, num_classes: int = 10, in_channels: int = 3
) -> ResNet:
    """CIFAR-style ResNet of ``depth`` = 6n+2 layers and base width ``width``."""
    return ResNet(depth, width, num_classes, in_channels)


def resnet8(depth: int = 8, width: int = 16, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """``resnet20`` with depth 8 (one block per stage), for fast tests."""
    return ResNet(depth, width, num_classes, in_channels)


def bottleneck_resnet(
    blocks: Sequence[int] = (1, 1, 1),
    width: int = 16,
    num_classes: int = 10,
    in_channels: int = 3,
) -> BottleneckResNet:
    """CIFAR-style ResNet with ``blocks`` bottleneck blocks per stage (expansion 4)."""
    return BottleneckResNet(tuple(blocks), width, num_classes, in_channels)


def mobilenetv2(
    width_mult: float = 1.0, num_classes: int = 10, in_channels: int = 3
) -> MobileNetV2:
    """CIFAR-sized MobileNetV2 with inverted residual blocks; channels scale by ``width_mult``."""
    return MobileNetV2(width_mult, num_classes, in_channels)


def densenet(
    growth: int = 8,
    layers: Sequence[int] = (2, 2),
    num_classes: int = 10,
    in_channels: int = 3,
) -> DenseNet:
    """Small DenseNet: ``layers`` dense layers per block, ``growth`` channels per layer."""
    return DenseNet(growth, tuple(layers), num_classes, in_channels)


def vit(
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    patch: int = 4,
    image_size: int = 32,
    num_classes: int = 10,
    in_channels: int = 3,
    mlp_ratio: int = 2,
) -> ViT:
    """Small Vision Transformer with mean pooling over patch tokens."""
    return ViT(dim, depth, heads, patch, image_size, num_classes, in_channels, mlp_ratio)


def multitask_resnet(
    tasks: int = 2,
    classes_per_task: Sequence[int] | None = None,
    depth: int = 8,
    width: int = 16,
    in_channels: int = 3,
) -> MultiTaskResNet:
    """Shared ResNet trunk with ``tasks`` linear heads; returns a tuple of logits.

    ``classes_per_task`` defaults to ``(10, 5)`` cycled over the tasks (so ``(10, 5)`` for the
    default two tasks); when given, it must have exactly ``tasks`` entries.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    if classes_per_task is None:
        classes = tuple((10, 5)[i % 2] for i in range(tasks))
    else:
        classes = tuple(int(n) for n in classes_per_task)
        if len(classes) != tasks:
            raise ValueError(
                f"classes_per_task has {len(classes)} entries but tasks={tasks}: {classes}"
            )
    return MultiTaskResNet(classes, depth, width, in_channels)


def digits_cnn(width: int = 16, num_classes: int = 10, in_channels: int = 1) -> DigitsCNN:
    """Small residual CNN for 1x8x8 digit images (``sklearn.datasets.load_digits``)."""
    return DigitsCNN(width, num_classes, in_channels)


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (64, 64),
    num_classes: int = 10,
    bias: bool = True,
) -> MLP:
    """Plain MLP: flatten, then Linear-ReLU layers of sizes ``hidden``, then a Linear."""
    return MLP(in_features, tuple(hidden), num_classes, bias)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """A registered zoo model.

    Attributes:
        name: registry name, as accepted by :func:`create`.
        factory: callable taking the model's options as keyword arguments.
        input_shape: input shape without the batch dimension, for the default options.
        description: one-line description.
        shape_fn: maps the full (defaults applied) options to the input shape; use
            :func:`input_shape` rather than calling it directly.
    """

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    shape_fn: Callable[[Mapping[str, Any]], tuple[int, ...]] = field(
        default=lambda options: (), repr=False, compare=False
    )


def _image(size: int) -> Callable[[Mapping[str, Any]], tuple[int, ...]]:
    return lambda o: (int(o["in_channels"]), size, size)


def _entry(
    name: str,
    factory: Callable[..., nn.Module],
    description: str,
    shape_fn: Callable[[Mapping[str, Any]], tuple[int, ...]],
) -> ZooEntry:
    defaults = _bind(factory, {}).arguments
    return ZooEntry(name, factory, shape_fn(defaults), description, shape_fn)


def _bind(factory: Callable[..., nn.Module], options: Mapping[str, Any]) -> inspect.BoundArguments:
    bound = inspect.signature(factory).bind(**options)
    bound.apply_defaults()
    return bound


MODELS: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        _entry("resnet20", resnet20, "CIFAR-style ResNet-20 with basic blocks", _image(32)),
        _entry("resnet8", resnet8, "CIFAR-style ResNet-8 (one block per stage)", _image(32)),
        _entry(
            "bottleneck_resnet",
            bottleneck_resnet,
            "CIFAR-style ResNet with 1x1-3x3-1x1 bottleneck blocks",
            _image(32),
        ),
        _entry(
            "mobilenetv2",
            mobilenetv2,
            "CIFAR-sized MobileNetV2 with depthwise inverted residuals",
            _image(32),
        ),
        _entry("densenet", densenet, "Small DenseNet with concatenating dense blocks", _image(32)),
        _entry(
            "vit",
            vit,
            "Small Vision Transformer with explicit multi-head attention",
            lambda o: (int(o["in_channels"]), int(o["image_size"]), int(o["image_size"])),
        ),
        _entry(
            "multitask_resnet",
            multitask_resnet,
            "Shared ResNet trunk with one linear head per task (tuple output)",
            _image(32),
        ),
        _entry("digits_cnn", digits_cnn, "Small residual CNN for 8x8 digit images", _image(8)),
        _entry("mlp", mlp, "Plain multi-layer perceptron", lambda o: (int(o["in_features"]),)),
    )
}


class UnknownModelError(RewriterError, ValueError):
    """A zoo name that is not registered."""


class UnknownOptionError(RewriterError, TypeError, ValueError):
    """An option that the model's factory does not accept (both a TypeError and ValueError)."""


def names() -> list[str]:
    """The registered model names, in registration order."""
    return list(MODELS)


def _lookup(name: str) -> ZooEntry:
    key = name.removeprefix("zoo:")
    entry = MODELS.get(key)
    if entry is None:
        close = difflib.get_close_matches(key, MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModelError(f"unknown zoo model {name!r}.{hint} Valid names: {', '.join(MODELS)}")
    return entry


def _resolve(name: str, options: Mapping[str, Any]) -> tuple[ZooEntry, dict[str, Any]]:
    """Look up ``name`` and validate ``options``; return the entry and options with defaults."""
    entry = _lookup(name)
    valid = list(inspect.signature(entry.factory).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hints = []
        for option in unknown:
            close = difflib.get_close_matches(option, valid, n=1)
            hints.append(f"{option!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownOptionError(
            f"unknown option(s) for zoo model {entry.name!r}: {', '.join(hints)}. "
            f"Valid options: {', '.join(valid)}"
        )
    return entry, dict(_bind(entry.factory, options).arguments)


def plain(value: Any) -> Any:
    """Convert tuples (recursively) to lists so that option values are JSON/TOML-friendly."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def create(name: str, **options: Any) -> nn.Module:
    """Build the zoo model ``name`` with the given options.

    ``name`` may carry a ``zoo:`` prefix. The model gets a ``rewriter_source`` attribute,
    ``{"model": "zoo:<name>", "options": {...}}``, holding the options as given (tuples turned into
    lists) so that ``create(name, **model.rewriter_source["options"])`` rebuilds it.

    Raises:
        UnknownModelError: ``name`` is not a registered model (a ``ValueError``; the message
            lists the valid names).
        UnknownOptionError: an option is not accepted by the model (a ``TypeError`` and a
            ``ValueError``; the message lists the valid options).
    """
    entry, _ = _resolve(name, options)
    model = entry.factory(**options)
    model.rewriter_source = {"model": f"zoo:{entry.name}", "options": plain(dict(options))}
    return model


def input_shape(name: str, **options: Any) -> tuple[int, ...]:
    """The input shape (without batch dimension) of zoo model ``name`` built with ``options``."""
    entry, resolved = _resolve(name, options)
    return tuple(entry.shape_fn(resolved))


def example_inputs(name: str, batch: int = 2, **options: Any) -> tuple[Tensor, ...]:
    """A one-tensor tuple of seeded random inputs, shape ``(batch, *input_shape)``.

    The tensor comes from a local ``torch.Generator`` seeded with 0, so the global RNG is untouched
    and repeated calls return equal tensors.
    """
    shape = input_shape(name, **options)
    generator = torch.Generator().manual_seed(0)
    return (torch.randn((batch, *shape), generator=generator),)
