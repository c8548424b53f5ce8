"""Lifting torch.export programs back to module-level GraphModules, and safe .pt2 loading."""

from __future__ import annotations

import copy
import io as bytes_io
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import rewriter
from rewriter import zoo
from rewriter.errors import ArtifactError
from rewriter.lift import (
    LiftError,
    example_inputs,
    lift,
    lift_report,
    load_pt2,
    materialise_state,
    overlapping,
)

# The default run lifts one model of each family; the slow run lifts the whole zoo.
SLOW_EXPORTS = {"resnet20", "mobilenetv2", "bottleneck_resnet", "multitask_resnet"}


def export(model: nn.Module, *inputs: Tensor, **kwargs) -> torch.export.ExportedProgram:
    return torch.export.export(model, inputs, **kwargs)


def outputs_equal(a, b) -> bool:
    flat_a, spec_a = torch.utils._pytree.tree_flatten(a)
    flat_b, spec_b = torch.utils._pytree.tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def fired(gm: nn.Module) -> list[tuple[str, int]]:
    return [(p.name, p.fired) for p in rewriter.report(gm).passes]


# -- the zoo ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORTS else n for n in zoo.names()],
)
def test_zoo_models_lift_exactly_and_every_pass_applies(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.create(name).eval()
    x = zoo.example_inputs(name)
    gm = lift(export(model, *x))

    assert lift_report(gm).kept == []  # every conv, norm and linear became a module
    assert list(gm.state_dict()) == [k for k in model.state_dict() if k in gm.state_dict()]
    assert set(gm.state_dict()) == set(model.state_dict())  # state-dict names unchanged
    expected = {n: type(m) for n, m in model.named_modules() if isinstance(m, _LAYERS)}
    assert {n: type(gm.get_submodule(n)) for n in expected} == expected
    with torch.no_grad():
        assert outputs_equal(gm(*x), model(*x))

    passes = ["masks", "rbn"]
    original = rewriter.rewrite(model, passes, x)
    lifted = rewriter.rewrite(gm, passes, x)
    assert fired(lifted) == fired(original)
    assert sum(n for _, n in fired(lifted)) > 0


_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm)


@pytest.mark.parametrize("name", ["digits_cnn", pytest.param("vit", marks=pytest.mark.slow)])
def test_decomposed_programs_lift_too(name: str) -> None:
    """run_decompositions() gives convolution, _native_batch_norm_legit_no_training,
    addmm with a permuted weight, native_layer_norm: all lifted, outputs identical."""
    model = zoo.create(name).eval()
    x = zoo.example_inputs(name)
    ep = export(model, *x).run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.convolution.default", "aten.addmm.default"} <= targets
    gm = lift(ep)
    counts = lift_report(gm).counts()
    assert counts["Linear"] == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert lift_report(gm).kept == []
    with torch.no_grad():
        assert outputs_equal(gm(*x), model(*x))


