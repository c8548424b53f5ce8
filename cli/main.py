"""The ``rewriter`` command line: apply, check, inspect, export, passes, info.

Exit codes: 0 success; 2 a user error (unknown pass or option, bad value,
missing, unreadable or refused file, invalid pipeline, existing or unwritable
output, a limit exceeded, a model factory that fails), printed as
``error: <message>`` without a traceback; 1 an unexpected failure, with a hint
to rerun with ``--debug``. Progress lines go to stderr and are silenced by
``--json``; results go to stdout.

Files are data: nothing named in or contained in a file given to the CLI is
imported, called or unpickled without the matching trust flag
(``--trust-source``, ``--trust-pickle``), and ``sys.path`` only changes to import
a factory the user typed (as MODEL or in their own ``--pipeline``), with the
working directory appended last so that it cannot shadow an installed module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import rewriter
from rewriter import io
from rewriter import pipeline as pl
from rewriter.errors import OutputExistsError, RewriterError
from rewriter.manager import PassRecord
from rewriter.registry import LIMITS, option_limits

from .specs import parse_key_values, parse_value, pass_from_spec
from .summary import inspect_model, inspect_text

_USER_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _error(message: str) -> None:
    click.echo(f"error: {message}", err=True)


class _Cli(click.Group):
    """A group that turns user errors into ``error: ...`` and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.UsageError as exc:
            if debug:
                traceback.print_exc()
            hint = f"\nTry '{exc.ctx.command_path} --help' for help." if exc.ctx else ""
            _error(f"{exc.format_message()}{hint}")
            ctx.exit(2)
        except OutputExistsError as exc:
            if debug:
                traceback.print_exc()
            _error(exc.cli_message())
            ctx.exit(2)
        except (RewriterError, *_USER_OS_ERRORS) as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc).replace("pass force=True", "pass --force"))
            ctx.exit(2)
        except RecursionError:
            if debug:
                traceback.print_exc()
            _error("the input is nested too deeply to read (a crafted file?)")
            ctx.exit(2)
        except Exception as exc:
            if debug:
                raise
            _error(
                f"unexpected {type(exc).__name__}: {exc}\n"
                "This is probably a bug; rerun with `rewriter --debug ...` for the traceback."
            )
            ctx.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(rewriter.__version__, prog_name="rewriter")
def cli(debug: bool) -> None:
    """Turn training-time network-structure methods into torch.fx graph rewrites."""


# -- shared options ---------------------------------------------------------------------------


