"""What the distillation examples share: the digits, one training loop, accuracy, mean +- std.

Every network trains with SGD (momentum 0.9, weight decay 5e-4, cosine schedule from
``lr``), batches of 32 in a seeded order; a distilled model adds
``rewriter.aux_losses(gm, targets=y)`` to the cross-entropy, which makes the loss the
method's full formula (see ``docs/methods/distill.md``).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from summary import progress
from torch import Tensor, nn

import rewriter as rw
from rewriter import zoo

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def add_teacher_student_arguments(ap: argparse.ArgumentParser) -> None:
    """The options the teacher-student examples share (seeds, epochs, data, student width)."""
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--per-class", type=int, default=30, help="training images per digit")
    ap.add_argument("--student-width", type=int, default=8, help="width of the digits CNN student")


def teacher_model() -> nn.Module:
    """The larger teacher: the zoo's ResNet-8 (widths 16-32-64) on 1-channel 8x8 digits."""
    return zoo.create("resnet8", in_channels=1)


def student_model(width: int = 8) -> nn.Module:
    """The small student: the zoo's digits CNN at half its default width (1,954 parameters)."""
    return zoo.create("digits_cnn", width=width)


def train(
    net: nn.Module,
    data: Data,
    *,
    epochs: int,
    seed: int,
    label: str,
    lr: float = 0.05,
    label_smoothing: float = 0.0,
    distilled: bool = False,
) -> float:
    """Train ``net`` in place and return its test accuracy in %."""
    x_tr, y_tr, x_te, y_te = data
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(epochs), f"{label} seed {seed} (epochs)"):
        net.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(32):
            out = net(x_tr[idx])
            loss = F.cross_entropy(out, y_tr[idx], label_smoothing=label_smoothing)
            if distilled:
                loss = loss + rw.aux_losses(net, targets=y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return accuracy(net, x_te, y_te)


def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item() * 100


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} +- {spread:4.2f}"