@pytest.mark.parametrize("decompose", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_train_mode_export_updates_running_statistics_like_the_model(decompose: bool) -> None:
    torch.manual_seed(0)
    model = zoo.create("digits_cnn", width=4).train()
    x = zoo.example_inputs("digits_cnn", batch=4, width=4)
    ep = export(copy.deepcopy(model), *x)
    if decompose:  # _native_batch_norm_legit_functional and buffer-mutation outputs
        ep = ep.run_decompositions()
    gm = lift(ep)
    assert gm.training and gm.get_submodule("stem.1").training
    assert lift_report(gm).counts()["BatchNorm2d"] == 4
    assert "num_batches_tracked" not in gm.code  # the modules count batches themselves
    for _ in range(2):
        assert torch.equal(gm(*x), model(*x))
    for key, value in model.state_dict().items():
        assert torch.equal(gm.state_dict()[key], value), key
    assert int(gm.state_dict()["stem.1.num_batches_tracked"]) == 2


# -- layer coverage ---------------------------------------------------------------------------


class Layers(nn.Module):
    """One of each lifted layer with non-default settings, dict output, two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.act = nn.ReLU6()
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.conv1d = nn.Conv1d(4, 4, 3, padding="same", bias=False)
        self.gelu = nn.GELU(approximate="tanh")
        self.ln = nn.LayerNorm(4, bias=False)
        self.emb = nn.Embedding(10, 4, padding_idx=0)
        self.flat = nn.Flatten(1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor, idx: Tensor) -> dict[str, Tensor]:
        h = self.avg(self.pool(self.gn(self.up(self.act(self.conv(x))))))
        s = self.conv1d(h.flatten(2)).transpose(1, 2)[:, :4]
        s = self.ln(self.gelu(s)) + self.emb(idx)
        return {"logits": self.head(self.drop(self.flat(s))), "tokens": s}


def test_every_layer_kind_is_rebuilt_with_its_settings() -> None:
    torch.manual_seed(0)
    model = Layers().eval()
    x, idx = torch.randn(2, 4, 9, 9), torch.randint(0, 10, (2, 4))
    gm = lift(export(model, x, idx))

    rep = lift_report(gm)
    assert rep.kept == []
    assert set(rep.modules) == {n for n, _ in model.named_children()}
    for name, module in model.named_children():
        assert repr(gm.get_submodule(name)) == repr(module), name
    assert "torch.flatten(" in gm.code and "torch.transpose(" in gm.code  # traced-style calls
    assert "aten.slice" in gm.code  # no torch-level twin: stays an aten call
    assert outputs_equal(gm(x, idx), model(x, idx))
    assert set(gm(x, idx)) == {"logits", "tokens"}


class Shared(nn.Module):
    """Layers that cannot become modules without changing names or sharing."""

    def __init__(self) -> None:
        super().__init__()
        self.tied = nn.Linear(4, 4)
        self.odd = nn.Module()
        self.odd.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.odd.scale = nn.Parameter(torch.ones(1))
        self.weight = nn.Parameter(torch.randn(2, 4))  # at the top level: no module name
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("offset", torch.full((4,), 0.5), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        self.count += 1  # a buffer update the lifted graph must keep
        h = self.tied(self.tied(x))  # one module called twice: weights shared
        h = F.conv2d(h[:, :, None, None], self.odd.weight) * self.odd.scale
        return F.linear(h.flatten(1) + self.offset, self.weight) + torch.tensor(1.0)


def test_layers_that_cannot_be_modules_stay_functions_with_reasons() -> None:
    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(3, 4)
    gm = lift(export(copy.deepcopy(model), x))

    kept = {node: why for node, _, why in lift_report(gm).kept}
    assert "shared parameter" in kept["linear"] and "shared parameter" in kept["linear_1"]
    assert "also holds state" in kept["conv2d"] and "odd.scale" in kept["conv2d"]
    assert "not named <module>.<attribute>" in kept["linear_2"]
    assert lift_report(gm).modules == {}
    assert torch.equal(gm(x), model(x))
    assert int(gm.count) == int(model.count) == 1  # the mutation was kept
    assert set(gm.state_dict()) == set(model.state_dict())  # `offset` stays non-persistent


def test_stateless_calls_become_modules_only_for_their_own_module() -> None:
    class Inline(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.relu(self.relu(self.fc(x))) + self.relu(x)  # F.relu is not the module

    model = Inline().eval()
    x = torch.randn(2, 3)
    gm = lift(export(model, x))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["fc", "relu", "relu"]  # the module, called twice under its name
    assert sum(n.target is torch.relu for n in gm.graph.nodes) == 1
    assert torch.equal(gm(x), model(x))


def test_nested_inputs_are_refused() -> None:
    class Pair(nn.Module):
        def forward(self, xs: tuple[Tensor, Tensor]) -> Tensor:
            return xs[0] + xs[1]

    ep = export(Pair(), (torch.ones(2), torch.ones(2)))
    with pytest.raises(LiftError, match="inputs are nested"):
        lift(ep)
    with pytest.raises(TypeError, match="ExportedProgram"):
        lift(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_example_inputs_are_the_stored_sample_or_random_of_the_right_shape() -> None:
    model = zoo.create("mlp").eval()
    x = zoo.example_inputs("mlp", batch=3)
    ep = export(model, *x)
    assert torch.equal(example_inputs(ep)[0], x[0])
    ep.example_inputs = None  # as in archives without sample inputs
    fallback = example_inputs(ep, seed=1)
    assert fallback[0].shape == x[0].shape and fallback[0].dtype == x[0].dtype
    assert torch.equal(fallback[0], example_inputs(ep, seed=1)[0])


# -- .pt2 files -------------------------------------------------------------------------------


class Evil:
    """Unpickling it creates the marker file: stands for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _saved(tmp_path: Path, model: nn.Module | None = None) -> Path:
    path = tmp_path / "mlp.pt2"
    model = model if model is not None else zoo.create("mlp").eval()
    torch.export.save(export(model, *zoo.example_inputs("mlp")), path)
    return path


def _edit_archive(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = edit(item.filename, zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)
    return dst


def test_load_pt2_round_trip(tmp_path: Path) -> None:
    model = zoo.create("mlp").eval()
    gm = lift(load_pt2(_saved(tmp_path, model)))
    x = torch.randn(5, *zoo.input_shape("mlp"))
    assert torch.equal(gm(x), model(x))


def test_pickled_sample_inputs_are_refused_without_being_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = bytes_io.BytesIO()
    torch.save(((Evil(marker),), {}), payload)

    def edit(name: str, data: bytes) -> bytes:
        return payload.getvalue() if "/data/sample_inputs/" in name else data

    evil = _edit_archive(_saved(tmp_path), tmp_path / "evil.pt2", edit)
    with pytest.raises(ArtifactError, match="refusing to load .*sample_inputs.*--trust-pickle"):
        load_pt2(evil)
    assert not marker.exists()

    # With the flag the check steps aside and torch.export.load takes over. Where torch
    # falls back to full unpickling the payload runs, which is what the check prevents; in
    # some environments torch's fallback itself fails, which must surface as ArtifactError.
    try:
        load_pt2(evil, trust_pickle=True)
    except ArtifactError as exc:
        assert "could not be loaded as a torch.export program" in str(exc)
    else:
        assert marker.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda name, data: (
                json.dumps(
                    {
                        "config": {
                            k: {**v, "use_pickle": True}
                            for k, v in json.loads(data)["config"].items()
                        }
                    }
                ).encode()
                if name.endswith("_weights_config.json")
                else data
            ),
            "holds pickled data",
        ),
        (lambda name, data: data, None),
    ],
)
def test_pickled_weights_are_refused(tmp_path: Path, edit, message: str | None) -> None:
    path = _edit_archive(_saved(tmp_path), tmp_path / "edited.pt2", edit)
    if message is None:
        assert isinstance(load_pt2(path), torch.export.ExportedProgram)
    else:
        with pytest.raises(ArtifactError, match=message):
            load_pt2(path)


