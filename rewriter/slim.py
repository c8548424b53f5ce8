"""Physical slimming: remove channels for real, building smaller layers.

``slim(gm, example_inputs, channel_masks)`` => a deep copy of ``gm`` in which every
removed channel is gone from every layer of its group (conv filters, input columns and
``groups``, linear rows and columns, biases, ``weight_mask`` of masked layers,
BatchNorm / InstanceNorm / RBN / GroupNorm parameters and running statistics, PReLU
slopes, per-channel attributes such as positional embeddings), with ``split`` /
``chunk`` sizes, channel slices and the fixed head counts and merged widths of attention
reshapes (``view(B, N, 4, 8)`` -> ``view(B, N, 2, 8)``, ``reshape(B, N, 32)`` ->
``reshape(B, N, 16)``) rewritten, and the ``num_heads`` of
:class:`~rewriter.canonical.HeadAttention` (what ``nn.MultiheadAttention`` becomes) set to
the number of kept heads. The groups come from
:func:`rewriter.analysis.channels.channel_groups`.

Semantics: removing a channel removes it from its *whole group*. The slim model computes
exactly what the dense model computes when that channel contributes nothing to the
layers that read it, i.e. what :func:`mask_channels` produces by zeroing the group
channel everywhere (the filters and biases that produce it, its norm parameters, and the
input columns of its consumers). Channels that other channels' values depend on
(LayerNorm statistics, attention heads, network outputs...) are in groups marked not
prunable and are never removed.

Which channels go:

* ``channel_masks`` (``{layer: bool tensor over that layer's output channels}``, True =
  keep; for a norm layer or a parameter attribute, over its channels): a group channel
  is removed when at least one named layer asks to drop it and none asks to keep it.
* otherwise, *zeroed filters*: a group channel is removed when every layer producing it
  has an all-zero filter (``weight * weight_mask``) and a zero (or no) bias, every
  per-channel parameter of it is zero (a BatchNorm / RBN / GroupNorm needs ``weight``
  and ``bias`` both zero, since a BN maps an all-zero input to ``beta - gamma * mean /
  sqrt(var + eps)``, not to zero; a BN without affine parameters but with running
  statistics never agrees), and, when an op on the channel turns zeros into nonzeros
  (sigmoid, adding a constant; :attr:`ChannelGroup.nonzero_ops`), every input column
  reading it is zero too. Under these conditions the channel provably contributes
  nothing, so outputs are preserved exactly.

Group-level choices (Early-Bird, TAS) become ``channel_masks`` with :func:`group_masks`.
Knowledge Evolution's slim network is :func:`rewriter.passes.split.extract_fit`, which
chooses the fit channels per channel group (the first ``ceil(s*C)`` of each group, per
concatenated chunk and split piece, balanced across conv groups) and calls :func:`slim`.

When the members of a group channel disagree (one layer says drop, another keep, or a
zero filter whose BN still has a bias), the channel is kept and the disagreement is
counted in the report. A group never loses all its channels: its first channel is
kept, with a note (likewise a ``split`` piece or a slice never becomes empty). The report is ``result.meta["rewriter_slim"]`` (a
:class:`SlimReport`); the rewrite history (``rewriter.report``) is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from .analysis.channels import ChannelAnalysis, ChannelGroup, LayerInfo, Member, channel_groups
from .errors import RewriterError
from .manager import _propagate_shapes
from .tracing import trace

__all__ = ["GroupSlim", "SLIM_KEY", "SlimReport", "group_masks", "mask_channels", "slim"]

SLIM_KEY = "rewriter_slim"


@dataclass
class GroupSlim:
    """What slimming did to one channel group."""

    group: int
    size: int
    removed: int = 0
    disagreements: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.size - self.removed


@dataclass
class SlimReport:
    """The result of :func:`slim`: per-group counts, notes, parameters before and after."""

    source: str
    groups: list[GroupSlim]
    params_before: int
    params_after: int

    @property
    def removed(self) -> int:
        """Group channels removed in total."""
        return sum(g.removed for g in self.groups)

    @property
    def disagreements(self) -> int:
        """Group channels kept because their members disagreed."""
        return sum(g.disagreements for g in self.groups)

    def table(self) -> str:
        rows = [("group", "channels", "kept", "removed", "disagreements")]
        rows += [
            (str(g.group), str(g.size), str(g.kept), str(g.removed), str(g.disagreements))
            for g in self.groups
            if g.removed or g.disagreements or g.notes
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"source: {self.source}; parameters {self.params_before:,} -> {self.params_after:,}"
        )
        lines += [f"note (group {g.group}): {n}" for g in self.groups for n in g.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def slim(
    gm: nn.Module,
    example_inputs: Sequence[Tensor] | Tensor,
    channel_masks: Mapping[str, Tensor] | None = None,
    *,
    analysis: ChannelAnalysis | None = None,
    round_to: int | None = None,
) -> fx.GraphModule:
    """A physically smaller copy of ``gm`` without its removed channels (see module docs).

    ``gm`` is a GraphModule (a plain module is traced first) and is not modified.
    ``example_inputs`` drive the channel analysis and a final check that the slim model
    runs. Returns an ordinary ``fx.GraphModule`` that trains and compiles; its report is
    ``result.meta["rewriter_slim"]``.

    ``analysis``: the result of ``channel_groups(gm, ...)`` when the caller has it, so that
    it is not computed again. It must belong to ``gm``'s graph (same nodes, same layer
    shapes; weights may have changed, e.g. zeroed by :func:`mask_channels`): a stale or
    foreign analysis raises :class:`~rewriter.errors.RewriterError`.

    ``round_to``: keep the number of channels of every group a multiple of ``round_to``
    (rounded up, never above the group's size) by keeping back removed channels, the
    lowest group channel indices first (deterministic). Kernels often run faster on widths
    that are multiples of 8; see ``bench/RESULTS.md`` for what it measured here. Channels
    kept back this way are not zero in general: the result then keeps more than the
    masks asked for (counted in the report's notes), and no longer equals the masked model.
    """
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise ValueError(f"round_to must be a positive integer or None, got {round_to!r}")
    if not isinstance(gm, fx.GraphModule):
        gm = trace(gm)
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    if analysis is None:
        analysis = channel_groups(gm, inputs)
    elif not isinstance(analysis, ChannelAnalysis):
        raise TypeError(
            f"slim(analysis=...) expects a ChannelAnalysis from channel_groups(), "
            f"got {type(analysis).__name__}"
        )
    else:
        analysis.check_graph(gm, "the analysis given to slim()")
    if channel_masks is not None:
        report = _decide_from_masks(gm, analysis, channel_masks)
    else:
        report = _decide_from_zeros(gm, analysis)
    drops = {g.group: set(g_drop) for g, g_drop in report}
    _keep_pieces_nonempty(analysis, drops, {g.group: g for g, _ in report})
    if round_to is not None and round_to > 1:
        _round_kept(drops, {g.group: g for g, _ in report}, round_to)
    result = copy.deepcopy(gm)
    modes = {name: m.training for name, m in gm.named_modules()}
    for name, m in result.named_modules():
        m.training = modes.get(name, m.training)
    removed = _removed_indices(analysis, drops)
    for name in sorted({layer for layer, _ in removed}):
        _slice_layer(result, analysis.layers[name], removed)
    _rewrite_slices(result, analysis, drops)
    result.graph.lint()
    result.recompile()
    try:
        _propagate_shapes(result, inputs)
    except Exception as exc:
        raise RewriterError(
            f"internal error: the slimmed model fails on the example inputs "
            f"({type(exc).__name__}: {exc}); please report it with the model"
        ) from exc
    result.meta[SLIM_KEY] = SlimReport(
        source="channel_masks" if channel_masks is not None else "zeroed filters",
        groups=[g for g, _ in report],
        params_before=sum(p.numel() for p in gm.parameters()),
        params_after=sum(p.numel() for p in result.parameters()),
    )
    return result


def mask_channels(
    gm: nn.Module, analysis: ChannelAnalysis, drops: Mapping[int, Iterable[int]]
) -> nn.Module:
    """Zero group channels in place so that they contribute exactly nothing; returns ``gm``.

    ``drops`` maps a group id to the group channels to zero. For each channel: the output
    filters and biases producing it (through ``weight_mask`` when the layer has one),
    its per-channel norm parameters (``weight`` and ``bias``) and parameter attributes,
    and the input columns of every layer reading it are set to zero. The dense model
    then computes what :func:`slim` of it computes, and :func:`slim` without
    ``channel_masks`` removes exactly these channels.
    """
    modules = dict(gm.named_modules())
    with torch.no_grad():
        for gid, channels in drops.items():
            group = analysis.groups[gid]
            chosen = sorted(set(channels))
            if not chosen:
                continue
            if not group.prunable:
                raise RewriterError(f"group {gid} is not prunable: {group.reason}")
            if chosen[0] < 0 or chosen[-1] >= group.size:
                raise RewriterError(f"group {gid} has {group.size} channels, got {chosen}")
            for member in group.members:
                info = analysis.layers[member.layer]
                _zero(gm, modules, info, member.role, member.select(chosen))
    return gm


def group_masks(analysis: ChannelAnalysis, drops: Mapping[int, Iterable[int]]) -> dict[str, Tensor]:
    """``channel_masks`` for :func:`slim` that remove the given group channels.

    ``drops`` maps a group id to group channels. The result has one boolean mask (True =
    keep) per layer with output channels, False exactly at the output channels of the
    dropped group channels.
    """
    masks: dict[str, Tensor] = {}
    for group in analysis.groups:
        chosen = list(drops.get(group.id, ()))
        for member in group.members:
            if member.role == "out":
                size = analysis.layers[member.layer].sizes["out"]
                mask = masks.setdefault(member.layer, torch.ones(size, dtype=torch.bool))
                mask[member.select(chosen)] = False
    return masks


# --------------------------------------------------------------------------------------------
# Deciding which group channels go
# --------------------------------------------------------------------------------------------

Decision = list[tuple[GroupSlim, list[int]]]


def _member_rows(member: Member, values: Tensor) -> Tensor:
    """``values`` (one per layer index) gathered as (group channels, span)."""
    idx = torch.tensor(member.indices, dtype=torch.long)[:, None] + torch.arange(member.span)
    return values[idx]


def _finish(group: ChannelGroup, drop: Tensor, disagree: Tensor, gs: GroupSlim) -> list[int]:
    if drop.all() and group.size:
        drop = drop.clone()
        drop[0] = False
        gs.notes.append("every channel was marked for removal; channel 0 is kept")
    gs.removed = int(drop.sum())
    gs.disagreements = int(disagree.sum())
    if gs.disagreements:
        gs.notes.append(
            f"{gs.disagreements} channel(s) kept because the members of the group disagree"
        )
    return [int(i) for i in torch.nonzero(drop).flatten()]


def _decide_from_masks(
    gm: nn.Module, analysis: ChannelAnalysis, masks: Mapping[str, Tensor]
) -> Decision:
    roles: dict[str, str] = {}
    for name, mask in masks.items():
        info = analysis.layers.get(name)
        role = None
        if info is not None:
            role = "out" if "out" in info.sizes else ("param" if "param" in info.sizes else None)
        if role is None:
            known = sorted(n for n, i in analysis.layers.items() if {"out", "param"} & set(i.sizes))
            raise RewriterError(
                f"channel_masks names {name!r}, which is not a layer with output or "
                f"per-channel parameters; valid names: {', '.join(known)}"
            )
        size = info.sizes[role]
        if not isinstance(mask, Tensor) or mask.dim() != 1 or mask.numel() != size:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise RewriterError(
                f"channel_masks[{name!r}] must be a 1-D tensor of {size} booleans "
                f"(True = keep), got {got}"
            )
        roles[name] = role
    decision: Decision = []
    for group in analysis.groups:
        gs = GroupSlim(group.id, group.size)
        drop_votes = torch.zeros(group.size, dtype=torch.long)
        keep_votes = torch.zeros(group.size, dtype=torch.long)
        for member in group.members:
            if roles.get(member.layer) != member.role:
                continue
            rows = _member_rows(member, masks[member.layer].to(torch.bool).cpu())
            keep = rows.any(1)
            partial = keep & ~rows.all(1)  # part of a span kept, part dropped: disagreement
            keep_votes += keep.long()
            drop_votes += (~keep | partial).long()
        if not group.prunable:
            asked = int((drop_votes > 0).sum())
            if asked:
                gs.notes.append(
                    f"{asked} channel(s) marked for removal kept: not prunable ({group.reason})"
                )
            decision.append((gs, []))
            continue
        drop = (drop_votes > 0) & (keep_votes == 0)
        disagree = (drop_votes > 0) & (keep_votes > 0)
        decision.append((gs, _finish(group, drop, disagree, gs)))
    return decision


def _decide_from_zeros(gm: nn.Module, analysis: ChannelAnalysis) -> Decision:
    modules = dict(gm.named_modules())
    cache: dict[tuple[str, str], Tensor | None] = {}

    def zero(member: Member) -> Tensor | None:
        key = (member.layer, member.role)
        if key not in cache:
            cache[key] = _zero_flags(gm, modules, analysis.layers[member.layer], member.role)
        flags = cache[key]
        return None if flags is None else _member_rows(member, flags).all(1)

    decision: Decision = []
    for group in analysis.groups:
        gs = GroupSlim(group.id, group.size)
        if not group.prunable:
            decision.append((gs, []))
            continue
        says_drop = torch.ones(group.size, dtype=torch.bool)
        any_drop = torch.zeros(group.size, dtype=torch.bool)
        has_out = False
        columns = torch.ones(group.size, dtype=torch.bool)
        for member in group.members:
            flags = zero(member)
            if member.role == "in":
                columns &= flags if flags is not None else torch.zeros_like(columns)
                continue
            if flags is None:
                continue
            says_drop &= flags
            if member.role == "out":  # a zeroed producer is what asks for removal
                has_out = True
                any_drop |= flags
        if not has_out:
            says_drop[:] = False
        drop = says_drop.clone()
        if group.nonzero_ops:
            drop &= columns
            if bool((says_drop & ~columns).any()):
                gs.notes.append(
                    f"zeroed channels kept: {', '.join(group.nonzero_ops)} turns zeros into "
                    "nonzeros and a layer still reads them"
                )
        disagree = any_drop & ~drop
        decision.append((gs, _finish(group, drop, disagree, gs)))
    return decision


def _keep_pieces_nonempty(
    analysis: ChannelAnalysis, drops: dict[int, set[int]], report: dict[int, GroupSlim]
) -> None:
    """Keep one channel of every split piece or slice that would otherwise be empty.

    A group keeps at least one channel, but a piece of a split can hold only part of a
    group; pooling and norm layers reject tensors without channels.
    """
    for record in analysis.slices:
        for lo, hi in record.bounds:
            positions = record.positions[lo:hi]
            if not positions or any(
                p is None or p[1] not in drops.get(p[0], ()) for p in positions
            ):
                continue
            gid, ch = positions[0]
            drops[gid].discard(ch)
            report[gid].removed -= 1
            report[gid].notes.append(
                f"channel {ch} kept so that {record.kind} {record.node!r} keeps a channel"
            )


def _round_kept(drops: dict[int, set[int]], report: dict[int, GroupSlim], multiple: int) -> None:
    """Keep back the lowest dropped channels until each group keeps a multiple of ``multiple``."""
    for gid, dropped in drops.items():
        g = report[gid]
        kept = g.size - len(dropped)
        if not dropped or kept % multiple == 0:
            continue
        target = min(g.size, -(-kept // multiple) * multiple)
        back = sorted(dropped)[: target - kept]
        dropped.difference_update(back)
        g.removed -= len(back)
        g.notes.append(
            f"{len(back)} removed channel(s) kept back to keep {target} (a multiple of "
            f"{multiple} or the whole group)"
        )


# --------------------------------------------------------------------------------------------
# Reading and zeroing layer tensors
# --------------------------------------------------------------------------------------------


def _effective_weight(m: nn.Module) -> Tensor:
    mask = getattr(m, "weight_mask", None)
    return m.weight if mask is None else m.weight * mask


def _conv_columns(m: nn.Module, w: Tensor) -> Tensor:
    """For a conv weight-like tensor: per input channel of the layer, its weight block (flat)."""
    g = m.groups
    b, a = m.out_channels // g, m.in_channels // g
    blocks = w.reshape(g, b, a, -1).transpose(1, 2)  # (g, a, b, k)
    return blocks.reshape(g * a, -1)


def _zero_flags(
    gm: nn.Module, modules: dict[str, nn.Module], info: LayerInfo, role: str
) -> Tensor | None:
    """Per index of ``role``: whether it allows removal (``None``: the layer has no say)."""
    with torch.no_grad():
        if info.kind in ("conv", "linear"):
            m = modules[info.name]
            w = _effective_weight(m)
            if role == "out":
                flags = (w.reshape(w.shape[0], -1) == 0).all(1)
                if m.bias is not None:
                    flags &= m.bias == 0
                return flags
            cols = _conv_columns(m, w) if info.kind == "conv" else w.t()
            return (cols == 0).all(1)
        if info.kind in ("norm", "groupnorm"):
            m = modules[info.name]
            if m.weight is not None:
                return (m.weight == 0) & (m.bias == 0)
            if getattr(m, "running_mean", None) is not None:
                return torch.zeros(info.sizes["param"], dtype=torch.bool)
            return None
        if info.kind == "param":
            t = _fetch(gm, info.name).detach()
            return (t.movedim(info.param_dim, 0).reshape(t.shape[info.param_dim], -1) == 0).all(1)
        return None  # prelu keeps zeros at zero; layernorm groups are never prunable


def _zero(
    gm: nn.Module, modules: dict[str, nn.Module], info: LayerInfo, role: str, idx: list[int]
) -> None:
    if info.kind in ("conv", "linear"):
        m = modules[info.name]
        target = m.weight_mask if getattr(m, "weight_mask", None) is not None else m.weight
        if role == "out":
            target[idx] = 0
            if m.bias is not None:
                m.bias[idx] = 0
        elif info.kind == "linear":
            target[:, idx] = 0
        else:
            g = m.groups
            b, a = m.out_channels // g, m.in_channels // g
            for t in idx:
                target[(t // a) * b : (t // a + 1) * b, t % a] = 0
    elif info.kind in ("norm", "groupnorm"):
        m = modules[info.name]
        if m.weight is not None:
            m.weight[idx] = 0
            m.bias[idx] = 0
    elif info.kind == "param":
        _fetch(gm, info.name).index_fill_(info.param_dim, torch.tensor(idx), 0)


# --------------------------------------------------------------------------------------------
# Building the smaller model
# --------------------------------------------------------------------------------------------


def _removed_indices(
    analysis: ChannelAnalysis, drops: Mapping[int, set[int]]
) -> dict[tuple[str, str], set[int]]:
    removed: dict[tuple[str, str], set[int]] = {}
    for gid, channels in drops.items():
        if not channels:
            continue
        for member in analysis.groups[gid].members:
            removed.setdefault((member.layer, member.role), set()).update(member.select(channels))
    return removed


def _keep(info: LayerInfo, role: str, removed: Mapping[tuple[str, str], set[int]]) -> list[int]:
    gone = removed.get((info.name, role), set())
    return [i for i in range(info.sizes[role]) if i not in gone]


def _fetch(root: nn.Module, target: str) -> Tensor:
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, Tensor)
    return obj


def _set(owner: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``owner`` by ``value`` (same kind, grad flag)."""
    old = getattr(owner, name)
    value = value.detach().clone().contiguous()
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(owner, name, value)


def _select(owner: nn.Module, name: str, dim: int, keep: list[int]) -> None:
    t = getattr(owner, name, None)
    if t is None or len(keep) == t.shape[dim]:
        return
    _set(owner, name, t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device)))


