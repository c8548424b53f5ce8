"""Tests of the ``split`` pass (Knowledge Evolution) and its actions.

``set_hypothesis``, ``reinitialize``, ``extract_fit`` and ``evolve`` are tested on
hand-made models for every KELS corner case, on random graphs and on the zoo.
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from small_models import Net
from torch import Tensor, fx, nn

import rewriter as rw
import rewriter.passes.split  # noqa: F401  (registers the pass)
from rewriter import zoo
from rewriter.manager import evaluate
from rewriter.passes.masks import MaskedConv2d, get_masks
from rewriter.passes.split import (
    FIT_MASK,
    SCALE,
    SplitConv2d,
    SplitLinear,
    SplitMaskedConv2d,
    current_hypothesis,
    evolve,
    extract_fit,
    fit_count,
    get_fit_masks,
    reinitialize,
    set_hypothesis,
    split_layers,
    use_hypothesis,
)
from rewriter.testing import check_pass, random_models, train_losses

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYERS = ["stem", "block.conv1", "block.conv2", "block.downsample.0", "fc"]


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BN statistics
            model(torch.randn(4, 3, 8, 8) * 2 + 0.5)
    return model.eval()


def inputs() -> tuple[Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def split(model: nn.Module | None = None, example=None, **options: object) -> fx.GraphModule:
    return rw.rewrite(model or net(), [("split", options)], example or inputs())


def graph_rows(gm: fx.GraphModule) -> list[tuple[str, object, str | None]]:
    rows = []
    for node in gm.graph.nodes:
        cls = (
            type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else None
        )
        rows.append((node.op, node.target, cls))
    return rows


def fit_rows(mask: Tensor) -> list[int]:
    return torch.nonzero(mask.flatten(1).any(1)).flatten().tolist()


def fit_cols(mask: Tensor) -> list[int]:
    return torch.nonzero(mask.transpose(0, 1).flatten(1).any(1)).flatten().tolist()


def assert_product(mask: Tensor) -> None:
    """A KELS mask of an ungrouped layer is exactly fit rows x fit columns."""
    rows, cols = mask.flatten(1).any(1), mask.transpose(0, 1).flatten(1).any(1)
    expected = rows[:, None] & cols[None, :]
    expected = expected.reshape(*expected.shape, *[1] * (mask.dim() - 2)).expand(mask.shape)
    assert torch.equal(mask, expected)


# ---------------------------------------------------------------------------
# Before / Expected
# ---------------------------------------------------------------------------

EXPECTED = [
    ("placeholder", "x", None),
    ("call_module", "stem", "SplitConv2d"),
    ("call_module", "bn", "BatchNorm2d"),
    ("call_module", "relu", "ReLU"),
    ("call_module", "block.conv1", "SplitConv2d"),
    ("call_module", "block.bn1", "BatchNorm2d"),
    ("call_module", "block.relu", "ReLU"),
    ("call_module", "block.conv2", "SplitConv2d"),
    ("call_module", "block.bn2", "BatchNorm2d"),
    ("call_module", "block.downsample.0", "SplitConv2d"),
    ("call_module", "block.downsample.1", "BatchNorm2d"),
    ("call_function", operator.add, None),
    ("call_module", "block.relu", "ReLU"),
    ("call_function", F.adaptive_avg_pool2d, None),
    ("call_method", "flatten", None),
    ("call_module", "fc", "SplitLinear"),
    ("output", "output", None),
]

# Net: stem 3->4 (3x3), block.conv1 4->8 (3x3), block.conv2 8->8 (3x3), downsample 4->8 (1x1),
# fc 8->5. Fit counts at rate 0.5: ceil(s*C_out) * ceil(s*C_in) * k*k, the first conv keeps
# its 3 image channels, the classifier keeps its 5 classes.
FIT_COUNTS = {
    "stem": 2 * 3 * 9,
    "block.conv1": 4 * 2 * 9,
    "block.conv2": 4 * 4 * 9,
    "block.downsample.0": 4 * 2 * 1,
    "fc": 5 * 4,
}
WEIGHT_NUMEL = {
    "stem": 108,
    "block.conv1": 288,
    "block.conv2": 576,
    "block.downsample.0": 32,
    "fc": 40,
}


def test_before_expected_structure_and_counts() -> None:
    gm = split()
    assert graph_rows(gm) == EXPECTED
    record = rw.report(gm).passes[0]
    assert record.name == "split" and record.options["mode"] == "kels"
    assert record.matches == {"split_layer": 5}  # fired 5 of 5 conv/linear layers
    assert record.modules_replaced == LAYERS
    assert record.modules_added == [] and record.params_added == 0
    assert record.buffers_added == sum(WEIGHT_NUMEL.values()) + 2 * len(LAYERS)
    assert record.notes == []
    masks = get_fit_masks(gm)
    assert list(masks) == LAYERS
    assert {name: int(m.sum()) for name, m in masks.items()} == FIT_COUNTS
    for name, mask in masks.items():
        layer = gm.get_submodule(name)
        assert mask is getattr(layer, FIT_MASK) and mask.dtype == torch.bool
        assert mask.shape == layer.weight.shape
        assert layer.split_mode == "kels"
        assert_product(mask)


def test_kels_first_conv_classifier_and_residual_stage() -> None:
    masks = get_fit_masks(split())
    assert fit_rows(masks["stem"]) == [0, 1] and fit_cols(masks["stem"]) == [0, 1, 2]
    assert fit_rows(masks["fc"]) == [0, 1, 2, 3, 4] and fit_cols(masks["fc"]) == [0, 1, 2, 3]
    # conv2 and downsample feed one residual add: the same fit output channels
    assert fit_rows(masks["block.conv2"]) == fit_rows(masks["block.downsample.0"]) == [0, 1, 2, 3]
    assert fit_cols(masks["block.conv1"]) == fit_cols(masks["block.downsample.0"]) == [0, 1]
    assert fit_cols(masks["block.conv2"]) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("rate", "counts"), [(0.25, (1, 1, 2)), (0.3, (2, 2, 3)), (0.9, (4, 4, 8))]
)
def test_kels_ceil_rule_at_other_rates(rate: float, counts: tuple[int, int, int]) -> None:
    masks = get_fit_masks(split(rate=rate))
    stem_out, conv1_in, conv1_out = counts
    assert len(fit_rows(masks["stem"])) == stem_out == fit_count(rate, 4)
    assert len(fit_cols(masks["block.conv1"])) == conv1_in
    assert len(fit_rows(masks["block.conv1"])) == conv1_out == fit_count(rate, 8)


def test_fit_count_is_an_exact_ceil() -> None:
    assert fit_count(0.1, 10) == 1 and fit_count(0.3, 10) == 3 and fit_count(0.7, 10) == 7
    assert fit_count(0.5, 1) == 1 and fit_count(0.5, 7) == 4 and fit_count(0.01, 3) == 1


def test_state_dict_keeps_keys_and_adds_fit_masks_only() -> None:
    model = net()
    gm = split(model)
    state = gm.state_dict()
    assert set(state) == set(model.state_dict()) | {f"{n}.{FIT_MASK}" for n in LAYERS}
    assert all(f"{n}.{SCALE}" not in state for n in LAYERS)  # the switch is not model state
    other = split(Net().eval())
    other.load_state_dict(state)
    assert all(
        torch.equal(a, b)
        for a, b in zip(get_fit_masks(other).values(), get_fit_masks(gm).values(), strict=True)
    )


def test_outputs_are_preserved_at_insertion_in_train_and_eval() -> None:
    model = net()
    gm = split(model)
    torch.testing.assert_close(gm(*inputs()), model(*inputs()), rtol=0, atol=0)
    gm.train()
    model.train()
    torch.testing.assert_close(gm(*inputs()), model(*inputs()), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# KELS corner cases on hand-made models
# ---------------------------------------------------------------------------


class Concat(nn.Module):
    """Two convs concatenated (6 + 4 channels) into one conv: the ceil rule per chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(self.c(y).mean((2, 3)))


