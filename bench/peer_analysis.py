"""Channel analysis cost against the peer's dependency graph, at scale and at LLM widths.

Run from the repository root (one torch thread; ``OMP_NUM_THREADS=1`` recommended)::

    python -m bench.peer_analysis             # everything (about 2-3 minutes)
    python -m bench.peer_analysis --quick     # random graphs up to ~8,000 nodes, 8-layer LLM

1. ``channel_groups(gm, example_inputs)`` against Torch-Pruning's
   ``DependencyGraph().build_dependency(model, example_inputs)`` on the same models and
   inputs, timed alternately in one run (median process CPU ms, each after ``gc.collect()``).
   Both run one forward pass on the example inputs (ours interpreted node by node in eval
   mode without grad to record the shapes, ``record_shapes``; the peer's eagerly with
   autograd to read ``grad_fn``), so the shape propagation alone, the analysis on recorded
   shapes (``channel_groups(gm, None)``) and a plain eager no-grad forward are shown. The peer
   (``pip install torch-pruning --no-deps``) is not a dependency of the project: without
   it the peer columns say so. Models: an ImageNet-sized ResNet-50 (bottleneck blocks
   3-4-6-3, 224 x 224, batch 1) and the zoo models.
2. Random graphs (``rewriter.testing.strategies.random_model``) of about 2,000, 8,000
   and 30,000 nodes: the analysis on recorded shapes, and its growth per 4x nodes.
3. A 32-layer Llama-shaped decoder (hidden 4096, 32 heads, 8 kv heads, MLP 14336; see
   :mod:`bench.llama`) built on the meta device: trace, shape propagation (meta tensors)
   and the analysis.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

import rewriter
from bench.llama import llama_on_meta
from bench.rewrite_cost import LINEAR_LIMIT, growth_per_4x, print_table, random_case
from rewriter import zoo
from rewriter.analysis.channels import channel_groups, record_shapes
from rewriter.testing.strategies import random_model
from rewriter.zoo import Bottleneck

try:
    import torch_pruning as tp
except ImportError:  # the peer is optional
    tp = None


class ResNet50(nn.Module):
    """ImageNet ResNet-50 layout (torchvision's, without torchvision): 7x7 stem, max-pool,
    bottleneck stages of 3, 4, 6, 3 blocks (widths 64..512, expansion 4), 1000 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )  # fmt: skip
        stages, cin = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            blocks = []
            for b in range(count):
                blocks.append(Bottleneck(cin, planes, 2 if i > 0 and b == 0 else 1))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def eager_forward(model: nn.Module, inputs: tuple[Tensor, ...]) -> object:
    with torch.no_grad():
        return model(*inputs)


def cpu_ms(func: Callable[[], object]) -> float:
    gc.collect()
    start = time.process_time()
    func()
    return (time.process_time() - start) * 1e3


