"""Adversarial inputs: files are data, options have domains, every user error exits 2.

Each attack test builds its malicious input in a temporary directory, runs the CLI
(``CliRunner``, or a subprocess where ``sys.path`` and the working directory
matter) or the Python API, and asserts that the marker file the payload would
create never appears and that the CLI exits 2 with an ``error:`` message.
"""

from __future__ import annotations

import dataclasses
import io as bytes_io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import tomli_w
import torch
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import rewriter as rw
from rewriter import io, pt2gate, zoo
from rewriter.cli import cli
from rewriter.errors import ArtifactError, OptionError, UnsafeFileError
from rewriter.registry import LIMITS, registered

ROOT = Path(__file__).parent.parent


class Evil:
    """Unpickling this creates ``marker`` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result: Result, marker: Path | None = None, *fragments: str) -> str:
    """Exit 2, an ``error:`` message without a traceback, the marker never created."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    _, _, message = result.stderr.partition("error: ")
    assert message, result.stderr
    for fragment in fragments:
        assert fragment in message, message
    if marker is not None:
        assert not marker.exists(), f"the payload ran: {marker} exists"
    return message


def one_line(message: str) -> None:
    assert message.strip() and "\n" not in message.strip(), message


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging forever if a read blocks (FIFO, /dev/zero)."""

    def hang(signum, frame):  # noqa: ANN001, ANN202
        raise TimeoutError("the command hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# -- artifacts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("artifact") / "mlp.safetensors"
    result = run("apply", "zoo:mlp", "--pass", "masks", "-o", path)
    assert result.exit_code == 0, result.output
    return path


def craft(src: Path, dst: Path, edit: Callable[[dict], None], *, keep_graph: bool = True) -> Path:
    """A copy of the artifact ``src`` whose pipeline metadata went through ``edit``."""
    with safe_open(str(src), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = tensors_of(src)
    document = tomllib.loads(metadata[io.METADATA_KEY])
    edit(document)
    metadata[io.METADATA_KEY] = tomli_w.dumps(document)
    if not keep_graph:
        metadata = {k: v for k, v in metadata.items() if k in ("format", io.METADATA_KEY)}
    safetensors.torch.save_file(tensors, str(dst), metadata=metadata)
    return dst


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def evil_factory_module(folder: Path, marker: Path) -> str:
    """A module that creates ``marker`` when imported; returns its factory spec."""
    (folder / "evil_factory.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import rewriter.zoo\n"
        "def make(**kw):\n"
        "    return rewriter.zoo.create('mlp')\n"
    )
    return "evil_factory:make"


@pytest.mark.parametrize("keep_graph", [True, False], ids=["graph", "replay"])
def test_artifact_metadata_naming_a_factory_never_runs_it(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_graph: bool
) -> None:
    """Finding 1: `[model] source` naming os:system or an importable module runs nothing."""
    marker = tmp_path / "pwned"
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, so only the policy stops it
    monkeypatch.chdir(tmp_path)
    shell = craft(
        artifact,
        tmp_path / "shell.safetensors",
        lambda d: d["model"].update(source="os:system", options={"command": f"touch {marker}"}),
        keep_graph=keep_graph,
    )
    spec = evil_factory_module(tmp_path, marker)
    module = craft(
        artifact,
        tmp_path / "module.safetensors",
        lambda d: d["model"].update(source=spec, options={}),
        keep_graph=keep_graph,
    )
    for crafted in (shell, module):
        for args in (
            ("inspect", crafted),
            ("apply", crafted, "--pass", "rbn", "-o", tmp_path / "out.safetensors"),
            ("export", crafted, "-o", tmp_path / "out.pt2"),
        ):
            result = run(*args)
            assert not marker.exists(), f"{args[0]} ran the factory"
            if not keep_graph:  # nothing to rebuild from without the factory
                refused(result, marker, "--trust-source")
        assert run("info", crafted).exit_code == 0
        assert run("check", crafted).exit_code in (0, 2)  # a pipeline file: names only
        assert not marker.exists()
        if not keep_graph:
            with pytest.raises(ArtifactError, match="trust_source"):
                rw.load(crafted)
        else:
            rw.load(crafted)
        assert not marker.exists()


def test_artifact_metadata_naming_a_pickle_is_never_unpickled(
    artifact: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    pickled = tmp_path / "model.pt"
    torch.save(Evil(marker), pickled)
    crafted = craft(
        artifact,
        tmp_path / "p.safetensors",
        lambda d: d["model"].update(source=str(pickled), options={}),
        keep_graph=False,
    )
    refused(run("inspect", crafted), marker)
    refused(run("export", crafted, "-o", tmp_path / "o.pt2"), marker)
    with pytest.raises(ArtifactError):
        rw.load(crafted)
    assert not marker.exists()
    # [model] weights is provenance only: a pickle named there is never opened
    for keep_graph in (True, False):
        weights = craft(
            artifact,
            tmp_path / f"w{keep_graph}.safetensors",
            lambda d: d["model"].update(weights=str(pickled)),
            keep_graph=keep_graph,
        )
        rw.load(weights)
        assert run("inspect", weights).exit_code == 0
        assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.update({"pass": [{"name": "masks", "options": {}}] * 10_000}), "--max-passes"),
        (lambda d: d.update(input={"shape": [3, 100_000, 100_000], "batch": 2}), "elements"),
        (
            lambda d: d["pass"].append({"name": "synflow", "options": {"iterations": 10**8}}),
            "'iterations'",
        ),
    ],
    ids=["passes", "input", "option"],
)
def test_artifact_metadata_limits(artifact: Path, tmp_path: Path, edit, fragment: str) -> None:
    """Finding 4: an artifact cannot ask for 10,000 passes or a 20 GB example input."""
    crafted = craft(artifact, tmp_path / "c.safetensors", edit, keep_graph=False)
    with pytest.raises(ArtifactError, match=fragment):
        rw.load(crafted)
    refused(run("export", crafted, "-o", tmp_path / "o.pt2"), None, fragment)


def test_deeply_nested_artifact_metadata_is_an_artifact_error(
    artifact: Path, tmp_path: Path
) -> None:
    """Finding 5: RecursionError while reading metadata becomes ArtifactError / exit 2."""
    with safe_open(str(artifact), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata[io.METADATA_KEY] = "x = " + "[" * 100_000 + "]" * 100_000
    bad = tmp_path / "deep.safetensors"
    safetensors.torch.save_file(tensors_of(artifact), str(bad), metadata=metadata)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        rw.load(bad)
    one_line(refused(run("info", bad)))


def test_truncated_artifact_is_an_artifact_error(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.safetensors"
    data = artifact.read_bytes()
    bad.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError):
        rw.load(bad)
    refused(run("inspect", bad))


# -- .pt2 programs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An eval-mode program of zoo:mlp with a dynamic batch (symbolic expressions inside)."""
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    model = zoo.create("mlp").eval()
    dynamic = ({0: torch.export.Dim.AUTO},)
    ep = torch.export.export(model, zoo.example_inputs("mlp"), dynamic_shapes=dynamic)
    torch.export.save(ep, path)
    return path


