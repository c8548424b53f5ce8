"""Attention heads of ViTs written with a packed ``qkv`` Linear (the zoo ``vit``, timm style).

Canonicalisation splits the packed q/k/v (``rewriter/packed_attention.py``); the channel
analysis follows heads through the split, the per-projection head reshapes (fixed head
counts), ``q @ k^T``, ``attn @ v`` and the merge with a fixed width
(``rewriter/analysis/rules_attention.py``); ``slim`` rewrites the split sizes, head counts
and merged widths.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.channels import ChannelAnalysis, channel_groups
from rewriter.analysis.flops import flops
from rewriter.canonical import canonical_report
from rewriter.packed_attention import LABEL
from rewriter.passes.masks import get_masks
from rewriter.passes.split import get_fit_masks
from rewriter.testing import train_losses

HEADS, HEAD_DIM, TOKENS, DEPTH = 4, 8, 64, 2


def vit() -> nn.Module:
    torch.manual_seed(0)
    return zoo.vit().eval()


def inputs(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def analysed(
    model: nn.Module | None = None,
) -> tuple[nn.Module, torch.fx.GraphModule, ChannelAnalysis]:
    model = vit() if model is None else model
    gm = rw.trace(model)
    return model, gm, channel_groups(gm, (inputs(),))


def head_drops(a: ChannelAnalysis, heads: dict[int, list[int]], mlp: bool) -> dict[int, list[int]]:
    """Group drops: ``heads[block]`` of every block's head group, half of every MLP if asked."""
    drops = {}
    for block in range(DEPTH):
        g = a.group_of(f"blocks.{block}.attn.qkv")
        drops[g.id] = heads.get(block, [])
        if mlp:
            m = a.group_of(f"blocks.{block}.mlp.0")
            drops[m.id] = list(range(0, m.size, 2))
    return drops


def node_args(gm: torch.fx.GraphModule, op: str, target) -> list[tuple]:
    return [n.args[1:] for n in gm.graph.nodes if n.op == op and n.target == target]


# -- Before / Expected ------------------------------------------------------------------------


def test_packed_qkv_becomes_a_split_and_per_projection_head_reshapes() -> None:
    model = vit()
    before = rw.trace(model, canonical=False)
    after = rw.trace(model)
    # Before: one reshape into (3, heads, head_dim), a permute and three selections per block
    assert (
        node_args(before, "call_method", "reshape").count((-1, TOKENS, 3, HEADS, HEAD_DIM)) == DEPTH
    )
    assert node_args(before, "call_method", "permute") == [(2, 0, 3, 1, 4)] * DEPTH
    assert not [n for n in before.graph.nodes if n.target is torch.functional.split]
    # Expected: a split of the packed output along its channels, and per projection a
    # head reshape and a permute to (batch, heads, tokens, head_dim)
    splits = [n for n in after.graph.nodes if n.target in (torch.split, torch.functional.split)]
    assert [(str(n.args[0].target), n.args[1:]) for n in splits] == [
        (f"blocks.{i}.attn.qkv", ([32, 32, 32], -1)) for i in range(DEPTH)
    ]
    assert (
        node_args(after, "call_method", "reshape").count((-1, TOKENS, HEADS, HEAD_DIM)) == 3 * DEPTH
    )
    assert node_args(after, "call_method", "permute") == [(0, 2, 1, 3)] * (3 * DEPTH)
    assert canonical_report(after).lifted == {LABEL: DEPTH}  # fired once per block
    # nothing renamed or copied: the same parameters under the same names
    assert [k for k, _ in after.named_parameters()] == [k for k, _ in model.named_parameters()]
    assert all(p is q for p, q in zip(after.parameters(), model.parameters(), strict=True))
    x = inputs()
    for mode in (False, True):  # same views of the same memory: bit-identical, both modes
        model.train(mode), after.train(mode)
        assert torch.equal(after(x), model(x))
    model.zero_grad()
    model(x).square().sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    after(x).square().sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(after.parameters(), reference, strict=True))


