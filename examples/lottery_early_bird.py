"""Early-Bird tickets on digits: the BN-gamma channel mask settles early in training.

Early-Bird (``docs/methods/lottery.md``): train with an L1 penalty on the BatchNorm
scales (sub-gradient ``1e-4 * sign(gamma)``); at the start of every epoch (as the
authors: the first mask from the initial weights, ``EarlyBird.start``), draw the
channel mask that prunes the fraction ``p`` of all BN channels with the smallest
``|gamma|``; the ticket is drawn when the newest mask is within 0.1 (normalised Hamming
distance) of each of the 4 masks before it. "Fires at e" means after ``e`` training
epochs (the mask at the start of epoch ``e``, 0-based). The ticket is then physically slimmed (``rewriter.slim``) and
retrained.

This example trains a plain CNN (4 conv-BN-ReLU, 32-32-64-64 channels, one max pool,
global average pool, linear) for ``--epochs`` epochs with SGD (lr 0.05, momentum 0.9,
weight decay 5e-4, cosine schedule), notes the epoch at which the detector first fires
and slims the network there (the *early-bird ticket*) and again at the end of training
(the *final ticket*). Both tickets are retrained from their drawn weights with the full
schedule and no L1 (the authors' ``--refine``). Per seed it prints the firing epoch,
the parameters kept and the test accuracies; for the first seed also the distances
the detector saw each epoch.

Run: python examples/lottery_early_bird.py [--seeds 3] [--epochs 30] [--ratio 0.5]
"""

from __future__ import annotations

import argparse  # noqa: F401  (the Namespace annotation)
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from plain_cnn import plain_cnn  # examples/plain_cnn.py
from summary import Summary, parser, progress
from torch import Tensor, nn

import rewriter as rw
import rewriter.passes.lottery as lt
from rewriter.datasets import digits

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def train(
    model: nn.Module,
    data: Data,
    epochs: int,
    seed: int,
    l1: float = 0.0,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    label: str = "training",
) -> float:
    """SGD with a cosine schedule; ``l1`` adds the BN-gamma sub-gradient after backward.

    ``on_epoch(epoch, model)`` is called after every epoch (1-based).
    """
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    gen = torch.Generator().manual_seed(seed)
    for epoch in progress(range(1, epochs + 1), f"{label} (epochs)"):
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            if l1:
                lt.add_bn_l1_subgradient(model, l1)
            optimizer.step()
        schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    return accuracy(model, x_test, y_test)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_seed(seed: int, args: argparse.Namespace, verbose: bool) -> dict[str, float]:
    data = digits(seed=seed)
    example = (data[0][:2],)
    torch.manual_seed(seed)
    gm = rw.trace(plain_cnn((32, 32, 64, 64)))
    detector = lt.EarlyBird(ratio=args.ratio)
    detector.start(gm)  # the mask of the initial weights (the start of epoch 0)
    early: dict[str, object] = {}
    if verbose:
        print(
            f"seed {seed}: distance of each epoch's mask to the 4 before it (max), p={args.ratio}"
        )

    def on_epoch(epoch: int, model: nn.Module) -> None:
        fired = detector.update(model)
        if verbose:
            far = f"{max(detector.distances):.3f}" if detector.distances else "  -  "
            mark = "  <- fires" if fired and "epoch" not in early else ""
            print(f"  after epoch {epoch:>3}  max distance {far}{mark}")
        if fired and "epoch" not in early:
            early["epoch"] = detector.fired_epoch
            early["ticket"] = lt.early_bird_ticket(model, example, detector.ticket_masks)
            model.train()

    dense_acc = train(
        gm, data, args.epochs, seed, l1=args.l1, on_epoch=on_epoch, label=f"seed {seed} L1 search"
    )
    final_ticket = lt.early_bird_ticket(gm, example, lt.bn_channel_masks(gm, args.ratio))
    out = {"epoch": float(early.get("epoch", float("nan"))), "dense": dense_acc}
    out["dense params"] = float(params(gm))
    out["final params"] = float(params(final_ticket))
    out["final"] = train(final_ticket, data, args.epochs, seed + 100, label="final ticket")
    if "ticket" in early:
        ticket: nn.Module = early["ticket"]  # type: ignore[assignment]
        out["early params"] = float(params(ticket))
        out["early"] = train(ticket, data, args.epochs, seed + 100, label="early ticket")
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of BN channels pruned")
    ap.add_argument("--l1", type=float, default=1e-4, help="L1 coefficient on BN gammas")
    args = ap.parse_args()
    summary = Summary("lottery_early_bird", ap, args)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = [run_seed(seed, args, verbose=seed == 0) for seed in range(args.seeds)]

    print()
    summary.print(
        f"Early-Bird on digits, plain CNN, {args.epochs} epochs, p={args.ratio}, L1 {args.l1}"
    )
    header = (
        f"{'seed':>4}  {'fires at':>8}  {'dense acc':>9}  {'early params':>12}  "
        f"{'early acc':>9}  {'final params':>12}  {'final acc':>9}"
    )
    summary.print(header)
    summary.print("-" * len(header))
    for seed, r in enumerate(results):
        fired = f"{int(r['epoch'])}/{args.epochs}" if r["epoch"] == r["epoch"] else "never"
        early_params = f"{int(r['early params']):,}" if "early" in r else "-"
        early_acc = f"{r['early']:.2f}" if "early" in r else "-"
        summary.print(
            f"{seed:>4}  {fired:>8}  {r['dense']:>9.2f}  {early_params:>12}  {early_acc:>9}  "
            f"{int(r['final params']):>12,}  {r['final']:>9.2f}"
        )
    for key, label in (
        ("dense", "dense (L1 search run)"),
        ("early", "early-bird ticket"),
        ("final", "final ticket"),
    ):
        values = [r[key] for r in results if key in r]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.print(
                f"{label:<22} test accuracy {statistics.mean(values):6.2f} +- {spread:.2f} (n={len(values)})"
            )
    summary.print(f"dense parameters {int(results[0]['dense params']):,}")
    summary.save()
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