def edit_archive(
    src: Path,
    dst: Path,
    edit: Callable[[str, bytes], bytes] = lambda name, data: data,
    extra: tuple[tuple[str, bytes], ...] = (),
) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/")[0]
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))
        for name, data in extra:
            info = zipfile.ZipInfo(f"{root}/{name}")
            zout.writestr(info, data)
    return dst


def replace_json(key: str, value: object) -> Callable[[str, bytes], bytes]:
    """Edit models/*.json: the first ``key`` found gets ``value``."""

    def edit(name: str, data: bytes) -> bytes:
        if "/models/" not in name or not name.endswith(".json"):
            return data
        document = json.loads(data)
        stack = [document]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if key in item:
                    item[key] = value
                    return json.dumps(document).encode()
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        raise AssertionError(f"no {key!r} in {name}")

    return edit


def all_commands(path: Path, tmp_path: Path) -> list[tuple[str | Path, ...]]:
    return [
        ("inspect", path),
        ("apply", path, "--pass", "masks", "-o", tmp_path / "out.safetensors"),
        ("export", path, "-o", tmp_path / "out2.pt2"),
    ]


def test_symbolic_expression_in_pt2_is_never_evaluated(program: Path, tmp_path: Path) -> None:
    """Finding 2a: an expr_str reaches sympify only if it is in the grammar."""
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    evil = edit_archive(program, tmp_path / "evil.pt2", replace_json("expr_str", payload))
    for args in all_commands(evil, tmp_path):
        message = refused(run(*args), marker, "models/model.json", "symbolic expression")
        one_line(message)
    with pytest.raises(UnsafeFileError, match="expr_str"):
        rw.load_pt2(evil)
    assert not marker.exists()