def _progress(quiet: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            click.echo(f"... {message}", err=True)

    return say


def _is_factory(spec: str | None) -> bool:
    if not spec or ":" not in spec or spec.startswith("zoo:"):
        return False
    return not io.is_file_source(spec)


def _importable_cwd(spec: str | None) -> None:
    """Let a factory the user typed (``package.module:function``) live in the working directory.

    Only for a factory: zoo models, model files and artifacts never change
    ``sys.path``. The directory goes last on ``sys.path`` and only while the factory's
    module is imported (:data:`rewriter.io.FACTORY_DIRS`), so a stray ``sympy.py`` or
    ``colorsys.py`` in it shadows nothing and is not found by a lazy import later.
    """
    cwd = os.getcwd()
    if _is_factory(spec) and cwd not in io.FACTORY_DIRS:
        io.FACTORY_DIRS.append(cwd)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # for this command only
            ctx.call_on_close(lambda: cwd in io.FACTORY_DIRS and io.FACTORY_DIRS.remove(cwd))


def limit_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--max-passes``, ``--max-input-elements`` and ``--allow-large-options``: the
    command runs under these :func:`rewriter.option_limits`."""

    @functools.wraps(f)
    def limited(
        *args: Any,
        max_passes: int,
        max_input_elements: int,
        allow_large_options: bool,
        **kwargs: Any,
    ) -> Any:
        with option_limits(
            not allow_large_options,
            max_passes=max_passes,
            max_input_elements=max_input_elements,
        ):
            return f(*args, **kwargs)

    limited = click.option(
        "--allow-large-options",
        is_flag=True,
        help="Lift the resource limits of pass options (e.g. synflow iterations <= 10000).",
    )(limited)
    limited = click.option(
        "--max-input-elements",
        type=click.IntRange(min=1),
        default=LIMITS.max_input_elements,
        show_default=True,
        help="Largest example input to build (batch times shape, in elements).",
    )(limited)
    return click.option(
        "--max-passes",
        type=click.IntRange(min=1),
        default=LIMITS.max_passes,
        show_default=True,
        help="Most passes a pipeline, an artifact or the command line may hold.",
    )(limited)


def trust_source_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--trust-source",
        is_flag=True,
        help="Allow importing and calling the model factory named inside an artifact. "
        "Importing runs that module's code: only for files you trust.",
    )(f)


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p.strip() for p in re.split(r"[,x]", text)]
    shape = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
    if not shape or any(s < 1 for s in shape):
        raise click.BadParameter(
            f"expected positive integers like 3,32,32 (without the batch), got {text!r}",
            param_hint="'--input-shape'",
        )
    return shape


def _input_spec(shape: str | None, batch: int | None, dtype: str | None) -> pl.InputSpec | None:
    parsed = _shape(shape)
    if parsed is None:
        if batch is not None or dtype is not None:
            raise click.UsageError("--batch and --dtype need --input-shape")
        return None
    return pl.InputSpec(parsed, batch or 2, dtype or "float32")


def _model_options(items: tuple[str, ...]) -> dict[str, Any]:
    try:
        raw = parse_key_values(items, "--model-option")
    except click.BadParameter as exc:
        exc.param_hint = "'--model-option'"
        raise
    return {key: parse_value(text) for key, text in raw.items()}


def input_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--input-shape``, ``--batch`` and ``--dtype``."""
    f = click.option(
        "--dtype", type=click.Choice(list(io.DTYPES)), help="Example input dtype (float32)."
    )(f)
    f = click.option("--batch", type=click.IntRange(min=1), help="Example input batch size (2).")(f)
    return click.option(
        "--input-shape",
        metavar="C,H,W",
        help="Example input shape without the batch, e.g. 3,32,32 (zoo models and .pt2 "
        "programs bring their own).",
    )(f)


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--model-option``, ``--weights`` and ``--trust-pickle``."""
    f = click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading pickled files (whole torch.save'd modules). Pickles can run "
        "arbitrary code: only for files you trust.",
    )(f)
    f = click.option(
        "--weights",
        type=click.Path(dir_okay=False),
        help="State dict to load into the model first: .safetensors, or a torch.save'd "
        "state dict (read with weights_only=True).",
    )(f)
    return click.option(
        "--model-option",
        "model_opts",
        multiple=True,
        metavar="KEY=VALUE",
        help="Keyword argument for the model factory (repeatable).",
    )(f)


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _options_text(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in options.items())


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def _model_source(model: str) -> str:
    """A file source made absolute (pipelines resolve relative paths against their folder)."""
    return _absolute(model) if io.is_file_source(model) else model  # type: ignore[return-value]


# -- apply ------------------------------------------------------------------------------------


def _record_json(p: PassRecord) -> dict[str, Any]:
    return {
        "name": p.name,
        "options": p.options,
        "fired": p.fired,
        "matches": dict(p.matches),
        "modules_added": list(p.modules_added),
        "modules_replaced": list(p.modules_replaced),
        "params_added": p.params_added,
        "buffers_added": p.buffers_added,
        "seconds": p.seconds,
        "notes": list(p.notes),
    }


def _pipeline_from_file(
    ctx: click.Context,
    path: str,
    model: str | None,
    model_opts: dict[str, Any],
    weights: str | None,
    seed: int | None,
    inputs: pl.InputSpec | None,
    output: str | None,
    export: str | None,
    force: bool,
    trust_pickle: bool,
) -> pl.Pipeline:
    """The pipeline file with the command line's MODEL, input and outputs applied."""
    file = Path(path)
    document = pl.read_document(file)
    table = document.get("model")
    if model is None and isinstance(table, dict) and isinstance(table.get("source"), str):
        _importable_cwd(table["source"].strip())  # the user's own pipeline names a factory
    if model is not None:
        if "model" in document:
            raise click.UsageError(
                f"MODEL {model!r} and the [model] table of {path} both name a model; remove one",
                ctx,
            )
        table: dict[str, Any] = {"source": _model_source(model), "options": model_opts}
        if weights is not None:
            table["weights"] = _absolute(weights)
        if seed is not None:
            table["seed"] = seed
        document["model"] = table
    elif model_opts or weights is not None or seed is not None:
        raise click.UsageError(
            "--model-option, --weights and --seed describe MODEL; with --pipeline, set "
            "them in its [model] table (or give MODEL instead of [model])",
            ctx,
        )
    if inputs is not None:
        document["input"] = inputs.table()
    out = document.setdefault("output", {})
    if isinstance(out, dict):
        if output is not None:
            out["path"] = _absolute(output)
        if export is not None:
            out["export"] = _absolute(export)
        if force:
            out["force"] = True
    p = pl.validate(document, base=file.parent, where=path, trust_pickle=trust_pickle)
    return dataclasses.replace(p, file=file)


@cli.command()
@click.argument("model", required=False)
@click.option(
    "--pipeline",
    "pipeline_file",
    type=click.Path(dir_okay=False),
    help="A pipeline TOML file ([model], [input], [[pass]], [checks], [output]).",
)
@click.option(
    "--pass",
    "pass_specs",
    multiple=True,
    metavar="NAME[:key=value,...]",
    help="A pass to apply, in order (repeatable). Values are TOML literals or plain text.",
)
@model_options
@input_options
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="Artifact to write (.safetensors)."
)
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False),
    help="Also write an eval-mode torch.export program (.pt2).",
)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--seed", type=int, help="Seed for the model's initial weights (0).")
@click.option(
    "--frontend",
    type=click.Choice(["auto", "fx", "export"]),
    help="How the model becomes a graph: torch.fx tracing, torch.export + lifting, or auto "
    "(export for Hugging Face models and models fx cannot trace; the default).",
)
@trust_source_option
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of the table.")
@click.pass_context
def apply(
    ctx: click.Context,
    model: str | None,
    pipeline_file: str | None,
    pass_specs: tuple[str, ...],
    model_opts: tuple[str, ...],
    weights: str | None,
    trust_pickle: bool,
    input_shape: str | None,
    batch: int | None,
    dtype: str | None,
    output: str | None,
    export_path: str | None,
    force: bool,
    seed: int | None,
    frontend: str | None,
    trust_source: bool,
    as_json: bool,
) -> None:
    """Apply passes to MODEL and save the result as an artifact.

    MODEL is a zoo model (zoo:resnet20), a factory (package.module:function), a
    torch.export program (model.pt2), a rewriter artifact (to add passes), or, with
    --trust-pickle, a pickled module. The passes come from --pass options or from
    a --pipeline file.

    \b
    Examples:
      rewriter apply zoo:resnet20 --pass masks --pass rbn:init=paper -o resnet20.safetensors
      rewriter apply model.pt2 --pass rbn -o model-rbn.safetensors --export model-rbn.pt2
      rewriter apply --pipeline examples/pipelines/rbn.toml -o out.safetensors
    """
    try:
        passes = [pass_from_spec(spec) for spec in pass_specs]
    except click.BadParameter as exc:
        exc.param_hint = "'--pass'"
        raise
    options = _model_options(model_opts)
    inputs = _input_spec(input_shape, batch, dtype)
    _same_outputs(ctx, output, export_path)
    _importable_cwd(model)
    if pipeline_file is not None:
        if pass_specs:
            raise click.UsageError(
                "--pass cannot be combined with --pipeline; add [[pass]] tables to the file",
                ctx,
            )
        p = _pipeline_from_file(
            ctx, pipeline_file, model, options, weights, seed, inputs, output, export_path,
            force, trust_pickle,
        )  # fmt: skip
    else:
        if model is None:
            raise click.UsageError("Missing argument 'MODEL' (or give --pipeline FILE).", ctx)
        if output is None:
            raise click.MissingParameter(ctx=ctx, param=_param(ctx, "output"))
        p = pl.Pipeline(
            source=model,
            options=options,
            weights=Path(weights) if weights is not None else None,
            seed=seed or 0,
            input=inputs,
            passes=tuple(passes),
            output=pl.OutputSpec(
                Path(output), force, Path(export_path) if export_path is not None else None
            ),
        )
    if frontend is not None:
        p = dataclasses.replace(p, frontend=frontend)
    if p.output.path is None and p.output.export is None:
        raise click.UsageError(
            "nothing to write: give -o/--output (or [output] path in the pipeline)", ctx
        )
    result = pl.run(
        p, trust_pickle=trust_pickle, trust_source=trust_source, progress=_progress(as_json)
    )
    _apply_report(result, as_json)


