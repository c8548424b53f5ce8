"""Packed q/k/v projections (timm's ViT ``Attention``) written as one tensor per projection.

The most common ViT writes its attention with one packed ``qkv`` Linear::

    qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)   # (3, B, H, N, D)
    q, k, v = qkv[0], qkv[1], qkv[2]                                    # or qkv.unbind(0)
    attn = (q @ k.transpose(-2, -1) * scale).softmax(-1)
    out = self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))

The reshape splits the channel dim into three dims at once (``3 x H x D``), which no
channel rule can follow: the projection (``3``) and the head (``H``) both hold channels.
:func:`split_packed_qkv` (run by :func:`rewriter.canonical.canonicalize`) rewrites the
reshape and the selection of ``q``, ``k``, ``v`` into a split of the packed output along
its channels and one head reshape per projection::

    q, k, v = torch.split(self.qkv(x), [H*D, H*D, H*D], -1)
    q = q.reshape(B, N, H, D).permute(0, 2, 1, 3)                      # (B, H, N, D)
    ...                                                                 # k and v alike

Every tensor is the same view of the same memory as before (same storage offset, sizes
and strides), so outputs and gradients are bit-identical in both modes. The packed
``qkv`` Linear itself is kept: **no parameter is renamed or copied** (state-dict keys,
artifacts and checkpoints are unchanged). The channel analysis then follows heads through
the split (its sizes are rewritten by :func:`rewriter.slim.slim`), the head reshapes and
the explicit ``q @ k^T`` / ``attn @ v`` (see :mod:`rewriter.analysis.rules_attention`).

Recognised: a ``view``/``reshape`` (method or ``torch.reshape``) whose last three sizes are
plain ints ``(P, H, D)`` with ``P*H*D`` the width of its input's last dim (the input is an
``nn.Linear``, or has a recorded shape), read only through one ``permute`` followed by
``[i]`` / ``.select(d, i)`` / ``.unbind(d)`` along the packed dim (or without a permute),
in traced graphs and in programs lifted from ``torch.export`` (``torch.select``,
``aten.unbind``). ``P`` may be any count (``2`` for a packed ``kv``).

*Deviation* (from how :class:`nn.MultiheadAttention` is made explicit): the packed Linear
is not split into three Linears, which would rename ``qkv.weight`` to
``q.weight``/``k.weight``/``v.weight`` and run three GEMMs whose results need not be
bit-identical to the packed one. Per-layer passes (``masks``, ``magnitude`` with
``scope="layer"``, ``split``) therefore see one layer ``qkv`` where a model with separate
projections has three (on the zoo ``vit``: 10 masked layers instead of 14); a global
``magnitude`` ranking keeps the same weights, and KELS and ``slim`` choose per split
piece, so the fit and kept heads are the same (``tests/test_vit_heads.py``).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from .canonical import CanonicalReport

__all__ = ["split_packed_qkv"]

LABEL = "packed qkv reshape -> split + per-projection head reshapes"


def _sizes(node: fx.Node) -> list[Any] | None:
    """The target sizes of a ``view``/``reshape`` node, or ``None`` if it is not one."""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        raw = list(node.args[1:])
        if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
            raw = list(raw[0])
        return raw or None
    if node.op == "call_function" and node.target is torch.reshape and len(node.args) == 2:
        return list(node.args[1]) if isinstance(node.args[1], (tuple, list)) else None
    return None


def _width(gm: fx.GraphModule, node: Any) -> int | None:
    """The size of the last dim of ``node``'s tensor, if known without running the graph."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.Linear):
            return int(module.out_features)
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None and isinstance(node.meta.get("val"), torch.Tensor):
        shape = node.meta["val"].shape
    return int(shape[-1]) if shape else None


def _permutation(node: fx.Node) -> list[int] | None:
    if node.op == "call_method" and node.target == "permute":
        dims = list(node.args[1:])
    elif node.op == "call_function" and node.target is torch.permute and len(node.args) == 2:
        dims = [node.args[1]]
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    return dims if all(type(d) is int for d in dims) else None


_UNBIND = (torch.unbind, torch.ops.aten.unbind.int)
_SELECT = (torch.select, torch.ops.aten.select.int)


def _unbind_dim(node: fx.Node) -> int | None:
    if (node.op == "call_method" and node.target == "unbind") or (
        node.op == "call_function" and node.target in _UNBIND
    ):
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return None


def _select(node: fx.Node) -> tuple[Any, Any] | None:
    """``(dim, index)`` of ``x.select(dim, index)`` / ``torch.select`` (lifted programs)."""
    if (node.op == "call_method" and node.target == "select") or (
        node.op == "call_function" and node.target in _SELECT
    ):
        if len(node.args) == 3:
            return node.args[1], node.args[2]
    return None


