"""Pipeline TOML files: schema, validation that reports every problem, running."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

import rewriter
from rewriter import io, zoo
from rewriter import pipeline as pl
from rewriter.manager import Checks

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def parse(text: str, base: Path | None = None, **options) -> pl.Pipeline:
    return pl.parse(textwrap.dedent(text), base=base, **options)


def problems(text: str, base: Path | None = None, **options) -> dict[str, str]:
    with pytest.raises(pl.PipelineError) as info:
        parse(text, base, **options)
    found = {p.path: p.message for p in info.value.problems}
    assert len(found) == len(info.value.problems)  # one problem per key path
    return found


FULL = """
    [model]
    source = "zoo:mlp"
    options = { hidden = [8] }
    weights = "w.safetensors"
    seed = 3
    leaves = ["layers"]

    [input]
    shape = [64]
    batch = 4
    dtype = "float32"

    [[pass]]
    name = "masks"
    options = { exclude = ["layers.2"] }

    [[pass]]
    name = "rbn"
    [pass.options]
    init = "paper"

    [checks]
    numerics = false
    rtol = 0.001

    [output]
    path = "out/mlp.safetensors"
    export = "mlp.pt2"
"""


def test_full_document(tmp_path: Path) -> None:
    safetensors.torch.save_file(
        zoo.create("mlp", hidden=[8]).state_dict(), str(tmp_path / "w.safetensors")
    )
    p = parse(FULL, tmp_path)
    assert p.source == "zoo:mlp"
    assert p.options == {"hidden": [8]}
    assert p.weights == tmp_path / "w.safetensors"  # relative to the pipeline's folder
    assert (p.seed, p.leaves) == (3, ("layers",))
    assert p.input == pl.InputSpec((64,), 4, "float32")
    assert p.input.make()[0].shape == (4, 64) and torch.equal(p.input.make()[0], p.input.make()[0])
    assert [x.name for x in p.passes] == ["masks", "rbn"]
    assert p.passes[0].options()["exclude"] == ["layers.2"]
    assert p.passes[1].options()["init"] == "paper"
    assert p.checks == Checks(numerics=False, rtol=0.001)
    assert p.output == pl.OutputSpec(tmp_path / "out/mlp.safetensors", False, tmp_path / "mlp.pt2")


def test_minimal_document_has_defaults(tmp_path: Path) -> None:
    p = parse('[model]\nsource = "mlp"', tmp_path)
    assert (p.source, p.options, p.passes, p.input, p.weights) == ("mlp", {}, (), None, None)
    assert p.checks == Checks() and p.output == pl.OutputSpec()


def test_every_problem_is_reported_at_once_with_key_paths(tmp_path: Path) -> None:
    (tmp_path / "out.safetensors").write_text("existing")
    found = problems(
        """
        inputs = 3

        [model]
        source = "zoo:mlp"
        options = { hiden = [8] }
        wieghts = "w.safetensors"

        [[pass]]
        name = "mask"

        [[pass]]
        name = "masks"
        options = { include = 3, excldue = ["fc"] }

        [[pass]]
        name = "rbn"
        options = { init = "fancy" }

        [[pass]]
        options = {}

        [checks]
        rtol = "x"
        lint = 3
        atol = -1.0
        seeed = 1

        [input]
        shape = [3, 0]
        dtype = "int8"

        [output]
        path = "out.safetensors"
        """,
        tmp_path,
    )
    assert found == {
        "inputs": "unknown section (did you mean 'input'?); sections: model, input, pass, "
        "checks, output",
        "model.wieghts": "unknown key (did you mean 'weights'?); valid keys: source, options, "
        "null_options, weights, seed, leaves, sha256, frontend, weights_sha256",
        "model.options.hiden": "zoo model 'mlp' has no option 'hiden' (did you mean "
        "'hidden'?); its options: in_features, hidden, num_classes, bias",
        "input.shape": "expected a list of positive integers, got [3, 0]",
        "input.dtype": 'expected one of "float32", "float64", "float16", "bfloat16", got "int8"',
        "pass[1].name": "unknown pass 'mask' (did you mean 'masks'?); valid passes: "
        + ", ".join(rewriter.registered()),
        "pass[2].options.include": "expected a list, got 3",
        "pass[2].options.excldue": "pass 'masks' has no option 'excldue' (did you mean "
        "'exclude'?); valid options: include: list of str, exclude: list of str, classes: "
        "list of str",
        "pass[3].options.init": "expected one of ['preserve', 'paper'], got 'fancy'",
        "pass[4].name": "missing: the registry name of the pass",
        "checks.seeed": "unknown key (did you mean 'seed'?); valid keys: "
        + ", ".join(pl.CHECK_TYPES),
        "checks.lint": "expected true or false, got 3",
        "checks.rtol": "expected a number, got 'x'",
        "checks.atol": "expected a number >= 0, got -1.0",
        "output.path": f"{tmp_path / 'out.safetensors'} already exists; set force = true in "
        "[output] or pass --force to replace it",
    }


def test_error_message_lists_problems_under_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[model]\nsource = "zoo:mlp"\n[[pass]]\nname = "rbm"\n')
    with pytest.raises(pl.PipelineError) as info:
        pl.read(path)
    assert str(info.value).splitlines() == [
        f"{path}: 1 problem ([[pass]] tables count from 1)",
        "  pass[1].name: unknown pass 'rbm' (did you mean 'rbn'?); valid passes: "
        + ", ".join(rewriter.registered()),
    ]
    assert isinstance(info.value, rewriter.RewriterError)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("[model\nsource = 1", "", "not valid TOML: Expected ']'"),
        ('[pass]\nname = "masks"', "pass", "expected [[pass]] tables (an array of tables)"),
        ('pass = "masks"', "pass", 'expected [[pass]] tables, got "masks"'),
        ('model = "zoo:mlp"', "model", 'expected a table [model], got "zoo:mlp"'),
        ("[model]\nsource = 3", "model.source", "expected a string, got 3"),
        ("[input]\nbatch = 0", "input.shape", "missing: the shape of one example"),
        ("[output]\nforce = 1", "output.force", "expected true or false, got 1"),
        ("[[pass]]\nname = 'masks'\noptions = 3", "pass[1].options", "expected a table"),
        (
            "[[pass]]\nname = 'masks'\nnull_options = ['bogus']",
            "pass[1].options.bogus",
            "no option",
        ),
        (
            "[[pass]]\nname = 'masks'\noptions = {classes = ['Foo']}",
            "pass[1].options.classes",
            "must be one of 'Conv1d'",
        ),
        ("[model]\nsource = 'no_such_pkg_xyz:make'", "model.source", "no module named"),
        (
            "[model]\nsource = 'factories:make'\noptions = {depth = 1}",
            "model.options.depth",
            "its options: width, scale, opaque",
        ),
        ("[model]\nsource = 'zoo:mlpp'", "model.source", "did you mean 'mlp'?"),
        ("[model]\nsource = 'missing.pt2'", "model.source", "no such model file"),
        ("[model]\nsource = 'zoo:mlp'\nweights = 'v.pt'", "model.weights", "no such weights file"),
        ("[model]\nsource = 'zoo:mlp'\nsha256 = 'abc'", "model.sha256", "a 64-digit hex sha256"),
        (
            f"[model]\nsource = 'zoo:mlp'\nweights = 'w.pt'\nweights_sha256 = '{'0' * 64}'",
            "model.weights_sha256",
            "w.pt has changed",
        ),
        ("[model]\noptions = {}", "model.source", "missing: name a zoo model"),
        ("[checks]\nlint = true", "model", "missing: add a [model] table"),
        (
            "[model]\nsource = 'factories:make'\n[output]\nexport = 'a.pt2'",
            "output.export",
            "needs an example input",
        ),
    ],
)
def test_single_problems(tmp_path: Path, text: str, path: str, message: str) -> None:
    (tmp_path / "w.pt").write_bytes(b"\x80\x02}q\x00.")  # an empty state dict
    if not text.startswith("[model") and "model =" not in text and path != "model":
        text += '\n[model]\nsource = "zoo:mlp"\n'  # after: top-level keys come first
    found = problems(text, tmp_path)
    assert path in found, found
    assert message in found[path]


def test_model_files_are_checked_without_loading(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickle: refused, not read
    found = problems("[model]\nsource = 'model.pt'\noptions = { width = 2 }", tmp_path)
    assert found["model.options"] == "a model file takes no options"
    assert "pickle" in found["model.source"] and "--trust-pickle" in found["model.source"]
    p = parse("[model]\nsource = 'model.pt'", tmp_path, trust_pickle=True)
    assert p.source == str(tmp_path / "model.pt")
    assert parse("[model]\nsource = 'missing.pt2'", tmp_path, check_files=False).source


def test_command_line_can_supply_the_model() -> None:
    p = pl.validate({"pass": [{"name": "masks"}]}, require_model=False)
    assert p.source is None and [x.name for x in p.passes] == ["masks"]


def test_artifact_pipeline_is_a_valid_pipeline_file(tmp_path: Path) -> None:
    gm = rewriter.rewrite(io.resolve_source("factories:make", {"scale": None}), ["masks", "rbn"])
    artifact = io.save(gm, tmp_path / "a.safetensors", inputs={"shape": [1, 6, 6]})
    path = tmp_path / "again.toml"
    path.write_text(io.pipeline_text(artifact))
    p = pl.read(path)
    assert p.file == path
    assert (p.source, p.options) == ("factories:make", {"scale": None})
    assert [(x.name, x.options()) for x in p.passes] == rewriter.report(gm).pipeline()
    assert p.input == pl.InputSpec((1, 6, 6))


def test_run_writes_artifact_and_program(tmp_path: Path) -> None:
    torch.manual_seed(5)
    weights = zoo.create("mlp", hidden=[8]).state_dict()
    torch.save(weights, tmp_path / "w.pt")
    text = FULL.replace("w.safetensors", "w.pt").replace('leaves = ["layers"]', "")
    p = parse(text, tmp_path)
    stages: list[str] = []
    result = pl.run(p, progress=stages.append)

    assert stages == [
        "building zoo:mlp",
        "tracing and applying masks, rbn",
        f"writing {tmp_path / 'out/mlp.safetensors'}",
        f"exporting {tmp_path / 'mlp.pt2'} (torch.export, eval mode)",
    ]
    assert result.output == tmp_path / "out/mlp.safetensors"
    assert [(r.name, r.fired) for r in rewriter.report(result.gm).passes] == [
        ("masks", 1),
        ("rbn", 0),
    ]
    assert torch.equal(result.gm.state_dict()["layers.0.weight"], weights["layers.0.weight"])
    loaded = io.load(result.output)
    x = result.inputs[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), result.gm.eval()(x), rtol=0, atol=0)
        program = torch.export.load(result.export).module()
        torch.testing.assert_close(program(result.inputs[0]), result.gm(result.inputs[0]))
    doc = io.read_pipeline(result.output)
    assert doc["input"] == {"shape": [64], "batch": 4, "dtype": "float32"}
    assert doc["model"]["weights"] == str(tmp_path / "w.pt")

    with pytest.raises(rewriter.ArtifactError, match="already exists"):
        pl.run(p)  # outputs are checked before any work


def test_run_uses_the_pipeline_checks(tmp_path: Path) -> None:
    """[checks] reaches the pass manager: an exact-match numeric check fails rbn (the same
    function computed with different arithmetic); with numerics off the same pipeline runs."""
    text = """
        [model]
        source = "zoo:digits_cnn"
        options = { width = 4 }
        [[pass]]
        name = "rbn"
        options = { init = "preserve" }
        [checks]
        rtol = 0.0
        atol = 0.0
    """
    with pytest.raises(rewriter.PassError, match="declares preserves_outputs"):
        pl.run(parse(text, tmp_path))  # an exact-match check that rbn's arithmetic misses
    loose = parse(text.replace("rtol = 0.0\n        atol = 0.0", "numerics = false"), tmp_path)
    assert rewriter.report(pl.run(loose).gm).passes[0].fired == 4


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("shape = [3, 8, 8]", "the model fails on the example input (2, 3, 8, 8) float32"),
        ('shape = [1, 8, 8]\ndtype = "float64"', "(2, 1, 8, 8) float64: RuntimeError"),
    ],
)
def test_an_input_that_does_not_fit_the_model_is_a_user_error(table: str, message: str) -> None:
    p = parse(f'[model]\nsource = "zoo:digits_cnn"\n[input]\n{table}\n[[pass]]\nname = "rbn"')
    with pytest.raises(pl.PipelineError, match=re.escape(message)) as info:
        pl.run(p)
    assert info.value.problems[0].path == "input"