def _slice_layer(
    gm: fx.GraphModule, info: LayerInfo, removed: Mapping[tuple[str, str], set[int]]
) -> None:
    if info.kind == "param":
        owner_name, _, attr = info.name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        _select(owner, attr, info.param_dim, _keep(info, "param", removed))
        return
    m = gm.get_submodule(info.name)
    if info.kind == "conv":
        _slice_conv(m, info, _keep(info, "out", removed), _keep(info, "in", removed))
    elif info.kind == "linear":
        keep_out, keep_in = _keep(info, "out", removed), _keep(info, "in", removed)
        for name in _weight_shaped(m):
            _select(m, name, 0, keep_out)
            _select(m, name, 1, keep_in)
        _select(m, "bias", 0, keep_out)
        m.out_features, m.in_features = len(keep_out), len(keep_in)
    elif info.kind in ("norm", "groupnorm", "prelu"):
        keep = _keep(info, "param", removed)
        names = ["weight", "bias", "running_mean", "running_var"]
        for name in names:
            _select(m, name, 0, keep)
        for name in ("center_weight", "scale_weight", "scale_bias"):  # RBN's (1, C, 1, 1)
            _select(m, name, 1, keep)
        if info.kind == "norm":
            m.num_features = len(keep)
        elif info.kind == "groupnorm":
            per = m.num_channels // m.num_groups
            m.num_groups, m.num_channels = len(keep) // per, len(keep)
        else:
            m.num_parameters = len(keep)
    else:
        raise RewriterError(f"internal error: cannot slice {info.kind} layer {info.name!r}")