def test_before_expected_channel_groups_of_the_zoo_vit() -> None:
    _, _, a = analysed()
    assert len(a.groups) == 7 and len(a.prunable()) == 4
    for block in range(DEPTH):
        attn = f"blocks.{block}.attn"
        heads = a.group_of(f"{attn}.qkv")
        assert heads.prunable and heads.size == HEADS  # one unit per head
        assert [(m.layer, m.role, m.indices, m.span) for m in heads.members] == [
            (f"{attn}.qkv", "out", (0, 8, 16, 24), 8),  # q rows
            (f"{attn}.qkv", "out", (32, 40, 48, 56), 8),  # k rows
            (f"{attn}.qkv", "out", (64, 72, 80, 88), 8),  # v rows
            (f"{attn}.proj", "in", (0, 8, 16, 24), 8),
        ]
        mlp = a.group_of(f"blocks.{block}.mlp.0")
        assert mlp.prunable and mlp.size == 64
        assert [(m.layer, m.role) for m in mlp.members] == [
            (f"blocks.{block}.mlp.0", "out"), (f"blocks.{block}.mlp.2", "in"),
        ]  # fmt: skip
    stream = a.group_of("patch_embed")
    assert not stream.prunable and "LayerNorm 'blocks.0.norm1' normalises over the channels" in (
        stream.reason or ""
    )
    assert a.group_of("blocks.0.attn.qkv", "in") is stream
    assert a.group_of("blocks.1.attn.proj", "out") is stream
    # what slim rewrites: the split sizes, three head counts and one merged width per block
    kinds = [(s.node, s.kind, s.dim) for s in a.slices]
    assert [k for k in kinds if k[1] == "split"] == [("split", "split", 2), ("split_1", "split", 2)]
    assert sum(k[1] == "size" for k in kinds) == 4 * DEPTH


# -- slim -------------------------------------------------------------------------------------


def test_slim_half_the_heads_and_half_the_mlp_is_exact_and_cuts_macs() -> None:
    _, gm, a = analysed()
    x = inputs()
    drops = head_drops(a, {0: [1, 3], 1: [0, 2]}, mlp=True)
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, (x,), rw.group_masks(a, drops), analysis=a)
    for mode in (False, True):
        masked.train(mode), small.train(mode)
        assert (small(x) - masked(x)).abs().max().item() <= 1e-6
    rep = small.meta["rewriter_slim"]
    assert rep.removed == 2 * (2 + 32) and (rep.params_before, rep.params_after) == (21_098, 12_746)
    zeroed = rw.slim(masked, (x,))  # without masks: the zeroed heads and channels go
    assert zeroed.meta["rewriter_slim"].removed == rep.removed
    assert (zeroed(x) - masked(x)).abs().max().item() <= 1e-6
    assert node_args(small, "call_method", "reshape").count((-1, TOKENS, 2, HEAD_DIM)) == 3 * DEPTH
    assert node_args(small, "call_method", "reshape").count((-1, TOKENS, 16)) == DEPTH
    assert [tuple(m.weight.shape) for n, m in small.named_modules() if n.endswith("attn.qkv")] == [
        (48, 32), (48, 32),
    ]  # fmt: skip
    # MACs: flops of the slim model equals the dense rows scaled by what was removed
    dense, slimmed = flops(gm, (x,)), flops(small, (x,))
    halved = ("qkv", "mlp.0", "mlp.1", "matmul", "mul", "softmax")
    expected = 0
    for row in dense.rows:
        if row.kind in ("matmul", "softmax") or row.target.endswith(halved):
            expected += row.macs // 2
        elif row.target.endswith(("attn.proj", "mlp.2")):  # half the columns, all the bias
            bn = row.macs // (row.shape[-1] * ((32 if "proj" in row.target else 64) + 1))
            k = 16 if "proj" in row.target else 32
            expected += bn * row.shape[-1] * (k + 1)
        else:
            expected += row.macs
    assert slimmed.total_macs == expected
    assert (dense.total_macs, slimmed.total_macs) == (3_748_500, 2_015_892)


