"""Multiply-accumulate (MAC) and parameter counts, per node and in total.

``flops(gm, example_inputs)`` propagates shapes through ``gm`` with the example
inputs (eval mode, no grad; training flags, buffers and the global RNG are left
exactly as they were) and counts every node.

Convention: **multiply-accumulates (MACs)** for the whole batch given. One MAC is
one multiply followed by one add; ``FlopsReport.flops`` is ``2 * total_macs`` for
readers who want the usual "FLOPs = 2 x MACs" figure. Costs per node kind
(``numel`` is the number of output elements unless stated):

==============  =============================================================
conv            ``numel * (C_in / groups) * prod(kernel)`` (+ ``numel`` with a
                bias); transposed convs ``input numel * (C_out / groups) *
                prod(kernel)`` (+ bias)
linear          ``numel * in_features`` (+ ``numel`` with a bias); leading
                batch dims (tokens, heads) are in ``numel``
matmul          ``matmul``/``mm``/``bmm``/``@``: ``numel * K`` with ``K`` the
                contracted size; ``addmm``/``baddbmm`` add ``numel``
attention       ``scaled_dot_product_attention`` on ``(B, H, L, E)`` queries and
                ``(B, H_kv, S, E)`` keys: ``B*H*L*S * (E + E_v)`` (``Q K^T`` and
                ``A V``, per query head) ``+ SOFTMAX_MACS * B*H*L*S``
norm            BatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm:
                ``NORM_MACS * numel`` (normalise, then affine)
elementwise     add/sub/mul/div/pow/neg..., activations (ReLU, GELU, SiLU,
                sigmoid...), upsampling: ``numel``
softmax         softmax/log_softmax: ``SOFTMAX_MACS * numel`` (exp, sum, divide)
pool            max/avg pooling: ``numel * prod(kernel)``; adaptive pooling:
                input numel
reduce          mean, sum, amax, var...: input numel
free            views, reshapes, permutes, indexing, cat/split/chunk, dropout,
                identity, flatten, padding, embedding lookups: 0
custom          a module defining ``rewriter_macs(input_shapes, output_shape)``:
                what it returns
unknown         anything else: 0, and listed in ``FlopsReport.unknown``
==============  =============================================================

Parameters and buffers are attributed to the first node that uses them (the
``call_module`` node of a leaf module, or a ``get_attr`` node); the totals are
over ``gm.parameters()`` and ``gm.buffers()`` (shared tensors counted once).

**Dynamic channels** (``channel_keep``; ManiDP-style gates): ``channel_keep[layer]``
is the fraction of ``layer``'s output channels that is executed, as a float or as a
tensor of per-sample fractions of shape ``(N,)``. ``layer`` is a module's qualified
name (every call of it) or an fx node name. The fraction scales MACs as follows:

* the layer itself: its MACs (bias included) are multiplied by its fraction;
* it *flows* along the layer's output through per-channel nodes (norms,
  activations and other unary elementwise ops, pooling, dropout/identity,
  depthwise convs, elementwise ops with a scalar or broadcast second operand
  such as a per-channel scale or bias, and custom modules whose output has their
  first input's shape, such as gates); norms, elementwise ops, pooling and
  depthwise convs reached this way are scaled by it (a custom module's own MACs
  are not);
* a conv or linear layer whose input carries a fraction ``k_in`` executes only
  that fraction of its input channels: its MACs are multiplied by ``k_in``, except
  its bias additions (one per output, whatever the inputs), and by its own output
  fraction, if it has one. Grouped convs are assumed to keep the
  same fraction in every group.
* The flow stops at anything else: elementwise ops of two full-size tensors
  (residual adds: the other operand keeps all its channels), concatenations,
  reshapes, flatten, reductions, matmuls, softmax.
* A per-channel node named in ``channel_keep`` (a BN, a depthwise conv, a gate)
  replaces the incoming fraction with its own; any other named node scales its
  own MACs and starts a new flow.

Per-sample MACs are each node's MACs divided by the batch size (dim 0 of the
first input) times that sample's fraction; ``FlopsReport.per_sample`` holds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import RewriterError
from ..lift import overlapping
from ..manager import _propagate_shapes
from ..tracing import trace

__all__ = ["NORM_MACS", "SOFTMAX_MACS", "FlopsReport", "FlopsRow", "flops"]

NORM_MACS = 2
"""MACs per output element of a normalisation layer (normalise, then affine)."""

SOFTMAX_MACS = 3
"""MACs per output element of a softmax (exponential, sum, divide)."""

Shape = tuple[int, ...]
Fraction = float | Tensor


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsRow:
    """The cost of one fx node.

    Attributes:
        name: the fx node name.
        target: the module's qualified name, or the function / method name.
        kind: ``conv``, ``linear``, ``matmul``, ``attention``, ``norm``, ``elementwise``,
            ``softmax``, ``pool``, ``reduce``, ``free``, ``custom``, ``param`` (a ``get_attr``)
            or ``unknown``.
        macs: MACs for the whole batch with every channel executed.
        params: parameters first used by this node.
        buffers: buffer elements first used by this node.
        shape: the output shape (``None`` when the output is not one tensor).
        keep: mean fraction of ``macs`` executed under ``channel_keep`` (1.0 without).
    """

    name: str
    target: str
    kind: str
    macs: int
    params: int
    buffers: int
    shape: Shape | None
    keep: float = 1.0

    @property
    def expected_macs(self) -> float:
        """MACs executed for the batch under ``channel_keep`` (``macs * keep``)."""
        return self.macs * self.keep


@dataclass(frozen=True)
class FlopsReport:
    """MACs and parameter counts of a GraphModule for one batch of inputs.

    Attributes:
        rows: one row per node that computes or owns parameters, in graph order.
        total_macs: MACs of the whole batch with every channel executed.
        total_params: ``sum(p.numel() for p in gm.parameters())``.
        total_buffers: ``sum(b.numel() for b in gm.buffers())``.
        batch: dim 0 of the first example input.
        unknown: ``"node (target)"`` for every tensor-producing node whose cost is
            not known; those nodes count 0.
        expected_macs: MACs of the batch under ``channel_keep`` (``total_macs`` without).
        per_sample: float64 tensor ``(batch,)`` of each sample's executed MACs.
    """

    rows: list[FlopsRow]
    total_macs: int
    total_params: int
    total_buffers: int
    batch: int
    unknown: list[str]
    expected_macs: float
    per_sample: Tensor = field(repr=False)

    @property
    def per_sample_macs(self) -> float:
        """Mean executed MACs per sample (``total_macs / batch`` without ``channel_keep``)."""
        return self.expected_macs / self.batch

    @property
    def flops(self) -> int:
        """``2 * total_macs``: the dense cost in FLOPs under the usual 2-per-MAC convention."""
        return 2 * self.total_macs

    @property
    def reduction(self) -> float:
        """Fraction of the dense MACs saved under ``channel_keep`` (0.0 without)."""
        return 1.0 - self.expected_macs / self.total_macs if self.total_macs else 0.0

    def row(self, key: str) -> FlopsRow:
        """The row of the node named ``key``, or of the first call of the module ``key``."""
        for r in self.rows:
            if r.name == key:
                return r
        for r in self.rows:
            if r.target == key:
                return r
        raise KeyError(f"no node or module named {key!r} in this report")

    def table(self) -> str:
        """A text table: one line per row, then totals and the unknown nodes."""
        dynamic = any(r.keep != 1.0 for r in self.rows)
        head = ["node", "target", "kind", "output", "MACs", "params"] + (["kept"] * dynamic)
        lines = [head]
        for r in self.rows:
            shape = "x".join(map(str, r.shape)) if r.shape is not None else "-"
            line = [r.name, r.target, r.kind, shape, f"{r.macs:,}", f"{r.params:,}"]
            lines.append(line + ([f"{r.keep:.3f}"] * dynamic))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        text.append(
            f"total: {self.total_macs:,} MACs for batch {self.batch} "
            f"({self.total_macs / self.batch:,.0f} per sample), {self.total_params:,} params, "
            f"{self.total_buffers:,} buffer elements"
        )
        if dynamic:
            text.append(
                f"executed under channel_keep: {self.expected_macs:,.0f} MACs "
                f"({self.per_sample_macs:,.0f} per sample, {self.reduction:.1%} saved)"
            )
        text.extend(f"not counted (unknown op): {u}" for u in self.unknown)
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------------

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Threshold,
    nn.LogSigmoid, nn.GLU, nn.Upsample,
)  # fmt: skip
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
)  # fmt: skip
_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_ADAPTIVE_POOLS: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_SOFTMAXES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_FREE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.Flatten, nn.Unflatten, nn.Embedding,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ChannelShuffle,
    nn.PixelShuffle, nn.PixelUnshuffle,
)  # fmt: skip
# Free modules that act per channel (a channel fraction flows through them).
_PER_CHANNEL_FREE: tuple[type[nn.Module], ...] = (nn.Identity, nn.modules.dropout._DropoutNd)

_UNARY_NAMES = {
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu",
    "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus",
    "exp", "log", "sqrt", "rsqrt", "abs", "neg", "__neg__", "clamp", "clamp_", "clip", "square",
    "reciprocal", "sin", "cos", "erf", "logsigmoid", "glu", "interpolate", "upsample",
}  # fmt: skip
_BINARY_NAMES = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "pow", "pow_",
    "maximum", "minimum", "where", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
    "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__",
    "__itruediv__", "__pow__", "floordiv", "truediv", "iadd", "isub", "imul", "itruediv",
    "masked_fill", "masked_fill_", "lerp", "addcmul",
}  # fmt: skip
_SOFTMAX_NAMES = {"softmax", "log_softmax", "softmin"}
_MATMUL_NAMES = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "mv", "dot"}
_ADDMM_NAMES = {"addmm", "baddbmm", "addbmm", "addmv"}
_REDUCE_NAMES = {
    "mean", "sum", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "logsumexp",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d",
}  # fmt: skip
_POOL_NAMES = {
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "lp_pool1d", "lp_pool2d",
}  # fmt: skip
_NORM_NAMES = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm"}
_CONV_NAMES = {"conv1d", "conv2d", "conv3d"}
_CONV_T_NAMES = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_FREE_NAMES = {
    "getitem", "getattr", "size", "dim", "view", "view_as", "reshape", "reshape_as", "permute",
    "transpose", "t", "flatten", "unflatten", "contiguous", "unsqueeze", "squeeze", "expand",
    "expand_as", "cat", "concat", "concatenate", "stack", "split", "chunk", "unbind", "narrow",
    "select", "index_select", "gather", "flip", "roll", "repeat", "tile", "clone", "detach",
    "to", "type", "float", "double", "half", "bfloat16", "int", "long", "bool", "pad",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "identity", "zeros_like", "ones_like", "full_like", "empty_like", "zeros", "ones",
    "arange", "tensor", "movedim", "moveaxis", "swapaxes", "swapdims", "embedding",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "masked_select", "new_zeros",
    "new_ones", "type_as", "requires_grad_", "slice", "sym_size", "alias",
    "_assert_tensor_metadata",
}  # fmt: skip
_PER_CHANNEL_FREE_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "contiguous",
                           "clone", "detach", "alpha_dropout", "feature_alpha_dropout"}  # fmt: skip


def _fn_name(target: Any) -> str:
    """The bare name of a call_function / call_method target (``torch.relu`` -> ``relu``)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):  # aten.pow.Tensor_Scalar -> pow
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _target_label(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    module = getattr(node.target, "__module__", None) or ""
    name = _fn_name(node.target)
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    if module.startswith("torch") or module == "":
        return f"torch.{name}"
    return f"{module}.{name}"


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def _shape(node: Any) -> Shape | None:
    """The shape of a node's single tensor output, from shape propagation."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    return None


def _numel(shape: Shape | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


# --------------------------------------------------------------------------------------------
# Per-node costs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cost:
    kind: str
    macs: int
    flow: str = "stop"  # how a channel fraction crosses this node: stop | mix | through
    source: fx.Node | None = None  # the input a fraction flows from
    bias: int = 0  # MACs of the bias additions (a conv/linear): they do not follow k_in


def _first_tensor_input(node: fx.Node) -> fx.Node | None:
    for a in node.args:
        if isinstance(a, fx.Node) and _shape(a) is not None:
            return a
    return None


def _module_cost(node: fx.Node, module: nn.Module) -> _Cost:
    out = _shape(node)
    numel = _numel(out)
    src = _first_tensor_input(node)
    in_shape = _shape(src)
    custom: Callable[..., int] | None = getattr(module, "rewriter_macs", None)
    if callable(custom):
        inputs = [s for a in node.args if (s := _shape(a)) is not None]
        through = src is not None and out is not None and out == in_shape
        return _Cost("custom", int(custom(inputs, out)), "through" if through else "stop", src)
    if isinstance(module, nn.modules.conv._ConvNd) and out is not None and in_shape is not None:
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            macs = _numel(in_shape) * (module.out_channels // module.groups) * kernel
        else:
            macs = numel * (module.in_channels // module.groups) * kernel
        bias = numel if module.bias is not None else 0
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return _Cost("conv", macs + bias, "through" if depthwise else "mix", src, bias)
    if isinstance(module, nn.Linear) and out is not None:
        bias = numel if module.bias is not None else 0
        return _Cost("linear", numel * module.in_features + bias, "mix", src, bias)
    if isinstance(module, _NORMS):
        return _Cost("norm", NORM_MACS * numel, "through", src)
    if isinstance(module, _ACTIVATIONS):
        return _Cost("elementwise", numel, "through", src)
    if isinstance(module, _SOFTMAXES):
        return _Cost("softmax", SOFTMAX_MACS * numel)
    if isinstance(module, _POOLS):
        dims = len(in_shape) - 2 if in_shape is not None else 1
        kernel = math.prod(_tuple(module.kernel_size, max(dims, 1)))
        return _Cost("pool", numel * kernel, "through", src)
    if isinstance(module, _ADAPTIVE_POOLS):
        return _Cost("pool", _numel(in_shape), "through", src)
    if isinstance(module, _FREE_MODULES):
        return _Cost("free", 0, "through" if isinstance(module, _PER_CHANNEL_FREE) else "stop", src)
    return _Cost("unknown", 0)


def _function_cost(node: fx.Node) -> _Cost:
    name = _fn_name(node.target)
    out = _shape(node)
    numel = _numel(out)
    src = _first_tensor_input(node)
    first_shape = _shape(node.args[0] if node.args else None)
    if name in _CONV_NAMES or name in _CONV_T_NAMES:
        weight = _shape(_arg(node, 1, "weight"))
        if weight is None or out is None:
            return _Cost("unknown", 0)
        kernel = math.prod(weight[2:])
        groups = _arg(node, 6, "groups", 1)
        if name in _CONV_T_NAMES:
            macs = _numel(first_shape) * weight[1] * kernel
        else:
            macs = numel * weight[1] * kernel
        bias = numel if _arg(node, 2, "bias") is not None else 0
        depthwise = isinstance(groups, int) and groups > 1 and weight[1] == 1
        return _Cost("conv", macs + bias, "through" if depthwise else "mix", src, bias)
    if name == "linear":
        weight = _shape(_arg(node, 1, "weight"))
        if weight is None:
            return _Cost("unknown", 0)
        bias = numel if _arg(node, 2, "bias") is not None else 0
        return _Cost("linear", numel * weight[-1] + bias, "mix", src, bias)
    if name in _MATMUL_NAMES or name in _ADDMM_NAMES:
        offset = 1 if name in _ADDMM_NAMES else 0
        a = _shape(node.args[offset]) if len(node.args) > offset else None
        if a is None or out is None:
            return _Cost("unknown", 0)
        extra = numel if name in _ADDMM_NAMES else 0
        return _Cost("matmul", numel * a[-1] + extra)
    if name in _ATTENTION_NAMES:
        return _attention_cost(node)
    if name == "einsum":
        return _Cost("unknown", 0)
    if name in _NORM_NAMES:
        return _Cost("norm", NORM_MACS * numel, "through", src)
    if name in _SOFTMAX_NAMES:
        return _Cost("softmax", SOFTMAX_MACS * numel)
    if name in _POOL_NAMES:
        kernel = _arg(node, 1, "kernel_size")
        dims = len(first_shape) - 2 if first_shape is not None else 1
        if kernel is None:
            return _Cost("unknown", 0)
        return _Cost("pool", numel * math.prod(_tuple(kernel, max(dims, 1))), "through", src)
    if name in _REDUCE_NAMES:
        return _Cost("reduce", _numel(first_shape))
    if name in _UNARY_NAMES:
        return _Cost("elementwise", numel, "through", src)
    if name in _BINARY_NAMES:
        return _binary_cost(node, name, numel, out)
    if name in _FREE_NAMES:
        through = name in _PER_CHANNEL_FREE_NAMES
        return _Cost("free", 0, "through" if through else "stop", src)
    return _Cost("unknown", 0)


_ATTENTION_NAMES = {"scaled_dot_product_attention"}


def _attention_cost(node: fx.Node) -> _Cost:
    """``scaled_dot_product_attention(q, k, v)``: ``Q K^T`` and ``A V`` per query head, and
    the softmax; a kv head shared by several query heads (GQA) is counted for each."""
    q, k, v = (_shape(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None or len(q) < 2:
        return _Cost("unknown", 0)
    scores = math.prod(q[:-1]) * k[-2]  # one score per query position and key position
    return _Cost("attention", scores * (q[-1] + v[-1]) + SOFTMAX_MACS * scores)


def _binary_cost(node: fx.Node, name: str, numel: int, out: Shape | None) -> _Cost:
    """Elementwise op on several operands.

    A fraction flows from the one operand of the output's shape when the others are
    scalars or broadcast (a per-channel scale, bias or gate); it stops where two
    full-size tensors meet (a residual add, a product of two activations).
    """
    full = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) == out]
    if len(full) == 1:
        return _Cost("elementwise", numel, "through", full[0])
    return _Cost("elementwise", numel)


def _node_cost(node: fx.Node, modules: Mapping[str, nn.Module]) -> _Cost:
    if node.op == "call_module":
        return _module_cost(node, modules[str(node.target)])
    if node.op in ("call_function", "call_method"):
        if node.meta.get("tensor_meta") is None:
            return _Cost("free", 0)  # Python values (sizes, shape arithmetic)
        return _function_cost(node)
    return _Cost("free", 0)


# --------------------------------------------------------------------------------------------
# Channel fractions
# --------------------------------------------------------------------------------------------


def _check_keep(
    gm: fx.GraphModule, channel_keep: Mapping[str, Fraction], batch: int
) -> dict[str, Fraction]:
    names = {n.name for n in gm.graph.nodes}
    layers = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    checked: dict[str, Fraction] = {}
    for key, value in channel_keep.items():
        if key not in names and key not in layers:
            raise RewriterError(
                f"channel_keep names {key!r}, which is neither a called module nor a node of "
                f"the graph; layers are: {', '.join(sorted(layers)) or '(none)'}"
            )
        if isinstance(value, Tensor):
            value = value.detach().to(torch.float64).cpu()
            if value.dim() == 0:
                value = float(value)
            elif value.shape != (batch,):
                raise RewriterError(
                    f"channel_keep[{key!r}] has shape {tuple(value.shape)}; give a float or a "
                    f"tensor of per-sample fractions of shape ({batch},)"
                )
        values = value if isinstance(value, Tensor) else torch.tensor([float(value)])
        if not bool(((values >= 0) & (values <= 1)).all()):
            raise RewriterError(f"channel_keep[{key!r}] must lie in [0, 1], got {value!r}")
        checked[key] = value if isinstance(value, Tensor) else float(value)
    return checked


def _scales(
    gm: fx.GraphModule,
    costs: dict[fx.Node, _Cost],
    channel_keep: Mapping[str, Fraction],
) -> dict[fx.Node, Fraction]:
    """Per node, the fraction of its MACs executed (see the module docstring)."""
    carried: dict[fx.Node, Fraction] = {}
    scale: dict[fx.Node, Fraction] = {}
    for node in gm.graph.nodes:
        cost = costs.get(node)
        if cost is None:
            continue
        own = channel_keep.get(node.name)
        if own is None and node.op == "call_module":
            own = channel_keep.get(str(node.target))
        k_in = carried.get(cost.source, 1.0) if cost.source is not None else 1.0
        if cost.flow == "mix":
            out = 1.0 if own is None else own
            inner = k_in
            if cost.bias and cost.macs:  # the bias is added once per output, whatever k_in
                inner = (k_in * (cost.macs - cost.bias) + cost.bias) / cost.macs
            scale[node], carried[node] = inner * out, out
        elif cost.flow == "through":
            k = k_in if own is None else own
            scale[node] = 1.0 if cost.kind == "custom" and own is None else k
            carried[node] = k
        else:
            out = 1.0 if own is None else own
            scale[node], carried[node] = out, out
    return scale


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@contextmanager
def _state_kept(gm: nn.Module) -> Iterator[None]:
    """Restore every buffer and the global RNG after the block (shape propagation)."""
    # A buffer whose elements share memory (an expanded constant, stride 0) cannot be
    # written, in place or back, so it is not restored. Lifted programs and graphs that
    # rewriter.trace / rewrite build hold none (they are materialised), but flops also
    # takes GraphModules made by torch.fx.symbolic_trace (fx folds `buf.expand(...)` into a
    # stride-0 `_tensor_constant`) and leaf modules that trace shares with the user's model.
    saved = {name: b.detach().clone() for name, b in gm.named_buffers() if not overlapping(b)}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in gm.named_buffers():
                    if name in saved:
                        b.copy_(saved[name])


def flops(
    gm: nn.Module,
    example_inputs: Sequence[Tensor] | Tensor,
    channel_keep: Mapping[str, Fraction] | None = None,
) -> FlopsReport:
    """Count MACs (multiply-accumulates) and parameters of ``gm`` on ``example_inputs``.

    ``gm`` is an ``fx.GraphModule`` (any other module is traced first with
    :func:`rewriter.trace`). Shapes are propagated in eval mode without grad; the
    model's training flags, buffers and the global RNG are left unchanged (node
    ``tensor_meta`` is refreshed for these inputs). The counting rules and the
    ``channel_keep`` semantics are in this module's docstring.

    Args:
        gm: the model.
        example_inputs: the forward's positional inputs; the batch is dim 0 of the first.
        channel_keep: optional ``{layer or node name: fraction}``, the fraction of that
            layer's output channels executed, a float or a per-sample tensor ``(N,)``.

    Returns:
        A :class:`FlopsReport`; ``total_macs`` counts every channel, ``expected_macs``
        and ``per_sample`` apply ``channel_keep``.
    """
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    if not isinstance(gm, fx.GraphModule):
        gm = trace(gm)
    first = next((x for x in inputs if isinstance(x, Tensor)), None)
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    keep = _check_keep(gm, channel_keep or {}, batch)

    with _state_kept(gm):
        _propagate_shapes(gm, inputs)

    modules = dict(gm.named_modules())
    costs: dict[fx.Node, _Cost] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            costs[node] = _node_cost(node, modules)
    scale = _scales(gm, costs, keep)

    seen: set[int] = set()

    def first_use(tensors: list[Tensor]) -> int:
        count = 0
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                count += t.numel()
        return count

    rows: list[FlopsRow] = []
    unknown: list[str] = []
    per_sample = torch.zeros(batch, dtype=torch.float64)
    for node in gm.graph.nodes:
        params = buffers = 0
        if node.op == "call_module":
            module = modules[str(node.target)]
            params = first_use(list(module.parameters()))
            buffers = first_use(list(module.buffers()))
        elif node.op == "get_attr":
            value = _get_attr(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                params = first_use([value])
            elif isinstance(value, Tensor):
                buffers = first_use([value])
        cost = costs.get(node)
        if cost is None and not (params or buffers):
            continue
        kind = cost.kind if cost is not None else "param"
        macs = cost.macs if cost is not None else 0
        if kind == "unknown":
            unknown.append(f"{node.name} ({_target_label(node)})")
        s = scale.get(node, 1.0)
        per_sample += (macs / batch) * s
        mean = float(s.mean()) if isinstance(s, Tensor) else float(s)
        rows.append(
            FlopsRow(
                node.name, _target_label(node), kind, macs, params, buffers, _shape(node), mean
            )
        )

    return FlopsReport(
        rows=rows,
        total_macs=sum(r.macs for r in rows),
        total_params=sum(p.numel() for p in gm.parameters()),
        total_buffers=sum(b.numel() for b in gm.buffers()),
        batch=batch,
        unknown=unknown,
        expected_macs=float(sum(r.expected_macs for r in rows)),
        per_sample=per_sample,
    )


def _get_attr(gm: nn.Module, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