def _weight_shaped(m: nn.Module) -> list[str]:
    """``weight`` and every buffer of the weight's shape (``weight_mask``, ``fit_mask``...)."""
    shape = m.weight.shape
    return ["weight"] + [n for n, b in m.named_buffers(recurse=False) if b.shape == shape]


def _slice_conv(m: nn.Module, info: LayerInfo, keep_out: list[int], keep_in: list[int]) -> None:
    g = m.groups
    b, a = m.out_channels // g, m.in_channels // g
    if info.conv_mode == "dense":
        local, groups = keep_in, 1
    elif info.conv_mode == "balanced":
        per_group = [[t - j * a for t in keep_in if j * a <= t < (j + 1) * a] for j in range(g)]
        outs = [[t - j * b for t in keep_out if j * b <= t < (j + 1) * b] for j in range(g)]
        if any(p != per_group[0] for p in per_group) or any(o != outs[0] for o in outs):
            raise RewriterError(f"internal error: unbalanced cut of grouped conv {info.name!r}")
        local, groups = per_group[0], g
    else:  # depthwise: input channel j is conv group j
        expected = [j * b + k for j in keep_in for k in range(b)]
        if keep_out != expected:
            raise RewriterError(f"internal error: inconsistent cut of depthwise conv {info.name!r}")
        local, groups = list(range(a)), len(keep_in)
    for name in _weight_shaped(m):
        _select(m, name, 0, keep_out)
        _select(m, name, 1, local)
    _select(m, "bias", 0, keep_out)
    m.out_channels, m.groups = len(keep_out), groups
    m.in_channels = groups * len(local)


