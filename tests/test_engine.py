"""Tests of the engine: tracing, patterns, rules, the pass manager, the registry, reports.

Every model here is small and written in this file; test passes are registered
under names starting with ``test_engine_`` so they never clash with real passes.
"""

from __future__ import annotations

import copy
import inspect
import operator
import warnings
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from small_models import Block, Net
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter.registry import coerce

# ---------------------------------------------------------------------------
# Small models
# ---------------------------------------------------------------------------


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def inputs() -> tuple[Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


class DataDependentGate(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return x


class WithGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = DataDependentGate()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.gate(self.conv(x)))


class UntraceableTop(nn.Module):
    """Its own forward branches on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if y.mean() > 0:  # the offending line
            y = y * 2
        return y


class MyConv(nn.Conv2d):
    """A user subclass of Conv2d (not a torch.nn leaf unless asked)."""


class WithMyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = MyConv(3, 4, 3, padding=1)
        self.lin = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x).mean(dim=(2, 3))
        return self.lin(x)


class Twice(nn.Module):
    """Uses its input twice in one add: ``x + x``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + x)


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def module_targets(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


# ---------------------------------------------------------------------------
# Test passes
# ---------------------------------------------------------------------------


class Probe(rw.RewriterModule):
    """Identity-like inserted module with one parameter (``x * scale``, scale = 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def add_probe(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """relu(x) -> probe(relu(x))"""
    node = m["act"]
    name = ctx.add_module(node, "probe", Probe())
    return ctx.call_module(name, (node,))


@rw.register
@dataclass(frozen=True)
class ProbePass(rw.Pass):
    """relu(x) => probe(relu(x))"""

    name = "test_engine_probe"
    preserves_outputs = True

    def rules(self) -> list:
        return [(rw.P.module(nn.ReLU, name="act"), add_probe)]


def relu_twice(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """relu(x) -> relu(relu(x)): matches its own output forever."""
    node = m.root
    return ctx.call_module(str(node.target), (node,))


@rw.register
@dataclass(frozen=True)
class LoopPass(rw.Pass):
    """relu(x) => relu(relu(x)) (never reaches a fixed point)"""

    name = "test_engine_loop"

    def rules(self) -> list:
        return [(rw.P.module(nn.ReLU), relu_twice)]


def widen_output(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """fc(x) -> cat([fc(x), fc(x)], 1): the output gets twice as wide."""
    node = m.root
    return ctx.graph.call_function(torch.cat, ([node, node], 1))


@rw.register
@dataclass(frozen=True)
class BreakShapesPass(rw.Pass):
    """fc(x) => cat([fc(x), fc(x)]) (changes the output shape)"""

    name = "test_engine_break_shapes"

    def rules(self) -> list:
        return [(rw.P.module(nn.Linear), widen_output)]


def flatten_before(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """block.conv1(x) -> block.conv1(flatten(x)): fails when run."""
    node = m.root
    if node.target != "block.conv1":
        return None
    with ctx.graph.inserting_before(node):
        flat = ctx.graph.call_method("flatten", (node.args[0], 1))
    node.args = (flat,)
    return node


@rw.register
@dataclass(frozen=True)
class CrashPass(rw.Pass):
    """block.conv1(x) => block.conv1(flatten(x)) (the graph no longer runs)"""

    name = "test_engine_crash"

    def rules(self) -> list:
        return [(rw.P.module(nn.Conv2d), flatten_before)]


def double(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """relu(x) -> relu(x) * 2"""
    return ctx.graph.call_function(operator.mul, (m.root, 2.0))


@rw.register
@dataclass(frozen=True)
class LiarPass(rw.Pass):
    """relu(x) => relu(x) * 2, while claiming to preserve outputs"""

    name = "test_engine_liar"
    preserves_outputs = True

    def rules(self) -> list:
        return [(rw.P.module(nn.ReLU), double)]


def insert_then_decline(ctx: rw.RewriteContext, m: rw.Match) -> None:
    """Inserts a node and then says "does not apply": a builder bug."""
    ctx.graph.call_function(torch.neg, (m.root,))
    return None


@rw.register
@dataclass(frozen=True)
class SloppyPass(rw.Pass):
    """relu(x) => relu(x) with a dangling neg (builder returns None)"""

    name = "test_engine_sloppy"

    def rules(self) -> list:
        return [(rw.P.module(nn.ReLU), insert_then_decline)]


_SHARED = Probe()  # one instance for every match: what a builder must never do


def add_shared_probe(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    name = ctx.add_module(m.root, "shared", _SHARED)
    return ctx.call_module(name, (m.root,))


@rw.register
@dataclass(frozen=True)
class SharedPass(rw.Pass):
    """relu(x) => shared_probe(relu(x)), one module instance for all matches"""

    name = "test_engine_shared"

    def rules(self) -> list:
        return [(rw.P.module(nn.ReLU), add_shared_probe)]


def twin_of_fc(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """fc(x) -> twin(fc(x)) where twin *is* the graph's own fc: shares its parameters."""
    name = ctx.add_module(m.root, "twin", ctx.gm.get_submodule("fc"))
    return ctx.call_module(name, (m.root,))


@rw.register
@dataclass(frozen=True)
class TwinPass(rw.Pass):
    """fc(x) => fc(fc(x)) through a second name for the same module"""

    name = "test_engine_twin"

    def rules(self) -> list:
        return [(rw.P.module(nn.Linear, name="fc"), twin_of_fc)]


_SHARED_BN = nn.BatchNorm2d(8)  # swapped in for several matches: must be refused too


def swap_in_shared_bn(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node | None:
    """bn(x) -> shared_bn(x) for every 8-channel BN, one instance for all matches."""
    if ctx.module(m.root).num_features != 8:
        return None
    return ctx.replace_module(m.root, _SHARED_BN)


@rw.register
@dataclass(frozen=True)
class SharedReplacePass(rw.Pass):
    """bn(x) => shared_bn(x) through replace_module, one instance for all matches"""

    name = "test_engine_shared_replace"

    def rules(self) -> list:
        return [(rw.P.module(nn.BatchNorm2d), swap_in_shared_bn)]


def bypass(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """bn(x) -> x"""
    return m.root.args[0]


@rw.register
@dataclass(frozen=True)
class BypassBNPass(rw.Pass):
    """bn(x) => x (the BN modules become orphans)"""

    name = "test_engine_bypass_bn"

    def rules(self) -> list:
        return [(rw.P.module(nn.BatchNorm2d), bypass)]


@rw.register
@dataclass(frozen=True)
class OptionsPass(rw.Pass):
    """x => x (a pass with one option of every supported type)"""

    name = "test_engine_options"
    preserves_outputs = True

    flag: bool = rw.option(False, "a boolean")
    count: int = rw.option(1, "an integer")
    ratio: float = rw.option(0.5, "a number")
    names: tuple[str, ...] = rw.option((), "a list of strings")
    mode: Literal["fast", "exact"] = rw.option("fast", "one of two words")
    limit: int | None = rw.option(None, "an optional integer")

    def apply(self, gm: fx.GraphModule, ctx: rw.RewriteContext) -> None:
        ctx.note(f"flag={self.flag} count={self.count}")


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------


def test_trace_keeps_torch_layers_as_call_module_nodes() -> None:
    gm = rw.trace(net())
    assert module_targets(gm) == [
        "stem", "bn", "relu",
        "block.conv1", "block.bn1", "block.relu", "block.conv2", "block.bn2",
        "block.downsample.0", "block.downsample.1", "block.relu",
        "fc",
    ]  # fmt: skip
    torch.testing.assert_close(gm(*inputs()), net()(*inputs()))
    assert rw.opaque_modules(gm) == {}


def test_untraceable_submodule_becomes_opaque_with_reason() -> None:
    model = WithGate()
    gm = rw.trace(model)
    opaque = rw.opaque_modules(gm)
    assert list(opaque) == ["gate"]
    reason = opaque["gate"]
    assert "control flow" in reason
    line = inspect.getsourcelines(DataDependentGate.forward)[1] + 1  # the `if` line
    assert f"test_engine.py:{line}" in reason
    assert module_targets(gm) == ["conv", "gate", "relu"]
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gm(x), model(x))


def test_passes_warn_about_opaque_modules_and_leave_them_alone() -> None:
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="cannot see inside opaque module.*gate"):
        gm = rw.rewrite(WithGate(), ["masks"], (x,))
    rep = rw.report(gm)
    assert list(rep.opaque) == ["gate"]
    assert rep.passes[0].fired == 1  # only the outer conv
    assert type(gm.get_submodule("gate.conv")) is nn.Conv2d
    assert "opaque module 'gate'" in rep.table()


def test_untraceable_forward_raises_trace_error_with_class_and_line() -> None:
    with pytest.raises(rw.TraceError) as info:
        rw.trace(UntraceableTop())
    message = str(info.value)
    source, first = inspect.getsourcelines(UntraceableTop.forward)
    line = first + next(i for i, s in enumerate(source) if "the offending line" in s)
    assert "UntraceableTop" in message
    assert f"test_engine.py:{line}" in message
    assert "leaves" in message and "torch.where" in message  # what to do
    with pytest.raises(rw.TraceError, match="UntraceableTop"):
        rw.rewrite(UntraceableTop(), ["masks"])


def test_leaves_by_name_and_by_class() -> None:
    by_name = rw.trace(net(), leaves=["block"])
    assert module_targets(by_name) == ["stem", "bn", "relu", "block", "fc"]
    by_class = rw.trace(net(), leaves=[Block])
    assert module_targets(by_class) == ["stem", "bn", "relu", "block", "fc"]
    nested = rw.trace(net(), leaves=["block.downsample"])
    assert "block.downsample" in module_targets(nested)
    assert "block.downsample.0" not in module_targets(nested)
    torch.testing.assert_close(by_name(*inputs()), net()(*inputs()))


def test_leaves_are_validated() -> None:
    with pytest.raises(rw.TraceError, match="do not exist.*nope"):
        rw.trace(net(), leaves=["nope"])
    with pytest.raises(TypeError, match="leaves"):
        rw.trace(net(), leaves=[3])  # type: ignore[list-item]


def test_leaves_reach_passes_through_rewrite() -> None:
    gm = rw.rewrite(net(), ["masks"], inputs(), leaves=["block"])
    assert rw.report(gm).passes[0].fired == 2  # stem and fc; the block is a leaf
    assert type(gm.get_submodule("block.conv1")) is nn.Conv2d


def test_rewrite_never_mutates_the_input_model() -> None:
    model = net()
    model.train()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_types = {n: type(m) for n, m in model.named_modules()}
    gm = rw.rewrite(model, ["masks", ("rbn", {"init": "paper"})], inputs())
    gm.train()
    gm(*inputs())  # updates running stats of the copy only
    rw.passes.masks.set_mask(gm, "stem", torch.zeros_like(gm.stem.weight_mask))
    after_state = model.state_dict()
    assert list(after_state) == list(before_state)
    for key, value in before_state.items():
        assert torch.equal(after_state[key], value), key
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    assert model.training and not hasattr(model, "rewriter_source")
    own = {p.data_ptr() for p in model.parameters()}
    assert not own & {p.data_ptr() for p in gm.parameters()}


def test_rewriter_source_is_copied_to_the_graph() -> None:
    model = net()
    model.rewriter_source = {"model": "test:net", "options": {}}
    gm = rw.rewrite(model, ["masks"], inputs())
    assert rw.report(gm).source == {"model": "test:net", "options": {}}


def test_rewrite_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        rw.rewrite("resnet", ["masks"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Patterns
# ---------------------------------------------------------------------------


def test_module_pattern_matches_by_isinstance_including_subclasses() -> None:
    gm = rw.trace(WithMyConv(), leaves=[MyConv])
    conv = node_named(gm, "conv")
    assert rw.P.module(nn.Conv2d).match(conv, gm) == {}
    assert rw.P.module(MyConv, name="c").match(conv, gm) == {"c": conv}
    assert rw.P.module(nn.Linear).match(conv, gm) is None
    assert rw.P.module(nn.Linear, nn.Conv2d).match(conv, gm) == {}
    assert rw.P.module().match(conv, gm) == {}  # any module
    assert rw.P.function(torch.relu).match(conv, gm) is None  # wrong op


def test_function_pattern_matches_by_function() -> None:
    gm = rw.trace(net())
    add = node_named(gm, "add")
    pool = node_named(gm, "adaptive_avg_pool2d")
    assert rw.P.function(operator.add).match(add, gm) == {}
    assert rw.P.function(torch.add).match(add, gm) is None
    assert rw.P.function(torch.mul, operator.add).match(add, gm) == {}
    assert rw.P.function(F.adaptive_avg_pool2d).match(pool, gm) == {}
    assert rw.P.function(F.adaptive_avg_pool2d).match(add, gm) is None
    assert rw.P.method("add").match(add, gm) is None  # call_function, not a method


def test_method_pattern_matches_by_name() -> None:
    gm = rw.trace(net())
    flat = node_named(gm, "flatten")
    assert rw.P.method("flatten", name="f").match(flat, gm) == {"f": flat}
    assert rw.P.method("view", "reshape").match(flat, gm) is None
    assert rw.P.function(torch.flatten).match(flat, gm) is None


def test_src_sub_patterns_bind_names() -> None:
    gm = rw.trace(net())
    conv_bn_relu = rw.P.module(
        nn.ReLU,
        name="act",
        src=(rw.P.module(nn.BatchNorm2d, name="bn", src=(rw.P.module(nn.Conv2d, name="conv"),)),),
    )
    first = node_named(gm, "block_relu")
    bound = conv_bn_relu.match(first, gm)
    assert bound == {
        "act": first,
        "bn": node_named(gm, "block_bn1"),
        "conv": node_named(gm, "block_conv1"),
    }
    after_add = node_named(gm, "block_relu_1")  # relu(add(...)): bn pattern fails
    assert conv_bn_relu.match(after_add, gm) is None
    residual = rw.P.function(
        operator.add,
        src=(None, rw.P.module(nn.BatchNorm2d, name="shortcut", scope="block.downsample*")),
    )
    assert residual.match(node_named(gm, "add"), gm) == {
        "shortcut": node_named(gm, "block_downsample_1")
    }
    match = rw.Match(first, bound)
    assert match["bn"] is bound["bn"]
    with pytest.raises(KeyError, match="gamma.*bound"):
        match["gamma"]


def test_a_name_bound_twice_must_be_the_same_node() -> None:
    same = rw.P.function(operator.add, src=(rw.P.any(name="x"), rw.P.any(name="x")))
    twice = rw.trace(Twice())
    assert same.match(node_named(twice, "add"), twice) == {"x": node_named(twice, "x")}
    gm = rw.trace(net())
    assert same.match(node_named(gm, "add"), gm) is None  # add(bn2, downsample)
    too_many = rw.P.method("flatten", src=(None, None, None))
    assert too_many.match(node_named(gm, "flatten"), gm) is None


def test_scope_globs_over_owning_modules() -> None:
    gm = rw.trace(net())
    relus = [n for n in gm.graph.nodes if n.op == "call_module" and "relu" in str(n.target)]
    in_block = rw.P.module(nn.ReLU, scope="block")
    assert [n.name for n in relus if in_block.match(n, gm) is not None] == [
        "block_relu",
        "block_relu_1",
    ]
    top = rw.P.module(nn.ReLU, scope="relu")
    assert [n.name for n in relus if top.match(n, gm) is not None] == ["relu"]
    shortcut = rw.P.module(nn.BatchNorm2d, scope="*downsample*")
    assert [n.name for n in gm.graph.nodes if shortcut.match(n, gm) is not None] == [
        "block_downsample_1"
    ]
    assert rw.P.function(operator.add, scope="block").match(node_named(gm, "add"), gm) == {}
    assert rw.P.function(operator.add, scope="stem").match(node_named(gm, "add"), gm) is None


# ---------------------------------------------------------------------------
# A user-defined pass through the context
# ---------------------------------------------------------------------------


def test_user_pass_adds_modules_with_predictable_unique_names() -> None:
    model = net()
    gm = rw.rewrite(model, ["test_engine_probe"], inputs())
    expected = ["relu_probe", "block_relu_probe", "block_relu_probe_1"]
    record = rw.report(gm).passes[0]
    assert record.name == "test_engine_probe"
    assert record.modules_added == expected
    assert record.matches == {"add_probe": 3}
    assert record.fired == 3
    assert record.params_added == 3 and record.buffers_added == 0
    assert record.modules_replaced == []
    for name in expected:
        assert isinstance(gm.get_submodule(name), Probe)
    # every ReLU call now feeds exactly one probe, and the probes are distinct modules
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.ReLU):
            (user,) = node.users
            assert user.op == "call_module" and str(user.target).endswith(("_probe", "_probe_1"))
    assert len({id(gm.get_submodule(n).scale) for n in expected}) == 3
    assert [f"{n}.scale" for n in expected] == [k for k in gm.state_dict() if k.endswith(".scale")]
    torch.testing.assert_close(gm(*inputs()), model(*inputs()))


def test_add_module_names_from_a_string_and_resolve_clashes() -> None:
    gm = rw.trace(net())
    ctx = rw.RewriteContext(gm, "manual")
    assert ctx.add_module("layer1.0.bn1", "gate", Probe()) == "layer1_0_bn1_gate"
    assert ctx.add_module("layer1.0.bn1", "gate", Probe()) == "layer1_0_bn1_gate_1"
    assert ctx.add_module(node_named(gm, "add"), "gate", Probe()) == "add_gate"
    assert ctx.modules_added == ["layer1_0_bn1_gate", "layer1_0_bn1_gate_1", "add_gate"]


# ---------------------------------------------------------------------------
# The pass manager's checks and errors
# ---------------------------------------------------------------------------


def test_rule_matching_its_own_output_hits_the_step_cap() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["test_engine_loop"], inputs())
    err = info.value
    assert "step cap" in str(err)
    assert "relu_twice" in str(err)
    assert err.rule == "relu_twice" and err.pass_name == "test_engine_loop"
    assert err.node is not None


def test_shape_breaking_pass_names_the_pass_and_the_history() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["masks", "rbn", "test_engine_break_shapes"], inputs())
    err = info.value
    message = str(err)
    assert "output shapes changed" in message
    assert "[(2, 5)] before" in message and "[(2, 10)] after" in message
    assert "'test_engine_break_shapes'" in message
    assert "passes already run: 'masks', 'rbn'" in message
    assert err.pass_name == "test_engine_break_shapes"
    assert err.history == ["masks", "rbn"]


