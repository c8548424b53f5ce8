"""One canonical graph for every model: idioms traced and lifted from .pt2 look like plain models.

Each idiom model of ``tests/idioms.py`` has a plain twin (``nn.Conv2d`` / ``nn.BatchNorm2d``
/ ``nn.ReLU`` modules, out-of-place ops, the same weights). After tracing, and after
exporting to ``.pt2`` and lifting, every pass must fire as often as on the twin, and the
channel groups, residual blocks and slimming must agree.
"""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import idioms
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter.analysis import channel_groups, residual_blocks
from rewriter.canonical import HeadAttention, canonical_report
from rewriter.lift import lift, load_pt2
from rewriter.testing import random_models, train_losses
from rewriter.testing.strategies import BatchNormAct2d

NAMES = [i.name for i in idioms.IDIOMS]
PASSES = [
    "masks",
    "rbn",
    ("split", {"mode": "kels", "rate": 0.5}),
    "saliency_gates",
    "skip_gates",
    ("synflow", {"density": 0.5}),
    ("magnitude", {"density": 0.5}),
]


def _idiom(name: str) -> idioms.Idiom:
    return next(i for i in idioms.IDIOMS if i.name == name)


def _source(name: str) -> tuple[nn.Module, nn.Module]:
    """The idiom model (in the mode it is traced in) and its plain twin with the same weights."""
    model = idioms.make(name)
    if _idiom(name).train_trace:
        model.train()
    return model, idioms.plain_twin(model, name)


def _front(model: nn.Module, front: str, x: Tensor, tmp_path: Path) -> nn.Module:
    """``model`` as the pass manager gets it: traced, or exported to .pt2, loaded and lifted."""
    if front == "trace":
        return model
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    return lift(load_pt2(path))


def _fired(net: nn.Module) -> list[int]:
    return [p.fired for p in rw.report(net).passes]


def _groups(gm: fx.GraphModule, x: Tensor) -> list[tuple[int, bool, tuple[str, ...]]]:
    analysis = channel_groups(gm, (x,))
    return sorted((g.size, g.prunable, tuple(g.layers_out())) for g in analysis.groups)


def _blocks(gm: fx.GraphModule) -> list[tuple[str, str, int]]:
    """Kind, branch layers and shortcut length (an ``nn.Identity`` act is a node, not a layer)."""
    out = []
    for b in residual_blocks(gm):
        convs = [n for n in b.branch if "conv" in n]
        out.append((b.kind, ",".join(convs), len(b.shortcut)))
    return sorted(out)


def _compiles_and_trains(net: nn.Module, x: Tensor, backend: str, rtol: float, atol: float) -> None:
    """``torch.compile(net, fullgraph=True)`` gives ``net``'s outputs in its current mode, and
    three SGD steps in training mode on one batch lower the loss."""
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=rtol, atol=atol)
    net.train()
    losses = train_losses(compiled, net, x, torch.arange(x.shape[0]) % 5)
    assert losses[-1] < losses[0], losses


# -- canonical form ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_traced_idioms_compute_exactly_what_the_model_computes(name: str) -> None:
    model, _ = _source(name)
    x = idioms.inputs()
    gm = rw.trace(model, example_inputs=x)  # norm_anywhere: its F.batch_norm needs shapes
    modes = [True] if _idiom(name).train_trace else [False, True]  # drop-path: traced in train
    for mode in modes:
        model.train(mode)
        gm.train(mode)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            expected = model(x)
            torch.manual_seed(0)
            assert torch.equal(gm(x), expected), mode


def test_fused_norm_act_becomes_batchnorm_then_activation() -> None:
    model, _ = _source("fused_norm_act")
    gm = rw.trace(model)
    report = canonical_report(gm)
    assert report.lifted == {"F.batch_norm -> BatchNorm2d": 3}
    assert report.renamed == {
        "bn_act": "bn.act", "block.bn1_act": "block.bn1.act", "block.bn2_act": "block.bn2.act"
    }  # fmt: skip
    assert type(gm.get_submodule("block.bn1")) is nn.BatchNorm2d
    users = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "block.bn1"]
    assert [u.target for u in users[0].users] == ["block.bn1_act"]
    assert set(gm.state_dict()) == set(model.state_dict())  # no parameter was renamed
    # num_batches_tracked.add_(1) is gone: the BatchNorm counts itself
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "add_"]


