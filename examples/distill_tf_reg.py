"""Tf-KD reg (virtual teacher) vs plain training vs label smoothing on few digits per class.

Tf-KD's virtual teacher puts 0.99 on the true class, spreads the rest evenly and softens
the result with ``softmax(p / T)``; the paper says it behaves like label smoothing. With
the ``distill`` pass's ``tf_reg`` defaults (``alpha`` 0.1, T 20, batch-mean KL, multiplier
1) the loss has exactly the gradient of cross-entropy with label smoothing at
``eps = K * alpha * q_off`` (``q_off``: the virtual teacher's probability of a wrong class,
0.0995 here), so the two must train alike; the example checks it at two strengths and
compares both with plain training, on the zoo's ``digits_cnn`` with few training images
per class (where regularisation matters). Same initial weights and data order per seed.

Run: python examples/distill_tf_reg.py [--seeds 3] [--epochs 40] [--per-class 10]
"""

from __future__ import annotations

import torch
from distill_common import mean_std, train
from summary import Summary, parser

import rewriter as rw
from rewriter import zoo
from rewriter.datasets import digits
from rewriter.passes.distill.losses import virtual_teacher


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--per-class", type=int, default=10, help="training images per digit")
    args = ap.parse_args()
    summary = Summary("distill_tf_reg", ap, args)
    torch.set_num_threads(1)
    temperature = 20.0
    q_off = virtual_teacher(torch.tensor([0]), 10, temperature)[0, 1].item()
    rows = {}
    for alpha in (0.1, 0.5):
        eps = 10 * alpha * q_off
        rows[f"Tf-KD reg  alpha={alpha}"] = ("tf_reg", alpha)
        rows[f"label smoothing eps={eps:.4f}"] = ("smooth", eps)
    rows = {"plain cross-entropy": ("plain", 0.0), **rows}
    results: dict[str, list[float]] = {name: [] for name in rows}
    print(f"digits_cnn, {args.per_class} training images per class, {args.epochs} epochs")
    for seed in range(args.seeds):
        data = digits(train_per_class=args.per_class, seed=seed)
        torch.manual_seed(seed)
        init = zoo.create("digits_cnn")
        for name, (kind, value) in rows.items():
            net = init
            if kind == "tf_reg":
                spec = ("distill", {"method": "tf_reg", "alpha": value, "temperature": temperature})
                net = rw.rewrite(init, [spec], (data[0][:2],))
            else:
                net = rw.rewrite(init, [], (data[0][:2],))  # a copy with the same weights
            acc = train(
                net,
                data,
                epochs=args.epochs,
                seed=seed,
                label=name,
                label_smoothing=value if kind == "smooth" else 0.0,
                distilled=kind == "tf_reg",
            )
            results[name].append(acc)
        print(f"seed {seed}: " + ", ".join(f"{v[-1]:.2f}" for v in results.values()))
    summary.print(
        f"digits_cnn, {args.per_class} images per class, {args.epochs} epochs, {args.seeds} seeds"
    )
    for name, accs in results.items():
        summary.print(f"{name:<30} test accuracy {mean_std(accs)}")
    summary.save()


if __name__ == "__main__":
    main()
