"""Physical slimming (``rewriter.slim``): the slim model computes what the masked one does.

The property test drops random channels of every prunable group of random graphs,
zeroes them with ``mask_channels``, slims, and checks outputs and the exact parameter
count. Hand-made tests cover the report (disagreements, keep-one, nonzero ops), the
``channel_masks`` source and its errors, and rewritten zoo models.
"""

from __future__ import annotations

import copy
import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_channels import Cat, FlatHead, Gate, Grouped, Norms, Reshapes, Splits
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.channels import ChannelAnalysis, channel_groups
from rewriter.manager import evaluate
from rewriter.passes.masks import get_masks
from rewriter.slim import SLIM_KEY, SlimReport, group_masks, mask_channels, slim
from rewriter.testing import random_models

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Helpers: choosing drops, the expected parameter count, channel masks
# --------------------------------------------------------------------------------------------


def choose_drops(a: ChannelAnalysis, rng: random.Random, fraction: float | None = None) -> dict:
    """Random channels of every prunable group; never a whole group or a whole split piece."""
    drops: dict[int, set[int]] = {}
    for g in a.prunable():
        count = rng.randint(0, g.size - 1) if fraction is None else int(g.size * fraction)
        drops[g.id] = set(rng.sample(range(g.size), min(count, g.size - 1)))
    for s in a.slices:  # a valid choice leaves at least one channel in every piece
        for lo, hi in s.bounds:
            positions = s.positions[lo:hi]
            if positions and all(p is not None and p[1] in drops.get(p[0], ()) for p in positions):
                drops[positions[0][0]].discard(positions[0][1])
    return drops


def removed_indices(a: ChannelAnalysis, drops: dict) -> dict[tuple[str, str], set[int]]:
    removed: dict[tuple[str, str], set[int]] = {}
    for gid, channels in drops.items():
        for m in a.groups[gid].members:
            removed.setdefault((m.layer, m.role), set()).update(m.select(channels))
    return removed


def expected_params(gm: nn.Module, a: ChannelAnalysis, drops: dict) -> int:
    """The parameter count after removing ``drops``, from the members and layer shapes."""
    removed = removed_indices(a, drops)
    total = sum(p.numel() for p in gm.parameters())
    for name, info in a.layers.items():
        kept = {role: n - len(removed.get((name, role), ())) for role, n in info.sizes.items()}
        if info.kind == "param":
            t = gm.get_parameter(name)
            total += t.numel() // t.shape[info.param_dim] * (kept["param"] - info.sizes["param"])
            continue
        m = gm.get_submodule(name)
        before = sum(p.numel() for p in m.parameters(recurse=False))
        if info.kind == "conv":
            groups = {"dense": 1, "balanced": m.groups, "depthwise": kept["in"]}[info.conv_mode]
            after = kept["out"] * (kept["in"] // groups) * math.prod(m.kernel_size)
            after += kept["out"] if m.bias is not None else 0
        elif info.kind == "linear":
            after = kept["out"] * kept["in"] + (kept["out"] if m.bias is not None else 0)
        else:
            after = before // info.sizes["param"] * kept["param"]
        total += after - before
    return total


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_slim_matches_masked(
    gm: fx.GraphModule, inputs: tuple, drops: dict, a: ChannelAnalysis
) -> None:
    """Both sources (zeroed channels, channel masks) give the masked model's outputs."""
    masked = mask_channels(copy.deepcopy(gm), a, drops)
    reference = evaluate(masked, inputs)
    expected = expected_params(gm, a, drops)
    dropped = sum(len(c) for c in drops.values())

    from_zeros = slim(masked, inputs)
    torch.testing.assert_close(evaluate(from_zeros, inputs), reference, rtol=1e-4, atol=1e-5)
    report = from_zeros.meta[SLIM_KEY]
    assert (report.removed, report.disagreements) == (dropped, 0)
    assert params(from_zeros) == report.params_after == expected

    from_masks = slim(gm, inputs, group_masks(a, drops))
    torch.testing.assert_close(evaluate(from_masks, inputs), reference, rtol=1e-4, atol=1e-5)
    assert from_masks.meta[SLIM_KEY].removed == dropped
    assert params(from_masks) == expected


# --------------------------------------------------------------------------------------------
# Property: random graphs
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(rm=random_models(), rng=st.randoms(use_true_random=False))
def test_slim_equals_masked_model_on_random_graphs(rm, rng: random.Random) -> None:
    gm = rw.trace(rm.model)
    a = channel_groups(gm, rm.example_inputs)
    drops = choose_drops(a, rng)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    check_slim_matches_masked(gm, rm.example_inputs, drops, a)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())  # input untouched


