"""Channel coupling: which channels of which layers must be kept or removed together.

``channel_groups(gm, example_inputs)`` => :class:`ChannelAnalysis` with one
:class:`ChannelGroup` per set of coupled channel dimensions, each listing its
:class:`Member` layers with the exact index mapping. :func:`rewriter.slim` cuts
along these groups; KE, Early-Bird and TAS choose channels per group.

What couples channels (each group channel ``i`` is one removable unit):

* a layer's own channel roles: ``out`` (conv filters / linear rows, with their bias),
  ``in`` (conv / linear input columns), ``param`` (per-channel tensors: BN / InstanceNorm /
  RBN affine, statistics and RBN's ``center_weight``, ``scale_weight``, ``scale_bias``;
  GroupNorm affine; PReLU slopes; a parameter read with ``get_attr`` and added or
  multiplied along the channels, such as a positional embedding);
* pass-through ops (activations, dropout, pooling, resizing, padding, reductions over
  other dims, permutes) keep channels where they are;
* residual ``add`` / ``sub`` / ``mul`` (any broadcasting, e.g. a ``(N, C, 1, 1)`` gate)
  join the channels of their operands;
* ``torch.cat`` along the channels places each input's channels at its offset, so each
  concatenated chunk stays in the group of its producer; ``split`` / ``chunk`` /
  slicing ``x[:, a:b]`` take the matching sub-range (:func:`rewriter.slim` rewrites their
  sizes and bounds);
* ``flatten`` / ``view(N, -1)`` into a linear: channel ``c`` of a ``C x H x W`` map is
  the ``H*W`` consecutive input features ``c*H*W ...`` of the linear (``Member.span``);
* depthwise convs (``groups == in_channels``) join input channel ``j`` with output channels
  ``j*m .. j*m+m-1``: removing it removes the whole conv group (``groups`` shrinks);
* other grouped convs (``1 < groups < in_channels``) keep their groups balanced: the
  ``i``-th input channel of every conv group is one channel of the group (likewise the
  outputs), so removing it shrinks every conv group alike and ``groups`` stays;
* GroupNorm joins the channels of each norm group (a group channel is then a whole norm
  group, ``span`` channels wide) and removes whole norm groups.

Never prunable (the group's ``reason`` says why): model input channels, network outputs,
LayerNorm over the channel dim, softmax or reductions over channels, reshapes that split
the channel dim (attention heads) or give it a fixed size, opaque modules, and any op
these rules do not know. The analysis never guesses: when unsure it blocks.

A group channel is also a *class* of the underlying union-find; groups collect the
classes that touch the same layers (and share the same reasons), so a residual stage is
one group and a DenseNet concat is one group per chunk.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import fx

from ..errors import RewriterError
from ..manager import _propagate_shapes
from ..tracing import opaque_modules
from .coupling import Atoms, Coupler, LayerRecord, Partition, Role, as_atoms, fetch_attr
from .rules_channels import lookup

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelSlice",
    "LayerInfo",
    "Member",
    "channel_groups",
    "graph_fingerprint",
]

_ROLE_RANK = {"out": 0, "param": 1, "in": 2}
_MAX_REASONS = 4


@dataclass(frozen=True)
class Member:
    """One channel-indexed role of a layer within a group.

    Group channel ``i`` is the layer's indices ``indices[i] .. indices[i] + span - 1``
    along ``role``: ``out`` (output channels / rows, bias included), ``in`` (input
    channels / columns; for a grouped conv, the indices of its input tensor) or
    ``param`` (per-channel parameters and statistics). ``span`` is 1 except for a linear
    fed by a flattened ``C x H x W`` map (``span = H*W``) and GroupNorm groups. A layer
    may appear more than once in a group when one group channel maps to several
    separate indices (a grouped conv's balanced channels, a tensor concatenated twice).
    """

    layer: str
    role: Role
    indices: tuple[int, ...]
    span: int = 1

    def layer_indices(self, channel: int) -> range:
        """The layer indices of group channel ``channel``."""
        start = self.indices[channel]
        return range(start, start + self.span)

    def select(self, channels: Iterable[int]) -> list[int]:
        """The sorted layer indices of the given group channels."""
        return sorted(i for ch in channels for i in self.layer_indices(ch))


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together, with every layer they touch.

    Attributes:
        id: position in :attr:`ChannelAnalysis.groups`.
        size: number of group channels (removable units).
        members: the layer roles, ordered by first appearance in the graph, ``out`` first.
        prunable: whether channels of this group may be removed at all.
        reason: why not, when not prunable.
        nonzero_ops: ops on these channels that turn an all-zero channel into a nonzero
            one (sigmoid, adding a constant...); see :func:`rewriter.slim`.
    """

    id: int
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str | None = None
    nonzero_ops: tuple[str, ...] = ()

    def _layers(self, role: Role) -> list[str]:
        return list(dict.fromkeys(m.layer for m in self.members if m.role == role))

    def layers_out(self) -> list[str]:
        """Layers whose output channels (filters / rows) are in this group."""
        return self._layers("out")

    def layers_in(self) -> list[str]:
        """Layers whose input channels (columns) are in this group."""
        return self._layers("in")

    def layers_param(self) -> list[str]:
        """Layers whose per-channel parameters are in this group (norms, gates, embeddings)."""
        return self._layers("param")

    def members_of(self, layer: str, role: Role | None = None) -> list[Member]:
        """The members of ``layer`` (in ``role`` when given)."""
        return [m for m in self.members if m.layer == layer and role in (None, m.role)]

    def describe(self) -> str:
        """One line per member, after a header line."""
        state = "prunable" if self.prunable else f"not prunable: {self.reason}"
        lines = [f"group {self.id}: {self.size} channel(s), {state}"]
        for m in self.members:
            idx = _brief(m.indices)
            span = f" x{m.span}" if m.span != 1 else ""
            lines.append(f"  {m.role:<5} {m.layer} [{idx}]{span}")
        return "\n".join(lines)


@dataclass(frozen=True)
class LayerInfo:
    """A layer the analysis can slice.

    ``kind`` is ``conv``, ``linear``, ``norm`` (BatchNorm, InstanceNorm, RBN), ``groupnorm``,
    ``layernorm``, ``prelu`` or ``param`` (a tensor attribute read with ``get_attr``).
    ``sizes`` maps each channel role to its length. ``conv_mode`` is ``dense``,
    ``depthwise`` (input channel ``j`` is conv group ``j``) or ``balanced`` (other grouped
    convs). ``param_dim`` is the dimension of a ``param`` attribute that holds channels.
    """

    name: str
    kind: str
    sizes: dict[str, int] = field(default_factory=dict)
    conv_mode: str | None = None
    param_dim: int | None = None


@dataclass(frozen=True)
class ChannelSlice:
    """A node whose arguments count channels: ``split``/``chunk`` sizes, slice bounds, or
    (kind ``"size"``) a size argument of a ``view``/``reshape`` at position ``dim`` (a head
    count or merged head width written as a number; ``slim`` writes the kept count there).

    ``positions[p]`` is the ``(group id, group channel)`` at position ``p`` of the input's
    channel dim (``None`` where no layer owns the channel); ``bounds`` are the
    ``(start, stop)`` ranges of the pieces (one range for a slice); ``item`` is the
    position of the slice in a tuple index (``None`` for a bare slice).
    """

    node: str
    kind: Literal["split", "slice", "size"]
    dim: int
    bounds: tuple[tuple[int, int], ...]
    item: int | None
    positions: tuple[tuple[int, int] | None, ...]


@dataclass
class ChannelAnalysis:
    """Result of :func:`channel_groups`: the groups, the sliceable layers, channel-counting nodes."""

    groups: list[ChannelGroup]
    layers: dict[str, LayerInfo]
    slices: list[ChannelSlice]
    fingerprint: str = field(default="", compare=False)
    _index: dict[tuple[str, str], list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for g in self.groups:
            for m in g.members:
                ids = self._index.setdefault((m.layer, m.role), [])
                if g.id not in ids:
                    ids.append(g.id)

    def groups_of(self, layer: str, role: Role = "out") -> list[ChannelGroup]:
        """Every group holding channels of ``layer``'s ``role`` (several after a split/cat)."""
        return [self.groups[i] for i in self._index.get((layer, role), [])]

    def group_of(self, layer: str, role: Role = "out") -> ChannelGroup:
        """The one group holding ``layer``'s ``role`` channels.

        Raises ``KeyError`` when the layer has no such channels and ``ValueError`` when
        they span several groups (use :meth:`groups_of` or :meth:`channel_map`).
        """
        found = self.groups_of(layer, role)
        if not found:
            known = sorted({k[0] for k in self._index if k[1] == role})
            raise KeyError(
                f"no {role!r} channels of layer {layer!r} in any group; layers with {role!r} "
                f"channels: {', '.join(known) or 'none'}"
            )
        if len(found) > 1:
            raise ValueError(
                f"the {role!r} channels of {layer!r} span groups {[g.id for g in found]}; "
                "use groups_of() or channel_map()"
            )
        return found[0]

    def channel_map(self, layer: str, role: Role = "out") -> list[tuple[int, int]]:
        """For each index of ``layer``'s ``role``: the ``(group id, group channel)`` owning it."""
        size = self.layers[layer].sizes[role]
        out: list[tuple[int, int] | None] = [None] * size
        for g in self.groups_of(layer, role):
            for m in g.members_of(layer, role):
                for ch in range(g.size):
                    for i in m.layer_indices(ch):
                        out[i] = (g.id, ch)
        if any(x is None for x in out):
            raise RewriterError(f"internal error: {layer!r} {role} has unmapped channels")
        return out  # type: ignore[return-value]

    def check_graph(self, gm: fx.GraphModule, what: str = "this analysis") -> None:
        """Raise :class:`RewriterError` unless the analysis was computed on ``gm``'s graph.

        Compares :func:`graph_fingerprint` (the graph's nodes and the parameter shapes of
        the modules and attributes it uses) with the one recorded by :func:`channel_groups`.
        """
        if not self.fingerprint:
            raise RewriterError(
                f"{what} carries no graph fingerprint (it was not made by channel_groups()); "
                "compute it with channel_groups(gm, example_inputs)"
            )
        if graph_fingerprint(gm) != self.fingerprint:
            raise RewriterError(
                f"{what} does not belong to this graph: the graph or its layer shapes changed "
                "since it was computed (or it is another model's); recompute it with "
                "channel_groups(gm, example_inputs)"
            )

    def prunable(self) -> list[ChannelGroup]:
        """The groups whose channels may be removed."""
        return [g for g in self.groups if g.prunable]

    def table(self) -> str:
        """A readable listing of every group and its members."""
        return "\n".join(g.describe() for g in self.groups)

    def __str__(self) -> str:
        return self.table()


def channel_groups(
    gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | torch.Tensor | None
) -> ChannelAnalysis:
    """Groups of coupled channels of ``gm`` (see the module docs).

    Runs shape propagation with ``example_inputs`` in eval mode (training flags are
    restored, parameters and buffers are untouched; ``node.meta["tensor_meta"]`` is
    refreshed). With ``example_inputs=None`` the shapes already recorded on the graph
    (by :func:`rewriter.rewrite`) are used.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"channel_groups() expects a torch.fx.GraphModule, got {type(gm).__name__}; "
            "trace the model first with rewriter.trace(model)"
        )
    if example_inputs is not None:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        record_shapes(gm, tuple(inputs))
    elif any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        raise RewriterError(
            "channel_groups() needs example inputs: the graph has no recorded shapes"
        )
    coupler = Coupler(gm, lookup, opaque_modules(gm))
    coupler.run()
    analysis = _build(coupler)
    analysis.fingerprint = graph_fingerprint(gm)
    return analysis


def record_shapes(gm: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> None:
    """``node.meta["tensor_meta"]`` of every node: :func:`rewriter.manager._propagate_shapes`.

    One eval-mode, no-grad forward through ``torch.fx``'s shape propagation, with
    :class:`TensorMetadata` whose memory format is read in C++ (``None`` on nodes whose
    value is not a tensor). Training flags are restored.
    """
    _propagate_shapes(gm, inputs)


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A digest of what the channel analysis of ``gm`` depends on besides the input shapes.

    Every node (name, op, target, arguments) and the shapes of the parameters of every
    module and attribute the graph uses. Parameter values, buffers and module classes that
    keep a layer's channel structure (a split or masked twin of a layer) do not count.
    """
    lines: list[str] = []
    used: set[str] = set()
    for node in gm.graph.nodes:  # a Node's repr is its name
        lines.append(
            f"{node.name}|{node.op}|{_target_name(node.target)}|{node.args!r}|{node.kwargs!r}"
        )
        if node.op in ("call_module", "get_attr"):
            used.add(str(node.target))
    modules = dict(gm.named_modules())
    for target in sorted(used):
        module = modules.get(target)
        if module is not None:
            if next(module.children(), None) is None:  # a leaf layer: its own parameters
                params = module._parameters.items()
            else:
                params = module.named_parameters()
            shapes = [(n, tuple(p.shape)) for n, p in params if p is not None]
        else:
            try:
                value = fetch_attr(gm, target)
            except AttributeError:
                value = None
            shapes = [("", tuple(value.shape))] if isinstance(value, torch.Tensor) else []
        lines.append(f"{target}:{shapes!r}")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def _target_name(target: object) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


# --------------------------------------------------------------------------------------------
# From atoms to groups
# --------------------------------------------------------------------------------------------


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as (start, length) runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _build(c: Coupler) -> ChannelAnalysis:
    """Groups from the coupler's classes.

    Works class by class of the partition (pieces joined position by position), not atom
    by atom: every run of a member, block or mark is first cut to whole pieces, so all
    positions of a class share the same members (at indices ``start + i * span``), reasons
    and marks. The result is the same as building it channel by channel.
    """
    part = c.part
    order = {name: rec.order for name, rec in c.layers.items()}
    for atoms in c.members.values():
        part.cut_runs(atoms)
    for atoms, _ in (*c.blocks, *c.nonzero):
        part.cut_runs(atoms)
    for s in c.slices:
        part.cut_runs(as_atoms(s.atoms))

    # class root -> {(layer, role): [(index of position 0, span)]}
    classes: dict[int, dict[tuple[str, str], list[tuple[int, int]]]] = defaultdict(dict)
    for (layer, role), atoms in c.members.items():
        pos = 0
        for s, n, r in atoms.runs:
            for p in part.pieces(s, s + n):
                classes[part.find(p)].setdefault((layer, role), []).append((pos + (p - s) * r, r))
            pos += n * r
    reasons = _marks(part, c.blocks)
    nonzero = _marks(part, c.nonzero)

    # class -> key: its member runs (layer, role, span) as a multiset, and its reasons;
    # every position of a class has the same key
    bucket: dict[tuple, list[tuple[int, int, list[int], list[int]]]] = defaultdict(list)
    for root, roles in classes.items():
        length = part.length[root]
        entries: list[tuple[tuple, int, int]] = []
        for (layer, role), found in roles.items():
            rank = _ROLE_RANK[role]
            if length == 1:  # one channel: adjacent indices of a layer merge into one span
                indices = sorted(i for start, span in found for i in range(start, start + span))
                for start, span in _runs(indices):
                    entries.append(((order[layer], rank, layer, role, span), start, 0))
            else:  # position i is at start + i * span (never adjacent to another entry)
                for start, span in found:
                    entries.append(((order[layer], rank, layer, role, span), start, span))
        entries.sort()
        key = (tuple(e[0] for e in entries), frozenset(reasons.get(root, ())))
        bucket[key].append((root, length, [e[1] for e in entries], [e[2] for e in entries]))

    drafts = []
    for (entry_keys, why), items in bucket.items():
        drafts.append((entry_keys, why, _channel_order(items)))
    drafts.sort(key=lambda d: (d[0][0][:4] if d[0] else (), d[2][0][0]))

    groups: list[ChannelGroup] = []
    where: dict[int, tuple[int, Sequence[int]]] = {}  # root -> (group id, channel of each offset)
    for gid, (entry_keys, why, (cols, chans)) in enumerate(drafts):
        group_members = tuple(
            Member(layer, role, tuple(col), span)
            for (_, _, layer, role, span), col in zip(entry_keys, cols, strict=True)
        )
        ops: set[str] = set()
        size = 0
        for root, ch in chans.items():
            where[root] = (gid, ch)
            ops |= nonzero.get(root, set())
            size += len(ch)
        groups.append(
            ChannelGroup(
                id=gid,
                size=size,
                members=group_members,
                prunable=not why,
                reason=_reason(why),
                nonzero_ops=tuple(sorted(ops)),
            )
        )

    slices = []
    for s in c.slices:
        positions: list[tuple[int, int] | None] = []
        for a in s.atoms:
            root, offset = part.locate(a)
            found = where.get(root)
            positions.append((found[0], found[1][offset]) if found else None)
        slices.append(ChannelSlice(s.node, s.kind, s.dim, s.bounds, s.item, tuple(positions)))
    return ChannelAnalysis(groups, {n: _info(r) for n, r in c.layers.items()}, slices)


def _marks(part: Partition, marks: Iterable[tuple[Atoms, str]]) -> dict[int, set[str]]:
    """Class root -> the texts attached to its atoms (runs already cut to whole pieces)."""
    out: dict[int, set[str]] = defaultdict(set)
    for atoms, text in marks:
        for s, n, _ in atoms.runs:
            for p in part.pieces(s, s + n):
                out[part.find(p)].add(text)
    return out


def _channel_order(
    items: list[tuple[int, int, list[int], list[int]]],
) -> tuple[list[list[int]], dict[int, Sequence[int]]]:
    """Group channels of classes with one key, ordered by their index in the first member.

    ``items`` are ``(root, length, starts, spans)``: offset ``i`` of class ``root`` has index
    ``starts[e] + i * spans[e]`` in entry ``e``. Returns the index columns of the entries
    and, per root, the group channel of each of its offsets.
    """
    items = sorted(items, key=lambda item: item[2][0])
    ordered = all(  # classes follow each other in the first member (no interleaving)
        a[2][0] + (a[1] - 1) * a[3][0] < b[2][0] for a, b in zip(items, items[1:], strict=False)
    )
    entries = len(items[0][2])
    if ordered:
        cols: list[list[int]] = []
        for e in range(entries):
            col: list[int] = []
            for _, length, starts, spans in items:
                if length == 1:
                    col.append(starts[e])
                else:
                    col.extend(range(starts[e], starts[e] + length * spans[e], spans[e]))
            cols.append(col)
        chans: dict[int, Sequence[int]] = {}
        base = 0
        for root, length, _, _ in items:
            chans[root] = range(base, base + length)
            base += length
        return cols, chans
    lengths = [length for _, length, _, _ in items]
    offsets = np.concatenate([np.arange(n) for n in lengths])
    which = np.repeat(np.arange(len(items)), lengths)
    columns = [
        np.concatenate(
            [starts[e] + np.arange(length) * spans[e] for _, length, starts, spans in items]
        )
        for e in range(entries)
    ]
    perm = np.argsort(columns[0], kind="stable")
    cols = [col[perm].tolist() for col in columns]
    channel = np.empty(len(perm), dtype=np.int64)
    channel[perm] = np.arange(len(perm))
    chans = {}
    for k, (root, _, _, _) in enumerate(items):
        chans[root] = channel[which == k].tolist()
    del offsets
    return cols, chans


def _info(record: LayerRecord) -> LayerInfo:
    return LayerInfo(
        record.name, record.kind, dict(record.sizes), record.conv_mode, record.param_dim
    )


def _reason(why: frozenset[str]) -> str | None:
    if not why:
        return None
    ordered = sorted(why)
    shown = "; ".join(ordered[:_MAX_REASONS])
    more = len(ordered) - _MAX_REASONS
    return shown + (f"; and {more} more" if more > 0 else "")


def _brief(indices: Sequence[int]) -> str:
    """``0..15`` for consecutive indices, else the first few."""
    if not indices:
        return ""
    if list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}..{indices[-1]}" if len(indices) > 1 else str(indices[0])
    head = ", ".join(str(i) for i in indices[:6])
    return head + (f", ... ({len(indices)})" if len(indices) > 6 else "")
