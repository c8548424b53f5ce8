"""Tests of the ``skip_gates`` pass and its training-time functions (docs/methods/adashare.md).

Hand-computed references pin the formulas:

* gate: ``p_select * block_out + p_skip * shortcut`` with ``block_out = relu(shortcut + branch)``;
* training policy: ``softmax((logits + g) / T)``, ``g = -log(-log(u))``, ``u ~ U(0, 1)``;
* sparsity: ``sum_k (1 / L) sum_{l learned} CE(logits[k, l], skip)``;
* sharing: ``sum_{i<j} sum_l w_l |logits[i, l, 0] - logits[j, l, 0]|``, ``w_l = (L - l) / L``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

import rewriter as rw
import rewriter.passes.skip  # noqa: F401  (registers skip_gates)
from rewriter import testing as rw_testing
from rewriter import zoo
from rewriter.analysis.blocks import residual_blocks
from rewriter.analysis.flops import flops
from rewriter.passes.skip import (
    SkipMix,
    SkipPolicy,
    argmax_policy,
    aux_losses,
    block_weights,
    curriculum,
    decay_temperature,
    freeze,
    policy_parameters,
    sample_policy,
    set_learned_blocks,
    set_task,
    sharing_loss,
    skip_policy,
    sparsity_loss,
)

# -- small models ---------------------------------------------------------------------------


class TwoBlocks(nn.Module):
    """``relu(x + conv(x))`` then ``x + conv(x)``: two top-level identity blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(x + self.conv1(x))
        return x + self.conv2(x)


class Nested(nn.Module):
    """An inner block inside the branch of an outer block."""

    def __init__(self) -> None:
        super().__init__()
        self.outer = nn.Conv2d(3, 3, 1)
        self.inner = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.outer(x)
        y = y + self.inner(y)
        return x + y.relu()


def inputs(batch: int = 2, channels: int = 3, size: int = 6) -> Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(3))


def gated(model: nn.Module, x: Tensor | None = None, **options) -> fx.GraphModule:
    example = (x,) if x is not None else None
    return rw.rewrite(model, [("skip_gates", options)], example)


def set_hard_logits(gm: nn.Module, policy: Tensor, scale: float = 1.0) -> None:
    """Logits encoding a 0/1 policy: select -> [scale, 0], skip -> [0, scale]."""
    select = policy.to(torch.float32)[..., None]
    hard = torch.cat([select, 1 - select], dim=-1) * scale
    with torch.no_grad():
        skip_policy(gm).logits.copy_(hard)


def mixes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(modules[str(n.target)], SkipMix)
    ]


# -- structure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "gates"),
    [
        ("resnet8", {}, 3),
        ("resnet20", {}, 9),
        ("bottleneck_resnet", {}, 3),
        ("mobilenetv2", {}, 3),
        ("multitask_resnet", {}, 3),
        ("digits_cnn", {}, 1),
        ("vit", {}, 4),
        ("densenet", {}, 0),
        ("mlp", {}, 0),
    ],
)
def test_gate_count_per_zoo_model(name: str, options: dict, gates: int) -> None:
    model = zoo.create(name, **options)
    gm = gated(model, tasks=2)
    record = rw.report(gm).passes[-1]
    assert record.fired == gates == len(residual_blocks(rw.trace(model)))
    assert len(mixes(gm)) == gates
    if gates:
        assert record.modules_added[0] == "skip_policy"
        assert skip_policy(gm).logits.shape == (2, gates, 2)
        assert record.params_added == 2 * gates * 2
        assert [gm.get_submodule(str(n.target)).index for n in mixes(gm)] == list(range(gates))
    else:
        assert record.modules_added == [] and record.notes


