"""Artifacts: a rewritten model saved as one self-describing ``.safetensors`` file.

An artifact holds every tensor of the GraphModule's ``state_dict`` (original
parameters, masks and new parameters alike) and, in the safetensors string
metadata under the key ``rewriter_pipeline``, a TOML document that says how to
rebuild the graph::

    format = "rewriter-artifact"
    format_version = 2

    [model]
    source = "zoo:resnet8"            # or "package.module:function", or a file path
    leaves = []                       # submodule names traced as leaves
    options = { width = 16 }          # keyword arguments of the factory

    [input]                           # optional: the example input used for checks
    shape = [3, 32, 32]               # without the batch dimension
    batch = 2
    dtype = "float32"

    [[pass]]
    name = "masks"
    options = { include = [], exclude = [], classes = [] }

    [versions]
    rewriter = "0.1.0"
    torch = "2.13.0"

TOML has no null: an option whose value is ``None`` is listed in a
``null_options`` array next to its ``options`` table instead.

A model read from a file (a ``torch.export`` ``.pt2`` program, or with explicit
trust a pickled module) is recorded by its absolute path and ``sha256``; loading
the artifact reads that file again and refuses it if it is missing or changed.
Weights loaded into the source model before rewriting are recorded as
``weights``/``weights_sha256`` for provenance only (the artifact holds every tensor).

Model files are recognised by their first bytes, never by unpickling them:
:func:`file_format`. Pickles (whole modules saved with ``torch.save(model)``) are
only loaded with ``trust_pickle=True``; state dicts are read with
``torch.load(weights_only=True)``.

Format 2 also stores the rewritten graph itself as data, under the metadata key
``rewriter_graph`` (:mod:`rewriter.graphio`: nodes, allow-listed call targets,
``torch.nn`` and library modules with their constructor configs, meta), and the
tensors outside the state dict under ``rewriter.extra/`` keys. :func:`load`
rebuilds the GraphModule from that alone, with no source model, source file or
import of user code; the pipeline stays the human-readable recipe. Artifacts
without a stored graph (format 1, or a model :func:`save` could not store as
data, recorded under ``rewriter_graph_omitted``) are rebuilt the old way:
:func:`load` rebuilds the source model (a zoo model; a factory or a model file
only with ``trust_source=True``), replays the passes with
:func:`rewriter.rewrite` and loads the tensors with ``strict=True``. Either way
the result is an ordinary GraphModule that trains, switches between train and
eval and compiles. Nothing is unpickled unless ``trust_pickle=True``. Loaded models start on the CPU in training mode,
like any freshly built module.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import os
import pickle
import re
import shutil
import stat
import time
import tomllib
import uuid
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import tomli_w
import torch
from safetensors import SafetensorError, safe_open
from torch import fx, nn

from . import graphio
from .api import rewrite
from .errors import ArtifactError, OutputExistsError, OutputWriteError, RewriterError
from .manager import REPORT_KEY, report
from .tracing import Tracer
from .zoo import plain as _plain

METADATA_KEY = "rewriter_pipeline"
INPUTS_KEY = "rewriter_example_inputs"  # GraphModule.meta: inputs for checks and export
INPUT_TABLE_KEY = "rewriter_input"  # GraphModule.meta: the [input] table those came from
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODEL_SUFFIXES = (".pt2", ".pt", ".pth", ".pkl", ".pickle", ".safetensors", ".bin", ".ckpt")
FORMAT = "rewriter-artifact"
FORMAT_VERSION = 2  # 2: the rewritten graph is stored as data (rewriter.graphio)

_SOURCE_HELP = (
    "Build the model with rewriter.zoo.create(...), set "
    "`model.rewriter_source = {'model': 'package.module:function', 'options': {...}}` "
    "before rewriting, or pass source='package.module:function' (or a dict with 'model' "
    "and 'options') to save()"
)


# -- sources ---------------------------------------------------------------------------------


def resolve_source(
    spec: str,
    options: Mapping[str, Any] | None = None,
    *,
    sha256: str | None = None,
    trust_pickle: bool = False,
    trust_source: bool = False,
) -> nn.Module:
    """Build the model named by ``spec`` with keyword ``options``.

    ``spec`` is ``"zoo:NAME"`` (or a bare zoo name such as ``"resnet8"``),
    ``"package.module:function"`` (``function`` may be a dotted attribute path and
    must return an ``nn.Module``), or the path of a model file:

    * a ``torch.export`` program (``.pt2``), lifted to a GraphModule with
      :func:`rewriter.lift.lift` (its example inputs are kept in
      ``gm.meta[INPUTS_KEY]``);
    * an artifact written by :func:`save`, loaded with :func:`load`;
    * a whole pickled module (``torch.save(model)``), only with ``trust_pickle``.

    The model gets ``rewriter_source`` set, so a rewrite of it can be saved
    without naming the source again; file sources record their absolute path and
    ``sha256``. When ``sha256`` is given, a file source must still have it.
    Raises :class:`ArtifactError` when the source cannot be found or built.
    """
    options = dict(options or {})
    if not isinstance(spec, str) or not spec.strip():
        raise ArtifactError(f"model source must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if not spec.startswith("zoo:") and Path(spec).is_dir():
        raise ArtifactError(
            f"{spec} is a directory. MODEL is a model file (a .pt2 program or a rewriter "
            "artifact), a zoo model (zoo:NAME) or a factory (package.module:function)"
        )
    if is_file_source(spec):
        return _file_model(
            Path(spec), options, sha256=sha256, trust_pickle=trust_pickle, trust_source=trust_source
        )
    if spec.startswith("zoo:") or ":" not in spec:
        return _zoo_model(spec, options)
    factory = _import_factory(spec)
    _check_signature(spec, factory, options)
    try:
        model = factory(**options)
    except Exception as exc:  # the user's factory may raise anything
        raise ArtifactError(
            f"model factory {spec!r} failed{_with_options(options)}: {type(exc).__name__}: "
            f"{_first_line(exc)}. Check the factory and its options (--model-option)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module"
        )
    model.rewriter_source = {"model": spec, "options": _plain(options)}
    return model


def is_file_source(spec: str) -> bool:
    """Whether a model source names a file (an existing file, or a model-file suffix)."""
    if spec.startswith("zoo:"):
        return False
    path = Path(spec)
    return (
        path.is_file()
        or path.suffix.lower() in MODEL_SUFFIXES
        or (os.sep in spec and ":" not in spec)
    )


def file_format(path: str | os.PathLike[str]) -> str:
    """What a file holds, from its first bytes; nothing is unpickled or imported.

    One of ``"safetensors"``, ``"pt2"`` (a ``torch.export`` archive), ``"torch"``
    (a ``torch.save`` zip: a pickle inside), ``"pickle"`` (a raw or legacy
    ``torch.save`` pickle), ``"zip"`` (another zip file) or ``"unknown"``.
    Raises :class:`ArtifactError` when the file is missing.
    """
    path = regular_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "zip"
        if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch"
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path``, checked to be an existing regular file before anything reads it.

    Directories, devices (``/dev/zero``), FIFOs and sockets raise
    :class:`ArtifactError`: reading them could hang or never end.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ArtifactError(f"no such {what}: {path}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise ArtifactError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise ArtifactError(f"{path} is {kind}; rewriter reads regular files only")
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _with_options(options: Mapping[str, Any]) -> str:
    if not options:
        return ""
    return " with options " + ", ".join(f"{k}={v!r}" for k, v in options.items())


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 digest of a regular file's bytes."""
    path = regular_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_PRESERVED = "_user_preserved_attributes"  # torch.fx: attributes GraphModule deepcopy keeps

