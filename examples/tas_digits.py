"""TAS width and depth search on scikit-learn's digits, against a uniformly thinned net and the dense one.

The zoo's ``resnet20`` (width 8, 1x8x8 inputs: a stem conv and three stages of three basic
blocks) is trained normally: this is the dense network and the teacher. Then, as in TAS
(``docs/methods/tas.md``):

1. search: the trained network rewritten with the ``tas`` pass (``flops_ratio`` 0.5) trains
   with two optimizers in alternation, the weights (SGD) on one half of the training set with
   the cross-entropy, the architecture logits (Adam) on the other half with the
   cross-entropy plus the cost loss from ``rewriter.aux_losses``; the Gumbel-softmax
   temperature falls from 10 to 0.1 over the search epochs (cosine, as the authors). The argmax architecture
   jumps from step to step, so after the search the architecture steps continue alone
   (weights fixed, at most ``--settle`` steps) until its MACs are inside the cost loss's zero
   band ``[ratio - 0.05, ratio]`` of the dense MACs (our addition, printed);
2. derive: the argmax widths and depths as a physically slim network (``derive``);
3. retrain: the derived network from scratch with Hinton KD from the dense network
   (alpha 0.9, T 4; ``kd_student``, i.e. the ``distill`` pass).

The control is a *uniformly* thinned network: every prunable channel group of the dense
network keeps the same fraction of its channels (the first ones), the fraction chosen by
bisection so that its MACs match the derived network's; it is trained exactly like the
derived one (from scratch, KD from the same teacher, same epochs, data order and seed).

Printed per seed: the search's progress, the chosen width of every searched layer and depth
of every stage, then MACs, parameters and test accuracy of the dense, TAS and uniform
networks; at the end the mean and standard deviation over the seeds. ``--plot`` writes the
chosen widths (fraction of the dense width, per layer and seed) as a PNG when matplotlib is
installed.

Run: python examples/tas_digits.py [--seeds 0 1 2] [--epochs 15] [--search-epochs 8]
     [--ratio 0.5] [--settle 200] [--plot out/tas_digits_widths.png]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from summary import Summary, parser, progress
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis import channel_groups, flops
from rewriter.datasets import digits
from rewriter.passes.distill import strip
from rewriter.passes.tas import (
    arch_parameters,
    architecture,
    derive,
    expected_flops,
    in_target_band,
    kd_student,
    set_temperature,
    tas_arch,
    temperature_schedule,
    weight_parameters,
)

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item() * 100


def train(
    net: nn.Module,
    data: Data,
    epochs: int,
    lr: float,
    seed: int,
    label: str,
    extra: Callable[[nn.Module, Tensor], Tensor] | None = None,
) -> float:
    """SGD with momentum, cosine schedule, batches of 64; returns the test accuracy (%)."""
    x_tr, y_tr, x_te, y_te = data
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(epochs), f"{label} seed {seed} (epochs)"):
        net.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            opt.zero_grad()
            loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
            if extra is not None:
                loss = loss + extra(net, y_tr[idx])
            loss.backward()
            opt.step()
        sched.step()
    return accuracy(net, x_te, y_te)


def kd_loss(net: nn.Module, y: Tensor) -> Tensor:
    return rw.aux_losses(net, targets=y)


def search(
    teacher: nn.Module,
    data: Data,
    epochs: int,
    ratio: float,
    arch_lr: float,
    seed: int,
    settle: int = 200,
) -> fx.GraphModule:
    """TAS search from the trained dense weights; two optimizers in alternation."""
    x_tr, y_tr, _, _ = data
    gm = rw.rewrite(teacher, [("tas", {"flops_ratio": ratio})], x_tr[:2])
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_tr), generator=gen)
    half = len(order) // 2
    train_idx, arch_idx = order[:half], order[half:]
    w_opt = torch.optim.SGD(weight_parameters(gm), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, epochs)
    a_opt = torch.optim.Adam(arch_parameters(gm), lr=arch_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    arch = tas_arch(gm)
    print(f"{'epoch':>5} {'tau':>6} {'E[MACs]':>8} {'argmax MACs':>11}  (fractions of dense)")
    for epoch in progress(range(epochs), f"search seed {seed} (epochs)"):
        set_temperature(gm, temperature_schedule(epoch, epochs))
        gm.train()
        w_batches = train_idx[torch.randperm(half, generator=gen)].split(64)
        a_batches = arch_idx[torch.randperm(len(arch_idx), generator=gen)].split(64)
        for w_b, a_b in zip(w_batches, a_batches, strict=False):
            w_opt.zero_grad()
            F.cross_entropy(gm(x_tr[w_b]), y_tr[w_b]).backward()
            w_opt.step()
            a_opt.zero_grad()
            (F.cross_entropy(gm(x_tr[a_b]), y_tr[a_b]) + rw.aux_losses(gm)).backward()
            a_opt.step()
        sched.step()
        e = float(expected_flops(gm).detach()) / arch.dense_macs
        cur = float(arch.argmax_flops()) / arch.dense_macs
        tau = float(arch.temperature)
        print(f"{epoch + 1:>5} {tau:>6.2f} {e:>8.3f} {cur:>11.3f}")
    # Settle: the argmax jumps between architectures from step to step (every group's logits
    # move together under Adam), so continue the architecture steps alone, weights fixed,
    # until the argmax is inside the cost loss's zero band.
    steps = 0
    while not in_target_band(gm) and steps < settle:
        a_b = arch_idx[torch.randint(len(arch_idx), (64,), generator=gen)]
        a_opt.zero_grad()
        (F.cross_entropy(gm(x_tr[a_b]), y_tr[a_b]) + rw.aux_losses(gm)).backward()
        a_opt.step()
        steps += 1
    cur = float(arch.argmax_flops()) / arch.dense_macs
    print(f"settle: {steps} architecture step(s) alone; argmax MACs {cur:.3f} of dense")
    return gm


def uniform(model: nn.Module, x: Tensor, target_macs: float) -> fx.GraphModule:
    """Every prunable group keeps its first round(r * C) channels; r bisected to the MACs."""
    gm = rw.trace(model)
    analysis = channel_groups(gm, x)

    def build(r: float) -> fx.GraphModule:
        drops = {g.id: range(max(1, round(r * g.size)), g.size) for g in analysis.prunable()}
        return rw.slim(gm, x, rw.group_masks(analysis, drops), analysis=analysis)

    lo, hi = 0.05, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if flops(build(mid), x).total_macs / len(x) > target_macs:
            hi = mid
        else:
            lo = mid
    best = min(
        (build(lo), build(hi)), key=lambda n: abs(flops(n, x).total_macs / len(x) - target_macs)
    )
    return best


def describe(net: nn.Module, x: Tensor) -> tuple[float, int]:
    report = flops(net, x)
    return report.total_macs / len(x), report.total_params


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15, help="epochs of every normal training")
    ap.add_argument("--search-epochs", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.5, help="target MACs / dense MACs")
    ap.add_argument("--arch-lr", type=float, default=0.01, help="Adam learning rate of the logits")
    ap.add_argument(
        "--settle", type=int, default=200, help="most architecture-only steps after the search"
    )
    ap.add_argument("--width", type=int, default=8, help="base width of the zoo resnet20")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--plot", default="out/tas_digits_widths.png", help="PNG of the chosen widths")
    args = ap.parse_args()
    summary = Summary("tas_digits", ap, args)
    torch.set_num_threads(1)  # tiny convs: one thread is fastest and deterministic
    start = time.perf_counter()
    rows: dict[str, list[tuple[float, int, float]]] = {"dense": [], "TAS": [], "uniform": []}
    widths_per_seed: list[dict[str, float]] = []
    per_seed: list[str] = []
    for seed in args.seeds:
        print(f"\n=== seed {seed} ===")
        data = digits(seed=seed)
        x_tr, x_te, y_te = data[0], data[2], data[3]
        torch.manual_seed(seed)
        dense = zoo.create("resnet20", width=args.width, in_channels=1)
        dense_acc = train(dense, data, args.epochs, args.lr, seed, "dense")
        rows["dense"].append((*describe(dense, x_te), dense_acc))

        gm = search(dense, data, args.search_epochs, args.ratio, args.arch_lr, seed, args.settle)
        chosen = architecture(gm)
        print(chosen.table())
        widths_per_seed.append(
            {k: c / n if chosen.kept(k) else 0.0 for k, (c, n) in chosen.layer_widths.items()}
        )
        derived = derive(gm, x_tr[:2])
        target = describe(derived, x_te)[0]

        torch.manual_seed(seed)
        student = kd_student(derived, dense, x_tr[:2])
        train(student, data, args.epochs, args.lr, seed, "TAS retrain", extra=kd_loss)
        tas_net = strip(student)
        rows["TAS"].append((*describe(tas_net, x_te), accuracy(tas_net, x_te, y_te)))

        torch.manual_seed(seed)
        thin = kd_student(uniform(dense, x_tr[:2], target), dense, x_tr[:2])
        train(thin, data, args.epochs, args.lr, seed, "uniform", extra=kd_loss)
        thin_net = strip(thin)
        rows["uniform"].append((*describe(thin_net, x_te), accuracy(thin_net, x_te, y_te)))

        depths = " ".join(f"{c}/{n}" for c, n in chosen.depths.values())
        stage3 = [
            c / n
            for k, (c, n) in chosen.layer_widths.items()
            if k.startswith("layer3") and chosen.kept(k)
        ]
        per_seed.append(
            f"seed {seed}: stage depths {depths}; mean kept width of the kept layers "
            f"{statistics.mean(c / n for k, (c, n) in chosen.layer_widths.items() if chosen.kept(k)):.2f}"
            f" (stage 3 {statistics.mean(stage3):.2f})"
        )
        print(f"{'network':<8} {'MACs/image':>11} {'of dense':>8} {'params':>8} {'accuracy':>8}")
        for name, values in rows.items():
            macs, params, acc = values[-1]
            share = macs / rows["dense"][-1][0]
            print(f"{name:<8} {macs:>11,.0f} {share:>8.1%} {params:>8,} {acc:>8.2f}")

    summary.print(
        f"resnet20 width {args.width} on digits, target {args.ratio:.0%} of the dense MACs, "
        f"{len(args.seeds)} seeds"
    )
    summary.print(f"{'seed':>4} {'network':<8} {'MACs/image':>11} {'of dense':>8} {'params':>8} "
                  f"{'accuracy':>8}")  # fmt: skip
    for i, seed in enumerate(args.seeds):
        for name, values in rows.items():
            macs, params, acc = values[i]
            share = macs / rows["dense"][i][0]
            summary.print(
                f"{seed:>4} {name:<8} {macs:>11,.0f} {share:>8.1%} {params:>8,} {acc:>8.2f}"
            )
    for line in per_seed:
        summary.print(line)
    summary.print(f"{'network':<8} {'MACs/image':>21} {'params':>17} {'accuracy':>15}")
    for name, values in rows.items():
        cols = list(zip(*values, strict=True))
        parts = []
        for col, fmt in zip(cols, (",.0f", ",.0f", ".2f"), strict=True):
            std = statistics.stdev(col) if len(col) > 1 else 0.0
            parts.append(f"{statistics.mean(col):{fmt}} +- {std:{fmt}}")
        summary.print(f"{name:<8} {parts[0]:>21} {parts[1]:>17} {parts[2]:>15}")
    print(f"wall time {time.perf_counter() - start:.0f} s")
    summary.save()
    if args.plot:
        plot(widths_per_seed, args.seeds, args.plot)


def plot(widths: list[dict[str, float]], seeds: list[int], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    layers = list(widths[0])
    fig, ax = plt.subplots(figsize=(10, 4))
    for seed, chosen in zip(seeds, widths, strict=True):
        ax.plot(range(len(layers)), [chosen.get(k, float("nan")) for k in layers], "o-",
                label=f"seed {seed}")  # fmt: skip
    ax.set_xticks(range(len(layers)), layers, rotation=70, fontsize=7)
    ax.set_ylabel("kept width / dense width (0: block removed)")
    ax.set_ylim(0, 1.05)
    ax.set_title("TAS widths chosen on digits (resnet20, 50% MACs target)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