def test_guards_and_node_targets_in_pt2_are_checked(program: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    guard = edit_archive(
        program,
        tmp_path / "guard.pt2",
        replace_json("guards_code", [f"__import__('os').system('touch {marker}')"]),
    )
    refused(run("inspect", guard), marker, "guard")
    target = edit_archive(program, tmp_path / "target.pt2", replace_json("target", "torch.load"))
    refused(run("inspect", target), marker, "node target 'torch.load'")


def test_duplicate_pt2_entry_with_a_pickle_is_refused(program: Path, tmp_path: Path) -> None:
    """Finding 2b: zipfile reads the last copy, torch may read another: duplicates refused."""
    marker = tmp_path / "pwned"
    payload = bytes_io.BytesIO()
    torch.save(((Evil(marker),), {}), payload)
    names = zipfile.ZipFile(program).namelist()
    sample = next(n for n in names if "/data/sample_inputs/" in n).split("/", 1)[1]
    with pytest.warns(UserWarning, match="Duplicate name"):
        evil = edit_archive(program, tmp_path / "dup.pt2", extra=((sample, payload.getvalue()),))
    for args in all_commands(evil, tmp_path):
        refused(run(*args), marker, "appears twice", sample)
    # the same name in another case: torch's reader matches names case-insensitively
    upper = edit_archive(program, tmp_path / "case.pt2", extra=((sample.upper(), b"x"),))
    refused(run("inspect", upper), marker, "appears twice")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("data/aotinductor/model.so", b"\x7fELF"), "AOTInductor"),
        (("data/constants/custom_obj_0", b"\x80\x04."), "custom objects"),
        (("payload.py", b"print(1)"), "not part of the layout"),
        (("../escape", b""), "malformed entry name"),
    ],
)
def test_unexpected_pt2_entries_are_refused(program: Path, tmp_path: Path, extra, fragment):
    path = edit_archive(program, tmp_path / "x.pt2", extra=(extra,))
    refused(run("inspect", path), None, fragment)


