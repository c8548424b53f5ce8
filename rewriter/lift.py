"""Front end for ``torch.export`` programs: lift aten-level calls back to module calls.

``aten.conv2d(x, p_conv1_weight, None, [1, 1], [1, 1]) => conv1(x)`` with ``conv1`` an
``nn.Conv2d`` holding the exported ``conv1.weight``.

:func:`lift` turns an ``ExportedProgram`` into a module-level ``fx.GraphModule`` that
every pass can rewrite, as if the original model had been traced:

* Layers with parameters become modules named after their parameters' state-dict
  names (the exported program's ``graph_signature`` maps placeholders to them):
  convolutions (``conv{1,2,3}d``, ``convolution``, transposed convolutions; groups,
  stride, padding, dilation and bias kept), batch norm in every form export produces
  (``batch_norm``, ``_native_batch_norm_legit_no_training``, the functional and
  in-place training forms; running statistics and ``num_batches_tracked`` carried
  over), ``linear`` (also ``addmm``/``mm`` with a transposed weight), ``layer_norm``,
  ``group_norm`` and ``embedding``. ``conv1.weight`` and ``conv1.bias`` become the
  module ``conv1``, so state-dict keys are unchanged.
* Parameter-free calls whose ``nn_module_stack`` says they are the whole forward of a
  torch.nn module (``nn.ReLU``, ``nn.ReLU6``, ``nn.GELU``, pooling, ``nn.Flatten``,
  ``nn.Dropout``...) become that module again, under its original name.
* Other common aten calls become the ``torch`` functions a traced model would
  contain (``aten.add.Tensor => operator.add``, ``aten.flatten.using_ints =>
  torch.flatten``...); anything else stays an aten call, which fx traces and runs
  like any function.

Two clean-ups make the lifted graph a plain model of its own:

* Every parameter, buffer and constant is copied; one whose elements share memory (a
  constant made with ``.expand``, e.g. a ``token_type_ids`` buffer, has stride 0) is
  materialised contiguously, since nothing can be written into it (``load_state_dict``,
  ``copy_``, in-place ``abs_`` fail: "more than one element of the written-to tensor
  refers to a single memory location"). Others keep their layout. The report lists them
  (``LiftReport.materialised``); :func:`materialise_state` does the same for any module.
* Export's ``aten._assert_tensor_metadata`` nodes, pure checks that an input has the
  dtype, device and layout seen at export (``float32`` before every ``aten.to``), are
  dropped (``LiftReport.asserts_dropped`` counts them), so the lifted graph runs on
  float64 copies of its state and inputs (the float64 numeric check, SynFlow). Explicit
  casts (``aten.to(x, torch.float32)``, e.g. Llama's RMSNorm computing in float32) are
  the model's semantics and stay.

A layer is lifted only when that is exact: its parameters are used by this call
alone and are all the state under its name. Otherwise it stays a function call on
``get_attr`` parameters and :func:`lift_report` says why. The lifted model computes
exactly what the program computes (same kernels, same order); modules take the
training flag of the exported ops (an eval-mode export gives an eval-mode model).

:func:`load_pt2` reads a ``.pt2`` file. ``torch.export.load`` unpickles parts of an
archive (sample inputs, tensor subclasses, custom objects, legacy layouts), so the
archive is inspected first and refused, without unpickling anything, unless
``trust_pickle=True``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from . import pt2gate
from .canonical import canonicalize
from .errors import ArtifactError, RewriterError

LIFT_KEY = "rewriter_lift"
aten = torch.ops.aten


class LiftError(RewriterError):
    """An exported program uses a feature that cannot be lifted to an ``nn.Module``."""


@dataclass
class LiftReport:
    """What :func:`lift` did: modules rebuilt, layers kept as functions and why."""

    modules: dict[str, str] = field(default_factory=dict)  # name -> class name
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, reason)
    unused: list[str] = field(default_factory=list)  # state the graph never reads (dropped)
    materialised: list[str] = field(default_factory=list)  # overlapping tensors made contiguous
    asserts_dropped: int = 0  # export's aten._assert_tensor_metadata nodes removed

    def counts(self) -> dict[str, int]:
        """Lifted modules by class name."""
        out: dict[str, int] = {}
        for cls in self.modules.values():
            out[cls] = out.get(cls, 0) + 1
        return dict(sorted(out.items()))


def lift_report(gm: fx.GraphModule) -> LiftReport | None:
    """The :class:`LiftReport` of a model made by :func:`lift`, else ``None``."""
    return getattr(gm, "meta", {}).get(LIFT_KEY)


# -- lifting rules ----------------------------------------------------------------------------


@dataclass
class _Lift:
    """A planned module call replacing one aten call."""

    module: nn.Module
    input: fx.Node
    state: dict[str, fx.Node | str]  # module attribute -> placeholder (or FQN for extra state)
    scope: str | None = None  # module name for parameter-free modules (from nn_module_stack)
    aux: set[fx.Node] = field(default_factory=set)  # nodes that disappear with the call
    tuple_result: bool = False  # the op returns a tuple whose item 0 is the module's output
    mutation_items: frozenset[int] = frozenset()  # tuple items that are buffer updates


class _Program:
    """Read access to an exported program: placeholders, state and node metadata."""

    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.graph = ep.graph
        self.kind: dict[str, InputKind] = {}
        self.fqn: dict[str, str] = {}
        self.persistent: dict[str, bool] = {}
        for spec in ep.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if name is None:
                continue
            self.kind[name] = spec.kind
            if spec.target is not None:
                self.fqn[name] = spec.target
            self.persistent[name] = spec.persistent is not False
        self.state_fqns = set(self.fqn.values())

    def state(self, arg: Any) -> str | None:
        """The FQN of a parameter/buffer placeholder ``arg``, else ``None``."""
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            if self.kind.get(arg.name) in (InputKind.PARAMETER, InputKind.BUFFER):
                return self.fqn[arg.name]
        return None

    def tensor(self, fqn: str) -> torch.Tensor:
        if fqn in self.ep.state_dict:
            return self.ep.state_dict[fqn]
        return self.ep.constants[fqn]

    def placeholder_tensor(self, arg: Any) -> torch.Tensor | None:
        fqn = self.state(arg)
        return None if fqn is None else self.tensor(fqn)

    @staticmethod
    def val(arg: Any) -> Any:
        return arg.meta.get("val") if isinstance(arg, fx.Node) else None

    @staticmethod
    def scope(node: fx.Node) -> tuple[str, str, str] | None:
        """(key, qualified name, class path) of the innermost module the node ran in."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        key, (name, cls) = list(stack.items())[-1]
        return key, name, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _bind(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _ints(value: Any, n: int) -> tuple[int, ...] | Any:
    if isinstance(value, (list, tuple)):
        value = [int(v) for v in value]
        return tuple(value * n) if len(value) == 1 else tuple(value)
    return value


def _conv(node: fx.Node, kw: dict[str, Any], prog: _Program) -> _Lift | str:
    weight = prog.placeholder_tensor(kw["weight"])
    if weight is None:
        return "the weight is computed in the graph, not a parameter"
    if kw["bias"] is not None and prog.state(kw["bias"]) is None:
        return "the bias is computed in the graph, not a parameter"
    dims = weight.dim() - 2
    if dims not in (1, 2, 3):
        return f"unsupported {weight.dim()}-d convolution weight"
    transposed = bool(kw.get("transposed", "transpose" in str(node.target)))
    groups = int(kw["groups"])
    common = {
        "kernel_size": tuple(weight.shape[2:]),
        "stride": _ints(kw["stride"], dims),
        "padding": _ints(kw["padding"], dims),
        "dilation": _ints(kw["dilation"], dims),
        "groups": groups,
        "bias": kw["bias"] is not None,
    }
    with torch.device("meta"):
        if transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
            out_pad = _ints(kw.get("output_padding", 0), dims)
            module = cls(
                weight.shape[0], weight.shape[1] * groups, output_padding=out_pad, **common
            )
        else:
            if any(kw.get("output_padding") or ()):
                return "a non-transposed convolution with output padding"
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
            module = cls(weight.shape[1] * groups, weight.shape[0], **common)
    return _Lift(module, kw["input"], {"weight": kw["weight"], "bias": kw["bias"]})


_BN_FORMS: dict[Any, tuple[bool, frozenset[int]]] = {
    # op: (returns a tuple, tuple items that are running-statistics updates)
    aten.batch_norm.default: (False, frozenset()),
    aten._native_batch_norm_legit_no_training.default: (True, frozenset()),
    aten._native_batch_norm_legit_functional.default: (True, frozenset({3, 4})),
    aten._native_batch_norm_legit.default: (True, frozenset()),
    aten.native_batch_norm.default: (True, frozenset()),
}


def _batch_norm(node: fx.Node, kw: dict[str, Any], prog: _Program) -> _Lift | str:
    val = prog.val(kw["input"])
    if val is None or val.dim() not in (2, 3, 4, 5):
        return "the input's rank is unknown or not 2 to 5"
    names = ("weight", "bias", "running_mean", "running_var")
    if any(kw[n] is not None and prog.state(kw[n]) is None for n in names):
        return "an argument is computed in the graph, not a parameter or buffer"
    if (kw["weight"] is None) != (kw["bias"] is None):
        return "only one of weight and bias is given"
    if (kw["running_mean"] is None) != (kw["running_var"] is None):
        return "only one of running_mean and running_var is given"
    training = bool(kw.get("training", False))
    track = kw["running_mean"] is not None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[val.dim()]
    with torch.device("meta"):
        module = cls(
            int(val.shape[1]),
            eps=float(kw["eps"]),
            momentum=float(kw["momentum"]),
            affine=kw["weight"] is not None,
            track_running_stats=track,
        )
    module.train(training)
    state: dict[str, fx.Node | str] = {n: kw[n] for n in names}
    aux: set[fx.Node] = set()
    if track:
        prefix = prog.state(kw["running_mean"]).rpartition(".")[0]  # type: ignore[union-attr]
        counter = f"{prefix}.num_batches_tracked"
        nbt = next((n for n, f in prog.fqn.items() if f == counter), None)
        if nbt is not None:
            state["num_batches_tracked"] = counter
            for user in prog.graph.find_nodes(op="placeholder", target=nbt)[0].users:
                aux.add(user)  # `num_batches_tracked += 1`: the module counts itself
    tuple_result, mutations = _BN_FORMS[node.target]
    return _Lift(
        module, kw["input"], state, aux=aux, tuple_result=tuple_result, mutation_items=mutations
    )


_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default)


