"""Knowledge Evolution on scikit-learn's digits: the slim fit network catches up with the dense one.

The KE paper (``docs/methods/ke.md``) trains one network for several generations on a
small dataset. Between generations the reset hypothesis is re-drawn and the fit
hypothesis kept; with KELS the fit hypothesis is a physically smaller "slim" network.
Its central observation: at generation 1 the slim network is near chance, and over the
generations it climbs to the dense network's accuracy, while the dense network does
not get worse.

This example reproduces it at small scale: 10 training images per digit, the zoo's
residual ``digits_cnn`` (conv-BN-ReLU stem, one residual block, BN everywhere), the
``split`` pass with KELS at rate 0.5, 10 generations of SGD with momentum, label
smoothing 0.1, batch 32 and a cosine schedule restarted each generation (a fresh
optimizer per generation, as in the paper). Each generation records the test accuracy
of the dense network, of the slim fit network (the fit hypothesis evaluated in place,
which equals the extracted slim network's outputs) and of the reset hypothesis alone.
At the end, the slim network is extracted for real with ``extract_fit`` and its
accuracy, parameters and MACs are compared with the dense network's.

It prints a table per generation with the mean and standard deviation over seeds and
saves a plot of dense and slim accuracy per generation.

Run: python examples/ke_digits.py [--seeds 3] [--generations 10] [--epochs 30]
         [--per-class 10] [--plot out/ke_digits.png]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from summary import Summary, parser, progress
from torch import Tensor, fx

from rewriter import zoo
from rewriter.analysis.flops import flops
from rewriter.datasets import digits
from rewriter.passes.split import Generation, evolve, extract_fit

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def make_train_fn(data: Data, epochs: int, lr: float, seed: int):
    """A training function for ``evolve``: a fresh optimizer and schedule per generation."""
    x_tr, y_tr, _, _ = data

    def train(gm: fx.GraphModule, generation: int) -> None:
        opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        batches = epochs * -(-len(x_tr) // 32)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, batches)
        order = torch.Generator().manual_seed(1000 * seed + generation)
        gm.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x_tr), generator=order).split(32):
                opt.zero_grad()
                loss = F.cross_entropy(gm(x_tr[idx]), y_tr[idx], label_smoothing=0.1)
                loss.backward()
                opt.step()
                sched.step()

    return train


def accuracy(gm: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    gm.eval()
    with torch.no_grad():
        return (gm(x).argmax(1) == y).float().mean().item() * 100


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} +- {spread:5.2f}"


def plot(curves: dict[str, list[list[float]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, runs in curves.items():
        gens = list(range(1, len(runs[0]) + 1))
        means = [statistics.mean(col) for col in zip(*runs, strict=True)]
        stds = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*runs, strict=True)]
        ax.plot(gens, means, marker="o", label=label)
        ax.fill_between(gens, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], alpha=0.2)  # fmt: skip
    ax.set_xlabel("generation")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30, help="epochs per generation")
    ap.add_argument("--per-class", type=int, default=10, help="training images per digit")
    ap.add_argument("--width", type=int, default=16, help="channels of digits_cnn")
    ap.add_argument("--rate", type=float, default=0.5, help="KELS split rate")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--plot", default="out/ke_digits.png", help="where to save the plot")
    args = ap.parse_args()
    summary = Summary("ke_digits", ap, args)
    torch.set_num_threads(1)  # tiny convs: one thread is fastest and deterministic

    hypotheses = ("dense", "fit", "reset")
    runs: dict[str, list[list[float]]] = {h: [] for h in hypotheses}
    extracted: list[float] = []
    sizes: dict[str, tuple[int, int]] = {}
    start, total = time.perf_counter(), args.seeds * args.generations
    bar = progress(range(total), "generations")  # a tqdm, advanced in tick()
    for seed in range(args.seeds):
        data = digits(train_per_class=args.per_class, seed=seed)
        x_tr, _, x_te, y_te = data
        torch.manual_seed(seed)
        model = zoo.create("digits_cnn", width=args.width)

        def tick(g: Generation, seed: int = seed) -> None:
            bar.set_postfix_str(f"seed {seed}: dense {g.dense:5.1f}  slim {g.fit:5.1f}")  # type: ignore[attr-defined]
            bar.update(1)  # type: ignore[attr-defined]

        result = evolve(
            model,
            make_train_fn(data, args.epochs, args.lr, seed),
            args.generations,
            eval_fn=lambda gm, x=x_te, y=y_te: accuracy(gm, x, y),
            hypotheses=hypotheses,
            split={"mode": "kels", "rate": args.rate},
            example_inputs=(x_tr[:2],),
            generator=torch.Generator().manual_seed(seed),
            callback=tick,
        )
        for h in hypotheses:
            runs[h].append([g.scores[h] for g in result.generations])
        slim_net = extract_fit(result.gm, (x_tr[:2],))
        extracted.append(accuracy(slim_net, x_te, y_te))
        for label, net in (("dense", result.gm), ("slim", slim_net)):
            cost = flops(net, (x_te[:1],))
            sizes[label] = (cost.total_params, cost.total_macs)

    bar.close()  # type: ignore[attr-defined]
    n_train = 10 * args.per_class
    summary.print(
        f"Knowledge Evolution on digits: {n_train} training images ({args.per_class} per class), "
        f"{len(y_te)} test images, digits_cnn width {args.width}, KELS rate {args.rate}, "
        f"{args.epochs} epochs per generation, {args.seeds} seeds"
    )
    summary.print("test accuracy (%), mean +- std over seeds")
    summary.print(f"{'generation':>10}  {'dense':>15}  {'slim (fit)':>15}  {'reset alone':>15}")
    for i in range(args.generations):
        cells = [mean_std([run[i] for run in runs[h]]) for h in hypotheses]
        summary.print(f"{i + 1:>10}  " + "  ".join(f"{c:>15}" for c in cells))
    dense_last = [run[-1] for run in runs["dense"]]
    fit_last = [run[-1] for run in runs["fit"]]
    gaps = [d - f for d, f in zip(dense_last, fit_last, strict=True)]
    summary.print(f"dense - slim at the last generation: {mean_std(gaps)} points")
    summary.print(
        f"dense, last - first generation: {mean_std([r[-1] - r[0] for r in runs['dense']])} points"
    )
    summary.print(f"extracted slim network (extract_fit), last generation: {mean_std(extracted)}")
    (p_dense, m_dense), (p_slim, m_slim) = sizes["dense"], sizes["slim"]
    summary.print(
        f"slim vs dense: {p_slim:,} vs {p_dense:,} parameters, {m_slim:,} vs {m_dense:,} MACs "
        f"per image ({100 * (1 - m_slim / m_dense):.0f}% fewer operations)"
    )
    summary.save()
    curves = {"dense": runs["dense"], "slim (fit hypothesis)": runs["fit"]}
    plot(curves, args.plot, f"KE on digits, {args.per_class} images/class, KELS {args.rate}")
    print(f"plot saved to {args.plot}; total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