@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(keep=st.lists(st.booleans(), min_size=HEADS * DEPTH, max_size=HEADS * DEPTH))
def test_slim_of_random_head_masks_is_exact(keep: list[bool]) -> None:
    _, gm, a = ANALYSED
    x = inputs()
    heads = {b: [h for h in range(HEADS) if not keep[b * HEADS + h]] for b in range(DEPTH)}
    heads = {b: h[1:] if len(h) == HEADS else h for b, h in heads.items()}  # slim keeps one
    drops = head_drops(a, heads, mlp=False)
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, (x,), rw.group_masks(a, drops), analysis=a)
    assert (small(x) - masked(x)).abs().max().item() <= 1e-6
    kept = [HEADS - len(heads[b]) for b in range(DEPTH)]
    reshapes = [n for n in small.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    counts = [n.args[3] for n in reshapes if len(n.args) == 5]
    assert counts == [kept[b] for b in range(DEPTH) for _ in range(3)]


ANALYSED = analysed()


# -- passes on packed and separate q/k/v ------------------------------------------------------


class SeparateAttention(nn.Module):
    """The zoo ``Attention`` with three Linears holding row slices of the packed one."""

    def __init__(self, packed: zoo.Attention) -> None:
        super().__init__()
        self.heads, self.tokens, self.head_dim, self.scale = (
            packed.heads, packed.tokens, packed.head_dim, packed.scale,
        )  # fmt: skip
        d = packed.dim
        for i, name in enumerate("qkv"):
            lin = nn.Linear(d, d)
            with torch.no_grad():
                lin.weight.copy_(packed.qkv.weight[i * d : (i + 1) * d])
                lin.bias.copy_(packed.qkv.bias[i * d : (i + 1) * d])
            setattr(self, name, lin)
        self.proj = packed.proj

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (
            getattr(self, n)(x).reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)
            for n in "qkv"
        )
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        return self.proj(out)


def separate_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.attn = SeparateAttention(block.attn)
    return twin


def packed_rows(masks: dict[str, Tensor], block: int) -> Tensor:
    return torch.cat([masks[f"blocks.{block}.attn.{n}"] for n in "qkv"])


def test_passes_see_the_same_weights_as_on_separate_q_k_v() -> None:
    model, x = vit(), inputs()
    twin = separate_twin(model)
    assert (twin(x) - model(x)).abs().max().item() <= 1e-6
    a_twin = channel_groups(rw.trace(twin), (x,))
    assert [g.size for g in a_twin.prunable()] == [g.size for g in ANALYSED[2].prunable()]

    net, twin_net = rw.rewrite(model, ["masks"], x), rw.rewrite(twin, ["masks"], x)
    assert torch.equal(net(x), model(x)) and torch.equal(twin_net(x), twin(x))
    masks, twin_masks = get_masks(net), get_masks(twin_net)
    # masks: one layer qkv where the twin has q, k and v (2 fewer per block), same weights
    assert rw.report(net).passes[0].fired == 2 + 4 * DEPTH == len(masks)
    assert rw.report(twin_net).passes[0].fired == 2 + 6 * DEPTH == len(twin_masks)
    assert sum(m.numel() for m in masks.values()) == sum(m.numel() for m in twin_masks.values())

    spec = [("magnitude", {"density": 0.3})]  # one global ranking: the same weights survive
    net, twin_net = rw.rewrite(model, spec, x), rw.rewrite(twin, spec, x)
    masks, twin_masks = get_masks(net), get_masks(twin_net)
    assert rw.report(net).passes[0].fired == 2 * (2 + 4 * DEPTH)  # mask + prune per layer
    assert rw.report(twin_net).passes[0].fired == 2 * (2 + 6 * DEPTH)
    for block in range(DEPTH):
        assert torch.equal(masks[f"blocks.{block}.attn.qkv"], packed_rows(twin_masks, block))
        assert torch.equal(
            masks[f"blocks.{block}.attn.proj"], twin_masks[f"blocks.{block}.attn.proj"]
        )

    spec = [("split", {"mode": "kels", "rate": 0.5})]  # fit heads: the first 2 of each
    net, twin_net = rw.rewrite(model, spec, x), rw.rewrite(twin, spec, x)
    fit = get_fit_masks(net)
    twin_fit = get_fit_masks(twin_net)
    assert rw.report(net).passes[0].fired == 2 + 4 * DEPTH
    assert rw.report(twin_net).passes[0].fired == 2 + 6 * DEPTH
    for block in range(DEPTH):
        qkv = fit[f"blocks.{block}.attn.qkv"]
        assert torch.equal(qkv, packed_rows(twin_fit, block))
        assert qkv.any(1).nonzero().flatten().tolist() == [
            r for p in range(3) for r in range(32 * p, 32 * p + 16)
        ]  # heads 0 and 1 of q, k and v