def test_kels_concat_applies_the_ceil_rule_per_chunk() -> None:
    model = Concat().eval()
    gm = split(model, (torch.randn(2, 3, 6, 6),))
    masks = get_fit_masks(gm)
    assert fit_rows(masks["a"]) == [0, 1, 2] and fit_rows(masks["b"]) == [0, 1]
    assert fit_cols(masks["c"]) == [0, 1, 2, 6, 7]  # not the first ceil(10/2) = 5 columns
    assert int(masks["c"].sum()) == 4 * (3 + 2) * 9
    assert_product(masks["c"])


class Depthwise(nn.Module):
    """conv 3->8, depthwise 8->16 (two filters per input channel), pointwise 16->6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(self.pw(x).mean((2, 3)))


def test_kels_depthwise_conv_follows_its_input_channels() -> None:
    example = (torch.randn(2, 3, 5, 5),)
    gm = split(Depthwise().eval(), example)
    masks = get_fit_masks(gm)
    # input channel j of the depthwise conv is its conv group j (filters 2j, 2j+1):
    # the first 4 of the 8 channels are fit, with both of their filters
    assert fit_rows(masks["conv"]) == [0, 1, 2, 3]
    assert bool(masks["dw"][:8].all()) and not bool(masks["dw"][8:].any())
    assert int(masks["dw"].sum()) == 8 * 1 * 9
    assert fit_cols(masks["pw"]) == list(range(8)) and fit_rows(masks["pw"]) == [0, 1, 2]
    assert_equal_to_slim(gm, example)


class Grouped(nn.Module):
    """conv 3->8, grouped conv 8->6 in 2 groups (4 inputs, 3 outputs per group), linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.gconv(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def test_kels_grouped_conv_splits_every_group_alike() -> None:
    example = (torch.randn(2, 3, 5, 5),)
    gm = split(Grouped().eval(), example)
    masks = get_fit_masks(gm)
    # local input i of each conv group is one group channel (4 of them, 2 fit); local
    # output i likewise (3, ceil(1.5) = 2 fit): every conv group keeps the same layout
    assert fit_rows(masks["conv"]) == [0, 1, 4, 5]
    assert fit_rows(masks["gconv"]) == [0, 1, 3, 4]
    local = masks["gconv"][:, :, 0, 0]
    for row in range(6):
        expected = [True, True, False, False] if row in (0, 1, 3, 4) else [False] * 4
        assert local[row].tolist() == expected, row
    assert fit_cols(masks["fc"]) == [0, 1, 3, 4]
    slim_net = assert_equal_to_slim(gm, example)
    assert slim_net.gconv.groups == 2 and tuple(slim_net.gconv.weight.shape) == (4, 2, 3, 3)


class FlattenHead(nn.Module):
    """conv 3->4 on a 3x3 map, flatten, linear 36->5: channel c is features 9c..9c+8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(36, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def test_kels_linear_after_flatten_keeps_the_features_of_fit_channels() -> None:
    example = (torch.randn(2, 3, 3, 3),)
    gm = split(FlattenHead().eval(), example)
    masks = get_fit_masks(gm)
    assert fit_rows(masks["conv"]) == [0, 1]
    assert fit_cols(masks["fc"]) == list(range(18))  # channels 0 and 1: 2 x 3 x 3 features
    assert int(masks["fc"].sum()) == 5 * 18
    assert_equal_to_slim(gm, example)


class SplitPieces(nn.Module):
    """conv 3->8 split into 4 + 4 channels, each piece read by its own conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.left = nn.Conv2d(4, 4, 1)
        self.right = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(torch.relu(self.conv(x)), 4, dim=1)
        y = torch.cat([self.left(a), self.right(b)], 1)
        return self.fc(y.mean((2, 3)))


def test_kels_split_pieces_each_keep_the_ceil_rule() -> None:
    example = (torch.randn(2, 3, 4, 4),)
    gm = split(SplitPieces().eval(), example)
    masks = get_fit_masks(gm)
    assert fit_rows(masks["conv"]) == [0, 1, 4, 5]  # first half of each piece
    assert fit_cols(masks["left"]) == [0, 1] and fit_cols(masks["right"]) == [0, 1]
    assert fit_cols(masks["fc"]) == [0, 1, 4, 5]
    assert_equal_to_slim(gm, example)


def test_excluded_layers_are_whole_and_read_only_fit_channels() -> None:
    gm = split(exclude=["fc"])
    masks = get_fit_masks(gm)
    assert "fc" not in masks and type(gm.fc) is nn.Linear
    # fc reads every channel of the last stage, so that stage stays whole
    assert fit_rows(masks["block.conv2"]) == fit_rows(masks["block.downsample.0"]) == list(range(8))
    assert fit_cols(masks["block.conv2"]) == [0, 1, 2, 3]  # conv1's outputs are still split
    assert rw.report(gm).passes[0].notes == ["fc: not split, so every channel it reads is fit"]
    assert_equal_to_slim(gm, inputs())


def test_include_filter_splits_only_the_named_layers() -> None:
    gm = split(include=["block.*"])
    assert list(split_layers(gm)) == ["block.conv1", "block.conv2", "block.downsample.0"]
    assert rw.report(gm).passes[0].fired == 3


def test_kels_needs_example_inputs() -> None:
    with pytest.raises(rw.PassError, match="split mode='kels' needs the channel structure"):
        rw.rewrite(Net(), ["split"])
    gm = rw.rewrite(Net(), [("split", {"mode": "wels"})])  # WELS needs no analysis
    assert len(split_layers(gm)) == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": 0.0}, r"option 'rate' must be a finite number in \(0, 1\)"),
        ({"rate": 1.0}, r"option 'rate' must be a finite number in \(0, 1\)"),
        ({"mode": "channels"}, "expected one of"),
        ({"ratio": 0.5}, "unknown option 'ratio'"),
    ],
)
def test_bad_options_are_clear_errors(options: dict, message: str) -> None:
    with pytest.raises(rw.OptionError, match=message):
        rw.make_pass(("split", options))


