"""Cost of the channel analysis and of slimming, and what slimming buys at inference.

Run from the repository root::

    python -m bench.analysis_cost            # zoo + random graphs of ~500 / 2,000 / 8,000 nodes
    python -m bench.analysis_cost --quick    # smaller graphs (~250 / 1,000 / 4,000 nodes)

1. ``channel_groups(gm, example_inputs)`` on every zoo model and on
   ``random_model(seed, num_ops=N)`` graphs: the whole call (shape propagation, i.e. one
   forward, plus the analysis) and the analysis alone (``channel_groups(gm, None)`` on a
   graph whose shapes are recorded), median CPU milliseconds, each run after a full
   ``gc.collect()`` (so that a collection of earlier garbage is not charged to it). For
   the random graphs the growth per 4x nodes decides the verdict
   (``bench.rewrite_cost.LINEAR_LIMIT``), and the cost of ``slim`` (half of every
   prunable group removed) is shown next to it.
2. Slimming payoff: eval-mode inference of ResNet-20 at batch 64 on one thread, the dense
   model with half of every prunable group's channels zeroed by ``mask_channels`` against
   its slim version, timed alternately in one run (median of the repeats), with the
   parameter ratio and the MAC ratio (``rewriter.analysis.flops``) next to the speed-up.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx, nn

import rewriter
from bench.rewrite_cost import (
    LINEAR_LIMIT,
    Case,
    growth_per_4x,
    node_count,
    print_table,
    random_case,
)
from rewriter import zoo
from rewriter.analysis.channels import ChannelAnalysis, channel_groups
from rewriter.slim import group_masks, mask_channels, slim
from rewriter.testing.strategies import random_model


def cpu_ms(func: Callable[[], object], repeats: int) -> float:
    """Median process CPU milliseconds of ``func()``, each run after a full ``gc.collect()``."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.process_time()
        func()
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def half_drops(a: ChannelAnalysis) -> dict[int, list[int]]:
    """The second half of every prunable group's channels."""
    return {g.id: list(range(g.size // 2, g.size)) for g in a.prunable()}


def time_analysis(case: Case, repeats: int) -> tuple[float, float, ChannelAnalysis]:
    """(whole call ms, analysis-only ms, the analysis) for one traced model."""
    gm = rewriter.trace(case.model)
    analysis = channel_groups(gm, case.inputs)  # warm-up; records shapes
    whole = cpu_ms(lambda: channel_groups(gm, case.inputs), repeats)
    alone = cpu_ms(lambda: channel_groups(gm, None), repeats)
    return whole, alone, analysis


def bench_zoo(repeats: int) -> None:
    print(f"\n== channel_groups on zoo models (median CPU ms of {repeats}) ==")
    rows = []
    for name in zoo.names():
        case = Case(name, zoo.create(name), zoo.example_inputs(name), 0)
        case.nodes = node_count(case.model)
        whole, alone, a = time_analysis(case, repeats)
        rows.append(
            (
                name,
                str(case.nodes),
                str(len(a.groups)),
                str(len(a.prunable())),
                f"{whole:.1f}",
                f"{alone:.1f}",
            )
        )
    print_table(
        ("model", "nodes", "groups", "prunable", "channel_groups ms", "analysis only ms"), rows
    )


def bench_random(targets: Sequence[int], repeats: Sequence[int], seed: int) -> bool:
    """Time random graphs; print the table and the growth verdict; True when near-linear."""
    print("\n== channel_groups on random graphs (rewriter.testing.strategies.random_model) ==")
    calib = random_model(seed, num_ops=200, allow_two_outputs=False)
    nodes_per_op = node_count(calib.model) / 200
    cases, whole_times, alone_times, rows = [], [], [], []
    for target, reps in zip(targets, repeats, strict=True):
        case = random_case(target, nodes_per_op, seed)
        whole, alone, a = time_analysis(case, reps)
        gm = rewriter.trace(case.model)
        masks = group_masks(a, half_drops(a))
        slim_ms = cpu_ms(lambda gm=gm, case=case, masks=masks: slim(gm, case.inputs, masks), 1)
        cases.append(case)
        whole_times.append(whole)
        alone_times.append(alone)
        rows.append(
            (
                str(target),
                str(case.nodes),
                case.name,
                str(len(a.groups)),
                str(reps),
                f"{whole:.0f}",
                f"{alone:.0f}",
                f"{alone / case.nodes * 1e3:.0f}",
                f"{slim_ms:.0f}",
            )
        )
        print(f"  timed ~{target} nodes ({case.nodes}) ...", flush=True)
    print_table(
        (
            "target",
            "nodes",
            "model",
            "groups",
            "reps",
            "channel_groups ms",
            "analysis only ms",
            "us/node",
            "slim ms",
        ),
        rows,
    )
    return verdict(cases, {"analysis only": alone_times, "channel_groups": whole_times})


def verdict(cases: Sequence[Case], series: dict[str, Sequence[float]]) -> bool:
    print("\n== growth of the CPU time per 4x nodes ==")
    linear = True
    for label, times in series.items():
        ratios = [
            growth_per_4x(times[i], times[i + 1], cases[i].nodes, cases[i + 1].nodes)
            for i in range(len(cases) - 1)
        ]
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        ok = all(r < LINEAR_LIMIT for r in ratios)
        linear &= ok
        state = "near-linear" if ok else "SUPERLINEAR"
        print(f"{label}: {shown} -> {state} (limit {LINEAR_LIMIT:g})")
    print("VERDICT: near-linear" if linear else "VERDICT: SUPERLINEAR")
    return linear


def infer_ms(model: nn.Module, x: Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    return (time.perf_counter() - start) * 1e3


def bench_payoff(repeats: int, batch: int = 64) -> None:
    """Masked dense ResNet-20 vs its 50%-channel slim version, timed alternately."""
    print(f"\n== slimming payoff: resnet20, eval, batch {batch}, 1 thread, median of {repeats} ==")
    torch.manual_seed(0)
    inputs = zoo.example_inputs("resnet20")
    gm = rewriter.trace(zoo.create("resnet20")).eval()
    a = channel_groups(gm, inputs)
    masked = mask_channels(copy.deepcopy(gm), a, half_drops(a))
    small = slim(masked, inputs).eval()
    x = torch.randn(batch, *zoo.input_shape("resnet20"))
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-4)
    models: dict[str, fx.GraphModule] = {"masked dense": masked, "slim": small}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):  # warm-up
        for m in models.values():
            infer_ms(m, x)
    order = list(models)
    for i in range(repeats):
        for key in order if i % 2 == 0 else reversed(order):
            times[key].append(infer_ms(models[key], x))
    medians = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    macs = flops_per_sample(models, inputs)
    rows = []
    for key in models:
        rows.append(
            (
                key,
                f"{medians[key]:.1f}",
                f"{min(times[key]):.1f}",
                f"{params[key]:,}",
                f"{macs[key] / 1e6:.2f}" if macs else "n/a",
            )
        )
    print_table(("model", "median ms", "min ms", "parameters", "MMACs / sample"), rows)
    dense, slimmed = "masked dense", "slim"
    line = (
        f"speed-up x{medians[dense] / medians[slimmed]:.2f}; parameters "
        f"{params[slimmed] / params[dense]:.3f} of dense"
    )
    if macs:
        line += f"; MACs {macs[slimmed] / macs[dense]:.3f} of dense"
    print(line)
    print(f"removed {small.meta['rewriter_slim'].removed} group channels; outputs equal (checked)")


def flops_per_sample(models: dict[str, fx.GraphModule], inputs: tuple) -> dict[str, float]:
    """MACs per sample of each model, when ``rewriter.analysis.flops`` is available."""
    try:
        from rewriter.analysis.flops import flops
    except ImportError:
        return {}
    return {k: flops(m, inputs).total_macs / inputs[0].shape[0] for k, m in models.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="graphs of ~250/1,000/4,000 nodes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random graphs")
    parser.add_argument("--repeats", type=int, default=5, help="repeats for the zoo models")
    parser.add_argument("--infer-repeats", type=int, default=30, help="inference repeats")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}"
    )
    start = time.perf_counter()
    bench_zoo(args.repeats)
    scale = 0.5 if args.quick else 1.0
    targets = [int(500 * scale), int(2000 * scale), int(8000 * scale)]
    bench_random(targets, [5, 5, 3], args.seed)
    bench_payoff(args.infer_repeats)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
