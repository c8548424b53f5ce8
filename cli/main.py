"""The ``rewriter`` command line: apply passes to a model, list passes, inspect artifacts.

Exit codes: 0 success; 2 a user error (unknown pass or option, bad value,
missing file, existing output), printed as ``error: <message>`` without a
traceback; 1 an unexpected failure, with a hint to rerun with ``--debug``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import click
import torch

import rewriter
from rewriter import io
from rewriter.errors import RewriterError
from rewriter.manager import PassRecord

from .specs import parse_key_values, parse_value, pass_from_spec

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
        except (RewriterError, *_USER_OS_ERRORS) as exc:
            if debug:
                traceback.print_exc()
            _error(str(exc))
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


# -- apply -----------------------------------------------------------------------------------


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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _importable_cwd() -> None:
    """Let ``package.module:function`` name a module in the current directory."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


@cli.command()
@click.argument("model")
@click.option(
    "--pass",
    "pass_specs",
    multiple=True,
    metavar="NAME[:key=value,...]",
    help="A pass to apply, in order (repeatable). Values are TOML literals or plain text.",
)
@click.option(
    "--model-option",
    "model_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Keyword argument for the model factory (repeatable).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Artifact to write (.safetensors).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the model's initial weights."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report instead of the table.")
def apply(
    model: str,
    pass_specs: tuple[str, ...],
    model_options: tuple[str, ...],
    output: str,
    force: bool,
    seed: int,
    as_json: bool,
) -> None:
    """Apply passes to MODEL and save the result as an artifact.

    MODEL is a zoo model (zoo:resnet20) or a factory (package.module:function).

    \b
    Example:
      rewriter apply zoo:resnet20 --pass masks --pass rbn:init=paper -o resnet20.safetensors
    """
    try:
        passes = [pass_from_spec(spec) for spec in pass_specs]
    except click.BadParameter as exc:
        exc.param_hint = "'--pass'"
        raise
    try:
        raw = parse_key_values(model_options, "--model-option")
    except click.BadParameter as exc:
        exc.param_hint = "'--model-option'"
        raise
    options = {key: parse_value(text) for key, text in raw.items()}
    out = Path(output)
    io.check_output(out, force=force)

    _importable_cwd()
    torch.manual_seed(seed)
    source_model = io.resolve_source(model, options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        gm = rewriter.rewrite(source_model, passes)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    io.save(gm, out, force=force)

    rep = rewriter.report(gm)
    size = out.stat().st_size
    tensors = len(gm.state_dict())
    source = source_model.rewriter_source
    if as_json:
        click.echo(
            json.dumps(
                {
                    "model": source,
                    "passes": [_record_json(p) for p in rep.passes],
                    "opaque": rep.opaque,
                    "output": str(out),
                    "bytes": size,
                    "tensors": tensors,
                    "warnings": [str(w.message) for w in caught],
                },
                indent=2,
            )
        )
        return
    click.echo(f"model: {source['model']} {_options_text(source['options'])}".rstrip())
    click.echo(rep.table() if rep.passes else "(no passes)")
    click.echo(f"wrote {out} ({_size(size)}, {tensors} tensors)")


def _options_text(options: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v)}" for k, v in options.items())


# -- passes ----------------------------------------------------------------------------------


def _pass_info(name: str, cls: type[rewriter.Pass]) -> dict[str, Any]:
    try:
        preserves: bool | None = bool(cls().preserves_outputs)
    except (TypeError, ValueError):
        preserves = None  # the pass has required options
    return {
        "name": name,
        "summary": cls.summary(),
        "preserves_outputs": preserves,
        "options": [
            {
                "name": s.name,
                "type": s.type_name,
                "default": s.default,
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
        click.echo(json.dumps(infos, indent=2))
        return
    for i, info in enumerate(infos):
        if i:
            click.echo()
        preserves = {True: "yes", False: "no", None: "depends on options"}[
            info["preserves_outputs"]
        ]
        click.echo(f"{info['name']}: {info['summary']}")
        click.echo(f"  preserves outputs: {preserves}")
        if not info["options"]:
            click.echo("  options: none")
            continue
        click.echo("  options:")
        rows = [
            (o["name"], f"{o['type']} = {json.dumps(o['default'])}", o["help"])
            for o in info["options"]
        ]
        widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
        for name, typed, help_text in rows:
            click.echo(f"    {name.ljust(widths[0])}  {typed.ljust(widths[1])}  {help_text}")


# -- info ------------------------------------------------------------------------------------


@cli.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print the pipeline as JSON.")
def info(artifact: str, as_json: bool) -> None:
    """Print the pipeline stored in ARTIFACT (no model is built)."""
    document = io.read_pipeline(artifact)
    if as_json:
        click.echo(json.dumps(document, indent=2, default=str))
        return
    model = document["model"]
    click.echo(f"artifact: {artifact}")
    click.echo(f"model: {model['source']} {_options_text(io.stored_options(model))}".rstrip())
    if model.get("leaves"):
        click.echo(f"leaves: {', '.join(model['leaves'])}")
    click.echo("passes:" if document.get("pass") else "passes: none")
    for i, p in enumerate(document.get("pass", []), 1):
        click.echo(f"  {i}. {p['name']} {_options_text(io.stored_options(p))}".rstrip())
    versions = document.get("versions", {})
    click.echo("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``rewriter``)."""
    cli.main(args=argv, prog_name="rewriter")
