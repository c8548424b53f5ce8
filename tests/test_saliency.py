"""Tests of the ``saliency_gates`` pass (ManiDP / FBS dynamic channel gates, docs/methods/manidp_fbs.md).

Hand-computed references pin the formulas:

* gate: ``pi = clamp(relu(fc2(relu(fc1(gap(x))))), max=1000)``, applied as
  ``feature * pi * [pi >= thr]``; FBS: ``relu(fc(mean |x|))`` kept for the top
  ``ceil(d * C)`` channels per sample;
* complexity weight ``[J < C] * ((C - J) / C)^gamma``, sparsity loss
  ``mean_i w_i sum_l mean_c pi``, similarity loss ``sum_l ||T - R||_F^2 / B^2``;
* threshold: the ``ceil(keep * C)``-th largest per-channel mean of ``pi``, with the
  cosine keep-rate schedule.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_models import Net
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten

import rewriter as rw
import rewriter.passes.saliency  # noqa: F401  (registers the pass)
from rewriter import zoo
from rewriter.analysis.blocks import residual_blocks
from rewriter.analysis.flops import flops
from rewriter.manager import evaluate
from rewriter.passes.saliency import (
    FBSGate,
    ManiDPGate,
    SaliencyGate,
    active_channels,
    aux_losses,
    bottleneck,
    complexity_weights,
    dynamic_flops,
    end_epoch,
    gates,
    init_ce_reference,
    keep_rate,
    similarity_loss,
    sparsity_loss,
    update_thresholds,
)
from rewriter.testing import check_compiles, check_pass, random_models
from rewriter.tracing import owning_modules

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROPERTY_TOKENS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def gate_kwargs(**overrides: object) -> dict[str, object]:
    kw: dict[str, object] = {
        "layer": "conv",
        "target_keep": 0.5,
        "lambda_lasso": 0.1,
        "lambda_graph": 0.1,
        "gamma": 1.0,
    }
    kw.update(overrides)
    return kw


def small_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def net_inputs(n: int = 4) -> tuple[Tensor]:
    return (torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def gated_net(**options: object) -> fx.GraphModule:
    return rw.rewrite(small_net(), [("saliency_gates", options)], net_inputs())


def set_constant_saliency(gate: ManiDPGate, values: list[float]) -> None:
    """Make ``pi`` the same for every input: fc2 weight 0, bias ``values``."""
    with torch.no_grad():
        gate.fc2.weight.zero_()
        gate.fc2.bias.copy_(torch.tensor(values))


# ---------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("resnet20", 18),  # 9 basic blocks x 2 convs; stem and 2 downsample convs not gated
        ("resnet8", 6),
        ("bottleneck_resnet", 9),  # 3 bottlenecks x 3 convs; 3 projection shortcuts not gated
        ("mobilenetv2", 19),  # 25 convs - 6 before the first inverted residual with an add
        ("multitask_resnet", 6),
        ("digits_cnn", 2),  # the two-conv stem is not gated: only the block's convs
        ("vit", 2),  # one per transformer MLP (depth 2); the patch embedding is the stem
        ("mlp", 0),
    ],
)
def test_zoo_gate_counts(name: str, count: int) -> None:
    model = zoo.create(name)
    gm = rw.rewrite(model, ["saliency_gates"])
    record = rw.report(gm).passes[0]
    assert record.fired == count
    assert len(gates(gm)) == count
    assert record.modules_added == list(gates(gm))
    for gate_name, gate in gates(gm).items():
        assert isinstance(gate, ManiDPGate) and isinstance(gate, SaliencyGate)
        assert isinstance(gate, rw.RewriterModule)
        assert gate_name == gate.layer.replace(".", "_") + "_gate"
        layer = gm.get_submodule(gate.layer)
        if gate.channels_last:  # a token MLP's gate is named after its down projection
            assert isinstance(layer, nn.Linear) and gate.out_channels == layer.in_features
            assert gate.in_channels == layer.out_features  # reads the MLP's input (dim -> dim)
            continue
        assert isinstance(layer, nn.Conv2d)
        assert (gate.in_channels, gate.out_channels) == (layer.in_channels, layer.out_channels)


def test_resnet8_names_and_report_notes() -> None:
    gm = rw.rewrite(zoo.create("resnet8"), ["saliency_gates"])
    assert list(gates(gm)) == [
        "layer1_0_conv1_gate",
        "layer1_0_conv2_gate",
        "layer2_0_conv1_gate",
        "layer2_0_conv2_gate",
        "layer3_0_conv1_gate",
        "layer3_0_conv2_gate",
    ]
    notes = rw.report(gm).passes[0].notes
    assert "not gated (stem): stem.0" in notes
    assert "not gated (shortcut): layer2.0.shortcut.0, layer3.0.shortcut.0" in notes
    keys = set(gm.state_dict()) - set(zoo.create("resnet8").state_dict())
    assert "layer1_0_conv1_gate.fc1.weight" in keys and "layer1_0_conv1_gate.threshold" in keys


def _calls(gm: fx.GraphModule) -> list[tuple[str, tuple[str, ...]]]:
    """(target, argument node names) of every call, in graph order."""
    out = []
    for node in gm.graph.nodes:
        if node.op.startswith("call"):
            target = node.target if isinstance(node.target, str) else node.target.__name__
            args = tuple(a.name for a in node.args if isinstance(a, fx.Node))
            out.append((target, args))
    return out


def test_before_expected_graph() -> None:
    """Gate 1 after conv1's BN+ReLU, gate 2 after conv2's BN before the add; stem,
    downsample and classifier untouched. Each gate reads its conv's input."""
    before = _calls(rw.trace(small_net()))
    assert before == [
        ("stem", ("x",)),
        ("bn", ("stem",)),
        ("relu", ("bn",)),
        ("block.conv1", ("relu",)),
        ("block.bn1", ("block_conv1",)),
        ("block.relu", ("block_bn1",)),
        ("block.conv2", ("block_relu",)),
        ("block.bn2", ("block_conv2",)),
        ("block.downsample.0", ("relu",)),
        ("block.downsample.1", ("block_downsample_0",)),
        ("add", ("block_bn2", "block_downsample_1")),
        ("block.relu", ("add",)),
        ("adaptive_avg_pool2d", ("block_relu_1",)),
        ("flatten", ("adaptive_avg_pool2d",)),
        ("fc", ("flatten",)),
    ]
    expected = [
        ("stem", ("x",)),
        ("bn", ("stem",)),
        ("relu", ("bn",)),
        ("block.conv1", ("relu",)),
        ("block.bn1", ("block_conv1",)),
        ("block.relu", ("block_bn1",)),
        ("block_conv1_gate", ("block_relu", "relu")),  # gate(relu(bn1(conv1(x))), x)
        ("block.conv2", ("block_conv1_gate",)),
        ("block.bn2", ("block_conv2",)),
        ("block_conv2_gate", ("block_bn2", "block_conv1_gate")),  # gate(bn2(conv2(h)), h)
        ("block.downsample.0", ("relu",)),
        ("block.downsample.1", ("block_downsample_0",)),
        ("add", ("block_conv2_gate", "block_downsample_1")),
        ("block.relu", ("add",)),
        ("adaptive_avg_pool2d", ("block_relu_1",)),
        ("flatten", ("adaptive_avg_pool2d",)),
        ("fc", ("flatten",)),
    ]
    assert _calls(gated_net()) == expected


