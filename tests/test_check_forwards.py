"""The pass manager's checks use the shape propagation's outputs: one forward per check.

``rewriter.manager._propagate_shapes(gm, inputs, seed)`` returns the outputs of the
eval-mode, no-grad, fixed-seed run it interprets node by node; the default checks compare
those instead of running :func:`rewriter.manager.evaluate` again (bench/canonical_cost.py
measured the second forward at 15-35% of a ``rewrite`` call).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn
from torch.utils._pytree import tree_flatten

import rewriter as rw
import rewriter.manager as manager
from rewriter import zoo
from rewriter.testing import random_models


def _bit_identical(a, b) -> bool:
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rm=random_models())
def test_shape_propagation_returns_evaluate_outputs(rm):
    gm = rw.trace(rm.model)
    rewritten = rw.rewrite(rm.model, ["masks", "rbn"], rm.example_inputs)
    for g in (gm, rewritten):
        was_training = [m.training for m in g.modules()]
        outputs = manager._propagate_shapes(g, rm.example_inputs, seed=3)
        assert _bit_identical(outputs, manager.evaluate(g, rm.example_inputs, seed=3))
        assert [m.training for m in g.modules()] == was_training
        assert all("tensor_meta" in n.meta for n in g.graph.nodes if n.op != "output")


class _Noisy(nn.Module):
    """Draws random numbers in its forward, also in eval mode."""

    def forward(self, x):
        return x + torch.rand_like(x)


def test_seeded_propagation_is_reproducible_and_keeps_the_callers_rng():
    gm = rw.trace(_Noisy())
    x = torch.zeros(2, 3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = manager._propagate_shapes(gm, (x,), seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG state is kept
    b = manager._propagate_shapes(gm, (x,), seed=0)
    assert torch.equal(a, b)
    assert torch.equal(a, manager.evaluate(gm, (x,), seed=0))
    assert not torch.equal(a, manager._propagate_shapes(gm, (x,), seed=1))
    manager._propagate_shapes(gm, (x,))  # without a seed: draws from the caller's RNG
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("passes", [["masks"], ["masks", "rbn"]])
def test_default_checks_run_one_forward_per_check(monkeypatch, passes):
    counts = {"propagate": 0, "evaluate": 0}
    propagate, evaluate = manager._ShapeProp.propagate, manager.evaluate

    def counting_propagate(self, *args):
        counts["propagate"] += 1
        return propagate(self, *args)

    def counting_evaluate(*args, **kwargs):
        counts["evaluate"] += 1
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(manager._ShapeProp, "propagate", counting_propagate)
    monkeypatch.setattr(manager, "evaluate", counting_evaluate)
    gm = rw.rewrite(zoo.create("resnet8"), passes, zoo.example_inputs("resnet8"))
    assert [r.name for r in rw.report(gm).passes] == passes
    # one before the passes, one after each; no separate reference or output forward
    assert counts == {"propagate": 1 + len(passes), "evaluate": 0}


def test_a_changed_function_still_fails_the_numeric_check(monkeypatch):
    """The outputs the check compares come from the rewritten graph (a real comparison):
    RBN's 'paper' init keeps gamma (outputs x sigmoid(1)); made to claim preserves_outputs,
    it must fail, and 'preserve' must pass."""
    from rewriter.passes.norm import RBN

    monkeypatch.setattr(RBN, "preserves_outputs", property(lambda self: True))
    x = zoo.example_inputs("resnet8")
    with pytest.raises(rw.PassError, match="outputs changed"):
        rw.rewrite(zoo.create("resnet8"), [("rbn", {"init": "paper"})], x)
    rw.rewrite(zoo.create("resnet8"), [("rbn", {"init": "preserve"})], x)
