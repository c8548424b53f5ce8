"""Iterative magnitude pruning (IMP) with rewinding, and its two controls (open_lth).

Each round trains the model through the user's function, removes ``ceil(rate * live)``
of the live prunable weights with the smallest ``|w|`` (global by default, 20% per
round), rewinds every parameter and buffer except the masks to the state saved at step
``k`` (``k = 0``: the original lottery ticket; ``k > 0``: rewinding), and trains again::

    def train(model: nn.Module, run: TrainRun) -> float:
        optimizer, schedule = ..., ...          # fresh each round
        for step in range(run.start_step, total_steps):   # the schedule continues from k
            run.reached(step)                   # lets the driver save the weights at step k
            ...one optimizer step...
        return test_accuracy(model)

    result = imp(gm, train, rounds=10, rewind_step=0)
    print(result.table())
    reinit = imp_control(gm, train, result, "reinit")        # same masks, new init
    shuffled = imp_control(gm, train, result, "random_mask")  # same layer densities

The model must carry masks (the ``masks`` pass or any pruning pass). The state saved for
rewinding is every parameter and buffer (BatchNorm statistics included) except the masks,
cloned, so rewinding is bit-identical. Round 0 trains at the model's current density
(dense after ``masks``). As in open_lth, each round after the first starts at step ``k``
with fresh optimizer state; the user's function creates the optimizer and skips the
schedule forward to ``run.start_step``.

Controls, at each round's density: ``"reinit"`` keeps the ticket's masks and samples new
weights with the *model's own initialiser*: ``init_fn()`` (a callable returning a freshly
constructed model with the same parameter names, called under a seed) or, by default,
the factory the model came from (``rewriter_source``: a zoo model or a
``package.module:function`` factory, rebuilt with its recorded options); its parameters
and buffers are copied in and the masks applied. This matters: a model whose
constructor initialises its layers in its own way (open_lth's models use
``kaiming_normal_``; the zoo's ResNets their own BN and linear init) must be re-drawn
from *that* distribution, which PyTorch's ``reset_parameters()`` defaults do not give.
A model with neither ``init_fn`` nor a factory source is an error that says so;
:func:`resample_weights` without ``init_fn`` still offers ``reset_parameters()``
explicitly.
``"random_mask"`` rewinds to the saved weights and shuffles each layer's ticket mask
(open_lth's layerwise random pruning: the same number of weights per layer). Both start
training at the ticket's start step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from rewriter.errors import RewriterError

from .lottery_scores import Scope, _keep_top, _pools, magnitude_scores, masked_layers
from .masks import MASK, get_masks, set_mask


@dataclass
class TrainRun:
    """What the IMP driver tells the user's training function for one round.

    Attributes:
        round: 0 for the dense (or initial-mask) run, then 1, 2, ...
        start_step: the step to start training at: 0 in round 0, ``rewind_step`` after.
        rewind_step: ``k``, the step whose weights every later round rewinds to.
    """

    round: int
    start_step: int
    rewind_step: int
    _on_step: Callable[[int], None] | None = field(default=None, repr=False)

    def reached(self, step: int) -> None:
        """Call at the start of every training step (before its update).

        In round 0 the driver saves the weights when ``step == rewind_step``; in later
        rounds the call does nothing.
        """
        if self._on_step is not None:
            self._on_step(step)


TrainFn = Callable[[nn.Module, TrainRun], float]


@dataclass(frozen=True)
class Round:
    """One trained network of an IMP run (or of a control)."""

    round: int
    density: float  # live fraction of the prunable weights
    kept: int
    total: int
    metric: float  # what the training function returned (e.g. test accuracy)
    masks: dict[str, Tensor]  # boolean copies of the masks it trained with


@dataclass
class ImpResult:
    """The rounds of an IMP run and the state it rewinds to."""

    rounds: list[Round]
    rewind_state: dict[str, Tensor]
    rewind_step: int

    def table(self) -> str:
        lines = ["round  density  kept  metric"]
        for r in self.rounds:
            lines.append(f"{r.round:>5}  {r.density:7.4f}  {r.kept:>4}  {r.metric:.4f}")
        return "\n".join(lines)


def save_state(gm: nn.Module) -> dict[str, Tensor]:
    """Clones of every parameter and buffer except the masks (the rewind point)."""
    return {
        name: t.detach().clone()
        for name, t in gm.state_dict(keep_vars=True).items()
        if name.rpartition(".")[2] != MASK
    }


def rewind(gm: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`save_state`) into the model in place; masks untouched."""
    current = {
        name: t
        for name, t in gm.state_dict(keep_vars=True).items()
        if name.rpartition(".")[2] != MASK
    }
    missing = sorted(set(current) - set(state))
    if missing:
        raise RewriterError(f"the rewind state has no entry for {missing[:5]}")
    with torch.no_grad():
        for name, t in current.items():
            t.copy_(state[name])


