"""The pass registry and the :class:`Pass` base class.

A pass is a frozen dataclass: its fields are its options. The registry maps the
pass's ``name`` (the same in Python, TOML and the CLI) to its class; options are
described, coerced and validated from the dataclass fields, so every front end
shares one schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin

from torch import fx

from .context import RewriteContext
from .errors import OptionError
from .patterns import Rule

_REGISTRY: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses are frozen dataclasses.

    Class attributes:
      ``name``: registry name; ``preserves_outputs``: whether the pass keeps the
      model's outputs unchanged at insertion (the pass manager checks it).
    Override :meth:`rules` for a rule-table pass, or :meth:`apply` for anything else.
    """

    name: ClassVar[str] = ""
    preserves_outputs: ClassVar[bool] = False

    def rules(self) -> list[Rule | tuple]:
        return []

    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        ctx.apply_rules(self.rules())

    def options(self) -> dict[str, Any]:
        """The pass's options as plain TOML-friendly values."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: before => after."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a help text shown by ``rewriter passes`` and errors."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a scalar as an option default")
    return dataclasses.field(default=default, metadata={"help": help})


def register(cls: type[Pass]) -> type[Pass]:
    """Register a pass class under its ``name``. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError("register() expects a subclass of rewriter.Pass")
    if "__dataclass_fields__" not in cls.__dict__:
        raise TypeError(
            f"{cls.__name__} must be decorated with @dataclass(frozen=True) (below @register)"
        )
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name (set the class attribute `name`)")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        if existing.__qualname__ != cls.__qualname__ or existing.__module__ != cls.__module__:
            raise ValueError(f"a pass named {cls.name!r} is already registered ({existing})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    from . import passes  # noqa: F401  (registers the built-in passes)


def registered() -> dict[str, type[Pass]]:
    """All registered passes by name, built-ins included."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered()
    if name not in passes:
        close = difflib.get_close_matches(name, list(passes), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"unknown pass {name!r}.{hint} Valid passes: {', '.join(passes)}")
    return passes[name]


@dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def option_specs(cls: type[Pass]) -> list[OptionSpec]:
    hints = typing.get_type_hints(cls)
    return [
        OptionSpec(f.name, hints[f.name], f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


def make_pass(spec: Pass | str | tuple[str, dict[str, Any]] | list) -> Pass:
    """Turn ``"rbn"``, ``("masks", {"exclude": ["fc"]})`` or a pass object into a pass."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        name, opts = spec, {}
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        name, opts = spec[0], spec[1]
        if not isinstance(opts, dict):
            raise OptionError(f"options of pass {name!r} must be a dict, got {type(opts).__name__}")
    else:
        raise OptionError(
            f"cannot read pass spec {spec!r}: use a name ('rbn'), a (name, {{options}}) pair, "
            "or a pass object"
        )
    cls = get_pass(name)
    specs = {s.name: s for s in option_specs(cls)}
    problems, values = [], {}
    for key, raw in opts.items():
        if key not in specs:
            close = difflib.get_close_matches(key, list(specs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(f"{s.name}: {s.type_name}" for s in specs.values()) or "none"
            problems.append(f"unknown option {key!r}{hint}; valid options: {valid}")
            continue
        try:
            values[key] = coerce(raw, specs[key].type)
        except (TypeError, ValueError) as exc:
            problems.append(f"option {key!r}: {exc}")
    if problems:
        raise OptionError(f"pass {name!r}: " + "; ".join(problems))
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"pass {name!r}: {exc}") from exc


def coerce(value: Any, tp: Any) -> Any:
    """Convert a TOML/CLI value to an option's declared type, or raise ``ValueError``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ValueError(f"expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise ValueError(f"expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise TypeError(f"option type {tp!r} is not supported by the registry")


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}" if args and args[-1] is Ellipsis else "list"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "none")