def test_pass_whose_graph_no_longer_runs_names_the_pass_and_history() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["masks", "test_engine_crash"], inputs())
    err = info.value
    assert "fails on the example inputs" in str(err)
    assert err.pass_name == "test_engine_crash" and err.history == ["masks"]
    assert "passes already run: 'masks'" in str(err)
    assert err.node == "block_conv1"  # the node that failed, even after an earlier pass


def test_crash_in_the_first_pass_names_the_failing_node() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["test_engine_crash"], inputs())
    assert info.value.node == "block_conv1"
    assert "node 'block_conv1'" in str(info.value)


def test_first_pass_error_says_no_passes_ran_before() -> None:
    with pytest.raises(rw.PassError, match="passes already run: none") as info:
        rw.rewrite(net(), ["test_engine_break_shapes"], inputs())
    assert info.value.history == []


def test_preserves_outputs_is_checked() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["test_engine_liar"], inputs())
    assert "preserves_outputs" in str(info.value)
    assert info.value.pass_name == "test_engine_liar"
    # the same pass without example inputs cannot be checked and goes through
    gm = rw.rewrite(net(), ["test_engine_liar"])
    assert rw.report(gm).passes[0].fired == 3


def test_checks_can_be_relaxed() -> None:
    gm = rw.rewrite(net(), ["test_engine_liar"], inputs(), checks=rw.Checks(numerics=False))
    assert rw.report(gm).passes[0].fired == 3
    assert not torch.allclose(gm(*inputs()), net()(*inputs()))  # the relus are doubled