def imp_prune(
    gm: nn.Module,
    rate: float = 0.2,
    *,
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> None:
    """One IMP pruning step: mask ``ceil(rate * live)`` more weights, the smallest ``|w|``."""
    if not 0.0 < rate < 1.0:
        raise RewriterError(
            f"rate must be in (0, 1) (the fraction of live weights removed), got {rate}"
        )
    scores = magnitude_scores(gm)
    masks = get_masks(gm)
    for pool in _pools(gm, scope, keep_classifier, layers):
        live = sum(int((masks[name] != 0).sum()) for name in pool)
        remove = math.ceil(rate * live - 1e-9)  # the tolerance absorbs rate * live rounding up
        _keep_top(gm, scores, pool, live - remove, clamp=False)


def imp(
    gm: nn.Module,
    train_fn: TrainFn,
    rounds: int,
    *,
    rate: float = 0.2,
    rewind_step: int = 0,
    scope: Scope = "global",
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
) -> ImpResult:
    """Train, prune ``rate`` of the live weights, rewind to step ``rewind_step``; ``rounds`` times.

    Trains ``rounds + 1`` networks (round 0 at the current masks). See the module docs.
    """
    if rounds < 0:
        raise RewriterError(f"rounds must be >= 0, got {rounds}")
    if rewind_step < 0:
        raise RewriterError(f"rewind_step must be >= 0, got {rewind_step}")
    layers = None if layers is None else list(layers)
    masked_layers(gm)  # a clear error when there are no masks
    state: dict[str, Tensor] | None = save_state(gm) if rewind_step == 0 else None

    def on_step(step: int) -> None:
        nonlocal state
        if step == rewind_step and state is None:
            state = save_state(gm)

    history = []
    for r in range(rounds + 1):
        if r > 0:
            imp_prune(gm, rate, scope=scope, keep_classifier=keep_classifier, layers=layers)
            assert state is not None
            rewind(gm, state)
        run = TrainRun(r, 0 if r == 0 else rewind_step, rewind_step, on_step if r == 0 else None)
        metric = float(train_fn(gm, run))
        if state is None:
            raise RewriterError(
                f"rewind_step={rewind_step} but the training function never called "
                f"run.reached({rewind_step}): call run.reached(step) at the start of every step"
            )
        history.append(_record(gm, r, metric, keep_classifier, layers))
    assert state is not None
    return ImpResult(history, state, rewind_step)


def imp_control(
    gm: nn.Module,
    train_fn: TrainFn,
    result: ImpResult,
    kind: Literal["reinit", "random_mask"],
    *,
    rounds: Iterable[int] | None = None,
    seed: int = 1,
    keep_classifier: bool = False,
    layers: Iterable[str] | None = None,
    init_fn: InitFn | None = None,
) -> list[Round]:
    """Retrain pruned rounds of ``result`` as a control (``"reinit"`` or ``"random_mask"``).

    ``rounds`` picks the rounds (default: every pruned round, 1 to N). Round ``r`` of the
    control uses seed ``seed + r``. ``keep_classifier`` and ``layers`` only choose which
    layers the recorded density counts (pass those given to :func:`imp`). ``init_fn``
    (``"reinit"`` only) builds a freshly initialised model; by default the model's
    recorded factory is rebuilt (see the module docs).
    """
    if kind not in ("reinit", "random_mask"):
        raise RewriterError(f"kind must be 'reinit' or 'random_mask', got {kind!r}")
    available = {r.round: r for r in result.rounds if r.round > 0}
    chosen = sorted(available) if rounds is None else list(rounds)
    unknown = [r for r in chosen if r not in available]
    if unknown:
        raise RewriterError(
            f"rounds {unknown} are not pruned rounds of the result: {sorted(available)}"
        )
    if kind == "reinit" and init_fn is None:
        init_fn = source_init_fn(gm)
    layers = None if layers is None else list(layers)
    out = []
    for ticket in (available[r] for r in chosen):
        rewind(gm, result.rewind_state)
        gen = torch.Generator().manual_seed(seed + ticket.round)
        for name, mask in ticket.masks.items():
            if kind == "random_mask":
                mask = mask.flatten()[torch.randperm(mask.numel(), generator=gen)].view(mask.shape)
            set_mask(gm, name, mask)
        if kind == "reinit":
            resample_weights(gm, seed + ticket.round, init_fn=init_fn)
        run = TrainRun(ticket.round, result.rewind_step, result.rewind_step)
        metric = float(train_fn(gm, run))
        out.append(_record(gm, ticket.round, metric, keep_classifier, layers))
    return out


InitFn = Callable[[], nn.Module]


def resample_weights(gm: nn.Module, seed: int, *, init_fn: InitFn | None = None) -> None:
    """Fresh weights under ``seed``; masks are buffers and stay as they are.

    With ``init_fn`` (a callable returning a freshly constructed model, see
    :func:`source_init_fn`), every parameter and buffer of the new model is copied into
    ``gm`` under the same name (BatchNorm running statistics included); entries only
    ``gm`` has (masks, modules added by passes) are left alone, and every masked
    layer's weight must be covered. Without it, ``reset_parameters()`` of every
    submodule that has one (PyTorch's default layer init, not the model's own).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if init_fn is None:
            for module in gm.modules():
                reset = getattr(module, "reset_parameters", None)
                if module is not gm and callable(reset):
                    reset()
            return
        fresh = init_fn().state_dict()
    current = gm.state_dict(keep_vars=True)
    problems = [
        f"{k} {tuple(v.shape)} vs {tuple(current[k].shape)}"
        for k, v in fresh.items()
        if k in current and v.shape != current[k].shape
    ]
    uncovered = [f"{n}.weight" for n in masked_layers(gm) if f"{n}.weight" not in fresh]
    if problems or uncovered:
        raise RewriterError(
            "init_fn built a model that does not match: "
            + "; ".join([*(f"shape of {p}" for p in problems[:3]), *(f"no {u}" for u in uncovered[:3])])
        )
    with torch.no_grad():
        for key, value in fresh.items():
            if key in current:
                current[key].copy_(value)


def source_init_fn(gm: nn.Module) -> InitFn:
    """The model's own initialiser: rebuild it from its recorded factory (zoo or function).

    Raises :class:`~rewriter.RewriterError` when ``gm`` records no factory (a model
    built in Python, or one loaded from a file, whose rebuild would be trained
    weights): pass ``init_fn=lambda: MyModel(...)`` then.
    """
    from rewriter.io import is_file_source, resolve_source

    meta = getattr(gm, "meta", {}) or {}
    source = getattr(gm, "rewriter_source", None) or meta.get("rewriter_source")
    spec = str(source.get("model", "")) if isinstance(source, dict) else ""
    if not spec or is_file_source(spec):
        raise RewriterError(
            "the random re-init control needs the model's own initialiser: pass "
            "init_fn=lambda: MyModel(...) (a freshly constructed model with the same "
            "parameter names); this model records no zoo or factory source to rebuild"
        )
    options = dict(source.get("options", {}))
    return lambda: resolve_source(spec, options)


def _record(
    gm: nn.Module, r: int, metric: float, keep_classifier: bool, layers: list[str] | None
) -> Round:
    masks = get_masks(gm)
    (pool,) = _pools(gm, "global", keep_classifier, layers)
    kept = sum(int((masks[name] != 0).sum()) for name in pool)
    total = sum(masks[name].numel() for name in pool)
    copies = {name: (m != 0).cpu() for name, m in masks.items()}
    return Round(r, kept / total, kept, total, metric, copies)
