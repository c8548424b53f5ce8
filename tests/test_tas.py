"""Tests of the ``tas`` pass and its training-time functions (docs/methods/tas.md).

References computed independently of the implementation:

* candidate widths ``sorted({max(1, int(C * r))})`` and the authors' depth choices by hand;
* the width mix against the authors' formulation: per candidate ``F.batch_norm`` on the
  first ``c`` channels, ``F.adaptive_avg_pool3d`` to ``max(c_a, c_b)`` channels (their
  ``ChannelWiseInterV2``), zero-padded, weighted sum;
* exact MACs from :func:`rewriter.analysis.flops.flops` of the derived network.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rewriter as rw
import rewriter.passes.tas  # noqa: F401  (registers tas)
from rewriter import testing as rw_testing
from rewriter import zoo
from rewriter.analysis.flops import flops
from rewriter.passes.tas import (
    TASDepth,
    TASNorm,
    TASWidth,
    arch_parameters,
    architecture,
    candidate_widths,
    cost_loss,
    depth_choices,
    derive,
    expected_flops,
    in_target_band,
    set_temperature,
    tas_arch,
    temperature_schedule,
    weight_parameters,
)
from tests.small_models import Net

# -- small models ---------------------------------------------------------------------------


class ConvNoNorm(nn.Module):
    """conv(3->8) -> relu -> conv(8->4) -> pool -> fc: producers without BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def _randomise_logits(gm: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in arch_parameters(gm):
            p.copy_(torch.randn(p.shape, generator=gen) * 2)


def _macs_per_sample(gm: nn.Module, x: Tensor) -> float:
    return flops(gm, x).total_macs / x.shape[0]


# -- candidates and schedule ----------------------------------------------------------------


def test_candidate_widths_and_depth_choices_by_hand():
    assert candidate_widths(16) == [4, 6, 8, 9, 11, 12, 14, 16]
    assert candidate_widths(4) == [1, 2, 3, 4]
    assert candidate_widths(2) == [1, 2]
    assert candidate_widths(1) == [1]
    assert candidate_widths(10, (0.5, 1.0)) == [5, 10]
    assert depth_choices(1) == [1]
    assert depth_choices(3) == [1, 2, 3]
    assert depth_choices(2) == [1, 2]
    assert depth_choices(4) == [1, 3, 4]
    assert depth_choices(5) == [1, 3, 5]
    assert depth_choices(9) == [1, 3, 5, 7, 9]
    assert depth_choices(6) == [1, 3, 5, 6]


def test_temperature_schedule_cosine_and_linear():
    assert temperature_schedule(0, 10) == 10.0
    assert temperature_schedule(9, 10) == pytest.approx(0.1)
    assert temperature_schedule(2, 5, tau_max=4.0, tau_min=2.0) == pytest.approx(3.0)  # t = 1/2
    # t = 1/3: 2 + 2 * (1 + cos(pi / 3)) / 2 = 3.5
    assert temperature_schedule(1, 4, tau_max=4.0, tau_min=2.0) == pytest.approx(3.5)
    assert temperature_schedule(1, 4, 4.0, 1.0, mode="linear") == pytest.approx(3.0)
    with pytest.raises(ValueError, match="epoch"):
        temperature_schedule(10, 10)
    with pytest.raises(ValueError, match="tau_min"):
        temperature_schedule(0, 10, tau_max=1.0, tau_min=2.0)
    with pytest.raises(ValueError, match="mode"):
        temperature_schedule(0, 10, mode="step")


# -- structure ------------------------------------------------------------------------------


def test_before_expected_small_resnet():
    """Before: stem conv/bn/relu, one projection block, pool, fc. Expected graph below."""
    x = torch.randn(2, 3, 8, 8)
    gm = rw.rewrite(Net(), ["tas"], x)
    got = [
        (n.op, str(n.target) if n.op != "call_function" else n.target.__name__,
         tuple(a.name if isinstance(a, torch.fx.Node) else a for a in n.args))
        for n in gm.graph.nodes
    ]  # fmt: skip
    expected = [
        ("placeholder", "x", ()),
        ("call_module", "tas_arch", ()),
        ("call_function", "getitem", ("tas_arch", 0)),
        ("call_function", "getitem", ("tas_arch", 1)),
        ("call_module", "stem", ("x",)),
        ("call_module", "bn", ("stem", "getitem", "getitem_1")),
        ("call_module", "relu", ("bn",)),
        ("call_module", "block.conv1", ("relu",)),
        ("call_module", "block.bn1", ("block_conv1", "getitem", "getitem_1")),
        ("call_module", "block.relu", ("block_bn1",)),
        ("call_module", "block.conv2", ("block_relu",)),
        ("call_module", "block.bn2", ("block_conv2", "getitem", "getitem_1")),
        ("call_module", "block.downsample.0", ("relu",)),
        ("call_module", "block.downsample.1", ("block_downsample_0", "getitem", "getitem_1")),
        ("call_function", "add", ("block_bn2", "block_downsample_1")),
        ("call_module", "block.relu", ("add",)),
        ("call_function", "adaptive_avg_pool2d", ("block_relu_1", 1)),
        ("call_method", "flatten", ("adaptive_avg_pool2d", 1)),
        ("call_module", "fc", ("flatten",)),
        ("output", "output", ("fc",)),
    ]
    assert got == expected
    fired = rw.report(gm).passes[-1]
    assert fired.matches == {
        "channel group -> width choice": 3,  # stem group (4), conv1 group (8), block out (8)
        "batch norm -> per-candidate norm + width mix": 4,
    }
    arch = tas_arch(gm)
    assert arch.group_widths == [[1, 2, 3, 4], [2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 6, 7, 8]]
    assert arch.stage_depths == []
    assert isinstance(gm.get_submodule("block.bn2"), TASNorm)
    assert gm.get_submodule("block.bn2").weight.shape == (7, 8)
    assert arch.width_logits.shape == (18,) and arch.depth_logits is None


def test_producers_without_norm_get_a_width_mix():
    x = torch.randn(2, 3, 6, 6)
    gm = rw.rewrite(ConvNoNorm(), ["tas"], x)
    assert rw.report(gm).passes[-1].matches == {
        "channel group -> width choice": 2,
        "layer output -> width mix": 2,
    }
    mix = gm.get_submodule("conv1_tas")
    assert isinstance(mix, TASWidth) and mix.widths == [2, 3, 4, 5, 6, 7, 8]
    users = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv1_tas"]
    assert users[0].args[0].target == "conv1"


def test_resnet20_counts_and_stages():
    x = torch.randn(2, 1, 8, 8)
    gm = rw.rewrite(zoo.create("resnet20", width=4, in_channels=1), ["tas"], x)
    matches = rw.report(gm).passes[-1].matches
    # 3 stage groups + 9 conv1 groups; every BN follows its producer: 19 convs with BN
    assert matches == {
        "channel group -> width choice": 12,
        "batch norm -> per-candidate norm + width mix": 21,
        "stage -> depth choice": 3,
    }
    arch = tas_arch(gm)
    assert arch.stage_depths == [[1, 2, 3]] * 3
    assert arch.stage_labels == ["layer1.0..layer1.2", "layer2.0..layer2.2", "layer3.0..layer3.2"]
    depth = gm.get_submodule("layer3_2_depth")
    assert isinstance(depth, TASDepth) and depth.blocks == ["layer3.0", "layer3.1", "layer3.2"]
    no_depth = rw.rewrite(
        zoo.create("resnet20", width=4, in_channels=1), [("tas", {"depth": False})], x
    )
    assert "stage -> depth choice" not in rw.report(no_depth).passes[-1].matches
    assert tas_arch(no_depth).depth_logits is None
    assert not any(isinstance(m, TASDepth) for m in no_depth.modules())


def test_bad_options_and_second_run_are_clear_errors():
    with pytest.raises(rw.OptionError, match="flops_ratio"):
        rw.make_pass(("tas", {"flops_ratio": 1.5}))
    with pytest.raises(rw.OptionError, match="ratios"):
        rw.make_pass(("tas", {"ratios": [0.0, 1.0]}))
    with pytest.raises(rw.OptionError, match="temperature"):
        rw.make_pass(("tas", {"temperature": -1.0}))
    x = torch.randn(2, 3, 8, 8)
    gm = rw.rewrite(Net(), ["tas"], x)
    with pytest.raises(rw.PassError, match="already has TAS modules"):
        rw.rewrite(gm, ["tas"], x)
    with pytest.raises(rw.RewriterError, match="apply the tas pass"):
        tas_arch(Net())
    with pytest.raises(ValueError, match="temperature"):
        set_temperature(gm, 0.0)


def test_parameters_split_into_arch_and_weights():
    x = torch.randn(2, 1, 8, 8)
    gm = rw.rewrite(zoo.create("resnet20", width=4, in_channels=1), ["tas"], x)
    arch, weights = arch_parameters(gm), weight_parameters(gm)
    ids_a, ids_w = {id(p) for p in arch}, {id(p) for p in weights}
    assert len(arch) == 2 and not ids_a & ids_w
    assert ids_a | ids_w == {id(p) for p in gm.parameters()}
    set_temperature(gm, 2.5)
    assert float(tas_arch(gm).temperature) == 2.5


# -- numerics of the mix --------------------------------------------------------------------


def _reference_mix(x, bn: TASNorm, pick, p):
    """The authors' formulation: BN per candidate on its first c channels, CWI, weighted sum."""
    c = [bn.widths[int(i)] for i in pick]
    m = max(c)
    out = torch.zeros_like(x)
    for k, (i, width) in enumerate(zip(pick.tolist(), c, strict=True)):
        y = F.batch_norm(
            x[:, :width],
            None,
            None,
            bn.weight[i, :width],
            bn.bias[i, :width],
            training=True,
            eps=bn.eps,
        )
        n, _, h, w = y.shape
        aligned = F.adaptive_avg_pool3d(y, (m, h, w))  # ChannelWiseInterV2
        out[:, :m] += p[k] * aligned
    return out


@pytest.mark.parametrize("pick", [(1, 4), (4, 1), (0, 6), (5, 6), (2, 3)])
def test_train_mix_matches_authors_formulation_and_updates_only_chosen_stats(pick):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    module = TASNorm.from_norm(0, candidate_widths(8), bn).train()
    with torch.no_grad():
        module.weight.add_(torch.randn_like(module.weight) * 0.1)
    x = torch.randn(4, 8, 5, 5) * 2 + 1
    index = torch.tensor([pick])
    weight = torch.tensor([[0.3, 0.7]])
    before_mean = module.running_mean.clone()
    out = module(x, index, weight)
    ref = _reference_mix(x, module, index[0], weight[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    changed = (module.running_mean != before_mean).any(1)
    assert changed.tolist() == [i in pick for i in range(len(module.widths))]
    mean = x.mean((0, 2, 3))
    for i in pick:
        torch.testing.assert_close(module.running_mean[i], 0.9 * before_mean[i] + 0.1 * mean)


def test_eval_mix_is_the_argmax_candidate_with_its_statistics():
    bn = _randomise_norms(nn.Sequential(nn.BatchNorm2d(8)))[0]
    module = TASNorm.from_norm(0, candidate_widths(8), bn).eval()
    x = torch.randn(2, 8, 3, 3)
    index, weight = torch.tensor([[3, 3]]), torch.tensor([[1.0, 0.0]])
    width = module.widths[3]
    expected = torch.zeros_like(x)
    expected[:, :width] = bn(x)[:, :width]
    torch.testing.assert_close(module(x, index, weight), expected)


# -- derive: exactness, MACs ----------------------------------------------------------------


def _resnet_models(draw) -> tuple[nn.Module, Tensor]:
    depth = draw(st.sampled_from([8, 14, 20]))
    width = draw(st.integers(2, 6))
    channels = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = _randomise_norms(
        zoo.create("resnet20", depth=depth, width=width, in_channels=channels), seed
    )
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    return model, x


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_full_width_and_depth_derive_exactly_the_original_resnets(data):
    model, x = _resnet_models(data.draw)
    gm = rw.rewrite(model, ["tas"], x)
    with torch.no_grad():  # every logit favours the widest candidate and the full depth
        for p, sizes in ((tas_arch(gm).width_logits, tas_arch(gm).group_widths),
                         (tas_arch(gm).depth_logits, tas_arch(gm).stage_depths)):  # fmt: skip
            if p is not None:
                p.copy_(torch.cat([torch.arange(len(s), dtype=torch.float32) for s in sizes]))
    derived = derive(gm, x).eval()
    assert torch.equal(derived(x), model.eval()(x))
    assert _macs_per_sample(derived, x) == _macs_per_sample(model, x)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 1000))
def test_derived_resnet_is_the_argmax_architecture(data, seed):
    model, x = _resnet_models(data.draw)
    gm = rw.rewrite(model, ["tas"], x)
    _randomise_logits(gm, seed)
    derived = derive(gm, x).eval()
    arch = tas_arch(gm)
    assert _macs_per_sample(derived, x) == float(arch.argmax_flops())
    assert float(arch.expected_flops(*arch.argmax_probs())) == _macs_per_sample(derived, x)
    torch.testing.assert_close(derived(x), gm.eval()(x), rtol=1e-4, atol=1e-4)
    chosen = architecture(gm)
    kept = {name: m.out_channels for name, m in derived.named_modules() if isinstance(m, nn.Conv2d)}
    for layer, (width, _) in chosen.layer_widths.items():
        if layer in kept:
            assert kept[layer] == width
    blocks_kept = {n.split(".")[0] + "." + n.split(".")[1] for n in kept if n.startswith("layer")}
    for stage, (depth, _) in chosen.depths.items():
        prefix = stage.split(".")[0]
        assert sum(b.startswith(prefix + ".") for b in blocks_kept) == depth


class ResidualStage(nn.Module):
    """``blocks`` identity residual blocks ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                nn.ReLU(), nn.Conv2d(hidden, channels, 3, padding=1), nn.BatchNorm2d(channels),
            )
            for _ in range(blocks)
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return x


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rw_testing.random_models(max_ops=8), st.integers(2, 4), st.integers(2, 6), st.integers(0, 999)
)
def test_random_graphs_with_a_residual_stage(rm, blocks, hidden, seed):
    """A stage of identity blocks in front of a random DAG: the property suite, then derive."""
    x = rm.example_inputs
    torch.manual_seed(seed)
    model = _randomise_norms(
        nn.Sequential(ResidualStage(x[0].shape[1], hidden, blocks), rm.model), seed
    )
    result = rw_testing.check_pass("tas", (model, x))
    gm = result.gm
    assert rw.report(gm).passes[-1].matches["stage -> depth choice"] == 1
    ((*_, length),) = tas_arch(gm).stage_depths  # the DAG may continue the chain
    assert length >= blocks and tas_arch(gm).stage_depths == [depth_choices(length)]
    # every logit favouring the widest candidate and the full depth: exactly the original
    derived_full = derive(gm, x).eval()
    assert len(list(derived_full.modules())) == len(list(model.modules()))
    torch.testing.assert_close(derived_full(*x), model.eval()(*x), rtol=0, atol=0)
    _randomise_logits(gm, seed)
    derived = derive(gm, x).eval()
    arch = tas_arch(gm)
    assert _macs_per_sample(derived, x[0]) == float(arch.argmax_flops())
    (label,) = arch.stage_labels
    assert label.startswith("0/add..")  # blocks of one forward: scope/add node
    depth = architecture(gm).depths[label][0]
    kept = {n.split(".")[2] for n, _ in derived.named_modules() if n.startswith("0.blocks.")}
    assert len(kept) == min(depth, blocks)
    torch.testing.assert_close(derived(*x), gm.eval()(*x), rtol=1e-4, atol=1e-4)


# -- expected MACs and the cost loss --------------------------------------------------------


def test_expected_flops_exact_for_one_hot_and_gradient_reaches_every_logit():
    x = torch.randn(2, 1, 8, 8)
    gm = rw.rewrite(zoo.create("resnet20", width=4, in_channels=1), ["tas"], x)
    arch = tas_arch(gm)
    assert float(expected_flops(gm).detach()) < arch.dense_macs  # uniform: below dense
    for seed in range(4):
        _randomise_logits(gm, seed)
        exact = _macs_per_sample(derive(gm, x), x)
        assert float(arch.expected_flops(*arch.argmax_probs())) == exact
        assert float(arch.argmax_flops()) == exact
    e = expected_flops(gm)
    grads = torch.autograd.grad(e, arch_parameters(gm))
    for g in grads:
        assert torch.isfinite(g).all() and (g != 0).all()
    assert torch.autograd.grad(rw.aux_losses(gm), arch.width_logits)[0].ne(0).all()


def test_expected_flops_is_the_mean_over_sampled_architectures_for_one_group():
    """One group (a conv without BN feeding a fixed conv): E[F] is linear in each group's probs."""
    x = torch.randn(2, 3, 6, 6)
    gm = rw.rewrite(ConvNoNorm(), [("tas", {"ratios": [0.5, 1.0]})], x)
    arch = tas_arch(gm)
    assert arch.group_widths == [[4, 8], [2, 4]]
    macs = {}
    for a in range(2):
        for b in range(2):
            with torch.no_grad():
                arch.width_logits.copy_(torch.tensor([1.0 - a, float(a), 1.0 - b, float(b)]) * 50)
            macs[a, b] = _macs_per_sample(derive(gm, x), x)
    with torch.no_grad():
        arch.width_logits.copy_(torch.tensor([0.3, -0.2, 1.0, 0.1]))
    p = arch.width_probs().detach().double()
    mean = sum(p[0, a] * p[1, b] * macs[a, b] for a in range(2) for b in range(2))
    # float32 probabilities sum to 1 only up to rounding; the constant MACs weigh that in
    assert float(expected_flops(gm).detach()) == pytest.approx(float(mean), rel=1e-6)


def test_cost_loss_by_hand():
    x = torch.randn(2, 1, 8, 8)
    gm = rw.rewrite(
        zoo.create("resnet8", width=4, in_channels=1), [("tas", {"flops_ratio": 0.5})], x
    )
    arch = tas_arch(gm)
    dense = _macs_per_sample(zoo.create("resnet8", width=4, in_channels=1), x)
    assert arch.dense_macs == dense
    # zeros: the argmax is the full network, above the target: 2 * log(E / dense)
    e = float(expected_flops(gm).detach())
    assert float(cost_loss(gm)) == pytest.approx(2 * math.log(e / dense), rel=1e-5)
    assert float(rw.aux_losses(gm)) == pytest.approx(float(cost_loss(gm)))
    # every group at its narrowest: below 0.45 of dense, so -2 * log(E / dense)
    with torch.no_grad():
        arch.width_logits.copy_(
            torch.cat([-torch.arange(len(w), dtype=torch.float32) * 10 for w in arch.group_widths])
        )
    assert float(arch.argmax_flops()) / dense < 0.45
    e = float(expected_flops(gm).detach())
    assert float(cost_loss(gm)) == pytest.approx(-2 * math.log(e / dense), rel=1e-5)
    # inside the band (0.45, 0.5]: no loss
    wide = rw.rewrite(zoo.create("resnet8", width=4, in_channels=1),
                      [("tas", {"flops_ratio": 1.0, "tolerance": 0.01})], x)  # fmt: skip
    assert float(cost_loss(wide)) == 0.0


def test_cost_loss_alone_drives_the_argmax_into_the_target_band():
    """Architecture steps on the cost loss alone (no data) reach 0.45-0.55 of the dense MACs."""
    x = torch.randn(2, 1, 8, 8)
    model = zoo.create("resnet20", in_channels=1)
    gm = rw.rewrite(model, [("tas", {"flops_ratio": 0.5})], x)
    assert float(tas_arch(gm).argmax_flops()) == tas_arch(gm).dense_macs  # starts full
    opt = torch.optim.Adam(arch_parameters(gm), lr=0.05)
    ratios = []
    for _ in range(60):
        opt.zero_grad()
        rw.aux_losses(gm).backward()
        opt.step()
        ratios.append(float(tas_arch(gm).argmax_flops()) / tas_arch(gm).dense_macs)
    ratio = _macs_per_sample(derive(gm, x), x) / _macs_per_sample(model, x)
    assert 0.45 <= ratio <= 0.55, ratios[-10:]
    assert float(cost_loss(gm)) == 0.0  # inside the band the cost loss is off
    assert in_target_band(gm)


@pytest.mark.slow
def test_short_search_reaches_half_the_macs():
    """A few alternating steps (weights on CE, logits on CE + cost) land in 0.45-0.55 of dense."""
    from rewriter.datasets import digits

    torch.manual_seed(0)
    x_tr, y_tr, _, _ = digits(seed=0)
    model = zoo.create("resnet8", width=8, in_channels=1)
    gm = rw.rewrite(model, [("tas", {"flops_ratio": 0.5})], x_tr[:2])
    w_opt = torch.optim.SGD(weight_parameters(gm), lr=0.05, momentum=0.9)
    a_opt = torch.optim.Adam(arch_parameters(gm), lr=0.05, betas=(0.5, 0.999))
    dense = tas_arch(gm).dense_macs
    gm.train()
    steps = 40
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        set_temperature(gm, temperature_schedule(step, steps, 5.0, 0.5))
        idx = torch.randint(len(x_tr), (32,), generator=gen)
        w_opt.zero_grad()
        F.cross_entropy(gm(x_tr[idx]), y_tr[idx]).backward()
        w_opt.step()
        idx = torch.randint(len(x_tr), (32,), generator=gen)
        a_opt.zero_grad()
        (F.cross_entropy(gm(x_tr[idx]), y_tr[idx]) + rw.aux_losses(gm)).backward()
        a_opt.step()
    # the argmax jumps from step to step: architecture steps alone until it is in the band
    settle = 0
    while not in_target_band(gm) and settle < 100:
        idx = torch.randint(len(x_tr), (32,), generator=gen)
        a_opt.zero_grad()
        (F.cross_entropy(gm(x_tr[idx]), y_tr[idx]) + rw.aux_losses(gm)).backward()
        a_opt.step()
        settle += 1
    derived = derive(gm, x_tr[:2])
    ratio = _macs_per_sample(derived, x_tr[:2]) / dense
    assert 0.45 <= ratio <= 0.55, (ratio, settle)
    assert in_target_band(gm) == (0.45 <= ratio <= 0.5)


# -- compile --------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_search_trains_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    from rewriter.datasets import digits

    torch._dynamo.reset()
    torch.manual_seed(0)
    x_tr, y_tr, _, _ = digits(seed=0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        ResidualStage(6, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10),
    )  # fmt: skip
    gm = rw.rewrite(model, ["tas"], x_tr[:2])
    assert rw.report(gm).passes[-1].matches["stage -> depth choice"] == 1
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, fullgraph=True, backend=counter)
    opt = torch.optim.Adam(gm.parameters(), lr=0.01)
    gm.train()
    losses = []
    gen = torch.Generator().manual_seed(0)
    for step in range(15):
        set_temperature(gm, temperature_schedule(step, 15))
        idx = torch.randint(len(x_tr), (64,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x_tr[idx]), y_tr[idx])
        (loss + rw.aux_losses(gm)).backward()
        opt.step()
        losses.append(loss.item())
    assert counter.frame_count == 1  # sampled widths and depths, new temperatures: one graph
    assert sum(losses[-3:]) < sum(losses[:3])
    gm.eval()
    torch.testing.assert_close(compiled(x_tr[:8]), gm(x_tr[:8]), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_getitem_nodes_read_the_arch_output():
    gm = rw.rewrite(Net(), ["tas"], torch.randn(2, 3, 8, 8))
    getters = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert [n.args[1] for n in getters] == [0, 1]