def _same_outputs(ctx: click.Context, output: str | None, export: str | None) -> None:
    """``-o X --export X`` is refused before any work (with --force one would replace the other)."""
    if output is not None and export is not None:
        if Path(output).expanduser().resolve() == Path(export).expanduser().resolve():
            raise click.UsageError(
                f"-o/--output and --export name the same file ({output}); give two paths", ctx
            )


def _param(ctx: click.Context, name: str) -> click.Parameter:
    return next(p for p in ctx.command.params if p.name == name)


def _apply_report(result: pl.Result, as_json: bool) -> None:
    rep = rewriter.report(result.gm)
    source = rep.source or {}
    tensors = len(result.gm.state_dict())
    written = {
        "output": str(result.output) if result.output else None,
        "bytes": result.output.stat().st_size if result.output else None,
        "export": str(result.export) if result.export else None,
        "export_bytes": result.export.stat().st_size if result.export else None,
    }
    if as_json:
        _json(
            {
                "model": source,
                "passes": [_record_json(p) for p in rep.passes],
                "opaque": rep.opaque,
                "checked": rep.checked,
                **written,
                "tensors": tensors,
                "warnings": result.warnings,
            }
        )
        return
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"model: {source.get('model')} {_options_text(source.get('options', {}))}".rstrip())
    click.echo(rep.table() if rep.passes else "(no passes)")
    if result.output:
        click.echo(f"wrote {result.output} ({_size(written['bytes'])}, {tensors} tensors)")
    if result.export:
        click.echo(f"wrote {result.export} ({_size(written['export_bytes'])}, torch.export)")


