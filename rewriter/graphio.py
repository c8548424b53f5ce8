"""A rewritten GraphModule stored as data: nodes, module configs and meta as JSON.

:func:`rewriter.save` writes this JSON into the artifact's safetensors metadata (key
``rewriter_graph``) next to the pipeline TOML, so :func:`rewriter.load` rebuilds the
trainable GraphModule from the file alone: no source model, no source file, no
import of user code. Loading never imports a module, never calls anything named
in the file outside the allow-lists below, and never unpickles.

**What is stored.** The module tree, depth first. Each submodule is one entry:

* ``kind = "module"``: a class from ``torch.nn`` (``torch.nn.modules.*``) or from the
  library (``rewriter.*``, including ``rewriter.passes.*`` and ``rewriter.zoo``),
  its constructor config (:mod:`rewriter.modules`), its plain-data attributes, the
  names of its parameters (with ``requires_grad``), buffers (with ``persistent``)
  and tensor attributes, its children, and its training flag;
* ``kind = "graph"``: a nested ``fx.GraphModule`` (the root, a teacher inside a
  distillation pass, a traced submodule): the same, plus its graph (every node's
  op, name, target, args and kwargs as data, and the node meta that is data, such
  as ``nn_module_stack`` with class names as strings), its calling convention (a
  pytree spec for exported programs) and its ``meta`` where that is data (the
  rewrite report, opaque modules, source, lift/slim reports, example inputs...);
* ``kind = "opaque"``: any other class (a user's own module). Only its class name
  and path are recorded; :func:`build` takes it from the ``model=`` the caller
  passes (``rewriter.load(path, model=...)``), else raises :class:`ArtifactError`.

Values are JSON with tagged objects (``{"$": "tuple", "v": [...]}``) for tuples,
slices, ``Ellipsis``, non-finite floats, complex numbers, dicts, ``torch.dtype``,
``torch.device``, ``torch.memory_format``, ``torch.layout``, ``torch.Size``, node
references, allow-listed functions, the library's dataclasses and tensors. Tensors
are never in the JSON: parameters and persistent buffers are the state dict,
everything else (non-persistent buffers, tensor attributes, tensors in meta) is
stored in the same safetensors file under keys starting with :data:`EXTRA_PREFIX`.
Tied tensors (one ``Parameter`` at two paths) stay tied.

**Allow-lists, resolved without importing anything.** ``call_function`` targets:
``operator`` (except ``call``, ``attrgetter``, ``methodcaller``), ``builtins.getattr``
with a public attribute name, ``torch`` tensor functions (the ATen functions and
``torch.functional``; never ``torch.load``, ``torch.save``, ``torch.from_file``),
``torch.nn.functional``, public ``torch.Tensor`` methods called as functions,
``torch.ops.aten.*`` overloads and ``torch._assert``. (No library function is on the
list: no pass inserts one; a pass that does must add it to :func:`_functions`.)
``call_method`` targets: public methods of ``torch.Tensor``. Module classes: those
above, looked up among modules already imported (``rewriter.passes`` and
``rewriter.zoo`` are imported first), never by importing the name in the file.
Dataclasses in meta: dataclasses defined in ``rewriter.*``. Anything else gives an
:class:`ArtifactError` naming it.

**Rebuilding a module.** ``cls.from_rewriter_config(config)`` for library modules,
``cls(**config)`` for ``torch.nn`` ones, run on the ``meta`` device (nothing is
allocated or initialised, the global RNG is untouched). Then its parameters,
buffers and children are replaced by the stored ones and its stored plain-data
attributes are set. Deviation: a module whose constructor arguments cannot be read
from its attributes (``rewriter_config()`` returns ``None``) is rebuilt without its
constructor (``nn.Module.__init__`` and the stored attributes), which is what
unpickling does, minus the code.

**Protocol for new passes.** A module a pass inserts must (1) subclass
:class:`rewriter.modules.RewriterModule` and live in a module under ``rewriter.``
(``rewriter/passes/*.py`` is imported by ``import rewriter.passes``), (2) keep its
constructor arguments as attributes of the same name or override
``rewriter_config()``, and (3) keep its state as parameters, buffers, tensor
attributes, child modules and plain-data attributes (numbers, strings, tuples,
lists, dicts, ``None``). Transient attributes (a cached activation) should be
dropped by ``__getstate__``, as :class:`~rewriter.passes.saliency.SaliencyGate`
does. Functions it calls in the graph must be on the allow-list. Anything else
makes :func:`dump` raise :class:`GraphNotData`; :func:`rewriter.save` then writes
the artifact without a graph, and loading it needs ``trust_source=True``.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import json
import keyword
import math
import operator
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict
from torch.utils import _pytree as pytree

from .errors import ArtifactError
from .modules import RewriterModule, config_from_attributes

GRAPH_KEY = "rewriter_graph"
"""safetensors metadata key of the graph JSON."""
OMITTED_KEY = "rewriter_graph_omitted"
"""safetensors metadata key saying why an artifact holds no graph."""
EXTRA_PREFIX = "rewriter.extra/"
"""Tensor keys for tensors outside the state dict (state-dict keys never contain '/')."""
GRAPH_FORMAT = 1
MAX_JSON_CHARS = 64 << 20
MAX_DEPTH = 64  # nesting of values and of the module tree
MAX_NODES = 1_000_000

_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}
_GRAPH_INTERNALS = _MODULE_INTERNALS | frozenset(fx.GraphModule(nn.Module(), fx.Graph()).__dict__)
_NODE_META_SKIPPED = frozenset({"tensor_meta", "val", "stack_trace", "type", "example_value"})
_OPERATOR_DENIED = frozenset({"call", "attrgetter", "itemgetter", "methodcaller"})
_TORCH_DENIED = frozenset({"from_file", "load", "save"})


class GraphNotData(Exception):
    """A model that cannot be stored as data (a non-allow-listed function or attribute)."""


# -- allow-lists -----------------------------------------------------------------------------


def _public(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_")


_FUNCTIONS: dict[str, Callable[..., Any]] | None = None
_FUNCTION_NAMES: dict[int, str] | None = None


def _functions() -> tuple[dict[str, Callable[..., Any]], dict[int, str]]:
    """Allow-listed functions by name, and their names by ``id``."""
    global _FUNCTIONS, _FUNCTION_NAMES
    if _FUNCTIONS is None or _FUNCTION_NAMES is None:
        table: dict[str, Callable[..., Any]] = {}
        for name in dir(operator):
            if _public(name) and name not in _OPERATOR_DENIED and callable(getattr(operator, name)):
                table[f"operator.{name}"] = getattr(operator, name)
        table["builtins.getattr"] = builtins.getattr
        for name in dir(torch._C._VariableFunctions):
            obj = getattr(torch, name, None)
            if _public(name) and name not in _TORCH_DENIED and callable(obj):
                table[f"torch.{name}"] = obj
        for name in torch.functional.__all__:
            table[f"torch.{name}"] = getattr(torch, name)
        table["torch._assert"] = torch._assert
        for name in dir(torch.Tensor):  # torch.Tensor.add(x, y) as a function
            if _public(name) and callable(getattr(torch.Tensor, name)):
                table[f"torch.Tensor.{name}"] = getattr(torch.Tensor, name)
        for name in dir(F):
            obj = getattr(F, name)
            if _public(name) and callable(obj) and not isinstance(obj, type):
                if getattr(obj, "__module__", "") in ("torch.nn.functional", "torch._C._nn", None):
                    table[f"torch.nn.functional.{name}"] = obj
        names: dict[int, str] = {}
        for name, obj in table.items():
            names.setdefault(id(obj), name)
        _FUNCTIONS, _FUNCTION_NAMES = table, names
    return _FUNCTIONS, _FUNCTION_NAMES


def _function_name(fn: Any) -> str:
    """The allow-listed name of a call target; :class:`GraphNotData` when it is not allowed."""
    if isinstance(fn, torch._ops.OpOverload) and fn.namespace == "aten":
        return f"torch.ops.aten.{fn._opname}.{fn._overloadname}"
    if isinstance(fn, torch._ops.OpOverloadPacket) and fn._qualified_op_name.startswith("aten::"):
        return f"torch.ops.aten.{fn._qualified_op_name.removeprefix('aten::')}"
    _, names = _functions()
    name = names.get(id(fn))
    if name is None:
        what = getattr(fn, "__qualname__", None) or repr(fn)
        module = getattr(fn, "__module__", None)
        raise GraphNotData(f"function {module + '.' if module else ''}{what} is not allow-listed")
    return name


# aten operators whose names are dunders (bitwise ops on masks, as Hugging Face models use)
_ATEN_DUNDERS = frozenset({"__and__", "__or__", "__xor__", "__lshift__", "__rshift__"})


def resolve_function(name: Any) -> Callable[..., Any]:
    """The allow-listed function called ``name``; :class:`ArtifactError` for anything else."""
    if not isinstance(name, str):
        raise ArtifactError(f"a function name must be a string, got {type(name).__name__}")
    if name.startswith("torch.ops.aten."):
        parts = name.split(".")[3:]
        plain = all(
            p.isidentifier() and (not p.startswith("__") or p in _ATEN_DUNDERS) for p in parts
        )
        if 1 <= len(parts) <= 2 and plain:
            try:
                obj: Any = getattr(torch.ops.aten, parts[0])
                if len(parts) == 2:
                    obj = getattr(obj, parts[1])
            except (AttributeError, RuntimeError):
                obj = None
            if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                return obj
        raise ArtifactError(f"the artifact calls {name!r}, which is not an aten operator")
    table, _ = _functions()
    if name not in table:
        raise ArtifactError(
            f"the artifact calls {name!r}, which is not on the allow-list (operator, torch, "
            "torch.nn.functional, torch.ops.aten and getattr); refusing to load it"
        )
    return table[name]


def _allowed_module(name: str) -> bool:
    return (
        name.startswith("torch.nn.modules.") or name == "rewriter" or name.startswith("rewriter.")
    )


def _scan(predicate: Callable[[Any], bool]) -> dict[str, type]:
    import rewriter.passes  # noqa: F401  (the library's own modules, registered)
    import rewriter.zoo  # noqa: F401

    found: dict[str, type] = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not _allowed_module(module_name):
            continue
        for obj in list(vars(module).values()):
            if isinstance(obj, type) and obj.__module__ == module_name and predicate(obj):
                found[f"{module_name}.{obj.__qualname__}"] = obj
    return found


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_classes() -> dict[str, type[nn.Module]]:
    """Module classes an artifact may name: ``torch.nn`` and the library's own."""
    return _scan(lambda c: issubclass(c, nn.Module) and not issubclass(c, fx.GraphModule))