# -- save / load ------------------------------------------------------------------------------


def test_slim_vit_round_trips_through_save_and_load(tmp_path) -> None:
    x = inputs()
    net = rw.rewrite(vit(), ["masks"], x)
    a = channel_groups(net, (x,))
    small = rw.slim(net, (x,), rw.group_masks(a, head_drops(a, {0: [0], 1: [1, 2, 3]}, True)))
    path = rw.save(small, tmp_path / "vit.safetensors", source="zoo:vit")
    loaded = rw.load(path).eval()
    assert torch.equal(loaded(x), small(x))
    assert node_args(loaded, "call_method", "reshape").count((-1, TOKENS, 1, HEAD_DIM)) == 3
    assert loaded.get_submodule("blocks.0.attn.qkv").weight.shape == (72, 32)


@pytest.mark.slow
def test_slim_vit_loads_in_a_fresh_process(tmp_path) -> None:
    import subprocess
    import sys

    x = inputs()
    net = rw.rewrite(vit(), ["masks"], x)
    a = channel_groups(net, (x,))
    small = rw.slim(net, (x,), rw.group_masks(a, head_drops(a, {0: [1, 3], 1: [0, 2]}, True)))
    rw.save(small, tmp_path / "vit.safetensors", source="zoo:vit")
    torch.save((x, small(x).detach()), tmp_path / "expected.pt")
    code = f"""
import torch, rewriter as rw
x, ref = torch.load({str(tmp_path / "expected.pt")!r})
gm = rw.load({str(tmp_path / "vit.safetensors")!r}).eval()
print(gm.get_submodule("blocks.1.attn.qkv").out_features, torch.equal(gm(x), ref))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["48", "True"]


# -- other packed-attention writings ----------------------------------------------------------


class TimmAttention(nn.Module):
    """timm's ``Attention``: sizes from ``x.shape``, ``unbind(0)``, SDPA, ``reshape(B, N, C)``."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class TimmBlock(nn.Module):
    """A token embedding (so that ``C`` of ``x.shape`` counts channels), then a pre-norm block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm, self.attn = nn.Linear(32, 32), nn.LayerNorm(32), TimmAttention()

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        return x + self.attn(self.norm(x))


def test_timm_style_attention_heads_are_prunable_and_slim_exactly() -> None:
    torch.manual_seed(0)
    model, x = TimmBlock().eval(), torch.randn(2, 5, 32)
    gm = rw.trace(model)
    assert torch.equal(gm(x), model(x))
    assert canonical_report(gm).lifted == {LABEL: 1}
    a = channel_groups(gm, (x,))
    heads = a.group_of("attn.qkv")
    assert heads.prunable and heads.size == 4 and a.group_of("attn.proj", "in") is heads
    drops = {heads.id: [0, 2]}
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, (x,), rw.group_masks(a, drops), analysis=a)
    assert (small(x) - masked(x)).abs().max().item() <= 1e-6
    merge = [n for n in small.graph.nodes if n.op == "call_method" and n.target == "reshape"][-1]
    assert merge.args[3] == 16  # the borrowed width C became the kept width


def test_packed_reshape_read_otherwise_is_left_alone() -> None:
    class Peek(TimmAttention):
        def forward(self, x: Tensor) -> Tensor:
            qkv = self.qkv(x).reshape(2, 5, 3, 4, 8)
            return self.proj(qkv.sum(2).flatten(2))  # not a selection of q, k, v

    gm = rw.trace(Peek())
    assert canonical_report(gm).lifted == {}
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == []
    assert operator.getitem not in {n.target for n in gm.graph.nodes}


def test_lifted_zoo_vit_gets_the_same_heads() -> None:
    from rewriter.frontends import export_graph

    model, x = vit(), inputs()
    gm, args = export_graph(model, (x,), {}, dynamic=False)  # torch.select / aten calls
    assert canonical_report(gm).lifted[LABEL] == DEPTH
    assert torch.equal(gm(*args), model(x))
    a = channel_groups(gm, args)
    assert [g.size for g in a.prunable()] == [HEADS, 64] * DEPTH
    drops = head_drops(a, {0: [1, 3], 1: [0, 2]}, mlp=True)
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, args, rw.group_masks(a, drops), analysis=a)
    assert (small(*args) - masked(*args)).abs().max().item() <= 1e-6


class Variant(nn.Module):
    """Packed-qkv attention written in one of the ways the rewrite recognises."""

    def __init__(self, heads: int, head_dim: int, pick: str, sdpa: bool, packs_last: bool) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim, self.pick, self.sdpa = heads, head_dim, pick, sdpa
        self.packs_last = packs_last  # reshape (B, N, 3, H, D) unbound at dim 2, no permute
        self.embed, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        t = self.qkv(self.norm(x)).reshape(2, 5, 3, self.heads, self.head_dim)
        if self.packs_last:
            u = t.unbind(2)
            q, k, v = u[0].transpose(1, 2), u[1].transpose(1, 2), u[2].transpose(1, 2)
        else:
            t = t.permute(2, 0, 3, 1, 4)
            if self.pick == "getitem":
                q, k, v = t[0], t[1], t[2]
            elif self.pick == "select":
                q, k, v = t.select(0, 0), t.select(0, 1), t.select(0, 2)
            else:
                q, k, v = t.unbind(0)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1) @ v
        return x + self.proj(o.transpose(1, 2).reshape(2, 5, self.heads * self.head_dim))


@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    heads=st.integers(1, 4),
    head_dim=st.integers(2, 4),
    pick=st.sampled_from(["getitem", "select", "unbind"]),
    sdpa=st.booleans(),
    packs_last=st.booleans(),
    data=st.data(),
)
def test_random_packed_attention_writings_split_bit_identically_and_slim_exactly(
    heads: int, head_dim: int, pick: str, sdpa: bool, packs_last: bool, data: st.DataObject
) -> None:
    torch.manual_seed(heads * 10 + head_dim)
    model = Variant(heads, head_dim, pick, sdpa, packs_last).eval()
    x = torch.randn(2, 5, heads * head_dim)
    gm = rw.trace(model)
    assert canonical_report(gm).lifted == {LABEL: 1}
    assert torch.equal(gm(x), model(x))
    a = channel_groups(gm, (x,))
    group = a.group_of("qkv")
    assert group.prunable and group.size == heads and a.group_of("proj", "in") is group
    drop = data.draw(st.sets(st.integers(0, heads - 1), max_size=heads - 1), label="drop")
    drops = {group.id: sorted(drop)}
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, (x,), rw.group_masks(a, drops), analysis=a)
    assert (small(x) - masked(x)).abs().max().item() <= 1e-6
    assert small.get_submodule("qkv").out_features == 3 * head_dim * (heads - len(drop))


class Products(nn.Module):
    """Matrix products whose channels sit in a contracted dim, the columns and the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 4)
        self.mix = nn.Parameter(torch.randn(5, 5))
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        gram = self.a(x) @ self.b(x).transpose(1, 2)  # contracted: a and b channels join
        c = self.c(x)
        mixed = torch.matmul(self.mix, c)  # c's channels are the columns of b
        rows = torch.bmm(c.transpose(1, 2), gram)  # ... and the rows of a
        return self.out(mixed + rows.transpose(1, 2))


