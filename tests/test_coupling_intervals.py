"""Interval granularity of the channel analysis (``rewriter.analysis.coupling``).

:class:`Atoms` must behave exactly like the tuple of ints it stands for, and
:class:`Partition` (union-find over ranges of atoms) must give exactly the classes an
atom-by-atom union-find gives. The analysis must then work on ranges: its number of
pieces depends on the graph, not on the channel widths.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.channels import channel_groups
from rewriter.analysis.coupling import Atoms, Coupler, Partition, as_atoms, repeat_each
from rewriter.analysis.rules_channels import lookup
from rewriter.tracing import opaque_modules

# --------------------------------------------------------------------------------------------
# Atoms: a sequence of runs that reads like the tuple it stands for
# --------------------------------------------------------------------------------------------

runs = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 6), st.integers(1, 3)), min_size=0, max_size=6
)


def expand(rs: list[tuple[int, int, int]]) -> tuple[int, ...]:
    return tuple(a for s, n, r in rs for a in range(s, s + n) for _ in range(r))


@settings(max_examples=60, deadline=None)
@given(runs, runs, st.integers(0, 3), st.data())
def test_atoms_read_like_their_tuple(r1, r2, times, data) -> None:
    a, b = Atoms(r1), Atoms(r2)
    ta, tb = expand(r1), expand(r2)
    assert tuple(a) == ta and len(a) == len(ta)
    assert a == ta and a == Atoms(r1) and hash(a) == hash(ta)
    assert tuple(a + b) == ta + tb and tuple(ta + b) == ta + tb
    assert tuple(a * times) == ta * times
    assert tuple(repeat_each(a, times + 1)) == tuple(x for x in ta for _ in range(times + 1))
    if ta:
        i = data.draw(st.integers(-len(ta), len(ta) - 1))
        assert a[i] == ta[i]
    lo = data.draw(st.integers(-3, len(ta) + 3))
    hi = data.draw(st.integers(-3, len(ta) + 3))
    assert tuple(a[lo:hi]) == ta[lo:hi]
    assert tuple(a[lo:]) == ta[lo:] and tuple(a[:hi]) == ta[:hi]
    assert tuple(a[::2]) == ta[::2]
    assert (a == tb) == (ta == tb)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=150))
def test_as_atoms_compresses_any_sequence(values) -> None:
    atoms = as_atoms(values)  # more than 64 values take the numpy path
    assert tuple(atoms) == tuple(values)
    assert as_atoms(atoms) is atoms


def test_atoms_of_ranges_stay_runs() -> None:
    a = Atoms.span(100, 4096)
    assert a.runs == ((100, 4096, 1),)
    assert a[10:20].runs == ((110, 10, 1),)
    assert (a[:2048] + a[2048:]).runs == a.runs
    assert repeat_each(a, 49).runs == ((100, 4096, 49),)  # a flattened 4096 x 7 x 7 map
    assert as_atoms(range(5, 9)).runs == ((5, 4, 1),)


# --------------------------------------------------------------------------------------------
# Partition: the same classes as an atom-by-atom union-find
# --------------------------------------------------------------------------------------------


class Naive:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def same_classes(part: Partition, naive: Naive, n: int) -> None:
    ours: dict[tuple[int, int], set[int]] = {}
    theirs: dict[int, set[int]] = {}
    for a in range(n):
        ours.setdefault(part.locate(a), set()).add(a)
        theirs.setdefault(naive.find(a), set()).add(a)
    assert sorted(map(sorted, ours.values())) == sorted(map(sorted, theirs.values()))


blocks = st.lists(st.integers(1, 12), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(blocks, st.data())
def test_partition_range_unions_match_atom_unions(sizes, data) -> None:
    part, n = Partition(), sum(sizes)
    start = 0
    for size in sizes:
        part.add(start, size)
        start += size
    naive = Naive(n)
    for _ in range(data.draw(st.integers(0, 8))):
        length = data.draw(st.integers(1, n))
        a = data.draw(st.integers(0, n - length))
        b = data.draw(st.integers(0, n - length))
        part.union(a, b, length)
        for i in range(length):
            naive.union(a + i, b + i)
        if data.draw(st.booleans()):
            part.cut(data.draw(st.integers(0, n)))  # cutting never changes the classes
    same_classes(part, naive, n)
    for root, pieces in part.members.items():  # a class: pieces of one length
        assert len({part.length[p] for p in pieces}) == 1 and part.find(root) == root


@settings(max_examples=60, deadline=None)
@given(blocks, st.data())
def test_partition_irregular_maps_match_atom_unions(sizes, data) -> None:
    """Unions of atom sequences with repeats (depthwise multipliers, flatten spans)."""
    part, n = Partition(), sum(sizes)
    start = 0
    for size in sizes:
        part.add(start, size)
        start += size
    naive = Naive(n)
    atoms = st.lists(st.integers(0, n - 1), min_size=1, max_size=10)
    for _ in range(data.draw(st.integers(1, 4))):
        xs = data.draw(atoms)
        ys = data.draw(st.lists(st.integers(0, n - 1), min_size=len(xs), max_size=len(xs)))
        rep = data.draw(st.integers(1, 3))
        x_atoms = repeat_each(xs, rep)
        part.union_atoms(x_atoms, as_atoms([y for y in ys for _ in range(rep)]))
        for x, y in zip(xs, ys, strict=True):
            naive.union(x, y)
    same_classes(part, naive, n)


# --------------------------------------------------------------------------------------------
# The analysis works on ranges: pieces do not grow with the channel widths
# --------------------------------------------------------------------------------------------


class WideNet(nn.Module):
    """Residual convs, a depthwise conv, a concat, a split and a flatten into a linear."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, w, 3, padding=1)
        self.a = nn.Conv2d(w, w, 3, padding=1)
        self.b = nn.Conv2d(w, w, 1)
        self.dw = nn.Conv2d(w, w, 3, padding=1, groups=w)
        self.bn = nn.BatchNorm2d(2 * w)
        self.mix = nn.Conv2d(2 * w, 2 * w, 1)
        self.fc = nn.Linear(w * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.b(torch.relu(self.a(x)))
        y = torch.cat([x, self.dw(x)], dim=1)
        y = self.mix(torch.relu(self.bn(y)))
        left, right = torch.chunk(y, 2, dim=1)
        return self.fc(torch.flatten(left + right, 1))


def coupler_of(model: nn.Module, x: Tensor) -> Coupler:
    gm = rw.trace(model)
    channel_groups(gm, (x,))  # records the shapes
    c = Coupler(gm, lookup, opaque_modules(gm))
    c.run()
    return c


def test_pieces_do_not_grow_with_widths() -> None:
    x = torch.randn(2, 3, 4, 4)
    narrow, wide = coupler_of(WideNet(4).eval(), x), coupler_of(WideNet(512).eval(), x)
    assert wide.next_atom > 100 * narrow.next_atom / 4  # 128x more channels...
    assert len(wide.part.length) == len(narrow.part.length) <= 40  # ...same pieces
    assert len(wide.part.members) == len(narrow.part.members)
    assert all(len(atoms.runs) <= 2 for atoms in wide.members.values())
    a4 = channel_groups(rw.trace(WideNet(4).eval()), (x,))
    a512 = channel_groups(rw.trace(WideNet(512).eval()), (x,))
    assert [g.size for g in a4.groups] == [4, 3, 4, 4, 10]  # input and output stay
    assert [g.size for g in a512.groups] == [512, 3, 512, 512, 10]
    assert [[(m.layer, m.role, m.span) for m in g.members] for g in a4.groups] == [
        [(m.layer, m.role, m.span) for m in g.members] for g in a512.groups
    ]


def test_resnet_analysis_uses_few_pieces() -> None:
    c = coupler_of(zoo.create("resnet20").eval(), zoo.example_inputs("resnet20")[0])
    assert c.next_atom == 3 + 7 * (16 + 32 + 64) + 10  # one atom per channel of every output
    assert len(c.part.length) == 23  # one piece per conv output (and the input, the fc)
    assert len(c.part.members) == 14  # residual adds joined whole blocks: one class per group