def test_resnet8_names_and_wiring() -> None:
    model = zoo.create("resnet8")
    gm = gated(model)
    assert rw.report(gm).passes[-1].modules_added == [
        "skip_policy",
        "layer1_0_skip",
        "layer2_0_skip",
        "layer3_0_skip",
    ]
    assert skip_policy(gm).blocks == ("layer1.0", "layer2.0", "layer3.0")
    new_keys = set(gm.state_dict()) - set(model.state_dict())
    assert new_keys == {
        "skip_policy.logits",
        "skip_policy.task",
        "skip_policy.temperature",
        "skip_policy.learned",
        "skip_policy.sharing_weights",
    }
    nodes = {n.name: n for n in gm.graph.nodes}
    policy_node = nodes["skip_policy"]
    assert policy_node.prev.op == "placeholder"  # called once, at the top
    identity, projection = nodes["layer1_0_skip"], nodes["layer2_0_skip"]
    # Expected: skip(relu2, shortcut, skip_policy) for the identity block ...
    assert [a.name for a in identity.args] == ["layer1_0_relu2", "layer1_0_shortcut", "skip_policy"]
    # ... and skip(relu2, downsample BN, skip_policy) for the projection block.
    assert [a.name for a in projection.args] == [
        "layer2_0_relu2",
        "layer2_0_shortcut_1",
        "skip_policy",
    ]
    assert list(nodes["layer1_0_relu2"].users) == [identity]  # every other use goes via the gate
    # The next block reads the gated value on both its branch and its shortcut.
    assert nodes["layer2_0_conv1"].args[0] is identity
    assert nodes["layer2_0_shortcut_0"].args[0] is identity


def test_before_expected_top_level_blocks() -> None:
    gm = gated(TwoBlocks(), inputs())
    expected = [
        ("placeholder", "x", ()),
        ("call_module", "skip_policy", ()),
        ("call_module", "conv1", ("x",)),
        ("call_function", "add", ("x", "conv1")),
        ("call_function", "relu", ("add",)),
        ("call_module", "add_skip", ("relu", "x", "skip_policy")),
        ("call_module", "conv2", ("add_skip",)),
        ("call_function", "add_1", ("add_skip", "conv2")),
        ("call_module", "add_1_skip", ("add_1", "add_skip", "skip_policy")),
        ("output", "output", ("add_1_skip",)),
    ]
    got = [(n.op, n.name, tuple(a.name for a in n.all_input_nodes)) for n in gm.graph.nodes]
    assert got == expected


def test_vit_block_labels_are_unique() -> None:
    gm = gated(zoo.create("vit"))
    assert skip_policy(gm).blocks == (
        "blocks.0/add_1",
        "blocks.0/add_2",
        "blocks.1/add_3",
        "blocks.1/add_4",
    )


def test_include_exclude() -> None:
    model = zoo.create("resnet8")
    assert rw.report(gated(model, exclude=("layer1.*",))).passes[-1].fired == 2
    assert skip_policy(gated(model, include=("layer3.*",))).blocks == ("layer3.0",)


def test_running_twice_is_a_clear_error() -> None:
    gm = gated(zoo.create("resnet8"))
    with pytest.raises(rw.RewriterError, match="already has skip gates"):
        rw.rewrite(gm, ["skip_gates"])


def test_options_are_validated() -> None:
    with pytest.raises(rw.OptionError, match="tasks"):
        rw.make_pass(("skip_gates", {"tasks": 0}))
    with pytest.raises(rw.OptionError, match="eval_policy"):
        rw.make_pass(("skip_gates", {"eval_policy": "sample"}))
    weights = rw.make_pass(("skip_gates", {"sharing_weights": [1, 0.5, 0.25]}))
    assert weights.sharing_weights == (1.0, 0.5, 0.25)
    with pytest.raises(rw.PassError, match="expected 3 sharing weights"):
        gated(zoo.create("resnet8"), sharing_weights=(1.0, 2.0))


# -- numerics at insertion -----------------------------------------------------------------


def test_eval_outputs_are_preserved_with_argmax() -> None:
    model = zoo.create("multitask_resnet").eval()
    x = zoo.example_inputs("multitask_resnet", batch=3)[0]
    gm = gated(model, x, tasks=2).eval()
    assert rw.get_pass("skip_gates")().preserves_outputs
    with torch.no_grad():
        for task in (0, 1):
            set_task(gm, task)
            for got, want in zip(gm(x), model(x), strict=True):
                assert torch.equal(got, want)