def test_gates_sit_in_the_residual_branch_and_never_on_the_shortcut() -> None:
    gm = rw.rewrite(zoo.create("bottleneck_resnet"), ["saliency_gates"])
    blocks = residual_blocks(gm)
    branch = {n for b in blocks for n in b.branch}
    shortcut = {n for b in blocks for n in b.shortcut}
    gate_nodes = {n.name for n in gm.graph.nodes if str(n.target) in gates(gm)}
    assert len(gate_nodes) == 9
    assert gate_nodes <= branch
    assert not gate_nodes & shortcut


def test_gates_belong_to_their_block_and_blocks_are_still_found() -> None:
    model = zoo.create("resnet20")
    before = residual_blocks(rw.trace(model))
    gm = rw.rewrite(model, ["saliency_gates"])
    after = residual_blocks(gm)
    assert [(b.scope, b.kind, b.add) for b in after] == [(b.scope, b.kind, b.add) for b in before]
    gate = next(n for n in gm.graph.nodes if n.target == "layer2_1_conv2_gate")
    assert owning_modules(gate) == ["layer2", "layer2.1", "layer2_1_conv2_gate"]


def test_plain_cnn_leaves_the_first_conv_and_a_conv_classifier() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 5, 1)  # a conv classifier

        def forward(self, x: Tensor) -> Tensor:
            x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
            return self.head(x).mean(dim=(2, 3))

    gm = rw.rewrite(Plain(), ["saliency_gates"], (torch.randn(2, 3, 6, 6),))
    assert [g.layer for g in gates(gm).values()] == ["c2", "c3"]
    notes = rw.report(gm).passes[0].notes
    assert notes == ["not gated (stem): c1", "not gated (classifier): head"]
    # a functional ReLU after the conv is part of the anchor: gate(relu(c2(x)), x)
    gate2 = next(n for n in gm.graph.nodes if n.target == "c2_gate")
    assert gate2.args[0].target is F.relu and gate2.args[0].args[0].target == "c2"