def test_matmul_follows_contracted_row_and_column_channels() -> None:
    torch.manual_seed(0)
    model, x = Products().eval(), torch.randn(2, 5, 6)
    gm = rw.trace(model)
    a = channel_groups(gm, (x,))
    ab, c = a.group_of("a"), a.group_of("c")
    assert [(m.layer, m.role) for m in ab.members] == [("a", "out"), ("b", "out")]
    assert [(m.layer, m.role) for m in c.members] == [("c", "out"), ("out", "in")]
    assert ab.prunable and c.prunable and (ab.size, c.size) == (8, 4)
    drops = {ab.id: [0, 3, 5, 6], c.id: [1, 2]}
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, (x,), rw.group_masks(a, drops), analysis=a)
    assert (small(x) - masked(x)).abs().max().item() <= 1e-5
    assert (small.a.out_features, small.c.out_features, small.out.in_features) == (4, 2, 2)

    class Mixed(Products):  # a computed (not followed) matrix over the channels: blocked
        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.c(x) @ torch.relu(self.mix[:4, :4]))

    blocked = channel_groups(rw.trace(Mixed()), (x,)).group_of("c")
    assert not blocked.prunable and "cannot follow" in (blocked.reason or "")


# -- Hugging Face eager attention -------------------------------------------------------------


