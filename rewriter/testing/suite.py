"""The standard property suite, runnable against any pass (a user's own included).

:func:`check_pass` rewrites one model with one pass and asserts the contracts
every pass keeps (docs/architecture.md): the input model is not mutated; the graph lints;
output shapes are unchanged; outputs are preserved where the pass declares it;
original parameter and buffer names are kept; no two names share a tensor that
the input model did not share; running the pass again is a no-op or a clear
``RewriterError``; optionally the result compiles with ``fullgraph=True`` and
gives the eager outputs. Use it with :func:`rewriter.testing.random_models`::

    @given(rw_testing.random_models())
    def test_my_pass(rm):
        rw_testing.check_pass("my_pass", rm)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from ..api import PassSpec, rewrite
from ..errors import RewriterError
from ..manager import evaluate, report
from ..registry import make_pass


@dataclass(frozen=True)
class SuiteResult:
    """What :func:`check_pass` saw: the rewritten module and how often the pass fired."""

    gm: fx.GraphModule
    fired: int
    idempotent: bool


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def _assert_same_snapshot(before: dict[str, Any], model: nn.Module) -> None:
    after = _snapshot(model)
    assert before["types"] == after["types"], "the pass changed the input model's modules"
    assert before["training"] == after["training"], "the pass changed the input model's modes"
    assert before["state"].keys() == after["state"].keys(), "the pass changed the input state_dict"
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"the pass mutated the input tensor {k!r}"


def _shared_groups(module: nn.Module) -> set[frozenset[str]]:
    by_id: dict[int, set[str]] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        by_id.setdefault(id(t), set()).add(name)
    return {frozenset(v) for v in by_id.values() if len(v) > 1}


def _close(a: Any, b: Any, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def check_pass(
    spec: PassSpec,
    random_model: Any,
    *,
    compile: bool = False,
    keeps_names: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> SuiteResult:
    """Run the standard property suite for one pass on one model; raise AssertionError on a breach.

    ``random_model`` is a :class:`RandomModel` (anything with ``model`` and
    ``example_inputs``) or a ``(model, example_inputs)`` pair.
    """
    if isinstance(random_model, tuple):
        model, inputs = random_model
    else:
        model, inputs = random_model.model, random_model.example_inputs
    inputs = tuple(inputs)
    the_pass = make_pass(spec)
    before = _snapshot(model)
    reference = evaluate(model, inputs)

    gm = rewrite(model, [the_pass], inputs)  # the manager lints and checks shapes/numerics
    _assert_same_snapshot(before, model)
    gm.graph.lint()

    out = evaluate(gm, inputs)
    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(out)
    assert ref_spec == out_spec, f"output structure changed: {ref_spec} -> {out_spec}"
    assert [t.shape for t in ref_leaves] == [t.shape for t in out_leaves], "output shapes changed"
    if the_pass.preserves_outputs:
        _close(out, reference, rtol, atol)

    keys_before = set(before["state"])
    keys_after = set(gm.state_dict())
    if keeps_names:
        missing = sorted(keys_before - keys_after)
        assert not missing, f"original state_dict keys disappeared: {missing[:5]}"
    new_shared = _shared_groups(gm) - _shared_groups(model)
    assert not new_shared, f"the pass made names share one tensor: {sorted(map(sorted, new_shared))}"

    fired = report(gm).passes[-1].fired
    idempotent = True
    try:
        again = rewrite(gm, [the_pass], inputs)
    except RewriterError:
        idempotent = False  # a clear error on the second run is allowed by the contract
    else:
        second = report(again).passes[-1].fired
        assert second == 0, f"running {the_pass.name!r} twice fired {second} more times"
        assert set(again.state_dict()) == keys_after, "a second run changed the state_dict keys"
        _close(evaluate(again, inputs), out, rtol, atol)

    if compile:
        check_compiles(gm, inputs, rtol=rtol, atol=atol)
    return SuiteResult(gm=gm, fired=fired, idempotent=idempotent)


def check_compiles(
    gm: nn.Module, inputs: tuple[torch.Tensor, ...], *, rtol: float = 1e-4, atol: float = 1e-4
) -> None:
    """``torch.compile(fullgraph=True)`` gives the eager outputs (eval) and a finite gradient (train)."""
    work = copy.deepcopy(gm)
    compiled = torch.compile(work, fullgraph=True, backend="inductor")
    expected = evaluate(work, inputs)
    _close(evaluate(compiled, inputs), expected, rtol, atol)
    work.train()
    leaves, _ = tree_flatten(compiled(*inputs))
    loss = sum(t.float().square().mean() for t in leaves if isinstance(t, torch.Tensor))
    loss.backward()
    grads = [p.grad for p in work.parameters() if p.requires_grad]
    assert any(g is not None for g in grads), "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads if g is not None), "non-finite gradient"


def train_losses(
    step: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    steps: int = 3,
    lr: float = 0.05,
) -> list[float]:
    """Cross-entropy losses of ``steps`` SGD steps of ``model`` on one fixed batch.

    ``step`` computes the logits (``model`` itself, or ``torch.compile(model)``); ``model``
    holds the parameters the optimizer updates. A rewritten model that still trains gives
    a last loss below the first: ``losses[-1] < losses[0]``.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(step(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