def test_include_exclude_and_classes() -> None:
    model = zoo.create("resnet20")
    gm = rw.rewrite(model, [("saliency_gates", {"include": ["layer2.*"], "exclude": ["*.conv2"]})])
    assert [g.layer for g in gates(gm).values()] == [
        "layer2.0.conv1",
        "layer2.1.conv1",
        "layer2.2.conv1",
    ]
    none = rw.rewrite(model, [("saliency_gates", {"classes": ["Conv1d"]})])
    assert gates(none) == {}
    assert gates(rw.rewrite(model, [("saliency_gates", {"classes": ["Linear"]})])) == {}
    vit = zoo.create("vit")  # Linear: the token MLPs only; Conv2d: convs only
    assert len(gates(rw.rewrite(vit, [("saliency_gates", {"classes": ["Linear"]})]))) == 2
    assert gates(rw.rewrite(vit, [("saliency_gates", {"classes": ["Conv2d"]})])) == {}
    only = rw.rewrite(vit, [("saliency_gates", {"exclude": ["blocks.0.*"]})])
    assert [g.layer for g in gates(only).values()] == ["blocks.1.mlp.2"]
    with pytest.raises(rw.OptionError, match="Conv2d"):
        rw.make_pass(("saliency_gates", {"classes": ["LayerNorm"]}))
    with pytest.raises(rw.OptionError, match="style"):
        rw.make_pass(("saliency_gates", {"style": "gumbel"}))
    with pytest.raises(rw.OptionError, match="keep"):
        rw.make_pass(("saliency_gates", {"keep": 0.0}))


def test_running_twice_is_a_no_op() -> None:
    gm = rw.rewrite(zoo.create("resnet8"), ["saliency_gates"])
    again = rw.rewrite(gm, ["saliency_gates"])
    assert [r.fired for r in rw.report(again).passes] == [6, 0]
    assert set(again.state_dict()) == set(gm.state_dict())
    x = zoo.example_inputs("resnet8")
    torch.testing.assert_close(evaluate(again, x), evaluate(gm, x))


def test_composes_after_masks() -> None:
    gm = rw.rewrite(zoo.create("resnet8"), ["masks", "saliency_gates"])
    assert [r.fired for r in rw.report(gm).passes] == [10, 6]


def test_gate_follows_the_models_dtype() -> None:
    model = small_net().double()
    gm = rw.rewrite(model, ["saliency_gates"], (net_inputs()[0].double(),))
    for gate in gates(gm).values():
        assert all(p.dtype == torch.float64 for p in gate.parameters())
        assert gate.threshold.dtype == torch.float64


# ---------------------------------------------------------------------------
# Gate modules
# ---------------------------------------------------------------------------


def test_manidp_gate_architecture_and_init() -> None:
    small = ManiDPGate(8, 16, reduction=2, **gate_kwargs())
    assert small.fc1.bias is None and small.fc1.weight.shape == (16, 8)  # C_out < 80: 2 // 2 = 1
    assert small.fc2.weight.shape == (16, 16)
    assert torch.equal(small.fc2.bias.detach(), torch.ones(16))
    assert not small.fc2.weight.any()  # identity init: pi == 1 exactly
    assert small.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / 8), rel=0.4)  # kaiming
    wide = ManiDPGate(8, 96, reduction=2, **gate_kwargs())
    assert wide.fc1.weight.shape == (48, 8) and wide.fc2.weight.shape == (96, 48)
    four = ManiDPGate(8, 96, reduction=4, **gate_kwargs())
    assert four.hidden == 24
    torch.manual_seed(0)
    paper = ManiDPGate(64, 96, reduction=2, init="paper", **gate_kwargs())
    assert torch.equal(paper.fc2.bias.detach(), torch.ones(96))
    # kaiming_normal_ (fan_in, gain sqrt 2) on both weights, as the authors' MaskBlock
    assert paper.fc1.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    assert paper.fc2.weight.std().item() == pytest.approx(math.sqrt(2 / 48), rel=0.1)
    with pytest.raises(rw.RewriterError, match="init"):
        ManiDPGate(8, 16, reduction=2, init="zeros", **gate_kwargs())


@pytest.mark.parametrize(
    ("out_channels", "reduction", "hidden"),
    [
        (64, 1, 64),  # r // 2 = 0: kept at 1 (the authors' code would divide by zero)
        (64, 2, 64),  # C_out < 80: r // 2 = 1
        (64, 4, 32),  # the authors' r = 4 gives 2 below 80 channels
        (64, 8, 16),
        (79, 3, 79),  # 3 // 2 = 1
        (80, 2, 40),  # from 80 channels on, r itself
        (80, 4, 20),
        (256, 16, 16),
        (1, 4, 1),  # never below one unit
    ],
)
def test_bottleneck_follows_the_authors_rule_for_every_r(
    out_channels: int, reduction: int, hidden: int
) -> None:
    assert bottleneck(out_channels, reduction) == hidden
    gate = ManiDPGate(4, out_channels, reduction=reduction, **gate_kwargs())
    assert gate.fc1.weight.shape == (hidden, 4) and gate.fc2.weight.shape == (out_channels, hidden)


