"""The pass manager: runs passes in order and checks every result in one place.

After each pass: ``graph.lint()``, removal of orphan submodules, recompile,
shape propagation with the example inputs and a comparison of the output
shapes with the input model's, and, when the pass declares
``preserves_outputs``, numeric equivalence (``torch.testing.assert_close``, eval
mode, fixed seed) with ``atol`` scaled by the largest output magnitude (at least 1):
float32 rounding accumulated over a deep net (and a rewrite's new parameters rounded to
the model's dtype, such as RBN's ``gamma / sigmoid(1)``) is an error relative to the
outputs' scale, not an absolute one, so it is not mistaken for a changed function, while
a changed function (a flipped sign) still fails. With ``Checks(float64=True)`` the model
before and after the pass also runs with its floating-point parameters, buffers and
inputs converted to float64 (and restored afterwards) and is compared there; a model that
cannot run in float64 is compared in its own dtype. Off by default: float64 convolutions
have no fast CPU kernels (a depthwise MobileNetV2's checks took 2.2x as long). Any failure raises one :class:`PassError` that names the
pass, the node, the rule and the passes already run. The outputs compared are those of
the shape propagation's run (eval mode, no grad, the check's seed), so each check costs
one forward of the graph, not two.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.utils._pytree import tree_flatten

from .canonical import CanonicalReport, canonical_report
from .context import RewriteContext, RuleLoopError
from .errors import PassError, RewriterError
from .registry import Pass
from .tracing import opaque_modules

REPORT_KEY = "rewriter_report"


@dataclass(frozen=True)
class Checks:
    """Which invariants the pass manager verifies after each pass."""

    lint: bool = True
    shapes: bool = True
    numerics: bool = True
    rtol: float = 1e-5
    atol: float = 1e-5
    seed: int = 0  # for the numeric check and for random parameters passes create
    float64: bool = False  # also run the numeric check in float64 (see the module docs)


@dataclass
class PassRecord:
    """What one pass did."""

    name: str
    options: dict[str, Any]
    matches: dict[str, int]
    modules_added: list[str]
    modules_replaced: list[str]
    params_added: int
    buffers_added: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def fired(self) -> int:
        return sum(self.matches.values())


@dataclass
class Report:
    """The history of a rewritten GraphModule: source, passes, opaque modules."""

    source: dict[str, Any] | None = None
    passes: list[PassRecord] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    checked: bool = True  # False when no example inputs allowed shape/numeric checks
    canonical: CanonicalReport | None = None  # what the front end lifted (rewriter.canonical)
    frontend: str = "fx"  # "fx" (torch.fx tracing) or "export" (torch.export + lifting)

    def pipeline(self) -> list[tuple[str, dict[str, Any]]]:
        return [(p.name, dict(p.options)) for p in self.passes]

    def table(self) -> str:
        rows = [("pass", "fired", "modules +", "replaced", "params +", "buffers +", "ms")]
        for p in self.passes:
            rows.append(
                (
                    p.name,
                    str(p.fired),
                    str(len(p.modules_added)),
                    str(len(p.modules_replaced)),
                    f"{p.params_added:,}",
                    f"{p.buffers_added:,}",
                    f"{p.seconds * 1e3:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for p in self.passes:
            lines.extend(f"note ({p.name}): {n}" for n in p.notes)
        if self.canonical is not None:
            lines.extend(f"canonical: {line}" for line in self.canonical.lines())
        for name, why in self.opaque.items():
            lines.append(f"opaque module {name!r}: {why}")
        if not self.checked:
            lines.append("shape and numeric checks skipped: no example inputs were given")
        if self.frontend != "fx":
            lines.append(f"front end: {self.frontend} (torch.export program lifted to modules)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def report(gm: nn.Module) -> Report:
    """What every pass did to ``gm`` (matches, modules and parameters added, time)."""
    rep = getattr(gm, "meta", {}).get(REPORT_KEY)
    if rep is None:
        raise RewriterError("this module was not produced by rewriter.rewrite(); it has no report")
    return rep


def _count(gm: nn.Module) -> tuple[int, int]:
    return (
        sum(p.numel() for p in gm.parameters()),
        sum(b.numel() for b in gm.buffers()),
    )


def _training_states(gm: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in gm.modules()}


def _restore(states: dict[nn.Module, bool]) -> None:
    for m, t in states.items():
        m.training = t


def evaluate(gm: nn.Module, inputs: Sequence[torch.Tensor], seed: int = 0) -> Any:
    """Outputs of ``gm`` on ``inputs`` in eval mode, no grad, fixed seed; modes restored."""
    states = _training_states(gm)
    gm.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            return gm(*inputs)
    finally:
        _restore(states)


@contextlib.contextmanager
def in_float64(gm: nn.Module):
    """Temporarily hold every floating-point parameter and buffer of ``gm`` in float64.

    The tensors stay the same objects (their ``.data`` is swapped for a float64 copy); on
    exit each gets its own storage back, with the values it holds then copied in (converted
    to its dtype), so in-place changes made meanwhile (masks set to 0/1) are kept and
    storage pointers are unchanged.
    """
    changed: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for t in (*gm.parameters(), *gm.buffers()):
            if t.is_floating_point() and t.dtype != torch.float64:
                changed.append((t, t.data))
                t.data = t.data.double()
        yield
    finally:
        with torch.no_grad():
            for t, original in changed:
                wide = t.data
                t.data = original
                if not torch.equal(wide, original):  # skips the copy when nothing changed
                    original.copy_(wide)


def _double(inputs: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )


def evaluate64(gm: nn.Module, inputs: Sequence[torch.Tensor], seed: int = 0) -> Any | None:
    """:func:`evaluate` on float64 copies of the state and inputs; ``None`` if it cannot run."""
    try:
        with in_float64(gm):
            return evaluate(gm, _double(inputs), seed)
    except Exception:
        return None


def _magnitude(out: Any) -> float:
    """The largest absolute floating-point output value, at least 1 (scales ``atol``)."""
    leaves, _ = tree_flatten(out)
    peaks = [
        float(x.detach().abs().max())
        for x in leaves
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel()
    ]
    return max([1.0, *[p for p in peaks if p == p and p != float("inf")]])


def _shapes(out: Any) -> list[tuple[int, ...]]:
    leaves, _ = tree_flatten(out)
    return [tuple(x.shape) for x in leaves if isinstance(x, torch.Tensor)]


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[Pass],
    example_inputs: Sequence[torch.Tensor] | None,
    checks: Checks = Checks(),
) -> fx.GraphModule:
    """Apply ``passes`` to ``gm`` in order, checking after each; records a report."""
    rep: Report = gm.meta.get(REPORT_KEY) or Report(source=gm.meta.get("rewriter_source"))
    rep.opaque = opaque_modules(gm)
    rep.canonical = canonical_report(gm) or rep.canonical
    gm.meta[REPORT_KEY] = rep
    history = [p.name for p in rep.passes]
    rep.checked = rep.checked and example_inputs is not None
    reference = ref_shapes = None
    reference64 = None  # float64 outputs of the graph as it is now, when known
    if example_inputs is not None:
        try:
            # passes may read node.meta["tensor_meta"]; the outputs are evaluate()'s
            outputs = _propagate_shapes(gm, example_inputs, checks.seed)
            if checks.shapes or checks.numerics:
                if _use64(checks, passes[0] if passes else None):
                    reference64 = evaluate64(gm, example_inputs, checks.seed)
                if reference64 is None:
                    reference = outputs
                ref_shapes = _shapes(reference64 if reference64 is not None else reference)
        except Exception as exc:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            raise RewriterError(
                f"the model fails on the example inputs {shapes} before any pass ran: "
                f"{_root_cause(exc)}\n"
                "  Give inputs the model accepts (shape, dtype, number of arguments)."
            ) from exc

    for p in passes:
        if rep.opaque:
            warnings.warn(
                f"pass {p.name!r} cannot see inside opaque module(s) "
                f"{', '.join(sorted(rep.opaque))}; they are left unchanged",
                stacklevel=3,
            )
        if example_inputs is not None and _use64(checks, p) and reference64 is None:
            reference64 = evaluate64(gm, example_inputs, checks.seed)
        ctx = RewriteContext(gm, p.name)
        before = _count(gm)
        start = time.perf_counter()
        try:
            # Passes that draw random parameters (gates) do so from a seed fixed by the
            # pass's position, so a rewrite, and the replay of a saved pipeline, is
            # reproducible; the caller's global RNG state is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(checks.seed + len(history))
                p.apply(gm, ctx)
        except PassError:
            raise
        except RuleLoopError as exc:
            raise PassError(
                str(exc), pass_name=p.name, history=history, node=exc.node, rule=exc.rule
            ) from exc
        except Exception as exc:
            raise PassError(
                str(exc) if isinstance(exc, RewriterError) else f"{type(exc).__name__}: {exc}",
                pass_name=p.name,
                history=history,
                node=ctx.current_node,
                rule=ctx.current_rule,
            ) from exc
        seconds = time.perf_counter() - start

        fail = functools.partial(PassError, pass_name=p.name, history=list(history))

        if checks.lint:
            try:
                gm.graph.lint()
            except Exception as exc:
                raise fail(f"graph.lint() failed after the pass: {exc}") from exc
        _delete_orphans(gm)
        gm.recompile()
        if example_inputs is not None and (checks.shapes or checks.numerics):
            out, reference64 = _check_outputs(
                gm, p, example_inputs, (reference, reference64), ref_shapes, checks, fail
            )
            reference = out
        after = _count(gm)
        rep.passes.append(
            PassRecord(
                name=p.name,
                options=p.options(),
                matches=dict(ctx.matches),
                modules_added=list(ctx.modules_added),
                modules_replaced=list(ctx.modules_replaced),
                params_added=after[0] - before[0],
                buffers_added=after[1] - before[1],
                seconds=seconds,
                notes=list(ctx.notes),
            )
        )
        history.append(p.name)
    return gm


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line (ShapeProp wraps the real error)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _delete_orphans(gm: fx.GraphModule) -> None:
    """Remove submodules no node uses (fx's own version is quadratic in graph size)."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or not isinstance(node.target, str):
            continue
        parts = node.target.split(".")
        used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            used.update(f"{node.target}.{name}" for name, _ in module.named_modules() if name)
    for name in [n for n, _ in gm.named_modules() if n and n not in used]:
        gm.delete_submodule(name)  # a no-op when a parent was already deleted


_FORMATS = ((torch.contiguous_format, None), (torch.channels_last, 4), (torch.channels_last_3d, 5))


def _tensor_meta(t: torch.Tensor) -> TensorMetadata:
    """torch's ``_extract_tensor_metadata(t)``, with the memory format read in C++.

    For a plain strided tensor ``Tensor.is_contiguous(memory_format=...)`` replaces torch's
    Python reference check (a quarter of the propagation's time on small models; the same
    formats in the same order, so the same :class:`TensorMetadata`). Other tensors
    (sparse, quantized) take torch's own path.
    """
    if t.layout != torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    memory_format = None
    for fmt, ndim in _FORMATS:
        if (ndim is None or t.dim() == ndim) and t.is_contiguous(memory_format=fmt):
            memory_format = fmt
            break
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


class _ShapeProp(ShapeProp):
    """``ShapeProp`` with :func:`_tensor_meta` (no fake mode) that also marks nodes whose
    value is not a tensor (sizes, ints, None) with ``tensor_meta = None``: shapes were
    propagated, the value has none."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as exc:  # as ShapeProp reports it (without printing a traceback)
            raise RuntimeError(f"ShapeProp error for: node={n.format_node()}") from exc
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _tensor_meta(obj)
            return obj

        value = fx.node.map_aggregate(result, meta)
        n.meta["tensor_meta"] = value if found else None
        n.meta["type"] = type(result)
        return result


def _propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any], seed: int | None = None) -> Any:
    """Record ``tensor_meta`` on every node and return the outputs.

    One eval-mode, no-grad run of the graph, interpreted node by node; training flags are
    restored. With ``seed``, the random seed is fixed to it for the run (the caller's RNG
    state is kept), and the outputs are those of :func:`evaluate` ``(gm, inputs, seed)``
    (the same calls in the same order), so the pass manager's checks use them instead of a
    second forward. Nodes whose value is not a tensor (``x.size(0)``, a ``None`` default
    argument) get ``tensor_meta = None``.
    """
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)  # so a failure points at the first node that fails
    states = _training_states(gm)
    gm.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=[]))
                torch.manual_seed(seed)
            return _ShapeProp(gm).propagate(*inputs)
    finally:
        _restore(states)


def _use64(checks: Checks, p: Pass | None) -> bool:
    """Whether the numeric check after ``p`` is made in float64."""
    return bool(checks.numerics and checks.float64 and p is not None and p.preserves_outputs)


def _check_outputs(gm, p, inputs, references, ref_shapes, checks, fail):
    """Shape and numeric checks after pass ``p``.

    Returns (float32 outputs or None, float64 outputs or None): the next pass compares
    with whichever exists.
    """
    reference, reference64 = references
    try:
        outputs = _propagate_shapes(gm, inputs, checks.seed)  # the outputs are evaluate()'s
    except Exception as exc:
        node = next(
            (n.name for n in gm.graph.nodes if "tensor_meta" not in n.meta and n.op != "output"),
            None,
        )
        raise fail(
            f"the rewritten model fails on the example inputs: {_root_cause(exc)}",
            node=node,
        ) from exc
    # Float64 outputs replace the float32 ones when the comparison is made in float64:
    # one forward per pass, as before, only wider.
    out = out64 = None
    if reference64 is not None and _use64(checks, p):
        out64 = evaluate64(gm, inputs, checks.seed)
    if out64 is None:
        out = outputs
    shapes = _shapes(out64 if out64 is not None else out)
    if checks.shapes and shapes != ref_shapes:
        raise fail(f"output shapes changed: {ref_shapes} before, {shapes} after")
    if checks.numerics and p.preserves_outputs:
        if out64 is not None:
            expected, got, where = reference64, out64, ", compared in float64"
        elif reference is not None:
            expected, got, where = reference, out, ""
        else:
            raise fail(
                "the rewritten model no longer runs in float64, so its outputs cannot be "
                "compared with the float64 reference; check with Checks(float64=False)"
            )
        scale = _magnitude(expected)
        try:
            torch.testing.assert_close(got, expected, rtol=checks.rtol, atol=checks.atol * scale)
        except AssertionError as exc:
            raise fail(
                "the pass declares preserves_outputs but the outputs changed "
                f"(eval mode{where}, atol {checks.atol} x output magnitude {scale:.3g}): {exc}"
            ) from exc
    return out, out64