def test_numeric_check_compares_with_the_previous_pass_output() -> None:
    """A preserving pass after a non-preserving one is compared with the latter's output."""
    gm = rw.rewrite(net(), [("rbn", {"init": "paper"}), "masks", "test_engine_probe"], inputs())
    assert [p.fired for p in rw.report(gm).passes] == [4, 5, 3]
    with pytest.raises(rw.PassError, match="preserves_outputs") as info:
        rw.rewrite(net(), [("rbn", {"init": "paper"}), "test_engine_liar"], inputs())
    assert info.value.history == ["rbn"]


def test_inserted_modules_follow_the_model_training_mode() -> None:
    for training in (True, False):
        gm = rw.rewrite(net().train(training), ["masks", "rbn", "test_engine_probe"], inputs())
        assert gm.training is training
        for name in ("stem", "bn", "block.bn1", "fc"):
            assert gm.get_submodule(name).training is training, (training, name)
        for name in ("relu_probe", "block_relu_probe", "block_relu_probe_1"):
            assert gm.get_submodule(name).training is training, (training, name)


def test_trace_keeps_the_training_mode_of_every_module() -> None:
    """fx recreates container modules (``block``); they must keep the model's mode."""
    for training in (True, False):
        gm = rw.trace(net().train(training))
        modes = {name: m.training for name, m in gm.named_modules()}
        assert modes == dict.fromkeys(modes, training)