def _dataclasses() -> dict[str, type]:
    """The library's plain record dataclasses (reports): no passes, no ``__post_init__``."""
    from .registry import Pass

    return _scan(
        lambda c: (
            dataclasses.is_dataclass(c)
            and c.__module__.startswith("rewriter.")
            and not issubclass(c, Pass)
            and not hasattr(c, "__post_init__")
        )
    )


# -- values ----------------------------------------------------------------------------------

_ATOMS: dict[str, type] = {
    "dtype": torch.dtype,
    "memory_format": torch.memory_format,
    "layout": torch.layout,
}


class _Encoder:
    """Values to JSON data; tensors go to ``self.tensors`` under fresh extra keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.dataclasses = _dataclasses()
        self.classes = module_classes()

    def tensor(self, value: torch.Tensor) -> str:
        key = f"{EXTRA_PREFIX}{len(self.tensors)}"
        self.tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return key

    def __call__(self, value: Any, *, tensors: bool = True, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise GraphNotData("a value is nested too deeply")
        enc = lambda v: self(v, tensors=tensors, depth=depth + 1)  # noqa: E731
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$": "float", "v": repr(value)}
        if isinstance(value, complex):
            return {"$": "complex", "v": [enc(value.real), enc(value.imag)]}
        if isinstance(value, fx.Node):
            return {"$": "node", "v": value.name}
        if isinstance(value, torch.Tensor):
            if not tensors or isinstance(value, nn.Parameter) or type(value) is not torch.Tensor:
                raise GraphNotData(f"a {type(value).__name__} where only data is stored")
            return {"$": "tensor", "v": self.tensor(value)}
        if isinstance(value, torch.Size):
            return {"$": "size", "v": [int(v) for v in value]}
        if isinstance(value, list):
            return [enc(v) for v in value]
        if type(value) is tuple:
            return {"$": "tuple", "v": [enc(v) for v in value]}
        if type(value) in (dict, immutable_dict):  # fx stores dict arguments immutable
            return {"$": "dict", "v": [[enc(k), enc(v)] for k, v in value.items()]}
        if isinstance(value, slice):
            return {"$": "slice", "v": [enc(value.start), enc(value.stop), enc(value.step)]}
        if value is Ellipsis:
            return {"$": "ellipsis"}
        if isinstance(value, torch.device):
            return {"$": "device", "v": str(value)}
        for tag, cls in _ATOMS.items():
            if isinstance(value, cls):
                return {"$": tag, "v": str(value).removeprefix("torch.")}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            name = _class_name(type(value))
            if self.dataclasses.get(name) is not type(value):
                raise GraphNotData(f"an instance of {name}, not one of the library's dataclasses")
            fields = {
                f.name: enc(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init
            }
            return {"$": "dataclass", "cls": name, "v": fields}
        if callable(value) and not isinstance(value, (type, nn.Module)):
            return {"$": "fn", "v": _function_name(value)}
        raise GraphNotData(f"a value of type {type(value).__module__}.{type(value).__qualname__}")


class _Decoder:
    """JSON data back to values; node references through ``nodes``, tensors from ``tensors``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.nodes: dict[str, fx.Node] | None = None
        self._dataclasses: dict[str, type] | None = None

    def __call__(self, data: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ArtifactError("the stored graph nests values too deeply")
        dec = lambda v: self(v, depth + 1)  # noqa: E731
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [dec(v) for v in data]
        if not isinstance(data, dict) or not isinstance(data.get("$"), str):
            raise ArtifactError(f"malformed value in the stored graph: {_short(data)}")
        tag, v = data["$"], data.get("v")
        if tag == "tuple":
            return tuple(dec(x) for x in _list(v, tag))
        if tag == "dict":
            items = _list(v, tag)
            if not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise ArtifactError("malformed dict in the stored graph")
            out = {}
            for key, value in items:
                key = dec(key)
                if not isinstance(key, (str, int, float, bool, tuple, type(None))):
                    raise ArtifactError(f"unhashable dict key in the stored graph: {_short(key)}")
                out[key] = dec(value)
            return out
        if tag == "node":
            if self.nodes is None or not isinstance(v, str) or v not in self.nodes:
                raise ArtifactError(f"the stored graph refers to an unknown node {_short(v)}")
            return self.nodes[v]
        if tag == "float":
            if v not in ("nan", "inf", "-inf"):
                raise ArtifactError(f"malformed float in the stored graph: {_short(v)}")
            return float(v)
        if tag == "complex":
            re, im = _list(v, tag, 2)
            return complex(_number(re), _number(im))
        if tag == "size":
            items = _list(v, tag)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                raise ArtifactError("malformed torch.Size in the stored graph")
            return torch.Size(items)
        if tag == "slice":
            return slice(*(dec(x) for x in _list(v, tag, 3)))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "device":
            if not isinstance(v, str) or len(v) > 32:
                raise ArtifactError(f"malformed device in the stored graph: {_short(v)}")
            try:
                return torch.device(v)
            except (RuntimeError, ValueError) as exc:
                raise ArtifactError(f"malformed device {v!r} in the stored graph") from exc
        if tag in _ATOMS:
            obj = getattr(torch, v, None) if isinstance(v, str) and _public(v) else None
            if not isinstance(obj, _ATOMS[tag]):
                raise ArtifactError(f"unknown torch {tag} {_short(v)} in the stored graph")
            return obj
        if tag == "tensor":
            if not isinstance(v, str) or not v.startswith(EXTRA_PREFIX) or v not in self.tensors:
                raise ArtifactError(f"the stored graph refers to a missing tensor {_short(v)}")
            return self.tensors[v]
        if tag == "fn":
            return resolve_function(v)
        if tag == "dataclass":
            if self._dataclasses is None:
                self._dataclasses = _dataclasses()
            cls = self._dataclasses.get(data.get("cls"))  # type: ignore[arg-type]
            if cls is None:
                raise ArtifactError(
                    f"the artifact names the class {_short(data.get('cls'))}, which is not one "
                    "of the library's dataclasses; refusing to load it"
                )
            if not isinstance(v, dict):
                raise ArtifactError("malformed dataclass in the stored graph")
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            if not set(v) <= names:
                raise ArtifactError(f"unknown fields {sorted(set(v) - names)} of {data['cls']}")
            try:
                return cls(**{k: dec(x) for k, x in v.items()})
            except (TypeError, ValueError) as exc:
                raise ArtifactError(f"cannot rebuild {data['cls']}: {exc}") from exc
        raise ArtifactError(f"unknown value tag {_short(tag)} in the stored graph")


def _list(v: Any, tag: str, n: int | None = None) -> list[Any]:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise ArtifactError(f"malformed {tag} in the stored graph")
    return v


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ArtifactError("malformed number in the stored graph")
    return float(v)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- dump ------------------------------------------------------------------------------------


def dump(gm: fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    """``gm`` as JSON text, and the tensors outside its state dict (keys :data:`EXTRA_PREFIX`).

    Raises :class:`GraphNotData` (with the reason) when ``gm`` calls a function that
    is not allow-listed, or a library or ``torch.nn`` module holds an attribute that
    is not data.
    """
    encoder = _Encoder()
    seen: dict[int, str] = {}
    root = _dump_module(gm, "", encoder, seen, depth=0)
    text = json.dumps({"graph_format": GRAPH_FORMAT, "root": root}, separators=(",", ":"))
    return text, encoder.tensors


def _dump_module(
    module: nn.Module, path: str, enc: _Encoder, seen: dict[int, str], depth: int
) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise GraphNotData(f"module {path!r} is nested too deeply")
    where = path or "the root module"
    if isinstance(module, fx.GraphModule):
        entry: dict[str, Any] = {"kind": "graph", "class": type(module).__name__}
        internals = _GRAPH_INTERNALS
    elif enc.classes.get(_class_name(type(module))) is type(module):
        entry = {"kind": "module", "class": _class_name(type(module))}
        internals = _MODULE_INTERNALS
        config = (
            module.rewriter_config()
            if isinstance(module, RewriterModule)
            else config_from_attributes(module)
        )
        try:
            entry["config"] = None if config is None else enc(dict(config), tensors=False)
        except GraphNotData as exc:
            raise GraphNotData(f"{where}: constructor config holds {exc}") from None
    else:
        return {"kind": "opaque", "class": _class_name(type(module))}
    prefix = f"{path}." if path else ""

    params: dict[str, Any] = {}
    for name, p in module._parameters.items():
        params[name] = None if p is None else _tensor_ref(p, prefix + name, seen, p.requires_grad)
    buffers: dict[str, Any] = {}
    for name, b in module._buffers.items():
        persistent = name not in module._non_persistent_buffers_set
        ref = None if b is None else _tensor_ref(b, prefix + name, seen, persistent)
        if ref is not None and not persistent and "alias" not in ref:
            ref["key"] = enc.tensor(b)
        buffers[name] = ref
    state = module.__getstate__()
    state = dict(state) if isinstance(state, dict) else dict(module.__dict__)
    attrs: dict[str, Any] = {}
    for name, value in state.items():
        if name in internals:
            continue
        try:
            attrs[name] = enc(value)
        except GraphNotData as exc:
            raise GraphNotData(f"{where}: attribute {name!r} is {exc}") from None
    entry.update(params=params, buffers=buffers, attrs=attrs, training=module.training)
    entry["children"] = [
        [name, None if child is None else _dump_module(child, prefix + name, enc, seen, depth + 1)]
        for name, child in module._modules.items()
    ]
    if isinstance(module, fx.GraphModule):
        entry["graph"] = _dump_graph(module.graph, enc, where)
        meta: dict[str, Any] = {}
        for key, value in module.meta.items():
            try:
                meta[str(key)] = enc(value)
            except GraphNotData:
                continue  # meta that is not data (a cache, a callable) is not kept
        entry["meta"] = meta
    return entry


def _tensor_ref(t: torch.Tensor, path: str, seen: dict[int, str], flag: bool) -> dict[str, Any]:
    if id(t) in seen:
        return {"alias": seen[id(t)], "flag": flag}
    seen[id(t)] = path
    return {"flag": flag}


def _dump_graph(graph: fx.Graph, enc: _Encoder, where: str) -> dict[str, Any]:
    nodes = []
    for node in graph.nodes:
        if node.op == "call_function":
            try:
                target: Any = _function_name(node.target)
            except GraphNotData as exc:
                raise GraphNotData(f"{where}: node {node.name!r} calls a {exc}") from None
        elif node.op == "call_method" and not _tensor_method(node.target):
            raise GraphNotData(f"{where}: node {node.name!r} calls method {node.target!r}")
        else:
            target = node.target
        try:
            args, kwargs = enc(node.args, tensors=False), enc(dict(node.kwargs), tensors=False)
        except GraphNotData as exc:
            raise GraphNotData(f"{where}: node {node.name!r} has {exc} as an argument") from None
        meta = {}
        for key, value in node.meta.items():
            if key in _NODE_META_SKIPPED or not isinstance(key, str):
                continue
            if key == "nn_module_stack" and isinstance(value, dict):
                value = {k: _stack_entry(v) for k, v in value.items()}  # class names as strings
            try:
                meta[key] = enc(value, tensors=False)
            except GraphNotData:
                continue
        entry = {"op": node.op, "name": node.name, "target": target, "args": args, "kwargs": kwargs}
        if meta:
            entry["meta"] = meta
        if node.type is torch.Tensor or node.type == "Tensor":  # annotations fx prints in code
            entry["type"] = "class" if node.type is torch.Tensor else "name"
        nodes.append(entry)
    codegen = graph._codegen
    out: dict[str, Any] = {"nodes": nodes}
    if isinstance(codegen, fx.graph._PyTreeCodeGen):
        info = codegen.pytree_info
        out["pytree"] = {
            "orig_args": list(info.orig_args),
            "in_spec": None if info.in_spec is None else pytree.treespec_dumps(info.in_spec),
            "out_spec": None if info.out_spec is None else pytree.treespec_dumps(info.out_spec),
        }
    elif type(codegen) is not fx.graph.CodeGen:
        raise GraphNotData(f"{where}: its graph uses the code generator {type(codegen).__name__}")
    return out


def _stack_entry(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], type):
        return (value[0], _class_name(value[1]))
    return value


def _tensor_method(name: Any) -> bool:
    return isinstance(name, str) and _public(name) and callable(getattr(torch.Tensor, name, None))


# -- build -----------------------------------------------------------------------------------


def read(text: str) -> dict[str, Any]:
    """The parsed graph JSON; :class:`ArtifactError` for oversized, deep or malformed text."""
    if not isinstance(text, str) or len(text) > MAX_JSON_CHARS:
        raise ArtifactError(
            f"the stored graph is larger than {MAX_JSON_CHARS >> 20} MiB of JSON; refusing it"
        )
    try:
        document = json.loads(text)
    except RecursionError:
        raise ArtifactError("the stored graph JSON is nested too deeply") from None
    except ValueError as exc:
        raise ArtifactError(f"the stored graph is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("graph_format") != GRAPH_FORMAT:
        raise ArtifactError(
            f"the stored graph has format {_short(document.get('graph_format') if isinstance(document, dict) else None)}, "
            f"this rewriter reads {GRAPH_FORMAT}"
        )
    if not isinstance(document.get("root"), dict) or document["root"].get("kind") != "graph":
        raise ArtifactError("the stored graph has no root GraphModule")
    return document


def opaque_paths(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(path, class name)`` of every opaque module in a :func:`read` document."""
    out: list[tuple[str, str]] = []

    def walk(entry: Any, path: str, depth: int) -> None:
        if depth > MAX_DEPTH or not isinstance(entry, dict):
            return
        if entry.get("kind") == "opaque":
            out.append((path, str(entry.get("class"))))
            return
        for item in entry.get("children") or []:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
                walk(item[1], f"{path}.{item[0]}" if path else item[0], depth + 1)

    walk(document["root"], "", 0)
    return out


def build(
    document: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    model: nn.Module | None = None,
) -> fx.GraphModule:
    """The GraphModule a :func:`read` document describes, with ``tensors`` (the whole file).

    Opaque modules are deep copies of the submodules of ``model`` at the same
    paths (their tensors are then loaded from ``tensors`` by the caller's
    ``load_state_dict``). The global RNG is left as it was. Raises
    :class:`ArtifactError` naming whatever is not allowed or malformed.
    """
    builder = _Builder(tensors, model)
    with torch.random.fork_rng(devices=[]):
        gm = builder.module(document["root"], "", 0)
    assert isinstance(gm, fx.GraphModule)
    opaque = [path for path, _ in opaque_paths(document)]
    unexpected = sorted(
        key
        for key in tensors
        if not key.startswith(EXTRA_PREFIX)
        and key not in builder.used
        and not any(key.startswith(f"{p}.") for p in opaque)
    )
    parts = []
    if builder.missing:
        parts.append(f"missing keys: {', '.join(sorted(builder.missing))}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if builder.shapes:
        parts.append(f"shape mismatches: {'; '.join(sorted(builder.shapes))}")
    if parts:
        raise ArtifactError(
            f"the tensors do not match the stored graph ({'; '.join(parts)}). Was the file edited?"
        )
    return gm


class _Builder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], model: nn.Module | None) -> None:
        self.tensors = tensors
        self.model = model
        self.classes = module_classes()
        self.built: dict[str, torch.Tensor] = {}
        self.decode = _Decoder(tensors)
        self.used: set[str] = set()
        # Constructor sizes (layers, features) beyond what the file's tensors could hold
        # are refused: a constructor given a huge count would loop or allocate for long.
        self.max_int = max(1 << 16, sum(t.numel() for t in tensors.values()))
        self.missing: list[str] = []
        self.shapes: list[str] = []

    def module(self, entry: Any, path: str, depth: int) -> nn.Module:
        if depth > MAX_DEPTH:
            raise ArtifactError("the stored module tree is nested too deeply")
        where = repr(path) if path else "the root module"
        if not isinstance(entry, dict):
            raise ArtifactError(f"malformed module entry for {where}")
        kind = entry.get("kind")
        if kind == "opaque":
            return self.opaque(path, entry.get("class"))
        if kind == "graph":
            name = entry.get("class")
            if not isinstance(name, str) or not name.isidentifier():
                raise ArtifactError(f"malformed GraphModule class name {_short(name)} for {where}")
            module: nn.Module = fx.GraphModule(nn.Module(), fx.Graph(), name)
            internals = _GRAPH_INTERNALS
        elif kind == "module":
            module = self.construct(entry, where)
            internals = _MODULE_INTERNALS
        else:
            raise ArtifactError(f"unknown module kind {_short(kind)} for {where}")
        prefix = f"{path}." if path else ""
        made = {  # what the constructor made: the stored tensors must have the same shapes
            name: tuple(t.shape)
            for name, t in [*module._parameters.items(), *module._buffers.items()]
            if t is not None
        }
        self.made = made
        module._parameters.clear()
        module._buffers.clear()
        module._non_persistent_buffers_set.clear()
        module._modules.clear()
        for name, spec in _table(entry.get("params"), "params", where).items():
            tensor = None if spec is None else self.tensor(spec, prefix + name, where, True)
            module._parameters[name] = (
                None
                if tensor is None
                else tensor
                if isinstance(tensor, nn.Parameter)
                else nn.Parameter(tensor, requires_grad=bool(spec["flag"]))
            )
        for name, spec in _table(entry.get("buffers"), "buffers", where).items():
            module._buffers[name] = (
                None if spec is None else self.tensor(spec, prefix + name, where, False)
            )
            if spec is not None and not spec["flag"]:
                module._non_persistent_buffers_set.add(name)
        attrs = _table(entry.get("attrs"), "attrs", where)
        for name, value in attrs.items():
            self.check_attribute(module, name, internals, where)
            module.__dict__[name] = self.decode(value)
        training = entry.get("training")
        if not isinstance(training, bool):
            raise ArtifactError(f"malformed training flag for {where}")
        module.training = training
        children = entry.get("children")
        if not isinstance(children, list):
            raise ArtifactError(f"malformed children of {where}")
        for item in children:
            if not (isinstance(item, list) and len(item) == 2 and _name_ok(item[0])):
                raise ArtifactError(f"malformed child entry of {where}")
            if item[0] in module._parameters or item[0] in module._buffers or item[0] in attrs:
                raise ArtifactError(
                    f"child {item[0]!r} of {where} clashes with a tensor or attribute"
                )
            module.__dict__.pop(item[0], None)  # a plain value the constructor put there
            child = None if item[1] is None else self.module(item[1], prefix + item[0], depth + 1)
            module._modules[item[0]] = child
        if isinstance(module, fx.GraphModule):
            module.meta.update(self.meta(entry.get("meta"), where))
            self.graph(module, entry.get("graph"), where)
        return module

    def construct(self, entry: Mapping[str, Any], where: str) -> nn.Module:
        name = entry.get("class")
        cls = self.classes.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ArtifactError(
                f"the artifact names the module class {_short(name)} for {where}, which is "
                "neither a torch.nn class nor one of rewriter's own modules; refusing to "
                "load it"
            )
        config = self.decode(entry.get("config"))
        if config is None:
            module = cls.__new__(cls)
            nn.Module.__init__(module)
            return module
        if not isinstance(config, dict) or not all(_name_ok(k) for k in config):
            raise ArtifactError(f"malformed constructor config of {name} for {where}")
        big = [
            v
            for v in pytree.tree_leaves(list(config.values()))
            if isinstance(v, int) and abs(v) > self.max_int
        ]
        if big:
            raise ArtifactError(
                f"the constructor config of {name} for {where} holds {big[0]}, more than the "
                f"file's {self.max_int} tensor elements could need; refusing it"
            )
        try:
            with torch.device("meta"):
                if issubclass(cls, RewriterModule):
                    return cls.from_rewriter_config(config)
                return cls(**config)
        except Exception as exc:  # a constructor raises whatever it raises on bad arguments
            raise ArtifactError(
                f"cannot construct {name} for {where} from its stored config: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def check_attribute(
        self, module: nn.Module, name: Any, internals: frozenset, where: str
    ) -> None:
        if not _name_ok(name) or name.startswith("__") or name in internals:
            raise ArtifactError(
                f"the artifact sets a forbidden attribute {_short(name)} on {where}"
            )
        if name in module._parameters or name in module._buffers or name in module._modules:
            raise ArtifactError(f"attribute {name!r} of {where} clashes with a tensor or module")
        existing = getattr(type(module), name, None)
        if existing is not None and not isinstance(existing, (bool, int, float, str, tuple)):
            raise ArtifactError(
                f"the artifact overrides {type(module).__name__}.{name} on {where}; refusing"
            )

    def tensor(self, spec: Any, path: str, where: str, parameter: bool) -> torch.Tensor:
        if not isinstance(spec, dict) or not isinstance(spec.get("flag"), bool):
            raise ArtifactError(f"malformed tensor entry {path!r} of {where}")
        if "alias" in spec:
            alias = spec["alias"]
            if not isinstance(alias, str) or alias not in self.built:
                raise ArtifactError(f"tensor {path!r} is tied to an unknown tensor {_short(alias)}")
            tensor = self.built[alias]
            if parameter or spec["flag"]:
                self.used.add(path)  # a tied tensor is in the state dict under both names
        else:
            key = spec.get("key", path)
            if not isinstance(key, str):
                raise ArtifactError(f"malformed tensor key for {path!r}")
            if key not in self.tensors:
                self.missing.append(key)
                tensor = torch.empty(0)
            else:
                tensor = self.tensors[key]
                self.used.add(key)
            name = path.rpartition(".")[2]
            made = self.made.get(name)
            if made is not None and key in self.tensors and made != tuple(tensor.shape):
                self.shapes.append(f"{key}: file {tuple(tensor.shape)}, model {made}")
            if parameter:
                tensor = nn.Parameter(tensor, requires_grad=spec["flag"])
        self.built[path] = tensor
        return tensor

    def opaque(self, path: str, cls: Any) -> nn.Module:
        if self.model is None:
            raise ArtifactError(
                f"the artifact's module {path!r} is a {_short(cls)}: user code, not a torch.nn "
                "or rewriter module, so it is not stored as data. Pass the model it came from, "
                "rewriter.load(path, model=your_model) (its submodule of that name is used), "
                "or, if you trust the factory named in the artifact, trust_source=True "
                "(CLI: --trust-source)"
            )
        try:
            source = self.model.get_submodule(path)
        except AttributeError:
            raise ArtifactError(
                f"the model given to load() has no submodule {path!r} (the artifact's opaque "
                f"{_short(cls)}); pass the model the artifact was made from"
            ) from None
        if _class_name(type(source)) != cls:
            raise ArtifactError(
                f"the model given to load() has a {_class_name(type(source))} at {path!r}; "
                f"the artifact expects a {cls}"
            )
        return copy.deepcopy(source)

    def graph(self, gm: fx.GraphModule, data: Any, where: str) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
            raise ArtifactError(f"malformed graph of {where}")
        if len(data["nodes"]) > MAX_NODES:
            raise ArtifactError(f"the graph of {where} has more than {MAX_NODES} nodes")
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        self.decode.nodes = nodes
        for item in data["nodes"]:
            node = self.node(graph, gm, item, where)
            nodes[item["name"]] = node
        self.decode.nodes = None
        pytree_info = data.get("pytree")
        if pytree_info is not None:
            graph._codegen = self.codegen(pytree_info, where)
        try:
            graph.lint()
            gm.graph = graph
            gm.recompile()
        except Exception as exc:  # lint and code generation raise several types
            raise ArtifactError(f"the stored graph of {where} is malformed: {exc}") from None

    def node(self, graph: fx.Graph, gm: fx.GraphModule, item: Any, where: str) -> fx.Node:
        if not isinstance(item, dict) or not _name_ok(item.get("name")):
            raise ArtifactError(f"malformed node in the graph of {where}")
        op, name, target = item.get("op"), item["name"], item.get("target")
        if op == "call_function":
            target = resolve_function(target)
            if target is builtins.getattr:
                args = item.get("args")
                attr = self.decode(args)[1] if isinstance(args, dict) else None
                if not (isinstance(attr, str) and _public(attr)):
                    raise ArtifactError(
                        f"node {name!r} reads the attribute {_short(attr)}; only public "
                        "attributes may be read"
                    )
        elif op == "call_method":
            if not _tensor_method(target):
                raise ArtifactError(
                    f"node {name!r} calls the method {_short(target)}, which is not a public "
                    "torch.Tensor method; refusing to load it"
                )
        elif op in ("call_module", "get_attr"):
            if not isinstance(target, str) or not all(_name_ok(p) for p in target.split(".")):
                raise ArtifactError(f"node {name!r} has a malformed target {_short(target)}")
            try:
                gm.get_submodule(target) if op == "call_module" else _get_attr(gm, target)
            except AttributeError:
                raise ArtifactError(f"node {name!r} refers to a missing {target!r}") from None
        elif op in ("placeholder", "output"):  # fx prints placeholder targets into the code
            bare = target.removeprefix("**").removeprefix("*") if isinstance(target, str) else None
            if not _identifier(bare):
                raise ArtifactError(f"node {name!r} has a malformed target {_short(target)}")
        else:
            raise ArtifactError(f"node {_short(name)} has an unknown op {_short(op)}")
        args = self.decode(item.get("args"))
        kwargs = self.decode(item.get("kwargs"))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ArtifactError(f"node {name!r} has malformed arguments")
        if not all(_identifier(k) for k in kwargs):  # keyword names are printed into the code
            raise ArtifactError(f"node {name!r} has a malformed keyword argument name")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise ArtifactError(f"the stored graph of {where} repeats the node name {name!r}")
        node.meta.update(self.meta(item.get("meta", {}), f"node {name!r} of {where}"))
        if "type" in item:  # only these two: fx prints annotations into the generated code
            if item["type"] not in ("class", "name"):
                raise ArtifactError(f"node {name!r} has a malformed type annotation")
            node.type = torch.Tensor if item["type"] == "class" else "Tensor"
        return node

    def meta(self, data: Any, where: str) -> dict[str, Any]:
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ArtifactError(f"malformed meta of {where}")
        return {k: self.decode(v) for k, v in data.items()}

    def codegen(self, info: Any, where: str) -> fx.graph.CodeGen:
        if not isinstance(info, dict) or not isinstance(info.get("orig_args"), list):
            raise ArtifactError(f"malformed calling convention of {where}")
        try:
            specs = [
                None if info.get(k) is None else pytree.treespec_loads(str(info[k]))
                for k in ("in_spec", "out_spec")
            ]
        except Exception as exc:  # treespec_loads raises several types on bad JSON
            raise ArtifactError(f"malformed pytree spec of {where}: {exc}") from None
        if not all(_identifier(a) for a in info["orig_args"]):
            raise ArtifactError(f"malformed argument names of {where}")
        return fx.graph._PyTreeCodeGen(
            fx.graph._PyTreeInfo(list(info["orig_args"]), specs[0], specs[1])
        )


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def _name_ok(name: Any) -> bool:
    return (
        isinstance(name, str) and name.isidentifier() or (isinstance(name, str) and name.isdigit())
    )


def _table(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(_name_ok(k) for k in value):
        raise ArtifactError(f"malformed {what} of {where}")
    return value


__all__ = [
    "EXTRA_PREFIX",
    "GRAPH_KEY",
    "OMITTED_KEY",
    "GraphNotData",
    "build",
    "dump",
    "module_classes",
    "opaque_paths",
    "read",
    "resolve_function",
]