# -- check ------------------------------------------------------------------------------------


@cli.command()
@click.argument("pipeline_file", metavar="PIPELINE")
@click.option("--trust-pickle", is_flag=True, help="Accept a pickled model file as source.")
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check(pipeline_file: str, trust_pickle: bool, as_json: bool) -> None:
    """Validate a pipeline file without running it (exit 0: valid, 2: invalid).

    Every problem is reported at once, with its key path (pass[2].options.rate;
    [[pass]] tables count from 1) and the closest valid name for misspelt ones.
    Nothing is imported or run: a factory (package.module:function) is checked by
    name only, and the output says so. Passes that need data from Python (snip,
    grasp) are problems, as `apply` would refuse them.
    """
    try:
        p = pl.read(pipeline_file, trust_pickle=trust_pickle, import_factories=False)
    except pl.PipelineError as exc:
        if not as_json:
            raise
        _json({"valid": False, "problems": [dataclasses.asdict(x) for x in exc.problems]})
        sys.exit(2)
    summary = {
        "valid": True,
        "model": p.source,
        "passes": [{"name": x.name, "options": x.options()} for x in p.passes],
        "input": p.input.table() if p.input else None,
        "output": str(p.output.path) if p.output.path else None,
        "export": str(p.output.export) if p.output.export else None,
        "not_imported": list(p.not_imported),
    }
    if as_json:
        _json(summary)
        return
    names = ", ".join(x.name for x in p.passes) or "no passes"
    click.echo(f"ok: {pipeline_file}: {p.source or '(model from the command line)'}; {names}")
    for factory in p.not_imported:
        click.echo(
            f"note: the factory {factory} was not imported (check reads names only); "
            "`rewriter apply` imports it"
        )


