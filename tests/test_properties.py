"""Property tests: every built-in pass keeps the engine's contracts on random graphs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import rewriter as rw
from rewriter.testing import check_pass, random_model, random_models

PROPERTY = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
SPECS = ["masks", "rbn", ("rbn", {"init": "paper"}), ("masks", {"classes": ["Conv2d"]})]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s if isinstance(s, str) else str(s[1]))
@PROPERTY
@given(rm=random_models())
def test_pass_contracts_on_random_graphs(spec, rm):
    result = check_pass(spec, rm)
    name = spec if isinstance(spec, str) else spec[0]
    layers = dict(rm.model.named_modules())
    if name == "masks":
        classes = (nn.Conv2d,) if spec != "masks" else (nn.Conv2d, nn.Linear)
        expected = sum(isinstance(m, classes) for m in layers.values())
    else:
        # fused BatchNorm+activation subclasses are canonicalised into nn.BatchNorm2d too
        expected = sum(isinstance(m, nn.BatchNorm2d) for m in layers.values())
    assert result.fired == expected, rm.description


@PROPERTY
@given(rm=random_models())
def test_masks_then_rbn_compose(rm):
    gm = rw.rewrite(rm.model, ["masks", "rbn"], rm.example_inputs)
    records = rw.report(gm).passes
    assert [r.name for r in records] == ["masks", "rbn"]
    torch.testing.assert_close(
        rw.manager.evaluate(gm, rm.example_inputs),
        rw.manager.evaluate(rm.model, rm.example_inputs),
        rtol=1e-5,
        atol=1e-5,
    )


@rw.register
@dataclass(frozen=True)
class _DoublesOutputs(rw.Pass):
    """relu(x) => 2 * relu(x), while wrongly claiming to preserve outputs."""

    name = "test_suite_doubles"
    preserves_outputs = True

    def rules(self):
        return [(rw.P.function(torch.relu, torch.nn.functional.relu, name="r"), self.double)]

    def double(self, ctx, m):
        if m.root.meta.get("doubled"):
            return None
        node = ctx.graph.call_function(torch.mul, (m.root, 2.0))
        node.meta["doubled"] = True
        return node


@rw.register
@dataclass(frozen=True)
class _NotIdempotent(rw.Pass):
    """x => identity module after the input, every time the pass runs."""

    name = "test_suite_not_idempotent"
    preserves_outputs = True

    def apply(self, gm, ctx):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        name = ctx.add_module(x, "id", _Id())
        with gm.graph.inserting_after(x):
            node = ctx.call_module(name, (x,))
        x.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
        ctx.matches["identity"] += 1


class _Id(rw.RewriterModule):
    def forward(self, x):
        return x


def _relu_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)), (
        torch.randn(2, 3, 6, 6),
    )


def test_suite_catches_a_pass_that_changes_outputs():
    model, inputs = _relu_model()
    model[1] = _FunctionalRelu()
    with pytest.raises(rw.PassError, match="preserves_outputs"):
        check_pass("test_suite_doubles", (model, inputs))


def test_suite_catches_a_pass_that_is_not_idempotent():
    with pytest.raises(AssertionError, match="twice"):
        check_pass("test_suite_not_idempotent", _relu_model())


class _FunctionalRelu(nn.Module):
    def forward(self, x):
        return torch.relu(x)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3])
def test_random_graph_compiles_after_masks_and_rbn(seed):
    rm = random_model(seed)
    result = check_pass("masks", rm, compile=True)
    check_pass("rbn", (result.gm, rm.example_inputs), compile=True)