def _transposed_weight(arg: Any, prog: _Program) -> fx.Node | None:
    """``w`` when ``arg`` is ``t(w)`` (or an equivalent permute/transpose) of a 2-d parameter."""
    if not (isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in _TRANSPOSES):
        return None
    weight = arg.args[0]
    tensor = prog.placeholder_tensor(weight)
    if tensor is None or tensor.dim() != 2:
        return None
    if arg.target is aten.permute.default and list(arg.args[1]) not in ([1, 0], [-1, -2]):
        return None
    return weight  # type: ignore[return-value]


def _linear(node: fx.Node, kw: dict[str, Any], prog: _Program) -> _Lift | str:
    aux: set[fx.Node] = set()
    if node.target is aten.linear.default:
        inp, weight, bias = kw["input"], kw["weight"], kw["bias"]
    else:  # addmm(bias, x, t(w)) or mm(x, t(w))
        if node.target is aten.addmm.default and (kw["beta"] != 1 or kw["alpha"] != 1):
            return "addmm with alpha or beta other than 1"
        mat1, mat2 = (kw["mat1"], kw["mat2"]) if "mat1" in kw else (kw["self"], kw["mat2"])
        bias = kw["self"] if node.target is aten.addmm.default else None
        weight = _transposed_weight(mat2, prog)
        if weight is None:
            return "the matrix is not a transposed 2-d parameter"
        if set(mat2.users) != {node}:
            return "the transposed weight is used elsewhere"
        inp, aux = mat1, {mat2}
        val = prog.val(inp)
        if val is None or val.dim() != 2:
            return "the input is not 2-d"
    w = prog.placeholder_tensor(weight)
    if w is None or w.dim() != 2:
        return "the weight is computed in the graph, not a 2-d parameter"
    if bias is not None:
        b = prog.placeholder_tensor(bias)
        if b is None or tuple(b.shape) != (w.shape[0],):
            return "the bias is not a parameter of shape (out_features,)"
    with torch.device("meta"):
        module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    return _Lift(module, inp, {"weight": weight, "bias": bias}, aux=aux)


