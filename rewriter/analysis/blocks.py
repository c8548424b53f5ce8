"""Residual block detection on the networkx view of a GraphModule.

A *residual block* is an add of two tensors computed from one block input:

* the **shortcut** operand is the block input itself (``identity``), possibly
  through ``nn.Identity`` / dropout modules, or a short chain of conv, norm and
  pooling modules containing at least one conv (``projection``, e.g. a
  ``downsample`` 1x1 conv + BN);
* the **branch** operand is every other node between the block input and the add;
  it must be *closed* (no branch node is read outside the branch, except by the
  add) and strictly longer than the shortcut chain;
* an activation (ReLU, ReLU6, GELU, SiLU...) that is the add's only user belongs
  to the block and is its ``output``, unless ``nn_module_stack`` places it outside
  the block's module (an inner block followed by the outer branch's ReLU).

The block input is the add's immediate dominator in the data-flow graph (the
nearest node every path from the model inputs to the add passes through; nodes
that do not depend on an input, such as parameters read with ``get_attr``, are
left out). When that dominator is the virtual root because the branch also reads another
model input (a transformer's attention mask), the block input is the operand the other
operand depends on instead (an identity block; see ``_side_input_block``); run-time
assertions left by ``torch.export`` may read branch nodes. Operands are accepted when the add is ``operator.add``/``iadd``,
``torch.add`` or ``Tensor.add``/``add_``/``__add__``/``__iadd__``.

What this finds on the zoo: every basic and bottleneck block of the ResNets
(identity, or projection where stride or width change), MobileNetV2's inverted
residuals that have an add, and in a ViT both residual adds of every transformer
block (``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``) as identity blocks.
DenseNet (concatenation, no add) and plain MLPs have none. Two operands that are
conv chains of equal length (a RepVGG-style sum) are ambiguous and not reported.

Cost: one dominator computation (near-linear), then per candidate add a walk
over its branch; blocks nested ``k`` deep are walked ``k`` times.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import torch
from torch import fx, nn

from .view import graph

__all__ = ["ResidualBlock", "residual_blocks"]

_ROOT = object()  # virtual source feeding every placeholder
_MAX_SHORTCUT = 6  # longest projection chain accepted (conv, norm, pooling, identity modules)

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__radd__", "__iadd__"}

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardtanh,
)  # fmt: skip
ACTIVATION_NAMES = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
    "gelu", "silu", "mish", "hardswish", "hardtanh",
}  # fmt: skip

_PROJECTION_MODULES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd,)
_SHORTCUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.Identity, nn.modules.dropout._DropoutNd,
)  # fmt: skip


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block, by fx node names.

    Attributes:
        input: the block input (the node both paths start from).
        add: the add joining branch and shortcut.
        output: the trailing activation when the block has one, else the add.
        branch: the branch's nodes in graph order; the last one is the add's operand.
        shortcut: the shortcut's nodes in graph order (empty when the add reads the
            block input directly; an ``nn.Identity`` call on the path is listed).
        kind: ``"identity"`` (no conv on the shortcut) or ``"projection"``.
        scope: qualified name of the innermost module owning the add, the branch and the
            shortcut (``"layer1.0"``), from ``nn_module_stack``; ``None`` at the top level.
    """

    input: str
    add: str
    output: str
    branch: tuple[str, ...]
    shortcut: tuple[str, ...]
    kind: str
    scope: str | None

    @property
    def shortcut_tail(self) -> str:
        """The add's shortcut operand (the block input for a direct identity)."""
        return self.shortcut[-1] if self.shortcut else self.input

    @property
    def branch_tail(self) -> str:
        """The add's branch operand."""
        return self.branch[-1]

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of the block except its input: branch, shortcut, add, activation."""
        tail = (self.add,) if self.output == self.add else (self.add, self.output)
        return self.branch + self.shortcut + tail


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = _module(gm, node)
    if module is not None:
        return isinstance(module, ACTIVATION_MODULES)
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        return name in ACTIVATION_NAMES
    return False


def _data_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The view restricted to nodes that depend on a model input, plus a virtual root.

    The output node stays: a branch value returned by the model is read outside the block.
    """
    view = graph(gm)
    sources = [n for n, attrs in view.nodes(data=True) if attrs.get("op") == "placeholder"]
    keep: set[str] = set(sources)
    for s in sources:
        keep |= nx.descendants(view, s)
    data = nx.DiGraph(view.subgraph(keep))
    data.add_edges_from((_ROOT, s) for s in sources)
    return data


def _shortcut_chain(
    gm: fx.GraphModule, data: nx.DiGraph, operand: str, start: str, add: str
) -> list[str] | None:
    """Nodes from ``start`` (excluded) to ``operand`` if they form a shortcut, else None."""
    chain: list[str] = []
    current, user = operand, add
    while current != start:
        if len(chain) >= _MAX_SHORTCUT or set(data.successors(current)) != {user}:
            return None
        module = _module(gm, _fx(data, current))
        preds = list(data.predecessors(current))
        if not isinstance(module, _SHORTCUT_MODULES) or len(preds) != 1:
            return None
        chain.append(current)
        current, user = preds[0], current
    return chain[::-1]


def _branch(data: nx.DiGraph, operand: str, start: str, add: str) -> set[str] | None:
    """Nodes between ``start`` and ``operand`` (inclusive), if no outside node reads them."""
    region = {operand}
    stack = [operand]
    while stack:
        for pred in data.predecessors(stack.pop()):
            if pred is _ROOT:
                return None
            if pred != start and pred not in region:
                region.add(pred)
                stack.append(pred)
    allowed = region | {add}
    for n in region:
        if any(u not in allowed and not _is_check(_fx(data, u)) for u in data.successors(n)):
            return None
    return region


