"""Taps: which feature map of a student or teacher the feature methods read.

A tap is named by its fx node name or the qualified name of the module a
``call_module`` node calls; the default is the last 4-D map (N, C, H, W) with more than
one position that feeds a global pooling or a flatten: the last map before global pooling.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from rewriter.errors import RewriterError
from rewriter.manager import _propagate_shapes
from rewriter.tracing import trace


def shape_of(node: fx.Node) -> torch.Size:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise RewriterError(f"node {node.name!r} has no tensor shape (give example inputs)")
    return meta.shape


def label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def is_4d(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) == 4


def default_tap(gm: fx.GraphModule) -> fx.Node:
    """The last 4-D map with H*W > 1 that feeds a global pooling or a flatten (else the last such map)."""
    maps = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and is_4d(n)]
    if not maps:
        raise RewriterError(
            "found no 4-D feature map (N, C, H, W) to tap; the feature methods need a conv "
            "network and example inputs"
        )
    spatial = [n for n in maps if n.meta["tensor_meta"].shape[2:].numel() > 1]
    for node in reversed(spatial):
        for user in node.users:
            shape = getattr(user.meta.get("tensor_meta"), "shape", None)
            if shape is not None and (len(shape) != 4 or shape[2:].numel() == 1):
                return node
    return (spatial or maps)[-1]


def find_tap(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node named ``name`` (node name or module qualified name); ``""``: :func:`default_tap`."""
    if not name:
        return default_tap(gm)
    for node in gm.graph.nodes:
        if node.name == name or (node.op == "call_module" and node.target == name):
            if not is_4d(node):
                raise RewriterError(f"tap {name!r} is not a 4-D feature map (N, C, H, W)")
            return node
    maps = [label(n) for n in gm.graph.nodes if is_4d(n)][-8:]
    raise RewriterError(f"no node or module named {name!r} to tap; 4-D maps near the end: {maps}")


def tapped(
    model: nn.Module, tap: str, inputs: tuple[Tensor, ...]
) -> tuple[fx.GraphModule, torch.Size]:
    """A traced copy of ``model`` returning ``(output, tapped map)``, and the map's shape."""
    gm = trace(copy.deepcopy(model))
    _propagate_shapes(gm, inputs)
    node = find_tap(gm, tap)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], node),)
    gm.recompile()
    return gm, shape_of(node)
