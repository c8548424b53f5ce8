"""Lottery tickets on digits: iterative magnitude pruning with rewinding vs its controls.

The lottery-ticket hypothesis (``docs/methods/lottery.md``): train, prune 20% of the
remaining weights (global magnitude), rewind the survivors to their initial values
(``--rewind-step 0``, the original LTH) and train again, round after round. The sparse
*ticket* keeps the dense accuracy down to small densities, while the same masks with
freshly drawn weights (*random re-init*) and random masks with the same per-layer
densities and the rewound weights (*random mask*) fall behind earlier.

Model: an MLP 64-300-100-10 (the digits analogue of LeNet-300-100), trained with Adam
(lr 1.2e-3, batch 64) for ``--epochs`` epochs, the same data order in every round; the
metric is the test accuracy at the end of training. Every seed draws its own split,
initialisation and data order. The controls are trained every ``--control-every``
rounds (to keep the run short). Prints the accuracy per density (mean +- std over the
seeds) and saves a plot (matplotlib).

Run: python examples/lottery_imp.py [--seeds 3] [--rounds 12] [--epochs 20] [--plot PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from summary import Summary, parser, progress
from torch import Tensor, nn

import rewriter as rw
import rewriter.passes.lottery as lt
from rewriter import zoo
from rewriter.datasets import digits

Data = tuple[Tensor, Tensor, Tensor, Tensor]
VARIANTS = ("ticket", "random re-init", "random mask")


def make_train(data: Data, epochs: int, seed: int, batch: int, lr: float) -> lt.TrainFn:
    """A training function for :func:`lt.imp`: fresh Adam, same data order every round."""
    x_train, y_train, x_test, y_test = data

    def train(model: nn.Module, run: lt.TrainRun) -> float:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        step = 0
        for _ in range(epochs):
            for idx in torch.randperm(len(x_train), generator=gen).split(batch):
                if step >= run.start_step:
                    run.reached(step)
                    optimizer.zero_grad()
                    F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                    optimizer.step()
                step += 1
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item() * 100

    return train


class Progress:
    """One ``tqdm`` bar over every training of the run (examples/summary.py)."""

    def __init__(self, total: int) -> None:
        self.bar = progress(range(total), "trainings")  # a tqdm, advanced by hand below

    def wrap(self, train: lt.TrainFn, label: str) -> lt.TrainFn:
        def wrapped(model: nn.Module, run: lt.TrainRun) -> float:
            result = train(model, run)
            self.bar.set_postfix_str(f"{label}, round {run.round}")  # type: ignore[attr-defined]
            self.bar.update(1)  # type: ignore[attr-defined]
            return result

        return wrapped


def run_seed(
    seed: int, args: argparse.Namespace, progress: Progress
) -> dict[str, dict[int, tuple[float, float]]]:
    """{variant: {round: (density, accuracy)}} for one seed."""
    data = digits(seed=seed)
    torch.manual_seed(seed)
    model = zoo.create("mlp", hidden=(300, 100))
    gm = rw.rewrite(model, ["masks"], (data[0][:2],))
    train = make_train(data, args.epochs, seed, args.batch, args.lr)
    wrap: Callable[[str], lt.TrainFn] = lambda label: progress.wrap(train, label)  # noqa: E731
    result = lt.imp(gm, wrap("ticket"), args.rounds, rewind_step=args.rewind_step)
    out = {"ticket": {r.round: (r.density, r.metric) for r in result.rounds}}
    for variant, kind in (("random re-init", "reinit"), ("random mask", "random_mask")):
        chosen = range(args.control_every, args.rounds + 1, args.control_every)
        rounds = lt.imp_control(gm, wrap(variant), result, kind, rounds=chosen, seed=1000 + seed)  # type: ignore[arg-type]
        out[variant] = {r.round: (r.density, r.metric) for r in rounds}
    return out


def plot(path: str, densities: list[float], table: dict[str, list[list[float]]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, rows in table.items():
        xs = [100 * d for d, row in zip(densities, rows, strict=True) if row]
        means = [statistics.mean(row) for row in rows if row]
        stds = [statistics.stdev(row) if len(row) > 1 else 0.0 for row in rows if row]
        ax.errorbar(xs, means, yerr=stds, marker="o", ms=3, capsize=2, label=variant)
    dense = statistics.mean(table["ticket"][0])
    ax.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense (round 0)")
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1) if t >= 100 * min(densities) * 0.9]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("IMP on digits (MLP 64-300-100-10)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot saved to {path}"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=12, help="pruning rounds (20%% each)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.2e-3, help="Adam learning rate")
    ap.add_argument("--control-every", type=int, default=2, help="train controls every N rounds")
    ap.add_argument("--rewind-step", type=int, default=0, help="k: 0 is the original LTH")
    ap.add_argument("--plot", default="out/lottery_imp.png", help="where to save the plot")
    args = ap.parse_args()
    summary = Summary("lottery_imp", ap, args)
    torch.set_num_threads(1)
    start = time.perf_counter()
    bar = Progress(args.seeds * (1 + args.rounds + 2 * (args.rounds // args.control_every)))
    runs = [run_seed(seed, args, bar) for seed in range(args.seeds)]
    bar.bar.close()  # type: ignore[attr-defined]

    rounds = range(args.rounds + 1)
    densities = [runs[0]["ticket"][r][0] for r in rounds]
    table = {v: [[run[v][r][1] for run in runs if r in run[v]] for r in rounds] for v in VARIANTS}
    summary.print(
        f"IMP on digits, MLP 64-300-100-10, {args.epochs} epochs per round, "
        f"rewind to step {args.rewind_step}, {args.seeds} seeds: test accuracy % (mean +- std)"
    )
    header = f"{'round':>5}  {'weights left':>12}  " + "  ".join(f"{v:>14}" for v in VARIANTS)
    summary.print(header)
    summary.print("-" * len(header))
    for r in rounds:
        cells = []
        for variant in VARIANTS:
            row = table[variant][r]
            if not row:
                cells.append(f"{'(dense)' if r == 0 else '-':>14}")
                continue
            spread = statistics.stdev(row) if len(row) > 1 else 0.0
            cells.append(f"{statistics.mean(row):>7.2f} +- {spread:4.2f}")
        summary.print(f"{r:>5}  {100 * densities[r]:>11.2f}%  " + "  ".join(cells))
    summary.save()
    print(plot(args.plot, densities, table))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