def _layer_norm(node: fx.Node, kw: dict[str, Any], prog: _Program) -> _Lift | str:
    weight, bias = kw["weight"], kw["bias"]
    if any(a is not None and prog.state(a) is None for a in (weight, bias)):
        return "the weight or bias is computed in the graph"
    if weight is None and bias is not None:
        return "a bias without a weight"
    with torch.device("meta"):
        module = nn.LayerNorm(
            list(kw["normalized_shape"]),
            eps=float(kw["eps"]),
            elementwise_affine=weight is not None,
            bias=bias is not None,
        )
    tuple_result = node.target is aten.native_layer_norm.default
    return _Lift(module, kw["input"], {"weight": weight, "bias": bias}, tuple_result=tuple_result)


def _group_norm(node: fx.Node, kw: dict[str, Any], prog: _Program) -> _Lift | str:
    weight, bias = kw["weight"], kw["bias"]
    if (weight is None) != (bias is None):
        return "only one of weight and bias is given"
    if any(a is not None and prog.state(a) is None for a in (weight, bias)):
        return "the weight or bias is computed in the graph"
    native = node.target is aten.native_group_norm.default
    groups = int(kw["group"] if native else kw["num_groups"])
    val = prog.val(kw["input"])
    if val is None:
        return "the input's shape is unknown"
    with torch.device("meta"):
        module = nn.GroupNorm(
            groups, int(val.shape[1]), float(kw["eps"]), affine=weight is not None
        )
    return _Lift(module, kw["input"], {"weight": weight, "bias": bias}, tuple_result=native)


def _embedding(node: fx.Node, kw: dict[str, Any], prog: _Program) -> _Lift | str:
    w = prog.placeholder_tensor(kw["weight"])
    if w is None or w.dim() != 2:
        return "the weight is computed in the graph, not a 2-d parameter"
    padding = int(kw["padding_idx"])
    with torch.device("meta"):
        module = nn.Embedding(
            w.shape[0],
            w.shape[1],
            padding_idx=None if padding < 0 else padding,
            scale_grad_by_freq=bool(kw["scale_grad_by_freq"]),
            sparse=bool(kw["sparse"]),
        )
    return _Lift(module, kw["indices"], {"weight": kw["weight"]})


_LAYERS: dict[Any, Callable[[fx.Node, dict[str, Any], _Program], _Lift | str]] = {
    **dict.fromkeys(
        [
            aten.conv1d.default,
            aten.conv2d.default,
            aten.conv3d.default,
            aten.conv1d.padding,
            aten.conv2d.padding,
            aten.conv3d.padding,
            aten.convolution.default,
            aten.conv_transpose1d.default,
            aten.conv_transpose2d.input,
            aten.conv_transpose3d.input,
        ],
        _conv,
    ),
    **dict.fromkeys(_BN_FORMS, _batch_norm),
    **dict.fromkeys([aten.linear.default, aten.addmm.default, aten.mm.default], _linear),
    **dict.fromkeys([aten.layer_norm.default, aten.native_layer_norm.default], _layer_norm),
    **dict.fromkeys([aten.group_norm.default, aten.native_group_norm.default], _group_norm),
    aten.embedding.default: _embedding,
}


