"""The channel analysis against its previous, channel-by-channel implementation.

Run from the repository root, in a git checkout (one torch thread)::

    python -m bench.previous_analysis            # zoo, ResNet-50, random 8,000 nodes, 32-layer LLM
    python -m bench.previous_analysis --quick    # without the LLM and the random graph

The previous implementation (one atom per channel in a ``networkx`` union-find, groups
built atom by atom) is read from the git history (``git show a586f0a:...``, the last commit
before interval granularity) and run with today's rule tables, so that both analyse the same
graphs with the same rules. For each model: both analyses on recorded shapes
(``channel_groups(gm, None)``), timed in turn (median process CPU ms, after ``gc.collect()``),
and whether they give the same groups, layers and slices.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence

import torch

import rewriter
import rewriter.analysis.coupling as coupling
from bench.llama import llama_on_meta
from bench.peer_analysis import ResNet50
from bench.rewrite_cost import print_table, random_case
from rewriter import zoo
from rewriter.analysis.channels import channel_groups
from rewriter.testing.strategies import random_model

PREVIOUS = "a586f0a"


def load_previous() -> types.ModuleType:
    """The previous ``channels`` module (and its ``coupling``), from the git history."""

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{PREVIOUS}:{path}"], check=True, capture_output=True, text=True
        ).stdout

    modules = {}
    for name, path in (("coupling", "rewriter/analysis/coupling.py"),
                       ("channels", "rewriter/analysis/channels.py")):  # fmt: skip
        text = source(path).replace("from .coupling import", "from .previous_coupling import")
        mod = types.ModuleType(f"rewriter.analysis.previous_{name}")
        mod.__package__ = "rewriter.analysis"
        sys.modules[mod.__name__] = mod
        exec(compile(text, f"{PREVIOUS}:{path}", "exec"), mod.__dict__)
        modules[name] = mod
    old = modules["coupling"]
    for cls in ("Tracked", "Pieces", "Count", "Sizes", "SliceRecord", "LayerRecord"):
        setattr(old, cls, getattr(coupling, cls))  # the rules build today's values
    old.Coupler.repeat_each = lambda self, atoms, k: tuple(a for a in atoms for _ in range(k))
    return modules["channels"]


def cpu_ms(func: Callable[[], object]) -> float:
    gc.collect()
    start = time.process_time()
    func()
    return (time.process_time() - start) * 1e3


def same(a, b) -> bool:  # the classes differ (two modules), so compare their reprs
    return (repr(a.groups), repr(a.layers), repr(a.slices)) == (
        repr(b.groups),
        repr(b.layers),
        repr(b.slices),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    previous = load_previous()
    start = time.perf_counter()
    cases = [("resnet50 (224x224)", ResNet50(), (torch.randn(1, 3, 224, 224),))]
    cases += [(n, zoo.create(n), zoo.example_inputs(n)) for n in zoo.names()]
    if not args.quick:
        nodes_per_op = len(rewriter.trace(random_model(0, num_ops=200).model).graph.nodes) / 200
        rc = random_case(8000, nodes_per_op, 0)
        cases.append((f"random, {rc.nodes} nodes", rc.model, rc.inputs))
        model, ids = llama_on_meta(32)
        cases.append(("llama 32 layers (meta)", model, (ids,)))
    rows = []
    for name, model, inputs in cases:
        gm = rewriter.trace(model.eval())
        new = channel_groups(gm, inputs)
        old = previous.channel_groups(gm, None)
        reps = 3 if "llama" in name or "random" in name else args.repeats
        times: dict[str, list[float]] = {"previous": [], "now": []}
        for i in range(reps):
            order = ("previous", "now") if i % 2 == 0 else ("now", "previous")
            for key in order:
                impl = previous.channel_groups if key == "previous" else channel_groups
                times[key].append(cpu_ms(lambda impl=impl, gm=gm: impl(gm, None)))
        t = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            (
                name,
                str(len(gm.graph.nodes)),
                str(sum(g.size for g in new.groups)),
                f"{t['previous']:.1f}",
                f"{t['now']:.1f}",
                f"{t['previous'] / t['now']:.2f}",
                "yes" if same(new, old) else "NO",
            )
        )
        print(f"  timed {name}", flush=True)
    print("\n== channel_groups(gm, None): previous vs now (median CPU ms) ==")
    print_table(
        ("model", "nodes", "group channels", "previous ms", "now ms", "speed-up", "same result"),
        rows,
    )
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
