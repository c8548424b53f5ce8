"""Pipeline files: one TOML document naming the model, the passes, the checks and the output.

::

    [model]
    source = "zoo:resnet20"          # zoo model, "package.module:function", or a model
                                     # file (.pt2 program, rewriter artifact)
    options = { width = 16 }         # keyword arguments of the factory
    weights = "resnet20.safetensors" # optional state dict loaded before rewriting
    seed = 0                         # seeds the model's initial weights
    leaves = []                      # submodules traced as single nodes
    frontend = "auto"                # "fx", "export" (torch.export + lifting) or "auto"

    [input]                          # the example input for the checks (optional for
    shape = [3, 32, 32]              # zoo models and .pt2 programs); without the batch
    batch = 2
    dtype = "float32"

    [[pass]]                         # passes, in order: the same names and options as
    name = "masks"                   # rewriter.rewrite(model, [("masks", {...})])
    options = { exclude = ["fc"] }

    [checks]                         # what the pass manager verifies after each pass
    numerics = true                  # (rewriter.Checks: lint, shapes, numerics, rtol,
    rtol = 1e-5                      # atol, seed)

    [output]
    path = "resnet20.safetensors"    # the artifact to write
    force = false                    # replace an existing file
    export = "resnet20.pt2"          # optional: also write an eval-mode torch.export program

Relative paths are relative to the pipeline file. :func:`validate` checks the whole
document against the pass registry's schema (:func:`rewriter.option_specs`,
:func:`rewriter.registry.coerce`, :func:`rewriter.make_pass`) and reports every
problem at once with its key path (``pass[2].options.rate``, with ``[[pass]]``
tables counted from 1) and the closest valid name for misspelt ones. The pipeline
stored in an artifact (``rewriter info --toml``) is itself a valid pipeline file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import tomllib
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from . import io
from .api import rewrite
from .errors import ArtifactError, OptionError, OutputExistsError, RewriterError
from .manager import Checks, evaluate
from .registry import LIMITS, Pass, coerce, domain_problem, make_pass, option_specs, registered

SECTIONS = ("model", "input", "pass", "checks", "output")
_ARTIFACT_KEYS = ("format", "format_version", "versions")  # present in artifact metadata
MODEL_KEYS = (
    "source", "options", "null_options", "weights", "seed", "leaves", "sha256", "frontend",
)  # fmt: skip
_MODEL_PROVENANCE = ("weights_sha256",)
INPUT_KEYS = ("shape", "batch", "dtype")
PASS_KEYS = ("name", "options", "null_options")
OUTPUT_KEYS = ("path", "force", "export")
CHECK_TYPES: dict[str, Any] = typing.get_type_hints(Checks)
MAX_PIPELINE_BYTES = 1 << 20  # a pipeline file is a short recipe


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a pipeline document: where (a key path) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PipelineError(RewriterError):
    """A pipeline document is invalid; ``problems`` lists everything wrong with it."""

    def __init__(self, problems: Sequence[Problem], where: str | None = "pipeline") -> None:
        self.problems = list(problems)
        self.where = where
        if where is None:  # not from a file: the problems alone
            super().__init__("\n".join(str(p) for p in self.problems))
            return
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        if any(p.path.startswith("pass[") for p in self.problems):
            count += " ([[pass]] tables count from 1)"
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{where}: {count}\n{lines}")


@dataclass(frozen=True)
class InputSpec:
    """One example input: ``shape`` without the batch dimension, ``batch`` and ``dtype``."""

    shape: tuple[int, ...]
    batch: int = 2
    dtype: str = "float32"

    def table(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "batch": self.batch, "dtype": self.dtype}

    def make(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs of this shape (the global RNG is untouched)."""
        return io.inputs_from_table(self.table(), seed)