_PICKLE_HELP = (
    "A pickle can run arbitrary code when it is loaded, so rewriter does not open it "
    "unless told to. If you trust the file, pass --trust-pickle (Python: "
    "trust_pickle=True). Better: save model.state_dict() with safetensors and pass it "
    "with --weights to the factory that builds the model, or export the model with "
    "torch.export.save() and give the .pt2 file"
)


def _file_model(
    path: Path,
    options: dict[str, Any],
    *,
    sha256: str | None,
    trust_pickle: bool,
    trust_source: bool = False,
) -> nn.Module:
    if not path.exists():
        raise ArtifactError(f"no such model file: {path}")
    kind = file_format(path)
    if options:
        raise ArtifactError(
            f"model options {sorted(options)} given for the model file {path}; "
            "options are keyword arguments of factories and zoo models only"
        )
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        raise ArtifactError(
            f"the model file {path} changed since the artifact was written "
            f"(sha256 {digest[:12]}..., recorded {sha256[:12]}...). Restore the original "
            "file, or apply the passes to the new one again"
        )
    if kind == "pt2":
        from .lift import example_inputs, lift, load_pt2

        ep = load_pt2(path, trust_pickle=trust_pickle)
        model: nn.Module = lift(ep)
        model.meta[INPUTS_KEY] = example_inputs(ep)
    elif kind in ("torch", "pickle"):
        model = _unpickle_model(path, trust_pickle)
    elif kind == "safetensors":
        if METADATA_KEY not in _open_metadata(path):
            raise ArtifactError(
                f"{path} holds tensors only (no rewriter pipeline). Give the factory or zoo "
                f"model that builds the network as MODEL and this file as its weights "
                f"(--weights {path})"
            )
        return load(path, trust_pickle=trust_pickle, trust_source=trust_source)
    else:
        raise ArtifactError(
            f"{path} is not a model file rewriter reads: expected a torch.export program "
            "(.pt2), a rewriter artifact (.safetensors) or, with --trust-pickle, a pickled "
            "module"
        )
    _set_source(model, {"model": str(path.resolve()), "options": {}, "sha256": digest})
    return model