def test_manidp_gate_forward_by_hand() -> None:
    gate = ManiDPGate(2, 3, reduction=2, **gate_kwargs())
    with torch.no_grad():
        gate.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        gate.fc2.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 2000.0]]))
        gate.fc2.bias.copy_(torch.tensor([0.5, 1.0, 0.0]))
        gate.threshold.fill_(0.75)
    source = torch.ones(1, 2, 2, 2) * torch.tensor([2.0, 0.25]).view(1, 2, 1, 1)
    # gap = [2, .25]; fc1 -> [2, .25, 1.75]; fc2 + b -> [2.5, .5, 3500]; relu, clamp -> [2.5, .5, 1000]
    feature = torch.arange(12.0).view(1, 3, 2, 2)
    gate.eval()
    out = gate(feature, source)
    pi = torch.tensor([[2.5, 0.5, 1000.0]])
    torch.testing.assert_close(gate.last_saliency, pi)
    torch.testing.assert_close(gate.last_mask, torch.tensor([[2.5, 0.0, 1000.0]]))
    torch.testing.assert_close(out, feature * torch.tensor([2.5, 0.0, 1000.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(gate.last_pooled, feature.mean(dim=(2, 3)))


def test_fbs_gate_keeps_the_top_k_per_sample() -> None:
    gate = FBSGate(2, 5, **gate_kwargs(target_keep=0.5))
    assert gate.k == 3  # ceil(0.5 * 5)
    assert torch.equal(gate.fc.bias.detach(), torch.ones(5))
    with torch.no_grad():
        gate.fc.weight.copy_(torch.tensor([[1.0, 0], [2, 0], [3, 0], [0, 1], [-1, 0]]))
        gate.fc.bias.zero_()
    source = torch.tensor([[-1.0, 4.0], [2.0, -0.5]]).view(2, 2, 1, 1)  # mean |x| = [1, 4], [2, .5]
    gate.eval()
    gate(torch.ones(2, 5, 1, 1), source)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [2.0, 4.0, 6.0, 0.5, 0.0]])
    torch.testing.assert_close(gate.last_scores, scores)
    expected = torch.tensor([[0.0, 2.0, 3.0, 4.0, 0.0], [2.0, 4.0, 6.0, 0.0, 0.0]])
    torch.testing.assert_close(gate.last_mask, expected)
    assert (gate.last_mask > 0).sum(1).tolist() == [3, 3]


def test_fbs_l1_is_a_sum_over_channels_by_default() -> None:
    x = net_inputs()
    for l1, reduce in (("sum", lambda s: s.sum(1)), ("mean", lambda s: s.mean(1))):
        gm = gated_net(style="fbs", keep=0.5, init="paper", **({} if l1 == "sum" else {"fbs_l1": l1}))
        gm.train()
        gm(*x)
        found = list(gates(gm).values())
        assert all(g.l1 == l1 for g in found)
        expected = 0.1 * sum(reduce(g.last_scores).mean() for g in found)
        torch.testing.assert_close(aux_losses(gm), expected)
    with pytest.raises(rw.OptionError, match="fbs_l1"):
        rw.make_pass(("saliency_gates", {"fbs_l1": "max"}))


def test_fbs_pass_prunes_from_insertion_and_ignores_thresholds() -> None:
    gm = gated_net(style="fbs", keep=0.5)
    assert all(isinstance(g, FBSGate) for g in gates(gm).values())
    evaluate(gm, net_inputs())
    assert active_channels(gm).tolist() == [8, 8, 8, 8]  # 4 of 8 channels in each of 2 gates
    gm.train()
    gm(*net_inputs())
    assert update_thresholds(gm, 0, 10) == {}
    assert all(float(g.threshold) == 0.0 for g in gates(gm).values())


def test_preserves_outputs_follows_init_and_style() -> None:
    def preserves(**options: object) -> bool:
        return rw.make_pass(("saliency_gates", options)).preserves_outputs

    assert preserves() is True
    assert preserves(init="paper") is False
    assert preserves(style="fbs", keep=0.5) is False  # top-k prunes from insertion
    assert preserves(style="fbs", keep=1.0) is True
    assert preserves(style="fbs", keep=1.0, init="paper") is False
    with pytest.raises(rw.OptionError, match="init"):
        rw.make_pass(("saliency_gates", {"init": "zeros"}))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_init_is_exact_at_insertion_even_on_large_inputs(mode: str) -> None:
    """pi == 1 whatever the input scale: the deep-net eval blow-up of the authors' init is gone."""
    torch.manual_seed(0)
    model = zoo.create("resnet8")
    x = zoo.example_inputs("resnet8", batch=4)[0] * 100.0  # large pooled gate inputs
    gm = rw.rewrite(model, ["saliency_gates"], (x,))  # the manager checks preserves_outputs
    getattr(gm, mode)()
    getattr(model, mode)()
    with torch.no_grad():
        out, ref = gm(x), model(x)
    assert torch.equal(out, ref)
    for gate in gates(gm).values():
        assert torch.equal(gate.last_saliency, torch.ones_like(gate.last_saliency))
    if mode == "train":
        return
    paper = rw.rewrite(model, [("saliency_gates", {"init": "paper"})], (x,))
    evaluate(paper, (x,))
    pis = torch.cat([g.last_saliency.flatten() for g in gates(paper).values()])
    # the authors' init tracks the input scale (in eval mode here it overflows to nan)
    assert not torch.isfinite(pis).all() or (pis - 1).abs().max() > 1.0


def test_statistics_accumulate_only_in_training() -> None:
    gm = gated_net()
    gate = gates(gm)["block_conv1_gate"]
    assert float(gate.saliency_count) == 0  # the pass manager's checks ran in eval mode
    gm.eval()
    gm(*net_inputs())
    assert float(gate.saliency_count) == 0
    gm.train()
    gm(*net_inputs())
    first = gate.last_saliency.detach().sum(0)
    gm(*net_inputs())
    assert float(gate.saliency_count) == 8
    torch.testing.assert_close(gate.saliency_sum, first + gate.last_saliency.detach().sum(0))


def test_copies_drop_the_last_batch_tensors() -> None:
    gm = gated_net()
    gm.train()
    loss = gm(*net_inputs()).sum() + aux_losses(gm)
    clone = copy.deepcopy(gm)  # a non-leaf last_saliency would make deepcopy fail
    assert all(g.last_saliency is None for g in gates(clone).values())
    loss.backward()
    assert gates(gm)["block_conv1_gate"].last_saliency is not None


def test_save_and_load_keep_gates_and_thresholds(tmp_path) -> None:
    gm = rw.rewrite(zoo.create("resnet8"), [("saliency_gates", {"keep": 0.5})])
    gm.train()
    gm(*zoo.example_inputs("resnet8"))
    update_thresholds(gm, 9, 10)
    rw.save(gm, tmp_path / "gated.safetensors")
    back = rw.load(tmp_path / "gated.safetensors")
    assert [float(g.threshold) for g in gates(back).values()] == [
        float(g.threshold) for g in gates(gm).values()
    ]
    assert all(float(g.threshold) > 0 for g in gates(back).values())
    x = zoo.example_inputs("resnet8")
    torch.testing.assert_close(evaluate(back, x), evaluate(gm, x))


def test_rewriter_macs_of_a_manidp_gate() -> None:
    gate = ManiDPGate(4, 8, reduction=2, **gate_kwargs())  # hidden 8 (C_out < 80)
    macs = gate.rewriter_macs([(2, 8, 5, 5), (2, 4, 5, 5)], (2, 8, 5, 5))
    # pool 2*4*25 + fcs 2*(4*8 + 8*8) + pointwise 2*(8 + 5*8) + apply 2*8*25
    assert macs == 200 + 192 + 96 + 400


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def test_complexity_weights_by_hand() -> None:
    ce = torch.tensor([0.0, 0.25, 0.5, 0.75, 2.0])
    # C = 1: [J < C] * (C - J) / C
    torch.testing.assert_close(
        complexity_weights(ce, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    )
    torch.testing.assert_close(
        complexity_weights(ce, 1.0, gamma=2.0), torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0])
    )
    torch.testing.assert_close(complexity_weights(ce, 0.5), torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0]))
    assert torch.equal(complexity_weights(ce, 0.0), torch.ones(5))  # no epoch recorded yet
    assert not complexity_weights(ce.requires_grad_(), 1.0).requires_grad