def test_pickled_sample_inputs_and_weights_configs_are_refused(
    program: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = bytes_io.BytesIO()
    torch.save(((Evil(marker),), {}), payload)
    evil = edit_archive(
        program,
        tmp_path / "s.pt2",
        lambda n, d: payload.getvalue() if "/data/sample_inputs/" in n else d,
    )
    refused(run("inspect", evil), marker, "sample_inputs", "pickled")

    def use_pickle(name: str, data: bytes) -> bytes:
        if not name.endswith("_weights_config.json"):
            return data
        config = json.loads(data)
        for meta in config["config"].values():
            meta["use_pickle"] = True
        return json.dumps(config).encode()

    refused(run("inspect", edit_archive(program, tmp_path / "w.pt2", use_pickle)), marker)


def test_compressed_pt2_entries_are_refused(program: Path, tmp_path: Path) -> None:
    """A deflated entry could be a zip bomb; torch.export.save never compresses."""
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(program) as zin, zipfile.ZipFile(bomb, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, zin.read(item), compress_type=zipfile.ZIP_DEFLATED)
    refused(run("inspect", bomb), None, "compressed")


def test_gate_accepts_what_torch_writes_for_dynamic_shapes(tmp_path: Path) -> None:
    """The grammars cover what torch 2.13 writes: FloorDiv, Mod, Max, products, guards."""

    class Shapes(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            half = x[:, :, : x.shape[2] // 2]
            return half.flatten(1).sum(1) * max(x.shape[1], 2), x.shape[0] % 3

    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO},)
    ep = torch.export.export(Shapes(), (torch.randn(4, 3, 8),), dynamic_shapes=dims)
    path = tmp_path / "shapes.pt2"
    torch.export.save(ep, path)
    with zipfile.ZipFile(path) as archive:
        text = archive.read(next(n for n in archive.namelist() if "/models/" in n)).decode()
    assert "FloorDiv(" in text and "Mod(" in text and '"guards_code"' in text
    pt2gate.check(path)  # no error
    assert isinstance(rw.load_pt2(path), torch.export.ExportedProgram)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "Symbol('s1').__class__",
        "Pow(Integer(10), Integer(10000000))",
        "Integer(2)**Integer(100000)",
        "Function('f')(s0)",
        "[s0 for s0 in (1,)]",
        "Symbol('__builtins__')",
        "eval",
        "s0 << 100000",
    ],
)
def test_expression_grammar_rejects(text: str) -> None:
    assert pt2gate.expression_problem(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(24), Symbol('s53', positive=True, integer=True))",
        "FloorDiv(Symbol('s53', positive=True, integer=True), Integer(2))",
        "Max(1, s0) + Min(s1, 3) - CeilDiv(s0, 4)",
        "PythonMod(s0, 3) >= 0",
        "Eq(s0*s1, 12)",
    ],
)
def test_expression_grammar_accepts(text: str) -> None:
    assert pt2gate.expression_problem(text) is None


# -- the working directory and sys.path (finding 3) ----------------------------------------


def _cli_command() -> list[str]:
    script = shutil.which("rewriter")
    return [script] if script else [sys.executable, "-P", "-m", "rewriter.cli"]