# -- inspect ----------------------------------------------------------------------------------


@cli.command()
@click.argument("model")
@model_options
@input_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initial weights.")
@trust_source_option
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect(
    model: str,
    model_opts: tuple[str, ...],
    weights: str | None,
    trust_pickle: bool,
    input_shape: str | None,
    batch: int | None,
    dtype: str | None,
    seed: int,
    trust_source: bool,
    as_json: bool,
) -> None:
    """Summarise MODEL: layers, parameters, MACs, residual blocks, channel groups.

    MODEL is anything `rewriter apply` accepts (zoo model, factory, .pt2 program,
    artifact). Opaque (untraceable) submodules are listed with the reason.
    """
    _importable_cwd(model)
    p = pl.Pipeline(
        source=model,
        options=_model_options(model_opts),
        weights=Path(weights) if weights is not None else None,
        seed=seed,
        input=_input_spec(input_shape, batch, dtype),
    )
    say = _progress(as_json)
    say(f"building {model}")
    built = pl.build_model(p, trust_pickle=trust_pickle, trust_source=trust_source)
    inputs = p.input.make() if p.input is not None else io.default_inputs(built)
    say("tracing and analysing")
    info = inspect_model(built, inputs, model)
    if as_json:
        _json(info)
    else:
        click.echo(inspect_text(info))


# -- export -----------------------------------------------------------------------------------


@cli.command()
@click.argument("artifact")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Program to write (.pt2).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@input_options
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled source model.")
@trust_source_option
@limit_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def export(
    artifact: str,
    output: str,
    force: bool,
    input_shape: str | None,
    batch: int | None,
    dtype: str | None,
    trust_pickle: bool,
    trust_source: bool,
    as_json: bool,
) -> None:
    """Write an eval-mode torch.export program of ARTIFACT for deployment.

    ARTIFACT is a file written by `rewriter apply` (any MODEL `apply` accepts works
    too). The example input is the one recorded in the artifact, a zoo model's or
    .pt2 program's default, or --input-shape. The file is written atomically.

    \b
    Example:
      rewriter export resnet20.safetensors -o resnet20.pt2
    """
    out = Path(output)
    if io.is_file_source(artifact) and Path(artifact).exists():
        if Path(artifact).resolve() == out.expanduser().resolve():
            raise click.UsageError(
                f"-o/--output names ARTIFACT itself ({output}); give another path"
            )
    io.check_output(out, force=force)
    _importable_cwd(artifact)
    spec = _input_spec(input_shape, batch, dtype)
    say = _progress(as_json)
    say(f"loading {artifact}")
    gm = io.resolve_source(
        _model_source(artifact), trust_pickle=trust_pickle, trust_source=trust_source
    )
    inputs = spec.make() if spec is not None else io.default_inputs(gm)
    if inputs is None:
        raise click.UsageError(
            f"the example input of {artifact} is unknown; give it with --input-shape "
            "(e.g. --input-shape 3,32,32)"
        )
    say("exporting (torch.export, eval mode)")
    io.export(gm, out, inputs, force=force)
    size = out.stat().st_size
    shapes = [list(x.shape) for x in inputs]
    if as_json:
        _json({"artifact": artifact, "output": str(out), "bytes": size, "inputs": shapes})
        return
    click.echo(f"wrote {out} ({_size(size)}, torch.export program for inputs like {shapes})")


# -- passes -----------------------------------------------------------------------------------