def test_extra_payloads_and_old_layouts_are_refused(tmp_path: Path) -> None:
    src = _saved(tmp_path)
    root = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    with zipfile.ZipFile(src, "a") as archive:
        archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(ArtifactError, match="compiled AOTInductor code"):
        load_pt2(src)

    legacy = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(legacy, "w") as archive:
        archive.writestr("version", "1")
    with pytest.raises(ArtifactError, match="pre-2.8 archive layout"):
        load_pt2(legacy)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such .pt2 file"),
        (b"not a zip at all", "not a readable .pt2 archive"),
        ("truncate", "not a readable .pt2 archive"),
    ],
)
def test_missing_or_damaged_pt2(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.pt2"
    if content == "truncate":
        data = _saved(tmp_path).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        load_pt2(path)


class ExpandedBuffers(nn.Module):
    """Buffers created with ``.expand`` (stride 0), like a ``token_type_ids`` buffer, and a
    transposed one (not contiguous, but no element shares memory: it keeps its layout)."""

    def __init__(self) -> None:
        super().__init__()
        ids = torch.zeros(1, 4, dtype=torch.long).expand(2, 4)
        self.register_buffer("token_type_ids", ids, persistent=True)
        self.register_buffer("positions", torch.arange(4.0).expand(2, 4), persistent=False)
        self.register_buffer("table", torch.arange(8.0).view(2, 4).t())
        self.emb = nn.Embedding(3, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.emb(self.token_type_ids) + x + self.positions.unsqueeze(-1)
        return self.fc(out) + self.table.sum()


def test_expanded_constants_are_materialised_and_load_back(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rewriter.cli import cli

    model = ExpandedBuffers().eval()
    x = torch.randn(2, 4, 8)
    ep = export(model, x)
    assert any(0 in t.stride() for t in [*ep.state_dict.values(), *ep.constants.values()])
    gm = lift(ep)
    assert sorted(lift_report(gm).materialised) == ["positions", "token_type_ids"]
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        assert not overlapping(t) and 0 not in t.stride(), name
    assert gm.table.stride() == (1, 4)  # a layout without shared elements is kept
    gm.load_state_dict(model.state_dict(), strict=False)  # writing into them works
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    program, out = tmp_path / "m.pt2", tmp_path / "m.safetensors"
    torch.export.save(ep, program)
    result = CliRunner().invoke(cli, ["apply", str(program), "--pass", "masks", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        assert torch.equal(rewriter.load(out)(x), model(x))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.zeros(2, 3), False),
        (lambda: torch.zeros(3, 2).t(), False),
        (lambda: torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last), False),
        (lambda: torch.zeros(4, 6)[:, ::2], False),  # gaps, no sharing
        (lambda: torch.zeros(0, 3).expand(0, 3), False),  # empty
        (lambda: torch.zeros(1, 3).expand(4, 3), True),
        (lambda: torch.zeros(()).expand(2, 2), True),
        (lambda: torch.zeros(9).as_strided((3, 3), (1, 1)), True),  # sliding window
        (lambda: torch.zeros(1, 3).expand(1, 3), False),  # stride 0 over a size-1 dim
    ],
)
def test_overlapping_detects_elements_that_share_memory(make, expected: bool) -> None:
    t = make()
    assert overlapping(t) is expected
    size = t.untyped_storage().nbytes() // t.element_size()
    offsets = torch.arange(size).as_strided(t.shape, t.stride(), t.storage_offset())
    assert (offsets.unique().numel() < offsets.numel()) is expected  # the ground truth


@st.composite
def strided_views(draw) -> tuple[Tensor, bool | None]:
    """A view of a small storage that holds its own offsets, and whether its elements share
    memory when that is known by construction (else ``None``): either random sizes,
    strides (0 included) and offset, or a contiguous tensor sliced with a step, permuted
    and possibly expanded along a new leading dim."""
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    if draw(st.booleans()):
        strides = draw(st.lists(st.integers(0, 12), min_size=len(shape), max_size=len(shape)))
        offset = draw(st.integers(0, 3))
        span = offset + sum(s * (n - 1) for s, n in zip(strides, shape, strict=True) if n > 0)
        return torch.arange(float(span + 1)).as_strided(shape, strides, offset), None
    t = torch.arange(float(math.prod(shape))).view(shape)
    if shape:
        t = t[:: draw(st.integers(1, 3))]
    t = t.permute(draw(st.permutations(range(len(shape)))))
    copies = draw(st.integers(1, 3))
    t = t.unsqueeze(0).expand(copies, *t.shape)
    return t, copies > 1 and t.numel() > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strided_views())