def test_sparsity_loss_by_hand() -> None:
    layer1 = torch.tensor([[1.0, 3.0], [0.0, 2.0]])  # per-sample channel means 2, 1
    layer2 = torch.tensor([[0.5, 0.5, 2.0], [3.0, 0.0, 0.0]])  # 1, 1
    assert sparsity_loss([layer1, layer2]).item() == pytest.approx((3.0 + 2.0) / 2)
    ce = torch.tensor([0.5, 4.0])  # C = 2: weights 0.75 and 0
    loss = sparsity_loss([layer1, layer2], ce, ce_reference=2.0)
    assert loss.item() == pytest.approx(0.75 * 3.0 / 2)


def test_similarity_loss_by_hand() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: T = I
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # parallel: R = all ones
    assert similarity_loss([features], [same]).item() == pytest.approx(2.0 / 4)
    assert similarity_loss([features], [features * 3]).item() == pytest.approx(0.0)
    # 45 degrees: off-diagonal cos = 1/sqrt 2 against 0, twice, / B^2
    tilted = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = 2 * 0.5 / 4 + 2.0 / 4
    got = similarity_loss([features, features], [tilted, same]).item()
    assert got == pytest.approx(expected)


def test_aux_losses_equal_the_sum_of_the_gate_protocol_and_the_formula() -> None:
    gm = gated_net()
    gm.train()
    x = net_inputs()[0]
    logits = gm(x)
    ce = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3]), reduction="none")
    found = gates(gm)
    with torch.no_grad():
        for g in found.values():
            g.ce_reference.fill_(float(ce.detach().mean()))
    gm.eval()  # no CE recording while comparing
    total = aux_losses(gm, per_sample_ce=ce)
    protocol = sum(g.aux_loss(per_sample_ce=ce, unrelated_key=1) for g in found.values())
    torch.testing.assert_close(total, protocol)
    saliencies = [g.last_saliency for g in found.values()]
    pooled = [g.last_pooled for g in found.values()]
    reference = float(ce.detach().mean())
    by_hand = 0.1 * sparsity_loss(saliencies, ce, ce_reference=reference) + 0.1 * (
        similarity_loss(pooled, saliencies)
    )
    torch.testing.assert_close(total, by_hand)
    other = aux_losses(gm, per_sample_ce=ce, lambda_lasso=1.0, lambda_graph=0.0)
    torch.testing.assert_close(other, sparsity_loss(saliencies, ce, ce_reference=reference))