def _containers(node: fx.Node) -> list[str] | None:
    """Qualified names of the modules containing ``node`` (not the node's own module)."""
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    names = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and names and names[-1] == node.target:
        names.pop()
    return names


def _scope(add: fx.Node, others: Iterable[fx.Node]) -> str | None:
    """Innermost module containing the add and every other node that records its scope.

    Nodes without ``nn_module_stack`` (inserted by a pass) are ignored; the add
    without one is at the top level.
    """
    common = _containers(add) or []
    for node in others:
        names = _containers(node)
        if names is None:
            continue
        size = 0
        while size < min(len(common), len(names)) and common[size] == names[size]:
            size += 1
        common = common[:size]
    return common[-1] if common else None


def _is_projection(gm: fx.GraphModule, data: nx.DiGraph, chain: list[str]) -> bool:
    return any(isinstance(_module(gm, _fx(data, n)), _PROJECTION_MODULES) for n in chain)


def _fx(data: nx.DiGraph, name: str) -> fx.Node:
    return data.nodes[name]["fx_node"]


def _block(
    gm: fx.GraphModule,
    data: nx.DiGraph,
    order: dict[str, int],
    start: str,
    add: str,
    operands: list[str],
) -> ResidualBlock | None:
    """The block ending at ``add`` with input ``start``, or None when it is not one."""
    chains = [_shortcut_chain(gm, data, o, start, add) for o in operands]
    # Prefer an identity shortcut, then the shorter projection chain.
    candidates = sorted(
        (_is_projection(gm, data, c), len(c), i) for i, c in enumerate(chains) if c is not None
    )
    if not candidates:
        return None
    projection, length, index = candidates[0]
    if projection and len(candidates) == 2 and candidates[1][:2] == (True, length):
        return None  # two equally long conv chains: no way to tell the shortcut
    shortcut = chains[index]
    assert shortcut is not None
    region = _branch(data, operands[1 - index], start, add)
    if region is None or (projection and len(region) <= length):
        return None

    add_node = _fx(data, add)
    scope = _scope(add_node, (_fx(data, n) for n in [*region, *shortcut]))
    return ResidualBlock(
        input=start,
        add=add,
        output=_block_output(gm, add_node, scope),
        branch=tuple(sorted(region, key=order.__getitem__)),
        shortcut=tuple(shortcut),
        kind="projection" if projection else "identity",
        scope=scope,
    )


def _block_output(gm: fx.GraphModule, add_node: fx.Node, scope: str | None) -> str:
    """The block's output: the add, or the activation right after it when that activation
    belongs to the block's scope (``relu(x + f(x))``)."""
    users = list(add_node.users)
    if len(users) == 1 and _is_activation(gm, users[0]):
        outside = _containers(users[0])
        if scope is None or outside is None or scope in outside:
            return users[0].name
    return add_node.name


def residual_blocks(gm: fx.GraphModule) -> list[ResidualBlock]:
    """Every residual block of ``gm``, in graph order of their adds (see the module doc)."""
    data = _data_graph(gm)
    idom = nx.immediate_dominators(data, _ROOT)
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    blocks: list[ResidualBlock] = []
    for node in gm.graph.nodes:
        if node.name not in data or not _is_add(node):
            continue
        operands = [a.name for a in node.args[:2] if isinstance(a, fx.Node) and a.name in data]
        if len(operands) != 2 or operands[0] == operands[1]:
            continue
        start = idom.get(node.name)
        if start is None:
            continue
        if start is _ROOT:  # the add also depends on another model input (a mask)
            block = _side_input_block(gm, data, order, node.name, operands)
        else:
            block = _block(gm, data, order, start, node.name, operands)
        if block is not None:
            blocks.append(block)
    return blocks


_CHECKS = {"_assert_tensor_metadata", "_assert_async", "_assert_scalar"}


def _is_check(node: fx.Node) -> bool:
    """A run-time assertion export left in the graph (no users, no value)."""
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
    return not node.users and name in _CHECKS


def _side_input_block(
    gm: fx.GraphModule, data: nx.DiGraph, order: dict[str, int], add: str, operands: list[str]
) -> ResidualBlock | None:
    """``x + f(x, side)`` where ``side`` comes from another model input (an attention mask).

    The side input moves the add's dominator to the virtual root; here the block input is
    the operand the other operand depends on, and the branch is every node on a path
    between them. The branch must still be closed (read only inside the branch, by the
    add, or by run-time assertions export left in the graph). Only identity blocks.
    """
    for index, start in enumerate(operands):
        other = operands[1 - index]
        before = nx.ancestors(data, other)
        if start not in before:
            continue
        region = (nx.descendants(data, start) & before) | {other}
        allowed = region | {add}
        for n in region:
            if any(u not in allowed and not _is_check(_fx(data, u)) for u in data.successors(n)):
                return None
        add_node = _fx(data, add)
        scope = _scope(add_node, (_fx(data, n) for n in region))
        return ResidualBlock(
            input=start,
            add=add,
            output=_block_output(gm, add_node, scope),
            branch=tuple(sorted(region, key=order.__getitem__)),
            shortcut=(),
            kind="identity",
            scope=scope,
        )
    return None
