"""Tests for the random-model generators in ``rewriter.testing.strategies``."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import rewriter as rw
from rewriter.testing.strategies import RandomDAG, RandomModel, random_model, random_models


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _check_traces_exactly(rm: RandomModel) -> None:
    model = rm.model
    assert isinstance(model, RandomDAG)
    assert model.training  # left in train mode, with warmed-up BN statistics
    # rewriter.trace, not bare fx: a fused BatchNorm+activation subclass records its
    # F.batch_norm with the training flag of the moment; canonicalised, it follows the mode
    traced = rw.trace(model)
    model.eval()
    traced.eval()
    with torch.no_grad():
        eager = _as_tuple(model(*rm.example_inputs))
        again = _as_tuple(traced(*rm.example_inputs))
    assert len(eager) == len(again) == len(model.outputs)
    batch = rm.example_inputs[0].shape[0]
    for a, b in zip(eager, again, strict=True):
        assert a.dim() == 2 and a.shape[0] == batch and a.shape[1] >= 2
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@settings(max_examples=30, deadline=None)
@given(random_models())
def test_random_models_trace_and_match_eager(rm: RandomModel) -> None:
    _check_traces_exactly(rm)
    x = rm.example_inputs[0]
    assert x.shape[0] == 2 and 1 <= x.shape[1] <= 4 and x.shape[2] == x.shape[3] in (6, 8)
    assert rm.description.startswith("input v0:")
    assert rm.description in repr(rm)


@settings(max_examples=10, deadline=None)
@given(random_models(min_ops=1, max_ops=4, max_channels=6, allow_two_outputs=False))
def test_strategy_options(rm: RandomModel) -> None:
    assert len(rm.model.outputs) == 1
    for module in rm.model.modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels <= 6
    _check_traces_exactly(rm)


def test_random_model_traces_for_many_seeds() -> None:
    for seed in range(40):
        _check_traces_exactly(random_model(seed))


def test_random_model_is_deterministic_and_keeps_global_rng() -> None:
    state = torch.get_rng_state()
    a, b = random_model(7), random_model(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.description == b.description
    assert torch.equal(a.example_inputs[0], b.example_inputs[0])
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert random_model(8).description != a.description


def test_modules_are_distinct_and_batchnorm_is_warmed_up() -> None:
    found_bn = False
    for seed in range(20):
        model = random_model(seed).model
        params = [p for p in model.parameters()]
        assert len({id(p) for p in params}) == len(params)
        named = dict(model.named_parameters(remove_duplicate=False))
        assert len(named) == len(params)  # no sharing
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                found_bn = True
                assert module.num_batches_tracked.item() == 2
                assert not torch.equal(module.running_mean, torch.zeros_like(module.running_mean))
                assert not torch.equal(module.weight, torch.ones_like(module.weight))
    assert found_bn


def test_op_vocabulary_is_covered() -> None:
    tags: set[str] = set()
    two_outputs = False
    for seed in range(60):
        rm = random_model(seed)
        tags |= rm.op_tags
        two_outputs |= len(rm.model.outputs) > 1
    required = {
        "conv", "dwconv", "gconv", "proj", "bn", "relu", "gelu", "add", "mul", "cat",
        "split", "chunk", "max_pool", "avg_pool", "gap", "flatten", "linear",
    }  # fmt: skip
    assert required <= tags, sorted(required - tags)
    assert two_outputs


def test_graphs_are_dags_not_chains() -> None:
    branching = 0
    for seed in range(20):
        gm = torch.fx.symbolic_trace(random_model(seed).model)
        if any(len(node.users) > 1 for node in gm.graph.nodes):
            branching += 1
        dead = [n for n in gm.graph.nodes if n.op != "output" and not n.users]
        assert not dead, f"seed {seed}: unused values {dead}"
    assert branching >= 15


def test_large_random_model_builds_fast() -> None:
    start = time.perf_counter()
    rm = random_model(0, num_ops=2000)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"building 2000 ops took {elapsed:.1f}s"
    gm = torch.fx.symbolic_trace(rm.model)
    assert len(gm.graph.nodes) >= 2000
    channels = [m.out_channels for m in rm.model.modules() if isinstance(m, nn.Conv2d)]
    assert max(channels) <= 4
    with torch.no_grad():
        out = _as_tuple(rm.model.eval()(*rm.example_inputs))
    assert all(torch.isfinite(t).all() for t in out)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        random_models(min_ops=5, max_ops=2)
    with pytest.raises(ValueError):
        random_model(0, max_channels=0)


def test_idiom_vocabulary_is_covered_and_canonicalised_exactly() -> None:
    from rewriter.canonical import canonical_report

    tags: set[str] = set()
    lifted: dict[str, int] = {}
    for seed in range(40):
        rm = random_model(seed, idioms=True)
        tags |= rm.op_tags
        _check_traces_exactly(rm)  # eval mode
        model, gm = rm.model.train(), rw.trace(rm.model)
        with torch.random.fork_rng(devices=[]), torch.no_grad():  # and training mode
            assert all(
                torch.equal(a, b)
                for a, b in zip(_as_tuple(model(*rm.example_inputs)), _as_tuple(gm(*rm.example_inputs)), strict=True)
            )
        report = canonical_report(gm)
        assert report.kept == [], rm.description
        for key, n in [*report.lifted.items(), *report.inplace.items()]:
            lifted[key] = lifted.get(key, 0) + n
        kinds = {type(m) for m in gm.modules()}
        assert not any(k.__name__ in ("FunctionalConv2d", "BatchNormAct2d") for k in kinds)
    required = {"fconv", "normact", "gn", "ln", "conv_act_", "conv_iadd", "slice", "gate"}
    assert required <= tags, sorted(required - tags)
    assert {"F.conv2d -> Conv2d", "F.batch_norm -> BatchNorm2d"} <= set(lifted), lifted
    assert any(key.startswith(("Tensor.relu_", "F.")) and "inplace" in key or key == "Tensor.relu_"
               for key in lifted), lifted  # fmt: skip
    assert random_model(3).description == random_model(3, idioms=False).description