def test_aux_losses_give_gradients_to_the_gates() -> None:
    gm = gated_net()
    gm.train()
    gm(*net_inputs())
    aux_losses(gm).backward()
    for gate in gates(gm).values():
        assert gate.fc2.bias.grad is not None and gate.fc2.bias.grad.abs().sum() > 0
        assert gate.fc1.weight.grad is not None


def test_ce_is_recorded_in_training_and_end_epoch_sets_the_reference() -> None:
    gm = gated_net()
    gm.train()
    gm(*net_inputs())
    aux_losses(gm, per_sample_ce=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    gm(*net_inputs())
    aux_losses(gm, per_sample_ce=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    gm.eval()
    aux_losses(gm, per_sample_ce=torch.tensor([100.0] * 4))  # eval: not recorded
    update = end_epoch(gm, 0, 10)
    assert update.ce_reference == pytest.approx(0.5 * 12.0 / 8)
    # the authors set the first thresholds at the end of epoch 1: epoch 0 only resets
    assert update.thresholds == {} and update.keep_rate == 1.0
    for gate in gates(gm).values():
        assert float(gate.ce_reference) == pytest.approx(0.75)
        assert float(gate.ce_count) == 0 and float(gate.saliency_count) == 0
        assert float(gate.threshold) == 0.0
    gm.train()
    gm(*net_inputs())
    update = end_epoch(gm, 1, 10)
    assert set(update.thresholds) == set(gates(gm))
    assert update.keep_rate == pytest.approx(keep_rate(2, 10, 0.6))
    assert update.ce_reference == pytest.approx(0.75)  # no CE recorded: C unchanged


def test_start_epoch_zero_updates_after_the_first_epoch() -> None:
    gm = gated_net()
    gm.train()
    gm(*net_inputs())
    thresholds = update_thresholds(gm, 0, 10, start_epoch=0)
    assert set(thresholds) == set(gates(gm))
    assert all(float(g.keep_rate) == pytest.approx(keep_rate(1, 10, 0.6)) for g in gates(gm).values())


def test_init_ce_reference_is_half_the_pretrained_training_ce() -> None:
    model = small_net()
    gm = gated_net()
    batches = [
        (torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(s)), torch.arange(5) % 4)
        for s in range(3)
    ]
    with torch.no_grad():
        ce = torch.cat([F.cross_entropy(model(x), y, reduction="none") for x, y in batches])
    gm.train()
    reference = init_ce_reference(gm, batches)
    assert gm.training  # modes restored
    assert reference == pytest.approx(0.5 * ce.mean().item(), rel=1e-5)  # identity gates: == model
    assert all(float(g.ce_reference) == pytest.approx(reference) for g in gates(gm).values())
    other = init_ce_reference(gm, batches[:1], model=model)
    assert other == pytest.approx(0.5 * ce[:5].mean().item(), rel=1e-5)
    assert float(gates(gm)["block_conv1_gate"].saliency_count) == 0  # eval mode: no statistics
    with pytest.raises(rw.RewriterError, match="no batches"):
        init_ce_reference(gm, [])


def test_losses_need_gates_and_a_forward() -> None:
    with pytest.raises(rw.RewriterError, match="saliency_gates"):
        aux_losses(rw.trace(small_net()))
    gm = gated_net()
    for gate in gates(gm).values():
        gate.last_saliency = None
    with pytest.raises(rw.RewriterError, match="forward"):
        aux_losses(gm)


# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------


def test_keep_rate_schedule() -> None:
    assert keep_rate(0, 10, 0.4) == pytest.approx(1.0)
    assert keep_rate(5, 10, 0.4) == pytest.approx(0.7)
    assert keep_rate(10, 10, 0.4) == pytest.approx(0.4)
    assert keep_rate(15, 10, 0.4) == pytest.approx(0.4)
    assert keep_rate(3, 10, 0.4) == pytest.approx(0.4 + 0.6 * (1 + math.cos(math.pi * 0.3)) / 2)
    rates = [keep_rate(e, 20, 0.5) for e in range(21)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_update_thresholds_against_a_reference() -> None:
    gm = gated_net()
    gm.train()
    seen: dict[str, list[Tensor]] = {name: [] for name in gates(gm)}
    for seed in range(3):
        gm(torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
        for name, gate in gates(gm).items():
            seen[name].append(gate.last_saliency.detach())
    epoch, epochs, target = 3, 8, 0.3
    rate = 0.3 + 0.7 * (1 + math.cos(math.pi * 4 / 8)) / 2  # keep_rate(epoch + 1) = 0.65
    thresholds = update_thresholds(gm, epoch, epochs, target)
    for name, gate in gates(gm).items():
        means = torch.cat(seen[name]).mean(0).tolist()
        k = math.ceil(rate * 8)  # 6 of 8 channels
        expected = sorted(means, reverse=True)[k - 1]
        assert thresholds[name] == pytest.approx(expected, rel=1e-5)
        assert float(gate.threshold) == pytest.approx(expected, rel=1e-5)
        assert float(gate.keep_rate) == pytest.approx(rate)
        assert float(gate.saliency_count) == 0 and not gate.saliency_sum.any()
    with pytest.raises(rw.RewriterError, match="no training samples"):
        update_thresholds(gm, epoch + 1, epochs, target)


def test_threshold_is_applied_per_sample_at_inference() -> None:
    gm = gated_net()
    gate = gates(gm)["block_conv1_gate"]
    set_constant_saliency(gate, [2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5, 1.0])
    with torch.no_grad():
        gate.threshold.fill_(1.0)
    evaluate(gm, net_inputs())
    expected = torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0]).expand(4, 8)
    torch.testing.assert_close(gate.last_mask, expected)
    assert active_channels(gm).tolist() == [4 + 8] * 4  # 4 kept here, 8 (open) in the other gate


def test_ceil_ignores_float_noise() -> None:
    """keep 0.6 of 10 channels is 6 (0.6 * 10 is 6.000000000000001 in floating point)."""
    gm = rw.rewrite(
        nn.Sequential(
            nn.Conv2d(3, 10, 1), nn.ReLU(), nn.Conv2d(10, 10, 1), nn.ReLU(), nn.Conv2d(10, 2, 1)
        ),
        ["saliency_gates"],
        (torch.randn(2, 3, 4, 4),),
    )
    (gate,) = gates(gm).values()
    set_constant_saliency(gate, [float(v) for v in range(1, 11)])
    gm.train()
    gm(torch.randn(2, 3, 4, 4))
    update_thresholds(gm, 9, 10, 0.6)  # keep_rate(10, 10) = 0.6: the 6th largest is 5
    assert float(gate.threshold) == 5.0


# ---------------------------------------------------------------------------
# Dynamic FLOPs
# ---------------------------------------------------------------------------


def test_dynamic_flops_counts_kept_channels_and_gate_overhead() -> None:
    gm = gated_net()
    g1, g2 = gates(gm)["block_conv1_gate"], gates(gm)["block_conv2_gate"]
    set_constant_saliency(g1, [2.0, 2.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # keep 1/4
    set_constant_saliency(g2, [2.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5, 0.5])  # keep 1/2
    with torch.no_grad():
        g1.threshold.fill_(1.0)
        g2.threshold.fill_(1.0)
    x = net_inputs()
    cost = dynamic_flops(gm, x)
    assert set(cost.kept) == {"block_conv1", "block_conv2"}
    assert cost.kept["block_conv1"].tolist() == [0.25] * 4
    ungated = rw.trace(small_net())
    dense = flops(ungated, x)
    expected = flops(ungated, x, channel_keep={"block.conv1": 0.25, "block.conv2": 0.5})
    gate_macs = sum(
        g.rewriter_macs([(4, 8, 4, 4), (4, c, s, s)], None) for g, c, s in ((g1, 4, 8), (g2, 8, 4))
    )
    assert cost.dense == pytest.approx(dense.total_macs / 4)
    assert cost.gate_macs == pytest.approx(gate_macs / 4)
    torch.testing.assert_close(cost.per_sample, expected.per_sample + gate_macs / 4)
    assert cost.reduction == pytest.approx(
        1 - (expected.per_sample_macs + gate_macs / 4) / cost.dense
    )
    # the conv after a gate executes only the kept input channels
    conv2 = cost.report.row("block.conv2")
    assert conv2.keep == pytest.approx(0.25 * 0.5)


def test_dynamic_flops_vary_per_sample() -> None:
    gm = gated_net()
    gate = gates(gm)["block_conv1_gate"]
    with torch.no_grad():  # pi_c = relu(1 + w_c * gap(x)_0): a brighter channel 0 keeps more
        gate.fc1.weight.zero_()
        gate.fc1.weight[:, 0] = 1.0
        gate.fc2.weight.copy_(torch.linspace(-1, 1, 8).view(8, 1).expand(8, 8) / 8)
        gate.fc2.bias.fill_(0.0)
        gate.threshold.fill_(0.05)
    scale = torch.tensor([0.05, 0.3, 1.0, 4.0]).view(4, 1, 1, 1)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scale
    cost = dynamic_flops(gm, (x,))
    kept = cost.kept["block_conv1"]
    assert len(set(kept.tolist())) > 1
    assert kept.tolist() == sorted(kept.tolist())  # brighter inputs keep more channels
    assert cost.per_sample.tolist() == sorted(cost.per_sample.tolist())
    assert cost.per_sample.max() < cost.dense + cost.gate_macs


# ---------------------------------------------------------------------------
# Property suite on random graphs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["manidp", "fbs"])
@PROPERTY
@given(rm=random_models())
def test_pass_contracts_on_random_graphs(style: str, rm) -> None:
    spec = ("saliency_gates", {"style": style, "keep": 0.5})
    result = check_pass(spec, rm)
    gm = result.gm
    found = gates(gm)
    assert result.fired == len(found), rm.description
    modules = dict(rm.model.named_modules())
    shortcut = {n for b in residual_blocks(rw.trace(rm.model)) for n in b.shortcut}
    for gate in found.values():
        assert isinstance(modules[gate.layer], nn.Conv2d)
        assert gate.layer.replace(".", "_") not in shortcut
    if style == "manidp":  # identity at insertion: pi == 1, outputs bit-identical
        out, ref = evaluate(gm, rm.example_inputs), evaluate(rm.model, rm.example_inputs)
        for a, b in zip(tree_flatten(out)[0], tree_flatten(ref)[0], strict=True):
            assert torch.equal(a, b), rm.description
        for gate in found.values():
            assert torch.equal(gate.last_saliency, torch.ones_like(gate.last_saliency))


class TokenBlock(nn.Module):
    """A transformer-style block: ``x + down(mlp(norm(x)))`` with one of the MLP forms."""

    def __init__(self, dim: int, width: int, form: str, prenorm: bool) -> None:
        super().__init__()
        self.form, self.prenorm = form, prenorm
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, width)
        self.gate = nn.Linear(dim, width, bias=False) if form == "swiglu" else None
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.down = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x) if self.prenorm else x
        up = self.up(h)
        if self.form == "swiglu":
            hidden = F.silu(self.gate(h)) * up
        elif self.form == "tanh_gelu":  # GPT-2's gelu_new written out
            hidden = 0.5 * up * (1.0 + torch.tanh(0.7978845608 * (up + 0.044715 * up.pow(3))))
        elif self.form == "functional":
            hidden = self.drop(F.relu(up))
        else:
            hidden = self.act(up)
        out = x + self.down(hidden)
        return out if self.prenorm else self.norm(out)


@st.composite
def token_models(draw: st.DrawFn) -> tuple[nn.Module, tuple[Tensor, ...], int]:
    """1-3 token blocks (random MLP forms, widths, pre/post-norm) on (B, S, D) inputs, then a
    classifier MLP on the mean token (2-D: never gated). Returns the model, inputs, MLPs."""
    dim = draw(st.integers(2, 8))
    forms = draw(st.lists(st.sampled_from(["gelu", "swiglu", "tanh_gelu", "functional"]),
                          min_size=1, max_size=3))  # fmt: skip
    torch.manual_seed(draw(st.integers(0, 2**16)))
    blocks = [TokenBlock(dim, draw(st.integers(1, 12)), f, draw(st.booleans())) for f in forms]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.Linear(dim, 6), nn.ReLU(), nn.Linear(6, 3))

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.blocks(x).mean(1))

    seq = draw(st.integers(1, 5))
    x = torch.randn(2, seq, dim, generator=torch.Generator().manual_seed(seq))
    return Net().eval(), (x,), len(forms)


