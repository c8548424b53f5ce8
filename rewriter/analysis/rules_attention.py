"""Channel rules for attention: heads, grouped-query attention, and the ops around them.

A *head* is one removable unit across the q, k, v and output projections::

    q = q_proj(x).view(B, S, -1, D).transpose(1, 2)    # view: the D channels of a head join
    k = k_proj(x).view(B, S, -1, D).transpose(1, 2)
    o = scaled_dot_product_attention(q, k, v)          # sdpa: query head i joins its kv head
    o_proj(o.transpose(1, 2).reshape(B, S, -1))        # the merge spreads a head over D columns

* ``view``/``reshape`` that splits the channel dim into ``(heads, head_dim)`` joins the
  ``head_dim`` channels of each head into one unit and follows the head dim from then on.
  The head count is ``-1``, ``x.size(d)`` or the number of heads written as a number
  (``view(B, N, 4, 8)``, what :mod:`rewriter.packed_attention` writes for a packed
  ``qkv``): a number is recorded (a :class:`~rewriter.analysis.channels.ChannelSlice`
  of kind ``"size"``) and :func:`rewriter.slim.slim` writes the kept head count there.
  The merge back is the ordinary reshape rule, except that a merge of heads may give the
  merged width as a number (``reshape(B, N, 32)``) or as another tensor's channel count
  (timm's ``reshape(B, N, C)`` with ``C`` from ``x.shape``): recorded the same way.
  Fixed sizes in any other reshape are still refused.
* ``matmul`` / ``bmm`` / ``@``: operands followed at the same batch dim join unit by unit
  (``q @ k^T``: query head ``i`` with key head ``i``; ``attn @ v``: attention head ``i``
  with value head ``i``, so explicit eager attention gives the same units as SDPA, GQA
  through ``repeat_kv`` included); rows of ``a``, columns of ``b`` and a broadcast batch
  dim are followed; a contracted dim followed in both operands joins them.
* ``scaled_dot_product_attention(q, k, v)``: query head ``i``, key head and value head
  ``i`` are one unit. With grouped-query attention (``enable_gqa=True``, or k/v repeated
  with ``expand`` + ``reshape`` as Hugging Face's ``repeat_kv`` does) the unit is a whole
  kv group: a kv head with all its query heads. Removing units therefore keeps every kv
  group at the same number of query heads, so ``num_key_value_heads`` always divides
  ``num_attention_heads`` (multi-query attention has one unit: the attention is kept or
  removed as a whole). *Deviation:* finer GQA choices (removing the same number of query
  heads from every group while keeping the kv heads) are not offered.
* the residual stream is not prunable where a norm's statistics need every channel:
  LayerNorm (its own rule) and RMSNorm written as ``x * rsqrt(mean(x ** 2, -1))`` (this
  module gives it a reason that names RMSNorm). Embedding tables start the stream; their
  width is followed (so the whole stream is one group) but never sliced.
* aten calls that export leaves in a lifted graph (``aten.slice``, ``aten.neg``,
  ``aten.expand``, ``aten.sym_size``, dtype casts...) get rules here too.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .coupling import (
    Count,
    Coupler,
    Handler,
    SliceRecord,
    Tracked,
    Value,
    arg,
    describe,
    norm_dim,
)
from .rules_structure import flatten_atoms, reduction, reshape, reshape_groups, unsqueeze

__all__ = ["FUNCTIONS", "METHODS", "MODULES"]

aten = torch.ops.aten


def _raw_sizes(node: fx.Node) -> list[Any]:
    raw = list(node.args[1:]) if node.op == "call_method" else [arg(node, 1, "shape")]
    if not raw and "shape" in node.kwargs:
        raw = [node.kwargs["shape"]]
    if not raw and "size" in node.kwargs:
        raw = [node.kwargs["size"]]
    if len(raw) == 1 and isinstance(raw[0], (tuple, list)):
        raw = list(raw[0])
    return raw


def head_reshape(c: Coupler, node: fx.Node) -> Value:
    """``(.., C) -> (.., H, D)`` with ``H`` given as ``-1``: heads of ``D`` channels each.

    Anything else is the ordinary reshape rule.
    """
    x = c.tracked(node.args[0])
    shape_in, shape_out = c.shape(node.args[0]), c.shape(node)
    raw = _raw_sizes(node)
    if x is None or shape_in is None or shape_out is None or len(raw) != len(shape_out):
        return reshape(c, node)
    found = [g for g in reshape_groups(shape_in, shape_out) or () if g[0] <= x.dim < g[1]]
    if not found:
        return reshape(c, node)
    a_lo, a_hi, b_lo, b_hi = found[0]
    if [k for k in range(a_lo, a_hi) if shape_in[k] != 1] != [x.dim]:
        return reshape(c, node)
    big = [k for k in range(b_lo, b_hi) if shape_out[k] != 1]
    if (
        len(big) == 1
        and big[0] > 0
        and shape_out[big[0] - 1] == 1
        and (raw[big[0] - 1] == -1 or _fixed(raw[big[0] - 1], 1))
    ):
        big = [big[0] - 1, big[0]]  # one head (multi-query attention's k and v)
    if len(big) != 2:
        return reshape(c, node)
    h, d = big
    heads, width = shape_out[h], shape_out[d]
    count = c.val(raw[h])
    follows = raw[h] == -1 or (isinstance(count, Count) and count.of.atoms == x.atoms)
    fixed = _fixed(raw[h], heads)
    if not (follows or fixed) or raw[d] != width:
        c.block(
            x.atoms,
            f"{describe(node)} splits the channel dim into {heads}x{width} heads with the "
            f"head count given as {raw[h]!r}; use -1 (or the number of heads) so that it "
            "follows removed heads",
        )
        return None
    if isinstance(count, Count):
        c.consumed.add(raw[h])
    atoms = x.atoms
    for i in range(heads):
        c.union(atoms[i * width : (i + 1) * width], [atoms[i * width]] * width)
    units = tuple(atoms[i * width] for i in range(heads))
    _head_units(c).update(units)
    if fixed:  # slim writes the number of kept heads here
        c.slices.append(SliceRecord(node.name, "size", h, ((0, heads),), None, units))
    return Tracked(h, units)


def head_merge(c: Coupler, node: fx.Node) -> Value:
    """``(.., H, D) -> (.., H*D)`` with the merged width a fixed number (or another tensor's
    channel count, as timm's ``reshape(B, N, C)``): followed like any merge, and the width
    is recorded so that :func:`rewriter.slim.slim` writes the kept width there.

    Only heads (the units a head split made) are merged this way; any other reshape is
    the ordinary reshape rule, which refuses fixed channel counts.
    """
    x = c.tracked(node.args[0])
    heads = _HEADS.get(c)
    if x is None or not heads or not len(x.atoms) or x.atoms[0] not in heads:
        return None
    shape_in, shape_out = c.shape(node.args[0]), c.shape(node)
    raw = _raw_sizes(node)
    if (
        shape_in is None
        or shape_out is None
        or len(raw) != len(shape_out)
        or not set(x.atoms) <= heads
    ):
        return None
    one = shape_in[x.dim] == 1 and x.dim + 1 < len(shape_in)  # a single head: (.., 1, D)
    key = x.dim + 1 if one else x.dim
    found = [g for g in reshape_groups(shape_in, shape_out) or () if g[0] <= key < g[1]]
    if not found:
        return None
    a_lo, a_hi, b_lo, b_hi = found[0]
    big = [k for k in range(b_lo, b_hi) if shape_out[k] != 1]
    if len(big) != 1 or [k for k in range(a_lo, a_hi) if shape_in[k] != 1][:1] != [key]:
        return None
    a_lo = min(a_lo, x.dim)
    target = big[0]
    size_arg = raw[target]
    count = c.val(size_arg)
    borrowed = isinstance(count, Count) and count.of.atoms != x.atoms
    if not (_fixed(size_arg, shape_out[target]) or borrowed):
        return None
    if borrowed:
        c.consumed.add(size_arg)
    atoms = flatten_atoms(x, shape_in, a_lo, a_hi - 1)
    c.slices.append(SliceRecord(node.name, "size", target, ((0, len(atoms)),), None, atoms))
    return Tracked(target, atoms)


def view(c: Coupler, node: fx.Node) -> Value:
    """``view``/``reshape``: a head split, a head merge, or the ordinary reshape rule."""
    merged = head_merge(c, node)
    return merged if merged is not None else head_reshape(c, node)


def _fixed(size: Any, expected: int) -> bool:
    """Whether ``size`` is a plain int equal to ``expected`` (not a bool, not a node)."""
    return type(size) is int and size == expected


_HEADS: weakref.WeakKeyDictionary[Coupler, set[int]] = weakref.WeakKeyDictionary()


def _head_units(c: Coupler) -> set[int]:
    """The atoms standing for whole heads in this analysis run (made by head splits)."""
    return _HEADS.setdefault(c, set())


def matmul(c: Coupler, node: fx.Node) -> Value:
    """``a @ b`` (``torch.matmul``, ``bmm``): batch dims carry channels, rows and columns too.

    * both operands followed at the same batch dim (the head dim of ``q @ k^T`` and
      ``attn @ v``): their units join (query head ``i`` with key head ``i``; attention
      head ``i`` with value head ``i``) and the result is followed there;
    * one operand followed at a batch dim, the other of size 1 there (broadcast): followed;
    * ``a`` followed at its rows (dim -2) or ``b`` at its columns (dim -1): followed at the
      result's rows / columns;
    * the contracted dim followed in both: the units join and the result carries none of
      them (a removed channel adds nothing to the sum once it is zero in either operand).

    Anything else blocks the operands' channels.
    """
    a_node, b_node = arg(node, 0, "input"), arg(node, 1, "other")
    a, b = c.tracked(a_node), c.tracked(b_node)
    sa, sb, so = c.shape(a_node), c.shape(b_node), c.shape(node)
    if a is None and b is None:
        return None
    what = describe(node)
    if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
        c.block_inputs(node, f"{what}: a matrix product the analysis does not follow")
        return None
    nd = len(so)
    pa = None if a is None else a.dim + nd - len(sa)  # position in the result's frame
    pb = None if b is None else b.dim + nd - len(sb)
    batch = nd - 2
    if a is not None and b is not None:
        if pa == pb and pa is not None and pa < batch and len(a.atoms) == len(b.atoms):
            c.union(a.atoms, b.atoms)
            return Tracked(pa, a.atoms)
        if a.dim == len(sa) - 1 and b.dim == len(sb) - 2:
            c.union(a.atoms, b.atoms)
            return None
        c.block_inputs(node, f"{what} combines channels of its operands that do not line up")
        return None
    x, pos, other = (a, pa, sb) if a is not None else (b, pb, sa)
    assert x is not None and pos is not None
    if pos < batch:
        k = pos - (nd - len(other))
        if k < 0 or other[k] == 1:
            return Tracked(pos, x.atoms)
    elif a is not None and a.dim == len(sa) - 2:
        return Tracked(nd - 2, a.atoms)
    elif b is not None and b.dim == len(sb) - 1:
        return Tracked(nd - 1, b.atoms)
    c.block_inputs(node, f"{what} mixes the channels with a tensor the analysis cannot follow")
    return None


def attention(c: Coupler, node: fx.Node) -> Value:
    """``scaled_dot_product_attention(q, k, v)`` on ``(B, H, S, D)``: heads (and kv groups) join."""
    q, k, v = (c.tracked(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    mask = c.tracked(arg(node, 3, "attn_mask"))
    what = describe(node)
    shapes = [c.shape(arg(node, i, n)) for i, n in enumerate(("query", "key", "value"))]
    ok = (
        all(t is not None and t.dim == 1 for t in (q, k, v))
        and all(s is not None and len(s) == 4 for s in shapes)
        and mask is None
    )
    if not ok:
        c.block_inputs(node, f"{what}: its heads are not followed at dim 1 of (B, H, S, D)")
        return None
    nq, nk = len(q.atoms), len(k.atoms)
    gqa = bool(node.kwargs.get("enable_gqa", False))
    if len(v.atoms) != nk or (nq != nk and not (gqa and nq % nk == 0)):
        c.block_inputs(node, f"{what}: {nq} query heads do not match {nk} key/value heads")
        return None
    c.union(k.atoms, v.atoms)
    per = nq // nk
    for g in range(nk):
        c.union(q.atoms[g * per : (g + 1) * per], [k.atoms[g]] * per)
    return Tracked(1, q.atoms)


def expand(c: Coupler, node: fx.Node) -> Value:
    """``x.expand(sizes)``: new leading dims; the channel dim must keep size ``-1``.

    An expanded parameter (a ViT's class token) is followed along its last dim."""
    src = node.args[0]
    x = c.tracked(src)
    shape_in = c.shape(src)
    raw = _raw_sizes(node)
    if shape_in is None:
        return None
    if x is None and isinstance(src, fx.Node) and src.op == "get_attr" and shape_in:
        x = _parameter_channels(c, src, node, len(shape_in) - 1)
    if x is None:
        return None
    new = len(raw) - len(shape_in)
    size = raw[x.dim + new] if 0 <= new and x.dim + new < len(raw) else None
    if size != -1:
        c.block(x.atoms, f"{describe(node)} expands the channel dim to the fixed size {size!r}")
        return None
    return Tracked(x.dim + new, x.atoms)


def _parameter_channels(c: Coupler, attr: fx.Node, user: fx.Node, dim: int) -> Tracked | None:
    """A parameter read with ``get_attr`` whose ``dim`` holds channels (a class token that
    is expanded over the batch): a ``param`` member, sliced with its group."""
    target = str(attr.target)
    n = c.shape(attr)[dim]  # type: ignore[index]
    if n <= 1:
        return None
    record = c.layer(target, "param", param_dim=dim)
    if record.param_dim != dim:
        return None
    atoms = c.member(target, "param", c.fresh(n))
    c.param_users.setdefault(target, set()).add(user.name)
    return Tracked(dim, atoms)


def aten_slice(c: Coupler, node: fx.Node) -> Value:
    """``aten.slice(x, dim, start, end)``: other dims pass channels through; a whole-range
    slice of the channel dim too; a part of the channels is blocked."""
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    dim = norm_dim(arg(node, 1, "dim", 0), len(shape))
    if dim != x.dim:
        return x
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
    if start in (None, 0) and step == 1 and isinstance(end, int) and end >= shape[dim]:
        return x
    c.block(x.atoms, f"{describe(node)} takes part of the channels")
    return None


def sym_size(c: Coupler, node: fx.Node) -> Value:
    """``aten.sym_size(x, d)``: a channel count when ``d`` is the channel dim."""
    x = c.tracked(node.args[0])
    shape = c.shape(node.args[0])
    if x is None or shape is None:
        return None
    return Count(x, node.name) if norm_dim(arg(node, 1, "dim"), len(shape)) == x.dim else None


def passthrough(zero_preserving: bool | Callable[[fx.Node], bool] = True) -> Handler:
    """Elementwise ops and casts: channels stay where they are."""

    def rule(c: Coupler, node: fx.Node) -> Value:
        x = c.tracked(node.args[0]) if node.args else None
        if x is None:
            return None
        if c.shape(node) != c.shape(node.args[0]):
            c.block(x.atoms, f"{describe(node)} changes the shape of its input")
            return None
        keeps = zero_preserving(node) if callable(zero_preserving) else zero_preserving
        if not keeps:
            c.mark_nonzero(x.atoms, describe(node))
        return x

    return rule


def _positive_power(node: fx.Node) -> bool:
    exponent = arg(node, 1, "exponent")
    return isinstance(exponent, (int, float)) and exponent > 0


def mean(c: Coupler, node: fx.Node) -> Value:
    """``mean``: as any reduction, with an RMSNorm reason for ``mean(x ** 2)`` over channels."""
    x = c.tracked(node.args[0])
    src = node.args[0]
    shape = c.shape(src)
    dims = arg(node, 1, "dim")
    squares = (
        isinstance(src, fx.Node)
        and src.target in (aten.pow.Tensor_Scalar, torch.pow, torch.square, aten.square.default)
        and (src.target in (torch.square, aten.square.default) or arg(src, 1, "exponent") == 2)
    )
    if x is not None and shape is not None and squares and isinstance(dims, (list, tuple, int)):
        dims = [
            norm_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])
        ]
        if x.dim in dims:
            c.block(
                x.atoms,
                f"RMSNorm statistics (mean of squares at node {node.name!r}) need every "
                "channel of the residual stream",
            )
            return None
    return reduction(c, node)