def _rewrite_slices(
    gm: fx.GraphModule, analysis: ChannelAnalysis, drops: Mapping[int, set[int]]
) -> None:
    """New split sizes and slice bounds for nodes that count channels."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for record in analysis.slices:
        kept = [p is None or p[1] not in drops.get(p[0], ()) for p in record.positions]
        if all(kept):
            continue
        before = [0]
        for k in kept:
            before.append(before[-1] + k)
        bounds = [(before[lo], before[hi]) for lo, hi in record.bounds]
        node = nodes[record.node]
        if record.kind == "size" and node.op == "call_module":
            _set_heads(gm, node, bounds[0][1] - bounds[0][0])
        elif record.kind == "size":
            _set_size(node, record.dim, bounds[0][1] - bounds[0][0])
        elif record.kind == "split":
            sizes = [hi - lo for lo, hi in bounds]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.split, (node.args[0], sizes, record.dim))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        else:
            obj, index = node.args
            (lo, hi), old = bounds[0], index if record.item is None else index[record.item]
            new_slice = slice(lo, hi, old.step)
            if record.item is None:
                node.args = (obj, new_slice)
            else:
                node.args = (
                    obj,
                    tuple(new_slice if i == record.item else it for i, it in enumerate(index)),
                )


def _set_heads(gm: fx.GraphModule, node: fx.Node, value: int) -> None:
    """Write the kept head count on the module a ``call_module`` node calls
    (:class:`~rewriter.canonical.HeadAttention`'s ``num_heads``; its constructor config and
    ``rewriter_macs`` read it from there)."""
    module = gm.get_submodule(str(node.target))
    if not isinstance(getattr(module, "num_heads", None), int):
        raise RewriterError(
            f"internal error: {type(module).__name__} {node.target!r} has no num_heads to set"
        )
    module.num_heads = value


def _set_size(node: fx.Node, position: int, value: int) -> None:
    """Write ``value`` as the size at ``position`` of a ``view``/``reshape`` node's sizes
    (``x.view(a, b, c)``, ``x.view((a, b, c))``, ``torch.reshape(x, shape)``, ``shape=``)."""
    if node.op == "call_method" and len(node.args) > 1 and not isinstance(
        node.args[1], (tuple, list)
    ):
        node.args = (*node.args[: position + 1], value, *node.args[position + 2 :])
        return
    if len(node.args) > 1:
        sizes = list(node.args[1])
        sizes[position] = value
        node.args = (node.args[0], type(node.args[1])(sizes), *node.args[2:])
        return
    key = "shape" if "shape" in node.kwargs else "size"
    sizes = list(node.kwargs[key])
    sizes[position] = value
    node.kwargs = {**node.kwargs, key: type(node.kwargs[key])(sizes)}
