"""Random DAG-shaped models for property-based tests and benchmarks.

:func:`random_models` is a ``hypothesis`` strategy and :func:`random_model` builds one model from a
plain integer seed. Both share one builder, which makes its decisions through a small "chooser"
interface implemented once over hypothesis' ``draw`` and once over :class:`random.Random`.

A model is a :class:`RandomDAG`: an ``nn.Module`` whose ``forward`` interprets a fixed tuple of
:class:`Op` records built at construction time. Every op reads one or more earlier values (the
input, or outputs of earlier ops) and appends its outputs, so the network is a DAG with branches
and reuse rather than a chain. ``torch.fx.symbolic_trace`` unrolls the interpreter loop into a
plain graph. Every conv, linear and batch-norm layer is its own submodule of ``model.layers``.

Op vocabulary: conv2d (1x1/3x3, stride 1/2, plain/depthwise/grouped, with or without bias),
BatchNorm2d, ReLU and GELU (as modules or functions), residual add (with a 1x1 projection conv,
optionally + BN, on the shortcut when shapes differ), elementwise multiply, channel concat of 2-3
values, ``torch.split`` / ``torch.chunk`` along channels keeping one or all pieces, 2x2 max/avg
pooling, and heads (flatten + Linear, flatten + Linear-ReLU-Linear, or global average pool +
flatten + Linear). Occasionally a model has two heads and returns a tuple.

After the body ops, values that nothing reads are folded into the last value with (projected)
residual adds, so no layer of a generated model is dead code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

__all__ = ["Op", "RandomDAG", "RandomModel", "random_model", "random_models"]

T = TypeVar("T")

BATCH = 2
"""Batch size of the example inputs."""


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One step of a :class:`RandomDAG`.

    Attributes:
        kind: what ``forward`` does: ``module`` (call ``layers[module]`` on the single input),
            ``relu``, ``gelu``, ``add``, ``mul``, ``cat``, ``split``, ``chunk``, ``max_pool``,
            ``avg_pool``, ``gap`` (functional global average pool) or ``flatten``.
        inputs: ids of the values read (value 0 is the model input).
        tag: category of the op, e.g. ``conv``, ``dwconv``, ``gconv``, ``proj``, ``bn``,
            ``linear``; used for descriptions and vocabulary-coverage checks.
        module: key in ``RandomDAG.layers`` for ``module`` ops.
        arg: ``split_size_or_sections`` for ``split``, the number of chunks for ``chunk``.
        picks: for ``split`` / ``chunk``, the indices of the pieces that become values.
    """

    kind: str
    inputs: tuple[int, ...]
    tag: str
    module: str | None = None
    arg: int | tuple[int, ...] | None = None
    picks: tuple[int, ...] = ()