@pytest.mark.slow  # a subprocess: about 15 s on two shared cores
def test_stray_modules_in_the_working_directory_never_run(tmp_path: Path) -> None:
    """A zoo model never puts the working directory on sys.path; a factory the user typed
    finds it last and only while its module is imported, so stray modules named like
    stdlib or optional dependencies (colorsys, sympy, gmpy2) never run. One process
    without the working directory on sys.path (``python -P``, like the console script)
    runs both commands."""
    marker = tmp_path / "pwned"
    for name in ("colorsys", "sympy", "gmpy2"):
        (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "mymodels.py").write_text(
        "from rewriter import zoo\n\ndef make():\n    return zoo.create('mlp')\n"
    )
    script = textwrap.dedent(
        """
        import sys
        from rewriter.cli import cli
        assert "" not in sys.path and sys.path[0] != ".", sys.path
        for args in (["zoo:mlp"], ["mymodels:make", "--input-shape", "64"]):
            out = args[0].replace(":", "_") + ".safetensors"
            code = cli.main(["apply", *args, "--pass", "masks", "-o", out], standalone_mode=False)
            assert code in (None, 0), code
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-P", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "zoo_mlp.safetensors").is_file()
    assert (tmp_path / "mymodels_make.safetensors").is_file()
    assert not marker.exists(), "a stray module in the working directory ran"


# -- resources (finding 4) -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory"])
def test_only_regular_files_are_read(tmp_path: Path, kind: str, alarm: None) -> None:
    if kind == "dev_zero":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    elif kind == "fifo":
        path = tmp_path / "fifo.pt2"
        os.mkfifo(path)
    else:
        path = tmp_path / "folder.pt2"
        path.mkdir()
    out = tmp_path / "o.safetensors"
    for args in (
        ("apply", path, "--pass", "masks", "-o", out),
        ("inspect", path),
        ("info", path),
        ("export", path, "-o", tmp_path / "o.pt2"),
        ("apply", "zoo:mlp", "--weights", path, "--pass", "masks", "-o", out),
        ("apply", "--pipeline", path, "-o", out),
        ("check", path),
    ):
        result = run(*args)
        refused(result)
        assert not out.exists()


def test_limits_on_passes_options_and_inputs(tmp_path: Path) -> None:
    pipeline = tmp_path / "many.toml"
    pipeline.write_text("[model]\nsource = 'zoo:mlp'\n" + "[[pass]]\nname = 'masks'\n" * 10_000)
    refused(run("check", pipeline), None, "10000 passes", "--max-passes")
    refused(run("apply", "--pipeline", pipeline, "-o", tmp_path / "o.safetensors"))
    passes = [x for _ in range(65) for x in ("--pass", "masks")]
    refused(run("apply", "zoo:mlp", *passes, "-o", tmp_path / "o.safetensors"), None, "limit")

    big = ("--pass", "synflow:iterations=100000000")
    message = refused(run("apply", "zoo:mlp", *big, "-o", tmp_path / "o.safetensors"))
    assert "'synflow'" in message and "'iterations'" in message and "10000" in message
    huge = ("--input-shape", "3,100000,100000")
    refused(run("inspect", "tests.factories:make", *huge), None, "--max-input-elements")
    toml = tmp_path / "input.toml"
    toml.write_text("[model]\nsource = 'zoo:mlp'\n[input]\nshape = [3, 100000, 100000]\n")
    refused(run("check", toml), None, "input.shape", "elements")

    # the user can raise every limit
    many = tmp_path / "three.toml"
    many.write_text("[model]\nsource = 'zoo:mlp'\n" + "[[pass]]\nname = 'masks'\n" * 3)
    refused(run("check", "--max-passes", "2", many))
    assert run("check", "--max-passes", "3", many).exit_code == 0
    assert run("check", "--allow-large-options", toml).exit_code == 2  # input still capped
    assert LIMITS.max_passes == 64 and LIMITS.options  # restored after each command


# -- user errors exit 2 (finding 5) ---------------------------------------------------------


def test_broken_factories_and_model_options(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "raising.py").write_text("def make():\n    raise RuntimeError('boom')\n")
    (tmp_path / "syntax.py").write_text("def make(:\n")
    out = tmp_path / "o.safetensors"
    one_line(refused(run("apply", "raising:make", "--pass", "masks", "-o", out), None, "boom"))
    one_line(refused(run("apply", "syntax:make", "--pass", "masks", "-o", out), None, "Syntax"))
    for value in ("-1", "abc"):
        message = refused(
            run("apply", "zoo:digits_cnn", "--model-option", f"width={value}", "--pass", "masks",
                "-o", out)
        )  # fmt: skip
        one_line(message)
        assert f"width={value!r}" in message.replace('"', "'") or f"width={value}" in message
        assert "--model-option" in message


def test_unwritable_output_directory(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/sys/rewriter-test/o.safetensors")  # read-only even for root
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        target = folder / "o.safetensors"
    message = refused(run("apply", "zoo:mlp", "--pass", "masks", "-o", target), None, str(target))
    one_line(message)
    with pytest.raises(ArtifactError):
        rw.save(rw.rewrite(zoo.create("mlp"), ["masks"]), target)


def test_deeply_nested_toml_pipelines_and_options(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    refused(run("check", deep), None, "nested too deeply")
    refused(run("apply", "--pipeline", deep, "-o", tmp_path / "o.safetensors"))
    nested = "[" * 100_000 + "]" * 100_000
    refused(run("apply", "zoo:mlp", "--pass", f"masks:exclude={nested}", "-o", tmp_path / "o"))


# -- option domains (finding 6) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "option", "allowed"),
    [
        (("saliency_gates", {"gamma": math.nan}), "gamma", ">= 0"),
        (("saliency_gates", {"lambda_lasso": -1}), "lambda_lasso", ">= 0"),
        (("skip_gates", {"temperature": math.inf}), "temperature", "> 0"),
        (("synflow", {"iterations": 0}), "iterations", ">= 1"),
        (("split", {"rate": 1.5}), "rate", "(0, 1)"),
    ],
)
def test_option_outside_its_domain_names_pass_option_and_range(spec, option, allowed):
    with pytest.raises(OptionError) as info:
        rw.make_pass(spec)
    message = str(info.value)
    assert f"pass {spec[0]!r}" in message
    assert f"option {option!r}" in message
    assert allowed in message


@pytest.mark.parametrize(
    "spec",
    ["saliency_gates:gamma=nan", "saliency_gates:lambda_lasso=-1", "skip_gates:temperature=inf"],
)
def test_option_domains_on_the_cli_and_in_toml(tmp_path: Path, spec: str) -> None:
    name, _, option = spec.partition(":")
    key, _, value = option.partition("=")
    one_line(
        refused(run("apply", "zoo:resnet8", "--pass", spec, "-o", tmp_path / "o"), None, key, name)
    )
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f"[model]\nsource = 'zoo:resnet8'\n[[pass]]\nname = '{name}'\noptions = {{ {key} = {value} }}\n"
    )
    refused(run("check", pipeline), None, f"pass[1].options.{key}", "must be")


def test_direct_construction_checks_the_domain_too() -> None:
    cls = registered()["saliency_gates"]
    with pytest.raises(OptionError, match="'gamma'"):
        cls(gamma=math.nan)


def test_resource_limit_on_an_option_can_be_lifted() -> None:
    with pytest.raises(OptionError, match="--allow-large-options"):
        rw.make_pass(("synflow", {"iterations": 10**8}))
    with rw.option_limits(False):
        assert rw.make_pass(("synflow", {"iterations": 10**8})).iterations == 10**8
    assert LIMITS.options  # restored


def built_in() -> dict[str, type[rw.Pass]]:
    """The library's passes (tests elsewhere register their own into the same registry)."""
    return {n: c for n, c in registered().items() if c.__module__.startswith("rewriter.passes")}


def test_every_built_in_option_declares_a_domain() -> None:
    missing = [
        f"{name}:{field.name}"
        for name, cls in built_in().items()
        for field in dataclasses.fields(cls)
        if field.metadata.get("domain") is None
    ]
    assert not missing, f"options without a declared domain: {missing}"


def test_every_default_lies_in_its_domain() -> None:
    for name, cls in built_in().items():
        specs = rw.option_specs(cls)
        for spec in specs:
            assert rw.registry.domain_problem(spec, spec.default) is None, (name, spec.name)


# -- outputs (finding 7) -------------------------------------------------------------------


def test_same_output_and_export_is_refused_before_any_work(tmp_path: Path) -> None:
    same = tmp_path / "x.out"
    result = run("apply", "zoo:mlp", "--pass", "masks", "-o", same, "--export", same, "--force")
    refused(result, None, "same file")
    assert "building" not in result.stderr
    assert not same.exists()
    pipeline = tmp_path / "p.toml"
    pipeline.write_text("[model]\nsource = 'zoo:mlp'\n[output]\npath = 'a.x'\nexport = 'a.x'\n")
    refused(run("check", pipeline), None, "output.export", "same file")


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".{out.name}.{dead}-0123456789ab.tmp"
    stale.write_bytes(b"partial")
    legacy = tmp_path / f".{out.name}.abcdef012345.tmp"
    legacy.write_bytes(b"partial")
    os.utime(legacy, (1, 1))  # an old release's temp file, hours old
    fresh_other = tmp_path / f".{out.name}.{os.getppid()}-0123456789ab.tmp"
    fresh_other.write_bytes(b"a write in progress")  # a live process: left alone
    assert run("apply", "zoo:mlp", "--pass", "masks", "-o", out).exit_code == 0
    assert out.is_file()
    assert not stale.exists() and not legacy.exists()
    assert fresh_other.exists()


# -- weights and pipelines (other places a file is accepted) --------------------------------


def test_pickled_weights_file_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": Evil(marker)}, weights)
    out = tmp_path / "o.safetensors"
    refused(run("apply", "zoo:mlp", "--weights", weights, "--pass", "masks", "-o", out), marker)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"[model]\nsource = 'zoo:mlp'\nweights = '{weights}'\n")
    refused(run("apply", "--pipeline", pipeline, "-o", out), marker)