def test_functional_layers_become_modules_with_the_same_parameters() -> None:
    model, _ = _source("functional")
    x = idioms.inputs()
    net = rw.rewrite(model, [], x)
    report = canonical_report(net)
    assert report.lifted == {
        "F.conv2d -> Conv2d": 3, "F.linear -> Linear": 1, "F.batch_norm -> BatchNorm2d": 3
    }  # fmt: skip
    assert report.kept == []
    assert set(net.state_dict()) == set(model.state_dict())
    assert type(net.get_submodule("block.conv1")) is nn.Conv2d
    for mode in (False, True):
        model.train(mode)
        net.train(mode)
        assert torch.equal(net(x), model(x))


def test_batch_norm_anywhere_lifts_once_shapes_are_known(tmp_path: Path) -> None:
    """``F.batch_norm`` on a module's own state after a pooling and after a residual add:
    tracing alone cannot tell the input's rank and keeps the calls with that reason;
    ``rewrite`` (and ``trace(example_inputs=...)``) record shapes and lift them."""
    model, plain = _source("norm_anywhere")
    x = idioms.inputs()
    report = canonical_report(rw.trace(model))
    assert report.lifted == {"F.group_norm -> GroupNorm": 1, "F.layer_norm -> LayerNorm": 1}
    assert [(op, "rank is unknown" in why) for _, op, why in report.kept] == [("F.batch_norm", True)] * 2
    net = rw.rewrite(model, ["masks"], x)
    lifted = {"F.batch_norm -> BatchNorm2d": 2, "F.group_norm -> GroupNorm": 1, "F.layer_norm -> LayerNorm": 1}
    assert canonical_report(net).lifted == lifted and canonical_report(net).kept == []
    assert "canonical: lifted 2 x F.batch_norm -> BatchNorm2d" in rw.report(net).table()
    assert _fired(net) == _fired(rw.rewrite(plain, ["masks"], x))
    gm = rw.trace(model, example_inputs=x)
    assert canonical_report(gm).lifted == lifted
    for name in ("bn", "block.post"):
        assert type(gm.get_submodule(name)) is nn.BatchNorm2d
    assert set(gm.state_dict()) == set(model.state_dict())
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr]
    # lifted from .pt2: the same layers, and no aten call left (max_pool2d included)
    lifted_gm = _front(model, "pt2", x, tmp_path)
    assert not [n for n in lifted_gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert torch.equal(lifted_gm(x), model(x))


class _NormAround(nn.Module):
    """A random model between two functional BatchNorms (not BatchNorm subclasses): one on
    the input (a placeholder: no rank in the graph), one on the 2-d logits."""

    def __init__(self, inner: nn.Module, channels: int, classes: int) -> None:
        super().__init__()
        self.bn_in = idioms.FBatchNorm2d(channels)
        self.inner = inner
        self.bn_out = idioms.FBatchNorm2d(classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn_out(self.inner(self.bn_in(x)))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rm=random_models(max_ops=8, allow_two_outputs=False))
def test_batch_norm_anywhere_in_random_graphs_lifts_exactly(rm) -> None:
    """Random graphs (idiom vocabulary) wrapped in functional BatchNorms: ``rewrite`` lifts
    every ``F.batch_norm`` (1-d on the logits, 2-d on the input, the fused norm-act layers
    inside), counts each once, and computes bit-identically in train and eval mode."""
    x = rm.example_inputs[0]
    with torch.no_grad():
        classes = rm.model(x).shape[1]
    model = _NormAround(rm.model, x.shape[1], classes).train(rm.model.training)
    net = rw.rewrite(model, [], x)
    fused = sum(isinstance(m, BatchNormAct2d) for m in rm.model.modules())
    report = canonical_report(net)
    assert report.lifted.get("F.batch_norm -> BatchNorm2d") == 1 + fused, rm.description
    assert report.lifted.get("F.batch_norm -> BatchNorm1d") == 1, rm.description
    assert not [n for n in net.graph.nodes if n.target is F.batch_norm]
    assert type(net.get_submodule("bn_out")) is nn.BatchNorm1d
    for mode in (True, False):
        model.train(mode)
        net.train(mode)
        with torch.no_grad():
            assert torch.equal(net(x), model(x)), (mode, rm.description)


def test_inplace_ops_become_out_of_place_unless_the_old_value_is_read() -> None:
    model, _ = _source("inplace")
    gm = rw.trace(model)
    assert canonical_report(gm).inplace == {
        "torch.relu_": 1, "F.relu(inplace=True)": 1, "Tensor.relu_": 1
    }  # fmt: skip

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = self.conv(x)
            z = y.relu_()  # y itself is returned too: the in-place op is observable
            return y, z + 1

    gm = rw.trace(Aliased())
    report = canonical_report(gm)
    assert report.inplace == {}
    assert report.kept == [("relu_", "Tensor.relu_", "node 'output' reads the overwritten tensor afterwards")]

    class OnInput(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.add_(1)

    report = canonical_report(rw.trace(OnInput()))
    assert report.kept and "placeholder" in report.kept[0][2]


def test_multihead_attention_becomes_qkv_linears_and_visible_heads() -> None:
    torch.manual_seed(0)
    model = idioms.MHAViT().eval()
    x = idioms.vit_inputs()
    gm = rw.trace(model)
    attn = gm.get_submodule("blocks.0.attn")
    assert [type(attn.get_submodule(n)) for n in ("q_proj", "k_proj", "v_proj", "out_proj")] == [nn.Linear] * 4
    assert isinstance(attn.attention, HeadAttention) and attn.attention.num_heads == 4
    assert torch.equal(attn.q_proj.weight, model.blocks[0].attn.in_proj_weight[:16])
    assert canonical_report(gm).renamed["blocks.0.attn.v_proj.bias"] == "blocks.0.attn.in_proj_bias[32:48]"
    for mode in (False, True):
        model.train(mode)
        gm.train(mode)
        assert torch.equal(gm(x), model(x))  # with grad enabled torch takes its exact path
    net = rw.rewrite(model.eval(), ["masks"], x)
    assert _fired(net) == [2 * 6 + 2]  # q, k, v, out, two MLP linears per block; patch + head


def _head_groups(analysis, blocks: int = 2) -> list:
    """The head group of each block of an :class:`idioms.MHAViT` (found by its q_proj)."""
    return [analysis.group_of(f"blocks.{i}.attn.q_proj") for i in range(blocks)]


def test_multihead_attention_heads_are_whole_units() -> None:
    """Before: ``nn.MultiheadAttention`` traced to q/k/v/out linears + ``HeadAttention``.
    Expected: one group per block whose ``num_heads`` channels are whole heads across the q,
    k, v rows and the out_proj columns (4 rows / columns of each per head)."""
    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs()
    analysis = channel_groups(rw.trace(model), (x,))
    heads = _head_groups(analysis)
    assert len({g.id for g in heads}) == 2
    for i, group in enumerate(heads):
        p = f"blocks.{i}.attn"
        assert group.prunable and group.size == 4, group.reason
        assert sorted((m.layer, m.role, m.span, tuple(m.indices)) for m in group.members) == [
            (f"{p}.{name}", role, 4, (0, 4, 8, 12))
            for name, role in [("k_proj", "out"), ("out_proj", "in"), ("q_proj", "out"), ("v_proj", "out")]
        ]  # fmt: skip
        same = {analysis.group_of(f"{p}.{w}_proj").id for w in "kv"}
        assert same == {group.id}
    assert sum(len(g.members) == 4 and g.size == 4 for g in analysis.prunable()) == 2


def _masked_and_slim(
    gm: fx.GraphModule, x: Tensor, drops: dict[int, list[int]]
) -> tuple[nn.Module, fx.GraphModule]:
    analysis = channel_groups(gm, (x,))
    heads = _head_groups(analysis)
    group_drops = {heads[block].id: chosen for block, chosen in drops.items()}
    masked = rw.mask_channels(copy.deepcopy(gm), analysis, group_drops)
    return masked, rw.slim(gm, (x,), rw.group_masks(analysis, group_drops), analysis=analysis)


@pytest.mark.parametrize("front", ["trace", "pt2"])
def test_slim_removes_whole_multihead_attention_heads(front: str, tmp_path: Path) -> None:
    """Half the heads of every block go (q/k/v rows and out_proj columns, ``num_heads`` 4 ->
    2): exact against the head-masked dense model, FLOPs as ``channel_keep`` predicts, and
    the slim model saves and loads as an artifact."""
    from rewriter.analysis.flops import flops

    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs()
    gm = rw.rewrite(_front(model, front, x, tmp_path), [], x)  # a result save() takes
    masked, slim = _masked_and_slim(gm, x, {0: [0, 2], 1: [1, 2]})
    with torch.no_grad():
        dense, want, got = gm(x), masked(x), slim(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - dense).abs().max() > 1e-3  # the dropped heads did contribute
    for i in range(2):
        attn = slim.get_submodule(f"blocks.{i}.attn")
        assert attn.attention.num_heads == 2
        assert [getattr(attn, f"{w}_proj").out_features for w in "qkv"] == [8, 8, 8]
        assert attn.out_proj.in_features == 8 and attn.out_proj.out_features == 16
    keep = {f"blocks.{i}.attn.{m}": 0.5 for i in range(2)
            for m in ("q_proj", "k_proj", "v_proj", "attention")}  # fmt: skip
    predicted = flops(gm, x, channel_keep=keep)
    assert predicted.expected_macs == flops(slim, x).total_macs < predicted.total_macs
    path = rw.save(slim, tmp_path / "slim.safetensors", source="idioms:MHAViT")
    loaded = rw.load(path).eval()
    assert loaded.get_submodule("blocks.1.attn.attention").num_heads == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_slim_heads_of_every_attention_form(batch_first: bool, need_weights: bool) -> None:
    """Sequence-first or batch-first, SDPA or the ``need_weights`` form: head 1 of 4 goes
    and the slim module computes what the head-masked one computes."""
    torch.manual_seed(0)
    model = _Attention(batch_first, need_weights).eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    gm = rw.trace(model)
    analysis = channel_groups(gm, (x,))
    group = analysis.group_of("attn.q_proj")
    assert group.prunable and group.size == 4
    masked = rw.mask_channels(copy.deepcopy(gm), analysis, {group.id: [1]})
    slim = rw.slim(gm, (x,), rw.group_masks(analysis, {group.id: [1]}), analysis=analysis)
    assert slim.get_submodule("attn.attention").num_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-6)
        assert (masked(x) - gm(x)).abs().max() > 1e-3


@pytest.mark.slow
def test_slim_multihead_attention_vit_compiles_and_trains() -> None:
    """Half the heads of an ``nn.MultiheadAttention`` ViT removed: fullgraph compile gives
    the eager outputs and a few SGD steps lower the loss."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs(8)
    gm = rw.trace(model)
    _, net = _masked_and_slim(gm, x, {0: [0, 1], 1: [2, 3]})
    _compiles_and_trains(net, x, backend="aot_eager", rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_slim_multihead_attention_vit_loads_in_a_fresh_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs()
    gm = rw.rewrite(model, [], x)
    _, slim = _masked_and_slim(gm, x, {0: [1, 3], 1: [0, 1, 2]})
    rw.save(slim, tmp_path / "mha.safetensors", source="idioms:MHAViT")
    with torch.no_grad():
        torch.save((x, slim(x)), tmp_path / "expected.pt")
    code = f"""
import torch, rewriter as rw
x, ref = torch.load({str(tmp_path / "expected.pt")!r})
gm = rw.load({str(tmp_path / "mha.safetensors")!r}).eval()
heads = [gm.get_submodule(f"blocks.{{i}}.attn.attention").num_heads for i in (0, 1)]
with torch.no_grad():
    print(*heads, gm.get_submodule("blocks.1.attn.out_proj").in_features, torch.equal(gm(x), ref))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["2", "1", "4", "True"]


class _MaskedHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = idioms.ExplicitAttention(16, 4)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        a = self.attn
        return a.out_proj(a.attention(a.q_proj(x), a.k_proj(x), a.v_proj(x), mask))


def test_heads_with_an_attention_mask_are_not_prunable() -> None:
    """An attention mask tensor is not followed per head: the heads are blocked, with why."""
    x, mask = torch.randn(2, 5, 16), torch.zeros(5, 5)
    analysis = channel_groups(rw.trace(_MaskedHeads()), (x, mask))
    group = analysis.group_of("attn.q_proj")
    assert not group.prunable and "q/k/v channels are not followed per head" in group.reason


_MHA_GM: dict[str, fx.GraphModule] = {}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keep=st.lists(
        st.lists(st.booleans(), min_size=4, max_size=4).filter(any), min_size=2, max_size=2
    )
)
def test_slim_any_head_mask_is_exact(keep: list[list[bool]]) -> None:
    """Any heads removed, at least one kept per block: the slim model computes what the
    head-masked dense model computes, with ``num_heads`` = the kept heads."""
    if "gm" not in _MHA_GM:
        torch.manual_seed(0)
        _MHA_GM["gm"] = rw.trace(idioms.MHAViT().eval())
    gm, x = _MHA_GM["gm"], idioms.vit_inputs()
    drops = {b: [h for h in range(4) if not k[h]] for b, k in enumerate(keep)}
    masked, slim = _masked_and_slim(gm, x, drops)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), masked(x), rtol=1e-5, atol=1e-6)
    for b, k in enumerate(keep):
        assert slim.get_submodule(f"blocks.{b}.attn.attention").num_heads == sum(k)
        assert slim.get_submodule(f"blocks.{b}.attn.out_proj").in_features == 4 * sum(k)