def _selections(tensor: fx.Node, dim: int, ndim: int) -> dict[int, list[fx.Node]] | None:
    """Projection index -> the nodes that select it from ``tensor`` along ``dim``.

    Accepts ``tensor[i]`` (when ``dim`` is 0), ``tensor.select(dim, i)`` and
    ``tensor.unbind(dim)[i]`` (also their aten forms in lifted programs); anything else
    reading ``tensor`` makes the pattern not apply (``None``).
    """
    found: dict[int, list[fx.Node]] = {}
    for user in tensor.users:
        picked = _select(user)
        if picked is not None:
            d, index = picked
            if type(d) is not int or (d + ndim if d < 0 else d) != dim or type(index) is not int:
                return None
            found.setdefault(index, []).append(user)
            continue
        if user.op == "call_function" and user.target is operator.getitem:
            index = user.args[1]
            if dim != 0 or type(index) is not int:
                return None
            found.setdefault(index, []).append(user)
            continue
        d = _unbind_dim(user)
        if type(d) is not int or (d + ndim if d < 0 else d) != dim:
            return None
        for item in user.users:
            if item.op != "call_function" or item.target is not operator.getitem:
                return None
            if type(item.args[1]) is not int:
                return None
            found.setdefault(item.args[1], []).append(item)
    return found


def split_packed_qkv(gm: fx.GraphModule, report: CanonicalReport | None = None) -> int:
    """Rewrite every packed q/k/v reshape of ``gm`` (see the module docs); return how many.

    The graph is changed in place (the caller lints and recompiles); nothing else is. The
    count is added to ``report.lifted`` under :data:`LABEL`.
    """
    done = 0
    for node in list(gm.graph.nodes):
        sizes = _sizes(node)
        if sizes is None or len(sizes) < 3:
            continue
        packs, heads, dim = sizes[-3:]
        if not all(type(v) is int and v > 0 for v in (packs, heads, dim)):
            continue
        source = node.args[0]
        if _width(gm, source) != packs * heads * dim:
            continue
        plan = _plan(node, len(sizes), packs)
        if plan is None:
            continue
        perm, selections = plan
        _rewrite(gm, node, sizes, perm, selections)
        done += 1
    if report is not None and done:
        report.lifted[LABEL] = report.lifted.get(LABEL, 0) + done
    return done


def _plan(
    node: fx.Node, ndim: int, packs: int
) -> tuple[list[int] | None, dict[int, list[fx.Node]]] | None:
    """The permute (if any) and the selections of each projection, or ``None``."""
    packed = ndim - 3  # position of the projection dim in the reshape's result
    users = list(node.users)
    if len(users) != 1:
        return None
    perm = _permutation(users[0])
    if perm is not None:
        perm = [p + ndim if p < 0 else p for p in perm]
        if sorted(perm) != list(range(ndim)):
            return None
        selections = _selections(users[0], perm.index(packed), ndim)
    else:
        selections = _selections(node, packed, ndim)
    if not selections or any(not 0 <= i < packs for i in selections):
        return None
    return perm, selections


def _rewrite(
    gm: fx.GraphModule,
    node: fx.Node,
    sizes: list[Any],
    perm: list[int] | None,
    selections: dict[int, list[fx.Node]],
) -> None:
    graph = gm.graph
    packs, heads, dim = sizes[-3:]
    ndim = len(sizes)
    packed = ndim - 3
    rest = None
    if perm is not None:  # the permutation of the dims left once the packed dim is gone
        rest = [p - (p > packed) for p in perm if p != packed]
        if rest == list(range(ndim - 1)):
            rest = None
    meta = dict(node.meta.get("nn_module_stack") or {})
    with graph.inserting_before(node):
        pieces = graph.call_function(torch.split, (node.args[0], [heads * dim] * packs, -1))
        pieces.meta["nn_module_stack"] = meta
        for index in sorted(selections):
            piece = graph.call_function(operator.getitem, (pieces, index))
            shaped = graph.call_method("reshape", (piece, *sizes[:-3], heads, dim))
            made = [piece, shaped]
            if rest is not None:
                shaped = graph.call_method("permute", (shaped, *rest))
                made.append(shaped)
            for n in made:
                n.meta["nn_module_stack"] = meta
            for old in selections[index]:
                old.replace_all_uses_with(shaped)
    for old in [n for found in selections.values() for n in found]:
        graph.erase_node(old)
    for user in list(node.users):  # the permute and the unbind nodes, now unused
        for item in list(user.users):
            if not item.users:
                graph.erase_node(item)
        if not user.users:
            graph.erase_node(user)
    if not node.users:
        graph.erase_node(node)