def test_pipeline_check_imports_nothing_and_pickles_need_trust(tmp_path: Path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = evil_factory_module(tmp_path, marker)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"[model]\nsource = '{spec}'\n[[pass]]\nname = 'masks'\n")
    result = run("check", pipeline)
    assert result.exit_code == 0, result.output
    assert f"the factory {spec} was not imported" in result.stdout
    assert not marker.exists()

    pickled = tmp_path / "model.pt"
    torch.save(Evil(marker), pickled)
    pipeline.write_text(f"[model]\nsource = '{pickled}'\n")
    refused(run("check", pipeline), marker, "--trust-pickle")
    refused(run("apply", "--pipeline", pipeline, "-o", tmp_path / "o.safetensors"), marker)
    refused(run("inspect", pickled), marker, "--trust-pickle")


# -- CLI messages (issue 15) ---------------------------------------------------------------


def test_existing_output_message_is_cli_advice(tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    assert run("apply", "zoo:mlp", "--pass", "masks", "-o", out).exit_code == 0
    message = refused(run("apply", "zoo:mlp", "--pass", "masks", "-o", out), None, "--force")
    assert "force=True" not in message
    with pytest.raises(ArtifactError, match="force=True"):  # Python advice in Python
        rw.save(rw.rewrite(zoo.create("mlp"), ["masks"]), out)


def test_data_passes_are_refused_up_front_without_class_names(tmp_path: Path) -> None:
    for name in ("snip", "grasp"):
        result = run("apply", "zoo:mlp", "--pass", name, "-o", tmp_path / "o.safetensors")
        message = refused(result, None, "needs training batches", "with_data")
        assert "RewriterError" not in message and "building" not in result.stderr
        pipeline = tmp_path / f"{name}.toml"
        pipeline.write_text(f"[model]\nsource = 'zoo:mlp'\n[[pass]]\nname = '{name}'\n")
        assert "ok" not in run("check", pipeline).stdout
        refused(run("check", pipeline), None, "pass[1].name", "needs training batches")
    listing = run("passes").stdout
    for name in ("snip", "grasp"):
        block = listing.split(f"\n{name}: ", 1)[1].split("\n\n", 1)[0]
        assert "needs data from Python" in block
    with pytest.raises(rw.PassError) as info:
        rw.rewrite(zoo.create("mlp"), ["snip"])
    assert "RewriterError" not in str(info.value)


def test_zoo_prefix_and_directories_in_messages(tmp_path: Path) -> None:
    message = refused(run("inspect", "zoo:resnet18"), None, "'zoo:resnet18'", "zoo:resnet8")
    one_line(message)
    folder = tmp_path / "models"
    folder.mkdir()
    for spec in (str(folder), "models"):
        os.chdir(tmp_path)
        try:
            message = refused(run("inspect", spec), None, "is a directory")
        finally:
            os.chdir(ROOT)
        assert "not a zoo model" not in message


def test_info_always_has_an_input_line(artifact: Path, tmp_path: Path) -> None:
    lines = run("info", artifact).stdout.splitlines()
    assert "input: 2x64 float32 (the zoo model's default)" in lines
    piped = tmp_path / "p.safetensors"
    assert run("apply", "zoo:mlp", "--input-shape", "64", "--batch", "3", "--pass", "masks",
               "-o", piped).exit_code == 0  # fmt: skip
    assert "input: 3x64 float32" in run("info", piped).stdout.splitlines()
    crafted = craft(artifact, tmp_path / "f.safetensors",
                    lambda d: d["model"].update(source="tests.factories:make"))  # fmt: skip
    assert "input: none recorded (export needs --input-shape)" in run("info", crafted).stdout


def test_readme_pipeline_command_works_for_every_shipped_pipeline() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"rewriter apply --pipeline [^`]*", readme)
    assert commands and all(re.search(r"\s-o\s", c) for c in commands), commands
    for pipeline in sorted((ROOT / "examples" / "pipelines").glob("*.toml")):
        result = run("check", pipeline)
        assert result.exit_code == 0, (pipeline.name, result.output)
        text = pipeline.read_text()
        assert f"rewriter apply --pipeline examples/pipelines/{pipeline.name} -o" in text