def _pool(cls: type[nn.Module], *names: str) -> Callable[[dict[str, Any]], nn.Module]:
    def build(kw: dict[str, Any]) -> nn.Module:
        options = {n: _collapse(kw[n]) for n in names if n in kw}
        if options.get("stride") == ():
            options["stride"] = None  # aten's "same as the kernel"
        return cls(**options)

    return build


def _collapse(value: Any) -> Any:
    """``[2, 2] -> 2`` (how pooling modules are usually built), other lists -> tuples."""
    if isinstance(value, (list, tuple)):
        return value[0] if value and all(v == value[0] for v in value) else tuple(value)
    return value


def _max_pool(cls: type[nn.Module]) -> Callable[[dict[str, Any]], nn.Module]:
    return _pool(cls, "kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _avg_pool(cls: type[nn.Module]) -> Callable[[dict[str, Any]], nn.Module]:
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    if cls is not nn.AvgPool1d:
        names = (*names, "divisor_override")
    return _pool(cls, *names)


# aten op -> {module class: builder(args by name)}; lifted when the op is the whole
# forward of a module of that exact class (from nn_module_stack).
_STATELESS: dict[Any, dict[type[nn.Module], Callable[[dict[str, Any]], nn.Module]]] = {
    aten.relu.default: {nn.ReLU: lambda kw: nn.ReLU()},
    aten.relu_.default: {nn.ReLU: lambda kw: nn.ReLU(inplace=True)},
    aten.hardtanh.default: {
        nn.ReLU6: lambda kw: nn.ReLU6() if (kw["min_val"], kw["max_val"]) == (0, 6) else None,
        nn.Hardtanh: lambda kw: nn.Hardtanh(kw["min_val"], kw["max_val"]),
    },
    aten.hardtanh_.default: {
        nn.ReLU6: lambda kw: nn.ReLU6(True) if (kw["min_val"], kw["max_val"]) == (0, 6) else None,
        nn.Hardtanh: lambda kw: nn.Hardtanh(kw["min_val"], kw["max_val"], inplace=True),
    },
    aten.gelu.default: {nn.GELU: lambda kw: nn.GELU(kw["approximate"])},
    aten.sigmoid.default: {nn.Sigmoid: lambda kw: nn.Sigmoid()},
    aten.tanh.default: {nn.Tanh: lambda kw: nn.Tanh()},
    aten.silu.default: {nn.SiLU: lambda kw: nn.SiLU()},
    aten.hardswish.default: {nn.Hardswish: lambda kw: nn.Hardswish()},
    aten.hardsigmoid.default: {nn.Hardsigmoid: lambda kw: nn.Hardsigmoid()},
    aten.mish.default: {nn.Mish: lambda kw: nn.Mish()},
    aten.leaky_relu.default: {nn.LeakyReLU: lambda kw: nn.LeakyReLU(kw["negative_slope"])},
    aten.softplus.default: {nn.Softplus: lambda kw: nn.Softplus(kw["beta"], kw["threshold"])},
    aten.softmax.int: {
        nn.Softmax: lambda kw: nn.Softmax(kw["dim"]) if kw["dtype"] is None else None
    },
    aten.flatten.using_ints: {nn.Flatten: lambda kw: nn.Flatten(kw["start_dim"], kw["end_dim"])},
    aten.dropout.default: {nn.Dropout: lambda kw: nn.Dropout(kw["p"]).train(bool(kw["train"]))},
    aten.max_pool1d.default: {nn.MaxPool1d: _max_pool(nn.MaxPool1d)},
    aten.max_pool2d.default: {nn.MaxPool2d: _max_pool(nn.MaxPool2d)},
    aten.max_pool3d.default: {nn.MaxPool3d: _max_pool(nn.MaxPool3d)},
    aten.max_pool2d_with_indices.default: {nn.MaxPool2d: _max_pool(nn.MaxPool2d)},
    aten.avg_pool1d.default: {nn.AvgPool1d: _avg_pool(nn.AvgPool1d)},
    aten.avg_pool2d.default: {nn.AvgPool2d: _avg_pool(nn.AvgPool2d)},
    aten.avg_pool3d.default: {nn.AvgPool3d: _avg_pool(nn.AvgPool3d)},
    aten.adaptive_avg_pool1d.default: {
        nn.AdaptiveAvgPool1d: _pool(nn.AdaptiveAvgPool1d, "output_size")
    },
    aten.adaptive_avg_pool2d.default: {
        nn.AdaptiveAvgPool2d: _pool(nn.AdaptiveAvgPool2d, "output_size")
    },
    aten._adaptive_avg_pool2d.default: {
        nn.AdaptiveAvgPool2d: _pool(nn.AdaptiveAvgPool2d, "output_size")
    },
    aten.adaptive_avg_pool3d.default: {
        nn.AdaptiveAvgPool3d: _pool(nn.AdaptiveAvgPool3d, "output_size")
    },
    aten.adaptive_max_pool2d.default: {
        nn.AdaptiveMaxPool2d: _pool(nn.AdaptiveMaxPool2d, "output_size")
    },
}
_TUPLE_STATELESS = {aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default}

# aten op -> (the torch function a traced model would call, max positional args,
# keyword arguments it accepts). Same kernels, so outputs are identical.
_FUNCTIONS: dict[Any, tuple[Callable[..., Any] | str, int, frozenset[str]]] = {
    aten.add.Tensor: (operator.add, 2, frozenset()),
    aten.sub.Tensor: (operator.sub, 2, frozenset()),
    aten.mul.Tensor: (operator.mul, 2, frozenset()),
    aten.div.Tensor: (operator.truediv, 2, frozenset()),
    aten.relu.default: (torch.relu, 1, frozenset()),
    aten.sigmoid.default: (torch.sigmoid, 1, frozenset()),
    aten.tanh.default: (torch.tanh, 1, frozenset()),
    aten.gelu.default: (F.gelu, 1, frozenset({"approximate"})),
    aten.hardtanh.default: (F.hardtanh, 3, frozenset()),
    aten.silu.default: (F.silu, 1, frozenset()),
    aten.softmax.int: (torch.softmax, 2, frozenset({"dtype"})),
    aten.flatten.using_ints: (torch.flatten, 3, frozenset()),
    aten.reshape.default: (torch.reshape, 2, frozenset()),
    aten.view.default: ("view", 2, frozenset()),
    aten.permute.default: (torch.permute, 2, frozenset()),
    aten.transpose.int: (torch.transpose, 3, frozenset()),
    aten.cat.default: (torch.cat, 2, frozenset()),
    aten.split.Tensor: (torch.split, 3, frozenset()),
    aten.split_with_sizes.default: (torch.split, 3, frozenset()),
    aten.chunk.default: (torch.chunk, 3, frozenset()),
    aten.mean.dim: (torch.mean, 3, frozenset({"dtype"})),
    aten.matmul.default: (torch.matmul, 2, frozenset()),
    aten.select.int: (torch.select, 3, frozenset()),
    aten.adaptive_avg_pool2d.default: (F.adaptive_avg_pool2d, 2, frozenset()),
    # F.max_pool2d / F.avg_pool2d take the aten arguments in the same order (``stride=[]``
    # means the kernel size in both) and call the same kernels
    aten.max_pool2d.default: (F.max_pool2d, 6, frozenset()),
    aten.avg_pool2d.default: (F.avg_pool2d, 7, frozenset()),
    aten.hardswish.default: (F.hardswish, 1, frozenset()),
    aten.dropout.default: (torch.dropout, 3, frozenset()),
    # in-place ops become their torch-level in-place forms; canonicalisation then makes them
    # out-of-place where nothing reads the overwritten tensor afterwards
    aten.add_.Tensor: ("add_", 2, frozenset({"alpha"})),
    aten.sub_.Tensor: ("sub_", 2, frozenset({"alpha"})),
    aten.mul_.Tensor: ("mul_", 2, frozenset()),
    aten.div_.Tensor: ("div_", 2, frozenset()),
    aten.relu_.default: (torch.relu_, 1, frozenset()),
    aten.sigmoid_.default: (torch.sigmoid_, 1, frozenset()),
    aten.tanh_.default: (torch.tanh_, 1, frozenset()),
    aten.hardswish_.default: (torch._C._nn.hardswish_, 1, frozenset()),
    aten.silu_.default: (torch._C._nn.silu_, 1, frozenset()),
    aten.hardtanh_.default: (F.hardtanh_, 3, frozenset()),
    aten.dropout_.default: (torch.dropout_, 3, frozenset()),
}


# -- planning ---------------------------------------------------------------------------------


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


class _Planner:
    """Decides which aten calls become module calls, and under which names."""

    def __init__(self, prog: _Program, report: LiftReport) -> None:
        self.prog = prog
        self.report = report
        self.plans: dict[fx.Node, tuple[str, _Lift]] = {}
        self.modules: dict[str, nn.Module] = {}
        self.lifts: dict[str, _Lift] = {}  # the first lift of each module name
        self.owned: set[str] = set()  # state FQNs held by lifted modules
        self.dropped: set[fx.Node] = set()
        op_nodes = [n for n in prog.graph.nodes if n.op == "call_function"]
        self.scope_sizes: dict[str, int] = {}
        for n in op_nodes:
            scope = prog.scope(n)
            if scope is not None and n.target is not operator.getitem:
                self.scope_sizes[scope[0]] = self.scope_sizes.get(scope[0], 0) + 1

    def plan(self) -> None:
        for node in self.prog.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                self.dropped.add(node)  # a dtype/device/layout check, not a computation
                self.report.asserts_dropped += 1
            elif node.target in _LAYERS:
                lift = _LAYERS[node.target](node, _bind(node), self.prog)
                if isinstance(lift, str):
                    self.report.kept.append((node.name, str(node.target), lift))
                    continue
                problem = self._claim_stateful(node, lift)
                if problem:
                    self.report.kept.append((node.name, str(node.target), problem))
            elif node.target in _STATELESS:
                self._claim_stateless(node)

    def _check_results(self, node: fx.Node, lift: _Lift) -> str | None:
        if not lift.tuple_result:
            return None
        for user in node.users:
            if user.target is not operator.getitem:
                return "its tuple result is used whole"
            index = user.args[1]
            if index == 0:
                continue
            if index in lift.mutation_items and all(u.op == "output" for u in user.users):
                continue
            if user.users:
                return f"its auxiliary result #{index} is used"
        return None

    def _claim_stateful(self, node: fx.Node, lift: _Lift) -> str | None:
        fqns: dict[str, str] = {}
        for attr, ref in lift.state.items():
            if ref is None:
                continue
            fqns[attr] = ref if isinstance(ref, str) else self.prog.state(ref)  # type: ignore[assignment]
        name = next(iter(fqns.values())).rpartition(".")[0] if fqns else ""
        if not name:
            return "its parameters are not named <module>.<attribute> in the state dict"
        wrong = [f for a, f in fqns.items() if f != f"{name}.{a}"]
        if wrong:
            return (
                f"its state is not all under one module name ({', '.join(sorted(fqns.values()))})"
            )
        others = sorted(
            f for f in self.prog.state_fqns if _is_under(f, name) and f not in fqns.values()
        )
        if others or name in self.prog.state_fqns:
            return f"{name!r} also holds state this call does not use ({', '.join(others)})"
        clash = self._clash(name)
        if clash:
            return clash
        allowed = {node, *lift.aux}
        for ref in lift.state.values():
            if isinstance(ref, fx.Node) and not set(ref.users) <= allowed:
                return f"{ref.name} is also used by other nodes (shared parameter)"
        for aux in lift.aux:
            if not all(u in allowed or u.op == "output" for u in aux.users):
                return f"{aux.name} is used by other nodes"
        problem = self._check_results(node, lift)
        if problem:
            return problem
        self._accept(node, name, lift)
        self.owned.update(fqns.values())
        return None

    def _claim_stateless(self, node: fx.Node) -> None:
        scope = self.prog.scope(node)
        if scope is None or self.scope_sizes.get(scope[0]) != 1 or not scope[1]:
            return
        key, name, cls_path = scope
        builders = _STATELESS[node.target]
        cls = next((c for c in builders if f"{c.__module__}.{c.__qualname__}" == cls_path), None)
        if cls is None:
            return
        kw = _bind(node)
        module = builders[cls](kw)
        if module is None:
            return
        lift = _Lift(module, kw.get("self", kw.get("input")), {}, scope=name)
        lift.tuple_result = node.target in _TUPLE_STATELESS
        if self._check_results(node, lift):
            return
        existing = self.modules.get(name)
        if existing is not None:
            same = type(existing) is type(module) and existing.extra_repr() == module.extra_repr()
            if same and existing.training == module.training:
                self.plans[node] = (name, lift)
            return
        if self._clash(name) or any(_is_under(f, name) for f in self.prog.state_fqns):
            return
        self._accept(node, name, lift)

    def _clash(self, name: str) -> str | None:
        for other in self.modules:
            if _is_under(other, name) or _is_under(name, other):
                return f"the name {name!r} collides with the lifted module {other!r}"
        return None

    def _accept(self, node: fx.Node, name: str, lift: _Lift) -> None:
        self.plans[node] = (name, lift)
        self.modules[name] = lift.module
        self.lifts[name] = lift
        self.dropped.update(lift.aux)
        self.report.modules[name] = type(lift.module).__name__


# -- building ---------------------------------------------------------------------------------


def _set_path(root: nn.Module, fqn: str, make: Callable[[nn.Module, str], None]) -> None:
    *parents, leaf = fqn.split(".")
    module = root
    for part in parents:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    make(module, leaf)


def overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an ``.expand``-ed tensor, stride 0).

    Conservative: sorted by stride, each dimension of size > 1 must step past every
    offset the smaller-stride dimensions reach; the rare non-overlapping layouts that do
    not (interleaved strides) count as overlapping, and copying those is harmless."""
    if t.numel() == 0:
        return False
    reach = 0  # the largest offset the dimensions seen so far reach
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    copy = t.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(t, nn.Parameter):
        return nn.Parameter(copy, requires_grad=t.requires_grad)
    return copy


def _state_copy(t: torch.Tensor, fqn: str, report: LiftReport) -> torch.Tensor:
    """A copy of a program tensor; contiguous (and listed in the report) when its elements
    share memory, else with its own layout."""
    if overlapping(t):
        report.materialised.append(fqn)
        return _contiguous(t)
    copy = t.detach().clone()
    if isinstance(t, nn.Parameter):
        return nn.Parameter(copy, requires_grad=t.requires_grad)
    return copy


def materialise_state(module: nn.Module, *, keep: Iterable[nn.Module] = ()) -> list[str]:
    """Replace every parameter and buffer of ``module`` whose elements share memory (see
    :func:`overlapping`) by a contiguous copy, in place; returns their qualified names.

    Such tensors arise outside lifting too: fx folds computations on buffers alone into
    ``_tensor_constant`` attributes (``buf[:, :n].expand(B, n)`` traces to a stride-0
    constant). Submodules in ``keep`` (e.g. leaves shared with a model that must not be
    mutated) and their children are left alone. A tensor registered under two names
    becomes two copies."""
    skip = {id(m) for k in keep for m in k.modules()}
    done: list[str] = []
    for prefix, owner in module.named_modules():
        if id(owner) in skip:
            continue
        for slots in (owner._parameters, owner._buffers):
            for name, t in list(slots.items()):
                if t is not None and overlapping(t):
                    slots[name] = _contiguous(t)
                    done.append(f"{prefix}.{name}" if prefix else name)
    return done


class _Builder:
    def __init__(self, prog: _Program, planner: _Planner) -> None:
        self.prog = prog
        self.planner = planner
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.attrs: dict[str, fx.Node] = {}
        self.items: dict[fx.Node, Any] = {}  # tuple-returning lifted op -> its module call

    def build(self) -> fx.GraphModule:
        self._install_modules()
        for node in self.prog.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node)
            elif node.op == "output":
                self._output(node)
            elif node in self.planner.dropped:
                continue
            elif node in self.planner.plans:
                self._module_call(node)
            elif node.target is operator.getitem and node.args[0] in self.items:
                if node.args[1] == 0:
                    self.env[node] = self.items[node.args[0]]
            else:
                self._function(node)
        return fx.GraphModule(self.root, self.graph, "LiftedProgram")

    def _install_modules(self) -> None:
        for name, lift in self.planner.lifts.items():
            module = lift.module
            filled = set()  # a meta-device program fills modules with meta tensors
            for attr, ref in lift.state.items():
                if ref is None:
                    continue
                fqn = ref if isinstance(ref, str) else self.prog.state(ref)
                fqn = str(fqn)
                tensor = _state_copy(self.prog.tensor(fqn), fqn, self.planner.report)
                setattr(module, attr, tensor)
                filled.add(attr)
            if "num_batches_tracked" in module._buffers and module.num_batches_tracked.is_meta:
                module.num_batches_tracked = torch.tensor(0, dtype=torch.long)
            meta = [
                n
                for n, t in [*module.named_parameters(), *module.named_buffers()]
                if t.is_meta and n not in filled
            ]
            if meta:
                raise LiftError(f"internal error: {name} has no values for {meta}")
            _set_path(self.root, name, lambda parent, leaf, m=module: parent.add_module(leaf, m))

    def _placeholder(self, node: fx.Node) -> None:
        kind = self.prog.kind.get(node.name)
        if kind == InputKind.USER_INPUT:
            new = self.graph.placeholder(node.name)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
            self.env[node] = new
        elif kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            self.env[node] = _Attr(self.prog.fqn[node.name], kind, self.prog.persistent[node.name])
        else:
            raise LiftError(
                f"cannot lift input {node.name!r} of kind {kind}: only tensors, parameters, "
                "buffers and constant tensors are supported"
            )

    def _arg(self, value: Any) -> Any:
        if isinstance(value, _Attr):
            if value.fqn not in self.attrs:
                self._install_attr(value)
                self.attrs[value.fqn] = self.graph.get_attr(value.fqn)
            return self.attrs[value.fqn]
        return value

    def _install_attr(self, attr: _Attr) -> None:
        tensor = _state_copy(self.prog.tensor(attr.fqn), attr.fqn, self.planner.report)

        def make(parent: nn.Module, leaf: str) -> None:
            if attr.kind == InputKind.PARAMETER:
                parent.register_parameter(leaf, tensor)  # type: ignore[arg-type]
            else:
                persistent = attr.kind == InputKind.BUFFER and attr.persistent
                parent.register_buffer(leaf, tensor, persistent=persistent)

        _set_path(self.root, attr.fqn, make)

    def _map(self, args: Any) -> Any:
        def lookup(n: fx.Node) -> Any:
            if n not in self.env:
                raise LiftError(f"internal error: node {n.name} was dropped but is still used")
            return self._arg(self.env[n])

        return fx.node.map_arg(args, lookup)

    def _module_call(self, node: fx.Node) -> None:
        name, lift = self.planner.plans[node]
        inp = self._map(lift.input)
        new = self.graph.create_node("call_module", name, (inp,), {}, name=name.replace(".", "_"))
        if lift.tuple_result:
            self.items[node] = new
        else:
            self.env[node] = new

    def _function(self, node: fx.Node) -> None:
        args, kwargs = self._map(node.args), self._map(node.kwargs)
        entry = _FUNCTIONS.get(node.target)
        if entry is not None and len(args) <= entry[1] and set(kwargs) <= entry[2]:
            fn = entry[0]
            op, target = ("call_method", fn) if isinstance(fn, str) else ("call_function", fn)
        else:
            op, target = "call_function", node.target
        self.env[node] = self.graph.create_node(op, target, args, kwargs, name=node.name)

    def _output(self, node: fx.Node) -> None:
        flat = list(node.args[0])
        specs = self.prog.ep.graph_signature.output_specs
        user: list[Any] = []
        for value, spec in zip(flat, specs, strict=True):
            if spec.kind == OutputKind.USER_OUTPUT:
                user.append(self._map(value))
            elif spec.kind == OutputKind.BUFFER_MUTATION and spec.target in self.planner.owned:
                continue  # the lifted module updates its own buffer
            elif spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION):
                dest = self._target_node(spec)
                self.graph.call_function(aten.copy_.default, (dest, self._map(value)))
            else:
                raise LiftError(
                    f"cannot lift an exported program with {spec.kind.name} outputs "
                    "(export the model for inference, not a joint training graph)"
                )
        out_spec = self.prog.ep.call_spec.out_spec
        result = pytree.tree_unflatten(user, out_spec) if out_spec is not None else tuple(user)
        self.graph.output(result)

    def _target_node(self, spec: Any) -> fx.Node:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            placeholder = next(n for n, f in self.prog.fqn.items() if f == spec.target)
        else:
            placeholder = spec.target
        old = self.prog.graph.find_nodes(op="placeholder", target=placeholder)[0]
        return self._arg(self.env[old])


@dataclass(frozen=True)
class _Attr:
    fqn: str
    kind: InputKind
    persistent: bool


def _check_inputs(ep: ExportedProgram) -> None:
    in_spec = ep.call_spec.in_spec
    if in_spec is None:
        return
    for child in in_spec.children():
        for leaf in child.children():
            if not leaf.is_leaf():
                raise LiftError(
                    "cannot lift an exported program whose inputs are nested (tuples, lists "
                    "or dicts of tensors); export a model that takes tensors"
                )


def lift(ep: ExportedProgram) -> fx.GraphModule:
    """Rebuild a module-level ``fx.GraphModule`` from the exported program ``ep``.

    See the module docstring for what is lifted. The result computes exactly what
    ``ep.module()`` computes, owns copies of the program's tensors, and carries a
    :class:`LiftReport` (:func:`lift_report`). Raises :class:`LiftError` for
    programs with nested inputs, custom objects, effect tokens or joint
    (training) outputs.
    """
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"lift() expects a torch.export.ExportedProgram, got {type(ep).__name__}")
    _check_inputs(ep)
    prog = _Program(ep)
    report = LiftReport()
    planner = _Planner(prog, report)
    planner.plan()
    gm = _Builder(prog, planner).build()
    for name, persistent in prog.persistent.items():  # GraphModule() registers every buffer
        fqn = prog.fqn.get(name)  # as persistent: restore the program's choice
        if not persistent or prog.kind.get(name) == InputKind.CONSTANT_TENSOR:
            _make_non_persistent(gm, fqn)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"} | set(report.modules)
    report.unused = sorted(f for f in prog.state_fqns if not any(_is_under(f, u) for u in used))
    training = any(m.training for m in planner.modules.values() if _has_mode(m))
    gm.train(training)
    for name, module in planner.modules.items():
        if _has_mode(module):
            gm.get_submodule(name).train(module.training)
    gm.meta[LIFT_KEY] = report
    canonicalize(gm)
    return gm


def _make_non_persistent(gm: fx.GraphModule, fqn: str | None) -> None:
    if fqn is None:
        return
    parent_name, _, leaf = fqn.rpartition(".")
    try:
        parent = gm.get_submodule(parent_name)
    except AttributeError:
        return  # not used by the graph, so not copied into the GraphModule
    if leaf in parent._buffers:
        parent._non_persistent_buffers_set.add(leaf)


def _has_mode(module: nn.Module) -> bool:
    """Whether the module computes differently in training mode."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout))


