"""IE-KD vs Hinton KD vs feature-only KD with the same teacher and student on the digits.

Teacher: the zoo's ResNet-8, trained first; student: the digits CNN at width 8 (as in
``distill_hinton.py``). The teacher's last feature map before pooling (64 x 2 x 2) is
encoded by an auto-encoder (3 conv-BN-LeakyReLU layers each way, code 32 x 2 x 2)
pretrained to reconstruct it (``pretrain_autoencoder``); the student's last map
(8 x 8 x 8) is encoded into that code shape and resized by adaptive average pooling.

* Hinton KD: logits only (alpha 0.9, T 4);
* feature-only KD: one encoder over the whole student map pulled towards the teacher's
  code (Factor Transfer's normalised L1; ``method="feature"``);
* IE-KD: inheritance half pulled towards the code, exploration half pushed away
  (``method="ie"``, both L_exp variants), weights 1 and 1.

Every student of a seed starts from the same initial weights and data order.

Run: python examples/distill_ie.py [--seeds 3] [--epochs 30] [--per-class 30] [--student-width 8]
"""

from __future__ import annotations

import torch
from distill_common import (
    add_teacher_student_arguments,
    mean_std,
    student_model,
    teacher_model,
    train,
)
from summary import Summary, parser

import rewriter as rw
from rewriter.datasets import digits
from rewriter.passes.distill import Distill, pretrain_autoencoder


def main() -> None:
    ap = parser(__doc__)
    add_teacher_student_arguments(ap)
    ap.add_argument("--ae-epochs", type=int, default=30, help="auto-encoder pretraining epochs")
    args = ap.parse_args()
    summary = Summary("distill_ie", ap, args)
    torch.set_num_threads(1)
    rows = {
        "student alone": None,
        "Hinton KD (a 0.9, T 4)": {"method": "hinton"},
        "feature-only KD": {"method": "feature"},
        "IE-KD (L_exp = -L_inh)": {"method": "ie", "exploration": "neg_l1"},
        "IE-KD (L_exp = |cos|)": {"method": "ie", "exploration": "abs_cos"},
    }
    results: dict[str, list[float]] = {n: [] for n in rows}
    recon: list[tuple[float, float]] = []
    for seed in range(args.seeds):
        data = digits(train_per_class=args.per_class, seed=seed)
        x0 = (data[0][:2],)
        torch.manual_seed(seed)
        teacher = teacher_model()
        init = student_model(args.student_width)
        train(teacher, data, epochs=args.epochs, seed=seed, label="teacher")
        batches = list(data[0].split(64))
        for name, options in rows.items():
            if options is None:
                gm = rw.rewrite(init, [], x0)
            else:
                gm = rw.rewrite(init, [Distill.with_teacher(teacher, **options)], x0)
                if options["method"] != "hinton":
                    history = pretrain_autoencoder(gm, batches, epochs=args.ae_epochs, lr=1e-2)
                    recon.append((history[0], history[-1]))
            acc = train(
                gm, data, epochs=args.epochs, seed=seed, label=name, distilled=options is not None
            )
            results[name].append(acc)
        print(f"seed {seed}: " + ", ".join(f"{v[-1]:.2f}" for v in results.values()))
    summary.print(
        f"digits, {args.per_class} images per class, {args.epochs} epochs, {args.seeds} seeds"
    )
    for name, accs in results.items():
        summary.print(f"{name:<26} test accuracy {mean_std(accs)}")
    first = sum(r[0] for r in recon) / len(recon)
    last = sum(r[1] for r in recon) / len(recon)
    summary.print(
        f"auto-encoder reconstruction MSE: {first:.4f} (epoch 1) -> {last:.4f} (epoch {args.ae_epochs})"
    )
    summary.save()


if __name__ == "__main__":
    main()
