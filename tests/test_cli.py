"""The ``rewriter`` command line, through click's CliRunner and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner, Result

import rewriter
from rewriter import io, zoo
from rewriter.cli import cli
from rewriter.cli.specs import parse_value, pass_from_spec, split_pass_spec, split_top_level
from rewriter.errors import OptionError

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(autouse=True)
def factories_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def assert_user_error(result: Result, *fragments: str) -> None:
    """Exit code 2, one ``error:`` message after any progress lines, no traceback."""
    assert result.exit_code == 2, result.output
    progress, _, message = result.stderr.partition("error: ")
    assert message, result.stderr
    assert all(line.startswith("... ") for line in progress.splitlines())
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message


# -- spec parsing ----------------------------------------------------------------------------


def test_split_top_level_respects_brackets_and_quotes() -> None:
    assert split_top_level('a=1,b=["x", "y,z"],c=\'p,q\',d={e = 1, f = 2}') == [
        "a=1",
        'b=["x", "y,z"]',
        "c='p,q'",
        "d={e = 1, f = 2}",
    ]
    with pytest.raises(click.BadParameter, match="unclosed bracket"):
        split_top_level("a=[1,2")
    with pytest.raises(click.BadParameter, match='unclosed " quote'):
        split_top_level('a="x')
    with pytest.raises(click.BadParameter, match="unbalanced"):
        split_top_level("a=1]")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.5", 0.5),
        ("3", 3),
        ("true", True),
        ('["fc", "layer1.*"]', ["fc", "layer1.*"]),
        ("'quoted'", "quoted"),
        ("paper", "paper"),
        ("layer1.*", "layer1.*"),
        ("1979-05-27", "1979-05-27"),  # a TOML date stays text
        ("1\nw = 2", "1\nw = 2"),  # no smuggled keys
        ("", ""),
    ],
)
def test_parse_value(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_pass_specs() -> None:
    assert split_pass_spec("masks") == ("masks", {})
    assert split_pass_spec("masks:") == ("masks", {})
    assert split_pass_spec('masks:exclude=["fc", "x"], classes=Conv2d') == (
        "masks",
        {"exclude": '["fc", "x"]', "classes": "Conv2d"},
    )
    assert pass_from_spec('masks:exclude=["fc"],classes=Conv2d').options() == {
        "include": [],
        "exclude": ["fc"],
        "classes": ["Conv2d"],
    }
    assert pass_from_spec('rbn:init="paper"').options()["init"] == "paper"
    assert pass_from_spec("rbn:init=paper").options()["init"] == "paper"
    with pytest.raises(click.BadParameter, match="expected key=value"):
        split_pass_spec("masks:exclude")
    with pytest.raises(click.BadParameter, match="given twice"):
        split_pass_spec("masks:exclude=a,exclude=b")
    with pytest.raises(click.BadParameter, match="empty option"):
        split_pass_spec("masks:exclude=a,")
    with pytest.raises(OptionError, match="did you mean 'exclude'"):
        pass_from_spec("masks:exclud=a")


# -- apply -----------------------------------------------------------------------------------


def test_apply_writes_an_artifact_that_loads_to_the_same_model(tmp_path: Path) -> None:
    out = tmp_path / "digits.safetensors"
    result = run(
        "apply", "zoo:digits_cnn", "--model-option", "width=8",
        "--pass", "masks:exclude=[\"fc\"]", "--pass", "rbn:init=paper",
        "--seed", "3", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "model: zoo:digits_cnn width=8"
    assert lines[1].split() == [
        "pass",
        "fired",
        "modules",
        "+",
        "replaced",
        "params",
        "+",
        "buffers",
        "+",
        "ms",
    ]
    assert lines[3].split()[:2] == ["masks", "4"]  # 4 convs masked, fc excluded
    assert lines[4].split()[:2] == ["rbn", "4"]
    assert lines[-1].startswith(f"wrote {out} (")

    torch.manual_seed(3)
    expected = rewriter.rewrite(
        zoo.create("digits_cnn", width=8),
        [("masks", {"exclude": ["fc"]}), ("rbn", {"init": "paper"})],
    ).eval()
    loaded = io.load(out).eval()
    x = zoo.example_inputs("digits_cnn", batch=4, width=8)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)
    assert "fc.weight_mask" not in loaded.state_dict()


def test_apply_json_report(tmp_path: Path) -> None:
    out = tmp_path / "mlp.safetensors"
    result = run(
        "apply",
        "mlp",
        "--model-option",
        "hidden=[8, 8]",
        "--pass",
        "masks",
        "--json",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == {"model": "zoo:mlp", "options": {"hidden": [8, 8]}}
    assert [(p["name"], p["fired"]) for p in report["passes"]] == [("masks", 3)]
    assert report["passes"][0]["modules_replaced"] == ["layers.0", "layers.2", "layers.4"]
    assert report["output"] == str(out)
    assert report["bytes"] == out.stat().st_size
    assert report["tensors"] == 9


def test_apply_factory_with_options_and_info(tmp_path: Path) -> None:
    out = tmp_path / "net.safetensors"
    result = run(
        "apply", "factories:make", "--model-option", "width=3", "--pass", "rbn", "-o", str(out)
    )
    assert result.exit_code == 0, result.output

    info = run("info", str(out))
    assert info.exit_code == 0, info.output
    assert info.stdout.splitlines() == [
        f"artifact: {out}",
        "model: factories:make width=3",
        "input: none recorded (export needs --input-shape)",
        "passes:",
        '  1. rbn init="preserve" include=[] exclude=[]',
        f"versions: rewriter {rewriter.__version__}, torch {torch.__version__}",
    ]
    as_json = json.loads(run("info", "--json", str(out)).stdout)
    assert as_json == io.read_pipeline(out)


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "mlp.safetensors"
    out.write_bytes(b"keep me")
    assert_user_error(
        run("apply", "zoo:mlp", "--pass", "masks", "-o", str(out)), "already exists", "--force"
    )
    assert out.read_bytes() == b"keep me"

    assert run("apply", "zoo:mlp", "--pass", "masks", "--force", "-o", str(out)).exit_code == 0
    assert io.read_pipeline(out)["pass"][0]["name"] == "masks"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--pass", "mask"], ["unknown pass 'mask'", "Did you mean 'masks'?"]),
        (["--pass", "masks:include=3"], ["option 'include'", "expected a list"]),
        (["--pass", "rbn:init=fancy"], ["option 'init'", "expected one of"]),
        (["--pass", "masks:bogus=1"], ["unknown option 'bogus'", "valid options: include"]),
        (["--pass", "masks:include=[1"], ["Invalid value for '--pass'", "unclosed bracket"]),
        (
            ["--model-option", "hidden"],
            ["Invalid value for '--model-option'", "expected key=value"],
        ),
        (["--model-option", "depth=3"], ["unknown option(s) for zoo model 'mlp'"]),
    ],
)
def test_user_errors_exit_2_without_output(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "out.safetensors"
    assert_user_error(run("apply", "zoo:mlp", *args, "-o", str(out)), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_missing_inputs_and_outputs(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_user_error(
        run("apply", "zoo:mlp", "--pass", "masks", "-o", str(tmp_path / "file" / "o.safetensors")),
        "is not a directory",
    )
    assert_user_error(run("apply", "zoo:mlp", "--pass", "masks"), "Missing option '-o'")
    assert_user_error(
        run("apply", "zoo:mlpp", "-o", str(tmp_path / "o")), "Did you mean 'zoo:mlp'?"
    )
    assert_user_error(
        run("apply", "no_such_pkg_xyz:make", "-o", str(tmp_path / "o")), "no module named"
    )
    assert_user_error(run("info", str(tmp_path / "missing.safetensors")), "no such artifact")
    assert_user_error(run("frobnicate"), "No such command 'frobnicate'")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_unexpected_errors_exit_1_and_debug_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(io, "save", boom)
    args = ["apply", "zoo:mlp", "--pass", "masks", "-o", str(tmp_path / "o.safetensors")]
    result = run(*args)
    assert result.exit_code == 1
    assert "error: unexpected RuntimeError: kaboom" in result.stderr
    assert "--debug" in result.stderr
    assert "Traceback" not in result.output

    debug = run("--debug", *args)
    assert debug.exit_code == 1
    assert isinstance(debug.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []


# -- passes ----------------------------------------------------------------------------------


def test_passes_lists_every_pass_with_options() -> None:
    result = run("passes")
    assert result.exit_code == 0, result.output
    text = result.stdout
    for name, cls in rewriter.registered().items():
        assert f"{name}: {cls.summary()}" in text
    assert "  preserves outputs: yes" in text
    assert "include  list of str = []" in text
    assert "init     'preserve' | 'paper' = \"preserve\"" in text

    infos = {p["name"]: p for p in json.loads(run("passes", "--json").stdout)}
    assert {"masks", "rbn"} <= set(infos)
    assert infos["rbn"]["preserves_outputs"] is True
    assert [o["name"] for o in infos["rbn"]["options"]] == ["init", "include", "exclude"]
    assert infos["rbn"]["options"][0] == {
        "name": "init",
        "type": "'preserve' | 'paper'",
        "default": "preserve",
        "domain": "one of 'preserve', 'paper'",
        "help": "'preserve': exact function at insertion; 'paper': w_b=1 with gamma kept",
    }
    assert infos["masks"]["options"][0]["default"] == []


# -- a real process --------------------------------------------------------------------------


def _python_m_rewriter(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "rewriter.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )


def test_subprocess_user_error_exits_2_without_traceback(tmp_path: Path) -> None:
    out = tmp_path / "net.safetensors"
    bad = _python_m_rewriter(
        "apply", "factories:make", "--pass", "rbn:init=fancy", "-o", str(out), cwd=tmp_path
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: pass 'rbn': option 'init'")
    assert "Traceback" not in bad.stderr
    assert bad.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_subprocess_apply_then_info(tmp_path: Path) -> None:
    out = tmp_path / "net.safetensors"
    good = _python_m_rewriter(
        "apply", "factories:make", "--pass", "masks", "-o", str(out), cwd=tmp_path
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1].startswith(f"wrote {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]
    assert "stem.weight_mask" in io.load(out).state_dict()

    info = _python_m_rewriter("info", str(out), cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "  1. masks include=[] exclude=[] classes=[]" in info.stdout.splitlines()


# -- models from files, round trips -----------------------------------------------------------

EXAMPLES = sorted((ROOT / "examples" / "pipelines").glob("*.toml"))


class Evil:
    """Unpickling it creates ``marker``: stands for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def eval_out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_round_trip_apply_then_load(tmp_path: Path) -> None:
    """zoo model -> apply -> artifact -> load: the same outputs as rewriting in Python."""
    out = tmp_path / "d.safetensors"
    result = run(
        "apply", "zoo:digits_cnn", "--model-option", "width=4", "--pass", "masks",
        "--pass", "rbn", "-o", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "... building zoo:digits_cnn",
        "... tracing and applying masks, rbn",
        f"... writing {out}",
    ]
    torch.manual_seed(0)
    expected = rewriter.rewrite(zoo.create("digits_cnn", width=4), ["masks", "rbn"])
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(eval_out(io.load(out), x), eval_out(expected, x))