def test_overlapping_never_misses_shared_memory_and_materialising_fixes_it(view) -> None:
    t, known = view
    offsets = t.long()
    shared = offsets.unique().numel() < offsets.numel()
    assert known is None or known == shared
    assert overlapping(t) or not shared  # sound: a shared element is always found
    if known is not None:
        assert overlapping(t) == shared  # exact on sliced, permuted, expanded tensors
    holder = nn.Module()
    holder.register_buffer("b", t)
    assert materialise_state(holder) == (["b"] if overlapping(t) else [])
    assert not overlapping(holder.b) and torch.equal(holder.b, t)


class SlicedBuffer(nn.Module):
    """``buf[:, :n].expand(B, n)``: fx runs it on the real buffer and keeps the stride-0
    result as a ``_tensor_constant``; ``leaf`` holds an expanded buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ids", torch.zeros(1, 8, dtype=torch.long))
        self.emb = nn.Embedding(3, 4)
        self.leaf = nn.Module()
        self.leaf.register_buffer("bias", torch.ones(1, 4).expand(8, 4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.emb(self.ids[:, :8].expand(2, 8)) + x + self.leaf.bias)


def test_traced_constants_are_materialised_without_touching_the_model() -> None:
    from rewriter.analysis.flops import flops

    torch.manual_seed(0)
    model, x = SlicedBuffer().eval(), torch.randn(2, 8, 4)
    folded = torch.fx.symbolic_trace(model)  # plain fx keeps the stride-0 constants
    assert any(overlapping(t) for t in folded.buffers())
    gm = rewriter.trace(model)
    assert not any(overlapping(t) for t in gm.buffers())
    assert overlapping(model.leaf.bias) and model.ids.stride() == (8, 1)  # model untouched
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    net = rewriter.rewrite(model, ["masks", ("synflow", {"density": 0.5, "iterations": 2})], x)
    assert fired(net) == [("masks", 1), ("synflow", 1)]
    assert not any(overlapping(t) for t in net.buffers())
    assert flops(folded, x).total_macs == flops(gm, x).total_macs > 0  # fx's own graphs too


# -- export's metadata asserts ----------------------------------------------------------------


class CastsOutput(nn.Module):
    """``x.to(torch.float32)``: export asserts ``x`` is float32 before the cast."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.fc(x).to(torch.float32) * mask.to(torch.float32)


