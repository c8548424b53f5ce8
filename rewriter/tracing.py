"""Front end: trace an ``nn.Module`` into a module-level ``torch.fx.GraphModule``.

Our tracer keeps library-inserted modules as leaves. When a submodule cannot be
traced (data-dependent control flow, unsupported Python), the trace is retried
with that submodule as a leaf; every such *opaque* module is recorded with the
reason, so passes can warn that they cannot see inside it.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .canonical import canonicalize, canonicalize_with_shapes
from .errors import TraceError
from .lift import materialise_state
from .modules import RewriterModule

OPAQUE_KEY = "rewriter_opaque"
_MAX_RETRIES = 64


class Tracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are torch.nn built-ins, library modules and user leaves."""

    def __init__(
        self,
        leaf_names: Iterable[str] = (),
        leaf_classes: tuple[type[nn.Module], ...] = (),
    ) -> None:
        super().__init__()
        self.leaf_names = frozenset(leaf_names)
        self.leaf_classes = leaf_classes

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, RewriterModule):
            return True
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_classes and isinstance(m, self.leaf_classes):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # The innermost module that failed tags the exception first.
            if not hasattr(exc, "_rewriter_module"):
                exc._rewriter_module = self.path_of_module(m)  # type: ignore[attr-defined]
            raise


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename] or frames
    if not user:
        return "unknown location"
    f = user[-1]
    return f"{f.filename}:{f.lineno} ({f.line or '?'})"


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first} at {_where(exc)}"


def trace(
    model: nn.Module,
    *,
    leaves: Iterable[str | type[nn.Module]] = (),
    concrete_args: dict[str, Any] | None = None,
    canonical: bool = True,
    example_inputs: torch.Tensor | Sequence[Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into an ``fx.GraphModule`` without mutating it.

    ``leaves`` names submodules (qualified names) or module classes to keep as
    single ``call_module`` nodes. Submodules that fail to trace become leaves
    automatically; ``opaque_modules(gm)`` lists them with the reason.
    Raises ``TraceError`` when the model's own ``forward`` cannot be traced.

    Arguments of ``forward`` after the first whose default is ``None``
    (``forward(self, x, mask=None)``) are traced as ``None`` unless ``concrete_args`` says
    otherwise, so ``if mask is not None`` takes the default's branch; calling the result
    with a tensor there fails fx's ``None`` assertion instead of being ignored. The graph is then canonicalised (:func:`rewriter.canonical.canonicalize`:
    functional layers on a module's own parameters become modules, in-place ops become
    out-of-place, ``nn.MultiheadAttention`` becomes explicit); ``canonical=False`` skips
    that step. With ``example_inputs`` (a tensor or a tuple of positional inputs), shapes
    are recorded when a call needs them (an ``F.batch_norm`` on a module's own parameters
    whose input rank the graph does not tell) and canonicalisation runs again
    (:func:`rewriter.canonical.canonicalize_with_shapes`); :func:`rewriter.rewrite` does
    that with its example inputs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() expects an nn.Module, got {type(model).__name__}")
    leaves = list(leaves)
    names = {x for x in leaves if isinstance(x, str)}
    classes = tuple(x for x in leaves if isinstance(x, type))
    unknown = [x for x in leaves if not isinstance(x, (str, type))]
    if unknown:
        raise TypeError(f"leaves must be qualified names or module classes, got {unknown!r}")
    known = dict(model.named_modules())
    missing = sorted(n for n in names if n not in known)
    if missing:
        raise TraceError(f"leaves name submodules that do not exist: {missing}")

    opaque: dict[str, str] = dict(getattr(model, "meta", {}).get(OPAQUE_KEY, {}))
    if concrete_args is None:
        concrete_args = _constant_defaults(model)
    for _ in range(_MAX_RETRIES):
        tracer = Tracer(names | set(opaque), classes)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:
            failed = getattr(exc, "_rewriter_module", None)
            if not failed or failed in opaque or failed in names:
                raise TraceError(
                    f"cannot trace {type(model).__name__}.forward: {_reason(exc)}.\n"
                    "  Its own forward uses Python control flow or operations torch.fx cannot "
                    "record. Move that part into a submodule (it will be kept opaque), pass "
                    "the module's name in leaves=[...], or replace value-dependent `if` "
                    "statements with torch.where."
                ) from exc
            opaque[failed] = _reason(exc)
            continue
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        # fx folds computations on buffers alone into constants; an expanded one (stride 0)
        # cannot be written, saved or loaded: copy it contiguously (the model's own
        # submodules, which the GraphModule shares, are left alone)
        materialise_state(gm, keep=[model])
        modes = {n: m.training for n, m in model.named_modules()}
        for n, m in gm.named_modules():  # containers rebuilt by fx start in training mode
            if n in modes:
                m.training = modes[n]
        gm.meta[OPAQUE_KEY] = opaque
        source = getattr(model, "rewriter_source", None) or getattr(model, "meta", {}).get(
            "rewriter_source"
        )
        if source is not None:
            gm.meta["rewriter_source"] = source
        if canonical:
            canonicalize(gm, source=model)
            if example_inputs is not None:
                inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
                canonicalize_with_shapes(gm, tuple(inputs), source=model)
        return gm
    raise TraceError(f"gave up tracing {type(model).__name__} after {_MAX_RETRIES} retries")


def _constant_defaults(model: nn.Module) -> dict[str, Any] | None:
    """``forward``'s arguments (after the first) whose default is ``None``, by name."""
    if isinstance(model, fx.GraphModule):
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    out = {
        p.name: None
        for p in params[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is None
    }
    return out or None


def opaque_modules(gm: fx.GraphModule) -> dict[str, str]:
    """Qualified names of submodules traced as opaque leaves, with the reason."""
    return dict(getattr(gm, "meta", {}).get(OPAQUE_KEY, {}))


def owning_modules(node: fx.Node) -> list[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and (not names or names[-1] != node.target):
        names.append(str(node.target))
    return names


__all__ = ["Tracer", "trace", "opaque_modules", "owning_modules"]
_ = torch  # torch is imported for type context of users reading this module
