"""Training-step cost of weight masks: plain model vs ``masks`` pass vs ``torch.nn.utils.prune``.

Run from the repository root::

    python -m bench.train_step                    # resnet20, batch 32, 50% and 90% sparsity
    python -m bench.train_step --model resnet8 --batch 16 --steps 5   # a quicker look

One training step is forward + cross-entropy + backward + SGD (momentum 0.9) step. Variants,
all starting from the same weights and, for (b) and (c), the same random global masks:

(a) ``plain``: the unmasked zoo model;
(b) ``masks``: ``rewriter.rewrite(model, ["masks"])`` with masks set by ``set_mask``
    (the layer computes with ``weight * weight_mask``, a buffer; no hooks);
(c) ``prune``: ``torch.nn.utils.prune.custom_from_mask`` on the same layers
    (``weight_orig`` parameter, ``weight_mask`` buffer and a forward pre-hook).

Each runs eagerly and under ``torch.compile`` (inductor): (a) and (b) with ``fullgraph=True``,
(c) with the default ``fullgraph=False`` as hooks may break the graph; whether (c) also
compiles with ``fullgraph=True`` is checked with the cheap ``eager`` backend. The masks are
changed in place between sparsities, so each variant compiles once. Steps are timed after a
warm-up, interleaving the variants round by round (the order rotates every round) so that
load from other processes on a shared machine hits all variants alike; the table shows the
median ms/step and the ratio to the plain model in the same mode.

Finally ``copy.deepcopy`` is tried on the masked GraphModule (and its copy checked) and on the
pruned model. Uses one intra-op thread by default (``--threads``): the machine is shared.
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
from torch.nn.utils import prune

import rewriter
from rewriter import zoo
from rewriter.passes.masks import get_masks, set_mask, sparsity

Step = Callable[[], float]


@dataclass
class Variant:
    """One model in one mode, with its optimizer and timings."""

    name: str
    mode: str  # "eager" or "compiled"
    model: nn.Module
    step: Step
    times: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.mode}"


def random_global_masks(
    weights: dict[str, Tensor], sparsity: float, seed: int
) -> dict[str, Tensor]:
    """Float 0/1 masks with ``sparsity`` of all weights zeroed, at random over all layers."""
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(w.shape, generator=generator) for name, w in weights.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(sparsity * flat.numel())
    threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
    return {name: (s > threshold).to(weights[name].dtype) for name, s in scores.items()}


def make_step(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """A closure running one SGD training step of ``model``; returns the loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def apply_prune_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Set the masks of a model pruned with ``custom_from_mask``, in place."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            modules[name].weight_mask.copy_(mask)


def check_fullgraph(model: nn.Module, x: Tensor, y: Tensor) -> str:
    """Whether forward + backward compiles with ``fullgraph=True`` (eager backend: cheap).

    Runs in eval mode so that BN running statistics are left untouched; gradients are cleared.
    """
    torch._dynamo.reset()
    model.eval()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        F.cross_entropy(compiled(x[:2]), y[:2]).backward()
    except Exception as exc:  # report whatever dynamo raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"fails: {type(exc).__name__}: {first[:160]}"
    finally:
        model.train()
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
    return "ok"


