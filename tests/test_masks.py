"""Tests of the ``masks`` pass and its helpers ``get_masks``, ``set_mask``, ``sparsity``."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from small_models import Net
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter.passes.masks import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    get_masks,
    set_mask,
    sparsity,
)

LAYERS = ["stem", "block.conv1", "block.conv2", "block.downsample.0", "fc"]
WEIGHT_NUMEL = {
    "stem": 4 * 3 * 3 * 3,
    "block.conv1": 8 * 4 * 3 * 3,
    "block.conv2": 8 * 8 * 3 * 3,
    "block.downsample.0": 8 * 4,
    "fc": 5 * 8,
}


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    _train_stats(model)
    return model


def _train_stats(model: nn.Module) -> None:
    """Give every BN non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8) * 2 + 0.5)
    model.eval()


def inputs() -> tuple[Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


def masked(model: nn.Module | None = None, **options: object) -> fx.GraphModule:
    return rw.rewrite(model or net(), [("masks", options)], inputs())


def graph_rows(gm: fx.GraphModule) -> list[tuple[str, object, str | None]]:
    """The graph as (op, target, class name of the called module or None) rows."""
    rows = []
    for node in gm.graph.nodes:
        cls = (
            type(gm.get_submodule(str(node.target))).__name__ if node.op == "call_module" else None
        )
        rows.append((node.op, node.target, cls))
    return rows


# ---------------------------------------------------------------------------
# Before / Expected
# ---------------------------------------------------------------------------

BEFORE = [
    ("placeholder", "x", None),
    ("call_module", "stem", "Conv2d"),
    ("call_module", "bn", "BatchNorm2d"),
    ("call_module", "relu", "ReLU"),
    ("call_module", "block.conv1", "Conv2d"),
    ("call_module", "block.bn1", "BatchNorm2d"),
    ("call_module", "block.relu", "ReLU"),
    ("call_module", "block.conv2", "Conv2d"),
    ("call_module", "block.bn2", "BatchNorm2d"),
    ("call_module", "block.downsample.0", "Conv2d"),
    ("call_module", "block.downsample.1", "BatchNorm2d"),
    ("call_function", operator.add, None),
    ("call_module", "block.relu", "ReLU"),
    ("call_function", F.adaptive_avg_pool2d, None),
    ("call_method", "flatten", None),
    ("call_module", "fc", "Linear"),
    ("output", "output", None),
]

EXPECTED = [
    ("placeholder", "x", None),
    ("call_module", "stem", "MaskedConv2d"),
    ("call_module", "bn", "BatchNorm2d"),
    ("call_module", "relu", "ReLU"),
    ("call_module", "block.conv1", "MaskedConv2d"),
    ("call_module", "block.bn1", "BatchNorm2d"),
    ("call_module", "block.relu", "ReLU"),
    ("call_module", "block.conv2", "MaskedConv2d"),
    ("call_module", "block.bn2", "BatchNorm2d"),
    ("call_module", "block.downsample.0", "MaskedConv2d"),
    ("call_module", "block.downsample.1", "BatchNorm2d"),
    ("call_function", operator.add, None),
    ("call_module", "block.relu", "ReLU"),
    ("call_function", F.adaptive_avg_pool2d, None),
    ("call_method", "flatten", None),
    ("call_module", "fc", "MaskedLinear"),
    ("output", "output", None),
]


def test_before_expected_structure() -> None:
    assert graph_rows(rw.trace(net())) == BEFORE
    gm = masked()
    assert graph_rows(gm) == EXPECTED
    record = rw.report(gm).passes[0]
    assert record.name == "masks"
    assert record.matches == {"mask_layer": 5}  # fired 5 of 5 targeted layers
    assert record.modules_replaced == LAYERS
    assert record.modules_added == [] and record.params_added == 0
    assert record.buffers_added == sum(WEIGHT_NUMEL.values())
    assert record.notes == []


def test_masked_layers_subclass_the_originals_and_start_as_ones() -> None:
    gm = masked()
    masks = get_masks(gm)
    assert list(masks) == LAYERS
    for name, mask in masks.items():
        layer = gm.get_submodule(name)
        assert isinstance(layer, (nn.Conv2d, nn.Linear)) and isinstance(layer, rw.RewriterModule)
        assert mask is layer.weight_mask  # the live buffer
        assert mask.shape == layer.weight.shape and mask.dtype == layer.weight.dtype
        assert not mask.requires_grad
        assert torch.equal(mask, torch.ones_like(layer.weight))
    assert isinstance(gm.get_submodule("fc"), MaskedLinear)
    assert isinstance(gm.get_submodule("stem"), MaskedConv2d)


def test_outputs_are_preserved_at_insertion() -> None:
    model = net()
    gm = masked(model)
    torch.testing.assert_close(gm(*inputs()), model(*inputs()), rtol=0, atol=0)
    gm.train()
    model.train()
    torch.testing.assert_close(gm(*inputs()), model(*inputs()))


def test_conv1d_conv3d_and_linear_are_masked() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(2, 3, 3)
            self.c3 = nn.Conv3d(2, 3, 1)
            self.lin = nn.Linear(3, 1)

        def forward(self, a: Tensor, b: Tensor) -> Tensor:
            return self.lin(self.c1(a).mean(-1) + self.c3(b).mean(dim=(2, 3, 4)))

    torch.manual_seed(0)
    model = Mixed()
    example = (torch.randn(2, 2, 5), torch.randn(2, 2, 2, 2, 2))
    gm = rw.rewrite(model, ["masks"], example)
    assert type(gm.c1) is MaskedConv1d and type(gm.c3) is MaskedConv3d
    assert type(gm.lin) is MaskedLinear
    assert rw.report(gm).passes[0].fired == 3
    torch.testing.assert_close(gm(*example), model(*example))


def test_a_layer_called_twice_is_masked_once() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(torch.relu(self.conv(x)))

    torch.manual_seed(0)
    model = Shared()
    gm = rw.rewrite(model, ["masks"], inputs())
    record = rw.report(gm).passes[0]
    assert record.fired == 1 and record.buffers_added == 3 * 3 * 3 * 3
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "conv"]
    assert list(get_masks(gm)) == ["conv"]
    torch.testing.assert_close(gm(*inputs()), model(*inputs()))