@dataclass(frozen=True)
class OutputSpec:
    """Where the results go: the artifact ``path`` and an optional ``.pt2`` ``export``."""

    path: Path | None = None
    force: bool = False
    export: Path | None = None


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: everything :func:`run` needs, paths made absolute."""

    source: str | None
    options: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    sha256: str | None = None
    seed: int = 0
    leaves: tuple[str, ...] = ()
    frontend: str = "auto"  # rewriter.rewrite(..., frontend=...)
    input: InputSpec | None = None
    passes: tuple[Pass, ...] = ()
    checks: Checks = Checks()
    output: OutputSpec = OutputSpec()
    file: Path | None = None
    not_imported: tuple[str, ...] = ()  # factories named but not imported (``check``)


# -- reading ----------------------------------------------------------------------------------


def parse(
    text: str,
    *,
    base: str | os.PathLike[str] | None = None,
    where: str = "pipeline",
    **options: Any,
) -> Pipeline:
    """Validate the TOML ``text``; relative paths are relative to ``base`` (default: cwd).

    Keyword ``options`` go to :func:`validate`. Raises :class:`PipelineError`.
    """
    return validate(_loads(text, where), base=base, where=where, **options)


def _loads(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError([Problem("", f"not valid TOML: {exc}")], where) from None
    except RecursionError:
        raise PipelineError([Problem("", "not valid TOML: nested too deeply")], where) from None


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed TOML of the pipeline file at ``path``; :class:`PipelineError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        if path.exists() and not path.is_dir():
            what = "is not a regular file (a device or FIFO?)"
        raise PipelineError([Problem("", f"the pipeline file {what}")], str(path))
    try:
        size = path.stat().st_size
        if size > MAX_PIPELINE_BYTES:
            raise PipelineError(
                [
                    Problem(
                        "",
                        f"the file has {size:,} bytes; a pipeline file is at most "
                        f"{MAX_PIPELINE_BYTES:,}",
                    )
                ],
                str(path),
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError([Problem("", f"cannot read it: {exc}")], str(path)) from None
    return _loads(text, str(path))


def read(path: str | os.PathLike[str], **options: Any) -> Pipeline:
    """Read and validate the pipeline file at ``path`` (see :func:`validate`)."""
    path = Path(path)
    document = read_document(path)
    pipeline = validate(document, base=path.parent, where=str(path), **options)
    return dataclasses.replace(pipeline, file=path)


# -- validation -------------------------------------------------------------------------------


def _suggest(name: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


class _Validator:
    def __init__(
        self, base: Path, check_files: bool, trust_pickle: bool, import_factories: bool
    ) -> None:
        self.base = base
        self.check_files = check_files
        self.trust_pickle = trust_pickle
        self.import_factories = import_factories
        self.not_imported: list[str] = []
        self.problems: list[Problem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def table(self, document: Mapping[str, Any], key: str) -> dict[str, Any] | None:
        value = document.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(key, f"expected a table [{key}], got {_show(value)}")
            return None
        return value

    def keys(self, table: Mapping[str, Any], path: str, valid: Sequence[str]) -> None:
        for key in table:
            if key not in valid:
                self.problem(
                    f"{path}.{key}",
                    f"unknown key{_suggest(key, valid)}; valid keys: {', '.join(valid)}",
                )

    def typed(
        self, table: Mapping[str, Any], key: str, path: str, check: Callable[[Any], bool], what: str
    ) -> Any:
        if key not in table:
            return None
        value = table[key]
        if not check(value):
            self.problem(f"{path}.{key}", f"expected {what}, got {_show(value)}")
            return None
        return value

    def path(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.base / path

    # [model] ---------------------------------------------------------------------------------

    def model(self, table: dict[str, Any]) -> dict[str, Any]:
        self.keys(table, "model", (*MODEL_KEYS, *_MODEL_PROVENANCE))
        out: dict[str, Any] = {}
        source = self.typed(table, "source", "model", _is_text, "a string")
        if "source" not in table:
            self.problem("model.source", "missing: name a zoo model, a factory or a model file")
        options = self.typed(table, "options", "model", _is_table, "a table of options") or {}
        nulls = self.typed(table, "null_options", "model", _is_names, "a list of option names")
        options = {**options, **dict.fromkeys(nulls or [])}
        out["options"] = options
        out["seed"] = self.typed(table, "seed", "model", _is_int, "an integer") or 0
        out["leaves"] = tuple(
            self.typed(table, "leaves", "model", _is_names, "a list of submodule names") or ()
        )
        out["frontend"] = (
            self.typed(table, "frontend", "model", _is_frontend, '"auto", "fx" or "export"')
            or "auto"
        )
        sha = self.typed(table, "sha256", "model", _is_sha, "a 64-digit hex sha256")
        out["sha256"] = sha
        weights = self.typed(table, "weights", "model", _is_text, "a file path")
        weights_sha = self.typed(table, "weights_sha256", "model", _is_sha, "a 64-digit hex sha256")
        if weights is not None:
            out["weights"] = self.path(weights)
            self.weights_file(out["weights"], weights_sha)
        if source is not None:
            out["source"] = self.source(source.strip(), options, sha)
        return out

    def source(self, source: str, options: dict[str, Any], sha: str | None) -> str:
        candidate = self.path(source)
        if not source.startswith("zoo:") and (io.is_file_source(source) or candidate.is_file()):
            self.model_file(candidate, options, sha)
            return str(candidate)
        if source.startswith("zoo:") or ":" not in source:
            self.zoo_source(source.removeprefix("zoo:"), options)
            return source
        if not _FACTORY.fullmatch(source):
            self.problem(
                "model.source",
                f"cannot read model source {source!r}: use 'zoo:NAME', "
                "'package.module:function' or a file path",
            )
        elif not self.import_factories:
            self.not_imported.append(source)
        elif self.check_files:
            try:
                factory = io._import_factory(source)
            except ArtifactError as exc:
                self.problem("model.source", str(exc))
            else:
                self.signature(factory, options, f"factory {source!r}")
        return source

    def zoo_source(self, name: str, options: dict[str, Any]) -> None:
        from . import zoo

        if name not in zoo.names():
            self.problem(
                "model.source",
                f"unknown zoo model {name!r}{_suggest(name, zoo.names())}; zoo models: "
                f"{', '.join(zoo.names())} (or use 'package.module:function' or a file path)",
            )
            return
        self.signature(zoo.MODELS[name].factory, options, f"zoo model {name!r}")

    def signature(self, factory: Callable[..., Any], options: dict[str, Any], what: str) -> None:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            return
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return
        valid = [
            p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in options:
            if key not in valid:
                self.problem(
                    f"model.options.{key}",
                    f"{what} has no option {key!r}{_suggest(key, valid)}; its options: "
                    f"{', '.join(valid) or 'none'}",
                )

    def model_file(self, path: Path, options: dict[str, Any], sha: str | None) -> None:
        if options:
            self.problem("model.options", "a model file takes no options")
        if not self.check_files:
            return
        try:
            kind = io.file_format(io.regular_file(path, "model file"))
        except ArtifactError as exc:
            self.problem("model.source", str(exc))
            return
        if kind in ("torch", "pickle") and not self.trust_pickle:
            self.problem(
                "model.source",
                f"{path} is a pickle, which can run code when loaded; it is only read with "
                "--trust-pickle",
            )
        elif kind not in ("pt2", "safetensors", "torch", "pickle"):
            self.problem(
                "model.source",
                f"{path} is not a model file rewriter reads (a .pt2 program, a rewriter "
                "artifact or, with --trust-pickle, a pickled module)",
            )
        if sha is not None and io.sha256_of(path) != sha:
            self.problem("model.sha256", f"{path} has changed: its sha256 differs")

    def weights_file(self, path: Path, sha: str | None) -> None:
        if not self.check_files:
            return
        try:
            kind = io.file_format(io.regular_file(path, "weights file"))
        except ArtifactError as exc:
            self.problem("model.weights", str(exc))
            return
        if kind not in ("safetensors", "torch", "pickle"):
            self.problem(
                "model.weights",
                f"{path} is not a safetensors file or a state dict saved with torch.save",
            )
        if sha is not None and io.sha256_of(path) != sha:
            self.problem("model.weights_sha256", f"{path} has changed: its sha256 differs")

    # [input] ---------------------------------------------------------------------------------

    def input(self, table: dict[str, Any]) -> InputSpec | None:
        self.keys(table, "input", INPUT_KEYS)
        shape = self.typed(table, "shape", "input", _is_shape, "a list of positive integers")
        if "shape" not in table:
            self.problem("input.shape", "missing: the shape of one example, without the batch")
        batch = self.typed(table, "batch", "input", _is_positive, "a positive integer")
        dtype = self.typed(table, "dtype", "input", io.DTYPES.__contains__, _dtype_names())
        if shape is None:
            return None
        try:
            io.check_input_size([batch or 2, *shape])
        except ArtifactError as exc:
            self.problem("input.shape", str(exc))
            return None
        return InputSpec(tuple(shape), batch or 2, dtype or "float32")

    # [[pass]] --------------------------------------------------------------------------------

    def passes(self, value: Any) -> list[Pass]:
        if isinstance(value, dict):
            self.problem("pass", "expected [[pass]] tables (an array of tables), got one [pass]")
            return []
        if not isinstance(value, list):
            self.problem("pass", f"expected [[pass]] tables, got {_show(value)}")
            return []
        if len(value) > LIMITS.max_passes:
            self.problem(
                "pass",
                f"{len(value)} passes, above the limit of {LIMITS.max_passes}; raise it with "
                "--max-passes (Python: rewriter.option_limits(max_passes=...))",
            )
            return []
        out = []
        for index, entry in enumerate(value, 1):
            made = self.one_pass(entry, f"pass[{index}]")
            if made is not None:
                wrong = data_problem(made)
                if wrong is not None:
                    self.problem(f"pass[{index}].name", wrong)
                out.append(made)
        return out

    def one_pass(self, entry: Any, path: str) -> Pass | None:
        if not isinstance(entry, dict):
            self.problem(path, f"expected a table with a name, got {_show(entry)}")
            return None
        self.keys(entry, path, PASS_KEYS)
        name = self.typed(entry, "name", path, _is_text, "a pass name")
        if "name" not in entry:
            self.problem(f"{path}.name", "missing: the registry name of the pass")
        options = self.typed(entry, "options", path, _is_table, "a table of options")
        nulls = self.typed(entry, "null_options", path, _is_names, "a list of option names")
        if name is None:
            return None
        passes = registered()
        if name not in passes:
            self.problem(
                f"{path}.name",
                f"unknown pass {name!r}{_suggest(name, list(passes))}; valid passes: "
                f"{', '.join(passes)}",
            )
            return None
        specs = {s.name: s for s in option_specs(passes[name])}
        values, ok = {}, True
        for key, raw in {**(options or {}), **dict.fromkeys(nulls or [])}.items():
            if key not in specs:
                valid = ", ".join(f"{s.name}: {s.type_name}" for s in specs.values()) or "none"
                self.problem(
                    f"{path}.options.{key}",
                    f"pass {name!r} has no option {key!r}{_suggest(key, list(specs))}; "
                    f"valid options: {valid}",
                )
                ok = False
                continue
            try:
                values[key] = coerce(raw, specs[key].type)
            except (TypeError, ValueError) as exc:
                self.problem(f"{path}.options.{key}", str(exc))
                ok = False
                continue
            wrong = domain_problem(specs[key], values[key])
            if wrong is not None:
                self.problem(f"{path}.options.{key}", f"pass {name!r}: option {key!r} {wrong}")
                ok = False
        if not ok:
            return None
        try:
            return make_pass((name, values))
        except OptionError as exc:
            self.problem(path, str(exc))
            return None

    # [checks] and [output] -------------------------------------------------------------------

    def checks(self, table: dict[str, Any]) -> Checks:
        self.keys(table, "checks", list(CHECK_TYPES))
        values = {}
        for key, tp in CHECK_TYPES.items():
            if key not in table:
                continue
            try:
                values[key] = coerce(table[key], tp)
            except (TypeError, ValueError) as exc:
                self.problem(f"checks.{key}", str(exc))
                continue
            if key in ("rtol", "atol") and not values[key] >= 0:
                self.problem(f"checks.{key}", f"expected a number >= 0, got {table[key]!r}")
        return Checks(**values)

    def output(self, table: dict[str, Any]) -> OutputSpec:
        self.keys(table, "output", OUTPUT_KEYS)
        path = self.typed(table, "path", "output", _is_text, "a file path")
        force = self.typed(table, "force", "output", _is_bool, "true or false") or False
        export = self.typed(table, "export", "output", _is_text, "a file path")
        out = OutputSpec(
            self.path(path) if path else None, force, self.path(export) if export else None
        )
        for key, target in (("path", out.path), ("export", out.export)):
            if target is not None and self.check_files:
                try:
                    io.check_output(target, force=force)
                except OutputExistsError as exc:
                    self.problem(
                        f"output.{key}",
                        f"{exc.path} already exists; set force = true in [output] or pass --force "
                        "to replace it",
                    )
                except ArtifactError as exc:
                    self.problem(f"output.{key}", str(exc))
        if out.path is not None and out.export is not None and _same_file(out.path, out.export):
            self.problem(
                "output.export",
                f"the artifact and the export are the same file ({out.path}); give two paths",
            )
        return out


_FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_positive(v: Any) -> bool:
    return _is_int(v) and v > 0


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_positive(x) for x in v)


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _dtype_names() -> str:
    return "one of " + ", ".join(f'"{d}"' for d in io.DTYPES)


def validate(
    document: Mapping[str, Any],
    *,
    base: str | os.PathLike[str] | None = None,
    where: str = "pipeline",
    require_model: bool = True,
    check_files: bool = True,
    trust_pickle: bool = False,
    import_factories: bool = True,
) -> Pipeline:
    """Check a parsed pipeline document and return the :class:`Pipeline` it describes.

    Every problem is collected (unknown sections, keys, passes and options with the
    closest valid name; values of the wrong type; missing files; an existing output
    without ``force``) and raised at once as a :class:`PipelineError`.
    ``require_model=False`` allows a document without ``[model]`` (the command line
    names the model). ``check_files=False`` skips everything that looks at the file
    system or imports factories; ``import_factories=False`` checks a factory's name
    without importing it (``rewriter check``; listed in ``Pipeline.not_imported``).
    Pickled model files are problems unless ``trust_pickle``. Passes that need data
    from Python (``snip``, ``grasp``) are problems: a file cannot hold their data.
    More passes than ``LIMITS.max_passes`` and example inputs above
    ``LIMITS.max_input_elements`` are problems. Nothing is built or run.
    """
    v = _Validator(
        Path(base) if base is not None else Path.cwd(), check_files, trust_pickle, import_factories
    )
    for key in document:
        if key not in (*SECTIONS, *_ARTIFACT_KEYS):
            v.problem(
                key, f"unknown section{_suggest(key, SECTIONS)}; sections: {', '.join(SECTIONS)}"
            )
    model = v.table(document, "model")
    model_values = v.model(model) if model is not None else {}
    if model is None and "model" not in document and require_model:
        v.problem("model", "missing: add a [model] table with a source")
    inp = v.table(document, "input")
    input_spec = v.input(inp) if inp is not None else None
    passes = v.passes(document["pass"]) if "pass" in document else []
    checks_table = v.table(document, "checks")
    checks = v.checks(checks_table) if checks_table is not None else Checks()
    output_table = v.table(document, "output")
    output = v.output(output_table) if output_table is not None else OutputSpec()
    source = model_values.get("source")
    if output.export is not None and input_spec is None and source is not None:
        if not _knows_inputs(source):
            v.problem(
                "output.export",
                "exporting needs an example input: add an [input] table with its shape",
            )
    if v.problems:
        raise PipelineError(v.problems, where)
    return Pipeline(
        source=source,
        options=model_values.get("options", {}),
        weights=model_values.get("weights"),
        sha256=model_values.get("sha256"),
        seed=model_values.get("seed", 0),
        leaves=model_values.get("leaves", ()),
        frontend=model_values.get("frontend", "auto"),
        input=input_spec,
        passes=tuple(passes),
        checks=checks,
        output=output,
        not_imported=tuple(v.not_imported),
    )


def _is_frontend(value: Any) -> bool:
    return value in ("auto", "fx", "export")


def needs_data(cls: type[Pass]) -> bool:
    """Whether a pass needs data attached from Python (it has a ``with_data`` constructor)."""
    return callable(getattr(cls, "with_data", None))


def data_problem(the_pass: Pass) -> str | None:
    """Why ``the_pass`` cannot run from a file or the command line, or ``None``."""
    if not needs_data(type(the_pass)) or getattr(the_pass, "_data", None) is not None:
        return None
    cls = type(the_pass).__name__
    return (
        f"the {the_pass.name!r} pass needs training batches, which a pipeline file or the "
        f"command line cannot give; run it from Python with {cls}.with_data(batches, ...)"
    )


def _same_file(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _knows_inputs(source: str) -> bool:
    """Whether a source brings its own example inputs (zoo models, .pt2 programs, artifacts)."""
    if source.startswith("zoo:") or ":" not in source and not io.is_file_source(source):
        return True
    return io.is_file_source(source) and Path(source).suffix.lower() in (".pt2", ".safetensors")


# -- running ----------------------------------------------------------------------------------


@dataclass
class Result:
    """What :func:`run` produced."""

    gm: fx.GraphModule
    model: nn.Module  # the source model, before rewriting
    inputs: tuple[torch.Tensor, ...] | None
    output: Path | None = None
    export: Path | None = None
    warnings: list[str] = field(default_factory=list)


def build_model(
    pipeline: Pipeline, *, trust_pickle: bool = False, trust_source: bool = False
) -> nn.Module:
    """The pipeline's source model, seeded, with its weights loaded.

    ``trust_source`` allows an artifact given as the source to import the factory
    its metadata names; ``trust_pickle`` allows pickled model files.
    """
    if pipeline.source is None:
        raise PipelineError([Problem("model.source", "missing")], None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(pipeline.seed)
        model = io.resolve_source(
            pipeline.source,
            pipeline.options,
            sha256=pipeline.sha256,
            trust_pickle=trust_pickle,
            trust_source=trust_source,
        )
    if pipeline.weights is not None:
        io.apply_weights(model, pipeline.weights)
    return model


def _check_inputs(model: nn.Module, inputs: Sequence[torch.Tensor], where: str | None) -> None:
    """Run the source model once, so an input that does not fit is a clear user error."""
    try:
        evaluate(model, inputs)
    except Exception as exc:  # whatever the model raises on a wrong shape or dtype
        shapes = ", ".join(
            f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise PipelineError(
            [
                Problem(
                    "input",
                    f"the model fails on the example input {shapes}: {type(exc).__name__}: "
                    f"{first}. Check the [input] shape (without the batch) and dtype "
                    "(--input-shape, --dtype)",
                )
            ],
            where,
        ) from exc


def run(
    pipeline: Pipeline,
    *,
    trust_pickle: bool = False,
    trust_source: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Result:
    """Build the model, apply the passes with the pipeline's checks, write the outputs.

    ``progress`` receives one line per stage. Outputs are checked before any work
    and written atomically. Raises :class:`~rewriter.RewriterError` subclasses for
    every problem with the inputs (model, weights, passes, outputs).
    """
    say = progress or (lambda message: None)
    out = pipeline.output
    where = str(pipeline.file) if pipeline.file is not None else None
    problems = [
        Problem(f"pass[{i}]", wrong)
        for i, p in enumerate(pipeline.passes, 1)
        if (wrong := data_problem(p)) is not None
    ]
    if len(pipeline.passes) > LIMITS.max_passes:
        problems.append(
            Problem(
                "pass",
                f"{len(pipeline.passes)} passes, above the limit of {LIMITS.max_passes}; raise "
                "it with --max-passes (Python: rewriter.option_limits(max_passes=...))",
            )
        )
    if out.path is not None and out.export is not None and _same_file(out.path, out.export):
        problems.append(
            Problem("output", f"the artifact and the export are the same file ({out.path})")
        )
    if problems:
        raise PipelineError(problems, where)
    for target in (out.path, out.export):
        if target is not None:
            io.check_output(target, force=out.force)
    say(f"building {pipeline.source}")
    model = build_model(pipeline, trust_pickle=trust_pickle, trust_source=trust_source)
    inputs = pipeline.input.make() if pipeline.input is not None else io.default_inputs(model)
    if inputs is not None:
        _check_inputs(model, inputs, where)
    if out.export is not None and inputs is None:
        raise PipelineError(
            [Problem("output.export", "exporting needs an example input: add [input] shape")],
            where,
        )
    names = ", ".join(p.name for p in pipeline.passes) or "no passes"
    say(f"tracing and applying {names}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        gm = rewrite(
            model,
            list(pipeline.passes),
            inputs,
            leaves=pipeline.leaves,
            checks=pipeline.checks,
            frontend=pipeline.frontend,
        )
    if inputs is not None:
        gm.meta[io.INPUTS_KEY] = inputs
    if pipeline.input is not None:
        gm.meta[io.INPUT_TABLE_KEY] = pipeline.input.table()
    result = Result(gm, model, inputs, warnings=[str(w.message) for w in caught])
    if out.path is not None:
        say(f"writing {out.path}")
        result.output = io.save(gm, out.path, force=out.force)
    if out.export is not None:
        say(f"exporting {out.export} (torch.export, eval mode)")
        result.export = io.export(gm, out.export, inputs or (), force=out.force)
    return result


__all__ = [
    "InputSpec",
    "OutputSpec",
    "Pipeline",
    "PipelineError",
    "Problem",
    "Result",
    "build_model",
    "data_problem",
    "needs_data",
    "parse",
    "read",
    "read_document",
    "run",
    "validate",
]
