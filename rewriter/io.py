"""Artifacts: a rewritten model saved as one self-describing ``.safetensors`` file.

An artifact holds every tensor of the GraphModule's ``state_dict`` (original
parameters, masks and new parameters alike) and, in the safetensors string
metadata under the key ``rewriter_pipeline``, a TOML document that says how to
rebuild the graph::

    format = "rewriter-artifact"
    format_version = 1

    [model]
    source = "zoo:resnet8"            # or "package.module:function"
    leaves = []                       # submodule names traced as leaves
    options = { width = 16 }          # keyword arguments of the factory

    [[pass]]
    name = "masks"
    options = { include = [], exclude = [], classes = [] }

    [versions]
    rewriter = "0.1.0"
    torch = "2.13.0"

TOML has no null: an option whose value is ``None`` is listed in a
``null_options`` array next to its ``options`` table instead.

:func:`load` rebuilds the source model, replays the passes with
:func:`rewriter.rewrite` and loads the tensors with ``strict=True``: the result is
an ordinary GraphModule that trains, switches between train and eval and
compiles. Nothing is unpickled. Loaded models start on the CPU in training mode,
like any freshly built module.
"""

from __future__ import annotations

import importlib
import inspect
import os
import tomllib
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import tomli_w
import torch
from safetensors import SafetensorError, safe_open
from torch import fx, nn

from .api import rewrite
from .errors import ArtifactError, RewriterError
from .manager import report
from .tracing import Tracer
from .zoo import plain as _plain

METADATA_KEY = "rewriter_pipeline"
FORMAT = "rewriter-artifact"
FORMAT_VERSION = 1

_SOURCE_HELP = (
    "Build the model with rewriter.zoo.create(...), set "
    "`model.rewriter_source = {'model': 'package.module:function', 'options': {...}}` "
    "before rewriting, or pass source='package.module:function' (or a dict with 'model' "
    "and 'options') to save()"
)


# -- sources ---------------------------------------------------------------------------------


