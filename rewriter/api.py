"""The public entry point: ``rewrite(model, passes, example_inputs)``."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .canonical import canonicalize_with_shapes
from .frontends import FRONTEND_KEY, Inputs, build_graph, positional
from .lift import materialise_state
from .manager import REPORT_KEY, Checks, run_passes
from .registry import Pass, make_pass

PassSpec = Pass | str | tuple[str, dict[str, Any]]


def rewrite(
    model: nn.Module,
    passes: Sequence[PassSpec],
    example_inputs: Inputs = None,
    *,
    leaves: Iterable[str | type[nn.Module]] = (),
    checks: Checks | None = None,
    frontend: str = "auto",
) -> fx.GraphModule:
    """Trace a copy of ``model`` and apply ``passes`` in order; return the GraphModule.

    ``passes`` items are registry names (``"rbn"``), ``(name, {options})`` pairs or
    pass objects. ``example_inputs`` enable the shape and numeric checks; without
    them, models from :mod:`rewriter.zoo` use their default input and other models
    skip those checks. ``model`` itself is never mutated. The result's history is
    available from :func:`rewriter.report`.

    ``example_inputs`` may also be a dict of keyword tensors (``input_ids``,
    ``attention_mask``, ``pixel_values``). ``frontend`` is ``"fx"`` (torch.fx tracing),
    ``"export"`` (``torch.export`` + lifting, see :mod:`rewriter.frontends`) or
    ``"auto"``: export for Hugging Face models and models fx cannot trace at the root,
    fx otherwise. ``report(gm).frontend`` says which one was used.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"rewrite() expects an nn.Module, got {type(model).__name__}")
    if isinstance(passes, (str, Pass)):
        passes = [passes]
    resolved = [make_pass(p) for p in passes]
    if isinstance(example_inputs, dict):
        inputs = None
    else:
        inputs = _inputs(model, example_inputs)
        example_inputs = inputs
    work = copy.deepcopy(model)
    if isinstance(work, fx.GraphModule) and REPORT_KEY in work.meta:
        gm = work  # continue a rewrite: keep the graph and its history
        if isinstance(example_inputs, dict):
            inputs = positional(work, (), example_inputs)
    else:
        gm, inputs = build_graph(work, example_inputs, frontend=frontend, leaves=leaves)
        # an F.batch_norm whose input rank only shapes tell is lifted now they can be known
        canonicalize_with_shapes(gm, inputs, source=work)
        materialise_state(gm)  # work is our copy: its expanded buffers become contiguous too
    gm = run_passes(gm, resolved, inputs, checks or Checks())
    gm.meta[REPORT_KEY].frontend = gm.meta.get(FRONTEND_KEY, "fx")
    return gm


def _inputs(model: nn.Module, example_inputs: Any) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        source = getattr(model, "rewriter_source", None) or getattr(model, "meta", {}).get(
            "rewriter_source"
        )
        if source and str(source.get("model", "")).startswith("zoo:"):
            from . import zoo

            name = source["model"].removeprefix("zoo:")
            return zoo.example_inputs(name, **source.get("options", {}))
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)
