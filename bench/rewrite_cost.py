"""Cost of ``rewrite(model, ["masks", "rbn"])``: zoo models and random graphs of growing size.

Run from the repository root::

    python -m bench.rewrite_cost            # zoo + random graphs of ~500 / 2,000 / 8,000 nodes
    python -m bench.rewrite_cost --quick    # smaller graphs (~250 / 1,000 / 4,000 nodes)

Every timing is one ``rewrite`` call (deep copy + trace + masks + rbn + the pass manager's
checks), median over a few repeats (fewer for the big graphs), in two settings:
``Checks(shapes=False, numerics=False)`` ("no checks") and the default checks. Both the
process CPU time and the wall-clock time are shown; the verdict and the breakdown use CPU
time, which a busy shared machine disturbs far less than wall-clock time.

For the random graphs the growth ratio per 4x nodes (time(2,000) / time(500) and
time(8,000) / time(2,000), normalised to exactly 4x nodes) decides the verdict: below
``LINEAR_LIMIT`` is "near-linear" (a linear engine gives ~4, an n log n one ~5), otherwise
SUPERLINEAR. A cProfile run at each size splits the time into components (deep copy, trace,
rules, pass-manager steps) and gives each its own growth ratio, so a quadratic step is named
even when it is still small next to the linear ones.

Uses one intra-op thread: the machine is shared, and with two threads each tiny conv in the
reference forward can wait milliseconds on a busy core, which would drown the engine's time.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import io
import math
import os
import pstats
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

import rewriter
import rewriter.api
import rewriter.manager
from rewriter import zoo
from rewriter.context import RewriteContext
from rewriter.testing.strategies import random_model

PASSES = ["masks", "rbn"]
NO_CHECKS = rewriter.Checks(shapes=False, numerics=False)
DEFAULT_CHECKS = rewriter.Checks()
LINEAR_LIMIT = 6.0
"""Growth per 4x nodes above which the engine is flagged SUPERLINEAR (quadratic gives 16)."""

Timer = dict[str, float]


def _components() -> list[tuple[str, object, str]]:
    """(label, owner, attribute) of the steps the breakdown times (those that exist)."""
    steps = [
        ("deepcopy of the model (api)", rewriter.api, "copy"),
        ("trace (rewriter.tracing.trace)", rewriter.api, "trace"),
        ("rules: masks + rbn (RewriteContext.apply_rules)", RewriteContext, "apply_rules"),
        ("fx Graph.lint", fx.Graph, "lint"),
        ("orphan submodule removal (manager._delete_orphans)", rewriter.manager, "_delete_orphans"),
        ("fx GraphModule.recompile", fx.GraphModule, "recompile"),
        ("shape propagation (manager._propagate_shapes)", rewriter.manager, "_propagate_shapes"),
        ("reference forward (manager.evaluate)", rewriter.manager, "evaluate"),
        ("output checks (manager._check_outputs)", rewriter.manager, "_check_outputs"),
    ]
    return [(label, owner, attr) for label, owner, attr in steps if hasattr(owner, attr)]


@contextmanager
def instrumented(acc: Timer) -> Iterator[None]:
    """Patch the steps of ``_components()`` to add their *exclusive* seconds to ``acc``.

    A step called inside another (``recompile`` inside ``trace``) is charged to itself only.
    """
    stack: list[list[float]] = []  # per active step: [start, seconds of nested steps]

    def timed(label: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack.append([time.process_time(), 0.0])
            try:
                return func(*args, **kwargs)
            finally:
                start, nested = stack.pop()
                total = time.process_time() - start
                acc[label] = acc.get(label, 0.0) + total - nested
                if stack:
                    stack[-1][1] += total

        return wrapper

    saved = []
    for label, owner, attr in _components():
        original = getattr(owner, attr)
        saved.append((owner, attr, original))
        if attr == "copy":  # api.py calls copy.deepcopy: give it a module with a timed deepcopy
            replacement: Any = types.SimpleNamespace(deepcopy=timed(label, copy.deepcopy))
        else:
            replacement = timed(label, original)
        setattr(owner, attr, replacement)
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


@dataclass
class Case:
    """One model to rewrite and the inputs for the checks."""

    name: str
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    nodes: int


def node_count(model: nn.Module) -> int:
    """Nodes of the traced graph (placeholders and output included)."""
    return len(rewriter.trace(model).graph.nodes)


@dataclass(frozen=True)
class Timing:
    """Median CPU and wall-clock milliseconds of repeated calls."""

    cpu_ms: float
    wall_ms: float


def time_rewrite(case: Case, checks: rewriter.Checks, repeats: int) -> Timing:
    """Median CPU and wall ms of ``rewrite(model, PASSES, inputs, checks=checks)``."""
    cpu, wall = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        rewriter.rewrite(case.model, PASSES, case.inputs, checks=checks)
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    return Timing(statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3)


def component_times(case: Case, repeats: int) -> Timer:
    """Median exclusive milliseconds per step of a no-checks rewrite, plus total and other."""
    runs: list[Timer] = []
    for _ in range(repeats):
        acc: Timer = {}
        start = time.process_time()
        with instrumented(acc):
            rewriter.rewrite(case.model, PASSES, case.inputs, checks=NO_CHECKS)
        acc["total"] = time.process_time() - start
        acc["other (pass manager, report, Python)"] = acc["total"] - sum(
            v for k, v in acc.items() if k != "total"
        )
        runs.append(acc)
    labels = [label for label, _, _ in _components()]
    labels += ["other (pass manager, report, Python)", "total"]
    return {k: 1e3 * statistics.median(r.get(k, 0.0) for r in runs) for k in labels}


def growth_per_4x(t_small: float, t_big: float, n_small: int, n_big: int) -> float:
    """``t_big / t_small`` rescaled to exactly 4x nodes (time ~ nodes^k => 4^k)."""
    if t_small <= 0 or t_big <= 0 or n_big <= n_small:
        return float("nan")
    exponent = math.log(t_big / t_small) / math.log(n_big / n_small)
    return 4.0**exponent


def random_case(target_nodes: int, nodes_per_op: float, seed: int) -> Case:
    """A ``random_model`` sized so its traced graph has about ``target_nodes`` nodes."""
    num_ops = max(1, round(target_nodes / nodes_per_op))
    rm = random_model(seed, num_ops=num_ops, allow_two_outputs=False)
    return Case(
        f"random(seed={seed}, num_ops={num_ops})", rm.model, rm.example_inputs, node_count(rm.model)
    )


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a left-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def bench_zoo(repeats: int) -> None:
    """Time every zoo model at its default options and example input (batch 2)."""
    print(f"\n== zoo models (median of {repeats}) ==")
    rows = []
    for name in zoo.names():
        model = zoo.create(name)
        case = Case(name, model, zoo.example_inputs(name), node_count(model))
        no_checks = time_rewrite(case, NO_CHECKS, repeats)
        checked = time_rewrite(case, DEFAULT_CHECKS, repeats)
        rows.append(
            (
                name,
                str(case.nodes),
                f"{no_checks.cpu_ms:.1f}",
                f"{no_checks.wall_ms:.1f}",
                f"{checked.cpu_ms:.1f}",
                f"{checked.wall_ms:.1f}",
            )
        )
    print_table(
        ("model", "nodes", "no checks: cpu ms", "wall ms", "default checks: cpu ms", "wall ms"),
        rows,
    )


def bench_random(
    targets: Sequence[int], repeats: Sequence[int], seed: int
) -> tuple[list[Case], list[float]]:
    """Time random graphs of about ``targets`` nodes; return the cases and no-checks times."""
    print("\n== random graphs (rewriter.testing.strategies.random_model) ==")
    calib = random_model(seed, num_ops=200, allow_two_outputs=False)
    nodes_per_op = node_count(calib.model) / 200
    cases, no_check_times, rows = [], [], []
    for target, reps in zip(targets, repeats, strict=True):
        start = time.perf_counter()
        case = random_case(target, nodes_per_op, seed)
        built = time.perf_counter() - start
        no_checks = time_rewrite(case, NO_CHECKS, reps)
        checked = time_rewrite(case, DEFAULT_CHECKS, max(1, reps - 1))
        cases.append(case)
        no_check_times.append(no_checks.cpu_ms)
        rows.append(
            (
                str(target),
                str(case.nodes),
                case.name,
                str(reps),
                f"{no_checks.cpu_ms:.0f}",
                f"{no_checks.wall_ms:.0f}",
                f"{no_checks.cpu_ms / case.nodes * 1e3:.0f}",
                f"{checked.cpu_ms:.0f}",
                f"{checked.wall_ms:.0f}",
                f"{built:.1f}",
            )
        )
        print(f"  built and timed ~{target} nodes ({case.nodes}) ...", flush=True)
    print_table(
        (
            "target",
            "nodes",
            "model",
            "reps",
            "no checks: cpu ms",
            "wall ms",
            "cpu us/node",
            "default checks: cpu ms",
            "wall ms",
            "build s",
        ),
        rows,
    )
    return cases, no_check_times


def verdict(cases: Sequence[Case], times: Sequence[float]) -> bool:
    """Print the growth ratios and the verdict line; return True when near-linear."""
    print("\n== growth of the no-checks CPU time per 4x nodes ==")
    ratios = []
    pairs = list(zip(cases, times, strict=True))
    for (a, ta), (b, tb) in zip(pairs, pairs[1:], strict=False):
        raw = tb / ta
        norm = growth_per_4x(ta, tb, a.nodes, b.nodes)
        ratios.append(norm)
        print(
            f"time({b.nodes}) / time({a.nodes}) = {raw:.2f}  "
            f"(nodes x{b.nodes / a.nodes:.2f}; normalised to 4x nodes: {norm:.2f})"
        )
    linear = all(r < LINEAR_LIMIT for r in ratios)
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    if linear:
        print(f"VERDICT: near-linear (growth per 4x nodes {shown}; all < {LINEAR_LIMIT:g})")
    else:
        print("!" * 78)
        print(f"VERDICT: SUPERLINEAR (growth per 4x nodes {shown}; limit {LINEAR_LIMIT:g})")
        print("!" * 78)
    return linear


def component_breakdown(cases: Sequence[Case], repeats: Sequence[int]) -> list[str]:
    """Time each step of a no-checks rewrite per size; print them with their growth.

    Returns the labels of the steps that grow superlinearly at the largest size.
    """
    print("\n== where the no-checks time goes (exclusive CPU ms per step, median) ==")
    parts = [component_times(c, r) for c, r in zip(cases, repeats, strict=True)]
    header = ["step", *(f"{c.nodes} nodes" for c in cases)]
    header += [f"x per 4x {a.nodes}->{b.nodes}" for a, b in zip(cases, cases[1:], strict=False)]
    rows, flagged, messages = [], [], []
    for label in parts[0]:
        values = [p[label] for p in parts]
        growth = [
            growth_per_4x(values[i], values[i + 1], cases[i].nodes, cases[i + 1].nodes)
            for i in range(len(cases) - 1)
        ]
        rows.append((label, *(f"{v:.0f}" for v in values), *(f"{g:.1f}" for g in growth)))
        # A step is flagged when it matters (>= 2% of the total at the largest size) and keeps
        # growing superlinearly at both steps (one noisy ratio on a shared CPU is not enough).
        share = values[-1] / parts[-1]["total"]
        if label != "total" and share >= 0.02 and all(g >= LINEAR_LIMIT for g in growth):
            flagged.append(label)
            messages.append(
                f"SUPERLINEAR STEP: {label} grows x{', x'.join(f'{g:.1f}' for g in growth)} "
                f"per 4x nodes; {values[-1]:.0f} ms = {share:.0%} of the total at "
                f"{cases[-1].nodes} nodes"
            )
    print_table(header, rows)
    if messages:
        print("\n".join(messages))
    else:
        print(f"no step grows faster than x{LINEAR_LIMIT:g} per 4x nodes at both sizes")
    return flagged


def cprofile_top(case: Case, limit: int = 15) -> None:
    """Print the functions with the most own time in one no-checks rewrite (cProfile)."""
    print(
        f"\n== cProfile of one no-checks rewrite, {case.nodes} nodes (top {limit} by own time) =="
    )
    profiler = cProfile.Profile()
    profiler.enable()
    rewriter.rewrite(case.model, PASSES, case.inputs, checks=NO_CHECKS)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="graphs of ~250/1,000/4,000 nodes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random graphs")
    parser.add_argument("--repeats", type=int, default=5, help="repeats for the zoo models")
    parser.add_argument("--cprofile", action="store_true", help="cProfile the largest graph")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}"
    )
    print(f"passes: {PASSES}")
    start = time.perf_counter()
    bench_zoo(args.repeats)
    scale = 0.5 if args.quick else 1.0
    targets = [int(500 * scale), int(2000 * scale), int(8000 * scale)]
    repeats = [5, 3, 2]
    cases, times = bench_random(targets, repeats, seed=args.seed)
    linear = verdict(cases, times)
    flagged = component_breakdown(cases, repeats)
    if args.cprofile or flagged or not linear:
        cprofile_top(cases[-1])
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
