"""Artifacts: save a rewritten model to one safetensors file and load it back."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import rewriter
from rewriter import graphio, io, zoo
from rewriter.errors import ArtifactError
from rewriter.passes.masks import get_masks, set_mask

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``factories:make`` names tests/factories.py."""
    monkeypatch.syspath_prepend(str(TESTS))


def factory_gm(passes=("masks", "rbn"), **options) -> torch.fx.GraphModule:
    return rewriter.rewrite(io.resolve_source("factories:make", options), list(passes))


def outputs(gm: nn.Module, x: torch.Tensor, *, train: bool) -> torch.Tensor:
    gm.train(train)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return gm(x)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_zoo_model_with_changed_masks_and_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = rewriter.rewrite(zoo.create("digits_cnn", width=8), ["masks", ("rbn", {"init": "paper"})])
    layer, mask = next(iter(get_masks(gm).items()))
    set_mask(gm, layer, torch.rand(mask.shape) > 0.5)
    rbn = next(m for m in gm.modules() if hasattr(m, "center_weight"))
    with torch.no_grad():
        rbn.center_weight.normal_()
        rbn.scale_weight.normal_()
        gm.get_parameter(f"{layer}.weight").mul_(3.0)
    x = zoo.example_inputs("digits_cnn", batch=8, width=8)[0]
    gm.train()(x)  # moves the running statistics away from their init

    path = io.save(gm, tmp_path / "digits.safetensors")
    loaded = io.load(path)

    assert isinstance(loaded, torch.fx.GraphModule)
    assert_same_state(gm, loaded)
    assert float((loaded.get_buffer(f"{layer}.weight_mask") == 0).sum()) > 0
    torch.testing.assert_close(
        outputs(loaded, x, train=False), outputs(gm, x, train=False), rtol=0, atol=0
    )
    torch.testing.assert_close(
        outputs(loaded, x, train=True), outputs(gm, x, train=True), rtol=0, atol=0
    )
    assert rewriter.report(loaded).pipeline() == rewriter.report(gm).pipeline()
    assert rewriter.report(loaded).source == {"model": "zoo:digits_cnn", "options": {"width": 8}}


def test_metadata_is_a_readable_toml_pipeline(tmp_path: Path) -> None:
    gm = rewriter.rewrite(zoo.create("mlp", hidden=[8]), ["masks", ("rbn", {"init": "paper"})])
    path = io.save(gm, tmp_path / "mlp.safetensors")

    with safe_open(str(path), framework="pt") as f:
        text = f.metadata()[io.METADATA_KEY]
        keys = set(f.keys())
    assert text.count("[[pass]]") == 2
    assert keys == set(gm.state_dict())
    doc = io.read_pipeline(path)
    assert doc["model"] == {"source": "zoo:mlp", "leaves": [], "options": {"hidden": [8]}}
    assert [(p["name"], p["options"]) for p in doc["pass"]] == [
        ("masks", {"include": [], "exclude": [], "classes": []}),
        ("rbn", {"init": "paper", "include": [], "exclude": []}),
    ]
    assert doc["versions"] == {"rewriter": rewriter.__version__, "torch": torch.__version__}


def test_factory_source_and_none_options_round_trip(tmp_path: Path) -> None:
    gm = factory_gm(width=3, scale=None)
    assert rewriter.report(gm).source == {
        "model": "factories:make",
        "options": {"width": 3, "scale": None},
    }
    path = io.save(gm, tmp_path / "net.safetensors")

    model = io.read_pipeline(path)["model"]
    assert model["options"] == {"width": 3}
    assert model["null_options"] == ["scale"]
    loaded = io.load(path)
    assert_same_state(gm, loaded)
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(outputs(loaded, x, train=False), outputs(gm, x, train=False))