def test_softmax_eval_policy_mixes_half_and_half() -> None:
    model = TwoBlocks().eval()
    x = inputs()
    gm = gated(model, x, eval_policy="softmax").eval()
    assert not rw.make_pass(("skip_gates", {"eval_policy": "softmax"})).preserves_outputs
    with torch.no_grad():
        h = 0.5 * torch.relu(x + model.conv1(x)) + 0.5 * x
        expected = 0.5 * (h + model.conv2(h)) + 0.5 * h
        torch.testing.assert_close(gm(x), expected)


def test_training_policy_is_gumbel_softmax_by_hand() -> None:
    gm = gated(zoo.create("resnet8"), tasks=2).train()
    policy = skip_policy(gm)
    logits = torch.tensor([[[0.3, -0.2], [1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0]] * 3])
    with torch.no_grad():
        policy.logits.copy_(logits)
    decay_temperature(gm, 0.5)  # T = 2.5
    torch.manual_seed(7)
    got = policy()
    torch.manual_seed(7)
    u = torch.rand(3, 2)
    g = -torch.log(-torch.log(u))
    expected = torch.softmax((logits[0] + g) / 2.5, dim=-1)
    torch.testing.assert_close(got, expected)
    assert torch.allclose(got.sum(-1), torch.ones(3))


def test_training_mix_by_hand() -> None:
    model = TwoBlocks().train()
    x = inputs()
    gm = gated(model, x).train()
    torch.manual_seed(0)
    p = skip_policy(gm)()
    torch.manual_seed(0)
    out = gm(x)
    with torch.no_grad():
        h = p[0, 0] * torch.relu(x + model.conv1(x)) + p[0, 1] * x
        expected = p[1, 0] * (h + model.conv2(h)) + p[1, 1] * h
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, model(x))  # training outputs are a soft mix


def test_set_task_selects_the_logits_row() -> None:
    gm = gated(zoo.create("resnet8"), tasks=3).eval()
    policy = skip_policy(gm)
    with torch.no_grad():
        policy.logits[1, 1] = torch.tensor([0.0, 1.0])  # task 1 skips block 1
    assert policy()[1].tolist() == [1.0, 0.0]
    set_task(gm, 1)
    assert policy()[1].tolist() == [0.0, 1.0]
    assert int(policy.task) == 1
    with pytest.raises(rw.RewriterError, match=r"\[0, 3\)"):
        set_task(gm, 3)


def test_one_backward_through_forwards_of_several_tasks() -> None:
    gm = gated(zoo.create("multitask_resnet", width=4), tasks=2).train()
    x = zoo.example_inputs("multitask_resnet", batch=4, width=4)[0]
    losses = []
    for task in (0, 1):
        set_task(gm, task)  # AdaShare: one forward per task, one summed loss
        losses.append(gm(x)[task].square().mean())
    sum(losses).backward()
    assert torch.count_nonzero(skip_policy(gm).logits.grad[0]) > 0
    assert torch.count_nonzero(skip_policy(gm).logits.grad[1]) > 0


def test_policy_gradient_reaches_learned_blocks_only() -> None:
    gm = gated(zoo.create("resnet8"), tasks=2).train()
    set_learned_blocks(gm, 2)
    set_task(gm, 1)
    x = zoo.example_inputs("resnet8", batch=4)[0]
    gm(x).square().mean().backward()
    grad = skip_policy(gm).logits.grad
    assert grad is not None
    assert torch.count_nonzero(grad[0]) == 0  # task 0 inactive
    assert torch.count_nonzero(grad[1, 0]) == 0  # forced to select
    assert torch.count_nonzero(grad[1, 1:]) > 0
    assert policy_parameters(gm) == [skip_policy(gm).logits]


# -- losses on hand-computed tensors ---------------------------------------------------------


@pytest.fixture
def three_tasks() -> fx.GraphModule:
    gm = gated(TwoBlocks(), inputs(), tasks=3)
    logits = torch.tensor(
        [
            [[1.0, 0.0], [2.0, 0.0]],
            [[3.0, math.log(3.0)], [-1.0, 0.0]],
            [[0.0, 0.0], [4.0, math.log(3.0)]],
        ]
    )
    with torch.no_grad():
        skip_policy(gm).logits.copy_(logits)
    return gm


def ce_skip(select: float, skip: float) -> float:
    return math.log(math.exp(select) + math.exp(skip)) - skip