def resolve_source(spec: str, options: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``spec`` with keyword ``options``.

    ``spec`` is ``"zoo:NAME"`` (or a bare zoo name such as ``"resnet8"``) or
    ``"package.module:function"``, where ``function`` may be a dotted attribute
    path and must return an ``nn.Module``. The model gets ``rewriter_source`` set,
    so a rewrite of it can be saved without naming the source again.
    Raises :class:`ArtifactError` when the source cannot be found or built.
    """
    options = dict(options or {})
    if not isinstance(spec, str) or not spec.strip():
        raise ArtifactError(f"model source must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("zoo:") or ":" not in spec:
        return _zoo_model(spec.removeprefix("zoo:"), options)
    factory = _import_factory(spec)
    _check_signature(spec, factory, options)
    try:
        model = factory(**options)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(
            f"model factory {spec!r} failed with options {options}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module"
        )
    model.rewriter_source = {"model": spec, "options": _plain(options)}
    return model


def _zoo_model(name: str, options: dict[str, Any]) -> nn.Module:
    from . import zoo

    if name not in zoo.names():
        import difflib

        close = difflib.get_close_matches(name, zoo.names(), n=1)
        hint = f" Did you mean 'zoo:{close[0]}'?" if close else ""
        raise ArtifactError(
            f"unknown model source {name!r}: not a zoo model.{hint} Use 'zoo:NAME' with one of "
            f"{', '.join(zoo.names())}, or an importable factory 'package.module:function'"
        )
    try:
        return zoo.create(name, **options)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot build zoo model {name!r}: {exc}") from exc


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ArtifactError(
            f"cannot read model source {spec!r}: use 'zoo:NAME' or 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ArtifactError(
                f"unknown model source {spec!r}: no module named {exc.name!r}. Install the "
                "package or run from the directory that contains it (or add it to PYTHONPATH)"
            ) from exc
        raise ArtifactError(
            f"importing {module_name!r} for model source {spec!r} failed: {exc}"
        ) from exc
    except ImportError as exc:
        raise ArtifactError(
            f"importing {module_name!r} for model source {spec!r} failed: {exc}"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ArtifactError(
                f"unknown model source {spec!r}: module {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArtifactError(f"model source {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _check_signature(spec: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # builtins and some C extensions: let the call itself fail
    try:
        signature.bind(**options)
    except TypeError as exc:
        params = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        raise ArtifactError(
            f"model factory {spec!r} does not accept options {sorted(options)}: {exc}. "
            f"Its parameters: {', '.join(params) or 'none'}"
        ) from exc


def _normalise_source(source: Any) -> dict[str, Any]:
    if isinstance(source, str):
        source = {"model": source, "options": {}}
    if not isinstance(source, Mapping) or not isinstance(source.get("model"), str):
        raise ArtifactError(
            f"cannot read model source {source!r}: expected 'package.module:function', "
            "'zoo:NAME' or a dict {'model': ..., 'options': {...}}"
        )
    unknown = sorted(set(source) - {"model", "options"})
    if unknown:
        raise ArtifactError(f"model source has unknown keys {unknown}; use 'model' and 'options'")
    model = source["model"].strip()
    if ":" not in model:
        model = f"zoo:{model}"
    options = source.get("options") or {}
    if not isinstance(options, Mapping):
        raise ArtifactError(f"model source options must be a dict, got {type(options).__name__}")
    return {"model": model, "options": dict(options)}


# -- TOML helpers ----------------------------------------------------------------------------


def _options_table(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"options": {...}, "null_options": [...]}`` for one set of options."""
    table = {k: _plain(v) for k, v in options.items() if v is not None}
    nulls = sorted(k for k, v in options.items() if v is None)
    try:
        tomli_w.dumps({"options": table})
    except (TypeError, ValueError) as exc:
        raise ArtifactError(
            f"the options of {where} cannot be stored in TOML ({exc}); options must be "
            "strings, numbers, booleans, None, or lists and tables of them"
        ) from exc
    out: dict[str, Any] = {"options": table}
    if nulls:
        out["null_options"] = nulls
    return out


def stored_options(table: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a ``[model]`` or ``[[pass]]`` table, ``null_options`` restored as None."""
    options = table.get("options", {})
    nulls = table.get("null_options", [])
    if not isinstance(options, dict) or not isinstance(nulls, list):
        raise ArtifactError("malformed options table in the pipeline metadata")
    return {**options, **dict.fromkeys(nulls)}


# -- save ------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The GraphModule inside ``torch.compile`` and ``DistributedDataParallel`` wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _leaves(gm: fx.GraphModule) -> list[str]:
    """Submodules called as leaves that the default tracer would have traced through.

    These are the leaves the user asked for; opaque modules (found again by the
    tracer on load) and modules inserted by passes are left out.
    """
    rep = report(gm)
    added = {name for p in rep.passes for name in p.modules_added}
    default = Tracer()
    names = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        if target in rep.opaque or target in added:
            continue
        if not default.is_leaf_module(gm.get_submodule(target), target):
            names.append(target)
    return sorted(set(names))


def _pipeline_document(gm: fx.GraphModule, source: Any) -> dict[str, Any]:
    import rewriter

    rep = report(gm)
    recorded = source if source is not None else rep.source
    if recorded is None:
        raise ArtifactError(f"cannot save: the model's source is unknown. {_SOURCE_HELP}")
    src = _normalise_source(recorded)
    model: dict[str, Any] = {"source": src["model"], "leaves": _leaves(gm)}
    model.update(_options_table(src["options"], f"model {src['model']!r}"))
    passes = [
        {"name": name, **_options_table(options, f"pass {name!r}")}
        for name, options in rep.pipeline()
    ]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model,
        "pass": passes,
        "versions": {"rewriter": rewriter.__version__, "torch": torch.__version__},
    }


def check_output(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Raise :class:`ArtifactError` unless an artifact can be written at ``path``.

    Missing parent directories are fine (:func:`save` creates them), but a parent
    that is a file is not; ``path`` must not be a directory, and an existing
    file is refused unless ``force``. :func:`save` calls it; front ends call it
    before expensive work.
    """
    path = Path(path)
    blocking = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ArtifactError(f"cannot write {path}: {blocking} is not a directory")
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a directory")
    if path.exists() and not force:
        raise ArtifactError(f"{path} already exists; pass force=True (CLI: --force) to replace it")


def _dumps(document: dict[str, Any]) -> str:
    """TOML text with one ``[[pass]]`` table per pass (tomli_w would inline short ones)."""
    head = {k: v for k, v in document.items() if k not in ("pass", "versions")}
    chunks = [tomli_w.dumps(head)]
    for entry in document["pass"]:
        scalars = {k: v for k, v in entry.items() if k != "options"}
        options = tomli_w.dumps({"pass": {"options": entry["options"]}})
        chunks.append(f"[[pass]]\n{tomli_w.dumps(scalars)}\n{options}")
    chunks.append(tomli_w.dumps({"versions": document["versions"]}))
    return "\n".join(chunks)


def _tensors(gm: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in gm.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ArtifactError(
                f"cannot save state_dict entry {key!r}: it is a {type(value).__name__}, "
                "not a tensor (safetensors stores tensors only)"
            )
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def save(
    gm: nn.Module,
    path: str | os.PathLike[str],
    *,
    source: str | Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write ``gm`` (a result of :func:`rewriter.rewrite`) to ``path`` as an artifact.

    ``source`` names the model the pipeline starts from (``"zoo:NAME"``,
    ``"package.module:function"`` or ``{"model": ..., "options": {...}}``) and
    overrides the one recorded from ``model.rewriter_source``. The file is
    written atomically (a temporary file in the same directory, then renamed);
    an existing file is only replaced with ``force=True``. ``torch.compile`` and
    DDP wrappers are unwrapped. Returns the path written.
    """
    gm = _unwrap(gm)
    path = Path(path)
    try:
        report(gm)
    except RewriterError as exc:
        raise ArtifactError(
            f"cannot save {type(gm).__name__}: save() takes a GraphModule returned by "
            "rewriter.rewrite() (it carries the pipeline to replay)"
        ) from exc
    check_output(path, force=force)
    document = _pipeline_document(gm, source)
    metadata = {"format": "pt", METADATA_KEY: _dumps(document)}
    tensors = _tensors(gm)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, _default_mode())  # safetensors creates files readable by the owner only
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, force)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _default_mode() -> int:
    """The permissions ``open()`` gives a new file: 0o666 minus the umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _publish(tmp: Path, path: Path, force: bool) -> None:
    """Move ``tmp`` to ``path``; without ``force``, never replace a file that appeared meanwhile."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and fails if ``path`` exists
    except FileExistsError:
        raise ArtifactError(
            f"{path} already exists; pass force=True (CLI: --force) to replace it"
        ) from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise ArtifactError(
                f"{path} already exists; pass force=True (CLI: --force) to replace it"
            ) from None
        os.replace(tmp, path)


# -- load ------------------------------------------------------------------------------------


def _open_metadata(path: Path) -> dict[str, str]:
    if not path.exists():
        raise ArtifactError(f"no such artifact: {path}")
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory, not an artifact file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise ArtifactError(
            f"{path} is not a readable safetensors file (truncated or not safetensors): {exc}"
        ) from exc


def read_pipeline(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The pipeline TOML stored in the artifact at ``path``, parsed; no model is built."""
    path = Path(path)
    metadata = _open_metadata(path)
    text = metadata.get(METADATA_KEY)
    if text is None:
        raise ArtifactError(
            f"{path} is a safetensors file without rewriter metadata (no {METADATA_KEY!r} "
            "entry): it holds tensors only. Load them with safetensors.torch.load_file() "
            "and model.load_state_dict()"
        )
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ArtifactError(f"{path}: the pipeline metadata is not valid TOML: {exc}") from exc
    if document.get("format") != FORMAT:
        raise ArtifactError(f"{path}: the metadata is not a {FORMAT} pipeline")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r} is newer than this rewriter reads "
            f"({FORMAT_VERSION}); upgrade rewriter"
        )
    model = document.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("source"), str):
        raise ArtifactError(f"{path}: the pipeline metadata has no [model] source")
    leaves = model.get("leaves", [])
    if not isinstance(leaves, list) or not all(isinstance(name, str) for name in leaves):
        raise ArtifactError(f"{path}: [model] leaves must be a list of submodule names")
    passes = document.get("pass", [])
    if not isinstance(passes, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name"), str) for p in passes
    ):
        raise ArtifactError(f"{path}: malformed [[pass]] entries in the pipeline metadata")
    return document


def load(path: str | os.PathLike[str]) -> fx.GraphModule:
    """Rebuild the GraphModule saved at ``path`` by :func:`save`.

    Builds the source model, replays the passes with :func:`rewriter.rewrite`
    (zoo models get their default example inputs, so the engine's checks run),
    then loads every tensor with ``strict=True``. A factory source
    (``package.module:function``) must be importable from ``sys.path``. The
    global RNG is left as it was. Raises :class:`ArtifactError` when the file is missing or malformed, the
    source cannot be built, the pipeline cannot be replayed, or the tensors do
    not match the rebuilt model (the message lists the differing keys).
    """
    path = Path(path)
    document = read_pipeline(path)
    _warn_versions(path, document.get("versions", {}))
    model_table = document["model"]
    source = model_table["source"]
    try:
        options = stored_options(model_table)
        passes = [(p["name"], stored_options(p)) for p in document.get("pass", [])]
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    leaves = model_table.get("leaves", [])
    with torch.random.fork_rng(devices=[]):
        try:
            model = resolve_source(source, options)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: cannot rebuild the source model: {exc}") from exc
        try:
            gm = rewrite(model, passes, leaves=leaves)
        except RewriterError as exc:
            raise ArtifactError(f"{path}: replaying the pipeline failed: {exc}") from exc
    try:
        tensors = safetensors.torch.load_file(str(path))
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: cannot read the tensors: {exc}") from exc
    _check_state(path, gm, tensors)
    gm.load_state_dict(tensors, strict=True)
    return gm


def _check_state(path: Path, gm: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = gm.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {'; '.join(shapes)}")
    raise ArtifactError(
        f"{path}: the tensors do not match the model rebuilt from its pipeline "
        f"({'; '.join(parts)}). Was the file edited, or did the source model change?"
    )


def _warn_versions(path: Path, versions: Mapping[str, Any]) -> None:
    import rewriter

    saved = versions.get("rewriter")
    if saved is not None and saved != rewriter.__version__:
        warnings.warn(
            f"{path} was saved by rewriter {saved}, this is {rewriter.__version__}; "
            "if a pass changed in between, the rebuilt model may not match its tensors",
            stacklevel=3,
        )


__all__ = ["check_output", "load", "read_pipeline", "resolve_source", "save", "stored_options"]