@PROPERTY_TOKENS
@given(drawn=token_models(), style=st.sampled_from(["manidp", "fbs"]))
def test_token_mlp_gates_on_random_blocks(drawn, style: str) -> None:
    model, inputs, mlps = drawn
    result = check_pass(("saliency_gates", {"style": style, "keep": 1.0}), (model, inputs))
    found = gates(result.gm)
    assert result.fired == len(found) == mlps  # one per block's MLP, none on the head
    assert [g.layer for g in found.values()] == [f"blocks.{i}.down" for i in range(mlps)]
    out = evaluate(result.gm, inputs)
    assert torch.equal(out, evaluate(model, inputs))  # exactly the identity at insertion
    for gate in found.values():
        assert gate.channels_last and gate.last_saliency.shape == (2, gate.out_channels)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("style", ["manidp", "fbs"])
def test_compiles_fullgraph_in_train_and_eval(style: str, fresh_dynamo: None) -> None:
    gm = gated_net(style=style)
    check_compiles(gm, net_inputs())
    gm.train()
    compiled = torch.compile(gm, fullgraph=True)
    y = torch.tensor([0, 1, 2, 3])
    ce = F.cross_entropy(compiled(*net_inputs()), y, reduction="none")
    (ce.mean() + aux_losses(gm, per_sample_ce=ce)).backward()
    for gate in gates(gm).values():
        grads = [p.grad for p in gate.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert float(gate.saliency_count) == 4  # buffers updated under compile


@pytest.mark.slow
def test_threshold_updates_need_no_recompile(fresh_dynamo: None) -> None:
    gm = gated_net()
    gm.eval()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(gm, fullgraph=True)
    x = net_inputs()
    with torch.no_grad():
        open_out = compiled(*x)
        gate = gates(gm)["block_conv1_gate"]
        gate.threshold.fill_(1e9)  # prune every channel of block.conv1
        closed = compiled(*x)
    torch.testing.assert_close(closed, evaluate(gm, x))
    assert not torch.allclose(open_out, closed)
    assert float((gate.last_mask > 0).sum()) == 0
    assert counts["stats"]["unique_graphs"] == 1
