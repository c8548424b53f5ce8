"""Channel rules for ops that move channels around: cat, split, indexing, flatten,
reshape, permutes, reductions, softmax, padding and size queries.

See :mod:`rewriter.analysis.rules_channels` for the conventions; the tables that map
ops to these rules live there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import fx

from .coupling import (
    Count,
    Coupler,
    Handler,
    Pieces,
    Sizes,
    SliceRecord,
    Tracked,
    Value,
    arg,
    describe,
    norm_dim,
    repeat_each,
)


def flatten_atoms(x: Tracked, shape: Sequence[int], start: int, end: int) -> tuple[int, ...]:
    """Atoms of dims ``start..end`` (inclusive, containing ``x.dim``) merged in C order."""
    inner = math.prod(shape[x.dim + 1 : end + 1])
    outer = math.prod(shape[start : x.dim])
    per = repeat_each(x.atoms, inner)  # each channel spans `inner` positions
    return per * outer


def cat(c: Coupler, node: fx.Node) -> Value:
    tensors = list(arg(node, 0, "tensors"))
    out_shape = c.shape(node)
    if out_shape is None:
        c.block_inputs(node, f"{describe(node)} has no recorded shape")
        return None
    dim = norm_dim(arg(node, 1, "dim", 0), len(out_shape))
    vals = [c.tracked(t) for t in tensors]
    followed = {v.dim for v in vals if v is not None}
    if not followed:
        return None
    what = describe(node)
    if followed == {dim}:  # concatenating channels: each chunk keeps its own atoms
        atoms: list[int] = []
        for t, v in zip(tensors, vals, strict=True):
            if v is not None:
                atoms.extend(v.atoms)
                continue
            s = c.shape(t)
            extra = c.fresh(s[dim] if s else 0)
            c.block(extra, f"channels concatenated by {what} come from an unfollowed computation")
            atoms.extend(extra)
        return Tracked(dim, tuple(atoms))
    if len(followed) == 1 and all(v is not None for v in vals):  # cat along another dim
        first = vals[0].atoms
        for v in vals[1:]:
            c.union(first, v.atoms)
        return Tracked(vals[0].dim, first)
    c.block_inputs(node, f"{what} mixes channel dims or unfollowed tensors")
    return None


def split(c: Coupler, node: fx.Node) -> Value:
    """split / chunk: pieces along the channel dim get the matching atoms; sizes recorded."""
    shapes = node.meta.get("tensor_meta")
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if not isinstance(shapes, (tuple, list)) or shape is None:
        c.block_inputs(node, f"{describe(node)} has no recorded shapes")
        return None
    n = len(shapes)
    if x is None:
        return Pieces((None,) * n)
    dim = norm_dim(arg(node, 2, "dim", 0), len(shape))
    if dim != x.dim:
        return Pieces((x,) * n)
    sizes = [int(m.shape[dim]) for m in shapes]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    c.slices.append(SliceRecord(node.name, "split", dim, tuple(bounds), None, x.atoms))
    return Pieces(tuple(Tracked(dim, x.atoms[lo:hi]) for lo, hi in bounds))


def getitem(c: Coupler, node: fx.Node) -> Value:
    obj, index = node.args
    v = c.val(obj)
    what = describe(node)
    if isinstance(v, Pieces):
        if isinstance(index, int):
            return v.items[index]
        c.block_value(v, f"{what} takes a slice of a tuple of pieces")
        return None
    if isinstance(v, Sizes):
        c.consumed.add(obj)
        if isinstance(index, int) and not isinstance(index, bool):
            return Count(v.of, v.node) if norm_dim(index, v.ndim) == v.of.dim else None
        c.block(v.of.atoms, f"{what} indexes the size of node {v.node!r} in a way not followed")
        return None
    if isinstance(v, Tracked):
        return index_tensor(c, node, v, index)
    return None


def index_tensor(c: Coupler, node: fx.Node, x: Tracked, index: Any) -> Value:
    """``x[...]`` with ints, slices, None and Ellipsis; a slice of channels is recorded."""
    what = describe(node)
    shape = c.shape(node.args[0])
    items = index if isinstance(index, tuple) else (index,)
    simple = all(
        it is None or it is Ellipsis or isinstance(it, slice) or type(it) is int for it in items
    )
    slices_static = all(
        not isinstance(p, fx.Node)
        for it in items
        if isinstance(it, slice)
        for p in (it.start, it.stop, it.step)
    )
    if shape is None or not simple or not slices_static or sum(it is Ellipsis for it in items) > 1:
        c.block(x.atoms, f"{what} uses indexing the analysis does not follow")
        return None
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[tuple[int | None, Any]] = []
    for pos, it in enumerate(items):
        if it is Ellipsis:
            expanded.extend((None, slice(None)) for _ in range(len(shape) - consumed))
        else:
            expanded.append((pos, it))
    if Ellipsis not in items:
        expanded.extend((None, slice(None)) for _ in range(len(shape) - consumed))
    in_dim = out_dim = 0
    new_dim, atoms = None, x.atoms
    for pos, it in expanded:
        if in_dim >= len(shape) and it is not None:
            break
        if it is None:
            out_dim += 1
            continue
        if isinstance(it, int):
            if in_dim == x.dim:
                c.block(x.atoms, f"{what} selects a single channel")
                return None
            in_dim += 1
            continue
        if in_dim == x.dim:
            new_dim = out_dim
            if it.step not in (None, 1):
                c.block(x.atoms, f"{what} slices the channels with a step")
                return None
            if it.start is not None or it.stop is not None:
                start, stop, _ = it.indices(len(x.atoms))
                stop = max(stop, start)
                item = pos if isinstance(index, tuple) else None
                c.slices.append(
                    SliceRecord(node.name, "slice", x.dim, ((start, stop),), item, x.atoms)
                )
                atoms = x.atoms[start:stop]
        in_dim += 1
        out_dim += 1
    if new_dim is None:
        c.block(x.atoms, f"{what} uses indexing the analysis does not follow")
        return None
    return Tracked(new_dim, atoms)


def flatten(start_default: int) -> Handler:
    def rule(c: Coupler, node: fx.Node) -> Value:
        x = c.tracked(node.args[0])
        shape = c.shape(node.args[0])
        if x is None or shape is None:
            return None
        if node.op == "call_module":
            m = c.modules[str(node.target)]
            start, end = m.start_dim, m.end_dim
        else:
            start, end = arg(node, 1, "start_dim", start_default), arg(node, 2, "end_dim", -1)
        nd = len(shape)
        if nd == 0:
            return None
        start, end = norm_dim(start, nd), norm_dim(end, nd)
        if x.dim < start:
            return x
        if x.dim > end:
            return Tracked(x.dim - (end - start), x.atoms)
        return Tracked(start, flatten_atoms(x, shape, start, end))

    return rule


def reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int, int, int]] | None:
    """Pair contiguous dim ranges of shapes ``a`` and ``b`` with equal products.

    Returns ``(a_lo, a_hi, b_lo, b_hi)`` half-open ranges; size-1 dims join the range
    before them. ``None`` when the shapes do not pair up (zero-size dims).
    """
    if 0 in a or 0 in b:
        return None
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        si, sj, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                return None
        while i < len(a) and a[i] == 1:
            i += 1
        while j < len(b) and b[j] == 1:
            j += 1
        groups.append((si, i, sj, j))
    return groups


def reshape(c: Coupler, node: fx.Node) -> Value:
    """view / reshape: merging the channel dim with others is followed (like flatten).

    The target size at the channel position must be ``-1`` or ``x.size(dim)``, so that the
    reshape still works once channels are removed; splitting the channel dim into
    several (attention heads) is blocked.
    """
    x = c.tracked(node.args[0])
    shape_in, shape_out = c.shape(node.args[0]), c.shape(node)
    if x is None:
        return None
    what = describe(node)
    raw = list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "shape")]
    if not raw and "shape" in node.kwargs:
        raw = [node.kwargs["shape"]]
    if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
        raw = list(raw[0])
    if shape_in is None or shape_out is None or len(raw) != len(shape_out):
        c.block(x.atoms, f"{what} reshapes with sizes the analysis cannot read")
        return None
    if len(x.atoms) == 1:
        c.block(x.atoms, f"{what} reshapes a 1-channel tensor")
        return None
    groups = reshape_groups(shape_in, shape_out)
    found = [g for g in groups or () if g[0] <= x.dim < g[1]]
    if not found:
        c.block(x.atoms, f"{what} reshapes in a way the analysis does not follow")
        return None
    a_lo, a_hi, b_lo, b_hi = found[0]
    big = [k for k in range(b_lo, b_hi) if shape_out[k] != 1]
    if len(big) != 1:
        sizes = "x".join(str(shape_out[k]) for k in range(b_lo, b_hi))
        c.block(
            x.atoms,
            f"{what} splits the channel dim ({len(x.atoms)} -> {sizes}, e.g. attention heads)",
        )
        return None
    target = big[0]
    size_arg = raw[target]
    count = c.val(size_arg)
    dynamic = (
        isinstance(count, Count) and count.of.atoms == x.atoms and shape_out[target] == len(x.atoms)
    )
    if dynamic:
        c.consumed.add(size_arg)
    elif size_arg != -1:
        c.block(
            x.atoms,
            f"{what} gives the channel dim the fixed size {size_arg!r}; "
            "use -1 or x.size(dim) so that it follows removed channels",
        )
        return None
    return Tracked(target, flatten_atoms(x, shape_in, a_lo, a_hi - 1))


def permute(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    dims = list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "dims")]
    if not dims and "dims" in node.kwargs:
        dims = [node.kwargs["dims"]]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    order = [norm_dim(d, len(shape)) for d in dims]
    return Tracked(order.index(x.dim), x.atoms)


def transpose(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    d0 = norm_dim(arg(node, 1, "dim0"), len(shape))
    d1 = norm_dim(arg(node, 2, "dim1"), len(shape))
    swap = {d0: d1, d1: d0}
    return Tracked(swap.get(x.dim, x.dim), x.atoms)


def unsqueeze(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    shape = c.shape(node)
    if x is None or shape is None:
        return None
    d = norm_dim(arg(node, 1, "dim"), len(shape))
    return Tracked(x.dim + (d <= x.dim), x.atoms)


def squeeze(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    dims = arg(node, 1, "dim")
    what = describe(node)
    if dims is None:
        c.block(x.atoms, f"{what} squeezes every size-1 dim (the channel dim may become one)")
        return None
    dims = [norm_dim(d, len(shape)) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if x.dim in dims:
        c.block(x.atoms, f"{what} squeezes the channel dim")
        return None
    removed = [d for d in dims if shape[d] == 1]
    return Tracked(x.dim - sum(d < x.dim for d in removed), x.atoms)


def reduction(c: Coupler, node: fx.Node) -> Value:
    """mean / sum / amax / amin / std / var over dims other than the channel dim."""
    x = c.tracked(node.args[0])
    shape_in, shape_out = c.shape(node.args[0]), c.shape(node)
    if x is None:
        return None
    what = describe(node)
    dims = arg(node, 1, "dim")
    if shape_in is None or shape_out is None or dims is None or dims == () or dims == []:
        c.block(x.atoms, f"{what} reduces over every dim, the channels included")
        return None
    if isinstance(dims, fx.Node):
        c.block(x.atoms, f"{what} reduces over dims given at run time")
        return None
    dims = [
        norm_dim(d, len(shape_in)) for d in (dims if isinstance(dims, (tuple, list)) else [dims])
    ]
    if x.dim in dims:
        c.block(x.atoms, f"{what} reduces over the channel dim")
        return None
    if len(shape_out) == len(shape_in):  # keepdim
        return x
    return Tracked(x.dim - sum(d < x.dim for d in dims), x.atoms)


def softmax(c: Coupler, node: fx.Node) -> Value:
    if node.op == "call_module":
        return softmax_along(c, node, c.modules[str(node.target)].dim)
    return softmax_along(c, node, arg(node, 1, "dim"))


def softmax_along(c: Coupler, node: fx.Node, dim: int | None) -> Value:
    """softmax / log_softmax over ``dim``: per channel unless ``dim`` is the channel dim."""
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    if dim is None or norm_dim(dim, len(shape)) == x.dim:
        c.block(x.atoms, f"{describe(node)} normalises over the channel dim")
        return x
    c.mark_nonzero(x.atoms, describe(node))
    return x


def pad(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    widths = arg(node, 1, "pad")
    value = arg(node, 3, "value", None)
    if not isinstance(widths, (tuple, list)) or x.dim >= len(shape) - len(widths) // 2:
        c.block(x.atoms, f"{describe(node)} pads the channel dim")
        return None
    if value not in (None, 0, 0.0) and arg(node, 2, "mode", "constant") == "constant":
        c.mark_nonzero(x.atoms, describe(node))
    return x


def size(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    dim = arg(node, 1, "dim")
    if dim is None:
        return Sizes(x, node.name, len(shape))
    return Count(x, node.name) if norm_dim(dim, len(shape)) == x.dim else None


def numel(c: Coupler, node: fx.Node) -> Value:
    x = c.tracked(node.args[0])
    return Count(x, node.name) if x is not None else None


def get_attribute(c: Coupler, node: fx.Node) -> Value:
    """``getattr(x, name)`` as recorded by fx for ``x.shape``, ``x.dtype``..."""
    x = c.tracked(node.args[0])
    name = node.args[1]
    if x is None:
        return None
    shape = c.shape(node.args[0])
    if name == "shape" and shape is not None:
        return Sizes(x, node.name, len(shape))
    if name == "data":
        return x
    if name in ("dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"):
        return None
    c.block(x.atoms, f"{describe(node)} reads attribute {name!r}")
    return None


def nothing(c: Coupler, node: fx.Node) -> Value:
    return None
