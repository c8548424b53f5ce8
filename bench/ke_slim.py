"""Knowledge Evolution's slim fit network vs the dense one, for each zoo ResNet.

Run from the repository root::

    python -m bench.ke_slim            # KELS rate 0.5, eval batch 64, one thread

For every ResNet of the zoo: ``rewrite(model, [("split", {"mode": "kels", "rate": 0.5})])``,
``extract_fit`` (the physically smaller network, no fine-tuning), then side by side in one
run: parameters and multiply-accumulates (``rewriter.analysis.flops.flops``) of the dense and
the slim network, and eval-mode inference time (median of interleaved repeats, batch 64).
The authors report a 73% cut in operations for ResNet-18 on Aircraft.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.flops import flops
from rewriter.manager import evaluate
from rewriter.passes.split import extract_fit

RESNETS = ("resnet20", "resnet8", "bottleneck_resnet", "multitask_resnet", "digits_cnn")


def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    evaluate(model, (x,))
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torch threads 1, KELS rate {args.rate}, batch {args.batch}")
    header = (
        "model",
        "params dense",
        "params slim",
        "MACs dense",
        "MACs slim",
        "MAC cut",
        "ms dense",
        "ms slim",
        "speedup",
    )
    rows = [header]
    for name in RESNETS:
        torch.manual_seed(0)
        inputs = zoo.example_inputs(name)
        dense = rw.rewrite(
            zoo.create(name), [("split", {"mode": "kels", "rate": args.rate})], inputs
        )
        slim = extract_fit(dense, inputs)
        x = zoo.example_inputs(name, batch=args.batch)[0]
        fd, fs = flops(dense, inputs), flops(slim, inputs)
        for m in (dense, slim):  # warm-up
            time_forward(m, x)
        td, ts = [], []
        for _ in range(args.repeats):  # interleaved, so machine load hits both alike
            td.append(time_forward(dense, x))
            ts.append(time_forward(slim, x))
        md, ms = statistics.median(td) * 1e3, statistics.median(ts) * 1e3
        rows.append((
            name, f"{fd.total_params:,}", f"{fs.total_params:,}", f"{fd.total_macs:,}",
            f"{fs.total_macs:,}", f"{1 - fs.total_macs / fd.total_macs:.0%}",
            f"{md:.1f}", f"{ms:.1f}", f"{md / ms:.2f}x",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("MACs are for the 2-image example input; times are eval forward passes of the batch.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