# ---------------------------------------------------------------------------
# WELS
# ---------------------------------------------------------------------------


def test_wels_rate_and_reproducibility() -> None:
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(100, 200)
            self.b = nn.Linear(200, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(torch.relu(self.a(x)))

    example = (torch.randn(2, 100),)
    one = get_fit_masks(split(Wide(), example, mode="wels", rate=0.3, seed=7))
    again = get_fit_masks(split(Wide(), example, mode="wels", rate=0.3, seed=7))
    other = get_fit_masks(split(Wide(), example, mode="wels", rate=0.3, seed=8))
    only_a = get_fit_masks(split(Wide(), example, mode="wels", rate=0.3, seed=7, include=["a"]))
    assert abs(one["a"].float().mean().item() - 0.3) < 0.01  # 20,000 independent draws
    assert 0.2 < one["b"].float().mean().item() < 0.4
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert not torch.equal(one["a"], other["a"])
    assert torch.equal(only_a["a"], one["a"])  # a layer's mask does not depend on the others
    rows = one["a"].float().mean(1)
    assert rows.min() > 0 and rows.max() < 1  # single weights, not whole rows


def test_extract_fit_refuses_wels_with_an_explanation() -> None:
    gm = split(mode="wels")
    with pytest.raises(rw.RewriterError, match="only KELS yields a slim network"):
        extract_fit(gm)


# ---------------------------------------------------------------------------
# The hypothesis switch
# ---------------------------------------------------------------------------


def zeroed(model: nn.Module, masks: dict[str, Tensor], keep: bool) -> nn.Module:
    """A copy of ``model`` whose weights are zeroed where ``mask != keep``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            w = out.get_submodule(name).weight
            w.mul_((mask == keep).to(w.dtype))
    return out


@pytest.mark.parametrize("mode", ["kels", "wels"])
def test_hypotheses_zero_the_other_part(mode: str) -> None:
    model = net()
    gm = split(model, mode=mode)
    masks = {k: v.clone() for k, v in get_fit_masks(gm).items()}
    assert current_hypothesis(gm) == "dense"
    for hypothesis, keep in (("fit", True), ("reset", False)):
        assert set_hypothesis(gm, hypothesis) == "dense"
        assert current_hypothesis(gm) == hypothesis
        torch.testing.assert_close(gm(*inputs()), zeroed(model, masks, keep)(*inputs()))
        set_hypothesis(gm, "dense")
    torch.testing.assert_close(gm(*inputs()), model(*inputs()), rtol=0, atol=0)


def test_fit_plus_reset_is_dense_for_a_linear_layer() -> None:
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    example = (torch.randn(3, 6),)
    gm = split(model, example, mode="wels")
    parts = []
    for hypothesis in ("fit", "reset"):
        with use_hypothesis(gm, hypothesis):
            parts.append(gm(*example))
    assert current_hypothesis(gm) == "dense"  # restored by the context manager
    torch.testing.assert_close(parts[0] + parts[1], model(*example))


def test_reset_weights_get_no_gradient_in_the_fit_hypothesis() -> None:
    gm = split()
    gm.train()
    set_hypothesis(gm, "fit")
    gm(*inputs()).square().sum().backward()
    for name, mask in get_fit_masks(gm).items():
        grad = gm.get_submodule(name).weight.grad
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask])), name
        assert grad[mask].abs().sum() > 0, name


def test_hypothesis_errors() -> None:
    gm = split()
    with pytest.raises(
        rw.RewriterError, match="unknown hypothesis 'slim'; use one of dense, fit, reset"
    ):
        set_hypothesis(gm, "slim")  # type: ignore[arg-type]
    with pytest.raises(rw.RewriterError, match="no split layers.*'split' pass"):
        set_hypothesis(net(), "fit")
    with pytest.raises(rw.RewriterError, match="no split layers"):
        reinitialize(net())


# ---------------------------------------------------------------------------
# reinitialize
# ---------------------------------------------------------------------------


def test_reinitialize_redraws_only_the_reset_weights() -> None:
    gm = split()
    gm.train()
    gm(*inputs())  # move the running statistics away from their init
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    count = reinitialize(gm, torch.Generator().manual_seed(123))  # not the init seed
    masks = get_fit_masks(gm)
    assert count == sum(int((~m).sum()) for m in masks.values())
    after = gm.state_dict()
    for key, value in before.items():
        layer, _, attr = key.rpartition(".")
        if layer in masks and attr == "weight":
            mask = masks[layer]
            assert torch.equal(after[key][mask], value[mask]), key  # bit-identical fit weights
            assert not torch.equal(after[key][~mask], value[~mask]), key
            assert bool((after[key][~mask] != value[~mask]).all()), key
            bound = 1 / math.sqrt(
                value[0].numel()
            )  # kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in))
            assert after[key][~mask].abs().max() <= bound
        else:  # biases, BN parameters, running statistics, masks
            assert torch.equal(after[key], value), key


def test_reinitialize_is_reproducible_and_matches_pytorch_default_init() -> None:
    first, second = split(), split()
    reinitialize(first, torch.Generator().manual_seed(3))
    reinitialize(second, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    for name, layer in split_layers(first).items():
        assert torch.equal(layer.weight, second.get_submodule(name).weight)
        fresh = torch.empty_like(layer.weight)
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        mask = layer.fit_mask
        assert torch.equal(layer.weight[~mask], fresh[~mask])


def test_reinitialize_keeps_optimizer_references() -> None:
    gm = split()
    params = [id(p) for p in gm.parameters()]
    reinitialize(gm)
    assert [id(p) for p in gm.parameters()] == params


# ---------------------------------------------------------------------------
# extract_fit: the slim fit network
# ---------------------------------------------------------------------------


def fit_outputs(gm: fx.GraphModule, example: tuple[Tensor, ...]) -> object:
    with use_hypothesis(gm, "fit"):
        return evaluate(gm, example)


def assert_equal_to_slim(gm: fx.GraphModule, example: tuple[Tensor, ...]) -> fx.GraphModule:
    slim_net = extract_fit(gm, example)
    assert not split_layers(slim_net)
    torch.testing.assert_close(
        evaluate(slim_net, example), fit_outputs(gm, example), rtol=1e-5, atol=1e-6
    )
    return slim_net


def test_extract_fit_builds_the_slim_network() -> None:
    gm = split()
    gm.train()
    reinitialize(gm, torch.Generator().manual_seed(7))  # reset weights differ from init
    gm.eval()
    slim_net = assert_equal_to_slim(gm, inputs())
    shapes = {name: tuple(slim_net.get_submodule(name).weight.shape) for name in LAYERS}
    assert shapes == {
        "stem": (2, 3, 3, 3),
        "block.conv1": (4, 2, 3, 3),
        "block.conv2": (4, 4, 3, 3),
        "block.downsample.0": (4, 2, 1, 1),
        "fc": (5, 4),
    }
    assert {name: math.prod(s) for name, s in shapes.items()} == FIT_COUNTS
    assert slim_net.bn.num_features == 2 and slim_net.block.bn2.running_mean.shape == (4,)
    assert type(slim_net.stem) is nn.Conv2d and type(slim_net.fc) is nn.Linear
    for name in LAYERS:  # the slim layers hold exactly the fit weights
        mask, w = gm.get_submodule(name).fit_mask, gm.get_submodule(name).weight
        assert torch.equal(slim_net.get_submodule(name).weight, w[mask].reshape(shapes[name]))
    assert split_layers(gm) and current_hypothesis(gm) == "dense"  # gm untouched


def test_extract_fit_default_inputs_come_from_the_recorded_shapes() -> None:
    gm = split()
    slim_net = extract_fit(gm)
    torch.testing.assert_close(
        evaluate(slim_net, inputs()), fit_outputs(gm, inputs()), rtol=1e-5, atol=1e-6
    )


def test_default_inputs_follow_the_models_device_and_dtype() -> None:
    import copy

    from rewriter.passes.split import _example_inputs

    gm = split()  # traced in float32 on the CPU
    (meta,) = _example_inputs(copy.deepcopy(gm).to("meta"), None)
    assert meta.device.type == "meta" and meta.shape == (2, 3, 8, 8)
    double = copy.deepcopy(gm).double()
    (x,) = _example_inputs(double, None)
    assert x.dtype == torch.float64
    slim_net = extract_fit(double)  # the float64 model needs float64 default inputs
    assert next(slim_net.parameters()).dtype == torch.float64
    torch.testing.assert_close(
        evaluate(slim_net, (inputs()[0].double(),)), fit_outputs(double, (inputs()[0].double(),))
    )


def test_extract_fit_rejects_edited_masks() -> None:
    gm = split()
    gm.block.conv2.fit_mask[0, 5] = True  # a reset column of a fit row
    with pytest.raises(
        rw.RewriterError, match="'block.conv2' does not hold exactly its fit weights"
    ):
        extract_fit(gm)


def test_masks_then_split_compose() -> None:
    model = net()
    gm = rw.rewrite(model, ["masks", "split"], inputs())
    assert type(gm.stem) is SplitMaskedConv2d and isinstance(gm.stem, MaskedConv2d)
    assert list(get_masks(gm)) == LAYERS == list(get_fit_masks(gm))
    with torch.no_grad():
        gm.block.conv2.weight_mask[1] = 0  # prune a filter
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.block.conv2.weight[1] = 0
    torch.testing.assert_close(gm(*inputs()), pruned(*inputs()))
    slim_net = assert_equal_to_slim(gm, inputs())
    assert type(slim_net.block.conv2) is MaskedConv2d
    assert slim_net.block.conv2.weight_mask.shape == (4, 4, 3, 3)
    again = rw.rewrite(gm, ["masks"], inputs())  # masks after split: already masked, no-op
    assert rw.report(again).passes[-1].fired == 0


def test_split_then_masks_leaves_split_layers_alone() -> None:
    gm = rw.rewrite(net(), ["split", "masks"], inputs())
    assert type(gm.stem) is SplitConv2d and type(gm.fc) is SplitLinear
    assert get_masks(gm) == {}
    assert len(rw.report(gm).passes[-1].notes) == 5


@pytest.mark.parametrize("name", zoo.names())
def test_extract_fit_equals_fit_hypothesis_on_the_zoo(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name)
    example = zoo.example_inputs(name, batch=3)
    model.train()
    with torch.no_grad():
        model(*example)  # BN statistics away from their init
    gm = split(model.eval(), example)
    reinitialize(gm, torch.Generator().manual_seed(1))
    slim_net = assert_equal_to_slim(gm, example)
    fit = sum(int(m.sum()) for m in get_fit_masks(gm).values())
    slim_weights = sum(slim_net.get_submodule(n).weight.numel() for n in split_layers(gm))
    assert slim_weights == fit
    assert sum(p.numel() for p in slim_net.parameters()) < sum(p.numel() for p in gm.parameters())


@PROPERTY
@given(rm=random_models())
def test_extract_fit_equals_fit_hypothesis_on_random_graphs(rm) -> None:
    gm = split(rm.model, rm.example_inputs)
    reinitialize(gm, torch.Generator().manual_seed(7))
    slim_net = assert_equal_to_slim(gm, rm.example_inputs)
    for name, mask in get_fit_masks(gm).items():
        assert slim_net.get_submodule(name).weight.numel() == int(mask.sum()), rm.description


# ---------------------------------------------------------------------------
# Contracts: property suite, idempotence, compile
# ---------------------------------------------------------------------------


@PROPERTY
@given(rm=random_models(), mode=st.sampled_from(["kels", "wels"]))
def test_pass_contracts_on_random_graphs(rm, mode: str) -> None:
    result = check_pass(("split", {"mode": mode}), rm)
    # subclasses with their own forward (random_models' idioms) are canonicalised to these
    layers = [m for m in rm.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert result.fired == len(layers), rm.description
    assert result.idempotent  # a second run is a no-op


def test_splitting_twice_is_a_no_op_and_a_partial_second_split_an_error() -> None:
    gm = split()
    again = rw.rewrite(gm, ["split"], inputs())
    assert rw.report(again).passes[-1].fired == 0
    assert rw.report(again).passes[-1].notes == ["already split (5 layers): nothing to do"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(get_fit_masks(again).values(), get_fit_masks(gm).values(), strict=True)
    )
    partial = split(include=["block.*"])
    with pytest.raises(rw.PassError, match="already split .* but stem"):
        rw.rewrite(partial, ["split"], inputs())


# ---------------------------------------------------------------------------
# evolve
# ---------------------------------------------------------------------------


def test_evolve_runs_generations_with_resets_in_between() -> None:
    model = net()
    seen: list[tuple[int, str, Tensor]] = []

    def train_fn(gm: fx.GraphModule, generation: int) -> int:
        seen.append((generation, current_hypothesis(gm), gm.block.conv1.weight.detach().clone()))
        return generation * 10

    def eval_fn(gm: fx.GraphModule) -> float:
        return {"dense": 1.0, "fit": 0.5, "reset": 0.0}[current_hypothesis(gm)]

    records: list[int] = []
    result = evolve(
        model,
        train_fn,
        3,
        eval_fn=eval_fn,
        example_inputs=inputs(),
        generator=torch.Generator().manual_seed(5),  # not the init seed
        callback=lambda g: records.append(g.index),
    )
    assert records == [1, 2, 3] and [g for g, _, _ in seen] == [1, 2, 3]
    assert all(h == "dense" for _, h, _ in seen)  # training sees the dense network
    assert [(g.dense, g.fit, g.train_result) for g in result.generations] == [
        (1.0, 0.5, 10),
        (1.0, 0.5, 20),
        (1.0, 0.5, 30),
    ]
    mask = result.gm.block.conv1.fit_mask
    for (_, _, before), (_, _, after) in zip(seen, seen[1:], strict=False):
        assert torch.equal(before[mask], after[mask]) and not torch.equal(
            before[~mask], after[~mask]
        )
    assert not split_layers(model)  # the user's model is copied, not split
    assert "generation" in result.table() and len(result.table().splitlines()) == 4


def test_evolve_trains_an_already_split_model_in_place() -> None:
    gm = split()
    result = evolve(gm, lambda g, i: None, 1, eval_fn=lambda g: 0.0, hypotheses=("reset",))
    assert result.gm is gm and result.generations[0].scores == {"reset": 0.0}
    with pytest.raises(ValueError, match="already split"):
        evolve(gm, lambda g, i: None, 1, split={"rate": 0.3})


@pytest.mark.slow
def test_compiles_fullgraph_trains_and_switches_without_recompiling() -> None:
    torch._dynamo.reset()
    gm = split()
    gm.train()
    compiled = torch.compile(gm, fullgraph=True)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    losses = train_losses(compiled, gm, x, y, lr=0.1)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    gm.eval()
    torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):  # buffers switch, no recompile
        for hypothesis in ("fit", "reset", "dense"):
            with use_hypothesis(gm, hypothesis):
                torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)
        reinitialize(gm)
        torch.testing.assert_close(compiled(x), gm(x), rtol=1e-4, atol=1e-5)
