"""Lottery-ticket costs: scoring a zoo ResNet with each criterion, and masked vs dense training.

Run from the repository root::

    python -m bench.lottery                         # resnet20, batch 32
    python -m bench.lottery --model resnet8 --steps 5 --no-compile   # a quicker look

Part 1 times one call of each scoring function of :mod:`rewriter.passes.lottery` on the
masked model (``rewriter.rewrite(model, ["masks"])``): magnitude, random, SNIP and GraSP
(``--batches`` batches of ``--batch`` random images), one SynFlow scoring, and the whole
iterative SynFlow (100 scorings and mask updates, to 10% density); plus :func:`prune`
alone (global exact top-k over all weights). Median of ``--reps`` calls (SynFlow-100:
one call).

Part 2 times a training step (forward + cross-entropy + backward + SGD with momentum) of
the dense model and of the masked model at 10% density (SynFlow masks), eager and under
``torch.compile(fullgraph=True)``, interleaved round by round as in ``bench.train_step``
(whose helpers it reuses). Between two timing blocks the masks are changed in place
(one IMP pruning step, then a rewind); the compiled-graph count shows that this does not
recompile. One intra-op thread by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import rewriter
import rewriter.passes.lottery as lt
from bench.train_step import (
    Variant,
    compiled_graphs,
    make_step,
    print_table,
    ratio_rows,
    timed_rounds,
)
from rewriter import zoo
from rewriter.passes.masks import get_masks


def median_ms(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="zoo model name")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2, help="batches scored by SNIP/GraSP")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=5, help="calls per scoring function")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=11, help="timed rounds per block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, model {args.model}, batch {args.batch}"
    )
    torch.manual_seed(0)
    dense = zoo.create(args.model)
    shape = zoo.input_shape(args.model)
    masked = rewriter.rewrite(dense, ["masks"], zoo.example_inputs(args.model))
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(args.batch, *shape, generator=gen),
            torch.randint(0, 10, (args.batch,), generator=gen),
        )
        for _ in range(args.batches)
    ]
    n_weights = sum(m.numel() for m in get_masks(masked).values())
    print(f"masked layers {len(get_masks(masked))}, prunable weights {n_weights:,}")

    print(f"\n== scoring time ({args.model}, median of {args.reps}; SynFlow-100: one call) ==")
    work = copy.deepcopy(masked)
    scores = lt.magnitude_scores(work)
    jobs: list[tuple[str, Callable[[], object], int]] = [
        ("magnitude", lambda: lt.magnitude_scores(work), args.reps),
        ("random", lambda: lt.random_scores(work), args.reps),
        (
            f"snip ({args.batches} x {args.batch} images)",
            lambda: lt.snip_scores(work, data),
            args.reps,
        ),
        (
            f"grasp ({args.batches} x {args.batch} images)",
            lambda: lt.grasp_scores(work, data),
            args.reps,
        ),
        ("synflow, one scoring", lambda: lt.synflow_scores(work), args.reps),
        (
            "prune: exact global top-k",
            lambda: lt.prune(copy.deepcopy(masked), scores, args.density),
            args.reps,
        ),
        (
            f"synflow, 100 iterations to {args.density:.0%}",
            lambda: lt.synflow(copy.deepcopy(masked), args.density),
            1,
        ),
    ]
    rows = [["criterion", "ms"]]
    for label, fn, reps in jobs:
        rows.append([label, f"{median_ms(fn, reps):.1f}"])
    print_table(rows)

    print(f"\n== training step: dense vs masked at {args.density:.0%} density (SynFlow masks) ==")
    lt.synflow(masked, args.density)
    plain = copy.deepcopy(dense)
    x = torch.randn(args.batch, *shape, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    models = {"dense": plain, "masked": masked}
    variants = [Variant(n, "eager", m, make_step(m, x, y)) for n, m in models.items()]
    graphs_before = compiled_graphs()
    if not args.no_compile:
        seconds = {}
        for name, model in models.items():
            v = Variant(
                name, "compiled", model, make_step(torch.compile(model, fullgraph=True), x, y)
            )
            start = time.perf_counter()
            v.step()
            seconds[name] = time.perf_counter() - start
            variants.append(v)
        print(
            "first compiled step (compile time) s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        )

    rewind_state = lt.save_state(masked)
    blocks = [
        ("SynFlow masks", None),
        ("after one IMP step (20% of the rest pruned)", lambda: lt.imp_prune(masked, 0.2)),
        ("after rewinding the weights", lambda: lt.rewind(masked, rewind_state)),
    ]
    for label, update in blocks:
        if update is not None:
            update()
        density = lt.current_density(masked)
        timed_rounds(variants, args.warmup, args.steps)
        print(f"\n-- {label}: density {density:.2%} --")
        print_table(ratio_rows(variants, models, "dense", compiled=not args.no_compile))
        if not args.no_compile:
            graphs = compiled_graphs() - graphs_before
            print(f"graphs compiled for the timed variants so far: {graphs} (one per variant: 2)")
    print(f"\ntotal benchmark time {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