def test_source_must_be_known_or_given(tmp_path: Path) -> None:
    from factories import make

    gm = rewriter.rewrite(make(width=5), ["masks"])  # plain call: no rewriter_source
    with pytest.raises(ArtifactError, match="source is unknown.*source="):
        io.save(gm, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()

    io.save(
        gm, tmp_path / "a.safetensors", source={"model": "factories:make", "options": {"width": 5}}
    )
    assert_same_state(gm, io.load(tmp_path / "a.safetensors"))
    io.save(rewriter.rewrite(zoo.create("mlp"), []), tmp_path / "b.safetensors", source="mlp")
    assert io.read_pipeline(tmp_path / "b.safetensors")["model"]["source"] == "zoo:mlp"


def test_source_options_must_fit_in_toml(tmp_path: Path) -> None:
    gm = factory_gm(["masks"])
    with pytest.raises(ArtifactError, match="cannot be stored in TOML"):
        io.save(
            gm,
            tmp_path / "a.safetensors",
            source={"model": "factories:make", "options": {"width": torch.tensor(4)}},
        )
    assert list(tmp_path.iterdir()) == []


def test_user_leaves_are_recorded_and_replayed(tmp_path: Path) -> None:
    model = io.resolve_source("factories:make", {})
    gm = rewriter.rewrite(model, ["masks", "rbn"], leaves=["block"])
    assert "block.conv.weight_mask" not in gm.state_dict()  # the leaf hides its conv
    path = io.save(gm, tmp_path / "leaf.safetensors")

    assert io.read_pipeline(path)["model"]["leaves"] == ["block"]
    # A user's leaf is user code, not stored as data: the caller supplies it or trusts
    # the factory (format 2; format 1 replayed the factory unasked).
    with pytest.raises(ArtifactError, match="'block' is a 'factories.Block'.*model="):
        io.load(path)
    assert_same_state(gm, io.load(path, trust_source=True))
    assert_same_state(gm, io.load(path, model=model))


def test_opaque_modules_are_found_again_on_load(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="opaque"):
        gm = factory_gm(opaque=True)
    assert "flip" in rewriter.opaque_modules(gm)
    path = io.save(gm, tmp_path / "opaque.safetensors")

    assert io.read_pipeline(path)["model"]["leaves"] == []
    with pytest.raises(ArtifactError, match="'flip' is a 'factories.SignFlip'.*trust_source"):
        io.load(path)
    loaded = io.load(path, trust_source=True)  # the graph is stored: nothing is re-traced
    assert rewriter.opaque_modules(loaded) == rewriter.opaque_modules(gm)
    assert_same_state(gm, loaded)


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        io.save(factory_gm(["masks"]), tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_force(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    first, second = factory_gm(["masks"]), factory_gm(["masks"])
    io.save(first, path)
    with pytest.raises(ArtifactError, match="already exists.*force=True"):
        io.save(second, path)
    assert_same_state(io.load(path), first)

    io.save(second, path, force=True)
    assert_same_state(io.load(path), second)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert path.stat().st_mode & 0o044 == 0o044  # readable like any new file, not 0600


def test_output_directories_are_created_but_files_do_not_become_directories(
    tmp_path: Path,
) -> None:
    path = io.save(factory_gm(["masks"]), tmp_path / "new" / "dir" / "a.safetensors")
    assert path.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        io.save(factory_gm(["masks"]), tmp_path / "file" / "a.safetensors")
    with pytest.raises(ArtifactError, match="is a directory"):
        io.save(factory_gm(["masks"]), tmp_path)


def test_save_needs_a_rewritten_model(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="rewriter.rewrite"):
        io.save(nn.Linear(2, 2), tmp_path / "a.safetensors")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such artifact"),
        (b"definitely not a safetensors file" * 4, "not a readable safetensors file"),
        (b"", "not a readable safetensors file"),
    ],
)
def test_unreadable_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        io.load(path)
    with pytest.raises(ArtifactError, match=message):
        io.read_pipeline(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = io.save(factory_gm(["masks"]), tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match="truncated"):
        io.load(path)


def test_tensors_without_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(nn.Linear(2, 2).state_dict(), str(path))
    with pytest.raises(ArtifactError, match="without rewriter metadata"):
        io.load(path)


def _rewrite_file(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(str(src))
    edit(tensors, metadata)
    safetensors.torch.save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_state_dict_mismatch_lists_every_difference(tmp_path: Path) -> None:
    src = io.save(factory_gm(), tmp_path / "a.safetensors")

    def edit(tensors, metadata):
        del tensors["stem.weight"]
        tensors["extra.weight"] = torch.zeros(1)
        tensors["fc.bias"] = torch.zeros(7)

    bad = _rewrite_file(src, tmp_path / "b.safetensors", edit)
    with pytest.raises(ArtifactError) as info:
        io.load(bad)
    text = str(info.value)
    assert "missing keys: stem.weight" in text
    assert "unexpected keys: extra.weight" in text
    assert "fc.bias: file (7,), model (3,)" in text


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("zoo:no_such_model", "not a zoo model"),
        ("no_such_package_xyz.models:make", "no module named 'no_such_package_xyz'"),
        ("factories:missing", "has no attribute 'missing'"),
        ("factories:not_a_module", "returned int, not an nn.Module"),
    ],
)
def test_unknown_sources(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        io.resolve_source(source, {})
    src = io.save(factory_gm(["masks"]), tmp_path / "a.safetensors")

    def edit(tensors, metadata):
        old = 'source = "factories:make"'
        assert old in metadata[io.METADATA_KEY]
        metadata[io.METADATA_KEY] = metadata[io.METADATA_KEY].replace(old, f'source = "{source}"')
        del metadata[graphio.GRAPH_KEY]  # no stored graph: only a replay can rebuild it

    with pytest.raises(ArtifactError, match=f"cannot rebuild the source model.*{message}"):
        io.load(_rewrite_file(src, tmp_path / "b.safetensors", edit), trust_source=True)


def test_resolve_source_forms() -> None:
    assert isinstance(io.resolve_source("mlp", {"hidden": [4]}), zoo.MLP)
    model = io.resolve_source("zoo:mlp", {"hidden": [4]})
    assert model.rewriter_source == {"model": "zoo:mlp", "options": {"hidden": [4]}}
    assert io.resolve_source("factories:make", {"width": 2}).rewriter_source == {
        "model": "factories:make",
        "options": {"width": 2},
    }
    with pytest.raises(
        ArtifactError, match="does not accept options.*Its parameters: width, scale, opaque"
    ):
        io.resolve_source("factories:make", {"depth": 2})
    with pytest.raises(ArtifactError, match="unknown option"):
        io.resolve_source("zoo:mlp", {"depth": 2})


def test_load_leaves_global_rng_alone(tmp_path: Path) -> None:
    path = io.save(factory_gm(["masks"]), tmp_path / "a.safetensors")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    io.load(path)
    assert torch.equal(torch.rand(3), expected)


def test_newer_rewriter_version_warns(tmp_path: Path) -> None:
    src = io.save(factory_gm(["masks"]), tmp_path / "a.safetensors")

    def edit(tensors, metadata):
        metadata[io.METADATA_KEY] = metadata[io.METADATA_KEY].replace(
            f'rewriter = "{rewriter.__version__}"', 'rewriter = "99.0"'
        )

    with pytest.warns(UserWarning, match="saved by rewriter 99.0"):
        io.load(_rewrite_file(src, tmp_path / "b.safetensors", edit))


@pytest.mark.slow
def test_loaded_artifact_trains_under_compile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = rewriter.rewrite(zoo.create("digits_cnn", width=8), ["masks", "rbn"])
    loaded = io.load(io.save(gm, tmp_path / "a.safetensors"))
    compiled = torch.compile(loaded, fullgraph=True)
    opt = torch.optim.SGD(loaded.parameters(), lr=0.05)
    x = zoo.example_inputs("digits_cnn", batch=16, width=8)[0]
    y = torch.arange(16) % 10
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(compiled(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    compiled.eval()
    assert compiled(x).shape == (16, 10)

    # save() unwraps the torch.compile wrapper (whose state_dict keys start with _orig_mod.)
    again = io.load(io.save(compiled, tmp_path / "trained.safetensors"))
    assert_same_state(again, loaded)
    torch.testing.assert_close(outputs(again, x, train=False), outputs(loaded, x, train=False))


# -- model files: formats, .pt2 sources, pickles, weights ------------------------------------


class Evil:
    """Unpickling it creates ``marker``: stands for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pt2(tmp_path: Path, name: str = "digits_cnn", **options) -> tuple[Path, nn.Module]:
    model = zoo.create(name, **options).eval()
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(model, zoo.example_inputs(name, **options)), path)
    return path, model


def test_file_format_reads_only_the_header(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = nn.Linear(2, 2)
    files = {
        "a.safetensors": lambda p: safetensors.torch.save_file(model.state_dict(), str(p)),
        "b.pt": lambda p: torch.save(model.state_dict(), p),
        "c.pt": lambda p: torch.save(model.state_dict(), p, _use_new_zipfile_serialization=False),
        "d.pkl": lambda p: p.write_bytes(pickle.dumps(Evil(marker), protocol=2)),
        "e.pt": lambda p: torch.save(Evil(marker), p),
        "f.zip": lambda p: zipfile.ZipFile(p, "w").writestr("x.txt", "x"),
        "g.bin": lambda p: p.write_bytes(b"hello world, not a model"),
        "h.bin": lambda p: p.write_bytes(b""),
    }
    for name, write in files.items():
        write(tmp_path / name)
    formats = {name: io.file_format(tmp_path / name) for name in files}
    assert formats == {
        "a.safetensors": "safetensors",
        "b.pt": "torch",
        "c.pt": "pickle",
        "d.pkl": "pickle",
        "e.pt": "torch",
        "f.zip": "zip",
        "g.bin": "unknown",
        "h.bin": "unknown",
    }
    assert io.file_format(_pt2(tmp_path, "mlp")[0]) == "pt2"
    assert not marker.exists()
    with pytest.raises(ArtifactError, match="no such file"):
        io.file_format(tmp_path / "missing.pt")


def test_pt2_source_round_trip_records_path_and_hash(tmp_path: Path) -> None:
    path, model = _pt2(tmp_path, width=4)
    source_model = io.resolve_source(str(path))
    assert source_model.rewriter_source == {
        "model": str(path.resolve()),
        "options": {},
        "sha256": io.sha256_of(path),
    }
    inputs = io.default_inputs(source_model)
    assert torch.equal(inputs[0], zoo.example_inputs("digits_cnn", width=4)[0])
    gm = rewriter.rewrite(source_model, ["masks", "rbn"], inputs)
    assert [p.fired for p in rewriter.report(gm).passes] == [5, 4]
    artifact = io.save(gm, tmp_path / "digits.safetensors")
    assert io.read_pipeline(artifact)["model"]["sha256"] == io.sha256_of(path)

    loaded = io.load(artifact)
    assert_same_state(gm, loaded)
    x = torch.randn(3, 1, 8, 8)
    expected = outputs(gm, x, train=False)
    torch.testing.assert_close(outputs(loaded, x, train=False), expected, rtol=0, atol=0)
    torch.testing.assert_close(expected, model(x))  # masks and rbn preserve the outputs

    # The stored graph needs no .pt2; the replay of an artifact without one checks the file.
    replay = _rewrite_file(artifact, tmp_path / "replay.safetensors", _drop_graph)
    path.write_bytes(path.read_bytes() + b"\0")  # still a zip, but not the same file
    assert_same_state(gm, io.load(artifact))
    with pytest.raises(ArtifactError, match="changed since the artifact was written"):
        io.load(replay, trust_source=True)
    path.unlink()
    torch.testing.assert_close(outputs(io.load(artifact), x, train=False), expected, rtol=0, atol=0)
    with pytest.raises(ArtifactError, match="no such model file"):
        io.load(replay, trust_source=True)


def _drop_graph(tensors, metadata):
    del metadata[graphio.GRAPH_KEY]


def test_model_files_take_no_options_and_plain_tensors_are_not_models(tmp_path: Path) -> None:
    path, _ = _pt2(tmp_path, "mlp")
    with pytest.raises(ArtifactError, match="options are keyword arguments of factories"):
        io.resolve_source(str(path), {"hidden": [4]})
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(nn.Linear(2, 2).state_dict(), str(plain))
    with pytest.raises(ArtifactError, match="holds tensors only.*--weights"):
        io.resolve_source(str(plain))
    with pytest.raises(ArtifactError, match="no such model file"):
        io.resolve_source(str(tmp_path / "missing.pt2"))


def test_artifact_as_source_continues_its_pipeline(tmp_path: Path) -> None:
    first = io.save(factory_gm(["masks"]), tmp_path / "a.safetensors")
    gm = rewriter.rewrite(io.resolve_source(str(first)), ["rbn"])
    assert rewriter.report(gm).pipeline()[0][0] == "masks"
    second = io.load(io.save(gm, tmp_path / "b.safetensors"))
    assert [name for name, _ in rewriter.report(second).pipeline()] == ["masks", "rbn"]
    assert rewriter.report(second).source["model"] == "factories:make"


def test_pickled_modules_need_trust_and_are_never_probed_by_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save(Evil(marker), evil)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    for path in (evil, raw):
        with pytest.raises(ArtifactError, match="refusing to unpickle.*--trust-pickle"):
            io.resolve_source(str(path))
        with pytest.raises(ArtifactError, match="not a plain state dict.*weights_only"):
            io.load_weights(path)
    assert not marker.exists()

    whole = tmp_path / "whole.pt"
    torch.save(io.resolve_source("factories:make", {"width": 3}), whole)
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        io.resolve_source(str(whole))
    model = io.resolve_source(str(whole), trust_pickle=True)
    assert model.rewriter_source["sha256"] == io.sha256_of(whole)
    artifact = io.save(rewriter.rewrite(model, ["masks"]), tmp_path / "w.safetensors")
    assert_same_state(io.load(artifact), rewriter.rewrite(model, ["masks"]))  # stored graph
    replay = _rewrite_file(artifact, tmp_path / "replay.safetensors", _drop_graph)
    with pytest.raises(ArtifactError, match="cannot rebuild the source model.*--trust-pickle"):
        io.load(replay, trust_source=True)
    assert_same_state(
        io.load(replay, trust_source=True, trust_pickle=True), rewriter.rewrite(model, ["masks"])
    )


def test_weights_from_safetensors_and_state_dicts(tmp_path: Path) -> None:
    trained = io.resolve_source("factories:make", {"width": 3})
    with torch.no_grad():
        trained.fc.weight.fill_(0.25)
    safetensors.torch.save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("w.safetensors", "ckpt.pt"):
        model = io.resolve_source("factories:make", {"width": 3})
        io.apply_weights(model, tmp_path / name)
        assert_same_state(model, trained)
        assert model.rewriter_source["weights"] == str((tmp_path / name).resolve())
        assert model.rewriter_source["weights_sha256"] == io.sha256_of(tmp_path / name)
    gm = rewriter.rewrite(model, ["masks"])
    doc = io.read_pipeline(io.save(gm, tmp_path / "a.safetensors"))
    assert doc["model"]["weights"] == str((tmp_path / "ckpt.pt").resolve())


def test_weights_that_do_not_fit_list_every_difference(tmp_path: Path) -> None:
    state = io.resolve_source("factories:make", {"width": 3}).state_dict()
    del state["stem.weight"]
    state["fc.weight"] = torch.zeros(5, 3)
    state["extra"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, str(path))
    model = io.resolve_source("factories:make", {"width": 3})
    with pytest.raises(ArtifactError) as info:
        io.apply_weights(model, path)
    text = str(info.value)
    assert "missing keys: stem.weight" in text
    assert "unexpected keys: extra" in text
    assert "fc.weight: file (5, 3), model (3, 3)" in text

    ddp = {f"module.{k}": v for k, v in model.state_dict().items()}
    safetensors.torch.save_file(ddp, str(path))
    with pytest.raises(ArtifactError, match="DistributedDataParallel"):
        io.apply_weights(model, path)


def test_damaged_weight_files(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(nn.Linear(8, 8).state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ArtifactError, match="truncated or damaged"):
        io.load_weights(path)
    with pytest.raises(ArtifactError, match="no such file"):
        io.load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError, match="not a safetensors file or a state dict"):
        io.load_weights(tmp_path / "notes.txt")
    pt2, _ = _pt2(tmp_path, "mlp")
    with pytest.raises(ArtifactError, match="torch.export program; give it as MODEL"):
        io.load_weights(pt2)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ArtifactError, match="holds a list, not a state dict"):
        io.load_weights(tmp_path / "list.pt")


def test_recorded_input_is_replayed_and_used_for_export(tmp_path: Path) -> None:
    gm = factory_gm(["masks"], width=3)
    path = io.save(gm, tmp_path / "a.safetensors", inputs={"shape": [1, 6, 6], "batch": 3})
    assert io.read_pipeline(path)["input"] == {"shape": [1, 6, 6], "batch": 3, "dtype": "float32"}
    loaded = io.load(path)
    assert io.default_inputs(loaded)[0].shape == (3, 1, 6, 6)
    again = io.load(io.save(rewriter.rewrite(loaded, ["rbn"]), tmp_path / "b.safetensors"))
    assert io.read_pipeline(tmp_path / "b.safetensors")["input"]["batch"] == 3  # carried on
    assert io.default_inputs(again)[0].shape == (3, 1, 6, 6)
    with pytest.raises(ArtifactError, match="cannot record example input"):
        io.save(gm, tmp_path / "c.safetensors", inputs={"shape": [0, 6], "batch": 1})


def test_export_writes_an_equivalent_program_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gm = rewriter.rewrite(zoo.create("digits_cnn", width=4), ["masks", "rbn"])
    gm.train()
    x = zoo.example_inputs("digits_cnn", width=4)
    path = io.export(gm, tmp_path / "digits.pt2", x)
    assert gm.training  # the model itself is untouched
    program = torch.export.load(path)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[0]), gm.eval()(x[0]), rtol=0, atol=0)
    with pytest.raises(ArtifactError, match="already exists"):
        io.export(gm, path, x)

    def broken(program, f, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        io.export(gm, tmp_path / "other.pt2", x)
    with pytest.raises(OSError, match="disk full"):
        io.export(gm, path, x, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.pt2"]
    assert torch.export.load(path) is not None  # the old file survived