def test_sparsity_loss_by_hand(three_tasks: fx.GraphModule) -> None:
    per_task = [
        (ce_skip(1, 0) + ce_skip(2, 0)) / 2,
        (ce_skip(3, math.log(3)) + ce_skip(-1, 0)) / 2,
        (ce_skip(0, 0) + ce_skip(4, math.log(3))) / 2,
    ]
    assert sparsity_loss(three_tasks).item() == pytest.approx(sum(per_task), rel=1e-6)
    assert ce_skip(0, 0) == pytest.approx(math.log(2))
    set_learned_blocks(three_tasks, 1)  # only block 1 is learned: block 0 counts 0
    expected = (ce_skip(2, 0) + ce_skip(-1, 0) + ce_skip(4, math.log(3))) / 2
    assert sparsity_loss(three_tasks).item() == pytest.approx(expected, rel=1e-6)
    set_learned_blocks(three_tasks, 0)
    assert sparsity_loss(three_tasks).item() == 0.0


def test_sparsity_mean_over_learned_blocks_is_the_authors_form() -> None:
    gm = gated(zoo.create("resnet8"), tasks=2, sparsity_mean="learned")  # 3 blocks
    policy = skip_policy(gm)
    assert policy.sparsity_mean == "learned"
    default = gated(zoo.create("resnet8"), tasks=2)
    with torch.no_grad():
        logits = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(0))
        policy.logits.copy_(logits)
        skip_policy(default).logits.copy_(logits)
    ce = -torch.log_softmax(logits, dim=-1)[..., 1]  # (tasks, blocks) towards skip
    for learned in (1, 2, 3):
        set_learned_blocks(gm, learned)
        set_learned_blocks(default, learned)
        on = ce[:, 3 - learned :]  # the curriculum learns the last blocks
        torch.testing.assert_close(sparsity_loss(gm), on.mean(-1).sum())
        torch.testing.assert_close(sparsity_loss(default), on.sum(-1).sum() / 3)
    set_learned_blocks(gm, 2)
    set_learned_blocks(default, 2)  # 2 of 3 learned: the authors' form is 1.5x stronger
    assert sparsity_loss(gm).item() == pytest.approx(1.5 * sparsity_loss(default).item())
    set_learned_blocks(gm, 0)
    assert sparsity_loss(gm).item() == 0.0
    with pytest.raises(rw.OptionError, match="sparsity_mean"):
        rw.make_pass(("skip_gates", {"sparsity_mean": "max"}))


def test_sharing_loss_by_hand(three_tasks: fx.GraphModule) -> None:
    # select logits per task: [1, 2], [3, -1], [0, 4]
    # paper w = [1, 1/2]: |1-3| + |2+1|/2 = 3.5; |1-0| + |2-4|/2 = 2; |3-0| + |-1-4|/2 = 5.5
    assert sharing_loss(three_tasks).item() == pytest.approx(11.0)
    # code w = [1/2, 1]: 1 + 3 = 4; 0.5 + 2 = 2.5; 1.5 + 5 = 6.5
    assert sharing_loss(three_tasks, "code").item() == pytest.approx(13.0)
    assert sharing_loss(three_tasks, [2.0, 0.0]).item() == pytest.approx(4 + 2 + 6)


def test_aux_losses_combine_with_pass_coefficients() -> None:
    gm = gated(TwoBlocks(), inputs(), tasks=2, sparsity_weight=0.5, sharing_weight=3.0)
    with torch.no_grad():
        skip_policy(gm).logits.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0]] * 2]))
    sp, sh = sparsity_loss(gm), sharing_loss(gm)
    assert sh.item() == pytest.approx(1.0)  # |1 - 0| * w_0, w_0 = 1
    torch.testing.assert_close(aux_losses(gm), 0.5 * sp + 3.0 * sh)
    torch.testing.assert_close(aux_losses(gm, sparsity_weight=1.0, sharing_weight=0.0), sp)
    torch.testing.assert_close(skip_policy(gm).aux_loss(per_sample_ce=None), 0.5 * sp + 3.0 * sh)
    torch.testing.assert_close(rw.aux_losses(gm), 0.5 * sp + 3.0 * sh)  # the library-wide sum
    aux_losses(gm).backward()
    assert skip_policy(gm).logits.grad is not None