def test_builder_returning_none_after_inserting_nodes_is_an_error() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["test_engine_sloppy"], inputs())
    message = str(info.value)
    assert "returned None but inserted nodes" in message
    assert "insert_then_decline" in message
    assert info.value.rule == "insert_then_decline"


def test_builders_may_not_share_one_module_between_matches() -> None:
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["test_engine_shared"], inputs())
    message = str(info.value)
    assert "share tensors" in message and "scale" in message
    assert info.value.rule == "add_shared_probe"


def test_replace_module_may_not_share_one_module_between_matches() -> None:
    """Swapping the same module instance into two places would tie their parameters."""
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(net(), ["test_engine_shared_replace"], inputs())
    assert "share tensors" in str(info.value)
    assert info.value.rule == "swap_in_shared_bn"


def test_new_modules_may_not_share_parameters_with_the_graph() -> None:
    with pytest.raises(rw.PassError, match="share tensors.*weight"):
        rw.rewrite(net(), ["test_engine_twin"], inputs())


def test_orphan_submodules_are_removed() -> None:
    gm = rw.rewrite(net(), ["test_engine_bypass_bn"], inputs())
    names = dict(gm.named_modules())
    for bn in ("bn", "block.bn1", "block.bn2", "block.downsample.1"):
        assert bn not in names
        assert not any(k.startswith(f"{bn}.") for k in gm.state_dict())
    assert "block.downsample.0" in names
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert rw.report(gm).passes[0].fired == 4
    gm.graph.lint()


