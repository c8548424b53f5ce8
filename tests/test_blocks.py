"""Tests for ``rewriter.analysis.blocks.residual_blocks``."""

from __future__ import annotations

import operator
from dataclasses import FrozenInstanceError, dataclass

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from small_models import Net
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.blocks import ResidualBlock, residual_blocks
from rewriter.testing import RandomModel, random_model, random_models


def blocks_of(model: nn.Module, **trace_options) -> list[ResidualBlock]:
    return residual_blocks(rw.trace(model, **trace_options))


# -- zoo --------------------------------------------------------------------------------------


def expected_from_zoo_code(model: nn.Module) -> dict[str, str]:
    """{scope: kind} of the residual blocks the zoo's own module code defines."""
    expected: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (zoo.BasicBlock, zoo.Bottleneck)):
            projection = isinstance(m.shortcut, nn.Sequential)
            expected[name] = "projection" if projection else "identity"
        elif isinstance(m, zoo.InvertedResidual) and m.use_residual:
            expected[name] = "identity"
    return expected


@pytest.mark.parametrize(
    ("name", "count", "projections"),
    [
        ("resnet20", 9, 2),
        ("resnet8", 3, 2),
        ("bottleneck_resnet", 3, 3),
        ("multitask_resnet", 3, 2),
        ("digits_cnn", 1, 0),
        ("mobilenetv2", 3, 0),
        ("mlp", 0, 0),
        ("densenet", 0, 0),
    ],
)
def test_zoo_block_counts(name: str, count: int, projections: int) -> None:
    model = zoo.create(name)
    blocks = blocks_of(model)
    assert len(blocks) == count
    assert sum(b.kind == "projection" for b in blocks) == projections
    assert {b.scope: b.kind for b in blocks} == expected_from_zoo_code(model)


def test_resnet20_blocks_chain_and_trailing_relu() -> None:
    blocks = blocks_of(zoo.create("resnet20"))
    assert blocks[0].input == "stem_2"
    for prev, block in zip(blocks, blocks[1:], strict=False):
        assert block.input == prev.output  # each block starts where the previous one ends
    for block in blocks:
        prefix = block.scope.replace(".", "_")
        assert block.output == f"{prefix}_relu2"
        assert block.branch == tuple(
            f"{prefix}_{m}" for m in ("conv1", "bn1", "relu1", "conv2", "bn2")
        )
        if block.kind == "projection":
            assert block.shortcut == (f"{prefix}_shortcut_0", f"{prefix}_shortcut_1")
        else:
            assert block.shortcut == (f"{prefix}_shortcut",)  # the nn.Identity call


def test_mobilenetv2_inverted_residuals() -> None:
    blocks = blocks_of(zoo.create("mobilenetv2"))
    assert [b.scope for b in blocks] == ["features.3", "features.5", "features.7"]
    for b in blocks:
        assert b.shortcut == () and b.output == b.add  # x + conv(x), no activation after
        assert b.input == f"features_{int(b.scope.split('.')[1]) - 1}_conv_7"
        assert len(b.branch) == 8  # expand conv-BN-ReLU6, depthwise conv-BN-ReLU6, conv-BN


def test_vit_attention_and_mlp_residuals_are_identity_blocks() -> None:
    blocks = blocks_of(zoo.create("vit", depth=3))
    assert len(blocks) == 6
    assert [b.scope for b in blocks] == ["blocks.0"] * 2 + ["blocks.1"] * 2 + ["blocks.2"] * 2
    assert all(b.kind == "identity" and b.shortcut == () for b in blocks)
    attention, mlp = blocks[0], blocks[1]
    assert attention.input == "add"  # x + pos_embed is not a block: pos_embed is a parameter
    assert attention.branch[0] == "blocks_0_norm1"
    assert attention.branch[-1] == "blocks_0_attn_proj"
    assert {"blocks_0_attn_qkv", "matmul", "softmax", "matmul_1"} <= set(attention.branch)
    assert mlp.input == attention.add
    assert mlp.branch == ("blocks_0_norm2", "blocks_0_mlp_0", "blocks_0_mlp_1", "blocks_0_mlp_2")


def test_blocks_survive_rewrites() -> None:
    model = zoo.create("resnet8")
    gm = rw.rewrite(model, ["masks", "rbn"], zoo.example_inputs("resnet8"))
    blocks = residual_blocks(gm)
    assert [(b.scope, b.kind) for b in blocks] == [(b.scope, b.kind) for b in blocks_of(model)]