def test_block_weights() -> None:
    torch.testing.assert_close(block_weights("paper", 4), torch.tensor([1.0, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(block_weights("code", 4), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(block_weights((3, 2), 2), torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match="expected 4"):
        block_weights((1.0,), 4)
    with pytest.raises(ValueError, match="paper"):
        block_weights("papers", 4)


# -- schedules -------------------------------------------------------------------------------


def test_curriculum_mask() -> None:
    gm = gated(zoo.create("resnet20")).eval()
    policy = skip_policy(gm)
    for epoch, learned in [(0, 1), (2, 1), (3, 2), (5, 2), (6, 3), (24, 9), (100, 9)]:
        assert curriculum(gm, epoch) == learned
        assert policy.learned.tolist() == [0.0] * (9 - learned) + [1.0] * learned
    with pytest.raises(ValueError):
        curriculum(gm, -1)
    assert set_learned_blocks(gm, 0) == 0 and policy.learned.sum() == 0


@pytest.mark.parametrize("training", [True, False])
def test_forced_blocks_select_exactly(training: bool) -> None:
    gm = gated(zoo.create("resnet8"), tasks=1).train(training)
    with torch.no_grad():
        skip_policy(gm).logits.copy_(torch.tensor([[[0.0, 9.0]] * 3]))  # every block says skip
    set_learned_blocks(gm, 1)
    p = skip_policy(gm)()
    assert p[:2].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert p[2, 1] > 0.5


def test_temperature_decay() -> None:
    gm = gated(zoo.create("resnet8"))
    assert skip_policy(gm).temperature.item() == 5.0
    assert decay_temperature(gm) == pytest.approx(5.0 * 0.965)
    assert decay_temperature(gm, 0.5) == pytest.approx(5.0 * 0.965 * 0.5)
    assert skip_policy(gm).temperature.item() == pytest.approx(5.0 * 0.965 * 0.5)
    with pytest.raises(ValueError):
        decay_temperature(gm, 0.0)
    assert skip_policy(gated(zoo.create("resnet8"), temperature=2.0)).temperature.item() == 2.0


def test_functions_need_the_pass() -> None:
    with pytest.raises(rw.RewriterError, match="apply the skip_gates pass first"):
        set_task(rw.trace(zoo.create("resnet8")), 0)


# -- final policies and freeze ---------------------------------------------------------------


def test_argmax_and_sample_policy() -> None:
    gm = gated(zoo.create("resnet8"), tasks=2)
    assert argmax_policy(gm).tolist() == [[True] * 3] * 2  # ties select
    with torch.no_grad():
        skip_policy(gm).logits.copy_(
            torch.tensor([[[0, 30], [30, 0], [0, 0]], [[0, 30], [0, 30], [30, 0]]]).float()
        )
    assert argmax_policy(gm).tolist() == [[False, True, True], [False, False, True]]
    first = sample_policy(gm, torch.Generator().manual_seed(1))
    assert first.dtype == torch.bool and first.shape == (2, 3)
    assert first[:, :2].tolist() == [[False, True], [False, False]]  # p = 1 - 1e-13 or 1e-13
    assert first[1, 2]
    assert torch.equal(first, sample_policy(gm, torch.Generator().manual_seed(1)))
    draws = torch.stack([sample_policy(gm, torch.Generator().manual_seed(s)) for s in range(400)])
    assert 0.4 < draws[:, 0, 2].float().mean() < 0.6  # equal logits: Bernoulli(0.5)
    set_learned_blocks(gm, 1)
    assert argmax_policy(gm)[:, :2].all() and sample_policy(gm)[:, :2].all()


def test_freeze_multitask_equals_gated_and_removes_blocks() -> None:
    model = zoo.create("multitask_resnet", width=4)
    x = zoo.example_inputs("multitask_resnet", batch=3, width=4)[0]
    gm = gated(model, x, tasks=2).eval()
    policy = torch.tensor([[True, False, True], [False, True, False]])
    frozen = freeze(gm, policy)
    set_hard_logits(gm, policy)
    assert torch.equal(argmax_policy(gm), policy)
    with torch.no_grad():
        for task, net in enumerate(frozen):
            set_task(gm, task)
            for got, want in zip(net.eval()(x), gm(x), strict=True):
                assert torch.equal(got, want)
    names0 = dict(frozen[0].named_modules())
    assert "backbone.layer2.0.conv1" not in names0 and "backbone.layer2.0.bn2" not in names0
    assert "backbone.layer2.0.shortcut.0" in names0  # the skipped block is its projection
    assert "backbone.layer1.0.conv1" in names0
    assert not any(isinstance(m, (SkipPolicy, SkipMix)) for m in frozen[0].modules())
    traced = len(rw.trace(model).graph.nodes)
    per_block = 7  # conv1 bn1 relu1 conv2 bn2 add relu2; the shortcut stays
    assert len(frozen[0].graph.nodes) == traced - per_block
    assert len(frozen[1].graph.nodes) == traced - 2 * per_block
    assert frozen[1].meta["skip_gates_policy"] == {
        "task": 1,
        "selected": ["backbone.layer2.0"],
        "skipped": ["backbone.layer1.0", "backbone.layer3.0"],
    }
    assert "backbone.layer1.0.conv1.weight" not in frozen[1].state_dict()
    macs = [flops(net, (x,)).total_macs for net in (model, *frozen)]
    assert macs[0] > macs[1] > macs[2]  # real compute saved, not multiplied by zero
    gated_report = flops(gm, (x,))
    assert gated_report.unknown == [] and gated_report.total_macs > macs[0]  # the mixes cost


def test_freeze_all_selected_is_the_original_graph() -> None:
    model = zoo.create("resnet8")
    gm = gated(model)
    (frozen,) = freeze(gm, torch.ones(1, 3, dtype=torch.bool))
    original = rw.trace(model)
    assert [(n.op, n.target) for n in frozen.graph.nodes] == [
        (n.op, n.target) for n in original.graph.nodes
    ]
    assert set(frozen.state_dict()) == set(model.state_dict())


def test_freeze_in_training_mode_with_saturated_logits() -> None:
    model = zoo.create("resnet8", width=4)
    x = zoo.example_inputs("resnet8", batch=4, width=4)[0]
    gm = gated(model, x, tasks=1).train()
    policy = torch.tensor([[False, True, False]])
    set_hard_logits(gm, policy, scale=1e4)  # Gumbel softmax saturates to exactly 0/1
    (frozen,) = freeze(gm, policy)
    reference = copy.deepcopy(gm)
    torch.testing.assert_close(frozen.train()(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("select", [(a, b) for a in (True, False) for b in (True, False)])
def test_freeze_nested_blocks(select: tuple[bool, bool]) -> None:
    x = inputs()
    gm = gated(Nested(), x).eval()
    assert skip_policy(gm).blocks == ("add", "add_1")  # inner, outer
    policy = torch.tensor([select])
    (frozen,) = freeze(gm, policy)
    set_hard_logits(gm, policy)
    with torch.no_grad():
        assert torch.equal(frozen.eval()(x), gm(x))
    modules = dict(frozen.named_modules())
    assert ("inner" in modules) == (select[0] and select[1])
    assert ("outer" in modules) == select[1]


def test_frozen_graph_records_its_policy_and_round_trips(tmp_path) -> None:
    model = zoo.create("resnet8", width=4)
    gm = gated(model, tasks=2)
    with torch.no_grad():
        skip_policy(gm).logits.normal_(generator=torch.Generator().manual_seed(0))
    frozen = freeze(gm, torch.tensor([[True, False, False], [False, True, True]]))
    record = rw.report(frozen[0]).passes[-1]
    assert rw.report(frozen[0]).pipeline()[-1] == (
        "skip_freeze",
        {"select": [True, False, False], "task": 0},
    )
    assert record.matches == {"selected block: gate removed": 1, "skipped block: removed": 2}
    assert rw.report(frozen[1]).pipeline()[0][0] == "skip_gates"
    rw.save(frozen[1], tmp_path / "task1.safetensors")
    loaded = rw.load(tmp_path / "task1.safetensors")
    x = zoo.example_inputs("resnet8", width=4)[0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), frozen[1].eval()(x))
    assert "layer1.0.conv1.weight" not in loaded.state_dict()
    assert skip_policy(gm).logits.shape == (2, 3, 2)  # freeze did not touch gm


def test_skip_freeze_pass_needs_gates_and_a_full_policy() -> None:
    gm = gated(zoo.create("resnet8"))
    with pytest.raises(rw.PassError, match="one entry per gated block"):
        rw.rewrite(gm, [("skip_freeze", {"select": [True, False]})])
    with pytest.raises(rw.PassError, match="apply the skip_gates pass first"):
        rw.rewrite(zoo.create("resnet8"), [("skip_freeze", {"select": [True]})])


def test_freeze_rejects_wrong_shapes() -> None:
    gm = gated(zoo.create("resnet8"), tasks=2)
    with pytest.raises(rw.RewriterError, match=r"\(tasks, blocks\) = \(2, 3\)"):
        freeze(gm, torch.ones(3, dtype=torch.bool))


# -- properties on random graphs -------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(rw_testing.random_models())
def test_property_suite(rm: rw_testing.RandomModel) -> None:
    result = rw_testing.check_pass(("skip_gates", {"tasks": 2}), rm)
    assert result.fired == len(residual_blocks(rw.trace(rm.model)))
    assert not result.idempotent or result.fired == 0  # a gated graph refuses a second run


@settings(max_examples=50, deadline=None)
@given(rw_testing.random_models(), st.data())
def test_freeze_equals_hard_gated_on_random_graphs(
    rm: rw_testing.RandomModel, data: st.DataObject
) -> None:
    gm = rw.rewrite(rm.model, ["skip_gates"], rm.example_inputs).eval()
    blocks = len(mixes(gm))
    if not blocks:
        assert not any(isinstance(m, SkipPolicy) for m in gm.modules())
        return
    bits = data.draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    policy = torch.tensor([bits])
    (frozen,) = freeze(gm, policy)
    set_hard_logits(gm, policy)
    with torch.no_grad():
        torch.testing.assert_close(frozen.eval()(*rm.example_inputs), gm(*rm.example_inputs))
    frozen.graph.lint()
    if not all(bits):
        assert len(frozen.graph.nodes) < len(rw.trace(rm.model).graph.nodes)


# -- torch.compile ---------------------------------------------------------------------------


def _step(compiled: nn.Module, x: Tensor) -> Tensor:
    out = compiled(x)
    loss = sum(F.cross_entropy(o, torch.zeros(len(o), dtype=torch.long)) for o in out)
    loss.backward()
    return loss


@pytest.mark.slow
def test_compiled_training_switches_tasks_without_recompiling() -> None:
    torch._dynamo.reset()
    gm = gated(zoo.create("multitask_resnet", width=4), tasks=2).train()
    x = zoo.example_inputs("multitask_resnet", batch=4, width=4)[0]
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    _step(compiled, x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task, epoch in [(1, 0), (0, 3), (1, 6)]:
            set_task(gm, task)
            curriculum(gm, epoch)
            decay_temperature(gm)
            gm.zero_grad()
            _step(compiled, x)
            grad = skip_policy(gm).logits.grad
            assert grad is not None and torch.count_nonzero(grad[1 - task]) == 0
            assert torch.count_nonzero(grad[task]) > 0


@pytest.mark.slow
def test_compiled_eval_switches_tasks_without_recompiling() -> None:
    torch._dynamo.reset()
    gm = gated(zoo.create("multitask_resnet", width=4), tasks=2).eval()
    x = zoo.example_inputs("multitask_resnet", batch=4, width=4)[0]
    with torch.no_grad():
        skip_policy(gm).logits[1, 1] = torch.tensor([0.0, 1.0])  # task 1 skips block 1
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = []
            for task in (0, 1, 0):
                set_task(gm, task)
                outs.append(compiled(x))
                torch.testing.assert_close(outs[-1], gm(x))
    assert torch.equal(outs[0][0], outs[2][0]) and not torch.allclose(outs[0][0], outs[1][0])


@pytest.mark.slow
def test_inductor_fullgraph_train_and_eval() -> None:
    torch._dynamo.reset()
    gm = gated(zoo.create("resnet8", width=4), tasks=2)
    rw_testing.check_compiles(gm, zoo.example_inputs("resnet8", batch=2, width=4))