def test_passes_run_in_the_given_order_and_the_report_counts() -> None:
    gm = rw.rewrite(net(), ["rbn", "masks", "test_engine_probe"], inputs())
    rep = rw.report(gm)
    assert [p.name for p in rep.passes] == ["rbn", "masks", "test_engine_probe"]
    rbn, masks, probe = rep.passes
    assert rbn.matches == {"to_rbn": 4}
    assert rbn.modules_replaced == ["bn", "block.bn1", "block.bn2", "block.downsample.1"]
    assert rbn.params_added == 3 * (4 + 8 + 8 + 8)
    assert masks.fired == 5 and masks.modules_added == []
    assert masks.buffers_added == 3 * 4 * 9 + 8 * 4 * 9 + 8 * 8 * 9 + 8 * 4 + 5 * 8
    assert probe.fired == 3 and probe.params_added == 3
    assert all(p.seconds >= 0 for p in rep.passes)
    assert rep.pipeline() == [
        ("rbn", {"init": "preserve", "include": [], "exclude": []}),
        ("masks", {"include": [], "exclude": [], "classes": []}),
        ("test_engine_probe", {}),
    ]
    table = rep.table()
    for name in ("rbn", "masks", "test_engine_probe", "fired", "params +"):
        assert name in table
    assert str(rep) == table


