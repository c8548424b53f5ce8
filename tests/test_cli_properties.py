"""Random pipeline files through the CLI: either success with checked outputs, or a
``rewriter`` error (exit code 2, an ``error:`` message, nothing written); never a crash."""

from __future__ import annotations

import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rewriter
from rewriter import io
from rewriter import pipeline as pl
from rewriter.cli import cli

MODELS = {"zoo:mlp": {"hidden": [8]}, "zoo:digits_cnn": {"width": 2}}
NAMES = ["fc", "layers.*", "layers.0", "stem.*", "block.conv1", "*", "Conv2d", "Linear"]
JUNK = st.one_of(
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=6),
    st.lists(st.integers(-2, 2), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


def values_for(tp: Any) -> st.SearchStrategy[Any]:
    """Values an option of type ``tp`` accepts (TOML-representable)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([values_for(a) for a in args if a is not type(None)])
    if origin is tuple:
        item = st.sampled_from(NAMES) if args[0] is str else values_for(args[0])
        return st.lists(item, max_size=2)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(0, 4)
    if tp is float:
        return st.floats(0, 1)
    if tp is str:
        return st.sampled_from(NAMES)
    return JUNK


@st.composite
def pass_tables(draw: st.DrawFn) -> dict[str, Any]:
    # Built-in passes only: other test modules register deliberately broken passes.
    passes = {
        n: c for n, c in rewriter.registered().items() if c.__module__.startswith("rewriter.passes")
    }
    name = draw(st.one_of(st.sampled_from(sorted(passes)), st.sampled_from(["mask", "rbnn", ""])))
    table: dict[str, Any] = {"name": name}
    if name in passes and draw(st.booleans()):
        options = {}
        for spec in rewriter.option_specs(passes[name]):
            if draw(st.booleans()):
                valid = draw(st.integers(0, 4)) > 0
                options[spec.name] = draw(values_for(spec.type) if valid else JUNK)
        if draw(st.integers(0, 5)) == 0:
            options[draw(st.sampled_from(["bogus", "includ", "rate"]))] = draw(JUNK)
        table["options"] = options
    return table


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    source = draw(st.sampled_from(sorted(MODELS)))
    model: dict[str, Any] = {"source": source, "options": dict(MODELS[source])}
    if draw(st.integers(0, 6)) == 0:
        model["options"]["depth"] = draw(JUNK)  # no such option
    doc: dict[str, Any] = {"model": model, "pass": draw(st.lists(pass_tables(), max_size=3))}
    if draw(st.booleans()):
        checks = {}
        for key, tp in pl.CHECK_TYPES.items():
            if draw(st.integers(0, 3)) == 0:
                checks[key] = draw(values_for(tp) if draw(st.booleans()) else JUNK)
        doc["checks"] = checks
    if draw(st.integers(0, 4)) == 0:
        doc[draw(st.sampled_from(["inputs", "chekcs", "extra"]))] = {"x": 1}
    return doc


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(documents())
def test_random_pipelines_succeed_with_checked_outputs_or_fail_cleanly(doc: dict) -> None:
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pipeline.toml"
        path.write_text(tomli_w.dumps(doc))
        out = Path(tmp) / "out.safetensors"
        check = runner.invoke(cli, ["check", str(path)])
        applied = runner.invoke(cli, ["apply", "--pipeline", str(path), "-o", str(out)])

        for result in (check, applied):
            assert result.exit_code in (0, 2), result.output
            assert "Traceback" not in result.output
            if result.exit_code == 2:
                assert "error: " in result.stderr
        event(f"check {check.exit_code}, apply {applied.exit_code}")
        if check.exit_code == 2:  # an invalid file never runs
            assert applied.exit_code == 2
            assert not out.exists()
            return
        if applied.exit_code == 2:  # valid, but a pass or check refused this model
            assert isinstance(applied.exception, SystemExit)
            assert not out.exists()
            return

        # Success: the artifact reloads to exactly the model the pipeline describes.
        p = pl.read(path)
        expected = rewriter.rewrite(pl.build_model(p), list(p.passes), checks=p.checks)
        loaded = io.load(out)
        assert rewriter.report(loaded).pipeline() == rewriter.report(expected).pipeline()
        x = io.default_inputs(loaded)[0]
        assert torch.equal(outputs(loaded, x), outputs(expected, x))
        assert bool(torch.isfinite(outputs(loaded, x)).all())
