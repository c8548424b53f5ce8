"""Channel coupling analysis (``rewriter.analysis.channels``) and the networkx view.

Structural tests on every zoo model, then tiny hand-made models, one per pattern the
analysis must get right (concat offsets, split/chunk, flatten into linear, grouped and
depthwise convs, broadcasting gates, reshapes, norms, opaque modules...).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from factories import make as make_factory_net
from torch import Tensor, fx, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.channels import ChannelAnalysis, Member, channel_groups
from rewriter.analysis.view import graph


def analyse(model: nn.Module, *shape: int) -> tuple[fx.GraphModule, ChannelAnalysis]:
    torch.manual_seed(0)
    gm = rw.trace(model)
    return gm, channel_groups(gm, (torch.randn(*shape),))


def zoo_analysis(name: str) -> ChannelAnalysis:
    return channel_groups(rw.trace(zoo.create(name)), zoo.example_inputs(name))


def members(a: ChannelAnalysis, layer: str, role: str = "out") -> set[tuple[str, str]]:
    """(layer, role) of every member of the one group holding ``layer``'s ``role``."""
    return {(m.layer, m.role) for m in a.group_of(layer, role).members}


# --------------------------------------------------------------------------------------------
# networkx view
# --------------------------------------------------------------------------------------------


def test_view_has_a_node_per_fx_node_with_attributes_and_data_edges() -> None:
    gm = rw.trace(zoo.create("resnet8"))
    channel_groups(gm, zoo.example_inputs("resnet8"))  # records shapes
    view = graph(gm)
    assert list(view.nodes) == [n.name for n in gm.graph.nodes]
    stem = view.nodes["stem_0"]
    assert (stem["op"], stem["target"], stem["module_class"]) == ("call_module", "stem.0", "Conv2d")
    assert stem["shape"] == (2, 16, 32, 32)
    assert stem["fx_node"] is next(n for n in gm.graph.nodes if n.name == "stem_0")
    assert view.nodes["x"]["module_class"] is None
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert {u: view.edges[u, "add"]["arg_index"] for u in view.predecessors("add")} == {
        a.name: i for i, a in enumerate(add.args)
    }
    assert view.number_of_edges() == sum(len(n.all_input_nodes) for n in gm.graph.nodes)