def test_rewrite_continues_a_rewritten_module() -> None:
    gm = rw.rewrite(net(), ["masks"], inputs())
    more = rw.rewrite(gm, ["test_engine_probe"], inputs())
    assert [p.name for p in rw.report(more).passes] == ["masks", "test_engine_probe"]
    assert [p.name for p in rw.report(gm).passes] == ["masks"]  # the input is not mutated
    with pytest.raises(rw.PassError, match="passes already run: 'masks', 'test_engine_probe'"):
        rw.rewrite(more, ["test_engine_break_shapes"], inputs())


def test_report_of_a_plain_module_is_an_error() -> None:
    with pytest.raises(rw.RewriterError, match="not produced by rewriter.rewrite"):
        rw.report(net())


def test_passes_receive_pass_objects_and_single_names() -> None:
    gm = rw.rewrite(net(), ProbePass(), inputs())  # a single pass object
    assert rw.report(gm).passes[0].name == "test_engine_probe"
    gm = rw.rewrite(net(), "masks", inputs())  # a single name
    assert rw.report(gm).passes[0].fired == 5


# ---------------------------------------------------------------------------
# Registry and options
# ---------------------------------------------------------------------------


def test_unknown_pass_name_suggests_the_closest() -> None:
    with pytest.raises(rw.OptionError) as info:
        rw.make_pass("mask")
    message = str(info.value)
    assert "unknown pass 'mask'" in message
    assert "Did you mean 'masks'?" in message
    assert "rbn" in message and "test_engine_probe" in message  # the valid ones
    with pytest.raises(rw.OptionError, match="unknown pass 'rbm'.*'rbn'"):
        rw.rewrite(net(), ["masks", "rbm"])
    assert isinstance(info.value, ValueError)


def test_unknown_option_suggests_and_lists_valid_options() -> None:
    with pytest.raises(rw.OptionError) as info:
        rw.make_pass(("masks", {"exlude": ["fc"]}))
    message = str(info.value)
    assert "unknown option 'exlude'" in message
    assert "did you mean 'exclude'?" in message
    assert "include: list of str" in message and "classes: list of str" in message


def test_bad_option_types_are_option_errors() -> None:
    with pytest.raises(rw.OptionError, match="option 'include'.*list"):
        rw.make_pass(("masks", {"include": 3}))
    with pytest.raises(rw.OptionError, match="option 'init'.*'preserve', 'paper'"):
        rw.make_pass(("rbn", {"init": "fancy"}))
    with pytest.raises(rw.OptionError, match="option 'count'.*integer"):
        rw.make_pass(("test_engine_options", {"count": "three"}))
    with pytest.raises(rw.OptionError, match="option 'count'.*integer"):
        rw.make_pass(("test_engine_options", {"count": True}))
    with pytest.raises(rw.OptionError, match="option 'flag'.*true or false"):
        rw.make_pass(("test_engine_options", {"flag": "maybe"}))
    with pytest.raises(rw.OptionError, match="option 'ratio'.*number"):
        rw.make_pass(("test_engine_options", {"ratio": "half"}))
    with pytest.raises(rw.OptionError, match="must be a dict"):
        rw.make_pass(("masks", "fc"))  # type: ignore[arg-type]
    with pytest.raises(rw.OptionError, match="cannot read pass spec"):
        rw.make_pass(42)  # type: ignore[arg-type]
    with pytest.raises(rw.OptionError, match="option 'classes' must be one of"):
        rw.make_pass(("masks", {"classes": ["BatchNorm2d"]}))