# -- hand-made blocks -------------------------------------------------------------------------


def test_hand_made_projection_block() -> None:
    (block,) = blocks_of(Net())
    assert block == ResidualBlock(
        input="relu",
        add="add",
        output="block_relu_1",
        branch=("block_conv1", "block_bn1", "block_relu", "block_conv2", "block_bn2"),
        shortcut=("block_downsample_0", "block_downsample_1"),
        kind="projection",
        scope="block",
    )
    assert block.branch_tail == "block_bn2" and block.shortcut_tail == "block_downsample_1"
    with pytest.raises(FrozenInstanceError):
        block.kind = "identity"  # type: ignore[misc]


class Functional(nn.Module):
    """Top-level identity blocks written four ways, with functional trailing activations."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(x + self.convs[0](x))
        x = F.gelu(torch.add(self.convs[1](x), x))
        x = x.add(torch.sigmoid(self.convs[2](x))).relu()
        y = self.convs[3](x)
        y += x
        return y


def test_functional_adds_and_activations() -> None:
    blocks = blocks_of(Functional())
    assert [(b.input, b.add, b.output) for b in blocks] == [
        ("x", "add", "relu"),
        ("relu", "add_1", "gelu"),
        ("gelu", "add_2", "relu_1"),
        ("relu_1", "add_3", "add_3"),
    ]
    assert blocks[2].branch == ("convs_2", "sigmoid")
    assert all(b.kind == "identity" and b.shortcut == () and b.scope is None for b in blocks)


class NotBlocks(nn.Module):
    """Adds that are not residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, ...]:
        two_inputs = x + z  # no common block input
        doubled = x + x  # no branch
        constant = x + 1.0  # one tensor operand
        param = x + self.bias  # a parameter is not computed from the input
        repvgg = self.bn_a(self.a(x)) + self.bn_b(self.b(x))  # two equal conv chains
        y = self.c(z)
        leaky = y + torch.relu(y)
        return two_inputs, doubled, constant, param, repvgg, leaky, y.relu() * 2


def test_adds_that_are_not_blocks() -> None:
    # Only y + relu(y) is a block: y is read elsewhere, but y is the block input.
    (leaky,) = blocks_of(NotBlocks())
    assert (leaky.input, leaky.add, leaky.branch, leaky.shortcut) == ("c", "add_5", ("relu",), ())


class Escaping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv1(x)
        return x + self.conv2(h), h  # h is read outside the branch


def test_branch_read_outside_is_not_a_block() -> None:
    assert blocks_of(Escaping()) == []


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.outer = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.outer(x)
        y = y + self.inner(y)  # inner block
        return x + y.relu()  # outer block around it


def test_nested_blocks() -> None:
    inner, outer = blocks_of(Nested())
    assert (inner.input, inner.branch, inner.output) == ("outer", ("inner",), "relu")
    assert (outer.input, outer.add) == ("x", "add_1")
    assert outer.branch == ("outer", "inner", "add", "relu")
    assert set(inner.nodes) < set(outer.branch)


# -- random residual stacks: every generated block is found -----------------------------------


@dataclass(frozen=True)
class BlockSpec:
    widen: bool
    stride: int
    shortcut: str  # direct | module | projection
    shortcut_bn: bool
    ops: tuple[str, ...]
    trailing: str | None  # None | module | function | method
    style: str  # op | torch | method
    branch_first: bool


