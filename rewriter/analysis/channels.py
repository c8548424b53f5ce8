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

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from ..errors import RewriterError
from ..manager import _propagate_shapes
from ..tracing import opaque_modules
from .coupling import Coupler, LayerRecord, Role
from .rules_channels import lookup

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelSlice",
    "LayerInfo",
    "Member",
    "channel_groups",
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
    """A node whose arguments count channels: ``split``/``chunk`` sizes or slice bounds.

    ``positions[p]`` is the ``(group id, group channel)`` at position ``p`` of the input's
    channel dim (``None`` where no layer owns the channel); ``bounds`` are the
    ``(start, stop)`` ranges of the pieces (one range for a slice); ``item`` is the
    position of the slice in a tuple index (``None`` for a bare slice).
    """

    node: str
    kind: Literal["split", "slice"]
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
        _propagate_shapes(gm, tuple(inputs))
    elif any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        raise RewriterError(
            "channel_groups() needs example inputs: the graph has no recorded shapes"
        )
    coupler = Coupler(gm, lookup, opaque_modules(gm))
    coupler.run()
    return _build(coupler)


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
    find = c.uf
    order = {name: rec.order for name, rec in c.layers.items()}

    # class root -> {(layer, role): [indices]}
    classes: dict[int, dict[tuple[str, str], list[int]]] = defaultdict(dict)
    for (layer, role), atoms in c.members.items():
        for index, atom in enumerate(atoms):
            classes[find[atom]].setdefault((layer, role), []).append(index)
    reasons: dict[int, set[str]] = defaultdict(set)
    for atom, why in c.blocks:
        reasons[find[atom]].add(why)
    nonzero: dict[int, set[str]] = defaultdict(set)
    for atom, what in c.nonzero:
        nonzero[find[atom]].add(what)

    # class -> key: its member runs (layer, role, span) as a multiset, and its reasons
    bucket: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
    for root, roles in classes.items():
        entries: list[tuple[tuple, int]] = []
        for (layer, role), indices in roles.items():
            for start, length in _runs(indices):
                entries.append(((order[layer], _ROLE_RANK[role], layer, role, length), start))
        entries.sort()
        key = (tuple(e[0] for e in entries), frozenset(reasons.get(root, ())))
        bucket[key].append((root, [e[1] for e in entries]))

    drafts = []
    for (entry_keys, why), members in bucket.items():
        members.sort(key=lambda item: item[1])
        drafts.append((entry_keys, why, members))
    drafts.sort(key=lambda d: (d[0][0][:4] if d[0] else (), d[2][0][1]))

    groups: list[ChannelGroup] = []
    where: dict[int, tuple[int, int]] = {}
    for gid, (entry_keys, why, members) in enumerate(drafts):
        cols = list(zip(*(starts for _, starts in members), strict=True))
        group_members = tuple(
            Member(layer, role, tuple(col), span)
            for (_, _, layer, role, span), col in zip(entry_keys, cols, strict=True)
        )
        ops: set[str] = set()
        for ch, (root, _) in enumerate(members):
            where[root] = (gid, ch)
            ops |= nonzero.get(root, set())
        groups.append(
            ChannelGroup(
                id=gid,
                size=len(members),
                members=group_members,
                prunable=not why,
                reason=_reason(why),
                nonzero_ops=tuple(sorted(ops)),
            )
        )

    slices = [
        ChannelSlice(
            s.node, s.kind, s.dim, s.bounds, s.item, tuple(where.get(find[a]) for a in s.atoms)
        )
        for s in c.slices
    ]
    return ChannelAnalysis(groups, {n: _info(r) for n, r in c.layers.items()}, slices)


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