def test_several_option_problems_are_reported_together() -> None:
    with pytest.raises(rw.OptionError) as info:
        rw.make_pass(("test_engine_options", {"cuont": 2, "flag": "maybe"}))
    message = str(info.value)
    assert "unknown option 'cuont'" in message and "did you mean 'count'?" in message
    assert "option 'flag'" in message


def test_options_are_coerced_from_toml_and_cli_values() -> None:
    p = rw.make_pass(
        (
            "test_engine_options",
            {
                "flag": "true",
                "count": "3",
                "ratio": "0.25",
                "names": ["a", "b"],
                "mode": "exact",
                "limit": "7",
            },
        )
    )
    assert isinstance(p, OptionsPass)
    assert p.flag is True and p.count == 3 and p.ratio == 0.25
    assert p.names == ("a", "b") and isinstance(p.names, tuple)
    assert p.mode == "exact" and p.limit == 7
    assert p.options() == {
        "flag": True, "count": 3, "ratio": 0.25, "names": ["a", "b"], "mode": "exact", "limit": 7,
    }  # fmt: skip
    q = rw.make_pass(("test_engine_options", {"flag": "No", "names": "only", "ratio": 2}))
    assert q.flag is False and q.names == ("only",) and q.ratio == 2.0
    assert rw.make_pass(("test_engine_options", {"limit": None})).limit is None
    masks = rw.make_pass(("masks", {"exclude": ["fc", "stem"]}))
    assert masks.exclude == ("fc", "stem")
    hash(masks)  # frozen dataclass with tuple fields: hashable


def test_coerce_directly() -> None:
    assert coerce([1, "2"], tuple[int, ...]) == (1, 2)
    assert coerce(["1", 2.5], tuple[int, float]) == (1, 2.5)
    assert coerce("1", bool) is True and coerce("FALSE", bool) is False
    assert coerce("3", int | None) == 3 and coerce(None, int | None) is None
    with pytest.raises(ValueError, match="expected 2 values"):
        coerce([1], tuple[int, float])
    with pytest.raises(ValueError, match="expected a string"):
        coerce(3, str)
    with pytest.raises(ValueError, match="expected an integer"):
        coerce(1.5, int)


def test_option_specs_describe_options() -> None:
    specs = {s.name: s for s in rw.option_specs(OptionsPass)}
    assert list(specs) == ["flag", "count", "ratio", "names", "mode", "limit"]
    assert specs["flag"].type is bool and specs["flag"].default is False
    assert specs["names"].type_name == "list of str"
    assert specs["mode"].type_name == "'fast' | 'exact'"
    assert specs["limit"].type_name == "int | none"
    assert specs["count"].help == "an integer"
    assert OptionsPass.summary() == "x => x (a pass with one option of every supported type)"


def test_register_is_idempotent_and_refuses_a_different_class() -> None:
    assert rw.register(ProbePass) is ProbePass
    assert rw.register(ProbePass) is ProbePass
    assert rw.registered()["test_engine_probe"] is ProbePass
    assert rw.get_pass("test_engine_probe") is ProbePass

    @dataclass(frozen=True)
    class Impostor(rw.Pass):
        name = "test_engine_probe"

    with pytest.raises(ValueError, match="already registered"):
        rw.register(Impostor)
    assert rw.registered()["test_engine_probe"] is ProbePass

    with pytest.raises(TypeError, match="subclass of rewriter.Pass"):
        rw.register(nn.ReLU)  # type: ignore[arg-type]

    class NotADataclass(ProbePass):
        name = "test_engine_not_a_dataclass"

    with pytest.raises(TypeError, match="@dataclass"):
        rw.register(NotADataclass)

    @dataclass(frozen=True)
    class Nameless(rw.Pass):
        pass

    with pytest.raises(ValueError, match="no registry name"):
        rw.register(Nameless)


def test_option_defaults_must_be_immutable() -> None:
    with pytest.raises(TypeError, match="tuple"):
        rw.option([], "a mutable default")


def test_builtin_passes_are_registered() -> None:
    passes = rw.registered()
    assert passes["masks"].name == "masks" and passes["rbn"].name == "rbn"
    assert list(passes) == sorted(passes)


def test_option_pass_notes_reach_the_report() -> None:
    gm = rw.rewrite(net(), [("test_engine_options", {"flag": "yes", "count": 2})], inputs())
    record = rw.report(gm).passes[0]
    assert record.notes == ["flag=True count=2"]
    assert record.options["flag"] is True and record.options["names"] == []
    assert "note (test_engine_options): flag=True count=2" in rw.report(gm).table()