def eval_outputs(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` in eval mode without grad; the training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)


def try_deepcopy(model: nn.Module) -> tuple[str, nn.Module | None]:
    """``copy.deepcopy(model)``: ("ok", copy) or ("<exception type>: <message>", None)."""
    try:
        return "ok", copy.deepcopy(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}", None


def timed_rounds(variants: Sequence[Variant], warmup: int, steps: int) -> None:
    """Warm up each variant, then time ``steps`` rounds of one step per variant (rotating)."""
    for v in variants:
        for _ in range(warmup):
            v.step()
        v.times.clear()
    for r in range(steps):
        order = list(variants[r % len(variants) :]) + list(variants[: r % len(variants)])
        for v in order:
            start = time.perf_counter()
            v.step()
            v.times.append(time.perf_counter() - start)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process (recompiles included)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def ratio_rows(
    variants: Sequence[Variant], models: Sequence[str], baseline: str, *, compiled: bool
) -> list[list[str]]:
    """Median ms/step of each model, eager and compiled, as ratios to ``baseline``."""
    med = {v.label: statistics.median(v.times) * 1e3 for v in variants}
    rows = [["variant", "eager ms/step", f"x {baseline}", "compiled ms/step", f"x {baseline}",
             "compiled speedup"]]  # fmt: skip
    for name in models:
        e = med[f"{name}/eager"]
        row = [name, f"{e:.1f}", f"{e / med[f'{baseline}/eager']:.2f}"]
        if compiled:
            c = med[f"{name}/compiled"]
            row += [f"{c:.1f}", f"{c / med[f'{baseline}/compiled']:.2f}", f"{e / c:.2f}"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return rows


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="zoo model name")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=11, help="timed rounds per sparsity")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    print(
        f"torch {torch.__version__}, nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, model {args.model}, batch {args.batch}"
    )
    torch.manual_seed(0)
    base = zoo.create(args.model)
    x = torch.randn(args.batch, *zoo.input_shape(args.model))
    y = torch.randint(0, 10, (args.batch,))

    # (b) masks pass; its masked layers name the layers every variant masks.
    masked = rewriter.rewrite(base, ["masks"], zoo.example_inputs(args.model))
    layers = list(get_masks(masked))
    base_modules = dict(base.named_modules())
    weights = {name: base_modules[name].weight for name in layers}
    # (a) plain and (c) torch.nn.utils.prune on copies of the same weights.
    plain = copy.deepcopy(base)
    pruned = copy.deepcopy(base)
    pruned_modules = dict(pruned.named_modules())
    first_masks = random_global_masks(weights, args.sparsity[0], seed=1)
    for name in layers:
        set_mask(masked, name, first_masks[name])
        prune.custom_from_mask(pruned_modules[name], "weight", first_masks[name])
    diff = (eval_outputs(masked, x) - eval_outputs(pruned, x)).abs().max().item()
    print(f"same weights and masks: max |masks(x) - prune(x)| = {diff:.1e} (eval mode)")
    print(
        f"masked layers: {len(layers)} (conv + linear), weights {sum(w.numel() for w in weights.values()):,}"
    )

    fullgraph_prune = check_fullgraph(pruned, x, y)
    fullgraph_masks = check_fullgraph(masked, x, y)
    print(
        f"torch.compile(fullgraph=True) forward+backward: masks {fullgraph_masks}; prune {fullgraph_prune}"
    )

    models = {"plain": plain, "masks": masked, "prune": pruned}
    variants = [Variant(n, "eager", m, make_step(m, x, y)) for n, m in models.items()]
    compile_seconds: dict[str, float] = {}
    graphs_before = compiled_graphs()
    if not args.no_compile:
        for name, model in models.items():
            compiled = torch.compile(model, fullgraph=name != "prune")
            v = Variant(name, "compiled", model, make_step(compiled, x, y))
            start = time.perf_counter()
            v.step()  # compiles forward and backward
            compile_seconds[name] = time.perf_counter() - start
            variants.append(v)
        print(
            "first compiled step, i.e. compile time (inductor's on-disk cache helps on reruns) s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in compile_seconds.items())
        )

    for target in args.sparsity:
        masks = random_global_masks(weights, target, seed=1)
        for name in layers:
            set_mask(masked, name, masks[name])
        apply_prune_masks(pruned, masks)
        measured = sparsity(masked)["global"]
        print(f"\n== sparsity {target:.0%} (measured {measured:.1%}) ==")
        timed_rounds(variants, args.warmup, args.steps)
        print_table(ratio_rows(variants, models, "plain", compiled=not args.no_compile))
        zero_grads = all(
            bool((dict(masked.named_modules())[n].weight.grad[masks[n] == 0] == 0).all())
            for n in layers
        )
        print(f"masks: gradients of masked-out weights are all zero: {zero_grads}")
        if not args.no_compile:
            graphs = compiled_graphs() - graphs_before
            print(f"graphs compiled for the timed variants so far: {graphs} (one per variant: 3)")

    print("\n== copy.deepcopy ==")
    status, clone = try_deepcopy(masked)
    if clone is not None:
        same_masks = all(
            torch.equal(a, b)
            for a, b in zip(get_masks(masked).values(), get_masks(clone).values(), strict=True)
        )
        shared = any(
            a.data_ptr() == b.data_ptr()
            for a, b in zip(get_masks(masked).values(), get_masks(clone).values(), strict=True)
        )
        same_out = torch.equal(eval_outputs(masked, x), eval_outputs(clone, x))
        status += (
            f" (masks equal: {same_masks}, storage shared: {shared}, outputs equal: {same_out})"
        )
    print(f"deepcopy(masks GraphModule): {status}")
    print(f"deepcopy(torch.nn.utils.prune model): {try_deepcopy(pruned)[0]}")
    print(f"\ntotal benchmark time {time.perf_counter() - wall_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