def alternate(funcs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU ms of each function, the functions timed in turn (order reversed each round)."""
    times: dict[str, list[float]] = {k: [] for k in funcs}
    for f in funcs.values():  # warm-up
        f()
    order = list(funcs)
    for i in range(repeats):
        for key in order if i % 2 == 0 else order[::-1]:
            times[key].append(cpu_ms(funcs[key]))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_peer(repeats: int) -> None:
    peer = "torch-pruning " + tp.__version__ if tp is not None else None
    print(f"\n== channel_groups vs the peer's dependency graph (median CPU ms of {repeats}) ==")
    if peer is None:
        print("peer not installed (pip install torch-pruning --no-deps): its columns are n/a")
    else:
        print(f"peer: {peer}, DependencyGraph().build_dependency(model, example_inputs)")
    cases = [("resnet50 (224x224, batch 1)", ResNet50(), (torch.randn(1, 3, 224, 224),))]
    cases += [(name, zoo.create(name), zoo.example_inputs(name)) for name in zoo.names()]
    rows = []
    for name, model, inputs in cases:
        model.eval()
        gm = rewriter.trace(model)
        funcs: dict[str, Callable[[], object]] = {
            "ours": lambda gm=gm, inputs=inputs: channel_groups(gm, inputs),
            "alone": lambda gm=gm: channel_groups(gm, None),
            "forward": lambda gm=gm, inputs=inputs: record_shapes(gm, inputs),
            "eager": lambda model=model, inputs=inputs: eager_forward(model, inputs),
        }
        if tp is not None and len(inputs) == 1:
            funcs["peer"] = lambda model=model, inputs=inputs: (
                tp.DependencyGraph().build_dependency(model, example_inputs=inputs[0])
            )
        try:
            t = alternate(funcs, repeats)
        except Exception as exc:  # the peer fails on some graphs
            funcs.pop("peer", None)
            t = alternate(funcs, repeats)
            t["peer_error"] = f"{type(exc).__name__}"  # type: ignore[assignment]
        p = t.get("peer")
        rows.append(
            (
                name,
                f"{t['ours']:.1f}",
                f"{t['forward']:.1f}",
                f"{t['alone']:.1f}",
                f"{p:.1f}" if p is not None else str(t.get("peer_error", "n/a")),
                f"{t['ours'] / p:.2f}" if p else "n/a",
                f"{t['eager']:.1f}",
            )
        )
        print(f"  timed {name}", flush=True)
    print_table(
        (
            "model",
            "channel_groups ms",
            "of which record_shapes ms",
            "analysis alone ms",
            "peer build ms",
            "ours / peer",
            "eager forward ms",
        ),
        rows,
    )


def bench_random(targets: Sequence[int], seed: int) -> None:
    print("\n== channel_groups on random graphs, analysis on recorded shapes (median CPU ms) ==")
    calib = random_model(seed, num_ops=200, allow_two_outputs=False)
    nodes_per_op = len(rewriter.trace(calib.model).graph.nodes) / 200
    sizes, times, rows = [], [], []
    for target in targets:
        start = time.perf_counter()
        case = random_case(target, nodes_per_op, seed)
        gm = rewriter.trace(case.model)
        built = time.perf_counter() - start
        a = channel_groups(gm, case.inputs)
        reps = 5 if case.nodes < 10000 else 3
        alone = statistics.median(
            cpu_ms(lambda gm=gm: channel_groups(gm, None)) for _ in range(reps)
        )
        sizes.append(case.nodes)
        times.append(alone)
        channels = sum(g.size for g in a.groups)
        rows.append(
            (
                str(target),
                str(case.nodes),
                case.name,
                str(len(a.groups)),
                str(channels),
                f"{alone:.0f}",
                f"{alone / case.nodes * 1e3:.0f}",
                f"{built:.1f}",
            )
        )
        print(f"  timed ~{target} nodes ({case.nodes})", flush=True)
    print_table(
        (
            "target",
            "nodes",
            "model",
            "groups",
            "group channels",
            "analysis ms",
            "us/node",
            "build s",
        ),
        rows,
    )
    ratios = [
        growth_per_4x(times[i], times[i + 1], sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)
    ]
    ok = all(r < LINEAR_LIMIT for r in ratios)
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"growth per 4x nodes: {shown} -> {'near-linear' if ok else 'SUPERLINEAR'}")


def bench_llama(layers: int) -> None:
    print(f"\n== {layers}-layer Llama-shaped decoder on the meta device (wall s) ==")
    start = time.perf_counter()
    model, ids = llama_on_meta(layers)
    build = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    gm = rewriter.trace(model)
    trace = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    record_shapes(gm, (ids,))
    shapes = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    a = channel_groups(gm, None)
    alone = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    channel_groups(gm, (ids,))
    whole = time.perf_counter() - start
    prunable = a.prunable()
    print(
        f"{params / 1e9:.2f}B parameters, {len(gm.graph.nodes)} nodes; build {build:.2f} s, "
        f"trace {trace:.2f} s"
    )
    print_table(
        ("step", "seconds"),
        [
            ("shape propagation on meta tensors", f"{shapes:.2f}"),
            ("channel analysis on recorded shapes", f"{alone:.2f}"),
            ("channel_groups(gm, ids) (both)", f"{whole:.2f}"),
        ],
    )
    print(
        f"{len(a.groups)} groups, {len(prunable)} prunable: "
        + ", ".join(sorted({f"{g.size} channels x{len(g.members)} members" for g in prunable}))
    )
    blocked = sorted({g.size for g in a.groups if not g.prunable})
    print(f"not prunable group sizes: {blocked}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller graphs and LLM")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=(), choices=("peer", "random", "llama"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    start = time.perf_counter()
    if "peer" not in args.skip:
        bench_peer(args.repeats)
    if "random" not in args.skip:
        bench_random([500, 2000, 8000] if args.quick else [2000, 8000, 30000], args.seed)
    if "llama" not in args.skip:
        bench_llama(8 if args.quick else 32)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