@pytest.mark.slow
def test_every_shipped_pipeline_applies_as_the_readme_says(tmp_path: Path) -> None:
    for pipeline in sorted((ROOT / "examples" / "pipelines").glob("*.toml")):
        out = tmp_path / f"{pipeline.stem}.safetensors"
        result = run("apply", "--pipeline", pipeline, "-o", out)
        assert result.exit_code == 0, (pipeline.name, result.output)
        assert out.is_file()


def test_readme_exit_codes_match_the_cli() -> None:
    readme = (ROOT / "README.md").read_text()
    table = textwrap.dedent(readme.split("| exit code |", 1)[1].split("\n\n", 1)[0])
    assert "| 0 |" in table and "| 1 |" in table and "| 2 |" in table
    assert run("passes").exit_code == 0
    assert run("info", "/nonexistent/x.safetensors").exit_code == 2
    assert run("apply").exit_code == 2  # usage errors are user errors too


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_option_value_is_accepted_inside_its_domain_or_refused_by_name(data) -> None:
    """Property: for every pass and option, a value either builds a pass whose option lies
    in the declared domain (finite for floats) or raises OptionError naming the option."""
    name = data.draw(st.sampled_from(sorted(built_in())), label="pass")
    specs = [s for s in rw.option_specs(built_in()[name]) if s.type is not str]
    if not specs:
        return
    spec = data.draw(st.sampled_from(specs), label="option")
    choices_ = list(getattr(spec.domain, "values", ()))
    value = data.draw(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-(10**9), 10**9),
            st.sampled_from([*choices_, "x", True, [], [1.5, -1.0]]),
        ),
        label="value",
    )
    try:
        made = rw.make_pass((name, {spec.name: value}))
    except OptionError as exc:
        assert repr(spec.name) in str(exc)
        return
    stored = getattr(made, spec.name)
    assert rw.registry.domain_problem(spec, stored) is None
    for item in stored if isinstance(stored, tuple) else (stored,):
        if isinstance(item, float):
            assert math.isfinite(item)


def test_a_typed_factory_finds_the_working_directory_only_while_it_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd_models.py").write_text(
        "from rewriter import zoo\n\ndef make():\n    return zoo.create('mlp')\n"
    )
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    result = run("inspect", "cwd_models:make", "--input-shape", "64")
    assert result.exit_code == 0, result.output
    assert sys.path == before and io.FACTORY_DIRS == []
    # an artifact or a zoo model never searches it
    refused(run("inspect", "zoo:cwd_models"), None, "not a zoo model")
    sys.modules.pop("cwd_models", None)


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("torch.ops.aten.conv2d.default", True),
        ("torch.ops.aten.__and__.Tensor", True),  # Hugging Face attention masks
        ("torch.ops.higher_order.wrap_with_set_grad_enabled", True),
        ("_operator.getitem", True),
        ("torch.sym_max", True),
        ("torch.load", False),
        ("torch.ops.load_library", False),
        ("torch.ops.aten.__class__.x", False),
        ("torch.ops.aten.__and__.__call__", False),
        ("builtins.eval", False),
        ("_operator.attrgetter", False),
    ],
)
def test_node_target_allow_list(target: str, ok: bool) -> None:
    assert (pt2gate.target_problem(target) is None) is ok
