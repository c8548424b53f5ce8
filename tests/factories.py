"""Tiny model factories that tests name as ``factories:make`` (tests/ is put on sys.path)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Block(nn.Module):
    """conv -> bn -> relu, traced through unless named as a leaf."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class SignFlip(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so it becomes opaque."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.proj(x)
        return -self.proj(x)


class Net(nn.Module):
    def __init__(self, width: int, scale: float | None, opaque: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block = Block(width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flip = SignFlip(width) if opaque else nn.Identity()
        self.fc = nn.Linear(width, 3)
        self.scale = 1.0 if scale is None else scale

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(self.block(self.stem(x))).flatten(1)
        return self.fc(self.flip(h)) * self.scale


def make(width: int = 4, scale: float | None = None, opaque: bool = False) -> nn.Module:
    """A small CNN for (N, 1, 6, 6) inputs."""
    return Net(width, scale, opaque)


def inputs(batch: int = 4) -> Tensor:
    return torch.randn(batch, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def not_a_module() -> int:
    return 3


class DataDependent(nn.Module):
    """The root forward branches on a tensor value: torch.fx cannot trace the model at all."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


def untraceable() -> nn.Module:
    """A model whose root forward has data-dependent control flow (for (N, 4) inputs)."""
    return DataDependent()
