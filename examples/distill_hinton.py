"""Hinton KD from a larger zoo teacher into a small student, and Tf-KD self, on the digits.

The teacher is the zoo's ResNet-8 (78k parameters), the student the zoo's digits CNN at
width 8 (2k parameters); both train on the same few images per class. Rows:

* student alone: plain cross-entropy;
* Hinton KD: ``distill`` with the trained ResNet-8 as teacher (alpha 0.9, T 4);
* Tf-KD self: ``distill`` with ``method="tf_self"``, the teacher being the *student alone*
  of the same seed (a trained copy of the student's own architecture), at the authors'
  ResNet-18 settings (alpha 0.95, T 6, multiplier 50, KL averaged over batch x classes),
  at their MobileNetV2 settings (T 20, multiplier 1), and with the multiplier scaled to
  10 classes (T 6, multiplier 5: the same weight per class as 50 on CIFAR-100's 100).

Every student of a seed starts from the same initial weights and sees the same data order.

Run: python examples/distill_hinton.py [--seeds 3] [--epochs 30] [--per-class 30] [--student-width 8]
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
from rewriter.passes.distill import Distill, self_teacher


def main() -> None:
    ap = parser(__doc__)
    add_teacher_student_arguments(ap)
    args = ap.parse_args()
    summary = Summary("distill_hinton", ap, args)
    torch.set_num_threads(1)
    names = [
        "teacher ResNet-8 alone",
        "student alone",
        "student, Hinton KD (a 0.9, T 4)",
        "student, Tf-KD self (T 6, m 50)",
        "student, Tf-KD self (T 20, m 1)",
        "student, Tf-KD self (T 6, m 5)",
    ]
    results: dict[str, list[float]] = {n: [] for n in names}
    sizes = {}
    for seed in range(args.seeds):
        data = digits(train_per_class=args.per_class, seed=seed)
        x0 = (data[0][:2],)
        torch.manual_seed(seed)
        teacher = teacher_model()
        init = student_model(args.student_width)
        sizes = {
            "teacher": sum(p.numel() for p in teacher.parameters()),
            "student": sum(p.numel() for p in init.parameters()),
        }
        common = {"epochs": args.epochs, "seed": seed}
        accs = [train(teacher, data, label="teacher", **common)]
        alone = rw.rewrite(init, [], x0)
        accs.append(train(alone, data, label="student", **common))
        runs = [
            Distill.with_teacher(teacher),
            Distill.with_teacher(self_teacher(alone), method="tf_self"),
            Distill.with_teacher(
                self_teacher(alone), method="tf_self", temperature=20.0, multiplier=1.0
            ),
            Distill.with_teacher(self_teacher(alone), method="tf_self", multiplier=5.0),
        ]
        for name, spec in zip(names[2:], runs, strict=True):
            gm = rw.rewrite(init, [spec], x0)
            accs.append(train(gm, data, label=name, distilled=True, **common))
        for name, acc in zip(names, accs, strict=True):
            results[name].append(acc)
        print(f"seed {seed}: " + ", ".join(f"{a:.2f}" for a in accs))
    summary.print(
        f"digits, {args.per_class} images per class, {args.epochs} epochs, {args.seeds} seeds; "
        f"teacher {sizes['teacher']:,} parameters, student {sizes['student']:,}"
    )
    for name, accs in results.items():
        summary.print(f"{name:<34} test accuracy {mean_std(accs)}")
    summary.save()


if __name__ == "__main__":
    main()