# ---------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, LAYERS),
        ({"include": ["block.*"]}, ["block.conv1", "block.conv2", "block.downsample.0"]),
        ({"exclude": ["fc", "stem"]}, ["block.conv1", "block.conv2", "block.downsample.0"]),
        ({"include": ["block.*"], "exclude": ["*downsample*"]}, ["block.conv1", "block.conv2"]),
        ({"classes": ["Linear"]}, ["fc"]),
        ({"classes": ["Conv2d"]}, ["stem", "block.conv1", "block.conv2", "block.downsample.0"]),
        ({"classes": ["Conv2d"], "exclude": ["block.conv*"]}, ["stem", "block.downsample.0"]),
        ({"include": ["nothing*"]}, []),
    ],
)
def test_include_exclude_classes_filters(options: dict, expected: list[str]) -> None:
    gm = masked(**options)
    assert list(get_masks(gm)) == expected
    record = rw.report(gm).passes[0]
    assert record.fired == len(expected)
    assert record.buffers_added == sum(WEIGHT_NUMEL[name] for name in expected)
    for name in LAYERS:
        layer = gm.get_submodule(name)
        assert hasattr(layer, "weight_mask") == (name in expected), name


def test_user_subclass_of_a_layer_is_left_alone_and_noted() -> None:
    class MyConv(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    class WithMyConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = MyConv(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    gm = rw.rewrite(WithMyConv(), ["masks"], inputs(), leaves=[MyConv])
    assert list(get_masks(gm)) == ["fc"]
    assert type(gm.conv) is MyConv
    assert rw.report(gm).passes[0].notes == [
        "conv: MyConv subclasses a supported layer; not masked"
    ]


# ---------------------------------------------------------------------------
# State dict
# ---------------------------------------------------------------------------


def test_state_dict_keeps_original_keys_and_adds_weight_mask() -> None:
    model = net()
    gm = masked(model)
    original = model.state_dict()
    state = gm.state_dict()
    assert set(state) == set(original) | {f"{name}.weight_mask" for name in LAYERS}
    for key, value in original.items():
        assert torch.equal(state[key], value), key
    # a masked state dict loads back into a fresh masked model
    other = masked(Net().eval())
    other.load_state_dict(state)
    torch.testing.assert_close(other(*inputs()), gm(*inputs()))


# ---------------------------------------------------------------------------
# set_mask, get_masks, sparsity
# ---------------------------------------------------------------------------


def test_set_mask_rejects_wrong_shape() -> None:
    gm = masked()
    with pytest.raises(rw.RewriterError, match=r"'stem' has shape \(4, 3, 3\).*\(4, 3, 3, 3\)"):
        set_mask(gm, "stem", torch.ones(4, 3, 3))


def test_set_mask_rejects_wrong_dtype() -> None:
    gm = masked()
    with pytest.raises(
        rw.RewriterError, match="dtype torch.int64; use torch.bool or torch.float32"
    ):
        set_mask(gm, "fc", torch.ones(5, 8, dtype=torch.int64))
    with pytest.raises(rw.RewriterError, match="dtype torch.float64"):
        set_mask(gm, "fc", torch.ones(5, 8, dtype=torch.float64))


def test_set_mask_rejects_non_binary_values() -> None:
    gm = masked()
    mask = torch.ones(5, 8)
    mask[0, 0] = 0.5
    with pytest.raises(rw.RewriterError, match="'fc' must contain only 0 and 1"):
        set_mask(gm, "fc", mask)
    mask[0, 0] = -1.0
    with pytest.raises(rw.RewriterError, match="only 0 and 1"):
        set_mask(gm, "fc", mask)
    assert torch.equal(gm.fc.weight_mask, torch.ones(5, 8))  # untouched by the failed calls


def test_set_mask_rejects_unknown_layers_and_non_tensors() -> None:
    gm = masked(exclude=["fc"])
    with pytest.raises(rw.RewriterError, match="no masked layer named 'fc'.*stem"):
        set_mask(gm, "fc", torch.ones(5, 8))
    with pytest.raises(rw.RewriterError, match="must be a tensor, got list"):
        set_mask(gm, "stem", [[1.0]])  # type: ignore[arg-type]
    with pytest.raises(rw.RewriterError, match="masked layers: none.*'masks' pass"):
        set_mask(net(), "stem", torch.ones(4, 3, 3, 3))


def test_set_mask_accepts_bool_and_float_and_copies_in_place() -> None:
    gm = masked()
    buffer = gm.fc.weight_mask
    keep = torch.rand(5, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask(gm, "fc", keep)
    assert gm.fc.weight_mask is buffer  # same buffer, new values
    assert torch.equal(buffer, keep.float())
    set_mask(gm, "fc", torch.ones(5, 8))
    assert torch.equal(buffer, torch.ones(5, 8))


def test_zeroed_filter_zeroes_its_output_channel_and_its_gradient() -> None:
    gm = masked()
    gm.train()
    mask = torch.ones(4, 3, 3, 3)
    mask[1] = 0  # the whole filter of output channel 1
    set_mask(gm, "stem", mask)
    weight_before = gm.stem.weight.detach().clone()

    x = inputs()[0]
    out = gm.stem(x)  # conv without bias
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert out[:, [0, 2, 3]].abs().sum() > 0
    torch.testing.assert_close(out, F.conv2d(x, weight_before * mask, padding=1))
    assert torch.equal(gm.stem.weight.detach(), weight_before)  # the weight is kept, only masked

    loss = (gm(x) * torch.randn(2, 5, generator=torch.Generator().manual_seed(2))).sum()
    loss.backward()
    grad = gm.stem.weight.grad
    assert grad is not None
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # exactly zero
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert gm.stem.weight_mask.grad is None


def test_elementwise_mask_on_linear_matches_the_masked_product() -> None:
    gm = masked()
    keep = torch.rand(5, 8, generator=torch.Generator().manual_seed(3)) > 0.3
    set_mask(gm, "fc", keep)
    features = torch.randn(2, 8)
    expected = features @ (gm.fc.weight * keep).T + gm.fc.bias
    torch.testing.assert_close(gm.fc(features), expected)
    gm.fc(features).sum().backward()
    assert torch.equal(gm.fc.weight.grad[~keep], torch.zeros(int((~keep).sum())))


def test_sparsity_per_layer_and_global() -> None:
    gm = masked()
    assert sparsity(gm) == {**dict.fromkeys(LAYERS, 0.0), "global": 0.0}

    stem = torch.ones(4, 3, 3, 3)
    stem[1] = 0  # 27 of 108 weights
    fc = torch.ones(5, 8, dtype=torch.bool)
    fc[:2] = False  # 16 of 40 weights
    set_mask(gm, "stem", stem)
    set_mask(gm, "fc", fc)
    result = sparsity(gm)
    assert result["stem"] == 27 / 108 == 0.25
    assert result["fc"] == 16 / 40 == 0.4
    assert result["block.conv1"] == result["block.conv2"] == result["block.downsample.0"] == 0.0
    assert result["global"] == pytest.approx((27 + 16) / 1044)
    assert sum(WEIGHT_NUMEL.values()) == 1044


def test_sparsity_of_a_model_without_masks() -> None:
    assert sparsity(net()) == {"global": 0.0}


# ---------------------------------------------------------------------------
# Idempotence and copies
# ---------------------------------------------------------------------------


def test_running_twice_is_a_no_op() -> None:
    twice = rw.rewrite(net(), ["masks", "masks"], inputs())
    first, second = rw.report(twice).passes
    assert first.fired == 5 and second.fired == 0
    assert second.buffers_added == 0 and second.modules_replaced == []
    assert graph_rows(twice) == EXPECTED

    gm = masked()
    set_mask(gm, "stem", torch.zeros(4, 3, 3, 3))
    again = rw.rewrite(gm, ["masks"], inputs())
    assert rw.report(again).passes[-1].fired == 0
    assert set(again.state_dict()) == set(gm.state_dict())
    assert sparsity(again)["stem"] == 1.0  # existing masks are kept, not reset to ones
    assert graph_rows(again) == EXPECTED


def test_deepcopy_works_and_masks_are_independent() -> None:
    gm = masked()
    clone = copy.deepcopy(gm)
    assert graph_rows(clone) == EXPECTED
    torch.testing.assert_close(clone(*inputs()), gm(*inputs()))
    set_mask(clone, "stem", torch.zeros(4, 3, 3, 3))
    assert sparsity(clone)["stem"] == 1.0
    assert sparsity(gm)["stem"] == 0.0
    assert clone.stem.weight_mask.data_ptr() != gm.stem.weight_mask.data_ptr()
    assert not torch.allclose(clone(*inputs()), gm(*inputs()))
    clone2 = copy.deepcopy(clone)
    assert sparsity(clone2)["stem"] == 1.0
    assert type(clone2.stem) is MaskedConv2d
