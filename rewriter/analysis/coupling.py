"""The machinery behind :func:`rewriter.analysis.channels.channel_groups`.

The analysis interprets the fx graph once, in node order, over *atoms*: one atom
per channel of a value (the channel dimension of every tensor the analysis can
follow). Ops either pass atoms through (activations, pooling, BN), rearrange
them (cat, split, flatten, permute), create fresh ones (the output channels of a
conv or linear), or *couple* them: ``union`` in a ``networkx`` union-find says
that two atoms are the same channel and must be removed together (the two
operands of a residual add, a depthwise conv's input and output). Layers record,
for each of their channel-indexed roles (``out`` rows, ``in`` columns, ``param``
per-channel tensors), the atom of every index.

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

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from networkx.utils import UnionFind
from torch import fx, nn

from .view import node_shape

Role = Literal["out", "in", "param"]


@dataclass(frozen=True)
class Tracked:
    """A tensor whose dimension ``dim`` is a followed channel dimension, one atom per index."""

    dim: int
    atoms: tuple[int, ...]


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
    """A node whose arguments count channels (split sizes, slice bounds) along ``dim``."""

    node: str
    kind: Literal["split", "slice"]
    dim: int
    bounds: tuple[tuple[int, int], ...]
    item: int | None
    atoms: tuple[int, ...]


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
        self.uf = UnionFind()
        self.next_atom = 0
        self.values: dict[fx.Node, Value] = {}
        self.members: dict[tuple[str, Role], list[int]] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.blocks: list[tuple[int, str]] = []
        self.nonzero: list[tuple[int, str]] = []
        self.slices: list[SliceRecord] = []
        self.param_users: dict[str, set[str]] = {}  # attribute -> nodes that couple it
        self.consumed: set[fx.Node] = set()  # count arguments the current rule accepted
        self.index = 0  # position of the node being interpreted
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    # -- atoms -------------------------------------------------------------------------------
    def fresh(self, n: int) -> tuple[int, ...]:
        start = self.next_atom
        self.next_atom += n
        return tuple(range(start, start + n))

    def union(self, xs: Sequence[int], ys: Sequence[int]) -> None:
        if xs is ys:
            return
        for a, b in zip(xs, ys, strict=True):
            if a != b:
                self.uf.union(a, b)

    def block(self, atoms: Iterable[int], reason: str) -> None:
        self.blocks.extend((a, reason) for a in atoms)

    def block_value(self, value: Value, reason: str) -> None:
        for v in iter_values(value):
            self.block(v.atoms if isinstance(v, Tracked) else v.of.atoms, reason)

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in flat_args(node):
            if isinstance(arg, fx.Node):
                self.block_value(self.values.get(arg), reason)

    def mark_nonzero(self, atoms: Iterable[int], what: str) -> None:
        """Record that an op on these channels maps an all-zero channel to a nonzero one."""
        self.nonzero.extend((a, what) for a in atoms)

    # -- layers ------------------------------------------------------------------------------
    def layer(self, name: str, kind: str, **info: Any) -> LayerRecord:
        record = self.layers.get(name)
        if record is None:
            record = self.layers[name] = LayerRecord(name, kind, order=self.index, **info)
        return record

    def member(self, layer: str, role: Role, atoms: Sequence[int]) -> tuple[int, ...]:
        """Register (or couple, on a second call) the atoms of ``layer``'s ``role`` indices."""
        key = (layer, role)
        known = self.members.get(key)
        if known is None:
            self.members[key] = list(atoms)
            self.layers[layer].sizes[role] = len(atoms)
            return tuple(atoms)
        if len(known) != len(atoms):
            reason = f"{layer!r} ({role}) is used with {len(atoms)} and {len(known)} channels"
            self.block(known, reason)
            self.block(atoms, reason)
            return tuple(known)
        self.union(known, atoms)
        return tuple(known)

    def out_member(self, layer: str, n: int) -> tuple[int, ...]:
        """The atoms of ``layer``'s output channels (fresh on the first call)."""
        known = self.members.get((layer, "out"))
        if known is not None and len(known) == n:
            return tuple(known)
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
