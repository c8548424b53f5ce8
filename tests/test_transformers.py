"""Hugging Face transformers through the export front end: masks, heads, slimming.

The tiny models come from ``tests/hf_models.py`` (built from configs, nothing is
downloaded). Exporting takes seconds, so each model is exported once per module: the
static-shape lifted graphs (``lifted``) serve the analysis tests, and the full
``rewrite(model, ["masks"], inputs)`` path with the default dynamic export runs once per
architecture (three of them in the slow run).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rewriter as rw
import rewriter.analysis.blocks
import rewriter.analysis.channels
from rewriter.analysis.flops import SOFTMAX_MACS, flops
from rewriter.errors import OptionError, RewriterError, TraceError
from rewriter.frontends import build_graph, export_graph, is_hf_model, split_inputs
from rewriter.passes.masks import MASKED

hf_models = pytest.importorskip("hf_models")

FAST_FULL = {"llama"}  # full-path masks test in the default run; the others are slow


def close(out: dict, ref) -> float:
    """Largest |difference| over the output fields, after checking they are the same fields."""
    fields = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor)}
    assert set(out) == set(fields)
    return max((out[k] - fields[k]).abs().max().item() for k in fields)


@pytest.fixture(scope="module")
def lifted() -> dict[str, tuple[nn.Module, dict, torch.fx.GraphModule, tuple]]:
    """name -> (HF model, keyword inputs, static-shape lifted graph, positional inputs)."""
    out = {}
    for name, build in hf_models.BUILDERS.items():
        model, kwargs = build()
        gm, inputs = export_graph(model, (), kwargs, dynamic=False)
        out[name] = (model, kwargs, gm, inputs)
    return out


# -- front end --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [n if n in FAST_FULL else pytest.param(n, marks=pytest.mark.slow) for n in
             hf_models.BUILDERS]
)
def test_masks_reach_every_linear_of_each_hf_model(name: str) -> None:
    model, kwargs = hf_models.BUILDERS[name]()
    net = rw.rewrite(model, ["masks"], kwargs)
    rep = rw.report(net)
    assert rep.frontend == "export" and "front end: export" in rep.table()
    masked = [n for n, m in net.named_modules() if type(m) in MASKED.values()]
    linears = [n for n in masked if isinstance(net.get_submodule(n), nn.Linear)]
    assert len(linears) == hf_models.linear_count(model)  # Conv1D counted as linear too
    assert rep.passes[0].fired == len(masked)
    with torch.no_grad():
        assert close(net(**kwargs), model(**kwargs)) == 0.0
        # the default export is dynamic in batch and sequence length (ViT: batch only)
        bigger = {
            k: torch.cat([v, v[:1]]) if k == "pixel_values" else torch.cat([v, v[:1]])[:, :5]
            for k, v in kwargs.items()
        }
        assert close(net(**bigger), model(**bigger)) < 1e-5
    assert not is_hf_model(net) and is_hf_model(model)


def test_lifted_models_keep_names_and_outputs(lifted) -> None:
    for name, (model, kwargs, gm, inputs) in lifted.items():
        own = set(model.state_dict())
        assert set(gm.state_dict()) <= own, name  # names unchanged (unused buffers dropped)
        with torch.no_grad():
            assert close(gm(*inputs), model(**kwargs)) == 0.0, name
    assert lifted["gpt2"][2].meta["rewriter_linearized"] == [
        f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                 "mlp.c_proj")
    ]


def test_lifted_graph_switches_dropout_between_train_and_eval(lifted) -> None:
    model, kwargs, gm, inputs = lifted["bert"]
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 5 and not any(m.training for m in dropouts)
    gm.train()
    try:
        torch.manual_seed(0)
        a = gm(*inputs)["last_hidden_state"]
        b = gm(*inputs)["last_hidden_state"]
        assert not torch.equal(a, b)  # dropout is live in training mode
    finally:
        gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(*inputs)["last_hidden_state"], gm(*inputs)["last_hidden_state"])


def test_frontend_option_and_errors(lifted) -> None:
    with pytest.raises(OptionError, match="unknown front end 'jit'"):
        rw.rewrite(nn.Linear(2, 2), [], torch.randn(1, 2), frontend="jit")
    with pytest.raises(RewriterError, match="needs example inputs"):
        build_graph(nn.Linear(2, 2), None, frontend="export")
    with pytest.raises(RewriterError, match="Hugging Face model: .* needs example inputs"):
        rw.rewrite(lifted["vit"][0], ["masks"])
    with pytest.raises(RewriterError, match="string keys"):
        split_inputs({0: torch.zeros(1)})
    with pytest.raises(RewriterError, match="takes tensors only"):
        export_graph(nn.Linear(2, 2), (), {"input": 3})
    # a plain model: auto traces with fx; export gives the same outputs
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    fx_net = rw.rewrite(net, ["masks"], x)
    ex_net = rw.rewrite(net, ["masks"], {"input": x}, frontend="export")
    assert rw.report(fx_net).frontend == "fx" and rw.report(ex_net).frontend == "export"
    assert torch.equal(fx_net(x), ex_net(x))
    assert rw.report(ex_net).passes[0].fired == rw.report(fx_net).passes[0].fired == 2
    # keyword inputs on the fx path bind to forward's parameters; a rewrite continues with them
    kw_net = rw.rewrite(net, ["masks"], {"input": x})
    assert rw.report(kw_net).frontend == "fx" and torch.equal(kw_net(x), fx_net(x))
    more = rw.rewrite(kw_net, ["rbn"], {"input": x})
    assert [p.name for p in rw.report(more).passes] == ["masks", "rbn"]


def test_auto_falls_back_to_export_when_fx_fails_at_the_root() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(TraceError):
        rw.trace(hf_models.RootBranch())
    net = rw.rewrite(hf_models.RootBranch(), ["masks"], x)
    assert rw.report(net).frontend == "export" and rw.report(net).passes[0].fired == 1
    with pytest.raises(TraceError):
        rw.rewrite(hf_models.RootBranch(), ["masks"], x, frontend="fx")


def test_frontend_in_pipeline_files_and_on_the_command_line(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from rewriter import pipeline as pl
    from rewriter.cli import cli

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    table = {"model": {"source": "hf_models:root_branch", "frontend": "export"}, "pass": []}
    assert pl.validate(table).frontend == "export"
    assert pl.validate({"model": {"source": "hf_models:root_branch"}}).frontend == "auto"
    with pytest.raises(pl.PipelineError, match=r"model.frontend.*\"auto\", \"fx\" or \"export\""):
        pl.validate({"model": {"source": "hf_models:root_branch", "frontend": "jit"}})

    def apply(*extra: str) -> object:
        args = ["apply", "hf_models:root_branch", "--pass", "masks", "--input-shape", "4",
                "--batch", "3", "-o", str(tmp_path / f"out{len(extra)}.safetensors"), *extra]
        return CliRunner().invoke(cli, args)  # fmt: skip

    refused = apply("--frontend", "fx")
    assert refused.exit_code == 2 and "cannot trace RootBranch.forward" in refused.output
    done = apply()  # auto: fx fails at the root, so export
    assert done.exit_code == 0, done.output
    assert "front end: export" in done.output
    assert apply("--frontend", "export", "--force").exit_code == 0


# -- heads, GQA groups and MLP channels ---------------------------------------------------------


def attention_layers(name: str) -> list[dict[str, str]]:
    """Per layer: the q, k, v, o projections and the MLP's input/output layers by role."""
    if name == "bert":
        p = "encoder.layer.{i}."
        names = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                     o="attention.output.dense", up="intermediate.dense", down="output.dense")
    elif name == "gpt2":
        p = "h.{i}."
        names = dict(q="attn.c_attn", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj")
    elif name == "llama":
        p = "layers.{i}."
        names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                     o="self_attn.o_proj", up="mlp.up_proj", gate="mlp.gate_proj",
                     down="mlp.down_proj")
    else:
        p = "layers.{i}."
        names = dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                     o="attention.o_proj", up="mlp.fc1", down="mlp.fc2")
    return [{k: p.format(i=i) + v for k, v in names.items()} for i in range(hf_models.LAYERS)]


