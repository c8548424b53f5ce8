"""Per-op rules of the channel analysis: how each op moves, creates and couples channels.

Each rule reads its inputs' values (:class:`~rewriter.analysis.coupling.Tracked`: the
followed channel dimension of a tensor and one atom per channel) and returns the
node's value. A rule that meets a case it does not understand *blocks* the atoms
involved with a reason (their whole group becomes not prunable) and returns
``None`` (a tensor whose channels the analysis no longer follows). Anything not in
these tables is blocked by the dispatcher. Layer and elementwise rules are here; rules
that move channels around (cat, split, indexing, reshape...) are in
:mod:`rewriter.analysis.rules_structure`.

Conventions worth knowing when reading a rule:

* the batch dimension is never a channel dimension; model inputs are followed at dim 1
  and blocked ("model input");
* convs read channels at dim 1, linears at the last dim;
* ``zero-preserving`` ops map an all-zero channel to an all-zero channel; the others
  (sigmoid, adding a constant, softmax...) are recorded with ``mark_nonzero`` so that
  slimming zeroed filters also checks the consumers (see :mod:`rewriter.slim`).
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rewriter.passes.masks import MASKED
from rewriter.passes.norm import RepresentativeBatchNorm2d

from ..canonical import HeadAttention
from ..modules import RewriterModule
from .coupling import Coupler, Handler, SliceRecord, Tracked, Value, arg, describe
from .rules_structure import (
    cat,
    flatten,
    get_attribute,
    getitem,
    nothing,
    numel,
    pad,
    permute,
    reduction,
    reshape,
    size,
    softmax,
    split,
    squeeze,
    transpose,
    unsqueeze,
)

__all__ = ["lookup"]


def input_channels(c: Coupler, node: fx.Node, n: int, dim: int) -> tuple[int, ...]:
    """The atoms of the ``n`` channels a layer reads at ``dim`` of its first argument.

    When the analysis does not follow that dimension, the layer's input channels get
    fresh atoms blocked with the reason (and a followed dimension it reads is blocked).
    """
    src = node.args[0]
    x = c.tracked(src)
    if x is not None and x.dim == dim and len(x.atoms) == n:
        return x.atoms
    what = describe(node)
    if x is not None:
        c.block(x.atoms, f"{what} reads dim {dim}, but the channel dim of its input is {x.dim}")
    atoms = c.fresh(n)
    c.block(
        atoms, f"the input channels of {what} come from a computation the analysis cannot follow"
    )
    return atoms


def same(c: Coupler, node: fx.Node, zero_preserving: bool = True) -> Value:
    """An op that keeps every channel where it is (elementwise, identity)."""
    x = c.tracked(node.args[0]) if node.args else None
    if x is None:
        return None
    if c.shape(node) != c.shape(node.args[0]):
        c.block(x.atoms, f"{describe(node)} changes the shape of its input")
        return None
    if not zero_preserving:
        c.mark_nonzero(x.atoms, describe(node))
    return x


def batched_ndims(c: Coupler, node: fx.Node) -> set[int] | None:
    """Input ranks at which a ``...Nd`` op sees a batch and channels at dims 0 and 1.

    From the class or function name (``MaxPool2d``: 4; ``BatchNorm1d``: 2 or 3); ``None``
    for ops without a dimensionality in their name (upsampling).
    """
    if node.op == "call_module":
        name = type(c.modules[str(node.target)]).__name__
    else:
        name = getattr(node.target, "__name__", "")
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return {k + 2, 2} if name == "BatchNorm1d" else {k + 2}
    return None


def per_channel(c: Coupler, node: fx.Node, zero_preserving: bool = True) -> Value:
    """An op acting on each channel (dim 1) separately: pooling, resizing, padding."""
    x = c.tracked(node.args[0]) if node.args else None
    if x is None:
        return None
    shape, ndims = c.shape(node.args[0]), batched_ndims(c, node)
    if shape is None or (len(shape) not in ndims if ndims else len(shape) < 3):
        c.block(x.atoms, f"{describe(node)} gets an input without batch and channel dims")
        return None
    if x.dim != 1:
        c.block(x.atoms, f"{describe(node)} acts along the channel dim {x.dim}")
        return None
    if not zero_preserving:
        c.mark_nonzero(x.atoms, describe(node))
    return Tracked(1, x.atoms)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def conv(c: Coupler, node: fx.Node) -> Value:
    """conv: fresh output channels; groups couple channels (see ``channels`` module docs)."""
    name = str(node.target)
    m = c.modules[name]
    shape = c.shape(node.args[0])
    if shape is None or len(shape) != len(m.kernel_size) + 2:
        c.block_inputs(node, f"{describe(node)} gets an unbatched input")
        return None
    g, cin, cout = m.groups, m.in_channels, m.out_channels
    a, b = cin // g, cout // g
    mode = "dense" if g == 1 else ("depthwise" if a == 1 else "balanced")
    c.layer(name, "conv", conv_mode=mode)
    ins = c.member(name, "in", input_channels(c, node, cin, 1))
    outs = c.out_member(name, cout)
    if mode == "depthwise":  # group j is input channel j and outputs j*b .. j*b+b-1
        c.union(c.repeat_each(ins, b), outs)
    elif mode == "balanced":  # channel i of every group goes together
        for j in range(1, g):
            c.union(ins[:a], ins[j * a : (j + 1) * a])
            c.union(outs[:b], outs[j * b : (j + 1) * b])
    return Tracked(1, outs)


def linear(c: Coupler, node: fx.Node) -> Value:
    name = str(node.target)
    m = c.modules[name]
    shape = c.shape(node.args[0])
    if shape is None or len(shape) < 2:
        c.block_inputs(node, f"{describe(node)} gets an unbatched input")
        return None
    c.layer(name, "linear")
    c.member(name, "in", input_channels(c, node, m.in_features, len(shape) - 1))
    return Tracked(len(shape) - 1, c.out_member(name, m.out_features))


def channel_norm(c: Coupler, node: fx.Node) -> Value:
    """BatchNorm / InstanceNorm / RBN: statistics and affine parameters per channel (dim 1)."""
    name = str(node.target)
    m = c.modules[name]
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    ndims = batched_ndims(c, node) or set()
    if x is None or x.dim != 1 or len(x.atoms) != m.num_features or len(shape or ()) not in ndims:
        c.block_inputs(node, f"{describe(node)}: its channels are not followed")
        return None
    c.layer(name, "norm")
    c.member(name, "param", x.atoms)
    return Tracked(1, x.atoms)


def group_norm(c: Coupler, node: fx.Node) -> Value:
    """GroupNorm: channels of one norm group share statistics, so they go together."""
    name = str(node.target)
    m = c.modules[name]
    x = c.tracked(node.args[0])
    if x is None or x.dim != 1 or len(x.atoms) != m.num_channels:
        c.block_inputs(node, f"{describe(node)}: its channels are not followed")
        return None
    per = m.num_channels // m.num_groups
    for j in range(m.num_groups):
        c.union(x.atoms[j * per : (j + 1) * per], [x.atoms[j * per]] * per)
    c.layer(name, "groupnorm")
    c.member(name, "param", x.atoms)
    return Tracked(1, x.atoms)


def layer_norm(c: Coupler, node: fx.Node) -> Value:
    """LayerNorm: normalising over the channel dim couples every channel (not prunable)."""
    name = str(node.target)
    m = c.modules[name]
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    k = len(m.normalized_shape)
    if x.dim >= len(shape) - k:
        c.block(
            x.atoms,
            f"LayerNorm {name!r} normalises over the channels (its statistics need them all)",
        )
        if k == 1 and m.elementwise_affine:
            c.layer(name, "layernorm")
            c.member(name, "param", x.atoms)
    elif getattr(m, "bias", None) is not None:
        # Normalising over other dims: an all-zero channel comes out as the bias.
        c.mark_nonzero(x.atoms, describe(node))
    return x


def prelu(c: Coupler, node: fx.Node) -> Value:
    name = str(node.target)
    m = c.modules[name]
    if m.num_parameters == 1:
        return same(c, node)
    x = c.tracked(node.args[0])
    if x is None or x.dim != 1 or len(x.atoms) != m.num_parameters:
        c.block_inputs(node, f"{describe(node)}: its channels are not followed")
        return None
    c.layer(name, "prelu")
    c.member(name, "param", x.atoms)
    return x


def head_attention(c: Coupler, node: fx.Node) -> Value:
    """:class:`rewriter.canonical.HeadAttention`: ``(q, k, v) -> heads merged``.

    Head ``h`` is one removable unit: query channels ``h*dq .. (h+1)*dq``, the same key
    channels, value channels ``h*dv .. (h+1)*dv`` and the merged output channels of head
    ``h`` (output channel ``h*dv + i`` is value channel ``h*dv + i``, read by the output
    projection's input columns) all join one group channel, as the SDPA rule of
    :mod:`rewriter.analysis.rules_attention` does for Hugging Face attention. The head
    count is recorded (a ``"size"`` record on this call) and :func:`rewriter.slim.slim`
    sets the module's ``num_heads`` to the number of kept heads. The head dim never
    changes, so the attention scale ``1/sqrt(head dim)`` stays what it was: removing a
    head removes its whole ``softmax(q k^T) v`` term, and the kept heads compute exactly
    what they computed before.

    *Choice:* whole heads are the only unit. Slimming the value head dim (channel ``i``
    of every head together, what this rule offered before) cannot coexist with whole
    heads in one partition (uniting both joins every channel of the attention into one
    group channel), and whole heads are the standard unit of head pruning. Query/key
    channels are not slimmed within a head (that would change the attention scale).
    """
    name = str(node.target)
    heads = c.modules[name].num_heads
    q, k, v = (c.tracked(a) for a in node.args[:3])
    extra = [a for a in [*node.args[3:], *node.kwargs.values()] if isinstance(a, fx.Node)]
    what = describe(node)
    shapes = [c.shape(a) for a in node.args[:3]]
    followed = all(
        t is not None and s is not None and t.dim == len(s) - 1 and len(t.atoms) % heads == 0
        for t, s in zip((q, k, v), shapes, strict=True)
    )
    if extra or not followed or q is None or k is None or v is None or len(q.atoms) != len(k.atoms):
        c.block_inputs(node, f"{what}: its q/k/v channels are not followed per head")
        return None
    dq, dv = len(q.atoms) // heads, len(v.atoms) // heads
    units = tuple(v.atoms[h * dv] for h in range(heads))
    for t, per in ((q, dq), (k, dq), (v, dv)):
        for h in range(heads):
            c.union(t.atoms[h * per : (h + 1) * per], [units[h]] * per)
    c.slices.append(SliceRecord(node.name, "size", 0, ((0, heads),), None, units))
    return Tracked(v.dim, v.atoms)


def opaque(c: Coupler, node: fx.Node) -> Value:
    name = str(node.target)
    why = c.opaque.get(name)
    cls = type(c.modules[name]).__name__ if name in c.modules else "?"
    if why is not None:
        reason = f"opaque module {name!r} ({cls}; not traced: {why})"
    else:
        reason = f"module {name!r} ({cls}) is not understood by the channel analysis"
    c.block_inputs(node, reason)
    return None


# --------------------------------------------------------------------------------------------
# Elementwise arithmetic
# --------------------------------------------------------------------------------------------


def binary(kind: str) -> Handler:
    """add / sub / mul / div with broadcasting; a parameter read with get_attr joins the group."""

    def rule(c: Coupler, node: fx.Node) -> Value:
        out_shape = c.shape(node)
        operands = [arg(node, 0, "input"), arg(node, 1, "other")]
        if out_shape is None:
            c.block_inputs(node, f"{describe(node)} has no recorded shape")
            return None
        nd = len(out_shape)
        dims = set()
        for op in operands:
            v, s = c.tracked(op), c.shape(op)
            if v is not None and s is not None:
                dims.add(v.dim + nd - len(s))
        if not dims:
            return None
        what = describe(node)
        if len(dims) > 1:
            c.block_inputs(node, f"{what} combines tensors whose channel dims do not line up")
            return None
        d = dims.pop()
        size = out_shape[d]
        full: list[tuple[int, ...]] = []
        params: list[tuple[fx.Node, int]] = []
        adds_constant = False
        for pos, op in enumerate(operands):
            s = c.shape(op)
            if s is None:  # a Python number (or a non-tensor node)
                if kind in ("add", "sub") and not (isinstance(op, (int, float)) and op == 0):
                    adds_constant = True
                continue
            k = d - (nd - len(s))
            width = s[k] if k >= 0 else 1
            v = c.tracked(op)
            if width == size and (v is not None and v.dim == k):
                full.append(v.atoms)
            elif width == size and size != 1 and op.op == "get_attr":
                params.append((op, k))
            elif width == 1 and size != 1:
                if v is not None:
                    c.block(v.atoms, f"{what} broadcasts a 1-channel tensor over the channels")
                if kind in ("add", "sub"):
                    adds_constant = True
            elif width == size and size == 1:
                continue
            else:
                c.block_inputs(
                    node, f"{what} combines the channels with a tensor the analysis cannot follow"
                )
                return None
            if kind == "div" and pos == 1 and (v is not None or op.op == "get_attr") and width > 1:
                c.block_inputs(node, f"{what} divides by a channel")
                return None
        if not full:
            return None
        atoms = full[0]
        for other in full[1:]:
            c.union(atoms, other)
        for op, k in params:
            target = str(op.target)
            record = c.layer(target, "param", param_dim=k)
            if record.param_dim != k:
                c.block(atoms, f"attribute {target!r} is combined along different dims")
                continue
            c.member(target, "param", atoms)
            c.param_users.setdefault(target, set()).add(node.name)
        if adds_constant:
            c.mark_nonzero(atoms, what)
        return Tracked(d, atoms)

    return rule


def clamp(c: Coupler, node: fx.Node) -> Value:
    lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        c.block_inputs(node, f"{describe(node)} clamps with tensor bounds")
        return None
    keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return same(c, node, keeps_zero)


def hardtanh(c: Coupler, node: fx.Node) -> Value:
    lo, hi = arg(node, 1, "min_val", -1.0), arg(node, 2, "max_val", 1.0)
    return same(c, node, lo <= 0 <= hi)


def creates(c: Coupler, node: fx.Node) -> Value:
    """``x.new_empty(sizes)``, ``torch.zeros_like(x)``...: a new tensor that reads only the
    shape, dtype and device of ``x``. Nothing is coupled; the result is not followed, so any
    later op that combines it with followed channels decides (a per-sample ``(N, 1, 1, 1)``
    drop-path mask broadcasts over them, a full-width one blocks them)."""
    return None


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _elementwise(zero_preserving: bool = True) -> Handler:
    return lambda c, node: same(c, node, zero_preserving)


def _elementwise_module(zero_preserving: Callable[[nn.Module], bool]) -> Handler:
    return lambda c, node: same(c, node, zero_preserving(c.modules[str(node.target)]))


_KEEPS_ZERO: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ReLU, nn.ReLU6,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Softsign,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Hardswish,
)  # fmt: skip
_MAKES_NONZERO: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
    nn.CircularPad3d,
)  # fmt: skip
_NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, RepresentativeBatchNorm2d,
)  # fmt: skip


def _module_constant_pad(c: Coupler, node: fx.Node) -> Value:
    return per_channel(c, node, c.modules[str(node.target)].value == 0)


MODULES: dict[type[nn.Module], Handler] = {
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    nn.Linear: linear,
    nn.GroupNorm: group_norm,
    nn.LayerNorm: layer_norm,
    nn.PReLU: prelu,
    nn.Flatten: flatten(1),
    nn.Hardtanh: _elementwise_module(lambda m: m.min_val <= 0 <= m.max_val),
    nn.ConstantPad1d: _module_constant_pad,
    nn.ConstantPad2d: _module_constant_pad,
    nn.ConstantPad3d: _module_constant_pad,
    nn.Softmax: softmax,
    nn.LogSoftmax: softmax,
    **{cls: channel_norm for cls in _NORM_MODULES},
    **{cls: _elementwise() for cls in _KEEPS_ZERO},
    **{cls: _elementwise(False) for cls in _MAKES_NONZERO},
    **{cls: per_channel for cls in _POOL_MODULES},  # returned indices: a tuple, blocked
}
MODULES[HeadAttention] = head_attention
for _plain, _masked in MASKED.items():  # Masked* layers are their plain layer plus a mask
    MODULES[_masked] = MODULES[_plain]

def _module_handler(module: nn.Module) -> Handler:
    """The handler of a module's class; a library module that subclasses a known layer
    (``Split*``, ``Masked*`` twins) keeps that layer's channel structure."""
    handler = MODULES.get(type(module))
    if handler is None and isinstance(module, RewriterModule):
        handler = next((MODULES[b] for b in type(module).__mro__[1:] if b in MODULES), None)
    return handler or opaque


_ADD = binary("add")
_SUB = binary("sub")
_MUL = binary("mul")
_DIV = binary("div")

FUNCTIONS: dict[Any, Handler] = {
    operator.add: _ADD, operator.iadd: _ADD, torch.add: _ADD,
    operator.sub: _SUB, operator.isub: _SUB, torch.sub: _SUB, torch.subtract: _SUB,
    operator.mul: _MUL, operator.imul: _MUL, torch.mul: _MUL, torch.multiply: _MUL,
    operator.truediv: _DIV, operator.itruediv: _DIV, torch.div: _DIV, torch.true_divide: _DIV,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat,
    torch.split: split, torch.chunk: split,
    operator.getitem: getitem,
    torch.flatten: flatten(0),
    torch.reshape: reshape,
    torch.permute: permute,
    torch.transpose: transpose, torch.swapaxes: transpose, torch.swapdims: transpose,
    torch.unsqueeze: unsqueeze, torch.squeeze: squeeze,
    torch.mean: reduction, torch.sum: reduction, torch.amax: reduction, torch.amin: reduction,
    torch.std: reduction, torch.var: reduction,
    torch.softmax: softmax, F.softmax: softmax, torch.log_softmax: softmax,
    F.log_softmax: softmax,
    torch.clamp: clamp, torch.clip: clamp, F.hardtanh: hardtanh,
    F.pad: pad,
    F.interpolate: per_channel,
    builtins.getattr: get_attribute,
    **{f: per_channel for f in (
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d,
        F.lp_pool2d,
    )},
    **{f: _elementwise() for f in (
        torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.elu,
        F.selu, F.celu, F.leaky_relu, F.hardswish, torch.tanh, F.tanh, torch.neg,
        operator.neg, torch.abs, operator.abs, F.dropout, F.dropout1d, F.dropout2d,
        F.dropout3d, torch.square, torch.sin,
    )},
    **{f: _elementwise(False) for f in (
        torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp, torch.cos,
        F.alpha_dropout, F.feature_alpha_dropout, F.logsigmoid,
    )},
    **{f: creates for f in (
        torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like, torch.randn_like,
        torch.full_like,
    )},
}  # fmt: skip

METHODS: dict[str, Handler] = {
    "add": _ADD, "add_": _ADD, "__add__": _ADD, "__radd__": _ADD, "__iadd__": _ADD,
    "sub": _SUB, "sub_": _SUB, "__sub__": _SUB, "__isub__": _SUB,
    "mul": _MUL, "mul_": _MUL, "__mul__": _MUL, "__rmul__": _MUL, "__imul__": _MUL,
    "div": _DIV, "div_": _DIV, "__truediv__": _DIV, "__itruediv__": _DIV,
    "split": split, "chunk": split,
    "flatten": flatten(0),
    "view": reshape, "reshape": reshape,
    "permute": permute, "transpose": transpose, "swapaxes": transpose, "swapdims": transpose,
    "unsqueeze": unsqueeze, "squeeze": squeeze,
    "mean": reduction, "sum": reduction, "amax": reduction, "amin": reduction,
    "std": reduction, "var": reduction,
    "softmax": softmax, "log_softmax": softmax,
    "clamp": clamp, "clamp_": clamp, "clip": clamp,
    "size": size, "numel": numel, "dim": nothing, "ndimension": nothing,
    **{name: _elementwise() for name in (
        "relu", "relu_", "tanh", "tanh_", "neg", "abs", "contiguous", "clone", "detach",
        "float", "double", "half", "bfloat16", "to", "type_as", "cpu", "cuda",
        "requires_grad_", "square",
    )},
    **{name: _elementwise(False) for name in (
        "sigmoid", "sigmoid_", "exp", "exp_", "bernoulli_", "bernoulli", "uniform_", "normal_",
    )},
    **{name: creates for name in ("new_empty", "new_zeros", "new_ones", "new_full")},
}  # fmt: skip


_PROBE_MAX_CHANNELS = 256


def probe(c: Coupler, node: fx.Node) -> Value:
    """An op no table knows, tried on a random tensor shaped like its recorded input.

    The op is accepted as channel-transparent (``same``) only when it keeps the shape, is
    deterministic, and perturbing each input channel ``k`` moves output channel ``k`` and no
    other (zeroing channel ``k`` also tells whether it is zero-preserving). Otherwise, or
    when it reads other computed values, its channels are blocked with the reason.
    """
    what = describe(node)
    first = node.args[0] if node.args else None
    x, shape = c.tracked(first), c.shape(first)
    if x is None:
        c.block_inputs(node, f"{what} is not understood by the channel analysis")
        return None
    rest = [*node.args[1:], *node.kwargs.values()]
    if any(isinstance(v, fx.Node) for v in _flat(rest)):
        c.block_inputs(node, f"{what} is not understood by the channel analysis (not probed: "
                       "it reads other computed values)")  # fmt: skip
        return None
    meta = first.meta.get("tensor_meta")  # type: ignore[union-attr]
    dtype = getattr(meta, "dtype", None)
    if shape is None or c.shape(node) != shape or dtype is None or not dtype.is_floating_point:
        c.block_inputs(node, f"{what} is not understood by the channel analysis (it changes "
                       "the shape or is not a floating-point op)")  # fmt: skip
        return None
    if len(x.atoms) > _PROBE_MAX_CHANNELS:
        c.block_inputs(node, f"{what} is not understood (too many channels to probe)")
        return None
    if node.op == "call_method":
        method = str(node.target)

        def fn(t: torch.Tensor) -> Any:
            return getattr(t, method)(*node.args[1:], **node.kwargs)
    else:
        target = node.target

        def fn(t: torch.Tensor) -> Any:
            return target(t, *node.args[1:], **node.kwargs)  # type: ignore[operator]

    d = x.dim
    generator = torch.Generator().manual_seed(0)
    base_in = torch.randn(shape, generator=generator, dtype=dtype) + 0.5
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = fn(base_in.clone())
        torch.manual_seed(0)
        again = fn(base_in.clone())
        if not isinstance(base, torch.Tensor) or base.shape != base_in.shape or not torch.equal(
            base, again
        ):
            c.block_inputs(node, f"{what} is not understood (probing: not a deterministic "
                           "shape-keeping tensor op)")  # fmt: skip
            return None
        zero_preserving = True
        others = [i for i in range(base.dim()) if i != d]
        for k in range(len(x.atoms)):
            for change in ("perturb", "zero"):
                t = base_in.clone()
                if change == "perturb":
                    t.select(d, k).mul_(1.5).add_(0.25)
                else:
                    t.select(d, k).zero_()
                torch.manual_seed(0)
                out = fn(t)
                moved = (out != base).any(dim=others) if others else out != base
                moved_channels = moved.nonzero().flatten().tolist()
                if [ch for ch in moved_channels if ch != k]:
                    c.block_inputs(node, f"{what} is not understood (probing: channel {k} "
                                   f"moves channels {moved_channels[:4]})")  # fmt: skip
                    return None
                if change == "zero" and bool((out.select(d, k) != 0).any()):
                    zero_preserving = False
    return same(c, node, zero_preserving)


def _flat(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flat(v))
        elif isinstance(v, dict):
            out.extend(_flat(list(v.values())))
        else:
            out.append(v)
    return out


def lookup(c: Coupler, node: fx.Node) -> Handler | None:
    """The rule for ``node``; an op no table knows is probed (:func:`probe`)."""
    handler: Handler | None
    if node.op == "call_module":
        name = str(node.target)
        module = c.modules.get(name)
        if name in c.opaque or module is None:
            return opaque
        handler = _module_handler(module)
    elif node.op == "call_function":
        handler = FUNCTIONS.get(node.target) or probe
    elif node.op == "call_method":
        handler = METHODS.get(str(node.target)) or probe
    else:
        handler = None
    return handler


# Attention heads, GQA groups, RMSNorm and the aten calls of lifted programs.
from .rules_attention import FUNCTIONS as _ATTENTION  # noqa: E402
from .rules_attention import METHODS as _ATTENTION_METHODS  # noqa: E402
from .rules_attention import MODULES as _ATTENTION_MODULES  # noqa: E402

FUNCTIONS.update(_ATTENTION)
METHODS.update(_ATTENTION_METHODS)
MODULES.update(_ATTENTION_MODULES)