class RandomDAG(nn.Module):
    """An ``nn.Module`` that interprets a fixed list of :class:`Op` records.

    Values are numbered in creation order: value 0 is the input and every op appends its outputs.
    ``forward`` returns the value ``outputs[0]``, or a tuple when there are several outputs.
    """

    def __init__(
        self, ops: Sequence[Op], layers: dict[str, nn.Module], outputs: Sequence[int]
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.ops: tuple[Op, ...] = tuple(ops)
        self.outputs: tuple[int, ...] = tuple(outputs)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        values = [x]
        for op in self.ops:
            args = [values[i] for i in op.inputs]
            kind = op.kind
            if kind == "module":
                out = self.layers[op.module](args[0])
            elif kind == "relu":
                out = torch.relu(args[0])
            elif kind == "gelu":
                out = F.gelu(args[0])
            elif kind == "add":
                out = args[0] + args[1]
            elif kind == "mul":
                out = args[0] * args[1]
            elif kind == "cat":
                out = torch.cat(args, dim=1)
            elif kind == "max_pool":
                out = F.max_pool2d(args[0], 2)
            elif kind == "avg_pool":
                out = F.avg_pool2d(args[0], 2)
            elif kind == "gap":
                out = F.adaptive_avg_pool2d(args[0], 1)
            elif kind == "flatten":
                out = torch.flatten(args[0], 1)
            elif kind == "module_act_":  # a layer, then an in-place activation on its output
                out = self.layers[op.module](args[0])
                out = _INPLACE_ACTS[op.arg](out)  # type: ignore[index]
            elif kind == "module_iadd":  # a layer, then `out += other`
                out = self.layers[op.module](args[0])
                out += args[1]
            elif kind == "slice":
                lo, hi = op.arg  # type: ignore[misc]
                out = args[0][:, lo:hi]
            elif kind == "gate":  # a sigmoid gate from the value's own pooled channels
                out = args[0] * torch.sigmoid(args[0].mean((2, 3), keepdim=True))
            elif kind == "split":
                pieces = torch.split(args[0], op.arg, dim=1)
                values.extend(pieces[i] for i in op.picks)
                continue
            elif kind == "chunk":
                pieces = torch.chunk(args[0], op.arg, dim=1)
                values.extend(pieces[i] for i in op.picks)
                continue
            else:
                raise ValueError(f"unknown op kind {kind!r}")
            values.append(out)
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return tuple(values[i] for i in self.outputs)


class FunctionalConv2d(nn.Conv2d):
    """A ``nn.Conv2d`` subclass whose own forward calls ``F.conv2d`` on its parameters, as
    library conv variants do (torch.fx traces through it: a functional call on get_attr
    parameters, which the canonical front end lifts back to ``nn.Conv2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """A fused norm + activation: ``F.batch_norm`` on its own parameters, then ``act``."""

    def __init__(self, num_features: int, act: bool) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            self.momentum, self.eps,
        )  # fmt: skip
        return self.act(x)


_INPLACE_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu_": lambda x: x.relu_(),
    "F.relu(inplace)": lambda x: F.relu(x, inplace=True),
    "F.hardswish(inplace)": lambda x: F.hardswish(x, inplace=True),
    "F.silu(inplace)": lambda x: F.silu(x, inplace=True),
}


@dataclass(frozen=True, repr=False)
class RandomModel:
    """A random model, example inputs for it, and a readable listing of its ops."""

    model: nn.Module
    example_inputs: tuple[Tensor, ...]
    description: str

    @property
    def op_tags(self) -> frozenset[str]:
        """The set of op tags (``conv``, ``dwconv``, ``cat``, ``linear``, ...) in the model."""
        ops = getattr(self.model, "ops", ())
        return frozenset(op.tag for op in ops)

    def __repr__(self) -> str:
        return f"RandomModel(\n{self.description}\n)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints falsifying examples with this (IPython's pretty protocol)."""
        printer.text(repr(self))


# --------------------------------------------------------------------------------------------
# Choosers: the builder's source of decisions
# --------------------------------------------------------------------------------------------


class Chooser(Protocol):
    """Source of random decisions for the builder."""

    def integer(self, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``; shrinks towards ``lo``."""
        ...

    def choice(self, options: Sequence[T]) -> T:
        """One of ``options``; shrinks towards the first."""
        ...

    def boolean(self, p: float = 0.5) -> bool:
        """True with probability about ``p``; shrinks towards False."""
        ...


@dataclass
class _RandomChooser:
    rng: random.Random

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def boolean(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


@dataclass
class _DrawChooser:
    draw: Callable[[st.SearchStrategy[T]], T]

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return options[self.draw(st.integers(0, len(options) - 1))]

    def boolean(self, p: float = 0.5) -> bool:
        return self.draw(st.integers(0, 99)) >= 100 - round(100 * p)


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------

# Weighted op vocabulary of the body (repeats raise the weight).
_BODY_OPS: tuple[str, ...] = (
    "conv", "conv", "conv", "bn", "bn", "act", "act", "add", "add", "mul", "cat", "split", "pool",
)  # fmt: skip

# The ways popular libraries write layers (the canonical front end must see through them).
_IDIOM_OPS: tuple[str, ...] = (
    "fconv", "normact", "norm", "conv_act_", "conv_iadd", "slice", "gate",
)  # fmt: skip

Shape = tuple[int, int]
"""(channels, spatial size) of a 4-D value; spatial size 0 marks flat (N, features) values."""


def _fmt(shape: Shape) -> str:
    channels, size = shape
    return f"{channels}x{size}x{size}" if size else f"{channels}"


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _split_sizes(channels: int, split_size: int) -> list[int]:
    """Piece sizes of ``torch.split(x, split_size, 1)`` (also ``torch.chunk``'s rule)."""
    sizes = [split_size] * (channels // split_size)
    if channels % split_size:
        sizes.append(channels % split_size)
    return sizes


@dataclass
class _Builder:
    """Grows an op list value by value, tracking shapes; all decisions come from ``chooser``."""

    chooser: Chooser
    max_channels: int
    min_spatial: int
    window: int = 24
    ops: list[Op] = field(default_factory=list)
    layers: dict[str, nn.Module] = field(default_factory=dict)
    shapes: list[Shape] = field(default_factory=list)
    uses: list[int] = field(default_factory=list)
    spatial: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    # -- bookkeeping ---------------------------------------------------------------------------

    def new_value(self, shape: Shape) -> int:
        vid = len(self.shapes)
        self.shapes.append(shape)
        self.uses.append(0)
        if shape[1]:
            self.spatial.append(vid)
        return vid

    def emit(
        self,
        kind: str,
        inputs: Sequence[int],
        tag: str,
        outputs: Sequence[Shape],
        detail: str = "",
        module: nn.Module | None = None,
        arg: int | tuple[int, ...] | None = None,
        picks: Sequence[int] = (),
    ) -> list[int]:
        """Append an op and its output values; returns the new value ids."""
        name = None
        if module is not None:
            name = f"{tag}_{len(self.ops)}"
            self.layers[name] = module
        self.ops.append(Op(kind, tuple(inputs), tag, name, arg, tuple(picks)))
        for vid in inputs:
            self.uses[vid] += 1
        ids = [self.new_value(shape) for shape in outputs]
        lhs = ", ".join(f"v{i}" for i in ids)
        rhs = ", ".join(f"v{i}" for i in inputs) + (f"; {detail}" if detail else "")
        shapes = ", ".join(_fmt(s) for s in outputs)
        self.lines.append(f"{lhs} = {tag}({rhs})  # {shapes}")
        return ids

    def pick(self, ok: Callable[[int], bool] = lambda vid: True) -> int | None:
        """A recent spatial value satisfying ``ok``, preferring values not used yet."""
        candidates = [vid for vid in self.spatial[-self.window :] if ok(vid)]
        if not candidates:
            return None
        unused = [vid for vid in candidates if self.uses[vid] == 0]
        pool = unused if unused and self.chooser.boolean(0.7) else candidates
        return pool[-1 - self.chooser.integer(0, len(pool) - 1)]  # most recent first

    def can_halve(self, size: int, min_size: int) -> bool:
        return size >= min_size and (size - 1) // 2 + 1 >= self.min_spatial

    # -- body ops (each returns False when infeasible here) -------------------------------------

    def op_conv(self) -> bool:
        c = self.chooser
        vid = self.pick()
        assert vid is not None
        c_in, size = self.shapes[vid]
        kernel = c.choice((3, 1))
        stride = 2 if self.can_halve(size, 4) and c.boolean(0.25) else 1
        mode = c.choice(("plain", "depthwise", "grouped"))
        divisors = [g for g in range(2, c_in + 1) if c_in % g == 0]
        if mode == "depthwise" and c_in > 1:
            groups, c_out = c_in, c_in
        elif mode == "grouped" and divisors:
            groups = c.choice(divisors)
            c_out = groups * c.integer(1, self.max_channels // groups)
        else:
            groups, c_out = 1, c.integer(1, self.max_channels)
        bias = c.boolean()
        if groups == 1:
            tag = "conv"
        elif groups == c_in == c_out:
            tag = "dwconv"
        else:
            tag = "gconv"
        module = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=bias)
        detail = f"{kernel}x{kernel} {c_in}->{c_out} s{stride} g{groups}" + (" bias" * bias)
        out = (c_out, _conv_out(size, kernel, stride))
        self.emit("module", [vid], tag, [out], detail, module)
        return True

    def op_bn(self) -> bool:
        vid = self.pick()
        assert vid is not None
        channels = self.shapes[vid][0]
        self.emit("module", [vid], "bn", [self.shapes[vid]], "", nn.BatchNorm2d(channels))
        return True

    def op_act(self) -> bool:
        c = self.chooser
        vid = self.pick()
        assert vid is not None
        name = c.choice(("relu", "gelu"))
        if c.boolean():
            module = nn.ReLU() if name == "relu" else nn.GELU()
            self.emit("module", [vid], name, [self.shapes[vid]], "module", module)
        else:
            self.emit(name, [vid], name, [self.shapes[vid]])
        return True

    def op_pool(self) -> bool:
        vid = self.pick(lambda v: self.can_halve(self.shapes[v][1], 2))
        if vid is None:
            return False
        channels, size = self.shapes[vid]
        name = self.chooser.choice(("max_pool", "avg_pool"))
        out = (channels, size // 2)
        if self.chooser.boolean():
            module = nn.MaxPool2d(2) if name == "max_pool" else nn.AvgPool2d(2)
            self.emit("module", [vid], name, [out], "module", module)
        else:
            self.emit(name, [vid], name, [out])
        return True

    def _same_shape_partner(self, vid: int) -> int | None:
        return self.pick(lambda v: v != vid and self.shapes[v] == self.shapes[vid])

    def op_mul(self) -> bool:
        a = self.pick()
        assert a is not None
        b = self._same_shape_partner(a)
        if b is None:
            return False
        self.emit("mul", [a, b], "mul", [self.shapes[a]])
        return True

    def op_add(self) -> bool:
        a = self.pick()
        assert a is not None
        b = self._same_shape_partner(a) if self.chooser.boolean(0.6) else None
        if b is None:
            b = self.pick(lambda v: v != a)
        return b is not None and self.add(a, b) is not None

    def add(self, a: int, b: int) -> int | None:
        """``a + b``, projecting one side first when shapes differ; None when impossible."""
        if self.shapes[a] == self.shapes[b]:
            return self.emit("add", [a, b], "add", [self.shapes[a]])[0]
        # Project the shortcut (the larger spatial size) onto the main branch's shape.
        main, short = (a, b) if self.shapes[b][1] >= self.shapes[a][1] else (b, a)
        (c_main, s_main), (c_short, s_short) = self.shapes[main], self.shapes[short]
        strides = [s for s in range(1, s_short + 1) if _conv_out(s_short, 1, s) == s_main]
        if not strides:
            return None
        stride = strides[0]
        conv = nn.Conv2d(c_short, c_main, 1, stride, bias=False)
        detail = f"1x1 {c_short}->{c_main} s{stride}"
        (proj,) = self.emit("module", [short], "proj", [self.shapes[main]], detail, conv)
        if self.chooser.boolean():
            bn = nn.BatchNorm2d(c_main)
            (proj,) = self.emit("module", [proj], "bn", [self.shapes[main]], "", bn)
        return self.emit("add", [main, proj], "add", [self.shapes[main]])[0]

    def merge_unused(self) -> int:
        """Fold every value that nothing reads into the last value with (projected) adds.

        Returns the id of the resulting last value, so that no layer is left dead.
        """
        last = self.spatial[-1]
        for vid in [v for v in self.spatial[:-1] if self.uses[v] == 0]:
            merged = self.add(last, vid)
            if merged is not None:
                last = merged
        return last

    def op_cat(self) -> bool:
        c = self.chooser
        first = self.pick(lambda v: self.shapes[v][0] < self.max_channels)
        if first is None:
            return False
        chosen = [first]
        size = self.shapes[first][1]
        room = self.max_channels - self.shapes[first][0]
        for _ in range(c.choice((1, 2))):
            other = self.pick(
                lambda v, room=room: (
                    v not in chosen and self.shapes[v][1] == size and self.shapes[v][0] <= room
                )
            )
            if other is None:
                break
            chosen.append(other)
            room -= self.shapes[other][0]
        if len(chosen) < 2:
            return False
        channels = sum(self.shapes[v][0] for v in chosen)
        self.emit("cat", chosen, "cat", [(channels, size)])
        return True

    def op_split(self) -> bool:
        c = self.chooser
        vid = self.pick(lambda v: self.shapes[v][0] >= 2)
        if vid is None:
            return False
        channels, size = self.shapes[vid]
        arg: int | tuple[int, ...]
        if c.boolean():  # torch.chunk
            kind, arg = "chunk", c.integer(2, min(4, channels))
            sizes = _split_sizes(channels, math.ceil(channels / arg))
        elif c.boolean():  # torch.split with an int split size
            kind, arg = "split", c.integer(1, channels - 1)
            sizes = _split_sizes(channels, arg)
        else:  # torch.split with explicit sections
            cut = sorted({c.integer(1, channels - 1) for _ in range(c.integer(1, 2))})
            bounds = [0, *cut, channels]
            kind, arg = (
                "split",
                tuple(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)),
            )
            sizes = list(arg)
        if c.boolean():  # keep every piece
            picks = list(range(len(sizes)))
        else:
            picks = [c.integer(0, len(sizes) - 1)]
        detail = f"{arg}, dim=1 -> {sizes}, keep {picks}"
        outputs = [(sizes[i], size) for i in picks]
        self.emit(kind, [vid], kind, outputs, detail, arg=arg, picks=picks)
        return True

    # -- idioms (random_models(idioms=True)) ----------------------------------------------------

    def _conv_module(
        self, vid: int, c_out: int | None = None, cls: type[nn.Conv2d] = nn.Conv2d
    ) -> tuple[nn.Conv2d, Shape, str]:
        c = self.chooser
        c_in, size = self.shapes[vid]
        kernel = c.choice((3, 1))
        c_out = c_out if c_out is not None else c.integer(1, self.max_channels)
        conv = cls(c_in, c_out, kernel, 1, kernel // 2, bias=c.boolean())
        return conv, (c_out, size), f"{kernel}x{kernel} {c_in}->{c_out}"

    def op_fconv(self) -> bool:
        vid = self.pick()
        assert vid is not None
        conv, out, detail = self._conv_module(vid, cls=FunctionalConv2d)
        self.emit("module", [vid], "fconv", [out], detail, conv)
        return True

    def op_normact(self) -> bool:
        vid = self.pick()
        assert vid is not None
        act = self.chooser.boolean()
        module = BatchNormAct2d(self.shapes[vid][0], act)
        self.emit("module", [vid], "normact", [self.shapes[vid]], "relu" if act else "", module)
        return True

    def op_norm(self) -> bool:
        c = self.chooser
        vid = self.pick()
        assert vid is not None
        channels, size = self.shapes[vid]
        if c.boolean():
            groups = c.choice([g for g in range(1, channels + 1) if channels % g == 0])
            module: nn.Module = nn.GroupNorm(groups, channels)
            tag, detail = "gn", f"{groups} groups"
        else:
            module, tag, detail = nn.LayerNorm(size), "ln", f"over W={size}"
        self.emit("module", [vid], tag, [self.shapes[vid]], detail, module)
        return True

    def op_conv_act_(self) -> bool:
        vid = self.pick()
        assert vid is not None
        conv, out, detail = self._conv_module(vid)
        act = self.chooser.choice(tuple(_INPLACE_ACTS))
        self.emit("module_act_", [vid], "conv_act_", [out], f"{detail}, {act}", conv, arg=act)  # type: ignore[arg-type]
        return True

    def op_conv_iadd(self) -> bool:
        vid = self.pick()
        assert vid is not None
        other = self.pick(lambda v: v != vid and self.shapes[v][1] == self.shapes[vid][1])
        if other is None:
            return False
        conv, out, detail = self._conv_module(vid, self.shapes[other][0])
        self.emit("module_iadd", [vid, other], "conv_iadd", [out], f"{detail}, += v{other}", conv)
        return True

    def op_slice(self) -> bool:
        c = self.chooser
        vid = self.pick(lambda v: self.shapes[v][0] >= 2)
        if vid is None:
            return False
        channels, size = self.shapes[vid]
        lo = c.integer(0, channels - 1)
        hi = c.integer(lo + 1, channels)
        self.emit("slice", [vid], "slice", [(hi - lo, size)], f"[:, {lo}:{hi}]", arg=(lo, hi))
        return True

    def op_gate(self) -> bool:
        vid = self.pick()
        assert vid is not None
        self.emit("gate", [vid], "gate", [self.shapes[vid]], "x * sigmoid(mean(x))")
        return True

    # -- heads ----------------------------------------------------------------------------------

    def head(self, vid: int, num_classes: int) -> int:
        """Append a classifier head on value ``vid``; returns the logits' value id."""
        c = self.chooser
        channels, size = self.shapes[vid]
        style = c.choice(("flatten", "gap", "mlp"))
        if style == "gap":
            pooled = (channels, 1)
            if c.boolean():
                pool = nn.AdaptiveAvgPool2d(1)
                (vid,) = self.emit("module", [vid], "gap", [pooled], "module", pool)
            else:
                (vid,) = self.emit("gap", [vid], "gap", [pooled])
            size = 1
        (flat,) = self.emit("flatten", [vid], "flatten", [(channels * size * size, 0)])
        features = channels * size * size
        if style == "mlp":
            hidden = c.integer(4, 32)
            linear = nn.Linear(features, hidden, bias=c.boolean(0.8))
            detail = f"{features}->{hidden}"
            (flat,) = self.emit("module", [flat], "linear", [(hidden, 0)], detail, linear)
            (flat,) = self.emit("relu", [flat], "relu", [(hidden, 0)])
            features = hidden
        linear = nn.Linear(features, num_classes, bias=c.boolean(0.8))
        detail = f"{features}->{num_classes}"
        (logits,) = self.emit("module", [flat], "linear", [(num_classes, 0)], detail, linear)
        return logits


def _randomise_batchnorm(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Give BN layers non-trivial affine parameters and running statistics (global RNG).

    Runs two train-mode forwards on one intra-op thread: the tensors are tiny, so threads only add
    overhead (a lot of it on a busy machine), and the statistics do not depend on the caller's
    thread setting.
    """
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
            model.train()
            for _ in range(2):
                model(torch.randn(input_shape) * 1.5 + 0.25)
    finally:
        torch.set_num_threads(threads)


def _build(
    chooser: Chooser,
    *,
    num_ops: int,
    max_channels: int,
    min_spatial: int,
    allow_two_outputs: bool,
    idioms: bool = False,
) -> RandomModel:
    """Build one random model; every decision comes from ``chooser``."""
    vocabulary = _BODY_OPS + _IDIOM_OPS if idioms else _BODY_OPS
    in_channels = chooser.integer(1, min(4, max_channels))
    size = chooser.choice((8, 6))
    num_classes = chooser.integer(2, 10)
    seed = chooser.integer(0, 2**31 - 1)
    input_shape = (BATCH, in_channels, size, size)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        builder = _Builder(chooser, max_channels, min_spatial)
        builder.new_value((in_channels, size))
        for _ in range(num_ops):
            kind = chooser.choice(vocabulary)
            if not getattr(builder, f"op_{kind}")():
                builder.op_act()  # always feasible
        outputs = [builder.head(builder.merge_unused(), num_classes)]
        if allow_two_outputs and chooser.boolean(0.15):
            other = builder.pick()
            assert other is not None
            outputs.append(builder.head(other, chooser.integer(2, 10)))
        model = RandomDAG(builder.ops, builder.layers, outputs)
        _randomise_batchnorm(model, input_shape)

    generator = torch.Generator().manual_seed(seed)
    example = (torch.randn(input_shape, generator=generator),)
    returns = ", ".join(f"v{i}" for i in outputs)
    header = f"input v0: {BATCH}x{in_channels}x{size}x{size}, seed={seed}"
    description = "\n".join([header, *builder.lines, f"return {returns}"])
    return RandomModel(model, example, description)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _check(min_ops: int, max_ops: int, max_channels: int) -> None:
    if not 0 <= min_ops <= max_ops:
        raise ValueError(f"need 0 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if max_channels < 1:
        raise ValueError(f"max_channels must be >= 1, got {max_channels}")


def random_models(
    *,
    min_ops: int = 2,
    max_ops: int = 12,
    max_channels: int = 16,
    allow_two_outputs: bool = True,
    idioms: bool = True,
) -> st.SearchStrategy[RandomModel]:
    """Hypothesis strategy of random DAG models with ``min_ops``..``max_ops`` body ops.

    The models are tiny (at most ``max_channels`` channels, inputs ``2 x C x H x H`` with C in
    1..4 and H in {6, 8}), end in one classifier head (occasionally two, returned as a tuple), are
    in train mode with warmed-up BN statistics, and are deterministic given the draw.
    With ``idioms`` (the default) the vocabulary also has layers written the ways libraries
    write them: functional convs on their own parameters, fused BatchNorm+activation
    subclasses, GroupNorm and LayerNorm, in-place activations and ``out += x`` after a
    layer, channel slices ``x[:, a:b]`` and sigmoid gates ``x * sigmoid(mean(x))``.
    """
    _check(min_ops, max_ops, max_channels)

    @st.composite
    def strategy(draw: st.DrawFn) -> RandomModel:
        chooser = _DrawChooser(draw)
        return _build(
            chooser,
            num_ops=chooser.integer(min_ops, max_ops),
            max_channels=max_channels,
            min_spatial=1,
            allow_two_outputs=allow_two_outputs,
            idioms=idioms,
        )

    return strategy()


def random_model(
    seed: int,
    *,
    num_ops: int | None = None,
    min_ops: int = 2,
    max_ops: int = 12,
    max_channels: int | None = None,
    min_spatial: int | None = None,
    allow_two_outputs: bool = True,
    idioms: bool = False,
) -> RandomModel:
    """Build one deterministic random model from an integer seed, without hypothesis.

    Args:
        seed: seed of the ``random.Random`` making every decision (and of the weights).
        num_ops: exact number of body ops (the graph also gets the adds that fold unused values
            in, and the heads); drawn from ``min_ops..max_ops`` when omitted. Large values
            (thousands) build large graphs quickly, for benchmarks.
        max_channels: channel cap; defaults to 16, or 4 when ``num_ops > 64``.
        min_spatial: no stride or pooling below this spatial size; defaults to 1, or 4 when
            ``num_ops > 64`` so that large graphs keep non-trivial feature maps.
        allow_two_outputs: whether the model may occasionally have two heads.
        idioms: add the idiom vocabulary of :func:`random_models` (off by default, so a
            seed keeps building the graph benchmarks and seeded tests were written for).
    """
    cap = 1 if max_channels is None else max_channels
    if num_ops is None:
        _check(min_ops, max_ops, cap)
    else:
        _check(num_ops, num_ops, cap)
    chooser = _RandomChooser(random.Random(seed))
    if num_ops is None:
        num_ops = chooser.integer(min_ops, max_ops)
    large = num_ops > 64
    return _build(
        chooser,
        num_ops=num_ops,
        max_channels=max_channels if max_channels is not None else (4 if large else 16),
        min_spatial=min_spatial if min_spatial is not None else (4 if large else 1),
        allow_two_outputs=allow_two_outputs,
        idioms=idioms,
    )