def embedding(c: Coupler, node: fx.Node) -> Value:
    """``nn.Embedding``: its width starts a followed channel dim (never sliced: blocked)."""
    name = str(node.target)
    m = c.modules[name]
    shape = c.shape(node)
    if shape is None:
        return None
    atoms = c.fresh(m.embedding_dim)
    c.block(atoms, f"embedding table {name!r} is not sliced by the channel analysis")
    return Tracked(len(shape) - 1, atoms)


def _nothing(c: Coupler, node: fx.Node) -> Value:
    return None


FUNCTIONS: dict[Any, Handler] = {
    aten.scaled_dot_product_attention.default: attention,
    torch.nn.functional.scaled_dot_product_attention: attention,
    torch.reshape: view,
    aten.view.default: view,
    aten.reshape.default: view,
    torch.matmul: matmul,
    torch.bmm: matmul,
    operator.matmul: matmul,
    aten.matmul.default: matmul,
    aten.bmm.default: matmul,
    aten.expand.default: expand,
    aten.slice.Tensor: aten_slice,
    aten.sym_size.int: sym_size,
    aten.unsqueeze.default: unsqueeze,
    aten._assert_tensor_metadata.default: _nothing,
    torch.mean: mean,
    aten.pow.Tensor_Scalar: passthrough(_positive_power),
    **{op: passthrough() for op in (
        aten.neg.default, aten.sin.default, aten.to.dtype, aten.to.dtype_layout,
        aten.to.device, aten.clone.default, aten.contiguous.default, aten.alias.default,
        aten.detach.default,
    )},
    **{op: passthrough(False) for op in (aten.cos.default, aten.rsqrt.default)},
}  # fmt: skip

METHODS: dict[str, Handler] = {
    "view": view,
    "reshape": view,
    "matmul": matmul,
    "bmm": matmul,
    "__matmul__": matmul,
    "expand": expand,
    "mean": mean,
}

MODULES: dict[type[nn.Module], Handler] = {nn.Embedding: embedding}
