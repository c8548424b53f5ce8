"""RBN vs BN on scikit-learn's digits: train the zoo's digits CNN from scratch with each.

The RBN paper reports a small accuracy gain from replacing BatchNorm with
Representative BatchNorm (authors' init). This example measures the same
comparison at small scale: identical initial weights and data order per seed,
one network with BatchNorm2d and one rewritten with the ``rbn`` pass
(``init="paper"``), SGD with momentum and a cosine learning-rate schedule
(without the decay, eval-mode accuracy swings by tens of points from epoch to
epoch because the running statistics of so few batches lag the weights). It
prints per-seed test accuracy and mean +- std.

Run: python examples/rbn_digits.py [--seeds 5] [--epochs 20] [--per-class 30]
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from summary import Summary, parser, progress

import rewriter as rw
from rewriter import zoo
from rewriter.datasets import digits


def train_and_test(net, data, epochs: int, seed: int, label: str) -> float:
    x_tr, y_tr, x_te, y_te = data
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(epochs), f"{label} seed {seed} (epochs)"):
        net.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        return (net(x_te).argmax(1) == y_te).float().mean().item() * 100


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=30, help="training images per digit")
    args = ap.parse_args()
    summary = Summary("rbn_digits", ap, args)
    torch.set_num_threads(1)  # tiny convs: one thread is fastest and deterministic
    results: dict[str, list[float]] = {"BN": [], "RBN (paper init)": []}
    print(f"digits, {args.per_class} training images per class, {args.epochs} epochs")
    print(f"{'seed':>4}  {'BN':>7}  {'RBN':>7}")
    for seed in range(args.seeds):
        data = digits(train_per_class=args.per_class, seed=seed)
        torch.manual_seed(seed)
        base = zoo.create("digits_cnn")
        rbn = rw.rewrite(base, [("rbn", {"init": "paper"})], (data[0][:2],))
        accs = [
            train_and_test(base, data, args.epochs, seed, "BN"),
            train_and_test(rbn, data, args.epochs, seed, "RBN"),
        ]
        for key, acc in zip(results, accs, strict=True):
            results[key].append(acc)
        print(f"{seed:>4}  {accs[0]:7.2f}  {accs[1]:7.2f}")
    for key, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary.print(
            f"{key:<17} test accuracy {statistics.mean(accs):6.2f} +- {spread:.2f} (n={len(accs)})"
        )
    summary.save()


if __name__ == "__main__":
    main()
