"""Artifacts: save a rewritten model to one safetensors file and load it back."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

import rewriter
from rewriter import io, zoo
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
    assert_same_state(gm, io.load(path))


def test_opaque_modules_are_found_again_on_load(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="opaque"):
        gm = factory_gm(opaque=True)
    assert "flip" in rewriter.opaque_modules(gm)
    path = io.save(gm, tmp_path / "opaque.safetensors")

    assert io.read_pipeline(path)["model"]["leaves"] == []
    with pytest.warns(UserWarning, match="opaque"):
        loaded = io.load(path)
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

    with pytest.raises(ArtifactError, match=f"cannot rebuild the source model.*{message}"):
        io.load(_rewrite_file(src, tmp_path / "b.safetensors", edit))


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
