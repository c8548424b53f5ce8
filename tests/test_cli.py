"""The ``rewriter`` command line, through click's CliRunner and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
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
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


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