def _set_source(model: nn.Module, source: dict[str, Any]) -> None:
    """Set ``model.rewriter_source``, also for GraphModules (whose deepcopy drops attributes)."""
    model.rewriter_source = source
    if isinstance(model, fx.GraphModule):
        preserved = model.meta.setdefault(_PRESERVED, {})
        preserved["rewriter_source"] = source


def _unpickle_model(path: Path, trust_pickle: bool) -> nn.Module:
    if not trust_pickle:
        raise ArtifactError(f"refusing to unpickle {path}: it is a pickle. {_PICKLE_HELP}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling raises whatever the pickled code raises
        raise ArtifactError(f"cannot unpickle {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping):
        raise ArtifactError(
            f"{path} holds a {type(obj).__name__} (a state dict?), not a module. Give the "
            f"factory or zoo model as MODEL and this file with --weights {path}"
        )
    if not isinstance(obj, nn.Module):
        raise ArtifactError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    if isinstance(obj, fx.GraphModule) and REPORT_KEY in obj.meta:
        raise ArtifactError(
            f"{path} is a pickled rewritten model; save rewritten models with rewriter.save()"
        )
    return obj


def _zoo_model(spec: str, options: dict[str, Any]) -> nn.Module:
    from . import zoo

    name = spec.removeprefix("zoo:")
    if name not in zoo.names():
        import difflib

        close = difflib.get_close_matches(name, zoo.names(), n=1)
        hint = f" Did you mean 'zoo:{close[0]}'?" if close else ""
        raise ArtifactError(
            f"unknown model source {spec!r}: not a zoo model.{hint} Use 'zoo:NAME' with one of "
            f"{', '.join(zoo.names())}, or an importable factory 'package.module:function'"
        )
    try:
        return zoo.create(name, **options)
    except Exception as exc:  # a bad option value fails anywhere inside the constructor
        raise ArtifactError(
            f"cannot build zoo model {name!r}{_with_options(options)}: {type(exc).__name__}: "
            f"{_first_line(exc)}. Check the option values (--model-option)"
        ) from exc


FACTORY_DIRS: list[str] = []  # searched last, only while a factory's module is imported


def _import_module(name: str) -> Any:
    """``importlib.import_module`` with :data:`FACTORY_DIRS` at the end of ``sys.path``
    for the duration of the import only (the CLI puts the working directory there for a
    factory the user typed): a stray module in it can neither shadow an installed one
    nor be picked up by a lazy import later."""
    import sys

    added = [d for d in FACTORY_DIRS if d not in sys.path]
    sys.path.extend(added)
    try:
        return importlib.import_module(name)
    finally:
        for folder in added:
            if folder in sys.path:
                sys.path.remove(folder)


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ArtifactError(
            f"cannot read model source {spec!r}: use 'zoo:NAME' or 'package.module:function'"
        )
    try:
        obj: Any = _import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ArtifactError(
                f"unknown model source {spec!r}: no module named {exc.name!r}. Install the "
                "package or run from the directory that contains it (or add it to PYTHONPATH)"
            ) from exc
        raise ArtifactError(
            f"importing {module_name!r} for model source {spec!r} failed: {exc}"
        ) from exc
    except Exception as exc:  # ImportError, SyntaxError, or whatever the module raises
        raise ArtifactError(
            f"importing {module_name!r} for model source {spec!r} failed: "
            f"{type(exc).__name__}: {_first_line(exc)}"
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


_SOURCE_KEYS = ("model", "options", "sha256", "weights", "weights_sha256")


def _normalise_source(source: Any) -> dict[str, Any]:
    if isinstance(source, str):
        source = {"model": source, "options": {}}
    if not isinstance(source, Mapping) or not isinstance(source.get("model"), str):
        raise ArtifactError(
            f"cannot read model source {source!r}: expected 'package.module:function', "
            "'zoo:NAME', a file path or a dict {'model': ..., 'options': {...}}"
        )
    unknown = sorted(set(source) - set(_SOURCE_KEYS))
    if unknown:
        raise ArtifactError(
            f"model source has unknown keys {unknown}; use {', '.join(map(repr, _SOURCE_KEYS))}"
        )
    model = source["model"].strip()
    if ":" not in model and not is_file_source(model):
        model = f"zoo:{model}"
    options = source.get("options") or {}
    if not isinstance(options, Mapping):
        raise ArtifactError(f"model source options must be a dict, got {type(options).__name__}")
    extra = {k: str(source[k]) for k in _SOURCE_KEYS[2:] if source.get(k) is not None}
    return {"model": model, "options": dict(options), **extra}


# -- weights ---------------------------------------------------------------------------------


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, or a state dict saved with ``torch.save``.

    ``torch.save`` files are read with ``torch.load(weights_only=True)``, which
    refuses anything but tensors and plain containers; a dict with a
    ``"state_dict"`` entry (a training checkpoint) gives that entry.
    Raises :class:`ArtifactError` for missing, damaged or unsafe files.
    """
    path = Path(path)
    kind = file_format(path)
    if kind == "safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(
                f"{path} is not a readable safetensors file (truncated or damaged): {exc}"
            ) from exc
    if kind not in ("torch", "pickle"):
        what = {"pt2": "a torch.export program; give it as MODEL instead"}.get(
            kind, "not a safetensors file or a state dict saved with torch.save"
        )
        raise ArtifactError(f"cannot read weights from {path}: it is {what}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise ArtifactError(
            f"{path} is not a plain state dict: it holds pickled Python objects that "
            f"torch.load(weights_only=True) refuses ({reason}). If it is a whole pickled "
            "model you trust, give it as MODEL with --trust-pickle; otherwise save "
            "model.state_dict() instead"
        ) from exc
    except Exception as exc:  # damaged zip or pickle
        raise ArtifactError(
            f"cannot read weights from {path} (truncated or damaged?): {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ArtifactError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ArtifactError(f"{path}: these state-dict entries are not tensors: {', '.join(bad)}")
    return {str(k): v for k, v in obj.items()}


def apply_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the weights file at ``path`` into ``model`` (strict: same keys and shapes).

    Records the file in ``model.rewriter_source`` (path and sha256) when present.
    Raises :class:`ArtifactError` listing every missing, unexpected or mis-shaped key.
    """
    path = Path(path)
    tensors = load_weights(path)
    problems = _state_mismatch(model.state_dict(), tensors)
    if problems:
        hint = ""
        if tensors and all(k.startswith("module.") for k in tensors):
            hint = " (every key starts with 'module.': a DistributedDataParallel checkpoint?)"
        raise ArtifactError(f"the weights in {path} do not fit the model ({problems}){hint}")
    model.load_state_dict(tensors, strict=True)
    source = getattr(model, "rewriter_source", None)
    if isinstance(source, dict):
        source["weights"] = str(path.resolve())
        source["weights_sha256"] = sha256_of(path)


# -- example inputs --------------------------------------------------------------------------


def inputs_from_table(table: Mapping[str, Any], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random example inputs for an ``[input]`` table (shape, batch, dtype)."""
    shape = [int(table.get("batch", 2)), *(int(s) for s in table["shape"])]
    check_input_size(shape)
    dtype = DTYPES[table.get("dtype", "float32")]
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype),)


def check_input_size(shape: Sequence[int]) -> None:
    """Refuse an example input with more elements than ``LIMITS.max_input_elements``."""
    from .registry import LIMITS

    elements = 1
    for size in shape:
        elements *= int(size)
    if elements > LIMITS.max_input_elements:
        raise ArtifactError(
            f"the example input {'x'.join(map(str, shape))} has {elements:,} elements, above "
            f"the limit of {LIMITS.max_input_elements:,}; raise it with --max-input-elements "
            "(Python: rewriter.option_limits(max_input_elements=...)) if you mean it"
        )


def default_inputs(model: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The example inputs known for ``model``: recorded ones, else a zoo model's default."""
    meta = getattr(model, "meta", None)
    meta = meta if isinstance(meta, dict) else {}
    if meta.get(INPUTS_KEY) is not None:
        return tuple(meta[INPUTS_KEY])
    source = getattr(model, "rewriter_source", None) or meta.get("rewriter_source")
    if isinstance(source, Mapping) and str(source.get("model", "")).startswith("zoo:"):
        from . import zoo

        return zoo.example_inputs(source["model"].removeprefix("zoo:"), **source["options"])
    return None


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


def _pipeline_document(
    gm: fx.GraphModule, source: Any, inputs: Mapping[str, Any] | None
) -> dict[str, Any]:
    import rewriter

    rep = report(gm)
    recorded = source if source is not None else rep.source
    if recorded is None:
        raise ArtifactError(f"cannot save: the model's source is unknown. {_SOURCE_HELP}")
    src = _normalise_source(recorded)
    model: dict[str, Any] = {"source": src["model"]}
    model.update({k: src[k] for k in _SOURCE_KEYS[2:] if k in src})
    model["leaves"] = _leaves(gm)
    model.update(_options_table(src["options"], f"model {src['model']!r}"))
    passes = [
        {"name": name, **_options_table(options, f"pass {name!r}")}
        for name, options in rep.pipeline()
    ]
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model}
    if inputs is not None:
        document["input"] = _input_table(inputs)
    document["pass"] = passes
    document["versions"] = {"rewriter": rewriter.__version__, "torch": torch.__version__}
    return document


def _input_table(inputs: Mapping[str, Any]) -> dict[str, Any]:
    shape = inputs.get("shape")
    dtype = inputs.get("dtype", "float32")
    batch = inputs.get("batch", 2)
    if (
        not isinstance(shape, (list, tuple))
        or not all(isinstance(s, int) and s > 0 for s in shape)
        or not isinstance(batch, int)
        or batch < 1
        or dtype not in DTYPES
    ):
        raise ArtifactError(
            f"cannot record example input {dict(inputs)!r}: expected shape (positive "
            f"integers, without the batch), batch (a positive integer) and dtype (one of "
            f"{', '.join(DTYPES)})"
        )
    return {"shape": list(shape), "batch": batch, "dtype": dtype}


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
    if blocking is not None and not os.access(blocking, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {path}: the directory {blocking} is not writable")
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a directory")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise ArtifactError(f"cannot write {path}: it exists and is not a regular file")
    if path.exists() and not force:
        raise OutputExistsError(path)


_TEMP = re.compile(r"\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{12}\.tmp")
_LEGACY_TEMP_AGE = 3600.0  # seconds; temp files without a writer pid


def _temp_path(path: Path) -> Path:
    """A fresh temporary sibling of ``path``: ``.NAME.PID-RANDOM.tmp``."""
    _remove_stale_temps(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary files of earlier writes to ``path`` whose writer is gone.

    A write killed with SIGKILL cannot clean up after itself; its temp file names
    the writer's pid, so the next write to the same target removes it once that
    process no longer exists. Temp files of older releases (no pid) are removed
    when they are more than an hour old.
    """
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match is None or match["name"] != path.name:
            continue
        if match["pid"] is not None:
            if _process_alive(int(match["pid"])):
                continue
        else:
            try:
                if time.time() - entry.lstat().st_mtime < _LEGACY_TEMP_AGE:
                    continue
            except OSError:
                continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _write_error(path: Path, exc: BaseException) -> OutputWriteError:
    reason = getattr(exc, "strerror", None) or _first_line(exc)
    return OutputWriteError(
        f"cannot write {path}: {reason}. Choose a writable directory, or free some space"
    )


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
    inputs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``gm`` (a result of :func:`rewriter.rewrite`) to ``path`` as an artifact.

    ``source`` names the model the pipeline starts from (``"zoo:NAME"``,
    ``"package.module:function"``, a model file, or ``{"model": ..., "options":
    {...}}``) and overrides the one recorded from ``model.rewriter_source``.
    ``inputs`` (``{"shape": [...], "batch": 2, "dtype": "float32"}``, shape without
    the batch) records the example input, used by :func:`load` for the engine's
    checks and by ``rewriter export``. The file is
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
    if inputs is None:
        inputs = getattr(gm, "meta", {}).get(INPUT_TABLE_KEY)
    document = _pipeline_document(gm, source, inputs)
    metadata = {"format": "pt", METADATA_KEY: _dumps(document)}
    tensors = _tensors(gm)
    try:
        metadata[graphio.GRAPH_KEY], extra = graphio.dump(gm)
        tensors.update(extra)
    except graphio.GraphNotData as exc:
        metadata[graphio.OMITTED_KEY] = str(exc)  # load() then needs trust_source=True

    tmp = path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path)
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, _default_mode())  # safetensors creates files readable by the owner only
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, force)
    except (OSError, SafetensorError) as exc:
        raise _write_error(path, exc) from exc
    finally:
        if tmp != path:
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
        raise OutputExistsError(path) from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise OutputExistsError(path) from None
        os.replace(tmp, path)


def export(
    gm: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Sequence[torch.Tensor],
    *,
    force: bool = False,
) -> Path:
    """Write an eval-mode ``torch.export`` program of ``gm`` to ``path`` (``.pt2``).

    A copy of ``gm`` is switched to eval mode and exported with ``example_inputs``,
    so ``gm`` itself is unchanged. The batch dimension (dim 0 of every input) is
    exported as dynamic where the model allows it (``Dim.AUTO``: torch specializes
    it to the example's size when the model needs a fixed batch). The file is written
    atomically, like :func:`save`; an existing file is only replaced with
    ``force=True``. Raises :class:`ArtifactError` when the model cannot be exported.
    """
    path = Path(path)
    check_output(path, force=force)
    model = copy.deepcopy(_unwrap(gm)).eval()
    try:
        dynamic = tuple(
            {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None
            for x in example_inputs
        )
        program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic)
    except Exception as exc:  # torch.export raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ArtifactError(
            f"torch.export could not export the model: {type(exc).__name__}: {first} "
            "(rerun with --debug for the full error)"
        ) from exc
    tmp_dir = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = _temp_path(path)
        tmp_dir.mkdir()
        tmp = tmp_dir / path.name  # the archive's root folder is named after the file
        torch.export.save(program, tmp)
        os.chmod(tmp, _default_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, force)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


# -- load ------------------------------------------------------------------------------------


def _open_metadata(path: Path) -> dict[str, str]:
    regular_file(path, "artifact")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as exc:
        raise ArtifactError(
            f"{path} is not a readable safetensors file (truncated or not safetensors): {exc}"
        ) from exc


def pipeline_text(path: str | os.PathLike[str]) -> str:
    """The pipeline TOML stored in the artifact at ``path``, as written (a pipeline file)."""
    path = Path(path)
    text = _open_metadata(path).get(METADATA_KEY)
    if text is None:
        raise ArtifactError(
            f"{path} is a safetensors file without rewriter metadata (no {METADATA_KEY!r} "
            "entry): it holds tensors only. Load them with safetensors.torch.load_file() "
            "and model.load_state_dict()"
        )
    return text


def read_pipeline(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The pipeline TOML stored in the artifact at ``path``, parsed; no model is built."""
    path = Path(path)
    text = pipeline_text(path)
    try:
        document = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ArtifactError(f"{path}: the pipeline metadata is not valid TOML: {reason}") from None
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
    from .registry import LIMITS

    if len(passes) > LIMITS.max_passes:
        raise ArtifactError(
            f"{path}: the pipeline has {len(passes)} passes, above the limit of "
            f"{LIMITS.max_passes}; raise it with --max-passes (Python: "
            "rewriter.option_limits(max_passes=...)) if you trust the file"
        )
    return document


def load(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    trust_source: bool = False,
    trust_pickle: bool = False,
) -> fx.GraphModule:
    """Rebuild the GraphModule saved at ``path`` by :func:`save`, from the file alone.

    An artifact of format 2 stores the rewritten graph as data
    (:mod:`rewriter.graphio`): every node, the constructor config of every
    ``torch.nn`` and library module, and the meta passes need; the tensors are
    loaded with ``strict=True``. Nothing is imported, called or unpickled outside
    the allow-lists of :mod:`rewriter.graphio`, and neither the source model nor
    the source file is needed. When the example inputs are known (recorded, an
    ``[input]`` table, or a zoo model's default) shapes are propagated again, as a
    rewrite would have done, and ``meta[INPUTS_KEY]`` holds them.

    A model with user-defined (opaque) modules needs ``model=`` (the source model;
    its submodules at the same names are copied) or ``trust_source=True`` (import
    and call the factory named in the artifact). An artifact without a stored
    graph (format 1, or a model :func:`save` could not store as data) is rebuilt by
    replaying its pipeline on ``model``, on its zoo model, or, only with
    ``trust_source=True``, on its factory or model file (a pickled one also needs
    ``trust_pickle``). The global RNG is left as it was. Raises
    :class:`ArtifactError` when the file is missing or malformed, names anything
    outside the allow-lists, or its tensors do not match the rebuilt model.
    """
    path = Path(path)
    document = read_pipeline(path)
    _warn_versions(path, document.get("versions", {}))
    metadata = _open_metadata(path)
    text = metadata.get(graphio.GRAPH_KEY)
    if text is not None:
        return _load_graph(path, document, text, model, trust_source, trust_pickle)
    source = document["model"]["source"]
    if model is None and not trust_source and not source.startswith("zoo:"):
        why = metadata.get(graphio.OMITTED_KEY)
        why = (
            f"save() could not store its graph as data ({why})"
            if why
            else f"it was written in format {document.get('format_version')}, before graphs were stored"
        )
        raise ArtifactError(
            f"{path} holds no stored graph: {why}. Rebuilding it means running its source "
            f"{source!r}. If you trust that code, load with trust_source=True (CLI: "
            "--trust-source), or pass the source model with load(path, model=...); then save "
            "it again with this rewriter to get a self-contained artifact"
        )
    return _replay(path, document, model, trust_pickle)


def _load_graph(
    path: Path,
    document: Mapping[str, Any],
    text: str,
    model: nn.Module | None,
    trust_source: bool,
    trust_pickle: bool,
) -> fx.GraphModule:
    try:
        stored = graphio.read(text)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    if model is None and trust_source and graphio.opaque_paths(stored):
        model_table = document["model"]
        try:
            with torch.random.fork_rng(devices=[]):
                model = resolve_source(
                    model_table["source"],
                    stored_options(model_table),
                    sha256=model_table.get("sha256"),
                    trust_pickle=trust_pickle,
                )
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: cannot rebuild the source model: {exc}") from exc
    tensors = _read_tensors(path)
    try:
        gm = graphio.build(stored, tensors, model=model)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except Exception as exc:  # anything else a crafted graph provokes is still bad input
        raise ArtifactError(
            f"{path}: the stored graph cannot be rebuilt: {type(exc).__name__}: {exc}"
        ) from None
    state = {k: v for k, v in tensors.items() if not k.startswith(graphio.EXTRA_PREFIX)}
    problems = _state_mismatch(gm.state_dict(), state)
    if problems:
        raise ArtifactError(
            f"{path}: the tensors do not match the stored graph ({problems}). Was the file edited?"
        )
    gm.load_state_dict(state, strict=True)
    inputs = gm.meta.get(INPUTS_KEY)
    table = gm.meta.get(INPUT_TABLE_KEY)
    if inputs is None and isinstance(document.get("input"), dict):
        try:
            table = _input_table(document["input"])
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: malformed [input] table: {exc}") from None
        inputs = inputs_from_table(table)
    if inputs is None:
        inputs = default_inputs(gm)
    if inputs is not None:
        from .manager import _propagate_shapes

        inputs = tuple(inputs)
        try:
            with torch.random.fork_rng(devices=[]):
                _propagate_shapes(gm, inputs)  # node.meta["tensor_meta"], as after a rewrite
        except Exception as exc:  # the stored model fails on its own example inputs
            raise ArtifactError(
                f"{path}: the rebuilt model fails on its example inputs: {type(exc).__name__}: {exc}"
            ) from None
        gm.meta[INPUTS_KEY] = inputs
    if table is not None:
        gm.meta[INPUT_TABLE_KEY] = table
    return gm


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path))
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: cannot read the tensors: {exc}") from exc


def _replay(
    path: Path, document: Mapping[str, Any], given: nn.Module | None, trust_pickle: bool
) -> fx.GraphModule:
    """The old way (format 1): rebuild the source model and replay the pipeline."""
    model_table = document["model"]
    source = model_table["source"]
    try:
        options = stored_options(model_table)
        passes = [(p["name"], stored_options(p)) for p in document.get("pass", [])]
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    leaves = model_table.get("leaves", [])
    if is_file_source(source) and Path(source).is_file() and file_format(source) == "safetensors":
        raise ArtifactError(f"{path}: its source {source} is itself an artifact; not supported")
    with torch.random.fork_rng(devices=[]):
        if given is not None:
            model = given
        else:
            try:
                model = resolve_source(
                    source, options, sha256=model_table.get("sha256"), trust_pickle=trust_pickle
                )
            except ArtifactError as exc:
                raise ArtifactError(f"{path}: cannot rebuild the source model: {exc}") from exc
        inputs = table = None
        if isinstance(document.get("input"), dict):
            try:
                table = _input_table(document["input"])
            except ArtifactError as exc:
                raise ArtifactError(f"{path}: malformed [input] table: {exc}") from None
            inputs = inputs_from_table(table)
        inputs = inputs if inputs is not None else default_inputs(model)
        try:
            gm = rewrite(model, passes, inputs, leaves=leaves)
        except RewriterError as exc:
            raise ArtifactError(f"{path}: replaying the pipeline failed: {exc}") from exc
    tensors = _read_tensors(path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(graphio.EXTRA_PREFIX)}
    problems = _state_mismatch(gm.state_dict(), tensors)
    if problems:
        raise ArtifactError(
            f"{path}: the tensors do not match the model rebuilt from its pipeline "
            f"({problems}). Was the file edited, or did the source model change?"
        )
    gm.load_state_dict(tensors, strict=True)
    if inputs is not None:
        gm.meta[INPUTS_KEY] = inputs
    if table is not None:
        gm.meta[INPUT_TABLE_KEY] = table
    return gm


def _state_mismatch(
    expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> str | None:
    """Every missing, unexpected and mis-shaped key, or ``None`` when they fit."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != tuple(expected[k].shape)
    )
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {'; '.join(shapes)}")
    return "; ".join(parts) or None


def _warn_versions(path: Path, versions: Mapping[str, Any]) -> None:
    import rewriter

    saved = versions.get("rewriter")
    if saved is not None and saved != rewriter.__version__:
        warnings.warn(
            f"{path} was saved by rewriter {saved}, this is {rewriter.__version__}; "
            "if a pass changed in between, the rebuilt model may not match its tensors",
            stacklevel=3,
        )


__all__ = [
    "DTYPES",
    "INPUTS_KEY",
    "INPUT_TABLE_KEY",
    "apply_weights",
    "check_output",
    "default_inputs",
    "export",
    "file_format",
    "inputs_from_table",
    "is_file_source",
    "load",
    "load_weights",
    "pipeline_text",
    "read_pipeline",
    "resolve_source",
    "save",
    "sha256_of",
    "stored_options",
]
