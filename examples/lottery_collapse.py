"""Layer collapse on digits: one-shot magnitude, SNIP and GraSP vs iterative SynFlow.

Synaptic-Flow's observation (``docs/methods/lottery.md``): pruning at initialisation with a
one-shot score removes whole layers (*layer collapse*) at compressions where iterative
SynFlow (100 rounds, data-free) still keeps every layer connected. This example prunes
the same freshly initialised network at log-spaced compressions from 10x to 1000x
(compression = prunable weights / kept weights, global masks) with each criterion and
prints, per compression, the fraction of weights left in the emptiest layer, then the
smallest compression at which each method empties a whole layer.

Models (``--model``): ``cnn`` (default), a plain VGG-style CNN (4 conv-BN-ReLU, one max
pool, global average pool, linear); ``mlp``, the zoo MLP with four hidden layers of 256.
No residual connections: a residual branch can be emptied without disconnecting the
network, so it would not show collapse. SNIP and GraSP score 4 batches of 64 training
images; magnitude, SNIP and GraSP score once (their scores do not depend on the
compression), SynFlow runs its 100 iterations for every compression.

Run: python examples/lottery_collapse.py [--model cnn|mlp] [--points 21] [--seed 0]
"""

from __future__ import annotations

import copy
import math
import time

import torch
from plain_cnn import plain_cnn  # examples/plain_cnn.py
from summary import Summary, parser

import rewriter as rw
import rewriter.passes.lottery as lt
from rewriter import zoo
from rewriter.datasets import digits
from rewriter.passes.masks import get_masks

METHODS = ("magnitude", "snip", "grasp", "synflow")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
    ap.add_argument("--points", type=int, default=21, help="compressions from 10x to 1000x")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    summary = Summary("lottery_collapse", ap, args)
    torch.set_num_threads(1)
    start = time.perf_counter()

    x_train, y_train, _, _ = digits(seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x_train), generator=gen)[:256]
    batches = [(x_train[i], y_train[i]) for i in order.split(64)]
    torch.manual_seed(args.seed)
    model = (
        plain_cnn((16, 32, 64, 64)) if args.model == "cnn" else zoo.create("mlp", hidden=(256,) * 4)
    )
    base = rw.rewrite(model, ["masks"], (x_train[:2],))
    sizes = {name: mask.numel() for name, mask in get_masks(base).items()}
    total = sum(sizes.values())
    summary.print(f"model {args.model}: {total:,} prunable weights in {len(sizes)} layers")
    summary.print("  " + ", ".join(f"{name} {n:,}" for name, n in sizes.items()))

    one_shot = {
        "magnitude": lt.magnitude_scores(base),
        "snip": lt.snip_scores(base, batches),
        "grasp": lt.grasp_scores(base, batches),
    }
    compressions = [10 ** (1 + 2 * i / (args.points - 1)) for i in range(args.points)]
    collapse: dict[str, tuple[float, list[str]] | None] = dict.fromkeys(METHODS)
    summary.print("\nweights left in the emptiest layer, % ('N empty': N whole layers emptied)")
    header = f"{'compression':>11}  " + "  ".join(f"{m:>9}" for m in METHODS)
    summary.print(header)
    summary.print("-" * len(header))
    for c in compressions:
        cells = []
        for method in METHODS:
            gm = copy.deepcopy(base)
            if method == "synflow":
                lt.synflow(gm, 1 / c)
            else:
                lt.prune(gm, one_shot[method], 1 / c)
            left = {name: float(mask.sum()) / mask.numel() for name, mask in get_masks(gm).items()}
            empty = [name for name, fraction in left.items() if fraction == 0]
            if empty and collapse[method] is None:
                collapse[method] = (c, empty)
            cells.append(f"{len(empty)} empty" if empty else f"{100 * min(left.values()):.3f}")
        summary.print(f"{c:>10.1f}x  " + "  ".join(f"{cell:>9}" for cell in cells))

    summary.print("\nsmallest compression at which a whole layer is emptied")
    summary.print(f"{'method':<10}  {'compression':>11}  layers emptied there")
    for method in METHODS:
        found = collapse[method]
        if found is None:
            summary.print(
                f"{method:<10}  {'none':>11}  (no layer emptied up to {compressions[-1]:.0f}x)"
            )
        else:
            first = (
                " (the first point: collapse at or below it)" if found[0] == compressions[0] else ""
            )
            summary.print(f"{method:<10}  {found[0]:>10.1f}x  {', '.join(found[1])}{first}")
    summary.save()
    print(f"\n({math.ceil(time.perf_counter() - start)} s)")


if __name__ == "__main__":
    main()