# -- example inputs ---------------------------------------------------------------------------


def example_inputs(ep: ExportedProgram, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs for ``ep``'s positional arguments: its stored sample inputs, else seeded
    random tensors shaped like its input placeholders (symbolic sizes become 2)."""
    stored = getattr(ep, "example_inputs", None)
    if stored is not None and not stored[1]:
        args = stored[0]
        if all(isinstance(a, torch.Tensor) for a in args):
            return tuple(a.detach().clone() for a in args)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        node = ep.graph.find_nodes(op="placeholder", target=spec.arg.name)[0]
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise LiftError(f"cannot make an example for input {spec.arg.name!r}: not a tensor")
        shape = [_size(s) for s in val.shape]
        if val.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=generator, dtype=val.dtype))
        else:
            out.append(torch.zeros(shape, dtype=val.dtype))
    return tuple(out)


def _size(s: Any) -> int:
    try:
        return int(s)
    except (TypeError, ValueError):
        return 2


# -- .pt2 files -------------------------------------------------------------------------------


def load_pt2(path: str | Path, *, trust_pickle: bool = False) -> ExportedProgram:
    """Load the ``torch.export`` program saved at ``path``.

    The archive is checked first by :func:`rewriter.pt2gate.check` and refused if
    loading it would unpickle anything beyond plain tensors, evaluate a symbolic
    expression or guard outside a strict grammar, or call a non-operator target;
    ``trust_pickle`` trusts the whole archive. Raises :class:`ArtifactError` for
    missing, unreadable or refused files.
    """
    path = Path(path)
    pt2gate.check(path, trust_pickle=trust_pickle)  # before torch reads a byte of it
    try:
        return torch.export.load(path)
    except Exception as exc:  # torch raises many types for damaged archives
        raise ArtifactError(
            f"{path} could not be loaded as a torch.export program "
            f"({type(exc).__name__}: {exc}). Is it truncated, or from another torch version?"
        ) from exc


__all__ = [
    "LiftError",
    "LiftReport",
    "example_inputs",
    "lift",
    "lift_report",
    "load_pt2",
    "materialise_state",
    "overlapping",
]