@pytest.mark.parametrize(
    "model, shape",
    [
        (Cat, (2, 3, 4, 4)),
        (Splits, (2, 3, 4, 4)),
        (FlatHead, (2, 3, 4, 6)),
        (Grouped, (2, 3, 5, 5)),
        (Gate, (2, 3, 4, 4)),
        (Norms, (2, 3, 4, 4)),
        (Reshapes, (2, 3, 4, 4)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_made_patterns_slim_like_their_masked_model(model, shape, seed: int) -> None:
    torch.manual_seed(seed)
    gm = rw.trace(model()).eval()
    inputs = (torch.randn(*shape),)
    a = channel_groups(gm, inputs)
    check_slim_matches_masked(gm, inputs, choose_drops(a, random.Random(seed)), a)


# --------------------------------------------------------------------------------------------
# Zoo models
# --------------------------------------------------------------------------------------------


def warmed(name: str) -> nn.Module:
    """A zoo model with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(0)
    model = zoo.create(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        model(torch.randn(4, *zoo.input_shape(name)))
    return model.eval()


@pytest.mark.parametrize("name", ["resnet20", "densenet", "mobilenetv2", "vit", "multitask_resnet"])
def test_zoo_models_slim_by_half_like_their_masked_model(name: str) -> None:
    inputs = zoo.example_inputs(name)
    gm = rw.trace(warmed(name))
    a = channel_groups(gm, inputs)
    check_slim_matches_masked(gm, inputs, choose_drops(a, random.Random(0), 0.5), a)


def test_masks_and_rbn_resnet8_slims_by_half() -> None:
    inputs = zoo.example_inputs("resnet8")
    gm = rw.rewrite(warmed("resnet8"), ["masks", "rbn"], inputs)
    a = channel_groups(gm, inputs)
    drops = {g.id: set(range(g.size // 2, g.size)) for g in a.prunable()}
    check_slim_matches_masked(gm, inputs, drops, a)
    small = slim(mask_channels(copy.deepcopy(gm), a, drops), inputs)
    rbn = small.get_submodule("layer2.0.bn1")
    assert type(rbn).__name__ == "RepresentativeBatchNorm2d" and rbn.num_features == 16
    assert (
        rbn.center_weight.shape == rbn.scale_weight.shape == rbn.scale_bias.shape == (1, 16, 1, 1)
    )
    assert rbn.running_mean.shape == (16,)
    conv = small.get_submodule("layer2.0.conv2")
    assert conv.weight.shape == conv.weight_mask.shape == (16, 16, 3, 3)
    assert set(get_masks(small)) == set(get_masks(gm))
    assert small.get_submodule("fc").weight.shape == (10, 32)
    assert [p.name for p in rw.report(small).passes] == ["masks", "rbn"]  # history kept
    assert small.meta[SLIM_KEY].params_after < 0.3 * small.meta[SLIM_KEY].params_before


def test_slim_keeps_training_flags_and_returns_a_plain_graph_module() -> None:
    inputs = zoo.example_inputs("resnet8")
    gm = rw.trace(zoo.create("resnet8"))
    gm.train()
    small = slim(gm, inputs)  # nothing is zero: an equal copy
    assert isinstance(small, fx.GraphModule) and small is not gm
    assert all(m.training for m in small.modules())
    assert params(small) == params(gm) and small.meta[SLIM_KEY].removed == 0
    torch.testing.assert_close(evaluate(small, inputs), evaluate(gm, inputs))


# --------------------------------------------------------------------------------------------
# Semantics: disagreements, keep-one, nonzero ops, channel masks
# --------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.bn(self.conv(x))))


def conv_bn() -> tuple[fx.GraphModule, tuple[Tensor]]:
    torch.manual_seed(0)
    gm = rw.trace(ConvBN())
    with torch.no_grad():
        gm.bn.running_mean.uniform_(-1, 1)
        gm.bn.bias.uniform_(0.5, 1.0)
    return gm.eval(), (torch.randn(2, 3, 5, 5),)


def test_a_zero_filter_whose_bn_still_has_a_bias_is_kept_as_a_disagreement() -> None:
    gm, x = conv_bn()
    with torch.no_grad():
        gm.conv.weight[1] = 0  # the conv says "drop", the BN (beta != 0) says "keep"
        gm.conv.weight[2] = 0
        gm.bn.weight[2] = 0
        gm.bn.bias[2] = 0  # channel 2 is zero after the BN: removable
    small = slim(gm, x)
    report: SlimReport = small.meta[SLIM_KEY]
    (g,) = [g for g in report.groups if g.removed or g.disagreements]
    assert (g.size, g.removed, g.disagreements) == (4, 1, 1)
    assert small.get_submodule("conv").out_channels == 3
    assert "disagree" in report.table()
    torch.testing.assert_close(evaluate(small, x), evaluate(gm, x))


def test_dropping_every_channel_of_a_group_keeps_one() -> None:
    gm, x = conv_bn()
    small = slim(gm, x, {"conv": torch.zeros(4, dtype=torch.bool)})
    assert small.get_submodule("conv").out_channels == 1
    assert small.get_submodule("bn").num_features == 1
    assert "channel 0 is kept" in small.meta[SLIM_KEY].table()


def test_channel_masks_on_norm_layers_and_conflicting_masks() -> None:
    gm, x = conv_bn()
    keep = torch.tensor([True, False, True, False])
    by_bn = slim(gm, x, {"bn": keep})  # Early-Bird style: masks over BN channels
    assert by_bn.get_submodule("conv").out_channels == 2
    assert by_bn.get_submodule("head").in_channels == 2
    both = slim(gm, x, {"bn": keep, "conv": torch.tensor([True, True, True, False])})
    report = both.meta[SLIM_KEY]
    assert (report.removed, report.disagreements) == (1, 1)  # channel 1: bn drops, conv keeps
    assert both.get_submodule("bn").num_features == 3


def test_channel_masks_name_errors_and_shape_errors_are_explained() -> None:
    gm, x = conv_bn()
    with pytest.raises(rw.RewriterError, match="valid names: bn, conv, head"):
        slim(gm, x, {"nope": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(rw.RewriterError, match="1-D tensor of 4 booleans"):
        slim(gm, x, {"conv": torch.ones(5, dtype=torch.bool)})


def test_masks_of_non_prunable_groups_are_ignored_with_a_note() -> None:
    gm, x = conv_bn()
    small = slim(gm, x, {"head": torch.tensor([True, False])})
    assert small.get_submodule("head").out_channels == 2
    assert "not prunable (network output)" in small.meta[SLIM_KEY].table()


class Gated(nn.Module):
    """A sigmoid turns a zeroed channel into 0.5 before the consumer reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.sigmoid(self.conv(x)))


def test_zeroed_filters_before_a_sigmoid_need_zero_consumer_columns() -> None:
    torch.manual_seed(0)
    gm, x = rw.trace(Gated()), (torch.randn(2, 3, 4, 4),)
    with torch.no_grad():
        gm.conv.weight[1] = 0
        gm.conv.bias[1] = 0
    kept = slim(gm, x)
    assert kept.get_submodule("conv").out_channels == 4
    assert "sigmoid" in kept.meta[SLIM_KEY].table()
    with torch.no_grad():
        gm.head.weight[:, 1] = 0
    cut = slim(gm, x)
    assert cut.get_submodule("conv").out_channels == 3
    torch.testing.assert_close(evaluate(cut, x), evaluate(gm, x))


class Pieces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.p, self.q = nn.Conv2d(2, 2, 1), nn.Conv2d(6, 2, 1)
        self.r = nn.Conv2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        p, q = torch.split(y, [2, 6], dim=1)
        return self.p(p) + self.q(q) + self.r(y[:, 5:])


def test_split_sizes_and_slice_bounds_are_rewritten() -> None:
    torch.manual_seed(0)
    gm, x = rw.trace(Pieces()), (torch.randn(2, 3, 4, 4),)
    keep = torch.tensor([True, False, True, False, True, True, False, True])
    small = slim(gm, x, {"a": keep})
    (split,) = [n for n in small.graph.nodes if n.target is torch.split]
    assert split.args[1:] == ([1, 4], 1)
    (sliced,) = [n for n in small.graph.nodes if n.users and n.target == "r"]
    assert sliced.args[0].args[1] == (slice(None), slice(3, 5, None))
    a = channel_groups(gm, x)
    drops: dict[int, set[int]] = {}
    for index, (gid, ch) in enumerate(a.channel_map("a")):
        if not keep[index]:
            drops.setdefault(gid, set()).add(ch)
    masked = mask_channels(copy.deepcopy(gm), a, drops)
    torch.testing.assert_close(evaluate(small, x), evaluate(masked, x))


def test_mask_channels_refuses_non_prunable_groups() -> None:
    gm, x = conv_bn()
    a = channel_groups(gm, x)
    out = a.group_of("head")
    with pytest.raises(rw.RewriterError, match="not prunable"):
        mask_channels(gm, a, {out.id: [0]})


# --------------------------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slimmed_model_trains_under_compile_fullgraph() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    inputs = zoo.example_inputs("digits_cnn", batch=16)
    gm = rw.rewrite(zoo.create("digits_cnn"), ["masks", "rbn"], inputs)
    a = channel_groups(gm, inputs)
    drops = {g.id: set(range(g.size // 2, g.size)) for g in a.prunable()}
    small = slim(gm, inputs, group_masks(a, drops))
    assert small.get_submodule("block.conv1").weight.shape == (8, 8, 3, 3)
    small.train()
    compiled = torch.compile(small, fullgraph=True)
    x = inputs[0]
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(small.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------------------------
# Reusing the caller's analysis
# --------------------------------------------------------------------------------------------


def same_modules(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rm=random_models(), rng=st.randoms(use_true_random=False))
def test_slim_with_the_callers_analysis_equals_slim_without(rm, rng: random.Random) -> None:
    gm = rw.trace(rm.model)
    a = channel_groups(gm, rm.example_inputs)
    drops = choose_drops(a, rng)
    masked = mask_channels(copy.deepcopy(gm), a, drops)  # new weights, same graph: still valid
    for model, masks in ((gm, group_masks(a, drops)), (masked, None)):
        fresh = slim(model, rm.example_inputs, masks)
        reused = slim(model, rm.example_inputs, masks, analysis=a)
        same_modules(fresh, reused)
        assert reused.meta[SLIM_KEY].removed == fresh.meta[SLIM_KEY].removed


def test_slim_does_not_analyse_again_when_given_the_analysis(monkeypatch) -> None:
    gm, x = conv_bn()
    a = channel_groups(gm, x)
    keep = {"conv": torch.tensor([True, False, True, False])}
    expected = slim(gm, x, keep)

    def fail(*args, **kwargs):
        raise AssertionError("channel_groups called again")

    monkeypatch.setattr(sys.modules["rewriter.slim"], "channel_groups", fail)
    same_modules(slim(gm, x, keep, analysis=a), expected)
    with pytest.raises(AssertionError, match="called again"):
        slim(gm, x, keep)


def test_a_stale_or_foreign_analysis_is_refused() -> None:
    gm, x = conv_bn()
    a = channel_groups(gm, x)
    with pytest.raises(rw.RewriterError, match="does not belong to this graph"):
        slim(rw.trace(zoo.create("resnet8")), zoo.example_inputs("resnet8"), analysis=a)
    rbn = rw.rewrite(gm, ["rbn"], x)  # BN -> RBN: more per-channel parameters to cut
    with pytest.raises(rw.RewriterError, match="does not belong to this graph"):
        slim(rbn, x, analysis=a)
    slim(rbn, x, analysis=channel_groups(rbn, x))  # its own analysis is fine
    wider = copy.deepcopy(gm)
    wider.conv = nn.Conv2d(3, 4, 5, padding=2, bias=False)  # same graph, another layer shape
    with pytest.raises(rw.RewriterError, match="layer shapes changed"):
        slim(wider, x, analysis=a)
    masked = rw.rewrite(gm, ["masks"], x)  # masked twins keep the channel structure
    slim(masked, x, analysis=a)
    with pytest.raises(rw.RewriterError, match="no graph fingerprint"):
        slim(gm, x, analysis=ChannelAnalysis(a.groups, a.layers, a.slices))
    with pytest.raises(TypeError, match="ChannelAnalysis"):
        slim(gm, x, analysis=a.groups)


def test_early_bird_and_extract_fit_pass_their_analysis_on() -> None:
    from rewriter.passes.lottery_early_bird import early_bird_ticket
    from rewriter.passes.split import extract_fit

    gm, x = conv_bn()
    a = channel_groups(gm, x)
    keep = {"bn": torch.tensor([True, False, True, True])}
    same_modules(early_bird_ticket(gm, x, keep, analysis=a), early_bird_ticket(gm, x, keep))
    foreign = ChannelAnalysis(a.groups, a.layers, a.slices, fingerprint="0" * 40)
    with pytest.raises(rw.RewriterError, match="does not belong"):
        early_bird_ticket(gm, x, keep, analysis=foreign)

    torch.manual_seed(0)
    inputs = zoo.example_inputs("resnet8")
    split = rw.rewrite(zoo.create("resnet8"), [("split", {"rate": 0.5})], inputs)
    fit = extract_fit(split, inputs, analysis=channel_groups(split, inputs))
    same_modules(fit, extract_fit(split, inputs))
    with pytest.raises(rw.RewriterError, match="does not belong"):
        extract_fit(split, inputs, analysis=foreign)


def test_round_to_keeps_multiples_of_8_with_the_lowest_removed_channels_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 6, 1))
    gm = rw.trace(model.eval())
    x = (torch.randn(2, 3, 6, 6),)
    keep = torch.zeros(32, dtype=torch.bool)
    keep[[3, 9, 17, 30, 31]] = True  # 5 channels
    plain = slim(gm, x, {"0": keep})
    assert plain.get_submodule("0").out_channels == 5
    rounded = slim(gm, x, {"0": keep}, round_to=8)
    assert rounded.get_submodule("0").out_channels == 8
    assert rounded.get_submodule("1").num_features == 8
    assert rounded.get_submodule("3").in_channels == 8
    kept = [0, 1, 2, 3, 9, 17, 30, 31]  # the 3 lowest removed channels came back
    torch.testing.assert_close(
        rounded.get_submodule("0").weight, gm.get_submodule("0").weight[kept]
    )
    report = rounded.meta[SLIM_KEY]
    assert report.removed == 24 and "kept back" in report.table()
    assert slim(gm, x, {"0": keep}, round_to=1).get_submodule("0").out_channels == 5
    assert slim(gm, x, {"0": keep}, round_to=64).get_submodule("0").out_channels == 32  # whole
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to"):
            slim(gm, x, {"0": keep}, round_to=bad)