def _pass_info(name: str, cls: type[rewriter.Pass]) -> dict[str, Any]:
    try:
        preserves: bool | None = bool(cls().preserves_outputs)
    except (TypeError, ValueError):
        preserves = None  # the pass has required options
    return {
        "name": name,
        "summary": cls.summary(),
        "preserves_outputs": preserves,
        "needs_data": pl.needs_data(cls),
        "options": [
            {
                "name": s.name,
                "type": s.type_name,
                "default": s.default,
                "domain": s.domain.describe(),
                "help": s.help,
            }
            for s in rewriter.option_specs(cls)
        ],
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def passes(as_json: bool) -> None:
    """List every registered pass with its options."""
    infos = [_pass_info(name, cls) for name, cls in rewriter.registered().items()]
    if as_json:
        _json(infos)
        return
    for i, info in enumerate(infos):
        if i:
            click.echo()
        preserves = {True: "yes", False: "no", None: "depends on options"}[
            info["preserves_outputs"]
        ]
        click.echo(f"{info['name']}: {info['summary']}")
        click.echo(f"  preserves outputs: {preserves}")
        if info["needs_data"]:
            click.echo(
                "  needs data from Python: training batches cannot be given on the command "
                "line or in a pipeline file (use the pass's with_data(...) in Python)"
            )
        if not info["options"]:
            click.echo("  options: none")
            continue
        click.echo("  options:")
        rows = [
            (
                o["name"],
                f"{o['type']} = {json.dumps(o['default'])}",
                o["help"] if o["domain"] == "any value" else f"{o['help']} [{o['domain']}]",
            )
            for o in info["options"]
        ]
        widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
        for name, typed, help_text in rows:
            click.echo(f"    {name.ljust(widths[0])}  {typed.ljust(widths[1])}  {help_text}")


# -- info -------------------------------------------------------------------------------------


@cli.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print the pipeline as JSON.")
@click.option(
    "--toml", "as_toml", is_flag=True, help="Print the stored pipeline (a valid pipeline file)."
)
def info(artifact: str, as_json: bool, as_toml: bool) -> None:
    """Print the pipeline stored in ARTIFACT (no model is built)."""
    if as_toml:
        click.echo(io.pipeline_text(artifact), nl=False)
        return
    document = io.read_pipeline(artifact)
    if as_json:
        _json(document)
        return
    model = document["model"]
    click.echo(f"artifact: {artifact}")
    click.echo(f"model: {model['source']} {_options_text(io.stored_options(model))}".rstrip())
    if model.get("sha256"):
        click.echo(f"model sha256: {model['sha256']}")
    if model.get("weights"):
        click.echo(f"weights: {model['weights']} (sha256 {model.get('weights_sha256', '?')})")
    if model.get("leaves"):
        click.echo(f"leaves: {', '.join(model['leaves'])}")
    click.echo(f"input: {_input_line(document)}")
    click.echo("passes:" if document.get("pass") else "passes: none")
    for i, p in enumerate(document.get("pass", []), 1):
        click.echo(f"  {i}. {p['name']} {_options_text(io.stored_options(p))}".rstrip())
    versions = document.get("versions", {})
    click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def _input_line(document: dict[str, Any]) -> str:
    """The example input an artifact records, or the zoo default it implies, or none."""
    table = document.get("input")
    if isinstance(table, dict) and isinstance(table.get("shape"), list):
        shape = [table.get("batch", 2), *table["shape"]]
        return f"{'x'.join(map(str, shape))} {table.get('dtype', 'float32')}"
    source = str(document["model"].get("source", ""))
    if source.startswith("zoo:"):
        from rewriter import zoo

        name = source.removeprefix("zoo:")
        options = io.stored_options(document["model"])
        if name in zoo.names():
            try:
                inputs = zoo.example_inputs(name, **options)
            except Exception:  # options the zoo rejects: the artifact is damaged
                inputs = None
            if inputs:
                shapes = ", ".join(
                    f"{'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')}"
                    for x in inputs
                )
                return f"{shapes} (the zoo model's default)"
    return "none recorded (export needs --input-shape)"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``rewriter``)."""
    cli.main(args=argv, prog_name="rewriter")
