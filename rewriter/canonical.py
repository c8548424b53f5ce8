"""Canonicalisation: one module-level graph, however a model writes its layers.

Every front end (:func:`rewriter.trace`, :func:`rewriter.lift`) ends here, so passes and
analyses see standard ``call_module`` layers whatever the source:

* **Functional calls on a module's own parameters become layers.** ``F.conv{1,2,3}d``,
  ``F.linear``, ``F.batch_norm``, ``F.layer_norm`` and ``F.group_norm`` (and the aten
  ``linear``/``conv``/``layer_norm``/``group_norm`` calls lifting leaves) whose weights
  are read with ``get_attr`` (what tracing through a custom module, or through a layer
  subclass with its own ``forward`` such as a fused BatchNorm+activation, records)
  become ``nn.Conv{1,2,3}d`` / ``nn.Linear`` / ``nn.BatchNorm{1,2,3}d`` / ``nn.LayerNorm``
  / ``nn.GroupNorm`` calls holding the very same parameter tensors. Whatever the
  original forward did after the call (the activation of a norm-act layer) stays in
  the graph after the new layer. A ``num_batches_tracked.add_(1)`` of that module is
  dropped: the BatchNorm counts itself. ``F.batch_norm`` needs its input's rank to pick
  ``BatchNorm1d/2d/3d``: known from a BatchNorm subclass or a conv right before it,
  otherwise (after a residual add, a pooling...) from recorded shapes, so
  :func:`canonicalize_with_shapes` (run by :func:`rewriter.rewrite`, and by
  :func:`rewriter.trace` given ``example_inputs``) lifts the calls the first run kept.
  ``F.layer_norm``'s ``normalized_shape`` is the weight's shape, also when the graph
  computes it (``(x.shape[-1],)``).
* **In-place ops become out-of-place**: ``out += x`` (``operator.iadd``...),
  ``x.add_(y)``, ``x.relu_()``, ``torch.relu_``, ``F.relu(x, inplace=True)``,
  ``F.hardswish/silu/dropout(..., inplace=True)``... An op is rewritten only when no
  other node reads the tensor it overwrites (or a view of it) afterwards and the tensor
  is not a model input, parameter or buffer; otherwise it is kept and the report says
  why. Outputs are bit-identical (same kernels, same values).
* **Attention becomes explicit**: ``nn.MultiheadAttention`` (packed in-projection, no
  bias_k/v, no zero attention, attention weights not used) becomes three ``nn.Linear``
  layers ``q_proj``, ``k_proj``, ``v_proj``, a :class:`HeadAttention` module holding the
  number of heads (it splits heads, runs ``F.scaled_dot_product_attention`` and merges
  them) and the ``nn.Linear`` ``out_proj``. With ``need_weights=True`` (the module's
  default; the weights unused) the heads compute as the module does then (``bmm`` of the
  scaled queries and keys, softmax, dropout, ``bmm`` with the values:
  ``HeadAttention(need_weights=True)``), else with SDPA, so outputs stay bit-identical.
  Traced, the module call is rewritten; in a lifted exported program the ops export
  leaves for it (the packed ``linear`` on ``P.in_proj_weight``, the
  ``unflatten``/``unsqueeze``/``transpose``/``squeeze``/``select`` split of q, k, v, the
  head ``view``/``transpose``, then ``scaled_dot_product_attention`` and the
  ``permute`` merge, or ``mul``/``bmm``/``softmax``/``dropout``/``bmm`` and the
  ``transpose`` merge with the unused weights' ``view``/``mean``; the ``reshape``,
  ``P.out_proj`` and the ``view``/``transpose`` back) are matched and replaced by the
  same modules, names and parameters, so both front ends give one graph. Deviation:
  only packed self-attention (``query is key is value``) without masks, ``is_causal``
  or a custom scale is matched in a program; attention whose weights are used keeps one
  packed ``P.in_proj`` layer (the report says why); cross-attention slices the packed
  weight in the graph and is left as exported. The attention dropout is read from the
  program: a program exported in eval mode gets ``dropout=0.0``.
* **Packed q/k/v become one tensor per projection** (:mod:`rewriter.packed_attention`):
  ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)[i]`` (timm's ViT, the zoo
  ``vit``) becomes ``torch.split(qkv(x), [H*D] * 3, -1)[i].reshape(B, N, H, D)`` and the
  remaining permute; the packed layer and its parameters are kept (nothing is renamed).

Names (the mapping, also in :attr:`CanonicalReport.renamed`, new name -> original):

* a layer lifted from ``P.weight``/``P.bias`` (and ``P.running_mean``...) is the module
  ``P``, so state-dict keys are unchanged; the other submodules ``P`` held (a norm-act
  layer's ``act``, ``drop``) move next to it as ``P_act``, ``P_drop`` (for example
  ``layer1.0.bn1.act`` -> ``layer1.0.bn1_act``);
* a layer lifted from differently named parameters ``P.<stem>_weight``/``P.<stem>_bias``
  is the module ``P.<stem>`` (``P.in_proj_weight`` -> ``P.in_proj.weight``: the packed
  in-projection of an exported ``nn.MultiheadAttention`` whose form is not matched);
* ``nn.MultiheadAttention`` ``P`` (traced, or lifted from a program): ``P.in_proj_weight``
  rows ``[0:E]``, ``[E:2E]``, ``[2E:3E]`` -> ``P.q_proj.weight``, ``P.k_proj.weight``,
  ``P.v_proj.weight`` (bias likewise); ``P.out_proj`` keeps its name; the heads are
  ``P.attention``.

Deviations: a module whose forward branches on ``self.training`` is traced in the mode
the model is in (that is how ``torch.fx`` and ``torch.export`` work); a lifted
BatchNorm then computes in each mode what ``nn.BatchNorm2d`` computes, which is what
fused norm-act layers do.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import RewriterError
from .modules import RewriterModule
from .packed_attention import split_packed_qkv

CANONICAL_KEY = "rewriter_canonical"

__all__ = [
    "CanonicalReport", "HeadAttention", "canonical_report", "canonicalize", "canonicalize_with_shapes"
]  # fmt: skip


@dataclass
class CanonicalReport:
    """What :func:`canonicalize` changed.

    Attributes:
        lifted: functional call or module -> layer class, per lifted call
            (``{"F.batch_norm -> BatchNorm2d": 3}``).
        inplace: in-place ops made out-of-place, by op (``{"operator.iadd": 2}``).
        renamed: new qualified name -> original name, for every parameter, buffer or
            submodule whose name changed.
        kept: ``(node, op, reason)`` for calls left as they are.
    """

    lifted: dict[str, int] = field(default_factory=dict)
    inplace: dict[str, int] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    kept: list[tuple[str, str, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.lifted or self.inplace or self.renamed or self.kept)

    def lines(self) -> list[str]:
        out = [f"lifted {n} x {what}" for what, n in self.lifted.items()]
        out += [f"made out-of-place {n} x {op}" for op, n in self.inplace.items()]
        out += [f"renamed {old!r} -> {new!r}" for new, old in self.renamed.items()]
        out += [f"kept {op} at node {node!r}: {why}" for node, op, why in self.kept]
        return out

    def _count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def canonical_report(gm: nn.Module) -> CanonicalReport | None:
    """The :class:`CanonicalReport` of a canonicalised GraphModule, else ``None``."""
    return getattr(gm, "meta", {}).get(CANONICAL_KEY)


class HeadAttention(RewriterModule):
    """Multi-head scaled dot-product attention on projected ``q``, ``k``, ``v``.

    ``(N, L, E) x3 -> (N, L, E)`` (``(L, N, E)`` when ``batch_first=False``): splits
    ``E`` into ``num_heads`` heads of ``E // num_heads`` channels, runs
    ``F.scaled_dot_product_attention`` (dropout ``dropout`` in training mode only) and
    merges the heads. Channel ``i`` of head ``h`` is channel ``h * E/num_heads + i``.

    ``need_weights=True`` computes what ``nn.MultiheadAttention`` computes when it is asked
    for its attention weights (its default): ``q * sqrt(1/head_dim)``, ``torch.bmm`` with
    ``k^T``, softmax, dropout, ``torch.bmm`` with ``v``, on ``(N * H, L, head_dim)``
    heads. The weights themselves are not returned; the explicit form rounds like the
    module, where SDPA would round differently (about 1e-7).

    Head ``h`` (its q, k and v channels and merged output channels) is one unit of the
    channel analysis (:func:`rewriter.analysis.rules_channels.head_attention`);
    :func:`rewriter.slim.slim` removes whole heads and sets ``num_heads`` to the kept
    count. The head dim is the input width over ``num_heads``, so it and the attention
    scale stay the same.
    """

    def __init__(
        self, num_heads: int, dropout: float = 0.0, batch_first: bool = True,
        need_weights: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.need_weights = bool(need_weights)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:  # fmt: skip
        if self.need_weights:
            return self._with_weights(q, k, v, attn_mask, is_causal)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        n, lq, e = q.shape
        h = self.num_heads
        qh = q.view(n, lq, h, e // h).transpose(1, 2)
        kh = k.view(n, k.shape[1], h, k.shape[2] // h).transpose(1, 2)
        vh = v.view(n, v.shape[1], h, v.shape[2] // h).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask, p, is_causal)
        out = out.transpose(1, 2).reshape(n, lq, -1)
        return out if self.batch_first else out.transpose(0, 1)

    def _with_weights(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """``F.multi_head_attention_forward``'s ``need_weights`` computation."""
        if attn_mask is not None or is_causal:
            raise RewriterError(
                "HeadAttention(need_weights=True) takes no attention mask and no is_causal"
            )
        if self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        lq, n, e = q.shape
        h = self.num_heads
        qh = q.reshape(lq, n * h, e // h).transpose(0, 1)
        kh = k.reshape(k.shape[0], n * h, k.shape[2] // h).transpose(0, 1)
        vh = v.reshape(v.shape[0], n * h, v.shape[2] // h).transpose(0, 1)
        weights = torch.bmm(qh * math.sqrt(1.0 / float(e // h)), kh.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, vh).transpose(0, 1).reshape(lq, n, -1)
        return out.transpose(0, 1) if self.batch_first else out

    def rewriter_macs(self, input_shapes: list[tuple[int, ...]], output_shape: Any) -> int:
        """``Q K^T`` and ``A V`` for every head, and the softmax over the scores (the
        projections are the q/k/v/out ``nn.Linear`` layers around this module)."""
        from .analysis.flops import SOFTMAX_MACS

        if len(input_shapes) < 3 or any(len(s) != 3 for s in input_shapes[:3]):
            return 0
        q, k, v = input_shapes[:3]
        n, lq, lk = (q[0], q[1], k[1]) if self.batch_first else (q[1], q[0], k[0])
        scores = n * self.num_heads * lq * lk
        per_head = (q[-1] + v[-1]) // self.num_heads
        return scores * per_head + SOFTMAX_MACS * scores

    def extra_repr(self) -> str:
        out = f"num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"
        return out + (", need_weights=True" if self.need_weights else "")


# -- functional layers ------------------------------------------------------------------------


@dataclass
class _Layer:
    """A planned layer: the module, its input, and which get_attr feeds which attribute."""

    module: nn.Module
    input: Any
    state: dict[str, fx.Node]  # module attribute -> get_attr node
    extra: tuple[fx.Node, ...] = ()  # nodes that disappear with the call


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _attr(value: Any) -> fx.Node | None:
    return value if isinstance(value, fx.Node) and value.op == "get_attr" else None


def _tensor(gm: fx.GraphModule, node: fx.Node) -> Tensor:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _conv(dims: int) -> Callable[[fx.GraphModule, fx.Node], _Layer | str]:
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]

    def plan(gm: fx.GraphModule, node: fx.Node) -> _Layer | str:
        weight, bias = _attr(_arg(node, 1, "weight")), _arg(node, 2, "bias")
        if weight is None:
            return "the weight is not a parameter read with get_attr"
        if bias is not None and _attr(bias) is None:
            return "the bias is not a parameter read with get_attr"
        w = _tensor(gm, weight)
        if w.dim() != dims + 2:
            return f"the weight is {w.dim()}-d"
        options = {
            "stride": _arg(node, 3, "stride", 1),
            "padding": _arg(node, 4, "padding", 0),
            "dilation": _arg(node, 5, "dilation", 1),
            "groups": _arg(node, 6, "groups", 1),
        }
        if any(isinstance(v, fx.Node) for v in options.values()):
            return "an option is computed in the graph"
        groups = int(options["groups"])
        with torch.device("meta"):
            module = cls(
                w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), bias=bias is not None,
                **options,
            )  # fmt: skip
        state = {"weight": weight} | ({"bias": bias} if bias is not None else {})
        return _Layer(module, _arg(node, 0, "input"), state)

    return plan


def _linear(gm: fx.GraphModule, node: fx.Node) -> _Layer | str:
    weight, bias = _attr(_arg(node, 1, "weight")), _arg(node, 2, "bias")
    if weight is None:
        return "the weight is not a parameter read with get_attr"
    if bias is not None and _attr(bias) is None:
        return "the bias is not a parameter read with get_attr"
    w = _tensor(gm, weight)
    if w.dim() != 2:
        return f"the weight is {w.dim()}-d"
    with torch.device("meta"):
        module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    state = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    return _Layer(module, _arg(node, 0, "input"), state)


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> _Layer | str:
    names = ("running_mean", "running_var", "weight", "bias")
    refs = {n: _arg(node, i + 1, n) for i, n in enumerate(names)}
    if any(v is not None and _attr(v) is None for v in refs.values()):
        return "an argument is computed in the graph, not a parameter or buffer"
    if refs["weight"] is None or refs["bias"] is None:
        return "no affine weight and bias to lift"
    if (refs["running_mean"] is None) != (refs["running_var"] is None):
        return "only one of running_mean and running_var is given"
    training, momentum, eps = (
        _arg(node, 5, "training", False), _arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)
    )  # fmt: skip
    if not isinstance(training, bool) or not isinstance(momentum, (int, float)):
        return "training or momentum is computed in the graph"
    if not isinstance(eps, (int, float)):
        return "eps is computed in the graph"
    track = refs["running_mean"] is not None
    if not track and not training:
        return "normalises with batch statistics in eval mode but tracks none"
    shape = _shape(_arg(node, 0, "input"))
    c = _tensor(gm, refs["weight"]).shape[0]
    rank = len(shape) if shape is not None else None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)  # type: ignore[arg-type]
    if cls is None:
        return _RANK_UNKNOWN if rank is None else f"the input is {rank}-d, not 2- to 5-d"
    with torch.device("meta"):
        module = cls(c, eps=float(eps), momentum=float(momentum), track_running_stats=track)
    module.train(training if track else True)
    state = {n: v for n, v in refs.items() if v is not None}
    return _Layer(module, _arg(node, 0, "input"), state)


_RANK_UNKNOWN = "the input's rank is unknown (lifted once shapes are recorded)"


def _layer_norm(gm: fx.GraphModule, node: fx.Node) -> _Layer | str:
    shape, weight, bias = _arg(node, 1, "normalized_shape"), _arg(node, 2, "weight"), _arg(node, 3, "bias")
    eps = _arg(node, 4, "eps", 1e-5)
    if _attr(weight) is None or (bias is not None and _attr(bias) is None):
        return "the weight or bias is not a parameter read with get_attr"
    if not isinstance(eps, (int, float)):
        return "eps is computed in the graph"
    # F.layer_norm requires weight.shape == normalized_shape, so the weight tells the shape
    # also when the graph computes it (``(x.shape[-1],)``); those nodes go with the call
    computed = _nodes_in(shape)
    with torch.device("meta"):
        module = nn.LayerNorm(list(_tensor(gm, weight).shape), eps=float(eps), bias=bias is not None)
    state = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    return _Layer(module, _arg(node, 0, "input"), state, tuple(computed))


def _nodes_in(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


_SIZE_READS = frozenset({getattr, operator.getitem})


def _erase_dead_sizes(graph: fx.Graph, nodes: tuple[fx.Node, ...]) -> None:
    """Erase ``nodes`` and what only they read, while unused and size reads
    (``x.shape``, ``[i]``, ``x.size(...)``)."""
    todo = list(nodes)
    while todo:
        n = todo.pop()
        pure = (n.op == "call_function" and n.target in _SIZE_READS) or (
            n.op == "call_method" and n.target in ("size", "dim")
        )
        if getattr(n, "_erased", False) or n.users or not pure or n.graph is not graph:
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        todo += [i for i in inputs if i.op != "placeholder"]


def _group_norm(gm: fx.GraphModule, node: fx.Node) -> _Layer | str:
    groups, weight, bias = _arg(node, 1, "num_groups"), _arg(node, 2, "weight"), _arg(node, 3, "bias")
    eps = _arg(node, 4, "eps", 1e-5)
    if _attr(weight) is None or _attr(bias) is None:
        return "the weight and bias are not both parameters read with get_attr"
    if not isinstance(groups, int) or not isinstance(eps, (int, float)):
        return "the group count or eps is computed in the graph"
    c = _tensor(gm, weight).shape[0]
    with torch.device("meta"):
        module = nn.GroupNorm(groups, c, eps=float(eps))
    return _Layer(module, _arg(node, 0, "input"), {"weight": weight, "bias": bias})


def _shape(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, fx.Node):
        return None
    meta = value.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(meta.shape)
    val = value.meta.get("val")
    if isinstance(val, Tensor):
        return tuple(val.shape)
    return None


FUNCTIONAL_LAYERS: dict[Any, tuple[str, Callable[[fx.GraphModule, fx.Node], _Layer | str]]] = {
    F.conv1d: ("F.conv1d", _conv(1)),
    F.conv2d: ("F.conv2d", _conv(2)),
    F.conv3d: ("F.conv3d", _conv(3)),
    F.linear: ("F.linear", _linear),
    torch._C._nn.linear: ("F.linear", _linear),
    F.batch_norm: ("F.batch_norm", _batch_norm),
    F.layer_norm: ("F.layer_norm", _layer_norm),
    F.group_norm: ("F.group_norm", _group_norm),
    # what lifting an exported program leaves when a layer's state is named otherwise
    # (``nn.MultiheadAttention``'s ``in_proj_weight``): the same argument layout
    torch.ops.aten.linear.default: ("aten.linear", _linear),
    torch.ops.aten.conv1d.default: ("aten.conv1d", _conv(1)),
    torch.ops.aten.conv2d.default: ("aten.conv2d", _conv(2)),
    torch.ops.aten.conv3d.default: ("aten.conv3d", _conv(3)),
    torch.ops.aten.layer_norm.default: ("aten.layer_norm", _layer_norm),
    torch.ops.aten.group_norm.default: ("aten.group_norm", _group_norm),
}


def _bn_class(source: nn.Module | None, owner: str) -> type[nn.Module] | None:
    """The standard BatchNorm class of the source module ``owner`` (a subclass's base)."""
    if source is None:
        return None
    try:
        module = source.get_submodule(owner)
    except AttributeError:
        return None
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(module, cls):
            return cls
    return None


def _source_tensor(source: nn.Module | None, fqn: str) -> Tensor | None:
    if source is None:
        return None
    obj: Any = source
    try:
        for part in fqn.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return obj if isinstance(obj, Tensor) else None


class _Canonicalizer:
    def __init__(self, gm: fx.GraphModule, source: nn.Module | None, report: CanonicalReport) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.source = source
        self.report = report

    # -- functional layers --------------------------------------------------------------------
    def lift_layers(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS:
                continue
            label, plan = FUNCTIONAL_LAYERS[node.target]
            if node.target is F.batch_norm:
                self._bn_rank_hint(node)
            layer = plan(self.gm, node)
            if isinstance(layer, str):
                if any(_attr(a) is not None for a in node.args):  # only report own-parameter calls
                    self.report.kept.append((node.name, label, layer))
                continue
            problem = self._install(node, layer)
            if problem:
                self.report.kept.append((node.name, label, problem))
            else:
                self.report._count(self.report.lifted, f"{label} -> {type(layer.module).__name__}")

    def _bn_rank_hint(self, node: fx.Node) -> None:
        """Give F.batch_norm's input a rank from the source BatchNorm class when unknown."""
        x = _arg(node, 0, "input")
        weight = _attr(_arg(node, 3, "weight"))
        if not isinstance(x, fx.Node) or _shape(x) is not None or weight is None:
            return
        cls = _bn_class(self.source, str(weight.target).rpartition(".")[0])
        rank = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}.get(cls)  # type: ignore[arg-type]
        if rank is None and cls is None and x.op == "call_module":  # conv -> F.batch_norm
            producer = self.gm.get_submodule(str(x.target))
            if isinstance(producer, nn.modules.conv._ConvNd):
                rank = len(producer.kernel_size) + 2
        if rank is None and cls is nn.BatchNorm1d:
            rank = 2
        if rank is not None:
            x.meta["rewriter_rank_hint"] = rank
            x.meta.setdefault("val", torch.empty((1,) * rank, device="meta"))

    def _install(self, node: fx.Node, layer: _Layer) -> str | None:
        state = layer.state
        targets = {a: str(n.target) for a, n in state.items()}
        for a, n in state.items():
            if set(n.users) != {node}:
                return f"{targets[a]!r} is also read by other nodes (shared parameter)"
        owners = {t.rpartition(".")[0] for t in targets.values()}
        if len(owners) != 1:
            return f"its tensors belong to different modules ({', '.join(sorted(targets.values()))})"
        owner = owners.pop()
        leaves = {a: t.rpartition(".")[2] for a, t in targets.items()}
        is_bn = isinstance(layer.module, nn.modules.batchnorm._BatchNorm)
        counter = self._counter(owner) if is_bn and layer.module.track_running_stats else None
        if counter is not None and isinstance(counter, str):
            return counter
        container = self.gm.get_submodule(owner) if owner else self.gm
        own = set(container._parameters) | set(container._buffers)
        used = set(leaves.values()) | ({"num_batches_tracked"} if is_bn else set())
        whole = owner and all(leaves[a] == a for a in leaves) and own <= used
        if whole:
            name = owner
        else:
            stem = leaves["weight"].removesuffix("weight").rstrip("_")
            if not stem:
                return f"{owner or 'the root'} also holds other state, so the layer has no name"
            name = f"{owner}.{stem}" if owner else stem
            if hasattr(container, stem):
                return f"cannot name the layer {name!r}: the name is taken"
        module = layer.module
        for attr in targets:
            setattr(module, attr, _tensor(self.gm, state[attr]))
        if is_bn and module.track_running_stats:
            nbt = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
            existing = getattr(container, "num_batches_tracked", None)
            if existing is None:
                existing = _source_tensor(self.source, nbt)
            module.num_batches_tracked = (
                existing if isinstance(existing, Tensor) else torch.tensor(0, dtype=torch.long)
            )
        if not whole:
            for attr, leaf in leaves.items():
                delattr(container, leaf)
                self.report.renamed[f"{name}.{attr}"] = f"{owner}.{leaf}" if owner else leaf
            self.gm.add_submodule(name, module)
        with self.graph.inserting_before(node):
            new = self.graph.call_module(name, (layer.input,))
        new.meta.update({k: v for k, v in node.meta.items() if k != "tensor_meta"})
        if "tensor_meta" in node.meta:
            new.meta["tensor_meta"] = node.meta["tensor_meta"]
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        for n in state.values():
            if not n.users:
                self.graph.erase_node(n)
        _erase_dead_sizes(self.graph, layer.extra)
        if isinstance(counter, fx.Node):
            getter = counter.args[0]
            self.graph.erase_node(counter)
            if isinstance(getter, fx.Node) and not getter.users:
                self.graph.erase_node(getter)
        if whole:
            self._replace_container(owner, module)
        return None

    def _counter(self, owner: str) -> fx.Node | str | None:
        """The ``num_batches_tracked.add_(1)`` node of ``owner``, if its result is unused."""
        target = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
        for n in self.graph.nodes:
            if n.op == "get_attr" and n.target == target:
                for user in list(n.users):
                    if user.op == "call_method" and user.target == "add_" and not user.users:
                        return user
                return f"{target!r} is read by other nodes"
        return None

    def _replace_container(self, owner: str, module: nn.Module) -> None:
        """Put ``module`` at ``owner``; the container's other children move next to it."""
        container = self.gm.get_submodule(owner)
        parent_name, _, leaf = owner.rpartition(".")
        parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
        moves: dict[str, str] = {}
        for child_name, child in container.named_children():
            new_leaf = f"{leaf}_{child_name}"
            i = 0
            while hasattr(parent, new_leaf):
                i += 1
                new_leaf = f"{leaf}_{child_name}_{i}"
            parent.add_module(new_leaf, child)
            old = f"{owner}.{child_name}"
            new = f"{parent_name}.{new_leaf}" if parent_name else new_leaf
            moves[old] = new
            self.report.renamed[new] = old
        setattr(parent, leaf, module)
        if not moves:
            return
        for n in self.graph.nodes:
            if n.op in ("call_module", "get_attr") and isinstance(n.target, str):
                for old, new in moves.items():
                    if n.target == old or n.target.startswith(old + "."):
                        n.target = new + n.target[len(old) :]
                        break

    # -- in-place ops -------------------------------------------------------------------------
    def out_of_place(self) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for node in list(self.graph.nodes):
            change = _inplace_change(node)
            if change is None:
                continue
            label, apply = change
            problem = self._alias_problem(node, order)
            if problem:
                self.report.kept.append((node.name, label, problem))
                continue
            apply(node)
            self.report._count(self.report.inplace, label)

    def _alias_problem(self, node: fx.Node, order: dict[fx.Node, int]) -> str | None:
        """Why overwriting ``node``'s first argument in place is observable, else None."""
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        component, todo = {first}, [first]
        while todo:
            m = todo.pop()
            if m.op in ("placeholder", "get_attr"):
                return f"it overwrites {m.op} {m.target!r} (or a view of it)"
            related = [] if self._fresh(m) else [a for a in m.all_input_nodes]
            related += [u for u in m.users if u is not node and not self._fresh(u)]
            for r in related:
                if r not in component:
                    component.add(r)
                    todo.append(r)
        here = order[node]
        for m in component:
            for u in m.users:
                if u is not node and order.get(u, here + 1) > here:
                    return f"node {u.name!r} reads the overwritten tensor afterwards"
        return None

    def _fresh(self, node: fx.Node) -> bool:
        """Whether ``node`` returns a new tensor (never a view or its input itself)."""
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if getattr(module, "inplace", False):
                return False
            return isinstance(module, _FRESH_MODULES)
        if node.op == "call_function":
            if node.target in _INPLACE_KWARG:
                return not _arg(node, _INPLACE_KWARG[node.target], "inplace", False)
            return node.target in _FRESH_FUNCTIONS
        if node.op == "call_method":
            return node.target in _FRESH_METHODS
        return False

    # -- attention ----------------------------------------------------------------------------
    def explicit_attention(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_module":
                continue
            module = self.gm.get_submodule(str(node.target))
            if type(module) is not nn.MultiheadAttention:
                continue
            problem = self._attention(node, module)
            if problem:
                self.report.kept.append((node.name, "nn.MultiheadAttention", problem))
            else:
                self.report._count(
                    self.report.lifted, "nn.MultiheadAttention -> q/k/v Linear + HeadAttention"
                )

    def _attention(self, node: fx.Node, m: nn.MultiheadAttention) -> str | None:
        if not m._qkv_same_embed_dim or m.in_proj_weight is None:
            return "separate q/k/v projection weights of different sizes"
        if m.bias_k is not None or m.add_zero_attn:
            return "bias_k/bias_v or add_zero_attn"
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")  # fmt: skip
        call = {n: _arg(node, i, n) for i, n in enumerate(names)}
        if call["key_padding_mask"] is not None or call["attn_mask"] is not None:
            return "a key padding mask or attention mask is given"
        if call["is_causal"]:
            return "is_causal=True"
        need_weights = True if call["need_weights"] is None else call["need_weights"]
        if not isinstance(need_weights, bool):
            return "need_weights is computed in the graph"
        if any(not isinstance(call[n], fx.Node) for n in ("query", "key", "value")):
            return "query, key or value is not a tensor"
        for user in node.users:
            if user.op != "call_function" or user.target is not operator.getitem:
                return "its (output, weights) tuple is used whole"
            if user.args[1] != 0 and user.users:
                return "the attention weights are used"
        e = m.embed_dim
        w, b = m.in_proj_weight.detach(), m.in_proj_bias
        target = str(node.target)
        parent_name, _, leaf = target.rpartition(".")
        parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
        holder = nn.Module()
        holder.train(m.training)
        projections = []
        for i, which in enumerate("qkv"):
            lin = nn.Linear(e, e, bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight = nn.Parameter(w[i * e : (i + 1) * e].clone(), m.in_proj_weight.requires_grad)
                if b is not None:
                    lin.bias = nn.Parameter(b.detach()[i * e : (i + 1) * e].clone(), b.requires_grad)
            holder.add_module(f"{which}_proj", lin)
            projections.append(f"{which}_proj")
            self.report.renamed[f"{target}.{which}_proj.weight"] = (
                f"{target}.in_proj_weight[{i * e}:{(i + 1) * e}]"
            )
            if b is not None:
                self.report.renamed[f"{target}.{which}_proj.bias"] = (
                    f"{target}.in_proj_bias[{i * e}:{(i + 1) * e}]"
                )
        out = nn.Linear(e, e, bias=m.out_proj.bias is not None)
        out.weight, out.bias = m.out_proj.weight, m.out_proj.bias
        attention = HeadAttention(m.num_heads, m.dropout, m.batch_first, need_weights=need_weights)
        holder.add_module("attention", attention)
        holder.add_module("out_proj", out)
        holder.train(m.training)
        setattr(parent, leaf, holder)
        with self.graph.inserting_before(node):
            qkv = [
                self.graph.call_module(f"{target}.{p}", (call[x],))
                for p, x in zip(projections, ("query", "key", "value"), strict=True)
            ]
            heads = self.graph.call_module(f"{target}.attention", tuple(qkv))
            result = self.graph.call_module(f"{target}.out_proj", (heads,))
        for new in (*qkv, heads, result):
            new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack") or {})
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(result)
            self.graph.erase_node(user)
        self.graph.erase_node(node)
        return None

    # -- attention left by torch.export -------------------------------------------------------
    def exported_attention(self) -> None:
        """``nn.MultiheadAttention`` as an exported program records it, made explicit.

        Export leaves ``linear(x, P.in_proj_weight, P.in_proj_bias)``, the
        ``unflatten``/``unsqueeze``/``transpose``/``squeeze``/``contiguous``/``select`` that
        split q, k, v, the head ``view``/``transpose``, ``scaled_dot_product_attention``,
        the merge (``permute``/``reshape``), ``P.out_proj`` and the ``view`` (and, for
        ``batch_first``, the ``transpose``) back. That becomes what tracing makes of the
        module: ``P.q_proj``/``P.k_proj``/``P.v_proj``, ``P.attention`` (HeadAttention) and
        ``P.out_proj``. Other forms (cross-attention, masks, attention weights used) are
        kept, with the reason, and the packed ``P.in_proj`` is then lifted as one layer.
        """
        for node in list(self.graph.nodes):
            weight = _attr(_arg(node, 1, "weight")) if node.op == "call_function" else None
            if node.target not in _LINEAR or weight is None:
                continue
            if not str(weight.target).endswith("in_proj_weight"):
                continue
            match = _match_exported_attention(self.gm, node)
            if isinstance(match, str):
                self.report.kept.append((node.name, "nn.MultiheadAttention (exported)", match))
                continue
            self._install_exported_attention(node, match)
            self.report._count(
                self.report.lifted, "nn.MultiheadAttention -> q/k/v Linear + HeadAttention"
            )

    def _install_exported_attention(self, linear: fx.Node, m: _ExportedAttention) -> None:
        owner = str(m.weight.target).rpartition(".")[0]
        holder = self.gm.get_submodule(owner) if owner else self.gm
        w = _tensor(self.gm, m.weight)
        b = _tensor(self.gm, m.bias) if m.bias is not None else None
        e = w.shape[1]
        out_proj = holder._modules.pop("out_proj")
        for attr in ("in_proj_weight", "in_proj_bias"):
            if attr in holder._parameters:
                del holder._parameters[attr]
        prefix = f"{owner}." if owner else ""
        for i, which in enumerate("qkv"):
            lin = nn.Linear(e, e, bias=b is not None, device=w.device, dtype=w.dtype)
            lin.weight = nn.Parameter(w.detach()[i * e : (i + 1) * e].clone(), w.requires_grad)
            if b is not None:
                lin.bias = nn.Parameter(b.detach()[i * e : (i + 1) * e].clone(), b.requires_grad)
            holder.add_module(f"{which}_proj", lin)
            for kind, present in (("weight", True), ("bias", b is not None)):
                if present:
                    self.report.renamed[f"{prefix}{which}_proj.{kind}"] = (
                        f"{prefix}in_proj_{kind}[{i * e}:{(i + 1) * e}]"
                    )
        attention = HeadAttention(m.heads, m.dropout, m.batch_first, m.need_weights)
        holder.add_module("attention", attention)
        holder.add_module("out_proj", out_proj)
        for module in (*(holder.get_submodule(f"{w}_proj") for w in "qkv"), attention):
            module.train(self.gm.training or m.dropout > 0)
        with self.graph.inserting_before(m.out_proj):
            qkv = [self.graph.call_module(f"{prefix}{w}_proj", (m.input,)) for w in "qkv"]
            heads = self.graph.call_module(f"{prefix}attention", tuple(qkv))
        m.out_proj.args = (heads,)
        m.result.replace_all_uses_with(m.out_proj)
        sizes = m.size_nodes()
        for n in [*reversed(m.chain), m.entry]:
            if n is not None and not n.users:
                self.graph.erase_node(n)
        arithmetic = (operator.mul, operator.floordiv, torch.ops.aten.sym_size.int)
        for n in sizes:  # size arithmetic only the replaced views read
            if not n.users and n.op == "call_function" and n.target in arithmetic:
                self.graph.erase_node(n)


# -- nn.MultiheadAttention as torch.export records it --------------------------------------------

_LINEAR = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


@dataclass
class _ExportedAttention:
    """A matched exported ``nn.MultiheadAttention`` (packed self-attention)."""

    input: fx.Node  # the tensor q, k and v are projected from (as the module got it)
    weight: fx.Node  # get_attr P.in_proj_weight
    bias: fx.Node | None
    out_proj: fx.Node  # call_module P.out_proj
    result: fx.Node  # the node whose value is the module's output
    heads: int
    dropout: float
    batch_first: bool
    chain: list[fx.Node]  # the nodes the explicit form replaces, in graph order
    entry: fx.Node | None = None  # the batch-first input's transpose (dropped when unused)
    need_weights: bool = False  # the bmm + softmax form of need_weights=True

    def size_nodes(self) -> list[fx.Node]:
        """Symbolic sizes the replaced views and reshapes read (dynamic-shape programs)."""
        out: list[fx.Node] = []
        for node in self.chain:
            for a in node.args[1:]:
                if isinstance(a, (list, tuple)):
                    out += [v for v in a if isinstance(v, fx.Node) and v not in out]
        return out


def _op(node: Any) -> str | None:
    """The op's name whatever level it is written at (``aten.transpose.int``,
    ``torch.transpose`` and ``Tensor.transpose`` are all ``"transpose"``)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", None)
    return str(name) if name else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _sizes(value: Any, n: int) -> list[Any] | None:
    """A shape argument of ``n`` sizes, each an int or a node (a symbolic size of a
    dynamic-shape program), else ``None``."""
    if isinstance(value, (list, tuple)) and len(value) == n:
        if all(type(v) is int or isinstance(v, fx.Node) for v in value):
            return list(value)
    return None


def _is_swap(node: Any, a: int, b: int, rank: int) -> bool:
    """Whether ``node`` is ``transpose(x, a, b)`` (dims up to sign and order)."""
    if _op(node) != "transpose" or len(node.args) != 3:
        return False
    dims = {d % rank if isinstance(d, int) else None for d in node.args[1:]}
    return dims == {a % rank, b % rank}


def _match_exported_attention(gm: fx.GraphModule, linear: fx.Node) -> _ExportedAttention | str:
    """Match the packed self-attention ``nn.MultiheadAttention`` records when exported
    (``F.multi_head_attention_forward`` with ``query is key is value`` and
    ``need_weights=False``), starting at the in-projection ``linear``."""
    weight, bias = _attr(_arg(linear, 1, "weight")), _arg(linear, 2, "bias")
    if weight is None or (bias is not None and _attr(bias) is None):
        return "the in-projection weight or bias is not a parameter"
    owner = str(weight.target).rpartition(".")[0]
    prefix = f"{owner}." if owner else ""
    if bias is not None and bias.target != f"{prefix}in_proj_bias":
        return "the in-projection bias is not the same module's in_proj_bias"
    w = _tensor(gm, weight)
    if w.dim() != 2 or w.shape[0] != 3 * w.shape[1]:
        return "the in-projection weight is not (3E, E)"
    e = w.shape[1]
    for n in (weight, bias):
        if n is not None and set(n.users) != {linear}:
            return f"{n.target!r} is also read by other nodes"
    chain: list[fx.Node] = [weight] + ([bias] if bias is not None else []) + [linear]

    def step(node: fx.Node, name: str, args: tuple[Any, ...]) -> fx.Node | None:
        nxt = _only_user(node)
        if nxt is None or _op(nxt) != name or tuple(nxt.args[1:]) != args or nxt.kwargs:
            return None
        chain.append(nxt)
        return nxt

    node = linear
    for name, args in (("unflatten", (-1, [3, e])), ("unsqueeze", (0,))):
        node = step(node, name, args)  # type: ignore[assignment]
        if node is None:
            return f"the projection is not split by {name}{args} (not packed self-attention)"
    swap = _only_user(node)
    if swap is None or not _is_swap(swap, 0, -2, 5):
        return "the projection is not split into q, k, v the packed way"
    chain.append(swap)
    node = swap
    for name, args in (("squeeze", (-2,)), ("contiguous", ())):
        node = step(node, name, args)  # type: ignore[assignment]
        if node is None:
            return "the projection is not split into q, k, v the packed way"
    selects = sorted(node.users, key=lambda u: u.args[2] if len(u.args) == 3 else -1)
    if len(selects) != 3 or any(
        _op(s) != "select" or tuple(s.args[1:]) != (0, i) for i, s in enumerate(selects)
    ):  # fmt: skip
        return "q, k and v are not the three selects of the packed projection"
    swaps: list[fx.Node] = []
    views: list[tuple[Any, ...]] = []
    for s in selects:
        chain.append(s)
        first = _only_user(s)
        if _op(first) not in ("view", "reshape") or _sizes(first.args[1], 3) is None:
            return "q, k or v is not split into heads with a view"
        swap = _only_user(first)
        if swap is None or not _is_swap(swap, 0, 1, 3):
            return "q, k or v heads are not moved to the batch dimension"
        chain.extend((first, swap))
        swaps.append(swap)
        views.append(tuple(first.args[1]))
    if len(set(views)) != 1:
        return "q, k and v have different head shapes"
    # (L, N*H, hd) on the contiguous (L, N, E) q/k/v: with hd an int dividing E and L the
    # same size everywhere (an int, or the same symbolic-size node), N*H is forced by the
    # element count, so this is the head split
    length, _, hd = views[0]
    if type(hd) is not int or hd <= 0 or e % hd:
        return f"the head view {views[0]} does not split {e} channels into heads"
    h = e // hd
    if _op(_only_user(swaps[0])) in ("view", "reshape"):
        matched = _sdpa_heads(swaps, length, h, hd, chain)
    else:
        matched = _bmm_heads(swaps, hd, chain)
    if isinstance(matched, str):
        return matched
    node, n, dropout, need_weights = matched
    nxt = _only_user(node)
    if _op(nxt) == "contiguous":
        chain.append(nxt)
        node, nxt = nxt, _only_user(nxt)
    merged = _sizes(nxt.args[1], 2) if _op(nxt) in ("view", "reshape") else None
    if merged is None or merged[1] != e:
        return "the merged heads are not reshaped to (L * N, E)"
    chain.append(nxt)
    out_proj = _only_user(nxt)
    if out_proj is None or out_proj.op != "call_module" or out_proj.target != f"{prefix}out_proj":
        return f"the merged heads do not go to the layer {prefix}out_proj"
    if type(gm.get_submodule(str(out_proj.target))) is not nn.Linear:
        return f"{prefix}out_proj is not an nn.Linear"
    back = _only_user(out_proj)
    restored = _sizes(back.args[1], 3) if _op(back) in ("view", "reshape") else None
    if restored is None or restored[0] != length or restored[2] != e:
        return "the output is not viewed back as (L, N, E)"
    if n is not None and restored[1] != n:
        return "the output is not viewed back as (L, N, E)"
    chain.append(back)
    result, source, batch_first = back, linear.args[0], False
    last = _only_user(back)
    if _is_swap(last, 0, 1, 3) and _is_swap(source, 0, 1, 3):
        result, source, batch_first = last, source.args[0], True  # type: ignore[union-attr]
        chain.append(last)
    if not isinstance(source, fx.Node):
        return "the input is not a tensor"
    holder = gm.get_submodule(owner) if owner else gm
    extra = (set(holder._parameters) | set(holder._buffers)) - {"in_proj_weight", "in_proj_bias"}
    if extra or set(holder._modules) != {"out_proj"}:
        return f"{owner or 'the root'} holds other state than in_proj and out_proj"
    if any(hasattr(holder, f"{w}_proj") for w in "qkv") or hasattr(holder, "attention"):
        return f"{owner or 'the root'} already has a q/k/v_proj or attention attribute"
    return _ExportedAttention(
        source, weight, bias, out_proj, result, h, dropout, batch_first, chain,
        linear.args[0] if batch_first else None, need_weights,
    )  # fmt: skip


def _sdpa_heads(
    swaps: list[fx.Node], length: Any, h: int, hd: int, chain: list[fx.Node]
) -> tuple[fx.Node, Any, float, bool] | str:
    """``need_weights=False``: heads viewed as (N, H, L, hd), SDPA, ``permute(2, 0, 1, 3)``.
    Returns the node before the reshape to (L * N, E), N, the dropout probability and
    ``need_weights``."""
    heads = [_only_user(s) for s in swaps]
    shapes = {tuple(x.args[1]) if _sizes(x.args[1], 4) else None for x in heads if x is not None}
    if len(heads) != 3 or None in heads or len(shapes) != 1 or None in shapes:
        return "q, k or v heads are not viewed as (N, H, L, head_dim)"
    if any(_op(x) not in ("view", "reshape") for x in heads):
        return "q, k or v heads are not viewed as (N, H, L, head_dim)"
    n, h2, length2, hd2 = shapes.pop()  # type: ignore[misc]
    if (h2, length2, hd2) != (h, length, hd):
        return f"the head views ({n}, {h2}, {length2}, {hd2}) do not split the channels into heads"
    chain.extend(heads)  # type: ignore[arg-type]
    sdpa = _only_user(heads[0])  # type: ignore[arg-type]
    if _op(sdpa) != "scaled_dot_product_attention" or list(sdpa.args[:3]) != heads:
        return "q, k and v do not meet in one scaled_dot_product_attention"
    if any(_only_user(x) is not sdpa for x in heads[1:]):  # type: ignore[arg-type]
        return "q, k or v heads are also read elsewhere"
    names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, 0.0, False, None, False)
    options = {k: _arg(sdpa, i + 3, k, d) for i, (k, d) in enumerate(zip(names, defaults, strict=True))}
    if options["attn_mask"] is not None or options["is_causal"] or options["enable_gqa"]:
        return "an attention mask, is_causal or grouped query attention"
    if options["scale"] is not None or not isinstance(options["dropout_p"], (int, float)):
        return "a scale or a computed dropout probability"
    chain.append(sdpa)
    merge = _only_user(sdpa)
    if _op(merge) != "permute" or list(merge.args[1]) != [2, 0, 1, 3]:
        return "the heads are not merged by permute(2, 0, 1, 3)"
    chain.append(merge)
    return merge, n, float(options["dropout_p"]), False


_WEIGHT_READS = frozenset({"view", "reshape", "mean", "squeeze"})


def _unused_weights(node: fx.Node) -> list[fx.Node] | None:
    """``node`` and what reads it, when all of it only reshapes or averages the attention
    weights and nothing uses the result (what export leaves of ``need_weights=True``)."""
    if _op(node) not in _WEIGHT_READS:
        return None
    out = [node]
    for user in node.users:
        more = _unused_weights(user)
        if more is None:
            return None
        out += more
    return out


def _bmm_heads(
    swaps: list[fx.Node], hd: int, chain: list[fx.Node]
) -> tuple[fx.Node, Any, float, bool] | str:
    """``need_weights=True``: ``bmm(q * sqrt(1/hd), k^T)``, softmax, dropout, ``bmm`` with v,
    ``transpose(0, 1)``; the weights' view/mean, when unused, go too."""
    q, k, v = swaps
    scaled, keys = _only_user(q), _only_user(k)
    if _op(scaled) != "mul" or scaled.args[0] is not q or scaled.args[1] != math.sqrt(1.0 / hd):
        return "the queries are not scaled by sqrt(1/head_dim) (not an nn.MultiheadAttention)"
    if keys is None or not _is_swap(keys, -2, -1, 3):
        return "the keys are not transposed for q @ k^T"
    scores = _only_user(scaled)
    if _op(scores) != "bmm" or list(scores.args) != [scaled, keys] or _only_user(keys) is not scores:
        return "the scores are not bmm(q, k^T)"
    weights = _only_user(scores)
    if _op(weights) != "softmax" or tuple(weights.args[1:2]) not in ((-1,), (2,)):
        return "the scores do not go through softmax over the keys"
    if any(a is not None for a in weights.args[2:]) or any(weights.kwargs.values()):
        return "the softmax casts its result"
    chain.extend((scaled, keys, scores, weights))
    attn, dropout = weights, 0.0
    drops = [u for u in weights.users if _op(u) == "dropout"]
    if len(drops) > 1:
        return "the attention weights go through more than one dropout"
    if drops:
        p, train = _arg(drops[0], 1, "p"), _arg(drops[0], 2, "train")
        if not isinstance(p, float) or train is not True:
            return "the attention dropout is not a plain training-mode dropout"
        attn, dropout = drops[0], p
        chain.append(attn)
    outs = [u for u in attn.users if _op(u) == "bmm"]
    out = outs[0] if len(outs) == 1 else None
    if out is None or list(out.args) != [attn, v] or _only_user(v) is not out:
        return "the weights do not multiply the values with bmm"
    for node in dict.fromkeys((weights, attn)):
        for user in node.users:
            if user is not attn and user is not out:
                more = _unused_weights(user)
                if more is None:
                    return "the attention weights are used"
                chain.extend(more)
    merge = _only_user(out)
    if merge is None or not _is_swap(merge, 0, 1, 3):
        return "the heads are not merged by transpose(0, 1)"
    chain.extend((out, merge))
    return merge, None, dropout, True


_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
    nn.GroupNorm, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Embedding, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softmax, HeadAttention,
)  # fmt: skip
_FRESH_FUNCTIONS: frozenset[Any] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add,
    torch.sub, torch.mul, torch.div, torch.cat, torch.relu, torch.sigmoid, torch.tanh,
    torch.matmul, torch.softmax, torch.mean, torch.sum, torch.exp, F.gelu, F.softmax,
    F.scaled_dot_product_attention, F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm,
    F.layer_norm, F.group_norm, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.rand_like, torch.randn_like, torch.zeros, torch.ones, torch.empty,
    torch.rand, torch.randn, torch.full,
})  # fmt: skip
_FRESH_METHODS = frozenset({
    "add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "softmax", "mean", "sum",
    "matmul", "exp", "clone", "__add__", "__mul__", "__sub__", "__truediv__", "__radd__",
    "__rmul__", "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor",
})  # fmt: skip

# function -> position of its ``inplace`` argument
_INPLACE_KWARG: dict[Any, int] = {
    F.relu: 1, F.relu6: 1, F.hardswish: 1, F.silu: 1, F.mish: 1, F.hardsigmoid: 1, F.selu: 1,
    F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.dropout: 3,
    F.dropout1d: 3, F.dropout2d: 3, F.dropout3d: 3, F.alpha_dropout: 3,
}  # fmt: skip
_INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
    torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh, F.elu_: F.elu,
    F.leaky_relu_: F.leaky_relu, F.hardtanh_: F.hardtanh, torch._C._nn.hardswish_: F.hardswish,
    torch._C._nn.silu_: F.silu, torch.dropout_: torch.dropout,
}  # fmt: skip
_INPLACE_METHODS = frozenset({
    "add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "tanh_", "clamp_", "clamp_min_",
    "clamp_max_", "neg_", "abs_", "exp_", "sqrt_", "pow_",
})  # fmt: skip


def _label(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    if module == "_operator":
        return f"operator.{name}"
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


def _inplace_change(node: fx.Node) -> tuple[str, Callable[[fx.Node], None]] | None:
    """(label, how to make ``node`` out-of-place) when ``node`` is an in-place op."""
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        new = _INPLACE_FUNCTIONS[node.target]

        def swap(n: fx.Node) -> None:
            n.target = new

        return _label(node.target), swap
    if node.op == "call_function" and node.target in _INPLACE_KWARG:
        pos = _INPLACE_KWARG[node.target]
        if not _arg(node, pos, "inplace", False):
            return None

        def clear(n: fx.Node) -> None:
            if len(n.args) > pos:
                n.args = (*n.args[:pos], False, *n.args[pos + 1 :])
            else:
                n.kwargs = {**n.kwargs, "inplace": False}

        return f"{_label(node.target)}(inplace=True)", clear
    if node.op == "call_method" and node.target in _INPLACE_METHODS:

        def method(n: fx.Node) -> None:
            n.target = str(n.target)[:-1]

        return _label(node.target), method
    return None


def canonicalize(gm: fx.GraphModule, source: nn.Module | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place into the canonical form (see the module docs); return it.

    Running it again (for instance once shapes are recorded, which lifts an
    ``F.batch_norm`` whose input rank was unknown) changes only what is left and adds to
    the report. ``source`` is the module ``gm`` was traced from (when known): it tells the class of a
    BatchNorm subclass traced through, and holds the ``num_batches_tracked`` counters a
    trace in eval mode does not read. Records a :class:`CanonicalReport`
    (:func:`canonical_report`); outputs are unchanged.
    """
    previous = canonical_report(gm)
    report = CanonicalReport(renamed=dict(previous.renamed) if previous else {})
    work = _Canonicalizer(gm, source, report)
    work.explicit_attention()
    split_packed_qkv(gm, report)  # packed q/k/v (timm's ViT): rewriter/packed_attention.py
    work.exported_attention()
    work.lift_layers()
    work.out_of_place()
    if report.lifted or report.inplace:
        gm.graph.lint()
        gm.recompile()
    if previous is not None:  # a second run (with shapes) adds to what the first one did
        for table, old in ((report.lifted, previous.lifted), (report.inplace, previous.inplace)):
            for key, n in old.items():
                table[key] = table.get(key, 0) + n
    gm.meta[CANONICAL_KEY] = report
    return gm


def canonicalize_with_shapes(
    gm: fx.GraphModule, inputs: Sequence[Any] | None, source: nn.Module | None = None
) -> fx.GraphModule:
    """Canonicalise ``gm`` again once shapes are known, when a call waits for them.

    An ``F.batch_norm`` on a module's own parameters whose input rank the graph does not
    tell (after a residual add, a pooling, a reshape; not right after a conv or inside a
    BatchNorm subclass) is kept by the first run; this records shapes on ``inputs`` (an
    eval-mode, no-grad forward, modes restored) and runs :func:`canonicalize` again, which
    lifts it and adds to the report (buffers are restored after the recording: a kept
    call traced in training mode updates running statistics). Does nothing when no call waits, when ``inputs`` is
    ``None``, or when the model fails on them (the pass manager reports that). Used by
    :func:`rewriter.rewrite` and by :func:`rewriter.trace` given ``example_inputs``.
    """
    report = canonical_report(gm)
    if inputs is None or report is None or not any(w == _RANK_UNKNOWN for _, _, w in report.kept):
        return gm
    from .analysis.channels import record_shapes

    # a kept call traced in training mode has ``training=True`` written into the graph and
    # would update its running statistics during the (eval-mode) shape recording
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        record_shapes(gm, tuple(inputs))
    except Exception:
        return gm
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    return canonicalize(gm, source)