def test_deepcopy_keeps_the_report() -> None:
    gm = rw.rewrite(net(), ["test_engine_probe"], inputs())
    clone = copy.deepcopy(gm)
    assert [p.name for p in rw.report(clone).passes] == ["test_engine_probe"]
    torch.testing.assert_close(clone(*inputs()), gm(*inputs()))


def test_no_warning_without_opaque_modules() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rw.rewrite(net(), ["masks"], inputs())


# ---------------------------------------------------------------------------
# The numeric check: float64, atol scaled by the outputs' magnitude
# ---------------------------------------------------------------------------


class FoldedNorm(rw.RewriterModule):
    """An eval-mode BatchNorm folded into ``x * scale + shift`` (float32 parameters)."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        self.scale = nn.Parameter(scale.view(1, -1, 1, 1).clone())
        self.shift = nn.Parameter((bn.bias.detach() - bn.running_mean * scale).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


def fold(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node:
    """bn(x) -> x * scale + shift: the same function, rounded differently"""
    node = m.root
    name = ctx.add_module(node, "folded", FoldedNorm(ctx.module(node)))
    return ctx.call_module(name, node.args)


@rw.register
@dataclass(frozen=True)
class FoldPass(rw.Pass):
    """bn(x) => x * scale + shift (eval mode)"""

    name = "test_engine_fold"
    preserves_outputs = True

    def rules(self) -> list:
        return [(rw.P.module(nn.BatchNorm2d), fold)]


def flip_last_conv(ctx: rw.RewriteContext, m: rw.Match) -> fx.Node | None:
    """conv(x) -> conv(x) with one weight's sign flipped, in the conv before the head"""
    if any(u.op == "call_module" and isinstance(ctx.module(u), nn.Conv2d) for u in m.root.users):
        return None
    if not isinstance(ctx.module(m.root.next), nn.AdaptiveAvgPool2d) or ctx.matches:
        return None
    with torch.no_grad():
        ctx.module(m.root).weight[0, 0, 1, 1].neg_()
    return m.root


@rw.register
@dataclass(frozen=True)
class FlipPass(rw.Pass):
    """conv(x) => conv with one weight negated (last conv), claiming to preserve outputs"""

    name = "test_engine_flip"
    preserves_outputs = True

    def rules(self) -> list:
        return [(rw.P.module(nn.Conv2d), flip_last_conv)]


def deep_net(depth: int = 24) -> nn.Module:
    """conv-bn-relu x depth with logits in the hundreds."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1)]
    for _ in range(depth):
        bn = nn.BatchNorm2d(16)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 2.0)
            bn.weight.uniform_(0.5, 1.5)
        layers += [bn, nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)]
    head = nn.Linear(16, 200)
    with torch.no_grad():
        head.weight.mul_(3000.0)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return model.eval()


@pytest.mark.parametrize("float64", [False, True])
def test_numeric_check_accepts_float32_rounding_of_a_deep_net_and_catches_a_sign_flip(
    float64: bool,
) -> None:
    model, x, checks = deep_net(), inputs(), rw.Checks(float64=float64)
    folded = rw.rewrite(model, ["test_engine_fold"], x, checks=checks)  # passes the check
    assert rw.report(folded).passes[0].fired == 24
    with torch.no_grad():
        ref, got = model(*x), folded(*x)
    assert ref.abs().max() > 100
    # the same function, but float32 rounding differs by more than a fixed atol allows
    assert not torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-5 * ref.abs().max())
    where = "compared in float64" if float64 else "x output magnitude"
    with pytest.raises(rw.PassError, match=where) as info:
        rw.rewrite(model, ["test_engine_flip"], x, checks=checks)
    assert info.value.pass_name == "test_engine_flip"
    with pytest.raises(rw.PassError, match=where):
        rw.rewrite(model, ["test_engine_fold", "test_engine_flip"], x, checks=checks)


def test_numeric_check_restores_dtypes_and_storage() -> None:
    model, x = deep_net(4), inputs()
    net = rw.rewrite(model, ["masks", "rbn"], x, checks=rw.Checks(float64=True))
    assert {t.dtype for t in net.state_dict().values() if t.is_floating_point()} == {torch.float32}
    pointers = {k: t.data_ptr() for k, t in net.state_dict().items()}
    rw.rewrite(net, ["test_engine_probe"], x, checks=rw.Checks(float64=True))  # on a copy
    assert {k: t.data_ptr() for k, t in net.state_dict().items()} == pointers
