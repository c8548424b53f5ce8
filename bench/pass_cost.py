"""Compiled training-step cost of every pass against the plain model, in one table.

Run from the repository root (one torch thread; ``OMP_NUM_THREADS=1`` recommended)::

    python -m bench.pass_cost                  # resnet20, batch 32, 11 rounds
    python -m bench.pass_cost --rounds 5       # quicker

Every variant is ``torch.compile(model, fullgraph=True)`` (inductor) of the zoo ResNet-20
rewritten by one pass (default options unless said), and one training step is forward,
cross-entropy (plus ``rewriter.aux_losses(gm, targets=y)`` for passes with losses), backward
and an SGD step (momentum 0.9); all variants start from the same weights. Steps are timed
after two warm-up steps, interleaving the variants round by round (the order rotates every
round), median ms per step; each ratio divides by the baseline of the goal measured in the
same run:

* ``masks`` (all masks 1), ``split`` (KELS, rate 0.5; "dense mode": the split layers train
  every weight), ``saliency_gates`` (ManiDP), ``skip_gates`` (1 task), ``tas`` (search step:
  sampled widths and depths, cost loss): against the plain model;
* ``rbn``: against the plain model, whose norms are BatchNorm;
* ``distill`` (Hinton KD with a frozen ResNet-32 teacher inside the graph): against the sum
  of the plain student's step and the teacher's compiled no-grad forward.

Passes not installed in this checkout are listed as absent.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rewriter
from bench.rewrite_cost import print_table
from rewriter import zoo

GOALS = {
    "masks": 1.05,
    "rbn": 1.15,
    "split": 1.02,
    "saliency_gates": 1.15,
    "skip_gates": 1.10,
    "distill": None,
    "tas": None,
}


@dataclass
class Variant:
    name: str
    run: Callable[[], object]
    note: str = ""
    times: list[float] = field(default_factory=list)


def aux_keys(model: nn.Module) -> set[str] | None:
    """The context keys the inserted modules' ``aux_loss`` read (``None``: no losses)."""
    modules = [m for m in model.modules() if callable(getattr(m, "aux_loss", None))]
    if not modules:
        return None
    return set().union(*(getattr(type(m), "AUX_LOSS_KEYS", ()) or () for m in modules))


def train_step(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], float]:
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    keys = aux_keys(model)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = compiled(x)
        if keys is None:
            loss = F.cross_entropy(out, y)
        else:
            per_sample = F.cross_entropy(out, y, reduction="none")
            loss = per_sample.mean()
            context = {"targets": y, "per_sample_ce": per_sample.detach()}
            loss = loss + rewriter.aux_losses(model, **{k: context[k] for k in keys})
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def teacher_forward(teacher: nn.Module, x: Tensor) -> Callable[[], object]:
    compiled = torch.compile(teacher.eval(), fullgraph=True)

    def forward() -> object:
        with torch.no_grad():
            return compiled(x)

    return forward


def rewritten(base: nn.Module, spec: object, x: Tensor) -> nn.Module:
    gm = rewriter.rewrite(copy.deepcopy(base), [spec], (x[:2],))
    return gm.train()


def build(args: argparse.Namespace) -> tuple[list[Variant], dict[str, str]]:
    torch.manual_seed(0)
    base = zoo.create(args.model).train()
    x = torch.randn(args.batch, *zoo.input_shape(args.model))
    y = torch.randint(0, 10, (args.batch,))
    variants = [Variant("plain", train_step(copy.deepcopy(base), x, y))]
    absent: dict[str, str] = {}
    specs: dict[str, object] = {
        "masks": "masks",
        "rbn": "rbn",
        "split": ("split", {"mode": "kels", "rate": 0.5}),
        "saliency_gates": "saliency_gates",
        "skip_gates": "skip_gates",
        "tas": "tas",
    }
    for name, spec in specs.items():
        try:
            model = rewritten(base, spec, x)
        except Exception as exc:  # the pass may not exist in this checkout
            absent[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            continue
        variants.append(Variant(name, train_step(model, x, y)))
    try:
        from rewriter.passes.distill import Distill

        teacher = zoo.create(args.model, depth=32).eval()
        model = rewriter.rewrite(
            copy.deepcopy(base), [Distill.with_teacher(teacher, method="hinton")], (x[:2],)
        ).train()
        variants.append(Variant("distill", train_step(model, x, y)))
        variants.append(Variant("teacher forward", teacher_forward(copy.deepcopy(teacher), x)))
    except Exception as exc:
        absent["distill"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return variants, absent


def timed_rounds(variants: Sequence[Variant], warmup: int, rounds: int) -> None:
    for v in variants:
        start = time.perf_counter()
        for _ in range(warmup):
            v.run()
        v.note = f"{time.perf_counter() - start:.0f}"
        print(f"  compiled and warmed {v.name} ({v.note} s)", flush=True)
    for r in range(rounds):
        k = r % len(variants)
        for v in [*variants[k:], *variants[:k]]:
            start = time.perf_counter()
            v.run()
            v.times.append((time.perf_counter() - start) * 1e3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"model {args.model}, batch {args.batch}, {args.rounds} rounds"
    )
    start = time.perf_counter()
    variants, absent = build(args)
    timed_rounds(variants, 2, args.rounds)
    med = {v.name: statistics.median(v.times) for v in variants}
    rows = []
    for v in variants:
        if v.name == "teacher forward":
            continue
        if v.name == "distill" and "teacher forward" in med:
            base_label = "plain + teacher forward"
            base = med["plain"] + med["teacher forward"]
        else:
            base_label, base = "plain", med["plain"]
        ratio = med[v.name] / base
        goal = GOALS.get(v.name)
        verdict = "" if v.name == "plain" else ("(no goal)" if goal is None else (
            "met" if ratio <= goal else "MISSED"
        ))  # fmt: skip
        rows.append(
            (
                v.name,
                f"{med[v.name]:.1f}",
                f"{min(v.times):.1f}",
                base_label,
                f"{ratio:.3f}",
                f"<= {goal}" if goal else "",
                verdict,
                v.note,
            )
        )
    if "teacher forward" in med:
        t = med["teacher forward"]
        rows.append(("(teacher forward)", f"{t:.1f}", "", "", "", "", "", ""))
    print(f"\n== compiled training step, median of {args.rounds} interleaved rounds ==")
    print_table(
        ("variant", "ms/step", "min ms", "against", "ratio", "goal", "verdict", "compile+warm s"),
        rows,
    )
    for name, why in absent.items():
        print(f"{name}: absent or failed to build ({why})")
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