@pytest.mark.parametrize(
    ("model", "options", "passes"),
    [
        ("zoo:mlp", ["--model-option", "hidden=[8]"], ["--pass", "masks", "--pass", "rbn"]),
        pytest.param(
            "zoo:resnet8", [], ["--pass", "masks", "--pass", "rbn"], marks=pytest.mark.slow
        ),
    ],
)
def test_round_trip_export(
    tmp_path: Path, model: str, options: list[str], passes: list[str]
) -> None:
    """apply --export and export: torch.export.load gives the artifact's eval outputs,
    for other batch sizes too."""
    out, program = tmp_path / "m.safetensors", tmp_path / "m.pt2"
    result = run("apply", model, *options, *passes, "--export", str(program), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == f"... exporting {program} (torch.export, eval mode)"
    assert result.stdout.splitlines()[-1].startswith(f"wrote {program} (")
    loaded = io.load(out)
    x = torch.randn(5, *io.default_inputs(loaded)[0].shape[1:])
    assert torch.equal(torch.export.load(program).module()(x), eval_out(loaded, x))

    again = tmp_path / "again.pt2"
    exported = run("export", str(out), "-o", str(again))
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.startswith(f"wrote {again} (")
    assert torch.equal(torch.export.load(again).module()(x), eval_out(loaded, x))
    assert_user_error(run("export", str(out), "-o", str(again)), "already exists", "--force")
    forced = run("export", str(out), "-o", str(again), "--force", "--json")
    assert json.loads(forced.stdout)["output"] == str(again)


def test_apply_to_an_exported_program(tmp_path: Path) -> None:
    model = zoo.create("digits_cnn", width=4).eval()
    pt2 = tmp_path / "digits.pt2"
    torch.export.save(torch.export.export(model, zoo.example_inputs("digits_cnn", width=4)), pt2)
    out = tmp_path / "lifted.safetensors"
    result = run("apply", str(pt2), "--pass", "masks", "--pass", "rbn", "--json", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --json is quiet
    report = json.loads(result.stdout)
    assert [(p["name"], p["fired"]) for p in report["passes"]] == [("masks", 5), ("rbn", 4)]
    assert report["model"]["model"] == str(pt2.resolve()) and report["checked"] is True
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(eval_out(io.load(out), x), model(x))

    more = run("apply", str(out), "--pass", "masks", "-o", str(tmp_path / "more.safetensors"))
    assert more.exit_code == 0, more.output  # an artifact as MODEL adds passes to it
    info = run("info", str(tmp_path / "more.safetensors")).stdout
    assert "  3. masks" in info and f"model: {pt2.resolve()}" in info


def test_apply_with_weights(tmp_path: Path) -> None:
    trained = io.resolve_source("factories:make", {"width": 3})
    with torch.no_grad():
        trained.fc.bias.fill_(7.0)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "net.safetensors"
    args = ["apply", "factories:make", "--model-option", "width=3", "--pass", "masks"]
    result = run(*args, "--weights", str(tmp_path / "w.pt"), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert torch.equal(io.load(out).fc.bias, torch.full((3,), 7.0))
    assert "weights: " in run("info", str(out)).stdout

    bad = run(*args, "--weights", str(tmp_path / "w.pt"), "-o", str(out), "--force")
    assert bad.exit_code == 0
    wrong = run(
        "apply", "factories:make", "--model-option", "width=5", "--weights",
        str(tmp_path / "w.pt"), "-o", str(tmp_path / "x.safetensors"),
    )  # fmt: skip
    assert_user_error(
        wrong, "do not fit the model", "stem.weight: file (3, 1, 3, 3), model (5, 1, 3, 3)"
    )


# -- pipelines --------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_pipelines_are_valid(example: Path) -> None:
    result = run("check", str(example))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: {example}: zoo:")


def test_examples_cover_the_shipped_passes() -> None:
    assert {p.name for p in EXAMPLES} >= {"masks.toml", "rbn.toml"}


def test_apply_pipeline_file_with_overrides(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[model]\nsource = "zoo:mlp"\noptions = { hidden = [8] }\n'
        '[[pass]]\nname = "masks"\noptions = { exclude = ["layers.2"] }\n'
        '[output]\npath = "from-file.safetensors"\n'
    )
    assert run("apply", "--pipeline", str(pipeline)).exit_code == 0
    assert io.read_pipeline(tmp_path / "from-file.safetensors")["pass"][0]["name"] == "masks"

    out = tmp_path / "sub" / "cli.safetensors"
    result = run("apply", "--pipeline", str(pipeline), "-o", str(out), "--input-shape", "64")
    assert result.exit_code == 0, result.output
    doc = io.read_pipeline(out)
    assert doc["input"] == {"shape": [64], "batch": 2, "dtype": "float32"}
    assert [p["options"]["exclude"] for p in doc["pass"]] == [["layers.2"]]

    no_model = tmp_path / "passes.toml"
    no_model.write_text('[[pass]]\nname = "rbn"\n')
    other = tmp_path / "digits.safetensors"
    result = run("apply", "zoo:digits_cnn", "--pipeline", str(no_model), "-o", str(other))
    assert result.exit_code == 0, result.output
    assert io.read_pipeline(other)["model"]["source"] == "zoo:digits_cnn"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["zoo:mlp"], ["MODEL 'zoo:mlp' and the [model] table", "remove one"]),
        (["--pass", "rbn"], ["--pass cannot be combined with --pipeline"]),
        (["--model-option", "hidden=[4]"], ["describe MODEL; with --pipeline"]),
    ],
)
def test_pipeline_and_command_line_conflicts(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('[model]\nsource = "zoo:mlp"\n')
    result = run("apply", "--pipeline", str(pipeline), *args, "-o", str(tmp_path / "o"))
    assert_user_error(result, *fragments)
    assert_user_error(run("apply", "--pipeline", str(pipeline)), "nothing to write")
    assert_user_error(run("apply", "-o", str(tmp_path / "o")), "Missing argument 'MODEL'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]


def test_check_reports_every_problem(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[model]\nsource = "zoo:mlp"\n[[pass]]\nname = "mask"\n'
        '[[pass]]\nname = "rbn"\noptions = { init = 3 }\n[chekcs]\n'
    )
    result = run("check", str(pipeline))
    assert_user_error(result)
    assert result.stderr.splitlines()[:4] == [
        f"error: {pipeline}: 3 problems ([[pass]] tables count from 1)",
        "  chekcs: unknown section (did you mean 'checks'?); sections: model, input, pass, "
        "checks, output",
        "  pass[1].name: unknown pass 'mask' (did you mean 'masks'?); valid passes: "
        + ", ".join(rewriter.registered()),
        "  pass[2].options.init: expected one of ['preserve', 'paper'], got 3",
    ]
    as_json = run("check", "--json", str(pipeline))
    assert as_json.exit_code == 2
    assert [p["path"] for p in json.loads(as_json.stdout)["problems"]] == [
        "chekcs",
        "pass[1].name",
        "pass[2].options.init",
    ]
    pipeline.write_text('[model]\nsource = "zoo:mlp"\n[[pass]]\nname = "masks"\n')
    valid = json.loads(run("check", "--json", str(pipeline)).stdout)
    assert valid["valid"] is True and valid["passes"][0]["name"] == "masks"


# -- bad inputs: each a message and exit code 2, nothing written --------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (apply arguments before -o, fragments of the error message)."""
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(io.resolve_source("factories:make", {}).state_dict(), str(weights))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[:-50])
    wide = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(
        io.resolve_source("factories:make", {"width": 6}).state_dict(), str(wide)
    )
    (tmp_path / "evil.pt").write_bytes(b"")
    torch.save(Evil(tmp_path / "pwned"), tmp_path / "evil.pt")
    pipelines = {
        "unknown_pass.toml": '[model]\nsource = "zoo:mlp"\n[[pass]]\nname = "rnb"\n',
        "bad_type.toml": '[model]\nsource = "zoo:mlp"\n[[pass]]\nname = "masks"\n'
        "options = { include = 3 }\n",
        "malformed.toml": '[model\nsource = "zoo:mlp"\n',
    }
    for name, text in pipelines.items():
        (tmp_path / name).write_text(text)
    return {
        "missing model file": (
            [str(tmp_path / "missing.pt2")],
            ["no such model file", "missing.pt2"],
        ),
        "missing weights": (
            ["factories:make", "--weights", str(tmp_path / "nope.safetensors")],
            ["no such file", "nope.safetensors"],
        ),
        "truncated weights": (
            ["factories:make", "--weights", str(truncated)],
            ["not a readable safetensors file (truncated or damaged)"],
        ),
        "truncated artifact": ([str(truncated)], ["not a readable safetensors file"]),
        "wrong weight shapes": (
            ["factories:make", "--weights", str(wide)],
            ["do not fit the model", "fc.weight: file (3, 6), model (3, 4)"],
        ),
        "unknown pass": (
            ["--pipeline", str(tmp_path / "unknown_pass.toml")],
            ["pass[1].name: unknown pass 'rnb' (did you mean 'rbn'?)"],
        ),
        "bad option type": (
            ["--pipeline", str(tmp_path / "bad_type.toml")],
            ["pass[1].options.include: expected a list, got 3"],
        ),
        "bad option type on the command line": (
            ["zoo:mlp", "--pass", "masks:include=3"],
            ["pass 'masks': option 'include': expected a list"],
        ),
        "malformed TOML": (
            ["--pipeline", str(tmp_path / "malformed.toml")],
            ["malformed.toml: 1 problem", "not valid TOML: Expected ']'"],
        ),
        "pickle without the flag": (
            [str(tmp_path / "evil.pt")],
            ["refusing to unpickle", "--trust-pickle", "arbitrary code"],
        ),
        "pickled weights": (
            ["factories:make", "--weights", str(tmp_path / "evil.pt")],
            ["not a plain state dict", "weights_only"],
        ),
        "untraceable model": (
            ["factories:untraceable"],
            ["cannot trace DataDependent.forward", "factories.py", "torch.where"],
        ),
        "input of the wrong shape": (
            ["zoo:mlp", "--input-shape", "3,8"],
            ["input: the model fails on the example input (2, 3, 8) float32"],
        ),
        "bad input shape": (["zoo:mlp", "--input-shape", "3,x"], ["--input-shape", "3,x"]),
        "no input for export": (
            ["factories:make", "--export", str(tmp_path / "m.pt2")],
            ["output.export: exporting needs an example input"],
        ),
    }


def test_bad_inputs_end_in_a_message_and_exit_code_2(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    cases = _bad_inputs(files)
    before = sorted(p.name for p in files.iterdir())
    out = tmp_path / "out.safetensors"
    for name, (args, fragments) in cases.items():
        result = run("apply", *args, "-o", str(out))
        try:
            assert_user_error(result, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {result.stderr}") from exc
        assert not out.exists(), name
    assert sorted(p.name for p in files.iterdir()) == before  # no marker file: nothing ran
    assert not (files / "pwned").exists()
    assert_user_error(run("inspect", str(files / "evil.pt")), "refusing to unpickle")
    assert_user_error(run("export", str(files / "evil.pt"), "-o", str(out)), "refusing")
    assert not (files / "pwned").exists()


def test_trusted_pickle_is_loaded(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(io.resolve_source("factories:make", {"width": 2}), whole)
    out = tmp_path / "o.safetensors"
    result = run("apply", str(whole), "--trust-pickle", "--pass", "rbn", "-o", str(out))
    assert result.exit_code == 0, result.output
    # the artifact holds the graph as data: exporting it never opens the pickle again
    whole.unlink()
    assert_user_error(run("export", str(out), "-o", str(tmp_path / "o.pt2")), "--input-shape")
    again = run("export", str(out), "-o", str(tmp_path / "o.pt2"), "--input-shape", "1,6,6")
    assert again.exit_code == 0, again.output


# -- inspect ----------------------------------------------------------------------------------


def test_inspect_zoo_model_text_and_json() -> None:
    result = run("inspect", "zoo:resnet8")
    assert result.exit_code == 0, result.output
    text = result.stdout.splitlines()
    assert text[0] == "model: zoo:resnet8"
    assert "example input: 2x3x32x32" in text
    layers = next(line for line in text if line.startswith("layers: "))
    assert "Conv2d 9" in layers and "BatchNorm2d 9" in layers and "Linear 1" in layers
    assert any(line.startswith("parameters: 78,042 (78,042 trainable)") for line in text)
    assert any(line.startswith("MACs: ") and "for batch 2" in line for line in text)
    assert "residual blocks: 3" in text
    assert any(line.startswith("channel groups: ") for line in text)
    assert "opaque modules: none" in text

    data = json.loads(run("inspect", "zoo:resnet8", "--json").stdout)
    assert data["layers"]["Conv2d"] == 9 and data["parameters"] == 78042
    assert data["residual_blocks"]["count"] == 3
    assert data["macs"]["total"] > 0 and data["macs"]["batch"] == 2
    groups = data["channel_groups"]
    assert groups["count"] == groups["prunable"] + sum(g["groups"] for g in groups["not_prunable"])


def test_inspect_factory_with_opaque_module_and_without_input() -> None:
    result = run("inspect", "factories:make", "--model-option", "opaque=true")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "opaque modules (passes cannot see inside):\n  flip: TraceError" in text
    assert "MACs: unavailable (needs an example input (give --input-shape))" in text
    with_input = run(
        "inspect", "factories:make", "--input-shape", "1,6,6", "--batch", "3", "--json"
    )
    data = json.loads(with_input.stdout)
    assert data["inputs"] == [[3, 1, 6, 6]] and data["macs"]["batch"] == 3
    assert set(data["opaque"]) == set()


# -- info --toml ------------------------------------------------------------------------------


def test_info_toml_is_a_pipeline_file(tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    assert run("apply", "zoo:mlp", "--pass", "masks", "-o", str(out)).exit_code == 0
    text = run("info", "--toml", str(out)).stdout
    (tmp_path / "again.toml").write_text(text)
    assert run("check", str(tmp_path / "again.toml")).exit_code == 0
    again = tmp_path / "again.safetensors"
    result = run("apply", "--pipeline", str(tmp_path / "again.toml"), "-o", str(again))
    assert result.exit_code == 0, result.output
    assert io.read_pipeline(again)["pass"] == io.read_pipeline(out)["pass"]


@pytest.mark.slow
def test_subprocess_pipeline_check_apply_export(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[model]\nsource = "factories:make"\noptions = { width = 3 }\n'
        "[input]\nshape = [1, 6, 6]\n"
        '[[pass]]\nname = "masks"\n[[pass]]\nname = "rbn"\n'
        '[output]\npath = "net.safetensors"\nexport = "net.pt2"\n'
    )
    check = _python_m_rewriter("check", str(pipeline), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout == (
        f"ok: {pipeline}: factories:make; masks, rbn\n"
        "note: the factory factories:make was not imported (check reads names only); "
        "`rewriter apply` imports it\n"
    )

    applied = _python_m_rewriter("apply", "--pipeline", str(pipeline), "--json", cwd=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert applied.stderr == ""
    report = json.loads(applied.stdout)
    assert [p["name"] for p in report["passes"]] == ["masks", "rbn"]
    assert report["export"] == str(tmp_path / "net.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt2", "net.safetensors", "p.toml"]

    loaded = io.load(tmp_path / "net.safetensors")
    x = torch.randn(4, 1, 6, 6)
    program = torch.export.load(tmp_path / "net.pt2").module()
    assert torch.equal(program(x), eval_out(loaded, x))

    again = _python_m_rewriter("apply", "--pipeline", str(pipeline), cwd=tmp_path)
    assert again.returncode == 2
    assert "output.path: " in again.stderr and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
