"""The machinery behind :func:`rewriter.analysis.channels.channel_groups`.

The analysis interprets the fx graph once, in node order, over *atoms*: one atom
per channel of a value (the channel dimension of every tensor the analysis can
follow). Ops either pass atoms through (activations, pooling, BN), rearrange
them (cat, split, flatten, permute), create fresh ones (the output channels of a
conv or linear), or *couple* them: ``union`` says that two atoms are the same channel
and must be removed together (the two operands of a residual add, a depthwise conv's
input and output). Layers record, for each of their channel-indexed roles (``out`` rows,
``in`` columns, ``param`` per-channel tensors), the atom of every index.

Atoms are numbered in blocks (``fresh(n)`` hands out ``n`` consecutive numbers), and
everything works on *ranges* of them rather than on single channels:

* a sequence of atoms is an :class:`Atoms`: runs ``(first, count, rep)`` (atoms
  ``first .. first+count-1``, each repeated ``rep`` times: ``rep > 1`` is the span of a
  flattened ``C x H x W`` map or a depthwise conv's channel multiplier). Slicing (split,
  ``x[:, a:b]``), concatenation (cat) and repetition cut and join runs; it is an
  ordinary read-only sequence of ints for the rules;
* the union-find (:class:`Partition`) is over *pieces*, contiguous ranges of atoms; a
  class is a set of equally long pieces joined position by position (offset ``i`` of
  every piece is one channel). ``union`` of two ranges cuts pieces at the range ends
  (a cut splits every piece of the class alike) and joins them piece by piece, so a
  residual add of two 2048-channel tensors is one operation, not 2048. Maps that are
  not range-to-range (one atom against a run, runs of different ``rep``) fall back to
  one-atom pieces there and only there.

Whatever the analysis does not understand is *blocked*: its atoms get a reason,
and the whole class of every blocked atom is reported not prunable. A class
(a set of atoms united by coupling) is the unit of removal; the public data
model in :mod:`rewriter.analysis.channels` groups classes that touch the same
layers.

Channel counts are followed too: ``x.size(1)`` or ``x.shape[1]`` of a followed tensor is
a :class:`Count`. A rule may accept one where it stays right after slimming (the channel
size of a reshape of that same tensor); any other use, as a number in arithmetic, a slice
bound or another tensor's shape, blocks the channels it counts.

The per-op rules live in :mod:`rewriter.analysis.rules_channels` (layers, elementwise
ops) and :mod:`rewriter.analysis.rules_structure` (cat, split, indexing, reshapes,
reductions); this module holds the value types, the state and the dispatcher.
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from typing import Any, Literal

import numpy as np
from torch import fx, nn

from .view import node_shape

Role = Literal["out", "in", "param"]

Run = tuple[int, int, int]  # (first atom, count, rep)


class Atoms(Sequence[int]):
    """A read-only sequence of atoms stored as runs ``(first, count, rep)``.

    The run ``(a, n, r)`` stands for ``a, a, ... (r times), a+1, ..., a+n-1`` (``n * r``
    items). Adjacent runs that continue each other are merged. Indexing, slicing with
    step 1, ``+`` and ``*`` work on runs; iterating, hashing and comparing with a plain
    tuple materialise the items.
    """

    __slots__ = ("runs", "_len", "_ends", "_hash")

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        out: list[Run] = []
        for s, n, r in runs:
            if n <= 0 or r <= 0:
                continue
            while out:
                ps, pn, pr = out[-1]
                if pr == r and ps + pn == s:  # the next atoms, same repeat
                    s, n = ps, pn + n
                elif pn == 1 and n == 1 and ps == s:  # the same atom again
                    r = pr + r
                else:
                    break
                out.pop()
            out.append((s, n, r))
        self.runs: tuple[Run, ...] = tuple(out)
        self._len = sum(n * r for _, n, r in out)
        self._ends: list[int] | None = None
        self._hash: int | None = None

    @staticmethod
    def span(first: int, count: int) -> Atoms:
        """The atoms ``first .. first+count-1``."""
        return Atoms(((first, count, 1),))

    def __len__(self) -> int:
        return self._len

    def ends(self) -> list[int]:
        """The position after each run."""
        if self._ends is None:
            self._ends = list(accumulate(n * r for _, n, r in self.runs))
        return self._ends

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._len)
            if step != 1:
                return Atoms(compress(tuple(self)[index]))
            return self.cut(start, max(stop, start))
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("atom index out of range")
        ends = self.ends()
        k = bisect_right(ends, i)
        s, n, r = self.runs[k]
        return s + (i - (ends[k] - n * r)) // r

    def cut(self, lo: int, hi: int) -> Atoms:
        """Positions ``lo .. hi-1`` (``0 <= lo <= hi <= len``)."""
        if lo == 0 and hi == self._len:
            return self
        out: list[Run] = []
        ends = self.ends()
        k = bisect_right(ends, lo)
        while lo < hi and k < len(self.runs):
            s, n, r = self.runs[k]
            base = ends[k] - n * r
            a, b = lo - base, min(hi, ends[k]) - base  # local positions in this run
            if r == 1:
                out.append((s + a, b - a, 1))
            else:
                first, last = a // r, (b - 1) // r
                if first == last:
                    out.append((s + first, 1, b - a))
                else:
                    if a % r:
                        out.append((s + first, 1, r - a % r))
                        first += 1
                    tail = b - last * r
                    full_end = last if tail < r else last + 1
                    if full_end > first:
                        out.append((s + first, full_end - first, r))
                    if tail < r:
                        out.append((s + last, 1, tail))
            lo = ends[k]
            k += 1
        return Atoms(out)

    def __iter__(self) -> Iterator[int]:
        for s, n, r in self.runs:
            if r == 1:
                yield from range(s, s + n)
            else:
                for a in range(s, s + n):
                    yield from repeat(a, r)

    def __add__(self, other: Any) -> Atoms:
        if not isinstance(other, (Atoms, tuple, list, range)):
            return NotImplemented
        return Atoms(self.runs + as_atoms(other).runs)

    def __radd__(self, other: Any) -> Atoms:
        if not isinstance(other, (Atoms, tuple, list, range)):
            return NotImplemented
        return Atoms(as_atoms(other).runs + self.runs)

    def __mul__(self, times: int) -> Atoms:
        return Atoms(self.runs * times)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Atoms):
            return self.runs == other.runs or (
                self._len == other._len and tuple(self) == tuple(other)
            )
        if isinstance(other, (tuple, list)):
            return self._len == len(other) and tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self))
        return self._hash

    def __repr__(self) -> str:
        parts = [
            f"{s}..{s + n - 1}" if n > 1 else str(s) + (f" x{r}" if r > 1 else "")
            for s, n, r in self.runs
        ]
        return f"Atoms({', '.join(parts)})"


def compress(values: Sequence[int]) -> list[Run]:
    """Runs ``(first, count, rep)`` of a plain sequence of atoms (numpy for long ones)."""
    if len(values) > 64:
        v = np.asarray(values, dtype=np.int64)
        change = np.flatnonzero(v[1:] != v[:-1]) + 1
        pos = np.concatenate(([0], change))
        vals = v[pos]
        mult = np.diff(np.append(pos, len(v)))
        brk = np.flatnonzero((vals[1:] != vals[:-1] + 1) | (mult[1:] != mult[:-1])) + 1
        rs = np.concatenate(([0], brk))
        re = np.append(brk, len(vals))
        return list(zip(vals[rs].tolist(), (re - rs).tolist(), mult[rs].tolist(), strict=True))
    out: list[Run] = []
    for a in values:
        out.append((a, 1, 1))  # Atoms() merges
    return out


def as_atoms(seq: Iterable[int]) -> Atoms:
    """``seq`` as :class:`Atoms` (no copy when it is one)."""
    if isinstance(seq, Atoms):
        return seq
    if isinstance(seq, range) and seq.step == 1:
        return Atoms.span(seq.start, len(seq))
    values = seq if isinstance(seq, (tuple, list)) else list(seq)
    return Atoms(compress(values))


def repeat_each(atoms: Sequence[int], times: int) -> Atoms:
    """Every atom of ``atoms`` repeated ``times`` times in place (``a, a, b, b`` for 2)."""
    runs = as_atoms(atoms).runs
    return Atoms(
        (s, n, r * times) if r == 1 or n == 1 else (a, 1, r * times)
        for s, n, r in runs
        for a in ((s,) if r == 1 or n == 1 else range(s, s + n))
    )


class Partition:
    """Union-find over atoms kept as *pieces*: contiguous ranges of atoms.

    A class holds pieces of one length, joined position by position: offset ``i`` of
    each of its pieces is one equivalence class of atoms. ``cut(a)`` makes ``a`` the start
    of a piece, splitting every piece of that class at the same offset; ``union(a, b, n)``
    joins atoms ``a+i`` and ``b+i`` for ``i < n``. Atoms are added in blocks of
    consecutive numbers (:meth:`add`), each its own piece.

    Unions that continue each other (``union(a, b, 1)`` then ``union(a+1, b+1, 1)``: a rule
    coupling channel by channel) are merged into one range union before they are applied;
    every read applies the pending one first.
    """

    def __init__(self) -> None:
        self.alloc_starts: list[int] = []  # first atom of every block, increasing
        self.alloc_cuts: list[list[int]] = []  # sorted piece starts within each block
        self.length: dict[int, int] = {}  # piece start -> length
        self.parent: dict[int, int] = {}  # piece start -> parent piece (union-find)
        self.members: dict[int, list[int]] = {}  # class root -> its pieces
        self.end = 0
        self.pending: tuple[int, int, int] | None = None  # a union not applied yet

    def flush(self) -> None:
        """Apply the pending union (see the class docs)."""
        if self.pending is not None:
            a, b, n = self.pending
            self.pending = None
            self._union(a, b, n)

    def add(self, start: int, n: int) -> None:
        """A block of new atoms ``start .. start+n-1`` (``start`` = the current end)."""
        if n <= 0:
            return
        if start != self.end:
            raise ValueError(f"atoms must be added in order: {start} after {self.end}")
        self.alloc_starts.append(start)
        self.alloc_cuts.append([start])
        self.length[start] = n
        self.parent[start] = start
        self.members[start] = [start]
        self.end = start + n

    def find(self, piece: int) -> int:
        """The root of a piece's class."""
        parent = self.parent
        while parent[piece] != piece:
            parent[piece] = parent[parent[piece]]
            piece = parent[piece]
        return piece

    def _cuts(self, atom: int) -> list[int]:
        return self.alloc_cuts[bisect_right(self.alloc_starts, atom) - 1]

    def piece(self, atom: int) -> int:
        """The start of the piece holding ``atom``."""
        cuts = self._cuts(atom)
        return cuts[bisect_right(cuts, atom) - 1]

    def locate(self, atom: int) -> tuple[int, int]:
        """``(class root, offset)``: the equivalence class of one atom."""
        self.flush()
        p = self.piece(atom)
        return self.find(p), atom - p

    def cut(self, atom: int) -> None:
        """Make ``atom`` the first atom of a piece (its whole class is split alike)."""
        if atom in self.length:  # already a piece start (pieces are only ever split)
            return
        self.flush()
        if atom <= 0 or atom >= self.end:
            return
        p = self.piece(atom)
        off = atom - p
        if off == 0:
            return
        root = self.find(p)
        full = self.length[p]
        new: list[int] = []
        for q in self.members[root]:
            self.length[q] = off
            q2 = q + off
            self.length[q2] = full - off
            insort(self._cuts(q), q2)
            new.append(q2)
        for q2 in new:
            self.parent[q2] = new[0]
        self.members[new[0]] = new

    def pieces(self, lo: int, hi: int) -> list[int]:
        """Starts of the pieces in ``lo .. hi-1`` (pieces must start at ``lo`` and ``hi``)."""
        self.flush()
        out: list[int] = []
        k = bisect_right(self.alloc_starts, lo) - 1
        while k < len(self.alloc_starts) and self.alloc_starts[k] < hi:
            cuts = self.alloc_cuts[k]
            out.extend(cuts[bisect_left(cuts, lo) : bisect_left(cuts, hi)])
            k += 1
        return out

    def union(self, a: int, b: int, n: int) -> None:
        """Join atom ``a+i`` with atom ``b+i`` for every ``i < n``."""
        if a == b or n <= 0:
            return
        if self.pending is not None:
            pa, pb, pn = self.pending
            if a == pa + pn and b == pb + pn:  # continues the pending union
                self.pending = (pa, pb, pn + n)
                return
            self.flush()
        self.pending = (a, b, n)

    def _union(self, a: int, b: int, n: int) -> None:
        if self.length.get(a) == n and self.length.get(b) == n:  # two whole pieces
            self.join(a, b)
            return
        for x in (a, a + n, b, b + n):
            self.cut(x)
        while True:  # cut both ranges at the same offsets (a cut may cut other pieces)
            pa = [p - a for p in self.pieces(a, a + n)]
            pb = [p - b for p in self.pieces(b, b + n)]
            if pa == pb:
                break
            sa, sb = set(pa), set(pb)
            for off in sb - sa:
                self.cut(a + off)
            for off in sa - sb:
                self.cut(b + off)
        for off in pa:
            self.join(a + off, b + off)

    def join(self, p: int, q: int) -> None:
        """Join two pieces of equal length position by position."""
        self.flush()
        rp, rq = self.find(p), self.find(q)
        if rp == rq:
            return
        mp, mq = self.members[rp], self.members[rq]
        if len(mp) < len(mq):
            rp, rq, mp, mq = rq, rp, mq, mp
        self.parent[rq] = rp
        mp.extend(mq)
        del self.members[rq]

    def cut_runs(self, atoms: Atoms) -> None:
        """Cut at both ends of every run of ``atoms``."""
        self.flush()
        for s, n, _ in atoms.runs:
            self.cut(s)
            self.cut(s + n)

    def union_atoms(self, xs: Atoms, ys: Atoms) -> None:
        """Join ``xs[i]`` with ``ys[i]`` for every position ``i`` (equal lengths)."""
        if len(xs) != len(ys):
            raise ValueError(f"cannot join {len(xs)} atoms with {len(ys)}")
        xr, yr = xs.runs, ys.runs
        i = j = 0
        ox = oy = 0  # positions already consumed inside xr[i] / yr[j]
        while i < len(xr) and j < len(yr):
            sx, nx, rx = xr[i]
            sy, ny, ry = yr[j]
            step = min(nx * rx - ox, ny * ry - oy)
            if rx == ry and ox % rx == oy % ry:  # a range against a range
                count = (ox + step - 1) // rx - ox // rx + 1
                self.union(sx + ox // rx, sy + oy // ry, count)
            else:  # an irregular map: atom by atom
                last = None
                for t in range(step):
                    pair = (sx + (ox + t) // rx, sy + (oy + t) // ry)
                    if pair != last:
                        self.union(pair[0], pair[1], 1)
                        last = pair
            ox += step
            oy += step
            if ox == nx * rx:
                i, ox = i + 1, 0
            if oy == ny * ry:
                j, oy = j + 1, 0


@dataclass(frozen=True)
class Tracked:
    """A tensor whose dimension ``dim`` is a followed channel dimension, one atom per index.

    ``atoms`` may be given as any sequence of ints; it is stored as :class:`Atoms`.
    """

    dim: int
    atoms: Atoms

    def __post_init__(self) -> None:
        if not isinstance(self.atoms, Atoms):
            object.__setattr__(self, "atoms", as_atoms(self.atoms))


@dataclass(frozen=True)
class Pieces:
    """A tuple-valued node (``split``, ``chunk``): one value per piece."""

    items: tuple[Value, ...]


@dataclass(frozen=True)
class Count:
    """A Python number that depends on the channel count of ``of`` (``x.size(1)``, ``x.numel()``)."""

    of: Tracked
    node: str


@dataclass(frozen=True)
class Sizes:
    """``x.size()`` or ``x.shape`` of a followed tensor (indexing it may give a :class:`Count`)."""

    of: Tracked
    node: str
    ndim: int


Value = Tracked | Pieces | Count | Sizes | None


@dataclass
class LayerRecord:
    """What the analysis learned about one channel-indexed layer (module or attribute)."""

    name: str
    kind: str
    sizes: dict[str, int] = field(default_factory=dict)
    conv_mode: str | None = None
    param_dim: int | None = None
    order: int = 0


@dataclass(frozen=True)
class SliceRecord:
    """A node whose arguments count channels (split sizes, slice bounds) along ``dim``.

    Kind ``"size"``: one size argument of a ``view``/``reshape`` (a head count or a merged
    head width written as a number), at position ``dim`` of its sizes; ``bounds`` is
    ``((0, n),)`` and slimming writes the number of kept positions there. On a
    ``call_module`` node (:class:`~rewriter.canonical.HeadAttention`) it is the module's
    ``num_heads``, which slimming sets.
    """

    node: str
    kind: Literal["split", "slice", "size"]
    dim: int
    bounds: tuple[tuple[int, int], ...]
    item: int | None
    atoms: Sequence[int]


Handler = Callable[["Coupler", fx.Node], Value]
Lookup = Callable[["Coupler", fx.Node], Handler | None]


def describe(node: fx.Node) -> str:
    """A short readable name of what ``node`` does, for reasons and notes."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}() at node {node.name!r}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", str(node.target))
        if module.startswith("torch.nn.functional"):
            name = f"F.{name}"
        elif module.startswith("torch"):
            name = f"torch.{name}"
        return f"{name} at node {node.name!r}"
    return f"{node.op} {node.name!r}"


def iter_values(value: Value) -> Iterator[Tracked | Count | Sizes]:
    """Every tracked tensor, count and size tuple inside ``value``."""
    if isinstance(value, Pieces):
        for item in value.items:
            yield from iter_values(item)
    elif value is not None:
        yield value


def flat_args(node: fx.Node) -> list[Any]:
    """The node's positional then keyword arguments, nested lists/tuples/dicts flattened."""
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)
        else:
            out.append(a)

    walk(node.args)
    walk(node.kwargs)
    return out


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def norm_dim(dim: int, ndim: int) -> int:
    """``dim`` made non-negative for a tensor of ``ndim`` dimensions."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < max(ndim, 1):
        raise ValueError(f"dimension {dim!r} out of range for {ndim} dims")
    return dim % ndim if ndim else 0


class Coupler:
    """State of one channel analysis run: atoms, union-find, values, layer roles, blocks."""

    def __init__(self, gm: fx.GraphModule, lookup: Lookup, opaque: dict[str, str]) -> None:
        self.gm = gm
        self.lookup = lookup
        self.opaque = opaque
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.part = Partition()
        self.next_atom = 0
        self.values: dict[fx.Node, Value] = {}
        self.members: dict[tuple[str, Role], Atoms] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.blocks: list[tuple[Atoms, str]] = []
        self.nonzero: list[tuple[Atoms, str]] = []
        self.slices: list[SliceRecord] = []
        self.param_users: dict[str, set[str]] = {}  # attribute -> nodes that couple it
        self.consumed: set[fx.Node] = set()  # count arguments the current rule accepted
        self.index = 0  # position of the node being interpreted
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    # -- atoms -------------------------------------------------------------------------------
    def fresh(self, n: int) -> Atoms:
        """``n`` new atoms (consecutive numbers, one block of the partition)."""
        start = self.next_atom
        self.next_atom += n
        self.part.add(start, n)
        return Atoms.span(start, n)

    def union(self, xs: Sequence[int], ys: Sequence[int]) -> None:
        """Couple ``xs[i]`` with ``ys[i]`` for every ``i`` (equal lengths, else ValueError)."""
        if xs is ys:
            return
        self.part.union_atoms(as_atoms(xs), as_atoms(ys))

    def repeat_each(self, atoms: Sequence[int], times: int) -> Atoms:
        """Each atom of ``atoms`` ``times`` times in a row (a depthwise conv's multiplier)."""
        return repeat_each(atoms, times)

    def block(self, atoms: Iterable[int], reason: str) -> None:
        self.blocks.append((as_atoms(atoms), reason))

    def block_value(self, value: Value, reason: str) -> None:
        for v in iter_values(value):
            self.block(v.atoms if isinstance(v, Tracked) else v.of.atoms, reason)

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in flat_args(node):
            if isinstance(arg, fx.Node):
                self.block_value(self.values.get(arg), reason)

    def mark_nonzero(self, atoms: Iterable[int], what: str) -> None:
        """Record that an op on these channels maps an all-zero channel to a nonzero one."""
        self.nonzero.append((as_atoms(atoms), what))

    # -- layers ------------------------------------------------------------------------------
    def layer(self, name: str, kind: str, **info: Any) -> LayerRecord:
        record = self.layers.get(name)
        if record is None:
            record = self.layers[name] = LayerRecord(name, kind, order=self.index, **info)
        return record

    def member(self, layer: str, role: Role, atoms: Sequence[int]) -> Atoms:
        """Register (or couple, on a second call) the atoms of ``layer``'s ``role`` indices."""
        key = (layer, role)
        atoms = as_atoms(atoms)
        known = self.members.get(key)
        if known is None:
            self.members[key] = atoms
            self.layers[layer].sizes[role] = len(atoms)
            return atoms
        if len(known) != len(atoms):
            reason = f"{layer!r} ({role}) is used with {len(atoms)} and {len(known)} channels"
            self.block(known, reason)
            self.block(atoms, reason)
            return known
        self.union(known, atoms)
        return known

    def out_member(self, layer: str, n: int) -> Atoms:
        """The atoms of ``layer``'s output channels (fresh on the first call)."""
        known = self.members.get((layer, "out"))
        if known is not None and len(known) == n:
            return known
        return self.member(layer, "out", self.fresh(n))

    # -- values ------------------------------------------------------------------------------
    def val(self, arg: Any) -> Value:
        return self.values.get(arg) if isinstance(arg, fx.Node) else None

    def tracked(self, arg: Any) -> Tracked | None:
        v = self.val(arg)
        return v if isinstance(v, Tracked) else None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        """The recorded shape of a node's tensor value (``None``: not one tensor)."""
        if not isinstance(arg, fx.Node):
            return None
        if arg not in self.shapes:
            s = node_shape(arg)
            ok = isinstance(s, tuple) and all(isinstance(d, int) for d in s)
            self.shapes[arg] = s if ok else None
        return self.shapes[arg]

    # -- the interpretation ------------------------------------------------------------------
    def run(self) -> None:
        for index, node in enumerate(self.gm.graph.nodes):
            self.index = index
            if node.op == "placeholder":
                self.values[node] = self.placeholder(node)
            elif node.op == "get_attr":
                self.values[node] = None
            elif node.op == "output":
                self.block_inputs(node, "network output")
            else:
                self.values[node] = self.call(node)
        self.check_attributes()
        self.part.flush()

    def placeholder(self, node: fx.Node) -> Value:
        shape = self.shape(node)
        if shape is None or len(shape) < 2:
            return None
        atoms = self.fresh(shape[1])
        self.block(atoms, "model input")
        return Tracked(1, atoms)

    def call(self, node: fx.Node) -> Value:
        handler = self.lookup(self, node)
        self.consumed = set()
        if handler is None:
            self.block_inputs(node, f"{describe(node)} is not understood by the channel analysis")
            value: Value = None
        else:
            try:
                value = handler(self, node)
                self.check(node, value)
            except Exception as exc:  # a rule that cannot cope must not produce a wrong cut
                self.block_inputs(
                    node,
                    f"channel analysis failed at {describe(node)}: {type(exc).__name__}: {exc}",
                )
                value = None
        for arg in flat_args(node):  # a channel count read as a number, except where allowed
            v = self.val(arg)
            if isinstance(v, (Count, Sizes)) and arg not in self.consumed:
                self.block(
                    v.of.atoms,
                    f"the channel count of node {v.node!r} is used as a number by {describe(node)}",
                )
        return value

    def check(self, node: fx.Node, value: Value) -> None:
        """Internal consistency: a tracked value has one atom per index of its dimension."""
        if not isinstance(value, Tracked):
            return
        shape = self.shape(node)
        if shape is None or value.dim >= len(shape) or shape[value.dim] != len(value.atoms):
            raise AssertionError(
                f"rule gave {len(value.atoms)} channels at dim {value.dim}, shape is {shape}"
            )

    def check_attributes(self) -> None:
        """Block layers whose tensors are also read outside the rules that slice them.

        A ``get_attr`` of a member module's parameter (``conv.weight`` read by another op),
        an attribute coupled by an add that some other node also reads, and a parameter
        shared by two member layers would all break if the layer were sliced.
        """
        reads: dict[str, set[str]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                reads.setdefault(str(node.target), set()).update(u.name for u in node.users)
        for target, users in reads.items():
            owner = target.rpartition(".")[0]
            if owner in self.layers and self.layers[owner].kind != "param":
                reason = f"{target!r} is read directly by node(s) {sorted(users)}"
                self.block_layer(owner, reason)
                self.block_layer(target, reason)
            if target in self.layers:
                others = users - self.param_users.get(target, set())
                if others:
                    reason = f"attribute {target!r} is also read by node(s) {sorted(others)}"
                    self.block_layer(target, reason)
        owners: dict[int, set[str]] = {}  # tensor -> every module (or attribute) holding it
        for name, module in self.modules.items():
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                owners.setdefault(id(t), set()).add(name)
        for name, record in self.layers.items():
            if record.kind == "param":  # an attribute: its owner module holds it too
                holder, tensors = name.rpartition(".")[0], [fetch_attr(self.gm, name)]
            else:
                module = self.modules[name]
                holder = name
                tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            for t in tensors:
                others = sorted(owners.get(id(t), set()) - {holder})
                if others:
                    self.block_layer(name, f"{name!r} shares a tensor with {', '.join(others)}")

    def block_layer(self, layer: str, reason: str) -> None:
        for role in ("out", "in", "param"):
            atoms = self.members.get((layer, role))  # type: ignore[call-overload]
            if atoms:
                self.block(atoms, reason)


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object at the qualified attribute name ``target`` of ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