def test_hf_eager_attention_matmuls_couple_heads_like_sdpa() -> None:
    hf_models = pytest.importorskip("hf_models")
    from transformers import LlamaConfig, LlamaModel

    from rewriter.frontends import export_graph

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=hf_models.VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32,
        use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    model, kwargs = LlamaModel(config).eval(), hf_models._text_inputs(0)
    gm, args = export_graph(model, (), kwargs, dynamic=False)
    assert any(n.target is torch.matmul for n in gm.graph.nodes)  # explicit q@k^T and attn@v
    a = channel_groups(gm, args)
    assert [(g.size, [m.layer.rsplit(".", 1)[-1] for m in g.members]) for g in a.prunable()] == [
        (2, ["q_proj", "k_proj", "v_proj", "o_proj"]),  # two kv groups of two query heads
        (128, ["gate_proj", "up_proj", "down_proj"]),
    ] * 2
    drops = {g.id: list(range(g.size // 2)) for g in a.prunable()}
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, args, rw.group_masks(a, drops), analysis=a)
    out, ref = small(*args), masked(*args)
    assert (out["last_hidden_state"] - ref["last_hidden_state"]).abs().max().item() <= 1e-5
    assert small.get_submodule("layers.0.self_attn.q_proj").out_features == 32
    assert small.get_submodule("layers.0.self_attn.k_proj").out_features == 16


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_every_tiny_hf_model_with_eager_attention_slims_exactly(name: str) -> None:
    hf_models = pytest.importorskip("hf_models")
    from rewriter.frontends import export_graph

    model, kwargs = hf_models.BUILDERS[name]()
    model.set_attn_implementation("eager")  # explicit matmul + softmax, no SDPA
    gm, args = export_graph(model, (), kwargs, dynamic=False)
    assert not any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 2 * hf_models.LAYERS
    a = channel_groups(gm, args)
    units = hf_models.KV_HEADS if name == "llama" else hf_models.HEADS
    assert [g.size for g in a.prunable()] == [units, hf_models.MLP] * hf_models.LAYERS
    drops = {g.id: list(range(g.size // 2)) for g in a.prunable()}
    masked = rw.mask_channels(copy.deepcopy(gm), a, drops)
    small = rw.slim(gm, args, rw.group_masks(a, drops), analysis=a)
    out, ref = small(*args), masked(*args)
    assert (out["last_hidden_state"] - ref["last_hidden_state"]).abs().max().item() <= 1e-5


# -- compile ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_slim_vit_trains_under_compile_fullgraph() -> None:
    torch.manual_seed(0)
    model = zoo.vit(depth=1, image_size=16)  # one block: fewer kernels to compile
    x, targets = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    gm = rw.trace(model)
    a = channel_groups(gm, (x,))
    drops = {a.group_of("blocks.0.attn.qkv").id: [1, 3], a.group_of("blocks.0.mlp.0").id: [0]}
    small = rw.slim(gm, (x,), rw.group_masks(a, drops), analysis=a).train()
    assert small.get_submodule("blocks.0.attn.qkv").out_features == 48
    compiled = torch.compile(small, fullgraph=True)
    assert torch.allclose(compiled(x), small(x), atol=1e-5)
    losses = train_losses(compiled, small, x, targets, steps=4)
    assert losses[-1] < losses[0], losses