def test_view_records_tuple_shapes_and_repeated_arguments() -> None:
    class Twice(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            a, b = torch.chunk(x, 2, dim=1)
            return a + a + b

    gm = rw.trace(Twice())
    channel_groups(gm, (torch.randn(2, 4, 3, 3),))
    view = graph(gm)
    assert view.nodes["chunk"]["shape"] == ((2, 2, 3, 3), (2, 2, 3, 3))
    assert view.edges["getitem", "add"]["arg_indices"] == [0, 1]
    assert view.edges["getitem", "add"]["arg_index"] == 0


# --------------------------------------------------------------------------------------------
# Zoo: structure
# --------------------------------------------------------------------------------------------

ZOO_COUNTS = {  # model: (groups, prunable groups)
    "resnet20": (14, 12),  # 3 residual stages + 9 block-internal + input + output
    "resnet8": (8, 6),
    "bottleneck_resnet": (12, 10),  # 3 stages + 2 per block + stem-to-block + in/out
    "mobilenetv2": (16, 14),
    "densenet": (8, 6),  # one group per concatenated chunk
    "vit": (7, 4),  # per block: the heads (packed qkv + proj) and the MLP hidden layer
    "multitask_resnet": (9, 6),  # two head outputs
    "digits_cnn": (5, 3),
    "mlp": (4, 2),
}


def test_zoo_counts_cover_every_zoo_model() -> None:
    assert set(ZOO_COUNTS) == set(zoo.names())


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_group_counts_inputs_and_outputs(name: str) -> None:
    a = zoo_analysis(name)
    assert (len(a.groups), len(a.prunable())) == ZOO_COUNTS[name], a.table()
    assert [g.id for g in a.groups] == list(range(len(a.groups)))
    reasons = [g.reason for g in a.groups if not g.prunable]
    assert any(r and "model input" in r for r in reasons)
    assert any(r and "network output" in r for r in reasons)
    for g in a.groups:
        assert g.prunable == (g.reason is None)
        for m in g.members:
            assert len(m.indices) == g.size
            assert all(0 <= i and i + m.span <= a.layers[m.layer].sizes[m.role] for i in m.indices)
    # every index of every layer role belongs to exactly one group channel
    for name_, info in a.layers.items():
        for role, size in info.sizes.items():
            assert len(a.channel_map(name_, role)) == size


def test_resnet20_stage_shares_one_group_across_all_its_adds() -> None:
    a = zoo_analysis("resnet20")
    stage = a.group_of("stem.0")
    assert stage.prunable and stage.size == 16
    assert stage.layers_out() == ["stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert stage.layers_param() == ["stem.1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    assert stage.layers_in() == [
        "layer1.0.conv1",
        "layer1.1.conv1",
        "layer1.2.conv1",
        "layer2.0.conv1",
        "layer2.0.shortcut.0",
    ]
    assert all(m.indices == tuple(range(16)) and m.span == 1 for m in stage.members)
    stage3 = a.group_of("layer3.2.conv2")
    assert stage3 is a.group_of("layer3.0.shortcut.0") is a.group_of("fc", "in")
    inner = a.group_of("layer2.1.conv1")
    assert {(m.layer, m.role) for m in inner.members} == {
        ("layer2.1.conv1", "out"),
        ("layer2.1.bn1", "param"),
        ("layer2.1.conv2", "in"),
    }


def test_densenet_concat_gives_one_group_per_chunk_with_offsets() -> None:
    a = zoo_analysis("densenet")
    chunks = a.groups_of("features.1.conv", "in")  # transition conv reads the whole block
    assert [g.layers_out() for g in chunks] == [
        ["stem"],
        ["features.0.layers.0.conv"],
        ["features.0.layers.1.conv"],
    ]
    offsets = [g.members_of("features.1.conv", "in")[0].indices for g in chunks]
    assert offsets == [tuple(range(0, 16)), tuple(range(16, 24)), tuple(range(24, 32))]
    bn = [g.members_of("features.1.bn", "param")[0].indices for g in chunks]
    assert bn == offsets
    assert all(g.prunable for g in chunks)
    with pytest.raises(ValueError, match="span groups"):
        a.group_of("features.1.conv", "in")
    assert a.channel_map("features.1.conv", "in")[17] == (chunks[1].id, 1)


def test_mobilenetv2_depthwise_conv_joins_input_and_output() -> None:
    model = zoo.create("mobilenetv2")
    a = zoo_analysis("mobilenetv2")
    depthwise = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
    ]
    assert len(depthwise) == 8
    for name in depthwise:
        assert a.layers[name].conv_mode == "depthwise"
        group = a.group_of(name, "out")
        assert group is a.group_of(name, "in") and group.prunable
        (out,) = group.members_of(name, "out")
        assert out.indices == group.members_of(name, "in")[0].indices
    # block features.2: expand conv -> bn -> relu6 -> depthwise -> bn -> relu6 -> project
    assert members(a, "features.2.conv.3") == {
        ("features.2.conv.0", "out"),
        ("features.2.conv.1", "param"),
        ("features.2.conv.3", "in"),
        ("features.2.conv.3", "out"),
        ("features.2.conv.4", "param"),
        ("features.2.conv.6", "in"),
    }


def test_vit_heads_are_prunable_and_layernorm_is_not() -> None:
    a = zoo_analysis("vit")  # details in tests/test_vit_heads.py
    qkv = a.group_of("blocks.0.attn.qkv")
    assert qkv.prunable and qkv.size == 4  # heads across the packed q/k/v and proj
    assert a.group_of("blocks.0.attn.proj", "in") is qkv
    stream = a.group_of("patch_embed")
    assert not stream.prunable and "LayerNorm" in stream.reason
    assert ("pos_embed", "param") in {(m.layer, m.role) for m in stream.members}
    assert a.layers["pos_embed"].param_dim == 2
    mlp = a.group_of("blocks.1.mlp.0")
    assert mlp.prunable and mlp.size == 64 and mlp.layers_in() == ["blocks.1.mlp.2"]


def test_multitask_heads_outputs_are_not_prunable_but_the_shared_trunk_is() -> None:
    a = zoo_analysis("multitask_resnet")
    for head in ("heads.0", "heads.1"):
        g = a.group_of(head)
        assert not g.prunable and g.reason == "network output"
    trunk = a.group_of("heads.0", "in")
    assert trunk is a.group_of("heads.1", "in") and trunk.prunable
    assert "backbone.layer3.0.conv2" in trunk.layers_out()


def test_analysis_does_not_change_training_flags_or_parameters() -> None:
    gm = rw.trace(zoo.create("resnet8"))
    gm.train()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    channel_groups(gm, zoo.example_inputs("resnet8"))
    assert all(m.training for m in gm.modules())
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shapes_recorded_by_rewrite_are_enough() -> None:
    x = zoo.example_inputs("resnet8")
    gm = rw.rewrite(zoo.create("resnet8"), ["masks", "rbn"], x)
    a = channel_groups(gm, None)
    assert len(a.groups) == 8
    assert a.group_of("layer1.0.bn1", "param") is a.group_of("layer1.0.conv1")
    with pytest.raises(rw.RewriterError, match="example inputs"):
        channel_groups(rw.trace(zoo.create("resnet8")), None)


# --------------------------------------------------------------------------------------------
# Hand-made cases
# --------------------------------------------------------------------------------------------


class Cat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.c = nn.Conv2d(14, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.a(x), self.b(x)
        return self.c(self.bn(torch.cat([b, a, a], dim=1)))


def test_cat_places_each_chunk_at_its_offset_and_a_repeated_chunk_twice() -> None:
    _, a = analyse(Cat(), 2, 3, 4, 4)
    gb, ga = a.group_of("b"), a.group_of("a")
    assert gb.members_of("c", "in") == [Member("c", "in", tuple(range(6)))]
    assert ga.members_of("c", "in") == [
        Member("c", "in", tuple(range(6, 10))),
        Member("c", "in", tuple(range(10, 14))),
    ]
    assert [m.indices for m in ga.members_of("bn", "param")] == [(6, 7, 8, 9), (10, 11, 12, 13)]
    assert ga.members_of("a", "out")[0].layer_indices(2) == range(2, 3)


class Splits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 10, 1)
        self.p, self.q, self.r = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(4, 2, 1)
        self.s = nn.Conv2d(5, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        p, q, r = torch.split(y, [3, 3, 4], dim=1)
        u, _ = y.chunk(2, dim=1)
        return self.p(p) + self.q(q) + self.r(r) + self.s(u)


def test_split_and_chunk_pieces_are_sub_ranges_of_their_producer() -> None:
    _, a = analyse(Splits(), 2, 3, 4, 4)
    # a's channels 0-2 feed p and s, 3-4 feed q and s, 5 feeds q, 6-9 feed r
    groups = a.groups_of("a")
    assert [g.members_of("a", "out")[0].indices for g in groups] == [
        (0, 1, 2),
        (3, 4),
        (5,),
        (6, 7, 8, 9),
    ]
    assert [{m.layer for m in g.members if m.role == "in"} for g in groups] == [
        {"p", "s"},
        {"q", "s"},
        {"q"},
        {"r"},
    ]
    assert groups[1].members_of("s", "in")[0].indices == (3, 4)
    assert groups[1].members_of("q", "in")[0].indices == (0, 1)
    assert groups[2].members_of("q", "in")[0].indices == (2,)
    assert all(g.prunable for g in groups)
    kinds = sorted((s.kind, s.bounds) for s in a.slices)
    assert kinds == [("split", ((0, 3), (3, 6), (6, 10))), ("split", ((0, 5), (5, 10)))]


class FlatHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 3, 4)
        self.fc2 = nn.Linear(5 * 2 * 3, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.max_pool2d(self.conv(x), 2)
        return self.fc(torch.flatten(y, 1)), self.fc2(y.view(y.size(0), -1))


def test_flatten_into_linear_maps_a_channel_to_its_h_times_w_features() -> None:
    _, a = analyse(FlatHead(), 2, 3, 4, 6)
    g = a.group_of("conv")
    assert g.prunable and g.size == 5
    for fc in ("fc", "fc2"):
        (m,) = g.members_of(fc, "in")
        assert (m.indices, m.span) == ((0, 6, 12, 18, 24), 6)
        assert m.select([1, 3]) == [6, 7, 8, 9, 10, 11, 18, 19, 20, 21, 22, 23]


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # 4 inputs, 3 outputs per group
        self.dw = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # depthwise, multiplier 2
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dw(self.g(self.a(x))))


def test_grouped_conv_keeps_groups_balanced_and_depthwise_removes_whole_groups() -> None:
    _, a = analyse(Grouped(), 2, 3, 5, 5)
    assert a.layers["g"].conv_mode == "balanced" and a.layers["dw"].conv_mode == "depthwise"
    inputs = a.group_of("g", "in")
    assert inputs.size == 4  # channel i of both conv groups goes together
    assert [m.indices for m in inputs.members_of("a", "out")] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    outputs = a.group_of("g", "out")
    assert outputs.size == 3
    assert [m.indices for m in outputs.members_of("g", "out")] == [(0, 1, 2), (3, 4, 5)]
    # the depthwise conv's input channel j is its output channels 2j and 2j+1
    assert [m.indices for m in outputs.members_of("dw", "in")] == [(0, 1, 2), (3, 4, 5)]
    assert [(m.indices, m.span) for m in outputs.members_of("dw", "out")] == [
        ((0, 2, 4), 2),
        ((6, 8, 10), 2),
    ]
    assert outputs.prunable


class Gate(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(mean(x))))) with a (N, C, 1, 1) gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(y * gate * self.scale + 1.0)