def test_metadata_asserts_are_dropped_and_the_lifted_graph_runs_in_float64() -> None:
    torch.manual_seed(0)
    model = CastsOutput().eval()
    x, mask = torch.randn(4, 3), torch.tensor([True, False]).expand(4, 2)
    ep = export(model, x, mask)
    asserts = [
        n for n in ep.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default
    ]
    assert len(asserts) == 2
    gm = lift(ep)
    assert lift_report(gm).asserts_dropped == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert targets.count(torch.ops.aten.to.dtype) == 2  # the casts are the model's: kept
    with torch.no_grad():
        assert torch.equal(gm(x, mask), model(x, mask))
        wide = copy.deepcopy(gm).double()(x.double(), mask)  # ran, cast back to float32
        ref = copy.deepcopy(model).double()(x.double(), mask)
    assert wide.dtype == torch.float32 and torch.equal(wide, ref)
    from rewriter.passes.lottery_scores import pins_float_dtype

    assert pins_float_dtype(ep.module()) and not pins_float_dtype(gm)  # the float32 assert


# -- Hugging Face programs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_lifted() -> dict[str, tuple[torch.fx.GraphModule, tuple]]:
    hf_models = pytest.importorskip("hf_models")
    from rewriter.frontends import export_graph

    out = {}
    for name in ("bert", "llama"):
        model, kwargs = hf_models.BUILDERS[name]()
        out[name] = export_graph(model, (), kwargs, dynamic=False)
    return out


def test_lifted_bert_buffers_share_no_memory_also_after_rewriting(hf_lifted) -> None:
    gm, inputs = hf_lifted["bert"]
    assert lift_report(gm).asserts_dropped > 0
    net = rewriter.rewrite(gm, ["masks"], inputs)  # fx folds the token-type-id expand
    assert any(
        n.target.startswith("_tensor_constant") for n in net.graph.nodes if n.op == "get_attr"
    )
    for model in (gm, net):
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            assert not overlapping(t), name
    with torch.no_grad():  # every buffer can be written into (SynFlow's abs_, load_state_dict)
        for t in net.buffers():
            t.copy_(t.clone())


def test_lifted_llama_synflow_scores_in_float64(hf_lifted) -> None:
    from rewriter.passes import lottery_scores as lt

    gm, inputs = hf_lifted["llama"]
    net = rewriter.rewrite(gm, ["masks"], inputs)
    assert not lt.pins_float_dtype(net)  # export's float32 asserts are gone
    assert lt.narrowing_casts(net) > 0  # RMSNorm's and rotary's float32 casts stay
    scores = lt.synflow_scores(net)
    assert {s.dtype for s in scores.values()} == {torch.float64}
    reference = lt.synflow_scores(copy.deepcopy(net).double())  # a float64 model
    for name, s in scores.items():
        assert torch.equal(s, reference[name]), name
    ones = lt._ones_like_inputs(net, None)
    with lt._scoring(net, train=False, absolute=True):  # the same, forced to float32
        narrow = lt._synflow_once(net, ones, wide=False)
    assert any(not torch.equal(narrow[n].double(), s) for n, s in scores.items())
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the model keeps its dtype
