"""A plain (non-residual) CNN for the 8x8 digits, shared by the lottery examples.

A network without shortcuts is where layer collapse disconnects the model, so the
lottery examples use it instead of the zoo's residual ``digits_cnn``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def plain_cnn(widths: tuple[int, ...]) -> nn.Sequential:
    """conv-BN-ReLU blocks (max pool after the second), global average pool, linear."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = 1
    for i, width in enumerate(widths, start=1):
        layers[f"conv{i}"] = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        layers[f"bn{i}"] = nn.BatchNorm2d(width)
        layers[f"relu{i}"] = nn.ReLU()
        if i == 2:
            layers["pool"] = nn.MaxPool2d(2)
        channels = width
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(channels, 10)
    return nn.Sequential(layers)