def test_lifted_multihead_attention_becomes_what_tracing_makes_of_it() -> None:
    """The packed in-projection, q/k/v split, head views and SDPA an exported
    ``nn.MultiheadAttention`` leaves become q/k/v/out linears and ``HeadAttention``, with the
    names, parameters and report of the traced module; outputs bit-identical to the program."""
    torch.manual_seed(0)
    model = idioms.MHAViT().eval()
    x = idioms.vit_inputs()
    ep = torch.export.export(model, (x,))
    gm, traced = lift(ep), rw.trace(model)
    report = canonical_report(gm)
    assert report.lifted == {"nn.MultiheadAttention -> q/k/v Linear + HeadAttention": 2}
    assert report.kept == []
    assert report.renamed == canonical_report(traced).renamed
    assert [n for n, _ in gm.named_modules()] == [n for n, _ in traced.named_modules()]
    assert set(gm.state_dict()) == set(traced.state_dict())
    for key, value in traced.state_dict().items():
        assert torch.equal(gm.state_dict()[key], value), key
    attn = gm.get_submodule("blocks.1.attn")
    assert isinstance(attn.attention, HeadAttention) and attn.attention.num_heads == 4
    assert attn.attention.batch_first
    assert not [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    for grad in (False, True):  # the same kernels on the same tensors
        with torch.set_grad_enabled(grad):
            assert torch.equal(gm(x), ep.module()(x)), grad


class _Attention(nn.Module):
    def __init__(self, batch_first: bool, need_weights: bool, return_weights: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, dropout=0.1)
        self.need_weights, self.return_weights = need_weights, return_weights

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        out, weights = self.attn(x, x, x, need_weights=self.need_weights)
        return (out, weights) if self.return_weights else out


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_lifted_attention_forms_are_explicit_and_exact(batch_first: bool, need_weights: bool) -> None:
    """Sequence-first or batch-first; SDPA (``need_weights=False``) or ``bmm`` + softmax with
    the unused weights' average (``need_weights=True``, the module's default); exported in
    eval mode and in training mode (attention dropout): the lifted program becomes the traced
    module's explicit form and computes bit-identically to the program and the module."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 16)
    for train in (False, True):
        model = _Attention(batch_first, need_weights).train(train)
        ep = torch.export.export(model, (x,))
        gm, traced = lift(ep), rw.trace(model)
        report = canonical_report(gm)
        assert report.lifted == {"nn.MultiheadAttention -> q/k/v Linear + HeadAttention": 1}
        assert [n for n, _ in gm.named_modules()] == [n for n, _ in traced.named_modules()]
        attention = gm.get_submodule("attn.attention")
        assert attention.extra_repr() == traced.get_submodule("attn.attention").extra_repr() or not train
        expected = (batch_first, 0.1 if train else 0.0, need_weights)
        assert (attention.batch_first, attention.dropout, attention.need_weights) == expected
        assert [n.op for n in gm.graph.nodes].count("call_function") == 0  # nothing left over
        outputs = []
        for run in (gm, ep.module(), traced, model):
            torch.manual_seed(3)  # the same attention dropout draws
            outputs.append(run(x))
        for other in outputs[1:]:
            assert torch.equal(outputs[0], other), (train, len(outputs))


def test_lifted_attention_whose_weights_are_used_keeps_its_packed_projection() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = _Attention(batch_first=True, need_weights=True, return_weights=True).eval()
    ep = torch.export.export(model, (x,))
    gm = lift(ep)
    report = canonical_report(gm)
    assert report.lifted == {"aten.linear -> Linear": 1}
    assert report.kept == [("linear", "nn.MultiheadAttention (exported)", "the attention weights are used")]
    assert type(gm.get_submodule("attn.in_proj")) is nn.Linear
    for got, expected in zip(gm(x), ep.module()(x), strict=True):
        assert torch.equal(got, expected)
    # the export front end's dynamic batch: symbolic sizes in the head views
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs()
    net = rw.rewrite(model, ["masks"], x, frontend="export")
    assert canonical_report(net).lifted == {"nn.MultiheadAttention -> q/k/v Linear + HeadAttention": 2}
    assert _fired(net) == [2 * 6 + 2]
    x5 = idioms.vit_inputs(batch=5)
    assert torch.equal(net(x5), model(x5))  # with grad enabled eager MHA takes its exact path


def test_lifted_multihead_attention_vit_looks_like_its_explicit_twin() -> None:
    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs()
    plain = idioms.plain_vit(model)
    gm, twin = lift(torch.export.export(model, (x,))), rw.trace(plain)
    assert _groups(gm, x) == _groups(twin, x)
    assert _blocks(gm) == _blocks(twin)
    passes = ["masks", ("split", {"mode": "kels", "rate": 0.5}), ("magnitude", {"density": 0.5}),
              "saliency_gates", "skip_gates"]  # fmt: skip
    fired = {str(p): _fired(rw.rewrite(gm, [p], x)) for p in passes}
    assert fired == {str(p): _fired(rw.rewrite(plain, [p], x)) for p in passes}
    assert fired["masks"] == [2 * 6 + 2] and fired["skip_gates"] == [4]
    # slim is exact: heads 0 and 1 of every block (whole heads: 4 -> 2), half the MLP
    analysis = channel_groups(gm, (x,))
    drops = {g.id: range(g.size // 2) for g in analysis.prunable()}
    value = analysis.group_of("blocks.0.attn.v_proj")
    assert value.id in drops and value.size == 4
    assert value.id == analysis.group_of("blocks.0.attn.q_proj").id
    rw.mask_channels(gm, analysis, drops)
    slim = rw.slim(gm, (x,))
    assert slim.get_submodule("blocks.0.attn.v_proj").out_features == 8
    assert slim.get_submodule("blocks.0.attn.q_proj").out_features == 8
    assert slim.get_submodule("blocks.0.attn.out_proj").in_features == 8
    assert slim.get_submodule("blocks.0.attn.attention").num_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(slim(x), gm(x), rtol=1e-5, atol=1e-6)


def test_optional_arguments_and_sizes_flow_through_every_analysis() -> None:
    model, plain = _source("view_flatten")
    x = idioms.inputs()
    gm = rw.trace(model)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match="specialized to have value None"):
        gm(x, torch.tensor(2.0))  # traced with scale=None: a tensor there is refused, not ignored
    for p in [("split", {"mode": "kels", "rate": 0.5}), ("synflow", {"density": 0.5})]:
        net = rw.rewrite(model, [p], x)
        assert _fired(net) == _fired(rw.rewrite(plain, [p], x)), p
        assert _fired(net)[0] > 0
    assert len(channel_groups(rw.trace(model), (x,)).prunable()) == 2


# -- parity with the plain twin -----------------------------------------------------------------


FAST = ["masks", "rbn", ("split", {"mode": "kels", "rate": 0.5}), "skip_gates"]
PARITY = [
    *(pytest.param(name, "trace", FAST, id=f"{name}-trace-fast") for name in NAMES),
    pytest.param("inplace", "pt2", FAST, id="inplace-pt2-fast"),
    *(
        pytest.param(name, front, PASSES, id=f"{name}-{front}", marks=pytest.mark.slow)
        for name in NAMES
        for front in ("trace", "pt2")
    ),
]  # the default run: four passes, one lifted program (in-place aten ops); slow: everything


@pytest.mark.parametrize(("name", "front", "passes"), PARITY)
def test_idioms_look_like_their_plain_twin(
    name: str, front: str, passes: list, tmp_path: Path
) -> None:
    model, plain = _source(name)
    if front == "pt2" and _idiom(name).train_trace:
        model.eval()  # export a drop-path model for inference: its branch is the identity
        plain.eval()
    x = idioms.inputs()
    source = _front(model, front, x, tmp_path)
    gm = source if isinstance(source, fx.GraphModule) else rw.trace(source, example_inputs=x)
    twin = rw.trace(plain)

    assert _groups(gm, x) == _groups(twin, x)
    assert _blocks(gm) == _blocks(twin)
    for p in passes:
        got, expected = rw.rewrite(source, [p], x), rw.rewrite(plain, [p], x)
        assert _fired(got) == _fired(expected), p
        assert _fired(expected)[0] > 0, p


def test_multihead_attention_vit_looks_like_its_explicit_twin() -> None:
    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs()
    plain = idioms.plain_vit(model)
    gm, twin = rw.trace(model), rw.trace(plain)
    with torch.no_grad():
        assert torch.equal(gm(x), twin(x))
    assert _groups(gm, x) == _groups(twin, x)
    assert _blocks(gm) == _blocks(twin)
    for p in ["masks", ("split", {"mode": "kels", "rate": 0.5}), ("magnitude", {"density": 0.5})]:
        assert _fired(rw.rewrite(model, [p], x)) == _fired(rw.rewrite(plain, [p], x)), p


@pytest.mark.parametrize("front", ["trace", "pt2"])
@pytest.mark.parametrize("name", NAMES)
def test_slim_is_exact_on_idioms(name: str, front: str, tmp_path: Path) -> None:
    model, _ = _source(name)
    x = idioms.inputs()
    source = _front(model, front, x, tmp_path)
    gm = source if isinstance(source, fx.GraphModule) else rw.trace(source, example_inputs=x)
    analysis = channel_groups(gm, (x,))
    drops = {g.id: range(g.size // 2) for g in analysis.prunable()}
    assert drops
    rw.mask_channels(gm, analysis, drops)
    slim = rw.slim(gm, (x,))
    gm.eval()
    slim.eval()
    outputs = []
    for net in (slim, gm):  # drop-path traced in training mode draws its masks: same seed
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            outputs.append(net(x))
    torch.testing.assert_close(*outputs, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in gm.parameters())


# -- unknown ops: classified by probing, never a wrong cut -------------------------------------


class _UnknownOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.erf(self.c1(x))  # elementwise, in no table: probed, channel-transparent
        h = self.c3(self.c2(h).cumsum(1))  # mixes channels: probed, blocked
        return self.c4(torch.special.expit(h))  # elementwise, not zero-preserving


def test_unknown_ops_are_probed_and_never_cut_wrongly() -> None:
    torch.manual_seed(0)
    model, x = _UnknownOps().eval(), torch.randn(2, 3, 8, 8)
    gm = rw.trace(model)
    analysis = channel_groups(gm, (x,))
    by_layer = {g.layers_out()[0]: g for g in analysis.groups if g.layers_out()}
    assert by_layer["c1"].prunable
    assert not by_layer["c2"].prunable and "probing: channel 0 moves channels" in by_layer["c2"].reason
    assert by_layer["c3"].prunable and by_layer["c3"].nonzero_ops  # expit(0) = 0.5
    drops = {g.id: [0, 2] for g in analysis.prunable()}
    rw.mask_channels(gm, analysis, drops)
    slim = rw.slim(gm, (x,))
    with torch.no_grad():
        torch.testing.assert_close(slim(x), gm(x), rtol=1e-5, atol=1e-6)
    assert slim.get_submodule("c1").out_channels == 6


# -- compile ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_canonical_idiom_graphs_compile_and_train() -> None:
    """A fused norm-act model, canonicalised and masked: fullgraph compile gives the eager
    outputs, and a few SGD steps on a fixed batch lower the loss. (One model: inductor
    compiles take most of a minute each on a busy 2-core machine.)"""
    torch._dynamo.reset()
    for model, x in [(idioms.make("fused_norm_act"), idioms.inputs(8))]:
        net = rw.rewrite(model, ["masks"], x)
        _compiles_and_trains(net.eval(), x, backend="inductor", rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lifted_attention_compiles_and_trains() -> None:
    """A lifted ``nn.MultiheadAttention`` ViT (``need_weights=True`` form in the second
    block), masked: fullgraph compile (aot_eager: the graph and autograd, not inductor's
    kernels) gives the eager outputs and a few SGD steps lower the loss."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = idioms.MHAViT().eval(), idioms.vit_inputs(8)
    block = model.blocks[1]

    def forward(t: Tensor) -> Tensor:  # the module's default need_weights=True
        h = block.norm1(t)
        t = t + block.attn(h, h, h)[0]
        return t + block.mlp(block.norm2(t))

    block.forward = forward
    gm = lift(torch.export.export(model, (x,)))
    assert [gm.get_submodule(f"blocks.{i}.attn.attention").need_weights for i in (0, 1)] == [False, True]
    net = rw.rewrite(gm, ["masks"], x)
    _compiles_and_trains(net, x, backend="aot_eager", rtol=1e-5, atol=1e-6)


# -- deep nets: the numeric check and SynFlow ---------------------------------------------------


def _deep_mlp() -> nn.Module:
    """30 linear layers whose absolute-valued all-ones signal overflows float32."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(30):
        linear = nn.Linear(64, 64)
        with torch.no_grad():
            linear.weight.uniform_(-1, 1)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 10))


def test_synflow_scores_in_float64_and_masks_in_the_model_dtype() -> None:
    from rewriter.passes.masks import get_masks

    model = _deep_mlp()
    with torch.no_grad():  # the signal SynFlow propagates, in float32: it overflows
        h = torch.ones(1, 64)
        for m in model:
            if isinstance(m, nn.Linear):
                h = h @ m.weight.abs().T + m.bias.abs()
    assert not torch.isfinite(h).all()
    net = rw.rewrite(model, [("synflow", {"density": 0.5, "iterations": 5})], torch.randn(2, 64))
    masks = get_masks(net)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)
    assert {m.dtype for m in masks.values()} == {torch.float32}
    assert {p.dtype for p in net.parameters()} == {torch.float32}


R50_INPUT = (2, 3, 224, 224)


@pytest.mark.slow
def test_rbn_preserve_on_a_resnet50_sized_net_passes_the_default_checks() -> None:
    model = idioms.resnet50()
    x = torch.randn(R50_INPUT, generator=torch.Generator().manual_seed(0))
    net = rw.rewrite(model, ["rbn"], x)
    assert _fired(net) == [53]
    with torch.no_grad():
        assert model(x).abs().max() > 20  # logits of a trained net's magnitude


@pytest.mark.slow
def test_synflow_prunes_a_resnet50_sized_net_in_float32() -> None:
    from rewriter.passes.masks import get_masks

    model = idioms.resnet50()
    x = torch.randn(1, *R50_INPUT[1:], generator=torch.Generator().manual_seed(0))
    net = rw.rewrite(model, [("synflow", {"density": 0.1, "iterations": 1})], x)
    masks = get_masks(net)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)
    assert {p.dtype for p in net.parameters()} == {torch.float32}


_ = (F, operator)


def test_flops_count_the_attention_of_nn_multihead_attention() -> None:
    """Traced ``nn.MultiheadAttention`` becomes q/k/v linears + ``HeadAttention``: FLOPs count
    its QK^T, AV and softmax per head, as the rule for ``F.scaled_dot_product_attention``
    counts the same attention written with explicit heads (it used to count 0)."""
    from rewriter.analysis.flops import SOFTMAX_MACS, flops

    torch.manual_seed(0)
    model = idioms.MHAViT(dim=16, heads=4, depth=2).eval()
    x = idioms.vit_inputs()
    gm = rw.rewrite(model, [], x)
    report = flops(gm, x)
    modules = dict(gm.named_modules())
    rows = [r for r in report.rows if isinstance(modules.get(r.target), HeadAttention)]
    assert len(rows) == 2, [r.target for r in report.rows]
    n, tokens = x.shape[0], (x.shape[2] // 4) * (x.shape[3] // 4)
    heads, head_dim = 4, 16 // 4
    scores = n * heads * tokens * tokens
    expected = scores * 2 * head_dim + SOFTMAX_MACS * scores
    assert [r.macs for r in rows] == [expected, expected]

    class ExplicitHeads(nn.Module):
        def forward(self, q, k, v):
            split = [t.view(n, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v)]
            return F.scaled_dot_product_attention(*split)

    qkv = tuple(torch.randn(n, tokens, 16) for _ in range(3))
    other = flops(rw.rewrite(ExplicitHeads(), [], qkv), qkv)
    assert sum(r.macs for r in other.rows if r.kind == "attention") == expected
    assert not any("attention" in u for u in report.unknown)