def test_broadcasting_gate_joins_the_gated_channels_and_its_producer() -> None:
    _, a = analyse(Gate(), 2, 3, 4, 4)
    g = a.group_of("conv")
    assert g is a.group_of("fc2") is a.group_of("fc1", "in") is a.group_of("head", "in")
    assert ("scale", "param") in {(m.layer, m.role) for m in g.members}
    assert g.prunable and a.layers["scale"].param_dim == 1
    assert any("sigmoid" in op for op in g.nonzero_ops)
    assert any("add" in op for op in g.nonzero_ops)


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1)
        self.gn = nn.GroupNorm(3, 6)
        self.pr = nn.PReLU(6)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.ln = nn.LayerNorm(4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.b(self.inorm(self.pr(self.gn(self.a(x)))))
        return self.c(self.ln(y.permute(0, 2, 3, 1)))


def test_groupnorm_joins_norm_groups_and_layernorm_blocks_its_channels() -> None:
    _, a = analyse(Norms(), 2, 3, 4, 4)
    g = a.group_of("a")
    assert g.size == 3 and g.prunable  # a group channel is a whole norm group of 2 channels
    assert {(m.layer, m.span) for m in g.members} == {
        ("a", 2),
        ("gn", 2),
        ("pr", 2),
        ("inorm", 2),
        ("b", 2),
    }
    ln = a.group_of("b")
    assert not ln.prunable and "LayerNorm 'ln'" in ln.reason
    assert a.group_of("ln", "param") is ln and a.group_of("c", "in") is ln


class Reshapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fa, self.fb, self.fc = nn.Linear(64, 2), nn.Linear(64, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = self.a(x).view(-1, 64)  # fixed size at the channel position: blocked
        n, c, h, w = x.shape
        b = self.b(x)
        b = b.reshape(n, b.size(1), h * w).permute(0, 2, 1).flatten(1)  # followed
        t = self.c(x)
        t = t.reshape(n, 2, 2, h * w).mean(-1).flatten(1)  # splits the channel dim
        return self.fa(a) + self.fb(b) + F.pad(self.fc(t), (0, 0))


def test_reshapes_are_followed_only_when_they_stay_correct_after_slimming() -> None:
    _, a = analyse(Reshapes(), 2, 3, 4, 4)
    assert not a.group_of("a").prunable and "fixed size 64" in a.group_of("a").reason
    b = a.group_of("b")
    assert b.prunable
    fb = b.members_of("fb", "in")  # (h*w, c) order after the permute: 16 runs of 1 feature
    assert len(fb) == 16 and all(m.span == 1 for m in fb)
    assert sorted(i for m in fb for i in m.layer_indices(1)) == list(range(1, 64, 4))
    c = a.group_of("c")  # a split with a fixed count: units of 2; slim rewrites the count
    assert c.prunable and c.size == 2
    assert [(s.kind, s.dim) for s in a.slices if s.positions[0][0] == c.id] == [("size", 1)]


class Counts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        return self.b(y) / y.size(1)  # the channel count used as a number


def test_channel_count_used_as_a_number_blocks_the_group() -> None:
    _, a = analyse(Counts(), 2, 3, 4, 4)
    g = a.group_of("a")
    assert not g.prunable and "channel count" in g.reason


class AttrUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.emb = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        y = self.b(self.a(x) + self.emb)
        return y + self.emb.sum() + self.a.weight.mean()


def test_tensors_also_read_elsewhere_block_their_layers() -> None:
    gm = fx.symbolic_trace(AttrUse())
    a = channel_groups(gm, (torch.randn(2, 3, 4, 4),))
    g = a.group_of("a")
    assert not g.prunable
    assert "'emb' is also read" in g.reason and "'a.weight' is read directly" in g.reason


def test_opaque_module_marks_its_groups_not_prunable() -> None:
    with pytest.warns(UserWarning):
        gm = rw.rewrite(make_factory_net(opaque=True), ["masks"], (torch.randn(2, 1, 6, 6),))
    assert "flip" in rw.opaque_modules(gm)
    a = channel_groups(gm, (torch.randn(2, 1, 6, 6),))
    g = a.group_of("block.conv")
    assert not g.prunable and "opaque module 'flip'" in g.reason
    assert a.group_of("stem").prunable  # the stem's channels only reach block.conv
    assert not a.group_of("fc", "in").prunable


def test_unknown_ops_block_only_the_channels_they_touch() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: Tensor) -> Tensor:
            a = torch.cumsum(self.a(x), dim=1)  # mixes channels
            return self.c(torch.cat([a, self.b(x)], 1))

    _, a = analyse(Odd(), 2, 3, 4, 4)
    assert "torch.cumsum" in a.group_of("a").reason
    assert a.group_of("b").prunable
    reads = {g.members_of("c", "in")[0].indices: g for g in a.groups_of("c", "in")}
    assert reads.keys() == {(0, 1, 2, 3), (4, 5, 6, 7)}
    assert not reads[0, 1, 2, 3].prunable and "unfollowed" in reads[0, 1, 2, 3].reason
    assert reads[4, 5, 6, 7] is a.group_of("b")


class Borrowed(nn.Module):
    """Sizes taken from one tensor and used on another."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)
        self.fa, self.fb = nn.Linear(64, 2), nn.Linear(2 * 16, 2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y, z, w = self.a(x), self.b(x), self.c(x)
        flat = z.reshape(z.size(0), y.size(1), -1).flatten(1)  # y's count on z's channels
        part = w[:, : y.size(1) // 2]  # y's count as a slice bound
        return self.fa(flat) + self.fb(part.flatten(1)) + self.head(y).mean((1, 2, 3))[:, None]


def test_channel_counts_borrowed_by_another_tensor_block_both() -> None:
    _, a = analyse(Borrowed(), 2, 3, 4, 4)
    assert "channel count of node 'size_1'" in a.group_of("a").reason
    assert "fixed size" in a.group_of("b").reason
    assert "indexing the analysis does not follow" in a.group_of("c").reason


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)
        self.twin = nn.Conv2d(4, 4, 1)
        self.twin.weight = self.b.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        return self.c(self.b(y) + self.twin(y))


def test_layers_sharing_a_parameter_are_not_prunable() -> None:
    _, a = analyse(Tied(), 2, 3, 4, 4)
    assert "'b' shares a tensor with twin" in a.group_of("b").reason
    assert "'twin' shares a tensor with b" in a.group_of("a").reason


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_over_other_dims_with_a_bias_turns_zero_channels_nonzero(bias: bool) -> None:
    """LayerNorm over W keeps channels apart, but an all-zero channel comes out as its bias:
    the group records it, so zero-based slimming keeps such channels and TAS does not search
    them (a TAS search model once disagreed with its derived net here)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.ln = nn.LayerNorm(8, bias=bias)
            self.fc = nn.Linear(128, 2)

        def forward(self, x):
            return self.fc(self.ln(torch.relu(self.conv(x))).flatten(1))

    x = torch.randn(2, 1, 8, 8)
    analysis = channel_groups(rw.trace(Net()), x)
    group = analysis.group_of("conv")
    assert group.prunable
    assert group.nonzero_ops == (("module 'ln'",) if bias else ())
