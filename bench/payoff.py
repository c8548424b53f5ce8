"""What slim and frozen results buy at inference: speed-up against MAC reduction.

Run from the repository root (one torch thread; ``OMP_NUM_THREADS=1`` recommended)::

    python -m bench.payoff                 # zoo ResNets, batch 64, 15 interleaved rounds
    python -m bench.payoff --rounds 7      # quicker

For every zoo ResNet (eval mode, batch 64, no grad), the dense model against:

* ``slim 50%``: half of every prunable group's channels removed (the last half;
  :func:`rewriter.slim` with ``channel_masks`` from :func:`rewriter.slim.group_masks`, reusing
  the analysis);
* ``slim 30%``: about 30% of every group kept, widths that are not multiples of 8
  (ResNet-20: 4 / 9 / 19 of 16 / 32 / 64), and the same with ``round_to=8`` (8 / 16 / 24);
* ``frozen skip`` (ResNet-20 and ResNet-8): ``skip_gates`` then ``skip_freeze`` with every
  second residual block skipped (removed from the graph).

Columns: median ms per batch (variants timed in turn, order rotating every round), MACs per
sample (:func:`rewriter.analysis.flops.flops`), speed-up = dense ms / variant ms, MAC reduction
= dense MACs / variant MACs, and efficiency = speed-up / MAC reduction (goal >= 0.8: the
removed MACs turn into time saved).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import rewriter
from bench.rewrite_cost import print_table
from rewriter import zoo
from rewriter.analysis.channels import ChannelAnalysis, channel_groups
from rewriter.analysis.flops import flops
from rewriter.slim import group_masks, slim

GOAL = 0.8


def keep_first(a: ChannelAnalysis, fraction: float) -> dict[int, list[int]]:
    """Drops that keep ``max(1, int(size * fraction))`` leading channels of every prunable group."""
    return {g.id: list(range(max(1, int(g.size * fraction)), g.size)) for g in a.prunable()}


def frozen_skip(model: nn.Module, inputs: tuple[Tensor, ...]) -> nn.Module:
    from rewriter.passes.skip import skip_policy

    gated = rewriter.rewrite(copy.deepcopy(model), ["skip_gates"], inputs)
    blocks = len(skip_policy(gated).blocks)
    select = [i % 2 == 0 for i in range(blocks)]
    return rewriter.rewrite(gated, [("skip_freeze", {"select": select})], inputs)


def variants_of(name: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = zoo.create(name).eval()
    inputs = zoo.example_inputs(name)
    gm = rewriter.trace(model)
    a = channel_groups(gm, inputs)
    out: dict[str, nn.Module] = {"dense": gm}
    out["slim 50%"] = slim(gm, inputs, group_masks(a, keep_first(a, 0.5)), analysis=a)
    masks = group_masks(a, keep_first(a, 0.3))
    out["slim 30%"] = slim(gm, inputs, masks, analysis=a)
    out["slim 30%, round_to=8"] = slim(gm, inputs, masks, analysis=a, round_to=8)
    if name in ("resnet20", "resnet8"):
        out["frozen skip (every 2nd block)"] = frozen_skip(model, inputs)
    return {k: m.eval() for k, m in out.items()}


def widths(model: nn.Module) -> str:
    outs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    return "/".join(str(w) for w in sorted(set(outs)))


def bench_model(name: str, batch: int, rounds: int) -> list[tuple[str, ...]]:
    models = variants_of(name)
    x = torch.randn(batch, *zoo.input_shape(name))
    macs = {k: flops(m, (x[:1],)).total_macs for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(x)
            m(x)
        for r in range(rounds):
            k = r % len(order)
            for key in [*order[k:], *order[:k]]:
                start = time.perf_counter()
                models[key](x)
                times[key].append((time.perf_counter() - start) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for key in models:
        speed = med["dense"] / med[key]
        reduction = macs["dense"] / macs[key]
        eff = speed / reduction
        verdict = "" if key == "dense" else ("met" if eff >= GOAL else "MISSED")
        rows.append(
            (
                name,
                key,
                widths(models[key]),
                f"{med[key]:.1f}",
                f"{macs[key] / 1e6:.2f}",
                f"{speed:.2f}",
                f"{reduction:.2f}",
                f"{eff:.2f}" if key != "dense" else "",
                verdict,
            )
        )
    print(f"  timed {name}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", nargs="*", default=["resnet20", "resnet8", "bottleneck_resnet"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"batch {args.batch}, {args.rounds} rounds, eval, no grad"
    )
    start = time.perf_counter()
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batch, args.rounds)
    print(f"\n== inference payoff (median ms per batch of {args.batch}) ==")
    print_table(
        (
            "model",
            "variant",
            "conv widths",
            "ms",
            "MMACs/sample",
            "speed-up",
            "MAC reduction",
            "efficiency",
            f"goal >= {GOAL}",
        ),
        rows,
    )
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