class Inner(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bn(self.conv(x))


class RandomBlock(nn.Module):
    def __init__(self, spec: BlockSpec, c_in: int) -> None:
        super().__init__()
        self.spec = spec
        c_out = 2 * c_in if spec.widen else c_in
        self.conv = nn.Conv2d(c_in, c_out, 3, spec.stride, 1, bias=False)
        self.ops = nn.ModuleList()
        for op in spec.ops:
            if op == "bn":
                self.ops.append(nn.BatchNorm2d(c_out))
            elif op == "relu":
                self.ops.append(nn.ReLU())
            elif op == "dw":
                self.ops.append(nn.Conv2d(c_out, c_out, 3, 1, 1, groups=c_out))
            elif op == "inner":
                self.ops.append(Inner(c_out))
            else:
                self.ops.append(nn.Identity())  # placeholder: functional op
        self.shortcut: nn.Module | None = None
        if spec.shortcut == "module":
            self.shortcut = nn.Identity()
        elif spec.shortcut == "projection":
            layers = [nn.Conv2d(c_in, c_out, 1, spec.stride, bias=False)]
            self.shortcut = nn.Sequential(*layers, *([nn.BatchNorm2d(c_out)] * spec.shortcut_bn))
        self.act = nn.ReLU() if spec.trailing == "module" else None
        self.c_out = c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        for op, module in zip(self.spec.ops, self.ops, strict=True):
            if op == "gelu":
                y = F.gelu(y)
            elif op == "swish":
                y = y * torch.sigmoid(y)
            else:
                y = module(y)
        s = x if self.shortcut is None else self.shortcut(x)
        a, b = (y, s) if self.spec.branch_first else (s, y)
        if self.spec.style == "torch":
            out = torch.add(a, b)
        elif self.spec.style == "method":
            out = a.add(b)
        else:
            out = a + b
        if self.act is not None:
            return self.act(out)
        if self.spec.trailing == "function":
            return torch.relu(out)
        if self.spec.trailing == "method":
            return out.relu()
        return out


class Stack(nn.Module):
    def __init__(self, specs: list[BlockSpec]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        blocks, c = [], 4
        for spec in specs:
            blocks.append(RandomBlock(spec, c))
            c = blocks[-1].c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@st.composite
def block_specs(draw: st.DrawFn) -> BlockSpec:
    widen, stride = draw(st.booleans()), draw(st.sampled_from((1, 2)))
    changes = widen or stride == 2
    shortcut = (
        "projection" if changes else draw(st.sampled_from(("direct", "module", "projection")))
    )
    # A projection (1-2 nodes) needs a longer branch: the conv plus at least two ops.
    ops = draw(
        st.lists(
            st.sampled_from(("bn", "relu", "dw", "gelu", "swish", "inner")),
            min_size=2,
            max_size=5,
        )
    )
    return BlockSpec(
        widen=widen,
        stride=stride,
        shortcut=shortcut,
        shortcut_bn=draw(st.booleans()),
        ops=tuple(ops),
        trailing=draw(st.sampled_from((None, "module", "function", "method"))),
        style=draw(st.sampled_from(("op", "torch", "method"))),
        branch_first=draw(st.booleans()),
    )


def containers(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]


@settings(max_examples=40, deadline=None)
@given(st.lists(block_specs(), min_size=1, max_size=4))
def test_random_residual_stacks_are_found_exactly(specs: list[BlockSpec]) -> None:
    gm = rw.trace(Stack(specs))
    blocks = residual_blocks(gm)
    outer = {b.scope: b for b in blocks if b.scope and b.scope.count(".") == 1}
    inner = [b for b in blocks if b.scope and b.scope.count(".") == 3]
    assert len(blocks) == len(outer) + len(inner)
    assert sorted(outer) == [f"blocks.{i}" for i in range(len(specs))]
    assert len(inner) == sum(spec.ops.count("inner") for spec in specs)
    nodes = {n.name: n for n in gm.graph.nodes}
    previous = "stem"
    for i, spec in enumerate(specs):
        block = outer[f"blocks.{i}"]
        scope = f"blocks.{i}"
        assert block.input == previous
        assert block.kind == ("projection" if spec.shortcut == "projection" else "identity")
        expected_shortcut = {"direct": 0, "module": 1, "projection": 1 + spec.shortcut_bn}
        assert len(block.shortcut) == expected_shortcut[spec.shortcut]
        assert (block.output != block.add) == (spec.trailing is not None)
        inside = {name for name, n in nodes.items() if scope in containers(n)}
        assert set(block.branch) == inside - set(block.shortcut) - {block.add, block.output}
        previous = block.output
    for b in inner:
        owner = outer[b.scope.rsplit(".", 2)[0]]
        assert b.kind == "identity" and set(b.branch) < set(owner.branch)


# -- random DAGs: invariants and an independent brute-force oracle ----------------------------


def data_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Input-dependent nodes and their edges, built straight from the fx graph."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            g.add_node(node.name)
        for arg in node.all_input_nodes:
            if arg.name in g and node.op != "output":
                g.add_edge(arg.name, node.name)
    return g


def nearest_dominator(g: nx.DiGraph, sources: list[str], target: str) -> str | None:
    """Brute force: the closest node whose removal cuts ``target`` off every source."""
    dominators = []
    for candidate in nx.ancestors(g, target):
        h = g.copy()
        h.remove_node(candidate)
        if not any(s in h and nx.has_path(h, s, target) for s in sources):
            dominators.append(candidate)
    return max(dominators, key=lambda d: len(nx.ancestors(g, d)), default=None)


SHORTCUT_CLASSES = (nn.Conv2d, nn.BatchNorm2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)


def oracle(gm: fx.GraphModule) -> dict[str, str]:
    """{add: kind} of every residual block, by the documented definition, with set algebra."""
    g = data_graph(gm)
    sources = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    modules = dict(gm.named_modules())
    nodes = {n.name: n for n in gm.graph.nodes}
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.target is not operator.add or node.name not in g:
            continue
        operands = [a.name for a in node.args if isinstance(a, fx.Node) and a.name in g]
        if len(operands) != 2 or operands[0] == operands[1]:
            continue
        d = nearest_dominator(g, sources, node.name)
        if d is None:
            continue
        regions = [
            set() if o == d else ({o} | (nx.ancestors(g, o) & nx.descendants(g, d)))
            for o in operands
        ]

        def closed(region: set[str], add: str = node.name) -> bool:
            return all(set(g.successors(n)) <= region | {add} for n in region)

        def chain_kind(region: set[str]) -> str | None:
            if not region:
                return "identity"
            if len(region) > 6 or not closed(region):
                return None
            if any(g.in_degree(n) != 1 or g.out_degree(n) != 1 for n in region):
                return None
            ms = [modules.get(str(nodes[n].target)) for n in region]
            if not all(nodes[n].op == "call_module" for n in region):
                return None
            if not all(isinstance(m, SHORTCUT_CLASSES) for m in ms):
                return None
            return "projection" if any(isinstance(m, nn.Conv2d) for m in ms) else "identity"

        kinds = [chain_kind(r) for r in regions]
        options = sorted(
            (
                (k == "projection", len(r), i)
                for i, (k, r) in enumerate(zip(kinds, regions, strict=True))
                if k
            ),
        )
        if not options:
            continue
        projection, length, i = options[0]
        if projection and len(options) == 2 and options[1][:2] == (True, length):
            continue
        branch = regions[1 - i]
        if branch and closed(branch) and (not projection or len(branch) > length):
            found[node.name] = "projection" if projection else "identity"
    return found


def check_invariants(gm: fx.GraphModule, blocks: list[ResidualBlock]) -> None:
    g = data_graph(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    sources = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for b in blocks:
        add = nodes[b.add]
        assert {a.name for a in add.args if isinstance(a, fx.Node)} == {
            b.branch_tail,
            b.shortcut_tail,
        }
        assert b.input == nearest_dominator(g, sources, b.add)
        branch = set(b.branch)
        assert b.input not in branch and not branch & set(b.shortcut)
        for n in branch:  # the branch starts at the input and is read only inside the block
            assert set(g.predecessors(n)) <= branch | {b.input}
            assert set(g.successors(n)) <= branch | {b.add}
        path = [b.input, *b.shortcut]
        for u, v in zip(path, path[1:], strict=False):
            assert list(g.predecessors(v)) == [u]
        convs = [isinstance(gm.get_submodule(str(nodes[n].target)), nn.Conv2d) for n in b.shortcut]
        assert b.kind == ("projection" if any(convs) else "identity")
    for a in blocks:  # branches are nested or disjoint
        for b in blocks:
            if a is not b and set(a.branch) & set(b.branch):
                assert set(a.nodes) <= set(b.branch) or set(b.nodes) <= set(a.branch)


def check_random_model(rm: RandomModel) -> dict[str, str]:
    gm = rw.trace(rm.model)
    blocks = residual_blocks(gm)
    check_invariants(gm, blocks)
    found = {b.add: b.kind for b in blocks}
    assert found == oracle(gm), rm.description
    return found


@settings(max_examples=50, deadline=None)
@given(random_models())
def test_random_dags_invariants_and_oracle(rm: RandomModel) -> None:
    check_random_model(rm)


def test_random_dags_contain_both_kinds() -> None:
    kinds: list[str] = []
    for seed in range(30):
        kinds += check_random_model(random_model(seed)).values()
    assert kinds.count("identity") > 0 and kinds.count("projection") > 0
