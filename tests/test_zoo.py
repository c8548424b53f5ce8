"""Tests for the reference model zoo (``rewriter.zoo``)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from torch import nn

from rewriter import zoo

EXPECTED_OUTPUTS: dict[str, list[tuple[int, ...]]] = {
    "multitask_resnet": [(2, 10), (2, 5)],
}


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def test_names_match_registry() -> None:
    assert zoo.names() == list(zoo.MODELS)
    expected = {
        "resnet20",
        "resnet8",
        "bottleneck_resnet",
        "mobilenetv2",
        "densenet",
        "vit",
        "multitask_resnet",
        "digits_cnn",
        "mlp",
    }
    assert expected <= set(zoo.names())
    for name, entry in zoo.MODELS.items():
        assert entry.name == name
        assert entry.description and "\n" not in entry.description
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.name = "other"  # type: ignore[misc]


def test_default_input_shapes() -> None:
    shapes = {name: entry.input_shape for name, entry in zoo.MODELS.items()}
    assert shapes["resnet20"] == (3, 32, 32)
    assert shapes["vit"] == (3, 32, 32)
    assert shapes["digits_cnn"] == (1, 8, 8)
    assert shapes["mlp"] == (64,)


@pytest.mark.parametrize("name", zoo.names())
def test_forward_and_trace(name: str) -> None:
    model = zoo.create(name).eval()
    (x,) = zoo.example_inputs(name)
    assert x.shape == (2, *zoo.MODELS[name].input_shape)
    with torch.no_grad():
        eager = _as_tuple(model(x))
    expected = EXPECTED_OUTPUTS.get(name, [(2, 10)])
    assert [tuple(t.shape) for t in eager] == expected
    assert isinstance(model(x), tuple) == (name == "multitask_resnet")

    traced = torch.fx.symbolic_trace(model).eval()
    with torch.no_grad():
        again = _as_tuple(traced(x))
    assert len(again) == len(eager)
    for a, b in zip(eager, again, strict=True):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", zoo.names())
def test_forward_is_fast(name: str) -> None:
    model = zoo.create(name).eval()
    inputs = zoo.example_inputs(name)
    with torch.no_grad():
        model(*inputs)  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model(*inputs)
            best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"{name}: forward of batch 2 took {best:.3f}s"


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ValueError, match="resnet20") as info:
        zoo.create("resnet21")
    assert "Did you mean 'resnet20'" in str(info.value)
    assert "mobilenetv2" in str(info.value)  # lists the valid names
    with pytest.raises(ValueError):
        zoo.example_inputs("no_such_model")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(TypeError, match="widht") as info:
        zoo.create("resnet20", widht=8)
    message = str(info.value)
    assert "did you mean 'width'" in message
    for option in ("depth", "width", "num_classes", "in_channels"):
        assert option in message
    with pytest.raises(ValueError):  # also a ValueError
        zoo.create("mlp", layers=3)
    with pytest.raises(TypeError):
        zoo.example_inputs("vit", size=16)


def test_zoo_prefix_is_accepted() -> None:
    model = zoo.create("zoo:resnet8")
    assert model.rewriter_source["model"] == "zoo:resnet8"


def test_rewriter_source_rebuilds_model() -> None:
    model = zoo.create("bottleneck_resnet", blocks=(1, 2, 1), width=8)
    source = model.rewriter_source
    assert source == {
        "model": "zoo:bottleneck_resnet",
        "options": {"blocks": [1, 2, 1], "width": 8},
    }
    assert json.loads(json.dumps(source)) == source
    name = source["model"].removeprefix("zoo:")
    rebuilt = zoo.create(name, **source["options"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert zoo.create("mlp").rewriter_source == {"model": "zoo:mlp", "options": {}}


def test_example_inputs_follow_options() -> None:
    assert zoo.example_inputs("resnet8", in_channels=1)[0].shape == (2, 1, 32, 32)
    assert zoo.example_inputs("vit", image_size=16, batch=5)[0].shape == (5, 3, 16, 16)
    assert zoo.example_inputs("mlp", in_features=32)[0].shape == (2, 32)
    assert zoo.example_inputs("digits_cnn")[0].shape == (2, 1, 8, 8)
    assert zoo.input_shape("densenet", in_channels=4) == (4, 32, 32)


def test_example_inputs_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.get_rng_state()
    first = zoo.example_inputs("resnet8")
    second = zoo.example_inputs("resnet8")
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(first, tuple) and len(first) == 1
    assert torch.equal(first[0], second[0])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("resnet20", {"depth": 14, "width": 8, "num_classes": 7}),
        ("resnet8", {"in_channels": 1}),
        ("bottleneck_resnet", {"blocks": [2, 1, 1], "width": 4}),
        ("mobilenetv2", {"width_mult": 0.5, "num_classes": 3}),
        ("densenet", {"growth": 4, "layers": (1, 2, 3)}),
        ("vit", {"dim": 16, "depth": 1, "heads": 2, "patch": 8, "image_size": 16}),
        ("multitask_resnet", {"tasks": 3}),
        ("multitask_resnet", {"tasks": 1, "classes_per_task": (4,)}),
        ("digits_cnn", {"width": 8, "num_classes": 4}),
        ("mlp", {"in_features": 16, "hidden": (), "bias": False}),
    ],
)
def test_options(name: str, options: dict[str, object]) -> None:
    model = zoo.create(name, **options).eval()
    inputs = zoo.example_inputs(name, **options)
    with torch.no_grad():
        out = _as_tuple(model(*inputs))
        traced = _as_tuple(torch.fx.symbolic_trace(model)(*inputs))
    for a, b in zip(out, traced, strict=True):
        assert torch.equal(a, b)
    if name == "multitask_resnet":
        tasks = options["tasks"]
        assert len(out) == tasks
        if tasks == 3:
            assert [t.shape[1] for t in out] == [10, 5, 10]
    else:
        assert out[0].shape == (2, options.get("num_classes", 10))


def test_option_details() -> None:
    assert not any(
        isinstance(m, nn.Linear) and m.bias is not None
        for m in zoo.create("mlp", bias=False).modules()
    )
    convs = [m for m in zoo.create("mobilenetv2").modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups > 1 and c.groups == c.in_channels == c.out_channels for c in convs)
    blocks = [m for m in zoo.create("resnet20").modules() if isinstance(m, zoo.BasicBlock)]
    assert len(blocks) == 9
    assert any(isinstance(b.shortcut, nn.Sequential) for b in blocks)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("resnet20", {"depth": 21}),
        ("vit", {"dim": 30, "heads": 4}),
        ("vit", {"image_size": 30}),
        ("multitask_resnet", {"tasks": 2, "classes_per_task": (3,)}),
        ("bottleneck_resnet", {"blocks": (1, 1)}),
    ],
)
def test_invalid_option_values(name: str, options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        zoo.create(name, **options)