@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_channel_groups_list_heads_and_mlp_channels(lifted, name: str) -> None:
    model, kwargs, gm, inputs = lifted[name]
    analysis = rw.analysis.channels.channel_groups(gm, inputs)
    units = hf_models.KV_HEADS if name == "llama" else hf_models.HEADS  # GQA: whole kv groups
    for layer in attention_layers(name):
        heads = analysis.group_of(layer["o"], "in")
        assert heads.prunable and heads.size == units
        assert heads.layers_in() == [layer["o"]]
        producers = [layer[r] for r in ("q", "k", "v") if r in layer]
        assert heads.layers_out() == producers
        per_unit = 64 // units
        assert heads.members_of(layer["o"], "in")[0].span == per_unit
        mlp = analysis.group_of(layer["down"], "in")
        assert mlp.prunable and mlp.size == hf_models.MLP
        assert mlp.layers_out() == [layer[r] for r in ("gate", "up") if r in layer]
    assert len(analysis.prunable()) == 2 * hf_models.LAYERS
    residual = analysis.group_of(attention_layers(name)[0]["o"], "out")
    assert not residual.prunable
    norm = "RMSNorm statistics" if name == "llama" else "LayerNorm"
    assert norm in residual.reason


def half_of_every_group(analysis) -> dict[int, range]:
    return {g.id: range(g.size // 2) for g in analysis.prunable()}


@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_slim_half_the_heads_and_mlp_is_exact_against_the_masked_dense_model(
    lifted, name: str
) -> None:
    model, kwargs, gm, inputs = lifted[name]
    analysis = rw.analysis.channels.channel_groups(gm, inputs)
    drops = half_of_every_group(analysis)
    masked = rw.mask_channels(copy.deepcopy(gm), analysis, drops)
    small = rw.slim(gm, inputs, rw.group_masks(analysis, drops))
    with torch.no_grad():
        dense, masked_out, small_out = gm(*inputs), masked(*inputs), small(*inputs)
    assert close(small_out, masked_out) < 1e-5
    assert close(masked_out, dense) > 1e-3  # the masks did change the function
    for layer in attention_layers(name):
        o = small.get_submodule(layer["o"])
        assert o.in_features == 32  # half of the 4 heads of 16 channels
        assert small.get_submodule(layer["down"]).in_features == hf_models.MLP // 2
        if "k" in layer:
            kv = small.get_submodule(layer["k"]).out_features
            assert kv == (16 if name == "llama" else 32)
            assert (o.in_features // 16) % (kv // 16) == 0
        else:  # GPT-2's packed qkv: three pieces of 32, the split sizes rewritten
            assert small.get_submodule(layer["q"]).out_features == 96
    before = sum(p.numel() for p in gm.parameters())
    after = sum(p.numel() for p in small.parameters())
    per_layer = 4 * 32 * 64 - (32 * 3 if name != "llama" else 0)  # q, k, v, o (+ biases)
    assert after < before - hf_models.LAYERS * per_layer // 2


def halved_channels(gm: torch.fx.GraphModule, name: str) -> dict[str, float]:
    """``channel_keep`` of removing half the heads and half of every MLP: 0.5 on the q, k, v
    (and MLP input) projections and on every node between them and the o (down) projection,
    whose input fraction then follows from the flow."""
    import networkx as nx

    from rewriter.analysis.view import graph

    view = graph(gm)
    node = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
    keep = {}
    for layer in attention_layers(name):
        for producers, consumer in (("q", "k", "v"), "o"), (("gate", "up"), "down"):
            end = node[layer[consumer]]
            for role in (r for r in producers if r in layer):
                start = node[layer[role]]
                for n in {start} | (nx.descendants(view, start) & nx.ancestors(view, end)):
                    keep[n] = 0.5
    return keep


@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_flops_count_attention_per_head_and_follow_slimming(lifted, name: str) -> None:
    model, kwargs, gm, inputs = lifted[name]
    analysis = rw.analysis.channels.channel_groups(gm, inputs)
    small = rw.slim(gm, inputs, rw.group_masks(analysis, half_of_every_group(analysis)))
    dense_report, small_report = flops(gm, inputs), flops(small, inputs)
    # the prediction before slimming, from the channel selection, is exactly the slim cost
    predicted = flops(gm, inputs, channel_keep=halved_channels(gm, name))
    assert predicted.expected_macs == small_report.total_macs
    assert predicted.total_macs == dense_report.total_macs
    tokens = (16 // 4) ** 2 + 1 if name == "vit" else hf_models.SEQ  # ViT: patches + class
    b, s, d = hf_models.BATCH, tokens, 16

    def attention(report) -> list[int]:
        return [r.macs for r in report.rows if r.kind == "attention"]

    def expected(heads: int) -> int:  # Q K^T and A V per query head, then the softmax
        return b * heads * s * s * (d + d) + SOFTMAX_MACS * b * heads * s * s

    assert attention(dense_report) == [expected(4)] * hf_models.LAYERS
    assert attention(small_report) == [expected(2)] * hf_models.LAYERS
    linear = [sum(r.macs for r in rep.rows if r.kind == "linear")
              for rep in (dense_report, small_report)]  # fmt: skip
    # every linear of the blocks loses half its rows or columns; biases of the o and down
    # projections (64 outputs each; Llama has none) stay whole; BERT's pooler is untouched
    kept_biases = 0 if name == "llama" else b * s * 64 * 2 * hf_models.LAYERS
    pooler = b * 64 * 64 + b * 64 if name == "bert" else 0
    assert (linear[1] - pooler) * 2 == linear[0] - pooler + kept_biases
    assert small_report.total_macs < 0.55 * dense_report.total_macs


# -- grouped-query attention: slimming never unbalances the kv groups ---------------------------


class TinyGQA(nn.Module):
    """8 query heads sharing 2 kv heads through ``enable_gqa``; fx traces it."""

    def __init__(self, dim: int = 16, heads: int = 8, kv_heads: int = 2, head_dim: int = 4) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.size(0), x.size(1)
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.norm(x + self.o(a.transpose(1, 2).reshape(b, s, -1)))


def test_gqa_before_expected_groups_and_fixed_head_counts() -> None:
    gm = rw.trace(TinyGQA())
    x = torch.randn(2, 5, 16)
    analysis = rw.analysis.channels.channel_groups(gm, (x,))
    heads = analysis.group_of("o", "in")
    # Expected: one unit per kv group = kv head (4 channels of k and v) + 4 query heads
    assert heads.prunable and heads.size == 2
    assert [(m.layer, m.role, m.indices, m.span) for m in heads.members] == [
        ("q", "out", (0, 16), 16), ("k", "out", (0, 4), 4), ("v", "out", (0, 4), 4),
        ("o", "in", (0, 16), 16),
    ]  # fmt: skip
    assert analysis.prunable() == [heads]

    mqa = rw.analysis.channels.channel_groups(rw.trace(TinyGQA(kv_heads=1)), (x,))
    assert mqa.group_of("o", "in").size == 1  # multi-query: all 8 heads are one unit
    assert mqa.group_of("k").members_of("q", "out")[0].span == 32

    class Fixed(TinyGQA):  # the head count written as a number (slim rewrites it)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x).view(2, 5, 8, 4)
            return q.sum()

    fixed = rw.analysis.channels.channel_groups(rw.trace(Fixed()), (x,))
    assert fixed.group_of("q").size == 8  # the number 8 is followed: slim rewrites it
    assert [(s.node, s.kind, s.dim) for s in fixed.slices] == [("view", "size", 2)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keep=st.lists(st.booleans(), min_size=8, max_size=8))
def test_gqa_slimming_keeps_query_heads_a_multiple_of_kv_heads(keep: list[bool]) -> None:
    torch.manual_seed(0)
    gm = rw.trace(TinyGQA())
    x = torch.randn(2, 5, 16)
    head_mask = torch.tensor(keep).repeat_interleave(4)  # a random mask over query heads
    small = rw.slim(gm, (x,), {"q": head_mask})
    q_heads = small.q.out_features // 4
    kv_heads = small.k.out_features // 4
    assert kv_heads == small.v.out_features // 4 >= 1
    assert q_heads == 4 * kv_heads  # whole kv groups go, each keeps its 4 query heads
    # a kv group goes exactly when all its query heads are dropped (one is always kept)
    dropped = [not any(keep[g * 4 : g * 4 + 4]) for g in range(2)]
    assert kv_heads == (2 - sum(dropped) if not all(dropped) else 1)
    analysis = rw.analysis.channels.channel_groups(gm, (x,))
    gone = [1] if all(dropped) else [g for g in range(2) if dropped[g]]  # slim keeps group 0
    masked = rw.mask_channels(copy.deepcopy(gm), analysis, {analysis.group_of("o", "in").id: gone})
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drop=st.lists(st.sets(st.integers(0, hf_models.KV_HEADS - 1)), min_size=2, max_size=2))
def test_gqa_llama_random_kv_group_drops_are_exact(lifted, drop: list[set[int]]) -> None:
    model, kwargs, gm, inputs = lifted["llama"]
    analysis = rw.analysis.channels.channel_groups(gm, inputs)
    groups = [analysis.group_of(layer["o"], "in").id for layer in attention_layers("llama")]
    drops = {gid: sorted(d) if len(d) < hf_models.KV_HEADS else [1] for gid, d in
             zip(groups, drop, strict=True)}  # fmt: skip
    small = rw.slim(gm, inputs, rw.group_masks(analysis, drops))
    masked = rw.mask_channels(copy.deepcopy(gm), analysis, drops)
    for layer, d in zip(attention_layers("llama"), drops.values(), strict=True):
        q = small.get_submodule(layer["q"]).out_features // 16
        kv = small.get_submodule(layer["k"]).out_features // 16
        assert kv == hf_models.KV_HEADS - len(d) and q == 2 * kv
    with torch.no_grad():
        assert close(small(*inputs), masked(*inputs)) < 1e-5


# -- save and load ------------------------------------------------------------------------------


def test_slim_llama_round_trips_through_save_and_load(lifted, tmp_path) -> None:
    _, _, gm, inputs = lifted["llama"]
    net = rw.rewrite(gm, ["masks"], inputs)
    analysis = rw.analysis.channels.channel_groups(net, inputs)
    small = rw.slim(net, inputs, rw.group_masks(analysis, half_of_every_group(analysis)))
    path = rw.save(small, tmp_path / "llama.safetensors", source="hf_models:llama")
    loaded = rw.load(path).eval()
    assert loaded.get_submodule("layers.0.self_attn.k_proj").out_features == 16
    with torch.no_grad():
        assert close(loaded(*inputs), small(*inputs)) == 0.0


@pytest.mark.slow
def test_slim_models_round_trip_through_save_and_load_in_a_fresh_process(lifted, tmp_path) -> None:
    expected = {}
    for name, (_, _, gm, inputs) in lifted.items():
        net = rw.rewrite(gm, ["masks"], inputs)
        analysis = rw.analysis.channels.channel_groups(net, inputs)
        small = rw.slim(net, inputs, rw.group_masks(analysis, half_of_every_group(analysis)))
        rw.save(small, tmp_path / f"{name}.safetensors", source=f"hf_models:{name}")
        with torch.no_grad():
            expected[name] = (inputs, small(*inputs))
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import torch, rewriter as rw
expected = torch.load({str(tmp_path / "expected.pt")!r})
for name, (inputs, ref) in expected.items():
    gm = rw.load({str(tmp_path)!r} + f"/{{name}}.safetensors").eval()
    with torch.no_grad():
        out = gm(*inputs)
    assert set(out) == set(ref), name
    print(name, max((out[k] - ref[k]).abs().max().item() for k in ref))
"""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split() for line in run.stdout.strip().splitlines())
    assert lines == {name: "0.0" for name in hf_models.BUILDERS}


# -- training and compiling ---------------------------------------------------------------------


@pytest.mark.slow
def test_rewritten_hf_decoder_trains_under_compile_fullgraph() -> None:
    model, kwargs = hf_models.llama()
    net = rw.rewrite(model, ["masks"], kwargs)
    net.train()
    head = nn.Linear(hf_models.HIDDEN, hf_models.VOCAB)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    params = [p for p in net.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = kwargs["input_ids"]
    losses = []
    for _ in range(8):
        hidden = compiled(**kwargs)["last_hidden_state"]
        loss = nn.functional.cross_entropy(head(hidden[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_rewritten_bert_compiles_with_inductor_and_matches_eager() -> None:
    model, kwargs = hf_models.bert()
    net = rw.rewrite(model, ["masks"], kwargs).eval()
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        assert close(compiled(**kwargs), net(**kwargs)) < 1e-4


@pytest.mark.slow
def test_char_decoder_example_runs_and_prunes_half(tmp_path) -> None:
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "examples" / "char_decoder.py"
    run = subprocess.run(
        [sys.executable, str(script), "--steps", "20", "--finetune", "5"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "query heads per layer [2, 2], kv heads [1, 1]" in out and "MLP [64, 64]" in out
    summary = (tmp_path / "out" / "char_decoder.txt").read_text().splitlines()  # not recorded
    assert summary[-4:] == out.splitlines()[-4:] and not any("trained" in s for s in summary)
    rows = {line[:20].strip(): line[20:].split() for line in out.splitlines()[-3:]}
    assert set(rows) == {"dense", "pruned", "pruned + fine-tuned"}
    dense_params, small_params = (int(rows[k][1].replace(",", "")) for k in ("dense", "pruned"))
    assert small_params < 0.6 * dense_params
    assert rows["pruned"][1:] == rows["pruned + fine-tuned"][1:]  # fine-tuning keeps the shape


@pytest.mark.parametrize("name", ["bert", "llama", "vit"])
def test_residual_blocks_of_pre_and_post_norm_transformers(lifted, name: str) -> None:
    """Both residual adds of every layer are blocks, although attention reads side inputs
    (the attention mask, rotary tables) that move the adds' dominators above the stream."""
    _, _, gm, inputs = lifted[name]
    net = rw.rewrite(gm, ["skip_gates"], inputs)
    blocks = rw.analysis.blocks.residual_blocks(rw.rewrite(gm, [], inputs))
    assert len(blocks) == 2 * hf_models.LAYERS and all(b.kind == "identity" for b in blocks)
    for i, layer in enumerate(attention_layers(name)):  # attention block, then MLP block
        attention, mlp = blocks[2 * i].branch, blocks[2 * i + 1].branch
        assert layer["o"].replace(".", "_") in attention and layer["o"].replace(".", "_") not in mlp
        assert layer["down"].replace(".", "_") in mlp
    assert rw.report(net).passes[0].fired == 2 * hf_models.LAYERS


# -- distributed --------------------------------------------------------------------------------


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: FSDP2-shard the rewritten tiny Llama and train it on own data."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, kwargs = hf_models.llama()
        net = rw.rewrite(model, ["masks"], kwargs)
        fully_shard(net)
        sharded = all(isinstance(p, DTensor) for p in net.parameters())
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        ids = torch.randint(0, hf_models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(rank))
        losses = []
        for _ in range(4):
            hidden = net(input_ids=ids, attention_mask=kwargs["attention_mask"])["last_hidden_state"]
            loss = hidden.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in net.state_dict().items()}
        torch.save({"losses": losses, "sharded": sharded, "state": state}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rewritten_decoder_trains_under_fsdp2_on_two_cpu_processes(tmp_path) -> None:
    """FSDP2 (``fully_shard``) works on CPU with gloo in this torch: no DDP fallback needed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["sharded"]
        assert rank["losses"][-1] < rank["losses"][0]
    assert ranks[0]["losses"][0] != ranks[1]["losses"][0]  # different data on each rank
    for key, value in ranks[0]["state"].items():  # gradients were averaged: one model
        torch.testing.assert_close(value, ranks[1]["state"][key], rtol=0, atol=0)


def test_slim_llama_as_a_hugging_face_folder(lifted, tmp_path) -> None:
    from transformers import LlamaModel

    from rewriter.frontends import save_hf_folder

    model, kwargs, gm, inputs = lifted["llama"]
    net = rw.rewrite(gm, ["masks"], inputs)
    analysis = rw.analysis.channels.channel_groups(net, inputs)
    small = rw.slim(net, inputs, rw.group_masks(analysis, half_of_every_group(analysis)))
    folder = save_hf_folder(small, model, tmp_path / "slim")
    back = LlamaModel.from_pretrained(folder).eval()  # plain transformers, no rewriter
    assert (back.config.num_attention_heads, back.config.num_key_value_heads) == (2, 1)
    assert back.config.intermediate_size == hf_models.MLP // 2
    with torch.no_grad():
        assert close({"last_hidden_state": back(**kwargs).last_hidden_state}, small(*inputs)) == 0.0
    uneven = rw.slim(net, inputs, rw.group_masks(analysis, {analysis.prunable()[0].id: [1]}))
    with pytest.raises(RewriterError, match="same width in every layer"):
        save_hf_folder(uneven, model, tmp_path / "uneven")
    with pytest.raises(RewriterError, match="Llama-family"):
        save_hf_folder(small, lifted["bert"][0], tmp_path / "bert")


# -- every seed pass on transformer blocks -------------------------------------------------------


def layer_counts(name: str, model: nn.Module) -> dict[str, int]:
    """What the passes should find, from the config: transformer layers, masked layers, MLPs,
    residual blocks. Per layer: 4 attention projections (GPT-2 packs q, k, v into one
    ``c_attn``: 2), 2 MLP layers (SwiGLU: gate, up, down); BERT's pooler and ViT's patch
    convolution are one more layer each."""
    config = model.config
    layers = config.num_hidden_layers
    attention = 2 if name == "gpt2" else 4
    swiglu = getattr(config, "hidden_act", None) == "silu" and hasattr(config, "mlp_bias")
    mlp = 3 if swiglu else 2
    extra = {"bert": 1, "vit": 1}.get(name, 0)  # pooler dense / patch embedding conv
    # GPT-2's tanh-GELU ("gelu_new") is written out: x + 0.044715 x^3 is an identity block too
    gelu_blocks = layers if getattr(config, "activation_function", "") == "gelu_new" else 0
    return {
        "layers": layers,
        "masked": layers * (attention + mlp) + extra,
        "mlps": layers,
        "blocks": 2 * layers + gelu_blocks,
    }


def hidden_of(out) -> torch.Tensor:
    return out["last_hidden_state"] if isinstance(out, dict) else out


def token_loss(out, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the hidden states read as per-token logits over the hidden size."""
    return nn.functional.cross_entropy(hidden_of(out).reshape(target.numel(), -1), target)


def token_targets(inputs: tuple, seed: int = 1) -> torch.Tensor:
    tokens = hf_models.BATCH * (17 if inputs[0].is_floating_point() else hf_models.SEQ)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hf_models.HIDDEN, (tokens,), generator=g)


def seed_passes(name: str, model: nn.Module, gm, inputs) -> dict[str, tuple]:
    """pass id -> (pass spec, expected fired count, graph to rewrite)."""
    from rewriter.passes.distill import Distill
    from rewriter.passes.lottery_passes import GraSP, Snip

    n = layer_counts(name, model)
    data = [(inputs, token_targets(inputs))]
    return {
        "masks": ("masks", n["masked"], gm),
        "magnitude": (("magnitude", {"density": 0.5}), 2 * n["masked"], gm),  # mask + prune
        "snip": (Snip.with_data(data, token_loss, density=0.5), 2 * n["masked"], gm),
        "grasp": (GraSP.with_data(data, token_loss, density=0.5), 2 * n["masked"], gm),
        "synflow": (("synflow", {"density": 0.5, "iterations": 5}), 2 * n["masked"], gm),
        "split_wels": (("split", {"mode": "wels"}), n["masked"], gm),
        "split_kels": (("split", {"mode": "kels"}), n["masked"], gm),
        "saliency_gates": ("saliency_gates", n["mlps"], gm),
        "skip_gates": ("skip_gates", n["blocks"], gm),
        # plain distill on the HF dict output: the hidden states read as per-token logits
        # (B, S, hidden), classes last (class_dim -1, the default for a dict output)
        "distill": (Distill.with_teacher(gm, logits_key="last_hidden_state"), 1, gm),
    }


PASS_IDS = ["masks", "magnitude", "snip", "grasp", "synflow", "split_wels", "split_kels",
            "saliency_gates", "skip_gates", "distill"]  # fmt: skip


@pytest.mark.parametrize("pass_id", PASS_IDS)  # all 40 cost about 8 s on one thread
@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_every_seed_pass_on_transformer_blocks(lifted, name: str, pass_id: str) -> None:
    model, kwargs, gm, inputs = lifted[name]
    spec, expected, graph = seed_passes(name, model, gm, inputs)[pass_id]
    counts = layer_counts(name, model)
    assert counts["masked"] == hf_models.linear_count(model) + (name == "vit")  # + patch conv
    net = rw.rewrite(graph, [spec], inputs)
    record = rw.report(net).passes[0]
    assert record.fired == expected, (record.fired, record.notes)
    if rw.make_pass(spec).preserves_outputs:
        with torch.no_grad():
            assert torch.equal(hidden_of(net(*inputs)), hidden_of(graph(*inputs)))
    if pass_id in ("magnitude", "snip", "grasp", "synflow"):
        masks = rw.passes.masks.get_masks(net)
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)
    if pass_id == "split_kels":  # the fit part is whole heads (kv groups) and MLP channels
        layer = attention_layers(name)[0]
        units = hf_models.KV_HEADS if name == "llama" else hf_models.HEADS
        per_unit = hf_models.HIDDEN // units
        o_cols = net.get_submodule(layer["o"]).fit_mask.any(0)
        assert int(o_cols.sum()) == (units // 2) * per_unit
        assert torch.equal(o_cols, torch.arange(hf_models.HIDDEN) < (units // 2) * per_unit)
        down = net.get_submodule(layer["down"]).fit_mask.any(0)
        up = net.get_submodule(layer["up"]).fit_mask.any(1)
        assert int(down.sum()) == hf_models.MLP // 2 and torch.equal(up, down)
    # one training step: the loss is finite and the gradients reach the new parameters
    net.train()
    target = token_targets(inputs)
    out = net(*inputs)
    loss = token_loss(out, target)
    if isinstance(out, dict) and "pooler_output" in out:  # BERT's pooler trains too
        loss = loss + out["pooler_output"].pow(2).mean()
    if any(callable(getattr(m, "aux_loss", None)) for m in net.modules()):
        extra = {"targets": target.view(hidden_of(out).shape[:-1])} if pass_id == "distill" else {}
        loss = loss + rw.aux_losses(net, **extra)
    loss.backward()
    assert torch.isfinite(loss)
    added = [p for m in record.modules_added for p in net.get_submodule(m).parameters()]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in added)
    if added:
        assert any(p.grad.abs().sum() > 0 for p in added)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    assert all(m.weight.grad is not None for m in linears)
    assert sum(m.weight.grad.abs().sum() for m in linears) > 0
    for m in linears:  # a pruned weight gets no gradient (global SNIP may prune whole layers)
        if hasattr(m, "weight_mask"):
            assert not m.weight.grad[m.weight_mask == 0].any()


# -- saliency gates on the MLPs ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_saliency_gates_sit_between_each_mlp_activation_and_its_down_projection(
    lifted, name: str
) -> None:
    from rewriter.passes.saliency import ManiDPGate, gates

    model, kwargs, gm, inputs = lifted[name]
    plain = rw.rewrite(gm, [], inputs)
    net = rw.rewrite(gm, ["saliency_gates"], inputs)
    assert rw.report(net).passes[0].fired == layer_counts(name, model)["mlps"]
    assert len(net.graph.nodes) == len(plain.graph.nodes) + hf_models.LAYERS  # only the gates
    for layer in attention_layers(name):
        down = layer["down"].replace(".", "_")
        # Before: down(h), h = act(up(x)) (SwiGLU: act(gate(x)) * up(x)); Expected: down(g(h, x))
        hidden = next(n for n in plain.graph.nodes if n.target == layer["down"]).args[0]
        gated = next(n for n in net.graph.nodes if n.target == layer["down"])
        gate = gated.args[0]
        assert gate.op == "call_module" and gate.target == f"{down}_gate" and gate.users == {
            gated: None}  # fmt: skip
        h, x = gate.args
        assert h.target == hidden.target and len(h.args) == len(hidden.args)
        up = next(n for n in net.graph.nodes if n.target == layer["up"])
        assert x is up.args[0]  # the MLP's input (the normed residual stream)
        assert up in h.args or any(up in a.args for a in h.args if isinstance(a, torch.fx.Node))
        module = net.get_submodule(gate.target)
        assert isinstance(module, ManiDPGate) and module.channels_last
        assert (module.in_channels, module.out_channels) == (hf_models.HIDDEN, hf_models.MLP)
        assert module.layer == layer["down"]
    assert len(gates(net)) == hf_models.LAYERS  # attention projections are not gated
    # identity at insertion, in eval and in training mode (same dropout draws)
    with torch.no_grad():
        assert torch.equal(hidden_of(net(*inputs)), hidden_of(gm(*inputs)))
        net.train(), gm.train()
        try:
            torch.manual_seed(3)
            gated = hidden_of(net(*inputs))
            torch.manual_seed(3)
            assert torch.equal(gated, hidden_of(gm(*inputs)))
        finally:
            net.eval(), gm.eval()
    again = rw.rewrite(net, ["saliency_gates"], inputs)  # running twice is a no-op
    assert rw.report(again).passes[-1].fired == 0


def test_mlp_gates_cut_the_mlp_macs_each_sample_executes(lifted) -> None:
    """FBS keeping the top half of every MLP's channels per sample: the gated MLP layers
    (gate, up, SiLU, the product, down) run half their MACs, as the config predicts."""
    from rewriter.passes.saliency import dynamic_flops

    model, kwargs, gm, inputs = lifted["llama"]
    net = rw.rewrite(gm, [("saliency_gates", {"style": "fbs", "keep": 0.5})], inputs)
    result = dynamic_flops(net, inputs)
    s, h, m = hf_models.SEQ, hf_models.HIDDEN, hf_models.MLP
    mlp = s * (3 * h * m + 2 * m)  # gate, up, down (no biases), SiLU, product; per sample
    assert result.dense == flops(rw.rewrite(gm, [], inputs), inputs).total_macs / hf_models.BATCH
    torch.testing.assert_close(
        result.per_sample,
        torch.full((hf_models.BATCH,), result.dense - hf_models.LAYERS * mlp / 2 + result.gate_macs,
                   dtype=torch.float64),
        rtol=0, atol=1e-6,
    )  # fmt: skip


def test_saliency_gated_llama_round_trips_through_save_and_load(lifted, tmp_path) -> None:
    _, _, gm, inputs = lifted["llama"]
    net = rw.rewrite(gm, [("saliency_gates", {"style": "fbs", "keep": 0.5})], inputs)
    loaded = rw.load(rw.save(net, tmp_path / "gated.safetensors", source="hf_models:llama"))
    gate = loaded.eval().get_submodule("layers_0_mlp_down_proj_gate")
    assert gate.channels_last and gate.k == hf_models.MLP // 2
    with torch.no_grad():
        out = hidden_of(loaded(*inputs))
        assert torch.equal(out, hidden_of(net(*inputs)))
        assert not torch.equal(out, hidden_of(gm(*inputs)))  # top-half gates change outputs


@pytest.mark.slow
def test_saliency_gated_llama_trains_under_compile_fullgraph(lifted) -> None:
    from rewriter.passes.saliency import aux_losses

    _, _, gm, inputs = lifted["llama"]
    net = rw.rewrite(gm, ["saliency_gates"], inputs).train()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    target = token_targets(inputs)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = token_loss(compiled(*inputs), target) + aux_losses(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    fc2 = net.get_submodule("layers_0_mlp_down_proj_gate").fc2.weight
    assert fc2.abs().sum() > 0  # the gate learned to depart from the identity


# -- SynFlow's all-ones input has the example batch ---------------------------------------------


class FixedBatchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))


def test_synflow_runs_on_a_program_exported_with_a_fixed_batch() -> None:
    from rewriter.passes.masks import get_masks

    torch.manual_seed(0)
    model, x = FixedBatchNet(), torch.randn(3, 3, 8, 8)
    gm, inputs = export_graph(model, (x,), {}, dynamic=False)  # view(3, -1) in the program
    spec = ("synflow", {"density": 0.3, "iterations": 4})
    exported = rw.rewrite(gm, [spec], inputs)
    traced = rw.rewrite(model, [spec], x[:1])  # fx, batch of one: the paper's input
    assert rw.report(exported).passes[0].fired == 4
    for key, mask in get_masks(traced).items():
        assert torch.equal(get_masks(exported)[key], mask), key


def test_synflow_masks_do_not_depend_on_the_example_batch() -> None:
    from rewriter.passes.masks import get_masks

    model = rw.zoo.create("resnet8")
    spec = ("synflow", {"density": 0.1, "iterations": 10})
    one = rw.rewrite(model, [spec], rw.zoo.example_inputs("resnet8", batch=1))
    five = rw.rewrite(model, [spec], rw.zoo.example_inputs("resnet8", batch=5))
    masks = get_masks(one)
    assert len(masks) == 10 and sum(int(m.sum()) for m in masks.values()) > 0
    for key, mask in masks.items():
        assert torch.equal(get_masks(five)[key], mask), key


def test_synflow_scores_in_float64_unless_the_graph_cannot_run_in_it(lifted) -> None:
    from rewriter.passes.lottery_scores import pins_float_dtype, synflow_scores

    pinned = {name: pins_float_dtype(rw.rewrite(gm, [], inputs))
              for name, (_, _, gm, inputs) in lifted.items()}  # fmt: skip
    # lifting drops export's float32 asserts; GPT-2's and Llama's casts do not pin
    assert pinned == {"bert": False, "gpt2": False, "llama": False, "vit": False}

    class Creates(nn.Module):  # a dtype on a creation op promotes: float64 still works
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + torch.zeros(2, dtype=torch.float32)

    class Casts(Creates):  # .float() meets float64 weights: a float64 run fails
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.float())

    x = torch.randn(2, 3)
    creates, casts = (rw.rewrite(m(), ["masks"], x) for m in (Creates, Casts))
    assert not pins_float_dtype(creates) and not pins_float_dtype(casts)
    for gm, dtype in ((creates, torch.float64), (casts, torch.float32)):
        scores = synflow_scores(gm)  # runs (Casts in float32) and scores every weight
        assert scores["fc"].dtype == dtype
        assert scores["fc"].shape == (2, 3) and bool((scores["fc"] > 0).all())
